"""Which corruptions exist: the benchmark's names, the implemented ones, each one's severity
parameters (those of the CIFAR-10-C generator ``make_cifar_c.py``) and function, and the check
of a (name, severity) pair."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sbfast.data.corruptions.blur import defocus_blur, gaussian_blur, glass_blur, motion_blur, zoom_blur
from sbfast.data.corruptions.digital import contrast, elastic_transform, jpeg_compression, pixelate, saturate
from sbfast.data.corruptions.noise import gaussian_noise, impulse_noise, shot_noise, speckle_noise
from sbfast.data.corruptions.weather import brightness, fog, snow

__all__ = [
    "CIFAR_C_BENCHMARK",
    "CORRUPTIONS",
    "CORRUPTION_FUNCS",
    "NOT_IMPLEMENTED",
    "SEVERITY_PARAMS",
    "check_corruption",
]

# The 15 corruptions of the CIFAR-10-C / CIFAR-100-C benchmark, in the paper's order.
CIFAR_C_BENCHMARK: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)

# Severity parameters of make_cifar_c.py, index = severity - 1. Pixel-unit spatial parameters
# (blur sigmas, radii) are for 32x32 images; ``spatial_scale`` rescales them.
SEVERITY_PARAMS: dict[str, list[Any]] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
    "speckle_noise": [0.06, 0.10, 0.12, 0.16, 0.20],
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "zoom_blur": [(1, 1.06), (1, 1.11), (1, 1.16), (1, 1.21), (1, 1.26)],
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "snow": [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ],
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
    "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
    "jpeg_compression": [80, 65, 58, 50, 40],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    # (alpha, sigma, affine jitter) as fractions of the image size (the original's IMSIZE * k).
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
}

CORRUPTIONS: tuple[str, ...] = tuple(n for n in CIFAR_C_BENCHMARK if n != "frost") + (
    "speckle_noise",
    "gaussian_blur",
    "saturate",
)
NOT_IMPLEMENTED: tuple[str, ...] = ("frost", "spatter")

# (x [B, C, H, W] in [0, 1], the severity's parameter, a CPU generator, the spatial scale) -> [B, C, H, W]
Corruption = Callable[[torch.Tensor, Any, torch.Generator, float], torch.Tensor]

CORRUPTION_FUNCS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "glass_blur": glass_blur,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "fog": fog,
    "contrast": contrast,
    "brightness": brightness,
    "saturate": saturate,
    "jpeg_compression": jpeg_compression,
    "pixelate": pixelate,
    "elastic_transform": elastic_transform,
}
assert set(CORRUPTION_FUNCS) == set(CORRUPTIONS)


def check_corruption(name: str, severity: int) -> None:
    """Raise ValueError unless ``name`` is in ``CORRUPTIONS`` and ``severity`` an int in 1..5."""
    if name not in CORRUPTION_FUNCS:
        extra = f" ({name!r} is not implemented: see NOT_IMPLEMENTED)" if name in NOT_IMPLEMENTED else ""
        raise ValueError(f"unknown corruption {name!r}{extra}; choose from {list(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
