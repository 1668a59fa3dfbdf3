"""Readers for real data a user already has on disk. Nothing here downloads anything.

* CIFAR-10 / CIFAR-100, the standard python-pickle archives, extracted or as the ``.tar.gz``;
* CIFAR-10-C / CIFAR-100-C, folders of ``<corruption>.npy`` plus ``labels.npy``;
* image folders: :mod:`sbfast.data.image_folders` (re-exported here).

All of them store raw uint8 pixels in an :class:`IndexedTensorDataset` with the release's
per-channel mean/std, so a fetch gives normalised float32 and ``pixels()`` gives [0, 1].
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sbfast.data.checks import DataError
from sbfast.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IndexedTensorDataset,
)
from sbfast.data.files import iter_tar_members, load_pickle, read_bytes, read_npy
from sbfast.data.image_folders import load_image_folder, load_tiny_imagenet
from sbfast.data.layouts import IMG_EXTENSIONS

__all__ = [
    "IMG_EXTENSIONS",
    "LazyMapping",
    "list_cifar_c",
    "load_cifar10",
    "load_cifar100",
    "load_cifar_c",
    "load_image_folder",
    "load_tiny_imagenet",
]

PathLike = str | os.PathLike

_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR100_DIR = "cifar-100-python"


def _locate(root: PathLike, folder: str, tar_names: Sequence[str]) -> tuple[Path | None, Path | None]:
    """(extracted folder, None) or (None, archive file) for a CIFAR root as the loaders accept it."""
    root = Path(root)
    if root.is_file():
        return None, root
    if (root / folder).is_dir():
        return root / folder, None
    if root.is_dir() and root.name == folder:
        return root, None
    for t in tar_names:
        if (root / t).is_file():
            return None, root / t
    raise FileNotFoundError(
        f"no CIFAR data under {str(root)!r}: expected the folder {folder!r} (or that folder itself) "
        f"or one of {list(tar_names)}; sbfast never downloads data"
    )


def _read_cifar(
    root: PathLike, folder: str, tar_names: Sequence[str], names: Sequence[str], meta_name: str
) -> tuple[dict[str, tuple[dict, str]], tuple[dict, str] | None]:
    """Unpickle the CIFAR files ``names`` (all required) and ``meta_name`` (None when absent).

    Returns ``({name: (dict, where)}, (meta dict, where) | None)``, ``where`` naming the file
    (``archive:member`` inside a tar archive) for the error messages.
    """
    directory, archive = _locate(root, folder, tar_names)
    found: dict[str, tuple[dict, str]] = {}
    if directory is not None:
        for name in [*names, meta_name]:
            path = directory / name
            if name == meta_name and not path.exists():
                continue
            found[name] = (_as_dict(load_pickle(read_bytes(path), str(path)), str(path)), str(path))
    else:
        assert archive is not None
        # Everything is unpickled in one pass; the archive's checksum is verified when the
        # iterator ends, before any of it is used.
        for name, raw, where in iter_tar_members(archive, folder, names, optional=[meta_name]):
            found[name] = (_as_dict(load_pickle(raw, where), where), where)
    meta = found.pop(meta_name, None)
    return found, meta


def _as_dict(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(where, f"expected a dict in the pickle, got {type(obj).__name__}")
    return obj


def _key(d: dict, name: str, where: str) -> Any:
    # The archives use bytes keys (pickled by Python 2); accept str keys too (re-pickled copies).
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise DataError(where, f"missing key {name!r} (has {sorted(map(str, d))})")


def _describe(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"a {v.dtype} array of shape {v.shape}"
    return f"a {type(v).__name__}"


def _cifar_images(d: dict, where: str) -> torch.Tensor:
    data = _key(d, "data", where)
    # Exactly uint8: a wider integer or float array would have to be wrapped or truncated to fit.
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise DataError(where, f"'data' must be a uint8 array [n, 3072], got {_describe(data)}")
    # Rows are 1024 R, then 1024 G, then 1024 B values, each row-major: exactly [3, 32, 32].
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())


def _cifar_labels(d: dict, key: str, n: int, k: int, where: str) -> torch.Tensor:
    """Labels ``key`` of one file: n integers (Python or NumPy, never bool or float) in [0, k)."""
    raw = _key(d, key, where)
    if isinstance(raw, np.ndarray):
        if raw.ndim != 1 or raw.dtype.kind not in "iu":
            raise DataError(where, f"{key!r} must be a 1-D integer array, got {_describe(raw)}")
        values = raw
    elif isinstance(raw, (list, tuple)):
        for v in raw:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise DataError(where, f"{key!r} must hold integers, found {v!r} ({type(v).__name__})")
        values = raw
    else:
        raise DataError(where, f"{key!r} must be a list of integers, got {_describe(raw)}")
    if len(values) != n:
        raise DataError(where, f"{len(values)} {key!r} for {n} images")
    if n:
        lo, hi = int(min(values)), int(max(values))
        if lo < 0 or hi >= k:
            raise DataError(where, f"{key!r} must be in [0, {k}) ({k} classes), got values in [{lo}, {hi}]")
    return torch.as_tensor(np.asarray(values, dtype=np.int64).reshape(n))


def _class_names(meta: tuple[dict, str] | None, key: str, k: int) -> list[str] | None:
    """The k class names of a meta file (None when the file is absent); bytes decoded as UTF-8."""
    if meta is None:
        return None
    d, where = meta
    raw = _key(d, key, where)
    if not isinstance(raw, (list, tuple)) or len(raw) != k:
        count = f"{len(raw)} names" if isinstance(raw, (list, tuple)) else _describe(raw)
        raise DataError(where, f"{key!r} must be a list of {k} class names, got {count}")
    names = []
    for c in raw:
        if isinstance(c, bytes):
            try:
                c = c.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(where, f"class name {c!r} in {key!r} is not UTF-8") from exc
        if not isinstance(c, str):
            raise DataError(where, f"{key!r} must hold strings, found {c!r} ({type(c).__name__})")
        names.append(c)
    return names


def load_cifar10(root: PathLike, train: bool = True) -> IndexedTensorDataset:
    """CIFAR-10 from the python version of the archive, already on disk.

    Args:
        root: the extracted ``cifar-10-batches-py`` folder, its parent, the
            ``cifar-10-python.tar.gz`` file, or a folder holding that file.
        train: ``data_batch_1..5`` (50,000 images) if True, else ``test_batch`` (10,000).
    Returns:
        IndexedTensorDataset of uint8 storage [n, 3, 32, 32] (fetched as float32 normalised with
        CIFAR10_MEAN/STD), int64 labels, the 10 class names from ``batches.meta`` (None when the
        file is absent). The index is the position in the archive's order (batch 1 first).
    Raises:
        FileNotFoundError: nothing at ``root``, or a batch file missing.
        DataError (a ValueError): a file that is truncated or corrupted, or whose contents are not
            CIFAR-10's (uint8 [n, 3072] data, n integer labels in [0, 10), 10 class names); the
            message names the file (``archive:member`` inside an archive).
    """
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    files, meta = _read_cifar(
        root, _CIFAR10_DIR, ["cifar-10-python.tar.gz", "cifar-10-python.tgz"], names, "batches.meta"
    )
    xs, ys = [], []
    for name in names:
        d, where = files[name]
        xs.append(_cifar_images(d, where))
        ys.append(_cifar_labels(d, "labels", xs[-1].shape[0], 10, where))
    classes = _class_names(meta, "label_names", 10)
    return IndexedTensorDataset(torch.cat(xs), torch.cat(ys), mean=CIFAR10_MEAN, std=CIFAR10_STD, classes=classes)


def load_cifar100(root: PathLike, train: bool = True, label: str = "fine") -> IndexedTensorDataset:
    """CIFAR-100 from the python version of the archive, already on disk.

    Args:
        root: the extracted ``cifar-100-python`` folder, its parent, the ``cifar-100-python.tar.gz``
            file, or a folder holding that file.
        train: the ``train`` file (50,000 images) if True, else ``test`` (10,000).
        label: "fine" (100 classes, the paper's) or "coarse" (20 superclasses).
    Returns:
        IndexedTensorDataset as :func:`load_cifar10`, normalised with CIFAR100_MEAN/STD, class
        names from ``meta`` (None when the file is absent).
    Raises:
        as :func:`load_cifar10`, with 100 (fine) or 20 (coarse) classes.
    """
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
    k = 100 if label == "fine" else 20
    name = "train" if train else "test"
    files, meta = _read_cifar(root, _CIFAR100_DIR, ["cifar-100-python.tar.gz", "cifar-100-python.tgz"], [name], "meta")
    d, where = files[name]
    x = _cifar_images(d, where)
    y = _cifar_labels(d, f"{label}_labels", x.shape[0], k, where)
    classes = _class_names(meta, f"{label}_label_names", k)
    return IndexedTensorDataset(x, y, mean=CIFAR100_MEAN, std=CIFAR100_STD, classes=classes)


# --------------------------------------------------------------------------------------------
# CIFAR-10-C / CIFAR-100-C
# --------------------------------------------------------------------------------------------


class LazyMapping(Mapping):
    """A read-only mapping whose values are built by ``factory(key)`` on every access.

    Used for the many (corruption, severity) test sets, which together do not fit comfortably in
    memory (CIFAR-10-C: 19 x 5 x 30 MB uint8); iterate and drop each set after use.
    """

    def __init__(self, keys: Sequence[Any], factory: Callable[[Any], Any]) -> None:
        self._keys = list(keys)
        self._set = set(self._keys)
        self._factory = factory

    def __getitem__(self, key: Any) -> Any:
        if key not in self._set:
            raise KeyError(key)
        return self._factory(key)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"LazyMapping({len(self)} keys)"


def list_cifar_c(root: PathLike) -> list[str]:
    """Corruption names present in a CIFAR-10-C / CIFAR-100-C folder (every ``*.npy`` but labels), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no CIFAR-C folder at {str(root)!r}; sbfast never downloads data")
    return sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels")


def load_cifar_c(
    root: PathLike,
    names: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    *,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    lazy: bool = True,
    num_classes: int | None = None,
) -> Mapping[tuple[str, int], IndexedTensorDataset]:
    """CIFAR-10-C / CIFAR-100-C test sets, one per (corruption, severity).

    Format: ``root/<name>.npy`` uint8 [5 * n, H, W, C] (C = 3, or 1) with severities 1..5 stacked
    in blocks of n (n = 10,000 for the published sets; any n is accepted) and ``root/labels.npy``
    integer [5 * n] (the n test labels repeated per block).

    Args:
        root: the folder. names: corruptions to read (default: every ``*.npy`` in the folder).
        severities: subset of 1..5. mean, std: normalisation (use CIFAR100_MEAN/STD for -100-C).
        lazy: if True (default) each set is read from a memory map on access, so a loop over all
            95 sets never holds more than one; if False, a dict of all of them.
        num_classes: labels must lie in [0, num_classes); None: 100 when ``mean`` is
            CIFAR100_MEAN (CIFAR-100-C), else 10 (CIFAR-10-C).
    Returns:
        mapping (name, severity) -> IndexedTensorDataset of uint8 storage [n, C, H, W], int64
        labels, indexed 0..n-1 like the clean test set.
    Raises:
        FileNotFoundError: no folder, a named corruption or ``labels.npy`` missing.
        DataError (a ValueError), naming the file: a truncated or corrupted ``.npy``, labels that
            are not integers in [0, num_classes), images that are not uint8 [5 * n, H, W, C], or
            image and label counts that disagree. Every requested file's header is checked here,
            so a bad file fails this call, not a later lookup.
    """
    available = list_cifar_c(root)
    names = list(available) if names is None else list(names)
    missing = [n for n in names if n not in available]
    if missing:
        raise FileNotFoundError(f"{str(root)!r} has no {missing}.npy (found {available})")
    sev = list(severities)
    if not sev or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s not in range(1, 6) for s in sev):
        raise ValueError(f"severities must be a non-empty subset of 1..5, got {list(severities)!r}")
    sev = [int(s) for s in sev]
    if num_classes is None:
        num_classes = 100 if tuple(mean) == CIFAR100_MEAN else 10
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    labels_path = Path(root) / "labels.npy"
    labels = _cifar_c_labels(labels_path, num_classes)
    n = labels.size // 5
    counts = {name: _cifar_c_images(Path(root) / f"{name}.npy").shape[0] for name in names}
    wrong = [name for name in names if counts[name] != labels.size]
    if wrong:
        if len(set(counts.values())) == 1:  # the image files agree with each other: the labels are off
            listed = ", ".join(f"{nm}.npy" for nm in names[:3]) + (", ..." if len(names) > 3 else "")
            raise DataError(
                labels_path, f"{labels.size} labels, but the image files ({listed}) hold {counts[wrong[0]]} images each"
            )
        raise DataError(
            Path(root) / f"{wrong[0]}.npy", f"{counts[wrong[0]]} images, but {labels_path} has {labels.size} labels"
        )

    def build(key: tuple[str, int]) -> IndexedTensorDataset:
        name, s = key
        path = Path(root) / f"{name}.npy"
        arr = _cifar_c_images(path)
        if arr.shape[0] != labels.size:  # the file changed since the call that checked it
            raise DataError(path, f"{arr.shape[0]} images, but {labels_path} has {labels.size} labels")
        block = np.array(arr[(s - 1) * n : s * n], copy=True)  # off the read-only memory map
        x = torch.from_numpy(block).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(labels[(s - 1) * n : s * n].copy())
        c = x.shape[1]
        return IndexedTensorDataset(x, y, mean=tuple(mean)[:c], std=tuple(std)[:c])

    keys = [(name, s) for name in names for s in sev]
    if lazy:
        return LazyMapping(keys, build)
    return {k: build(k) for k in keys}


