"""Fisher trace (the release's ``fisher`` mode): the mean per-sample squared gradient norm

    F = (1/N) sum_n s_n,   s_n = || m ⊙ grad_w CE(f_w(x_n), y_n) ||_2^2

over the N samples of the batches given, in eval mode, w every parameter, m an optional 0/1
parameter mask (1 where no mask is given). It is the trace of the empirical Fisher matrix
(1/N) sum_n g_n g_n^T.

Unmasked, the scores come from :func:`sbfast.sharpness.sample_fisher_scores`: one forward and
one backward per chunk of samples (the batches are concatenated, since samples do not interact
in eval mode), the per-layer norms from activations and output gradients, no per-sample gradient
formed. With masks the per-layer identities no longer factor (||m ⊙ (g a^T)||^2 is not a product
of norms), so the masked scores are computed from per-sample gradients by ``torch.func``
vmap(grad) over the chunk: P floats per sample of memory, about the cost of B backward passes
fused into one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from sbfast.sharpness import sample_fisher_scores

from .batches import as_batches, check_model, measuring
from .hvp import DEFAULT_CHUNK, concat_batches
from .results import MeasureResult

__all__ = ["check_masks", "fisher_trace"]


def check_masks(model: nn.Module, masks: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
    """Parameter masks by parameter name, each a tensor of the parameter's shape (0 = masked);
    returned on the parameter's device and dtype. Refuses unknown names and wrong shapes."""
    if masks is None:
        return None
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict parameter name -> tensor, got {type(masks).__name__}")
    params = dict(model.named_parameters())
    out = {}
    for name, m in masks.items():
        if name not in params:
            raise ValueError(f"masks: {name!r} is not a parameter of the model (e.g. {next(iter(params))!r})")
        if not isinstance(m, Tensor):
            raise TypeError(f"masks[{name!r}] must be a tensor, got {type(m).__name__}")
        if tuple(m.shape) != tuple(params[name].shape):
            raise ValueError(
                f"masks[{name!r}] has shape {tuple(m.shape)}, the parameter has {tuple(params[name].shape)}"
            )
        out[name] = m.detach().to(params[name].device, params[name].dtype)
    return out


def _masked_scores(model: nn.Module, x: Tensor, y: Tensor, masks: dict[str, Tensor]) -> Tensor:
    """[b] masked squared norms of the per-sample gradients, by vmap(grad)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def sample_loss(p: dict[str, Tensor], x1: Tensor, y1: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (x1.unsqueeze(0),))
        return F.cross_entropy(logits, y1.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for n, g in grads.items():
        g = g * masks[n] if n in masks else g
        total += g.reshape(g.shape[0], -1).double().pow(2).sum(1)
    return total


def fisher_trace(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    masks: Mapping[str, Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> MeasureResult:
    """The mean per-sample squared gradient norm over every sample of ``batches`` (see above).

    Args:
        model: maps x [b, ...] to logits [b, C]; measured in eval mode and left as it came.
        batches: (x, y) or (index, x, y) batches, used in the order given (or a data set, see
            :func:`sbfast.measure.as_batches`).
        masks: optional {parameter name: 0/1 tensor of its shape}; masked entries' gradients
            are zeroed before the norm (the release's sparse-model mode).
        chunk_size: most samples per pass.
    Returns:
        MeasureResult "fisher_trace": value F (float), per_batch (the mean s_n of each batch),
        extra {"scores": every s_n in order, "samples": N}.
    Raises:
        ValueError: masks of the wrong shape or name, no batches, a batch whose score (so its
            loss or gradient) is not finite (named by position).
    """
    check_model(model)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    checked = check_masks(model, masks)
    device = next(model.parameters()).device
    data = as_batches(batches, device=device)
    sizes = [int(y.shape[0]) for _, y in data]
    with measuring(model):
        chunks, _ = concat_batches(data, chunk_size)
        parts = []
        for x, y in chunks:
            if checked:
                parts.append(_masked_scores(model, x, y, checked))
            else:
                parts.append(sample_fisher_scores(model, x, y).double())
        scores = torch.cat(parts).cpu()
    per_batch = []
    for k, part in enumerate(scores.split(sizes)):
        if not bool(torch.isfinite(part).all()):
            raise ValueError(f"batch {k}: a sample's loss or gradient is not finite at the model's parameters")
        per_batch.append(math.fsum(part.tolist()) / part.numel())
    listed = scores.tolist()
    return MeasureResult(
        name="fisher_trace",
        value=math.fsum(listed) / len(listed),
        per_batch=per_batch,
        settings={"masked": checked is not None, "samples": len(listed), "batches": len(data)},
        extra={"scores": listed, "samples": len(listed)},
    )
