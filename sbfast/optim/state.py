"""The host-side step state of ``SharpBalanceSAM`` and its state dict in torch.optim's layout."""

from __future__ import annotations

from typing import Any

import torch

from sbfast.optim.checks import check_group

__all__ = ["StepState", "complete_groups", "sgd_layout"]


class StepState:
    """The host-side state that the phases change, kept off the optimizer object: dynamo
    replays attribute writes on a plain object, but (torch 2.14) drops some on an Optimizer."""

    def __init__(self, num_params: int, num_groups: int) -> None:
        self.cur = 0  # the gradient buffer that the p.grad views point into
        self.normal_buf: int | None = None  # the buffer that holds g_n
        self.normal_present: list[bool] | None = None  # params with a kept g_n
        self.perturbed: list[bool] | None = None  # params perturbed by first_step
        self.has_normal = False
        self.ready_host = [False] * num_params  # host mirror of the momentum flags
        self.lr_host: list[float | None] = [None] * num_groups  # float lr last copied to the device
        self.bn_saved: list[torch.Tensor] | None = None
        self.opt_called = False  # what LR schedulers read as the optimizer's _opt_called


def sgd_layout(state_dict: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` as torch.optim.SGD's layout: ``state[i] = {"momentum_buffer": ...}`` for
    the buffers it holds (also from a ``sbfast.reference.SAM``'s ``base_optimizer`` entry; the
    release NSAM's has none) and copies of its param groups, each validated against
    ``defaults`` (raises ValueError naming the group before anything is loaded)."""
    sd = dict(state_dict)
    base = sd.pop("base_optimizer", None)
    state: dict[Any, dict[str, Any]] = {}
    for k, v in sd.get("state", {}).items():
        if isinstance(v, dict) and v.get("momentum_buffer") is not None:
            state[k] = {"momentum_buffer": v["momentum_buffer"]}
    if base is not None:
        for k, v in base.get("state", {}).items():
            if isinstance(v, dict) and v.get("momentum_buffer") is not None:
                state[k] = {"momentum_buffer": v["momentum_buffer"]}
    groups = [dict(g) for g in sd["param_groups"]]
    for gi, g in enumerate(groups):
        merged = {**defaults, **{k: v for k, v in g.items() if k != "params"}}
        check_group(merged, f"state_dict param group {gi}")
    sd["state"] = state
    sd["param_groups"] = groups
    return sd


def complete_groups(
    groups: list[dict[str, Any]], defaults: dict[str, Any], lr_tensors: list[torch.Tensor | None]
) -> None:
    """After ``Optimizer.load_state_dict``: fill the keys a foreign state dict lacks from
    ``defaults``, and where a group had an lr tensor (``lr_tensors[gi]``) and the loaded lr is a
    float, fill that tensor in place and keep it (captured graphs read it)."""
    for gi, g in enumerate(groups):
        for key, value in defaults.items():
            g.setdefault(key, value)
        if lr_tensors[gi] is not None and not isinstance(g["lr"], torch.Tensor):
            lr_tensors[gi].fill_(float(g["lr"]))
            g["lr"] = lr_tensors[gi]
