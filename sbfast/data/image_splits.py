"""The data of a run on an image folder: train + test splits (:func:`load_image_splits`) and the
corrupted copies of the test split (:func:`corrupted_test_sets`), read from a Tiny-ImageNet-C
style folder or generated.

Two data sets:

* ``tiny_imagenet``: the release's Tiny-ImageNet: 64x64 RGB only, mean (0.480, 0.448, 0.397),
  std (0.276, 0.269, 0.282); test = ``val/`` in either layout (the release evaluates on val);
* ``folder``: any ``train/`` + ``val/`` (or ``test/``) image folder; image size, mean and std
  given, or taken from the files (one size shared by every image; the train pixels' per-channel
  mean and population std), and reported in :meth:`ImageSplits.run_info` so a run can save them
  and pass them back when it is resumed or evaluated.

Order of the work: folders listed, every file's header opened (non-images and wrong sizes are
named here), the storage chosen, then decoding. Nothing is decoded before every check passes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sbfast.data.corruptions import make_corrupted_sets
from sbfast.data.datasets import TINY_IMAGENET_MEAN, TINY_IMAGENET_STD, IndexedTensorDataset
from sbfast.data.images import (
    ChannelStats,
    Size,
    as_size,
    check_mode,
    check_workers,
    common_size,
    decode_images,
    probe_sizes,
)
from sbfast.data.layouts import (
    IMG_EXTENSIONS,
    ImageFiles,
    find_split_dirs,
    scan_class_folders,
    scan_corruption_folder,
    scan_eval_split,
)
from sbfast.data.readers import LazyMapping
from sbfast.data.streaming import StreamingImageDataset, choose_storage, memory_budget

PathLike = str | os.PathLike
ImageSet = IndexedTensorDataset | StreamingImageDataset

IMAGE_FOLDER_DATASETS = ("tiny_imagenet", "folder")
TINY_IMAGENET_SIZE: Size = (64, 64)
# CIFAR-10-C's spatial parameters are for 32 px: generated corruptions scale them by size / 32.
CORRUPTION_BASE_SIZE = 32
_STATS_CHUNK = 1024  # images per ChannelStats update (int64 sums: 8x the uint8 chunk, 100 MB at 64x64)


@dataclass
class ImageSplits:
    """Train and test splits of an image folder, and how they were read.

    Attributes:
        name: "tiny_imagenet" or "folder". train, test: :class:`IndexedTensorDataset` (storage
            "memory") or :class:`StreamingImageDataset` ("stream"), no transform, normalised
            with ``mean``/``std``. classes: the label map (train's sorted class folders).
        image_size: (H, W). mean, std: per channel, [0, 1] pixel units. stats: "given" or
            "computed" (from the train pixels). layouts: {"train": ..., "test": ...}.
        root: the data root. test_dir: the folder the test split came from.
    """

    name: str
    train: ImageSet
    test: ImageSet
    classes: tuple[str, ...]
    image_size: Size
    mean: tuple[float, ...]
    std: tuple[float, ...]
    storage: str
    stats: str
    layouts: dict[str, str] = field(default_factory=dict)
    root: str = ""
    test_dir: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def run_info(self) -> dict[str, Any]:
        """What a run saves about its data (JSON-ready): enough to read the same tensors again
        (``image_size``, ``mean``, ``std`` go back into :func:`load_image_splits`)."""
        return {
            "dataset": self.name,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "stats": self.stats,
            "storage": self.storage,
            "layouts": dict(self.layouts),
            "num_classes": self.num_classes,
            "train": len(self.train),
            "test": len(self.test),
            "test_dir": Path(self.test_dir).name,
        }


def _stats_arg(v: Sequence[float] | None, c: int, what: str) -> tuple[float, ...] | None:
    if v is None:
        return None
    try:
        t = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be {c} numbers (one per channel), got {v!r}") from None
    if len(t) != c or any(x != x for x in t):
        raise ValueError(f"{what} must be {c} numbers (one per channel), got {v!r}")
    return t


def _computed_stats(x: ImageSet) -> tuple[tuple[float, ...], tuple[float, ...]]:
    acc = ChannelStats()
    for s in range(0, len(x), _STATS_CHUNK):
        idx = torch.arange(s, min(s + _STATS_CHUNK, len(x)))
        acc.update(x.x[idx] if isinstance(x, IndexedTensorDataset) else x.raw(idx))
    return acc.result()


def load_image_splits(
    dataset: str,
    root: PathLike,
    *,
    image_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    mode: str = "RGB",
    eval_split: str | None = None,
    storage: str = "auto",
    device: torch.device | str | None = None,
    budget: int | None = None,
    extensions: Sequence[str] = IMG_EXTENSIONS,
    workers: int | None = None,
) -> ImageSplits:
    """Train and test splits of ``root/train`` + ``root/val`` (or ``root/test``).

    Args:
        dataset: "tiny_imagenet" (64x64 RGB only, the release's mean/std unless given) or
            "folder".
        image_size: (H, W) or int; "folder" resizes every image to it (bilinear); None: every
            image must share one size. "tiny_imagenet": None or 64 only.
        mean, std: per channel in [0, 1] pixel units, both or neither; "folder" without them:
            computed once from the train pixels (:class:`~sbfast.data.images.ChannelStats`).
        mode: "RGB" or "L" ("tiny_imagenet": RGB; its grey JPEGs become three equal channels).
        eval_split: "val" or "test"; None: val if present, else test.
        storage: "memory", "stream", or "auto": memory when the uint8 pixels of both splits fit
            in ``budget`` bytes (default :func:`~sbfast.data.streaming.memory_budget` of
            ``device``: a quarter of its free memory and of the host's).
        workers: decoding threads (None: 1).
    Raises:
        ValueError / TypeError: a bad argument. FileNotFoundError: no root. DataError, naming
            the path, before anything is decoded: no ``train/``, no ``val/``/``test/``, a val
            folder in neither layout, an annotations line naming a class absent from ``train/``,
            an unreadable or non-image file, images of mixed sizes without ``image_size`` (or not
            64x64 for Tiny-ImageNet). A file whose header reads but whose data is corrupt is
            named when it is decoded (in memory: by this call; streamed: at its first fetch).
    """
    if dataset not in IMAGE_FOLDER_DATASETS:
        raise ValueError(f"dataset must be one of {IMAGE_FOLDER_DATASETS}, got {dataset!r}")
    c = check_mode(mode)
    check_workers(workers)
    hw = as_size(image_size)
    if (mean is None) != (std is None):
        raise ValueError(f"give both mean and std, or neither (got mean={mean!r}, std={std!r})")
    mean_t, std_t = _stats_arg(mean, c, "mean"), _stats_arg(std, c, "std")
    if std_t is not None and min(std_t) <= 0:
        raise ValueError(f"std must be > 0 per channel, got {std!r}")
    if dataset == "tiny_imagenet":
        if mode != "RGB":
            raise ValueError(f"tiny_imagenet is RGB; mode {mode!r} is for dataset 'folder'")
        if hw not in (None, TINY_IMAGENET_SIZE):
            raise ValueError(f"tiny_imagenet images are 64x64; image_size {image_size!r} is for dataset 'folder'")
        if mean_t is None:
            mean_t, std_t = TINY_IMAGENET_MEAN, TINY_IMAGENET_STD
    choose_storage(0, storage)  # the name, before any work

    train_dir, test_dir = find_split_dirs(root, eval_split)
    train_files = scan_class_folders(train_dir, extensions=extensions)
    test_files = scan_eval_split(test_dir, train_files.classes, extensions=extensions, reference=str(train_dir))

    all_paths = [*train_files.paths, *test_files.paths]
    sizes = probe_sizes(all_paths)  # every header: a non-image is named before decoding
    if dataset == "tiny_imagenet":
        size = common_size(all_paths, sizes, TINY_IMAGENET_SIZE, "; Tiny-ImageNet images are 64x64")
        resize = False
    elif hw is None:
        size = common_size(all_paths, sizes, None, "; pass image_size to resize every image to one size")
        resize = False
    else:
        size, resize = hw, True

    nbytes = len(all_paths) * c * size[0] * size[1]
    limit = budget if budget is not None else memory_budget(device)
    chosen = choose_storage(nbytes, storage, limit)
    train = _build(train_files, chosen, size, resize, mode, workers)
    stats = "given"
    if mean_t is None:
        mean_t, std_t = _computed_stats(train)
        stats = "computed"
    train = _with_stats(train, mean_t, std_t)
    test = _with_stats(_build(test_files, chosen, size, resize, mode, workers), mean_t, std_t)
    return ImageSplits(
        dataset,
        train,
        test,
        train_files.classes,
        size,
        tuple(mean_t),
        tuple(std_t),
        chosen,
        stats,
        {"train": train_files.layout, "test": test_files.layout},
        str(root),
        str(test_dir),
    )


def _build(files: ImageFiles, storage: str, size: Size, resize: bool, mode: str, workers: int | None) -> ImageSet:
    if storage == "stream":
        return StreamingImageDataset(
            files.paths,
            files.labels,
            size,
            mode=mode,
            resize=resize,
            classes=files.classes,
            root=files.root.parent,
            workers=workers,
        )
    kw = {"size": size} if resize else {"expect": size}
    x = decode_images(files.paths, mode=mode, workers=workers, **kw)
    return IndexedTensorDataset(x, files.labels, classes=list(files.classes))


def _with_stats(ds: ImageSet, mean: Sequence[float], std: Sequence[float]) -> ImageSet:
    if isinstance(ds, IndexedTensorDataset):
        return IndexedTensorDataset(ds.x, ds.y, mean=mean, std=std, classes=ds.classes)
    return StreamingImageDataset(
        ds.paths,
        ds.y,
        ds.size,
        mode=ds.mode,
        resize=ds.resize,
        mean=mean,
        std=std,
        classes=ds.classes,
        root=ds.root,
        workers=ds.workers,
    )


# --------------------------------------------------------------------------------------------
# Corrupted copies of the test split
# --------------------------------------------------------------------------------------------


def _check_severities(severities: Sequence[int]) -> list[int]:
    sev = list(severities)
    if not sev or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5 for s in sev):
        raise ValueError(f"severities must be a non-empty subset of 1..5, got {list(severities)!r}")
    return sev


def check_corruption_folder(
    root: PathLike,
    test: ImageSet,
    names: Sequence[str],
    severities: Sequence[int],
    *,
    extensions: Sequence[str] = IMG_EXTENSIONS,
) -> dict[tuple[str, int], ImageFiles]:
    """Check a Tiny-ImageNet-C style folder against ``test`` without decoding it: every
    ``<corruption>/<severity>/`` exists, holds exactly the test set's class folders, and every
    image's header says the test set's (H, W). Returns the files of each (name, severity).

    Raises:
        FileNotFoundError: no folder. DataError: naming the folder or file that does not match.
    """
    if test.classes is None:
        raise ValueError("the test set has no class names to match the corruption folder's class folders against")
    names = list(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"names must be a non-empty list of corruption names, got {names!r}")
    found = scan_corruption_folder(root, test.classes, names, _check_severities(severities), extensions=extensions)
    want = tuple(test.image_shape[1:])
    for files in found.values():
        sizes = probe_sizes(files.paths)
        common_size(files.paths, sizes, want, " (the test set's); expected the corrupted copies of its images")
    return found


def load_corruption_folder(
    root: PathLike,
    test: ImageSet,
    names: Sequence[str],
    severities: Sequence[int],
    *,
    lazy: bool = True,
    extensions: Sequence[str] = IMG_EXTENSIONS,
    workers: int | None = None,
) -> Mapping[tuple[str, int], ImageSet]:
    """Tiny-ImageNet-C: ``root/<corruption>/<severity>/<wnid>/*.JPEG``, one set per (corruption,
    severity), labelled with the test set's label map and normalised with its mean/std; in
    memory when ``test`` is, else streamed. Everything is checked first
    (:func:`check_corruption_folder`); with ``lazy`` each set is decoded when it is looked up
    (Tiny-ImageNet-C is 75 sets of 10,000 images: 9.2 GB of uint8 at once).
    """
    check_workers(workers)
    found = check_corruption_folder(root, test, names, severities, extensions=extensions)
    mode = "L" if test.image_shape[0] == 1 else "RGB"
    size = tuple(test.image_shape[1:])

    def build(key: tuple[str, int]) -> ImageSet:
        files = found[key]
        if isinstance(test, StreamingImageDataset):
            return _with_stats(_build(files, "stream", size, False, mode, workers), test.mean, test.std)
        x = decode_images(files.paths, mode=mode, expect=size, workers=workers)
        return IndexedTensorDataset(x, files.labels, mean=test.mean, std=test.std, classes=test.classes)

    if lazy:
        return LazyMapping(list(found), build)
    return {k: build(k) for k in found}


def spatial_scale_for(image_shape: Sequence[int]) -> float:
    """Scale of the generated corruptions' pixel-unit parameters for (C, H, W) images:
    min(H, W) / 32 (CIFAR-10-C's are for 32 px; 2.0 for Tiny-ImageNet's 64 px)."""
    return min(int(image_shape[1]), int(image_shape[2])) / CORRUPTION_BASE_SIZE


def corrupted_test_sets(
    test: ImageSet,
    names: Sequence[str],
    severities: Sequence[int],
    corruption_root: PathLike | None = None,
    *,
    seed: int = 0,
    lazy: bool = False,
    workers: int | None = None,
) -> Mapping[tuple[str, int], ImageSet]:
    """{(name, severity): corrupted copy of ``test``}: read from ``corruption_root`` (a
    Tiny-ImageNet-C style folder, :func:`load_corruption_folder`) when given, else generated
    by :func:`sbfast.data.make_corrupted_sets` with ``spatial_scale`` = :func:`spatial_scale_for`
    (a streamed test set is decoded into memory for this)."""
    if corruption_root is not None:
        return load_corruption_folder(corruption_root, test, names, severities, lazy=lazy, workers=workers)
    clean = test.materialize() if isinstance(test, StreamingImageDataset) else test
    scale = spatial_scale_for(clean.image_shape)
    return make_corrupted_sets(clean, list(names), _check_severities(severities), seed, spatial_scale=scale, lazy=lazy)
