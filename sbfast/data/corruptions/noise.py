"""The noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper), speckle.

Each takes x [B, C, H, W] in [0, 1], its severity's parameter ``c``, a CPU generator and the
spatial scale ``s`` (unused here), and returns [B, C, H, W], not clamped (the caller clamps).
"""

from __future__ import annotations

import torch

__all__ = ["gaussian_noise", "impulse_noise", "shot_noise", "speckle_noise"]


def gaussian_noise(x: torch.Tensor, c: float, gen: torch.Generator, s: float) -> torch.Tensor:
    """x + c N(0, 1), per value."""
    return x + torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device) * c


def shot_noise(x: torch.Tensor, c: float, gen: torch.Generator, s: float) -> torch.Tensor:
    """Poisson(x c) / c: c photons at full intensity."""
    return torch.poisson((x * c).cpu(), generator=gen).to(x.device) / c


def impulse_noise(x: torch.Tensor, c: float, gen: torch.Generator, s: float) -> torch.Tensor:
    """Salt and pepper with amount c."""
    # skimage random_noise(mode='s&p', amount=c): each value independently, with probability c,
    # becomes 1 (salt) or 0 (pepper) with equal odds.
    flip = torch.rand(x.shape, generator=gen) < c
    salt = torch.rand(x.shape, generator=gen) < 0.5
    out = torch.where(flip & salt, 1.0, x.cpu())
    return torch.where(flip & ~salt, 0.0, out).to(x.device, x.dtype)


def speckle_noise(x: torch.Tensor, c: float, gen: torch.Generator, s: float) -> torch.Tensor:
    """x + x c N(0, 1), per value."""
    return x + x * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device) * c
