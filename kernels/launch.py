"""How the launchers of this package start a Triton kernel, and the optional record of what they start.

Launch: ``launch(kernel, grid, *args, **kwargs)`` is ``wrap_triton(kernel)[grid](*args, **kwargs)``,
so that ``torch.library.triton_op`` and ``torch.compile`` see the kernel. Under the Triton
interpreter (``TRITON_INTERPRET=1``, CPU tensors) ``@triton.jit`` makes an interpreted function
instead of a ``JITFunction``: torch 2.12 and later's ``wrap_triton`` hands such a function back
unchanged, torch 2.11's refuses it ("wrap_triton only works on functions annotated with
triton.jit"). Which of the two this process has is decided once, when this module is imported,
by offering ``wrap_triton`` an interpreted probe kernel; :data:`LAUNCH_MODE` holds the answer:

- ``"wrap_triton"``: every launch goes through ``wrap_triton`` (always the case on a GPU);
- ``"direct"``: interpreter on a torch whose ``wrap_triton`` refuses interpreted kernels: the
  interpreted kernel is launched as it is. It is still the Triton kernel (the same source, the
  same grid, the same BLOCK sizes), never the plain-PyTorch reference.

``sbfast.registry.TRITON_LAUNCH`` reports the mode next to the other backend choices.

Record: with ``SBFAST_TRITON_RECORD=<file>`` every distinct specialisation a launcher starts
(the kernel, each argument's Triton type and alignment/divisibility hint as the JIT would
specialise it, the constexpr values, launch options such as ``num_warps``) is appended to
``<file>`` as one JSON line. ``scripts/triton_aot_check.py`` compiles each recorded
specialisation for the GPU (sm_80, sm_90) without one.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

RECORD_ENV = "SBFAST_TRITON_RECORD"


@triton.jit
def _probe_kernel(x_ptr):
    tl.store(x_ptr, 0)


def _interpreted(kernel: Any) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def _decide_launch_mode() -> str:
    if not _interpreted(_probe_kernel):
        return "wrap_triton"
    try:
        wrap_triton(_probe_kernel)
    except RuntimeError as exc:
        if "triton.jit" not in str(exc):
            raise
        return "direct"
    return "wrap_triton"


LAUNCH_MODE: str = _decide_launch_mode()

_recorded: set[str] = set()


def launch(kernel: Any, grid: Sequence[int], *args: Any, **kwargs: Any) -> None:
    """Start ``kernel`` over ``grid`` with ``args``/``kwargs`` (constexprs and launch options
    such as ``num_warps`` by keyword), through ``wrap_triton`` unless :data:`LAUNCH_MODE` is
    ``"direct"``; records the specialisation when ``SBFAST_TRITON_RECORD`` is set."""
    path = os.environ.get(RECORD_ENV)
    if path:
        _record(path, kernel, args, kwargs)
    if LAUNCH_MODE == "direct" and _interpreted(kernel):
        kernel[tuple(grid)](*args, **kwargs)
    else:
        wrap_triton(kernel)[tuple(grid)](*args, **kwargs)


def _is_real_tensor(x: Any) -> bool:
    # FakeTensors and other subclasses appear while torch.compile traces: nothing to record there
    return type(x) in (torch.Tensor, torch.nn.Parameter)


def _record(path: str, kernel: Any, args: tuple, kwargs: dict) -> None:
    """Append the launch's specialisation to ``path`` (one JSON line, once per process)."""
    from triton._C.libtriton import native_specialize_impl  # the JIT's own specialisation rule
    from triton.backends.compiler import BaseBackend

    fn = kernel.fn
    params = inspect.signature(fn).parameters
    options = {k: v for k, v in kwargs.items() if k not in params}
    bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[str, str] = {}
    for name, value in bound.arguments.items():
        if "constexpr" in str(params[name].annotation):
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        if isinstance(value, torch.Tensor) and not _is_real_tensor(value):
            return
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":  # the JIT turns an int 1 (and None) into a constant
            constexprs[name] = value
        elif isinstance(key, str) and key:
            attrs[name] = key
    entry = json.dumps(
        {
            "kernel": f"{fn.__module__}:{fn.__qualname__}",
            "signature": signature,
            "constexprs": constexprs,
            "attrs": attrs,
            "options": options,
        },
        sort_keys=True,
    )
    if entry in _recorded:
        return
    _recorded.add(entry)
    with open(path, "a", encoding="utf-8") as f:
        f.write(entry + "\n")


def recorded() -> frozenset[str]:
    """The specialisations this process has recorded so far (JSON strings, as in the record
    file); empty unless ``SBFAST_TRITON_RECORD`` is set."""
    return frozenset(_recorded)
