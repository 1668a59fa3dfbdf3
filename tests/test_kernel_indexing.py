"""64-bit offsets in the Triton kernels (sbfast.kernels.indexing), without allocating 8 GiB.

Every kernel forms its element offsets with these helpers; here they run inside small probe
kernels with program ids, row lengths and strides whose int32 products would wrap past 2^31.
Under the interpreter integer arithmetic keeps its Triton dtype (an int32 product wraps as on
the GPU), so a helper that multiplied before widening would fail these tests.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE

triton = pytest.importorskip("triton")
tl = triton.language

from sbfast.kernels.indexing import block_offsets, offsets_2d, wide_mul  # noqa: E402

pytestmark = pytest.mark.triton

INT32_MAX = 2**31 - 1


@triton.jit
def _block_offsets_probe(out_ptr, pid_base, BLOCK: tl.constexpr):
    # program ids past 2^31 / BLOCK: what the last programs of a > 2^31-element launch see
    pid = pid_base + tl.program_id(0)
    tl.store(out_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), block_offsets(pid, BLOCK))


@triton.jit
def _int32_offsets_probe(out_ptr, pid_base, BLOCK: tl.constexpr):
    # the form the helpers replace: pid * BLOCK in int32
    pid = pid_base + tl.program_id(0)
    tl.store(out_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), pid * BLOCK + tl.arange(0, BLOCK))


@triton.jit
def _wide_mul_probe(out_ptr, a, b):
    tl.store(out_ptr + tl.program_id(0), wide_mul(a + tl.program_id(0), b))


@triton.jit
def _offsets_2d_probe(out_ptr, row0, col0, row_stride, col_stride, R: tl.constexpr, C: tl.constexpr):
    rows = row0 + tl.arange(0, R)
    cols = col0 + tl.arange(0, C)
    offs = offsets_2d(rows, cols, row_stride, col_stride)
    tl.store(out_ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :], offs)


def test_block_offsets_past_int32():
    block = 4096
    pid_base = INT32_MAX // block - 1  # offsets straddle 2^31
    out = torch.zeros(3 * block, dtype=torch.int64, device=TRITON_DEVICE)
    _block_offsets_probe[(3,)](out, pid_base, BLOCK=block)
    expected = torch.arange(pid_base * block, (pid_base + 3) * block, dtype=torch.int64)
    assert expected[-1] > INT32_MAX  # the case that matters
    assert torch.equal(out.cpu(), expected)
    # control: the int32 form wraps here, so this test tells the two apart
    naive = torch.zeros_like(out)
    _int32_offsets_probe[(3,)](naive, pid_base, BLOCK=block)
    assert not torch.equal(naive.cpu(), expected)


def test_wide_mul_past_int32():
    # a row index times a row length, as in ksmallest_mask (M * N > 2^31) and the per-sample norms
    out = torch.zeros(4, dtype=torch.int64, device=TRITON_DEVICE)
    _wide_mul_probe[(4,)](out, 70_000, 40_000)
    expected = torch.tensor([(70_000 + i) * 40_000 for i in range(4)], dtype=torch.int64)
    assert (expected > INT32_MAX).all()
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize(
    "row0,col0,row_stride,col_stride",
    [
        (60_000, 0, 50_000, 1),  # a row-major sample: rows * stride passes 2^31
        (0, 60_000, 1, 50_000),  # a transposed view (the unfold of a convolution): cols * stride does
        (3, 5, 7, 11),  # small values stay exact
    ],
)
def test_offsets_2d_past_int32(row0, col0, row_stride, col_stride):
    r, c = 4, 8
    out = torch.zeros(r, c, dtype=torch.int64, device=TRITON_DEVICE)
    _offsets_2d_probe[(1,)](out, row0, col0, row_stride, col_stride, R=r, C=c)
    rows = torch.arange(row0, row0 + r, dtype=torch.int64)[:, None]
    cols = torch.arange(col0, col0 + c, dtype=torch.int64)[None, :]
    assert torch.equal(out.cpu(), rows * row_stride + cols * col_stride)
