"""Triton kernels of ``sbfast::per_sample_grad_sq_norm_direct`` and ``..._gram``.

Both compute, for a layer that maps per-sample rows a_t (t = 1..T, width d) to output rows
whose gradients are g_t (width p), each sample's squared Frobenius norm of its weight gradient

    s_i = || sum_t g_it a_it^T ||_F^2                               (p x d per sample)
        = sum_{t,s} (a_it . a_is) (g_it . g_is)                     (T x T per sample)

without ever writing a per-sample gradient (or a per-sample Gram matrix) to memory:

* direct: program (i, tile) forms one [BLOCK_P, BLOCK_D] tile of G_i^T A_i in registers as a
  ``tl.dot`` over blocks of T, squares and sums it, and stores one partial;
* gram: program (i, pair) forms one [BLOCK_T, BLOCK_T] tile (t-block, s-block) of A_i A_i^T and
  of G_i G_i^T (each a ``tl.dot`` over blocks of d or p), multiplies them elementwise and sums.
  Both Gram matrices are symmetric, so only pairs with s-block >= t-block run; off-diagonal
  pairs count twice.

The programs form one flat grid, i * tiles + tile (grid axes 1 and 2 stop at 65535 programs; a
depthwise convolution's B * groups samples or a wide layer's tiles pass that), and every offset
is computed in int64.

Partials land in fixed slots [B, tiles] and one ``sum`` finishes, so results do not depend on
scheduling. Inputs may have any strides (the unfold of a convolution is a transposed view).
float32 products use ``input_precision="ieee"`` (no TF32: the scores are compared at 1e-4);
half and bfloat16 accumulate in float32. float64 stays float64 without ``tl.dot``: Triton 3.6
cannot compile a float64 ``tl.dot`` for the GPU, so the tile is accumulated as a sum of outer
products, one row of T (or column of d, p) at a time, each an exact float64 multiply-add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sbfast.kernels.indexing import offsets_2d, wide_mul
from sbfast.kernels.launch import launch

BLOCK_P = 32
BLOCK_D = 32
BLOCK_T = 32
# The Gram kernel holds two [BLOCK_T, BLOCK_T] accumulators; with BLOCK_K = 32 and 4 warps its
# float32 (IEEE) form needs 160-255 registers and spills on sm_80 (scripts/triton_aot_check.py).
# BLOCK_K = 16 and 8 warps keep both kernels near 100 registers, without spills.
BLOCK_K = 16
NUM_WARPS = 8


@triton.jit
def _dot(x, y, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(x, y, acc, input_precision="ieee")
    else:
        return tl.dot(x, y, acc)


@triton.jit
def _outer_sum_f64(
    x_base, y_base, offs_x, offs_y, n_x, n_y, K, s_xi, s_xk, s_yi, s_yk, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr
):
    """float64 [BLOCK_X, BLOCK_Y]: sum_k x[offs_x, k] y[offs_y, k]^T as K outer products (masked
    rows are zero), for the float64 path where ``tl.dot`` does not compile."""
    acc = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float64)
    x_ptrs = x_base + wide_mul(offs_x, s_xi)
    y_ptrs = y_base + wide_mul(offs_y, s_yi)
    for _ in range(0, K):
        x = tl.load(x_ptrs, mask=offs_x < n_x, other=0.0).to(tl.float64)
        y = tl.load(y_ptrs, mask=offs_y < n_y, other=0.0).to(tl.float64)
        acc += x[:, None] * y[None, :]
        x_ptrs += s_xk  # a pointer step per k: no 32-bit k * stride product to overflow
        y_ptrs += s_yk
    return acc


@triton.jit
def _direct_kernel(
    a_ptr,
    g_ptr,
    out_ptr,
    T,
    D,
    P,
    s_ab,
    s_at,
    s_ad,
    s_gb,
    s_gt,
    s_gp,
    tiles_d,
    tiles,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_FP64: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // tiles
    tile = pid % tiles
    offs_p = (tile // tiles_d) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = (tile % tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    a_base = a_ptr + wide_mul(b, s_ab)
    g_base = g_ptr + wide_mul(b, s_gb)
    if ACC_FP64:
        # G^T A = sum_t g_t a_t^T: one outer product [BLOCK_P, BLOCK_D] per row t
        acc = _outer_sum_f64(g_base, a_base, offs_p, offs_d, P, D, T, s_gp, s_gt, s_ad, s_at, BLOCK_P, BLOCK_D)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            # G^T block [BLOCK_P, BLOCK_T] and A block [BLOCK_T, BLOCK_D]; zero padding adds nothing
            g_blk = tl.load(
                g_base + offsets_2d(offs_p, offs_t, s_gp, s_gt),
                mask=(offs_p[:, None] < P) & (offs_t[None, :] < T),
                other=0.0,
            )
            a_blk = tl.load(
                a_base + offsets_2d(offs_t, offs_d, s_at, s_ad),
                mask=(offs_t[:, None] < T) & (offs_d[None, :] < D),
                other=0.0,
            )
            acc = _dot(g_blk, a_blk, acc, IEEE)
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _gram_block(
    x_base,
    offs_t,
    offs_s,
    T,
    K,
    s_xt,
    s_xk,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC_FP64: tl.constexpr,
    IEEE: tl.constexpr,
):
    """[BLOCK_T, BLOCK_T] tile (rows offs_t, columns offs_s) of X X^T for one sample's X [T, K]."""
    if ACC_FP64:
        acc = _outer_sum_f64(x_base, x_base, offs_t, offs_s, T, T, K, s_xt, s_xk, s_xt, s_xk, BLOCK_T, BLOCK_T)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_t = tl.load(
                x_base + offsets_2d(offs_t, offs_k, s_xt, s_xk),
                mask=(offs_t[:, None] < T) & (offs_k[None, :] < K),
                other=0.0,
            )
            x_s = tl.load(
                x_base + offsets_2d(offs_k, offs_s, s_xk, s_xt),
                mask=(offs_k[:, None] < K) & (offs_s[None, :] < T),
                other=0.0,
            )
            acc = _dot(x_t, x_s, acc, IEEE)
    return acc


