"""Where the images of an image-folder data set are and what their labels are, found by listing
folders only (no image is opened here), so that a wrong layout fails in a second, not after an
hour of decoding.

Layouts understood (``<wnid>`` is any class-folder name):

* class folders (torchvision ImageFolder's): ``<dir>/<class>/**/<image>``; this covers
  Tiny-ImageNet's ``train/<wnid>/images/*.JPEG`` (official archive) and ``train/<wnid>/*.JPEG``;
* Tiny-ImageNet's official validation split: ``val/images/*.JPEG`` labelled by
  ``val/val_annotations.txt`` (tab-separated ``file  wnid  x0  y0  x1  y1`` lines);
* a data root: ``<root>/train/`` plus ``<root>/val/`` (or ``<root>/test/`` when there is no val);
* Tiny-ImageNet-C: ``<root>/<corruption>/<severity>/<wnid>/*.JPEG``, severities 1..5.

Every problem is one :class:`~sbfast.data.checks.DataError` line naming the folder or file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sbfast.data.checks import DataError

PathLike = str | os.PathLike

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ANNOTATIONS = "val_annotations.txt"


@dataclass(frozen=True)
class ImageFiles:
    """The files of one split and their labels, before anything is decoded.

    Attributes:
        paths: the image files, in the split's order (sample ``i`` is ``paths[i]``).
        labels: int64 [N], ``labels[i]`` indexes ``classes``.
        classes: the label map (class-folder names, e.g. WordNet ids).
        root: the split's folder. layout: "class folders" or "annotations".
    """

    paths: tuple[Path, ...]
    labels: torch.Tensor
    classes: tuple[str, ...]
    root: Path
    layout: str

    def __len__(self) -> int:
        return len(self.paths)


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _images_under(folder: Path, exts: tuple[str, ...]) -> list[Path]:
    # Files with other extensions are skipped: the official train folders hold <wnid>_boxes.txt.
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"no {what} at {str(path)!r}; sbfast never downloads data")


def scan_class_folders(
    root: PathLike,
    classes: Sequence[str] | None = None,
    *,
    extensions: Sequence[str] = IMG_EXTENSIONS,
    reference: str = "classes",
    allow_empty: bool = False,
) -> ImageFiles:
    """``root/<class>/**/<image>``: label = position of ``<class>`` in ``classes``.

    Classes are the sorted sub-folder names, or ``classes`` (the label map of another split: a
    listed class may lack a folder here, a folder not in the list cannot be labelled and is an
    error). Files are found recursively with a case-insensitive extension match and ordered by
    class, then by sorted path, so the index is stable across runs and machines.

    Args:
        reference: what ``classes`` came from, for the error message (e.g. the train folder).
        allow_empty: accept a folder with no images (else an error).
    Raises:
        FileNotFoundError: no folder. DataError: no class folders, a folder absent from
            ``classes``, or no images.
    """
    root = Path(root)
    _require_dir(root, "image folder")
    exts = tuple(e.lower() for e in extensions)
    found = _subdirs(root)
    label_map = list(found if classes is None else classes)
    known = set(label_map)
    unknown = [c for c in found if c not in known]
    if unknown:
        raise DataError(root, f"class folder(s) {unknown[:5]} missing from {reference}")
    if not label_map:
        raise DataError(root, "no class sub-folders; expected <class>/<image> files")
    paths: list[Path] = []
    labels: list[int] = []
    for label, cname in enumerate(label_map):
        cdir = root / cname
        files = _images_under(cdir, exts) if cdir.is_dir() else []
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths and not allow_empty:
        raise DataError(root, f"no images with extensions {exts} in its class folders")
    return ImageFiles(tuple(paths), torch.tensor(labels, dtype=torch.int64), tuple(label_map), root, "class folders")


def scan_annotated_val(
    val_dir: PathLike, classes: Sequence[str], *, extensions: Sequence[str] = IMG_EXTENSIONS, reference: str = "train/"
) -> ImageFiles:
    """Tiny-ImageNet's official validation split: ``val/images/<file>`` labelled by
    ``val/val_annotations.txt``, one ``<file>\\t<wnid>[\\t<box>...]`` line per image.

    Samples are ordered by class (position in ``classes``), then by file name: the order the
    release's class-folder copy of the same split has, so both layouts give the same test set.

    Raises:
        DataError: naming the annotations file and line (too few fields, a class absent from
            ``classes``, a file listed twice or missing from ``images/``), or an image in
            ``images/`` that the file does not label.
    """
    val_dir = Path(val_dir)
    ann = val_dir / ANNOTATIONS
    images = val_dir / "images"
    if not images.is_dir():
        raise DataError(val_dir, f"has {ANNOTATIONS} but no images/ folder; expected val/images/*.JPEG")
    index = {c: i for i, c in enumerate(classes)}
    try:
        text = ann.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(ann, f"cannot read ({type(exc).__name__}: {exc})") from exc
    entries: dict[str, int] = {}
    for k, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise DataError(ann, f"line {k} {line!r}: expected '<file>\\t<class>[\\t<box>]'")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DataError(ann, f"line {k}: class {wnid!r} of {name!r} is not a class folder of {reference}")
        if name in entries:
            raise DataError(ann, f"line {k}: {name!r} is listed twice")
        if not (images / name).is_file():
            raise DataError(ann, f"line {k}: {name!r} is not a file in {images}")
        entries[name] = index[wnid]
    exts = tuple(e.lower() for e in extensions)
    on_disk = _images_under(images, exts)
    unlabelled = [p for p in on_disk if p.relative_to(images).as_posix() not in entries]
    if unlabelled:
        raise DataError(unlabelled[0], f"is not listed in {ann}, so it has no label")
    if not entries:
        raise DataError(ann, "labels no images")
    order = sorted(entries, key=lambda n: (entries[n], n))
    labels = torch.tensor([entries[n] for n in order], dtype=torch.int64)
    return ImageFiles(tuple(images / n for n in order), labels, tuple(classes), val_dir, "annotations")


def scan_eval_split(
    split_dir: PathLike,
    classes: Sequence[str],
    *,
    extensions: Sequence[str] = IMG_EXTENSIONS,
    reference: str = "train/",
) -> ImageFiles:
    """A validation / test folder in either layout: ``val_annotations.txt`` + ``images/`` (the
    official Tiny-ImageNet archive) when the annotations file is there, else class folders named
    as in ``classes``.

    Raises:
        FileNotFoundError: no folder. DataError: neither layout (no annotations file and no class
            folders, or an ``images/`` folder without its annotations file), or the errors of
            :func:`scan_annotated_val` / :func:`scan_class_folders`.
    """
    split_dir = Path(split_dir)
    _require_dir(split_dir, "validation folder")
    if (split_dir / ANNOTATIONS).is_file():
        return scan_annotated_val(split_dir, classes, extensions=extensions, reference=reference)
    sub = _subdirs(split_dir)
    if "images" in sub and "images" not in classes:
        raise DataError(
            split_dir, f"has images/ but no {ANNOTATIONS}; expected that file (official layout) or <class>/ folders"
        )
    if not sub:
        raise DataError(
            split_dir, f"is in neither layout: no {ANNOTATIONS} + images/ and no <class>/ folders of {reference}"
        )
    return scan_class_folders(split_dir, classes, extensions=extensions, reference=reference)


def find_split_dirs(root: PathLike, eval_split: str | None = None) -> tuple[Path, Path]:
    """``(root/train, root/val)`` of a data root, ``root/test`` standing in for a missing ``val``.

    Args:
        eval_split: "val" or "test" to choose; None: val if present, else test.
    Raises:
        FileNotFoundError: no root. DataError: no ``train/``, or no evaluation folder.
    """
    root = Path(root)
    _require_dir(root, "data folder")
    train = root / "train"
    if not train.is_dir():
        hint = [p.name for p in root.iterdir() if p.is_dir() and (p / "train").is_dir()]
        more = f" (its sub-folder {hint[0]}/ has one: pass {str(root / hint[0])!r})" if hint else ""
        raise DataError(root, f"no train/ folder; expected <root>/train/<class>/... images{more}")
    if eval_split not in (None, "val", "test"):
        raise ValueError(f"eval_split must be 'val', 'test' or None, got {eval_split!r}")
    names = [eval_split] if eval_split else ["val", "test"]
    for name in names:
        if (root / name).is_dir():
            return train, root / name
    raise DataError(root, f"no {' or '.join(n + '/' for n in names)} folder next to train/ to evaluate on")


def scan_corruption_folder(
    root: PathLike,
    classes: Sequence[str],
    names: Sequence[str],
    severities: Sequence[int],
    *,
    extensions: Sequence[str] = IMG_EXTENSIONS,
) -> dict[tuple[str, int], ImageFiles]:
    """Tiny-ImageNet-C: ``root/<corruption>/<severity>/<class>/*`` for every requested pair.

    Each severity folder must hold exactly the class folders of ``classes`` (the test set's label
    map), so that a label means the same class in the clean and the corrupted sets.

    Raises:
        FileNotFoundError: no root. DataError: a corruption or severity folder missing, class
            folders that are not the test set's, or a folder with no images.
    """
    root = Path(root)
    _require_dir(root, "corruption folder")
    want = set(classes)
    out: dict[tuple[str, int], ImageFiles] = {}
    for name in names:
        cdir = root / name
        if not cdir.is_dir():
            raise DataError(root, f"no {name}/ folder (has {_subdirs(root)[:8]}); expected <corruption>/<severity>/")
        for s in severities:
            sdir = cdir / str(int(s))
            if not sdir.is_dir():
                raise DataError(cdir, f"no severity folder {int(s)}/ (has {_subdirs(cdir)})")
            found = set(_subdirs(sdir))
            if found != want:
                extra, missing = sorted(found - want), sorted(want - found)
                parts = ([f"classes {extra[:3]} not in the test set"] if extra else []) + (
                    [f"no folders for the test set's classes {missing[:3]}"] if missing else []
                )
                raise DataError(sdir, f"{' and '.join(parts)} ({len(found)} class folders, test set {len(want)})")
            out[(name, int(s))] = scan_class_folders(sdir, classes, extensions=extensions, reference="the test set")
    return out
