"""Per-sample sharpness scores (ALGORITHM.md section 3), fast.

``fisher_scores`` gives the same numbers as :func:`sbfast.reference.fisher_scores`,
s_i = ||grad_w CE(f_w(x_i), y_i)||^2 over every trainable parameter, from ONE forward and ONE
backward pass per batch instead of a vmap over per-sample gradients:

* the loss is the batch's SUM of per-sample losses, so the gradient that reaches a layer's
  output for sample i is sample i's own gradient (as long as the model does not mix samples);
* forward hooks keep each layer's input a; tensor hooks on its output receive the output
  gradient g during the backward, and the layer's per-sample squared gradient norm is computed
  right there, from a and g, and a is released (memory stays near one training step's);
* the backward computes activation gradients only: parameters enter the forward detached, so no
  weight gradient is ever formed (the identities below replace that work).

Per layer, for sample i (T = sequence or spatial positions, a_t in R^d, g_t in R^p):

* Linear on [B, d]: ||a||^2 ||g||^2, bias ||g||^2. On [B, ..., d]: ||sum_t g_t a_t^T||_F^2 by
  the direct product or by the Gram identity sum_{t,s} (a_t . a_s)(g_t . g_s)
  (``sbfast::per_sample_grad_sq_norm_direct`` / ``_gram``; :func:`choose_form` picks the
  cheaper), bias ||sum_t g_t||^2.
* Conv1d/Conv2d (any stride, padding, padding mode, dilation, groups): the input unfolded to
  [B, T, C_in/groups * k] per group is a 3-D Linear per group; bias ||sum_t g_t||^2. The direct
  form is ``sbfast::per_sample_conv_grad_sq_norm``: on CPU each sample is unfolded alone in a
  per-thread buffer (the batch's unfold is never formed), on CUDA the Triton direct kernel reads
  the unfold; the Gram form unfolds and calls the Gram op.
* BatchNorm (eval: running statistics), LayerNorm, GroupNorm, RMSNorm: the per-sample weight
  gradient is sum over the non-normalised positions of g * x_hat, the bias gradient sum of g.
* Embedding: ||sum_t onehot(tok_t) g_t^T||^2 = sum of ||sum of g_t over equal tokens||^2
  (padding_idx rows get no gradient).
* A module called several times in one forward (shared weights) has one gradient per sample:
  its calls are concatenated along T before the norm, never summed as separate norms.
* Anything else with directly-owned trainable parameters (a custom module's nn.Parameter such as
  a ViT's class token and positional embedding, a subclass that overrides ``forward``,
  weight-norm parametrisations, parameters shared between modules, a layer whose batch dimension
  is not first, a layer that never runs although its parameters reach the loss): those
  parameters only are scored with ``torch.func`` vmap(grad) over a functional call of the whole
  model, with one warning per call naming the module types. On the first batch, such a parameter
  is also tried as per-sample copies [B, ...] in the main pass (a leading 1 replaced by B, else B
  prepended): where the copies give vmap's numbers exactly (a parameter only broadcast over the
  batch, like a positional embedding), later batches take it from the single backward instead.

Also handled: a layer input modified in place after the layer read it (detected by version
counter; that input is copied from then on), a batch that runs out of memory (halved until it
fits, for the rest of the call).

What cannot be detected, and is assumed: the model's forward treats samples independently in
eval mode (no cross-sample attention, batch statistics or in-batch negatives; BatchNorm is put in
eval mode and one with ``track_running_stats=False`` is refused), every layer's first input and
output have the batch dimension first (a sequence-first layer is caught only when T != B), and a
parameter of a layer that runs is used only through that layer's forward (not also read directly
elsewhere, e.g. ``F.linear(x, self.fc.weight)`` next to ``self.fc(x)``).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset

from sbfast import ops
from sbfast.common import check_rho, module_modes, perturbed_params, restore_modes, split_params

__all__ = ["FORMS", "choose_form", "fisher_scores", "sam_loss_gap_scores", "sample_fisher_scores"]

FORMS = ("auto", "direct", "gram")

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def choose_form(t: int, d: int, p: int) -> str:
    """The cheaper way to get ||sum_t g_t a_t^T||_F^2 for T positions, input width d, output p.

    "direct" forms the p x d product: T*d*p multiply-adds per sample; "gram" forms two T x T Gram
    matrices: T^2*(d + p). Gram wins when T*(d + p) <= d*p. (The book-keeping paper's rule,
    2T^2 <= d*p, compares the memory of a materialised per-sample gradient with that of the Gram
    matrices; neither form here materialises anything large, so the rule compares arithmetic. On
    the CIFAR ResNet18's stage-2 convolutions, T=256, d=1152, p=128, the two rules disagree and
    the direct form measures faster.)
    """
    return "gram" if t * (d + p) <= d * p else "direct"


# --------------------------------------------------------------------------------------------
# Per-layer rules
# --------------------------------------------------------------------------------------------


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Half and bfloat16 values are reduced in float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _sq(v: torch.Tensor) -> torch.Tensor:
    """Row-wise squared norm of [B, ...]."""
    return _acc(v).pow(2).reshape(v.shape[0], -1).sum(1)


def _matrix_term(a: torch.Tensor, g: torch.Tensor, form: str) -> torch.Tensor:
    """||G_i^T A_i||_F^2 for a [B, T, d], g [B, T, p]."""
    if form == "auto":
        form = choose_form(a.shape[1], a.shape[2], g.shape[2])
    if form == "gram":
        return ops.per_sample_grad_sq_norm_gram(a, g)
    return ops.per_sample_grad_sq_norm_direct(a, g)


class _Rule:
    """How one module type turns (input, output gradient) pairs into per-sample squared norms."""

    params: tuple[str, ...] = ("weight", "bias")

    def capture(self, module: nn.Module, x: torch.Tensor) -> Any:
        """What the backward will need, taken in the forward hook (inside the functional call,
        so buffers are the ones in use)."""
        return x.detach()

    def inputs_of(self, ctx: Any) -> list[torch.Tensor]:
        """The captured tensors whose in-place modification would invalidate ``ctx``."""
        return [ctx]

    def score(self, module: nn.Module, calls: list[tuple[Any, torch.Tensor]], names: frozenset[str],
              form: str) -> torch.Tensor:
        raise NotImplementedError


class _LinearRule(_Rule):
    def score(self, module, calls, names, form):
        if len(calls) == 1 and calls[0][0].dim() == 2:
            a, g = calls[0]
            g_sq = _sq(g)
            total = _sq(a) * g_sq if "weight" in names else torch.zeros_like(g_sq)
            return total + g_sq if "bias" in names else total
        b = calls[0][0].shape[0]
        a = torch.cat([x.reshape(b, -1, x.shape[-1]) for x, _ in calls], 1) if len(calls) > 1 else \
            calls[0][0].reshape(b, -1, calls[0][0].shape[-1])
        g = torch.cat([y.reshape(b, -1, y.shape[-1]) for _, y in calls], 1) if len(calls) > 1 else \
            calls[0][1].reshape(b, -1, calls[0][1].shape[-1])
        total = _matrix_term(a, g, form) if "weight" in names else _sq(g[:, :0])
        if "bias" in names:
            total = total + _sq(g.sum(1))
        return total


class _ConvRule(_Rule):
    """Conv1d / Conv2d as a Linear per group on the unfolded input."""

    def capture(self, module, x):
        return x.detach(), module.weight  # the weight only gives shapes to the CPU direct path

    def inputs_of(self, ctx):
        return [ctx[0]]

    @staticmethod
    def _explicit_pad(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The input as the convolution sees it, and the zero padding left to the convolution."""
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            return F.pad(x, m._reversed_padding_repeated_twice, mode=mode), [0] * (x.dim() - 2)
        return x, list(m.padding)

    def score(self, module, calls, names, form):
        m = module
        b = calls[0][0][0].shape[0]
        total = None
        if "weight" in names:
            t = sum(g[0, 0].numel() for _, g in calls)
            d = m.weight[0].numel()
            p = m.out_channels // m.groups
            chosen = choose_form(t, d, p) if form == "auto" else form
            if chosen == "direct" and len(calls) == 1:
                (x, w), g = calls[0]
                x, pad = self._explicit_pad(m, x)
                total = ops.per_sample_conv_grad_sq_norm(x, g, w.shape, m.stride, pad, m.dilation, m.groups)
            else:
                total = self._by_unfold(m, calls, chosen)
        if "bias" in names:
            g_sum = sum(g.reshape(b, m.out_channels, -1).sum(2) for _, g in calls)
            bias = _sq(g_sum)
            total = bias if total is None else total + bias
        return total

    def _by_unfold(self, m: nn.Module, calls: list, form: str) -> torch.Tensor:
        one = m.weight.dim() == 3  # Conv1d: a 2-D unfold with a height-1 kernel
        ks = (1, *m.kernel_size) if one else tuple(m.kernel_size)
        st = (1, *m.stride) if one else tuple(m.stride)
        dl = (1, *m.dilation) if one else tuple(m.dilation)
        groups = m.groups
        a_parts, g_parts = [], []
        for (x, _), g in calls:
            b = x.shape[0]
            x, pad = self._explicit_pad(m, x)
            if one:
                x, pad = x.unsqueeze(2), [0, *pad]
            cols = F.unfold(x, ks, dilation=dl, padding=pad, stride=st)  # [B, C*k, T]
            t = cols.shape[2]
            a_parts.append(cols.view(b, groups, -1, t).transpose(2, 3))  # [B, G, T, C/G*k]
            g_parts.append(g.reshape(b, groups, m.out_channels // groups, t).transpose(2, 3))
        a = torch.cat(a_parts, 2) if len(a_parts) > 1 else a_parts[0]
        gg = torch.cat(g_parts, 2) if len(g_parts) > 1 else g_parts[0]
        b, t, d, p = a.shape[0], a.shape[2], a.shape[3], gg.shape[3]
        per_group = _matrix_term(a.reshape(b * groups, t, d), gg.reshape(b * groups, t, p), form)
        return per_group.view(b, groups).sum(1)

class _BatchNormRule(_Rule):
    def capture(self, module, x):
        # inside the functional call these are the buffers actually used by the forward
        return x.detach(), module.running_mean, module.running_var, module.eps

    def inputs_of(self, ctx):
        return [ctx[0]]

    def score(self, module, calls, names, form):
        def normalised(call):
            x, mean, var, eps = call
            shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
            return (x - mean.view(shape)).mul_(torch.rsqrt(var.view(shape) + eps))  # one temporary

        return _channel_affine_total(calls, names, lambda ctx: ctx[0], normalised)


def _channel_affine_total(calls, names, input_of, normalise) -> torch.Tensor:
    """Per-sample squared norm of a per-channel affine (weight, bias) gradient, summed over the
    layer's calls. ``calls`` yields (ctx, g) with g the output gradient [B, C, ...];
    ``input_of(ctx)`` is the input and ``normalise(ctx)`` the normalised input, computed only
    where the weight is scored."""
    gw = gb = None
    for ctx, g in calls:
        x = input_of(ctx)
        b, c = x.shape[0], x.shape[1]
        g3 = g.reshape(b, c, -1)
        if "weight" in names:
            w = (g3 * normalise(ctx).reshape(b, c, -1)).sum(2)
            gw = w if gw is None else gw + w
        if "bias" in names:
            s = g3.sum(2)
            gb = s if gb is None else gb + s
    return _norm_total(gw, gb)


def _norm_total(gw: torch.Tensor | None, gb: torch.Tensor | None) -> torch.Tensor:
    if gw is None:
        return _sq(gb)
    return _sq(gw) if gb is None else _sq(gw) + _sq(gb)


class _LayerNormRule(_Rule):
    def score(self, module, calls, names, form):
        ns = tuple(module.normalized_shape)
        gw = gb = None
        for x, g in calls:
            dims = tuple(range(1, x.dim() - len(ns)))  # positions within a sample
            if "weight" in names:
                x_hat = F.layer_norm(x, ns, None, None, module.eps)
                w = (g * x_hat).sum(dims) if dims else g * x_hat
                gw = w if gw is None else gw + w
            if "bias" in names:
                s = g.sum(dims) if dims else g
                gb = s if gb is None else gb + s
        return _norm_total(gw, gb)


class _RMSNormRule(_Rule):
    params = ("weight",)

    def score(self, module, calls, names, form):
        ns = tuple(module.normalized_shape)
        gw = None
        for x, g in calls:
            dims = tuple(range(1, x.dim() - len(ns)))
            w = g * F.rms_norm(x, ns, None, module.eps)
            w = w.sum(dims) if dims else w
            gw = w if gw is None else gw + w
        return _sq(gw)


class _GroupNormRule(_Rule):
    def score(self, module, calls, names, form):
        return _channel_affine_total(
            calls, names, lambda x: x, lambda x: F.group_norm(x, module.num_groups, None, None, module.eps)
        )


class _EmbeddingRule(_Rule):
    params = ("weight",)

    def score(self, module, calls, names, form):
        b = calls[0][0].shape[0]
        tok = torch.cat([x.reshape(b, -1) for x, _ in calls], 1)  # [B, T]
        g = torch.cat([y.reshape(b, -1, y.shape[-1]) for _, y in calls], 1)  # [B, T, d]
        g = _acc(g)
        if module.padding_idx is not None:  # that row never receives a gradient
            g = g * (tok != module.padding_idx).unsqueeze(-1).to(g.dtype)
        t = tok.shape[1]
        if t == 1:
            return _sq(g)
        # sum g rows per (sample, token) without a [B, V, d] buffer: sort the keys, give each run
        # of equal keys a segment id, add rows into their segment, square, add per sample
        vocab = module.num_embeddings
        key = (torch.arange(b, device=tok.device).unsqueeze(1) * vocab + tok).reshape(-1)
        key, order = torch.sort(key)
        start = torch.ones_like(key, dtype=torch.bool)
        start[1:] = key[1:] != key[:-1]
        seg = torch.cumsum(start, 0) - 1
        rows = g.reshape(b * t, -1).index_select(0, order)
        sums = torch.zeros_like(rows).index_add_(0, seg, rows)
        seg_sample = torch.zeros(b * t, dtype=torch.long, device=tok.device).scatter_(0, seg, key // vocab)
        return torch.zeros(b, dtype=g.dtype, device=g.device).index_add_(0, seg_sample, sums.pow(2).sum(1))


_RULES: list[tuple[type, _Rule]] = [
    (nn.Linear, _LinearRule()),
    (nn.Conv1d, _ConvRule()),
    (nn.Conv2d, _ConvRule()),
    (nn.modules.batchnorm._BatchNorm, _BatchNormRule()),
    (nn.LayerNorm, _LayerNormRule()),
    (nn.GroupNorm, _GroupNormRule()),
    (nn.Embedding, _EmbeddingRule()),
]
if hasattr(nn, "RMSNorm"):
    _RULES.append((nn.RMSNorm, _RMSNormRule()))


def _rule_for(module: nn.Module, names: frozenset[str]) -> _Rule | None:
    """The rule for ``module`` if its forward is the stock one and it owns only the parameters
    the rule knows; None sends the module to the vmap fallback."""
    for base, rule in _RULES:
        if isinstance(module, base):
            if type(module).forward is not base.forward:
                return None
            if not names <= set(rule.params):
                return None
            if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
                return None  # max_norm rewrites weights in the forward; freq scaling mixes samples
            if isinstance(module, (nn.Conv1d, nn.Conv2d)) and getattr(module, "transposed", False):
                return None
            return rule
    return None


# --------------------------------------------------------------------------------------------
# The scorer: hooks, one forward + one backward per batch, fallbacks
# --------------------------------------------------------------------------------------------


class _InputModified(Exception):
    """A layer's input was modified in place after the layer read it: capture a copy instead."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(type(module).__name__)
        self.module = module


@dataclass
class _Calls:
    rule: _Rule
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


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


class _Scorer:
    """Per-sample squared gradient norms of one model, batch by batch."""

    def __init__(self, model: nn.Module, device: torch.device | str | None, form: str) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.model, self.form = model, form
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError("model has no trainable parameters (requires_grad=True); nothing to score")
        first = next(iter(trainable.values()))
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
        self.rules: dict[nn.Module, tuple[_Rule, frozenset[str]]] = {}
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
            rule = None if shared else _rule_for(m, names)
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
        self._warn_fallback(list(self.fallback))

    # ---- hooks --------------------------------------------------------------------------

    def __enter__(self) -> _Scorer:
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
        if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.dim() >= 1
                and output.dim() >= 1 and x.shape[0] == st.size and output.shape[0] == st.size):
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
        out = functional_call(self.model, (params, self.fixed), (x,))
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model must map [b, ...] to logits [b, C], got {shape}")
        return out

    @staticmethod
    def _check_targets(y: torch.Tensor, n_classes: int) -> None:
        if y.device.type == "cpu":
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= n_classes:
                raise ValueError(f"targets must lie in [0, {n_classes}) (the model's outputs), got [{lo}, {hi}]")
        else:  # no host sync on an accelerator: the check fails asynchronously
            torch._assert_async(((y >= 0) & (y < n_classes)).all(), "targets out of range")

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
                self._check_targets(y_host, out.shape[1])
                loss = F.cross_entropy(out, y, reduction="sum")
                if loss.requires_grad:
                    grads = torch.autograd.grad(loss, [dummy, *copies.values()], allow_unused=True)
                    for n, gr in zip(copies, grads[1:], strict=True):
                        st.expanded[n] = _sq(gr).to(self.acc_dtype) if gr is not None else torch.zeros_like(st.total)
                del out, loss
            for module in list(st.calls):  # calls whose output never reached the loss
                self._consume(st, module)
        finally:
            self.state = None
        return st

    def _main_pass_retrying(self, x: torch.Tensor, y: torch.Tensor, y_host: torch.Tensor,
                            expand: list[str]) -> _BatchState:
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
            out = functional_call(self.model, ({**rest, **fb_params}, self.fixed), (x1.unsqueeze(0),))
            return F.cross_entropy(out, y1.unsqueeze(0))

        grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(fb, x, y)
        return {n: _sq(gr).to(self.acc_dtype) for n, gr in grads.items()}

    def score(self, x: torch.Tensor, y: torch.Tensor, y_host: torch.Tensor) -> torch.Tensor:
        """[b] scores of one batch (x, y already on the compute device), in the accumulation dtype."""
        use = [n for n, s in self.expand_state.items() if s == "yes"]
        tries = [n for n, s in self.expand_state.items() if s == "try"]
        # a check needs two samples at least: with one, a batch-mixing use cannot show
        trial = [] if x.shape[0] < 2 else (tries[:1] if self.expand_single else tries)
        try:
            st = self._main_pass_retrying(x, y, y_host, use + trial)
        except Exception as exc:
            if not trial or _is_oom(exc):
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
            ok = all(bool(((st.expanded[n] - slow[n]).abs() <= tol * slow[n].abs().max()).all())
                     for n in use + trial)
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
                if not _is_oom(exc) or stop - start == 1:
                    raise
                del exc
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                chunk = max(1, (stop - start) // 2)
                self.max_chunk = chunk
                continue
            start = stop
        return torch.cat(parts) if len(parts) > 1 else parts[0]


# --------------------------------------------------------------------------------------------
# Data handling shared by the scores
# --------------------------------------------------------------------------------------------


def _check_positive_int(value: object, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _as_loader(data: Any, batch_size: int) -> Iterable:
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a data set or a loader yielding (index, x, y), got {type(data).__name__}"
        )
    return data


def _check_batch(batch: Any) -> Batch:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
        raise ValueError("data must yield (index, x, y) triples")
    index, x, y = batch
    for name, t in (("index", index), ("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if index.dim() != 1 or y.dim() != 1 or x.dim() < 1:
        raise ValueError(
            f"expected index [b], x [b, ...], y [b]; got shapes {tuple(index.shape)}, "
            f"{tuple(x.shape)}, {tuple(y.shape)}"
        )
    if not (index.shape[0] == x.shape[0] == y.shape[0]):
        raise ValueError(f"batch sizes differ: index {index.shape[0]}, x {x.shape[0]}, y {y.shape[0]}")
    if index.is_floating_point() or y.is_floating_point() or index.dtype == torch.bool or y.dtype == torch.bool:
        raise ValueError(f"index and y must be integer tensors, got {index.dtype} and {y.dtype}")
    if index.numel() and index.device.type == "cpu" and int(index.min()) < 0:
        raise ValueError(f"sample indices must be >= 0, got min {int(index.min())}")
    return index, x, y


def _scores_by_index(indices: list[torch.Tensor], values: list[torch.Tensor], num_samples: int | None,
                     device: torch.device) -> torch.Tensor:
    if not indices:
        raise ValueError("data yielded no samples")
    index = torch.cat(indices)
    top = int(index.max())
    n = top + 1 if num_samples is None else num_samples
    if top >= n:
        raise ValueError(f"sample index {top} >= num_samples={n}")
    # mean per index: trials average, and an index never seen is NaN rather than a fake score
    sums = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, index, torch.cat(values).double())
    counts = torch.zeros(n, dtype=torch.float64, device=device).index_add_(
        0, index, torch.ones_like(index, dtype=torch.float64))
    return (sums / counts).float()


def _progress(iterable: Iterable, enabled: bool, desc: str, total: int | None) -> Iterator:
    if not enabled:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, unit="batch"))


def _length(loader: Iterable, trials: int) -> int | None:
    try:
        return len(loader) * trials  # type: ignore[arg-type]
    except TypeError:
        return None


def _eval_mode(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    modes = module_modes(model)
    model.eval()  # BatchNorm on running statistics, no dropout; running stats stay untouched
    stuck = [type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if stuck:
        restore_modes(modes)
        raise ValueError(f"{', '.join(stuck)} stayed in training mode after model.eval(): batch statistics "
                         "would mix samples; per-sample scores need eval-mode normalisation")
    return modes


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def fisher_scores(
    model: nn.Module,
    data: Iterable[Batch] | Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    trials: int = 1,
    progress: bool = True,
    num_samples: int | None = None,
    form: str = "auto",
) -> torch.Tensor:
    """Per-sample squared gradient norm s_i = ||grad_w CE(f_w(x_i), y_i)||^2 (ALGORITHM.md §3).

    Same numbers as :func:`sbfast.reference.fisher_scores`, from one forward and one backward
    pass per batch (see the module docstring for the per-layer identities and assumptions).

    Args:
        model: maps x [b, ...] to logits [b, C]. Scored in eval mode; every module's mode is
            restored after, also on error. Its weights are never written.
        data: a data set yielding single (index, x, y) samples (batched here by ``batch_size``)
            or a loader yielding (index int [b], x [b, ...], y int [b]) batches (re-iterated per
            trial; batches larger than ``batch_size`` are split).
        batch_size: most samples per forward pass. Results do not depend on it beyond float
            rounding. A chunk that runs out of memory is halved, for the rest of the call.
        device: where to compute (default: the model's); the model itself is not moved.
        trials: passes over the data; the score is their mean (for random augmentation).
        progress: show a tqdm progress bar.
        num_samples: N; default max index seen + 1.
        form: "auto" (per layer, :func:`choose_form`), or force "direct" / "gram" everywhere.
    Returns:
        float32 [N] on the compute device; entry i is the mean score of sample i over the times it
        was seen, NaN for an index never seen. Computed in the dtype of the model's first
        trainable parameter (float64 models keep float64 until the final cast).
    Raises:
        ValueError: no trainable parameters, empty data, targets outside [0, C), bad sizes,
            BatchNorm without running statistics (it mixes samples even in eval mode).
        TypeError: data that is not a data set or loader.
    """
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(trials, "trials")
    if num_samples is not None:
        _check_positive_int(num_samples, "num_samples", 0)
    loader = _as_loader(data, batch_size)
    scorer = _Scorer(model, device, form)
    indices: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    modes = _eval_mode(model)
    try:
        with scorer:
            batches = (b for _ in range(trials) for b in loader)
            for batch in _progress(batches, progress, "fisher scores", _length(loader, trials)):
                index, x, y = _check_batch(batch)
                for start in range(0, index.shape[0], batch_size):  # empty batches add nothing
                    sl = slice(start, start + batch_size)
                    xb = x[sl].to(scorer.device, scorer.dtype) if x.is_floating_point() else x[sl].to(scorer.device)
                    values.append(scorer.score_split(xb, y[sl].to(scorer.device).long(), y[sl]).detach())
                    indices.append(index[sl].to(scorer.device).long())
    finally:
        restore_modes(modes)
    return _scores_by_index(indices, values, num_samples, scorer.device)


def sample_fisher_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, form: str = "auto") -> torch.Tensor:
    """The scores of one batch, in the model's precision: [b] float32 (float64 for a float64
    model), on the model's device. Same rules and eval-mode handling as :func:`fisher_scores`."""
    scorer = _Scorer(model, None, form)
    modes = _eval_mode(model)
    try:
        with scorer:
            xb = x.to(scorer.device, scorer.dtype) if x.is_floating_point() else x.to(scorer.device)
            return scorer.score_split(xb, y.to(scorer.device).long(), y).detach()
    finally:
        restore_modes(modes)


def sam_loss_gap_scores(
    model: nn.Module,
    data: Iterable[Batch] | Dataset,
    rho: float,
    *,
    batch_size: int = 256,
    adaptive: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    num_samples: int | None = None,
) -> torch.Tensor:
    """Per-sample SAM loss gap l_i(w + e) - l_i(w), e the SAM perturbation of the batch's mean loss.

    As :func:`sbfast.reference.sam_loss_gap_scores`, batch by batch: one forward at w (with the
    graph), one backward of the batch-mean loss for e (section 2's global norm, ASAM if
    ``adaptive``), one forward at w + e without a graph. w + e lives only in a functional call:
    the model's weights are never written. e is per batch, so the score depends on the batching:
    loader batches are used as they come (a data set is batched by ``batch_size``). A batch that
    runs out of memory is processed in chunks with the gradient accumulated over them, which
    keeps its e (up to float rounding).

    Returns:
        float32 [N] on the compute device, NaN for unseen indices.
    """
    check_rho(rho)
    _check_positive_int(batch_size, "batch_size")
    if num_samples is not None:
        _check_positive_int(num_samples, "num_samples", 0)
    loader = _as_loader(data, batch_size)
    params, fixed, dev, param_dtype = split_params(model, device)
    chunk: list[int | None] = [None]

    def forward(w: dict, x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (w, fixed), (x,))
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(f"model must map [b, ...] to logits [b, C], got {getattr(out, 'shape', out)}")
        return out

    def gap(x: torch.Tensor, y: torch.Tensor, y_host: torch.Tensor, size: int) -> torch.Tensor:
        b = x.shape[0]
        w = {n: p.detach().requires_grad_() for n, p in params.items()}
        losses, grads = [], None
        for start in range(0, b, size):
            with torch.enable_grad():
                out = forward(w, x[start:start + size])
                if start == 0:
                    _Scorer._check_targets(y_host, out.shape[1])
                loss = F.cross_entropy(out, y[start:start + size], reduction="none")
                # one chunk: the reference's loss.mean(), bit for bit; several: sum/b per chunk
                total = loss.mean() if size >= b else loss.sum() / b
                part = torch.autograd.grad(total, list(w.values()), allow_unused=True)
            losses.append(loss.detach())
            grads = part if grads is None else [
                a if c is None else (c if a is None else a + c) for a, c in zip(grads, part, strict=True)]
        g = {n: gi for n, gi in zip(w, grads, strict=True) if gi is not None}
        if not g:
            raise ValueError("the loss does not depend on any trainable parameter")
        w_e = perturbed_params(params, g, rho, adaptive)
        with torch.no_grad():
            loss_e = torch.cat([F.cross_entropy(forward(w_e, x[s:s + size]), y[s:s + size], reduction="none")
                                for s in range(0, b, size)])
        return loss_e - torch.cat(losses)

    def gap_split(x: torch.Tensor, y: torch.Tensor, y_host: torch.Tensor) -> torch.Tensor:
        while True:
            size = x.shape[0] if chunk[0] is None else min(x.shape[0], chunk[0])
            try:
                return gap(x, y, y_host, size)
            except Exception as exc:
                if not _is_oom(exc) or size == 1:
                    raise
                del exc
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                chunk[0] = max(1, size // 2)

    indices: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    modes = _eval_mode(model)
    try:
        for batch in _progress(loader, progress, "SAM loss gaps", _length(loader, 1)):
            index, x, y = _check_batch(batch)
            if index.numel() == 0:
                continue
            xb = x.to(dev, param_dtype) if x.is_floating_point() else x.to(dev)
            values.append(gap_split(xb, y.to(dev).long(), y).detach())
            indices.append(index.to(dev).long())
    finally:
        restore_modes(modes)
    return _scores_by_index(indices, values, num_samples, dev)
