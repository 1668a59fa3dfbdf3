"""Scalars and rounding shared by the Triton kernels: float64 hyperparameters passed as their
int64 bits (a Python float argument reaches Triton as float32 and would lose the float64 value),
and the store-side rounding to the storage dtype."""

from __future__ import annotations

import struct

import triton
import triton.language as tl


def float64_bits(x: float) -> int:
    """The float64 ``x`` as the signed int64 with the same bits (undone in-kernel by bitcast)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def f64_from_bits(bits):
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def round_to_storage(x, dtype, BF16: tl.constexpr):
    """x (float32/float64) to the storage dtype, rounding to nearest even. bfloat16 is rounded
    by hand: the Triton interpreter truncates float32 -> bfloat16 (the GPU path does not), and
    the tests run the interpreter."""
    if BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)
