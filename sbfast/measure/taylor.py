"""v^T H v by second-order forward mode ("Taylor mode"): no gradient graph, no backward pass.

For a direction v over the P trainable parameter entries, put w(t) = w + t v. Every tensor z of
the forward becomes a Taylor triple (z, z', z'') at t = 0, carried alongside the ordinary
forward, k directions at once (the derivative parts are [k, *z.shape]; the primal is computed
once). With L(t) the mean cross-entropy over the samples, L''(0) = v^T H v exactly: the same
number a double backward gives, for about four forwards' work per direction (three when the
primal is replayed, below) instead of a forward, a gradient graph and a backward through it.

Rules (x an input triple, W + tV a parameter, constants have zero derivatives, z'' = 0 for a
parameter since w(t) is linear in t):

- ``conv1d/2d/3d``, ``linear``: y = op(x, W) + b
    y' = op(x', W) + op(x, V) + V_b,    y'' = op(x'', W) + 2 op(x', V)
- ``batch_norm`` on running statistics (eval): y = a x + (beta - m a), a = gamma / sqrt(var + eps)
    y' = a x' + (V_gamma / s)(x - m) + V_beta,    y'' = a x'' + 2 (V_gamma / s) x'
- ``relu``, ``max_pool``: piecewise linear, the primal chooses (the mask x > 0, the max's
  index, as autograd does) and z', z'' follow the same choice
- ``add``, ``sub``, average pooling, ``flatten``, ``reshape``, ``view``, dropout in eval:
  linear, so applied to each part
- the loss, L = (1/N) sum_n CE(z_n, y_n) with p_n = softmax(z_n):
    L'' = (1/N) sum_n [ z'_n^T (diag p_n - p_n p_n^T) z'_n + (p_n - e_{y_n})^T z''_n ]

The forward is followed with a ``TorchFunctionMode``, so every model built from those functions
works, whatever its Python structure (functional calls, residual sums, in-place ReLU). A function
without a rule that meets a tensor carrying a derivative (LayerNorm, attention, GELU, ...)
raises :class:`NoTaylorRule`; :func:`sbfast.measure.hessian_trace` then uses the double backward
(``hvp_mode="auto"``), and says which it used.

Repeated calls on one chunk (the trace's probes) replay the primal: the first forward (the
starting-point check, through :meth:`TaylorCurvature.record`) is kept as a tape of every call's
result, and what the rules derive from the primal alone (ReLU masks, centred BatchNorm inputs,
pooling indices, channels-last copies of convolution inputs) is kept beside it, so a later
probe computes derivatives only: about three forwards' work. The tape is checked call by call
(a forward that takes another path is recorded again) and not kept for a forward with an
in-place function. Derivatives of 4-d tensors are laid out channels-last (mkldnn's convolutions
run 2x faster so on this CPU), and the kept primal values are stored the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["NoTaylorRule", "TaylorCurvature"]

Parts = tuple[Tensor | None, Tensor | None]  # (z' [k, *z.shape] or None for 0, z'' likewise)


class NoTaylorRule(RuntimeError):
    """The model's forward calls a function that has no second-order forward rule here."""


def _plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _scaled(a: Tensor | None, s: float) -> Tensor | None:
    if a is None or s == 0:
        return None
    return a if s == 1 else a * s


def _like_derivatives(t: Tensor) -> Tensor:
    """A kept primal value in the derivatives' layout (channels-last for 4-d: the derivative
    convolutions' outputs), so the elementwise rules read both in the same order."""
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _stack(parts: list[Tensor]) -> Tensor:
    """[k] tensors -> [k, ...]; one direction without a copy."""
    return parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)


def _each(fn: Callable[[Tensor], Tensor], d: Tensor | None) -> Tensor | None:
    """A function of one sample-shaped tensor, applied to each of the k derivative parts."""
    return None if d is None else _stack([fn(d[j]) for j in range(d.shape[0])])


