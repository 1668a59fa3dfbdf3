"""sbfast.compat.nsam: the release's NSAM (sam/sam.py), backed by sbfast.

``NSAM(params, base_optimizer, rho=0.05, adaptive=False, **kwargs)`` is a drop-in for the
release's ``sam.sam.NSAM``: same constructor, same methods (``normal_step``, ``first_step``,
``second_step``, ``third_step``, ``back_step``, ``step``), ``param_groups`` and
``base_optimizer`` for LR schedulers (``MultiStepLR(optimizer.base_optimizer, ...)``).

- With ``torch.optim.SGD`` as the base it runs fused: an instance of :class:`FusedNSAM`, a
  :class:`sbfast.optim.SharpBalanceSAM` (flat buffers, one pass per phase). ``base_optimizer`` is
  the optimizer itself, so a scheduler built on it drives the fused step. The release builds
  the optimizer before ``model.to(device)``; the fused optimizer notices the move at its next
  phase and re-points the parameters at buffers on the new device (silently here).
- With any other base optimizer it falls back to :class:`ReferenceNSAM`, the plain-PyTorch
  ``sbfast.reference.SAM`` (the release's NSAM with its documented fixes), and warns once.

Either way ``isinstance(opt, NSAM)`` holds. Differences from the release are those of
``sbfast.reference.SAM`` (documented there), plus: ``step`` without a closure raises ValueError
(the release asserts), and the fused optimizer keeps gradients as views of a flat buffer
(``zero_grad`` zeroes in place; see ``sbfast.optim``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from sbfast.optim import SharpBalanceSAM
from sbfast.reference import SAM

__all__ = ["NSAM", "FusedNSAM", "ReferenceNSAM"]

# keyword arguments of torch.optim.SGD that the fused path takes, and those it accepts as no-ops
_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
_SGD_NOOP_KEYS = ("foreach", "differentiable", "fused")

_warned_unfused = False


class NSAM:
    """The release's NSAM constructor: returns a :class:`FusedNSAM` for ``torch.optim.SGD``,
    else a :class:`ReferenceNSAM` (with a one-time warning). See the module docstring."""

    def __new__(
        cls,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> NSAM:
        if cls is not NSAM:
            return super().__new__(cls)
        if base_optimizer is torch.optim.SGD:
            return super().__new__(FusedNSAM)
        global _warned_unfused
        if not _warned_unfused:
            _warned_unfused = True
            name = getattr(base_optimizer, "__name__", repr(base_optimizer))
            warnings.warn(
                f"sbfast.compat.NSAM: base optimizer {name} is not torch.optim.SGD; using the unfused "
                "reference SAM (sbfast.reference.SAM). Only SGD runs fused.",
                RuntimeWarning,
                stacklevel=2,
            )
        return super().__new__(ReferenceNSAM)


class FusedNSAM(NSAM, SharpBalanceSAM):
    """NSAM over ``torch.optim.SGD``, fused (a :class:`sbfast.optim.SharpBalanceSAM`)."""

    _warn_on_moved_params = False  # the release moves the model after building the optimizer

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("maximize", False):
            raise ValueError("NSAM: maximize=True is not supported")
        unknown = set(kwargs) - set(_SGD_KEYS) - set(_SGD_NOOP_KEYS) - {"maximize"}
        if unknown:
            raise TypeError(f"NSAM: unexpected keyword arguments for torch.optim.SGD: {sorted(unknown)}")
        sgd = {k: kwargs[k] for k in _SGD_KEYS if k in kwargs}
        sgd.setdefault("lr", 1e-3)  # torch.optim.SGD's default
        SharpBalanceSAM.__init__(self, params, rho=rho, adaptive=adaptive, **sgd)

    @property
    def base_optimizer(self) -> FusedNSAM:
        """The optimizer itself: SGD is built in, so schedulers on it drive the fused step."""
        return self

    def back_step(self, zero_grad: bool = False) -> None:
        """Go back from w + e to w (exactly) without an update, as the release's back_step
        (:meth:`sbfast.optim.SharpBalanceSAM.restore`)."""
        self.restore(zero_grad=zero_grad)


class ReferenceNSAM(NSAM, SAM):
    """NSAM over any other base optimizer: ``sbfast.reference.SAM`` (unfused)."""

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        SAM.__init__(self, params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)

    @torch.no_grad()
    def back_step(self, zero_grad: bool = False) -> None:
        """Go back from w + e to w (exactly) without an update, as the release's back_step."""
        for group in self.param_groups:
            for p in group["params"]:
                old_p = self.state.get(p, {}).pop("old_p", None)
                if old_p is not None:
                    p.copy_(old_p)
        if zero_grad:
            self.zero_grad()
