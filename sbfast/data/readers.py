"""Readers for real data a user already has on disk. Nothing here downloads anything.

* CIFAR-10 / CIFAR-100, the standard python-pickle archives, extracted or as the ``.tar.gz``;
* CIFAR-10-C / CIFAR-100-C, folders of ``<corruption>.npy`` plus ``labels.npy``;
* image folders (Tiny-ImageNet style ``root/<class>/**/*.JPEG``).

All of them store raw uint8 pixels in an :class:`IndexedTensorDataset` with the release's
per-channel mean/std, so a fetch gives normalised float32 and ``pixels()`` gives [0, 1].
"""

from __future__ import annotations

import os
import pickle
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sbfast.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    TINY_IMAGENET_MEAN,
    TINY_IMAGENET_STD,
    IndexedTensorDataset,
)

PathLike = str | os.PathLike

_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR100_DIR = "cifar-100-python"


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        obj = pickle.loads(raw, encoding="bytes")
    except Exception as exc:  # pickle raises many types on a bad file
        raise ValueError(f"{where}: not a CIFAR python pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a dict in the pickle, got {type(obj).__name__}")
    return obj


def _key(d: dict, name: str, where: str) -> Any:
    # The archives use bytes keys (pickled by Python 2); accept str keys too (re-pickled copies).
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise ValueError(f"{where}: missing key {name!r} (has {sorted(map(str, d))})")


class _Archive:
    """Read members of a CIFAR archive: a folder or a .tar.gz, found under ``root``."""

    def __init__(self, root: PathLike, folder: str, tar_names: Sequence[str]) -> None:
        root = Path(root)
        self.tar: tarfile.TarFile | None = None
        self.dir: Path | None = None
        if root.is_file():
            self.tar = tarfile.open(root, "r:*")
        elif (root / folder).is_dir():
            self.dir = root / folder
        elif root.is_dir() and root.name == folder:
            self.dir = root
        else:
            tars = [root / t for t in tar_names if (root / t).is_file()]
            if not tars:
                raise FileNotFoundError(
                    f"no CIFAR data under {str(root)!r}: expected the folder {folder!r} (or that folder itself) "
                    f"or one of {list(tar_names)}; sbfast never downloads data"
                )
            self.tar = tarfile.open(tars[0], "r:*")
        self.folder = folder
        self.where = str(root)

    def read(self, name: str) -> dict:
        if self.dir is not None:
            path = self.dir / name
            if not path.is_file():
                raise FileNotFoundError(f"missing {str(path)!r}")
            return _unpickle(path.read_bytes(), str(path))
        assert self.tar is not None
        for member in self.tar.getmembers():
            if member.isfile() and Path(member.name).parts[-2:] == (self.folder, name):
                f = self.tar.extractfile(member)
                assert f is not None
                return _unpickle(f.read(), f"{self.where}:{member.name}")
        raise FileNotFoundError(f"{self.where}: archive has no {self.folder}/{name}")

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def _images(data: Any, where: str) -> torch.Tensor:
    arr = np.asarray(data, dtype=np.uint8)
    if arr.ndim != 2 or arr.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where}: data must be [n, 3072] uint8, got shape {arr.shape}")
    # Rows are 1024 R, then 1024 G, then 1024 B values, each row-major: exactly [3, 32, 32].
    return torch.from_numpy(arr.reshape(-1, 3, 32, 32).copy())


def load_cifar10(root: PathLike, train: bool = True) -> IndexedTensorDataset:
    """CIFAR-10 from the python version of the archive, already on disk.

    Args:
        root: the extracted ``cifar-10-batches-py`` folder, its parent, the
            ``cifar-10-python.tar.gz`` file, or a folder holding that file.
        train: ``data_batch_1..5`` (50,000 images) if True, else ``test_batch`` (10,000).
    Returns:
        IndexedTensorDataset of uint8 storage [n, 3, 32, 32] (fetched as float32 normalised with
        CIFAR10_MEAN/STD), int64 labels, class names from ``batches.meta`` when present. The
        index is the position in the archive's order (batch 1 first).
    """
    arc = _Archive(root, _CIFAR10_DIR, ["cifar-10-python.tar.gz", "cifar-10-python.tgz"])
    try:
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        xs, ys = [], []
        for name in names:
            d = arc.read(name)
            xs.append(_images(_key(d, "data", name), name))
            ys.append(torch.as_tensor(np.asarray(_key(d, "labels", name), dtype=np.int64)))
        try:
            meta = arc.read("batches.meta")
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _key(meta, "label_names", "meta")]
        except (FileNotFoundError, ValueError):
            classes = None
    finally:
        arc.close()
    x, y = torch.cat(xs), torch.cat(ys)
    _check_labels(y, classes, 10, str(root))
    return IndexedTensorDataset(x, y, mean=CIFAR10_MEAN, std=CIFAR10_STD, classes=classes)


