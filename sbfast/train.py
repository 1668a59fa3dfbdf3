"""The ensemble trainer: de, de_sam and SharpBalance end to end (ALGORITHM.md sections 1, 5-7).

``train_ensemble(TrainConfig(...))`` trains M members on one data set, following section 6:

* ``de``: plain SGD for every member, every epoch.
* ``de_sam``: SAM on every sample, every epoch.
* ``sharpbalance``: SAM on every sample in epochs 0..T_d (``swap_epoch``); at the start of epoch
  T_d + 1 every member scores the whole training set (Fisher scores, eval mode, no augmentation),
  the scores [M, N] are shared, ``select_sam_masks`` gives each member its SAM set, and from then
  on every step is a mixed step (section 5).

Then it evaluates the ensemble: member/ensemble accuracy, NLL, ECE, disagreement, DER, EIR on the
test split (``metrics.ensemble_metrics``), accuracy on corrupted test sets (``metrics.ood_metrics``)
and each member's mean Fisher score on a fixed training subset (its sharpness).

What makes it fast (``backend="fast"``):

* the fused ``sbfast.optim.SharpBalanceSAM``, ``sbfast.sharpness.fisher_scores`` and
  ``sbfast.select.select_sam_masks`` (each falls back to ``sbfast.reference`` if its module is not
  importable; ``EnsembleResult.components`` says which ran);
* the data sets live on the training device as tensors; a batch is one gather plus augmentation
  as batched tensor ops with a per-member generator on that device (no DataLoader, no collation);
* no host synchronisation inside an epoch on the static path (losses accumulate on the device);
* ``batching="static"``: in phase 2 each member shuffles its SAM set and its normal set apart and
  zips them into batches of one fixed composition (n_sam, n_normal) proportional to its SAM share;
  the leftover forms a tail of a few batches (usually one, like the release's last partial batch)
  whose shapes are also the same every epoch (``static_batch_plan``, ``StaticBatcher``). So the
  steps see a handful of fixed shapes for the whole phase, which lets ``compile`` (torch.compile
  of the model) and ``cuda_graphs`` (one captured CUDA graph per full-size step) work without
  recompiles or host syncs. ``batching="exact"`` keeps the release's random batches.

``sbfast.reference.train_ensemble`` is the plain twin (reference SAM over torch.optim.SGD, one
DataLoader per member, reference scoring and selection); with ``backend="reference"`` and
``batching="exact"`` the two give the same parameters (tests/test_train.py holds them to it).

Seeds: member j uses ``seed + j`` for its initialisation (``torch.manual_seed`` inside a forked
RNG, so the caller's global RNG is left alone), its batch order (a CPU generator, consumed as the
release's ``RandomSampler`` does) and, offset by ``AUG_SEED_OFFSET``, its augmentation generator.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import RandomSampler

from sbfast import metrics as metrics_mod
from sbfast import reference
from sbfast.data import (
    CIFAR_C_BENCHMARK,
    CORRUPTIONS,
    IndexedTensorDataset,
    augment_batch,
    load_cifar10,
    load_cifar100,
    load_cifar_c,
    load_digits_splits,
    make_corrupted_sets,
    make_loader,
    make_synthetic_images,
    normalize,
)
from sbfast.models import MODEL_NAMES, create_model

METHODS: tuple[str, ...] = ("de", "de_sam", "sharpbalance")
DATASETS: tuple[str, ...] = ("digits", "synthetic", "cifar10", "cifar100")
BACKENDS: tuple[str, ...] = ("fast", "reference")
BATCHINGS: tuple[str, ...] = ("static", "exact")
LR_SCHEDULES: tuple[str, ...] = ("step", "cosine")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
COMPILE_BACKENDS: tuple[str, ...] = ("inductor", "aot_eager", "eager")
AUG_SEED_OFFSET = 1_000_003  # member j's augmentation generator: seed + j + this (independent of its order)
SHARPNESS_SUBSET_SEED = 0  # the fixed training subset on which each member's mean Fisher score is taken
SUBSET_SEED = 12_345  # train_subset / test_subset: a fixed draw, the same for every method and seed

# The CIFAR-10-C families that sbfast.data can generate (frost needs the original's photographs).
DEFAULT_CORRUPTIONS: tuple[str, ...] = tuple(c for c in CIFAR_C_BENCHMARK if c in CORRUPTIONS)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

# Per-data-set values of every TrainConfig field left as None. "cifar*" are the public release's
# (ALGORITHM.md section 1); "digits" is sized so that the three methods run in ~2-4 minutes on 2
# CPU cores and still learn (ensemble accuracy > 90%; measured ~1.5-2 min, 99% ensemble accuracy).
PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(
        model="cnn", epochs=40, rho=0.2, batch_size=64, variant="balance",
        augment=True, augment_pad=1, augment_flip=False,
        eval_corruptions=DEFAULT_CORRUPTIONS, eval_severities=(1, 2, 3, 4, 5), num_threads=1,
    ),
    "synthetic": dict(
        model="cnn", epochs=4, rho=0.2, batch_size=32, variant="balance",
        augment=False, augment_pad=1, augment_flip=False,
        eval_corruptions=(), eval_severities=(1, 2, 3, 4, 5), num_threads=1,
    ),
    "cifar10": dict(
        model="resnet18", epochs=200, rho=0.2, batch_size=128, variant="boost",
        augment=True, augment_pad=4, augment_flip=True,
        eval_corruptions=DEFAULT_CORRUPTIONS, eval_severities=(1, 2, 3, 4, 5), num_threads=None,
    ),
    "cifar100": dict(
        model="resnet18", epochs=200, rho=0.2, batch_size=128, variant="balance",
        augment=True, augment_pad=4, augment_flip=True,
        eval_corruptions=DEFAULT_CORRUPTIONS, eval_severities=(1, 2, 3, 4, 5), num_threads=None,
    ),
}  # fmt: skip

# Sizes of the synthetic set (train, test): a deterministic learnable toy for tests.
SYNTHETIC_SIZES = (512, 256)


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


@dataclass
class TrainConfig:
    """Everything one ensemble run depends on. Fields left ``None`` take the data set's preset
    (``PRESETS``) when the config is built, so a built config is complete and self-describing.

    Method and data:
        method: "de" | "de_sam" | "sharpbalance".
        dataset: "digits" (default: scikit-learn's embedded 8x8 digits, train 1,257 / test 360)
            | "synthetic" (a deterministic toy, 512 / 256) | "cifar10" | "cifar100" (from
            ``data_root``, never downloaded).
        data_root: folder or archive of CIFAR (python version); required for cifar10/100.
        corruption_root: optional CIFAR-10-C / -100-C folder of .npy files; without it the
            corrupted test sets are generated with ``sbfast.data.make_corrupted_sets``.
        train_subset, test_subset: use only this many samples (a fixed draw), for quick runs.
    Model:
        model: a ``sbfast.models.create_model`` name (preset: "cnn" for digits/synthetic,
            "resnet18" for CIFAR). model_kwargs: passed on; ``in_channels`` (and ``image_size``
            for mlp / vit_tiny) are filled from the data when absent.
        members: M >= 1. dtype: "float32" | "float64" (parameters and inputs).
    Optimisation (release defaults, ALGORITHM.md section 1):
        epochs; swap_epoch: T_d, sharpbalance only; phase 1 is epochs 0..T_d and scoring happens at
            the start of epoch T_d + 1, so 0 <= T_d <= epochs - 2 (preset: min(epochs // 2,
            epochs - 2), the release's 100 of 200).
        rho: SAM radius (release 0.2; digits and synthetic presets 0.2 too: on the digits CNN
            0.05 and 0.2 gave the same accuracies within the test set's noise). adaptive: ASAM.
        ratio: flat_ratio r in [0, 1]. variant: "balance" | "boost" | "random" | "same"
            (release: boost on CIFAR-10, balance on CIFAR-100; digits: balance).
        lr 0.1, momentum 0.9, weight_decay 5e-4 (no Nesterov, no dampening), batch_size (release
            128; digits 64). lr_schedule: "step" (x0.1 at int(0.5 E) and int(0.75 E)) or
            "cosine" (CosineAnnealingLR over E epochs), stepped once per epoch.
        augment: random crop with padding ``augment_pad`` (black border) and, if
            ``augment_flip``, a horizontal flip. CIFAR: pad 4 + flip (the release). Digits: pad 1
            (one pixel of 8 is the same relative shift as 4 of 32) and NO flip: a mirrored 2, 3,
            4, 5, 7 or 9 is not that digit.
        seed: member j uses seed + j (init, batch order, augmentation).
    Scoring (sharpbalance and the sharpness analysis):
        fisher_trials (>= 1), scoring_batch_size, sharpness_samples (training samples, a fixed
        draw, on which each member's mean Fisher score is reported; 0 = skip).
    Execution:
        device: "cpu", "cuda", "cuda:1", ...; None = CUDA if available else CPU.
        backend: "fast" (fused optimizer, fast scoring and selection) | "reference" (the
            reference components inside this trainer's loop).
        batching: "static" (fixed SAM/normal counts per batch in phase 2: static shapes) |
            "exact" (the release's random batches, host-synchronising boolean masking).
        compile: torch.compile the model (forward and backward): True = inductor, or a backend
            name from COMPILE_BACKENDS ("eager" / "aot_eager" check the tracing cheaply). Static
            batching gives it a handful of fixed shapes (compiled once each); exact batching
            compiles with dynamic shapes. On CPU the digits CNN compiles in ~70 s and then runs
            no faster than eager: it is meant for GPUs. cuda_graphs: capture each full-size step
            as a CUDA graph (CUDA, backend "fast", batching "static" only).
        num_threads: torch intra-op threads during the run on CPU (restored after); 0 leaves
            them as they are. Digits preset 1: on 8x8 inputs threading costs more than it gains
            (measured 0.16 s vs 0.45-4.3 s per SGD epoch of the digits CNN on a busy 2-core box).
    Evaluation and output:
        eval_corruptions: corruption names (``sbfast.data.CORRUPTIONS``; empty = no OOD);
            eval_severities: subset of 1..5. eval_every: test accuracy every this many epochs
            (and always after the last). eval_batch_size.
        output_dir: where ``save`` writes (optional). progress: tqdm bars.

    Raises:
        ValueError (or TypeError for a wrong type) naming the field, the value and what was
        expected, on construction.
    """

    method: str = "sharpbalance"
    dataset: str = "digits"
    data_root: str | None = None
    corruption_root: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    members: int = 3
    dtype: str = "float32"
    epochs: int | None = None
    swap_epoch: int | None = None
    rho: float | None = None
    adaptive: bool = False
    ratio: float = 0.5
    variant: str | None = None
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int | None = None
    lr_schedule: str = "step"
    augment: bool | None = None
    augment_pad: int | None = None
    augment_flip: bool | None = None
    seed: int = 0
    fisher_trials: int = 1
    scoring_batch_size: int = 256
    sharpness_samples: int = 512
    device: str | None = None
    backend: str = "fast"
    batching: str = "static"
    compile: bool | str = False
    cuda_graphs: bool = False
    num_threads: int | None = None
    eval_corruptions: tuple[str, ...] | None = None
    eval_severities: tuple[int, ...] | None = None
    eval_every: int = 1
    eval_batch_size: int = 1024
    output_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {DATASETS}")
        preset = PRESETS[self.dataset]
        # num_threads: None in the preset means "leave torch alone", so only fill an unset field
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.swap_epoch is None and _is_int(self.epochs):
            self.swap_epoch = max(0, min(self.epochs // 2, self.epochs - 2))
        if self.eval_corruptions is not None and not isinstance(self.eval_corruptions, str):
            self.eval_corruptions = tuple(self.eval_corruptions)
        if self.eval_severities is not None and not isinstance(self.eval_severities, str):
            self.eval_severities = tuple(self.eval_severities)
        self._validate()

    def _validate(self) -> None:
        def choice(name: str, options: Sequence[str]) -> None:
            v = getattr(self, name)
            if v not in options:
                raise ValueError(f"unknown {name} {v!r}; expected one of {tuple(options)}")

        def integer(name: str, lo: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not _is_int(v) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")

        def real(name: str, lo: float, hi: float | None = None) -> None:
            v = getattr(self, name)
            if not _is_real(v) or v < lo or (hi is not None and v > hi):
                rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
                raise ValueError(f"{name} must be a finite real number {rng}, got {v!r}")

        def boolean(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

        choice("method", METHODS)
        choice("model", MODEL_NAMES)
        choice("dtype", tuple(DTYPES))
        choice("variant", reference.VARIANTS)
        choice("lr_schedule", LR_SCHEDULES)
        choice("backend", BACKENDS)
        choice("batching", BATCHINGS)
        if not isinstance(self.model_kwargs, Mapping):
            raise TypeError(f"model_kwargs must be a dict, got {type(self.model_kwargs).__name__}")
        self.model_kwargs = dict(self.model_kwargs)
        integer("members", 1)
        integer("epochs", 1)
        integer("swap_epoch", 0)
        if self.method == "sharpbalance" and self.swap_epoch > self.epochs - 2:
            raise ValueError(
                f"swap_epoch (T_d) must be <= epochs - 2 for sharpbalance: phase 1 is epochs 0..T_d and the "
                f"members score and select at the start of epoch T_d + 1, which must exist; got swap_epoch="
                f"{self.swap_epoch}, epochs={self.epochs}"
            )
        real("rho", 0.0)
        real("ratio", 0.0, 1.0)
        real("lr", 0.0)
        real("momentum", 0.0, 1.0)
        real("weight_decay", 0.0)
        integer("batch_size", 1)
        integer("augment_pad", 0)
        integer("seed", 0)
        integer("fisher_trials", 1)
        integer("scoring_batch_size", 1)
        integer("sharpness_samples", 0)
        integer("train_subset", 1, optional=True)
        integer("test_subset", 1, optional=True)
        integer("num_threads", 0, optional=True)
        integer("eval_every", 1)
        integer("eval_batch_size", 1)
        for name in ("adaptive", "augment", "augment_flip", "cuda_graphs", "progress"):
            boolean(name)
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_BACKENDS:
            raise ValueError(f"compile must be a bool or a torch.compile backend in {COMPILE_BACKENDS}, got {self.compile!r}")
        if self.dataset in ("cifar10", "cifar100") and not self.data_root:
            raise ValueError(f"dataset {self.dataset!r} needs data_root (sbfast never downloads data)")
        if isinstance(self.eval_corruptions, str) or not all(isinstance(c, str) for c in self.eval_corruptions):
            raise TypeError(f"eval_corruptions must be a sequence of names, got {self.eval_corruptions!r}")
        unknown = [c for c in self.eval_corruptions if c not in CORRUPTIONS]
        if unknown and self.corruption_root is None:
            raise ValueError(f"unknown corruptions {unknown}; expected names from {CORRUPTIONS}")
        if isinstance(self.eval_severities, str) or not self.eval_severities or any(
            not _is_int(s) or not 1 <= s <= 5 for s in self.eval_severities
        ):
            raise ValueError(f"eval_severities must be a non-empty subset of 1..5, got {self.eval_severities!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device {self.device!r} is not a torch device string ({e})") from None
        if self.cuda_graphs:
            if self.batching != "static" or self.backend != "fast":
                raise ValueError(
                    "cuda_graphs needs batching='static' and backend='fast' (the exact batches change shape "
                    f"and the reference SAM synchronises with the host); got batching={self.batching!r}, "
                    f"backend={self.backend!r}"
                )
            if self.device is not None and torch.device(self.device).type != "cuda":
                raise ValueError(f"cuda_graphs needs a CUDA device, got device={self.device!r}")

    # -- conveniences ----------------------------------------------------------------------

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def resolved_device(self) -> torch.device:
        """The device the run uses (None: CUDA if available, else CPU)."""
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def check_device(self) -> torch.device:
        """``resolved_device()``, or ValueError if this machine does not have it."""
        dev = self.resolved_device()
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} requested but CUDA is not available")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"device {self.device!r} requested but CUDA has {torch.cuda.device_count()} device(s)")
        elif dev.type != "cpu":
            raise ValueError(f"device {self.device!r}: the trainer runs on 'cpu' or 'cuda' devices")
        return dev

    def phase_of(self, epoch: int) -> str:
        """"sgd" (de), "sam" (de_sam; sharpbalance epochs 0..T_d) or "mixed" (sharpbalance after)."""
        if self.method == "de":
            return "sgd"
        if self.method == "de_sam" or epoch <= self.swap_epoch:
            return "sam"
        return "mixed"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_corruptions"] = list(self.eval_corruptions)
        d["eval_severities"] = list(self.eval_severities)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def as_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, Mapping):
        return TrainConfig.from_dict(config)
    raise TypeError(f"config must be a TrainConfig or a dict of its fields, got {type(config).__name__}")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    """The data of a run: train and test splits (no transform) and a cache of corrupted test sets.

    Build with :func:`load_data`; pass the same object to several runs to load once.
    """

    name: str
    train: IndexedTensorDataset
    test: IndexedTensorDataset
    num_classes: int
    corruption_root: str | None = None
    _corrupted: dict[tuple[str, int], IndexedTensorDataset] = field(default_factory=dict, repr=False)

    def corrupted(self, names: Sequence[str], severities: Sequence[int]) -> dict[tuple[str, int], IndexedTensorDataset]:
        """{(name, severity): corrupted copy of ``test``}; built (or read) once and cached."""
        keys = [(n, int(s)) for n in names for s in severities]
        missing = [k for k in keys if k not in self._corrupted]
        if missing:
            miss_names = list(dict.fromkeys(k[0] for k in missing))
            miss_sev = sorted({k[1] for k in missing})
            if self.corruption_root is not None:
                stats = dict(mean=self.test.mean, std=self.test.std) if self.test.mean is not None else {}
                sets = load_cifar_c(self.corruption_root, miss_names, miss_sev, lazy=False, **stats)
            else:
                sets = make_corrupted_sets(self.test, miss_names, miss_sev, seed=0)
            for k in missing:
                self._corrupted[k] = sets[k]
        return {k: self._corrupted[k] for k in keys}


def _fixed_subset(ds: IndexedTensorDataset, n: int | None) -> IndexedTensorDataset:
    if n is None or n >= len(ds):
        return ds
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(SUBSET_SEED))
    return ds.subset(perm[:n].sort().values)


def load_data(config: TrainConfig) -> TrainData:
    """Train and test splits of ``config.dataset`` (digits' validation split is not used)."""
    config = as_config(config)
    if config.dataset == "digits":
        splits = load_digits_splits(seed=0)
        train, test = splits["train"], splits["test"]
    elif config.dataset == "synthetic":
        n_train, n_test = SYNTHETIC_SIZES
        full = make_synthetic_images(n_train + n_test, 10, (1, 8, 8), seed=0)
        train, test = full.subset(range(n_train)), full.subset(range(n_train, n_train + n_test))
    else:
        loader = load_cifar10 if config.dataset == "cifar10" else load_cifar100
        train, test = loader(config.data_root, train=True), loader(config.data_root, train=False)
    train = _fixed_subset(train, config.train_subset)
    test = _fixed_subset(test, config.test_subset)
    num_classes = max(train.num_classes, test.num_classes)
    return TrainData(config.dataset, train, test, num_classes, corruption_root=config.corruption_root)


class DeviceData:
    """A data set's tensors on the training device, and batch fetching as one gather.

    ``fetch(idx)`` is exactly ``IndexedTensorDataset.__getitem__(idx)``'s x (uint8 -> /255 ->
    normalise, float storage as is), computed on the device, in float32; callers cast after
    augmentation, in the same order as the reference's loader, so the values are the same bits.
    """

    def __init__(self, ds: IndexedTensorDataset, device: torch.device) -> None:
        self.n = len(ds)
        self.x = ds.x.to(device)
        self.y = ds.y.to(device)
        self.mean, self.std = ds.mean, ds.std
        self.device = device

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.x[idx]
        if raw.dtype == torch.uint8:
            x = raw.to(torch.float32).div_(255.0)
            if self.mean is not None:
                x = normalize(x, self.mean, self.std)
        else:
            x = raw
        return x, self.y[idx]

    def slices(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.n, batch_size):
            yield self.fetch(torch.arange(start, min(start + batch_size, self.n), device=self.device))


class DeviceBatches:
    """Re-iterable (index, x float32, y) batches of a :class:`DeviceData` in sample order, all on
    its device: what a scorer's loader yields, without a DataLoader."""

    def __init__(self, data: DeviceData, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size

    def __len__(self) -> int:
        return -(-self.data.n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, self.data.n, self.batch_size):
            idx = torch.arange(start, min(start + self.batch_size, self.data.n), device=self.data.device)
            x, y = self.data.fetch(idx)
            yield idx, x, y


def augment_fill(ds: IndexedTensorDataset) -> float | tuple[float, ...]:
    """Border value of the crop: normalised black, as ``RandomCropFlip`` (the release pads raw pixels)."""
    if ds.mean is not None and ds.std is not None:
        return tuple(-m / s for m, s in zip(ds.mean, ds.std, strict=True))
    return 0.0


def member_seeds(config: TrainConfig, j: int) -> dict[str, int]:
    """Seeds of member j: model init, batch order, augmentation."""
    s = config.seed + j
    return {"init": s, "order": s, "augment": s + AUG_SEED_OFFSET}


def release_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """One epoch's sample order as the release's shuffled DataLoader draws it.

    ``RandomSampler(generator=g)`` calls ``randperm(n, g)`` twice per epoch (the second for a
    zero-length tail), so the generator must be consumed the same way to reproduce its batches.
    """
    return torch.tensor(list(RandomSampler(range(n), generator=generator)), dtype=torch.int64)


def build_member(config: TrainConfig, data: TrainData, j: int, device: torch.device) -> nn.Module:
    """Member j's model, initialised from ``torch.manual_seed(seed + j)`` on the CPU (so every
    device starts from the same weights) inside a forked RNG, then moved to ``device``/dtype."""
    kw = dict(config.model_kwargs)
    c, h, _ = data.train.image_shape
    kw.setdefault("in_channels", c)
    if config.model in ("mlp", "vit_tiny"):
        kw.setdefault("image_size", h)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(member_seeds(config, j)["init"])
        model = create_model(config.model, data.num_classes, **kw)
    return model.to(device=device, dtype=config.torch_dtype)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Step: x0.1 at int(0.5 E) and int(0.75 E) (the release's MultiStepLR); cosine over E. Per epoch."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    milestones = [int(config.epochs * 0.5), int(config.epochs * 0.75)]
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


# --------------------------------------------------------------------------------------------
# Static batching for the mixed phase
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StaticPlan:
    """How a member's epoch of phase 2 is cut into batches.

    ``full_batches`` batches of exactly (``n_sam``, ``n_normal``) samples (n_sam + n_normal =
    batch size), then ``tail``: the leftover of both parts, as a few batches of at most the batch
    size each, listed as (n_sam, n_normal). Every sample is in exactly one batch per epoch.
    """

    n_sam: int
    n_normal: int
    full_batches: int
    tail: tuple[tuple[int, int], ...]

    @property
    def batch_size(self) -> int:
        return self.n_sam + self.n_normal

    @property
    def num_batches(self) -> int:
        return self.full_batches + len(self.tail)


def static_batch_plan(n_sam: int, n_normal: int, batch_size: int) -> StaticPlan:
    """Pick the per-batch composition of a member's phase-2 batches.

    Among compositions (k, b - k) with b = min(batch_size, N), take the one that fills the most
    full batches F = min(n_sam // k, n_normal // (b - k)) (a part with 0 per batch does not
    limit F), ties to the k closest to b * n_sam / N. The maximum is always at floor or ceil of
    b * n_sam / N, so the full batches carry the member's SAM share to within one sample. The
    leftover N - F b forms the tail: t = ceil(leftover / b) batches of near-equal size, each with
    a near-equal share of the leftover SAM samples. With the release's batch of 128 the tail is
    about one batch (the analogue of the release's last partial batch); with tiny batches and a
    share far from a multiple of 1/b it can be many batches of another composition (b = 4 and a
    20% share: 4 of every 5 batches are (1, 3), the rest (0, 4)), which ``StaticBatcher``
    interleaves with the full ones. Every sample is used once per epoch, so an epoch's summed
    gradient is the release's; per batch, the expected gradient matches random batches up to
    the rounding of the SAM share. The shapes are the same every epoch (a handful in all), so
    compiled code and captured graphs are reused.
    """
    for name, v in (("n_sam", n_sam), ("n_normal", n_normal)):
        if not _is_int(v) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n = n_sam + n_normal
    if n == 0:
        raise ValueError("no samples to batch (n_sam + n_normal = 0)")
    b = min(batch_size, n)
    target = b * n_sam / n
    best: tuple[int, float, int] | None = None
    for k in range(b + 1):
        f_s = n_sam // k if k else n  # n bounds every F, standing in for infinity
        f_n = n_normal // (b - k) if b - k else n
        f = min(f_s, f_n, n // b)
        key = (-f, abs(k - target), k)
        if best is None or key < best:
            best = key
    assert best is not None
    f, k = -best[0], best[2]
    rs, rn = n_sam - f * k, n_normal - f * (b - k)
    left = rs + rn
    tail: list[tuple[int, int]] = []
    if left:
        t = -(-left // b)
        for i in range(t):
            # batch i holds positions [lo, hi) of the leftover laid out with its SAM samples evenly
            # spaced (position q is SAM where floor(q rs / left) steps up), so 0 <= s <= hi - lo
            lo, hi = left * i // t, left * (i + 1) // t
            s = rs * hi // left - rs * lo // left
            tail.append((s, hi - lo - s))
    return StaticPlan(k, b - k, f, tuple(tail))


class StaticBatcher:
    """Per epoch: shuffle a member's SAM indices and normal indices separately and zip them into
    batches of ``plan`` (:func:`static_batch_plan`), then visit the batches in a random order, so
    the tail batches (other compositions) do not all come at the end of the epoch.

    Args:
        sam_idx, normal_idx: int64 [n_sam], [n_normal] sample indices (disjoint).
        batch_size: the run's batch size. generator: CPU generator for the shuffles.
        device: where the yielded index tensors live (moved once per epoch).
    Yields (per ``epoch()``): (sam indices [k_s], normal indices [k_n]) per batch.
    """

    def __init__(
        self,
        sam_idx: torch.Tensor,
        normal_idx: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ) -> None:
        self.sam_idx = sam_idx.detach().to("cpu", torch.int64)
        self.normal_idx = normal_idx.detach().to("cpu", torch.int64)
        self.plan = static_batch_plan(len(self.sam_idx), len(self.normal_idx), batch_size)
        self.generator = generator
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.plan.num_batches

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = self.generator
        sam = self.sam_idx[torch.randperm(len(self.sam_idx), generator=g)].to(self.device, non_blocking=True)
        nor = self.normal_idx[torch.randperm(len(self.normal_idx), generator=g)].to(self.device, non_blocking=True)
        p = self.plan
        cuts = [(i * p.n_sam, p.n_sam, i * p.n_normal, p.n_normal) for i in range(p.full_batches)]
        s0, n0 = p.full_batches * p.n_sam, p.full_batches * p.n_normal
        for ks, kn in p.tail:
            cuts.append((s0, ks, n0, kn))
            s0, n0 = s0 + ks, n0 + kn
        for i in (torch.randperm(len(cuts), generator=g).tolist() if p.tail else range(len(cuts))):
            s, ks, n, kn = cuts[i]
            yield sam[s : s + ks], nor[n : n + kn]


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------

Forward = Callable[[torch.Tensor], torch.Tensor]


def sgd_step(forward: Forward, opt: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain SGD on the batch mean loss through the optimizer's ``third_step`` (no normal_step
    before it: the base update on the current gradients). Returns the loss (0-d, on device)."""
    opt.zero_grad()
    loss = F.cross_entropy(forward(x), y)
    loss.backward()
    opt.third_step(zero_grad=True)
    return loss.detach()


def sam_step(forward: Forward, opt: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SAM on every sample (section 2): two forward/backward passes. Returns the loss at w."""
    opt.zero_grad()
    loss = F.cross_entropy(forward(x), y)
    loss.backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(forward(x), y).backward()
    opt.second_step(zero_grad=True)
    return loss.detach()


def mixed_step_static(
    forward: Forward,
    opt: Any,
    xn: torch.Tensor,
    yn: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
) -> torch.Tensor:
    """Section 5 on a batch already split into its normal part (xn, yn) and SAM part (xs, ys).

    The weights |Nb|/b and |S|/b come from the shapes, so nothing reads device memory: the step
    is free of host synchronisation and, at fixed shapes, capturable. The arithmetic is
    ``reference.mixed_step``'s, operation for operation. Returns the batch mean loss at w.
    """
    k_n, k_s = yn.shape[0], ys.shape[0]
    b = k_n + k_s
    opt.zero_grad()
    total = None
    if k_n > 0:
        loss_n = F.cross_entropy(forward(xn), yn) * (k_n / b)
        loss_n.backward()
        total = loss_n.detach()
        opt.normal_step(zero_grad=True)
    if k_s > 0:
        loss_s = F.cross_entropy(forward(xs), ys)
        loss_s.backward()
        part = loss_s.detach() * (k_s / b)
        total = part if total is None else total + part
        opt.first_step(zero_grad=True)
        (F.cross_entropy(forward(xs), ys) * (k_s / b)).backward()
        opt.second_step(zero_grad=True)
    else:
        opt.third_step(zero_grad=True)
    assert total is not None
    return total


def mixed_step_exact(forward: Forward, opt: Any, x: torch.Tensor, y: torch.Tensor, sam_mask: torch.Tensor) -> torch.Tensor:
    """Section 5 on a random batch with a per-sample mask (the release's batches): one host sync
    per boolean index, as ``reference.mixed_step``."""
    sam_mask = sam_mask.to(x.device)
    return mixed_step_static(forward, opt, x[~sam_mask], y[~sam_mask], x[sam_mask], y[sam_mask])


class _GraphedStep:
    """One CUDA graph per input shape for a step function whose inputs are tensors.

    Warm-up steps run eagerly on a side stream (they are real training steps), then the step is
    captured once per shape and replayed; inputs are copied into static buffers first. The graph
    is dropped when ``key`` (the learning rates, which an optimizer may bake in) changes.
    """

    WARMUP = 3

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.warm: dict[tuple, int] = {}
        self.key: Any = None
        self.captures = 0

    def __call__(self, key: Any, *inputs: torch.Tensor) -> torch.Tensor:
        if key != self.key:
            self.graphs.clear()
            self.key = key
        shape = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self.graphs.get(shape)
        if entry is None:
            if self.warm.get(shape, 0) < self.WARMUP:
                self.warm[shape] = self.warm.get(shape, 0) + 1
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    out = self.fn(*inputs)
                torch.cuda.current_stream().wait_stream(stream)
                return out
            static_in = [t.clone() for t in inputs]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(*static_in)
            self.graphs[shape] = entry = (graph, static_in, static_out)
            self.captures += 1
            # capture records but does not run: replay below does this step's work
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs, strict=True):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return static_out.clone()


# --------------------------------------------------------------------------------------------
# Components (fast or reference) and evaluation
# --------------------------------------------------------------------------------------------


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


@dataclass
class Components:
    """The optimizer, scorer and selector a run uses, and their names for the record."""

    make_optimizer: Callable[[nn.Module, TrainConfig], Any]
    fisher: Callable[..., torch.Tensor]
    select: Callable[..., torch.Tensor]
    names: dict[str, str]


def _reference_optimizer(model: nn.Module, config: TrainConfig) -> reference.SAM:
    return reference.SAM(
        model.parameters(), torch.optim.SGD, rho=config.rho, adaptive=config.adaptive,
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
    )  # fmt: skip


def _reference_fisher(
    model: nn.Module, ds: IndexedTensorDataset, *, config: TrainConfig, device: torch.device, progress: bool
) -> torch.Tensor:
    loader = make_loader(ds, config.scoring_batch_size, shuffle=False)
    return reference.fisher_scores(model, loader, trials=config.fisher_trials, device=device, num_samples=len(ds))


def get_components(backend: str) -> Components:
    """The implementations behind ``backend``; fast modules that are not importable fall back to
    the reference with a warning (once per module)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    make_opt: Callable[[nn.Module, TrainConfig], Any] = _reference_optimizer
    fisher: Callable[..., torch.Tensor] = _reference_fisher
    select: Callable[..., torch.Tensor] = reference.select_sam_masks
    names = {"optimizer": "reference.SAM(torch.optim.SGD)", "fisher": "reference.fisher_scores",
             "select": "reference.select_sam_masks"}  # fmt: skip
    if backend == "fast":
        try:
            from sbfast.optim import SharpBalanceSAM

            def make_opt(model: nn.Module, config: TrainConfig) -> Any:
                # nonfinite="skip": no host sync in a step (a non-finite step is skipped on the
                # device and counted; the trainer reports the count per epoch). Under CUDA graphs
                # lr is a device tensor that the LR scheduler fills in place, so replays see it.
                lr: float | torch.Tensor = config.lr
                if config.cuda_graphs:
                    dev = next(model.parameters()).device
                    lr = torch.tensor(config.lr, dtype=torch.float32, device=dev)
                return SharpBalanceSAM(
                    model.parameters(), lr=lr, momentum=config.momentum,
                    weight_decay=config.weight_decay, rho=config.rho, adaptive=config.adaptive,
                    nonfinite="skip",
                )  # fmt: skip

            names["optimizer"] = "sbfast.optim.SharpBalanceSAM"
        except ImportError as e:
            _warn_once(f"sbfast.optim is not available ({e}); the fast trainer uses reference.SAM")
        try:
            from sbfast.sharpness import fisher_scores as fast_fisher

            def fisher(
                model: nn.Module, ds: IndexedTensorDataset, *, config: TrainConfig, device: torch.device, progress: bool
            ) -> torch.Tensor:
                # batches gathered on the scoring device (no per-sample collation, no host copies)
                batches = DeviceBatches(DeviceData(ds, device), config.scoring_batch_size)
                return fast_fisher(
                    model, batches, batch_size=config.scoring_batch_size, device=device,
                    trials=config.fisher_trials, progress=progress, num_samples=len(ds),
                )  # fmt: skip

            names["fisher"] = "sbfast.sharpness.fisher_scores"
        except ImportError as e:
            _warn_once(f"sbfast.sharpness is not available ({e}); the fast trainer uses reference.fisher_scores")
        try:
            from sbfast.select import select_sam_masks as fast_select

            select = fast_select
            names["select"] = "sbfast.select.select_sam_masks"
        except ImportError as e:
            _warn_once(f"sbfast.select is not available ({e}); the fast trainer uses reference.select_sam_masks")
    return Components(make_opt, fisher, select, names)


def _index_split(mask_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sbfast.select import sam_index_split
    except ImportError:
        m = mask_row.bool()
        return torch.nonzero(m).squeeze(1), torch.nonzero(~m).squeeze(1)
    return sam_index_split(mask_row)


@torch.no_grad()
def predict_probs(
    models: Sequence[nn.Module],
    batches: Callable[[], Iterator[torch.Tensor]],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Softmax outputs of every member: float32 [M, n, C] on the CPU.

    ``batches()`` yields float32 inputs on the models' device, in sample order; each member is
    put in eval mode and its mode restored after.
    """
    out = []
    for model in models:
        was = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            parts = [torch.softmax(model(x.to(dtype)), dim=1).float() for x in batches()]
        finally:
            for m, t in was:
                m.training = t
        out.append(torch.cat(parts).cpu())
    return torch.stack(out)


def _accuracies(probs: torch.Tensor, targets: torch.Tensor) -> tuple[list[float], float]:
    t = targets.cpu()
    member = [float((p.argmax(1) == t).double().mean()) for p in probs]
    ens = float((probs.double().mean(0).argmax(1) == t).double().mean())
    return member, ens


def evaluate_ensemble(
    models: Sequence[nn.Module],
    data: TrainData,
    config: TrainConfig,
    device: torch.device,
    fisher: Callable[..., torch.Tensor],
    *,
    test_batches: Callable[[], Iterator[torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Final evaluation: ``metrics`` (ensemble_metrics on the test split), ``ood``
    (ood_metrics over the corrupted test sets, or None), ``sharpness`` (each member's mean Fisher
    score on a fixed training subset of ``sharpness_samples``), the test ``probs`` and timings."""
    dtype = config.torch_dtype
    t0 = time.perf_counter()
    if test_batches is None:
        test_dev = DeviceData(data.test, device)

        def test_batches() -> Iterator[torch.Tensor]:
            return (x for x, _ in test_dev.slices(config.eval_batch_size))

    probs = predict_probs(models, test_batches, dtype)
    metrics = metrics_mod.ensemble_metrics(probs, data.test.y)
    t1 = time.perf_counter()
    ood = None
    if config.eval_corruptions:
        sets = data.corrupted(config.eval_corruptions, config.eval_severities)
        results = {}
        for key, ds in sets.items():
            dd = DeviceData(ds, device)
            p = predict_probs(models, lambda dd=dd: (x for x, _ in dd.slices(config.eval_batch_size)), dtype)
            results[key] = (p, ds.y)
        ood = metrics_mod.ood_metrics(results)
    t2 = time.perf_counter()
    sharpness: list[float] = []
    if config.sharpness_samples > 0:
        n = min(config.sharpness_samples, len(data.train))
        perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(SHARPNESS_SUBSET_SEED))
        sub = data.train.subset(perm[:n].sort().values)
        for model in models:
            s = fisher(model, sub, config=config, device=device, progress=False)
            sharpness.append(float(s.double().mean()))
    t3 = time.perf_counter()
    return {
        "metrics": metrics,
        "ood": ood,
        "sharpness": sharpness,
        "probs": probs,
        "timing": {"eval_test_s": t1 - t0, "eval_ood_s": t2 - t1, "eval_sharpness_s": t3 - t2},
    }


# --------------------------------------------------------------------------------------------
# Callbacks and results
# --------------------------------------------------------------------------------------------


class Callback:
    """Hooks into a run; override what you need. Plain callables are accepted too and are called
    as ``fn(epoch, record)`` at the end of every epoch."""

    def on_train_start(self, config: TrainConfig, models: Sequence[nn.Module]) -> None:
        pass

    def on_epoch_start(self, epoch: int, phase: str) -> None:
        pass

    def on_scores(self, epoch: int, scores: torch.Tensor, masks: torch.Tensor) -> None:
        """Right after scoring and selection (sharpbalance, start of epoch T_d + 1): scores
        float32 [M, N], masks bool [M, N] (True = SAM), both on the CPU."""

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        pass

    def on_train_end(self, result: EnsembleResult) -> None:
        pass


class _CallbackList:
    def __init__(self, callbacks: Sequence[Callback | Callable[[int, dict], Any]] | None) -> None:
        self.items = list(callbacks or [])
        for c in self.items:
            if not isinstance(c, Callback) and not callable(c):
                raise TypeError(f"callbacks must be Callback instances or callables, got {type(c).__name__}")

    def call(self, hook: str, *args: Any) -> None:
        for c in self.items:
            if isinstance(c, Callback):
                getattr(c, hook)(*args)
            elif hook == "on_epoch_end":
                c(*args)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


@dataclass
class EnsembleResult:
    """What a run produced.

    Attributes:
        config: the TrainConfig that ran.
        metrics: ``metrics.ensemble_metrics`` on the test split (member_acc, ensemble_acc,
            ensemble_nll, ece, disagreement, der, eir, ...).
        ood: ``metrics.ood_metrics`` over the corrupted test sets, or None.
        history: one dict per epoch: epoch, phase ("sgd" | "sam" | "mixed"), lr, train_loss [M]
            (mean batch loss at w), test_acc [M] and ensemble_test_acc (None on epochs not
            evaluated), time_s (training, all members), score_s (scoring + selection, the T_d + 1
            epoch only), eval_s, samples_per_s.
        sharpness: mean Fisher score of each member on a fixed training subset.
        scores: float32 [M, N] Fisher scores (sharpbalance), masks: bool [M, N] (True = SAM).
        timing: total_s, train_s, score_s, eval_s and the evaluation's parts.
        components: which optimizer / scorer / selector ran; batching.
        models: the trained members (not serialised). probs: test softmax [M, n, C] (not serialised).
    """

    config: TrainConfig
    metrics: dict[str, Any]
    ood: dict[str, Any] | None
    history: list[dict[str, Any]]
    sharpness: list[float] = field(default_factory=list)
    scores: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    timing: dict[str, float] = field(default_factory=dict)
    components: dict[str, str] = field(default_factory=dict)
    models: list[nn.Module] = field(default_factory=list, repr=False, compare=False)
    probs: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        """One row of the comparison table."""
        m = self.metrics
        return {
            "method": self.config.method,
            "member_acc": m["member_acc_mean"],
            "ensemble_acc": m["ensemble_acc"],
            "nll": m["ensemble_nll"],
            "ece": m["ece"],
            "der": m["der"],
            "eir": m["eir"],
            "ood_acc": self.ood["mean"]["ensemble_acc"] if self.ood else math.nan,
            "sharpness": sum(self.sharpness) / len(self.sharpness) if self.sharpness else math.nan,
            "wall_s": self.timing.get("total_s", math.nan),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tensors as nested lists; NaN stays NaN, as Python's json writes it)."""
        return {
            "config": self.config.to_dict(),
            "metrics": _jsonable(self.metrics),
            "ood": _jsonable(self.ood),
            "history": _jsonable(self.history),
            "sharpness": list(self.sharpness),
            "scores": None if self.scores is None else self.scores.tolist(),
            "masks": None if self.masks is None else self.masks.to(torch.uint8).tolist(),
            "timing": dict(self.timing),
            "components": dict(self.components),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EnsembleResult:
        ood = d.get("ood")
        if ood is not None and "per_severity" in ood:  # JSON turned the int severity keys into str
            ood = dict(ood, per_severity={int(k): v for k, v in ood["per_severity"].items()})
        return cls(
            config=TrainConfig.from_dict(d["config"]),
            metrics=dict(d["metrics"]),
            ood=ood,
            history=list(d["history"]),
            sharpness=list(d.get("sharpness", [])),
            scores=None if d.get("scores") is None else torch.tensor(d["scores"], dtype=torch.float32),
            masks=None if d.get("masks") is None else torch.tensor(d["masks"], dtype=torch.uint8).bool(),
            timing=dict(d.get("timing", {})),
            components=dict(d.get("components", {})),
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """The JSON text; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> EnsembleResult:
        """Read a result written by ``to_json`` (a path, or the JSON text itself)."""
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(path_or_text)
        return cls.from_dict(json.loads(text))

    def table(self) -> str:
        """Plain-text summary: the comparison row, per-member accuracy and sharpness, OOD per severity."""
        lines = [metrics_mod.format_table([self.summary()]), ""]
        members = [
            {"member": j, "test_acc": a, "sharpness": self.sharpness[j] if j < len(self.sharpness) else math.nan,
             "sam_share": float(self.masks[j].double().mean()) if self.masks is not None else math.nan}
            for j, a in enumerate(self.metrics["member_acc"])
        ]  # fmt: skip
        lines += [metrics_mod.format_table(members), ""]
        if self.ood:
            sev = [{"severity": s, **v} for s, v in self.ood["per_severity"].items()]
            lines += ["OOD accuracy per severity", metrics_mod.format_table(sev), ""]
        return "\n".join(lines)

    def save(self, output_dir: str | Path | None = None) -> dict[str, Path]:
        """Write results.json, metrics.txt and plot.png under ``output_dir`` (default
        ``config.output_dir``). Returns {"json", "table", "plot"} -> path."""
        out = Path(output_dir if output_dir is not None else (self.config.output_dir or "."))
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "results.json", "table": out / "metrics.txt", "plot": out / "plot.png"}
        self.to_json(paths["json"])
        paths["table"].write_text(self.table() + "\n")
        plot_results([self], paths["plot"])
        return paths


def plot_results(results: Sequence[EnsembleResult], path: str | Path) -> Path:
    """PNG: left, per-epoch test accuracy of every member (thin) and the ensemble (thick), one
    colour per method, with the T_d + 1 scoring epoch marked; right, bars of ensemble accuracy,
    member accuracy, DER, EIR and OOD accuracy per method."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(results):
        c = colours[i % len(colours)]
        rows = [h for h in r.history if h.get("test_acc") is not None]
        ep = [h["epoch"] for h in rows]
        for j in range(r.config.members):
            ax1.plot(ep, [h["test_acc"][j] for h in rows], color=c, alpha=0.35, linewidth=0.8)
        ax1.plot(ep, [h["ensemble_test_acc"] for h in rows], color=c, linewidth=2.2, label=f"{r.config.method} (ensemble)")
        if r.config.method == "sharpbalance":
            ax1.axvline(r.config.swap_epoch + 1, color=c, linestyle=":", linewidth=1)
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test accuracy")
    ax1.set_title("test accuracy (thin: members; dotted: scoring at T_d + 1)")
    accs = [h["ensemble_test_acc"] for r in results for h in r.history if h.get("ensemble_test_acc") is not None]
    if accs:
        ax1.set_ylim(max(0.0, min(accs[len(accs) // 4 :] or accs) - 0.05), 1.0)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right", fontsize=8)

    names = ["ensemble_acc", "member_acc", "der", "eir", "ood_acc"]
    width = 0.8 / max(1, len(results))
    lowest = 0.0
    for i, r in enumerate(results):
        s = r.summary()
        vals = [s[k] if isinstance(s[k], (int, float)) else math.nan for k in names]
        xs = [k + i * width - 0.4 + width / 2 for k in range(len(names))]
        # NaN (e.g. DER of one member) is drawn as an empty slot labelled "nan"
        bars = ax2.bar(xs, [0.0 if math.isnan(v) else v for v in vals], width, label=r.config.method,
                       color=colours[i % len(colours)])  # fmt: skip
        for b, v in zip(bars, vals, strict=True):
            y = 0.0 if math.isnan(v) else v
            lowest = min(lowest, y)
            ax2.text(b.get_x() + b.get_width() / 2, y, "nan" if math.isnan(v) else f"{v:.3f}", ha="center",
                     va="bottom" if y >= 0 else "top", fontsize=7, rotation=90)  # fmt: skip
    ax2.axhline(0.0, color="black", linewidth=0.6)
    ax2.set_xticks(range(len(names)), ["ens. acc", "member acc", "DER", "EIR", "OOD acc"])
    ax2.set_ylim(min(0.0, lowest * 1.2 - 0.15), max(1.05, ax2.get_ylim()[1] * 1.15))
    ax2.set_title(f"{results[0].config.dataset}, M = {results[0].config.members}")
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# The fast trainer
# --------------------------------------------------------------------------------------------


@dataclass
class _Member:
    index: int
    model: nn.Module  # the module itself (scored, evaluated, returned)
    forward: Forward  # the module or its torch.compile wrapper (training)
    opt: Any
    sched: Any
    order_gen: torch.Generator
    aug_gen: torch.Generator | None
    batcher: StaticBatcher | None = None
    mask: torch.Tensor | None = None  # bool [N] on the device (exact batching)
    loss_sum: torch.Tensor | None = None
    steps: int = 0
    graphs: dict[str, _GraphedStep] = field(default_factory=dict)


class EnsembleTrainer:
    """The fast trainer behind :func:`train_ensemble`, exposed so that single epochs can be run
    and timed (``bench/bench_train.py``). ``run()`` does the whole schedule."""

    def __init__(
        self,
        config: TrainConfig,
        data: TrainData | None = None,
        callbacks: Sequence[Callback | Callable[[int, dict], Any]] | None = None,
    ) -> None:
        self.config = config = as_config(config)
        self.device = config.check_device()
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, the run uses {self.device}")
        self.callbacks = _CallbackList(callbacks)
        self.components = get_components(config.backend)
        if config.cuda_graphs and "SharpBalanceSAM" not in self.components.names["optimizer"]:
            raise ValueError(
                "cuda_graphs needs the fused sbfast.optim.SharpBalanceSAM (the reference SAM synchronises "
                f"with the host in first_step); this run would use {self.components.names['optimizer']}"
            )
        self.data = data if data is not None else load_data(config)
        self.train_dev = DeviceData(self.data.train, self.device)
        self.test_dev = DeviceData(self.data.test, self.device)
        self.fill = augment_fill(self.data.train)
        self.scores: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None
        self.members = [self._make_member(j) for j in range(config.members)]

    # -- setup -----------------------------------------------------------------------------

    def _make_member(self, j: int) -> _Member:
        c = self.config
        model = build_member(c, self.data, j, self.device)
        opt = self.components.make_optimizer(model, c)  # before compile: a fused optimizer may re-home params
        forward: Forward = model
        if c.compile:
            backend = "inductor" if c.compile is True else c.compile
            forward = torch.compile(model, backend=backend, dynamic=True if c.batching == "exact" else False)
        seeds = member_seeds(c, j)
        aug_gen = None
        if c.augment:
            aug_gen = torch.Generator(device=self.device).manual_seed(seeds["augment"])
        return _Member(
            index=j, model=model, forward=forward, opt=opt, sched=make_lr_scheduler(opt, c),
            order_gen=torch.Generator().manual_seed(seeds["order"]), aug_gen=aug_gen,
        )  # fmt: skip

    # -- data ------------------------------------------------------------------------------

    def _batch(self, member: _Member, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.train_dev.fetch(idx)
        if member.aug_gen is not None:
            x = augment_batch(x, member.aug_gen, self.config.augment_pad, flip=self.config.augment_flip, fill=self.fill)
        return x.to(self.config.torch_dtype), y

    # -- steps -----------------------------------------------------------------------------

    def _lr_key(self, member: _Member) -> tuple[float, ...] | None:
        # a float lr may be baked into a capture: re-capture when it changes; a tensor lr is read
        # by the kernels at replay (and float() of it would synchronise), so it needs no key
        if any(isinstance(g["lr"], torch.Tensor) for g in member.opt.param_groups):
            return None
        return tuple(float(g["lr"]) for g in member.opt.param_groups)

    def _run(self, member: _Member, kind: str, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """Run a step, through a CUDA graph when enabled and the batch has the run's full size."""
        full = inputs[0].shape[0] + (inputs[2].shape[0] if kind == "mixed" else 0) == self.config.batch_size
        if not (self.config.cuda_graphs and full):
            return fn(*inputs)
        g = member.graphs.get(kind)
        if g is None:
            g = member.graphs[kind] = _GraphedStep(fn)
        return g(self._lr_key(member), *inputs)

    def train_epoch(self, j: int, phase: str) -> torch.Tensor:
        """One epoch of member j in ``phase`` ("sgd" | "sam" | "mixed"); returns the mean batch
        loss as a 0-d device tensor (no host sync here) and steps the LR scheduler."""
        c = self.config
        m = self.members[j]
        m.model.train()
        fwd, opt = m.forward, m.opt
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        steps = 0
        if phase == "mixed" and c.batching == "static":
            if m.batcher is None:
                raise RuntimeError("mixed phase before selection: call score_and_select() first")
            for sam_idx, nor_idx in m.batcher.epoch():
                x, y = self._batch(m, torch.cat([nor_idx, sam_idx]))
                k_n = nor_idx.shape[0]
                loss = self._run(
                    m, "mixed", lambda a, b, s, t: mixed_step_static(fwd, opt, a, b, s, t),
                    x[:k_n], y[:k_n], x[k_n:], y[k_n:],
                )  # fmt: skip
                total += loss
                steps += 1
        else:
            order = release_order(self.train_dev.n, m.order_gen).to(self.device, non_blocking=True)
            for start in range(0, self.train_dev.n, c.batch_size):
                idx = order[start : start + c.batch_size]
                x, y = self._batch(m, idx)
                if phase == "sgd":
                    loss = self._run(m, "sgd", lambda a, b: sgd_step(fwd, opt, a, b), x, y)
                elif phase == "sam":
                    loss = self._run(m, "sam", lambda a, b: sam_step(fwd, opt, a, b), x, y)
                else:
                    if m.mask is None:
                        raise RuntimeError("mixed phase before selection: call score_and_select() first")
                    loss = mixed_step_exact(fwd, opt, x, y, m.mask[idx])
                total += loss
                steps += 1
        m.sched.step()
        return total / max(steps, 1)

    # -- scoring and selection ---------------------------------------------------------------

    def score_and_select(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member scores the training set (eval mode, no augmentation), the scores [M, N]
        are shared, the masks selected; per member, the static batcher or the exact mask is set.
        Returns (scores float32 [M, N], masks bool [M, N]), both on the CPU."""
        c = self.config
        # a bar per member only where scoring takes a while (it would interleave with the epoch bar)
        progress = c.progress and len(self.data.train) >= 5000
        rows = [
            self.components.fisher(m.model, self.data.train, config=c, device=self.device, progress=progress)
            for m in self.members
        ]
        scores = torch.stack([r.float().to(self.device) for r in rows])
        seeds = [member_seeds(c, j)["init"] for j in range(c.members)]
        masks = self.components.select(scores, c.ratio, c.variant, seeds).bool()
        self.set_masks(masks)
        self.scores = scores.cpu()
        return self.scores, self.masks  # type: ignore[return-value]

    def set_masks(self, masks: torch.Tensor) -> None:
        """Install SAM masks bool [M, N] (also used by the benchmark to skip scoring)."""
        c = self.config
        if masks.shape != (c.members, self.train_dev.n) or masks.dtype != torch.bool:
            raise ValueError(f"masks must be bool [{c.members}, {self.train_dev.n}], got {masks.dtype} {tuple(masks.shape)}")
        masks_dev = masks.to(self.device)
        for m in self.members:
            row = masks_dev[m.index]
            m.mask = row
            if c.batching == "static":
                sam_idx, nor_idx = _index_split(row)
                # the batcher shuffles with the member's own order generator, continuing its stream
                m.batcher = StaticBatcher(sam_idx, nor_idx, c.batch_size, m.order_gen, self.device)
        self.masks = masks.cpu()

    # -- evaluation --------------------------------------------------------------------------

    def test_accuracy(self) -> tuple[list[float], float]:
        probs = predict_probs(
            [m.model for m in self.members],
            lambda: (x for x, _ in self.test_dev.slices(self.config.eval_batch_size)),
            self.config.torch_dtype,
        )
        return _accuracies(probs, self.data.test.y)

    # -- the schedule --------------------------------------------------------------------------

    def run(self) -> EnsembleResult:
        c = self.config
        t_start = time.perf_counter()
        history: list[dict[str, Any]] = []
        self.callbacks.call("on_train_start", c, [m.model for m in self.members])
        n = self.train_dev.n
        bar = _progress(range(c.epochs), c.progress, f"{c.method} [{c.backend}/{c.batching}]")
        train_s = score_s = eval_s = 0.0
        for epoch in bar:
            phase = c.phase_of(epoch)
            self.callbacks.call("on_epoch_start", epoch, phase)
            t0 = time.perf_counter()
            score_time = None
            if c.method == "sharpbalance" and epoch == c.swap_epoch + 1:
                scores, masks = self.score_and_select()
                _sync(self.device)
                score_time = time.perf_counter() - t0
                score_s += score_time
                self.callbacks.call("on_scores", epoch, scores, masks)
            lr = float(self.members[0].opt.param_groups[0]["lr"])
            t1 = time.perf_counter()
            losses = torch.stack([self.train_epoch(j, phase) for j in range(c.members)])
            train_loss = losses.tolist()  # the epoch's one host sync
            t2 = time.perf_counter()
            train_s += t2 - t1
            record: dict[str, Any] = {
                "epoch": epoch, "phase": phase, "lr": lr, "train_loss": train_loss,
                "test_acc": None, "ensemble_test_acc": None, "time_s": t2 - t1,
                "score_s": score_time, "samples_per_s": c.members * n / max(t2 - t1, 1e-12),
            }  # fmt: skip
            skipped = [m.opt.skipped_steps for m in self.members if hasattr(m.opt, "skipped_steps")]
            if skipped:  # the fused optimizer skips non-finite steps on the device and counts them
                record["skipped_steps"] = [int(v) for v in skipped]
            if (epoch + 1) % c.eval_every == 0 or epoch == c.epochs - 1:
                record["test_acc"], record["ensemble_test_acc"] = self.test_accuracy()
            record["eval_s"] = time.perf_counter() - t2
            eval_s += record["eval_s"]
            history.append(record)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(phase=phase, loss=f"{sum(train_loss) / len(train_loss):.3f}",
                                acc=_fmt_acc(record["ensemble_test_acc"]))  # fmt: skip
            self.callbacks.call("on_epoch_end", epoch, record)
        ev = evaluate_ensemble(
            [m.model for m in self.members], self.data, c, self.device, self.components.fisher,
            test_batches=lambda: (x for x, _ in self.test_dev.slices(c.eval_batch_size)),
        )  # fmt: skip
        timing = {"total_s": time.perf_counter() - t_start, "train_s": train_s, "score_s": score_s,
                  "epoch_eval_s": eval_s, **ev["timing"]}  # fmt: skip
        components = dict(self.components.names, batching=c.batching, device=str(self.device))
        if history and sum(history[-1].get("skipped_steps", [])):
            _warn_once(f"{c.method}: steps skipped for non-finite gradients per member: {history[-1]['skipped_steps']}")
        if c.cuda_graphs:
            components["cuda_graph_captures"] = str(sum(g.captures for m in self.members for g in m.graphs.values()))
        result = EnsembleResult(
            config=c, metrics=ev["metrics"], ood=ev["ood"], history=history, sharpness=ev["sharpness"],
            scores=self.scores, masks=self.masks, timing=timing, components=components,
            models=[m.model for m in self.members], probs=ev["probs"],
        )  # fmt: skip
        self.callbacks.call("on_train_end", result)
        return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt_acc(a: float | None) -> str:
    return "-" if a is None else f"{a:.4f}"


def _progress(it: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="epoch", leave=True, dynamic_ncols=True)


class _threads:
    """Set torch's intra-op threads for a block (CPU runs), restoring them after."""

    def __init__(self, n: int | None, device: torch.device) -> None:
        self.n = n if (n and device.type == "cpu") else None
        self.before = torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n is not None:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.n is not None:
            torch.set_num_threads(self.before)


def train_ensemble(
    config: TrainConfig | Mapping[str, Any],
    callbacks: Sequence[Callback | Callable[[int, dict], Any]] | None = None,
    *,
    data: TrainData | None = None,
) -> EnsembleResult:
    """Train an ensemble with ``config.method`` and evaluate it (see the module docstring).

    Args:
        config: a TrainConfig (or a dict of its fields).
        callbacks: Callback instances and/or callables ``fn(epoch, record)`` (epoch end).
        data: a TrainData from :func:`load_data` to reuse across runs (default: loaded here).
    Returns:
        EnsembleResult; also saved under ``config.output_dir`` when that is set.
    Raises:
        ValueError for a bad config or an unavailable device, before anything is trained.
    """
    config = as_config(config)
    device = config.check_device()
    with _threads(config.num_threads, device):
        result = EnsembleTrainer(config, data, callbacks).run()
    if config.output_dir:
        result.save(config.output_dir)
    return result


__all__ = [
    "BACKENDS",
    "BATCHINGS",
    "DATASETS",
    "METHODS",
    "PRESETS",
    "Callback",
    "DeviceData",
    "EnsembleResult",
    "EnsembleTrainer",
    "StaticBatcher",
    "StaticPlan",
    "TrainConfig",
    "TrainData",
    "build_member",
    "evaluate_ensemble",
    "load_data",
    "make_lr_scheduler",
    "mixed_step_exact",
    "mixed_step_static",
    "plot_results",
    "predict_probs",
    "release_order",
    "sam_step",
    "sgd_step",
    "static_batch_plan",
    "train_ensemble",
]
