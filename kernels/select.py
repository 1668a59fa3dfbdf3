"""Triton kernels of ``sbfast::ksmallest_mask`` and ``sbfast::sharpbalance_masks`` (SharpBalance's subset selection).

ksmallest_mask(scores [M, N] floating, k) -> bool [M, N]: per row the k smallest scores, ties by
ascending index, i.e. exactly the first k of a stable ascending sort.
- Every score maps to an order-preserving unsigned key (32 bits, 64 for float64): -0.0 and
  +0.0 share a key and every NaN maps to the largest key, as ``torch.sort`` orders them.
- One program per row runs a radix select from the most significant byte: a masked
  ``tl.histogram`` of the current byte over the keys that share the prefix found so far, then
  the byte whose bucket holds the k-th smallest is appended to the prefix. After all bytes the
  prefix T is the k-th smallest key, and ``take`` = k - #(keys < T) keys equal to T are needed.
- A last pass writes key < T, or key == T while the running count of equal keys (a cumsum
  carried across blocks, so index order) is below ``take``.

sharpbalance_masks(flat [M, N] bool, variant) -> bool [M, N]: the mask algebra on the flat sets
F_j. Per sample c = #members holding it; R = {c = 0}; the sample's rank in R comes from a
per-tile count, an exclusive ``cumsum`` over tiles (a torch op, no host sync) and an in-tile
``tl.cumsum``; owner = rank mod M. SAM of member i: ``c - F_i > 0`` off R (A_i), and on R
``owner == i`` (balance, R_i) or ``owner != i`` (boost, R minus R_i).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sbfast.kernels.indexing import block_offsets, wide_mul
from sbfast.kernels.launch import launch

SELECT_BLOCK = 2048
ALGEBRA_BLOCK = 1024


@triton.jit
def _order_key(x, KEY64: tl.constexpr):
    """Order-preserving unsigned key of a score: a < b as reals iff key(a) < key(b)."""
    # Signed arithmetic, then one bitcast: a negative float flips every bit (larger magnitude =
    # smaller), a non-negative one sets the sign bit (above every negative).
    if KEY64:
        x = x.to(tl.float64)
        x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0: torch.sort ranks them equal
        bits = x.to(tl.int64, bitcast=True)
        key = bits ^ ((bits >> 63) | -9223372036854775808)
        key = tl.where(x != x, -1, key).to(tl.uint64, bitcast=True)  # every NaN: one key above +inf
    else:
        x = x.to(tl.float32)
        x = tl.where(x == 0.0, 0.0, x)
        bits = x.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) | -2147483648)
        key = tl.where(x != x, -1, key).to(tl.uint32, bitcast=True)
    return key


@triton.jit
def _ksmallest_mask_kernel(x_ptr, out_ptr, n, k, BLOCK: tl.constexpr, KEY64: tl.constexpr):
    row_start = wide_mul(tl.program_id(0), n)  # int64: M * N may pass 2^31
    x_row = x_ptr + row_start
    out_row = out_ptr + row_start
    if KEY64:
        KEY_BITS: tl.constexpr = 64
        prefix = tl.full([], 0, tl.uint64)
        prefix_mask = tl.full([], 0, tl.uint64)
        byte_mask = tl.full([], 0xFF, tl.uint64)
    else:
        KEY_BITS: tl.constexpr = 32
        prefix = tl.full([], 0, tl.uint32)
        prefix_mask = tl.full([], 0, tl.uint32)
        byte_mask = tl.full([], 0xFF, tl.uint32)
    take = tl.full([], 0, tl.int64) + k  # rank (1-based) of the k-th smallest among keys with the prefix
    bins = tl.arange(0, 256)
    for p in tl.static_range(KEY_BITS // 8):
        shift = KEY_BITS - 8 * (p + 1)  # a constexpr: p is
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < n
            key = _order_key(tl.load(x_row + offs, mask=inb, other=0.0), KEY64)
            match = inb & ((key & prefix_mask) == prefix)
            digit = ((key >> shift) & 0xFF).to(tl.int32)
            hist += tl.histogram(digit, 256, mask=match)
        cum = tl.cumsum(hist.to(tl.int64), 0)
        d = tl.sum((cum < take).to(tl.int32), 0)  # first byte whose cumulative count reaches take
        take -= tl.sum(tl.where(bins < d, hist, 0).to(tl.int64), 0)
        prefix = prefix | (d.to(prefix.dtype) << shift)
        prefix_mask = prefix_mask | (byte_mask << shift)
    # prefix is now the k-th smallest key T; take of the keys equal to T are in, in index order.
    seen = take * 0
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < n
        key = _order_key(tl.load(x_row + offs, mask=inb, other=0.0), KEY64)
        eq = (inb & (key == prefix)).to(tl.int64)
        rank = seen + tl.cumsum(eq, 0) - eq
        chosen = (key < prefix) | ((eq != 0) & (rank < take))
        tl.store(out_row + offs, chosen, mask=inb)
        seen += tl.sum(eq, 0)


def ksmallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [M, N]: per row of floating ``scores`` [M, N], its k smallest (ties by index). Inputs
    are checked by ``sbfast.registry`` before this runs; non-contiguous scores are read through a
    contiguous copy (the kernel indexes rows of length N)."""
    m, n = scores.shape
    if k <= 0 or m == 0 or n == 0:
        return torch.zeros(m, n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(m, n, dtype=torch.bool, device=scores.device)
    out = torch.empty(m, n, dtype=torch.bool, device=scores.device)
    launch(
        _ksmallest_mask_kernel,
        (m,),
        scores.contiguous(),
        out,
        n,
        k,
        BLOCK=SELECT_BLOCK,
        KEY64=scores.dtype == torch.float64,
        num_warps=8,
    )
    return out


@triton.jit
def _member_counts(flat_ptr, offs, inb, m, n):
    count = tl.zeros(offs.shape, dtype=tl.int32)
    ptrs = flat_ptr + offs
    for _ in range(m):
        count += tl.load(ptrs, mask=inb, other=0).to(tl.int32)
        ptrs += n  # a pointer step per row: no 32-bit j * n product to overflow
    return count


@triton.jit
def _rest_counts_kernel(flat_ptr, tile_counts_ptr, m, n, BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    offs = block_offsets(tile, BLOCK)
    inb = offs < n
    in_rest = inb & (_member_counts(flat_ptr, offs, inb, m, n) == 0)
    tl.store(tile_counts_ptr + tile, tl.sum(in_rest.to(tl.int64), 0))


@triton.jit
def _sharpbalance_write_kernel(
    flat_ptr, tile_counts_ptr, tile_ends_ptr, out_ptr, m, n, BOOST: tl.constexpr, BLOCK: tl.constexpr
):
    tile = tl.program_id(0)
    offs = block_offsets(tile, BLOCK)
    inb = offs < n
    count = _member_counts(flat_ptr, offs, inb, m, n)
    in_rest = (inb & (count == 0)).to(tl.int64)
    start = tl.load(tile_ends_ptr + tile) - tl.load(tile_counts_ptr + tile)  # R members before this tile
    owner = (start + tl.cumsum(in_rest, 0) - in_rest) % m  # R_i holds R's members of rank = i mod M
    flat_ptrs = flat_ptr + offs
    out_ptrs = out_ptr + offs
    for j in range(m):
        own = tl.load(flat_ptrs, mask=inb, other=0).to(tl.int32)
        if BOOST:
            rest_flag = owner != j
        else:
            rest_flag = owner == j
        tl.store(out_ptrs, tl.where(in_rest != 0, rest_flag, (count - own) > 0), mask=inb)
        flat_ptrs += n
        out_ptrs += n


def sharpbalance_masks(flat_mask: torch.Tensor, variant: int) -> torch.Tensor:
    """Bool [M, N] SAM masks from the flat sets ``flat_mask`` (bool [M, N]); variant 0 = balance
    (A_i | R_i), 1 = boost (A_i | (R minus R_i)). Inputs are checked by ``sbfast.registry`` before
    this runs; a non-contiguous mask is read through a contiguous copy."""
    m, n = flat_mask.shape
    out = torch.empty(m, n, dtype=torch.bool, device=flat_mask.device)
    if m == 0 or n == 0:
        return out
    flat = flat_mask.contiguous()
    tiles = triton.cdiv(n, ALGEBRA_BLOCK)
    tile_counts = torch.empty(tiles, dtype=torch.int64, device=flat.device)
    launch(_rest_counts_kernel, (tiles,), flat, tile_counts, m, n, BLOCK=ALGEBRA_BLOCK)
    tile_ends = torch.cumsum(tile_counts, 0)
    launch(
        _sharpbalance_write_kernel,
        (tiles,),
        flat,
        tile_counts,
        tile_ends,
        out,
        m,
        n,
        BOOST=variant == 1,
        BLOCK=ALGEBRA_BLOCK,
    )
    return out
