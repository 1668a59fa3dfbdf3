"""Plain-PyTorch twin of everything sbfast computes (docs/algorithm.md).

Written for clarity, not speed: it is the baseline of every parity test and every benchmark,
and the fallback where no kernel exists for a device. It stands at the bottom of the package:
it imports torch and :mod:`sbfast.common`, never the fast paths or the trainer.

| module | what |
|---|---|
| ``sam`` | ``SAM``: SAM / ASAM with the normal half (the release's ``NSAM``) |
| ``scores`` | ``fisher_scores`` (vmap of per-sample gradients), ``sam_loss_gap_scores`` |
| ``selection`` | ``select_sam_masks`` and its two stages ``ksmallest_mask``, ``sharpbalance_masks`` |
| ``training`` | ``mixed_step``, ``train_member_epoch`` (one member's epoch, the release's loop) |
| ``op_twins`` | twins of the element-level ops (norms, SAM passes, the ellipsoid's norms and step) |

The slow end-to-end trainer built from these pieces is ``sbfast.train.train_ensemble_reference``.
"""

from sbfast.common import VARIANTS
from sbfast.reference.op_twins import (
    ellipsoid_momentum_step_,
    ellipsoid_sq_norms,
    global_sq_norm,
    per_sample_conv_grad_sq_norm,
    per_sample_grad_sq_norm_direct,
    per_sample_grad_sq_norm_gram,
    sam_perturb_,
    sam_restore_sgd_,
)
from sbfast.reference.sam import SAM
from sbfast.reference.scores import fisher_scores, sam_loss_gap_scores
from sbfast.reference.selection import ksmallest_mask, select_sam_masks, sharpbalance_masks
from sbfast.reference.training import mixed_step, train_member_epoch

__all__ = [
    "SAM",
    "VARIANTS",
    "ellipsoid_momentum_step_",
    "ellipsoid_sq_norms",
    "fisher_scores",
    "global_sq_norm",
    "ksmallest_mask",
    "mixed_step",
    "per_sample_conv_grad_sq_norm",
    "per_sample_grad_sq_norm_direct",
    "per_sample_grad_sq_norm_gram",
    "sam_loss_gap_scores",
    "sam_perturb_",
    "sam_restore_sgd_",
    "select_sam_masks",
    "sharpbalance_masks",
    "train_member_epoch",
]
