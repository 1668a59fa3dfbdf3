"""Configuration of a run: ``TrainConfig``, its per-data-set presets and the names it accepts."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sbfast import reference
from sbfast.data import (
    CIFAR_C_BENCHMARK,
    CORRUPTIONS,
)
from sbfast.models import MODEL_NAMES

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


def is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: object) -> bool:
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
        if self.swap_epoch is None and is_int(self.epochs):
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
            if not is_int(v) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")

        def real(name: str, lo: float, hi: float | None = None) -> None:
            v = getattr(self, name)
            if not is_real(v) or v < lo or (hi is not None and v > hi):
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
            not is_int(s) or not 1 <= s <= 5 for s in self.eval_severities
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
