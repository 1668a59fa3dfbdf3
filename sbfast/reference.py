"""Plain-PyTorch twin of everything sbfast computes (see ALGORITHM.md).

Written for clarity, not speed: it is the baseline of every parity test and every
benchmark, and the fallback where no kernel exists for a device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap


def global_sq_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared global L2 norm of a list of tensors, sum_t sum_i t_i^2.

    Args:
        tensors: any number of floating tensors, any shapes, on one device.
    Returns:
        0-d tensor on the tensors' device (CPU for an empty list); float64 if any input is
        float64, else float32 (half and bfloat16 inputs accumulate in float32).
    """
    if len(tensors) == 0:
        return torch.zeros((), dtype=torch.float32)
    acc_dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    total = torch.zeros((), dtype=acc_dtype, device=tensors[0].device)
    for t in tensors:
        total = total + t.detach().to(acc_dtype).pow(2).sum()
    return total


# --------------------------------------------------------------------------------------------
# Section 2: SAM with the "normal" half (the release's NSAM)
# --------------------------------------------------------------------------------------------

_SAM_EPS = 1e-12  # the release's denominator guard, e = rho * g / (||g|| + 1e-12)


def _check_rho(rho: object, where: str = "rho") -> None:
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
        raise ValueError(f"{where} must be a real number, got {rho!r} ({type(rho).__name__})")
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"{where} must be finite and >= 0, got {rho!r}")


def _sam_grad_norm(pairs: Sequence[tuple[torch.Tensor, torch.Tensor, bool]]) -> torch.Tensor:
    """||(|w| if adaptive else 1) * g||_2 over (w, g, adaptive) triples, as the release.

    The release takes the norm of the per-tensor norms rather than one sum of squares; the two
    agree mathematically but not bit for bit, and this file is the bit-level baseline.
    """
    device = pairs[0][0].device
    norms = [((w.abs() * g) if adaptive else g).norm(p=2).to(device) for w, g, adaptive in pairs]
    return torch.norm(torch.stack(norms), p=2)


