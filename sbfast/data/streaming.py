"""Image folders too large to hold in memory: decoded batch by batch from their files.

:class:`StreamingImageDataset` behaves as an :class:`~sbfast.data.IndexedTensorDataset` whose
``x`` is never built (same indexing, same float32 values for the same files); its
:meth:`~StreamingImageDataset.on_device` gives :class:`StreamingDeviceData`, the counterpart of
the trainer's on-device data (``n``, ``y``, ``mean``, ``std``, ``device``, ``fetch``,
``slices``), which decodes on the host and normalises on the device.

:func:`choose_storage` decides between the two: in memory when the uint8 pixels of train + test
take at most ``MEMORY_FRACTION`` of the free memory of the device and of the host, else streamed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sbfast.data.datasets import IndexedTensorDataset, Transform, normalize
from sbfast.data.images import Size, check_mode, decode_images

STORAGES = ("auto", "memory", "stream")
# Share of free memory that in-memory data may take: the rest is for the models, optimizer
# state and activations (device) and for the copy made while decoding (host).
MEMORY_FRACTION = 0.25


class StreamingImageDataset:
    """Images decoded from their files on every fetch; yields ``(index, x, y)`` as
    :class:`~sbfast.data.IndexedTensorDataset` does (uint8 / 255, then normalised with
    ``mean``/``std`` when given, then ``transform``).

    Args:
        paths: N image files (sample ``i`` is ``paths[i]``), all checked beforehand.
        labels: int64 [N]. size: (H, W) of every sample; files of another size are resized to it
            when ``resize`` is True, else a fetch of one is an error naming it.
        mode: "RGB" or "L". mean, std: per-channel in [0, 1] pixel units, both or neither.
        classes: the label map. root: the folder paths are relative to in :meth:`fingerprint`.
        workers: decoding threads per fetch.
    """

    def __init__(
        self,
        paths: Sequence[os.PathLike | str],
        labels: torch.Tensor,
        size: Size,
        *,
        mode: str = "RGB",
        resize: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        classes: Sequence[str] | None = None,
        transform: Transform | None = None,
        root: os.PathLike | str | None = None,
        workers: int | None = None,
    ) -> None:
        self.paths = tuple(Path(p) for p in paths)
        self.y = torch.as_tensor(labels, dtype=torch.int64)
        if self.y.shape != (len(self.paths),):
            raise ValueError(f"labels must be [{len(self.paths)}], got shape {tuple(self.y.shape)}")
        self.channels = check_mode(mode)
        self.mode, self.size, self.resize = mode, (int(size[0]), int(size[1])), resize
        # the container checks mean/std/transform exactly as for in-memory data
        empty = IndexedTensorDataset(
            torch.empty(0, self.channels, *self.size, dtype=torch.uint8),
            torch.empty(0, dtype=torch.int64),
            transform,
            mean=mean,
            std=std,
            classes=classes,
        )
        self.mean, self.std, self.classes, self.transform = empty.mean, empty.std, empty.classes, transform
        self.root = Path(root) if root is not None else None
        self.workers = workers

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        return int(self.y.max()) + 1 if len(self) else 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return (self.channels, *self.size)

    @property
    def nbytes(self) -> int:
        """Bytes the uint8 pixels would take in memory: N * C * H * W."""
        return len(self) * self.channels * self.size[0] * self.size[1]

    def _indices(self, i: Any) -> torch.Tensor:
        n = len(self)
        if isinstance(i, slice):
            return torch.arange(n)[i]
        if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
            if i.shape != (n,):
                raise IndexError(f"a boolean mask must have shape ({n},), got {tuple(i.shape)}")
            return i.nonzero().flatten()
        idx = torch.as_tensor(i, dtype=torch.int64).flatten().cpu()
        idx = torch.where(idx < 0, idx + n, idx)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise IndexError(f"indices out of range for a data set of {n} samples")
        return idx

    def raw(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] of the samples ``idx`` (1-D int64, in range), decoded now."""
        paths = [self.paths[k] for k in idx.tolist()]
        kw = {"size": self.size} if self.resize else {"expect": self.size}
        return decode_images(paths, mode=self.mode, workers=self.workers, **kw)

    def _float(self, raw: torch.Tensor) -> torch.Tensor:
        out = raw.to(torch.float32).div_(255.0)
        return normalize(out, self.mean, self.std) if self.mean is not None else out

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(i, (int, np.integer)) or (isinstance(i, torch.Tensor) and i.dim() == 0):
            k = int(i)
            if not -len(self) <= k < len(self):
                raise IndexError(f"index {k} out of range for a data set of {len(self)} samples")
            k %= len(self)
            x = self._float(self.raw(torch.tensor([k])))[0]
            if self.transform is not None:
                x = self.transform(x)
            return torch.tensor(k, dtype=torch.int64), x, self.y[k]
        idx = self._indices(i)
        x = self._float(self.raw(idx))
        if self.transform is not None:
            x = self.transform(x)
        return idx, x, self.y[idx]

    def pixels(self, idx: Any = None) -> torch.Tensor:
        """float32 [B, C, H, W] in [0, 1] (no normalisation, no transform)."""
        sel = torch.arange(len(self)) if idx is None else self._indices(idx)
        return self.raw(sel).to(torch.float32) / 255.0

    def _copy(self, paths: Sequence[Path], labels: torch.Tensor, transform: Transform | None) -> StreamingImageDataset:
        return StreamingImageDataset(
            paths,
            labels,
            self.size,
            mode=self.mode,
            resize=self.resize,
            mean=self.mean,
            std=self.std,
            classes=self.classes,
            transform=transform,
            root=self.root,
            workers=self.workers,
        )

    def subset(self, indices: Sequence[int] | torch.Tensor) -> StreamingImageDataset:
        """The chosen samples, re-indexed 0..len(indices)-1 (same transform)."""
        idx = self._indices(indices)
        return self._copy([self.paths[k] for k in idx.tolist()], self.y[idx], self.transform)

    def with_transform(self, transform: Transform | None) -> StreamingImageDataset:
        return self._copy(self.paths, self.y, transform)

    def materialize(self, batch_size: int = 4096) -> IndexedTensorDataset:
        """The same samples decoded into an in-memory :class:`IndexedTensorDataset` (same values)."""
        parts = [self.raw(torch.arange(s, min(s + batch_size, len(self)))) for s in range(0, len(self), batch_size)]
        x = torch.cat(parts) if parts else torch.empty(0, *self.image_shape, dtype=torch.uint8)
        return IndexedTensorDataset(x, self.y, self.transform, mean=self.mean, std=self.std, classes=self.classes)

    def fingerprint(self) -> str:
        """sha256 (hex) of what identifies the data without decoding it: the files' paths relative
        to ``root``, their byte sizes, the labels, the size, mode and normalisation. Unchanged
        when the folder moves; changed when a file is replaced by one of another length."""
        h = hashlib.sha256()
        h.update(repr((self.size, self.mode, self.resize, self.mean, self.std, self.classes)).encode())
        for p, y in zip(self.paths, self.y.tolist(), strict=True):
            rel = p.relative_to(self.root).as_posix() if self.root is not None else p.name
            h.update(f"{rel}\0{p.stat().st_size}\0{y}\n".encode())
        return h.hexdigest()

    def on_device(self, device: torch.device | str) -> StreamingDeviceData:
        return StreamingDeviceData(self, torch.device(device))

    def __repr__(self) -> str:
        return (
            f"StreamingImageDataset(n={len(self)}, image_shape={self.image_shape}, num_classes={self.num_classes}, "
            f"transform={self.transform!r})"
        )


