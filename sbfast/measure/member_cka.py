"""CKA between ensemble members, member against member, per representation (M x M each).

Representations, in this order:
* ``"input"``: the flattened input, the same for every member: a sanity row whose entries are 1;
* ``"logits"``: the members' outputs, and ``"softmax"``: their softmax (what the release compares);
* every hidden layer the caller names (a module name of ``model.named_modules()``, or
  ``"blocks"`` for the model's residual / transformer blocks): the module's output, captured by a
  forward hook and flattened per sample.

Estimators: the minibatch estimator (default, batches of 256: unbiased HSIC summed over
minibatches, Nguyen et al. 2021, consistent across batch sizes and needing b^2 memory per
representation) or the full batch (``minibatch=None``: every representation of all n samples
kept, n^2 Grams; biased unless ``debiased``, the release's choice). One forward per member over x,
which also yields the members' logits for the prediction cache; without hidden layers the
logits can be passed in and no forward runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sbfast.common import module_modes, restore_modes
from sbfast.measure.cka import MinibatchCKA, batch_bounds, check_kernel, cka_matrix
from sbfast.measure.predictions import DEFAULT_BATCH, check_members

DEFAULT_REPRESENTATIONS = ("input", "logits", "softmax")
DEFAULT_MINIBATCH = 256


def block_names(model: nn.Module) -> list[str]:
    """Names of the model's blocks: modules whose class name ends in "Block" and that hold no
    such module themselves (ResNet18's 8 BasicBlocks, WRN-40-2's 18, the ViT's transformer
    blocks). Raises ValueError for a model without any (name its layers instead)."""
    blocks = [(n, m) for n, m in model.named_modules() if n and type(m).__name__.endswith("Block")]
    inner = [n for n, m in blocks if not any(o is not m and type(o).__name__.endswith("Block") for o in m.modules())]
    if not inner:
        raise ValueError(f"{type(model).__name__} has no blocks (modules named *Block); name its layers instead")
    return inner


def check_layers(members: Sequence[nn.Module], layers: str | Sequence[str]) -> list[str]:
    """Resolve ``layers`` ("blocks" or module names) and check that every member has each named
    layer with the same module type and parameter shapes. Raises one-line ValueErrors."""
    if isinstance(layers, str):
        layers = block_names(members[0]) if layers == "blocks" else [layers]
    layers = list(layers)
    if any(not isinstance(name, str) or not name for name in layers):
        raise TypeError(f"layers must be module names (non-empty str), got {layers!r}")
    if len(set(layers)) != len(layers) or set(layers) & set(DEFAULT_REPRESENTATIONS):
        raise ValueError(f"layers must be distinct and not {DEFAULT_REPRESENTATIONS}, got {layers!r}")
    modules = [dict(m.named_modules()) for m in members]
    valid = [n for n in modules[0] if n]
    for name in layers:
        if name not in modules[0]:
            raise ValueError(f"layer {name!r} does not exist in members[0]; valid layers: {', '.join(valid)}")
        ref = modules[0][name]
        ref_shapes = [tuple(p.shape) for p in ref.parameters()]
        for i, mods in enumerate(modules[1:], start=1):
            other = mods.get(name)
            if (
                other is None
                or type(other) is not type(ref)
                or [tuple(p.shape) for p in other.parameters()] != ref_shapes
            ):
                what = "has no such layer" if other is None else f"has {type(other).__name__} with other shapes"
                raise ValueError(
                    f"members' architectures differ at layer {name!r}: members[0] has {type(ref).__name__} "
                    f"{ref_shapes}, members[{i}] {what}"
                )
    return layers


@dataclass(frozen=True)
class MemberCKA:
    """matrices: {representation: [M, M] float64 CKA} on the members' device; logits: [M, n, C]
    from the forward that produced them (None when the logits were passed in); estimator: a
    one-line description (kernel, bias, batch)."""

    matrices: dict[str, torch.Tensor]
    logits: torch.Tensor | None
    estimator: str


def _first_tensor(output: object, name: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a tensor; name a module that returns one")


def _forward_features(
    member: nn.Module, xb: torch.Tensor, layers: list[str], modules: dict[str, nn.Module]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits [b, C], each layer's output flattened [b, d]) of one member on one batch."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:

        def hook(module, args, output, name=name):
            captured[name] = _first_tensor(output, name).reshape(xb.shape[0], -1)

        handles.append(modules[name].register_forward_hook(hook))
    try:
        logits = member(xb)
    finally:
        for h in handles:
            h.remove()
    return logits, [captured[name] for name in layers]


def member_cka(
    members: Sequence[nn.Module],
    x: torch.Tensor,
    *,
    layers: str | Sequence[str] = (),
    logits: torch.Tensor | None = None,
    kernel: str = "linear",
    debiased: bool = False,
    threshold: float = 1.0,
    minibatch: int | None = DEFAULT_MINIBATCH,
    batch_size: int = DEFAULT_BATCH,
) -> MemberCKA:
    """M x M CKA of the members, per representation (module docstring).

    Args:
        members: M >= 2 nn.Modules on one device (run in eval mode, modes restored).
        x: [n, ...] inputs (moved to the members' device per batch).
        layers: hidden layers: module names, or "blocks"; () for the release's three rows.
        logits: [M, n, C] cached logits of the members on x; used (no forward) when no hidden
            layer is asked for.
        kernel, threshold: "linear" or "rbf" and its bandwidth fraction.
        debiased: full batch only: unbiased HSIC (the minibatch estimator always is).
        minibatch: batch of the minibatch estimator (>= 4), or None for the full batch.
        batch_size: forward batch of the full-batch path.
    Returns:
        :class:`MemberCKA`.
    Raises:
        TypeError / ValueError before any forward: fewer than 2 members, a layer name that does
        not exist (the message lists the valid ones), members that differ at a named layer,
        logits not [M, n, C] for these members and x.
    """
    members = check_members(members)
    if len(members) < 2:
        raise ValueError(f"CKA between members needs at least 2 members, got {len(members)}")
    check_kernel(kernel, threshold)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(f"x must be a tensor [n, ...] with n >= 2, got {getattr(x, 'shape', type(x).__name__)}")
    layers = check_layers(members, layers)
    n, m_count = x.shape[0], len(members)
    if logits is not None and (
        not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != (m_count, n)
    ):
        raise ValueError(
            f"logits must be [M={m_count}, n={n}, C], got {getattr(logits, 'shape', type(logits).__name__)}"
        )
    if minibatch is not None:
        bounds = batch_bounds(n, minibatch)
    else:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        bounds = [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    names = [*DEFAULT_REPRESENTATIONS, *layers]
    device = next(iter(members[0].parameters())).device
    run_forward = bool(layers) or logits is None
    modules = [dict(m.named_modules()) for m in members]
    acc = MinibatchCKA(kernel=kernel, threshold=threshold) if minibatch is not None else None
    kept: list[list[list[torch.Tensor]]] = [[[] for _ in names] for _ in members]  # full batch only
    logit_chunks: list[list[torch.Tensor]] = [[] for _ in members]
    saved = [module_modes(m) for m in members]
    try:
        for member in members:
            member.eval()
        with torch.no_grad():
            for start, stop in bounds:
                xb = x[start:stop].to(device, non_blocking=True)
                flat_x = xb.reshape(xb.shape[0], -1)
                batch_reps = []  # member-major: [member][representation]
                for i, member in enumerate(members):
                    if run_forward:
                        out, hidden = _forward_features(member, xb, layers, modules[i])
                        logit_chunks[i].append(out)
                    else:
                        out, hidden = logits[i, start:stop].to(device), []
                    batch_reps.append([flat_x, out, out.softmax(-1), *hidden])
                if acc is not None:
                    acc.update([r for reps in batch_reps for r in reps])
                else:
                    for i, reps in enumerate(batch_reps):
                        for k, r in enumerate(reps):
                            kept[i][k].append(r)
    finally:
        for modes in saved:
            restore_modes(modes)
    matrices = {}
    if acc is not None:
        full = acc.compute()
        r_count = len(names)
        for k, name in enumerate(names):
            idx = torch.arange(m_count, device=full.device) * r_count + k
            matrices[name] = full[idx][:, idx]
        estimator = f"{kernel} kernel, minibatch unbiased HSIC (batches of {minibatch}, n = {n})"
    else:
        for k, name in enumerate(names):
            feats = [torch.cat(kept[i][k]) for i in range(m_count)]
            matrices[name] = cka_matrix(feats, kernel=kernel, debiased=debiased, threshold=threshold)
        estimator = f"{kernel} kernel, full batch {'unbiased' if debiased else 'biased'} HSIC (n = {n})"
    new_logits = torch.stack([torch.cat(c) for c in logit_chunks]) if run_forward else None
    return MemberCKA(matrices, new_logits, estimator)
