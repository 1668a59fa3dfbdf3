"""sbfast::ellipsoid_momentum_step_: every face (C++ CPU, CUDA C++, Triton, reference) against
float64 and against the five torch ops it replaces (bit for bit on the CPU kernel)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, ODD_SIZES, TRITON_DEVICE
from helpers import assert_within_plain_error

from sbfast import ops, reference, registry

# (dtype, atol relative to the largest output): atol covers outputs plain PyTorch gets exactly.
DTYPES = [
    (torch.float32, 1e-7),
    (torch.float64, 1e-15),
    (torch.bfloat16, 1e-7),
    (torch.float16, 1e-7),
]
# (lambda, momentum): inside the set (0), small and large multipliers; APGD's 0.75, the small
# branch of lerp (< 0.5), and the ends.
STEPS = [(0.0, 0.75), (0.37, 0.75), (2.5e3, 0.75), (0.37, 0.25), (11.0, 0.0), (11.0, 1.0), (0.0, 0.5)]


def _inputs(n: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A problem like APGD's: w0, t = 2 / c^2 of c = |w0| (0 where w0 = 0), z and prev near 0."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, generator=g) * 0.1
    w0[::5] = 0
    c = w0.abs()
    t = torch.where(c > 0, 2 / c.clamp_min(1e-3) ** 2, torch.zeros_like(c))
    z = torch.randn(n, generator=g) * c
    prev = torch.randn(n, generator=g) * c
    out = {"z": z, "two_inv2": t, "prev": prev, "w0": w0}
    return {k: v.to(dtype).to(device) for k, v in out.items()}


def _plain(z, two_inv2, prev, w0, lmbd, momentum):
    """The five torch ops the measure ran before this op, in the tensors' own dtype."""
    u = z / torch.mul(two_inv2, lmbd).add_(1) if lmbd != 0 else z
    v = torch.lerp(prev, u, momentum)
    return v, torch.add(w0, v)


def _run(face, x, lmbd, momentum):
    z, point = x["z"].clone(), torch.empty_like(x["w0"])
    face(z, point, x["two_inv2"], x["prev"], x["w0"], lmbd, momentum)
    return z, point