class SAM(torch.optim.Optimizer):
    """SAM / ASAM wrapping a base optimizer, with SharpBalance's normal half (release `NSAM`).

    ``param_groups`` is the base optimizer's list itself, so LR schedulers and ``add_param_group``
    act on both. Each group carries ``rho`` (>= 0) and ``adaptive``; the gradient norm is one
    number across all groups. Per step, use either ``step(closure)`` or the explicit sequence
    ``[normal_step] -> first_step -> (backward at w + e) -> second_step`` or
    ``normal_step -> third_step`` (a batch with no SAM part).

    Divergences from the release, all in cases where it crashes or silently misbehaves:
    ``second_step`` restores every parameter perturbed by ``first_step`` (the release skips one
    that has no gradient at w + e, leaving it at w + e) and adds ``normal_g`` also to a parameter
    with no gradient at w + e; saved gradients and weights are consumed (popped) by the step that
    uses them, so stale ones never leak into a later step; ``state_dict`` includes the base
    optimizer's state (momentum buffers), which the release's loses.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        _check_rho(rho)
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError(
                "base_optimizer must be a torch.optim.Optimizer subclass (the class, not an "
                f"instance), got {base_optimizer!r}"
            )
        defaults = dict(rho=rho, adaptive=adaptive, **base_kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.has_normal = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # checked before the group is added, so a bad rho changes nothing
        _check_rho(param_group.get("rho", self.defaults["rho"]), "param group's rho")
        super().add_param_group(param_group)

    def _params_with_grad(self) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p

    def _base_step(self) -> None:
        self.base_optimizer.step()
        # LR schedulers watch `step` of the optimizer they were given; a SAM step goes through
        # second_step/third_step, so say it happened or the scheduler warns on its first step.
        self._opt_called = True

    @torch.no_grad()
    def normal_step(self, zero_grad: bool = False) -> None:
        """Keep the current gradients (the normal part's g_n, taken at w) for the coming step."""
        self.has_normal = True
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    self.state.get(p, {}).pop("normal_g", None)
                else:
                    self.state[p]["normal_g"] = p.grad.clone()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """w <- w + e with e = rho * g / (n + 1e-12) (ASAM: rho * w^2 * g / (n + 1e-12)).

        n is the global norm over every parameter with a gradient, across all groups; each group
        uses its own rho. Raises ValueError, touching nothing, if no parameter has a gradient or
        n is not finite.
        """
        pairs = [(p, p.grad, bool(g["adaptive"])) for g, p in self._params_with_grad()]
        if not pairs:
            raise ValueError("SAM.first_step: no parameter has a gradient; call backward() first")
        grad_norm = _sam_grad_norm(pairs)
        if not bool(torch.isfinite(grad_norm)):
            raise ValueError(
                f"SAM.first_step: the gradient norm is not finite ({grad_norm.item()}); "
                "parameters left unperturbed"
            )
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + _SAM_EPS)
            for p in group["params"]:
                if p.grad is None:
                    continue
                # a copy of w, not w + e - e later: the restore must be bit-exact
                self.state[p]["old_p"] = p.detach().clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly, then take the base step on g' (+ g_n if normal_step was called)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                old_p = state.pop("old_p", None)
                if old_p is not None:
                    p.copy_(old_p)  # in place: keeps p's storage, which optimizers may alias
                normal_g = state.pop("normal_g", None)
                if self.has_normal and normal_g is not None:
                    p.grad = normal_g if p.grad is None else p.grad + normal_g
        self.has_normal = False
        self._base_step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def third_step(self, zero_grad: bool = False) -> None:
        """A batch with no SAM part: the base step on g_n alone (the grads kept by normal_step)."""
        if self.has_normal:
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p)
                    if state and "normal_g" in state:
                        p.grad = state.pop("normal_g")
        self.has_normal = False
        self._base_step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Plain SAM step. Gradients at w must already be there; ``closure`` recomputes the
        loss and its gradients at w + e (forward + backward) and its return value is returned."""
        if closure is None:
            raise ValueError("SAM.step requires a closure that does a forward and backward pass")
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        loss = closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        base_sd = state_dict.pop("base_optimizer", None)
        super().load_state_dict(state_dict)
        if base_sd is not None:
            self.base_optimizer.load_state_dict(base_sd)
        # both loads build fresh group dicts: share them again so schedulers reach the base
        self.base_optimizer.param_groups = self.param_groups


# --------------------------------------------------------------------------------------------
# Section 3: per-sample scores
# --------------------------------------------------------------------------------------------


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    # per module, since a model may deliberately keep some submodules (e.g. frozen BN) in eval
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def _split_params(
    model: nn.Module, device: torch.device | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.device, torch.dtype]:
    """(trainable params, frozen params + buffers) as detached tensors on the compute device."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("model has no trainable parameters (requires_grad=True); nothing to score")
    first = next(iter(trainable.values()))
    dev = torch.device(device) if device is not None else first.device
    params = {n: p.detach().to(dev) for n, p in trainable.items()}
    fixed = {n: p.detach().to(dev) for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update({n: b.to(dev) for n, b in model.named_buffers()})
    return params, fixed, dev, first.dtype


def _check_batch(
    index: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n_classes_of: Callable[[torch.Tensor], int]
) -> None:
    if index.dim() != 1 or y.dim() != 1 or x.dim() < 1:
        raise ValueError(
            f"expected index [b], x [b, ...], y [b]; got shapes {tuple(index.shape)}, "
            f"{tuple(x.shape)}, {tuple(y.shape)}"
        )
    if not (index.shape[0] == x.shape[0] == y.shape[0]):
        raise ValueError(
            f"batch sizes differ: index {index.shape[0]}, x {x.shape[0]}, y {y.shape[0]}"
        )
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
) -> torch.Tensor:
    """Shared loop: eval mode, batches to the compute device, scores averaged per index."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an int >= 1, got {trials!r}")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 0):
        raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
    params, fixed, dev, dtype = _split_params(model, device)

    def n_classes_of(x: torch.Tensor) -> int:
        with torch.no_grad():
            out = functional_call(model, (params, fixed), (x[:1],))
        if out.dim() != 2 or out.shape[0] != 1:
            raise ValueError(f"model must map [b, ...] to logits [b, C], got {tuple(out.shape)}")
        return out.shape[1]

    indices: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    modes = _module_modes(model)
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
        _restore_modes(modes)
    if not indices:
        raise ValueError("loader yielded no samples")
    index = torch.cat(indices)
    n = int(index.max()) + 1 if num_samples is None else num_samples
    if int(index.max()) >= n:
        raise ValueError(f"sample index {int(index.max())} >= num_samples={n}")
    # mean per index: trials average, and an index never seen is NaN rather than a fake score
    sums = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, index, torch.cat(values).double())
    counts = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(
        0, index, torch.ones_like(index, dtype=torch.float64))
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
        out = functional_call(model, (p, fixed), (x1.unsqueeze(0),))
        return F.cross_entropy(out, y1.unsqueeze(0))

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, None, 0, 0))

    def per_batch(params: dict, fixed: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grads = per_sample_grad(params, fixed, x, y)
        return sum(g.pow(2).flatten(1).sum(1) for g in grads.values())

    return _score_samples(model, loader, per_batch, trials=trials, device=device,
                          num_samples=num_samples)


def _perturbed_params(
    params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], rho: float, adaptive: bool
) -> dict[str, torch.Tensor]:
    """w + e for a functional_call, e the SAM perturbation of ``grads`` (section 2), computed in
    SAM.first_step's operation order so that w + e is the same bits; names without a gradient
    keep w. Raises ValueError on a non-finite gradient norm."""
    norm = _sam_grad_norm([(params[n], gi, adaptive) for n, gi in grads.items()])
    if not bool(torch.isfinite(norm)):
        raise ValueError(f"the batch's gradient norm is not finite ({norm.item()})")
    scale = rho / (norm + _SAM_EPS)
    return {n: (p + (torch.pow(p, 2) if adaptive else 1.0) * grads[n] * scale.to(p)) if n in grads else p
            for n, p in params.items()}


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
    _check_rho(rho)

    def per_batch(params: dict, fixed: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = {n: p.detach().requires_grad_() for n, p in params.items()}
        with torch.enable_grad():
            loss = F.cross_entropy(functional_call(model, (w, fixed), (x,)), y, reduction="none")
            grads = torch.autograd.grad(loss.mean(), list(w.values()), allow_unused=True)
        g = {n: gi for n, gi in zip(w, grads, strict=True) if gi is not None}
        if not g:
            raise ValueError("the loss does not depend on any trainable parameter")
        w_e = _perturbed_params(params, g, rho, adaptive)
        with torch.no_grad():
            loss_e = F.cross_entropy(functional_call(model, (w_e, fixed), (x,)), y, reduction="none")
        return loss_e - loss.detach()

    return _score_samples(model, loader, per_batch, trials=1, device=device,
                          num_samples=num_samples)


# --------------------------------------------------------------------------------------------
# Section 4: subset selection
# --------------------------------------------------------------------------------------------

# k = floor(N * r + 1e-9): N * r in floating point can land just below an integer that the
# decimal ratio hits exactly (100 * 0.29 = 28.999999999999996), and the release's int() would
# then give 28. The guard is far below any real fractional part for N up to ~1e6.
_COUNT_EPS = 1e-9

VARIANTS = ("balance", "boost", "random", "same")


def _floor_count(n: int, fraction: float) -> int:
    """floor(n * fraction) with the rounding guard above, clamped to [0, n]."""
    return min(n, max(0, math.floor(n * fraction + _COUNT_EPS)))


def select_sam_masks(
    scores: torch.Tensor,
    ratio: float,
    variant: str = "balance",
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """SharpBalance's per-member SAM sets (section 4).

    Args:
        scores: floating [M, N], finite; S[j, i] = sharpness of sample i under member j
            (smaller = flatter). Only its shape is used by `random` and `same`.
        ratio: r in [0, 1]; k = floor(N * r + 1e-9) flattest samples per member.
        variant: `balance` (SAM set of i = A_i | R_i), `boost` (A_i | (R minus R_i)),
            `random` (normal set = floor(N (1 - r) + 1e-9) samples drawn with member i's seed),
            `same` (one such draw with seed 0, shared by all members).
        seeds: one int per member, used by `random` only; default 0..M-1.
    Returns:
        bool [M, N] on scores' device; True = SAM for that member, False = normal.

    F_j takes the k smallest scores of row j with ties broken by ascending index (stable sort);
    R is the complement of the union of the F_j in ascending index order and R_i = R[i::M];
    A_i is the union of F_j over j != i (empty when M = 1).
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [M, N], got shape {tuple(scores.shape)}")
    m, n = scores.shape
    if m == 0:
        raise ValueError("scores has M = 0 members")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or inf (was every sample scored?)")
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"ratio must be a real number, got {ratio!r} ({type(ratio).__name__})")
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if seeds is None:
        seeds = list(range(m))
    else:
        seeds = list(seeds)
        if len(seeds) != m:
            raise ValueError(f"len(seeds) = {len(seeds)} but scores has M = {m} members")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral):
                raise ValueError(f"seeds must be ints, got {s!r}")
    device = scores.device

    if variant in ("random", "same"):
        n_normal = _floor_count(n, 1.0 - ratio)
        member_seeds = seeds if variant == "random" else [0] * m
        mask = torch.ones(m, n, dtype=torch.bool)
        for i, seed in enumerate(member_seeds):
            g = torch.Generator().manual_seed(int(seed))
            mask[i, torch.randperm(n, generator=g)[:n_normal]] = False
        return mask.to(device)

    k = _floor_count(n, ratio)
    flat = ksmallest_mask(scores, k)  # row j = F_j, the k flattest samples of member j
    return sharpbalance_masks(flat, 0 if variant == "balance" else 1)


