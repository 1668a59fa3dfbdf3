"""The second-order forward mode (sbfast.measure.taylor) against the exact Hessian
(torch.autograd.functional.hessian, float64) and the double backward: every rule, every model
of sbfast.models that it covers, k directions at once, chunks, a parameter handed over frozen (the measures take every parameter); models it does
not cover are named (NoTaylorRule) and hessian_trace then takes the double backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sbfast.measure import hessian_trace, measuring
from sbfast.measure.hvp import HessianOperator
from sbfast.measure.taylor import NoTaylorRule, TaylorCurvature
from sbfast.models import create_model
from sbfast.reference import measures_curvature as R

F64 = torch.float64


class EveryRule(nn.Module):
    """One of each function with a rule, in the ways models call them."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.frozen = nn.Conv2d(4, 4, 1, bias=False)
        self.frozen.weight.requires_grad_(False)
        self.c1d = nn.Conv1d(4, 3, 2)
        self.bn1d = nn.BatchNorm1d(3)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.seq = nn.Linear(3, 5)
        self.fc = nn.Linear(10, 3)
        self.shift = nn.Parameter(torch.randn(3))  # added to [N, 3] logits: broadcast from the right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.c1(x)))  # [N, 4, 6, 6]
        h = F.max_pool2d(h, 2, ceil_mode=True) + F.avg_pool2d(h, 2)  # [N, 4, 3, 3]
        r = self.bn2(self.c2(h))  # [N, 4, 2, 2]
        r = F.adaptive_avg_pool2d(r, 2)
        r = r - self.frozen(r)
        r += F.relu(r)
        s = r.view(r.size(0), 4, -1)  # [N, 4, 4]
        s = self.bn1d(self.c1d(s))  # [N, 3, 3]
        s = F.max_pool1d(torch.relu(s), 2, stride=1)  # [N, 3, 2]
        t = self.seq(self.drop(s.reshape(-1, 2, 3)))  # [N, 2, 5]
        z = self.fc(torch.flatten(t.unsqueeze(1), 1).squeeze(1))
        return torch.add(z, self.fc(F.relu(torch.ones(1, 10, dtype=z.dtype) - 0)), alpha=0.5) + self.shift


def _busy_norms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=F64))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=F64) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g, dtype=F64) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g, dtype=F64))
    return model


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "every_rule":
        return _busy_norms(EveryRule().to(F64)).eval(), (2, 6, 6)
    kw = {"width": 4} if name.startswith("resnet18") else {}
    shape = {"resnet18_imagenet": (3, 32, 32), "resnet18_tiny": (3, 16, 16), "cnn": (1, 8, 8), "mlp": (64,)}
    if name == "cnn":
        kw["in_channels"] = 1
    model = create_model(name, 3, **kw).to(F64)
    return _busy_norms(model).eval(), shape.get(name, (3, 8, 8))


def _batches(shape, sizes, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, *shape, generator=g, dtype=F64), torch.randint(0, 3, (s,), generator=g)) for s in sizes]


def _quadratic_forms(model, batches, v, chunk_size=1024):  # v [k, P]
    with measuring(model):
        op = HessianOperator(model, batches, chunk_size=chunk_size)
        taylor = TaylorCurvature(model, op.params, op.chunks, op.n_samples)(v)
        backward = (v * op(v)).sum(1)
    return taylor, backward, op


@pytest.mark.parametrize("sizes,chunk", [([1], 1024), ([7], 1024), ([5, 1, 7], 1024), ([5, 1, 7], 3)])
def test_every_rule_equals_the_exact_hessian(sizes, chunk):
    model, shape = _model("every_rule")
    batches = _batches(shape, sizes)
    with measuring(model):
        h = R.exact_hessian(model, batches)  # every parameter, also one handed over frozen
    v = torch.randn(3, h.shape[0], dtype=F64, generator=torch.Generator().manual_seed(4))
    taylor, backward, op = _quadratic_forms(model, batches, v, chunk)
    assert op.size == h.shape[0]
    exact = torch.einsum("kp,pq,kq->k", v, h, v)
    torch.testing.assert_close(taylor, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(taylor, backward, rtol=1e-10, atol=1e-12)
    one = TaylorCurvature(model, op.params, op.chunks, op.n_samples)
    with measuring(model):
        assert float(one(v[1])) == pytest.approx(float(exact[1]), rel=1e-10)  # [P] -> a scalar


@pytest.mark.parametrize("name", ["resnet18", "resnet18_imagenet", "resnet18_tiny", "wrn40_2", "cnn", "mlp"])
def test_models_equal_the_double_backward(name):
    model, shape = _model(name)
    batches = _batches(shape, [3, 1])
    size = sum(p.numel() for p in model.parameters())
    v = torch.randn(2, size, dtype=F64, generator=torch.Generator().manual_seed(7))
    taylor, backward, _ = _quadratic_forms(model, batches, v)
    torch.testing.assert_close(taylor, backward, rtol=1e-10, atol=1e-10)


def test_float32_close_to_float64():
    model, shape = _model("resnet18")
    batches = _batches(shape, [4])
    size = sum(p.numel() for p in model.parameters())
    v = torch.randn(2, size, dtype=F64, generator=torch.Generator().manual_seed(8))
    want, _, _ = _quadratic_forms(model, batches, v)
    m32 = copy.deepcopy(model).float()
    b32 = [(x.float(), y) for x, y in batches]
    got, back32, _ = _quadratic_forms(m32, b32, v.float())
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    # no worse than the double backward in the same dtype, within 2x
    assert (got - want).abs().max() <= 2 * (back32.double() - want).abs().max() + 1e-4


def _tanh_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)


