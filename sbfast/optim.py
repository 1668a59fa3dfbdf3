"""SharpBalanceSAM: SAM / ASAM with SharpBalance's normal half and SGD built in, fused.

The same step methods and the same numbers as ``sbfast.reference.SAM`` with a
``torch.optim.SGD`` base (ALGORITHM.md sections 2 and 5; float64 on CPU: bit for bit), but the
parameters and gradients live in flat contiguous buffers, one per dtype, so that each phase is
one pass over one buffer:

- ``first_step``: the global gradient norm (a two-stage reduction without ``.item()``), then one
  fused pass ``backup = w; w = w + e`` per parameter group (``sbfast::sam_perturb_``);
- ``normal_step``: keeps g_n by swapping the gradient buffer for a second one (no copy);
- ``second_step`` / ``third_step``: one fused pass restores w exactly from the backup, adds the
  kept g_n, applies weight decay, momentum and the update (``sbfast::sam_restore_sgd_``).

Layout and what the optimizer does to the model
-----------------------------------------------
At construction (and only then, or in ``add_param_group``) every parameter is copied into a
flat buffer of its dtype and re-pointed at it with ``Parameter.set_(storage, offset, size,
stride)`` under ``no_grad``: the Parameter objects stay the same (``model.parameters()`` yields
them, ``model.state_dict()`` sees the values), only their storage moves, once, before any
capture or compilation. Each parameter's slice starts on a 16-element boundary; the padding is
zero in every buffer and stays zero. Build the optimizer after ``model.to(device, dtype)``:
``Module.to`` swaps storages; an eager phase notices (one ``data_ptr`` per parameter) and
re-points the parameters at new buffers with a RuntimeWarning (momentum kept), but a capture
or a compiled graph made before the move would be stale. Memory: five parameter-sized buffers
per dtype (parameters, two gradient buffers, the backup of w, momentum), all allocated at
construction so that no step allocates them while being traced or captured; the reference
holds as many (p, p.grad, old_p, normal_g, momentum_buffer) and allocates old_p and normal_g
anew every step.

Gradients are views into a flat gradient buffer, set once as ``p.grad``; autograd accumulates
into an existing ``.grad`` in place, so backward writes straight into the buffer.
``zero_grad()`` therefore zeroes in place (``set_to_none=False`` is the default here): the views
survive. ``zero_grad(set_to_none=True)`` and ``model.zero_grad()`` are allowed: a parameter
whose ``.grad`` is then None counts as having no gradient (skipped, as in the reference), and a
fresh ``.grad`` that backward creates is copied into the buffer at the next phase (one copy per
parameter; the fast path resumes). A parameter that took part in no backward while its view
was attached has a zero gradient, not None: like ``torch.optim.SGD`` after
``zero_grad(set_to_none=False)`` it still gets weight decay and momentum.

Device scalars and graph capture
--------------------------------
Nothing in a step reads a device value on the host in ``nonfinite="skip"`` mode: lr, the SAM
scale rho / (||g|| + 1e-12), the skip flag, the GradScaler's inverse scale and the momentum
buffers' first-step flag are device tensors read by the kernels. A float ``lr`` is copied into
a device tensor when it changes (LR schedulers work; under ``torch.compile`` a changed float
recompiles, as for torch's optimizers). For CUDA graphs pass ``lr`` as a tensor on the
parameters' device: LR schedulers ``fill_`` it in place and replays see the new value without
re-capture. rho, momentum, dampening, nesterov and weight decay are baked into a capture.

Momentum's first step: torch.optim.SGD sets buf = d when a parameter's buffer does not exist
yet. A Python bool for that would be frozen into a captured graph (every replay a "first
step"), so each parameter has a uint8 flag on the device, read by the kernel and set by it after
an unskipped update. The host mirrors the flags only to split launches where parameters differ.

Non-finite gradients (``nonfinite=``)
-------------------------------------
- ``"error"`` (default): eager ``first_step`` raises ValueError before perturbing when the norm is
  not finite; ``second_step`` / ``third_step`` check the gradients they use (one read of each
  buffer, as a sum) and raise after restoring w exactly (no update, momentum untouched). Each
  check is a host synchronisation (two per SAM step). Under ``torch.compile`` or CUDA graph
  capture the error cannot be raised, so these modes behave as ``"skip"``.
- ``"skip"``: device-side: a non-finite norm makes the perturbation zero, a non-finite gradient
  skips the update (w restored, buffers untouched), and ``skipped_steps`` (an int64 device
  tensor) counts skipped steps. No host synchronisation.

Mixed precision
---------------
bf16 autocast needs nothing special. fp16 autocast with a ``torch.amp.GradScaler`` (fp32
parameters) spans both passes; pass the scaler to the phases and let it update as usual::

    scaler.scale(loss_normal).backward(); opt.normal_step(zero_grad=True)      # g_n * S
    scaler.scale(loss).backward(); opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(loss_at_w_plus_e).backward()
    opt.second_step(zero_grad=True, grad_scaler=scaler)   # or third_step(grad_scaler=scaler)
    scaler.update()

The perturbation uses the scaled g (e = rho g / ||g|| does not depend on the scale); the update
unscales once, inside the fused pass ((g' + g_n) / S); infs are checked once per gradient
buffer (g by the norm, g' and g_n by one read each), the step is skipped device-side and
the result is handed to the scaler, so ``scaler.update()`` backs off. Do not call
``scaler.step`` or ``scaler.unscale_`` on this optimizer (g_n lives outside ``p.grad``).

BatchNorm (``bn_freeze=model``): the running statistics of the model's BatchNorm layers are
saved by ``first_step`` and put back by ``second_step`` (device copies), so the forward at
w + e does not update them. Off by default, as in the release.

torch.compile: a training step that calls the phases compiles (the phases trace without host
syncs in ``"skip"`` mode); each phase ends its graph (see ``_phase_boundary``), and
``backward()`` breaks the graph as usual. ``self.state`` (momentum buffer views) is brought up
to date outside compiled code, e.g. by ``state_dict()``.

Arithmetic: float32/float64 parameters are updated with torch's own roundings (bit-exact with
the reference on CPU); bfloat16/float16 parameters are computed in float32 and rounded once
per stored value (more exact than torch's op-by-op bfloat16), the SAM scale stays float32.

Gradient accumulation: accumulate each pass over micro-batches before its phase::

    opt.zero_grad()
    for mb in micro_batches: (loss_normal(mb) / k).backward()
    opt.normal_step(zero_grad=True)
    for mb in micro_batches: loss_sam(mb).backward()        # scale irrelevant: e is normalised
    opt.first_step(zero_grad=True)
    for mb in micro_batches: (loss_sam(mb) / k).backward()  # at w + e
    opt.second_step(zero_grad=True)
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sbfast import ops, registry

__all__ = ["SharpBalanceSAM"]

_SAM_EPS = 1e-12  # the release's e = rho * g / (||g|| + 1e-12)
_ALIGN = 16  # elements: each parameter's slice starts on a 64-byte boundary for float32
_NONFINITE = ("error", "skip")
_GRAD_NORM = ("per_tensor", "global")


def _phase_boundary() -> None:
    """Under torch.compile, end the graph at a phase boundary, so that each phase is compiled as
    a graph of its own (no_grad, no host sync). AOTAutograd cannot functionalize a graph that
    both writes the flat buffer and differentiates through the parameters that alias it (the
    forward that follows ``first_step``); a phase alone is an inference graph, where it can."""
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break()


def _is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_group(group: dict[str, Any], where: str) -> None:
    """Validate a (complete) param group's hyperparameters; raises before anything changes."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"{where}: a tensor lr must hold one floating value, got {lr.dtype} {tuple(lr.shape)}")
    elif not _real(lr) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{where}: lr must be a finite float >= 0 (or a tensor), got {lr!r}")
    for key in ("momentum", "weight_decay", "rho"):
        v = group[key]
        if not _real(v) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}: {key} must be a finite float >= 0, got {v!r}")
    damp = group["dampening"]
    if not _real(damp) or not math.isfinite(damp):
        raise ValueError(f"{where}: dampening must be a finite float, got {damp!r}")
    if not isinstance(group["adaptive"], bool):
        raise ValueError(f"{where}: adaptive must be a bool, got {group['adaptive']!r}")
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"{where}: nesterov must be a bool, got {group['nesterov']!r}")
    if group["nesterov"] and (group["momentum"] <= 0 or damp != 0):
        raise ValueError(f"{where}: nesterov needs momentum > 0 and dampening == 0, got "
                         f"momentum={group['momentum']!r}, dampening={damp!r}")
    if group.get("maximize", False):
        raise ValueError(f"{where}: maximize=True is not supported")