# --------------------------------------------------------------------------------------------
# Section 5: the mixed SharpBalance step
# --------------------------------------------------------------------------------------------


def mixed_step(
    model: nn.Module,
    optimizer: SAM,
    x: torch.Tensor,
    y: torch.Tensor,
    sam_mask: torch.Tensor,
) -> float:
    """One SharpBalance step on a batch: SAM on the samples where ``sam_mask``, SGD on the rest.

    The update is the base optimizer's step on the gradient of the batch-mean loss in which
    the SAM samples are evaluated at w + e (e from the SAM part's mean loss). The normal part
    and the SAM part are separate forward passes, as the release (BatchNorm sees three a step).
    The model's mode is left as is (normally train). Gradients are zeroed first, as the
    release's loop does before each step.

    Args:
        x: [b, ...] inputs; y: int64 [b] targets; sam_mask: bool [b], True = SAM sample.
    Returns:
        the batch-mean loss at w, a python float.
    """
    if not all(hasattr(optimizer, f) for f in ("normal_step", "first_step", "second_step",
                                               "third_step")):
        raise TypeError(f"optimizer must be a SAM, got {type(optimizer).__name__}")
    if not isinstance(sam_mask, torch.Tensor) or sam_mask.dtype != torch.bool:
        raise ValueError(f"sam_mask must be a bool tensor, got {getattr(sam_mask, 'dtype', sam_mask)!r}")
    if x.dim() < 1 or y.dim() != 1 or sam_mask.dim() != 1:
        raise ValueError(
            f"expected x [b, ...], y [b], sam_mask [b]; got shapes {tuple(x.shape)}, "
            f"{tuple(y.shape)}, {tuple(sam_mask.shape)}"
        )
    b = x.shape[0]
    if not (b == y.shape[0] == sam_mask.shape[0]) or b == 0:
        raise ValueError(
            f"batch sizes differ or are empty: x {b}, y {y.shape[0]}, sam_mask {sam_mask.shape[0]}"
        )
    sam_mask = sam_mask.to(x.device)
    n_sam = int(sam_mask.sum())
    n_normal = b - n_sam
    optimizer.zero_grad()
    total = 0.0
    if n_normal > 0:
        loss_n = F.cross_entropy(model(x[~sam_mask]), y[~sam_mask]) * (n_normal / b)
        loss_n.backward()
        total += loss_n.item()
        optimizer.normal_step(zero_grad=True)
    if n_sam > 0:
        xs, ys = x[sam_mask], y[sam_mask]
        loss_s = F.cross_entropy(model(xs), ys)
        loss_s.backward()
        total += (loss_s * (n_sam / b)).item()
        optimizer.first_step(zero_grad=True)
        (F.cross_entropy(model(xs), ys) * (n_sam / b)).backward()
        optimizer.second_step(zero_grad=True)
    else:
        optimizer.third_step(zero_grad=True)
    return total


