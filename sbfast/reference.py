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
        norm = _sam_grad_norm([(params[n], gi, adaptive) for n, gi in g.items()])
        if not bool(torch.isfinite(norm)):
            raise ValueError(f"the batch's gradient norm is not finite ({norm.item()})")
        scale = rho / (norm + _SAM_EPS)
        # same operation order as SAM.first_step, so w + e is the same bits
        w_e = {n: (p + (torch.pow(p, 2) if adaptive else 1.0) * g[n] * scale.to(p)) if n in g else p
               for n, p in params.items()}
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
    flat = torch.zeros(m, n, dtype=torch.bool, device=device)  # flat[j] = F_j
    order = torch.argsort(scores, dim=1, stable=True)
    flat.scatter_(1, order[:, :k], True)
    flat_count = flat.sum(0)
    rest = torch.nonzero(flat_count == 0).squeeze(1)  # R, ascending
    mask = torch.zeros(m, n, dtype=torch.bool, device=device)
    for i in range(m):
        others = (flat_count - flat[i].long()) > 0  # A_i
        in_r_i = torch.zeros(n, dtype=torch.bool, device=device)
        in_r_i[rest[i::m]] = True
        if variant == "balance":
            mask[i] = others | in_r_i
        else:
            in_r = torch.zeros(n, dtype=torch.bool, device=device)
            in_r[rest] = True
            mask[i] = others | (in_r & ~in_r_i)
    return mask


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
# Section 6: train_ensemble -- reserved. To be added by the training-loop work of issue 3;
# not written yet.
# --------------------------------------------------------------------------------------------
