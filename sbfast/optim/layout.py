"""The flat-buffer layout behind ``SharpBalanceSAM``: buckets, views, launches, re-pointing.

At construction (and only then, or in ``add_param_group``) every parameter is copied into a
flat buffer of its dtype and re-pointed at it with ``Parameter.set_(storage, offset, size,
stride)`` under ``no_grad``: the Parameter objects stay the same (``model.parameters()`` yields
them, ``model.state_dict()`` sees the values), only their storage moves, once, before any
capture or compilation. Each parameter's slice starts on a 16-element boundary; the padding is
zero in every buffer and stays zero. Build the optimizer after ``model.to(device, dtype)``:
``Module.to`` swaps storages; an eager phase notices (one ``data_ptr`` per parameter, see
:meth:`FlatLayout.moved`) and re-points the parameters at new buffers with a RuntimeWarning
(momentum kept), but a capture or a compiled graph made before the move would be stale. A move
in the middle of a SAM step (after ``first_step`` or ``normal_step``) puts w back into the moved
parameters from the backup, drops the step, re-points them and raises RuntimeError.
Saving: a parameter is a view of the flat buffer, and ``torch.save`` writes a view's whole
storage, so ``torch.save(layer.state_dict())`` of one layer writes the model's whole buffer of
that dtype; clone the tensors to save one layer compactly (docs/optimizer.md).
Memory: five parameter-sized buffers per dtype (parameters, two gradient buffers, the backup of
w, momentum), all allocated at construction so that no step allocates them while being traced
or captured; the reference holds as many (p, p.grad, old_p, normal_g, momentum_buffer) and
allocates old_p and normal_g anew every step.

Gradients are views into a flat gradient buffer, set once as ``p.grad``; autograd accumulates
into an existing ``.grad`` in place, so backward writes straight into the buffer. A fresh
``.grad`` that backward creates after ``zero_grad(set_to_none=True)`` is copied into the buffer
by :meth:`FlatLayout.collect_grads` (one copy per parameter; the fast path resumes).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

import torch

__all__ = ["ALIGN", "Bucket", "FlatLayout", "Run", "is_dense"]

ALIGN = 16  # elements: each parameter's slice starts on a 64-byte boundary for float32


def is_dense(p: torch.Tensor) -> bool:
    """Whether ``p`` covers its elements without gaps (contiguous or channels_last)."""
    if p.is_contiguous():
        return True
    if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last):
        return True
    return p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d)


@dataclass
class Bucket:
    """The flat buffers of one dtype. Slot k holds parameter ``index[k]`` (global order)."""

    dtype: torch.dtype
    index: list[int]
    offsets: list[int]
    numels: list[int]
    param: torch.Tensor
    grads: list[torch.Tensor | None]  # two gradient buffers; [1] made by the first swap
    backup: torch.Tensor | None = None
    momentum: torch.Tensor | None = None
    ready: torch.Tensor | None = None  # uint8 [slots]: momentum buffer initialised (device)

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Element range of slots [start, end) (padding between them included)."""
        return self.offsets[start], self.offsets[end - 1] + self.numels[end - 1]


@dataclass
class Run:
    """Consecutive slots of one bucket and one group that a phase treats alike: one launch."""

    bucket: int
    group: int
    key: Hashable  # what the phase does to these slots (equal keys: one launch)
    start: int
    end: int
    members: list[int] = field(default_factory=list)  # global param indices


