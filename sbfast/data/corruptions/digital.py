"""The digital corruptions: contrast, saturate, JPEG compression, pixelate, elastic transform.

Each takes x [B, C, H, W] in [0, 1], its severity's parameter ``c``, a CPU generator and the
spatial scale ``s`` (unused here: pixelate and elastic are relative to the image size), and
returns [B, C, H, W], not clamped (the caller clamps).
"""

from __future__ import annotations

import io

import torch

from sbfast.data.corruptions.filters import bilinear, gaussian_filter, pil_roundtrip

__all__ = ["contrast", "elastic_transform", "jpeg_compression", "pixelate", "saturate"]


def contrast(x: torch.Tensor, c: float, gen: torch.Generator, s: float) -> torch.Tensor:
    """(x - mean) c + mean, the mean per image and channel."""
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * c + means


def saturate(x: torch.Tensor, c: tuple[float, float], gen: torch.Generator, s: float) -> torch.Tensor:
    """HSV saturation S c[0] + c[1] (grey images are returned as they are)."""
    if x.shape[1] != 3:
        return x  # a grey image has no saturation to change
    # HSV saturation S' = clip(S * c0 + c1). With H and V fixed, each channel is V (1 - S g(H)),
    # so channel' = V - (V - channel) S'/S; grey pixels (S = 0) have hue 0 in skimage (red):
    # they become (V, V (1 - S'), V (1 - S')).
    v = x.amax(dim=1, keepdim=True)
    mn = x.amin(dim=1, keepdim=True)
    sat = torch.where(v > 0, (v - mn) / v.clamp_min(1e-12), torch.zeros_like(v))
    s2 = (sat * c[0] + c[1]).clamp(0, 1)
    scaled = v - (v - x) * (s2 / sat.clamp_min(1e-12))
    grey = torch.cat([v, v * (1 - s2), v * (1 - s2)], dim=1)
    return torch.where(sat > 0, scaled, grey)


def jpeg_compression(x: torch.Tensor, c: float, gen: torch.Generator, s: float) -> torch.Tensor:
    """A JPEG round trip through PIL at quality c, in uint8."""
    from PIL import Image

    def fn(img):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(c))
        buf.seek(0)
        with Image.open(buf) as out:
            return out.copy()

    return pil_roundtrip(x, fn)


def pixelate(x: torch.Tensor, c: float, gen: torch.Generator, s: float) -> torch.Tensor:
    """A PIL box downscale by c and box upscale back, in uint8."""
    from PIL import Image

    def fn(img):
        w, h = img.size
        small = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
        return small.resize((w, h), Image.BOX)

    return pil_roundtrip(x, fn)


def elastic_transform(x: torch.Tensor, c: tuple[float, float, float], gen: torch.Generator, s: float) -> torch.Tensor:
    """A random affine warp, then a smoothed random displacement field (c: alpha, sigma and affine
    jitter as fractions of the image size)."""
    b, _, h, w = x.shape
    size = min(h, w)
    alpha, sigma, jitter = (v * size for v in c)
    dt = torch.float64
    # Random affine that moves three reference points by up to +-jitter (OpenCV's
    # getAffineTransform + warpAffine with reflect-101 border), points as (x, y).
    cx, cy, sq = float(w // 2), float(h // 2), float(size // 3)
    p1 = torch.tensor([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]], dtype=dt)
    p2 = p1 + (torch.rand(b, 3, 2, generator=gen, dtype=dt) * 2 - 1) * jitter
    ones = torch.ones(b, 3, 1, dtype=dt)
    # Solve [x y 1] M^T = p2 for the 2x3 forward map M, then invert it for sampling.
    m = torch.linalg.solve(torch.cat([p1.expand(b, 3, 2), ones], 2), p2).transpose(1, 2)  # [b, 2, 3]
    a, t = m[:, :, :2], m[:, :, 2:]
    ai = torch.linalg.inv(a)
    gy, gx = torch.meshgrid(torch.arange(h, dtype=dt), torch.arange(w, dtype=dt), indexing="ij")
    dst = torch.stack([gx.flatten(), gy.flatten()], 0)  # [2, h*w] as (x, y)
    src = ai @ (dst[None] - t)  # [b, 2, h*w]
    sx = src[:, 0].reshape(b, h, w).to(x.device, x.dtype)
    sy = src[:, 1].reshape(b, h, w).to(x.device, x.dtype)
    x = bilinear(x, sy, sx, "mirror")
    if alpha == 0:
        return x
    # Smooth random displacement field (SciPy map_coordinates, order 1, mode 'reflect').
    noise = torch.rand(b, 2, h, w, generator=gen, dtype=x.dtype).to(x.device) * 2 - 1
    disp = gaussian_filter(noise, sigma, mode="reflect", truncate=3.0) * alpha
    yy = gy.to(x.device, x.dtype)[None] + disp[:, 1]
    xx = gx.to(x.device, x.dtype)[None] + disp[:, 0]
    return bilinear(x, yy, xx, "reflect")
