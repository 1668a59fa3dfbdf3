"""The scorer: forward hooks and output-gradient hooks around one forward and one backward per
batch, the per-batch state, the vmap fallback (with its per-sample-copies check), and the
out-of-memory split."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from sbfast.common import check_scorable, functional_forward
from sbfast.sharpness.inputs import check_targets
from sbfast.sharpness.layer_rule import Rule, sq
from sbfast.sharpness.linear_conv import FORMS
from sbfast.sharpness.rules import rule_for

__all__ = ["Scorer", "is_oom"]


class _InputModified(Exception):
    """A layer's input was modified in place after the layer read it: capture a copy instead."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(type(module).__name__)
        self.module = module


@dataclass
class _Calls:
    rule: Rule
    names: frozenset[str]
    ctxs: list[Any] = field(default_factory=list)
    versions: list[list[int]] = field(default_factory=list)
    grads: list[torch.Tensor | None] = field(default_factory=list)
    waiting: int = 0


@dataclass
class _BatchState:
    size: int
    total: torch.Tensor  # [B] accumulated score
    dummy: torch.Tensor  # 0-d leaf that makes the first tapped outputs require grad
    form: str
    calls: dict[nn.Module, _Calls] = field(default_factory=dict)
    fired: set[nn.Module] = field(default_factory=set)
    bad: set[nn.Module] = field(default_factory=set)
    expanded: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B] squared norms


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


