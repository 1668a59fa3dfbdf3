"""Thin typed wrappers over ``torch.ops.sbfast.*``: validate, then dispatch.

Validation raises ``ValueError``/``TypeError`` naming the problem before any kernel runs;
which kernel serves a device is decided in :mod:`sbfast.registry` (see ``sbfast.backends()``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sbfast import registry


def _check_floating_same_device(tensors: Sequence[torch.Tensor], op: str) -> None:
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: element {i} is a {type(t).__name__}, expected a torch.Tensor")
        if not t.is_floating_point():
            raise TypeError(f"{op}: tensor {i} has dtype {t.dtype}, expected a floating dtype")
        if t.device != device:
            raise ValueError(f"{op}: tensor {i} is on {t.device}, tensor 0 on {device}; expected one device")
        if t.is_sparse:
            raise TypeError(f"{op}: tensor {i} is sparse; only dense tensors are supported")


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
    _check_floating_same_device(tensors, "global_sq_norm")
    return registry.op_for("global_sq_norm", tensors[0].device)(tensors)


# issue 5: per-sample squared norms of a layer's weight gradient


def _check_per_sample_pair(a: torch.Tensor, g: torch.Tensor, op: str) -> None:
    _check_floating_same_device([a, g], op)
    if a.dim() != 3 or g.dim() != 3:
        raise ValueError(f"{op}: expected a [B, T, d] and g [B, T, p], got shapes {tuple(a.shape)} and {tuple(g.shape)}")
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"{op}: a {tuple(a.shape)} and g {tuple(g.shape)} differ in B or T; expected a [B, T, d], g [B, T, p]")


def per_sample_grad_sq_norm_direct(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||sum_t g_it a_it^T||_F^2``: the squared norm of each sample's weight gradient
    of a layer with inputs ``a`` and output gradients ``g``, formed tile by tile (direct form).

    Args:
        a: floating [B, T, d] (any strides); g: floating [B, T, p] on the same device.
    Returns:
        [B], float64 if either input is float64, else float32. Costs ~B*T*d*p multiply-adds.
    """
    _check_per_sample_pair(a, g, "per_sample_grad_sq_norm_direct")
    return registry.op_for("per_sample_grad_sq_norm_direct", a.device)(a, g)


