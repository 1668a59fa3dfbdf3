"""Image-processing primitives of the corruptions: border modes, separable and 2-D
correlation, Gaussian smoothing, bilinear sampling, ImageMagick's motion blur, the generator's
clipped zoom and plasma fractal, luma, and the uint8 / PIL round trip.

Every image argument is a float batch [B, C, H, W] (any device, any floating dtype) unless a
docstring says otherwise; the border modes follow SciPy's / OpenCV's names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "bilinear",
    "clipped_zoom",
    "filter2d",
    "filter_sep",
    "gaussian_filter",
    "gray",
    "magick_motion_blur",
    "pil_roundtrip",
    "plasma_fractal",
    "to_uint8",
]


def _boundary_index(idx: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Map integer positions (any range) into [0, n) like SciPy's / OpenCV's border modes.

    nearest: clamp (aaa|abcd|ddd); reflect: half-sample symmetric, SciPy 'reflect' (cba|abcd|dcb);
    mirror: reflect-101, OpenCV's default and SciPy 'mirror' (dcb|abcd|cba).
    """
    if mode == "nearest" or n == 1:
        return idx.clamp(0, n - 1)
    if mode == "reflect":
        j = idx.remainder(2 * n)
        return torch.where(j < n, j, 2 * n - 1 - j)
    if mode == "mirror":
        j = idx.remainder(2 * n - 2)
        return torch.where(j < n, j, 2 * n - 2 - j)
    raise ValueError(f"unknown border mode {mode!r}")


