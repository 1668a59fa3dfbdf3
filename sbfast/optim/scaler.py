"""``torch.amp.GradScaler`` protocol of ``SharpBalanceSAM`` (fp16 autocast spanning both passes).

bf16 autocast needs nothing special. fp16 autocast with a GradScaler (fp32 parameters) spans
both passes; pass the scaler to the phases and let it update as usual::

    scaler.scale(loss_normal).backward(); opt.normal_step(zero_grad=True)      # g_n * S
    scaler.scale(loss).backward(); opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(loss_at_w_plus_e).backward()
    opt.second_step(zero_grad=True, grad_scaler=scaler)   # or third_step(grad_scaler=scaler)
    scaler.update()

The perturbation uses the scaled g (e = rho g / ||g|| does not depend on the scale); the update
unscales once, inside the fused pass ((g' + g_n) / S); infs are checked once per gradient
buffer (g by the norm, g' and g_n by one read each), the step is skipped device-side and
the result is handed to the scaler (:class:`ScalerReport`), so ``scaler.update()`` backs off.
Do not call ``scaler.step`` or ``scaler.unscale_`` on this optimizer (g_n lives outside
``p.grad``).

Only the scaler's public API is used, asynchronously: S is ``grad_scaler.scale(1)`` (a device
tensor), and the step's skip flag reaches the scaler through ``grad_scaler.unscale_`` of a
one-element stand-in optimizer whose gradient is inf exactly when the step was skipped (the
scaler records the inf check per optimizer, and ``update()`` reads every record). The losses
must go through ``grad_scaler.scale`` before the phases: the scaler's scale is what they divide by.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ScalerReport", "inverse_scale", "scaler_enabled"]


def scaler_enabled(grad_scaler: Any) -> bool:
    """Whether ``grad_scaler`` is given and enabled."""
    return grad_scaler is not None and grad_scaler.is_enabled()


def inverse_scale(grad_scaler: Any, ones: torch.Tensor) -> torch.Tensor:
    """0-d float32 1 / S on ``ones``' device (``ones`` itself without an enabled scaler), as
    ``GradScaler.unscale_`` computes it: the reciprocal in float64. No host synchronisation."""
    if not scaler_enabled(grad_scaler):
        return ones
    scale = grad_scaler.scale(ones)  # 1 * S, exact
    return scale.double().reciprocal().float()


class ScalerReport:
    """Hands a step's skip flag to a GradScaler, as ``GradScaler.step`` would record its inf check.

    A stand-in optimizer holds one float32 zero whose ``.grad`` is set to inf when the step was
    skipped (0 otherwise); ``grad_scaler.unscale_(stand_in)`` finds it and records found_inf for
    ``update()``. Calling it twice before ``update()`` raises the scaler's own RuntimeError
    ("unscale_() has already been called on this optimizer since the last update()").
    """

    def __init__(self, device: torch.device) -> None:
        self.holder = torch.zeros(1, dtype=torch.float32, device=device)
        self.holder.grad = torch.zeros_like(self.holder)
        self.stand_in = torch.optim.Optimizer([self.holder], {})
        self.inf = torch.full((1,), float("inf"), dtype=torch.float32, device=device)

    def __call__(self, grad_scaler: Any, found: torch.Tensor) -> None:
        """Report ``found`` (0-d, > 0: an inf or NaN was seen and the step skipped)."""
        if not scaler_enabled(grad_scaler):
            return
        self.holder.grad.copy_(torch.where(found > 0, self.inf, 0.0))
        grad_scaler.unscale_(self.stand_in)
