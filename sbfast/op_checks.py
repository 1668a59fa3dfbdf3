"""The input contract of every ``sbfast`` op, checked in one place for every Python face.

One function per op, with the op's schema signature. Each raises ``TypeError`` (wrong kind or
dtype) or ``ValueError`` (wrong shape, length, device, contiguity or value) with one line that
names the op, the argument and what was expected, before anything is written. They are run

- by the typed wrappers in :mod:`sbfast.ops`, before dispatch, whichever face then serves;
- by the Python faces that :mod:`sbfast.registry` registers (the Triton kernels, and the
  reference where ``sbfast._C`` is not built), so a direct call of a face is checked alike.

The C++/CUDA kernels check the same contract in ``csrc/checks.h`` (raising RuntimeError when
called directly, without the wrapper).

Contiguity, op by op: ``global_sq_norm``, ``ksmallest_mask`` and ``sharpbalance_masks`` take any
strides (their kernels read through a contiguous copy), and so do ``ellipsoid_sq_norms``'s z and
inv_scale; the per-sample norm ops take any
strides (their kernels index with the strides); the fused SAM passes work in place on flat runs
and refuse a non-contiguous array (``momentum_ready`` included). A one-element scalar (lr, skip,
scale, inv_scale) may have any strides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_SAM_SCALAR_DTYPES = (torch.float32, torch.float64)


def _tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} is a {type(t).__name__}, expected a torch.Tensor")
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} has layout {t.layout} (sparse or other); only dense tensors are supported")
    return t


def _floating(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected a floating dtype")


def _same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device}, {ref_name} on {ref.device}; expected one device")


def _contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be contiguous (a run of a flat buffer), got strides {t.stride()} "
            f"for shape {tuple(t.shape)}"
        )


def _nonnegative_real(op: str, name: str, v: object, at_most_one: bool = False) -> None:
    """A Python int or float (not a bool), finite and >= 0 (and <= 1 with ``at_most_one``)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {name} = {v!r} ({type(v).__name__}), expected a float")
    if not math.isfinite(v) or v < 0 or (at_most_one and v > 1):
        raise ValueError(f"{op}: {name} = {v!r}, expected a finite number {'in [0, 1]' if at_most_one else '>= 0'}")


def _int(op: str, name: str, v: object) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{op}: {name} = {v!r} ({type(v).__name__}), expected an int")
    return v.__index__()


# ---- global_sq_norm ---------------------------------------------------------------------


def global_sq_norm(tensors: Sequence[torch.Tensor]) -> None:
    """A non-empty list of dense floating tensors on one device, any shapes and strides."""
    op = "global_sq_norm"
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{op}: tensors is a {type(tensors).__name__}, expected a list of tensors")
    if len(tensors) == 0:
        raise ValueError(f"{op}: empty tensor list (the wrapper sbfast.ops.global_sq_norm returns 0 for it)")
    first = _tensor(op, "element 0", tensors[0])
    for i, t in enumerate(tensors):
        _tensor(op, f"element {i}", t)
        _floating(op, f"tensor {i}", t)
        _same_device(op, f"tensor {i}", t, "tensor 0", first)


# ---- ellipsoid_sq_norms -----------------------------------------------------------------

# Multipliers per call: the CUDA kernel keeps them in its argument struct.
MAX_ELLIPSOID_LAMBDAS = 64


def ellipsoid_sq_norms(z: torch.Tensor, inv_scale: torch.Tensor, lambdas: Sequence[float]) -> None:
    """z and inv_scale dense floating tensors of one shape, dtype and device (any strides);
    lambdas 1 to 64 finite numbers >= 0."""
    op = "ellipsoid_sq_norms"
    _tensor(op, "z", z)
    _tensor(op, "inv_scale", inv_scale)
    _floating(op, "z", z)
    _same_device(op, "inv_scale", inv_scale, "z", z)
    if inv_scale.dtype != z.dtype:
        raise TypeError(f"{op}: inv_scale has dtype {inv_scale.dtype}, z has {z.dtype}; expected one dtype")
    if inv_scale.shape != z.shape:
        raise ValueError(f"{op}: inv_scale has shape {tuple(inv_scale.shape)}, z has {tuple(z.shape)}")
    if isinstance(lambdas, torch.Tensor) or not isinstance(lambdas, Sequence):
        raise TypeError(f"{op}: lambdas is a {type(lambdas).__name__}, expected a list of floats")
    if not 1 <= len(lambdas) <= MAX_ELLIPSOID_LAMBDAS:
        raise ValueError(f"{op}: {len(lambdas)} lambdas, expected 1 to {MAX_ELLIPSOID_LAMBDAS}")
    for k, lam in enumerate(lambdas):
        _nonnegative_real(op, f"lambdas[{k}]", lam)