@triton.jit
def _gram_kernel(
    a_ptr,
    g_ptr,
    pairs_ptr,
    out_ptr,
    T,
    D,
    P,
    s_ab,
    s_at,
    s_ad,
    s_gb,
    s_gt,
    s_gp,
    n_pairs,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC_FP64: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_pairs
    pair = pid % n_pairs
    t_blk = tl.load(pairs_ptr + 2 * pair)
    s_blk = tl.load(pairs_ptr + 2 * pair + 1)
    offs_t = t_blk * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = s_blk * BLOCK_T + tl.arange(0, BLOCK_T)
    aa = _gram_block(a_ptr + wide_mul(b, s_ab), offs_t, offs_s, T, D, s_at, s_ad, BLOCK_T, BLOCK_K, ACC_FP64, IEEE)
    gg = _gram_block(g_ptr + wide_mul(b, s_gb), offs_t, offs_s, T, P, s_gt, s_gp, BLOCK_T, BLOCK_K, ACC_FP64, IEEE)
    partial = tl.sum(tl.sum(aa * gg, axis=1), axis=0)
    # the (s, t) tile of a symmetric product equals the (t, s) one: count it once, twice
    weight = tl.where(s_blk > t_blk, 2.0, 1.0)
    tl.store(out_ptr + pid, partial * weight)


_MAX_PROGRAMS = 2**31 - 1  # grid axis 0 of a CUDA launch


def _programs(samples: int, tiles: int) -> int:
    """Programs of the flat grid: one per (sample, tile); refused past CUDA's axis-0 limit."""
    n = samples * tiles
    if n > _MAX_PROGRAMS:
        raise ValueError(
            f"per-sample norms: {samples} samples x {tiles} tiles = {n} programs, more than "
            f"one launch holds ({_MAX_PROGRAMS}); split the batch"
        )
    return n


def _acc_dtype(a: torch.Tensor, g: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (a.dtype, g.dtype) else torch.float32


def _flags(a: torch.Tensor, g: torch.Tensor) -> tuple[bool, bool]:
    acc_fp64 = _acc_dtype(a, g) == torch.float64
    return acc_fp64, (not acc_fp64) and a.dtype == torch.float32 and g.dtype == torch.float32


def _common_dtype(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # tl.dot needs one input dtype; mixed half/float inputs meet in the wider one
    if a.dtype != g.dtype:
        wide = torch.promote_types(a.dtype, g.dtype)
        return a.to(wide), g.to(wide)
    return a, g


def per_sample_grad_sq_norm_direct(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[B] squared norms ||G_i^T A_i||_F^2 for a [B, T, d], g [B, T, p] (the direct form; any
    strides, read as they are; inputs checked by ``sbfast.registry`` before this runs)."""
    a, g = _common_dtype(a, g)
    b, t, d = a.shape
    p = g.shape[2]
    acc = _acc_dtype(a, g)
    if b == 0 or t == 0 or d == 0 or p == 0:
        return torch.zeros(b, dtype=acc, device=a.device)
    tiles_d = triton.cdiv(d, BLOCK_D)
    tiles = triton.cdiv(p, BLOCK_P) * tiles_d
    partials = torch.empty(b, tiles, dtype=acc, device=a.device)
    acc_fp64, ieee = _flags(a, g)
    launch(
        _direct_kernel,
        (_programs(b, tiles),),
        a,
        g,
        partials,
        t,
        d,
        p,
        a.stride(0),
        a.stride(1),
        a.stride(2),
        g.stride(0),
        g.stride(1),
        g.stride(2),
        tiles_d,
        tiles,
        BLOCK_T=BLOCK_T,
        BLOCK_P=BLOCK_P,
        BLOCK_D=BLOCK_D,
        ACC_FP64=acc_fp64,
        IEEE=ieee,
        num_warps=NUM_WARPS,
    )
    return partials.sum(1)


def per_sample_grad_sq_norm_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[B] squared norms sum_{t,s} (a_t . a_s)(g_t . g_s) for a [B, T, d], g [B, T, p] (Gram form)."""
    a, g = _common_dtype(a, g)
    b, t, d = a.shape
    p = g.shape[2]
    acc = _acc_dtype(a, g)
    if b == 0 or t == 0 or d == 0 or p == 0:
        return torch.zeros(b, dtype=acc, device=a.device)
    blocks = triton.cdiv(t, BLOCK_T)
    pairs = torch.triu_indices(blocks, blocks, device=a.device).t().contiguous().to(torch.int32)
    n_pairs = blocks * (blocks + 1) // 2
    partials = torch.empty(b, n_pairs, dtype=acc, device=a.device)
    acc_fp64, ieee = _flags(a, g)
    launch(
        _gram_kernel,
        (_programs(b, n_pairs),),
        a,
        g,
        pairs,
        partials,
        t,
        d,
        p,
        a.stride(0),
        a.stride(1),
        a.stride(2),
        g.stride(0),
        g.stride(1),
        g.stride(2),
        n_pairs,
        BLOCK_T=BLOCK_T,
        BLOCK_K=BLOCK_K,
        ACC_FP64=acc_fp64,
        IEEE=ieee,
        num_warps=NUM_WARPS,
    )
    return partials.sum(1)


def per_sample_conv_grad_sq_norm(
    x: torch.Tensor,
    g: torch.Tensor,
    weight_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """[B] squared norms of a 1-D/2-D convolution's per-sample weight gradients: the input is
    unfolded (torch) to [B * groups, T, C_in/groups * k] and each group's [B, T, d] x [B, T, p]
    problem goes to the direct kernel, as a transposed view (no copy of the unfold)."""
    b = x.shape[0]
    acc = _acc_dtype(x, g)
    if b == 0 or x.numel() == 0 or g.numel() == 0:
        return torch.zeros(b, dtype=acc, device=x.device)
    kernel = list(weight_size[2:])
    if x.dim() == 3:
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride, padding, dilation = [1, *kernel], [1, *stride], [0, *padding], [1, *dilation]
    cols = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    t = cols.shape[2]
    a = cols.view(b, groups, -1, t).transpose(2, 3).reshape(b * groups, t, -1)
    gg = g.reshape(b, groups, -1, t).transpose(2, 3).reshape(b * groups, t, -1)
    return per_sample_grad_sq_norm_direct(a, gg).view(b, groups).sum(1)
