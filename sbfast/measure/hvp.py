"""Hessian-vector products of the loss over a set of samples, for the curvature measures.

H is the Hessian, with respect to every trainable parameter (flattened in ``named_parameters``
order into one vector of P entries), of

    L(w) = (1 / N) sum_n CE(f_w(x_n), y_n)

over the N samples of all the batches given: the sample-weighted mean of the per-batch Hessians
(eval mode, so samples do not interact and batches can be regrouped freely).

How (measured on this CPU, ``bench/bench_measure_curvature.py``): double backward with the graph
kept. The samples are regrouped into chunks of up to ``chunk_size`` (all of them when they fit);
for a chunk, one forward and one ``backward(create_graph=True)`` build the gradient g(w) as a graph,
and every product H v is then one more backward through it (``autograd.grad(g, w, v)``): on CPU
one backward per probe, on CUDA k probes at once (``is_grads_batched``, a vmap over the backward,
which was 2.3x slower per probe than the loop on this CPU). With a single chunk that graph is
built once and kept for the whole measure, so a probe costs one backward of the gradient graph,
not a new forward and gradient. Forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``,
vmapped over the probes) shares the primal pass between the probes of one call but rebuilds it at
every call, and was slower here (see the bench); it is kept as ``mode="jvp"`` for models whose
double backward is not supported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

__all__ = ["DEFAULT_CHUNK", "HVP_MODES", "HessianOperator", "concat_batches"]

HVP_MODES = ("backward", "jvp")
DEFAULT_CHUNK = 1024  # samples per forward; 100 batches of 5 (the release's protocol) are one chunk


def concat_batches(
    batches: Sequence[tuple[Tensor, Tensor]], chunk_size: int
) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[int, int]]]:
    """Consecutive batches concatenated into chunks of at most ``chunk_size`` samples (a batch is
    never split unless it alone is larger); batches whose sample shapes differ start a new chunk.
    Also returns, per chunk, (first batch index, number of batches) for naming a bad batch."""
    out, spans = [], []
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    first = 0
    for k, (x, y) in enumerate(batches):
        n = sum(t.shape[0] for t in xs)
        if xs and (n + x.shape[0] > chunk_size or x.shape[1:] != xs[0].shape[1:] or x.dtype != xs[0].dtype):
            out.append((torch.cat(xs), torch.cat(ys)))
            spans.append((first, len(xs)))
            xs, ys, first = [], [], k
        xs.append(x)
        ys.append(y)
    out.append((torch.cat(xs), torch.cat(ys)))
    spans.append((first, len(xs)))
    return out, spans


class HessianOperator:
    """v -> H v for the mean cross-entropy over ``batches`` (see the module docstring).

    Args:
        model: maps x [b, ...] to logits [b, C]; already in eval mode with ``requires_grad`` on
            its parameters (inside :func:`sbfast.measure.measuring`).
        batches: (x [b, ...], y int [b]) pairs on the model's device.
        chunk_size: most samples per forward.
        mode: "backward" (double backward, graph kept when there is one chunk) or "jvp"
            (forward-over-reverse, vmapped over the probes).
        check_start: check the starting point now (else the caller calls :meth:`check_start`).
    Attributes:
        size: P, the number of parameter entries; vectors are [P] or [k, P] in ``dtype``.
        loss: L(w) at the model's parameters (a float, computed by the starting-point check).
    Raises:
        ValueError: a batch whose loss is not finite at the starting point (named by position).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[tuple[Tensor, Tensor]],
        *,
        chunk_size: int = DEFAULT_CHUNK,
        mode: str = "backward",
        check_start: bool = True,
    ) -> None:
        if mode not in HVP_MODES:
            raise ValueError(f"mode must be one of {HVP_MODES}, got {mode!r}")
        self.model = model
        self.mode = mode
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.size = sum(self.numels)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.n_samples = sum(int(y.shape[0]) for _, y in batches)
        self.chunks, spans = concat_batches(batches, chunk_size)
        self._graph: tuple[list[int], Tensor] | None = None
        # k probes: one backward each on CPU (vmap over the backward, is_grads_batched, measured
        # 2.3x slower per probe here); batched on CUDA, where batches of 5 are launch-bound
        self.batched_probes = self.device.type == "cuda"
        self._spans = spans
        self._sizes = [int(b[1].shape[0]) for b in batches]
        self.loss = math.nan
        if check_start:
            self.check_start()

    def check_start(self, forward: Callable[[Tensor], Tensor] | None = None) -> None:
        """The starting point: every batch's loss must be finite (one forward per chunk, no
        graph, by ``forward`` (x -> logits; default the model)); sets ``loss``.

        Raises:
            ValueError: the first batch whose loss is not finite, by position.
        """
        forward = forward or self.model
        total = 0.0
        with torch.no_grad():
            for (x, y), (first, count) in zip(self.chunks, self._spans, strict=True):
                per_sample = F.cross_entropy(forward(x), y, reduction="none").double()
                sizes = self._sizes[first : first + count]
                for j, part in enumerate(per_sample.split(sizes)):
                    s = float(part.mean())
                    if not math.isfinite(s):
                        raise ValueError(
                            f"batch {first + j}: the loss at the starting point is not finite ({s}); "
                            "curvature is undefined there"
                        )
                total += float(per_sample.sum())
        self.loss = total / self.n_samples

    # flat [.., P] <-> per-parameter views
    def split(self, v: Tensor) -> list[Tensor]:
        """[..., P] -> one tensor per parameter of shape [..., *param.shape]."""
        lead = v.shape[:-1]
        return [t.reshape(*lead, *s) for t, s in zip(v.split(self.numels, dim=-1), self.shapes, strict=True)]

    def _gradient_graph(self, x: Tensor, y: Tensor) -> tuple[list[int], Tensor]:
        loss = F.cross_entropy(self.model(x), y, reduction="sum") / self.n_samples
        gs = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(gs) if g is not None and g.requires_grad]
        return used, torch.cat([gs[i].reshape(-1) for i in used]) if used else loss.new_zeros(0)

    def _backward_hvp(self, v: Tensor) -> Tensor:
        out = torch.zeros_like(v)
        views = self.split(v)
        keep = len(self.chunks) == 1
        for x, y in self.chunks:
            if keep and self._graph is not None:
                used, g = self._graph
            else:
                used, g = self._gradient_graph(x, y)
                if keep:
                    self._graph = (used, g)
            if not used:
                continue
            params = [self.params[i] for i in used]
            vu = torch.cat([views[i].reshape(v.shape[0], -1) for i in used], dim=1)
            outs = self.split(out)
            if self.batched_probes:
                hvs = [torch.autograd.grad(g, params, vu, retain_graph=True, is_grads_batched=True, allow_unused=True)]
                rows = [slice(None)]
            else:
                hvs = [torch.autograd.grad(g, params, r, retain_graph=True, allow_unused=True) for r in vu]
                rows = list(range(v.shape[0]))
            for row, hv in zip(rows, hvs, strict=True):
                for i, h in zip(used, hv, strict=True):
                    if h is not None:
                        outs[i][row].add_(h)
        return out

    def _jvp_hvp(self, v: Tensor) -> Tensor:
        buffers = dict(self.model.named_buffers())
        primal = {n: p.detach() for n, p in zip(self.names, self.params, strict=True)}
        out = torch.zeros_like(v)
        for x, y in self.chunks:

            def loss_fn(p: dict[str, Tensor], x: Tensor = x, y: Tensor = y) -> Tensor:
                logits = functional_call(self.model, (p, buffers), (x,))
                return F.cross_entropy(logits, y, reduction="sum") / self.n_samples

            def one(t: list[Tensor]) -> list[Tensor]:
                tangent = dict(zip(self.names, t, strict=True))
                h = jvp(grad(loss_fn), (primal,), (tangent,))[1]
                return torch.cat([h[n].reshape(-1) for n in self.names])

            out += vmap(one)(self.split(v))
        return out

    def __call__(self, v: Tensor) -> Tensor:
        """H v for v [P] or [k, P] (k probes at once), same shape and dtype as v."""
        single = v.dim() == 1
        vb = v.reshape(1, -1) if single else v
        if vb.shape[-1] != self.size:
            raise ValueError(f"expected vectors of {self.size} entries, got shape {tuple(v.shape)}")
        vb = vb.to(self.device, self.dtype)
        with torch.enable_grad():
            hv = self._backward_hvp(vb) if self.mode == "backward" else self._jvp_hvp(vb)
        return hv.detach().reshape(v.shape)

    def release(self) -> None:
        """Drop the kept gradient graph (its memory)."""
        self._graph = None