def test_a_function_without_a_rule_is_named():
    model = _tanh_model()
    batches = _batches((4,), [5])
    with measuring(model):
        op = HessianOperator(model, batches)
        with pytest.raises(NoTaylorRule, match="tanh"):
            TaylorCurvature(model, op.params, op.chunks, op.n_samples)(torch.ones(op.size, dtype=F64))
    with pytest.raises(ValueError, match="hvp_mode='taylor' cannot follow this model") as info:
        hessian_trace(model, batches, max_iter=3, hvp_mode="taylor")
    assert "\n" not in str(info.value)


def test_trace_auto_takes_taylor_where_it_can_and_the_same_numbers():
    model, shape = _model("cnn")
    batches = _batches(shape, [5, 7])
    kw = {"max_iter": 6, "tol": 1e-12}
    auto = hessian_trace(model, batches, generator=torch.Generator().manual_seed(3), **kw)
    back = hessian_trace(model, batches, generator=torch.Generator().manual_seed(3), hvp_mode="backward", **kw)
    assert auto.extra["products"] == "taylor" and back.extra["products"] == "backward"
    assert auto.settings["hvp_mode"] == "auto"
    torch.testing.assert_close(
        torch.tensor(auto.extra["samples"]), torch.tensor(back.extra["samples"]), rtol=1e-10, atol=1e-12
    )
    other = hessian_trace(_tanh_model(), _batches((4,), [5]), max_iter=3)
    assert other.extra["products"] == "backward"


class _InPlaceOnAView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        F.relu(h.view(-1), inplace=True)  # changes h through a view
        return self.out(h)


def test_in_place_on_a_view_is_refused_and_the_trace_still_exact():
    torch.manual_seed(0)
    model = _InPlaceOnAView().to(F64)
    batches = _batches((4,), [5])
    with measuring(model):
        op = HessianOperator(model, batches)
        with pytest.raises(NoTaylorRule, match="in-place relu on a view"):
            TaylorCurvature(model, op.params, op.chunks, op.n_samples)(torch.ones(op.size, dtype=F64))
    r = hessian_trace(model, batches, max_iter=4, tol=1e-12)
    assert r.extra["products"] == "backward"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_equals_cpu():
    model, shape = _model("resnet18")
    batches = _batches(shape, [4, 3])
    v = torch.randn(
        2, sum(p.numel() for p in model.parameters()), dtype=F64, generator=torch.Generator().manual_seed(9)
    )
    cpu, _, _ = _quadratic_forms(model, batches, v)
    dev = copy.deepcopy(model).cuda()
    gpu, back, _ = _quadratic_forms(dev, [(x.cuda(), y.cuda()) for x, y in batches], v.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gpu, back, rtol=1e-9, atol=1e-9)


class _TwoPaths(nn.Module):
    """Two functions by as many torch calls, chosen by ``other`` (a kept forward of one does
    not fit the other)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)
        self.other = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.other:
            return self.b(F.relu(h - 1.0))
        return self.b(F.relu(h)) + 0.0


@pytest.mark.parametrize("name", ["cnn", "resnet18", "resnet18_tiny"])
def test_later_calls_replay_the_kept_forward_and_equal_fresh_ones(name):
    """One chunk: the recorded forward is replayed by every later call (the in-place ReLUs of
    resnet18_tiny keep nothing, so it recomputes)."""
    model, shape = _model(name)
    batches = _batches(shape, [4, 3])
    size = sum(p.numel() for p in model.parameters())
    v = torch.randn(4, size, dtype=F64, generator=torch.Generator().manual_seed(12))
    with measuring(model):
        op = HessianOperator(model, batches)
        kept = TaylorCurvature(model, op.params, op.chunks, op.n_samples)
        op.check_start(kept.record)
        replayed = torch.stack([kept(v[j]) for j in range(4)])
        fresh = torch.stack([TaylorCurvature(model, op.params, op.chunks, op.n_samples)(v[j]) for j in range(4)])
        backward = (v * op(v)).sum(1)
    torch.testing.assert_close(replayed, fresh, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(replayed, backward, rtol=1e-10, atol=1e-10)


def test_a_forward_that_changes_is_recorded_again():
    torch.manual_seed(0)
    model = _TwoPaths().to(F64)
    batches = _batches((4,), [5])
    size = sum(p.numel() for p in model.parameters())
    v = torch.randn(size, dtype=F64, generator=torch.Generator().manual_seed(13))
    with measuring(model):
        op = HessianOperator(model, batches)
        kept = TaylorCurvature(model, op.params, op.chunks, op.n_samples)
        op.check_start(kept.record)
        for other in (True, False, True):
            model.other = other
            want = TaylorCurvature(model, op.params, op.chunks, op.n_samples)(v)
            assert float(kept(v)) == pytest.approx(float(want), rel=1e-13)
            assert float(kept(v)) == pytest.approx(float(torch.dot(v, op(v))), rel=1e-10)
            op.release()  # the backward's kept graph is of the other path
