"""The fast ensemble trainer: the schedule of de, de_sam and SharpBalance end to end."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sbfast.data import (
    augment_batch,
)
from sbfast.select import sam_index_split
from sbfast.train.batching import StaticBatcher
from sbfast.train.callbacks import Callback, CallbackList
from sbfast.train.components import get_components
from sbfast.train.config import TrainConfig, as_config
from sbfast.train.data import DeviceData, TrainData, augment_fill, load_data
from sbfast.train.evaluate import accuracies, evaluate_ensemble, predict_probs
from sbfast.train.graphs import GraphedStep
from sbfast.train.members import build_member, make_lr_scheduler, member_seeds, release_order
from sbfast.train.results import EnsembleResult
from sbfast.train.steps import Forward, mixed_step_exact, mixed_step_static, sam_step, sgd_step

_WARNED: set[str] = set()


def warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


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
    graphs: dict[str, GraphedStep] = field(default_factory=dict)


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
        self.callbacks = CallbackList(callbacks)
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
        # one memory pool for every captured step of the run (see GraphedStep)
        self.graph_pool = torch.cuda.graph_pool_handle() if config.cuda_graphs else None
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
            g = member.graphs[kind] = GraphedStep(fn, self.graph_pool)
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
                sam_idx, nor_idx = sam_index_split(row)
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
        return accuracies(probs, self.data.test.y)

    # -- the schedule --------------------------------------------------------------------------

    def run(self) -> EnsembleResult:
        c = self.config
        t_start = time.perf_counter()
        history: list[dict[str, Any]] = []
        self.callbacks.call("on_train_start", c, [m.model for m in self.members])
        n = self.train_dev.n
        bar = progress_bar(range(c.epochs), c.progress, f"{c.method} [{c.backend}/{c.batching}]")
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
            warn_once(f"{c.method}: steps skipped for non-finite gradients per member: {history[-1]['skipped_steps']}")
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


def progress_bar(it: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="epoch", leave=True, dynamic_ncols=True)


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
    with thread_limit(config.num_threads, device):
        result = EnsembleTrainer(config, data, callbacks).run()
    if config.output_dir:
        result.save(config.output_dir)
    return result
