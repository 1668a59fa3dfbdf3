"""Section 3 of the algorithm: per-sample scores, computed the slow and obvious way.

``fisher_scores`` materialises every per-sample gradient with ``vmap(grad)`` (as the release);
``sam_loss_gap_scores`` evaluates each sample's loss at w and at w + e.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from sbfast.common import (
    check_rho,
    check_scorable,
    functional_forward,
    module_modes,
    perturbed_params,
    restore_modes,
    split_params,
)


def _check_batch(
    index: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n_classes_of: Callable[[torch.Tensor], int]
) -> None:
    if index.dim() != 1 or y.dim() != 1 or x.dim() < 1:
        raise ValueError(
            f"expected index [b], x [b, ...], y [b]; got shapes {tuple(index.shape)}, "
            f"{tuple(x.shape)}, {tuple(y.shape)}"
        )
    if not (index.shape[0] == x.shape[0] == y.shape[0]):
        raise ValueError(f"batch sizes differ: index {index.shape[0]}, x {x.shape[0]}, y {y.shape[0]}")
    if index.is_floating_point() or y.is_floating_point() or index.dtype == torch.bool:
        raise ValueError(f"index and y must be integer tensors, got {index.dtype} and {y.dtype}")
    if index.numel() and int(index.min()) < 0:
        raise ValueError(f"sample indices must be >= 0, got min {int(index.min())}")
    if y.numel():
        c = n_classes_of(x)
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= c:
            raise ValueError(f"targets must lie in [0, {c}) (the model's outputs), got [{lo}, {hi}]")


def _score_samples(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    per_batch: Callable[[dict, dict, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    trials: int,
    device: torch.device | str | None,
    num_samples: int | None,
    what: str,
    vmapped: bool,
) -> torch.Tensor:
    """Shared loop: eval mode, batches to the compute device, scores averaged per index."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an int >= 1, got {trials!r}")
    if trials > 1 and isinstance(loader, Iterator):
        raise ValueError(
            f"{what}: the loader is a one-shot iterator ({type(loader).__name__}), but trials={trials} needs "
            f"{trials} passes over it; pass a list, a DataLoader or a data set"
        )
    check_scorable(model, device, what, vmapped=vmapped)
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0
    ):
        raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
    params, fixed, dev, dtype = split_params(model, device)

    def n_classes_of(x: torch.Tensor) -> int:
        with torch.no_grad():
            out = functional_forward(model, (params, fixed), (x[:1],))
        if out.dim() != 2 or out.shape[0] != 1:
            raise ValueError(f"model must map [b, ...] to logits [b, C], got {tuple(out.shape)}")
        return out.shape[1]

    indices: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    modes = module_modes(model)
    model.eval()  # BatchNorm on running statistics, no dropout; also keeps the stats untouched
    try:
        for _ in range(trials):
            for batch in loader:
                if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
                    raise ValueError("loader must yield (index, x, y) triples")
                index, x, y = batch
                x = x.to(dev, dtype) if x.is_floating_point() else x.to(dev)
                _check_batch(index, x, y, n_classes_of)
                if index.numel() == 0:
                    continue
                values.append(per_batch(params, fixed, x, y.to(dev).long()).detach())
                indices.append(index.to(dev).long())
    finally:
        restore_modes(modes)
    if not indices:
        raise ValueError("loader yielded no samples")
    index = torch.cat(indices)
    n = int(index.max()) + 1 if num_samples is None else num_samples
    if int(index.max()) >= n:
        raise ValueError(f"sample index {int(index.max())} >= num_samples={n}")
    # mean per index: trials average, and an index never seen is NaN rather than a fake score
    sums = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, index, torch.cat(values).double())
    counts = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(
        0, index, torch.ones_like(index, dtype=torch.float64)
    )
    return (sums / counts).float()


def fisher_scores(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    trials: int = 1,
    device: torch.device | str | None = None,
    num_samples: int | None = None,
) -> torch.Tensor:
    """Per-sample squared gradient norm s_i = ||grad_w CE(f_w(x_i), y_i)||^2 (section 3).

    Summed over every parameter with requires_grad=True; buffers and frozen parameters enter
    the forward only. The model is scored in eval mode; each module's mode is restored after,
    also on error. Computed in the dtype of the model's first trainable parameter.

    Args:
        loader: iterable of (index int64 [b], x [b, ...], y int64 [b]); re-iterated for each trial.
        trials: passes over the loader; the score is their mean (for random augmentation).
        device: where to compute (default: the model's device); the model itself is not moved.
        num_samples: N; default max index seen + 1.
    Returns:
        float32 [N] on the compute device; entry i is sample i's score (mean over the times it
        was seen), NaN for an index never seen.
    """

    def sample_loss(p: dict, fixed: dict, x1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
        # batch of one, so layers that need a batch dimension (BatchNorm in eval) work
        out = functional_forward(model, (p, fixed), (x1.unsqueeze(0),))
        return F.cross_entropy(out, y1.unsqueeze(0))

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, None, 0, 0))

    def per_batch(params: dict, fixed: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grads = per_sample_grad(params, fixed, x, y)
        return sum(g.pow(2).flatten(1).sum(1) for g in grads.values())

    return _score_samples(
        model,
        loader,
        per_batch,
        trials=trials,
        device=device,
        num_samples=num_samples,
        what="reference.fisher_scores",
        vmapped=True,
    )


def sam_loss_gap_scores(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    rho: float,
    *,
    adaptive: bool = False,
    device: torch.device | str | None = None,
    num_samples: int | None = None,
) -> torch.Tensor:
    """Per-sample SAM loss gap l_i(w + e) - l_i(w), e the SAM perturbation of the batch mean.

    e is section 2's (global norm over the trainable parameters, ASAM if ``adaptive``), one
    per batch, so the score depends on how the loader batches. The perturbed weights live only
    in a functional call: the model's own weights are never written. Eval mode during, each
    module's mode restored after.

    Returns:
        float32 [N] on the compute device, as ``fisher_scores`` (NaN for unseen indices).
    """
    check_rho(rho)

    def per_batch(params: dict, fixed: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = {n: p.detach().requires_grad_() for n, p in params.items()}
        with torch.enable_grad():
            loss = F.cross_entropy(functional_forward(model, (w, fixed), (x,)), y, reduction="none")
            grads = torch.autograd.grad(loss.mean(), list(w.values()), allow_unused=True)
        g = {n: gi for n, gi in zip(w, grads, strict=True) if gi is not None}
        if not g:
            raise ValueError("the loss does not depend on any trainable parameter")
        w_e = perturbed_params(params, g, rho, adaptive)
        with torch.no_grad():
            loss_e = F.cross_entropy(functional_forward(model, (w_e, fixed), (x,)), y, reduction="none")
        return loss_e - loss.detach()

    return _score_samples(
        model,
        loader,
        per_batch,
        trials=1,
        device=device,
        num_samples=num_samples,
        what="reference.sam_loss_gap_scores",
        vmapped=False,
    )
