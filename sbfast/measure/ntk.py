"""Empirical NTK of a batch (the release's ``ntk`` mode) and its log-determinant.

For a batch x_1..x_b (eval mode), g_i is the gradient of sample i's summed logits,
sum_c f_w(x_i)_c, with respect to the parameters whose names contain "weight" (conv, linear and
normalisation weights; biases excluded), masked entries zeroed when masks are given. The Gram
matrix K[i, j] = <g_i, g_j> (b x b) and log det K = sum log eig(K) (NaN when K is singular or
not positive definite in floating point, which happens as soon as b exceeds its rank).

Computed from ONE forward and ONE backward per batch, without forming the per-sample gradient
vectors g_i: forward hooks keep each covered layer's input a and output; one backward of the
batch's summed logits gives every layer's output gradient e (sample i's own, as samples do not
interact in eval mode), and the layer's part of K is added from a and e:

* Linear on [b, d] (no mask): K += (A A^T) ⊙ (E E^T), A [b, d], E [b, p].
* Linear on [b, ..., d], Conv1d / Conv2d (zero padding): the layer's per-sample weight
  gradients G [b, numel] = sum_t e_t a_t^T (the input unfolded for convolutions), then K += G G^T;
  one layer at a time, so memory is b x the largest layer, not b x P.
* BatchNorm (eval, running statistics): G[i, c] = sum over positions of e * x_hat.
* A layer called several times (shared weights): its calls' G are summed before the product.
* Anything else named "weight" (other layer types, a weight used outside its module's forward,
  a layer whose input changed in place after it read it, a mask on a Linear on [b, d] is fine):
  those parameters only, by ``torch.func`` vmap(grad) over the batch (b x their size of memory,
  about b backward passes of work).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .batches import as_batches, check_model, measuring
from .fisher_trace import check_masks
from .results import MeasureResult

__all__ = ["ntk_gram", "ntk_logdet"]

_COVERED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


class _Fallback(Exception):
    """The hooked pass cannot be trusted for this batch (an input changed in place)."""


def _covered(model: nn.Module, names: set[str]) -> dict[nn.Module, str]:
    """Modules whose own "weight" parameter (selected in ``names``) a layer rule covers."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    out = {}
    for prefix, m in model.named_modules():
        name = f"{prefix}.weight" if prefix else "weight"
        w = m._parameters.get("weight")
        if name not in names or w is None or type(m) not in _COVERED or owners[id(w)] > 1:
            continue
        if isinstance(m, nn.modules.conv._ConvNd) and m.padding_mode != "zeros":
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            continue
        out[m] = name
    return out


