"""What a trainer holds and what watches it: its members (built from the config:
initialisation, LR schedule, generators) and its run state (position in the schedule, history,
clocks, scores and masks), each with the part of the checkpoint payload it owns; the hooks
(``Callback``), SIGINT / SIGTERM (``RunInterrupted`` and the handler that defers a signal to the
end of the current training step), ``RunDiverged`` and the epoch progress bar."""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sbfast import reference
from sbfast.distributed.data_parallel import DataParallelOptimizer
from sbfast.models import create_model
from sbfast.train.config import TrainConfig
from sbfast.train.data import StaticBatcher, TrainData, member_seeds
from sbfast.train.steps import Forward, GraphedStep

if TYPE_CHECKING:
    from sbfast.train.results import EnsembleResult

# the run-state entries of a checkpoint payload, in the order the payload has always listed them
RUN_STATE_KEYS: tuple[str, ...] = ("position", "scores", "masks", "history", "clock", "forked_from")


def model_spec(config: TrainConfig, data: TrainData) -> dict[str, Any]:
    """What ``sbfast.models.create_model`` needs to rebuild a member without the data:
    name, num_classes and the keyword arguments, filled from the data as ``build_member`` does."""
    kw = dict(config.model_kwargs)
    c, h, _ = data.train.image_shape
    kw.setdefault("in_channels", c)
    if config.model in ("mlp", "vit_tiny"):
        kw.setdefault("image_size", h)
    return {"name": config.model, "num_classes": int(data.num_classes), "kwargs": kw}


def _initial_model(config: TrainConfig, data: TrainData, seed: int, device: torch.device) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        spec = model_spec(config, data)
        model = create_model(spec["name"], spec["num_classes"], **spec["kwargs"])
    return model.to(device=device, dtype=config.torch_dtype)


