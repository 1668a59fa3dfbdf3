"""Applying the corruptions: :func:`corrupt` on a batch, :func:`make_corrupted_sets` on a data
set (one corrupted copy per corruption and severity, seeded per copy by
:func:`corruption_seed`)."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import torch

from sbfast.data.checks import check_seed
from sbfast.data.corruptions.catalogue import CORRUPTION_FUNCS, CORRUPTIONS, SEVERITY_PARAMS, check_corruption
from sbfast.data.corruptions.filters import to_uint8
from sbfast.data.datasets import IndexedTensorDataset, normalize

__all__ = ["corrupt", "corruption_seed", "make_corrupted_sets"]


# How far outside [0, 1] corrupt() accepts a pixel (rounding of a normalise/denormalise round
# trip), before clamping it in; anything further is an input that was never denormalised.
PIXEL_SLACK = 1e-3


def _corrupt(x: torch.Tensor, name: str, severity: int, gen: torch.Generator, spatial_scale: float) -> torch.Tensor:
    c = SEVERITY_PARAMS[name][int(severity) - 1]
    return CORRUPTION_FUNCS[name](x, c, gen, spatial_scale).clamp(0.0, 1.0)


def corrupt(
    x: torch.Tensor,
    name: str,
    severity: int,
    seed: int = 0,
    *,
    spatial_scale: float = 1.0,
) -> torch.Tensor:
    """Apply one CIFAR-10-C corruption at one severity to a batch of images.

    Args:
        x: [B, C, H, W] or [C, H, W] floating, PIXEL values in [0, 1] (denormalise first: see
            :func:`sbfast.data.denormalize`), C = 1 or 3, any H, W >= 2 (8x8 digits work).
        name: one of ``CORRUPTIONS``. severity: 1..5.
        seed: all randomness comes from a torch.Generator seeded with this, an int in
            [0, 2**63) (same seed, same output, for the same batch).
        spatial_scale: multiplies the pixel-unit spatial parameters (blur sigmas and radii,
            glass-blur displacement), which are CIFAR-10-C's for 32x32; 1.0 reproduces CIFAR-10-C
            on 32x32 images, use e.g. 2.0 for 64x64. Pixelate, zoom and elastic are already
            relative to the image size.
    Returns:
        x's shape and dtype, on x's device, clamped to [0, 1]. Float throughout: no uint8
        rounding except inside jpeg_compression and pixelate (they go through PIL as in the
        generator); :func:`make_corrupted_sets` rounds to uint8 for uint8 data sets.
    """
    check_corruption(name, severity)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor in [0, 1] pixel space, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 3:
        return corrupt(x.unsqueeze(0), name, severity, seed, spatial_scale=spatial_scale).squeeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3) or min(x.shape[2:]) < 2:
        raise ValueError(f"x must be [B, C, H, W] with C in (1, 3) and H, W >= 2, got {tuple(x.shape)}")
    if not spatial_scale > 0:
        raise ValueError(f"spatial_scale must be > 0, got {spatial_scale!r}")
    if x.numel():
        lo, hi = (v.item() for v in torch.aminmax(x))
        if not (-PIXEL_SLACK <= lo and hi <= 1 + PIXEL_SLACK):  # also catches NaN
            raise ValueError(f"x must hold pixel values in [0, 1] (denormalise first), got values in [{lo:g}, {hi:g}]")
        # a denormalised image can stray from [0, 1] by rounding; shot noise needs a rate >= 0
        x = x.clamp(0.0, 1.0)
    gen = torch.Generator().manual_seed(check_seed(seed))
    return _corrupt(x, name, severity, gen, float(spatial_scale))


def corruption_seed(seed: int, name: str, severity: int) -> int:
    """The seed :func:`make_corrupted_sets` uses for one (name, severity): independent streams per
    set that do not depend on which other sets are built. ``seed``: an int in [0, 2**63)."""
    check_corruption(name, severity)
    return (check_seed(seed) * 1_000_003 + zlib.crc32(name.encode()) * 7 + int(severity)) % (2**63 - 1)


_CHUNK = 1024  # images corrupted per call; part of the definition of the output for a seed


def _build_corrupted(
    dataset: IndexedTensorDataset, name: str, severity: int, seed: int, spatial_scale: float
) -> IndexedTensorDataset:
    gen = torch.Generator().manual_seed(corruption_seed(seed, name, severity))
    parts = []
    for start in range(0, len(dataset), _CHUNK):
        px = dataset.pixels(slice(start, start + _CHUNK))
        out = _corrupt(px, name, severity, gen, spatial_scale)
        if dataset.x.dtype == torch.uint8:
            parts.append(to_uint8(out))
        elif dataset.mean is not None and dataset.std is not None:
            parts.append(normalize(out, dataset.mean, dataset.std))
        else:
            parts.append(out)
    x = torch.cat(parts) if parts else dataset.x[:0].clone()
    return IndexedTensorDataset(x, dataset.y.clone(), mean=dataset.mean, std=dataset.std, classes=dataset.classes)


def make_corrupted_sets(
    dataset: IndexedTensorDataset,
    names: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    *,
    spatial_scale: float = 1.0,
    lazy: bool = False,
) -> Mapping[tuple[str, int], IndexedTensorDataset]:
    """Corrupted copies of a (test) data set, one per (corruption, severity).

    Each copy keeps the labels, the order (so sample i of every copy is sample i of the clean
    set) and the normalisation: pixels are recovered with ``dataset.pixels()`` (uint8 / 255, or
    ``denormalize`` with the set's mean/std; a set without mean/std is taken to be in pixel space
    already), corrupted, then stored like the source: uint8 sources are truncated back to uint8
    as CIFAR-10-C is (``np.uint8``), float sources are re-normalised with the same mean/std. The
    copy has no transform. Randomness: a generator seeded with ``corruption_seed(seed, name,
    severity)``, images taken in fixed chunks of 1,024, so the result depends on nothing else.

    Args:
        dataset: the clean set. names: corruptions (default ``CORRUPTIONS``).
        severities: subset of 1..5. spatial_scale: see :func:`corrupt`.
        lazy: if True, return a mapping that builds each set when it is looked up (for large
            sets: CIFAR-10's test set x 17 x 5 is 2.6 GB in uint8), giving the same tensors.
    Returns:
        mapping (name, severity) -> IndexedTensorDataset, in names-major order.
    """
    from sbfast.data.readers import LazyMapping

    if not isinstance(dataset, IndexedTensorDataset):
        raise TypeError(f"dataset must be an IndexedTensorDataset, got {type(dataset).__name__}")
    seed = check_seed(seed)
    names = list(CORRUPTIONS) if names is None else list(names)
    sev = list(severities)
    if not sev:
        raise ValueError("severities must not be empty")
    for n in names:
        for s in sev:
            check_corruption(n, s)
    if dataset.image_shape[0] not in (1, 3):
        raise ValueError(f"corruptions need 1 or 3 channels, got image shape {dataset.image_shape}")
    keys = [(n, int(s)) for n in names for s in sev]

    def build(key: tuple[str, int]) -> IndexedTensorDataset:
        return _build_corrupted(dataset, key[0], key[1], seed, spatial_scale)

    if lazy:
        return LazyMapping(keys, build)
    return {k: build(k) for k in keys}
