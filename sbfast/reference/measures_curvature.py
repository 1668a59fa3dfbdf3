"""Plain twins of the curvature measures (Hessian trace and eigenvalues, Fisher trace, NTK),
written from their definitions, slow and obvious.

Notation: w every parameter of the model flattened in ``named_parameters`` order (P entries);
L(w) = (1/N) sum_n CE(f_w(x_n), y_n) over the N samples of all the batches; eval mode.

* ``exact_hessian``: H = d^2 L / dw^2 as a dense [P, P] matrix, by
  ``torch.autograd.functional.hessian`` (small models only).
* ``hessian_vector_product``: H v the way PyHessian's data-loader mode does it, one batch at a
  time: forward, backward with create_graph, grad of the gradient against v, weighted by the
  batch's share of the samples.
* ``hutchinson_trace``: the mean of v^T H v over given probes, with the stopping rule of the
  fast path (stop after probe i >= 2 when the running mean changes by < tol relative).
* ``fisher_trace``: mean over samples of ||g_n||^2, g_n the gradient of sample n's own loss,
  one backward per sample (masked entries zeroed).
* ``ntk_gram``: per batch, K[i, j] = <g_i, g_j> with g_i the gradient of sample i's summed
  logits with respect to the parameters whose names contain "weight", one backward per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "exact_hessian",
    "fisher_trace",
    "hessian_vector_product",
    "hutchinson_trace",
    "ntk_gram",
    "ntk_logdet",
]

Batches = Sequence[tuple[Tensor, Tensor]]


def _eval(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    return modes


def _restore(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, t in modes:
        m.training = t


def exact_hessian(model: nn.Module, batches: Batches) -> Tensor:
    """Dense H [P, P] of the mean CE over all samples, in the parameters' dtype."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    numels = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    buffers = {n: b for n, b in model.named_buffers()}
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(w: Tensor) -> Tensor:
        parts = w.split(numels)
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, (params, buffers), (x,)), y)

    modes = _eval(model)
    try:
        return torch.autograd.functional.hessian(loss, flat)
    finally:
        _restore(modes)


def hessian_vector_product(model: nn.Module, batches: Batches, v: Tensor) -> Tensor:
    """H v [P] for a flat v [P], batch by batch (sum_b n_b H_b v / N)."""
    params = list(model.parameters())
    numels = [p.numel() for p in params]
    views = [t.reshape(p.shape) for t, p in zip(v.split(numels), params, strict=True)]
    total = sum(int(y.shape[0]) for _, y in batches)
    out = torch.zeros_like(v)
    modes = _eval(model)
    try:
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            g = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(g, params, views)
            out += torch.cat([h.reshape(-1) for h in hv]) * (y.shape[0] / total)
    finally:
        _restore(modes)
    return out


def hutchinson_trace(
    model: nn.Module, batches: Batches, probes: Sequence[Tensor], tol: float | None = None
) -> tuple[float, list[float]]:
    """(estimate, samples v^T H v) over ``probes`` in order; with ``tol``, stopped after probe
    i >= 2 as soon as |m_i - m_{i-1}| / (|m_{i-1}| + 1e-6) < tol."""
    samples: list[float] = []
    mean = 0.0
    for i, v in enumerate(probes):
        samples.append(float(v @ hessian_vector_product(model, batches, v)))
        new = math.fsum(samples) / len(samples)
        if tol is not None and i >= 1 and abs(new - mean) / (abs(mean) + 1e-6) < tol:
            return new, samples
        mean = new
    return mean, samples


def fisher_trace(
    model: nn.Module, batches: Batches, masks: dict[str, Tensor] | None = None
) -> tuple[float, list[float]]:
    """(mean over all samples, per-batch means) of ||grad_w CE(f_w(x_n), y_n)||^2, one backward
    per sample; ``masks`` (name -> 0/1 tensor like the parameter) zero gradient entries."""
    named = list(model.named_parameters())
    modes = _eval(model)
    scores, per_batch = [], []
    try:
        for x, y in batches:
            batch = []
            for i in range(x.shape[0]):
                loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
                gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
                s = 0.0
                for (n, _p), g in zip(named, gs, strict=True):
                    if g is None:
                        continue
                    if masks is not None and n in masks:
                        g = g * masks[n]
                    s += float((g.double() ** 2).sum())
                batch.append(s)
            scores += batch
            per_batch.append(math.fsum(batch) / len(batch))
    finally:
        _restore(modes)
    return math.fsum(scores) / len(scores), per_batch


def ntk_gram(model: nn.Module, x: Tensor, masks: dict[str, Tensor] | None = None) -> Tensor:
    """K [b, b] = G G^T, row i of G the gradient of sum_c f_w(x_i)_c with respect to every
    parameter whose name contains "weight" (masked entries zeroed), one backward per sample."""
    named = [(n, p) for n, p in model.named_parameters() if "weight" in n]
    modes = _eval(model)
    try:
        logits = model(x)
        rows = []
        for i in range(x.shape[0]):
            gs = torch.autograd.grad(logits[i].sum(), [p for _, p in named], retain_graph=True, allow_unused=True)
            parts = []
            for (n, p), g in zip(named, gs, strict=True):
                g = torch.zeros_like(p) if g is None else g
                if masks is not None and n in masks:
                    g = g * masks[n]
                parts.append(g.reshape(-1))
            rows.append(torch.cat(parts))
        grads = torch.stack(rows)
    finally:
        _restore(modes)
    return grads @ grads.T


def ntk_logdet(gram: Tensor) -> float:
    """sum log(eigvalsh(K)); NaN when an eigenvalue is <= 0 (K singular), as the release."""
    ev = torch.linalg.eigvalsh(gram)
    if bool((ev <= 0).any()):
        return math.nan
    return float(ev.log().sum())
