"""sbfast::sam_perturb_ and sbfast::sam_restore_sgd_: every face (C++ CPU, CUDA C++, Triton)
against the plain-PyTorch twins in sbfast.reference.

The twins are torch.optim.SGD's and reference.SAM's own ops, so in float32/float64 the C++
kernels must give the same bits (torch.equal); bfloat16/float16 (computed in float by the
kernels, op by op in the dtype by the twins) and the Triton interpreter (which emulates fma as
two roundings) are held to the 2x-plain-error rule against a float64 run instead.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, ODD_SIZES, TRITON_DEVICE
from helpers import assert_within_plain_error

from sbfast import reference, registry

# (dtype, bit-exact for the C++ faces, atol of the plain-error rule)
DTYPES = [
    (torch.float64, True, 1e-15),
    (torch.float32, True, 1e-7),
    (torch.bfloat16, False, 1e-3),
    (torch.float16, False, 1e-4),
]

# (weight_decay, momentum, dampening, nesterov, with g_n, write_grad_sum, first momentum step)
SGD_CONFIGS = [
    (5e-4, 0.9, 0.0, False, True, False, False),  # the release's defaults, mixed batch
    (5e-4, 0.9, 0.0, False, False, False, True),  # SAM-only batch, first step: buf = d
    (0.0, 0.0, 0.0, False, False, False, False),  # plain SGD, no buffer
    (1e-3, 0.8, 0.0, True, True, True, False),  # nesterov, grad sum written back
    (1e-2, 0.5, 0.3, False, True, False, True),  # dampening on the first step (ignored) ...
    (1e-2, 0.5, 0.3, False, False, False, False),  # ... and later (used)
]


def _amax(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _perturb_inputs(n: int, dtype: torch.dtype, device: str, scale: float = 0.0123):
    w = torch.randn(n, dtype=dtype, device=device)
    g = torch.randn(n, dtype=dtype, device=device)
    return w, g, torch.tensor(scale, dtype=_scale_dtype(dtype), device=device)


def _run_perturb(fn, w, g, s, adaptive):
    w = w.clone()
    backup = torch.full_like(w, float("nan"))
    fn(w, backup, g, s, adaptive)
    return w, backup


def _sgd_inputs(n, dtype, device, cfg, *, with_backup=True):
    wd, momentum, damp, nesterov, normal, write_sum, first = cfg
    mk = lambda: torch.randn(n, dtype=dtype, device=device)  # noqa: E731
    return dict(
        param=mk(),
        backup=mk() if with_backup else None,
        grad=mk(),
        normal_grad=mk() if normal else None,
        momentum_buf=mk() if momentum else None,
        momentum_ready=torch.tensor([0 if first else 1] * 3, dtype=torch.uint8, device=device) if momentum else None,
        lr=torch.tensor(0.1, dtype=torch.float64, device=device),
        skip=torch.zeros((), device=device),
        inv_scale=torch.ones((), device=device),
        weight_decay=wd,
        momentum=momentum,
        dampening=damp,
        nesterov=nesterov,
        write_grad_sum=write_sum,
    )


def _run_sgd(fn, inputs):
    """Run on fresh copies; returns (param, grad, momentum_buf, momentum_ready) after the call."""
    a = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    fn(**a)
    return a["param"], a["grad"], a["momentum_buf"], a["momentum_ready"]


def _to64(inputs):
    return {
        k: v.double()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
        else (v.clone() if isinstance(v, torch.Tensor) else v)
        for k, v in inputs.items()
    }


def _assert_same(fast, ref, exact, plain, bit_exact, atol):
    for name, f, r, e, p in zip(
        ("param", "grad", "momentum_buf", "momentum_ready"), fast, ref, exact, plain, strict=True
    ):
        if r is None:
            assert f is None
            continue
        if bit_exact or not r.is_floating_point():
            assert torch.equal(f.cpu(), r.cpu()), f"{name}: max diff {(f.double() - r.double()).abs().max()}"
        else:
            assert_within_plain_error(f, p, e, atol=atol * max(1.0, _amax(e)))


# ----------------------------------------------------------------------------------------
# sam_perturb_
# ----------------------------------------------------------------------------------------


def _check_perturb_face(fn, device, dtype, bit_exact, atol, sizes):
    for n in sizes:
        for adaptive in (False, True):
            w, g, s = _perturb_inputs(n, dtype, device)
            fast = _run_perturb(fn, w, g, s, adaptive)
            plain = _run_perturb(reference.sam_perturb_, w, g, s, adaptive)
            exact = _run_perturb(reference.sam_perturb_, w.double(), g.double(), s.double(), adaptive)
            assert torch.equal(fast[1], w), "backup must be w, bit for bit"
            if bit_exact:
                assert torch.equal(fast[0], plain[0]), f"n={n} adaptive={adaptive}"
            else:
                assert_within_plain_error(fast[0], plain[0], exact[0], atol=atol * max(1.0, _amax(exact[0])))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,bit_exact,atol", DTYPES)
def test_perturb_dispatched_matches_reference(device, dtype, bit_exact, atol):
    op = torch.ops.sbfast.sam_perturb_
    _check_perturb_face(op, device, dtype, bit_exact and device == "cpu", atol, [0, *ODD_SIZES])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,n,offset", [(torch.float32, (1 << 22) + 3, 0), (torch.float64, (1 << 21) + 5, 1)])
def test_perturb_huge_and_many_small(device, dtype, n, offset):
    # one ~4M buffer (parallel chunks; >= 16 MiB: streaming stores, here also from a start
    # that is not 32-byte aligned) and 40 small tensors launched one by one
    w, g, s = _perturb_inputs(n + offset, dtype, device)
    w, g = w[offset:], g[offset:]
    fast_w, fast_b = w.clone(), torch.full((n + offset,), float("nan"), dtype=dtype, device=device)[offset:]
    torch.ops.sbfast.sam_perturb_(fast_w, fast_b, g, s, False)
    ref = _run_perturb(reference.sam_perturb_, w, g, s, False)
    assert torch.equal(fast_w, ref[0]) and torch.equal(fast_b, w)
    for _ in range(40):
        w, g, s = _perturb_inputs(5, torch.float64, device)
        assert torch.equal(
            _run_perturb(torch.ops.sbfast.sam_perturb_, w, g, s, True)[0],
            _run_perturb(reference.sam_perturb_, w, g, s, True)[0],
        )


def _triton_sizes() -> list[int]:
    """The GPU's launch: one program per BLOCK elements, so sizes just under, at and past a
    block, and grids of several programs with a ragged last one (4097 = 4 blocks + 1)."""
    from sbfast.kernels.sam import BLOCK

    return [0, *ODD_SIZES, BLOCK - 1, BLOCK, BLOCK + 1]


@pytest.mark.triton
@pytest.mark.parametrize("dtype,bit_exact,atol", DTYPES)
def test_perturb_triton_matches_reference(dtype, bit_exact, atol):
    _check_perturb_face(registry.triton_op("sam_perturb_"), TRITON_DEVICE, dtype, False, atol, _triton_sizes())


@pytest.mark.triton
def test_triton_huge_and_many_small():
    # 65 programs in one launch (the last one ragged), and 40 small tensors launched one by one
    # (float64 rule: the interpreter's fma is two roundings, so within a few ulps of the twins
    # rather than equal)
    from sbfast.kernels.sam import BLOCK

    tp, tr = registry.triton_op("sam_perturb_"), registry.triton_op("sam_restore_sgd_")
    cases = [(64 * BLOCK + 3, torch.float32)] + [(5, torch.float64)] * 40
    for n, dtype in cases:
        w, g, s = _perturb_inputs(n, dtype, TRITON_DEVICE)
        fast, ref = _run_perturb(tp, w, g, s, True), _run_perturb(reference.sam_perturb_, w, g, s, True)
        assert torch.equal(fast[1], w)
        tol = dict(rtol=4 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps)  # a GPU may contract
        torch.testing.assert_close(fast[0], ref[0], **tol)
        inputs = _sgd_inputs(n, dtype, TRITON_DEVICE, SGD_CONFIGS[0])
        fast, ref = _run_sgd(tr, inputs), _run_sgd(reference.sam_restore_sgd_, inputs)
        torch.testing.assert_close(fast[0], ref[0], **tol)
        torch.testing.assert_close(fast[2], ref[2], **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_zero_scale_keeps_w_even_for_infinite_g(device):
    # s == 0 is how a skipped step (non-finite norm) arrives: w must stay exactly w
    w = torch.randn(129, device=device)
    g = torch.randn(129, device=device)
    g[3], g[7] = float("inf"), float("nan")
    for fn in (torch.ops.sbfast.sam_perturb_, reference.sam_perturb_):
        out, backup = _run_perturb(fn, w, g, torch.zeros((), device=device), False)
        assert torch.equal(out, w) and torch.equal(backup, w)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy inf * 0
def test_perturb_triton_zero_scale():
    w = torch.randn(129, device=TRITON_DEVICE)
    g = torch.full_like(w, float("inf"))
    out, _ = _run_perturb(registry.triton_op("sam_perturb_"), w, g, torch.zeros((), device=TRITON_DEVICE), False)
    assert torch.equal(out, w)


# ----------------------------------------------------------------------------------------
# sam_restore_sgd_
# ----------------------------------------------------------------------------------------


def _check_sgd_face(fn, device, dtype, bit_exact, atol, sizes):
    for n in sizes:
        for cfg in SGD_CONFIGS:
            for with_backup in (True, False):
                inputs = _sgd_inputs(n, dtype, device, cfg, with_backup=with_backup)
                fast = _run_sgd(fn, inputs)
                plain = _run_sgd(reference.sam_restore_sgd_, inputs)
                exact = _run_sgd(reference.sam_restore_sgd_, _to64(inputs))
                _assert_same(fast, plain, exact, plain, bit_exact, atol)
                if cfg[1]:
                    assert fast[3].tolist() == [1, 1, 1]  # the flags say "initialised" afterwards


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,bit_exact,atol", DTYPES)
def test_restore_sgd_dispatched_matches_reference(device, dtype, bit_exact, atol):
    _check_sgd_face(
        torch.ops.sbfast.sam_restore_sgd_, device, dtype, bit_exact and device == "cpu", atol, [0, *ODD_SIZES]
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,n,offset", [(torch.float32, (1 << 22) + 5, 0), (torch.float64, (1 << 21) + 7, 3)])
def test_restore_sgd_huge_and_many_small(device, dtype, n, offset):
    cfg = SGD_CONFIGS[0]
    inputs = _sgd_inputs(n + offset, dtype, device, cfg)
    ref = _run_sgd(reference.sam_restore_sgd_, inputs)
    # the param as a slice: its start is not 32-byte aligned (streaming stores start later)
    a = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    a["param"] = torch.cat([torch.zeros(offset, dtype=dtype, device=device), inputs["param"]])[offset:]
    assert (a["param"].data_ptr() % 32 != 0) == (offset != 0)
    torch.ops.sbfast.sam_restore_sgd_(**a)
    fast = (a["param"], a["grad"], a["momentum_buf"])
    assert all(torch.equal(x, y) for x, y in zip(fast, ref[:3], strict=True))
    for cfg in SGD_CONFIGS * 7:  # 42 small launches
        inputs = _sgd_inputs(5, torch.float64, device, cfg)
        fast, ref = _run_sgd(torch.ops.sbfast.sam_restore_sgd_, inputs), _run_sgd(reference.sam_restore_sgd_, inputs)
        assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(fast, ref, strict=True))


@pytest.mark.triton
@pytest.mark.parametrize("dtype,bit_exact,atol", DTYPES)
def test_restore_sgd_triton_matches_reference(dtype, bit_exact, atol):
    # the interpreter emulates fma with two roundings: held to the float64 rule, not to bits
    _check_sgd_face(
        registry.triton_op("sam_restore_sgd_"), TRITON_DEVICE, dtype, False, max(atol, 1e-7), _triton_sizes()
    )


@pytest.mark.triton
@pytest.mark.parametrize("skip", [0.0, 1.0])
def test_triton_momentum_flags_past_one_block(skip):
    # the flag update runs one program per READY_BLOCK flags: more flags than one program holds
    from sbfast.kernels.sam import READY_BLOCK

    inputs = _sgd_inputs(33, torch.float32, TRITON_DEVICE, SGD_CONFIGS[1])
    flags = 2 * READY_BLOCK + 3
    inputs["momentum_ready"] = torch.zeros(flags, dtype=torch.uint8, device=TRITON_DEVICE)
    inputs["skip"] = torch.tensor(skip, device=TRITON_DEVICE)
    fast = _run_sgd(registry.triton_op("sam_restore_sgd_"), inputs)
    ref = _run_sgd(reference.sam_restore_sgd_, inputs)
    assert fast[3].tolist() == ref[3].tolist() == [0 if skip else 1] * flags
    if skip:
        assert torch.equal(fast[0], inputs["backup"])  # skipped: w restored exactly
    else:
        torch.testing.assert_close(fast[0], ref[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("face", ["dispatched", "reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_restore_sgd_skip_restores_only(face):
    fn = {
        "dispatched": torch.ops.sbfast.sam_restore_sgd_,
        "reference": reference.sam_restore_sgd_,
        "triton": registry.triton_op("sam_restore_sgd_"),
    }[face]
    device = TRITON_DEVICE if face == "triton" else "cpu"
    inputs = _sgd_inputs(129, torch.float32, device, SGD_CONFIGS[1])
    inputs["skip"] = torch.ones((), device=device)
    inputs["grad"][0] = float("nan")
    param, grad, buf, ready = _run_sgd(fn, inputs)
    assert torch.equal(param, inputs["backup"])  # never left perturbed
    assert torch.equal(buf, inputs["momentum_buf"]) and ready.tolist() == [0, 0, 0]  # untouched
    assert torch.isnan(grad[0]) and torch.equal(grad[1:], inputs["grad"][1:])  # grad untouched


@pytest.mark.parametrize("device", DEVICES)
def test_restore_sgd_unscales_the_summed_gradient(device):
    # (g' + g_n) * inv_scale: a scaled run equals an unscaled one (power-of-two scale: exact)
    inputs = _sgd_inputs(4097, torch.float32, device, SGD_CONFIGS[0])
    scaled = dict(
        inputs,
        grad=inputs["grad"] * 1024,
        normal_grad=inputs["normal_grad"] * 1024,
        inv_scale=torch.tensor(1 / 1024, device=device),
    )
    for fn in (torch.ops.sbfast.sam_restore_sgd_, reference.sam_restore_sgd_):
        a, b = _run_sgd(fn, inputs), _run_sgd(fn, scaled)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


def test_restore_sgd_reference_equals_torch_sgd():
    # the twin is torch.optim.SGD op for op: same bits as the optimizer itself
    for cfg in SGD_CONFIGS:
        wd, momentum, damp, nesterov, normal, _, _ = cfg
        p = torch.nn.Parameter(torch.randn(129, dtype=torch.float64))
        g1, g2 = torch.randn(129, dtype=torch.float64), torch.randn(129, dtype=torch.float64)
        ours = p.detach().clone()
        buf = torch.zeros_like(ours) if momentum else None
        ready = torch.zeros(1, dtype=torch.uint8) if momentum else None
        sgd = torch.optim.SGD([p], lr=0.1, momentum=momentum, dampening=damp, weight_decay=wd, nesterov=nesterov)
        for g in (g1, g2):  # the first step (buf = d) and a later one
            p.grad = g.clone()
            sgd.step()
            torch.ops.sbfast.sam_restore_sgd_(
                ours,
                None,
                g.clone(),
                None,
                buf,
                ready,
                torch.tensor(0.1, dtype=torch.float64),
                torch.zeros(()),
                torch.ones(()),
                wd,
                momentum,
                damp,
                nesterov,
                False,
            )
            assert torch.equal(ours, p.detach())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    w, g, s = _perturb_inputs(33, torch.float32, device)
    torch.library.opcheck(torch.ops.sbfast.sam_perturb_.default, (w, torch.empty_like(w), g, s, True))
    for cfg in SGD_CONFIGS[:4]:
        inputs = _sgd_inputs(33, torch.float32, device, cfg)
        torch.library.opcheck(torch.ops.sbfast.sam_restore_sgd_.default, (), {k: v for k, v in inputs.items()})


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_input_errors(device):
    w, g, s = _perturb_inputs(7, torch.float32, device)
    with pytest.raises(RuntimeError, match="elements"):
        torch.ops.sbfast.sam_perturb_(w, torch.empty(6, device=device), g, s, False)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.sbfast.sam_perturb_(w, torch.empty_like(w), g.double(), s, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.sbfast.sam_perturb_(
            torch.randn(7, 2, device=device).t(),
            torch.empty(2, 7, device=device),
            torch.randn(2, 7, device=device),
            s,
            False,
        )
    inputs = _sgd_inputs(7, torch.float32, device, SGD_CONFIGS[0])
    with pytest.raises(RuntimeError, match="momentum_buf"):
        torch.ops.sbfast.sam_restore_sgd_(**dict(inputs, momentum_buf=None))


def test_wrappers_validate_before_any_kernel():
    from sbfast import ops

    w, g, s = _perturb_inputs(7, torch.float32, "cpu")
    b = torch.empty_like(w)
    with pytest.raises(ValueError, match="backup"):
        ops.sam_perturb_(w, torch.empty(6), g, s)
    with pytest.raises(ValueError, match="grad"):
        ops.sam_perturb_(w, b, g.double(), s)
    with pytest.raises(TypeError, match="sparse"):
        ops.sam_perturb_(w, b, g.to_sparse(), s)
    with pytest.raises(TypeError, match="scale"):
        ops.sam_perturb_(w, b, g, 0.1)
    with pytest.raises(TypeError, match="floating"):
        ops.sam_perturb_(torch.ones(7, dtype=torch.long), b, g, s)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="scale is on"):
            ops.sam_perturb_(w, b, g, s.cuda())
    before = w.clone()
    ops.sam_perturb_(w, b, g, s, adaptive=True)
    assert torch.equal(b, before)
    inputs = _sgd_inputs(7, torch.float32, "cpu", SGD_CONFIGS[0])
    with pytest.raises(ValueError, match="momentum_buf"):
        ops.sam_restore_sgd_(**dict(inputs, momentum_buf=None))
    with pytest.raises(ValueError, match="momentum_ready"):
        ops.sam_restore_sgd_(**dict(inputs, momentum_ready=torch.ones(1)))
    with pytest.raises(ValueError, match="write_grad_sum"):
        ops.sam_restore_sgd_(**dict(inputs, normal_grad=None, write_grad_sum=True))
    with pytest.raises(TypeError, match="lr"):
        ops.sam_restore_sgd_(**dict(inputs, lr=torch.tensor(1, dtype=torch.int64)))
    ref = _run_sgd(reference.sam_restore_sgd_, inputs)
    ops.sam_restore_sgd_(**inputs)
    assert torch.equal(inputs["param"], ref[0])


def test_backends_list_both_ops():
    table = registry.backends()
    assert table["sam_perturb_"]["cpu"] == "c++" and table["sam_restore_sgd_"]["cpu"] == "c++"


# ----------------------------------------------------------------------------------------
# CUDA kernels against the CPU kernels: the same per-element arithmetic (sbfast_math.h, every
# fma explicit, every other product rounded on its own), so the same bits in every dtype.
# ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [d[0] for d in DTYPES])
def test_cuda_kernels_equal_cpu_kernels_bitwise(dtype):
    for n in [0, *ODD_SIZES, (1 << 20) + 3]:
        for adaptive in (False, True):
            w, g, s = _perturb_inputs(n, dtype, "cpu")
            cpu = _run_perturb(torch.ops.sbfast.sam_perturb_, w, g, s, adaptive)
            gpu = _run_perturb(torch.ops.sbfast.sam_perturb_, w.cuda(), g.cuda(), s.cuda(), adaptive)
            assert all(torch.equal(c, x.cpu()) for c, x in zip(cpu, gpu, strict=True)), (n, adaptive)
        for cfg in SGD_CONFIGS:
            inputs = _sgd_inputs(n, dtype, "cpu", cfg)
            on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            cpu = _run_sgd(torch.ops.sbfast.sam_restore_sgd_, inputs)
            gpu = _run_sgd(torch.ops.sbfast.sam_restore_sgd_, on_gpu)
            for c, x in zip(cpu, gpu, strict=True):
                assert (c is None and x is None) or torch.equal(c, x.cpu()), (n, cfg)