def load_cifar100(root: PathLike, train: bool = True, label: str = "fine") -> IndexedTensorDataset:
    """CIFAR-100 from the python version of the archive, already on disk.

    Args:
        root: the extracted ``cifar-100-python`` folder, its parent, the ``cifar-100-python.tar.gz``
            file, or a folder holding that file.
        train: the ``train`` file (50,000 images) if True, else ``test`` (10,000).
        label: "fine" (100 classes, the paper's) or "coarse" (20 superclasses).
    Returns:
        IndexedTensorDataset as :func:`load_cifar10`, normalised with CIFAR100_MEAN/STD.
    """
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
    arc = _Archive(root, _CIFAR100_DIR, ["cifar-100-python.tar.gz", "cifar-100-python.tgz"])
    try:
        name = "train" if train else "test"
        d = arc.read(name)
        x = _images(_key(d, "data", name), name)
        y = torch.as_tensor(np.asarray(_key(d, f"{label}_labels", name), dtype=np.int64))
        try:
            meta = arc.read("meta")
            classes = [
                c.decode() if isinstance(c, bytes) else str(c) for c in _key(meta, f"{label}_label_names", "meta")
            ]
        except (FileNotFoundError, ValueError):
            classes = None
    finally:
        arc.close()
    _check_labels(y, classes, 100 if label == "fine" else 20, str(root))
    return IndexedTensorDataset(x, y, mean=CIFAR100_MEAN, std=CIFAR100_STD, classes=classes)


