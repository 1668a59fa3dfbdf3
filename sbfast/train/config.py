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
    IMAGE_FOLDER_DATASETS,
    STORAGES,
)
from sbfast.data.images import as_size
from sbfast.distributed.data_parallel import SAM_GRAD_SYNC
from sbfast.distributed.placement import check_spec as check_placement
from sbfast.models import MODEL_NAMES
from sbfast.optim.checks import is_real

METHODS: tuple[str, ...] = ("de", "de_sam", "sharpbalance")
DATASETS: tuple[str, ...] = ("digits", "synthetic", "cifar10", "cifar100", *IMAGE_FOLDER_DATASETS)
FILE_DATASETS: tuple[str, ...] = ("cifar10", "cifar100", *IMAGE_FOLDER_DATASETS)  # read from data_root
BACKENDS: tuple[str, ...] = ("fast", "reference")
BATCHINGS: tuple[str, ...] = ("static", "exact")
LR_SCHEDULES: tuple[str, ...] = ("step", "cosine")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
COMPILE_BACKENDS: tuple[str, ...] = ("inductor", "aot_eager", "eager")
AUG_SEED_OFFSET = 1_000_003  # member j's augmentation generator: seed + j + this (independent of its order)
SHARPNESS_SUBSET_SEED = 0  # the fixed training subset on which each member's mean Fisher score is taken
WORST_CASE_SUBSET_SEED = 13  # the fixed training batches of the reported worst-case sharpness (the release seeds 13)
SUBSET_SEED = 12_345  # train_subset / test_subset: a fixed draw, the same for every method and seed
MAX_DIST_TIMEOUT = 365 * 24 * 3600.0  # a year: torch's process-group timeouts overflow long after, at ~1e13 s

# The CIFAR-10-C families that sbfast.data can generate (frost needs the original's photographs).
DEFAULT_CORRUPTIONS: tuple[str, ...] = tuple(c for c in CIFAR_C_BENCHMARK if c in CORRUPTIONS)


# Per-data-set values of every TrainConfig field left as None. "cifar*" are the public release's
# (docs/algorithm.md, section 1); "digits" is sized so that the three methods run in a few minutes on 2
# CPU cores and still learn (the measurements: docs/design.md, "Measured choices of the presets").
PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(
        model="cnn",
        epochs=40,
        rho=0.2,
        batch_size=64,
        variant="balance",
        augment=True,
        augment_pad=1,
        augment_flip=False,
        eval_corruptions=DEFAULT_CORRUPTIONS,
        eval_severities=(1, 2, 3, 4, 5),
        num_threads=1,
    ),
    "synthetic": dict(
        model="cnn",
        epochs=4,
        rho=0.2,
        batch_size=32,
        variant="balance",
        augment=False,
        augment_pad=1,
        augment_flip=False,
        eval_corruptions=(),
        eval_severities=(1, 2, 3, 4, 5),
        num_threads=1,
    ),
    "cifar10": dict(
        model="resnet18",
        epochs=200,
        rho=0.2,
        batch_size=128,
        variant="boost",
        augment=True,
        augment_pad=4,
        augment_flip=True,
        eval_corruptions=DEFAULT_CORRUPTIONS,
        eval_severities=(1, 2, 3, 4, 5),
        num_threads=None,
    ),
    "cifar100": dict(
        model="resnet18",
        epochs=200,
        rho=0.2,
        batch_size=128,
        variant="balance",
        augment=True,
        augment_pad=4,
        augment_flip=True,
        eval_corruptions=DEFAULT_CORRUPTIONS,
        eval_severities=(1, 2, 3, 4, 5),
        num_threads=None,
    ),
}
# Tiny-ImageNet as the release trains it (utils.create_dataset / create_model, main.py defaults,
# scripts/train's T_d = initial_epochs 100 of 200): 64x64 crop with padding 4 + flip, balance
# selection (boost is CIFAR-10's only), and the release's models/resnet_imgnet.py ResNet18
# (resnet18_tiny: the CIFAR stem, 3x3 stride 1 without max-pool, on 64x64 images; scaled identity
# shortcuts; He init). "folder" shares the preset.
PRESETS["tiny_imagenet"] = dict(PRESETS["cifar100"], model="resnet18_tiny")
PRESETS["folder"] = dict(PRESETS["tiny_imagenet"])

# Sizes of the synthetic set (train, test): a deterministic learnable toy for tests.
SYNTHETIC_SIZES = (512, 256)


