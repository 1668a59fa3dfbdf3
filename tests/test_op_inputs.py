"""Every face of every op checks its inputs alike (sbfast.op_checks), and a non-contiguous input
is either handled (same result as its contiguous copy) or refused, never indexed wrongly.

Faces: the typed wrapper (sbfast.ops), the dispatched op (C++ on CPU; its checks raise
RuntimeError), and the Triton face (registry.triton_op, under the interpreter where no GPU
exists), which must refuse with the wrapper's very error.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import TRITON_DEVICE

from sbfast import op_checks, ops, registry

pytestmark = pytest.mark.usefixtures("one_thread")

TRITON = pytest.mark.triton


def _error(fn, *args, **kwargs) -> BaseException | None:
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # the test compares what each face raised
        return exc
    return None


def test_every_op_has_one_contract():
    assert set(op_checks.CHECKS) == set(registry.OPS)


# ---- bad inputs: the wrapper, the Triton face and the C++ face all refuse -------------------

f32 = torch.float32


def _sam_inputs(n: int = 7):
    w, b, g = torch.randn(n), torch.randn(n), torch.randn(n)
    return dict(
        param=w,
        backup=b,
        grad=g,
        normal_grad=torch.randn(n),
        momentum_buf=torch.randn(n),
        momentum_ready=torch.zeros(3, dtype=torch.uint8),
        lr=torch.tensor(0.1),
        skip=torch.zeros(()),
        inv_scale=torch.ones(()),
        weight_decay=0.0,
        momentum=0.9,
        dampening=0.0,
        nesterov=False,
        write_grad_sum=False,
    )


def _restore(**changes):
    return dict(_sam_inputs(), **changes)


# (op, positional args or kwargs for the op's schema, expected error type of the Python faces, match)
BAD = [
    ("global_sq_norm", lambda: ([torch.ones(3, dtype=torch.int64)],), TypeError, "floating"),
    ("per_sample_grad_sq_norm_direct", lambda: (torch.ones(3, 4), torch.ones(3, 4, 2)), ValueError, r"a \[B, T, d\]"),
    (
        "per_sample_grad_sq_norm_gram",
        lambda: (torch.ones(3, 4, 5), torch.ones(3, 5, 2)),
        ValueError,
        "differ in B or T",
    ),
    (
        "per_sample_grad_sq_norm_gram",
        lambda: (torch.ones(3, 4, 5, dtype=torch.int32), torch.ones(3, 4, 2)),
        TypeError,
        "floating",
    ),
    (
        "per_sample_conv_grad_sq_norm",
        lambda: (torch.ones(2, 4, 5, 5), torch.ones(2, 6, 3, 3), [6, 2, 3, 3], [1, 1], [0, 0], [1, 1], 3),
        ValueError,
        "do not fit one convolution",
    ),
    (
        "per_sample_conv_grad_sq_norm",
        lambda: (torch.ones(2, 4, 5, 5), torch.ones(2, 6, 3, 3), [6, 4, 3, 3], [0, 1], [0, 0], [1, 1], 1),
        ValueError,
        "not a convolution",
    ),
    ("ksmallest_mask", lambda: (torch.zeros(2, 3), 4), ValueError, r"k = 4 outside \[0, N = 3\]"),
    ("ksmallest_mask", lambda: (torch.zeros(3), 1), ValueError, "2-D"),
    ("ksmallest_mask", lambda: (torch.zeros(2, 3, dtype=torch.int64), 1), TypeError, "floating"),
    ("sharpbalance_masks", lambda: (torch.zeros(2, 3), 0), TypeError, "bool"),
    ("sharpbalance_masks", lambda: (torch.zeros(2, 3, dtype=torch.bool), 2), ValueError, "variant"),
    (
        "sam_perturb_",
        lambda: (torch.randn(7, 2).t(), torch.empty(2, 7), torch.randn(2, 7), torch.tensor(0.1), False),
        ValueError,
        "param must be contiguous",
    ),
    (
        "sam_perturb_",
        lambda: (torch.randn(7), torch.empty(6), torch.randn(7), torch.tensor(0.1), False),
        ValueError,
        "backup",
    ),
    (
        "sam_perturb_",
        lambda: (torch.randn(7), torch.empty(7), torch.randn(14)[::2], torch.tensor(0.1), False),
        ValueError,
        "grad must be contiguous",
    ),
    (
        "sam_perturb_",
        lambda: (torch.randn(7), torch.empty(7), torch.randn(7).double(), torch.tensor(0.1), False),
        ValueError,
        "grad",
    ),
    (
        "sam_restore_sgd_",
        lambda: _restore(momentum_buf=torch.randn(14)[::2]),
        ValueError,
        "momentum_buf must be contiguous",
    ),
    (
        "sam_restore_sgd_",
        lambda: _restore(momentum_ready=torch.zeros(6, dtype=torch.uint8)[::2]),
        ValueError,
        "momentum_ready must be contiguous",
    ),
    (
        "sam_restore_sgd_",
        lambda: _restore(normal_grad=torch.randn(7, 2)[:, 0]),
        ValueError,
        "normal_grad must be contiguous",
    ),
    ("sam_restore_sgd_", lambda: _restore(momentum_buf=None), ValueError, "momentum_buf"),
    ("sam_restore_sgd_", lambda: _restore(lr=torch.tensor(1, dtype=torch.int64)), TypeError, "lr"),
    ("sam_restore_sgd_", lambda: _restore(normal_grad=None, write_grad_sum=True), ValueError, "write_grad_sum"),
]


def _call(fn, args):
    return fn(**args) if isinstance(args, dict) else fn(*args)


def _tensors(args) -> list[torch.Tensor]:
    values = args.values() if isinstance(args, dict) else args
    flat = [t for v in values for t in (v if isinstance(v, list) else [v])]
    return [t for t in flat if isinstance(t, torch.Tensor) and t.layout == torch.strided]


def _ids(case):
    return f"{case[0]}-" + re.sub(r"[^a-z0-9]+", "_", case[3].replace("\\", "")).strip("_")


# Inputs that the op's schema itself refuses (the dispatcher, before any face runs): the wrapper
# names the problem; a face called directly gets the dispatcher's error.
SCHEMA_BAD = [
    ("global_sq_norm", ([torch.ones(3), "x"],), TypeError, "torch.Tensor"),
    ("global_sq_norm", ([torch.ones(3).to_sparse()],), TypeError, "dense"),
]


@pytest.mark.parametrize("case", SCHEMA_BAD, ids=[_ids(c) for c in SCHEMA_BAD])
def test_inputs_the_schema_refuses(case):
    name, args, error, match = case
    with pytest.raises(error, match=match):
        _call(getattr(ops, name), args)
    faces = [getattr(torch.ops.sbfast, name)]
    if registry.TRITON_ERROR is None:
        faces.append(registry.triton_op(name))
    for face in faces:
        with pytest.raises((TypeError, RuntimeError)):  # NotImplementedError is a RuntimeError
            _call(face, args)


@pytest.mark.parametrize("case", BAD, ids=[_ids(c) for c in BAD])
def test_wrapper_and_cpu_kernel_refuse(case):
    name, make, error, match = case
    args = make()
    before = [t.clone() for t in _tensors(args)]
    with pytest.raises(error, match=match):
        _call(op_checks.CHECKS[name], args)
    with pytest.raises(error, match=match):
        _call(getattr(ops, name), args)
    if registry.backends()[name]["cpu"] != "c++":
        pytest.fail(f"sbfast._C does not serve {name} on CPU here")
    with pytest.raises(RuntimeError):  # TORCH_CHECK in csrc/checks.h
        _call(getattr(torch.ops.sbfast, name), args)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(args), before, strict=True)), "a refusing face wrote"


@TRITON
@pytest.mark.parametrize("case", BAD, ids=[_ids(c) for c in BAD])
def test_triton_face_refuses_like_the_wrapper(case):
    name, make, error, _ = case
    args = _to(make(), TRITON_DEVICE)
    before = [t.clone() for t in _tensors(args)]
    wrapper_error = _error(_call, getattr(ops, name), args)
    face_error = _error(_call, registry.triton_op(name), args)
    assert isinstance(wrapper_error, error)
    assert type(face_error) is type(wrapper_error) and str(face_error) == str(wrapper_error)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(args), before, strict=True)), "a refusing face wrote"


def _to(args, device):
    """args on ``device``, strides kept (``Tensor.to`` would keep them too, but says nothing)."""

    def move(v):
        if not isinstance(v, torch.Tensor) or v.layout != torch.strided or v.device.type == device:
            return v
        out = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device)
        return out.copy_(v)

    if isinstance(args, dict):
        return {k: move(v) for k, v in args.items()}
    return tuple([move(x) for x in a] if isinstance(a, list) else move(a) for a in args)


# ---- non-contiguous inputs that every face handles ----------------------------------------


def _strided_cases(device: str):
    """(op, args with non-contiguous tensors): each op's result must equal the one of the same
    values made contiguous."""
    gen = torch.Generator().manual_seed(4)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    x = rnd(2, 4, 9, 7)
    return [
        ("global_sq_norm", ([rnd(33, 40).t(), rnd(300)[5::3], rnd(6, 5, 4).permute(2, 0, 1)],)),
        ("per_sample_grad_sq_norm_direct", (rnd(3, 40, 7).transpose(1, 2), rnd(3, 7, 20)[:, :, ::2])),
        ("per_sample_grad_sq_norm_gram", (rnd(3, 40, 7).transpose(1, 2), rnd(3, 7, 20)[:, :, ::2])),
        (
            "per_sample_conv_grad_sq_norm",
            (
                x.contiguous(memory_format=torch.channels_last),
                rnd(2, 3, 5, 9).transpose(2, 3),
                [3, 4, 3, 3],
                [1, 1],
                [1, 0],
                [1, 1],
                1,
            ),
        ),
        ("per_sample_conv_grad_sq_norm", (rnd(2, 9, 4)[:, ::3], rnd(2, 4, 6)[:, :, ::2], [4, 3, 2], [2], [1], [1], 1)),
        ("ksmallest_mask", (torch.randint(0, 3, (50, 3), generator=gen).float().to(device).t(), 20)),
        ("ksmallest_mask", (rnd(3, 100).double()[:, ::2], 17)),
        ("sharpbalance_masks", ((torch.rand(50, 3, generator=gen) < 0.2).to(device).t(), 0)),
        ("sharpbalance_masks", ((torch.rand(3, 100, generator=gen) < 0.2).to(device)[:, ::2], 1)),
    ]


def _contiguous(args):
    c = lambda v: v.contiguous() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tuple([c(x) for x in a] if isinstance(a, list) else c(a) for a in args)


def _assert_handled(face, name, args):
    assert any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in args if not isinstance(a, list)) or any(
        not t.is_contiguous() for a in args if isinstance(a, list) for t in a
    )
    out, expected = face(*args), face(*_contiguous(args))
    if out.is_floating_point():
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(out, expected), name


@pytest.mark.parametrize("case", range(9))
def test_wrapper_and_cpu_kernel_handle_non_contiguous(case):
    name, args = _strided_cases("cpu")[case]
    _assert_handled(getattr(ops, name), name, args)
    _assert_handled(getattr(torch.ops.sbfast, name), name, args)


@TRITON
@pytest.mark.parametrize("case", range(9))
def test_triton_face_handles_non_contiguous(case):
    name, args = _strided_cases(TRITON_DEVICE)[case]
    _assert_handled(registry.triton_op(name), name, args)
    # and agrees with the CPU kernel on the same values
    cpu_args = _to(args, "cpu")
    expected = getattr(torch.ops.sbfast, name)(*cpu_args)
    out = registry.triton_op(name)(*args).cpu()
    if out.is_floating_point():
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(out, expected)


# ---- the fused SAM passes refuse non-contiguous runs before writing anything ---------------


@pytest.mark.parametrize("face", ["wrapper", "cpu", pytest.param("triton", marks=TRITON)])
def test_sam_passes_refuse_non_contiguous_and_write_nothing(face):
    device = TRITON_DEVICE if face == "triton" else "cpu"
    perturb = {
        "wrapper": ops.sam_perturb_,
        "cpu": torch.ops.sbfast.sam_perturb_,
        "triton": registry.triton_op("sam_perturb_") if face == "triton" else None,
    }[face]
    restore = {
        "wrapper": ops.sam_restore_sgd_,
        "cpu": torch.ops.sbfast.sam_restore_sgd_,
        "triton": registry.triton_op("sam_restore_sgd_") if face == "triton" else None,
    }[face]
    error = RuntimeError if face == "cpu" else ValueError
    base = torch.randn(2, 7, device=device)
    param = base.t()  # [7, 2], strides (1, 7)
    backup = torch.zeros(7, 2, device=device)
    grad = torch.randn(7, 2, device=device)
    before = base.clone()
    with pytest.raises(error, match="contiguous"):
        perturb(param, backup, grad, torch.tensor(0.1, device=device), False)
    assert torch.equal(base, before) and not backup.any()
    inputs = _to(_sam_inputs(14), device)
    inputs["param"] = torch.randn(28, device=device)[::2]
    kept = inputs["param"].clone()
    with pytest.raises(error, match="contiguous"):
        restore(**inputs)
    assert torch.equal(inputs["param"], kept)
