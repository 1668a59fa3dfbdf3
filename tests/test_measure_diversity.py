"""Diversity measures (disagreement, DER/EIR, KL, JS, bias-variance), the prediction cache and the
report, against the plain twins of sbfast.reference.diversity."""

from __future__ import annotations

import json

import pytest
import torch

from sbfast import measure
from sbfast.measure.predictions import DEFAULT_BATCH
from sbfast.metrics import ensemble_metrics
from sbfast.models import create_model
from sbfast.reference import diversity as ref

# Divergences and the decomposition compute in float64 from the given values, so the
# tolerance is float64 round-off for either input dtype (the inputs are the same numbers).
DTYPES = [(torch.float32, 1e-12), (torch.float64, 1e-12)]
SHAPES = [(2, 1, 1), (2, 7, 3), (3, 129, 10), (5, 7, 129)]


def _probs(m, n, c, dtype, seed=0, zeros=False):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(m, n, c, generator=g, dtype=torch.float64)
    if zeros and c > 1:
        logits[:, ::2, 0] = -float("inf")  # exact zeros: 0 log 0 and the eps floor
    return logits.softmax(-1).to(dtype)


def _targets(n, c, seed=1):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_disagreement_equals_twin_exactly(shape, dtype, tol):
    p = _probs(*shape, dtype)
    d = measure.disagreement(p)
    assert torch.equal(d, ref.disagreement(p))  # same argmaxes, same expression: bit equal
    assert torch.equal(d, d.T) and bool((d.diagonal() == 0).all())


@pytest.mark.parametrize("shape", SHAPES)
def test_ratios_equal_sbfast_metrics(shape):
    p, t = _probs(*shape, torch.float32), _targets(shape[1], shape[2])
    got, want = measure.disagreement_ratios(p, t), ensemble_metrics(p, t)
    same = lambda a, b: (a != a and b != b) or a == b  # noqa: E731 - nan == nan here
    assert same(got["der"], want["der"]) and same(got["eir"], want["eir"])
    assert got["mean_disagreement"] == want["mean_disagreement"]
    assert torch.allclose(measure.disagreement(p), torch.tensor(want["disagreement"], dtype=torch.float64), atol=1e-15)
    if got["mean_member_error"] > 0:
        der, eir = ref.der_eir(p, t)
        assert abs(got["der"] - der) < 1e-12 and abs(got["eir"] - eir) < 1e-12


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("zeros", [False, True])
def test_kl_and_js_equal_twins(shape, dtype, tol, zeros):
    p = _probs(*shape, dtype, zeros=zeros)
    kl = measure.kl_divergence(p)
    torch.testing.assert_close(kl, ref.kl_divergence(p), atol=tol, rtol=0)
    torch.testing.assert_close(measure.symmetric_kl_divergence(p), (kl + kl.T) / 2, atol=0, rtol=0)
    js = measure.js_divergence(p)
    torch.testing.assert_close(js, ref.js_divergence(p), atol=tol, rtol=0)
    assert bool((js <= torch.log(torch.tensor(2.0, dtype=torch.float64)) + 1e-12).all())
    assert bool((kl >= -1e-12).all()) and bool((kl.diagonal() == 0).all())


def test_kl_is_directional():
    p = torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]]], dtype=torch.float64)
    kl = measure.kl_divergence(p)
    assert kl[0, 1].item() == pytest.approx(
        0.9 * torch.log(torch.tensor(1.8)).item() + 0.1 * torch.log(torch.tensor(0.2)).item()
    )
    assert kl[0, 1] != kl[1, 0]


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_variance_equals_twin(shape, dtype, tol):
    g = torch.Generator().manual_seed(2)
    o = (2 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)
    t = _targets(shape[1], shape[2])
    got = measure.bias_variance(o, t)
    bias2, var = ref.bias_variance(o, t)
    assert abs(float(got.bias2) - bias2) <= tol * max(1.0, bias2)
    assert abs(float(got.variance) - var) <= tol * max(1.0, var)
    onehot = torch.nn.functional.one_hot(t, shape[2]).double()
    mse = ((o.double() - onehot) ** 2).sum(-1).mean()
    assert abs(float(got.mse) - float(mse)) <= tol * max(1.0, float(mse))


