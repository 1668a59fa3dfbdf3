"""CKA: full batch (linear / RBF, biased / debiased, Gram and feature forms), all pairs at once,
the minibatch estimator and member-against-member CKA, against sbfast.reference.diversity."""

from __future__ import annotations

import pytest
import torch

from sbfast import measure
from sbfast.measure.cka import batch_bounds
from sbfast.models import create_model
from sbfast.reference import diversity as ref

# The fast path forms linear Grams / feature products in the input dtype, the rest in float64;
# the twin is float64 throughout.
DTYPES = [(torch.float32, 2e-5), (torch.float64, 1e-10)]
# (n, d_x, d_y): d < n takes the feature form, d > n the Gram form; n = 7 the smallest odd case
SIZES = [(7, 1, 3), (7, 20, 9), (129, 7, 1), (129, 300, 129), (64, 8, 200)]


def _pair(n, dx, dy, dtype, seed=0, noise=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(dx, dy, generator=g, dtype=torch.float64)) + noise * torch.randn(
        n, dy, generator=g, dtype=torch.float64
    )
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_equals_twin(size, dtype, tol, kernel, debiased):
    x, y = _pair(*size, dtype)
    got = measure.cka(x, y, kernel=kernel, debiased=debiased, threshold=0.8)
    want = ref.cka(x, y, kernel=kernel, debiased=debiased, threshold=0.8)
    assert abs(got - want) <= tol, (got, want)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("debiased", [False, True])
def test_feature_form_equals_gram_form(size, dtype, tol, debiased):
    x, y = _pair(*size, dtype, seed=3)
    feature = measure.cka_matrix([x, y], debiased=debiased, form="feature")
    gram = measure.cka_matrix([x, y], debiased=debiased, form="gram")
    torch.testing.assert_close(feature, gram, atol=tol, rtol=0)
    assert float(measure.feature_space_linear_cka(x, y, debiased)) == pytest.approx(float(feature[0, 1]), abs=tol)
    kx, ky = measure.gram_linear(x), measure.gram_linear(y)
    assert float(measure.cka_from_grams(kx, ky, debiased)) == pytest.approx(float(gram[0, 1]), abs=tol)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("form", ["auto", "gram"])
def test_cka_matrix_is_every_pair(kernel, form):
    g = torch.Generator().manual_seed(4)
    feats = [torch.randn(33, d, generator=g, dtype=torch.float64) for d in (5, 40, 1, 12)]
    feats[1][:, :5] += feats[0]  # some shared structure
    mat = measure.cka_matrix(feats, kernel=kernel, form=form)
    for i in range(4):
        for j in range(4):
            assert float(mat[i, j]) == pytest.approx(ref.cka(feats[i], feats[j], kernel), abs=1e-10)
    assert torch.equal(mat, mat.T) and bool((mat.diagonal() == 1).all())


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_identical_inputs_give_exactly_one(kernel, debiased):
    x, _ = _pair(50, 30, 1, torch.float32)
    assert measure.cka(x, x, kernel=kernel, debiased=debiased) == 1.0
    assert measure.minibatch_cka(x, x, batch_size=16, kernel=kernel) == 1.0


def test_cka_is_invariant_to_isotropic_scale_and_orthogonal_maps():
    x, y = _pair(40, 6, 9, torch.float64)
    q, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))
    assert measure.cka(x, 3.0 * y @ q) == pytest.approx(measure.cka(x, y), abs=1e-12)


# ---- the minibatch estimator ----------------------------------------------------------------


@pytest.mark.parametrize("n,batch", [(7, 4), (129, 32), (130, 64), (64, 64)])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_minibatch_equals_twin(n, batch, kernel):
    x, y = _pair(n, 12, 5, torch.float64, seed=5)
    bounds = batch_bounds(n, batch)
    got = measure.minibatch_cka(x, y, batch_size=batch, kernel=kernel)
    assert got == pytest.approx(ref.minibatch_cka(x, y, bounds, kernel), abs=1e-10)


def test_batch_bounds_merge_a_short_last_batch():
    assert batch_bounds(130, 64) == [(0, 64), (64, 130)]  # 2 left over: no unbiased HSIC alone
    assert batch_bounds(132, 64) == [(0, 64), (64, 128), (128, 132)]
    assert batch_bounds(7, 256) == [(0, 7)]
    with pytest.raises(ValueError, match="batch_size must be an int >= 4"):
        batch_bounds(10, 3)
    with pytest.raises(ValueError, match="at least 4 samples"):
        batch_bounds(3, 4)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_one_minibatch_is_the_full_batch_debiased_cka(dtype, tol):
    x, y = _pair(97, 30, 200, dtype, seed=6)
    full = measure.cka(x, y, debiased=True)
    assert measure.minibatch_cka(x, y, batch_size=97) == pytest.approx(full, abs=tol)


def test_minibatch_close_to_full_batch():
    x, y = _pair(1024, 16, 24, torch.float64, seed=7, noise=1.0)
    full = measure.cka(x, y, debiased=True)
    for batch in (64, 128, 256):
        assert measure.minibatch_cka(x, y, batch_size=batch) == pytest.approx(full, abs=0.03)


def test_minibatch_is_unbiased_on_independent_inputs():
    """Independent 8-d Gaussians in batches of 128: the per-batch biased CKA reads about 0.06
    (its bias), the accumulated unbiased HSIC about 0."""
    g = torch.Generator().manual_seed(8)
    x, y = (torch.randn(128 * 20, 8, generator=g, dtype=torch.float64) for _ in range(2))
    biased = sum(measure.cka(x[s : s + 128], y[s : s + 128]) for s in range(0, len(x), 128)) / 20
    assert 0.04 < biased < 0.08
    assert abs(measure.minibatch_cka(x, y, batch_size=128)) < 0.01


