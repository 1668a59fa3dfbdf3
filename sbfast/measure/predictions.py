"""Every member's logits and probabilities, computed once per data set and shared by every measure.

A data set is a pair (x [n, ...], y [n]); the data sets are a mapping from a key to such a pair.
A key is a name (``"test"``, ``"val"``) or a pair ``(corruption, severity)``: a corrupted copy of
the clean set named by ``clean``, which must then hold the same labels in the same order and
images of the same shape (CIFAR-C's layout).

Members run in eval mode (their modes are restored afterwards), under ``torch.no_grad``, in
batches of ``batch_size``; each member sees each sample of each data set exactly once. With
``stack=True`` the members' parameters are stacked (``torch.func.stack_module_state``) and one
vmapped forward runs every member on a batch; that needs members of one architecture. The
default (``stack=None``) stacks on CUDA, where separate small forwards are launch-bound, and
loops on the CPU, where the stacked forward measured slower (docs/measure_diversity.md).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sbfast.common import module_modes, restore_modes

DataKey = str | tuple[str, int]
DEFAULT_BATCH = 500  # the release's loaders use 200 (measure_diversity) and 500 (variance)


@dataclass(frozen=True)
class SetPredictions:
    """One data set's cached outputs, on the members' device.

    logits: [M, n, C] in the members' dtype; probs: softmax of logits over C, same dtype;
    targets: [n] int64 labels."""

    logits: torch.Tensor
    probs: torch.Tensor
    targets: torch.Tensor


def key_name(key: DataKey) -> str:
    """A data-set key as a string: the name, or ``"corruption/severity"`` for a corrupted set."""
    return key if isinstance(key, str) else f"{key[0]}/{key[1]}"


def check_members(members: object) -> list[nn.Module]:
    """``members`` as a non-empty list of nn.Modules with parameters, all on one device."""
    if isinstance(members, nn.Module) or not isinstance(members, Sequence) or len(members) == 0:
        raise TypeError(f"members must be a non-empty list of nn.Module, got {type(members).__name__}")
    bad = next((i for i, m in enumerate(members) if not isinstance(m, nn.Module)), None)
    if bad is not None:
        raise TypeError(f"members[{bad}] must be an nn.Module, got {type(members[bad]).__name__}")
    devices = []
    for i, m in enumerate(members):
        p = next(iter(m.parameters()), None)
        if p is None:
            raise ValueError(f"members[{i}] has no parameters; a member must be a trained network")
        devices.append(p.device)
    if len(set(devices)) > 1:
        raise ValueError(f"members must be on one device, got {[str(d) for d in devices]}")
    return list(members)


def same_architecture(members: Sequence[nn.Module]) -> bool:
    """True when every member has the parameters and buffers of member 0 (names, shapes, dtypes)."""

    def layout(m: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        named = [*m.named_parameters(), *m.named_buffers()]
        return [(n, tuple(t.shape), t.dtype) for n, t in named]

    first = layout(members[0])
    return all(layout(m) == first for m in members[1:])


def check_data(data: object, clean: str) -> dict[DataKey, tuple[torch.Tensor, torch.Tensor]]:
    """``data`` as {key: (x [n, ...], y [n] integer)} with corrupted sets matching ``clean``."""
    if not isinstance(data, Mapping) or len(data) == 0:
        raise TypeError(f"data must be a non-empty mapping {{name: (x, y)}}, got {type(data).__name__}")
    out: dict[DataKey, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, value in data.items():
        corrupt = isinstance(key, tuple)
        if not (isinstance(key, str) or (corrupt and len(key) == 2 and isinstance(key[0], str))):
            raise TypeError(f"data keys must be names or (corruption, severity) pairs, got {key!r}")
        if corrupt and (isinstance(key[1], bool) or not isinstance(key[1], int) or key[1] < 1):
            raise ValueError(f"severity must be an int >= 1, got {key[1]!r} in key {key!r}")
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            raise TypeError(f"data[{key!r}] must be a pair (x, y), got {type(value).__name__}")
        x, y = value
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"data[{key!r}] must hold tensors (x, y), got ({type(x).__name__}, {type(y).__name__})")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
            raise TypeError(f"data[{key!r}]: y must be [n] integer labels, got {y.dtype} {tuple(y.shape)}")
        if x.dim() < 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(
                f"data[{key!r}]: x must be [n, ...] with n = len(y) >= 1, got x {tuple(x.shape)}, y {tuple(y.shape)}"
            )
        out[key] = (x, y)
    corrupted = [k for k in out if isinstance(k, tuple)]
    if corrupted and clean not in out:
        raise ValueError(f"corrupted sets {corrupted[:3]} need their clean set {clean!r} in data; found {list(out)}")
    for key in corrupted:
        (x, y), (xc, yc) = out[key], out[clean]
        if x.shape[1:] != xc.shape[1:] or y.shape != yc.shape or not torch.equal(y.cpu(), yc.cpu()):
            raise ValueError(
                f"corrupted set {key!r} does not match the clean set {clean!r}: images {tuple(x.shape)} vs "
                f"{tuple(xc.shape)}, labels {'equal' if torch.equal(y.cpu(), yc.cpu()) else 'differ'} "
                f"(a corruption must be the clean set's images in the same order)"
            )
    return out


def stacked_forward(members: Sequence[nn.Module]):
    """f(x) -> [M, b, C]: one vmapped functional forward over the members' stacked state."""
    params, buffers = torch.func.stack_module_state(list(members))
    base = copy.deepcopy(members[0]).to("meta")

    def one(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,))

    batched = torch.vmap(one, in_dims=(0, 0, None))
    return lambda x: batched(params, buffers, x)