def _check(face, dtype, atol, device):
    for n in [*ODD_SIZES, 0, 1024, 1025, 70001]:
        x = _inputs(n, dtype, device, seed=n)
        for lmbd, momentum in STEPS:
            z, point = _run(face, x, lmbd, momentum)
            assert z.dtype == dtype and point.dtype == dtype and z.device.type == device
            exact = _plain(*(x[k].double().cpu() for k in ("z", "two_inv2", "prev", "w0")), lmbd, momentum)
            plain = _plain(*(x[k] for k in ("z", "two_inv2", "prev", "w0")), lmbd, momentum)
            for fast, p, e in zip((z, point), plain, exact, strict=True):
                scale = max(1e-30, float(e.abs().max())) if n else 1.0
                assert_within_plain_error(fast.cpu().double(), p.cpu().double(), e, atol=atol * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_dispatched_op_matches_float64(device, dtype, atol):
    _check(ops.ellipsoid_momentum_step_, dtype, atol, device)


@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_reference_matches_float64(dtype, atol):
    _check(reference.ellipsoid_momentum_step_, dtype, atol, "cpu")


@pytest.mark.triton
@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_triton_matches_float64(dtype, atol):
    _check(registry.triton_op("ellipsoid_momentum_step_"), dtype, atol, TRITON_DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_op_gives_the_torch_ops_bits(dtype):
    """The dispatched CPU op (C++ kernel, or the reference without it) equals the five torch ops
    bit for bit, so the measure's values did not move when it took their place."""
    for n in (1, 7, 129, 300_001):
        x = _inputs(n, dtype, "cpu", seed=3)
        for lmbd, momentum in STEPS:
            z, point = _run(ops.ellipsoid_momentum_step_, x, lmbd, momentum)
            want_z, want_point = _plain(x["z"], x["two_inv2"], x["prev"], x["w0"], lmbd, momentum)
            assert torch.equal(z, want_z), (n, lmbd, momentum)
            assert torch.equal(point, want_point), (n, lmbd, momentum)


def test_inside_the_set_is_not_divided():
    """lmbd = 0 leaves z undivided: an infinite 2 / c^2 (a subnormal c) gives no NaN."""
    x = _inputs(7, torch.float32, "cpu")
    x["two_inv2"][0] = math.inf
    z, point = _run(ops.ellipsoid_momentum_step_, x, 0.0, 0.75)
    assert bool(z.isfinite().all()) and bool(point.isfinite().all())


@pytest.mark.parametrize("device", DEVICES)
def test_thread_count_does_not_change_the_bits(device):
    x = _inputs(300_001, torch.float32, device)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(ops.ellipsoid_momentum_step_, x, 0.37, 0.75)
        torch.set_num_threads(max(2, before))
        two = _run(ops.ellipsoid_momentum_step_, x, 0.37, 0.75)
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = _inputs(129, torch.float32, device)
    args = (x["z"], torch.empty_like(x["z"]), x["two_inv2"], x["prev"], x["w0"], 0.37, 0.75)
    torch.library.opcheck(torch.ops.sbfast.ellipsoid_momentum_step_.default, args)


def _bad(**change):
    x = _inputs(3, torch.float32, "cpu")
    args = {"z": x["z"], "point": torch.empty(3), "two_inv2": x["two_inv2"], "prev": x["prev"], "w0": x["w0"]}
    args |= {"lmbd": 0.5, "momentum": 0.75}
    args |= change
    return tuple(args.values())


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (_bad(prev=torch.ones(4)), ValueError, r"prev is torch.float32 \[4\] on cpu; expected torch.float32 \[3\]"),
        (_bad(w0=torch.ones(3, dtype=torch.float64)), ValueError, "w0 is torch.float64"),
        (_bad(z=torch.ones(3, dtype=torch.int64)), TypeError, "z has dtype torch.int64, expected a floating dtype"),
        (_bad(two_inv2=torch.ones(6)[::2]), ValueError, "two_inv2 must be contiguous"),
        (_bad(point=None), TypeError, "point is a required tensor"),
        (_bad(lmbd=-0.5), ValueError, r"lmbd = -0.5, expected a finite number >= 0"),
        (_bad(lmbd=math.nan), ValueError, "lmbd = nan"),
        (_bad(momentum=1.5), ValueError, r"momentum = 1.5, expected a finite number in \[0, 1\]"),
        (_bad(momentum=True), TypeError, "momentum = True"),
        (_bad(w0=[0.0, 0.0, 0.0]), TypeError, "w0 is a list"),
    ],
)
def test_bad_inputs_name_the_problem(args, error, match):
    with pytest.raises(error, match=match):
        ops.ellipsoid_momentum_step_(*args)


def test_point_may_not_be_z():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="point and z are the same memory"):
        ops.ellipsoid_momentum_step_(z, z, torch.ones(3), torch.ones(3), torch.ones(3), 0.5, 0.75)


def test_the_cpu_kernel_refuses_bad_input_when_called_directly():
    op = torch.ops.sbfast.ellipsoid_momentum_step_.default
    if registry.backends()["ellipsoid_momentum_step_"]["cpu"] == "c++":
        with pytest.raises(RuntimeError, match="lmbd -1, expected a finite number >= 0"):
            op(*_bad(lmbd=-1.0))
        with pytest.raises(RuntimeError, match="prev has 4 elements, z has 3"):
            op(*_bad(prev=torch.ones(4)))
    else:  # the reference serves CPU behind the same contract
        with pytest.raises(ValueError, match="expected a finite number >= 0"):
            op(*_bad(lmbd=-1.0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_kernel_gives_the_cpu_kernels_bits():
    for dtype in (torch.float32, torch.float64):
        x = _inputs(1 << 21, dtype, "cpu")
        cpu = _run(ops.ellipsoid_momentum_step_, x, 0.37, 0.75)
        gpu = _run(ops.ellipsoid_momentum_step_, {k: v.cuda() for k, v in x.items()}, 0.37, 0.75)
        assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
