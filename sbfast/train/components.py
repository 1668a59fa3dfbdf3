"""Which optimizer, scorer and selector a run uses: the fast ones or the plain-PyTorch reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sbfast import reference
from sbfast.data import (
    IndexedTensorDataset,
    make_loader,
)
from sbfast.optim import SharpBalanceSAM
from sbfast.select import select_sam_masks
from sbfast.sharpness import fisher_scores
from sbfast.train.config import BACKENDS, TrainConfig
from sbfast.train.data import DeviceBatches, DeviceData


@dataclass(frozen=True)
class Components:
    """The optimizer, scorer and selector a run uses, and their names for the record."""

    make_optimizer: Callable[[nn.Module, TrainConfig], Any]
    fisher: Callable[..., torch.Tensor]
    select: Callable[..., torch.Tensor]
    names: dict[str, str]


def reference_optimizer(model: nn.Module, config: TrainConfig) -> reference.SAM:
    return reference.SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=config.rho,
        adaptive=config.adaptive,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def reference_fisher(
    model: nn.Module, ds: IndexedTensorDataset, *, config: TrainConfig, device: torch.device, progress: bool
) -> torch.Tensor:
    loader = make_loader(ds, config.scoring_batch_size, shuffle=False)
    return reference.fisher_scores(model, loader, trials=config.fisher_trials, device=device, num_samples=len(ds))


def fast_optimizer(model: nn.Module, config: TrainConfig) -> SharpBalanceSAM:
    """The fused optimizer for one member.

    ``nonfinite="skip"``: no host sync in a step (a non-finite step is skipped on the device and
    counted; the trainer reports the count per epoch). Under CUDA graphs lr is a device tensor
    that the LR scheduler fills in place, so replays see it.
    """
    lr: float | torch.Tensor = config.lr
    if config.cuda_graphs:
        dev = next(model.parameters()).device
        lr = torch.tensor(config.lr, dtype=torch.float32, device=dev)
    return SharpBalanceSAM(
        model.parameters(),
        lr=lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        rho=config.rho,
        adaptive=config.adaptive,
        nonfinite="skip",
    )


def fast_fisher(
    model: nn.Module, ds: IndexedTensorDataset, *, config: TrainConfig, device: torch.device, progress: bool
) -> torch.Tensor:
    """Fisher scores [N] of ``ds`` under ``model``, batches gathered on the scoring device (no
    per-sample collation, no host copies)."""
    batches = DeviceBatches(DeviceData(ds, device), config.scoring_batch_size)
    return fisher_scores(
        model,
        batches,
        batch_size=config.scoring_batch_size,
        device=device,
        trials=config.fisher_trials,
        progress=progress,
        num_samples=len(ds),
    )


FAST = Components(
    fast_optimizer,
    fast_fisher,
    select_sam_masks,
    {
        "optimizer": "sbfast.optim.SharpBalanceSAM",
        "fisher": "sbfast.sharpness.fisher_scores",
        "select": "sbfast.select.select_sam_masks",
    },
)
REFERENCE = Components(
    reference_optimizer,
    reference_fisher,
    reference.select_sam_masks,
    {
        "optimizer": "reference.SAM(torch.optim.SGD)",
        "fisher": "reference.fisher_scores",
        "select": "reference.select_sam_masks",
    },
)


def get_components(backend: str) -> Components:
    """The implementations behind ``backend``: "fast" (sbfast's fused optimizer, scorer and
    selector) or "reference" (the plain-PyTorch twins). There is no silent substitution: a fast
    module that fails to import fails the import of this one."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return FAST if backend == "fast" else REFERENCE