def _per_sample_weight_grad(m: nn.Module, a: Tensor, e: Tensor) -> Tensor:
    """[b, numel] gradient of the layer's weight for each sample, from its input a and output
    gradient e."""
    b = a.shape[0]
    if isinstance(m, nn.Linear):
        return torch.einsum("bti,bto->boi", a.reshape(b, -1, a.shape[-1]), e.reshape(b, -1, e.shape[-1])).reshape(b, -1)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        shape = (1, -1) + (1,) * (a.dim() - 2)
        x_hat = (a - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
        return (e * x_hat).reshape(b, a.shape[1], -1).sum(-1)
    # Conv1d / Conv2d: unfold (Conv1d as a height-1 Conv2d), per group a Linear over positions
    if isinstance(m, nn.Conv1d):
        a, e = a.unsqueeze(2), e.unsqueeze(2)
        kernel, dilation, padding, stride = (1, *m.kernel_size), (1, *m.dilation), (0, *m.padding), (1, *m.stride)
    else:
        kernel, dilation, padding, stride = m.kernel_size, m.dilation, m.padding, m.stride
    cols = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)  # [b, C_in k, T]
    g = m.groups
    cols = cols.reshape(b, g, -1, cols.shape[-1])  # [b, g, C_in/g k, T]
    eo = e.reshape(b, g, m.out_channels // g, -1)  # [b, g, C_out/g, T]
    return torch.einsum("bgot,bgit->bgoi", eo, cols).reshape(b, -1)


def _hooked_gram(model: nn.Module, x: Tensor, covered: dict[nn.Module, str], masks: dict[str, Tensor]) -> Tensor:
    """The covered layers' part of K, from one forward and one backward."""
    calls: list[tuple[nn.Module, Tensor, int, Tensor]] = []

    def hook(m: nn.Module, args: tuple, out: Tensor) -> Tensor:
        a = args[0]
        calls.append((m, a, a._version, out))
        return out.clone()  # later in-place ops (ReLU(inplace=True)) change the copy, not `out`

    handles = [m.register_forward_hook(hook) for m in covered]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    if not calls:
        return x.new_zeros(x.shape[0], x.shape[0], dtype=logits.dtype)
    outs = torch.autograd.grad(logits.sum(), [c[3] for c in calls], allow_unused=True)
    if any(c[1]._version != c[2] for c in calls):
        raise _Fallback
    gram = logits.new_zeros(x.shape[0], x.shape[0])
    per_module: dict[nn.Module, Tensor] = {}
    remaining = {m: sum(1 for c in calls if c[0] is m) for m in covered}
    for (m, a, _, out), e in zip(calls, outs, strict=True):
        if e is None:
            e = torch.zeros_like(out)
        a = a.detach()
        name = covered[m]
        if isinstance(m, nn.Linear) and a.dim() == 2 and name not in masks and remaining[m] == 1:
            gram += (a @ a.T) * (e @ e.T)
            remaining[m] = 0
            continue
        g = _per_sample_weight_grad(m, a, e)
        per_module[m] = per_module[m] + g if m in per_module else g
        remaining[m] -= 1
        if remaining[m] == 0:
            g = per_module.pop(m)
            if name in masks:
                g = g * masks[name].reshape(1, -1)
            gram += g @ g.T
    return gram


def _vmap_gram(model: nn.Module, x: Tensor, names: list[str], masks: dict[str, Tensor]) -> Tensor:
    """The part of K from the parameters ``names``, by vmap(grad) of each sample's summed logits."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    chosen = {n: params[n] for n in names}

    def summed_logits(p: dict[str, Tensor], x1: Tensor) -> Tensor:
        return functional_call(model, ({**params, **p}, buffers), (x1.unsqueeze(0),)).sum()

    grads = vmap(grad(summed_logits), in_dims=(None, 0))(chosen, x)
    gram = x.new_zeros(x.shape[0], x.shape[0], dtype=params[names[0]].dtype)
    for n, g in grads.items():
        g = g * masks[n] if n in masks else g
        g = g.reshape(x.shape[0], -1)
        gram += g @ g.T
    return gram


def ntk_gram(model: nn.Module, x: Tensor, *, masks: Mapping[str, Tensor] | None = None) -> Tensor:
    """K [b, b] (the model's dtype) for one batch x [b, ...]; see the module docstring. The model
    must already be in eval mode with requires_grad on (inside :func:`measuring`)."""
    checked = check_masks(model, masks) or {}
    names = {n for n, _ in model.named_parameters() if "weight" in n}
    if not names:
        raise ValueError(f"{type(model).__name__} has no parameter whose name contains 'weight': no NTK to take")
    covered = _covered(model, names)
    with torch.enable_grad():
        try:
            gram = _hooked_gram(model, x, covered, checked)
        except _Fallback:
            covered = {}
            gram = x.new_zeros(x.shape[0], x.shape[0], dtype=next(model.parameters()).dtype)
        rest = sorted(names - set(covered.values()))
        if rest:
            gram = gram + _vmap_gram(model, x, rest, checked)
    return gram.detach()


def ntk_logdet(model: nn.Module, batches: Iterable[Any], *, masks: Mapping[str, Tensor] | None = None) -> MeasureResult:
    """log det of the empirical NTK Gram of each batch (the release's ``ntk`` mode).

    Args:
        model: maps x [b, ...] to logits [b, C]; measured in eval mode and left as it came.
        batches: (x, y) or (index, x, y) batches (y unused), in the order given.
        masks: optional {parameter name: 0/1 tensor of its shape}; masked weights drop out of g_i.
    Returns:
        MeasureResult "ntk_logdet": per_batch = log det K per batch (NaN where K is singular);
        value = their mean (NaN if any batch is singular; extra["finite_mean"] is the mean over
        the others, None when there are none); extra {"singular_batches": positions,
        "min_eigenvalues": smallest eigenvalue of each K}.
    """
    check_model(model)
    checked = check_masks(model, masks)
    device = next(model.parameters()).device
    data = as_batches(batches, device=device)
    per_batch: list[float] = []
    smallest: list[float] = []
    with measuring(model):
        for x, _ in data:
            gram = ntk_gram(model, x, masks=checked)
            ev = torch.linalg.eigvalsh(gram)
            smallest.append(float(ev.min()))
            ok = bool((ev > 0).all()) and bool(torch.isfinite(ev).all())
            per_batch.append(float(ev.log().sum()) if ok else math.nan)
    singular = [k for k, v in enumerate(per_batch) if math.isnan(v)]
    finite = [v for v in per_batch if not math.isnan(v)]
    return MeasureResult(
        name="ntk_logdet",
        value=math.nan if singular else math.fsum(per_batch) / len(per_batch),
        per_batch=per_batch,
        settings={"parameters": "names containing 'weight'", "masked": checked is not None, "batches": len(data)},
        extra={
            "singular_batches": singular,
            "finite_mean": math.fsum(finite) / len(finite) if finite else None,
            "min_eigenvalues": smallest,
        },
    )