class _Rules:
    """The rules, keyed by the torch functions a forward reaches (see the module docstring)."""

    def __init__(self, table: WeakTensorKeyDictionary, k: int) -> None:
        self.table = table
        self.k = k
        self.memo: dict[str, Any] = {}  # the current call's values derived from the primal alone

    def kept(self, key: str, make: Callable[[], Any]) -> Any:
        """A value that depends on the primal only: made on the recorded pass, then replayed."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def varies(self, t: Any) -> bool:
        return isinstance(t, Tensor) and t in self.table

    def parts(self, t: Any) -> Parts:
        return self.table[t] if self.varies(t) else (None, None)

    # y = op(x, W) + b, op bilinear: conv*d, linear
    def affine_layer(self, func: Callable, out: Tensor, args: tuple, kwargs: dict) -> Parts:
        x, w, *rest = args
        b = rest.pop(0) if rest else kwargs.pop("bias", None)
        x1, x2 = self.parts(x)
        v_w, w2 = self.parts(w)
        v_b, b2 = self.parts(b)
        if w2 is not None or b2 is not None:
            raise NoTaylorRule(f"{func.__name__} with a weight that is not a parameter")

        k, n = self.k, x.shape[0]
        # the derivative convolutions in channels-last (2x faster than NCHW in mkldnn on CPU);
        # the primal keeps the model's own layout, which its code may rely on (.view)
        layout = torch.channels_last if func is torch.conv2d else None

        def fmt(t: Tensor) -> Tensor:
            return t if layout is None else t.contiguous(memory_format=layout)

        def call(t: Tensor, weight: Tensor) -> Tensor:
            return func(fmt(t), weight, None, *rest, **kwargs)

        # op(x', W), op(x'', W): the k directions as one batch of k*N samples
        d1 = None if x1 is None else call(x1.flatten(0, 1), w).unflatten(0, (k, n))
        d2 = None if x2 is None else call(x2.flatten(0, 1), w).unflatten(0, (k, n))
        if v_w is not None:
            xf = self.kept("x", lambda: fmt(x))
            d1 = _plus(d1, _stack([call(xf, v_w[j]) for j in range(k)]))
            if x1 is not None:
                quad = _stack([call(x1[j], v_w[j]) for j in range(k)])
                d2 = quad.mul_(2) if d2 is None else d2.add_(quad, alpha=2)
        if v_b is not None:
            if func is F.linear:  # out [..., C_out]
                vb = v_b.reshape(self.k, *([1] * (out.dim() - 1)), -1)
            else:  # out [N, C_out, *spatial]
                vb = v_b.reshape(self.k, 1, -1, *([1] * (out.dim() - 2)))
            d1 = vb.expand(self.k, *out.shape) if d1 is None else d1 + vb
        return d1, d2

    def batch_norm(self, out: Tensor, bound: inspect.BoundArguments) -> Parts:
        a = bound.arguments
        x, mean, var = a["input"], a["running_mean"], a["running_var"]
        gamma, beta = a.get("weight"), a.get("bias")
        if a.get("training", False) or mean is None or var is None:
            raise NoTaylorRule("batch_norm on batch statistics (BatchNorm in train mode or without running stats)")
        if self.varies(mean) or self.varies(var):
            raise NoTaylorRule("batch_norm with statistics that depend on the parameters")
        x1, x2 = self.parts(x)
        v_g, g2 = self.parts(gamma)
        v_b, b2 = self.parts(beta)
        if g2 is not None or b2 is not None:
            raise NoTaylorRule("batch_norm with an affine weight that is not a parameter")
        shape = (1, -1) + (1,) * (x.dim() - 2)  # per channel, dimension 1
        inv_s = self.kept("inv_s", lambda: torch.rsqrt(var + a.get("eps", 1e-5)).reshape(shape))
        scale = self.kept("scale", lambda: inv_s if gamma is None else gamma.reshape(shape) * inv_s)
        d1 = None if x1 is None else x1 * scale
        d2 = None if x2 is None else x2 * scale
        if v_g is not None:
            dscale = v_g.reshape(self.k, *shape) * inv_s  # [k, 1, C, 1, ...]
            centred = self.kept("centred", lambda: _like_derivatives(x - mean.reshape(shape)))
            d1 = dscale * centred if d1 is None else d1.addcmul_(dscale, centred)
            if x1 is not None:
                d2 = 2 * dscale * x1 if d2 is None else d2.addcmul_(dscale, x1, value=2)
        if v_b is not None:
            vb = v_b.reshape(self.k, *shape)
            d1 = vb.expand(self.k, *out.shape) if d1 is None else d1 + vb
        return d1, d2

    def relu(self, out: Tensor, x: Tensor) -> Parts:
        x1, x2 = self.parts(x)
        mask = self.kept("mask", lambda: _like_derivatives(out > 0))  # relu(x) > 0 exactly where x > 0
        return (None if x1 is None else x1 * mask), (None if x2 is None else x2 * mask)

    def max_pool(self, func: Callable, bound: inspect.BoundArguments) -> Parts:
        a = dict(bound.arguments)
        x = a.pop("input")
        if a["return_indices"] or x.dim() != _POOL_DIMS[func]:
            raise NoTaylorRule("max_pool with return_indices or without a batch dimension")
        a["return_indices"] = True
        idx = self.kept("idx", lambda: func(x, **a)[1])
        x1, x2 = self.parts(x)

        def pick(d: Tensor) -> Tensor:  # d [k, N, C, *spatial] -> the entries at the maxima
            flat_idx = idx.flatten(2).unsqueeze(0).expand(d.shape[0], -1, -1, -1)
            return d.flatten(3).gather(3, flat_idx).reshape(d.shape[0], *idx.shape)

        return (None if x1 is None else pick(x1)), (None if x2 is None else pick(x2))

    def linear_each(self, func: Callable, args: tuple, kwargs: dict) -> Parts:
        x, *rest = args
        x1, x2 = self.parts(x)
        for t in tree_leaves((rest, kwargs)):
            if self.varies(t):
                raise NoTaylorRule(f"{getattr(func, '__name__', func)} with more than one varying input")
        # a derivative may be laid out channels-last where the primal is not: reshape, not view
        fn = Tensor.reshape if func is Tensor.view else func
        return _each(lambda d: fn(d, *rest, **kwargs), x1), _each(lambda d: fn(d, *rest, **kwargs), x2)

    def add(self, out: Tensor, args: tuple, kwargs: dict, sign: float) -> Parts:
        a, b = args[0], args[1]
        alpha = kwargs.get("alpha", 1)
        s = sign * alpha

        def aligned(t: Any, d: Tensor | None) -> Tensor | None:
            # [k, *t.shape] -> [k, 1.., *t.shape]: t broadcasts against the result from the right
            return None if d is None else d.reshape(self.k, *([1] * (out.dim() - t.dim())), *t.shape)

        def full(d: Tensor | None) -> Tensor | None:  # broadcast to the result's shape
            return None if d is None else d.expand(self.k, *out.shape) if d.shape[1:] != out.shape else d

        (a1, a2), (b1, b2) = self.parts(a), self.parts(b)
        a1, a2, b1, b2 = aligned(a, a1), aligned(a, a2), aligned(b, b1), aligned(b, b2)
        return full(_plus(a1, _scaled(b1, s))), full(_plus(a2, _scaled(b2, s)))


def _bind(func: Callable, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound


_CONV = {torch.conv1d, torch.conv2d, torch.conv3d, F.linear}
_RELU = {F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
_MAX_POOL = {  # the boolean-dispatch names the modules call -> the form that gives the indices
    F.max_pool1d: F.max_pool1d_with_indices,
    F.max_pool2d: F.max_pool2d_with_indices,
    F.max_pool3d: F.max_pool3d_with_indices,
}
_POOL_DIMS = {F.max_pool1d_with_indices: 3, F.max_pool2d_with_indices: 4, F.max_pool3d_with_indices: 5}
_ADD = {torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__iadd__, Tensor.__radd__}
_SUB = {torch.sub, Tensor.sub, Tensor.sub_, Tensor.__sub__, Tensor.__isub__}
_LINEAR = {
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    torch.flatten,
    Tensor.flatten,
    torch.reshape,
    Tensor.reshape,
    Tensor.view,
    Tensor.contiguous,
    torch.squeeze,
    Tensor.squeeze,
    torch.unsqueeze,
    Tensor.unsqueeze,
}


def _in_place(func: Callable, args: tuple, kwargs: dict) -> bool:
    name = getattr(func, "__name__", "")
    if name.endswith("_") and not name.endswith("__") or name.startswith("__i"):
        return True
    return bool(kwargs.get("inplace", args[1] if func is F.relu and len(args) > 1 else False))


class _Tape:
    """One chunk's primal forward, kept after the first pass: every call the forward made, its
    result and what the rules derived from the primal alone (masks, centred inputs, pooling
    indices, channels-last copies). Later passes return the kept results and compute only the
    derivatives: about a fifth less work per direction. A forward with an in-place function
    is not kept (a later call could change a kept result)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable, Any, dict[str, Any]]] = []
        self.keep = True