# --------------------------------------------------------------------------------------------
# Section 6: train_ensemble (issue 3, the training loop). The slow, plain baseline of
# sbfast.train.train_ensemble: reference SAM over torch.optim.SGD, one shuffled DataLoader per
# member (the release's random batches, augmentation as a data-set transform), reference scoring
# and selection, the members trained one after another within each epoch of one process and
# meeting at the start of epoch T_d + 1 to share their scores. Data loading, model construction,
# the LR schedule and the final evaluation are shared with sbfast.train, so the two trainers
# differ only in how they train.
# --------------------------------------------------------------------------------------------


def train_member_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    phase: str,
    *,
    sam_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """One epoch of one member, written like the release's loop.

    Args:
        optimizer: torch.optim.SGD for phase "sgd"; a SAM for "sam" and "mixed".
        loader: yields (index [b], x [b, ...] float32, y [b]); batches move to device/dtype here.
        phase: "sgd" (plain SGD), "sam" (SAM on every sample) or "mixed" (``mixed_step`` with
            ``sam_mask[index]``; sam_mask: bool [N], True = SAM for this member).
    Returns:
        the mean over batches of the batch-mean loss at w.
    """
    if phase not in ("sgd", "sam", "mixed"):
        raise ValueError(f"phase must be 'sgd', 'sam' or 'mixed', got {phase!r}")
    if phase == "mixed" and sam_mask is None:
        raise ValueError("phase 'mixed' needs sam_mask (bool [N])")
    model.train()
    losses = []
    for index, x, y in loader:
        x = x.to(device=device, dtype=dtype)
        y = y.to(device)
        if phase == "sgd":
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        elif phase == "sam":
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.second_step(zero_grad=True)
            losses.append(loss.item())
        else:
            losses.append(mixed_step(model, optimizer, x, y, sam_mask[index]))
    if not losses:
        raise ValueError("loader yielded no batches")
    return sum(losses) / len(losses)


