"""What the update pass of ``SharpBalanceSAM`` (``second_step`` and ``third_step``, one path) does
to each parameter: its launch key, and the flat slices its launch reads and writes."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sbfast.optim.layout import FlatLayout, Run

__all__ = ["PERTURBED", "RestoreArgs", "UpdateKey", "restore_args", "update_keys"]

# The launch key of first_step's and restore's runs: every parameter they touch is treated alike.
PERTURBED = True


class UpdateKey(NamedTuple):
    """How the update pass treats one parameter; consecutive parameters with equal keys (and one
    group, one dtype) are one launch of ``sbfast::sam_restore_sgd_``."""

    perturbed: bool  # at w + e: restore w from the backup first
    grad: bool  # the current gradient (g, or g' at w + e) enters the update
    normal: bool  # the g_n kept by normal_step enters the update
    started: bool  # its momentum buffer was started by an earlier update (host mirror)


class RestoreArgs(NamedTuple):
    """The flat slices of one launch of ``sbfast::sam_restore_sgd_``."""

    backup: torch.Tensor | None  # w, to restore (perturbed runs)
    grad: torch.Tensor | None  # the gradient the update adds to (None: restore only)
    normal: torch.Tensor | None  # g_n, added to ``grad`` (only when both are there)
    write_sum: bool  # store grad + g_n into ``grad``: the .grad the reference leaves


def update_keys(
    perturbed: list[bool], present: list[bool], normal: list[bool], started: list[bool], third: bool
) -> list[UpdateKey | None]:
    """Each parameter's key, or None where the pass does not touch it.

    ``second_step``: restore if perturbed; the update uses g' (present) and g_n (normal) as far as
    they exist. ``third_step``: nothing is perturbed, and a kept g_n replaces the current gradient
    (the reference's ``p.grad = normal_g``). One key object per distinct key (a step has a handful),
    so a step with many parameters builds few named tuples."""
    made: dict[tuple[bool, bool, bool, bool], UpdateKey] = {}
    out: list[UpdateKey | None] = []
    for p, g, n, s in zip(perturbed, present, normal, started, strict=True):
        if third:
            p, g = False, g and not n
        if not (p or g or n):
            out.append(None)
            continue
        t = (p, g, n, s)
        key = made.get(t)
        if key is None:
            key = made[t] = UpdateKey(*t)
        out.append(key)
    return out


def restore_args(layout: FlatLayout, run: Run, cur: int, nb: int | None, zero_grad: bool) -> RestoreArgs:
    """The slices of ``run`` (keyed by :class:`UpdateKey`): gradient buffer ``cur`` holds the current
    gradients, ``nb`` the kept g_n. A run with only g_n updates on g_n alone."""
    bucket = layout.buckets[run.bucket]
    key: UpdateKey = run.key
    if key.grad:
        grad = layout.slice(run, bucket.grads[cur])
        normal = layout.slice(run, bucket.grads[nb]) if key.normal else None
    else:
        grad = layout.slice(run, bucket.grads[nb]) if key.normal else None
        normal = None
    return RestoreArgs(
        backup=layout.slice(run, bucket.backup) if key.perturbed else None,
        grad=grad,
        normal=normal,
        write_sum=normal is not None and not zero_grad,
    )