class StreamingDeviceData:
    """The streaming counterpart of the trainer's on-device data: ``fetch(idx)`` decodes the
    samples ``idx`` on the host, copies the uint8 batch to ``device`` and there computes
    ``normalize(x / 255, mean, std)`` in float32, the same operations in the same order as for
    in-memory uint8 data, so the values are the same bits. Labels live on the device."""

    def __init__(self, ds: StreamingImageDataset, device: torch.device) -> None:
        self.ds = ds
        self.n = len(ds)
        self.y = ds.y.to(device)
        self.mean, self.std = ds.mean, ds.std
        self.device = device

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx: int64 [B] (any device) -> (x float32 [B, C, H, W], y int64 [B]) on the device."""
        host = idx.detach().to("cpu", torch.int64)
        raw = self.ds.raw(host)
        if self.device.type == "cuda":
            raw = raw.pin_memory()
        x = raw.to(self.device, non_blocking=True).to(torch.float32).div_(255.0)
        if self.mean is not None:
            x = normalize(x, self.mean, self.std)
        return x, self.y[idx.to(self.device)]

    def slices(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.n, batch_size):
            yield self.fetch(torch.arange(start, min(start + batch_size, self.n)))


def _host_available() -> int | None:
    """Bytes of host memory available to a new allocation (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_budget(device: torch.device | str | None = None) -> int | None:
    """Bytes of pixels that may be held in memory for ``device``: ``MEMORY_FRACTION`` of the
    host's available memory, and on CUDA also of the device's free memory (the data is decoded
    on the host, then copied). None when neither can be measured (then: in memory)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    limits = []
    host = _host_available()
    if host is not None:
        limits.append(int(host * MEMORY_FRACTION))
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        limits.append(int(free * MEMORY_FRACTION))
    return min(limits) if limits else None


def choose_storage(nbytes: int, storage: str = "auto", budget: int | None = None) -> str:
    """ "memory" or "stream" for data of ``nbytes`` uint8 pixels.

    Args:
        storage: "memory" or "stream" force the choice; "auto": memory when ``nbytes <= budget``
            (or budget is None).
        budget: bytes allowed in memory (see :func:`memory_budget`).
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if storage != "auto":
        return storage
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise ValueError(f"memory budget must be an int >= 0 (bytes) or None, got {budget!r}")
    return "memory" if budget is None or nbytes <= budget else "stream"
