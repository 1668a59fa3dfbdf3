"""sbfast: kernel-accelerated SharpBalance (flat and diverse deep ensembles).

Importing sbfast never needs a GPU and never fails because the C++ extension is missing
(it warns once and falls back to the plain-PyTorch reference on CPU and Triton on CUDA).

The public API, re-exported here (submodules load on first use, so ``import sbfast`` stays
light):

- ``sbfast.optim.SharpBalanceSAM`` (fused SAM/SharpBalance optimizer), ``sbfast.compat.NSAM``
- ``sbfast.sharpness.fisher_scores``, ``sam_loss_gap_scores`` (per-sample sharpness)
- ``sbfast.select.select_sam_masks``, ``sam_index_split``, ``sam_share`` (subset selection)
- ``sbfast.train.TrainConfig``, ``train_ensemble`` (the ensemble trainer), ``load_ensemble``
  (a saved run's members)
- ``sbfast.ops`` (typed wrappers over ``torch.ops.sbfast``), ``sbfast.reference`` (the twin)
- ``sbfast.data``, ``sbfast.models``, ``sbfast.metrics``
"""

from __future__ import annotations

import importlib
from typing import Any

from sbfast import ops, reference
from sbfast.registry import backends

__version__ = "0.1.0"

_SUBMODULES = ("compat", "data", "metrics", "models", "optim", "select", "sharpness", "train")
_NAMES = {
    "SharpBalanceSAM": "optim",
    "NSAM": "compat",
    "fisher_scores": "sharpness",
    "sam_loss_gap_scores": "sharpness",
    "select_sam_masks": "select",
    "sam_index_split": "select",
    "sam_share": "select",
    "TrainConfig": "train",
    "train_ensemble": "train",
    "load_ensemble": "train",
    "ensemble_metrics": "metrics",
    "create_model": "models",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"sbfast.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"sbfast.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'sbfast' has no attribute {name!r}")


__all__ = ["backends", "ops", "reference", "__version__", *_SUBMODULES, *_NAMES]
