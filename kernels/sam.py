"""Triton kernels of the fused SAM optimizer: ``sbfast::sam_perturb_`` and ``sbfast::sam_restore_sgd_``.

Math (see ``sbfast.reference.sam_perturb_`` / ``sam_restore_sgd_``):
- perturb: backup = w; w = w + e, e = (adaptive ? w^2 * g : g) * s; s == 0 leaves w as it is.
- restore + SGD: w0 = backup (or w); g = (g' + g_n) * inv_scale; d = g + wd * w0;
  buf = d (first step) or momentum * buf + (1 - dampening) * d; d = d + momentum * buf
  (nesterov) or buf; w = w0 - lr * d. skip != 0: w = w0 only.

One program per BLOCK elements of a flat contiguous run (the same BLOCK on the GPU and under the
interpreter, so the tests run the GPU's launch configuration); bfloat16/float16 compute in float32,
float64 in float64. lr, skip and inv_scale are read from device tensors (so an LR schedule or
a device-side skip never recompiles or re-captures). The float hyperparameters travel as the
int64 bits of their float64 value and are bit-cast back in the kernel: a Python float argument
would reach Triton as a float32 and lose the float64 value. Triton may contract a * b + c into
an fma on the GPU, so its float64 results can differ from torch's in the last bit; the CPU
kernel is the bit-exact one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sbfast.kernels.indexing import block_offsets
from sbfast.kernels.launch import launch
from sbfast.kernels.scalars import f64_from_bits, float64_bits, round_to_storage

BLOCK = 1024
READY_BLOCK = 1024  # momentum flags per program of the flag update


@triton.jit
def _perturb_kernel(
    w_ptr,
    backup_ptr,
    g_ptr,
    scale_ptr,
    n,
    ADAPTIVE: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc = tl.float64 if ACC_FP64 else tl.float32
    offsets = block_offsets(tl.program_id(0), BLOCK)
    mask = offsets < n
    w_raw = tl.load(w_ptr + offsets, mask=mask, other=0.0)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(acc)
    tl.store(backup_ptr + offsets, w_raw, mask=mask)
    s = tl.load(scale_ptr).to(acc)
    w = w_raw.to(acc)
    if ADAPTIVE:
        direction = (w * w) * g
    else:
        direction = g
    perturbed = w + direction * s
    # s == 0 (rho = 0 or a skipped step): keep w bit for bit, even where g is infinite
    out = tl.where(s != 0, round_to_storage(perturbed, w_raw.dtype, BF16), w_raw)
    tl.store(w_ptr + offsets, out, mask=mask)


@triton.jit
def _restore_sgd_kernel(
    w_ptr,
    src_ptr,
    g_ptr,
    gn_ptr,
    buf_ptr,
    ready_ptr,
    lr_ptr,
    skip_ptr,
    inv_ptr,
    n,
    wd_bits,
    momentum_bits,
    omd_bits,
    HAS_NORMAL: tl.constexpr,
    WRITE_SUM: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc = tl.float64 if ACC_FP64 else tl.float32
    offsets = block_offsets(tl.program_id(0), BLOCK)
    mask = offsets < n
    src_raw = tl.load(src_ptr + offsets, mask=mask, other=0.0)
    w0 = src_raw.to(acc)
    skip = tl.load(skip_ptr)
    if skip != 0:
        tl.store(w_ptr + offsets, src_raw, mask=mask)
    else:
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(acc)
        if HAS_NORMAL:
            g = g + tl.load(gn_ptr + offsets, mask=mask, other=0.0).to(acc)
            if WRITE_SUM:
                tl.store(g_ptr + offsets, round_to_storage(g, src_raw.dtype, BF16), mask=mask)
        g = g * tl.load(inv_ptr).to(acc)
        d = g
        if HAS_WD:
            d = tl.fma(w0, f64_from_bits(wd_bits).to(acc), g)
        if HAS_MOMENTUM:
            momentum = f64_from_bits(momentum_bits).to(acc)
            buf_old = tl.load(buf_ptr + offsets, mask=mask, other=0.0).to(acc)
            first = tl.load(ready_ptr) == 0
            b = tl.where(first, d, tl.fma(d, f64_from_bits(omd_bits).to(acc), buf_old * momentum))
            tl.store(buf_ptr + offsets, round_to_storage(b, src_raw.dtype, BF16), mask=mask)
            if NESTEROV:
                d = tl.fma(b, momentum, d)
            else:
                d = b
        neg_lr = -(tl.load(lr_ptr).to(tl.float64)).to(acc)
        tl.store(w_ptr + offsets, round_to_storage(tl.fma(d, neg_lr, w0), src_raw.dtype, BF16), mask=mask)


@triton.jit
def _mark_ready_kernel(ready_ptr, skip_ptr, n, BLOCK: tl.constexpr):
    # after the step, in a launch of its own: no program of the step may still read the flag
    offsets = block_offsets(tl.program_id(0), BLOCK)
    mask = offsets < n
    old = tl.load(ready_ptr + offsets, mask=mask, other=0)
    new = tl.where(tl.load(skip_ptr) != 0, old, 1).to(old.dtype)
    tl.store(ready_ptr + offsets, new, mask=mask)


def sam_perturb_(
    param: torch.Tensor, backup: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, adaptive: bool
) -> None:
    """backup = w; w = w + e in place over one flat run (contiguous, same dtype and size; checked by
    ``sbfast.registry`` before this runs)."""
    n = param.numel()
    if n == 0:
        return
    launch(
        _perturb_kernel,
        (triton.cdiv(n, BLOCK),),
        param,
        backup,
        grad,
        scale,
        n,
        ADAPTIVE=bool(adaptive),
        ACC_FP64=param.dtype == torch.float64,
        BF16=param.dtype == torch.bfloat16,
        BLOCK=BLOCK,
    )


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
    """Restore w and take one SGD step in place over one flat run (see the module docstring;
    inputs checked by ``sbfast.registry`` before this runs)."""
    n = param.numel()
    has_momentum = momentum != 0
    if n > 0:
        launch(
            _restore_sgd_kernel,
            (triton.cdiv(n, BLOCK),),
            param,
            backup if backup is not None else param,
            grad,
            normal_grad if normal_grad is not None else grad,
            momentum_buf if has_momentum else param,
            momentum_ready if has_momentum else skip,
            lr,
            skip,
            inv_scale,
            n,
            float64_bits(weight_decay),
            float64_bits(momentum),
            float64_bits(1.0 - dampening),
            HAS_NORMAL=normal_grad is not None,
            WRITE_SUM=bool(write_grad_sum) and normal_grad is not None,
            HAS_WD=weight_decay != 0,
            HAS_MOMENTUM=has_momentum,
            NESTEROV=bool(nesterov),
            ACC_FP64=param.dtype == torch.float64,
            BF16=param.dtype == torch.bfloat16,
            BLOCK=BLOCK,
        )
    if has_momentum:
        k = momentum_ready.numel()
        launch(_mark_ready_kernel, (triton.cdiv(k, READY_BLOCK),), momentum_ready, skip, k, BLOCK=READY_BLOCK)
