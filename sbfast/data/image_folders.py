"""One split of an image-folder data set, decoded into memory: :func:`load_image_folder` (any
``root/<class>/**/<image>`` folder) and :func:`load_tiny_imagenet` (either of Tiny-ImageNet's
validation layouts). Whole runs (train + test, storage chosen, statistics computed) are
:func:`sbfast.data.load_image_splits`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sbfast.data.datasets import TINY_IMAGENET_MEAN, TINY_IMAGENET_STD, IndexedTensorDataset
from sbfast.data.images import as_size, check_mode, decode_images
from sbfast.data.layouts import IMG_EXTENSIONS, ImageFiles, scan_class_folders, scan_eval_split

PathLike = str | os.PathLike


def decode_files(
    files: ImageFiles,
    *,
    size: int | tuple[int, int] | None = None,
    mode: str = "RGB",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    workers: int | None = None,
) -> IndexedTensorDataset:
    """The images of ``files`` decoded into an :class:`IndexedTensorDataset` (uint8 storage).

    Args:
        size: resize every image to (H, W) (int: square), bilinear; None: all must share one size.
        mode: "RGB" or "L". mean, std: normalisation in [0, 1] pixel units (None: x / 255).
    Raises:
        DataError: naming the file: unreadable, not an image, truncated, corrupted, or of another
            size when ``size`` is None.
    """
    check_mode(mode)
    hw = as_size(size, "size")
    x = decode_images(files.paths, mode=mode, size=hw, workers=workers, hint="; pass size=(H, W) to resize")
    return IndexedTensorDataset(x, files.labels, mean=mean, std=std, classes=list(files.classes))


def load_image_folder(
    root: PathLike,
    *,
    classes: Sequence[str] | None = None,
    size: int | tuple[int, int] | None = None,
    mode: str = "RGB",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    extensions: Sequence[str] = IMG_EXTENSIONS,
    workers: int | None = None,
) -> IndexedTensorDataset:
    """Images laid out as ``root/<class_name>/**/<file>`` (torchvision ImageFolder's layout).

    Classes are the sorted sub-folder names (or ``classes``, to share one label map between a
    train and a val folder: a listed class may lack a folder, an unlisted folder is an error);
    label = position in that list. Files are found recursively (so Tiny-ImageNet's
    ``train/<wnid>/images/*.JPEG`` works) with a case-insensitive extension match, other files
    (``<wnid>_boxes.txt``) skipped, and ordered by class, then by sorted path: the index is
    stable across runs.

    Args:
        root: the folder. classes: class names to use (each must be a sub-folder).
        size: resize every image to (H, W) (int: square) with bilinear filtering; if None, every
            image must already have the same size.
        mode: PIL mode, "RGB" (3 channels) or "L" (1 channel).
        mean, std: normalisation in [0, 1] pixel units (None: fetch gives pixels / 255).
        workers: decoding threads (None: 1).
    Returns:
        IndexedTensorDataset of uint8 storage [n, C, H, W], int64 labels, ``classes`` set.
    Raises:
        FileNotFoundError: no folder. DataError (a ValueError): no class folders, a folder not in
            ``classes``, no images; naming the file, an image that is empty, truncated,
            corrupted (every PNG chunk's CRC is checked; JPEG has no checksum, so a damaged JPEG
            that still decodes is read as it decodes), not an image, or of another size when
            ``size`` is None.
    """
    check_mode(mode)
    files = scan_class_folders(root, classes, extensions=extensions)
    return decode_files(files, size=size, mode=mode, mean=mean, std=std, workers=workers)


def load_tiny_imagenet(root: PathLike, split: str = "train", **kw: Any) -> IndexedTensorDataset:
    """Tiny-ImageNet (200 classes, 64x64) split ``split`` of ``root``, in memory.

    ``train``: ``root/train/<wnid>/**/*.JPEG`` (the official ``<wnid>/images/`` or the flat
    ``<wnid>/``). ``val`` (or ``test``): either the official ``val/images/*.JPEG`` with
    ``val/val_annotations.txt`` or the release's class folders ``val/<wnid>/...``; the label map
    is always ``root/train``'s sorted class folders, so the splits agree. Normalised with
    TINY_IMAGENET_MEAN/STD unless ``mean``/``std`` are given. Other keywords (``size``, ``mode``,
    ``extensions``, ``workers``, ``classes``) as :func:`load_image_folder`.

    Raises:
        FileNotFoundError: no ``root/<split>`` folder. DataError: as
            :func:`sbfast.data.layouts.scan_eval_split` and :func:`load_image_folder`.
    """
    root = Path(root)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    kw.setdefault("mean", TINY_IMAGENET_MEAN)
    kw.setdefault("std", TINY_IMAGENET_STD)
    extensions = kw.pop("extensions", IMG_EXTENSIONS)
    classes = kw.pop("classes", None)
    train_dir = root / "train"
    if classes is None and train_dir.is_dir():
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if split == "train" or classes is None:
        files = scan_class_folders(root / split, classes, extensions=extensions)
    else:
        files = scan_eval_split(root / split, classes, extensions=extensions, reference=str(train_dir))
    return decode_files(files, **kw)
