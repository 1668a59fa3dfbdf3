"""The one registration file: every ``sbfast`` op's schema, fake, and per-device implementation.

Faces of an op:
- schema + fake: defined here, so the op exists (and traces under ``torch.compile``) even
  where ``sbfast._C`` was not built;
- CPU: the C++ kernel from ``sbfast._C`` (``TORCH_LIBRARY_IMPL(sbfast, CPU)``), else the
  plain-PyTorch reference registered here;
- CUDA: the CUDA C++ kernel from ``sbfast._C``, or the Triton kernel registered as its own
  op ``sbfast::<op>_triton`` with ``torch.library.triton_op`` (visible to ``torch.compile``).
  ``SBFAST_CUDA_BACKEND`` picks one: ``auto`` (CUDA C++ where built, else Triton), ``cuda``
  or ``triton``. Where neither exists the op raises an error naming what is missing.

Input checks: every Python face registered here (Triton, and the reference where it serves
CPU) first runs the op's contract from :mod:`sbfast.op_checks`, the same function that the
wrappers in :mod:`sbfast.ops` run before dispatch; the C++ faces check the same contract in
C++. So a face called directly refuses what the wrapper refuses.

Triton launches: :data:`TRITON_LAUNCH` says how the Triton faces start their kernels, decided
once when the kernels are imported here (see :mod:`sbfast.kernels.launch`): ``"wrap_triton"``,
or ``"direct"`` under the Triton interpreter on a torch whose ``wrap_triton`` refuses
interpreted kernels (torch 2.11). Either way it is the Triton kernel that runs, never the
reference; ``None`` where Triton is not installed.

``sbfast.ops`` calls :func:`op_for` to get the callable that serves a device; use
:func:`backends` to see the choice for every op.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.library import Library

from sbfast import op_checks, reference

# Keeps the Python registrations alive for the life of the process.
_lib = Library("sbfast", "DEF")


@dataclass(frozen=True)
class OpSpec:
    """One op: its schema, its plain-PyTorch twin and the module of its Triton kernel."""

    name: str
    schema: str
    reference: Callable  # same signature as the schema; the CPU kernel where _C has none
    triton_module: str | None  # sbfast.kernels.<module>.<name> is the Triton launcher
    mutates_args: tuple[str, ...] = ()  # names of the (a!) arguments, for triton_op


OPS: dict[str, OpSpec] = {}


def _define(spec: OpSpec) -> None:
    OPS[spec.name] = spec
    _lib.define(f"{spec.name}{spec.schema}")


# ----------------------------------------------------------------------------------------
# Schemas and fakes
# ----------------------------------------------------------------------------------------

_define(
    OpSpec(
        name="global_sq_norm",
        schema="(Tensor[] tensors) -> Tensor",
        reference=reference.global_sq_norm,
        triton_module="global_sq_norm",
    )
)


@torch.library.register_fake("sbfast::global_sq_norm")
def _global_sq_norm_fake(tensors: list[torch.Tensor]) -> torch.Tensor:
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return tensors[0].new_empty((), dtype=acc)


# Top-k subset selection. Two ops rather than one fused: the k-smallest mask is a
# primitive of its own (a stable sort's first k), the mask algebra needs only the flat sets,
# and the split costs one extra bool [M, N] write and read.
_define(
    OpSpec(
        name="ksmallest_mask",
        schema="(Tensor scores, int k) -> Tensor",
        reference=reference.ksmallest_mask,
        triton_module="select",
    )
)


@torch.library.register_fake("sbfast::ksmallest_mask")
def _ksmallest_mask_fake(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.new_empty(scores.shape, dtype=torch.bool)


_define(
    OpSpec(
        name="sharpbalance_masks",
        schema="(Tensor flat_mask, int variant) -> Tensor",
        reference=reference.sharpbalance_masks,
        triton_module="select",
    )
)


@torch.library.register_fake("sbfast::sharpbalance_masks")
def _sharpbalance_masks_fake(flat_mask: torch.Tensor, variant: int) -> torch.Tensor:
    return flat_mask.new_empty(flat_mask.shape, dtype=torch.bool)


# Per-sample squared norm of a layer's weight gradient, s_i = ||G_i^T A_i||_F^2 for
# a [B, T, d] and g [B, T, p], in its two forms (direct product, Gram/ghost norm). Same value;
# fisher_scores picks the cheaper one per layer (sbfast.sharpness.choose_form).
for _form in ("direct", "gram"):
    _define(
        OpSpec(
            name=f"per_sample_grad_sq_norm_{_form}",
            schema="(Tensor a, Tensor g) -> Tensor",
            reference=getattr(reference, f"per_sample_grad_sq_norm_{_form}"),
            triton_module="per_sample_norm",
        )
    )

    @torch.library.register_fake(f"sbfast::per_sample_grad_sq_norm_{_form}")
    def _per_sample_grad_sq_norm_fake(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        acc = torch.float64 if torch.float64 in (a.dtype, g.dtype) else torch.float32
        return a.new_empty((a.shape[0],), dtype=acc)


# The fused SAM optimizer's two passes over a flat parameter run (sbfast.optim).
# Both mutate in place and return nothing; lr, skip and inv_scale are device tensors so that
# LR schedules and device-side skips need no recompilation or re-capture.
_define(
    OpSpec(
        name="sam_perturb_",
        schema="(Tensor(a!) param, Tensor(b!) backup, Tensor grad, Tensor scale, bool adaptive) -> ()",
        reference=reference.sam_perturb_,
        triton_module="sam",
        mutates_args=("param", "backup"),
    )
)


@torch.library.register_fake("sbfast::sam_perturb_")
def _sam_perturb_fake(param, backup, grad, scale, adaptive) -> None:
    return None


_define(
    OpSpec(
        name="sam_restore_sgd_",
        schema=(
            "(Tensor(a!) param, Tensor? backup, Tensor(b!) grad, Tensor? normal_grad, "
            "Tensor(c!)? momentum_buf, Tensor(d!)? momentum_ready, Tensor lr, Tensor skip, "
            "Tensor inv_scale, float weight_decay, float momentum, float dampening, bool nesterov, "
            "bool write_grad_sum) -> ()"
        ),
        reference=reference.sam_restore_sgd_,
        triton_module="sam",
        mutates_args=("param", "grad", "momentum_buf", "momentum_ready"),
    )
)


@torch.library.register_fake("sbfast::sam_restore_sgd_")
def _sam_restore_sgd_fake(
    param,
    backup,
    grad,
    normal_grad,
    momentum_buf,
    momentum_ready,
    lr,
    skip,
    inv_scale,
    weight_decay,
    momentum,
    dampening,
    nesterov,
    write_grad_sum,
) -> None:
    return None


# The direct form for a convolution without materialising its unfold on CPU (the C++
# kernel uses the convolution library's weight-gradient kernel per sample); Triton unfolds and
# runs the direct kernel.
_define(
    OpSpec(
        name="per_sample_conv_grad_sq_norm",
        schema="(Tensor x, Tensor g, int[] weight_size, int[] stride, int[] padding, int[] dilation, "
        "int groups) -> Tensor",
        reference=reference.per_sample_conv_grad_sq_norm,
        triton_module="per_sample_norm",
    )
)


@torch.library.register_fake("sbfast::per_sample_conv_grad_sq_norm")
def _per_sample_conv_grad_sq_norm_fake(x, g, weight_size, stride, padding, dilation, groups):
    acc = torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32
    return x.new_empty((x.shape[0],), dtype=acc)


# The squared weighted norms of several candidate projections onto an ellipsoid in one pass over
# z and 1/c, so the sharpness measure's bisection on lambda decides several levels per pass.
_define(
    OpSpec(
        name="ellipsoid_sq_norms",
        schema="(Tensor z, Tensor inv_scale, float[] lambdas) -> Tensor",
        reference=reference.ellipsoid_sq_norms,
        triton_module="ellipsoid_sq_norms",
    )
)


@torch.library.register_fake("sbfast::ellipsoid_sq_norms")
def _ellipsoid_sq_norms_fake(z: torch.Tensor, inv_scale: torch.Tensor, lambdas: list[float]) -> torch.Tensor:
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    return z.new_empty((len(lambdas),), dtype=acc)


# The APGD step after an ellipsoid projection (divide by 1 + lambda 2/c^2, momentum, w0 + delta)
# in one pass in place of five: at 11M parameters each pass is a read and write of 45 MB.
_define(
    OpSpec(
        name="ellipsoid_momentum_step_",
        schema=(
            "(Tensor(a!) z, Tensor(b!) point, Tensor two_inv2, Tensor prev, Tensor w0, float lmbd, "
            "float momentum) -> ()"
        ),
        reference=reference.ellipsoid_momentum_step_,
        triton_module="ellipsoid_momentum_step",
        mutates_args=("z", "point"),
    )
)


@torch.library.register_fake("sbfast::ellipsoid_momentum_step_")
def _ellipsoid_momentum_step_fake(z, point, two_inv2, prev, w0, lmbd, momentum) -> None:
    return None


# (new ops: add their OpSpec and fake above this line, one block per op)

# ----------------------------------------------------------------------------------------
# Loading the extension and filling the gaps
# ----------------------------------------------------------------------------------------

EXTENSION_ERROR: str | None = None
try:
    from sbfast import _C  # noqa: F401  (import registers the C++/CUDA kernels)
except ImportError as exc:
    EXTENSION_ERROR = str(exc)
    _built = [
        p
        for d in importlib.import_module("sbfast").__path__
        for p in Path(d).glob("_C.*")
        if p.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    ]
    if _built and os.environ.get("SBFAST_NO_EXT", "0") != "1":
        # A built extension that does not load (another torch, a broken build) must not quietly
        # turn every CPU op into the slow reference: say so, and say how to choose that on purpose.
        raise ImportError(
            f"sbfast._C is built ({_built[0]}) but does not import: {exc}. Rebuild it against the "
            "installed torch (`pip install --no-build-isolation --no-deps -e .`), or set "
            "SBFAST_NO_EXT=1 to run the plain-PyTorch reference on CPU on purpose."
        ) from exc
    # a pure-Python install (SBFAST_NO_EXT=1 at build time, or on purpose at run time)
    warnings.warn(
        f"sbfast._C is not available ({exc}); CPU ops use the plain-PyTorch reference and CUDA "
        "ops use Triton. Rebuild with `pip install --no-build-isolation -e .` for the C++ kernels.",
        RuntimeWarning,
        stacklevel=2,
    )

try:
    import triton  # noqa: F401

    TRITON_ERROR: str | None = None
except ImportError as exc:
    TRITON_ERROR = str(exc)

TRITON_LAUNCH: str | None = None
if TRITON_ERROR is None:
    from sbfast.kernels import launch as kernel_launch

    TRITON_LAUNCH = kernel_launch.LAUNCH_MODE

_TRITON_OPS: dict[str, Callable] = {}


def _has_kernel(name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sbfast::{name}", dispatch_key)


def _missing_cuda_stub(name: str) -> Callable:
    def stub(*args, **kwargs):
        raise RuntimeError(
            f"sbfast::{name} has no CUDA implementation in this install: sbfast._C was built "
            f"without CUDA ({EXTENSION_ERROR or 'nvcc not found or SBFAST_CUDA=0 at build time'}) "
            f"and Triton is unavailable ({TRITON_ERROR}). Install triton or rebuild with nvcc."
        )

    return stub


def _checked(name: str, face: Callable) -> Callable:
    """``face`` behind op ``name``'s input contract (same signature, so ``triton_op`` infers the
    same schema from it)."""
    check = op_checks.CHECKS[name]

    @functools.wraps(face)
    def checked_face(*args, **kwargs):
        check(*args, **kwargs)
        return face(*args, **kwargs)

    return checked_face


# Where _C registered nothing for a device, this file fills the key: these sets say which.
_CPU_FROM_REFERENCE: set[str] = set()
_CUDA_FROM_PYTHON: set[str] = set()

for _spec in OPS.values():
    if not _has_kernel(_spec.name, "CPU"):
        _lib.impl(_spec.name, _checked(_spec.name, _spec.reference), "CPU")
        _CPU_FROM_REFERENCE.add(_spec.name)
    if TRITON_ERROR is None and _spec.triton_module is not None:
        _module = importlib.import_module(f"sbfast.kernels.{_spec.triton_module}")
        _TRITON_OPS[_spec.name] = torch.library.triton_op(
            f"sbfast::{_spec.name}_triton",
            _checked(_spec.name, getattr(_module, _spec.name)),
            mutates_args=_spec.mutates_args,
        )
    if not _has_kernel(_spec.name, "CUDA"):
        _lib.impl(_spec.name, _TRITON_OPS.get(_spec.name) or _missing_cuda_stub(_spec.name), "CUDA")
        _CUDA_FROM_PYTHON.add(_spec.name)


# ----------------------------------------------------------------------------------------
# Which implementation serves which device
# ----------------------------------------------------------------------------------------

_CUDA_BACKENDS = ("auto", "cuda", "triton")


def cuda_backend_setting() -> str:
    """The value of ``SBFAST_CUDA_BACKEND`` (auto, cuda or triton), validated."""
    value = os.environ.get("SBFAST_CUDA_BACKEND", "auto").strip().lower()
    if value not in _CUDA_BACKENDS:
        raise ValueError(f"SBFAST_CUDA_BACKEND={value!r}: expected one of {_CUDA_BACKENDS}")
    return value


def _cuda_choice(name: str) -> str:
    setting = cuda_backend_setting()
    has_cpp = name not in _CUDA_FROM_PYTHON
    if setting == "triton" or (setting == "auto" and not has_cpp):
        return "triton" if name in _TRITON_OPS else "missing"
    return "cuda-c++" if has_cpp else "missing"


def op_for(name: str, device: torch.device) -> Callable:
    """The callable that runs op ``name`` on ``device``: a ``torch.ops.sbfast`` overload."""
    if device.type == "cuda" and _cuda_choice(name) == "triton":
        return _TRITON_OPS[name]
    return getattr(torch.ops.sbfast, name).default


def has_triton(name: str) -> bool:
    """Whether op ``name`` has a Triton face in this install (Triton importable and the op has a
    kernel in ``kernels/``)."""
    return name in _TRITON_OPS


def triton_op(name: str) -> Callable:
    """The Triton face of op ``name`` (any device; CPU tensors need ``TRITON_INTERPRET=1``)."""
    if name not in _TRITON_OPS:
        raise RuntimeError(f"sbfast::{name} has no Triton implementation here: {TRITON_ERROR}")
    return _TRITON_OPS[name]


def backends() -> dict[str, dict[str, str]]:
    """Per op, the implementation each device uses, e.g. ``{"global_sq_norm": {"cpu": "c++",
    "cuda": "triton"}}``. CPU: ``c++`` or ``reference``; CUDA: ``cuda-c++``, ``triton`` or
    ``missing``."""
    return {
        name: {"cpu": "reference" if name in _CPU_FROM_REFERENCE else "c++", "cuda": _cuda_choice(name)} for name in OPS
    }
