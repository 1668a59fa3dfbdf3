"""SharpBalanceSAM, the optimizer and its phases (normal_step, first_step, second_step,
third_step, step, restore) and its state dict.

How to use it, what the phases compute and what they do to the model: the package docstring
(:mod:`sbfast.optim`). The flat buffers are :mod:`sbfast.optim.layout`'s, the GradScaler
protocol :mod:`sbfast.optim.scaler`'s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch
from torch import nn

from sbfast import ops
from sbfast.common import SAM_EPS
from sbfast.optim.batchnorm import BatchNormStats
from sbfast.optim.checks import (
    GRAD_NORM,
    NONFINITE,
    check_group,
    check_groups_at_step,
    is_capturing,
    is_real,
    nonfinite_flag,
    unique_params,
)
from sbfast.optim.layout import FlatLayout, Run
from sbfast.optim.scaler import ScalerReport, inverse_scale
from sbfast.optim.state import StepState, check_loadable, complete_groups, sgd_layout
from sbfast.optim.update import PERTURBED, RestoreArgs, UpdateKey, restore_args, update_keys

__all__ = ["SharpBalanceSAM"]


def _phase_boundary() -> None:
    """Under torch.compile, end the graph at a phase boundary, so that each phase is compiled as
    a graph of its own (no_grad, no host sync). AOTAutograd cannot functionalize a graph that
    both writes the flat buffer and differentiates through the parameters that alias it (the
    forward that follows ``first_step``); a phase alone is an inference graph, where it can."""
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break()


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
            behaviour. Its statistics are also guarded as ``bn_guard``'s.
        bn_guard: a module whose BatchNorm running statistics a step skipped or refused for a
            non-finite value puts back as they were when the step began (device-side in skip
            mode; see :mod:`sbfast.optim.batchnorm`); None: ``bn_freeze``'s module, if any.

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
        bn_guard: nn.Module | None = None,
    ) -> None:
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if grad_norm not in GRAD_NORM:
            raise ValueError(f"grad_norm must be one of {GRAD_NORM}, got {grad_norm!r}")
        for name, module in (("bn_freeze", bn_freeze), ("bn_guard", bn_guard)):
            if module is not None and not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be an nn.Module or None, got {type(module).__name__}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            rho=rho,
            adaptive=adaptive,
            dampening=dampening,
            nesterov=nesterov,
            maximize=False,
        )
        check_group(defaults, "SharpBalanceSAM")
        self._built = False
        self.nonfinite = nonfinite
        self.grad_norm = grad_norm
        self._bn_module = bn_freeze
        self._bn_guard_module = bn_guard if bn_guard is not None else bn_freeze
        super().__init__(params, defaults)
        self._build()

    @property
    def _opt_called(self) -> bool:
        # LR schedulers read (and their step wrapper writes) this flag on the optimizer. It lives
        # on the step state: torch 2.11's dynamo refuses any attribute write on an Optimizer in a
        # compiled step ("setattr on a user-defined object that does not have an AttributeMutation").
        return self._st.opt_called

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self._st.opt_called = bool(value)

    # ------------------------------------------------------------------------------------
    # Layout (sbfast.optim.layout)
    # ------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated first). After construction this re-points every parameter
        at new flat buffers once more (momentum and gradients carried over): do it before any
        capture or compilation, and not in the middle of a SAM step."""
        merged = {**getattr(self, "defaults", {}), **{k: v for k, v in param_group.items() if k != "params"}}
        check_group(merged, "param group")
        if not isinstance(param_group["params"], (torch.Tensor, set)):  # torch.optim refuses a set itself
            param_group = {**param_group, "params": unique_params(param_group["params"])}
        if getattr(self, "_built", False) and (self._st.perturbed is not None or self._st.has_normal):
            raise ValueError("add_param_group in the middle of a SAM step (after normal_step or first_step)")
        super().add_param_group(param_group)
        if getattr(self, "_built", False):
            self._build()

    def _build(self) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        group_of = [gi for gi, group in enumerate(self.param_groups) for _ in group["params"]]
        previous = self._layout if self._built else None
        old = self._snapshot() if self._built else None
        had_grads = previous is not None or any(p.grad is not None for p in params)
        layout = FlatLayout(params, group_of, previous)
        self._layout = layout
        self._device = device = layout.device
        if any(float(g["momentum"]) != 0 for g in self.param_groups):
            layout.ensure_momentum()
        self._st = StepState(len(params), len(self.param_groups))
        self._st.zeroed_at = [None if had_grads else self._grad_versions(0), self._grad_versions(1)]
        self._bn_frozen = BatchNormStats(self._bn_module) if self._bn_module is not None else None
        self._bn_guard = BatchNormStats(self._bn_guard_module) if self._bn_guard_module is not None else None
        self._report = ScalerReport(device)
        # [1], not 0-d: torch 2.11's dynamo drops in-place writes to a 0-d float64 CPU tensor in a
        # compiled step (it takes it for a Python float), and the lr fill_ would be lost there.
        self._lr_dev = [torch.zeros(1, dtype=torch.float64, device=device) for _ in self.param_groups]
        self._found = torch.zeros((), dtype=torch.float32, device=device)
        self._ones = torch.ones((), dtype=torch.float32, device=device)
        if not self._built:
            self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        elif self.skipped_steps.device != device:
            self.skipped_steps = self.skipped_steps.to(device)
        for i, p in enumerate(params):
            if p.requires_grad:
                p.grad = layout.grad_views[0][i]
        self._built = True
        if old is not None:
            self._restore_snapshot(old)

    @property
    def has_normal(self) -> bool:
        """Whether ``normal_step`` kept gradients for the coming step."""
        return self._st.has_normal

    @property
    def found_nonfinite(self) -> torch.Tensor:
        """The current step's skip flag: a 0-d float32 tensor on the parameters' device, > 0 when
        the step's update will be skipped for a non-finite value.

        Written only in device-side modes (``nonfinite="skip"``, a GradScaler, torch.compile, a
        CUDA graph capture): ``first_step`` adds 1 when the gradient norm is not finite (the
        perturbation is then zero), ``second_step`` / ``third_step`` add 1 when a gradient they
        use is not finite, and their update kernel takes no update where it is > 0. It is zeroed
        when the step finishes: at the end of ``second_step`` / ``third_step`` (after
        ``skipped_steps`` counted it) or by ``restore``. In ``"error"`` mode it stays 0 (the
        phases raise instead).

        The tensor itself, not a copy, and reading it is no host synchronisation: a data-parallel
        wrapper all-reduces it in place (MAX) after ``first_step``, so that every rank of a group
        skips the same steps. Rebuilding the flat buffers (a moved parameter,
        ``add_param_group``) replaces it: read it after the phase, do not keep it."""
        return self._found

    # a subclass that expects Module.to after construction (compat.NSAM) turns the warning off
    _warn_on_moved_params = True

    def _check_layout(self) -> None:
        """Rebuild the flat buffers if a parameter no longer lives in them (``Module.to`` or
        ``p.data = ...`` after construction); eager only, one ``data_ptr`` per parameter."""
        if torch.compiler.is_compiling():
            return
        if not self._layout.moved():
            return
        if self._st.perturbed is not None or self._st.has_normal:
            self._drop_step_after_move()
            raise RuntimeError(
                "parameters were moved (Module.to?) in the middle of a SAM step: they are back at w "
                "(the values before first_step, converted), the step is dropped and the optimizer "
                "re-pointed them at new flat buffers; move the model between steps"
            )
        if self._warn_on_moved_params:
            warnings.warn(
                "SharpBalanceSAM: parameters were moved (Module.to or p.data = ...) after the "
                "optimizer was built; re-pointing them at new flat buffers. Build the optimizer "
                "after moving the model.",
                RuntimeWarning,
                stacklevel=3,
            )
        self._build()

    @torch.no_grad()
    def _drop_step_after_move(self) -> None:
        """The parameters moved while at w + e: copy w from the backup into them (converted to
        their new dtype/device), drop the pending step and rebuild, so that the optimizer stays
        usable after the error instead of failing every later call."""
        perturbed = self._st.perturbed
        if perturbed is not None:
            for p, backup, was in zip(self._layout.params, self._layout.backup_views, perturbed, strict=True):
                if was:
                    p.copy_(backup)
            self._restore_bn()
        self._end_step()
        self._build()

    def _snapshot(self) -> dict[int, torch.Tensor]:
        """Momentum buffers by parameter identity, for a rebuild."""
        self._sync_state(exact=True)
        return {
            id(p): self.state[p]["momentum_buffer"].clone()
            for p in self._layout.params
            if "momentum_buffer" in self.state.get(p, {})
        }

    def _restore_snapshot(self, old: dict[int, torch.Tensor]) -> None:
        for i, p in enumerate(self._layout.params):
            if id(p) in old:
                self._set_momentum(i, old[id(p)])

    def _set_momentum(self, i: int, value: torch.Tensor) -> None:
        view = self._layout.set_momentum(i, value)
        self._st.ready_host[i] = True
        self.state[self._layout.params[i]]["momentum_buffer"] = view

    def flat_buffers(self) -> list[dict[str, Any]]:
        """The flat buffers, one dict per dtype (dtype, param, grad, backup, momentum), e.g. for
        inspection or for allocating graph-static inputs next to them."""
        return [
            dict(dtype=b.dtype, param=b.param, grad=b.grads[self._st.cur], backup=b.backup, momentum=b.momentum)
            for b in self._layout.buckets
        ]

    def _runs(self, key_of: Callable[[int], Hashable | None]) -> list[Run]:
        return self._layout.runs(key_of)

    def _slice(self, run: Run, flat: torch.Tensor) -> torch.Tensor:
        return self._layout.slice(run, flat)

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradient buffer in place and (re-)attach the views to every parameter that
        requires grad. ``set_to_none=True`` sets every ``.grad`` to None instead (the
        reference's "parameter without gradient" semantics; the next phase copies fresh
        gradients into the buffer). Kept normal gradients are never touched."""
        self._check_layout()
        layout = self._layout
        between_steps = self._st.perturbed is None and not self._st.has_normal
        if self._bn_guard and between_steps:
            self._bn_guard.save()  # what a skipped step that follows puts back
        if set_to_none:
            for p in layout.params:
                p.grad = None
            return
        target = 1 if self._st.normal_buf == 0 else 0
        layout.ensure_grad_buffer(target)
        for bucket in layout.buckets:
            bucket.grads[target].zero_()
        self._st.cur = target
        self._st.zeroed_at[target] = self._grad_versions(target)
        views = layout.grad_views[target]
        for i, p in enumerate(layout.params):
            if p.requires_grad and p.grad is not views[i]:
                p.grad = views[i]

    def _grad_versions(self, which: int) -> tuple[int, ...]:
        """The version counters of gradient buffer ``which`` (one per dtype): in-place writes, a
        backward's accumulation among them, bump them; reading them is no device access."""
        return tuple(bucket.grads[which]._version for bucket in self._layout.buckets)

    def _grads_written(self) -> bool:
        """Whether something wrote into the current gradient buffer since it was last zeroed."""
        zeroed = self._st.zeroed_at[self._st.cur]
        return zeroed is None or zeroed != self._grad_versions(self._st.cur)

    def mark_gradients_ready(self) -> None:
        """Declare the current gradients the ones to use although no backward wrote them since
        the last ``zero_grad`` (e.g. the zeros of a data-parallel rank whose slice of the batch
        was empty), so that ``first_step`` does not refuse them."""
        self._st.zeroed_at[self._st.cur] = None

    # ------------------------------------------------------------------------------------
    # Device scalars
    # ------------------------------------------------------------------------------------

    def _lr(self, gi: int) -> torch.Tensor:
        lr = self.param_groups[gi]["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.device != self._device:
                if is_capturing(self._device):  # a copy between devices cannot be captured
                    raise ValueError(
                        f"param group {gi}: lr is a tensor on {lr.device}, but a CUDA-graph capture "
                        f"needs it on the parameters' device {self._device} (nothing changed)"
                    )
                lr = lr.to(self._device, non_blocking=True)
            if lr.dtype not in (torch.float32, torch.float64):
                lr = lr.double()
            return lr.reshape(())
        if not is_real(lr) or not math.isfinite(lr) or lr < 0:
            raise ValueError(
                f"param group {gi}: lr must be a finite float >= 0, got {lr!r} (nothing changed; "
                "the step is still pending)"
            )
        if lr != self._st.lr_host[gi]:
            self._lr_dev[gi].fill_(lr)
            self._st.lr_host[gi] = lr
        return self._lr_dev[gi]

    def _device_side(self, grad_scaler: Any) -> bool:
        """Whether non-finite values are handled on the device (skip) rather than raised."""
        return (
            self.nonfinite == "skip"
            or grad_scaler is not None
            or torch.compiler.is_compiling()
            or is_capturing(self._device)
        )

    def _finish(self, device_side: bool, grad_scaler: Any) -> None:
        if device_side:
            self.skipped_steps.add_((self._found > 0).long())
            self._report(grad_scaler, self._found)
            if self._bn_guard:
                self._bn_guard.restore_where(self._found)
            self._found.zero_()
        if self._bn_guard:
            self._bn_guard.save()  # the step's end: where the next one begins
        self._st.opt_called = True  # LR schedulers check that the optimizer stepped

    def _refuse_step(self) -> None:
        """A step refused for a non-finite value (``nonfinite="error"``): the statistics the
        step's forwards changed are put back before the error is raised."""
        if self._bn_guard:
            self._bn_guard.restore()

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
        layout = self._layout
        present = layout.collect_grads(self._st.cur)
        old = self._st.cur
        new = 1 - old
        layout.ensure_grad_buffer(new)
        if zero_grad:
            for bucket in layout.buckets:
                bucket.grads[new].zero_()
            self._st.cur = new
            self._st.zeroed_at[new] = self._grad_versions(new)
            self._st.zeroed_at[old] = None  # holds g_n
            layout.attach(new, [i for i, has in enumerate(present) if has])
        else:
            for bucket in layout.buckets:
                bucket.grads[new].copy_(bucket.grads[old])
            self._st.zeroed_at[new] = None
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
        check_groups_at_step(self.param_groups, update=False)
        layout = self._layout
        present = layout.collect_grads(self._st.cur)
        members = [i for i, has in enumerate(present) if has]
        if not members:
            raise ValueError("SharpBalanceSAM.first_step: no parameter has a gradient; call backward() first")
        if not torch.compiler.is_compiling() and not self._grads_written():
            raise ValueError(
                "SharpBalanceSAM.first_step: no backward since the last zero_grad (every gradient is the zero "
                "it left); call loss.backward() first, or mark_gradients_ready() if zero gradients are meant"
            )
        views = layout.grad_views[self._st.cur]
        norm = self._grad_norm(members, views)
        device_side = self._device_side(grad_scaler)
        if device_side:
            bad = ~torch.isfinite(norm)
            self._found.add_(bad.float())
        elif not bool(torch.isfinite(norm)):
            self._refuse_step()
            raise ValueError(
                f"SharpBalanceSAM.first_step: the gradient norm is not finite ({norm.item()}); "
                "parameters left unperturbed"
            )
        inv = (norm + SAM_EPS).reciprocal()  # rho / x is x.reciprocal() * rho in torch
        layout.ensure_backup()
        if self._bn_frozen:
            self._bn_frozen.save()
        scales: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        for run in self._runs(lambda i: PERTURBED if present[i] else None):
            bucket = layout.buckets[run.bucket]
            group = self.param_groups[run.group]
            key = (run.group, bucket.dtype)
            if key not in scales:
                s = inv * group["rho"]
                # the reference's scale.to(p); bfloat16/float16 keep a float32 scale (more exact)
                s = s.to(bucket.dtype if bucket.dtype in (torch.float32, torch.float64) else torch.float32)
                if device_side:
                    s = torch.where(bad, torch.zeros_like(s), s)
                scales[key] = s
            ops.sam_perturb_(
                self._slice(run, bucket.param),
                self._slice(run, bucket.backup),
                self._slice(run, bucket.grads[self._st.cur]),
                scales[key],
                bool(group["adaptive"]),
            )
        self._st.perturbed = present
        if zero_grad:
            self.zero_grad()
        _phase_boundary()

    @torch.no_grad()
    def restore(self, zero_grad: bool = False) -> None:
        """Go back from w + e to w exactly, without an update: drop the SAM step that
        ``first_step`` began. A no-op when the parameters are not perturbed.

        Every parameter that ``first_step`` perturbed gets its backup copied back (bit for bit),
        the BatchNorm statistics saved for ``bn_freeze`` are put back, and ``found_nonfinite`` is
        cleared (the dropped step is not counted in ``skipped_steps``). Momentum, lr and the
        gradients kept by ``normal_step`` are untouched, so the next phase may be ``first_step``
        again (a new perturbation) or ``third_step``. ``zero_grad=True`` then zeroes the gradient
        buffer, perturbed or not. The release NSAM's ``back_step``."""
        self._check_layout()
        perturbed = self._st.perturbed
        if perturbed is not None:
            self._restore_only(self._runs(lambda i: PERTURBED if perturbed[i] else None))
            self._st.perturbed = None
            self._found.zero_()
        if zero_grad:
            self.zero_grad()
        _phase_boundary()

    def _grad_norm(self, members: list[int], views: list[torch.Tensor]) -> torch.Tensor:
        layout = self._layout
        adaptive = [bool(self.param_groups[layout.group_of[i]]["adaptive"]) for i in members]
        if self.grad_norm == "per_tensor":
            # the release's arithmetic: the norm of the per-tensor norms, in parameter order
            plain = [views[i] for i, a in zip(members, adaptive, strict=True) if not a]
            asam = [i for i, a in zip(members, adaptive, strict=True) if a]
            norms_plain = torch._foreach_norm(plain) if plain else []
            norms_asam = (
                torch._foreach_norm(
                    torch._foreach_mul(torch._foreach_abs([layout.params[i] for i in asam]), [views[i] for i in asam])
                )
                if asam
                else []
            )
            it_plain, it_asam = iter(norms_plain), iter(norms_asam)
            norms = [next(it_asam) if a else next(it_plain) for a in adaptive]
            return torch.norm(torch.stack(norms), p=2)
        pieces = []
        present = set(members)
        for run in self._runs(lambda i: PERTURBED if i in present else None):
            bucket = layout.buckets[run.bucket]
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
        self._update("second_step", zero_grad, grad_scaler)

    @torch.no_grad()
    def third_step(self, zero_grad: bool = False, grad_scaler: Any = None) -> None:
        """A batch with no SAM part: the SGD step on g_n alone (the grads kept by normal_step),
        or on the current gradients when normal_step was not called."""
        self._check_layout()
        if self._st.perturbed is not None:
            raise ValueError(
                "third_step after first_step: the parameters are at w + e; finish the SAM step with second_step"
            )
        self._update("third_step", zero_grad, grad_scaler)

    def _update(self, phase: str, zero_grad: bool, grad_scaler: Any) -> None:
        """The update pass of ``second_step`` and ``third_step``: one fused launch per run of
        parameters treated alike (:func:`sbfast.optim.update.update_keys`), then the phase's
        hand-over of ``.grad`` (the gradients the reference leaves there)."""
        check_groups_at_step(self.param_groups)
        layout = self._layout
        third = phase == "third_step"
        present = layout.collect_grads(self._st.cur)
        n = len(layout.params)
        normal = self._st.normal_present if self._st.has_normal else [False] * n
        perturbed = self._st.perturbed or [False] * n
        cur, nb = self._st.cur, self._st.normal_buf
        device_side = self._device_side(grad_scaler)
        keys = update_keys(perturbed, present, normal, self._st.ready_host, third)
        runs = self._runs(keys.__getitem__)
        lrs = {run.group: self._lr(run.group) for run in runs}  # a bad lr raises before any change
        used = [self._slice(r, layout.buckets[r.bucket].grads[cur]) for r in runs if r.key.grad]
        used += [self._slice(r, layout.buckets[r.bucket].grads[nb]) for r in runs if r.key.normal]
        if used:
            bad = nonfinite_flag(used)
            if device_side:
                self._found.add_(bad.float())
            elif bool(bad):
                self._restore_only(runs)
                self._end_step()
                self._refuse_step()
                restored = "parameters restored to w, " if not third else ""
                raise ValueError(f"SharpBalanceSAM.{phase}: a gradient is not finite; {restored}no update taken")
        self._sgd(runs, grad_scaler, lambda r: restore_args(layout, r, cur, nb, zero_grad), lrs)
        if not zero_grad and any(r.key.grad and r.key.normal for r in runs):
            # the fused pass wrote g' + g_n into .grad through a kernel, which bumps no version
            # counter: without this a first_step that follows would take the sum for the zeros
            # zero_grad left and refuse it
            self._st.zeroed_at[cur] = None
        if third:
            if nb is not None and not zero_grad:
                # reference: p.grad = g_n afterwards; g_n's buffer becomes the current one (no copy)
                movers = [i for r in runs if r.key.grad for i in r.members]
                for i in movers:
                    layout.grad_views[nb][i].copy_(layout.grad_views[cur][i])
                self._st.cur = nb
                self._st.zeroed_at[nb] = None
                layout.attach(nb, [i for r in runs for i in r.members])
        elif not zero_grad:
            # reference: a parameter with only g_n gets p.grad = g_n; keep .grad views in one buffer
            only_normal = [i for r in runs if not r.key.grad and r.key.normal for i in r.members]
            for i in only_normal:
                layout.grad_views[cur][i].copy_(layout.grad_views[nb][i])
            layout.attach(cur, only_normal)
        self._restore_bn()
        self._end_step()
        self._finish(device_side, grad_scaler)
        if zero_grad:
            self.zero_grad()
        _phase_boundary()

    def _sgd(
        self,
        runs: list[Run],
        grad_scaler: Any,
        args_of: Callable[[Run], RestoreArgs],
        lrs: dict[int, torch.Tensor],
    ) -> None:
        inv_scale = inverse_scale(grad_scaler, self._ones)
        layout = self._layout
        for run in runs:
            a = args_of(run)
            bucket = layout.buckets[run.bucket]
            param = self._slice(run, bucket.param)
            if a.grad is None:  # perturbed, but no gradient at all: restore only
                param.copy_(a.backup)
                continue
            group = self.param_groups[run.group]
            momentum = float(group["momentum"])
            if momentum != 0:
                layout.ensure_momentum()
            ops.sam_restore_sgd_(
                param,
                a.backup,
                a.grad,
                a.normal,
                self._slice(run, bucket.momentum) if momentum != 0 else None,
                bucket.ready[run.start : run.end] if momentum != 0 else None,
                lrs[run.group],
                self._found,
                inv_scale,
                float(group["weight_decay"]),
                momentum,
                float(group["dampening"]),
                bool(group["nesterov"]),
                a.write_sum,
            )
            if momentum != 0:
                for i in run.members:
                    self._st.ready_host[i] = True
        if not torch.compiler.is_compiling():
            self._sync_state()

    def _sync_state(self, exact: bool = False) -> None:
        """Point ``self.state[p]["momentum_buffer"]`` at the flat buffer's view for every
        initialised buffer. Skipped inside compiled code (dynamo may drop writes into an
        Optimizer's dict); ``state_dict`` and the next eager phase catch up.

        The host mirror of the first-step flags assumes that every update was taken; in
        device-side mode (``nonfinite="skip"``, a GradScaler, a capture) the device may have
        skipped one. ``exact=True`` reads the device's flags first (a host sync), so that a
        buffer that no update started has no entry, as in torch.optim.SGD: a zero buffer
        counted as started would change the next update wherever dampening is not zero."""
        if exact:
            self._st.ready_host = self._layout.started()
        views = self._layout.momentum_views
        if views is None:
            return
        for i, p in enumerate(self._layout.params):
            if self._st.ready_host[i]:
                if self.state[p].get("momentum_buffer") is not views[i]:
                    self.state[p]["momentum_buffer"] = views[i]
            elif p in self.state:
                self.state[p].pop("momentum_buffer", None)
                if not self.state[p]:
                    del self.state[p]

    def _restore_only(self, runs: list[Run]) -> None:
        for run in runs:
            if run.key is PERTURBED or (isinstance(run.key, UpdateKey) and run.key.perturbed):
                bucket = self._layout.buckets[run.bucket]
                self._slice(run, bucket.param).copy_(self._slice(run, bucket.backup))
        self._restore_bn()

    def _restore_bn(self) -> None:
        """``bn_freeze``: the statistics as first_step saved them (the forward at w + e's undone)."""
        if self._st.perturbed is not None and self._bn_frozen:
            self._bn_frozen.restore()

    def _end_step(self) -> None:
        self._st.perturbed = None
        self._st.has_normal = False
        self._st.normal_present = None
        self._st.normal_buf = None

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
        buffer; only those that an update started, read from the device) and the param groups
        (with rho and adaptive)."""
        self._sync_state(exact=True)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load our own state, a ``sbfast.reference.SAM``'s (momentum buffers from its
        ``base_optimizer`` entry), a ``torch.optim.SGD``'s, or the release NSAM's (which has
        no momentum). Momentum buffers are copied into the flat buffer.

        Everything is checked before anything changes (the groups' count, sizes and
        hyperparameters, every momentum buffer's type and shape): a state dict that does not fit
        raises ValueError and leaves the optimizer as it was."""
        if self._st.perturbed is not None or self._st.has_normal:
            raise ValueError("load_state_dict in the middle of a SAM step (after normal_step or first_step)")
        sd = sgd_layout(state_dict, self.defaults)
        check_loadable(sd, self.param_groups)
        lr_tensors = [g["lr"] if isinstance(g["lr"], torch.Tensor) else None for g in self.param_groups]
        super().load_state_dict(sd)
        complete_groups(self.param_groups, self.defaults, lr_tensors)
        params = self._layout.params
        loaded = {id(p): self.state[p].get("momentum_buffer") for p in params if p in self.state}
        self.state.clear()
        for bucket in self._layout.buckets:
            bucket.ready.zero_()
        self._st.ready_host = [False] * len(params)
        for i, p in enumerate(params):
            value = loaded.get(id(p))
            if value is not None:
                self._set_momentum(i, value)
        self._st.lr_host = [None] * len(self.param_groups)
        if self._bn_guard:
            self._bn_guard.save()