def test_minibatch_accumulator_all_pairs_in_one_matrix():
    g = torch.Generator().manual_seed(9)
    feats = [torch.randn(200, d, generator=g, dtype=torch.float64) for d in (3, 17, 60)]
    feats[2][:, :17] += feats[1]
    acc = measure.MinibatchCKA()
    for s, e in batch_bounds(200, 50):
        acc.update([f[s:e] for f in feats])
    mat = acc.compute()
    for i in range(3):
        for j in range(3):
            want = ref.minibatch_cka(feats[i], feats[j], batch_bounds(200, 50))
            assert float(mat[i, j]) == pytest.approx(want, abs=1e-10)
    with pytest.raises(ValueError, match="holds 3 representations"):
        acc.update(feats[:2])


def test_cka_refuses_bad_input():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="same samples"):
        measure.cka_matrix([x, torch.randn(11, 3)])
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        measure.cka(torch.randn(10, 3, 2), x)
    with pytest.raises(ValueError, match="kernel must be one of"):
        measure.cka(x, x, kernel="poly")
    with pytest.raises(ValueError, match="threshold"):
        measure.cka(x, x, kernel="rbf", threshold=0)
    with pytest.raises(ValueError, match="NaN"):
        measure.cka(x, torch.full((10, 3), float("nan")))
    with pytest.raises(TypeError, match="floating"):
        measure.cka(x, torch.ones(10, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="linear kernel only"):
        measure.cka_matrix([x, x], kernel="rbf", form="feature")


# ---- member against member -------------------------------------------------------------------


def _resnets(m=3, seed=0):
    torch.manual_seed(seed)
    return [create_model("resnet18", 5, width=2).eval() for _ in range(m)]


def _features(members, x, layer):
    out = []
    for m in members:
        got = {}
        h = dict(m.named_modules())[layer].register_forward_hook(lambda mod, a, o, got=got: got.update(v=o))
        with torch.no_grad():
            m(x)
        h.remove()
        out.append(got["v"].reshape(len(x), -1).double())
    return out


@pytest.mark.parametrize("minibatch", [None, 16])
def test_member_cka_matches_cka_of_the_features(minibatch):
    members = _resnets()
    x = torch.randn(37, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    res = measure.member_cka(members, x, layers=["layer2.1", "linear"], minibatch=minibatch, batch_size=10)
    assert list(res.matrices) == ["input", "logits", "softmax", "layer2.1", "linear"]
    assert bool((res.matrices["input"] == 1).all())
    with torch.no_grad():
        logits = torch.stack([m(x) for m in members])
    torch.testing.assert_close(res.logits, logits, atol=1e-5, rtol=1e-4)
    for name in ("layer2.1", "linear"):
        feats = _features(members, x, name)
        for i in range(3):
            for j in range(3):
                if minibatch is None:
                    want = ref.cka(feats[i], feats[j])
                else:
                    want = ref.minibatch_cka(feats[i], feats[j], batch_bounds(37, minibatch))
                assert float(res.matrices[name][i, j]) == pytest.approx(want, abs=2e-5)
    softmax = logits.softmax(-1).double()
    assert float(res.matrices["softmax"][0, 2]) == pytest.approx(
        ref.cka(softmax[0], softmax[2])
        if minibatch is None
        else ref.minibatch_cka(softmax[0], softmax[2], batch_bounds(37, 16)),
        abs=2e-5,
    )
    # cached logits and no hidden layer: no forward, same rows
    again = measure.member_cka(members, x, logits=logits, minibatch=minibatch, batch_size=10)
    assert again.logits is None
    torch.testing.assert_close(again.matrices["logits"], res.matrices["logits"], atol=1e-6, rtol=0)


def test_member_cka_blocks_and_errors():
    members = _resnets(2)
    assert measure.block_names(members[0]) == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    x = torch.randn(8, 3, 8, 8)
    with pytest.raises(ValueError, match=r"layer 'layer9' does not exist in members\[0\]; valid layers: conv1, bn1"):
        measure.member_cka(members, x, layers=["layer9"])
    wider = create_model("resnet18", 5, width=4).eval()
    with pytest.raises(ValueError, match=r"architectures differ at layer 'layer1.0'.*members\[1\] has BasicBlock"):
        measure.member_cka([members[0], wider], x, layers=["layer1.0"])
    mlp = create_model("mlp", 5, in_channels=3, image_size=8)
    with pytest.raises(ValueError, match=r"differ at layer 'layer1.0'.*members\[1\] has no such layer"):
        measure.member_cka([members[0], mlp], x, layers="blocks")
    with pytest.raises(ValueError, match="at least 2 members"):
        measure.member_cka(members[:1], x)
    with pytest.raises(ValueError, match="has no blocks"):
        measure.block_names(mlp)
    assert not members[0].training  # modes untouched by refused calls


@pytest.mark.parametrize("n", [1, 7, 129, 255, 256, 257, 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_linear_by_triangle_blocks_is_the_full_product(n, dtype):
    """From 2 x GRAM_BLOCK rows on, the Gram is formed by row blocks of its upper triangle: the
    same matrix as X X^T (float64 within round-off, float32 within its own)."""
    from sbfast.measure.cka import gram_linear

    torch.manual_seed(n)
    x = torch.randn(n, 37, dtype=dtype)
    got = gram_linear(x)
    want = x.double() @ x.double().T
    assert got.dtype == torch.float64 and got.shape == (n, n)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * 37)
