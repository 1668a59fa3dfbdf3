"""Fisher trace and the NTK log-determinant against their plain twins (one backward per sample,
sbfast.reference.measures_curvature) and the Fisher trace against the per-sample scores of
sbfast.reference.fisher_scores (vmap(grad), the release's computation); masks, odd batch sizes,
layers without a rule (vmap fallback), shared and in-place layers, singular Grams, bad input and
the model left as it came."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sbfast.measure import fisher_trace, measuring, ntk_gram, ntk_logdet
from sbfast.reference import fisher_scores as reference_scores
from sbfast.reference import measures_curvature as R

F64 = torch.float64


def _randomise_bn(m: nn.Module) -> None:
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.normal_()
                bn.bias.normal_()


class _Shared(nn.Module):
    """A Linear used twice on [b, d] and once on [b, t, d]; an in-place ReLU after a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu_(self.fc(x))
        h2 = self.fc(torch.tanh(h))
        seq = self.fc(torch.stack([x, h, h2], 1))  # [b, 3, 4]
        return self.head(seq.flatten(1))


class _Conv1dNorm(nn.Module):
    """Conv1d (covered) and LayerNorm, GroupNorm (no rule: vmap) and a raw Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=1)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(16)
        self.scale_weight = nn.Parameter(torch.randn(16))
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gn(self.conv(x)).flatten(1)
        return self.out(self.ln(h) * self.scale_weight)


def _cnn() -> nn.Module:
    m = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, stride=2, groups=2, dilation=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )
    _randomise_bn(m)
    return m


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    m = {"mlp": lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), "cnn": _cnn}.get(name)
    m = m() if m else {"shared": _Shared, "conv1d": _Conv1dNorm}[name]()
    m = m.to(F64)
    m.train()
    return m


SHAPES = {"mlp": (4,), "cnn": (2, 6, 6), "shared": (4,), "conv1d": (2, 8)}


def _batches(name: str, sizes: list[int], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(s, *SHAPES[name], generator=g, dtype=F64), torch.randint(0, 3, (s,), generator=g)) for s in sizes
    ]


def _snapshot(model):
    return (
        copy.deepcopy(model.state_dict()),
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def _assert_same(model, snap):
    state, modes, flags = snap
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _masks(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(p.shape, generator=g) > 0.4).to(p.dtype) for n, p in model.named_parameters() if p.dim() > 1}


NAMES = ["mlp", "cnn", "shared", "conv1d"]
SIZES = [[1], [7], [5, 1, 7]]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_fisher_trace_equals_twin(name, sizes, masked):
    model = _model(name)
    batches = _batches(name, sizes)
    masks = _masks(model) if masked else None
    snap = _snapshot(model)
    r = fisher_trace(model, batches, masks=masks)
    _assert_same(model, snap)
    want, per_batch = R.fisher_trace(model, batches, masks)
    assert math.isclose(r.value, want, rel_tol=1e-10)  # float64
    torch.testing.assert_close(torch.tensor(r.per_batch), torch.tensor(per_batch), rtol=1e-10, atol=0)
    assert r.extra["samples"] == sum(sizes) and len(r.per_batch) == len(sizes)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_fisher_trace_is_the_mean_of_the_vmap_scores(name):
    model = _model(name)
    batches = _batches(name, [5, 5, 5])
    r = fisher_trace(model, batches, chunk_size=5)
    loader = [(torch.arange(5 * k, 5 * k + 5), x, y) for k, (x, y) in enumerate(batches)]
    scores = reference_scores(copy.deepcopy(model), loader)
    torch.testing.assert_close(
        torch.tensor(r.extra["scores"], dtype=F64), scores.double(), rtol=1e-6, atol=0
    )  # float32 scores
    assert math.isclose(r.value, float(scores.double().mean()), rel_tol=1e-6)


def test_fisher_chunks_do_not_change_the_result():
    model = _model("cnn")
    batches = _batches("cnn", [5, 1, 7, 3])
    a = fisher_trace(model, batches)
    b = fisher_trace(model, batches, chunk_size=2)
    assert math.isclose(a.value, b.value, rel_tol=1e-12)


def test_fisher_masks_of_ones_are_no_mask():
    model = _model("cnn")
    batches = _batches("cnn", [7])
    ones = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    assert math.isclose(
        fisher_trace(model, batches, masks=ones).value, fisher_trace(model, batches).value, rel_tol=1e-10
    )


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("b", [1, 2, 7])
@pytest.mark.parametrize("name", NAMES)
def test_ntk_gram_equals_twin(name, b, masked):
    model = _model(name)
    x = _batches(name, [b])[0][0]
    masks = _masks(model) if masked else None
    with measuring(model):
        got = ntk_gram(model, x, masks=masks)
    want = R.ntk_gram(model, x, masks)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))  # float64


@pytest.mark.parametrize("name", NAMES)
def test_ntk_logdet_equals_twin(name):
    model = _model(name)
    batches = _batches(name, [2, 1, 3])
    snap = _snapshot(model)
    r = ntk_logdet(model, batches)
    _assert_same(model, snap)
    want = [R.ntk_logdet(R.ntk_gram(model, x)) for x, _ in batches]
    for got, exp in zip(r.per_batch, want, strict=True):
        assert (math.isnan(got) and math.isnan(exp)) or math.isclose(got, exp, rel_tol=1e-9, abs_tol=1e-9)
    if not any(math.isnan(v) for v in want):
        assert math.isclose(r.value, sum(want) / len(want), rel_tol=1e-9, abs_tol=1e-9)


def test_ntk_singular_gram_is_nan_and_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 1)).to(F64)  # g_i = x_i: rank <= 2
    batches = [(torch.randn(7, 2, dtype=F64), torch.zeros(7, dtype=torch.long)), (torch.randn(2, 2, dtype=F64), None)]
    batches[1] = (batches[1][0], torch.zeros(2, dtype=torch.long))
    r = ntk_logdet(model, batches)
    assert math.isnan(r.per_batch[0]) and not math.isnan(r.per_batch[1])
    assert math.isnan(r.value) and r.extra["singular_batches"] == [0]
    assert math.isclose(r.extra["finite_mean"], r.per_batch[1])
    assert r.to_dict()["value"] is None and r.to_dict()["per_batch"][0] is None
    x = batches[1][0]
    assert math.isclose(r.per_batch[1], math.log(float(torch.det(x @ x.T))), rel_tol=1e-10)


def test_ntk_only_weights_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).to(F64)
    x = torch.randn(4, 3, dtype=F64)
    with measuring(model):
        k = ntk_gram(model, x)
    torch.testing.assert_close(k, 2 * (x @ x.T))  # d(sum of 2 logits)/dW = [x; x]; the bias is left out


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m, b: fisher_trace(m, []), "0 batches"),
        (lambda m, b: ntk_logdet(m, []), "0 batches"),
        (lambda m, b: fisher_trace(m, b, masks={"0.weight": torch.ones(2, 2)}), "masks['0.weight'] has shape (2, 2)"),
        (lambda m, b: ntk_logdet(m, b, masks={"0.weight": torch.ones(3)}), "masks['0.weight'] has shape (3,)"),
        (lambda m, b: fisher_trace(m, b, masks={"nope": torch.ones(1)}), "masks: 'nope' is not a parameter"),
        (lambda m, b: fisher_trace(m, b, masks=[1]), "masks must be a dict"),
        (lambda m, b: fisher_trace(m, b, chunk_size=0), "chunk_size must be an integer >= 1, got 0"),
        (lambda m, b: fisher_trace(nn.Tanh(), b), "has no parameters"),
        (lambda m, b: ntk_logdet(nn.Tanh(), b), "has no parameters"),
        (lambda m, b: fisher_trace(m, [(b[0][0], b[0][1]), (b[0][0] * math.inf, b[0][1])]), "batch 1: a sample's"),
    ],
)
def test_bad_input_one_line(call, message):
    model = _model("mlp")
    snap = _snapshot(model)
    with pytest.raises((ValueError, TypeError)) as info:
        call(model, _batches("mlp", [5]))
    assert message in str(info.value) and "\n" not in str(info.value)
    _assert_same(model, snap)


def test_ntk_model_without_weights_refused():
    class Bias(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return x + self.bias

    with pytest.raises(ValueError, match="no parameter whose name contains 'weight'"):
        ntk_logdet(Bias(), [(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_equals_cpu(name):
    model = _model(name)
    batches = _batches(name, [5, 1, 7])
    gpu_model = copy.deepcopy(model).cuda()
    gb = [(x.cuda(), y.cuda()) for x, y in batches]
    assert math.isclose(fisher_trace(gpu_model, gb).value, fisher_trace(model, batches).value, rel_tol=1e-9)
    a, b = ntk_logdet(gpu_model, gb).per_batch, ntk_logdet(model, batches).per_batch
    for u, v in zip(a, b, strict=True):
        assert (math.isnan(u) and math.isnan(v)) or math.isclose(u, v, rel_tol=1e-8, abs_tol=1e-8)  # float64
