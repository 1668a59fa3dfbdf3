"""The BatchNorm running statistics that ``SharpBalanceSAM`` saves and puts back.

Two uses, both device copies without a host synchronisation:

- ``bn_freeze``: the statistics are saved by ``first_step`` and put back by ``second_step``, so
  the forward at w + e does not change them;
- the step guard (``bn_guard``, and ``bn_freeze``'s module too): the statistics are saved when a
  step begins (construction, ``load_state_dict``, every ``zero_grad()`` called between steps, the
  end of every step) and a step that is skipped or refused for a non-finite value puts them back,
  so that one bad batch leaves no NaN or inf in them. In device-side mode the put-back is a
  ``torch.where`` on the step's skip flag (one ``cat``, one ``where``, one ``_foreach_copy_`` per
  dtype); a refused step (``nonfinite="error"``) copies them back before it raises.

The forward of a training step updates the statistics before the optimizer sees a gradient, so
"when the step began" is the last of those moments before the step's first forward: call
``zero_grad()`` before the forward (as usual), or rely on the previous step's end. A change made
to the statistics between steps without a ``zero_grad()`` after it (loading a checkpoint into the
model, a broadcast) is undone by a skipped step that follows.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BatchNormStats"]


class BatchNormStats:
    """The running statistics (running_mean, running_var, num_batches_tracked) of every BatchNorm
    layer of ``module`` that tracks them, with one saved copy.

    The layers are found once, here; their tensors are looked up at each use (``Module.to``
    replaces them). The saved copy is allocated here, so that no step allocates it while being
    traced or captured.
    """

    def __init__(self, module: nn.Module) -> None:
        self.layers = [
            m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
        self.saved = [t.clone() for t in self.tensors()]

    def tensors(self) -> list[torch.Tensor]:
        """The layers' statistics now, layer by layer."""
        out = []
        for m in self.layers:
            out += [t for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]
        return out

    def __bool__(self) -> bool:
        return bool(self.saved)

    def save(self) -> None:
        """Copy the statistics into the saved copy (re-allocated if a layer's tensor changed shape,
        dtype or device, e.g. after ``Module.to``)."""
        current = self.tensors()
        if not current:
            return
        if len(current) != len(self.saved) or any(
            (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device)
            for a, b in zip(current, self.saved, strict=True)
        ):
            self.saved = [t.clone() for t in current]
            return
        torch._foreach_copy_(self.saved, current)

    def restore(self) -> None:
        """Put the saved copy back into the layers."""
        current = self.tensors()
        if current and len(current) == len(self.saved):
            torch._foreach_copy_(current, self.saved)

    def restore_where(self, flag: torch.Tensor) -> None:
        """Put the saved copy back where ``flag`` (a 0-d device tensor) is > 0, else keep the
        statistics; device-side, no host synchronisation (NaN-safe: a select, not arithmetic)."""
        current = self.tensors()
        if not current or len(current) != len(self.saved):
            return
        by_dtype: dict[torch.dtype, list[int]] = {}
        for k, t in enumerate(current):
            by_dtype.setdefault(t.dtype, []).append(k)
        skip = flag > 0
        for index in by_dtype.values():
            now = torch.cat([current[k].reshape(-1) for k in index])
            before = torch.cat([self.saved[k].reshape(-1) for k in index])
            merged = torch.where(skip.to(now.device), before, now)
            pieces = merged.split([current[k].numel() for k in index])
            torch._foreach_copy_(
                [current[k] for k in index], [p.view_as(current[k]) for p, k in zip(pieces, index, strict=True)]
            )
