"""The paper's measures on trained members (any ``nn.Module``, run in eval mode, left as found).

| module | what |
|---|---|
| ``batches`` | ``as_batches`` (the batches a measure runs on), ``measuring`` (eval mode, all put back) |
| ``results`` | ``MeasureResult``: value, per-batch values, settings; strict JSON |
| ``perturbation`` | the flat-parameter view, perturbation sets and projections |
| ``worst_case`` | ``worst_case_sharpness``: APGD, l2 / linf, adaptive (the paper's sharpness) |
| ``apgd``, ``apgd_stacked`` | the ascent: one problem at a time, or several side by side (vmapped) |
| ``average_case`` | ``average_sharpness``: Gaussian / uniform noise scaled by rho and abs(w) |
| ``hvp``, ``curvature`` | ``hessian_trace`` (Hutchinson), ``hessian_eigenvalues`` (power / Lanczos) |
| ``taylor`` | v^T H v by second-order forward mode (the trace's default where the model has rules) |
| ``fisher_trace`` | ``fisher_trace``: mean per-sample squared gradient norm |
| ``ntk`` | ``ntk_gram``, ``ntk_logdet``: the release's NTK mode |
| ``predictions`` | ``predictions``: every member's logits and probabilities, once per data set |
| ``disagreement`` | ``disagreement`` (M x M), ``disagreement_ratios`` (DER, EIR) |
| ``divergence`` | ``kl_divergence`` (KL(p_i \\|\\| p_j)), ``symmetric_kl_divergence``, ``js_divergence`` |
| ``cka`` | ``cka``, ``cka_matrix``, ``minibatch_cka``, ``MinibatchCKA``, Gram helpers |
| ``member_cka`` | ``member_cka``: M x M CKA per representation (input, logits, softmax, layers) |
| ``variance`` | ``bias_variance``: bias^2 and the M/(M-1)-corrected variance |
| ``diversity_report`` | ``diversity_report``: all of them as a JSON-ready dict |
"""

from sbfast.measure.average_case import average_sharpness, draw_noise
from sbfast.measure.batches import as_batches, check_model, measuring
from sbfast.measure.cka import (
    MinibatchCKA,
    center_gram,
    cka,
    cka_from_grams,
    cka_matrix,
    feature_space_linear_cka,
    gram_linear,
    gram_rbf,
    minibatch_cka,
)
from sbfast.measure.curvature import hessian_eigenvalues, hessian_trace
from sbfast.measure.disagreement import disagreement, disagreement_ratios
from sbfast.measure.divergence import js_divergence, kl_divergence, symmetric_kl_divergence
from sbfast.measure.diversity_report import MEASURES as DIVERSITY_MEASURES
from sbfast.measure.diversity_report import diversity_report
from sbfast.measure.fisher_trace import fisher_trace
from sbfast.measure.member_cka import MemberCKA, block_names, member_cka
from sbfast.measure.ntk import ntk_gram, ntk_logdet
from sbfast.measure.predictions import SetPredictions, predictions
from sbfast.measure.results import MeasureResult, json_ready
from sbfast.measure.variance import BiasVariance, bias_variance
from sbfast.measure.worst_case import apgd_checkpoints, worst_case_sharpness

__all__ = [
    "DIVERSITY_MEASURES",
    "MeasureResult",
    "as_batches",
    "check_model",
    "json_ready",
    "measuring",
    "apgd_checkpoints",
    "average_sharpness",
    "draw_noise",
    "worst_case_sharpness",
    "fisher_trace",
    "hessian_eigenvalues",
    "hessian_trace",
    "ntk_gram",
    "ntk_logdet",
    "BiasVariance",
    "MemberCKA",
    "MinibatchCKA",
    "SetPredictions",
    "bias_variance",
    "block_names",
    "center_gram",
    "cka",
    "cka_from_grams",
    "cka_matrix",
    "disagreement",
    "disagreement_ratios",
    "diversity_report",
    "feature_space_linear_cka",
    "gram_linear",
    "gram_rbf",
    "js_divergence",
    "kl_divergence",
    "member_cka",
    "minibatch_cka",
    "predictions",
    "symmetric_kl_divergence",
]
