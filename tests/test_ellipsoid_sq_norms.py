"""sbfast::ellipsoid_sq_norms: every face (C++ CPU, CUDA C++, Triton, reference) against float64,
and the sharpness measure's lookahead bisection built on it against the sequential loop."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, ODD_SIZES, TRITON_DEVICE
from helpers import assert_within_plain_error

from sbfast import ops, reference, registry
from sbfast.measure.perturbation import Scale, ellipsoid_multiplier, project
from sbfast.reference.measures_apgd import release_bisection

# (dtype, atol relative to the largest output): atol covers outputs plain PyTorch gets exactly.
DTYPES = [
    (torch.float32, 1e-6),
    (torch.float64, 1e-13),
    (torch.bfloat16, 1e-6),
    (torch.float16, 1e-6),
]
LAMBDAS = [0.0, 0.1, 0.55, 7.5, 1e3, 2.5e6]


def _plain(z: torch.Tensor, s: torch.Tensor, lambdas: list[float]) -> torch.Tensor:
    """What a user would write in plain PyTorch, in the tensors' own dtype."""
    return torch.stack([((z * s) ** 2 / (1 + lam * (2 * s**2)) ** 2).sum() for lam in lambdas])


def _exact(z: torch.Tensor, s: torch.Tensor, lambdas: list[float]) -> torch.Tensor:
    return _plain(z.double().cpu(), s.double().cpu(), lambdas)


