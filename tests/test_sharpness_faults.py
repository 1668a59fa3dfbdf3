"""The scores leave the model exactly as it entered (a module used twice included, also after an
error), and refuse in one line what they cannot score: a one-shot iterator read twice, a
recurrent layer that needs vmap, an Embedding with max_norm, the meta device. Each case for the
fast path and its reference twin."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sbfast import reference
from sbfast.sharpness import fisher_scores, sam_loss_gap_scores


def fast_fisher(model, data, **kw):
    return fisher_scores(model, data, progress=False, **kw)


def fast_gap(model, data, **kw):
    return sam_loss_gap_scores(model, data, 0.1, progress=False, **kw)


def ref_gap(model, data, **kw):
    return reference.sam_loss_gap_scores(model, data, 0.1, **kw)


SCORES = {
    "fisher": fast_fisher,
    "reference.fisher": reference.fisher_scores,
    "loss_gap": fast_gap,
    "reference.loss_gap": ref_gap,
}


def _shared_layer_model() -> tuple[nn.Module, nn.Linear]:
    torch.manual_seed(0)
    l = nn.Linear(6, 6)  # noqa: E741 - the issue's name
    return nn.Sequential(l, nn.Tanh(), l, nn.Linear(6, 10)), l


def _state(model: nn.Module) -> list:
    """Every module's own parameter and buffer objects, their requires_grad and values, and modes."""
    out = []
    for m in model.modules():
        for name, t in [*m._parameters.items(), *m._buffers.items()]:
            out.append((id(m), name, t, type(t), getattr(t, "requires_grad", None), t.detach().clone()))
        out.append((id(m), "training", m.training))
    return out


def _assert_same_state(before: list, after: list) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        if a[1] == "training":
            assert a == b
            continue
        assert a[:2] == b[:2]
        assert a[2] is b[2], f"{a[1]}: another tensor object than the one that went in"
        assert a[3] is b[3] and a[4] == b[4], f"{a[1]}: {b[3].__name__}, requires_grad={b[4]}"
        assert torch.equal(a[5], b[5])


def _batch(n: int = 5, features: int = 6, classes: int = 10):
    g = torch.Generator().manual_seed(1)
    return [(torch.arange(n), torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))]


@pytest.mark.parametrize("score", SCORES, ids=str)
def test_a_module_used_twice_leaves_scoring_as_it_entered(score):
    model, layer = _shared_layer_model()
    model[3].train()  # a mode of its own, to be kept
    weight = layer.weight
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the shared layer falls back to vmap
        SCORES[score](model, _batch())
    _assert_same_state(before, _state(model))
    assert layer.weight is weight and isinstance(layer.weight, nn.Parameter) and layer.weight.requires_grad
    # the layer still trains
    loss = model(torch.randn(2, 6)).sum()
    loss.backward()
    assert layer.weight.grad is not None


@pytest.mark.parametrize("score", SCORES, ids=str)
def test_a_module_used_twice_leaves_scoring_as_it_entered_also_after_an_error(score):
    model, layer = _shared_layer_model()
    before = _state(model)
    index, x, y = _batch()[0]
    y = y.clone()
    y[2] = 99  # a target outside the model's 10 classes: refused mid-scoring
    with warnings.catch_warnings(), pytest.raises(ValueError, match="targets"):
        warnings.simplefilter("ignore", RuntimeWarning)
        SCORES[score](model, [(index, x, y)])
    _assert_same_state(before, _state(model))


def test_the_scores_of_a_module_used_twice_match_the_reference():
    model, _ = _shared_layer_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fast = fast_fisher(model, _batch())
    torch.testing.assert_close(fast, reference.fisher_scores(model, _batch()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("score", ["fisher", "reference.fisher"])
def test_a_one_shot_iterator_is_refused_for_several_trials(score):
    model = nn.Sequential(nn.Linear(6, 3))
    batch = _batch(classes=3)

    def generator():
        yield from batch

    with pytest.raises(ValueError, match=r"one-shot iterator \(generator\), but trials=2 needs 2 passes"):
        SCORES[score](model, generator(), trials=2)
    one = SCORES[score](model, generator(), trials=1)  # one pass of a generator is fine
    torch.testing.assert_close(SCORES[score](model, batch, trials=2), one)  # a list is re-read


class RecurrentNet(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 5, batch_first=batch_first)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        if not self.gru.batch_first:
            x = x.transpose(0, 1)  # sequence first, as the GRU expects
        out, _ = self.gru(x)
        return self.head(out[:, -1] if self.gru.batch_first else out[-1])


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("score", ["fisher", "reference.fisher"])
def test_a_recurrent_layer_is_refused_in_one_line(score, batch_first):
    model = RecurrentNet(batch_first)
    before = _state(model)
    data = [(torch.arange(4), torch.randn(4, 7, 6), torch.randint(0, 3, (4,)))]
    with (
        warnings.catch_warnings(),
        pytest.raises(ValueError, match=r"GRU 'gru' needs per-sample gradients by torch.func.vmap"),
    ):
        warnings.simplefilter("ignore", RuntimeWarning)
        SCORES[score](model, data)
    _assert_same_state(before, _state(model))


def test_a_frozen_recurrent_layer_is_scored_without_vmap():
    model = RecurrentNet(batch_first=False)
    model.gru.requires_grad_(False)
    data = [(torch.arange(4), torch.randn(4, 7, 6), torch.randint(0, 3, (4,)))]
    fast = fast_fisher(model, data)
    # the head alone: its per-sample gradient norms, by hand
    with torch.no_grad():
        h = model.gru(data[0][1].transpose(0, 1))[0][-1]
    p = torch.softmax(model.head(h), 1)
    g = p - torch.nn.functional.one_hot(data[0][2], 3)
    expected = (g.pow(2).sum(1) * (h.pow(2).sum(1) + 1)).float()
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("score", SCORES, ids=str)
def test_an_embedding_with_max_norm_is_refused_before_it_writes_the_weights(score):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.mul_(5)  # rows longer than max_norm: a forward would shrink them in place
    before = _state(model)
    data = [(torch.arange(4), torch.randint(0, 10, (4, 2)), torch.randint(0, 3, (4,)))]
    with pytest.raises(ValueError, match=r"nn.Embedding '0' has max_norm=1.0"):
        SCORES[score](model, data)
    _assert_same_state(before, _state(model))


@pytest.mark.parametrize("score", SCORES, ids=str)
def test_the_meta_device_is_refused_in_one_line(score):
    model = nn.Sequential(nn.Linear(6, 3)).to("meta")
    with pytest.raises(ValueError, match=r"0.weight is on the meta device"):
        SCORES[score](model, _batch(classes=3))
    with pytest.raises(ValueError, match=r"device='meta' holds no values"):
        SCORES[score](nn.Sequential(nn.Linear(6, 3)), _batch(classes=3), device="meta")
