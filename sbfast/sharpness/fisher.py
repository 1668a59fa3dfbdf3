"""The public Fisher scores: :func:`fisher_scores` over a data set, :func:`sample_fisher_scores`
of one batch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from sbfast.common import restore_modes
from sbfast.sharpness.inputs import (
    Batch,
    ScoreTable,
    as_loader,
    check_batch,
    check_positive_int,
    eval_mode,
    loader_length,
    progress_bar,
)
from sbfast.sharpness.scorer import Scorer

__all__ = ["fisher_scores", "sample_fisher_scores"]


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
    """Per-sample squared gradient norm s_i = ||grad_w CE(f_w(x_i), y_i)||^2 (docs/algorithm.md §3).

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
    check_positive_int(batch_size, "batch_size")
    check_positive_int(trials, "trials")
    if num_samples is not None:
        check_positive_int(num_samples, "num_samples", 0)
    loader = as_loader(data, batch_size)
    if trials > 1 and isinstance(loader, Iterator):
        raise ValueError(
            f"fisher_scores: data is a one-shot iterator ({type(loader).__name__}), but trials={trials} needs "
            f"{trials} passes over it; pass a list, a DataLoader or a data set"
        )
    scorer = Scorer(model, device, form)
    table = ScoreTable("fisher_scores", scorer.device)
    modes = eval_mode(model)
    try:
        with scorer:
            batches = ((t, b) for t in range(trials) for b in loader)
            for t, batch in progress_bar(batches, progress, "fisher scores", loader_length(loader, trials)):
                table.next_batch(t)
                index, x, y = check_batch(batch)
                for start in range(0, index.shape[0], batch_size):  # empty batches add nothing
                    sl = slice(start, start + batch_size)
                    xb = x[sl].to(scorer.device, scorer.dtype) if x.is_floating_point() else x[sl].to(scorer.device)
                    table.add(index[sl], scorer.score_split(xb, y[sl].to(scorer.device).long(), y[sl]).detach(), xb)
            table.end_pass()
    finally:
        restore_modes(modes)
    return table.mean(num_samples)


def sample_fisher_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, form: str = "auto") -> torch.Tensor:
    """The scores of one batch, in the model's precision: [b] float32 (float64 for a float64
    model), on the model's device. Same rules and eval-mode handling as :func:`fisher_scores`."""
    scorer = Scorer(model, None, form)
    modes = eval_mode(model)
    try:
        with scorer:
            xb = x.to(scorer.device, scorer.dtype) if x.is_floating_point() else x.to(scorer.device)
            return scorer.score_split(xb, y.to(scorer.device).long(), y).detach()
    finally:
        restore_modes(modes)
