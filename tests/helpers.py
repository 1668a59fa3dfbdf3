"""Assertions shared by the op tests."""

from __future__ import annotations

import torch


def error(x: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest absolute difference from an exact (float64) result."""
    return (x.detach().double().cpu() - exact.detach().double().cpu()).abs().max().item() if x.numel() else 0.0


def assert_within_plain_error(
    fast: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, *, atol: float, factor: float = 2.0
) -> None:
    """The flash-attention rule: the fast result's error against the exact (float64) result is
    at most ``factor`` times plain PyTorch's error in the same dtype, plus ``atol`` for the
    cases where plain PyTorch happens to be exact."""
    fast_err, plain_err = error(fast, exact), error(plain, exact)
    assert fast_err <= factor * plain_err + atol, (
        f"fast error {fast_err:.3g} > {factor} x plain error {plain_err:.3g} + {atol:.1g}"
    )
