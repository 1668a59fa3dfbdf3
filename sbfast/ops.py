"""Thin typed wrappers over ``torch.ops.sbfast.*``: validate, then dispatch.

Validation is the op's contract in :mod:`sbfast.op_checks` (the same functions guard the
Python faces that :mod:`sbfast.registry` registers): it raises ``ValueError``/``TypeError``
naming the problem before any kernel runs. Which kernel serves a device is decided in
:mod:`sbfast.registry` (see ``sbfast.backends()``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sbfast import op_checks, registry
from sbfast.common import MASK_OP_VARIANTS


def global_sq_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared global L2 norm, ``sum_k ||t_k||_2^2``, of a list of tensors, without host sync.

    Args:
        tensors: floating tensors of any shapes (empty ones allowed) on one device.
    Returns:
        0-d tensor on that device: float64 if any input is float64, else float32 (half and
        bfloat16 accumulate in float32). An empty list gives a float32 CPU zero.
    """
    tensors = list(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    op_checks.global_sq_norm(tensors)
    return registry.op_for("global_sq_norm", tensors[0].device)(tensors)


def ellipsoid_sq_norms(z: torch.Tensor, inv_scale: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
    """``out[k] = sum_j (z_j s_j)^2 / (1 + 2 lambda_k s_j^2)^2`` for s = ``inv_scale``: the squared
    weighted norms ``||u_k / c||^2`` of the candidates ``u_k = z / (1 + 2 lambda_k / c^2)`` of a
    projection of z onto the ellipsoid ``||u / c|| <= rho`` (s = 1/c, 0 where c = 0), all K in
    one pass over z and s.

    Args:
        z, inv_scale: floating tensors of one shape, dtype and device, e.g. [P] (any strides).
        lambdas: 1 to 64 finite multipliers >= 0 (0 gives ``||z / c||^2``).
    Returns:
        [K] on z's device, float64 if z is float64, else float32; a host read of it is a sync.
    """
    op_checks.ellipsoid_sq_norms(z, inv_scale, lambdas)
    return registry.op_for("ellipsoid_sq_norms", z.device)(z, inv_scale, [float(v) for v in lambdas])


def ellipsoid_momentum_step_(
    z: torch.Tensor,
    point: torch.Tensor,
    two_inv2: torch.Tensor,
    prev: torch.Tensor,
    w0: torch.Tensor,
    lmbd: float,
    momentum: float,
) -> None:
    """The APGD step after projecting z onto the ellipsoid ``||u / c|| <= rho``, in one pass and
    in place: ``u = z / (1 + lmbd two_inv2)`` (lmbd = 0: z is inside and stays), then
    ``z <- lerp(prev, u, momentum)`` and ``point <- w0 + z``.

    Args:
        z: [P] the ascent's candidate, overwritten with the new delta.
        point: [P] written with w0 + the new delta (another buffer than z).
        two_inv2: [P] 2 / c^2, 0 where c = 0; prev, w0: [P] the last delta and the centre.
            All five contiguous, one floating dtype and device.
        lmbd: the multiplier from ``ellipsoid_multiplier`` (0 when z is inside), finite >= 0.
        momentum: the weight of u, in [0, 1] (APGD's 0.75).
    """
    op_checks.ellipsoid_momentum_step_(z, point, two_inv2, prev, w0, lmbd, momentum)
    registry.op_for("ellipsoid_momentum_step_", z.device)(z, point, two_inv2, prev, w0, float(lmbd), float(momentum))


# ---- per-sample squared norms of a layer's weight gradient ------------------------------------


def per_sample_grad_sq_norm_direct(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||sum_t g_it a_it^T||_F^2``: the squared norm of each sample's weight gradient
    of a layer with inputs ``a`` and output gradients ``g``, formed tile by tile (direct form).

    Args:
        a: floating [B, T, d] (any strides); g: floating [B, T, p] on the same device.
    Returns:
        [B], float64 if either input is float64, else float32. Costs ~B*T*d*p multiply-adds.
    """
    op_checks.per_sample_grad_sq_norm_direct(a, g)
    return registry.op_for("per_sample_grad_sq_norm_direct", a.device)(a, g)


def per_sample_grad_sq_norm_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The same per-sample squared norms as :func:`per_sample_grad_sq_norm_direct` by the Gram
    ("ghost norm") identity ``sum_{t,s} (a_t . a_s)(g_t . g_s)``; ~B*T^2*(d+p) multiply-adds."""
    op_checks.per_sample_grad_sq_norm_gram(a, g)
    return registry.op_for("per_sample_grad_sq_norm_gram", a.device)(a, g)


def per_sample_conv_grad_sq_norm(
    x: torch.Tensor,
    g: torch.Tensor,
    weight_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Per-sample squared norm of a 1-D/2-D convolution's weight gradient, ``||dW_i||_F^2``,
    without unfolding the input on CPU.

    Args:
        x: floating [B, C_in, *S] input as the convolution sees it (padding modes other than
            zeros already applied); g: floating [B, C_out, *S'] gradient of its output.
        weight_size: [C_out, C_in / groups, *kernel]; stride, padding (zeros), dilation: one int
            per spatial dim (1 or 2 of them); groups: the convolution's groups.
    Returns:
        [B], float64 if either input is float64, else float32.
    """
    op = "per_sample_conv_grad_sq_norm"
    op_checks.per_sample_conv_grad_sq_norm(x, g, weight_size, stride, padding, dilation, groups)
    return registry.op_for(op, x.device)(x, g, list(weight_size), list(stride), list(padding), list(dilation), groups)


# ---- top-k subset selection --------------------------------------------------------------

SHARPBALANCE_VARIANTS = MASK_OP_VARIANTS  # code 0 and 1 of sbfast::sharpbalance_masks


def ksmallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k smallest scores as a mask, ties by ascending index; no host sync.

    Args:
        scores: floating [M, N] (float16, bfloat16, float32 or float64).
        k: int in [0, N].
    Returns:
        bool [M, N] on scores' device: row j is True exactly at the first k entries of a stable
        ascending sort of scores[j] (-0.0 ties +0.0; NaN sorts last, as torch.sort).
    """
    op = "ksmallest_mask"
    op_checks.ksmallest_mask(scores, k)
    return registry.op_for(op, scores.device)(scores, k.__index__())  # numpy and 0-d tensors' ints too


def sharpbalance_masks(flat_mask: torch.Tensor, variant: str | int = "balance") -> torch.Tensor:
    """SharpBalance's SAM masks from the members' flat sets; no host sync.

    Args:
        flat_mask: bool [M, N], row j = F_j (e.g. :func:`ksmallest_mask` of the scores).
        variant: "balance" (or 0): A_i | R_i; "boost" (or 1): A_i | (R minus R_i). R = samples in
            no F_j in ascending index order, R_i = R[i::M], A_i = union of F_j over j != i.
    Returns:
        bool [M, N] on flat_mask's device, True = SAM for that member.
    """
    op = "sharpbalance_masks"
    code = SHARPBALANCE_VARIANTS.index(variant) if variant in SHARPBALANCE_VARIANTS else variant
    op_checks.sharpbalance_masks(flat_mask, code)
    return registry.op_for(op, flat_mask.device)(flat_mask, code)


# ---- the fused SAM optimizer's two passes (sbfast.optim.SharpBalanceSAM) --------------------


def sam_perturb_(
    param: torch.Tensor, backup: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, adaptive: bool = False
) -> None:
    """SAM's perturbation of one flat run, in place: ``backup = w; w = w + e``.

    Math: e = (adaptive ? w^2 * g : g) * s, each product rounded, then the add (reference.SAM's
    order); s == 0 (rho = 0, or a step skipped for a non-finite norm) leaves w bit for bit.

    Args:
        param: contiguous floating [n] (written); backup: like param (written); grad: like param.
        scale: one-element float32/float64 tensor on param's device, s = rho / (||g|| + 1e-12).
        adaptive: ASAM's form.
    """
    op = "sam_perturb_"
    op_checks.sam_perturb_(param, backup, grad, scale, adaptive)
    registry.op_for(op, param.device)(param, backup, grad, scale, bool(adaptive))


def sam_restore_sgd_(
    param: torch.Tensor,
    backup: torch.Tensor | None,
    grad: torch.Tensor,
    normal_grad: torch.Tensor | None,
    momentum_buf: torch.Tensor | None,
    momentum_ready: torch.Tensor | None,
    lr: torch.Tensor,
    skip: torch.Tensor,
    inv_scale: torch.Tensor,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    write_grad_sum: bool = False,
) -> None:
    """Restore w from ``backup`` and take one torch.optim.SGD step, in one pass, in place.

    Math: w0 = backup (or w); g = (grad + normal_grad) * inv_scale; d = g + wd * w0;
    buf = d if momentum_ready[0] == 0 else momentum * buf + (1 - dampening) * d;
    d = d + momentum * buf (nesterov) or buf; w = w0 - lr * d; then momentum_ready = 1.
    skip != 0: only w = w0 (buffers, flags and grads untouched).

    Args:
        param, backup, grad, normal_grad, momentum_buf: contiguous floating [n], one dtype and
            device (backup, normal_grad may be None; momentum_buf is needed iff momentum != 0).
        momentum_ready: contiguous uint8 [k >= 1] (with momentum): the buffers' "initialised" flags.
        lr, skip, inv_scale: one-element float32/float64 tensors on param's device.
        write_grad_sum: store grad + normal_grad into grad (the gradient the reference leaves).
    """
    op = "sam_restore_sgd_"
    op_checks.sam_restore_sgd_(
        param,
        backup,
        grad,
        normal_grad,
        momentum_buf,
        momentum_ready,
        lr,
        skip,
        inv_scale,
        weight_decay,
        momentum,
        dampening,
        nesterov,
        write_grad_sum,
    )
    registry.op_for(op, param.device)(
        param,
        backup,
        grad,
        normal_grad,
        momentum_buf,
        momentum_ready,
        lr,
        skip,
        inv_scale,
        float(weight_decay),
        float(momentum),
        float(dampening),
        bool(nesterov),
        bool(write_grad_sum),
    )
