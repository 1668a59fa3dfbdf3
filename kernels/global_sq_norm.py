"""Triton kernel of ``sbfast::global_sq_norm``.

Math: for tensors t_1..t_K, returns sum_k sum_i t_k[i]^2 as a 0-d tensor (float64 when any
input is float64, else float32; half and bfloat16 accumulate in float32).

Two stages without host synchronisation: each program squares and sums one BLOCK of one
tensor into its slot of a partials buffer; one ``sum`` over the partials finishes. Slots are
fixed per program, so the result does not depend on scheduling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sbfast.kernels.indexing import block_offsets
from sbfast.kernels.launch import launch

BLOCK = 4096


@triton.jit
def _sq_sum_partials_kernel(x_ptr, partials_ptr, n, BLOCK: tl.constexpr, ACC_FP64: tl.constexpr):
    pid = tl.program_id(0)
    offsets = block_offsets(pid, BLOCK)  # int64: a tensor may pass 2^31 elements
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
    if ACC_FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    tl.store(partials_ptr + pid, tl.sum(x * x, axis=0))


def global_sq_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Squared global L2 norm of ``tensors`` (non-empty list, one device) as a 0-d tensor.
    Inputs are checked by ``sbfast.registry`` before this runs; a non-contiguous tensor is read
    through a contiguous copy (the kernel indexes flat memory)."""
    acc_dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    num_blocks = [triton.cdiv(t.numel(), BLOCK) for t in tensors]
    partials = torch.zeros(max(sum(num_blocks), 1), dtype=acc_dtype, device=tensors[0].device)
    offset = 0
    for t, blocks in zip(tensors, num_blocks, strict=True):
        if blocks == 0:
            continue
        launch(
            _sq_sum_partials_kernel,
            (blocks,),
            t.contiguous(),
            partials[offset:],
            t.numel(),
            BLOCK=BLOCK,
            ACC_FP64=acc_dtype == torch.float64,
        )
        offset += blocks
    return partials.sum()
