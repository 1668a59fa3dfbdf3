"""Triton kernel of ``sbfast::ellipsoid_sq_norms``.

Math: for z, s = inv_scale (1/c) of one shape and multipliers lambda_0..lambda_{K-1},

    out[k] = sum_j (z_j s_j)^2 / (1 + 2 lambda_k s_j^2)^2

the squared weighted norms ||u_k / c||^2 of the candidates u_k = z / (1 + 2 lambda_k / c^2) that
a bisection on lambda tests when it projects z onto the ellipsoid ||u / c|| <= rho. Result [K],
float64 when z is float64, else float32 (half and bfloat16 compute in float32).

One read of z and s for all K: each program loads one BLOCK of both, forms a = (z s)^2 and
b = 2 s^2 once, and writes K partial sums to its own row of a [programs, K] buffer (K is a
constexpr, so the loop over lambdas unrolls); one ``sum`` over the rows finishes. Rows are fixed
per program, so the result does not depend on scheduling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sbfast.kernels.indexing import block_offsets, wide_mul
from sbfast.kernels.launch import launch

BLOCK = 2048


@triton.jit
def _ellipsoid_partials_kernel(
    z_ptr, s_ptr, lambdas_ptr, partials_ptr, n, K: tl.constexpr, BLOCK: tl.constexpr, ACC_FP64: tl.constexpr
):
    pid = tl.program_id(0)
    offsets = block_offsets(pid, BLOCK)  # int64: a tensor may pass 2^31 elements
    inside = offsets < n
    z = tl.load(z_ptr + offsets, mask=inside, other=0.0)
    s = tl.load(s_ptr + offsets, mask=inside, other=0.0)
    if ACC_FP64:
        z = z.to(tl.float64)
        s = s.to(tl.float64)
    else:
        z = z.to(tl.float32)
        s = s.to(tl.float32)
    t = z * s
    a = t * t
    b = 2.0 * (s * s)
    row = wide_mul(pid, K)
    for k in tl.static_range(K):
        lam = tl.load(lambdas_ptr + k)
        d = 1.0 + lam * b
        tl.store(partials_ptr + row + k, tl.sum(a / (d * d), axis=0))


def ellipsoid_sq_norms(z: torch.Tensor, inv_scale: torch.Tensor, lambdas: list[float]) -> torch.Tensor:
    """[K] squared weighted norms of z's candidate projections, one per lambda (inputs checked by
    ``sbfast.registry`` before this runs; strided inputs are read through contiguous copies)."""
    acc_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    k = len(lambdas)
    n = z.numel()
    if n == 0:
        return torch.zeros(k, dtype=acc_dtype, device=z.device)
    blocks = triton.cdiv(n, BLOCK)
    # K is a constexpr: padded to a power of two, so the bisection's varying counts (1 to 64)
    # compile 7 specialisations, not 64
    k_padded = 1 << (k - 1).bit_length()
    partials = torch.empty((blocks, k_padded), dtype=acc_dtype, device=z.device)
    lam = torch.tensor(list(lambdas) + [0.0] * (k_padded - k), dtype=acc_dtype).to(z.device)
    launch(
        _ellipsoid_partials_kernel,
        (blocks,),
        z.contiguous(),
        inv_scale.contiguous(),
        lam,
        partials,
        n,
        K=k_padded,
        BLOCK=BLOCK,
        ACC_FP64=acc_dtype == torch.float64,
    )
    return partials.sum(0)[:k]