def test_bias_variance_of_identical_members_is_zero():
    o = torch.randn(1, 9, 4).expand(3, 9, 4)
    assert float(measure.bias_variance(o, _targets(9, 4)).variance) == 0.0


# ---- bad input: one-line errors before any work --------------------------------------------


@pytest.mark.parametrize(
    "fn", [measure.disagreement, measure.kl_divergence, measure.js_divergence, measure.symmetric_kl_divergence]
)
def test_pairwise_measures_refuse_bad_probs(fn):
    logits = torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match="pass softmax outputs, not logits"):
        fn(logits)
    with pytest.raises(ValueError, match="at least 2 members"):
        fn(logits.softmax(-1)[:1])
    with pytest.raises(ValueError, match=r"\[M, n, C\]"):
        fn(logits.softmax(-1)[0])
    with pytest.raises(TypeError, match="floating"):
        fn(torch.ones(3, 5, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one sample"):
        fn(torch.ones(3, 0, 4))
    bad = logits.softmax(-1)
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(bad)


def test_bias_variance_and_ratios_refuse_bad_input():
    o = torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match="at least 2 members"):
        measure.bias_variance(o[:1], _targets(5, 4))
    with pytest.raises(ValueError, match="n = 5"):
        measure.bias_variance(o, _targets(6, 4))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        measure.bias_variance(o, torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(TypeError, match="integer"):
        measure.disagreement_ratios(o.softmax(-1), torch.zeros(5))


# ---- the prediction cache -------------------------------------------------------------------


def _members(m=3, name="cnn", seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"in_channels": 3, "width": 4, **kw} if name == "cnn" else kw
    return [create_model(name, 5, **kw).eval() for _ in range(m)]


def _data(n=13, seed=0, corruptions=(("noise", 1), ("noise", 2), ("blur", 1))):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)
    data = {"test": (x, y), "val": (torch.randn(7, 3, 8, 8, generator=g), torch.randint(0, 5, (7,), generator=g))}
    for k in corruptions:
        data[k] = (x + 0.3 * k[1] * torch.randn(x.shape, generator=g), y.clone())
    return data


class _Counter:
    """Forward hooks counting calls and samples per module."""

    def __init__(self, modules):
        self.calls = {id(m): 0 for m in modules}
        self.samples = {id(m): 0 for m in modules}
        self.handles = [m.register_forward_hook(self.hook) for m in modules]

    def hook(self, module, args, output):
        self.calls[id(module)] = self.calls.get(id(module), 0) + 1
        self.samples[id(module)] = self.samples.get(id(module), 0) + args[0].shape[-4]


def test_predictions_one_forward_per_member_and_set():
    members, data = _members(), _data()
    counter = _Counter(members)
    cache = measure.predictions(members, data, batch_size=DEFAULT_BATCH, stack=False)
    for m in members:
        assert counter.calls[id(m)] == len(data)  # one call each (batch >= n)
        assert counter.samples[id(m)] == sum(len(y) for _, y in data.values())
    for key, (x, y) in data.items():
        want = torch.stack([m(x) for m in members]).detach()
        torch.testing.assert_close(cache[key].logits, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cache[key].probs, want.softmax(-1))
        assert torch.equal(cache[key].targets, y)


def test_predictions_with_odd_batches_see_each_sample_once():
    members, data = _members(2), _data(n=13)
    counter = _Counter(members)
    cache = measure.predictions(members, data, batch_size=4, stack=False)
    assert all(counter.samples[id(m)] == 13 + 7 + 3 * 13 for m in members)
    full = measure.predictions(members, data, stack=False)
    for key in data:
        torch.testing.assert_close(cache[key].logits, full[key].logits, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_stacked_forward_equals_loop(name):
    kw = {"width": 2} if name == "resnet18" else {}
    members, data = _members(3, name, **kw), _data(n=9, corruptions=())
    for m in members:  # non-trivial BatchNorm statistics: eval mode must use them
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    counter = _Counter(members)
    stacked = measure.predictions(members, data, batch_size=4, stack=True)
    assert all(counter.calls[id(m)] == 0 for m in members[1:])  # one vmapped call serves all
    loop = measure.predictions(members, data, batch_size=4, stack=False)
    for key in data:
        torch.testing.assert_close(stacked[key].logits, loop[key].logits, atol=1e-5, rtol=1e-4)


def test_predictions_restore_modes_and_refuse_bad_data():
    members = _members(2)
    members[1].train()
    data = _data()
    measure.predictions(members, data)
    assert not members[0].training and members[1].training
    bad = dict(data)
    bad[("noise", 1)] = (data[("noise", 1)][0], data["test"][1].roll(1))
    with pytest.raises(ValueError, match="does not match the clean set 'test'"):
        measure.predictions(members, bad)
    bad[("noise", 1)] = (data[("noise", 1)][0][:5], data["test"][1][:5])
    with pytest.raises(ValueError, match="does not match the clean set"):
        measure.predictions(members, bad)
    with pytest.raises(ValueError, match="need their clean set 'test'"):
        measure.predictions(members, {("noise", 1): data["test"]})
    with pytest.raises(ValueError, match="severity"):
        measure.predictions(members, {"test": data["test"], ("noise", 0): data["test"]})
    with pytest.raises(ValueError, match="n = len"):
        measure.predictions(members, {"test": (data["test"][0], data["test"][1][:3])})
    with pytest.raises(TypeError, match="list of nn.Module"):
        measure.predictions(members[0], data)
    with pytest.raises(ValueError, match="one architecture"):
        measure.predictions([members[0], create_model("mlp", 5, in_channels=3)], data, stack=True)


# ---- the report ------------------------------------------------------------------------------


def test_report_one_forward_per_member_and_set_with_layers():
    members, data = _members(3, "resnet18", width=2), _data()
    counter = _Counter(members)
    rep = measure.diversity_report(members, data, layers="blocks", cka_minibatch=None)
    # the CKA set's forward (with hooks) is its prediction pass: one call per member and set
    assert all(counter.calls[id(m)] == len(data) for m in members)
    json.dumps(rep, allow_nan=False)
    assert list(rep["sets"]) == ["test", "val", "noise/1", "noise/2", "blur/1"]
    cache = measure.predictions(members, data)
    for key, name in [("test", "test"), (("noise", 2), "noise/2")]:
        s, p = rep["sets"][name], cache[key]
        assert s["disagreement"]["matrix"] == measure.disagreement(p.probs).tolist()
        torch.testing.assert_close(
            torch.tensor(s["kl"]["matrix"], dtype=torch.float64), measure.kl_divergence(p.probs), atol=1e-6, rtol=1e-5
        )
        assert s["variance"]["space"] == "probs" and s["variance"]["variance"] == s["variance"]["probs"]["variance"]
        bv = measure.bias_variance(p.logits, p.targets)
        assert s["variance"]["logits"]["variance"] == pytest.approx(float(bv.variance), rel=1e-5)
    reps = rep["cka"]["representations"]
    assert list(reps)[:3] == ["input", "logits", "softmax"] and len(reps) == 3 + 8
    assert all(v == 1.0 for row in reps["input"]["matrix"] for v in row)
    mean_c = sum(rep["sets"][k]["disagreement"]["mean"] for k in ("noise/1", "noise/2", "blur/1")) / 3
    assert rep["corrupted_mean"]["disagreement"] == pytest.approx(mean_c)


def test_report_refuses_bad_requests():
    members, data = _members(2), _data()
    with pytest.raises(ValueError, match="at least 2 members"):
        measure.diversity_report(members[:1], data)
    with pytest.raises(ValueError, match="measures must be"):
        measure.diversity_report(members, data, measures=["sharpness"])
    with pytest.raises(ValueError, match="variance_space"):
        measure.diversity_report(members, data, variance_space="logit")
    with pytest.raises(ValueError, match="valid layers: features, features.0"):
        measure.diversity_report(members, data, layers=["features.99"])