def train_ensemble(config: Any, callbacks: Sequence[Any] | None = None, *, data: Any = None) -> Any:
    """Section 6 for ``de``, ``de_sam`` and ``sharpbalance``, plainly (see the section header).

    Args:
        config: a ``sbfast.train.TrainConfig`` (or a dict of its fields). Its ``backend``,
            ``batching``, ``compile`` and ``cuda_graphs`` are ignored: this twin always runs the
            reference components on the release's random batches, and the returned config says
            so (backend "reference", batching "exact").
        callbacks: as ``sbfast.train.train_ensemble``. data: a ``sbfast.train.TrainData`` to reuse.
    Returns:
        ``sbfast.train.EnsembleResult``. Same seeds as the fast trainer (member j: seed + j for
        its initialisation and batch order, seed + j + AUG_SEED_OFFSET for its augmentation), so
        ``sbfast.train.train_ensemble`` with backend "reference" and batching "exact" gives the
        same parameters.
    """
    import time

    from sbfast import train as T
    from sbfast.data import RandomCropFlip, make_loader

    config = T.as_config(config).replace(backend="reference", batching="exact", compile=False, cuda_graphs=False)
    device, dtype = config.check_device(), config.torch_dtype
    cbs = T._CallbackList(callbacks)
    data = data if data is not None else T.load_data(config)
    n = len(data.train)
    m_count = config.members
    t_start = time.perf_counter()

    def test_batches() -> Iterator[torch.Tensor]:
        return (x.to(device) for _, x, _ in make_loader(data.test, config.eval_batch_size, shuffle=False))

    with T._threads(config.num_threads, device):
        models, optimizers, schedulers, loaders = [], [], [], []
        for j in range(m_count):
            model = T.build_member(config, data, j, device)
            if config.method == "de":
                opt: torch.optim.Optimizer = torch.optim.SGD(
                    model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
                )
            else:
                opt = SAM(model.parameters(), torch.optim.SGD, rho=config.rho, adaptive=config.adaptive,
                          lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)  # fmt: skip
            seeds = T.member_seeds(config, j)
            transform = None
            if config.augment:
                transform = RandomCropFlip(config.augment_pad, seeds["augment"], flip=config.augment_flip,
                                           mean=data.train.mean, std=data.train.std)  # fmt: skip
            models.append(model)
            optimizers.append(opt)
            schedulers.append(T.make_lr_scheduler(opt, config))
            loaders.append(make_loader(data.train.with_transform(transform), config.batch_size, shuffle=True,
                                       seed=seeds["order"]))  # fmt: skip
        cbs.call("on_train_start", config, models)

        scores = masks = None
        history = []
        train_s = score_s = eval_s = 0.0
        for epoch in T._progress(range(config.epochs), config.progress, f"{config.method} [reference trainer]"):
            phase = config.phase_of(epoch)
            cbs.call("on_epoch_start", epoch, phase)
            score_time = None
            if config.method == "sharpbalance" and epoch == config.swap_epoch + 1:
                t0 = time.perf_counter()
                plain = make_loader(data.train, config.scoring_batch_size, shuffle=False)
                scores = torch.stack([
                    fisher_scores(m, plain, trials=config.fisher_trials, device=device, num_samples=n).float().cpu()
                    for m in models
                ])  # fmt: skip
                seeds_all = [T.member_seeds(config, j)["init"] for j in range(m_count)]
                masks = select_sam_masks(scores, config.ratio, config.variant, seeds_all)
                score_time = time.perf_counter() - t0
                score_s += score_time
                cbs.call("on_scores", epoch, scores, masks)
            lr = float(optimizers[0].param_groups[0]["lr"])
            t1 = time.perf_counter()
            losses = []
            for j in range(m_count):
                mask = masks[j] if masks is not None else None
                losses.append(train_member_epoch(models[j], optimizers[j], loaders[j], phase, sam_mask=mask,
                                                 device=device, dtype=dtype))  # fmt: skip
                schedulers[j].step()
            t2 = time.perf_counter()
            train_s += t2 - t1
            record: dict[str, Any] = {
                "epoch": epoch, "phase": phase, "lr": lr, "train_loss": losses, "test_acc": None,
                "ensemble_test_acc": None, "time_s": t2 - t1, "score_s": score_time,
                "samples_per_s": m_count * n / max(t2 - t1, 1e-12),
            }  # fmt: skip
            if (epoch + 1) % config.eval_every == 0 or epoch == config.epochs - 1:
                probs = T.predict_probs(models, test_batches, dtype)
                record["test_acc"], record["ensemble_test_acc"] = T._accuracies(probs, data.test.y)
            record["eval_s"] = time.perf_counter() - t2
            eval_s += record["eval_s"]
            history.append(record)
            cbs.call("on_epoch_end", epoch, record)

        ev = T.evaluate_ensemble(models, data, config, device, T._reference_fisher, test_batches=test_batches)
    timing = {"total_s": time.perf_counter() - t_start, "train_s": train_s, "score_s": score_s,
              "epoch_eval_s": eval_s, **ev["timing"]}  # fmt: skip
    components = {
        "optimizer": "torch.optim.SGD" if config.method == "de" else "reference.SAM(torch.optim.SGD)",
        "fisher": "reference.fisher_scores", "select": "reference.select_sam_masks",
        "batching": "exact", "device": str(device), "trainer": "reference.train_ensemble",
    }  # fmt: skip
    result = T.EnsembleResult(
        config=config, metrics=ev["metrics"], ood=ev["ood"], history=history, sharpness=ev["sharpness"],
        scores=scores, masks=masks, timing=timing, components=components, models=models, probs=ev["probs"],
    )  # fmt: skip
    cbs.call("on_train_end", result)
    if config.output_dir:
        result.save(config.output_dir)
    return result