def _dense(p: torch.Tensor) -> bool:
    if p.is_contiguous():
        return True
    if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last):
        return True
    return p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d)


@dataclass
class _Bucket:
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


class _StepState:
    """The host-side state that the phases change, kept off the optimizer object: dynamo
    replays attribute writes on a plain object, but (torch 2.14) drops some on an Optimizer."""

    def __init__(self, num_params: int, num_groups: int) -> None:
        self.cur = 0  # the gradient buffer that the p.grad views point into
        self.normal_buf: int | None = None  # the buffer that holds g_n
        self.normal_present: list[bool] | None = None  # params with a kept g_n
        self.perturbed: list[bool] | None = None  # params perturbed by first_step
        self.has_normal = False
        self.ready_host = [False] * num_params  # host mirror of the momentum flags
        self.lr_host: list[float | None] = [None] * num_groups  # float lr last copied to the device
        self.bn_saved: list[torch.Tensor] | None = None


@dataclass
class _Run:
    """Consecutive slots of one bucket and one group that a phase treats alike: one launch."""

    bucket: int
    group: int
    key: tuple
    start: int
    end: int
    members: list[int] = field(default_factory=list)  # global param indices


class SharpBalanceSAM(torch.optim.Optimizer):
    """Fused SAM / ASAM + SGD with SharpBalance's normal half (see the module docstring).

    Args:
        params: parameters or param groups (all on one device; any floating dtypes). Groups may
            set their own lr, momentum, weight_decay, dampening, nesterov, rho and adaptive.
        lr: learning rate, a float or a one-element tensor (see "Device scalars").
        momentum, weight_decay, dampening, nesterov: as ``torch.optim.SGD``.
        rho: perturbation radius (>= 0); adaptive: ASAM's e = rho w^2 g / (|| |w| g || + 1e-12).
        nonfinite: ``"error"`` (default) or ``"skip"`` (device-side, counted in ``skipped_steps``).
        grad_norm: ``"per_tensor"`` (default): the release's norm of the per-tensor norms, bit for
            bit; ``"global"``: ``sbfast.ops.global_sq_norm`` over the flat runs (one fused
            two-stage reduction, float64 totals; ASAM forms |w| g in a temporary).
        bn_freeze: a module whose BatchNorm running statistics the forward at w + e must not
            change (saved in ``first_step``, restored in ``second_step``); None: the release's
            behaviour.

    Attributes:
        skipped_steps: int64 0-d tensor on the parameters' device, steps skipped for
            non-finite gradients.
        has_normal: whether ``normal_step`` kept gradients for the coming step.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        rho: float = 0.05,
        adaptive: bool = False,
        dampening: float = 0.0,
        nesterov: bool = False,
        *,
        nonfinite: str = "error",
        grad_norm: str = "per_tensor",
        bn_freeze: nn.Module | None = None,
    ) -> None:
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if grad_norm not in _GRAD_NORM:
            raise ValueError(f"grad_norm must be one of {_GRAD_NORM}, got {grad_norm!r}")
        if bn_freeze is not None and not isinstance(bn_freeze, nn.Module):
            raise TypeError(f"bn_freeze must be an nn.Module or None, got {type(bn_freeze).__name__}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, rho=rho, adaptive=adaptive,
                        dampening=dampening, nesterov=nesterov, maximize=False)
        _check_group(defaults, "SharpBalanceSAM")
        self._built = False
        self.nonfinite = nonfinite
        self.grad_norm = grad_norm
        self._bn_module = bn_freeze
        super().__init__(params, defaults)
        self._build()

    # ------------------------------------------------------------------------------------
    # Layout
    # ------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated first). After construction this re-points every parameter
        at new flat buffers once more (momentum and gradients carried over): do it before any
        capture or compilation, and not in the middle of a SAM step."""
        merged = {**getattr(self, "defaults", {}), **{k: v for k, v in param_group.items() if k != "params"}}
        _check_group(merged, "param group")
        if getattr(self, "_built", False) and (self._st.perturbed is not None or self._st.has_normal):
            raise ValueError("add_param_group in the middle of a SAM step (after normal_step or first_step)")
        super().add_param_group(param_group)
        if getattr(self, "_built", False):
            self._build()

    def _build(self) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        group_of = [gi for gi, group in enumerate(self.param_groups) for _ in group["params"]]
        if not params:
            raise ValueError("SharpBalanceSAM got an empty parameter list")
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(str(d) for d in devices)}")
        device = params[0].device
        for i, p in enumerate(params):
            if not p.is_floating_point():
                raise ValueError(f"parameter {i} has dtype {p.dtype}; expected a floating dtype")
            if not p.is_leaf:
                raise ValueError(f"parameter {i} is not a leaf tensor")
            if not _dense(p):
                raise ValueError(f"parameter {i} (shape {tuple(p.shape)}, stride {p.stride()}) is not dense "
                                 "(contiguous or channels_last); it cannot live in a flat buffer")
            if p.grad is not None and p.grad.is_sparse:
                raise TypeError(f"parameter {i} has a sparse gradient; SharpBalanceSAM needs dense gradients")
            owned = self._built and any(p is q for q in self._params)
            if not owned and p.untyped_storage().nbytes() != p.numel() * p.element_size():
                raise ValueError(
                    f"parameter {i} shares its storage with other tensors (a view, a tied slice, or a "
                    "parameter of another SharpBalanceSAM); re-pointing it would untie it")

        old = self._snapshot() if self._built else None
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        buckets: list[_Bucket] = []
        where: list[tuple[int, int]] = [(0, 0)] * len(params)
        for dtype, index in by_dtype.items():
            offsets, numels, total = [], [], 0
            for i in index:
                total = -(-total // _ALIGN) * _ALIGN
                offsets.append(total)
                numels.append(params[i].numel())
                total += params[i].numel()
            flat = torch.zeros(max(total, 1), dtype=dtype, device=device)
            grad = torch.zeros_like(flat)
            b = len(buckets)
            buckets.append(_Bucket(dtype, index, offsets, numels, flat, [grad, None],
                                   ready=torch.zeros(len(index), dtype=torch.uint8, device=device)))
            with torch.no_grad():
                for k, i in enumerate(index):
                    p = params[i]
                    where[i] = (b, k)
                    torch.as_strided(flat, p.shape, p.stride(), offsets[k]).copy_(p)
                    if p.grad is not None:
                        torch.as_strided(grad, p.shape, p.stride(), offsets[k]).copy_(p.grad)
                    # the one storage change: before any capture, keeps the Parameter object
                    p.set_(flat.untyped_storage(), offsets[k], p.shape, p.stride())

        self._params: list[torch.Tensor] = params
        self._group_of = group_of
        self._where = where
        self._buckets = buckets
        self._device = device
        self._gviews: list[list[torch.Tensor] | None] = [self._views(lambda b: b.grads[0]), None]
        self._mviews: list[torch.Tensor] | None = None
        self._bviews: list[torch.Tensor] | None = None
        # Everything a step writes is allocated here, not on first use inside a step that
        # torch.compile may be tracing or a CUDA graph capturing.
        self._ensure_grad_buffer(1)
        self._ensure_backup()
        if any(float(g["momentum"]) != 0 for g in self.param_groups):
            self._ensure_momentum()
        self._st = _StepState(len(params), len(self.param_groups))
        bn = self._bn_buffers()
        self._st.bn_saved = [t.clone() for t in bn] if bn else None
        self._lr_dev = [torch.zeros((), dtype=torch.float64, device=device) for _ in self.param_groups]
        self._found = torch.zeros((), dtype=torch.float32, device=device)
        self._ones = torch.ones((), dtype=torch.float32, device=device)
        if not self._built:
            self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        elif self.skipped_steps.device != device:
            self.skipped_steps = self.skipped_steps.to(device)
        for i, p in enumerate(params):
            if p.requires_grad:
                p.grad = self._gviews[0][i]
        self._built = True
        if old is not None:
            self._restore_snapshot(old)
        self._ptrs = [p.data_ptr() for p in params]

    @property
    def has_normal(self) -> bool:
        """Whether ``normal_step`` kept gradients for the coming step."""
        return self._st.has_normal

    # a subclass that expects Module.to after construction (compat.NSAM) turns the warning off
    _warn_on_moved_params = True

    def _check_layout(self) -> None:
        """Rebuild the flat buffers if a parameter no longer lives in them (``Module.to`` or
        ``p.data = ...`` after construction); eager only, one ``data_ptr`` per parameter."""
        if torch.compiler.is_compiling():
            return
        if all(p.data_ptr() == ptr for p, ptr in zip(self._params, self._ptrs, strict=True)):
            return
        if self._st.perturbed is not None or self._st.has_normal:
            raise RuntimeError("parameters were moved (Module.to?) in the middle of a SAM step")
        if self._warn_on_moved_params:
            warnings.warn("SharpBalanceSAM: parameters were moved (Module.to or p.data = ...) after the "
                          "optimizer was built; re-pointing them at new flat buffers. Build the optimizer "
                          "after moving the model.", RuntimeWarning, stacklevel=3)
        self._build()

    def _snapshot(self) -> dict[int, torch.Tensor]:
        """Momentum buffers by parameter identity, for a rebuild."""
        self._sync_state()
        return {id(p): self.state[p]["momentum_buffer"].clone()
                for p in self._params if "momentum_buffer" in self.state.get(p, {})}

    def _restore_snapshot(self, old: dict[int, torch.Tensor]) -> None:
        for i, p in enumerate(self._params):
            if id(p) in old:
                self._set_momentum(i, old[id(p)])

    def _views(self, flat_of: Callable[[_Bucket], torch.Tensor]) -> list[torch.Tensor]:
        """Per parameter (global order), its view into a flat buffer of every bucket."""
        views: list[torch.Tensor] = [None] * len(self._params)  # type: ignore[list-item]
        for bucket in self._buckets:
            flat = flat_of(bucket)
            for k, i in enumerate(bucket.index):
                p = self._params[i]
                views[i] = torch.as_strided(flat, p.shape, p.stride(), bucket.offsets[k])
        return views

    def _ensure_grad_buffer(self, which: int) -> None:
        if self._gviews[which] is None:
            for bucket in self._buckets:
                bucket.grads[which] = torch.zeros_like(bucket.param)
            self._gviews[which] = self._views(lambda b: b.grads[which])

    def _ensure_backup(self) -> None:
        if self._bviews is None:
            for bucket in self._buckets:
                bucket.backup = torch.zeros_like(bucket.param)
            self._bviews = self._views(lambda b: b.backup)

    def _ensure_momentum(self) -> None:
        if self._mviews is None:
            for bucket in self._buckets:
                bucket.momentum = torch.zeros_like(bucket.param)
            self._mviews = self._views(lambda b: b.momentum)

    def _set_momentum(self, i: int, value: torch.Tensor) -> None:
        self._ensure_momentum()
        p = self._params[i]
        view = self._mviews[i]
        with torch.no_grad():
            view.copy_(value.reshape(p.shape))
        b, k = self._where[i]
        self._buckets[b].ready[k] = 1
        self._st.ready_host[i] = True
        self.state[p]["momentum_buffer"] = view

    def flat_buffers(self) -> list[dict[str, Any]]:
        """The flat buffers, one dict per dtype (dtype, param, grad, backup, momentum), e.g. for
        inspection or for allocating graph-static inputs next to them."""
        return [dict(dtype=b.dtype, param=b.param, grad=b.grads[self._st.cur], backup=b.backup,
                     momentum=b.momentum) for b in self._buckets]

    # ------------------------------------------------------------------------------------
    # Gradients
    # ------------------------------------------------------------------------------------

    def _collect_grads(self) -> list[bool]:
        """Which parameters have a gradient now; a foreign ``.grad`` (made by backward after
        ``.grad`` was None) is validated, copied into the current buffer and replaced by the view.
        Raises before copying anything."""
        views = self._gviews[self._st.cur]
        present: list[bool] = []
        foreign: list[int] = []
        for i, p in enumerate(self._params):
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
                raise ValueError(f"parameter {i}: gradient {g.dtype} {tuple(g.shape)} on {g.device} does not "
                                 f"match the parameter {p.dtype} {tuple(p.shape)} on {p.device}")
            foreign.append(i)
        with torch.no_grad():
            for i in foreign:
                p = self._params[i]
                views[i].copy_(p.grad)
                p.grad = views[i]
        return present

    def _attach(self, which: int, members: Iterable[int]) -> None:
        views = self._gviews[which]
        for i in members:
            if self._params[i].grad is not views[i]:
                self._params[i].grad = views[i]

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradient buffer in place and (re-)attach the views to every parameter that
        requires grad. ``set_to_none=True`` sets every ``.grad`` to None instead (the
        reference's "parameter without gradient" semantics; the next phase copies fresh
        gradients into the buffer). Kept normal gradients are never touched."""
        self._check_layout()
        if set_to_none:
            for p in self._params:
                p.grad = None
            return
        target = 1 if self._st.normal_buf == 0 else 0
        self._ensure_grad_buffer(target)
        for bucket in self._buckets:
            bucket.grads[target].zero_()
        self._st.cur = target
        views = self._gviews[target]
        for i, p in enumerate(self._params):
            if p.requires_grad and p.grad is not views[i]:
                p.grad = views[i]

    # ------------------------------------------------------------------------------------
    # Runs and device scalars
    # ------------------------------------------------------------------------------------

    def _runs(self, key_of: Callable[[int], tuple | None]) -> list[_Run]:
        """Group the parameters into launches: consecutive slots of one bucket and one group
        with equal keys (None: not touched)."""
        runs: list[_Run] = []
        for b, bucket in enumerate(self._buckets):
            current: _Run | None = None
            for k, i in enumerate(bucket.index):
                key = key_of(i)
                if key is None:
                    current = None
                    continue
                g = self._group_of[i]
                if current is not None and current.key == key and current.group == g:
                    current.end = k + 1
                    current.members.append(i)
                else:
                    current = _Run(b, g, key, k, k + 1, [i])
                    runs.append(current)
        return runs

    def _slice(self, run: _Run, flat: torch.Tensor) -> torch.Tensor:
        lo, hi = self._buckets[run.bucket].span(run.start, run.end)
        return flat[lo:hi]

    def _lr(self, gi: int) -> torch.Tensor:
        lr = self.param_groups[gi]["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.device != self._device:
                lr = lr.to(self._device, non_blocking=True)
            if lr.dtype not in (torch.float32, torch.float64):
                lr = lr.double()
            return lr.reshape(())
        if not _real(lr) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"param group {gi}: lr must be a finite float >= 0, got {lr!r} (nothing changed; "
                             "the step is still pending)")
        if lr != self._st.lr_host[gi]:
            self._lr_dev[gi].fill_(lr)
            self._st.lr_host[gi] = lr
        return self._lr_dev[gi]

    def _device_side(self, grad_scaler: Any) -> bool:
        """Whether non-finite values are handled on the device (skip) rather than raised."""
        return (self.nonfinite == "skip" or grad_scaler is not None or torch.compiler.is_compiling()
                or _is_capturing(self._device))

    def _inv_scale(self, grad_scaler: Any) -> torch.Tensor:
        if grad_scaler is None or not grad_scaler.is_enabled():
            return self._ones
        scale = getattr(grad_scaler, "_scale", None)
        if scale is None:
            raise ValueError("grad_scaler has no scale yet: call grad_scaler.scale(loss) before the step")
        # as GradScaler.unscale_: the reciprocal in float64
        return scale.double().reciprocal().float().to(self._device)

    def _report_to_scaler(self, grad_scaler: Any) -> None:
        if grad_scaler is None or not grad_scaler.is_enabled():
            return
        from torch.amp.grad_scaler import OptState

        states = getattr(grad_scaler, "_per_optimizer_states", None)
        if states is None:
            raise RuntimeError("this torch's GradScaler has no _per_optimizer_states; cannot report the inf check")
        state = states[id(self)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("grad_scaler: this optimizer already stepped since the last update()")
        state["found_inf_per_device"] = {self._device: (self._found > 0).float()}
        state["stage"] = OptState.STEPPED

    def _bn_buffers(self) -> list[torch.Tensor]:
        if self._bn_module is None:
            return []
        out = []
        for m in self._bn_module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                out += [t for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]
        return out

    def _nonfinite_flag(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """0-d bool on the device: any element of ``tensors`` is not finite. One read of each,
        as a plain sum (multi-threaded, vectorised): a NaN or inf makes it NaN or inf; finite
        gradients could only trip it by overflowing the float32 sum (|sum| > 3.4e38)."""
        sums = torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).double()
                            for t in tensors])
        return ~torch.isfinite(sums).all()

    def _finish(self, device_side: bool, grad_scaler: Any) -> None:
        if device_side:
            self.skipped_steps.add_((self._found > 0).long())
            self._report_to_scaler(grad_scaler)
            self._found.zero_()
        self._opt_called = True  # LR schedulers check that the optimizer stepped

    # ------------------------------------------------------------------------------------
    # The phases
    # ------------------------------------------------------------------------------------

    @torch.no_grad()
    def normal_step(self, zero_grad: bool = False) -> None:
        """Keep the current gradients (the normal part's g_n, taken at w) for the coming step.

        With ``zero_grad=True`` the gradient buffer is swapped for the second one (zeroed), so
        g_n is kept without a copy; otherwise g_n is copied and ``.grad`` keeps it, as in the
        reference."""
        self._check_layout()
        if self._st.perturbed is not None:
            raise ValueError("normal_step after first_step: finish the SAM step with second_step first")
        present = self._collect_grads()
        old = self._st.cur
        new = 1 - old
        self._ensure_grad_buffer(new)
        if zero_grad:
            for bucket in self._buckets:
                bucket.grads[new].zero_()
            self._st.cur = new
            self._attach(new, [i for i, has in enumerate(present) if has])
        else:
            for bucket in self._buckets:
                bucket.grads[new].copy_(bucket.grads[old])
        self._st.normal_buf = old if zero_grad else new
        self._st.normal_present = present
        self._st.has_normal = True
        _phase_boundary()

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> None:
        """w <- w + e with e = rho * g / (n + 1e-12) (ASAM: rho * w^2 * g / (n + 1e-12)).

        n is the global norm over every parameter with a gradient, across all groups; each group
        uses its own rho. ``nonfinite="error"`` raises ValueError, touching nothing, if n is not
        finite (a host sync); device-side, such a step is skipped (see the module docstring).
        ``grad_scaler``: the GradScaler of an fp16 run (handles infs device-side)."""
        self._check_layout()
        if self._st.perturbed is not None:
            raise ValueError("first_step called twice without second_step")
        present = self._collect_grads()
        members = [i for i, has in enumerate(present) if has]
        if not members:
            raise ValueError("SharpBalanceSAM.first_step: no parameter has a gradient; call backward() first")
        views = self._gviews[self._st.cur]
        norm = self._grad_norm(members, views)
        device_side = self._device_side(grad_scaler)
        if device_side:
            bad = ~torch.isfinite(norm)
            self._found.add_(bad.float())
        elif not bool(torch.isfinite(norm)):
            raise ValueError(f"SharpBalanceSAM.first_step: the gradient norm is not finite ({norm.item()}); "
                             "parameters left unperturbed")
        inv = (norm + _SAM_EPS).reciprocal()  # rho / x is x.reciprocal() * rho in torch
        self._ensure_backup()
        if self._st.bn_saved is not None:
            torch._foreach_copy_(self._st.bn_saved, self._bn_buffers())
        scales: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        for run in self._runs(lambda i: (True,) if present[i] else None):
            bucket = self._buckets[run.bucket]
            group = self.param_groups[run.group]
            key = (run.group, bucket.dtype)
            if key not in scales:
                s = inv * group["rho"]
                # the reference's scale.to(p); bfloat16/float16 keep a float32 scale (more exact)
                s = s.to(bucket.dtype if bucket.dtype in (torch.float32, torch.float64) else torch.float32)
                if device_side:
                    s = torch.where(bad, torch.zeros_like(s), s)
                scales[key] = s
            registry.op_for("sam_perturb_", self._device)(
                self._slice(run, bucket.param), self._slice(run, bucket.backup),
                self._slice(run, bucket.grads[self._st.cur]), scales[key], bool(group["adaptive"]))
        self._st.perturbed = present
        if zero_grad:
            self.zero_grad()
        _phase_boundary()

    def _grad_norm(self, members: list[int], views: list[torch.Tensor]) -> torch.Tensor:
        adaptive = [bool(self.param_groups[self._group_of[i]]["adaptive"]) for i in members]
        if self.grad_norm == "per_tensor":
            # the release's arithmetic: the norm of the per-tensor norms, in parameter order
            plain = [views[i] for i, a in zip(members, adaptive, strict=True) if not a]
            asam = [i for i, a in zip(members, adaptive, strict=True) if a]
            norms_plain = torch._foreach_norm(plain) if plain else []
            norms_asam = (torch._foreach_norm(torch._foreach_mul(torch._foreach_abs([self._params[i] for i in asam]),
                                                                 [views[i] for i in asam])) if asam else [])
            it_plain, it_asam = iter(norms_plain), iter(norms_asam)
            norms = [next(it_asam) if a else next(it_plain) for a in adaptive]
            return torch.norm(torch.stack(norms), p=2)
        pieces = []
        present = set(members)
        for run in self._runs(lambda i: (True,) if i in present else None):
            bucket = self._buckets[run.bucket]
            g = self._slice(run, bucket.grads[self._st.cur])
            if self.param_groups[run.group]["adaptive"]:
                g = self._slice(run, bucket.param).abs() * g
            pieces.append(g)
        return ops.global_sq_norm(pieces).sqrt()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> None:
        """Restore w exactly, then the SGD step on g' (+ g_n if normal_step was called), fused.

        Without a preceding first_step it is SGD on g' + g_n (as the reference). Non-finite
        gradients: see ``nonfinite`` (an error restores w and raises; nothing else changes)."""
        self._check_layout()
        present = self._collect_grads()
        n = len(self._params)
        normal = self._st.normal_present if self._st.has_normal else [False] * n
        perturbed = self._st.perturbed or [False] * n
        cur, nb = self._st.cur, self._st.normal_buf
        device_side = self._device_side(grad_scaler)

        def key(i: int) -> tuple | None:
            if not (perturbed[i] or present[i] or normal[i]):
                return None
            return (perturbed[i], present[i], normal[i], self._st.ready_host[i])

        runs = self._runs(key)
        lrs = {run.group: self._lr(run.group) for run in runs}  # a bad lr raises before any change
        used = [self._slice(r, self._buckets[r.bucket].grads[cur]) for r in runs if r.key[1]]
        used += [self._slice(r, self._buckets[r.bucket].grads[nb]) for r in runs if r.key[2]]
        if used:
            bad = self._nonfinite_flag(used)
            if device_side:
                self._found.add_(bad.float())
            elif bool(bad):
                self._restore_only(runs)
                self._end_step()
                raise ValueError("SharpBalanceSAM.second_step: a gradient is not finite; parameters restored "
                                 "to w, no update taken")
        self._sgd(runs, grad_scaler, lambda r: self._restore_args(r, cur, nb, zero_grad), lrs)
        if not zero_grad:
            # reference: a parameter with only g_n gets p.grad = g_n; keep .grad views in one buffer
            only_normal = [i for r in runs if not r.key[1] and r.key[2] for i in r.members]
            for i in only_normal:
                self._gviews[cur][i].copy_(self._gviews[nb][i])
            self._attach(cur, only_normal)
        self._restore_bn()
        self._end_step()
        self._finish(device_side, grad_scaler)
        if zero_grad:
            self.zero_grad()
        _phase_boundary()

    def _restore_args(self, run: _Run, cur: int, nb: int | None, zero_grad: bool) -> dict[str, Any]:
        bucket = self._buckets[run.bucket]
        perturbed, has_g, has_n, _ = run.key
        if has_g:
            grad = self._slice(run, bucket.grads[cur])
            normal = self._slice(run, bucket.grads[nb]) if has_n else None
        else:
            grad = self._slice(run, bucket.grads[nb]) if has_n else None
            normal = None
        return dict(backup=self._slice(run, bucket.backup) if perturbed else None, grad=grad, normal=normal,
                    write_sum=normal is not None and not zero_grad)

    def _sgd(self, runs: list[_Run], grad_scaler: Any, args_of: Callable[[_Run], dict[str, Any]],
             lrs: dict[int, torch.Tensor]) -> None:
        inv_scale = self._inv_scale(grad_scaler)
        op = registry.op_for("sam_restore_sgd_", self._device)
        for run in runs:
            a = args_of(run)
            bucket = self._buckets[run.bucket]
            param = self._slice(run, bucket.param)
            if a["grad"] is None:  # perturbed, but no gradient at all: restore only
                param.copy_(a["backup"])
                continue
            group = self.param_groups[run.group]
            momentum = float(group["momentum"])
            if momentum != 0:
                self._ensure_momentum()
            op(param, a["backup"], a["grad"], a["normal"],
               self._slice(run, bucket.momentum) if momentum != 0 else None,
               bucket.ready[run.start:run.end] if momentum != 0 else None,
               lrs[run.group], self._found, inv_scale, float(group["weight_decay"]), momentum,
               float(group["dampening"]), bool(group["nesterov"]), a["write_sum"])
            if momentum != 0:
                for i in run.members:
                    self._st.ready_host[i] = True
        if not torch.compiler.is_compiling():
            self._sync_state()

    def _sync_state(self) -> None:
        """Point ``self.state[p]["momentum_buffer"]`` at the flat buffer's view for every
        initialised buffer. Skipped inside compiled code (dynamo may drop writes into an
        Optimizer's dict); ``state_dict`` and the next eager phase catch up."""
        if self._mviews is None:
            return
        for i, p in enumerate(self._params):
            if self._st.ready_host[i] and self.state[p].get("momentum_buffer") is not self._mviews[i]:
                self.state[p]["momentum_buffer"] = self._mviews[i]

    def _restore_only(self, runs: list[_Run]) -> None:
        for run in runs:
            if run.key[0]:
                bucket = self._buckets[run.bucket]
                self._slice(run, bucket.param).copy_(self._slice(run, bucket.backup))
        self._restore_bn()

    def _restore_bn(self) -> None:
        if self._st.perturbed is not None and self._st.bn_saved is not None:
            current = self._bn_buffers()
            if current:
                torch._foreach_copy_(current, self._st.bn_saved)

    def _end_step(self) -> None:
        self._st.perturbed = None
        self._st.has_normal = False
        self._st.normal_present = None
        self._st.normal_buf = None

    @torch.no_grad()
    def third_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> None:
        """A batch with no SAM part: the SGD step on g_n alone (the grads kept by normal_step),
        or on the current gradients when normal_step was not called."""
        self._check_layout()
        if self._st.perturbed is not None:
            raise ValueError("third_step after first_step: the parameters are at w + e; finish the SAM "
                             "step with second_step")
        present = self._collect_grads()
        n = len(self._params)
        normal = self._st.normal_present if self._st.has_normal else [False] * n
        cur, nb = self._st.cur, self._st.normal_buf
        device_side = self._device_side(grad_scaler)

        def key(i: int) -> tuple | None:
            if normal[i]:
                return (False, False, True, self._st.ready_host[i])
            if present[i]:
                return (False, True, False, self._st.ready_host[i])
            return None

        runs = self._runs(key)
        lrs = {run.group: self._lr(run.group) for run in runs}  # a bad lr raises before any change
        used = [self._slice(r, self._buckets[r.bucket].grads[nb if r.key[2] else cur]) for r in runs]
        if used:
            bad = self._nonfinite_flag(used)
            if device_side:
                self._found.add_(bad.float())
            elif bool(bad):
                self._end_step()
                raise ValueError("SharpBalanceSAM.third_step: a gradient is not finite; no update taken")
        self._sgd(runs, grad_scaler, lambda r: dict(
            backup=None, grad=self._slice(r, self._buckets[r.bucket].grads[nb if r.key[2] else cur]),
            normal=None, write_sum=False), lrs)
        if nb is not None and not zero_grad:
            # reference: p.grad = g_n afterwards; g_n's buffer becomes the current one (no copy)
            movers = [i for r in runs if r.key[1] for i in r.members]
            for i in movers:
                self._gviews[nb][i].copy_(self._gviews[cur][i])
            self._st.cur = nb
            self._attach(nb, [i for r in runs for i in r.members])
        self._end_step()
        self._finish(device_side, grad_scaler)
        if zero_grad:
            self.zero_grad()
        _phase_boundary()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Plain SAM step. Gradients at w must already be there; ``closure`` recomputes the
        loss and its gradients at w + e (forward + backward) and its return value is returned."""
        if closure is None:
            raise ValueError("SharpBalanceSAM.step requires a closure that does a forward and backward pass")
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        loss = closure()
        self.second_step()
        return loss

    # ------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.SGD's layout: ``state[i]["momentum_buffer"]`` (views of the flat
        buffer) and the param groups (with rho and adaptive)."""
        self._sync_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load our own state, a ``sbfast.reference.SAM``'s (momentum buffers from its
        ``base_optimizer`` entry), a ``torch.optim.SGD``'s, or the release NSAM's (which has
        no momentum). Momentum buffers are copied into the flat buffer."""
        if self._st.perturbed is not None or self._st.has_normal:
            raise ValueError("load_state_dict in the middle of a SAM step (after normal_step or first_step)")
        sd = dict(state_dict)
        base = sd.pop("base_optimizer", None)
        state: dict[Any, dict[str, Any]] = {}
        for k, v in sd.get("state", {}).items():
            if isinstance(v, dict) and v.get("momentum_buffer") is not None:
                state[k] = {"momentum_buffer": v["momentum_buffer"]}
        if base is not None:
            for k, v in base.get("state", {}).items():
                if isinstance(v, dict) and v.get("momentum_buffer") is not None:
                    state[k] = {"momentum_buffer": v["momentum_buffer"]}
        groups = [dict(g) for g in sd["param_groups"]]
        for gi, g in enumerate(groups):
            merged = {**self.defaults, **{k: v for k, v in g.items() if k != "params"}}
            _check_group(merged, f"state_dict param group {gi}")
        sd["state"] = state
        sd["param_groups"] = groups
        lr_tensors = [g["lr"] if isinstance(g["lr"], torch.Tensor) else None for g in self.param_groups]
        super().load_state_dict(sd)
        for gi, g in enumerate(self.param_groups):
            for key, value in self.defaults.items():
                g.setdefault(key, value)
            if lr_tensors[gi] is not None and not isinstance(g["lr"], torch.Tensor):
                # keep the user's lr tensor (captured graphs read it): fill it in place
                lr_tensors[gi].fill_(float(g["lr"]))
                g["lr"] = lr_tensors[gi]
        loaded = {id(p): self.state[p].get("momentum_buffer") for p in self._params if p in self.state}
        self.state.clear()
        for bucket in self._buckets:
            bucket.ready.zero_()
        self._st.ready_host = [False] * len(self._params)
        for i, p in enumerate(self._params):
            value = loaded.get(id(p))
            if value is not None:
                self._set_momentum(i, value)
        self._st.lr_host = [None] * len(self.param_groups)