def build_member(config: TrainConfig, data: TrainData, j: int, device: torch.device) -> nn.Module:
    """Member j's model, initialised from ``torch.manual_seed(seed + j)`` on the CPU (so every
    device starts from the same weights) inside a forked RNG, then moved to ``device``/dtype."""
    return _initial_model(config, data, member_seeds(config, j)["init"], device)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Step: x0.1 at int(0.5 E) and int(0.75 E) (the release's MultiStepLR); cosine over E. Per epoch."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    milestones = [int(config.epochs * 0.5), int(config.epochs * 0.75)]
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


@dataclass
class Member:
    """One member as a trainer holds it: the model, how it is run, its optimizer and schedule,
    its generators, and in the mixed phase its SAM mask and static batcher."""

    index: int
    model: nn.Module  # the module itself (scored, evaluated, returned)
    forward: Forward  # the module or its torch.compile wrapper (training)
    opt: Any
    sched: Any
    order_gen: torch.Generator
    aug_gen: torch.Generator | None
    batcher: StaticBatcher | None = None
    mask: torch.Tensor | None = None  # bool [N] on the device (exact batching)
    order_start: torch.Tensor | None = None  # order_gen's state before this epoch's draw
    graphs: dict[str, GraphedStep] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        config: TrainConfig,
        data: TrainData,
        j: int,
        device: torch.device,
        plan: Any,
        make_optimizer: Callable[[nn.Module, TrainConfig], Any],
    ) -> Member:
        """Member j as ``plan`` (a ``sbfast.distributed`` plan) trains it: its initial model
        (synchronised BatchNorm where the plan asks), the optimizer from ``make_optimizer``, the
        LR schedule, the optimizer wrapped for data parallel where the plan asks, the model
        compiled when the config says so, and the order / augmentation generators of its seeds."""
        seeds = member_seeds(config, j)
        model = plan.prepare_model(j, _initial_model(config, data, seeds["init"], device))  # before the optimizer
        opt = make_optimizer(model, config)  # before compile: a fused optimizer may re-home params
        sched = make_lr_scheduler(opt, config)
        opt = plan.wrap_optimizer(j, opt)  # a data-parallel member averages its gradients
        forward: Forward = model
        if config.compile:
            backend = "inductor" if config.compile is True else config.compile
            forward = torch.compile(model, backend=backend, dynamic=True if config.batching == "exact" else False)
        aug_gen = torch.Generator(device=device).manual_seed(seeds["augment"]) if config.augment else None
        return cls(
            index=j,
            model=model,
            forward=forward,
            opt=opt,
            sched=sched,
            order_gen=torch.Generator().manual_seed(seeds["order"]),
            aug_gen=aug_gen,
        )

    def state_dict(self, mid_epoch: bool) -> dict[str, Any]:
        """The member's entry of a checkpoint payload (``mid_epoch``: it stopped inside an
        epoch, whose order a resume draws again from the generator's state at the epoch's start)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "order_gen": self.order_start if mid_epoch else self.order_gen.get_state(),
            "aug_gen": self.aug_gen.get_state() if self.aug_gen is not None else None,
            "skipped_steps": getattr(self.opt, "skipped_steps", None),
        }

    def check_state(self, saved: Mapping[str, Any], augment: bool) -> None:
        """Raise ValueError where ``saved`` (a payload's member entry) cannot load into this member."""
        check_same_tensors(self.model.state_dict(), saved["model"], f"member {self.index}")
        if (saved["aug_gen"] is None) != (self.aug_gen is None):
            raise ValueError(
                f"member {self.index}: augmentation generator saved={saved['aug_gen'] is not None}, config augment={augment}"
            )

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Load a payload's member entry (checked by :meth:`check_state` first)."""
        self.model.load_state_dict(saved["model"])
        # a data-parallel wrapper loads its optimizer's layout
        inner = self.opt.optimizer if isinstance(self.opt, DataParallelOptimizer) else self.opt
        self.opt.load_state_dict(optimizer_state_for(inner, saved["optimizer"]))
        self.sched.load_state_dict(saved["scheduler"])
        self.order_gen.set_state(saved["order_gen"])
        if self.aug_gen is not None:
            self.aug_gen.set_state(saved["aug_gen"])
        skipped = getattr(self.opt, "skipped_steps", None)
        if skipped is not None and saved["skipped_steps"] is not None:
            skipped.copy_(saved["skipped_steps"])


@dataclass
class Position:
    """The next thing a run does, and what its unfinished epoch has gathered so far.

    ``member`` members have finished epoch ``epoch`` (their mean losses in ``losses``); member
    ``member`` has done ``step`` steps of it (its running loss sum in ``loss_sum``).
    """

    epoch: int = 0
    member: int = 0
    step: int = 0
    losses: list[torch.Tensor] = field(default_factory=list)
    loss_sum: torch.Tensor | None = None
    lr: float | None = None  # members' lr at the start of the epoch (the history's)
    score_s: float | None = None
    train_s: float = 0.0  # training seconds of this epoch so far

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "member": self.member,
            "step": self.step,
            "losses": list(self.losses),
            "loss_sum": self.loss_sum,
            "lr": self.lr,
            "score_s": self.score_s,
            "train_s": self.train_s,
        }


