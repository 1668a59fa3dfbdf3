"""Triton kernel of ``sbfast::ellipsoid_momentum_step_``: APGD's step after its ellipsoid projection.

Math, per element, with t = two_inv2 (2 / c^2, 0 where c = 0) and m = momentum:

    u = z / (1 + lmbd t)          (lmbd = 0: u = z)
    z <- lerp(prev, u, m)         (one fma from the nearer end, as torch rounds it)
    point <- w0 + z

One program per BLOCK elements of contiguous runs; bfloat16/float16 compute in float32 and
round z and point once each, float64 computes in float64. The division is IEEE (``div_rn``),
as in the C++ kernels; Triton may contract lmbd t + 1 into an fma on the GPU, so its results
can differ from the C++ kernels' in the last bit. lmbd and momentum travel as the int64 bits
of their float64 values (a Python float reaches Triton as float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sbfast.kernels.indexing import block_offsets
from sbfast.kernels.launch import launch
from sbfast.kernels.scalars import f64_from_bits, float64_bits, round_to_storage

BLOCK = 1024


@triton.jit
def _momentum_step_kernel(
    z_ptr,
    point_ptr,
    t_ptr,
    prev_ptr,
    w0_ptr,
    n,
    lmbd_bits,
    momentum_bits,
    PROJECT: tl.constexpr,
    SMALL_WEIGHT: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc = tl.float64 if ACC_FP64 else tl.float32
    offsets = block_offsets(tl.program_id(0), BLOCK)
    mask = offsets < n
    z_raw = tl.load(z_ptr + offsets, mask=mask, other=0.0)
    u = z_raw.to(acc)
    if PROJECT:
        t = tl.load(t_ptr + offsets, mask=mask, other=0.0).to(acc)
        lam = f64_from_bits(lmbd_bits).to(acc)
        d = t * lam + 1.0
        if ACC_FP64:
            u = u / d  # float64 division is IEEE on the GPU
        else:
            u = tl.math.div_rn(u, d)  # float32 "/" would be the approximate div.full
    prev = tl.load(prev_ptr + offsets, mask=mask, other=0.0).to(acc)
    m = f64_from_bits(momentum_bits).to(acc)
    if SMALL_WEIGHT:
        v = tl.fma(m, u - prev, prev)
    else:
        v = tl.fma(m - 1.0, u - prev, u)
    v_raw = round_to_storage(v, z_raw.dtype, BF16)
    tl.store(z_ptr + offsets, v_raw, mask=mask)
    w0 = tl.load(w0_ptr + offsets, mask=mask, other=0.0).to(acc)
    tl.store(point_ptr + offsets, round_to_storage(w0 + v_raw.to(acc), z_raw.dtype, BF16), mask=mask)


def ellipsoid_momentum_step_(
    z: torch.Tensor,
    point: torch.Tensor,
    two_inv2: torch.Tensor,
    prev: torch.Tensor,
    w0: torch.Tensor,
    lmbd: float,
    momentum: float,
) -> None:
    """z = lerp(prev, z / (1 + lmbd two_inv2), momentum), point = w0 + z, in place (inputs checked
    by ``sbfast.registry`` before this runs)."""
    n = z.numel()
    if n == 0:
        return
    launch(
        _momentum_step_kernel,
        (triton.cdiv(n, BLOCK),),
        z,
        point,
        two_inv2,
        prev,
        w0,
        n,
        float64_bits(lmbd),
        float64_bits(momentum),
        PROJECT=lmbd != 0,
        SMALL_WEIGHT=momentum < 0.5,
        ACC_FP64=z.dtype == torch.float64,
        BF16=z.dtype == torch.bfloat16,
        BLOCK=BLOCK,
    )