# --------------------------------------------------------------------------------------------
# Issue 6: op-level twins of select_sam_masks' two stages, sbfast::ksmallest_mask and
# sbfast::sharpbalance_masks (the CPU fallback where sbfast._C is missing). Same rules as
# select_sam_masks above, which is built from them: select_sam_masks(s, r, v) ==
# sharpbalance_masks(ksmallest_mask(s, k), v), k = _floor_count(N, r), v = 0 (balance) or 1 (boost).
# --------------------------------------------------------------------------------------------


def ksmallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [M, N]: per row of floating ``scores`` [M, N], True at its k smallest (0 <= k <= N),
    ties by ascending index: the first k of a stable ascending sort (so -0.0 == +0.0, NaN last)."""
    m, n = scores.shape
    flat = torch.zeros(m, n, dtype=torch.bool, device=scores.device)
    flat.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)
    return flat


def sharpbalance_masks(flat_mask: torch.Tensor, variant: int) -> torch.Tensor:
    """Bool [M, N] SAM masks from the members' flat sets ``flat_mask`` (bool [M, N], row j = F_j).

    variant 0 (balance): A_i | R_i; 1 (boost): A_i | (R minus R_i); R = samples in no F_j, in
    ascending index, R_i = R[i::M]; A_i = union of F_j over j != i.
    """
    m, n = flat_mask.shape
    device = flat_mask.device
    flat_count = flat_mask.sum(0)
    rest = torch.nonzero(flat_count == 0).squeeze(1)
    mask = torch.zeros(m, n, dtype=torch.bool, device=device)
    for i in range(m):
        others = (flat_count - flat_mask[i].long()) > 0
        in_r_i = torch.zeros(n, dtype=torch.bool, device=device)
        in_r_i[rest[i::m]] = True
        if variant == 0:
            mask[i] = others | in_r_i
        else:
            in_r = torch.zeros(n, dtype=torch.bool, device=device)
            in_r[rest] = True
            mask[i] = others | (in_r & ~in_r_i)
    return mask


# --------------------------------------------------------------------------------------------
# Issue 5: per-sample gradient-norm ops (the per-layer identities behind fast fisher_scores)
# --------------------------------------------------------------------------------------------


def _per_sample_acc_dtype(a: torch.Tensor, g: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (a.dtype, g.dtype) else torch.float32


def per_sample_grad_sq_norm_direct(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """s_i = ||G_i^T A_i||_F^2 = ||sum_t g_it a_it^T||_F^2, by forming each per-sample gradient.

    Args:
        a: [B, T, d] layer inputs (activations), floating.
        g: [B, T, p] gradients of the layer's outputs, floating.
    Returns:
        [B], float64 if either input is float64, else float32.
    """
    acc = _per_sample_acc_dtype(a, g)
    return torch.bmm(g.to(acc).transpose(1, 2), a.to(acc)).pow(2).sum((1, 2))


def per_sample_grad_sq_norm_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The same s_i by the Gram ("ghost norm") identity: sum_{t,s} (a_t . a_s)(g_t . g_s).

    Args and return as :func:`per_sample_grad_sq_norm_direct`.
    """
    acc = _per_sample_acc_dtype(a, g)
    a, g = a.to(acc), g.to(acc)
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))


