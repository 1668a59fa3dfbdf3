"""SharpBalanceSAM: SAM / ASAM with SharpBalance's normal half and SGD built in, fused.

The same step methods and the same numbers as ``sbfast.reference.SAM`` with a
``torch.optim.SGD`` base (docs/algorithm.md sections 2 and 5; float64 on CPU: bit for bit), but the
parameters and gradients live in flat contiguous buffers, one per dtype (what that does to
the model: :mod:`sbfast.optim.layout`), so that each phase is one pass over one buffer:

- ``first_step``: the global gradient norm (a two-stage reduction without ``.item()``), then one
  fused pass ``backup = w; w = w + e`` per parameter group (``sbfast::sam_perturb_``);
- ``normal_step``: keeps g_n by swapping the gradient buffer for a second one (no copy);
- ``second_step`` / ``third_step``: one fused pass restores w exactly from the backup, adds the
  kept g_n, applies weight decay, momentum and the update (``sbfast::sam_restore_sgd_``).
- ``restore``: back from w + e to w exactly, without an update (drops the SAM step; the
  release NSAM's ``back_step``).

Gradients
---------
``zero_grad()`` zeroes the flat gradient buffer in place (``set_to_none=False`` is the default
here): the ``.grad`` views survive. ``first_step`` (and so ``step(closure)``) refuses gradients
that nothing wrote since they were last zeroed (no backward: the buffer's version counters,
which any in-place write bumps, are as zeroing left them; a host-side read, no device access);
``mark_gradients_ready()`` accepts zeros on purpose. ``zero_grad(set_to_none=True)`` and ``model.zero_grad()``
are allowed: a parameter whose ``.grad`` is then None counts as having no gradient (skipped, as
in the reference), and a fresh ``.grad`` that backward creates is copied into the buffer at the
next phase. A parameter that took part in no backward while its view was attached has a zero
gradient, not None: like ``torch.optim.SGD`` after ``zero_grad(set_to_none=False)`` it still
gets weight decay and momentum.

Device scalars and graph capture
--------------------------------
Nothing in a step reads a device value on the host in ``nonfinite="skip"`` mode: lr, the SAM
scale rho / (||g|| + 1e-12), the skip flag, the GradScaler's inverse scale and the momentum
buffers' first-step flag are device tensors read by the kernels. A float ``lr`` is copied into
a device tensor when it changes (LR schedulers work; under ``torch.compile`` a changed float
recompiles, as for torch's optimizers). For CUDA graphs pass ``lr`` as a tensor on the
parameters' device: LR schedulers ``fill_`` it in place and replays see the new value without
re-capture. rho, momentum, dampening, nesterov and weight decay are baked into a capture.

Momentum's first step: torch.optim.SGD sets buf = d when a parameter's buffer does not exist
yet. A Python bool for that would be frozen into a captured graph (every replay a "first
step"), so each parameter has a uint8 flag on the device, read by the kernel and set by it after
an unskipped update. The host mirrors the flags only to split launches where parameters differ;
``state_dict()`` reads the device's flags (one host synchronisation), so a buffer that only
skipped steps have touched is not in it, as in ``torch.optim.SGD``.

Non-finite gradients (``nonfinite=``)
-------------------------------------
- ``"error"`` (default): eager ``first_step`` raises ValueError before perturbing when the norm is
  not finite; ``second_step`` / ``third_step`` check the gradients they use (one read of each
  buffer, as a sum) and raise after restoring w exactly (no update, momentum untouched). Each
  check is a host synchronisation (two per SAM step). Under ``torch.compile`` or CUDA graph
  capture the error cannot be raised, so these modes behave as ``"skip"``.
- ``"skip"``: device-side: a non-finite norm makes the perturbation zero, a non-finite gradient
  skips the update (w restored, buffers untouched), and ``skipped_steps`` (an int64 device
  tensor) counts skipped steps; ``found_nonfinite`` is the current step's flag (float32, > 0:
  the update will be skipped). No host synchronisation.

Mixed precision: see :mod:`sbfast.optim.scaler` (fp16 with a GradScaler across both passes).

BatchNorm (``bn_freeze=model``): the running statistics of the model's BatchNorm layers are
saved by ``first_step`` and put back by ``second_step`` (device copies), so the forward at
w + e does not update them. Off by default, as in the release. ``bn_guard=model`` (implied by
``bn_freeze``): a step skipped or refused for a non-finite value puts the statistics back as they
were when it began (:mod:`sbfast.optim.batchnorm`), device-side in skip mode.

Hyperparameters set in ``param_groups`` after construction are checked by the next phase that
reads them, before it changes anything; ``load_state_dict`` checks the whole state dict first.
What each refusal says: docs/optimizer.md.

torch.compile: a training step that calls the phases compiles (the phases trace without host
syncs in ``"skip"`` mode); each phase ends its graph (a graph break at its end), and
``backward()`` breaks the graph as usual. ``self.state`` (momentum buffer views) is brought up
to date outside compiled code, e.g. by ``state_dict()``.

Arithmetic: float32/float64 parameters are updated with torch's own roundings (bit-exact with
the reference on CPU); bfloat16/float16 parameters are computed in float32 and rounded once
per stored value (more exact than torch's op-by-op bfloat16), the SAM scale stays float32.

Gradient accumulation: accumulate each pass over micro-batches before its phase::

    opt.zero_grad()
    for mb in micro_batches: (loss_normal(mb) / k).backward()
    opt.normal_step(zero_grad=True)
    for mb in micro_batches: loss_sam(mb).backward()        # scale irrelevant: e is normalised
    opt.first_step(zero_grad=True)
    for mb in micro_batches: (loss_sam(mb) / k).backward()  # at w + e
    opt.second_step(zero_grad=True)

Files: :mod:`sbfast.optim.sharpbalance_sam` (the optimizer and its phases),
:mod:`sbfast.optim.layout` (flat buffers, re-pointing, launches), :mod:`sbfast.optim.update`
(the update pass's launch keys and arguments, shared by second_step and third_step),
:mod:`sbfast.optim.scaler` (the GradScaler protocol, public API only),
:mod:`sbfast.optim.batchnorm` (the BatchNorm statistics saved and put back),
:mod:`sbfast.optim.state` (host-side step state, state dict layout and checks),
:mod:`sbfast.optim.checks` (argument checks, the device-side non-finite test).
"""

from __future__ import annotations

from sbfast.optim.sharpbalance_sam import SharpBalanceSAM

__all__ = ["SharpBalanceSAM"]