class Scorer:
    """Per-sample squared gradient norms of one model, batch by batch."""

    def __init__(self, model: nn.Module, device: torch.device | str | None, form: str) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.model, self.form = model, form
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError("model has no trainable parameters (requires_grad=True); nothing to score")
        first = next(iter(trainable.values()))
        check_scorable(model, device, "fisher_scores", vmapped=False)
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = first.dtype
        self.acc_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.params = {n: p.detach().to(self.device) for n, p in trainable.items()}
        self.fixed = {n: p.detach().to(self.device) for n, p in model.named_parameters() if not p.requires_grad}
        self.fixed.update({n: b.to(self.device) for n, b in model.named_buffers()})
        name_of = {id(p): n for n, p in trainable.items()}

        owners: dict[int, list[nn.Module]] = {}
        for m in model.modules():
            for p in m._parameters.values():
                if p is not None and p.requires_grad:
                    owners.setdefault(id(p), []).append(m)
        self.rules: dict[nn.Module, tuple[Rule, frozenset[str]]] = {}
        self.fallback: dict[nn.Module, list[str]] = {}
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
                raise ValueError(
                    f"{type(m).__name__} with track_running_stats=False normalises with the batch's "
                    "statistics even in eval mode, so one sample's output depends on the others; per-sample "
                    "scores of a batched pass are undefined. Use running statistics (or GroupNorm/LayerNorm)."
                )
            own = {n: p for n, p in m._parameters.items() if p is not None and p.requires_grad}
            if not own:
                continue
            names = frozenset(own)
            shared = any(len(owners[id(p)]) > 1 for p in own.values())
            rule = None if shared else rule_for(m, names)
            if rule is None:
                self.fallback[m] = [name_of[id(p)] for p in own.values()]
            else:
                self.rules[m] = (rule, names)
        # fallback parameters that may enter by broadcasting over the batch: "try" (check on the
        # next batch of >= 2 samples), "yes" (per-sample copies in the main pass), "no" (vmap)
        self.expand_state: dict[str, str] = {n: "try" for ns in self.fallback.values() for n in ns}
        self.expand_single = False
        self.clone_inputs: set[nn.Module] = set()
        self.checked_unobserved = False
        self.state: _BatchState | None = None
        self.handles: list[Any] = []
        self.max_chunk: int | None = None
        self._warned: set[str] = set()
        if self.fallback:  # these parameters' gradients may need vmap over the whole model
            check_scorable(model, device, "fisher_scores", vmapped=True)
        self._warn_fallback(list(self.fallback))

    # ---- hooks --------------------------------------------------------------------------

    def __enter__(self) -> Scorer:
        for m in self.rules:
            self.handles.append(m.register_forward_hook(self._forward_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.state = None

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        st = self.state
        if st is None or module not in self.rules or not torch.is_grad_enabled():
            return None  # outside a scoring pass (vmap fallback, checks) or under no_grad
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not (
            isinstance(x, torch.Tensor)
            and isinstance(output, torch.Tensor)
            and x.dim() >= 1
            and output.dim() >= 1
            and x.shape[0] == st.size
            and output.shape[0] == st.size
        ):
            st.bad.add(module)
            return None
        st.fired.add(module)
        rule, names = self.rules[module]
        if module in self.clone_inputs:
            x = x.detach().clone()
        ctx = rule.capture(module, x)
        calls = st.calls.get(module)
        if calls is None:
            calls = st.calls[module] = _Calls(rule, names)
        slot = len(calls.ctxs)
        calls.ctxs.append(ctx)
        calls.versions.append([t._version for t in rule.inputs_of(ctx)])
        calls.grads.append(None)
        calls.waiting += 1
        out = output
        if not out.requires_grad:
            # nothing upstream requires grad (parameters are detached): root the backward here
            out = out + st.dummy
        out.register_hook(lambda g, m=module, k=slot: self._grad_hook(m, k, g))
        return out if out is not output else None

    def _grad_hook(self, module: nn.Module, slot: int, g: torch.Tensor) -> None:
        st = self.state
        if st is None:
            return
        calls = st.calls[module]
        calls.grads[slot] = g
        calls.waiting -= 1
        if calls.waiting == 0:
            self._consume(st, module)

    def _consume(self, st: _BatchState, module: nn.Module) -> None:
        calls = st.calls.pop(module)
        pairs = []
        for ctx, versions, g in zip(calls.ctxs, calls.versions, calls.grads, strict=True):
            if g is None:
                continue  # this call's output did not reach the loss: zero gradient
            if [t._version for t in calls.rule.inputs_of(ctx)] != versions:
                raise _InputModified(module)
            pairs.append((ctx, g.detach()))
        if pairs:
            st.total += calls.rule.score(module, pairs, calls.names, st.form).to(st.total.dtype)

    # ---- one batch ----------------------------------------------------------------------

    def _warn_fallback(self, modules: list[nn.Module]) -> None:
        kinds = sorted({type(m).__name__ for m in modules} - self._warned)
        if kinds:
            self._warned.update(kinds)
            warnings.warn(
                f"sbfast.sharpness: no per-layer rule for the parameters of {', '.join(kinds)}; they are "
                "scored with torch.func vmap(grad) over the whole model (about the reference's cost), "
                "except those found to enter by broadcasting over the batch (e.g. a positional embedding), "
                "which after a check on the first batch come from the single backward",
                RuntimeWarning,
                stacklevel=4,
            )

    def _to_fallback(self, modules: Iterable[nn.Module]) -> None:
        name_of = {id(p): n for n, p in self.model.named_parameters() if p.requires_grad}
        moved = []
        for m in modules:
            if m in self.rules:
                del self.rules[m]
                self.fallback[m] = [name_of[id(p)] for p in m._parameters.values() if p is not None and p.requires_grad]
                for n in self.fallback[m]:
                    self.expand_state.setdefault(n, "try")
                moved.append(m)
        self._warn_fallback(moved)

    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = functional_forward(self.model, (params, self.fixed), (x,))
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model must map [b, ...] to logits [b, C], got {shape}")
        return out

    def _main_pass(self, x: torch.Tensor, y: torch.Tensor, y_host: torch.Tensor, expand: list[str]) -> _BatchState:
        """The forward and backward of one batch. Parameters named in ``expand`` enter as
        per-sample copies [B, ...] (a leading 1 replaced by B, else B prepended): if the model
        only broadcasts them over the batch, the gradient of copy i is sample i's own."""
        b = x.shape[0]
        dummy = torch.zeros((), dtype=self.dtype, device=self.device, requires_grad=True)
        st = _BatchState(b, torch.zeros(b, dtype=self.acc_dtype, device=self.device), dummy, self.form)
        params, copies = self.params, {}
        if expand:
            params = dict(self.params)
            for n in expand:
                p = self.params[n]
                wide = p.expand(b, *p.shape[1:]) if p.dim() and p.shape[0] == 1 else p.unsqueeze(0).expand(b, *p.shape)
                params[n] = copies[n] = wide.requires_grad_()
        self.state = st
        try:
            with torch.enable_grad():
                out = self._forward(params, x)
                check_targets(y_host, out.shape[1])
                loss = F.cross_entropy(out, y, reduction="sum")
                if loss.requires_grad:
                    grads = torch.autograd.grad(loss, [dummy, *copies.values()], allow_unused=True)
                    for n, gr in zip(copies, grads[1:], strict=True):
                        st.expanded[n] = sq(gr).to(self.acc_dtype) if gr is not None else torch.zeros_like(st.total)
                del out, loss
            for module in list(st.calls):  # calls whose output never reached the loss
                self._consume(st, module)
        finally:
            self.state = None
        return st

    def _main_pass_retrying(
        self, x: torch.Tensor, y: torch.Tensor, y_host: torch.Tensor, expand: list[str]
    ) -> _BatchState:
        while True:
            try:
                return self._main_pass(x, y, y_host, expand)
            except _InputModified as exc:
                if exc.module in self.clone_inputs:
                    raise RuntimeError(f"{type(exc.module).__name__}: input changed even when copied") from exc
                self.clone_inputs.add(exc.module)

    def _unobserved_in_use(self, unobserved: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> list[nn.Module]:
        """Modules whose forward never ran but whose parameters reach the loss (e.g. a Linear
        whose weight a parent reads directly): they need the fallback."""
        name_of = {id(p): n for n, p in self.model.named_parameters() if p.requires_grad}
        probe = {}
        for m in unobserved:
            for p in m._parameters.values():
                if p is not None and p.requires_grad:
                    probe[name_of[id(p)]] = m
        params = {n: (p.detach().requires_grad_() if n in probe else p) for n, p in self.params.items()}
        with torch.enable_grad():
            loss = F.cross_entropy(self._forward(params, x), y, reduction="sum")
            if not loss.requires_grad:  # e.g. used only under torch.no_grad(): zero gradient
                return []
            grads = torch.autograd.grad(loss, [params[n] for n in probe], allow_unused=True)
        return list({probe[n]: None for n, gr in zip(probe, grads, strict=True) if gr is not None})

    def _fallback_scores(self, x: torch.Tensor, y: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
        """Per parameter name, [b] squared norms of the per-sample gradients by vmap(grad)."""
        fb = {n: p for n, p in self.params.items() if n in names}
        rest = {n: p for n, p in self.params.items() if n not in names}

        def sample_loss(fb_params: dict, x1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
            # a batch of one, so layers that need a batch dimension work
            out = functional_forward(self.model, ({**rest, **fb_params}, self.fixed), (x1.unsqueeze(0),))
            return F.cross_entropy(out, y1.unsqueeze(0))

        try:
            grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(fb, x, y)
        except RuntimeError as exc:
            if is_oom(exc):
                raise
            kinds = sorted({type(m).__name__ for m, ns in self.fallback.items() if set(ns) & names})
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"fisher_scores: torch.func.vmap cannot run this model sample by sample, which the "
                f"parameters of {', '.join(kinds)} (no per-layer rule) need: {first_line}"
            ) from exc
        return {n: sq(gr).to(self.acc_dtype) for n, gr in grads.items()}

    def score(self, x: torch.Tensor, y: torch.Tensor, y_host: torch.Tensor) -> torch.Tensor:
        """[b] scores of one batch (x, y already on the compute device), in the accumulation dtype."""
        use = [n for n, s in self.expand_state.items() if s == "yes"]
        tries = [n for n, s in self.expand_state.items() if s == "try"]
        # a check needs two samples at least: with one, a batch-mixing use cannot show
        trial = [] if x.shape[0] < 2 else (tries[:1] if self.expand_single else tries)
        try:
            st = self._main_pass_retrying(x, y, y_host, use + trial)
        except Exception as exc:
            if not trial or is_oom(exc):
                raise
            del exc  # the model does not take per-sample copies of (one of) these
            self._reject(trial)
            trial = []
            st = self._main_pass_retrying(x, y, y_host, use)
        newly = list(st.bad)
        if not self.checked_unobserved:
            self.checked_unobserved = True
            unobserved = [m for m in self.rules if m not in st.fired and m not in st.bad]
            if unobserved:
                newly += self._unobserved_in_use(unobserved, x, y)
        if newly:
            # their part of this batch was not counted (or, for a module that also ran batch-first,
            # counted in part): from now on, and for this batch, it comes from the fallback
            redo = any(m in st.fired for m in newly)
            self._to_fallback(newly)
            if redo:
                st = self._main_pass_retrying(x, y, y_host, use + trial)
        total = st.total
        fallback = {n for ns in self.fallback.values() for n in ns}
        if trial:
            # the check, of the whole set of copies as later batches will use it: every copied
            # parameter's per-sample norms must be vmap's; this batch keeps vmap's numbers
            slow = self._fallback_scores(x, y, fallback)
            tol = 1e-9 if self.acc_dtype == torch.float64 else 1e-4
            ok = all(bool(((st.expanded[n] - slow[n]).abs() <= tol * slow[n].abs().max()).all()) for n in use + trial)
            if ok:
                for n in trial:
                    self.expand_state[n] = "yes"
            else:  # the copies changed the forward itself: the layers' part must be redone too
                self._reject(trial)
                total = self._main_pass_retrying(x, y, y_host, use).total
            return total + sum(slow.values())
        for n in use:
            total = total + st.expanded[n]
        if fallback - set(use):
            total = total + sum(self._fallback_scores(x, y, fallback - set(use)).values())
        return total

    def _reject(self, trial: list[str]) -> None:
        """Copies of several parameters failed together: from now on try them one at a time;
        one alone failed: it stays with vmap."""
        if len(trial) > 1:
            self.expand_single = True
        else:
            self.expand_state[trial[0]] = "no"

    def score_split(self, x: torch.Tensor, y: torch.Tensor, y_host: torch.Tensor) -> torch.Tensor:
        """``score`` on chunks of at most ``max_chunk`` samples; halves the chunk on out-of-memory."""
        b = x.shape[0]
        if b == 0:
            return torch.zeros(0, dtype=self.acc_dtype, device=self.device)
        chunk = b if self.max_chunk is None else min(b, self.max_chunk)
        parts, start = [], 0
        while start < b:
            stop = min(b, start + chunk)
            try:
                parts.append(self.score(x[start:stop], y[start:stop], y_host[start:stop]))
            except Exception as exc:
                if not is_oom(exc) or stop - start == 1:
                    raise
                del exc
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                chunk = max(1, (stop - start) // 2)
                self.max_chunk = chunk
                continue
            start = stop
        return torch.cat(parts) if len(parts) > 1 else parts[0]