class RunState:
    """Where a run is and what it has gathered: the position, the history of finished epochs,
    the clocks, the scores and masks of the selection (None before it), the phase-1 checkpoint
    a fork started from, and what the newest ``last.pt`` holds (for the interrupt message).

    ``state_dict`` / ``load_state_dict`` are the payload's ``RUN_STATE_KEYS`` entries.
    """

    def __init__(self) -> None:
        self.position = Position()
        self.history: list[dict[str, Any]] = []
        self.clock = {"train_s": 0.0, "score_s": 0.0, "epoch_eval_s": 0.0, "elapsed_s": 0.0}
        self.scores: torch.Tensor | None = None  # float32 [M, N] on the CPU
        self.masks: torch.Tensor | None = None  # bool [M, N] on the CPU
        self.forked_from: str | None = None  # the phase1.pt this run started from
        self.saved = "no checkpoint yet"  # what last.pt holds
        self.saved_at: tuple[int, int, int] | None = None  # last.pt's position (epoch, member, step)
        self.session_start = time.perf_counter()

    def elapsed(self) -> float:
        """Wall seconds of the run, over every session (a resumed run carries the earlier ones)."""
        return self.clock["elapsed_s"] + time.perf_counter() - self.session_start

    def finish_epoch(self, record: dict[str, Any]) -> None:
        """Append an epoch's record to the history; the position moves to the next epoch's start."""
        self.history.append(record)
        self.position = Position(epoch=record["epoch"] + 1)

    def mark_saved(self, config: TrainConfig) -> None:
        """``last.pt`` now holds the current position."""
        p = self.position
        self.saved, self.saved_at = describe_position(p, config), (p.epoch, p.member, p.step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position.to_dict(),
            "scores": self.scores,
            "masks": self.masks,
            "history": list(self.history),
            "clock": dict(self.clock, elapsed_s=self.elapsed()),
            "forked_from": self.forked_from,
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device, config: TrainConfig, fork: bool) -> None:
        """Take a payload's run state (``fork``: another run's phase 1, whose clocks are not
        carried: the run's timing counts its own work). The masks' installation on the members
        is the trainer's."""
        self.masks = state["masks"].bool().cpu() if state["masks"] is not None else None
        self.scores = state["scores"] if state["masks"] is not None else None
        self.history = [dict(r) for r in state["history"]]
        pos = dict(state["position"])
        pos["losses"] = [t.to(device) for t in pos["losses"]]
        if pos["loss_sum"] is not None:
            pos["loss_sum"] = pos["loss_sum"].to(device)
        self.position = Position(**pos)
        self.forked_from = state.get("forked_from")
        if not fork:
            self.clock = {k: float(v) for k, v in state["clock"].items()}
            self.saved = describe_position(self.position, config)


def optimizer_state_for(opt: Any, state: Mapping[str, Any]) -> dict[str, Any]:
    """A saved optimizer state in the layout ``opt`` loads. Checkpoints hold torch.optim.SGD's
    layout (what ``SharpBalanceSAM.state_dict`` gives); ``reference.SAM`` keeps momentum in its
    base optimizer, so it gets the state there (and ``SharpBalanceSAM`` reads a reference SAM's
    ``base_optimizer`` entry itself)."""
    state = dict(state)
    if len(state["param_groups"]) == len(opt.param_groups):
        # keys the other optimizer has and the saved groups lack (torch.optim.SGD's "fused",
        # "foreach", ...) keep the loading optimizer's values
        state["param_groups"] = [
            {**{k: v for k, v in cur.items() if k != "params"}, **saved}
            for cur, saved in zip(opt.param_groups, state["param_groups"], strict=True)
        ]
    if isinstance(opt, reference.SAM) and "base_optimizer" not in state:
        groups = state["param_groups"]
        return {
            "state": {},
            "param_groups": groups,
            "base_optimizer": {"state": state["state"], "param_groups": groups},
        }
    return state


def describe_position(p: Position, c: TrainConfig) -> str:
    if p.member == 0 and p.step == 0:
        return (
            "the checkpoint at the end of training"
            if p.epoch >= c.epochs
            else f"the checkpoint at the end of epoch {p.epoch - 1}"
        )
    return f"the checkpoint in epoch {p.epoch} (member {p.member}, step {p.step})"


def check_same_tensors(expected: Mapping[str, torch.Tensor], saved: Mapping[str, Any], where: str) -> None:
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{where}: the checkpoint's parameters do not match the model (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    for k, t in expected.items():
        s = saved[k]
        if not isinstance(s, torch.Tensor) or s.shape != t.shape or s.dtype != t.dtype:
            got = f"{s.dtype} {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"{where}: {k} is {got} in the checkpoint, {t.dtype} {tuple(t.shape)} in the model")


# ---- what watches a run: callbacks, signals, divergence, warnings, the progress bar --------------

_WARNED: set[str] = set()


def warn_once(msg: str) -> None:
    """Warn with ``msg`` once per process."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


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


class CallbackList:
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


_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after writing a resumable checkpoint.

    A KeyboardInterrupt, so ``except Exception`` does not swallow it. ``str(e)`` is the one line
    that ``train_ensemble`` prints (how to resume); a command line turns it into ``exit_code``
    (128 + the signal number: 130 for SIGINT, 143 for SIGTERM) without a traceback.

    Attributes:
        signum: the signal. run_dir: the run folder. exit_code: 128 + signum.
    """

    def __init__(self, signum: int, run_dir: str | Path, detail: str) -> None:
        self.signum = int(signum)
        self.run_dir = Path(run_dir)
        self.exit_code = 128 + self.signum
        self.detail = detail
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        super().__init__(f"sbfast: stopped by {name} ({detail}); resume with: sbfast train --resume {self.run_dir}")


