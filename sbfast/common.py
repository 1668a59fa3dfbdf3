"""Small helpers that the plain-PyTorch reference and the fast paths both use.

It sits at the bottom of the package (imports only torch), so that ``sbfast.reference`` and the
fast modules (``sbfast.optim``, ``sbfast.sharpness``, ``sbfast.select``) share one definition of
the SAM perturbation, the subset count and the functional-call plumbing instead of reaching into
each other's private helpers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

SAM_EPS = 1e-12  # the release's denominator guard, e = rho * g / (||g|| + 1e-12)

# Subset selection variants (docs/algorithm.md, selection): the first two are computed by the
# sbfast::sharpbalance_masks op, whose variant code is the index here; the other two are draws.
VARIANTS = ("balance", "boost", "random", "same")
MASK_OP_VARIANTS = VARIANTS[:2]  # code 0 and 1 of sbfast::sharpbalance_masks


def check_rho(rho: object, where: str = "rho") -> None:
    """Raise ValueError unless ``rho`` is a finite real number >= 0 (``where`` names it)."""
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
        raise ValueError(f"{where} must be a real number, got {rho!r} ({type(rho).__name__})")
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"{where} must be finite and >= 0, got {rho!r}")


def sam_grad_norm(pairs: Sequence[tuple[torch.Tensor, torch.Tensor, bool]]) -> torch.Tensor:
    """||(|w| if adaptive else 1) * g||_2 over (w, g, adaptive) triples, as the release.

    The release takes the norm of the per-tensor norms rather than one sum of squares; the two
    agree mathematically but not bit for bit, and this file is the bit-level baseline.
    """
    device = pairs[0][0].device
    norms = [((w.abs() * g) if adaptive else g).norm(p=2).to(device) for w, g, adaptive in pairs]
    return torch.norm(torch.stack(norms), p=2)


def perturbed_params(
    params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], rho: float, adaptive: bool
) -> dict[str, torch.Tensor]:
    """w + e for a functional_call, e the SAM perturbation of ``grads`` (section 2), computed in
    SAM.first_step's operation order so that w + e is the same bits; names without a gradient
    keep w. Raises ValueError on a non-finite gradient norm."""
    norm = sam_grad_norm([(params[n], gi, adaptive) for n, gi in grads.items()])
    if not bool(torch.isfinite(norm)):
        raise ValueError(f"the batch's gradient norm is not finite ({norm.item()})")
    scale = rho / (norm + SAM_EPS)
    return {
        n: (p + (torch.pow(p, 2) if adaptive else 1.0) * grads[n] * scale.to(p)) if n in grads else p
        for n, p in params.items()
    }


def module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Each module's ``training`` flag, to put back with :func:`restore_modes`."""
    # per module, since a model may deliberately keep some submodules (e.g. frozen BN) in eval
    return [(m, m.training) for m in model.modules()]


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Put back the flags saved by :func:`module_modes`."""
    for m, training in modes:
        m.training = training


def functional_forward(model: nn.Module, tensors: dict[str, torch.Tensor] | tuple, args: tuple) -> Any:
    """``torch.func.functional_call(model, tensors, args)`` that leaves every module's own
    parameter and buffer objects in place afterwards, also on error.

    torch's call swaps the tensors in name by name and back in reverse; a module reached by two
    names (``nn.Sequential(l, act, l)``: ``0.weight`` and ``2.weight``) is swapped twice, and the
    way back leaves the swapped-in tensor at the second name, a plain detached tensor where the
    ``Parameter`` was. Here each module's ``_parameters`` and ``_buffers`` entries are put back as
    they were, object for object."""
    slots = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        return functional_call(model, tensors, args)
    finally:
        for m, params, buffers in slots:
            m._parameters.update(params)
            m._buffers.update(buffers)


def check_scorable(model: nn.Module, device: torch.device | str | None, what: str, *, vmapped: bool) -> None:
    """Refuse, in one line and before any work, a model that per-sample scoring cannot take:
    tensors on the meta device (or ``device="meta"``), an ``nn.Embedding`` with ``max_norm``
    (its forward renormalises the weight rows in place: scoring would write the model) and,
    where ``vmapped`` (``torch.func.vmap`` runs the model sample by sample), a recurrent layer
    (``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``: vmap cannot batch their fused kernels)."""
    if device is not None and torch.device(device).type == "meta":
        raise ValueError(f"{what}: device='meta' holds no values to compute with; pass a real device")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise ValueError(
                f"{what}: {name} is on the meta device (a shape without values); materialise the model "
                "first (e.g. model.to_empty(device=...) and initialise it)"
            )
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and m.max_norm is not None:
            raise ValueError(
                f"{what}: nn.Embedding '{name}' has max_norm={m.max_norm}: its forward "
                "renormalises the weight rows it looks up in place, so scoring would write the model's "
                "weights; score it with max_norm=None (renormalise the weight once beforehand if needed)"
            )
        if vmapped and isinstance(m, nn.RNNBase):
            raise ValueError(
                f"{what}: {type(m).__name__} '{name}' needs per-sample gradients by "
                "torch.func.vmap, which cannot run recurrent layers sample by sample; score a model "
                "without it, or freeze it (requires_grad=False) where every other layer has a per-layer rule"
            )


def split_params(
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


# k = floor(N * r + 1e-9): N * r in floating point can land just below an integer that the
# decimal ratio hits exactly (100 * 0.29 = 28.999999999999996), and the release's int() would
# then give 28. The guard is far below any real fractional part for N up to ~1e6.
COUNT_EPS = 1e-9


def floor_count(n: int, fraction: float) -> int:
    """floor(n * fraction) with the rounding guard above, clamped to [0, n]."""
    return min(n, max(0, math.floor(n * fraction + COUNT_EPS)))