def _gaussian_kernel1d(sigma: float, truncate: float, dtype: torch.dtype) -> torch.Tensor:
    # SciPy's gaussian_filter1d: radius = int(truncate * sigma + 0.5), weights exp(-x^2 / 2 s^2).
    r = int(truncate * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def filter_sep(x: torch.Tensor, k: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every [H, W] plane of x [B, C, H, W] with the symmetric 1-D kernel k along H then W."""
    h, w = x.shape[-2:]
    r = (k.numel() - 1) // 2
    dev = x.device
    k = k.to(device=dev, dtype=x.dtype)
    # A weighted sum of shifted views: a handful of taps over many single-channel planes is
    # memory-bound, and this beats a 1-channel conv2d several times on CPU.
    xp = x.index_select(2, _boundary_index(torch.arange(-r, h + r, device=dev), h, mode))
    y = sum(k[t] * xp[:, :, t : t + h, :] for t in range(2 * r + 1))
    yp = y.index_select(3, _boundary_index(torch.arange(-r, w + r, device=dev), w, mode))
    return sum(k[t] * yp[:, :, :, t : t + w] for t in range(2 * r + 1))


def filter2d(x: torch.Tensor, k: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every plane of x [B, C, H, W] with an odd-sized 2-D kernel k [kh, kw]."""
    h, w = x.shape[-2:]
    rh, rw = (k.shape[0] - 1) // 2, (k.shape[1] - 1) // 2
    dev = x.device
    k = k.to(device=dev, dtype=x.dtype)
    xp = x.index_select(2, _boundary_index(torch.arange(-rh, h + rh, device=dev), h, mode))
    xp = xp.index_select(3, _boundary_index(torch.arange(-rw, w + rw, device=dev), w, mode))
    out = torch.zeros_like(x)
    for a in range(k.shape[0]):
        for b in range(k.shape[1]):
            if k[a, b] != 0:
                out += k[a, b] * xp[:, :, a : a + h, b : b + w]
    return out


def gaussian_filter(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """skimage.filters.gaussian on each channel plane (its defaults: mode 'nearest', truncate 4)."""
    if sigma <= 0:
        return x
    return filter_sep(x, _gaussian_kernel1d(sigma, truncate, x.dtype), mode)


def bilinear(img: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample img [B, C, H, W] at fractional rows ys / columns xs [B, H', W'] (order-1 interpolation,
    neighbours outside the image mapped by ``mode``). Returns [B, C, H', W']."""
    b, c, h, w = img.shape
    y0f, x0f = ys.floor(), xs.floor()
    wy, wx = (ys - y0f).unsqueeze(1), (xs - x0f).unsqueeze(1)
    y0, x0 = y0f.long(), x0f.long()
    flat = img.reshape(b, c, h * w)

    def at(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        lin = _boundary_index(yi, h, mode) * w + _boundary_index(xi, w, mode)  # [B, H', W']
        return flat.gather(2, lin.reshape(b, 1, -1).expand(b, c, -1)).reshape(b, c, *ys.shape[1:])

    top = at(y0, x0) * (1 - wx) + at(y0, x0 + 1) * wx
    bot = at(y0 + 1, x0) * (1 - wx) + at(y0 + 1, x0 + 1) * wx
    return top * (1 - wy) + bot * wy


def _shift_gather(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, clamp(i + dy[b]), clamp(j + dx[b])] (edge replication)."""
    b, c, h, w = x.shape
    dev = x.device
    rows = (torch.arange(h, device=dev)[None, :] + dy[:, None]).clamp(0, h - 1)[:, :, None]
    cols = (torch.arange(w, device=dev)[None, :] + dx[:, None]).clamp(0, w - 1)[:, None, :]
    bi = torch.arange(b, device=dev)[:, None, None]
    return x.permute(0, 2, 3, 1)[bi, rows, cols].permute(0, 3, 1, 2)


def magick_motion_blur(x: torch.Tensor, radius: float, sigma: float, angles_deg: torch.Tensor) -> torch.Tensor:
    """ImageMagick's MotionBlurImage: 2*ceil(radius)+1 one-sided taps i = 0.. along the angle,
    weights exp(-i^2 / 2 sigma^2) normalised, tap i at offset round(i cos a), round(i sin a),
    edge pixels replicated (ImageMagick's default virtual-pixel method)."""
    width = int(2 * math.ceil(radius) + 1)
    i = torch.arange(width, dtype=torch.float64)
    k = torch.exp(-(i**2) / (2 * sigma * sigma))
    k = (k / k.sum()).to(x.dtype)
    a = torch.deg2rad(angles_deg.to(torch.float64))
    out = torch.zeros_like(x)
    for t in range(width):
        # ceil(v - 0.5): ImageMagick's rounding of the tap offsets.
        ox = torch.ceil(t * torch.cos(a) - 0.5).long().to(x.device)
        oy = torch.ceil(t * torch.sin(a) - 0.5).long().to(x.device)
        out += k[t] * _shift_gather(x, oy, ox)
    return out


def clipped_zoom(x: torch.Tensor, z: float) -> torch.Tensor:
    """Zoom into the centre by z (> 1) and crop back to the size: the generator's clipped_zoom
    (SciPy zoom, order 1, i.e. bilinear with aligned corners)."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / z), math.ceil(w / z)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top : top + ch, left : left + cw]
    oh, ow = round(ch * z), round(cw * z)
    big = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=True) if (oh, ow) != (ch, cw) else crop
    th, tw = (oh - h) // 2, (ow - w) // 2
    return big[..., th : th + h, tw : tw + w]


def plasma_fractal(b: int, size: int, decay: float, gen: torch.Generator) -> torch.Tensor:
    """Diamond-square height maps [b, size, size] in [0, 1] (the generator's plasma_fractal,
    one independent map per image, vectorised over the batch)."""
    m = torch.zeros(b, size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def noisy_mean(s: torch.Tensor) -> torch.Tensor:
        return s / 4 + wibble * (torch.rand(s.shape, generator=gen, dtype=torch.float64) * 2 - 1) * wibble

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        sq = corners + corners.roll(-1, 1)
        sq = sq + sq.roll(-1, 2)
        m[:, half::step, half::step] = noisy_mean(sq)
        dr = m[:, half::step, half::step]
        ul = m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = noisy_mean(dr + dr.roll(1, 1) + ul + ul.roll(-1, 2))
        m[:, half::step, 0::step] = noisy_mean(dr + dr.roll(1, 2) + ul + ul.roll(-1, 1))
        step //= 2
        wibble /= decay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def gray(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] luma (OpenCV's RGB2GRAY weights); grey input passes through."""
    if x.shape[1] == 1:
        return x
    wts = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x[:, :3] * wts).sum(1, keepdim=True)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    # The generator stores np.uint8(float image * 255), which truncates; the epsilon keeps values
    # that are exact multiples of 1/255 (a uint8 source) from dropping one level to round-off.
    return (x.clamp(0, 1) * 255 + 1e-3).floor().to(torch.uint8)


def pil_roundtrip(x: torch.Tensor, fn: Callable[[Any], Any]) -> torch.Tensor:
    """Apply fn(PIL image) -> PIL image to every image of x [B, C, H, W] in uint8, as the generator
    does for JPEG and pixelate (it works on PIL images)."""
    from PIL import Image

    u8 = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in u8:
        pil = Image.fromarray(np.ascontiguousarray(img[:, :, 0] if img.shape[2] == 1 else img))
        arr = np.asarray(fn(pil), dtype=np.uint8)
        out.append(arr[:, :, None] if arr.ndim == 2 else arr)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255.0