def _cifar_c_labels(path: Path, k: int) -> np.ndarray:
    """labels.npy as int64 [5 * n]: a 1-D integer array in [0, k) whose length splits into 5 blocks."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {str(path)!r}")
    raw = read_npy(path)
    if raw.ndim != 1 or raw.dtype.kind not in "iu":
        raise DataError(
            path, f"labels must be a 1-D integer array [5 * n], got a {raw.dtype} array of shape {raw.shape}"
        )
    if raw.size == 0 or raw.size % 5:
        raise DataError(path, f"{raw.size} labels, not 5 equal non-empty severity blocks")
    lo, hi = int(raw.min()), int(raw.max())
    if lo < 0 or hi >= k:
        hint = "; for CIFAR-100-C pass num_classes=100 (or mean=CIFAR100_MEAN)" if hi >= k == 10 else ""
        raise DataError(path, f"labels must be in [0, {k}) ({k} classes), got values in [{lo}, {hi}]{hint}")
    return raw.astype(np.int64)


def _cifar_c_images(path: Path) -> np.ndarray:
    """One corruption's images, memory-mapped, after checking the header: uint8 [m, H, W, 1 or 3]."""
    arr = read_npy(path, mmap=True)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] not in (1, 3) or min(arr.shape[1:3]) < 1:
        raise DataError(
            path, f"expected uint8 [5 * n, H, W, C] with C 1 or 3, got a {arr.dtype} array of shape {arr.shape}"
        )
    return arr
