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
the result is handed to the scaler (:func:`report_found_inf`), so ``scaler.update()`` backs off.
Do not call ``scaler.step`` or ``scaler.unscale_`` on this optimizer (g_n lives outside
``p.grad``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["inverse_scale", "report_found_inf", "scaler_enabled"]


def scaler_enabled(grad_scaler: Any) -> bool:
    """Whether ``grad_scaler`` is given and enabled."""
    return grad_scaler is not None and grad_scaler.is_enabled()


def inverse_scale(grad_scaler: Any, device: torch.device, ones: torch.Tensor) -> torch.Tensor:
    """0-d float32 1 / S on ``device`` (``ones`` without an enabled scaler), as
    ``GradScaler.unscale_`` computes it: the reciprocal in float64."""
    if not scaler_enabled(grad_scaler):
        return ones
    scale = getattr(grad_scaler, "_scale", None)
    if scale is None:
        raise ValueError("grad_scaler has no scale yet: call grad_scaler.scale(loss) before the step")
    return scale.double().reciprocal().float().to(device)


def report_found_inf(
    grad_scaler: Any, optimizer: torch.optim.Optimizer, device: torch.device, found: torch.Tensor
) -> None:
    """Tell the scaler that ``optimizer`` stepped, with ``found`` (> 0: an inf or NaN was seen
    and the step skipped), as ``GradScaler.step`` would, so that ``update()`` backs off."""
    if not scaler_enabled(grad_scaler):
        return
    from torch.amp.grad_scaler import OptState

    states = getattr(grad_scaler, "_per_optimizer_states", None)
    if states is None:
        raise RuntimeError("this torch's GradScaler has no _per_optimizer_states; cannot report the inf check")
    state = states[id(optimizer)]
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("grad_scaler: this optimizer already stepped since the last update()")
    state["found_inf_per_device"] = {device: (found > 0).float()}
    state["stage"] = OptState.STEPPED