def use_stacked(members: Sequence[nn.Module], stack: bool | None) -> bool:
    """Whether :func:`predictions` stacks: ``stack`` if given (True needs one architecture),
    else on CUDA with one architecture, never on the CPU."""
    if stack is not None:
        if stack and not same_architecture(members):
            raise ValueError("stack=True needs members of one architecture (same parameter and buffer shapes)")
        return bool(stack)
    device = next(iter(members[0].parameters())).device
    return device.type == "cuda" and len(members) > 1 and same_architecture(members)


def predictions(
    members: Sequence[nn.Module],
    data: Mapping[DataKey, tuple[torch.Tensor, torch.Tensor]],
    *,
    clean: str = "test",
    batch_size: int = DEFAULT_BATCH,
    stack: bool | None = None,
) -> dict[DataKey, SetPredictions]:
    """Logits and probabilities of every member on every data set, one pass each.

    Args:
        members: M nn.Modules mapping [b, ...] to logits [b, C], on one device.
        data: {key: (x [n, ...], y [n])} (see the module docstring); x is moved to the members'
            device batch by batch.
        clean: the key of the clean set that ``(corruption, severity)`` keys are copies of.
        batch_size: samples per forward (int >= 1).
        stack: stack the members into one vmapped forward (True / False), or None (auto).
    Returns:
        {key: SetPredictions} in data's order, tensors on the members' device.
    Raises:
        TypeError / ValueError before any forward: members or data malformed, a corrupted set
        that does not match the clean set, stack=True with different architectures; after a
        forward, a member whose output is not [b, C] with one C for all.
    """
    members = check_members(members)
    sets = check_data(data, clean)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return run_predictions(members, sets, batch_size=batch_size, stacked=use_stacked(members, stack))


def run_predictions(
    members: list[nn.Module],
    sets: Mapping[DataKey, tuple[torch.Tensor, torch.Tensor]],
    *,
    batch_size: int,
    stacked: bool,
) -> dict[DataKey, SetPredictions]:
    """The forward passes of :func:`predictions` on sets that :func:`check_data` has accepted
    (the caller checked members, data and batch_size): one pass per member and set."""
    device = next(iter(members[0].parameters())).device
    modes = [module_modes(m) for m in members]
    out: dict[DataKey, SetPredictions] = {}
    try:
        for m in members:
            m.eval()
        forward = stacked_forward(members) if stacked else None
        with torch.no_grad():
            for key, (x, y) in sets.items():
                chunks = []
                for start in range(0, x.shape[0], batch_size):
                    xb = x[start : start + batch_size].to(device, non_blocking=True)
                    outs = forward(xb) if stacked else [m(xb) for m in members]
                    shapes = {tuple(o.shape) for o in outs}
                    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] != xb.shape[0]:
                        raise ValueError(f"members must all return logits [b, C] of one C; on {key!r} got {shapes}")
                    chunks.append(outs if stacked else torch.stack(outs))
                logits = torch.cat(chunks, dim=1)
                out[key] = SetPredictions(logits, logits.softmax(-1), y.to(device=device, dtype=torch.int64))
    finally:
        for saved in modes:
            restore_modes(saved)
    return out
