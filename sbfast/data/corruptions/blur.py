"""The blur corruptions: gaussian, glass, defocus, motion, zoom.

Each takes x [B, C, H, W] in [0, 1], its severity's parameter ``c``, a CPU generator and the
spatial scale ``s`` (multiplies the pixel-unit sigmas, radii and displacements, which are
CIFAR-10-C's for 32x32), and returns [B, C, H, W], not clamped (the caller clamps).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sbfast.data.corruptions.filters import clipped_zoom, filter2d, filter_sep, gaussian_filter, magick_motion_blur

__all__ = ["defocus_blur", "defocus_kernel", "gaussian_blur", "glass_blur", "motion_blur", "zoom_blur"]


def gaussian_blur(x: torch.Tensor, c: float, gen: torch.Generator, s: float) -> torch.Tensor:
    """skimage's Gaussian filter, sigma c s, border 'nearest'."""
    return gaussian_filter(x, c * s)


def glass_blur(x: torch.Tensor, c: tuple[float, int, int], gen: torch.Generator, s: float) -> torch.Tensor:
    """Gaussian blur (sigma c[0] s), c[2] rounds of local pixel swaps within c[1] s pixels, blur again."""
    sigma, delta, iters = c
    delta = max(1, round(delta * s))
    x = gaussian_filter(x, sigma * s)
    b, ch, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(b, h * w, ch).contiguous()  # one row of C values per pixel
    bi = torch.arange(b, device=x.device)
    positions = [(i, j) for i in range(h - delta, delta, -1) for j in range(w - delta, delta, -1)]
    # Local pixel shuffling, bottom-right to top-left, exactly the generator's loop order: each
    # swap may move a pixel an earlier swap moved, so only the batch dimension is vectorised.
    for _ in range(iters):
        d = torch.randint(-delta, delta, (len(positions), 2, b), generator=gen).to(x.device)  # (dx, dy)
        other = (torch.tensor([i for i, _ in positions])[:, None] + d[:, 1].cpu()) * w
        other = (other + torch.tensor([j for _, j in positions])[:, None] + d[:, 0].cpu()).to(x.device)
        for step, (i, j) in enumerate(positions):
            here = flat[:, i * w + j].clone()
            flat[:, i * w + j] = flat[bi, other[step]]
            flat[bi, other[step]] = here
    x = flat.reshape(b, h, w, ch).permute(0, 3, 1, 2)
    return gaussian_filter(x, sigma * s)


def defocus_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The generator's disk(radius, alias_blur) as a float64 [k, k] kernel, k odd."""
    # The generator's disk(): an aliased disk on a 17x17 grid (or [-r, r] beyond radius 8),
    # normalised, then smoothed by a 3x3 (5x5) Gaussian with OpenCV's reflect-101 border.
    lim = 8 if radius <= 8 else math.ceil(radius)
    t = torch.arange(-lim, lim + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).to(torch.float64)
    disk /= disk.sum()
    ks = 3 if radius <= 8 else 5
    g = torch.exp(-((torch.arange(ks, dtype=torch.float64) - (ks - 1) / 2) ** 2) / (2 * alias_blur**2))
    g /= g.sum()
    k = filter_sep(disk[None, None], g, "mirror")[0, 0]
    # Trim all-zero borders so the kernel stays smaller than tiny (8x8) images.
    nz = torch.nonzero(k > 0)
    r = int(max(abs(nz - lim).max().item(), 0))
    return k[lim - r : lim + r + 1, lim - r : lim + r + 1]


def defocus_blur(x: torch.Tensor, c: tuple[float, float], gen: torch.Generator, s: float) -> torch.Tensor:
    """Correlation with ``defocus_kernel(c[0] s, c[1] s)``, reflect-101 borders."""
    return filter2d(x, defocus_kernel(c[0] * s, c[1] * s), "mirror")


def motion_blur(x: torch.Tensor, c: tuple[float, float], gen: torch.Generator, s: float) -> torch.Tensor:
    """ImageMagick's motion blur, radius c[0] s, sigma c[1] s, one uniform angle in [-45, 45) degrees per image."""
    angles = torch.rand(x.shape[0], generator=gen, dtype=torch.float64) * 90 - 45
    return magick_motion_blur(x, c[0] * s, c[1] * s, angles)


def zoom_blur(x: torch.Tensor, c: tuple[float, float], gen: torch.Generator, s: float) -> torch.Tensor:
    """The mean of x and its centre zooms by every factor of ``np.arange(c[0], c[1], 0.01)``."""
    # np.arange exactly as the generator (its float end point sometimes includes the last value).
    factors = np.arange(c[0], c[1], 0.01)
    out = x.clone()
    for z in factors:
        out += clipped_zoom(x, float(z))
    return out / (len(factors) + 1)