class _TapeMismatch(RuntimeError):
    """A replayed forward called another function than the recorded one at some position."""


class _Follow(TorchFunctionMode):
    def __init__(self, rules: _Rules, tape: _Tape, replay: bool) -> None:
        super().__init__()
        self.rules = rules
        self.tape = tape
        self.replay = replay
        self.position = 0

    def _primal(self, func: Callable, args: tuple, kwargs: dict, varying: bool) -> Any:
        i, self.position = self.position, self.position + 1
        if self.replay:
            if i >= len(self.tape.calls) or self.tape.calls[i][0] is not func:
                raise _TapeMismatch(f"call {i}")
            _, out, self.rules.memo = self.tape.calls[i]
            return out
        if _in_place(func, args, kwargs):
            if varying and isinstance(args[0], Tensor) and args[0]._is_view():
                # the primal would change under another tensor's name, its derivatives would not
                raise NoTaylorRule(f"in-place {getattr(func, '__name__', func)} on a view")
            self.tape.keep = False
        out = func(*args, **kwargs)
        self.rules.memo = {}
        self.tape.calls.append((func, out, self.rules.memo))
        return out

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        rules = self.rules
        varying = any(isinstance(t, Tensor) and t in rules.table for t in tree_leaves((args, kwargs)))
        out = self._primal(func, args, kwargs, varying)
        if not varying or not any(isinstance(t, Tensor) for t in tree_leaves(out)):
            return out
        if func in _CONV:
            parts = rules.affine_layer(func, out, args, kwargs)
        elif func is F.batch_norm:
            parts = rules.batch_norm(out, _bind(func, args, kwargs))
        elif func in _RELU:
            parts = rules.relu(out, args[0])
        elif func in _MAX_POOL:
            parts = rules.max_pool(_MAX_POOL[func], _bind(_MAX_POOL[func], args, kwargs))
        elif func in _ADD:
            parts = rules.add(out, args, kwargs, 1.0)
        elif func in _SUB:
            parts = rules.add(out, args, kwargs, -1.0)
        elif func is F.dropout and not _bind(func, args, kwargs).arguments["training"]:
            parts = rules.parts(args[0])
        elif func in _LINEAR:
            parts = rules.linear_each(func, args, kwargs)
        else:
            raise NoTaylorRule(f"no second-order forward rule for {getattr(func, '__name__', func)!r}")
        rules.table[out] = parts
        return out


