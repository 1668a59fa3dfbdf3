"""The weather corruptions: snow, fog, brightness.

Each takes x [B, C, H, W] in [0, 1], its severity's parameter ``c``, a CPU generator and the
spatial scale ``s`` (multiplies snow's motion-blur radius and sigma), and returns
[B, C, H, W], not clamped (the caller clamps).
"""

from __future__ import annotations

import math

import torch

from sbfast.data.corruptions.filters import clipped_zoom, gray, magick_motion_blur, plasma_fractal

__all__ = ["brightness", "fog", "snow"]


def snow(x: torch.Tensor, c: tuple[float, ...], gen: torch.Generator, s: float) -> torch.Tensor:
    """A zoomed, thresholded, motion-blurred snow layer (one per image), added with its 180-degree rotation
    to x brightened towards 1.5 luma + 0.5."""
    b, _, h, w = x.shape
    layer = (torch.randn(b, 1, h, w, generator=gen, dtype=x.dtype) * c[1] + c[0]).to(x.device)
    layer = clipped_zoom(layer, c[2]) if c[2] > 1 else layer
    layer = torch.where(layer < c[3], 0.0, layer).clamp(0, 1)
    angles = torch.rand(b, generator=gen, dtype=torch.float64) * 90 - 135
    layer = magick_motion_blur(layer, c[4] * s, c[5] * s, angles)
    x = c[6] * x + (1 - c[6]) * torch.maximum(x, gray(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-1, -2)


def fog(x: torch.Tensor, c: tuple[float, float], gen: torch.Generator, s: float) -> torch.Tensor:
    """x plus c[0] times a plasma fractal (decay c[1]), rescaled to keep each image's maximum."""
    b, _, h, w = x.shape
    size = 1 << max(1, math.ceil(math.log2(max(h, w))))
    frac = plasma_fractal(b, size, c[1], gen)[:, None, :h, :w].to(x.device, x.dtype)
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + c[0] * frac) * max_val / (max_val + c[0])


def brightness(x: torch.Tensor, c: float, gen: torch.Generator, s: float) -> torch.Tensor:
    """HSV value + c."""
    # HSV value + c and back. Hue and saturation fixed, every RGB channel is proportional to V,
    # so the round trip is a per-pixel rescale by V'/V (black pixels, S = 0, become grey V').
    v = x.amax(dim=1, keepdim=True)
    v2 = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * (v2 / v.clamp_min(1e-12)), v2.expand_as(x))
