"""as_batches (every accepted form, every refusal), measuring (the model comes back exactly as it
was, also after an error or Ctrl-C) and MeasureResult.to_dict (strict JSON)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sbfast.data.datasets import IndexedTensorDataset
from sbfast.measure import MeasureResult, as_batches, check_model, measuring


def _data(n=13):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("with_index", [False, True])
@pytest.mark.parametrize("sizes", [[1], [7, 1], [5, 5, 3]])
def test_iterable_batches_kept_in_order(with_index, sizes):
    x, y = _data(sum(sizes))
    batches, start = [], 0
    for s in sizes:
        b = (x[start : start + s], y[start : start + s])
        batches.append((torch.arange(start, start + s), *b) if with_index else b)
        start += s
    out = as_batches(iter(batches))
    assert len(out) == len(sizes)
    start = 0
    for (bx, by), s in zip(out, sizes, strict=True):
        assert torch.equal(bx, x[start : start + s]) and torch.equal(by, y[start : start + s])
        start += s
    assert len(as_batches(batches, n_batches=1)) == 1


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("batch_size,n_batches", [(1, 1), (7, 1), (4, 3), (5, None)])
def test_dataset_form_consecutive(batch_size, n_batches):
    x, y = _data(13)
    x = x.repeat(1, 4).reshape(13, 3, 2, 2)  # IndexedTensorDataset holds images
    for ds in (_PairDataset(x, y), IndexedTensorDataset(x, y)):
        out = as_batches(ds, batch_size=batch_size, n_batches=n_batches)
        assert len(out) == (n_batches or 13 // batch_size)
        for b, (bx, by) in enumerate(out):
            sl = slice(b * batch_size, (b + 1) * batch_size)
            assert torch.equal(bx, x[sl]) and torch.equal(by, y[sl])


def test_dataset_form_shuffled_by_generator():
    x, y = _data(13)
    a = as_batches(_PairDataset(x, y), batch_size=4, generator=torch.Generator().manual_seed(3))
    b = as_batches(_PairDataset(x, y), batch_size=4, generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))
    assert torch.equal(a[0][0], x[perm[:4]])


@pytest.mark.parametrize(
    "data,kw,match",
    [
        ([], {}, "0 batches"),
        ("dataset", {"batch_size": 14}, "larger than the data set"),
        ("dataset", {"batch_size": 5, "n_batches": 3}, "n_batches=3"),
        ("dataset", {"batch_size": 0}, "batch_size"),
        ([(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))], {}, "empty"),
        ([(torch.zeros(3, 3), torch.zeros(2, dtype=torch.long))], {}, "3 samples but y has 2"),
    ],
)
def test_bad_batches_refused_in_one_line(data, kw, match):
    if data == "dataset":
        data = _PairDataset(*_data(13))
    with pytest.raises(ValueError, match=match) as e:
        as_batches(data, **kw)
    assert "\n" not in str(e.value)


def test_bad_batch_types_refused():
    with pytest.raises(TypeError, match="tuple of 4"):
        as_batches([(1, 2, 3, 4)])
    with pytest.raises(TypeError, match="iterable"):
        as_batches(torch.zeros(3))


def _bn_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 4))
    m.train()
    m[0].weight.requires_grad_(False)
    m(torch.randn(8, 3))  # running stats away from their init
    return m


def _snapshot(m):
    return (
        [(id(p), p.detach().clone(), p.requires_grad) for p in m.parameters()],
        [b.detach().clone() for b in m.buffers()],
        [mod.training for mod in m.modules()],
    )


def _assert_same(m, snap):
    params, bufs, modes = snap
    for (pid, v, rg), p in zip(params, m.parameters(), strict=True):
        assert id(p) == pid and torch.equal(p, v) and p.requires_grad == rg
    for v, b in zip(bufs, m.buffers(), strict=True):
        assert torch.equal(b, v)
    assert [mod.training for mod in m.modules()] == modes


@pytest.mark.parametrize("failure", [None, RuntimeError, KeyboardInterrupt])
def test_measuring_restores_everything(failure):
    m = _bn_model()
    snap = _snapshot(m)
    x = torch.randn(7, 3)

    def body():
        with measuring(m):
            assert not any(mod.training for mod in m.modules())
            assert all(p.requires_grad for p in m.parameters())
            m(x).sum().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(1.0)
                m[1].running_mean.add_(3.0)
            m.train()
            m(x)  # a forward in train mode moves the BatchNorm statistics too
            if failure is not None:
                raise failure("stop")

    if failure is None:
        body()
    else:
        with pytest.raises(failure):
            body()
    _assert_same(m, snap)
    assert all(p.grad is None for p in m.parameters())


def test_measuring_eval_mode_uses_running_statistics():
    m = _bn_model()
    x = torch.randn(7, 3)
    with measuring(m):
        inside = m(x)
    m.eval()
    assert torch.equal(inside, m(x))


def test_check_model_refusals():
    with pytest.raises(ValueError, match="no parameters"):
        check_model(nn.ReLU())
    with pytest.raises(ValueError, match="meta device"):
        check_model(nn.Linear(2, 2, device="meta"))
    with pytest.raises(TypeError, match="nn.Module"):
        check_model(3)
    assert len(check_model(nn.Linear(2, 2))) == 2


def test_result_to_dict_is_strict_json():
    r = MeasureResult(
        "worst_case_sharpness",
        0.5,
        per_batch=[0.25, float("nan"), 1.0],
        error_delta=float("inf"),
        settings={"rho": 0.5, "norm": "l2", "shape": (1, 2)},
        extra={"t": torch.tensor([1.0, math.nan])},
    )
    d = r.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["per_batch"] == [0.25, None, 1.0]
    assert back["error_delta"] is None and back["value"] == 0.5
    assert back["settings"]["shape"] == [1, 2] and back["extra"]["t"] == [1.0, None]
    with pytest.raises(AttributeError):
        r.value = 1.0  # frozen