def per_sample_conv_grad_sq_norm(
    x: torch.Tensor,
    g: torch.Tensor,
    weight_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """s_i = ||dW_i||_F^2, dW_i the weight gradient of a 1-D/2-D convolution for sample i alone.

    The input unfolded to [B, T, C_in/groups * k] per group is a Linear's input, so
    s_i = sum over groups of ||G_ig^T A_ig||_F^2 (:func:`per_sample_grad_sq_norm_direct`).

    Args:
        x: [B, C_in, *S] the convolution's input (explicit padding modes already applied),
        g: [B, C_out, *S'] the gradient of its output; weight_size: [C_out, C_in/groups, *k];
        stride, padding (zeros), dilation: one int per spatial dim; groups.
    Returns:
        [B], float64 if either input is float64, else float32.
    """
    b = x.shape[0]
    acc = _per_sample_acc_dtype(x, g)
    if b == 0 or x.numel() == 0 or g.numel() == 0:
        return torch.zeros(b, dtype=acc, device=x.device)
    kernel = tuple(weight_size[2:])
    if x.dim() == 3:  # Conv1d as a 2-D unfold with a height-1 kernel
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride, padding, dilation = (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    cols = F.unfold(x.to(acc), kernel, dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
    t = cols.shape[2]
    a = cols.view(b, groups, -1, t).transpose(2, 3).reshape(b * groups, t, -1)
    gg = g.to(acc).reshape(b, groups, -1, t).transpose(2, 3).reshape(b * groups, t, -1)
    return per_sample_grad_sq_norm_direct(a, gg).view(b, groups).sum(1)


# --------------------------------------------------------------------------------------------
# Issue 4: op-level twins of the fused SAM optimizer's two passes, sbfast::sam_perturb_ and
# sbfast::sam_restore_sgd_ (the CPU fallback where sbfast._C is missing). Each line is the
# torch op that SAM.first_step / SAM.second_step + torch.optim.SGD run on one parameter, so in
# float32/float64 they give the same bits; the fast kernels compute in float for bfloat16/float16.
# --------------------------------------------------------------------------------------------


def sam_perturb_(
    param: torch.Tensor, backup: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, adaptive: bool
) -> None:
    """backup <- w; w <- w + e, e = (adaptive ? w^2 * g : g) * s (SAM.first_step's order).

    Args:
        param, backup, grad: contiguous, same dtype and shape; ``param`` and ``backup`` are written.
        scale: 0-d s = rho / (||g|| + 1e-12); s == 0 (rho = 0, or a step skipped for a non-finite
            norm) leaves w untouched, also where g is infinite.
    """
    backup.copy_(param)
    e = (torch.pow(param, 2) * grad if adaptive else grad) * scale.to(param)
    param.add_(torch.where(scale != 0, e, torch.zeros_like(e)))


def sam_restore_sgd_(
    param: torch.Tensor,
    backup: torch.Tensor | None,
    grad: torch.Tensor,
    normal_grad: torch.Tensor | None,
    momentum_buf: torch.Tensor | None,
    momentum_ready: torch.Tensor | None,
    lr: torch.Tensor,
    skip: torch.Tensor,
    inv_scale: torch.Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    write_grad_sum: bool,
) -> None:
    """w <- backup (exactly; w itself when backup is None), then one torch.optim.SGD step on
    g = (g' + g_n) * inv_scale (g' alone when normal_grad is None).

    SGD, as torch's single-tensor path: d = g + wd * w; buf = d on the buffer's first step
    (momentum_ready[0] == 0), else momentum * buf + (1 - dampening) * d; d = d + momentum * buf
    (nesterov) or buf; w = w - lr * d. After the step momentum_ready is set to 1.
    With skip != 0 only the restore happens (buffers, flags and grads untouched).
    write_grad_sum stores g' + g_n (before inv_scale) into grad, the gradient the reference
    leaves in p.grad after the step. The scalars are read with float() (this twin serves CPU).
    """
    w0 = backup if backup is not None else param
    if float(skip) != 0:
        param.copy_(w0)
        return
    g = grad if normal_grad is None else grad + normal_grad
    if write_grad_sum and normal_grad is not None:
        grad.copy_(g)
    g = g * inv_scale.to(g.dtype)
    d = g.add(w0, alpha=weight_decay) if weight_decay != 0 else g
    if momentum != 0:
        if int(momentum_ready.reshape(-1)[0]) == 0:
            momentum_buf.copy_(d)
        else:
            momentum_buf.mul_(momentum).add_(d, alpha=1 - dampening)
        momentum_ready.fill_(1)
        d = d.add(momentum_buf, alpha=momentum) if nesterov else momentum_buf
    param.copy_(w0.add(d, alpha=-float(lr)))

