"""Hessian-vector products, the Hutchinson trace and the top Hessian eigenvalues against the
exact Hessian (torch.autograd.functional.hessian, float64) and the plain twins of
sbfast.reference.measures_curvature; the model comes back as it came, bad input is refused in
one line before any work; pyhessian (the package the release meant to call) at the same probe
count agrees within the standard error."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sbfast.measure import hessian_eigenvalues, hessian_trace, measuring
from sbfast.measure.curvature import rademacher
from sbfast.measure.hvp import HessianOperator
from sbfast.measure.taylor import TaylorCurvature
from sbfast.reference import measures_curvature as R

F64 = torch.float64


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Softplus(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 3),
    ).to(F64)
    bn = m[1]
    with torch.no_grad():  # non-trivial eval-mode BatchNorm
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    m.train()  # handed over in train mode: the measures run in eval mode and switch it back
    return m


def _batches(model: nn.Module, sizes: list[int], seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (4,) if isinstance(model[0], nn.Linear) else (2, 5, 5)
    return [(torch.randn(s, *shape, generator=g, dtype=F64), torch.randint(0, 3, (s,), generator=g)) for s in sizes]


MODELS = {"mlp": _mlp, "cnn": _cnn}
SIZES = [[1], [7], [5, 1, 7]]


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": copy.deepcopy(model.state_dict()),
        "modes": [m.training for m in model.modules()],
        "flags": [p.requires_grad for p in model.parameters()],
        "ids": [id(p) for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def _assert_same(model: nn.Module, snap: dict) -> None:
    now = _snapshot(model)
    assert now["modes"] == snap["modes"] and now["flags"] == snap["flags"] and now["ids"] == snap["ids"]
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k
    for a, b in zip(now["grads"], snap["grads"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def _exact(model, batches):
    with measuring(model):
        return R.exact_hessian(model, batches)


@pytest.mark.parametrize("mode", ["backward", "jvp"])
@pytest.mark.parametrize("chunk", [1024, 3])
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_hvp_equals_exact_hessian_times_v(name, sizes, chunk, mode):
    model = MODELS[name]()
    batches = _batches(model, sizes)
    h = _exact(model, batches)
    v = torch.randn(3, h.shape[0], dtype=F64, generator=torch.Generator().manual_seed(5))
    with measuring(model):
        op = HessianOperator(model, batches, chunk_size=chunk, mode=mode)
        hv = op(v)
        hv1 = op(v[0])
    assert op.size == h.shape[0]
    torch.testing.assert_close(hv, v @ h, rtol=1e-10, atol=1e-12)  # float64
    torch.testing.assert_close(hv1, h @ v[0], rtol=1e-10, atol=1e-12)
    twin = R.hessian_vector_product(model, batches, v[1])
    torch.testing.assert_close(hv[1], twin, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_trace_within_its_standard_error_of_the_exact_trace(name, sizes):
    model = MODELS[name]()
    batches = _batches(model, sizes)
    exact = float(_exact(model, batches).trace())
    snap = _snapshot(model)
    r = hessian_trace(model, batches, max_iter=300, tol=1e-12, generator=torch.Generator().manual_seed(3))
    _assert_same(model, snap)
    assert r.extra["probes"] == 300 and not r.extra["converged"]
    assert r.std_error > 0
    assert abs(r.value - exact) <= 4 * r.std_error, (r.value, exact, r.std_error)


@pytest.mark.parametrize("tol", [1e-12, 0.1])
@pytest.mark.parametrize("name", MODELS)
def test_trace_equals_twin_on_the_same_probes(name, tol):
    model = MODELS[name]()
    batches = _batches(model, [7, 1, 5])
    r = hessian_trace(model, batches, max_iter=25, tol=tol, generator=torch.Generator().manual_seed(11))
    size = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(11)
    probes = [rademacher(size, gen, F64) for _ in range(25)]
    est, samples = R.hutchinson_trace(model, batches, probes, tol=tol)
    assert r.extra["probes"] == len(samples)
    if tol == 0.1:
        assert r.extra["converged"] and len(samples) < 25
    torch.testing.assert_close(torch.tensor(r.extra["samples"]), torch.tensor(samples), rtol=1e-12, atol=1e-13)
    assert math.isclose(r.value, est, rel_tol=1e-12, abs_tol=1e-13)
    # exact on every probe: v^T H v from the dense Hessian
    h = _exact(model, batches)
    exact = [float(v @ h @ v) for v in probes[: len(samples)]]
    torch.testing.assert_close(torch.tensor(samples), torch.tensor(exact), rtol=1e-10, atol=1e-12)


def _top_by_magnitude(h: torch.Tensor, k: int) -> list[float]:
    ev = torch.linalg.eigvalsh(h)
    return ev[ev.abs().argsort(descending=True)][:k].tolist()


@pytest.mark.parametrize("method,k,max_iter,tol", [("lanczos", 3, 200, 1e-10), ("power", 2, 4000, 1e-14)])
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_top_eigenvalues_equal_exact(name, sizes, method, k, max_iter, tol):
    model = MODELS[name]()
    batches = _batches(model, sizes)
    want = _top_by_magnitude(_exact(model, batches), k)
    gap = abs(abs(want[k - 1]) - abs(_top_by_magnitude(_exact(model, batches), k + 1)[k]))
    if method == "power" and gap < 1e-2 * abs(want[0]):
        pytest.fail(f"test data has near-equal |eigenvalues| (gap {gap}); pick another seed")
    snap = _snapshot(model)
    r = hessian_eigenvalues(
        model, batches, k=k, max_iter=max_iter, tol=tol, method=method, generator=torch.Generator().manual_seed(4)
    )
    _assert_same(model, snap)
    assert len(r.value) == k and len(r.extra["iterations"]) == k
    for got, exp in zip(r.value, want, strict=True):
        assert math.isclose(got, exp, rel_tol=1e-8, abs_tol=1e-10), (r.value, want)  # float64


def test_lanczos_exact_once_it_spans_the_space():
    model = _mlp()
    batches = _batches(model, [7])
    h = _exact(model, batches)
    size = h.shape[0]
    r = hessian_eigenvalues(model, batches, k=5, max_iter=size, tol=1e-300, method="lanczos")
    assert r.extra["iterations"][0] <= size
    torch.testing.assert_close(torch.tensor(r.value), torch.tensor(_top_by_magnitude(h, 5)), rtol=1e-9, atol=1e-11)


def test_eigenvectors_returned_are_eigenvectors():
    model = _cnn()
    batches = _batches(model, [7, 5])
    h = _exact(model, batches)
    r = hessian_eigenvalues(model, batches, k=2, max_iter=200, tol=1e-12, method="lanczos", return_vectors=True)
    vec = r.extra["vectors"]
    for lam, v in zip(r.value, vec, strict=True):
        torch.testing.assert_close(h @ v, lam * v, rtol=0, atol=1e-7 * abs(r.value[0]))


def test_defaults_follow_pyhessian_stopping_rule():
    model = _mlp()
    batches = _batches(model, [5, 5])
    r = hessian_trace(model, batches)
    assert r.settings["max_iter"] == 100 and r.settings["tol"] == 1e-3
    assert 2 <= r.extra["probes"] <= 100
    s = r.extra["samples"]
    means = [sum(s[: i + 1]) / (i + 1) for i in range(len(s))]
    stops = [i for i in range(1, len(s)) if abs(means[i] - means[i - 1]) / (abs(means[i - 1]) + 1e-6) < 1e-3]
    assert (stops and stops[0] == len(s) - 1) or (not stops and len(s) == 100)


def test_same_generator_seed_same_result():
    model = _cnn()
    batches = _batches(model, [5, 7])
    a = hessian_trace(model, batches, max_iter=10, tol=1e-12, generator=torch.Generator().manual_seed(9))
    b = hessian_trace(model, batches, max_iter=10, tol=1e-12, generator=torch.Generator().manual_seed(9))
    c = hessian_trace(model, batches, max_iter=10, tol=1e-12, generator=torch.Generator().manual_seed(10))
    assert a.value == b.value and a.extra["samples"] == b.extra["samples"]
    assert a.extra["samples"] != c.extra["samples"]


def test_float32_model_close_to_float64():
    model = _cnn()
    batches = _batches(model, [7, 5])
    h = _exact(model, batches)
    m32 = copy.deepcopy(model).float()
    b32 = [(x.float(), y) for x, y in batches]
    r = hessian_eigenvalues(m32, b32, k=1, max_iter=100, tol=1e-7, method="lanczos")
    assert math.isclose(r.value[0], _top_by_magnitude(h, 1)[0], rel_tol=1e-4)  # float32


def _bad_batches(model):
    batches = _batches(model, [5, 7, 1])
    x, y = batches[1]
    x = x.clone()
    x[3] = math.inf
    batches[1] = (x, y)
    return batches


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m, b: hessian_trace(m, []), "0 batches"),
        (lambda m, b: hessian_trace(m, b, max_iter=0), "max_iter must be an integer >= 1, got 0"),
        (lambda m, b: hessian_trace(m, b, tol=0.0), "tol must be a finite number > 0, got 0.0"),
        (lambda m, b: hessian_trace(m, b, tol=math.nan), "tol must be a finite number > 0"),
        (lambda m, b: hessian_trace(m, b, hvp_mode="fd"), "hvp_mode must be one of"),
        (lambda m, b: hessian_eigenvalues(m, b, k=0), "k must be an integer >= 1, got 0"),
        (lambda m, b: hessian_eigenvalues(m, b, k=10**6), "k=1000000 eigenvalues asked of a Hessian of size"),
        (lambda m, b: hessian_eigenvalues(m, b, max_iter=-1), "max_iter must be an integer >= 1, got -1"),
        (lambda m, b: hessian_eigenvalues(m, b, tol=-1.0), "tol must be a finite number > 0"),
        (lambda m, b: hessian_eigenvalues(m, b, method="qr"), "method must be one of"),
        (lambda m, b: hessian_trace(m, b, generator=3), "generator must be a CPU torch.Generator"),
        (lambda m, b: hessian_trace(m, _bad_batches(m)), "batch 1: the loss at the starting point is not finite"),
        (lambda m, b: hessian_eigenvalues(m, _bad_batches(m)), "batch 1: the loss at the starting point"),
        (lambda m, b: hessian_trace(nn.ReLU(), b), "has no parameters"),
    ],
)
def test_bad_input_one_line_and_model_untouched(call, message):
    model = _cnn()
    snap = _snapshot(model)
    with pytest.raises((ValueError, TypeError)) as info:
        call(model, _batches(model, [5]))
    assert message in str(info.value) and "\n" not in str(info.value)
    _assert_same(model, snap)


def _relu_cnn() -> nn.Module:
    m = _cnn()
    m[2] = nn.ReLU()  # every function with a second-order forward rule: the trace takes that way
    return m


@pytest.mark.parametrize(("make", "way"), [(_cnn, HessianOperator), (_relu_cnn, TaylorCurvature)])
def test_model_restored_after_an_error_mid_measure(monkeypatch, make, way):
    model = make()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    snap = _snapshot(model)
    calls = {"n": 0}
    real = way.__call__

    def failing(self, v):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, v)

    monkeypatch.setattr(way, "__call__", failing)
    with pytest.raises(KeyboardInterrupt):
        hessian_trace(model, _batches(model, [5, 7]), max_iter=10, tol=1e-12)
    _assert_same(model, snap)


def test_against_pyhessian_at_the_same_probe_count():
    pyhessian = pytest.importorskip("pyhessian")  # in the test extra; the release's Hessian modes call it
    model = _cnn()
    batches = _batches(model, [5, 5, 5, 5])
    n = 60
    torch.manual_seed(0)
    theirs = pyhessian.hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
    t = theirs.trace(maxIter=n, tol=1e-300)
    assert len(t) == n
    ours = hessian_trace(model, batches, max_iter=n, tol=1e-300, generator=torch.Generator().manual_seed(1))
    t_mean = sum(t) / n
    t_se = math.sqrt(sum((s - t_mean) ** 2 for s in t) / (n - 1) / n)
    assert abs(ours.value - t_mean) <= 4 * math.hypot(ours.std_error, t_se), (ours.value, t_mean)
    exact = float(_exact(model, batches).trace())
    assert abs(t_mean - exact) <= 4 * t_se and abs(ours.value - exact) <= 4 * ours.std_error
    torch.manual_seed(0)
    top, _ = theirs.eigenvalues(maxIter=500, tol=1e-10, top_n=1)
    mine = hessian_eigenvalues(model, batches, k=1, max_iter=500, tol=1e-10)
    want = _top_by_magnitude(_exact(model, batches), 1)[0]
    assert math.isclose(mine.value[0], want, rel_tol=1e-8)  # float64
    assert math.isclose(top[0], want, rel_tol=1e-5)  # pyhessian draws its vectors in float32
    assert math.isclose(mine.value[0], top[0], rel_tol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_batched_probes_path_equals_the_loop(name):
    """The CUDA default (k probes in one vmapped backward), run here on the CPU."""
    model = MODELS[name]()
    batches = _batches(model, [7, 5])
    h = _exact(model, batches)
    v = torch.randn(4, h.shape[0], dtype=F64, generator=torch.Generator().manual_seed(6))
    with measuring(model):
        op = HessianOperator(model, batches)
        op.batched_probes = True
        batched = op(v)
        op.batched_probes = False
        looped = op(v)
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(batched, v @ h, rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_equals_cpu():
    model = _cnn()
    batches = _batches(model, [7, 5])
    gen = torch.Generator().manual_seed(8)
    cpu = hessian_trace(model, batches, max_iter=5, tol=1e-12, generator=gen)
    cpu_e = hessian_eigenvalues(model, batches, k=2, max_iter=100, tol=1e-10, method="lanczos")
    dev = copy.deepcopy(model).cuda()
    gb = [(x.cuda(), y.cuda()) for x, y in batches]
    gpu = hessian_trace(dev, gb, max_iter=5, tol=1e-12, generator=torch.Generator().manual_seed(8))
    gpu_e = hessian_eigenvalues(dev, gb, k=2, max_iter=100, tol=1e-10, method="lanczos")
    torch.testing.assert_close(
        torch.tensor(gpu.extra["samples"]), torch.tensor(cpu.extra["samples"]), rtol=1e-9, atol=0
    )
    torch.testing.assert_close(torch.tensor(gpu_e.value), torch.tensor(cpu_e.value), rtol=1e-8, atol=0)  # float64