class RunDiverged(RuntimeError):
    """A run stopped at the end of an epoch in which a member diverged: its training loss is not
    finite, or every one of its steps was skipped for a non-finite gradient (the fused optimizer
    skips such a step on the device, so the run would otherwise go on without learning).
    ``str(e)`` is one line naming the epoch, the member and the likely cause.

    Attributes:
        epoch, member: where. reason: what was seen ("has training loss nan", ...).
    """

    one_line = True  # a command line prints str(e) alone: it says what to do

    def __init__(self, epoch: int, member: int, reason: str, cause: str) -> None:
        self.epoch, self.member, self.reason = epoch, member, reason
        super().__init__(
            f"the run diverged in epoch {epoch}: member {member} {reason}; {cause}. The run stopped before this "
            "epoch's checkpoint; start a new run with a smaller value"
        )


def find_divergence(
    config: TrainConfig,
    epoch: int,
    phase: str,
    train_loss: Sequence[float],
    steps: Sequence[int],
    skipped: Sequence[int] | None,
    skipped_before: Sequence[int] | None,
) -> RunDiverged | None:
    """The first member that diverged in ``epoch`` (None: none did): its training loss is not
    finite, or it skipped every one of its ``steps`` for a non-finite gradient (``skipped``: the
    optimizers' running counts after the epoch, ``skipped_before`` before it; None without them)."""
    c = config
    sam = phase != "sgd"
    for j, loss in enumerate(train_loss):
        if not math.isfinite(loss):
            cause = f"the learning rate (lr {c.lr:g}) is likely too large" + (
                f", or SAM's radius (rho {c.rho:g})" if sam else ""
            )
            return RunDiverged(epoch, j, f"has training loss {loss}", cause)
        if skipped is not None and steps[j] > 0:
            new = skipped[j] - (skipped_before[j] if skipped_before else 0)
            if new >= steps[j]:
                cause = (
                    f"SAM's radius (rho {c.rho:g}) is likely too large (the gradient at the perturbed weights is "
                    f"not finite), or the learning rate (lr {c.lr:g})"
                    if sam
                    else f"the learning rate (lr {c.lr:g}) is likely too large"
                )
                return RunDiverged(epoch, j, f"skipped all {steps[j]} of its steps for non-finite gradients", cause)
    return None


class SignalCatcher:
    """While active (a context manager), SIGINT and SIGTERM are caught.

    In deferred mode (the default) the first signal only sets ``requested``: the trainer checks it
    after every step, writes a checkpoint and raises :class:`RunInterrupted`. In immediate mode
    (``immediate = True``: phases whose state is already on disk, such as the scoring at T_d + 1
    or the final evaluation) and for a second signal, the handler raises RunInterrupted at once
    with ``describe()`` as its detail. Only the main thread can install handlers; elsewhere (or
    with ``enabled=False``) this does nothing and signals keep their usual effect.
    """

    def __init__(self, run_dir: str | Path | None, describe: Callable[[], str], enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.describe = describe
        self.enabled = enabled and run_dir is not None and threading.current_thread() is threading.main_thread()
        self.requested: int | None = None
        self.immediate = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.immediate or self.requested is not None:
            raise RunInterrupted(signum, self.run_dir or ".", self.describe())
        self.requested = signum

    def __enter__(self) -> SignalCatcher:
        if self.enabled:
            for s in _SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


def fmt_acc(a: float | None) -> str:
    return "-" if a is None else f"{a:.4f}"


def progress_bar(it: Any, enabled: bool, desc: str, start: int = 0) -> Any:
    if not enabled:
        return it
    from tqdm import tqdm

    total = start + len(it) if hasattr(it, "__len__") else None
    return tqdm(it, desc=desc, unit="epoch", leave=True, dynamic_ncols=True, initial=start, total=total)
