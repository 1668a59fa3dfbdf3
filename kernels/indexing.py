"""Element offsets for the Triton kernels of this package, always in 64 bits.

``tl.program_id`` and ``tl.arange`` are int32, and so is an int argument below 2^31: a product
such as ``pid * BLOCK`` or ``row * stride`` is computed in int32 and wraps once the element it
names lies past 2^31 (8 GiB of float32). Every kernel here forms its offsets with these helpers,
which widen to int64 before the first product; ``tests/test_kernel_indexing.py`` runs them
with program ids and strides whose int32 products would overflow.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_offsets(pid, BLOCK: tl.constexpr):
    """int64 [BLOCK]: the offsets ``pid * BLOCK + [0, BLOCK)`` of program ``pid``'s block."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def wide_mul(a, b):
    """``a * b`` in int64 (e.g. a row index times a row length or stride)."""
    return a.to(tl.int64) * b


@triton.jit
def offsets_2d(rows, cols, row_stride, col_stride):
    """int64 [len(rows), len(cols)]: ``rows[:, None] * row_stride + cols[None, :] * col_stride``."""
    return rows.to(tl.int64)[:, None] * row_stride + cols.to(tl.int64)[None, :] * col_stride
