"""Checks made before anything is trained: the config, the device, the model, the data, the
corruption folder and the output folder. Each failure is one :class:`CliError` line naming the
value and what was expected, so a bad argument costs seconds, not a training run."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sbfast.cli.errors import CliError
from sbfast.cli.flags import flag_name
from sbfast.train.config import TrainConfig

# What reading a data file can raise besides CliError: missing files, unreadable or corrupt
# contents (sbfast.data's DataError is a ValueError), permissions.
_DATA_ERRORS = (FileNotFoundError, NotADirectoryError, PermissionError, ValueError, TypeError, OSError, EOFError)


def build_config(fields: Mapping[str, Any]) -> TrainConfig:
    """``TrainConfig(**fields)``, its ValueError/TypeError as one CliError line that starts with
    the flag of the field it names (the config's messages name fields, the user typed flags)."""
    try:
        return TrainConfig(**dict(fields))
    except (ValueError, TypeError) as e:
        raise CliError(_with_flag(str(e))) from None


def _with_flag(message: str) -> str:
    import re

    found = [
        (m.start(), f.name)
        for f in dataclasses.fields(TrainConfig)
        if (m := re.search(rf"(?<![\w-]){f.name}(?![\w-])", message))
    ]
    if not found:
        return message
    return f"{flag_name(min(found)[1])}: {message}"


def check_device(config: TrainConfig) -> torch.device:
    try:
        return config.check_device()
    except ValueError as e:
        raise CliError(f"{flag_name('device')} {config.device}: {e}; expected cpu or an existing cuda device") from None


# A member in training holds at least its weights, their gradients and the momentum buffer.
TRAINING_COPIES = 3


def memory_bytes(device: torch.device) -> int | None:
    """The memory of the device a run trains on (CPU: the machine's RAM; CUDA: the GPU's), or
    None where it cannot be read. A model that needs more cannot train there at all."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def check_model(config: TrainConfig, data: Any) -> None:
    """Build one member on the meta device (no memory, no initialisation cost) so that a bad
    model name or keyword (``{"width": 0}``) fails here and not in the first epoch; then check
    that it fits the device (its parameter bytes, times ``TRAINING_COPIES``, against the
    device's memory) and that it takes this data's images (one forward of a meta batch)."""
    from sbfast.train.run_state import build_member

    where = f"{flag_name('model')} {config.model} with {flag_name('model_kwargs')} {json.dumps(config.model_kwargs)}"
    try:
        with torch.device("meta"):
            model = build_member(config, data, 0, torch.device("meta"))
    except (ValueError, TypeError, RuntimeError) as e:
        raise CliError(f"{where}: {e}") from None
    numel = sum(p.numel() for p in model.parameters())
    need = TRAINING_COPIES * numel * torch.empty((), dtype=config.torch_dtype).element_size()
    device = config.resolved_device()
    have = memory_bytes(device)
    if have is not None and need > have:
        raise CliError(
            f"{where}: {numel:.3g} parameters; training one member needs at least {_gb(need)} ({TRAINING_COPIES} "
            f"copies in {config.dtype}: weights, gradients, momentum) and {device.type} has {_gb(have)}; expected a "
            "smaller model"
        )
    shape = tuple(data.train.image_shape)
    try:
        model(torch.empty((2, *shape), device="meta", dtype=config.torch_dtype))
    except (ValueError, TypeError, RuntimeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliError(
            f"{where}: does not take this data's images ({config.dataset}: {list(shape)}, channels first): {first}"
        ) from None


def check_threads(config: TrainConfig) -> None:
    from sbfast.train.config import check_num_threads

    try:
        check_num_threads(config.num_threads)
    except ValueError as e:
        raise CliError(f"{flag_name('num_threads')} {config.num_threads}: {e}") from None


def load_checked_data(config: TrainConfig) -> Any:
    """``load_data(config)``; a missing or unreadable data folder is one CliError line."""
    from sbfast.train.data import load_data

    try:
        return load_data(config)
    except _DATA_ERRORS as e:
        where = f"{flag_name('data_root')} {config.data_root}" if config.data_root else f"dataset {config.dataset}"
        raise CliError(f"{where}: {e}") from None


def check_corruption_root(config: TrainConfig, data: Any) -> None:
    """The corruption folder holds every requested corruption (headers read, shapes checked)
    and its images have the shape of the test set's, so that the OOD evaluation after the last
    epoch cannot fail on it."""
    root = config.corruption_root
    if root is None:
        return
    flag = f"{flag_name('corruption_root')} {root}"
    if not Path(root).is_dir():
        raise CliError(
            f"{flag}: no such folder; expected a CIFAR-10-C/-100-C folder of <corruption>.npy and labels.npy"
        )
    if not config.eval_corruptions:
        raise CliError(
            f"{flag}: no corruptions are evaluated ({flag_name('eval_corruptions')} is empty), so the folder would not be read"
        )
    from sbfast.data import IMAGE_FOLDER_DATASETS, check_corruption_folder, load_cifar_c

    if config.dataset in IMAGE_FOLDER_DATASETS:
        try:
            check_corruption_folder(root, data.test, list(config.eval_corruptions), list(config.eval_severities))
        except _DATA_ERRORS as e:
            raise CliError(f"{flag}: {e}") from None
        return
    try:
        sets = load_cifar_c(root, list(config.eval_corruptions), list(config.eval_severities), lazy=True)
        first = sets[next(iter(sets))]
    except _DATA_ERRORS as e:
        raise CliError(f"{flag}: {e}") from None
    want = tuple(data.test.image_shape)
    if tuple(first.image_shape) != want:
        raise CliError(
            f"{flag}: images of shape {tuple(first.image_shape)}, but the {config.dataset} test set's are {want}; "
            "expected the corrupted copies of this data set's test images"
        )


def check_output_dir(path: Path, *, resume: bool = False, empty: bool = False) -> Path:
    """The output folder can be created and written, and holds no earlier run (unless resuming);
    with ``empty`` (a comparison, whose runs go into sub-folders) it must hold nothing at all.

    Uses ``sbfast.train.check_output_dir`` (the trainer's rules for run folders), then creates
    the folder and writes a probe file, so that an
    unwritable place (``/proc/x``) fails now and not after the first method has trained."""
    from sbfast import train as T
    from sbfast.train.checkpoint import RunFolderLocked, check_unlocked

    flag = f"output folder {str(path)!r}"
    if path.is_dir():
        try:
            check_unlocked(path, "comparison folder" if empty else "run folder")
        except RunFolderLocked as e:
            raise CliError(str(e)) from None
    if empty and path.is_dir() and any(path.iterdir()):
        raise CliError(f"{flag} already holds files (an earlier comparison?); expected a new or empty folder")
    try:
        T.check_output_dir(str(path), resume=resume)
    except (ValueError, OSError) as e:
        raise CliError(str(e)) from None  # the trainer's message names the folder already
    if path.exists() and not path.is_dir():
        raise CliError(f"{flag} is a file; expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".sbfast-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CliError(
            f"{flag} cannot be written ({e.strerror or e}); expected a folder you can create and write"
        ) from None
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """A file the command writes at its end, checked before the work: not a folder, in a folder
    that exists and can be written, and writable itself if it exists."""
    p = Path(path)
    where = f"{flag} {str(path)!r}"
    if p.is_dir():
        raise CliError(f"{where}: is a folder; expected a file name (e.g. {str(p / 'out')!r} plus its extension)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(f"{where}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{where}: folder {str(parent)!r} cannot be written")
    if p.exists() and not os.access(p, os.W_OK):
        raise CliError(f"{where}: the file exists and cannot be written")
    return p


def new_run_dir(parent: str | Path = "runs", prefix: str = "") -> Path:
    """A new folder ``<parent>/<prefix><YYYYmmdd-HHMMSS>`` that no other process has: created
    with ``mkdir(exist_ok=False)``, which is atomic, so two runs started in the same second get
    ``...-HHMMSS`` and ``...-HHMMSS-2``."""
    parent = Path(parent)
    stamp = prefix + time.strftime("%Y%m%d-%H%M%S")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"runs folder {str(parent)!r} cannot be created ({e.strerror or e})") from None
    for k in range(1, 1000):
        path = parent / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise CliError(f"run folder {str(path)!r} cannot be created ({e.strerror or e})") from None
    raise CliError(f"no free run folder name under {str(parent)!r} for {stamp}")


def preflight(configs: Sequence[TrainConfig]) -> Any:
    """Every check that does not need the output folder, for configs that share one data set:
    device, data, model, corruption folder. Returns the loaded ``TrainData`` to train on."""
    first = configs[0]
    for c in configs:
        check_device(c)
        check_threads(c)
    data = load_checked_data(first)
    for c in configs:
        check_model(c, data)
    check_corruption_root(first, data)
    return data


def fit_quick_subsets(fields: dict[str, Any], chosen: set[str]) -> dict[str, Any]:
    """--quick's ``train_subset`` / ``test_subset`` are a smoke run's sizes, not the user's: on an
    image folder with fewer images they become the split's size (the folder is listed, nothing
    decoded). A subset the user chose (flag or --config) is kept, and refused later if too large;
    a folder that cannot be listed is left to the data check, which names what is wrong."""
    from sbfast.data import DataError
    from sbfast.data.layouts import find_split_dirs, scan_class_folders, scan_eval_split
    from sbfast.train.config import IMAGE_FOLDER_DATASETS

    if fields.get("dataset") not in IMAGE_FOLDER_DATASETS or not fields.get("data_root"):
        return fields
    try:
        train_dir, test_dir = find_split_dirs(fields["data_root"])
        train = scan_class_folders(train_dir)
        sizes = {"train_subset": len(train), "test_subset": len(scan_eval_split(test_dir, train.classes))}
    except (OSError, DataError, ValueError):
        return fields
    out = dict(fields)
    for key, n in sizes.items():
        if key not in chosen and out.get(key) is not None and out[key] > n:
            out[key] = n
    return out