class TaylorCurvature:
    """v -> v^T H v for k directions at once, H the Hessian of the mean cross-entropy over the
    samples of ``chunks`` (eval mode), by second-order forward mode (see the module docstring).

    Args:
        model: maps x [b, ...] to logits [b, C]; in eval mode (inside ``measuring``).
        params: the parameters H is taken over, in the order of the flat vectors.
        chunks: (x [b, ...], y int [b]) groups of samples, each one forward.
        n_samples: N, the loss's divisor (every sample of every chunk).
    """

    def __init__(
        self, model: torch.nn.Module, params: Sequence[Tensor], chunks: Sequence[tuple[Tensor, Tensor]], n_samples: int
    ) -> None:
        self.model = model
        self.params = list(params)
        self.numels = [p.numel() for p in self.params]
        self.size = sum(self.numels)
        self.chunks = chunks
        self.n_samples = n_samples
        self._tape: _Tape | None = None

    def __call__(self, v: Tensor) -> Tensor:
        """v [P] or [k, P] -> v^T H v, a float64 scalar or [k]."""
        single = v.dim() == 1
        vb = v.reshape(1, -1) if single else v
        if vb.shape[-1] != self.size:
            raise ValueError(f"expected vectors of {self.size} entries, got shape {tuple(v.shape)}")
        k = vb.shape[0]
        total = torch.zeros(k, dtype=torch.float64, device=vb.device)
        with torch.no_grad():
            for x, y in self.chunks:
                total += self._chunk(x, y, vb) / self.n_samples
        return total[0] if single else total

    def _chunk(self, x: Tensor, y: Tensor, vb: Tensor) -> Tensor:
        """sum over the chunk's samples of d^2/dt^2 CE at t = 0, [k] float64."""
        k = vb.shape[0]
        table = WeakTensorKeyDictionary()
        for p, part in zip(self.params, vb.split(self.numels, dim=1), strict=True):
            table[p] = (part.reshape(k, *p.shape).to(p.dtype), None)
        rules = _Rules(table, k)
        # a single chunk's forward is kept between calls (the memory of one forward's
        # activations, as a kept gradient graph would hold); several chunks are recomputed
        tape = self._tape if len(self.chunks) == 1 and self._tape is not None else None
        try:
            with _Follow(rules, tape or _Tape(), replay=tape is not None) as follow:
                z = self.model(x)
        except _TapeMismatch:
            self._tape = None  # the forward took another path this time: record it again
            return self._chunk(x, y, vb)
        if len(self.chunks) == 1 and tape is None and follow.tape.keep:
            self._tape = follow.tape
        z1, z2 = rules.parts(z)
        return _cross_entropy_second_derivative(z, z1, z2, y, k)

    def record(self, x: Tensor) -> Tensor:
        """The model's plain forward on ``x`` [b, ...] -> logits [b, C], kept as the tape that
        later calls replay when ``x`` is the only chunk (so a starting-point check that runs
        through here is the recording pass, not one forward more)."""
        with torch.no_grad(), _Follow(_Rules(WeakTensorKeyDictionary(), 0), _Tape(), replay=False) as follow:
            z = self.model(x)
        if len(self.chunks) == 1 and x is self.chunks[0][0] and follow.tape.keep:
            self._tape = follow.tape
        return z

    def release(self) -> None:
        """Drop the kept forward (its memory)."""
        self._tape = None


def _cross_entropy_second_derivative(z: Tensor, z1: Tensor | None, z2: Tensor | None, y: Tensor, k: int) -> Tensor:
    """sum_n d^2/dt^2 CE(z_n(t), y_n) at t = 0, for logits z [N, C] with derivatives z1, z2
    [k, N, C] (None: zero) -> [k] in float64."""
    p = torch.softmax(z.double(), dim=-1)
    out = torch.zeros(k, dtype=torch.float64, device=z.device)
    if z1 is not None:
        d = z1.double()
        mean = (d * p).sum(-1)
        out += ((d * d * p).sum(-1) - mean * mean).sum(-1)
    if z2 is not None:
        resid = p.clone()
        resid[torch.arange(z.shape[0], device=z.device), y] -= 1
        out += (z2.double() * resid).sum((-1, -2))
    return out
