"""Thin typed wrappers over ``torch.ops.sbfast.*``: validate, then dispatch.

Validation raises ``ValueError``/``TypeError`` naming the problem before any kernel runs;
which kernel serves a device is decided in :mod:`sbfast._ops` (see ``sbfast.backends()``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sbfast import _ops


def _check_floating_same_device(tensors: Sequence[torch.Tensor], op: str) -> None:
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: element {i} is a {type(t).__name__}, expected a torch.Tensor")
        if not t.is_floating_point():
            raise TypeError(f"{op}: tensor {i} has dtype {t.dtype}, expected a floating dtype")
        if t.device != device:
            raise ValueError(f"{op}: tensor {i} is on {t.device}, tensor 0 on {device}; expected one device")
        if t.is_sparse:
            raise TypeError(f"{op}: tensor {i} is sparse; only dense tensors are supported")


def global_sq_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared global L2 norm, ``sum_k ||t_k||_2^2``, of a list of tensors, without host sync.

    Args:
        tensors: floating tensors of any shapes (empty ones allowed) on one device.
    Returns:
        0-d tensor on that device: float64 if any input is float64, else float32 (half and
        bfloat16 accumulate in float32). An empty list gives a float32 CPU zero.
    """
    tensors = list(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    _check_floating_same_device(tensors, "global_sq_norm")
    return _ops.op_for("global_sq_norm", tensors[0].device)(tensors)