def check_params(params: list[torch.Tensor], previous: FlatLayout | None) -> torch.device:
    """Raise unless ``params`` can live in flat buffers; returns their one device.
    ``previous``: the layout being replaced (its parameters already share a flat storage)."""
    if not params:
        raise ValueError("SharpBalanceSAM got an empty parameter list")
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"all parameters must be on one device, got {sorted(str(d) for d in devices)}")
    if params[0].device.type == "meta":
        raise ValueError(
            "the parameters are on the meta device (shapes without values); materialise the model "
            "first (e.g. model.to_empty(device=...) and initialise it), then build SharpBalanceSAM"
        )
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise ValueError(f"parameter {i} has dtype {p.dtype}; expected a floating dtype")
        if not p.is_leaf:
            raise ValueError(f"parameter {i} is not a leaf tensor")
        if not is_dense(p):
            raise ValueError(
                f"parameter {i} (shape {tuple(p.shape)}, stride {p.stride()}) is not dense "
                "(contiguous or channels_last); it cannot live in a flat buffer"
            )
        if p.grad is not None and p.grad.is_sparse:
            raise TypeError(f"parameter {i} has a sparse gradient; SharpBalanceSAM needs dense gradients")
        owned = previous is not None and any(p is q for q in previous.params)
        if not owned and p.untyped_storage().nbytes() != p.numel() * p.element_size():
            raise ValueError(
                f"parameter {i} shares its storage with other tensors (a view, a tied slice, or a "
                "parameter of another SharpBalanceSAM); re-pointing it would untie it"
            )
    return params[0].device


