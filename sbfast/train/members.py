"""Per-member construction: seeds, initialisation, batch order, LR schedule."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import RandomSampler

from sbfast.models import create_model
from sbfast.train.config import AUG_SEED_OFFSET, TrainConfig
from sbfast.train.data import TrainData


def member_seeds(config: TrainConfig, j: int) -> dict[str, int]:
    """Seeds of member j: model init, batch order, augmentation."""
    s = config.seed + j
    return {"init": s, "order": s, "augment": s + AUG_SEED_OFFSET}


def release_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """One epoch's sample order as the release's shuffled DataLoader draws it.

    ``RandomSampler(generator=g)`` calls ``randperm(n, g)`` twice per epoch (the second for a
    zero-length tail), so the generator must be consumed the same way to reproduce its batches.
    """
    return torch.tensor(list(RandomSampler(range(n), generator=generator)), dtype=torch.int64)


def build_member(config: TrainConfig, data: TrainData, j: int, device: torch.device) -> nn.Module:
    """Member j's model, initialised from ``torch.manual_seed(seed + j)`` on the CPU (so every
    device starts from the same weights) inside a forked RNG, then moved to ``device``/dtype."""
    kw = dict(config.model_kwargs)
    c, h, _ = data.train.image_shape
    kw.setdefault("in_channels", c)
    if config.model in ("mlp", "vit_tiny"):
        kw.setdefault("image_size", h)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(member_seeds(config, j)["init"])
        model = create_model(config.model, data.num_classes, **kw)
    return model.to(device=device, dtype=config.torch_dtype)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Step: x0.1 at int(0.5 E) and int(0.75 E) (the release's MultiStepLR); cosine over E. Per epoch."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    milestones = [int(config.epochs * 0.5), int(config.epochs * 0.75)]
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