def ellipsoid_momentum_step_(
    z: torch.Tensor,
    point: torch.Tensor,
    two_inv2: torch.Tensor,
    prev: torch.Tensor,
    w0: torch.Tensor,
    lmbd: float,
    momentum: float,
) -> None:
    """z, point, two_inv2, prev, w0 contiguous floating tensors of one dtype, length and device,
    point not z itself; lmbd a finite number >= 0, momentum in [0, 1]."""
    op = "ellipsoid_momentum_step_"
    _tensor(op, "z", z)
    _floating(op, "z", z)
    _contiguous(op, "z", z)
    for name, t in (("point", point), ("two_inv2", two_inv2), ("prev", prev), ("w0", w0)):
        if t is None:
            raise TypeError(f"{op}: {name} is a required tensor")
        _like_param(op, name, t, z, "z")
    if point.numel() and point.data_ptr() == z.data_ptr():
        raise ValueError(f"{op}: point and z are the same memory; expected two buffers (z is the new delta)")
    _nonnegative_real(op, "lmbd", lmbd)
    _nonnegative_real(op, "momentum", momentum, at_most_one=True)


# ---- per-sample gradient norms ----------------------------------------------------------


def _per_sample_pair(op: str, a: torch.Tensor, g: torch.Tensor) -> None:
    _tensor(op, "a", a)
    _tensor(op, "g", g)
    _floating(op, "a", a)
    _floating(op, "g", g)
    _same_device(op, "g", g, "a", a)
    if a.dim() != 3 or g.dim() != 3:
        raise ValueError(
            f"{op}: expected a [B, T, d] and g [B, T, p], got shapes {tuple(a.shape)} and {tuple(g.shape)}"
        )
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"{op}: a {tuple(a.shape)} and g {tuple(g.shape)} differ in B or T; expected a [B, T, d], g [B, T, p]"
        )


def per_sample_grad_sq_norm_direct(a: torch.Tensor, g: torch.Tensor) -> None:
    """Floating a [B, T, d] and g [B, T, p] on one device, any strides."""
    _per_sample_pair("per_sample_grad_sq_norm_direct", a, g)


def per_sample_grad_sq_norm_gram(a: torch.Tensor, g: torch.Tensor) -> None:
    """Floating a [B, T, d] and g [B, T, p] on one device, any strides."""
    _per_sample_pair("per_sample_grad_sq_norm_gram", a, g)