class FlatLayout:
    """Every parameter re-pointed into one flat buffer per dtype, with the buffers a step needs.

    Args:
        params: the optimizer's parameters in global order (param group by param group).
        group_of: the param group of each parameter.
        previous: the layout this one replaces (a rebuild), or None.

    Attributes:
        params, group_of: as given; ``where[i]`` = (bucket, slot) of parameter i.
        buckets: one :class:`Bucket` per dtype, in order of first appearance.
        grad_views, backup_views, momentum_views: per parameter, its view into the two gradient
            buffers, the backup of w and the momentum buffer (None until allocated).
    """

    def __init__(self, params: list[torch.Tensor], group_of: list[int], previous: FlatLayout | None = None) -> None:
        device = check_params(params, previous)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        buckets: list[Bucket] = []
        where: list[tuple[int, int]] = [(0, 0)] * len(params)
        for dtype, index in by_dtype.items():
            offsets, numels, total = [], [], 0
            for i in index:
                total = -(-total // ALIGN) * ALIGN
                offsets.append(total)
                numels.append(params[i].numel())
                total += params[i].numel()
            flat = torch.zeros(max(total, 1), dtype=dtype, device=device)
            grad = torch.zeros_like(flat)
            b = len(buckets)
            buckets.append(
                Bucket(
                    dtype,
                    index,
                    offsets,
                    numels,
                    flat,
                    [grad, None],
                    ready=torch.zeros(len(index), dtype=torch.uint8, device=device),
                )
            )
            with torch.no_grad():
                for k, i in enumerate(index):
                    p = params[i]
                    where[i] = (b, k)
                    torch.as_strided(flat, p.shape, p.stride(), offsets[k]).copy_(p)
                    if p.grad is not None:
                        torch.as_strided(grad, p.shape, p.stride(), offsets[k]).copy_(p.grad)
                    # the one storage change: before any capture, keeps the Parameter object
                    p.set_(flat.untyped_storage(), offsets[k], p.shape, p.stride())

        self.params: list[torch.Tensor] = params
        self.group_of = group_of
        self.where = where
        self.buckets = buckets
        self.device = device
        self.grad_views: list[list[torch.Tensor] | None] = [self.views(lambda b: b.grads[0]), None]
        self.momentum_views: list[torch.Tensor] | None = None
        self.backup_views: list[torch.Tensor] | None = None
        # Everything a step writes is allocated here, not on first use inside a step that
        # torch.compile may be tracing or a CUDA graph capturing.
        self.ensure_grad_buffer(1)
        self.ensure_backup()
        self.ptrs = [p.data_ptr() for p in params]

    def moved(self) -> bool:
        """Whether a parameter no longer lives in its flat buffer (``Module.to``, ``p.data = ...``)."""
        return not all(p.data_ptr() == ptr for p, ptr in zip(self.params, self.ptrs, strict=True))

    def views(self, flat_of: Callable[[Bucket], torch.Tensor]) -> list[torch.Tensor]:
        """Per parameter (global order), its view into a flat buffer of every bucket."""
        views: list[torch.Tensor] = [None] * len(self.params)  # type: ignore[list-item]
        for bucket in self.buckets:
            flat = flat_of(bucket)
            for k, i in enumerate(bucket.index):
                p = self.params[i]
                views[i] = torch.as_strided(flat, p.shape, p.stride(), bucket.offsets[k])
        return views

    def ensure_grad_buffer(self, which: int) -> None:
        if self.grad_views[which] is None:
            for bucket in self.buckets:
                bucket.grads[which] = torch.zeros_like(bucket.param)
            self.grad_views[which] = self.views(lambda b: b.grads[which])

    def ensure_backup(self) -> None:
        if self.backup_views is None:
            for bucket in self.buckets:
                bucket.backup = torch.zeros_like(bucket.param)
            self.backup_views = self.views(lambda b: b.backup)

    def ensure_momentum(self) -> None:
        if self.momentum_views is None:
            for bucket in self.buckets:
                bucket.momentum = torch.zeros_like(bucket.param)
            self.momentum_views = self.views(lambda b: b.momentum)

    def started(self) -> list[bool]:
        """Per parameter, whether its momentum buffer has been started by an update that the
        device took (its flag), read on the host: one synchronisation."""
        out = [False] * len(self.params)
        for bucket in self.buckets:
            for i, flag in zip(bucket.index, bucket.ready.tolist(), strict=True):
                out[i] = bool(flag)
        return out

    def set_momentum(self, i: int, value: torch.Tensor) -> torch.Tensor:
        """Copy ``value`` into parameter i's momentum slot and mark it initialised (on the
        device); returns the slot's view."""
        self.ensure_momentum()
        view = self.momentum_views[i]
        with torch.no_grad():
            view.copy_(value.reshape(self.params[i].shape))
        b, k = self.where[i]
        self.buckets[b].ready[k] = 1
        return view

    def runs(self, key_of: Callable[[int], Hashable | None]) -> list[Run]:
        """Group the parameters into launches: consecutive slots of one bucket and one group
        with equal keys (None: not touched)."""
        runs: list[Run] = []
        for b, bucket in enumerate(self.buckets):
            current: Run | None = None
            for k, i in enumerate(bucket.index):
                key = key_of(i)
                if key is None:
                    current = None
                    continue
                g = self.group_of[i]
                if current is not None and current.key == key and current.group == g:
                    current.end = k + 1
                    current.members.append(i)
                else:
                    current = Run(b, g, key, k, k + 1, [i])
                    runs.append(current)
        return runs

    def slice(self, run: Run, flat: torch.Tensor) -> torch.Tensor:
        """The part of ``flat`` (one of ``run``'s bucket's buffers) that ``run`` covers."""
        lo, hi = self.buckets[run.bucket].span(run.start, run.end)
        return flat[lo:hi]

    def collect_grads(self, which: int) -> list[bool]:
        """Which parameters have a gradient now; a foreign ``.grad`` (made by backward after
        ``.grad`` was None) is validated, copied into gradient buffer ``which`` and replaced by
        the view. Raises before copying anything."""
        views = self.grad_views[which]
        present: list[bool] = []
        foreign: list[int] = []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                present.append(False)
                continue
            present.append(True)
            if g is views[i]:
                continue
            if g.is_sparse:
                raise TypeError(f"parameter {i} has a sparse gradient; SharpBalanceSAM needs dense gradients")
            if g.device != p.device or g.dtype != p.dtype or g.shape != p.shape:
                raise ValueError(
                    f"parameter {i}: gradient {g.dtype} {tuple(g.shape)} on {g.device} does not "
                    f"match the parameter {p.dtype} {tuple(p.shape)} on {p.device}"
                )
            foreign.append(i)
        with torch.no_grad():
            for i in foreign:
                p = self.params[i]
                views[i].copy_(p.grad)
                p.grad = views[i]
        return present

    def attach(self, which: int, members: Iterable[int]) -> None:
        """Point ``.grad`` of the ``members`` at their views into gradient buffer ``which``."""
        views = self.grad_views[which]
        for i in members:
            if self.params[i].grad is not views[i]:
                self.params[i].grad = views[i]
