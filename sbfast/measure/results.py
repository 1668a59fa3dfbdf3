"""The result every measure returns, and its strict-JSON form.

Non-finite numbers (NaN, +-inf) are kept as they are in the object (a NaN log-determinant is an
honest answer) and written as ``None`` (JSON ``null``) by :meth:`MeasureResult.to_dict`, so the
dictionary always passes ``json.dumps(..., allow_nan=False)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["MeasureResult", "json_ready"]


def json_ready(v: Any) -> Any:
    """``v`` with tensors turned into numbers or lists, tuples into lists, dict keys into strings,
    and every NaN / inf into ``None``."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().tolist()
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): json_ready(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_ready(x) for x in v]
    if hasattr(v, "item"):  # numpy scalars
        return json_ready(v.item())
    return str(v)


@dataclass(frozen=True)
class MeasureResult:
    """One measure on one model.

    Attributes:
        name: the measure, e.g. ``"worst_case_sharpness"``.
        value: the measure (the mean over batches, a trace), or a list (eigenvalues).
        per_batch: the value of each batch, in the order the batches came.
        error_delta: the mean change of the error rate (fraction of samples) where it applies.
        per_batch_error: the error change of each batch.
        std_error: the standard error of a stochastic estimate.
        settings: the settings used (rho, norm, iterations, ...).
        extra: anything else worth keeping (largest perturbation norm, iterations used, ...).
    """

    name: str
    value: float | list[float]
    per_batch: list[float] | None = None
    error_delta: float | None = None
    per_batch_error: list[float] | None = None
    std_error: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON-ready values (NaN / inf written as ``None``)."""
        return {
            "name": self.name,
            "value": json_ready(self.value),
            "per_batch": json_ready(self.per_batch),
            "error_delta": json_ready(self.error_delta),
            "per_batch_error": json_ready(self.per_batch_error),
            "std_error": json_ready(self.std_error),
            "settings": json_ready(self.settings),
            "extra": json_ready(self.extra),
        }
