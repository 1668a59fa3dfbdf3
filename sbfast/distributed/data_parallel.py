"""Data parallel inside one member: G ranks split each of its batches and average gradients.

Every rank of the member's group holds the same parameters and draws the same batches (the
same seeds); each takes its contiguous slice of every batch (:func:`shard`) and its gradients
are averaged over the group before each optimizer phase consumes them:

* ``normal_step`` (the normal part's g_n): averaged;
* ``first_step`` (the SAM perturbation's g): ``sam_grad_sync="local"`` (default) keeps each
  rank's own gradient, so each rank perturbs by its own slice's e_r (the release's per-process
  behaviour, and no communication); ``"all"`` averages it first, so every rank perturbs by the
  whole batch's e (single-rank SAM on the whole batch);
* ``second_step`` / ``third_step`` (g' at w + e, or the plain gradient): averaged. A
  ``third_step`` after ``normal_step`` uses only the kept, already averaged g_n.

So the parameters stay identical on every rank of the group, step after step.

Losses: the local loss of rank r is ``(G / b) * sum of CE over its slice`` (b = the whole
batch), so that the group's average is the whole batch's mean: the same gradient as one rank
on the whole batch, also when slices differ in size (the static batcher's SAM and normal
counts need not be multiples of G). Under ``"all"`` the perturbation's loss is
``(G / k_s) * sum over the slice's SAM samples`` (the mean over all k_s of them).

Communication: with the fused :class:`sbfast.optim.SharpBalanceSAM` the gradients already live
in one flat buffer per dtype (``flat_buffers()``), so a phase is one all-reduce per dtype of
that buffer, in place, split into ``bucket_cap_mb`` chunks launched together only when the
buffer is larger than that (a chunk can travel while the next is reduced). Any other optimizer
with the same phases (``reference.SAM``) gets its ``.grad`` tensors coalesced into buckets of
``bucket_cap_mb``, one all-reduce each. The all-reduces run when a phase is called, after the
backward: which phase a backward feeds (and whether its gradient is reduced at all, under
``"local"``) is known only then, so they do not overlap with the backward.

BatchNorm: statistics per rank by default (as DDP): each rank normalises its slice with its
slice's statistics and keeps its own running statistics; :func:`broadcast_buffers` copies the
leader's into the others (the trainer does it at the end of each epoch, so that the member is
one model). With :func:`sbfast.distributed.sync_batchnorm.convert_sync_batchnorm` the
statistics are those of the whole batch part across the group (then pass
``collective_forward=True`` to the steps: every rank must run every forward, even on an
empty slice).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sbfast.distributed.collectives import broadcast_module_state, guard, traffic
from sbfast.distributed.launch import DistContext
from sbfast.optim import SharpBalanceSAM

__all__ = [
    "SAM_GRAD_SYNC",
    "DataParallelOptimizer",
    "broadcast_buffers",
    "dp_mixed_step",
    "dp_sam_step",
    "dp_sgd_step",
    "shard",
]

SAM_GRAD_SYNC: tuple[str, ...] = ("local", "all")
DEFAULT_BUCKET_CAP_MB = 25.0

Forward = Callable[[torch.Tensor], torch.Tensor]


def shard(t: torch.Tensor, index: int, size: int) -> torch.Tensor:
    """Slice ``index`` of ``size`` contiguous near-equal slices of ``t`` along dim 0 (the larger
    ones first, ``torch.tensor_split``'s sizes). A view."""
    if not 0 <= index < size:
        raise ValueError(f"shard index {index} out of range for {size} slices")
    return torch.tensor_split(t, size)[index]


class DataParallelOptimizer:
    """The optimizer of one data-parallel member: ``optimizer``'s phases, each preceded by the
    average over ``group`` of the gradient it consumes (see the module docstring).

    Everything else (``param_groups``, ``state_dict``, ``skipped_steps``, ...) is the wrapped
    optimizer's; give LR schedulers the wrapped optimizer itself.

    Args:
        optimizer: a ``SharpBalanceSAM`` (flat-buffer path) or an optimizer with the same phases
            whose gradients are ``p.grad`` (``reference.SAM``).
        ctx: this rank's context.
        group: the member's process group (None: the whole world).
        sam_grad_sync: "local" (each rank perturbs by its own gradient) or "all".
        bucket_cap_mb: size of one all-reduce, in MiB (> 0).
    """

    def __init__(
        self,
        optimizer: Any,
        ctx: DistContext,
        group: Any = None,
        *,
        sam_grad_sync: str = "local",
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    ) -> None:
        if sam_grad_sync not in SAM_GRAD_SYNC:
            raise ValueError(f"sam_grad_sync must be one of {SAM_GRAD_SYNC}, got {sam_grad_sync!r}")
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be a number > 0, got {bucket_cap_mb!r}")
        for name in ("normal_step", "first_step", "second_step", "third_step", "zero_grad"):
            if not callable(getattr(optimizer, name, None)):
                raise TypeError(
                    f"{type(optimizer).__name__} has no {name}(); DataParallelOptimizer wraps SharpBalanceSAM "
                    "or an optimizer with the same phases (reference.SAM)"
                )
        self.optimizer = optimizer
        self.ctx = ctx
        self.group = group
        self.size = dist.get_world_size(group)
        self.sam_grad_sync = sam_grad_sync
        self.bucket_bytes = int(bucket_cap_mb * 2**20)
        self._flat = callable(getattr(optimizer, "flat_buffers", None))

    def __getattr__(self, name: str) -> Any:  # only reached for names this class does not define
        return getattr(self.optimizer, name)

    # -- the all-reduce ---------------------------------------------------------------------

    def _reduce(self, tensors: list[torch.Tensor], what: str) -> None:
        """Average ``tensors`` over the group in place, in chunks of at most ``bucket_bytes``."""
        nccl = self.ctx.backend == "nccl"
        op = dist.ReduceOp.AVG if nccl else dist.ReduceOp.SUM  # gloo has no AVG
        with guard(self.ctx, what):
            work = []
            for t in tensors:
                on_comm = t if t.device == self.ctx.comm_device else t.to(self.ctx.comm_device)
                step = max(1, self.bucket_bytes // on_comm.element_size())
                for lo in range(0, on_comm.numel(), step):
                    chunk = on_comm[lo : lo + step]
                    traffic.add(what, chunk.numel() * chunk.element_size())
                    work.append((t, on_comm, dist.all_reduce(chunk, op=op, group=self.group, async_op=True)))
            for _, _, w in work:
                w.wait()
        done: set[int] = set()
        for t, on_comm, _ in work:
            if id(on_comm) in done:
                continue
            done.add(id(on_comm))
            if not nccl:
                on_comm.div_(self.size)
            if on_comm is not t:
                t.copy_(on_comm)

    def average_gradients(self, what: str = "the gradient all-reduce") -> None:
        """Average the current gradients over the group (what the next phase will read)."""
        if self.size == 1:
            return
        if self._flat:
            self._reduce([b["grad"] for b in self.optimizer.flat_buffers()], what)
            self._fill_missing_grads()  # the average is meant, even on a rank that took no backward
            return
        self._fill_missing_grads()
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            bucket: list[torch.Tensor] = []
            nbytes = 0
            for g in [*same, None]:
                if g is not None and (not bucket or nbytes + g.numel() * g.element_size() <= self.bucket_bytes):
                    bucket.append(g)
                    nbytes += g.numel() * g.element_size()
                    continue
                flat = torch._utils._flatten_dense_tensors(bucket)
                self._reduce([flat], what)
                for view, dst in zip(torch._utils._unflatten_dense_tensors(flat, bucket), bucket, strict=True):
                    dst.copy_(view)
                bucket, nbytes = ([g], g.numel() * g.element_size()) if g is not None else ([], 0)

    def _fill_missing_grads(self) -> None:
        """Zero gradients for parameters that have none (``.grad`` optimizers only): a rank whose
        slice was empty took no backward, yet it must reduce the same tensors as its partners.
        A flat-buffer optimizer already has zeros there: it is told that they are meant."""
        if self._flat:
            getattr(self.optimizer, "mark_gradients_ready", lambda: None)()
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)

    # -- the phases -------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def normal_step(self, zero_grad: bool = False) -> None:
        self.average_gradients("the gradient all-reduce (normal part)")
        self.optimizer.normal_step(zero_grad=zero_grad)

    def first_step(self, zero_grad: bool = False, **kwargs: Any) -> None:
        if self.sam_grad_sync == "all":
            self.average_gradients("the gradient all-reduce (SAM perturbation)")
        else:
            self._fill_missing_grads()
        self.optimizer.first_step(zero_grad=zero_grad, **kwargs)
        # reference.SAM has no device-side skip (it never skips a step): nothing to agree on
        found = self.optimizer.found_nonfinite if isinstance(self.optimizer, SharpBalanceSAM) else None
        if self.sam_grad_sync == "local" and self.size > 1 and found is not None:
            # a rank whose own gradient norm was not finite will skip the update (device-side);
            # the others must skip it too, or the group's copies of the member drift apart
            buf = found if found.device == self.ctx.comm_device else found.to(self.ctx.comm_device)
            traffic.add("the skip-flag all-reduce", buf.numel() * buf.element_size())
            with guard(self.ctx, "the skip-flag all-reduce"):
                dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
            if buf is not found:
                found.copy_(buf)

    def second_step(self, zero_grad: bool = False, **kwargs: Any) -> None:
        self.average_gradients()
        self.optimizer.second_step(zero_grad=zero_grad, **kwargs)

    def third_step(self, zero_grad: bool = False, **kwargs: Any) -> None:
        if not self.optimizer.has_normal:  # after normal_step only the kept, averaged g_n is read
            self.average_gradients()
        self.optimizer.third_step(zero_grad=zero_grad, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)


def broadcast_buffers(ctx: DistContext, model: nn.Module, src: int, group: Any = None) -> None:
    """Copy the model's buffers (BatchNorm running statistics) from rank ``src`` to the other
    ranks of ``group``: the member's copies become one model again after per-rank statistics."""
    bufs = [b for b in model.buffers() if b.numel() > 0]
    if bufs:
        broadcast_module_state(ctx, bufs, src, group, "the buffer broadcast")


# -- steps ----------------------------------------------------------------------------------


def _sum_ce(forward: Forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(forward(x), y, reduction="sum")


def _runs(x: torch.Tensor, collective_forward: bool) -> bool:
    # an empty slice is skipped (its gradient is the zero that zero_grad left), unless the forward
    # itself communicates (synchronised BatchNorm), where every rank must take part
    return x.shape[0] > 0 or collective_forward


def dp_sgd_step(
    forward: Forward,
    opt: DataParallelOptimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    *,
    collective_forward: bool = False,
) -> torch.Tensor:
    """Plain SGD on this rank's slice (x, y) of a batch of ``batch`` samples.

    Returns the slice's share of the batch mean loss, (sum of CE over the slice) / batch, a 0-d
    tensor: the group's sum of it is the batch mean loss."""
    g = opt.size
    opt.zero_grad()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    if _runs(x, collective_forward):
        s = _sum_ce(forward, x, y)
        (s * (g / batch)).backward()
        total = s.detach().double() / batch
    opt.third_step(zero_grad=True)
    return total


def dp_sam_step(
    forward: Forward,
    opt: DataParallelOptimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    *,
    collective_forward: bool = False,
) -> torch.Tensor:
    """SAM on every sample of this rank's slice of a batch of ``batch`` samples (section 2 of
    the algorithm); the perturbation's gradient per ``opt.sam_grad_sync``. Returns the slice's
    share of the batch mean loss at w."""
    return dp_mixed_step(forward, opt, x[:0], y[:0], x, y, 0, batch, collective_forward=collective_forward)


def dp_mixed_step(
    forward: Forward,
    opt: DataParallelOptimizer,
    xn: torch.Tensor,
    yn: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
    k_n: int,
    k_s: int,
    *,
    collective_forward: bool = False,
) -> torch.Tensor:
    """Section 5 on this rank's slice of a batch whose normal part has ``k_n`` samples and SAM
    part ``k_s`` (the whole batch's counts, the same on every rank; xn/yn and xs/ys are this
    rank's slices of the two parts).

    Every rank takes the same phases (decided by k_n and k_s, not by its slice), so the group's
    collectives match. Returns the slice's share of the batch mean loss at w (0-d float64).
    """
    b = k_n + k_s
    if b == 0:
        raise ValueError("dp_mixed_step: the batch is empty (k_n = k_s = 0)")
    if xn.shape[0] > k_n or xs.shape[0] > k_s:
        raise ValueError(
            f"dp_mixed_step: slices ({xn.shape[0]} normal, {xs.shape[0]} SAM) larger than the batch's "
            f"parts ({k_n}, {k_s})"
        )
    g = opt.size
    total = torch.zeros((), dtype=torch.float64, device=xs.device)
    opt.zero_grad()
    if k_n > 0:
        if _runs(xn, collective_forward):
            s = _sum_ce(forward, xn, yn)
            (s * (g / b)).backward()
            total = total + s.detach().double() / b
        opt.normal_step(zero_grad=True)
    if k_s == 0:
        opt.third_step(zero_grad=True)
        return total
    if _runs(xs, collective_forward):
        s = _sum_ce(forward, xs, ys)
        total = total + s.detach().double() / b
        if opt.sam_grad_sync == "all":
            (s * (g / k_s)).backward()
        elif xs.shape[0] > 0:
            (s / xs.shape[0]).backward()  # this slice's mean: its own perturbation
        else:
            (s * 0.0).backward()  # an empty slice under synchronised BatchNorm: take part, no gradient
    opt.first_step(zero_grad=True)
    if _runs(xs, collective_forward):
        (_sum_ce(forward, xs, ys) * (g / b)).backward()
    opt.second_step(zero_grad=True)
    return total
