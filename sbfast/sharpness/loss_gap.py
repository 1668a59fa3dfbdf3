"""The per-sample SAM loss gap, :func:`sam_loss_gap_scores`."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from sbfast.common import check_rho, check_scorable, functional_forward, perturbed_params, restore_modes, split_params
from sbfast.sharpness.inputs import (
    Batch,
    ScoreTable,
    as_loader,
    check_batch,
    check_positive_int,
    check_targets,
    eval_mode,
    loader_length,
    progress_bar,
)
from sbfast.sharpness.scorer import is_oom

__all__ = ["sam_loss_gap_scores"]


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
    check_positive_int(batch_size, "batch_size")
    if num_samples is not None:
        check_positive_int(num_samples, "num_samples", 0)
    loader = as_loader(data, batch_size)
    check_scorable(model, device, "sam_loss_gap_scores", vmapped=False)
    params, fixed, dev, param_dtype = split_params(model, device)
    chunk: list[int | None] = [None]

    def forward(w: dict, x: torch.Tensor) -> torch.Tensor:
        out = functional_forward(model, (w, fixed), (x,))
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(f"model must map [b, ...] to logits [b, C], got {getattr(out, 'shape', out)}")
        return out

    def gap(x: torch.Tensor, y: torch.Tensor, y_host: torch.Tensor, size: int) -> torch.Tensor:
        b = x.shape[0]
        w = {n: p.detach().requires_grad_() for n, p in params.items()}
        losses, grads = [], None
        for start in range(0, b, size):
            with torch.enable_grad():
                out = forward(w, x[start : start + size])
                if start == 0:
                    check_targets(y_host, out.shape[1])
                loss = F.cross_entropy(out, y[start : start + size], reduction="none")
                # one chunk: the reference's loss.mean(), bit for bit; several: sum/b per chunk
                total = loss.mean() if size >= b else loss.sum() / b
                part = torch.autograd.grad(total, list(w.values()), allow_unused=True)
            losses.append(loss.detach())
            grads = (
                part
                if grads is None
                else [a if c is None else (c if a is None else a + c) for a, c in zip(grads, part, strict=True)]
            )
        loss_w = torch.cat(losses)
        if not bool(torch.isfinite(loss_w).all()):
            # e is the batch's: one non-finite loss leaves every gap of the batch undefined; the
            # table reports them with their inputs at the end
            return torch.full_like(loss_w, float("nan"))
        g = {n: gi for n, gi in zip(w, grads, strict=True) if gi is not None}
        if not g:
            raise ValueError("the loss does not depend on any trainable parameter")
        w_e = perturbed_params(params, g, rho, adaptive)
        with torch.no_grad():
            loss_e = torch.cat(
                [
                    F.cross_entropy(forward(w_e, x[s : s + size]), y[s : s + size], reduction="none")
                    for s in range(0, b, size)
                ]
            )
        return loss_e - loss_w

    def gap_split(x: torch.Tensor, y: torch.Tensor, y_host: torch.Tensor) -> torch.Tensor:
        while True:
            size = x.shape[0] if chunk[0] is None else min(x.shape[0], chunk[0])
            try:
                return gap(x, y, y_host, size)
            except Exception as exc:
                if not is_oom(exc) or size == 1:
                    raise
                del exc
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                chunk[0] = max(1, size // 2)

    table = ScoreTable(
        "sam_loss_gap_scores",
        dev,
        "a batch shares one perturbation e, so one non-finite loss leaves the whole batch's gaps undefined",
    )
    modes = eval_mode(model)
    try:
        for batch in progress_bar(loader, progress, "SAM loss gaps", loader_length(loader, 1)):
            table.next_batch(0)
            index, x, y = check_batch(batch)
            if index.numel() == 0:
                continue
            xb = x.to(dev, param_dtype) if x.is_floating_point() else x.to(dev)
            table.add(index, gap_split(xb, y.to(dev).long(), y).detach(), xb)
        table.end_pass()
    finally:
        restore_modes(modes)
    return table.mean(num_samples)
