"""Image files to pixels: header checks (:func:`probe_sizes`, every file opened, none decoded),
decoding into one uint8 tensor (:func:`decode_images`) and per-channel statistics
(:class:`ChannelStats`).

Cost measured on this project's CPU (AMD EPYC, 2 shared threads) with 64x64 JPEGs of ~2.6 kB:
75 us per header and 380 us per decode, i.e. 8 s and 42 s for Tiny-ImageNet's 110,000 images.
``workers`` > 1 decodes on a thread pool (PIL releases the GIL inside its decoder); on that
machine 2 threads gave no gain (the per-file Python work dominates at 64x64), so the default is
one thread; try more on a machine with free cores. Headers are always read in one thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sbfast.data.checks import DataError
from sbfast.data.files import read_image

PathLike = str | os.PathLike
Size = tuple[int, int]  # (H, W)

MODES = {"RGB": 3, "L": 1}


def check_mode(mode: str) -> int:
    """Channels of a PIL mode sbfast decodes to ("RGB": 3, "L": 1); ValueError otherwise."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    return MODES[mode]


def as_size(size: int | Sequence[int] | None, what: str = "image_size") -> Size | None:
    """``size`` as (H, W): an int, or a sequence of one int (a flag given one value), is square;
    None stays None. ValueError for anything else."""
    if size is None:
        return None
    if isinstance(size, (tuple, list)) and len(size) == 1:
        size = size[0]
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in size)
    ):
        raise ValueError(f"{what} must be an int >= 1 or (H, W) of ints >= 1, got {size!r}")
    return int(size[0]), int(size[1])


def check_workers(workers: int | None) -> int:
    """Decoding threads: None is 1; otherwise an int >= 1."""
    if workers is None:
        return 1
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be an int >= 1 or None, got {workers!r}")
    return int(workers)


def _probe(path: Path) -> Size:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:  # reads the header only
            w, h = img.size
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {str(path)!r}") from None
    except UnidentifiedImageError as exc:
        raise DataError(path, "not an image format PIL recognises") from exc
    except Exception as exc:  # permissions, a broken header: one line naming the file
        raise DataError(path, f"cannot read the image header ({type(exc).__name__}: {exc})") from exc
    return h, w


def probe_sizes(paths: Sequence[PathLike]) -> list[Size]:
    """(H, W) of every file from its header (nothing decoded); the first bad file is named.

    Raises:
        DataError: a file that cannot be read or is not an image PIL recognises.
    """
    # One thread: header parsing is Python code under the GIL (threads made it 3x slower).
    return [_probe(Path(p)) for p in paths]


def common_size(paths: Sequence[PathLike], sizes: Sequence[Size], required: Size | None = None, hint: str = "") -> Size:
    """The one (H, W) of all ``sizes`` (or ``required``); the first file of another size is named.

    Raises:
        DataError: naming that file, its size and the expected one (``hint`` appended).
    """
    if not sizes:
        raise ValueError("no images to take a size from")
    want = required if required is not None else sizes[0]
    for p, s in zip(paths, sizes, strict=True):
        if tuple(s) != tuple(want):
            src = "required" if required is not None else f"that of {paths[0]}"
            raise DataError(p, f"size {s[0]}x{s[1]} (H x W) differs from {want[0]}x{want[1]} ({src}){hint}")
    return want


def _decode_one(path: Path, mode: str, size: Size | None) -> np.ndarray:
    from PIL import Image

    img = read_image(path, mode)  # full decode: truncation and PNG CRC errors name the file
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_images(
    paths: Sequence[PathLike],
    *,
    mode: str = "RGB",
    size: Size | None = None,
    expect: Size | None = None,
    workers: int | None = None,
    hint: str = "",
) -> torch.Tensor:
    """Decode ``paths`` into uint8 [N, C, H, W] (C = 3 for "RGB", 1 for "L"; grey JPEGs become
    three equal channels in "RGB", as ImageFolder's loader does).

    Args:
        size: resize each image whose size differs to (H, W), bilinear (PIL).
        expect: without ``size``, every image must be this (H, W) (None: the first image's).
        workers: decoding threads (None: 1).
        hint: appended to the message of a size mismatch (how to fix it).
    Raises:
        DataError: naming the file: unreadable, not an image, truncated or corrupted (see
            :func:`sbfast.data.files.read_image`), or of another size than expected.
    """
    c = check_mode(mode)
    paths = [Path(p) for p in paths]
    workers = check_workers(workers)
    if not paths:
        h, w = size or expect or (0, 0)
        return torch.empty(0, c, h, w, dtype=torch.uint8)
    first = _decode_one(paths[0], mode, size)
    shape = first.shape
    if size is None and expect is not None and shape[:2] != tuple(expect):
        raise DataError(paths[0], f"size {shape[0]}x{shape[1]} (H x W) differs from {expect[0]}x{expect[1]}{hint}")
    out = np.empty((len(paths), *shape), dtype=np.uint8)  # one buffer: no list of arrays, no stack copy
    out[0] = first

    def fill(i: int) -> None:
        arr = _decode_one(paths[i], mode, size)
        if arr.shape != shape:
            raise DataError(
                paths[i],
                f"size {arr.shape[0]}x{arr.shape[1]} (H x W) differs from {shape[0]}x{shape[1]} of {paths[0]}{hint}",
            )
        out[i] = arr

    rest = range(1, len(paths))
    if workers == 1:
        for i in rest:
            fill(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            # list() re-raises the first failure, in index order.
            list(pool.map(fill, rest, chunksize=64))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class ChannelStats:
    """Per-channel mean and std of pixels in [0, 1], accumulated over uint8 batches.

    ``mean_c = S1_c / n``, ``std_c = sqrt(S2_c / n - mean_c^2)`` (the population std over every
    pixel of the channel, as ``x.float().div(255).std(unbiased=False)`` over the whole set gives),
    with S1, S2 summed exactly as integers, so the result does not depend on the batch split.
    """

    def __init__(self) -> None:
        self.s1: np.ndarray | None = None
        self.s2: np.ndarray | None = None
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        """x: uint8 [B, C, H, W]."""
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise TypeError(f"x must be uint8 [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
        v = x.transpose(0, 1).reshape(x.shape[1], -1).to(torch.int64)
        s1, s2 = v.sum(1).numpy(), (v * v).sum(1).numpy()
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.count += v.shape[1]

    def result(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel in [0, 1] pixel units; ValueError with no pixels or a flat channel."""
        if self.s1 is None or self.count == 0:
            raise ValueError("no pixels to compute a mean and std from")
        n = self.count
        mean = [int(a) / (255.0 * n) for a in self.s1]
        var = [(int(b) * n - int(a) * int(a)) / (255.0**2 * n * n) for a, b in zip(self.s1, self.s2, strict=True)]
        std = [float(np.sqrt(max(v, 0.0))) for v in var]
        if min(std) <= 0:
            raise ValueError(f"a channel has the same value in every pixel (std {std}); pass std explicitly")
        return tuple(mean), tuple(std)


def channel_stats(batches: Iterable[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel in [0, 1] of uint8 [B, C, H, W] batches (see :class:`ChannelStats`)."""
    acc = ChannelStats()
    for x in batches:
        acc.update(x)
    return acc.result()
