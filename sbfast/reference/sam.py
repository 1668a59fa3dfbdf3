"""Section 2 of the algorithm: SAM with SharpBalance's normal half (the release's ``NSAM``).

The bit-level baseline of the fused optimizer (``sbfast.optim.SharpBalanceSAM``): every line is
the torch op the release runs, in the release's order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from sbfast.common import SAM_EPS, check_rho, sam_grad_norm


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
        check_rho(rho)
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
        check_rho(param_group.get("rho", self.defaults["rho"]), "param group's rho")
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
        grad_norm = sam_grad_norm(pairs)
        if not bool(torch.isfinite(grad_norm)):
            raise ValueError(
                f"SAM.first_step: the gradient norm is not finite ({grad_norm.item()}); parameters left unperturbed"
            )
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + SAM_EPS)
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