def _check_labels(y: torch.Tensor, classes: list[str] | None, k: int, where: str) -> None:
    k = len(classes) if classes is not None else k
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"{where}: labels must be in [0, {k}), got [{int(y.min())}, {int(y.max())}]")


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
) -> Mapping[tuple[str, int], IndexedTensorDataset]:
    """CIFAR-10-C / CIFAR-100-C test sets, one per (corruption, severity).

    Format: ``root/<name>.npy`` uint8 [5 * n, 32, 32, 3] with severities 1..5 stacked in blocks
    of n (n = 10,000 for the published sets; any n that divides the file into 5 is accepted) and
    ``root/labels.npy`` [5 * n] (the n test labels repeated per block).

    Args:
        root: the folder. names: corruptions to read (default: every ``*.npy`` in the folder).
        severities: subset of 1..5. mean, std: normalisation (use CIFAR100_MEAN/STD for -100-C).
        lazy: if True (default) each set is read from a memory map on access, so a loop over all
            95 sets never holds more than one; if False, a dict of all of them.
    Returns:
        mapping (name, severity) -> IndexedTensorDataset of uint8 storage [n, 3, 32, 32], int64
        labels, indexed 0..n-1 like the clean test set.
    """
    available = list_cifar_c(root)
    names = list(available) if names is None else list(names)
    missing = [n for n in names if n not in available]
    if missing:
        raise FileNotFoundError(f"{str(root)!r} has no {missing}.npy (found {available})")
    sev = [int(s) for s in severities]
    if not sev or any(s not in (1, 2, 3, 4, 5) for s in sev):
        raise ValueError(f"severities must be a non-empty subset of 1..5, got {list(severities)!r}")
    labels_path = Path(root) / "labels.npy"
    if not labels_path.is_file():
        raise FileNotFoundError(f"missing {str(labels_path)!r}")
    labels = np.load(labels_path).astype(np.int64).reshape(-1)
    if labels.size % 5:
        raise ValueError(f"{labels_path}: {labels.size} labels, not 5 equal severity blocks")
    n = labels.size // 5

    def build(key: tuple[str, int]) -> IndexedTensorDataset:
        name, s = key
        arr = np.load(Path(root) / f"{name}.npy", mmap_mode="r")
        if arr.ndim != 4 or arr.shape[0] != 5 * n or arr.shape[3] not in (1, 3):
            raise ValueError(f"{name}.npy: expected [{5 * n}, H, W, 3] uint8, got {arr.shape} {arr.dtype}")
        if arr.dtype != np.uint8:
            raise ValueError(f"{name}.npy: expected uint8, got {arr.dtype}")
        block = np.array(arr[(s - 1) * n : s * n], copy=True)  # off the read-only memory map
        x = torch.from_numpy(block).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(labels[(s - 1) * n : s * n].copy())
        c = x.shape[1]
        return IndexedTensorDataset(x, y, mean=tuple(mean)[:c], std=tuple(std)[:c])

    keys = [(name, s) for name in names for s in sev]
    if lazy:
        return LazyMapping(keys, build)
    return {k: build(k) for k in keys}


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_image_folder(
    root: PathLike,
    *,
    classes: Sequence[str] | None = None,
    size: int | tuple[int, int] | None = None,
    mode: str = "RGB",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    extensions: Sequence[str] = IMG_EXTENSIONS,
) -> IndexedTensorDataset:
    """Images laid out as ``root/<class_name>/**/<file>`` (torchvision ImageFolder's layout).

    Classes are the sorted sub-folder names (or ``classes``, to share one label map between a
    train and a val folder: a listed class may lack a folder, an unlisted folder is an error);
    label = position in that list. Files are found recursively (so
    Tiny-ImageNet's ``train/<wnid>/images/*.JPEG`` works) with a case-insensitive extension
    match, and ordered by class, then by sorted path: the index is stable across runs.

    Args:
        root: the folder. classes: class names to use (each must be a sub-folder).
        size: resize every image to (H, W) (int: square) with bilinear filtering; if None, every
            image must already have the same size.
        mode: PIL mode, "RGB" (3 channels) or "L" (1 channel).
        mean, std: normalisation in [0, 1] pixel units (None: fetch gives pixels / 255).
    Returns:
        IndexedTensorDataset of uint8 storage [n, C, H, W], int64 labels, ``classes`` set.
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {str(root)!r}; sbfast never downloads data")
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    classes = found if classes is None else list(classes)
    # A given class list is the label map: a class may have no folder here (no samples), but a
    # folder whose class is not in the list cannot be labelled.
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise ValueError(f"{str(root)!r} has class folder(s) {unknown[:5]} missing from classes")
    if not classes:
        raise ValueError(f"{str(root)!r} has no class sub-folders")
    exts = tuple(e.lower() for e in extensions)
    hw = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for label, cname in enumerate(classes):
        cdir = root / cname
        files = sorted(p for p in cdir.rglob("*") if p.is_file() and p.suffix.lower() in exts) if cdir.is_dir() else []
        for path in files:
            with Image.open(path) as img:
                img = img.convert(mode)
                if hw is not None and img.size != (hw[1], hw[0]):
                    img = img.resize((hw[1], hw[0]), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
            arr = arr[:, :, None] if arr.ndim == 2 else arr
            if xs and arr.shape != xs[0].shape:
                raise ValueError(
                    f"{path}: size {arr.shape[:2]} differs from {xs[0].shape[:2]}; pass size=(H, W) to resize"
                )
            xs.append(arr)
            ys.append(label)
    if not xs:
        raise ValueError(f"{str(root)!r}: no images with extensions {exts}")
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    return IndexedTensorDataset(x, torch.tensor(ys, dtype=torch.int64), mean=mean, std=std, classes=classes)


def load_tiny_imagenet(root: PathLike, split: str = "train", **kw: Any) -> IndexedTensorDataset:
    """Tiny-ImageNet (200 classes, 64x64) from ``root/<split>/<wnid>/...``, as the release reads it.

    The release expects ``val`` reorganised into class folders like ``train``; the label map is
    taken from ``root/train`` when present so that both splits agree. Normalised with
    TINY_IMAGENET_MEAN/STD unless ``mean``/``std`` are given. Other keywords go to
    :func:`load_image_folder`.
    """
    root = Path(root)
    train_dir = root / "train"
    if "classes" not in kw and train_dir.is_dir():
        kw["classes"] = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    kw.setdefault("mean", TINY_IMAGENET_MEAN)
    kw.setdefault("std", TINY_IMAGENET_STD)
    return load_image_folder(root / split, **kw)