def per_sample_grad_sq_norm_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The same per-sample squared norms as :func:`per_sample_grad_sq_norm_direct` by the Gram
    ("ghost norm") identity ``sum_{t,s} (a_t . a_s)(g_t . g_s)``; ~B*T^2*(d+p) multiply-adds."""
    _check_per_sample_pair(a, g, "per_sample_grad_sq_norm_gram")
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
    _check_floating_same_device([x, g], op)
    spatial = x.dim() - 2
    if spatial not in (1, 2) or g.dim() != x.dim() or len(weight_size) != x.dim():
        raise ValueError(f"{op}: expected x [B, C_in, *S] and g [B, C_out, *S'] with 1 or 2 spatial dims and a "
                         f"weight of the same rank; got {tuple(x.shape)}, {tuple(g.shape)}, {tuple(weight_size)}")
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(v) != spatial:
            raise ValueError(f"{op}: {name} {tuple(v)} needs {spatial} entries")
    if x.shape[0] != g.shape[0] or weight_size[0] != g.shape[1] or weight_size[1] * groups != x.shape[1]:
        raise ValueError(f"{op}: x {tuple(x.shape)}, g {tuple(g.shape)}, weight {tuple(weight_size)} and "
                         f"groups={groups} do not fit one convolution")
    return registry.op_for(op, x.device)(x, g, list(weight_size), list(stride), list(padding), list(dilation), groups)


# ---- issue 6: top-k subset selection ------------------------------------------------------

SHARPBALANCE_VARIANTS = ("balance", "boost")  # code 0 and 1 of sbfast::sharpbalance_masks


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
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{op}: scores is a {type(scores).__name__}, expected a torch.Tensor")
    if scores.dim() != 2:
        raise ValueError(f"{op}: scores must be 2-D [M, N], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"{op}: scores has dtype {scores.dtype}, expected a floating dtype")
    if isinstance(k, bool) or not hasattr(k, "__index__"):
        raise TypeError(f"{op}: k = {k!r} ({type(k).__name__}), expected an int")
    k = k.__index__()  # numpy and 0-d integer tensors' ints too
    if not 0 <= k <= scores.shape[1]:
        raise ValueError(f"{op}: k = {k} outside [0, N = {scores.shape[1]}]")
    return registry.op_for(op, scores.device)(scores, k)


def sharpbalance_masks(flat_mask: torch.Tensor, variant: str | int = "balance") -> torch.Tensor:
    """SharpBalance's SAM masks from the members' flat sets (ALGORITHM.md section 4); no host sync.

    Args:
        flat_mask: bool [M, N], row j = F_j (e.g. :func:`ksmallest_mask` of the scores).
        variant: "balance" (or 0): A_i | R_i; "boost" (or 1): A_i | (R minus R_i). R = samples in
            no F_j in ascending index order, R_i = R[i::M], A_i = union of F_j over j != i.
    Returns:
        bool [M, N] on flat_mask's device, True = SAM for that member.
    """
    op = "sharpbalance_masks"
    if not isinstance(flat_mask, torch.Tensor):
        raise TypeError(f"{op}: flat_mask is a {type(flat_mask).__name__}, expected a torch.Tensor")
    if flat_mask.dtype != torch.bool:
        raise TypeError(f"{op}: flat_mask has dtype {flat_mask.dtype}, expected torch.bool")
    if flat_mask.dim() != 2:
        raise ValueError(f"{op}: flat_mask must be 2-D [M, N], got shape {tuple(flat_mask.shape)}")
    if isinstance(variant, str) and variant in SHARPBALANCE_VARIANTS:
        code = SHARPBALANCE_VARIANTS.index(variant)
    elif not isinstance(variant, bool) and isinstance(variant, int) and variant in (0, 1):
        code = variant
    else:
        raise ValueError(f"{op}: variant = {variant!r}, expected one of {SHARPBALANCE_VARIANTS} or 0, 1")
    return registry.op_for(op, flat_mask.device)(flat_mask, code)


# ---- issue 4: the fused SAM optimizer's two passes (sbfast.optim.SharpBalanceSAM) -------------


def _check_sam_arrays(op: str, param: torch.Tensor, **arrays: torch.Tensor | None) -> None:
    if not isinstance(param, torch.Tensor) or not param.is_floating_point():
        raise TypeError(f"{op}: param must be a floating torch.Tensor, got {getattr(param, 'dtype', type(param).__name__)}")
    if not param.is_contiguous():
        raise ValueError(f"{op}: param must be contiguous (a run of a flat buffer)")
    for name, t in arrays.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} is a {type(t).__name__}, expected a torch.Tensor")
        if t.is_sparse:
            raise TypeError(f"{op}: {name} is sparse; only dense tensors are supported")
        if t.dtype != param.dtype or t.device != param.device or t.numel() != param.numel():
            raise ValueError(f"{op}: {name} is {t.dtype} [{t.numel()}] on {t.device}; expected {param.dtype} "
                             f"[{param.numel()}] on {param.device}, like param")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")


def _check_sam_scalar(op: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} must be a one-element float32/float64 tensor, got {t!r}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (a device scalar, no host sync)")


def sam_perturb_(param: torch.Tensor, backup: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor,
                 adaptive: bool = False) -> None:
    """SAM's perturbation of one flat run, in place: ``backup = w; w = w + e``.

    Math: e = (adaptive ? w^2 * g : g) * s, each product rounded, then the add (reference.SAM's
    order); s == 0 (rho = 0, or a step skipped for a non-finite norm) leaves w bit for bit.

    Args:
        param: contiguous floating [n] (written); backup: like param (written); grad: like param.
        scale: one-element float32/float64 tensor on param's device, s = rho / (||g|| + 1e-12).
        adaptive: ASAM's form.
    """
    op = "sam_perturb_"
    _check_sam_arrays(op, param, backup=backup, grad=grad)
    _check_sam_scalar(op, "scale", scale, param.device)
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
        momentum_ready: uint8 [k >= 1] (with momentum): the buffers' "initialised" flags.
        lr, skip, inv_scale: one-element float32/float64 tensors on param's device.
        write_grad_sum: store grad + normal_grad into grad (the gradient the reference leaves).
    """
    op = "sam_restore_sgd_"
    _check_sam_arrays(op, param, backup=backup, grad=grad, normal_grad=normal_grad, momentum_buf=momentum_buf)
    for name, t in (("lr", lr), ("skip", skip), ("inv_scale", inv_scale)):
        _check_sam_scalar(op, name, t, param.device)
    for name, v in (("weight_decay", weight_decay), ("momentum", momentum), ("dampening", dampening)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{op}: {name} = {v!r}, expected a float")
    if momentum != 0:
        if momentum_buf is None:
            raise ValueError(f"{op}: momentum = {momentum} needs a momentum_buf")
        if (not isinstance(momentum_ready, torch.Tensor) or momentum_ready.dtype != torch.uint8
                or momentum_ready.numel() < 1 or momentum_ready.device != param.device):
            raise ValueError(f"{op}: momentum = {momentum} needs momentum_ready, a uint8 tensor with >= 1 "
                             f"element on {param.device}")
    if write_grad_sum and normal_grad is None:
        raise ValueError(f"{op}: write_grad_sum needs a normal_grad")
    registry.op_for(op, param.device)(param, backup, grad, normal_grad, momentum_buf, momentum_ready, lr, skip,
                                  inv_scale, float(weight_decay), float(momentum), float(dampening),
                                  bool(nesterov), bool(write_grad_sum))