def is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def option(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    choices: Sequence[str] | None = None,
    factory: Any = dataclasses.MISSING,
    check: tuple[Any, ...] | None = None,
) -> Any:
    """A TrainConfig field with its help text, for names the accepted values, and what a valid value
    is (``check``: ("int", lo, optional), ("real", lo, hi), ("bool",), or ("bool_or_backend",) for
    a bool or one of ``choices``) in its metadata: the one place the command line's flags and their
    help are generated from, and the one place each field's own validation is read from."""
    meta: dict[str, Any] = {"help": doc}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if check is not None:
        meta["check"] = check
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_field(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Raise ValueError (TypeError for a bool field) unless ``value`` is what the field's metadata
    accepts: one of its ``choices``, or its ``check``."""
    kind, *bounds = meta.get("check", ("choice",) if "choices" in meta else (None,))
    if kind == "choice" and value not in meta["choices"]:
        raise ValueError(f"unknown {name} {value!r}; expected one of {meta['choices']}")
    if kind == "bool_or_backend" and not isinstance(value, bool) and value not in meta["choices"]:
        raise ValueError(f"{name} must be a bool or a torch.compile backend in {meta['choices']}, got {value!r}")
    if kind == "bool" and not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    if kind == "int":
        lo, optional = bounds
        if not (optional and value is None) and (not is_int(value) or value < lo):
            raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    if kind == "real":
        lo, hi = bounds
        if not is_real(value) or not math.isfinite(value) or value < lo or (hi is not None and value > hi):
            span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ValueError(f"{name} must be a finite real number {span}, got {value!r}")


@dataclass
class TrainConfig:
    """Everything one ensemble run depends on. Fields left ``None`` take the data set's preset
    (``PRESETS``) when the config is built, so a built config is complete and self-describing.

    What each field means is written once, in its ``metadata["help"]`` (accepted names in
    ``metadata["choices"]``): ``sbfast train --help`` is generated from it, and
    ``dataclasses.fields(TrainConfig)`` reads it in Python. The reasons behind some values:

    * release defaults (docs/algorithm.md, section 1): lr 0.1, momentum 0.9, weight decay 5e-4, batch
      128, step schedule (x0.1 at int(0.5 E) and int(0.75 E), stepped once per epoch), rho 0.2,
      T_d = 100 of 200 epochs, variant boost on CIFAR-10 and balance on CIFAR-100;
    * digits: batch 64, rho 0.2 (0.05 and 0.2 gave the same accuracies within the test set's
      noise on the digits CNN), crop padding 1 (one pixel of 8 is the shift of 4 of 32) and no
      flip (a mirrored 2, 3, 4, 5, 7 or 9 is not that digit), variant balance;
    * compile: static batching gives torch.compile a handful of fixed shapes (compiled once
      each), exact batching compiles with dynamic shapes; meant for GPUs (on the CPU it costs
      more than it gains: docs/design.md, "Measured choices of the presets");
    * num_threads, digits preset 1: on 8x8 inputs threading costs more than it gains (same
      section of docs/design.md).

    Raises:
        ValueError (or TypeError for a wrong type) naming the field, the value and what was
        expected, on construction.
    """

    method: str = option(
        "sharpbalance",
        "training method: de (plain SGD for every member), de_sam (SAM on every sample), sharpbalance (SAM on"
        " every sample until T_d, then each member on its own subset)",
        choices=METHODS,
    )
    dataset: str = option(
        "digits",
        "data set: digits (embedded 8x8 digits, train 1,257 / test 360), synthetic (a deterministic toy, 512 "
        "/ 256), cifar10, cifar100 (read from data_root, never downloaded)",
        choices=DATASETS,
    )
    data_root: str | None = option(
        None,
        "CIFAR python archive (.tar.gz) or its extracted folder; required for cifar10/cifar100, refused for "
        "digits/synthetic (they read no files)",
    )
    image_size: tuple[int, ...] | None = option(
        None,
        "folder: resize every image to H W (one value: square); default: the one size all images share",
    )
    data_mean: tuple[float, ...] | None = option(
        None, "folder / tiny_imagenet: per-channel mean in [0, 1]; default: computed from train (folder)"
    )
    data_std: tuple[float, ...] | None = option(None, "per-channel std in [0, 1], with data_mean")
    data_storage: str = option(
        "auto",
        "tiny_imagenet / folder: memory (decoded once, on the device), stream (decoded per batch) or auto "
        "(memory when the pixels take <= 1/4 of the free device and host memory)",
        choices=STORAGES,
    )
    corruption_root: str | None = option(
        None,
        "CIFAR-10-C/-100-C folder of <corruption>.npy files and labels.npy; without it the corrupted test "
        "sets are generated in torch",
    )
    train_subset: int | None = option(
        None,
        "train on this many samples only (a fixed draw, the same for every method and seed); default: all",
        check=("int", 1, True),
    )
    test_subset: int | None = option(
        None, "evaluate on this many test samples only (a fixed draw); default: all", check=("int", 1, True)
    )
    model: str | None = option(None, "architecture, a sbfast.models.create_model name", choices=MODEL_NAMES)
    model_kwargs: dict[str, Any] = option(
        factory=dict,
        doc="keyword arguments of the model, a JSON object such as '{\"width\": 8}' on the command line; in_channels "
        "(and image_size for mlp / vit_tiny) are filled from the data when absent",
    )
    members: int = option(3, "ensemble size M (>= 1; DER needs 2)", check=("int", 1, False))
    dtype: str = option("float32", "dtype of the parameters and inputs", choices=tuple(DTYPES))
    epochs: int | None = option(None, "training epochs E (>= 1)", check=("int", 1, False))
    swap_epoch: int | None = option(
        None,
        "T_d (sharpbalance): phase 1, SAM on every sample, is epochs 0..T_d; the members score and select at "
        "the start of epoch T_d + 1, so 0 <= T_d <= E - 2; default min(E // 2, E - 2)",
        check=("int", 0, False),
    )
    rho: float | None = option(None, "SAM radius (>= 0)", check=("real", 0.0, None))
    adaptive: bool = option(False, "adaptive SAM (ASAM): the perturbation is scaled by |w|", check=("bool",))
    ratio: float = option(
        0.5,
        "flat ratio r in [0, 1]: each member's floor(N r) flattest samples become SAM samples of the other members",
        check=("real", 0.0, 1.0),
    )
    variant: str | None = option(
        None,
        "selection of SharpBalance: balance (A_i | R_i), boost (A_i | (R minus R_i)); random and same are the"
        " ablations",
        choices=reference.VARIANTS,
    )
    lr: float = option(0.1, "SGD learning rate", check=("real", 0.0, None))
    momentum: float = option(0.9, "SGD momentum in [0, 1] (no Nesterov, no dampening)", check=("real", 0.0, 1.0))
    weight_decay: float = option(5e-4, "SGD weight decay (L2 added to the gradient)", check=("real", 0.0, None))
    batch_size: int | None = option(None, "training batch size", check=("int", 1, False))
    lr_schedule: str = option(
        "step",
        "learning-rate schedule: step (x0.1 at 50% and 75% of the epochs) or cosine (CosineAnnealingLR over "
        "the epochs)",
        choices=LR_SCHEDULES,
    )
    augment: bool | None = option(
        None,
        "random-crop augmentation of the training images (plus a flip with augment_flip)",
        check=("bool",),
    )
    augment_pad: int | None = option(
        None,
        "padding of the random crop in pixels (digits 1: one pixel of 8 is the shift of 4 of 32)",
        check=("int", 0, False),
    )
    augment_flip: bool | None = option(
        None,
        "random horizontal flip (off for digits: a mirrored 2, 3, 4, 5, 7 or 9 is not that digit)",
        check=("bool",),
    )
    seed: int = option(
        0, "member j uses seed + j for its initialisation, batch order and augmentation", check=("int", 0, False)
    )
    fisher_trials: int = option(
        1, "passes averaged per Fisher score (>= 1; more only helps with augmentation)", check=("int", 1, False)
    )
    scoring_batch_size: int = option(256, "batch size of the Fisher scoring", check=("int", 1, False))
    sharpness_samples: int = option(
        512,
        "training samples (a fixed draw) on which each member's mean Fisher score (fisher_mean) is "
        "reported; 0 skips it",
        check=("int", 0, False),
    )
    worst_case_batches: int = option(
        10,
        "batches of 5 training samples (a fixed draw, test-time transforms) on which each member's "
        "worst-case adaptive l2 sharpness (the paper's, APGD) is reported; 0 skips it",
        check=("int", 0, False),
    )
    worst_case_iters: int = option(10, "APGD iterations of the reported worst-case sharpness", check=("int", 1, False))
    worst_case_rho: float = option(
        0.5, "radius (relative to |w|) of the reported worst-case sharpness", check=("real", 1e-6, None)
    )
    device: str | None = option(None, "cpu, cuda, cuda:1, ...; default: cuda if available, else cpu")
    backend: str = option(
        "fast",
        "fast: the fused optimizer and fast scoring/selection; reference: the plain-PyTorch components in the"
        " same loop",
        choices=BACKENDS,
    )
    batching: str = option(
        "static",
        "static: every phase-2 batch of a member has the same SAM/normal split (static shapes); exact: the "
        "release's random batches",
        choices=BATCHINGS,
    )
    compile: bool | str = option(
        False,
        "torch.compile the model: true = inductor, or a backend name (eager / aot_eager check the tracing "
        "cheaply); meant for GPUs",
        choices=COMPILE_BACKENDS,
        check=("bool_or_backend",),
    )
    cuda_graphs: bool = option(
        False,
        "capture each full-size step as a CUDA graph (CUDA, backend fast, batching static)",
        check=("bool",),
    )
    num_threads: int | None = option(
        None, "torch CPU threads during the run, restored after (0 = leave as they are)", check=("int", 0, True)
    )
    eval_corruptions: tuple[str, ...] | None = option(
        None,
        "corruptions of the out-of-distribution evaluation (none: no OOD evaluation)",
    )
    eval_severities: tuple[int, ...] | None = option(None, "corruption severities, a subset of 1..5")
    eval_every: int = option(
        1, "test accuracy every this many epochs (and always after the last)", check=("int", 1, False)
    )
    eval_batch_size: int = option(1024, "batch size of the evaluation", check=("int", 1, False))
    output_dir: str | None = option(None, "folder the run writes its results to")
    progress: bool = option(True, "progress bars", check=("bool",))
    checkpoint_every: int = option(
        1,
        "write checkpoints/last.pt every this many epochs (0: only at T_d, at the end and when stopped by a signal)",
        check=("int", 0, False),
    )
    resume: str | None = option(None, "run folder to continue from its last good checkpoint (docs/runs.md)")
    from_phase1: str | None = option(
        None,
        "run folder (or phase1.pt) of a compatible de_sam/sharpbalance run: start at T_d + 1 from its phase-1 "
        "checkpoint instead of training phase 1 again",
    )
    placement: str = option(
        "auto",
        "under torchrun: which rank trains which member: auto (members when ranks <= members, else "
        "data-parallel), members, data-parallel, or the rank of each member such as 0,0,1 (a range 0-1 shares "
        "a member data parallel); docs/distributed.md",
    )
    sam_grad_sync: str = option(
        "local",
        "a data-parallel member's SAM perturbation: local (each rank's own gradient, as the release's "
        "processes) or all (the gradient averaged over the member's ranks)",
        choices=SAM_GRAD_SYNC,
    )
    sync_batchnorm: bool = option(
        False,
        "a data-parallel member's BatchNorm normalises with the whole batch's statistics across its ranks",
        check=("bool",),
    )
    dist_timeout: float = option(
        600.0,
        "seconds a distributed exchange waits for a missing rank before the run stops with an error (at most "
        "a year: torch's timeout overflows past it)",
        check=("real", 0.0, MAX_DIST_TIMEOUT),
    )

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

    def _validate_image_fields(self) -> None:
        """image_size, data_mean and data_std: their shapes and values, and only for the data
        sets that read them (elsewhere they would be silently ignored)."""
        for name in ("image_size", "data_mean", "data_std"):
            v = getattr(self, name)
            if v is None:
                continue
            if self.dataset not in IMAGE_FOLDER_DATASETS:
                raise ValueError(
                    f"{name} {v!r} is not read by dataset {self.dataset!r}; it is for {', '.join(IMAGE_FOLDER_DATASETS)}"
                )
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not v:
                raise TypeError(f"{name} must be a non-empty sequence of numbers, got {v!r}")
            if name == "image_size":  # the data layer's rule, so that a config it accepts loads
                setattr(self, name, as_size(tuple(v)))
                continue
            if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in v):
                raise ValueError(f"{name} must be finite numbers, one per channel, got {' '.join(map(str, v))}")
            if name == "data_std" and any(x <= 0 for x in v):
                raise ValueError(f"data_std must be > 0 per channel, got {' '.join(map(str, v))}")
            setattr(self, name, tuple(float(x) for x in v))

    def _validate(self) -> None:
        if not isinstance(self.model_kwargs, Mapping):
            raise TypeError(f"model_kwargs must be a dict, got {type(self.model_kwargs).__name__}")
        self.model_kwargs = dict(self.model_kwargs)
        for f in dataclasses.fields(self):
            check_field(f.name, getattr(self, f.name), f.metadata)
        # what a field's own metadata cannot say: relations between fields, and structured values
        if self.method == "sharpbalance" and self.swap_epoch > self.epochs - 2:
            raise ValueError(
                f"swap_epoch (T_d) must be <= epochs - 2 for sharpbalance: phase 1 is epochs 0..T_d and the "
                f"members score and select at the start of epoch T_d + 1, which must exist; got swap_epoch="
                f"{self.swap_epoch}, epochs={self.epochs}"
            )
        if self.method == "de_sam" and self.swap_epoch > self.epochs - 1:
            raise ValueError(
                f"swap_epoch (T_d) must be <= epochs - 1 for de_sam: its phase1.pt (what a sharpbalance run forks "
                f"from) is written at the end of epoch T_d, which must exist; got swap_epoch={self.swap_epoch}, "
                f"epochs={self.epochs}"
            )
        top = self.seed + (self.members - 1) + AUG_SEED_OFFSET
        if top >= 2**63:
            raise ValueError(
                f"seed must be <= {2**63 - 1 - AUG_SEED_OFFSET - (self.members - 1)} (member j seeds its "
                f"augmentation with seed + j + {AUG_SEED_OFFSET}, which must stay below 2**63), got {self.seed}"
            )
        for name in ("resume", "from_phase1"):  # folders (or a phase1.pt file): paths become str for JSON
            v = getattr(self, name)
            if hasattr(v, "__fspath__"):
                v = v.__fspath__()
                setattr(self, name, v)
            if v is not None and (not isinstance(v, str) or not v):
                raise TypeError(f"{name} must be a path (a non-empty str) or None, got {v!r}")
        if self.resume is not None and self.from_phase1 is not None:
            raise ValueError(
                f"resume and from_phase1 exclude each other: resume continues a run, from_phase1 starts a new one "
                f"(got resume={self.resume!r}, from_phase1={self.from_phase1!r})"
            )
        if self.from_phase1 is not None and self.method not in ("de_sam", "sharpbalance"):
            raise ValueError(
                f"from_phase1 needs a method with a SAM phase 1 (de_sam, sharpbalance), got {self.method!r}"
            )
        check_placement(self.placement, self.members)
        if self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout!r}")
        if self.dataset in FILE_DATASETS and not self.data_root:
            raise ValueError(f"dataset {self.dataset!r} needs data_root (sbfast never downloads data)")
        if self.dataset in ("digits", "synthetic") and self.data_root is not None:
            # a folder given here would otherwise be silently ignored: the run would not use the user's data
            raise ValueError(
                f"data_root {self.data_root!r} is not read by dataset {self.dataset!r} (built in); "
                f"data_root is for {', '.join(FILE_DATASETS)}"
            )
        self._validate_image_fields()
        if isinstance(self.eval_corruptions, str) or not all(isinstance(c, str) for c in self.eval_corruptions):
            raise TypeError(f"eval_corruptions must be a sequence of names, got {self.eval_corruptions!r}")
        unknown = [c for c in self.eval_corruptions if c not in CORRUPTIONS]
        if unknown and self.corruption_root is None:
            raise ValueError(f"unknown corruptions {unknown}; expected names from {CORRUPTIONS}")
        if (
            isinstance(self.eval_severities, str)
            or not self.eval_severities
            or any(not is_int(s) or not 1 <= s <= 5 for s in self.eval_severities)
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
        """ "sgd" (de), "sam" (de_sam; sharpbalance epochs 0..T_d) or "mixed" (sharpbalance after)."""
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


def check_num_threads(n: int | None) -> None:
    """Refuse more CPU threads than this machine has (``os.cpu_count()``): torch would accept
    the number and fail, or crawl, once the threads start."""
    import os

    cpus = os.cpu_count() or 1
    if n is not None and n > cpus:
        raise ValueError(f"num_threads {n}: this machine has {cpus} CPU threads; expected 0 (as they are) to {cpus}")


class thread_limit:
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
