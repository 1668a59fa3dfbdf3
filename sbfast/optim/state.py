"""The host-side step state of ``SharpBalanceSAM`` and its state dict in torch.optim's layout."""

from __future__ import annotations

from typing import Any

import torch

from sbfast.optim.checks import check_group

__all__ = ["StepState", "check_loadable", "complete_groups", "sgd_layout"]


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
        self.opt_called = False  # what LR schedulers read as the optimizer's _opt_called
        # per gradient buffer, its version counters (one per bucket) when it was last zeroed, or
        # None when it may hold gradients: a phase sees whether anything wrote into it since
        # (backward accumulates in place, which bumps them) without reading the device
        self.zeroed_at: list[tuple[int, ...] | None] = [None, None]


def sgd_layout(state_dict: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` as torch.optim.SGD's layout: ``state[i] = {"momentum_buffer": ...}`` for
    the buffers it holds (also from a ``sbfast.reference.SAM``'s ``base_optimizer`` entry; the
    release NSAM's has none) and copies of its param groups, each validated against
    ``defaults`` (raises ValueError naming the group before anything is loaded)."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
        raise ValueError(
            "load_state_dict: expected an optimizer state dict (a dict with a 'param_groups' list), got "
            f"{type(state_dict).__name__}"
            + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else "")
        )
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
    for gi, g in enumerate(sd["param_groups"]):
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            raise ValueError(f"load_state_dict: param group {gi} is not a dict with a 'params' list")
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


def check_loadable(sd: dict[str, Any], groups: list[dict[str, Any]]) -> None:
    """Raise ValueError, before anything is loaded, unless ``sd`` (in :func:`sgd_layout`'s form)
    fits the optimizer's ``groups``: as many groups, as many parameters in each, every state entry
    naming a listed parameter, every momentum buffer a floating tensor of its parameter's shape."""
    saved = sd["param_groups"]
    if len(saved) != len(groups):
        raise ValueError(f"load_state_dict: the state dict has {len(saved)} param groups, this optimizer {len(groups)}")
    param_of: dict[Any, torch.Tensor] = {}
    for gi, (s, g) in enumerate(zip(saved, groups, strict=True)):
        if len(s["params"]) != len(g["params"]):
            raise ValueError(
                f"load_state_dict: param group {gi} has {len(s['params'])} parameters in the state dict, "
                f"{len(g['params'])} here"
            )
        param_of.update(zip(s["params"], g["params"], strict=True))
    for key, entry in sd["state"].items():
        if key not in param_of:
            raise ValueError(f"load_state_dict: state entry {key!r} names no parameter of the state dict's groups")
        buf, p = entry["momentum_buffer"], param_of[key]
        if not isinstance(buf, torch.Tensor) or not buf.is_floating_point():
            what = buf.dtype if isinstance(buf, torch.Tensor) else type(buf).__name__
            raise ValueError(
                f"load_state_dict: momentum_buffer of parameter {key!r} is {what}; expected a floating tensor"
            )
        if buf.shape != p.shape:
            raise ValueError(
                f"load_state_dict: momentum_buffer of parameter {key!r} has shape {tuple(buf.shape)}, the "
                f"parameter {tuple(p.shape)} (a state dict of another model?)"
            )
