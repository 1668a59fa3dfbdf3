"""What a resumed or forked run may change: the resume rules, phase-1 compatibility, and the
fingerprint that ties a checkpoint to its data."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sbfast.train.config import TrainConfig
from sbfast.train.data import TrainData

# Fields a resume may change. They leave every parameter, score, mask and metric as the
# uninterrupted run would have them:
#   progress, checkpoint_every, output_dir (the folder being resumed), resume: bookkeeping;
#   eval_every: only which epochs' history rows carry a test accuracy (evaluation reads no RNG);
#   data_root, corruption_root: where the same files now live (the training data is checked
#     against the checkpoint's fingerprint; corruption_root may move but not appear or vanish).
# Two more may change the last bits of float roundings, never the computation:
#   num_threads: the CPU intra-op threads (a parallel reduction may add in another order);
#   backend: the fast and reference components compute the same steps (the optimizer state has
#     one layout, torch.optim.SGD's), the fused optimizer bit for bit on CPU; the scorers agree
#     to rounding. Keep both as they were for a bit-exact resume.
#   placement, dist_timeout: where members run under torchrun and how long an exchange waits;
#     a change of placement that would change a data-parallel member's numbers is refused by
#     sbfast.distributed.ensemble.check_resume_placement, against the placement saved in the checkpoint.
# Every other field (model, seeds, schedule, rho, ratio, batching, dtype, compile, ...) is refused.
RESUME_ROUNDING_FIELDS: tuple[str, ...] = ("num_threads", "backend")
RESUME_SAFE_FIELDS: tuple[str, ...] = (
    "progress",
    "checkpoint_every",
    "output_dir",
    "resume",
    "eval_every",
    "data_root",
    "corruption_root",
    "placement",
    "dist_timeout",
    *RESUME_ROUNDING_FIELDS,
)

# Fields that fix phase 1 (epochs 0..T_d): a run may start at T_d + 1 from another run's
# phase1.pt only when these are equal. Epochs is one of them (the LR schedule spans them),
# test_subset too (phase 1's history holds test accuracies). Free: method (de_sam or
# sharpbalance), batching (phase 1 does not use it), ratio, variant, scoring and evaluation.
PHASE1_FIELDS: tuple[str, ...] = (
    "dataset",
    "train_subset",
    "test_subset",
    "model",
    "model_kwargs",
    "members",
    "dtype",
    "epochs",
    "swap_epoch",
    "rho",
    "adaptive",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "lr_schedule",
    "augment",
    "augment_pad",
    "augment_flip",
    "seed",
    "backend",
    "compile",
    "cuda_graphs",
)


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def same_value(a: Any, b: Any) -> bool:
    """Equality of config values as JSON sees them (tuples and lists alike)."""
    return _plain(a) == _plain(b)


def requested_fields(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The fields a caller asked for when resuming: a dict's keys; for a TrainConfig, the fields
    that differ from a default TrainConfig of the same data set (a field left at its default
    cannot be told from one set to its default, so it is taken from the saved run)."""
    if isinstance(config, Mapping):
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return dict(config)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or a dict of its fields, got {type(config).__name__}")
    base = TrainConfig(dataset=config.dataset, data_root=config.data_root)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(config, f.name)
        if f.name in ("dataset", "data_root"):
            if not same_value(v, f.default):
                out[f.name] = v
        elif not same_value(v, getattr(base, f.name)):
            out[f.name] = v
    return out


def resumed_config(
    saved: TrainConfig, requested: Mapping[str, Any], run_dir: str | Path, saved_device: str
) -> TrainConfig:
    """The config a resume runs with: the saved one, with the requested changes that
    ``RESUME_SAFE_FIELDS`` allows, ``output_dir`` set to the resumed folder and ``resume`` None.

    Raises:
        ValueError naming every requested field that would change the result (nothing else runs).
    """
    refused, changes = [], {}
    for k, v in requested.items():
        if k == "resume":
            continue
        if k == "output_dir":
            if v is not None and Path(v) != Path(run_dir):
                refused.append(f"output_dir {v!r} (a resumed run writes into its own folder {str(run_dir)!r})")
            continue
        old = getattr(saved, k)
        if k == "device":
            # an explicit device is fine where it is the kind the run trained on (its generators
            # hold that kind's states); None means the saved choice
            if v is not None and torch.device(v).type != torch.device(saved_device).type:
                refused.append(f"device {saved_device!r} -> {v!r}")
            elif v is not None:
                changes[k] = v
            continue
        if same_value(v, old):
            continue
        if k == "corruption_root" and (v is None) != (old is None):
            refused.append(f"corruption_root {old!r} -> {v!r} (it may move, not appear or vanish)")
        elif k in RESUME_SAFE_FIELDS:
            changes[k] = v
        else:
            refused.append(f"{k} {old!r} -> {v!r}")
    if refused:
        raise ValueError(
            f"cannot resume {run_dir} with changed fields that change the result: {'; '.join(refused)} "
            f"(a resume may change only {', '.join(RESUME_SAFE_FIELDS)})"
        )
    changes["output_dir"] = str(run_dir)
    changes["resume"] = None
    return saved.replace(**changes)


def check_phase1_compatible(source: TrainConfig, config: TrainConfig, path: str | Path) -> None:
    """Whether ``config`` may start at T_d + 1 from ``source``'s phase-1 checkpoint.

    Raises:
        ValueError naming ``path`` and every field that differs (nothing else runs).
    """
    if source.method not in ("de_sam", "sharpbalance"):
        raise ValueError(f"from_phase1 {path}: written by a {source.method!r} run, which has no SAM phase 1")
    diffs = [
        f"{k} {getattr(source, k)!r} there, {getattr(config, k)!r} here"
        for k in PHASE1_FIELDS
        if not same_value(getattr(source, k), getattr(config, k))
    ]
    if diffs:
        raise ValueError(
            f"from_phase1 {path}: phase 1 of that run is not this run's phase 1: {'; '.join(diffs)} "
            f"(these must be equal: {', '.join(PHASE1_FIELDS)})"
        )


def data_fingerprint(data: TrainData) -> str:
    """sha256 (hex) of the run's train and test tensors (values, shapes, dtypes, normalisation):
    what ties a checkpoint to its data when the data's folder moves."""
    h = hashlib.sha256()
    for split in (data.train, data.test):
        for t in (split.x, split.y):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        h.update(repr((split.mean, split.std)).encode())
    h.update(str(data.num_classes).encode())
    return h.hexdigest()


def model_spec(config: TrainConfig, data: TrainData) -> dict[str, Any]:
    """What ``sbfast.models.create_model`` needs to rebuild a member without the data:
    name, num_classes and the keyword arguments, filled from the data as ``build_member`` does."""
    kw = dict(config.model_kwargs)
    c, h, _ = data.train.image_shape
    kw.setdefault("in_channels", c)
    if config.model in ("mlp", "vit_tiny"):
        kw.setdefault("image_size", h)
    return {"name": config.model, "num_classes": int(data.num_classes), "kwargs": kw}
