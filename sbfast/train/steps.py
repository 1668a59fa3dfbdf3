"""One training step of each kind (SGD, SAM, mixed) as functions of a forward and a batch, the
CUDA graph that replays a step, a member's steps over an epoch (``StepRunner``: its batches,
augmented, through the phase's step), and which optimizer, scorer and selector the steps use
(the fast ones or the plain-PyTorch reference: ``get_components``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sbfast import reference
from sbfast.data import (
    IndexedTensorDataset,
    augment_batch,
    make_loader,
)
from sbfast.optim import SharpBalanceSAM
from sbfast.select import select_sam_masks
from sbfast.sharpness import fisher_scores
from sbfast.train.config import BACKENDS, TrainConfig
from sbfast.train.data import DeviceBatches, device_data, release_order

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


def mixed_step_exact(
    forward: Forward, opt: Any, x: torch.Tensor, y: torch.Tensor, sam_mask: torch.Tensor
) -> torch.Tensor:
    """Section 5 on a random batch with a per-sample mask (the release's batches): one host sync
    per boolean index, as ``reference.mixed_step``."""
    sam_mask = sam_mask.to(x.device)
    return mixed_step_static(forward, opt, x[~sam_mask], y[~sam_mask], x[sam_mask], y[sam_mask])


class GraphedStep:
    """One CUDA graph per input shape for a step function whose inputs are tensors.

    Warm-up steps run eagerly on a side stream (they are real training steps), then the step is
    captured once per shape and replayed; inputs are copied into static buffers first. The graph
    is dropped when ``key`` (the learning rates, which an optimizer may bake in) changes.

    ``pool``: a memory pool (``torch.cuda.graph_pool_handle()``) shared by every graph of a run,
    members and step kinds alike. Sharing is safe here because the graphs replay one at a time on
    one stream, and a replay's output is cloned before any other graph runs; without it each
    graph keeps a private pool of its peak temporaries (M members x 2-3 step kinds of them).
    """

    WARMUP = 3

    def __init__(self, fn: Callable[..., torch.Tensor], pool: Any = None) -> None:
        self.fn = fn
        self.pool = pool
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
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = self.fn(*static_in)
            self.graphs[shape] = entry = (graph, static_in, static_out)
            self.captures += 1
            # capture records but does not run: replay below does this step's work
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs, strict=True):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return static_out.clone()


class StepRunner:
    """One member's training steps: its epoch's batches, each batch fetched from the device data
    and augmented with the member's generator, the phase's step, replayed through a CUDA graph
    where the run captures them (``config.cuda_graphs``) and the batch has the run's full size.

    A member here is anything with ``forward``, ``opt``, ``mask``, ``batcher``, ``graphs``,
    ``order_gen``, ``aug_gen`` and ``index`` (``sbfast.train.run_state.Member``); ``plan`` runs a
    data-parallel member's step across its ranks.
    """

    def __init__(self, config: TrainConfig, train_dev: Any, fill: Any, plan: Any) -> None:
        self.config, self.train_dev, self.fill, self.plan = config, train_dev, fill, plan
        self.device = plan.device
        # one memory pool for every captured step of the run (see GraphedStep)
        self.graph_pool = torch.cuda.graph_pool_handle() if config.cuda_graphs else None

    def epoch_batches(self, m: Any, phase: str) -> list[Any]:
        """The epoch's batches of member m: index tensors [b], or (sam [k_s], normal [k_n]) pairs
        (static mixed phase). Draws the epoch's order from m.order_gen, all of it up front, so
        that a resumed epoch draws the same order from the same generator state."""
        c = self.config
        if phase == "mixed":
            if m.mask is None:
                raise RuntimeError("mixed phase before selection: call score_and_select() first")
            if m.batcher is not None:
                return list(m.batcher.epoch())
        order = release_order(self.train_dev.n, m.order_gen).to(self.device, non_blocking=True)
        return [order[s : s + c.batch_size] for s in range(0, self.train_dev.n, c.batch_size)]

    def batch(self, member: Any, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples ``idx`` [b] of the training data, augmented, in the run's dtype."""
        x, y = self.train_dev.fetch(idx)
        if member.aug_gen is not None:
            x = augment_batch(x, member.aug_gen, self.config.augment_pad, flip=self.config.augment_flip, fill=self.fill)
        return x.to(self.config.torch_dtype), y

    def _lr_key(self, member: Any) -> tuple[float, ...] | None:
        # a float lr may be baked into a capture: re-capture when it changes; a tensor lr is read
        # by the kernels at replay (and float() of it would synchronise), so it needs no key
        if any(isinstance(g["lr"], torch.Tensor) for g in member.opt.param_groups):
            return None
        return tuple(float(g["lr"]) for g in member.opt.param_groups)

    def _run(self, member: Any, kind: str, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """Run a step, through a CUDA graph when enabled and the batch has the run's full size."""
        full = inputs[0].shape[0] + (inputs[2].shape[0] if kind == "mixed" else 0) == self.config.batch_size
        if not (self.config.cuda_graphs and full):
            return fn(*inputs)
        g = member.graphs.get(kind)
        if g is None:
            g = member.graphs[kind] = GraphedStep(fn, self.graph_pool)
        return g(self._lr_key(member), *inputs)

    def __call__(self, m: Any, phase: str, batch: Any) -> torch.Tensor:
        """One step of member m in ``phase`` on ``batch`` (an item of :meth:`epoch_batches`);
        returns the loss (0-d, on the device)."""
        fwd, opt = m.forward, m.opt
        if self.plan.data_parallel(m.index):
            return self.plan.step(m.index, fwd, opt, phase, batch, lambda idx: self.batch(m, idx), m.mask)
        if isinstance(batch, tuple):  # the static mixed phase: (sam, normal) index parts
            sam_idx, nor_idx = batch
            x, y = self.batch(m, torch.cat([nor_idx, sam_idx]))
            k_n = nor_idx.shape[0]
            return self._run(
                m,
                "mixed",
                lambda a, b, s, t: mixed_step_static(fwd, opt, a, b, s, t),
                x[:k_n],
                y[:k_n],
                x[k_n:],
                y[k_n:],
            )
        x, y = self.batch(m, batch)
        if phase == "sgd":
            return self._run(m, "sgd", lambda a, b: sgd_step(fwd, opt, a, b), x, y)
        if phase == "sam":
            return self._run(m, "sam", lambda a, b: sam_step(fwd, opt, a, b), x, y)
        assert m.mask is not None  # epoch_batches refused the mixed phase without one
        return mixed_step_exact(fwd, opt, x, y, m.mask[batch])


@dataclass(frozen=True)
class Components:
    """The optimizer, scorer and selector a run uses, and their names for the record."""

    make_optimizer: Callable[[nn.Module, TrainConfig], Any]
    fisher: Callable[..., torch.Tensor]
    select: Callable[..., torch.Tensor]
    names: dict[str, str]


def reference_optimizer(model: nn.Module, config: TrainConfig) -> reference.SAM:
    return reference.SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=config.rho,
        adaptive=config.adaptive,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def reference_fisher(
    model: nn.Module, ds: IndexedTensorDataset, *, config: TrainConfig, device: torch.device, progress: bool
) -> torch.Tensor:
    loader = make_loader(ds, config.scoring_batch_size, shuffle=False)
    return reference.fisher_scores(model, loader, trials=config.fisher_trials, device=device, num_samples=len(ds))


def fast_optimizer(model: nn.Module, config: TrainConfig) -> SharpBalanceSAM:
    """The fused optimizer for one member.

    ``nonfinite="skip"``: no host sync in a step (a non-finite step is skipped on the device and
    counted; the trainer reports the count per epoch and stops a member that skips all of an
    epoch's steps). ``bn_guard=model``: a skipped step also leaves the model's BatchNorm running
    statistics as they were when it began (its forwards would have moved them towards the
    non-finite values). Under CUDA graphs lr is a device tensor that the LR scheduler fills in
    place, so replays see it.
    """
    lr: float | torch.Tensor = config.lr
    if config.cuda_graphs:
        dev = next(model.parameters()).device
        lr = torch.tensor(config.lr, dtype=torch.float32, device=dev)
    return SharpBalanceSAM(
        model.parameters(),
        lr=lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        rho=config.rho,
        adaptive=config.adaptive,
        nonfinite="skip",
        bn_guard=model,
    )


def fast_fisher(
    model: nn.Module, ds: IndexedTensorDataset, *, config: TrainConfig, device: torch.device, progress: bool
) -> torch.Tensor:
    """Fisher scores [N] of ``ds`` under ``model``, batches gathered on the scoring device (no
    per-sample collation, no host copies)."""
    batches = DeviceBatches(device_data(ds, device), config.scoring_batch_size)
    return fisher_scores(
        model,
        batches,
        batch_size=config.scoring_batch_size,
        device=device,
        trials=config.fisher_trials,
        progress=progress,
        num_samples=len(ds),
    )


FAST = Components(
    fast_optimizer,
    fast_fisher,
    select_sam_masks,
    {
        "optimizer": "sbfast.optim.SharpBalanceSAM",
        "fisher": "sbfast.sharpness.fisher_scores",
        "select": "sbfast.select.select_sam_masks",
    },
)
REFERENCE = Components(
    reference_optimizer,
    reference_fisher,
    reference.select_sam_masks,
    {
        "optimizer": "reference.SAM(torch.optim.SGD)",
        "fisher": "reference.fisher_scores",
        "select": "reference.select_sam_masks",
    },
)


def get_components(backend: str) -> Components:
    """The implementations behind ``backend``: "fast" (sbfast's fused optimizer, scorer and
    selector) or "reference" (the plain-PyTorch twins). There is no silent substitution: a fast
    module that fails to import fails the import of this one."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return FAST if backend == "fast" else REFERENCE