def _pairs(dtype: torch.dtype, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(z, 1/c) pairs: odd sizes, empty, 2-D, strided, and scales with zeros (frozen weights)."""
    g = torch.Generator().manual_seed(0)

    def pair(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randn(*shape, generator=g) * 0.1
        s = torch.where(w != 0, 1 / w.abs().clamp_min(1e-3), torch.zeros_like(w))
        z = torch.randn(*shape, generator=g) * w.abs()
        return z.to(dtype).to(device), s.to(dtype).to(device)

    out = [pair(n) for n in [*ODD_SIZES, 0, 2048, 2049, 70001]]
    out.append(pair(9, 33))
    z, s = pair(64, 33)
    out.append((z.t(), s.t()))  # non-contiguous
    z, s = pair(4101)
    s[::3] = 0  # coordinates that cannot move
    out.append((z, s))
    return out


def _check(fast: torch.Tensor, z: torch.Tensor, s: torch.Tensor, lambdas: list[float], atol: float) -> None:
    exact = _exact(z, s, lambdas)
    assert fast.shape == (len(lambdas),)
    assert fast.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    scale = max(1e-30, float(exact.abs().max()))
    plain = _plain(z, s, lambdas).cpu()
    if not bool(plain.isfinite().all()):  # float16's s^2 overflows: the careful user computes in float32
        plain = _plain(z.float(), s.float(), lambdas).cpu()
    assert_within_plain_error(fast.cpu(), plain, exact, atol=atol * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_dispatched_op_matches_float64(device, dtype, atol):
    for z, s in _pairs(dtype, device):
        out = ops.ellipsoid_sq_norms(z, s, LAMBDAS)
        assert out.device.type == device
        _check(out, z, s, LAMBDAS, atol)


@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_reference_matches_float64(dtype, atol):
    for z, s in _pairs(dtype, "cpu"):
        _check(reference.ellipsoid_sq_norms(z, s, LAMBDAS), z, s, LAMBDAS, atol)


@pytest.mark.triton
@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_triton_matches_float64(dtype, atol):
    from sbfast.kernels.ellipsoid_sq_norms import BLOCK

    triton_face = registry.triton_op("ellipsoid_sq_norms")
    crossing = [
        (torch.randn(n, dtype=dtype, device=TRITON_DEVICE), torch.rand(n, dtype=dtype, device=TRITON_DEVICE) * 10)
        for n in (BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5)
    ]
    for z, s in _pairs(dtype, TRITON_DEVICE) + crossing:
        _check(triton_face(z, s, LAMBDAS), z, s, LAMBDAS, atol)
    z, s = crossing[-1]
    for k in (1, 64):  # the fewest and the most lambdas a call takes
        lambdas = [0.25 * i for i in range(k)]
        _check(triton_face(z, s, lambdas), z, s, lambdas, atol)


@pytest.mark.parametrize("device", DEVICES)
def test_one_to_64_lambdas_and_repeatable_bits(device):
    z, s = _pairs(torch.float32, device)[-1]
    for k in (1, 2, 31, 64):
        lambdas = [0.5 * i for i in range(k)]
        out = ops.ellipsoid_sq_norms(z, s, lambdas)
        _check(out, z, s, lambdas, 1e-6)
        assert torch.equal(ops.ellipsoid_sq_norms(z, s, lambdas), out)  # a fixed summation order


@pytest.mark.parametrize("device", DEVICES)
def test_thread_count_does_not_change_the_bits(device):
    z, s = torch.randn(300_001, device=device), torch.rand(300_001, device=device)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.ellipsoid_sq_norms(z, s, LAMBDAS)
        torch.set_num_threads(max(2, before))
        assert torch.equal(ops.ellipsoid_sq_norms(z, s, LAMBDAS), one)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    z, s = torch.randn(129, device=device), torch.rand(129, device=device)
    torch.library.opcheck(torch.ops.sbfast.ellipsoid_sq_norms.default, (z, s, [0.0, 0.5, 3.0]))


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.ones(3), torch.ones(4), [0.1]), ValueError, r"inv_scale has shape \(4,\), z has \(3,\)"),
        ((torch.ones(3), torch.ones(3, dtype=torch.float64), [0.1]), TypeError, "inv_scale has dtype torch.float64"),
        ((torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64), [0.1]), TypeError, "floating dtype"),
        ((torch.ones(3), torch.ones(3), []), ValueError, "0 lambdas, expected 1 to 64"),
        ((torch.ones(3), torch.ones(3), [0.1] * 65), ValueError, "65 lambdas, expected 1 to 64"),
        ((torch.ones(3), torch.ones(3), [-0.5]), ValueError, r"lambdas\[0\] = -0.5, expected a finite number >= 0"),
        ((torch.ones(3), torch.ones(3), [0.1, math.inf]), ValueError, r"lambdas\[1\] = inf"),
        ((torch.ones(3), torch.ones(3), [True]), TypeError, r"lambdas\[0\] = True"),
        ((torch.ones(3), torch.ones(3), torch.ones(2)), TypeError, "lambdas is a Tensor"),
        ((torch.ones(3), [1.0, 1.0, 1.0], [0.1]), TypeError, "inv_scale is a list"),
    ],
)
def test_bad_inputs_name_the_problem(args, error, match):
    with pytest.raises(error, match=match):
        ops.ellipsoid_sq_norms(*args)


def test_the_cpu_kernel_refuses_bad_input_when_called_directly():
    op = torch.ops.sbfast.ellipsoid_sq_norms.default
    if registry.backends()["ellipsoid_sq_norms"]["cpu"] == "c++":
        with pytest.raises(RuntimeError, match="lambda -1, expected a finite number >= 0"):
            op(torch.ones(3), torch.ones(3), [-1.0])
        with pytest.raises(RuntimeError, match="inv_scale has shape"):
            op(torch.ones(3), torch.ones(2), [1.0])
    else:  # the reference serves CPU behind the same contract
        with pytest.raises(ValueError, match="expected a finite number >= 0"):
            op(torch.ones(3), torch.ones(3), [-1.0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_kernel_agrees_with_cpu_kernel():
    for dtype, rtol in [(torch.float32, 1e-6), (torch.float64, 1e-13)]:
        z, s = torch.randn(1 << 21, dtype=dtype), torch.rand(1 << 21, dtype=dtype) * 50
        torch.testing.assert_close(
            ops.ellipsoid_sq_norms(z.cuda(), s.cuda(), LAMBDAS).cpu(),
            ops.ellipsoid_sq_norms(z, s, LAMBDAS),
            rtol=rtol,
            atol=0,
        )


# --------------------------------------------------------------------------------------------
# The lookahead bisection: several levels per pass must try the very lambdas, and stop at the
# very lambda, of the release's one-level-at-a-time loop (its plain twin below).
# --------------------------------------------------------------------------------------------


def _sequential_multiplier(z: torch.Tensor, scale: Scale, rho: float) -> float | None:
    """The release's loop, one lambda per evaluation, on the same norms."""

    def norm_at(lam: float) -> float:
        return float(ops.ellipsoid_sq_norms(z, scale.inv, [lam])) ** 0.5

    start = norm_at(0.0)
    return None if start <= rho else release_bisection(norm_at, start, rho)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lookahead_bisection_stops_where_the_sequential_loop_does(dtype):
    g = torch.Generator().manual_seed(1)
    stops = set()
    for trial in range(40):
        n = [1, 7, 129, 5000][trial % 4]
        w = torch.randn(n, generator=g, dtype=dtype) * 0.1
        if trial % 5 == 0:
            w[::3] = 0
        scale = Scale(w.abs())
        # from just outside the set to 1000x outside: short and long bisections, limit doublings
        z = torch.randn(n, generator=g, dtype=dtype) * w.abs() * 10 ** (4 * trial / 40 - 1)
        rho = [0.05, 0.5, 2.0][trial % 3]
        want = _sequential_multiplier(z, scale, rho)
        for depth in (1, 2, 5, 24):
            assert ellipsoid_multiplier(z, scale, rho, speculation=depth) == want, (trial, depth)
            # predicted from a nearby z's norms (APGD's case): the first pass looks around the
            # predicted stop and settles the early levels by monotonicity
            for shift in (0.999, 0.97, 1.5):
                memory: dict[float, float] = {}
                ellipsoid_multiplier(z * shift, scale, rho, memory=memory)
                got = ellipsoid_multiplier(z, scale, rho, speculation=depth, memory=memory)
                assert got == want, (trial, depth, shift)
        stops.add(want is None)
    assert stops == {True, False}  # both inside and outside cases were met


def test_projection_equals_the_measures_twin_in_float64():
    from sbfast.reference.measures_apgd import _project

    g = torch.Generator().manual_seed(2)
    for n, mult in [(7, 30.0), (129, 3.0), (4097, 300.0)]:
        w = torch.randn(n, generator=g, dtype=torch.float64) * 0.1
        z = torch.randn(n, generator=g, dtype=torch.float64) * w.abs() * mult
        (want,) = _project([z], [w], 0.5, "l2", True)
        torch.testing.assert_close(project(z, w.abs(), 0.5, "l2"), want, rtol=1e-12, atol=1e-15)