def per_sample_conv_grad_sq_norm(
    x: torch.Tensor,
    g: torch.Tensor,
    weight_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> None:
    """Floating x [B, C_in, *S] and g [B, C_out, *S'] (1 or 2 spatial dims, any strides) on one
    device, and a geometry (weight [C_out, C_in / groups, *kernel], one stride >= 1, padding >= 0
    and dilation >= 1 per spatial dim, groups >= 1) that fits one convolution."""
    op = "per_sample_conv_grad_sq_norm"
    _tensor(op, "x", x)
    _tensor(op, "g", g)
    _floating(op, "x", x)
    _floating(op, "g", g)
    _same_device(op, "g", g, "x", x)
    weight_size = [_int(op, "weight_size entry", v) for v in weight_size]
    groups = _int(op, "groups", groups)
    spatial = x.dim() - 2
    if spatial not in (1, 2) or g.dim() != x.dim() or len(weight_size) != x.dim():
        raise ValueError(
            f"{op}: expected x [B, C_in, *S] and g [B, C_out, *S'] with 1 or 2 spatial dims and a "
            f"weight of the same rank; got {tuple(x.shape)}, {tuple(g.shape)}, {tuple(weight_size)}"
        )
    geometry = {}
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(v) != spatial:
            raise ValueError(f"{op}: {name} {tuple(v)} needs {spatial} entries")
        geometry[name] = [_int(op, f"{name} entry", e) for e in v]
    if (
        min(geometry["stride"]) < 1
        or min(geometry["dilation"]) < 1
        or min(geometry["padding"]) < 0
        or min(weight_size[2:]) < 1
    ):
        raise ValueError(
            f"{op}: stride {tuple(stride)}, dilation {tuple(dilation)} (>= 1), padding {tuple(padding)} "
            f"(>= 0) and kernel {tuple(weight_size[2:])} (>= 1) are not a convolution"
        )
    if (
        groups < 1
        or x.shape[0] != g.shape[0]
        or weight_size[0] != g.shape[1]
        or weight_size[1] * groups != x.shape[1]
        or g.shape[1] % groups != 0
    ):
        raise ValueError(
            f"{op}: x {tuple(x.shape)}, g {tuple(g.shape)}, weight {tuple(weight_size)} and "
            f"groups={groups} do not fit one convolution"
        )


# ---- subset selection ---------------------------------------------------------------------


def ksmallest_mask(scores: torch.Tensor, k: int) -> None:
    """Floating scores [M, N] (any strides) and an int k in [0, N]."""
    op = "ksmallest_mask"
    _tensor(op, "scores", scores)
    if scores.dim() != 2:
        raise ValueError(f"{op}: scores must be 2-D [M, N], got shape {tuple(scores.shape)}")
    _floating(op, "scores", scores)
    k = _int(op, "k", k)
    if not 0 <= k <= scores.shape[1]:
        raise ValueError(f"{op}: k = {k} outside [0, N = {scores.shape[1]}]")


def sharpbalance_masks(flat_mask: torch.Tensor, variant: int) -> None:
    """A bool flat_mask [M, N] (any strides) and variant 0 (balance) or 1 (boost)."""
    op = "sharpbalance_masks"
    _tensor(op, "flat_mask", flat_mask)
    if flat_mask.dtype != torch.bool:
        raise TypeError(f"{op}: flat_mask has dtype {flat_mask.dtype}, expected torch.bool")
    if flat_mask.dim() != 2:
        raise ValueError(f"{op}: flat_mask must be 2-D [M, N], got shape {tuple(flat_mask.shape)}")
    if isinstance(variant, bool) or not isinstance(variant, int) or variant not in (0, 1):
        raise ValueError(f"{op}: variant = {variant!r}, expected 0 ('balance') or 1 ('boost')")


# ---- the fused SAM passes ------------------------------------------------------------------


def _sam_param(op: str, param: torch.Tensor) -> None:
    if not isinstance(param, torch.Tensor) or not param.is_floating_point():
        raise TypeError(
            f"{op}: param must be a floating torch.Tensor, got {getattr(param, 'dtype', type(param).__name__)}"
        )
    _tensor(op, "param", param)
    _contiguous(op, "param", param)


def _like_param(op: str, name: str, t: torch.Tensor | None, param: torch.Tensor, param_name: str = "param") -> None:
    """A flat run read or written beside param: dense, contiguous, param's dtype, length, device."""
    if t is None:
        return
    _tensor(op, name, t)
    if t.dtype != param.dtype or t.device != param.device or t.numel() != param.numel():
        raise ValueError(
            f"{op}: {name} is {t.dtype} [{t.numel()}] on {t.device}; expected {param.dtype} "
            f"[{param.numel()}] on {param.device}, like {param_name}"
        )
    _contiguous(op, name, t)


def _sam_scalar(op: str, name: str, t: torch.Tensor, param: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype not in _SAM_SCALAR_DTYPES:
        raise TypeError(f"{op}: {name} must be a one-element float32/float64 tensor, got {t!r}")
    if t.device != param.device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {param.device} (a device scalar, no host sync)")


def sam_perturb_(
    param: torch.Tensor, backup: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, adaptive: bool
) -> None:
    """param, backup, grad: contiguous floating [n], one dtype and device; scale: a one-element
    float32/float64 tensor on that device."""
    op = "sam_perturb_"
    _sam_param(op, param)
    if backup is None or grad is None:
        raise TypeError(f"{op}: backup and grad are required tensors")
    _like_param(op, "backup", backup, param)
    _like_param(op, "grad", grad, param)
    _sam_scalar(op, "scale", scale, param)


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
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    write_grad_sum: bool,
) -> None:
    """param, backup, grad, normal_grad, momentum_buf: contiguous floating [n], one dtype and
    device (backup, normal_grad optional; momentum_buf needed iff momentum != 0, with
    momentum_ready, a contiguous uint8 [k >= 1] on that device); lr, skip, inv_scale: one-element
    float32/float64 tensors there; write_grad_sum needs normal_grad."""
    op = "sam_restore_sgd_"
    _sam_param(op, param)
    if grad is None:
        raise TypeError(f"{op}: grad is a required tensor")
    for name, t in (("backup", backup), ("grad", grad), ("normal_grad", normal_grad), ("momentum_buf", momentum_buf)):
        _like_param(op, name, t, param)
    for name, t in (("lr", lr), ("skip", skip), ("inv_scale", inv_scale)):
        _sam_scalar(op, name, t, param)
    for name, v in (("weight_decay", weight_decay), ("momentum", momentum), ("dampening", dampening)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{op}: {name} = {v!r}, expected a float")
    if momentum != 0:
        if momentum_buf is None:
            raise ValueError(f"{op}: momentum = {momentum} needs a momentum_buf")
        if (
            not isinstance(momentum_ready, torch.Tensor)
            or momentum_ready.layout != torch.strided
            or momentum_ready.dtype != torch.uint8
            or momentum_ready.numel() < 1
            or momentum_ready.device != param.device
        ):
            raise ValueError(
                f"{op}: momentum = {momentum} needs momentum_ready, a uint8 tensor with >= 1 element on {param.device}"
            )
        _contiguous(op, "momentum_ready", momentum_ready)
    if write_grad_sum and normal_grad is None:
        raise ValueError(f"{op}: write_grad_sum needs a normal_grad")


CHECKS = {
    "global_sq_norm": global_sq_norm,
    "ellipsoid_sq_norms": ellipsoid_sq_norms,
    "ellipsoid_momentum_step_": ellipsoid_momentum_step_,
    "per_sample_grad_sq_norm_direct": per_sample_grad_sq_norm_direct,
    "per_sample_grad_sq_norm_gram": per_sample_grad_sq_norm_gram,
    "per_sample_conv_grad_sq_norm": per_sample_conv_grad_sq_norm,
    "ksmallest_mask": ksmallest_mask,
    "sharpbalance_masks": sharpbalance_masks,
    "sam_perturb_": sam_perturb_,
    "sam_restore_sgd_": sam_restore_sgd_,
}
