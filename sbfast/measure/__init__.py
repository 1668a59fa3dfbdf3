"""The paper's measures of a trained model: the batches they run on, the model state they leave
as found, and the result they return."""

from .batches import as_batches, check_model, measuring
from .curvature import hessian_eigenvalues, hessian_trace
from .fisher_trace import fisher_trace
from .ntk import ntk_gram, ntk_logdet
from .results import MeasureResult, json_ready

__all__ = [
    "MeasureResult",
    "as_batches",
    "check_model",
    "fisher_trace",
    "hessian_eigenvalues",
    "hessian_trace",
    "json_ready",
    "measuring",
    "ntk_gram",
    "ntk_logdet",
]
