"""sbfast.compat.engine (and its membership lookup) on hand-made cases: the release's return
types and shapes, the release's arithmetic (against sbfast.reference in float64), and the
one-line errors where the release would silently misbehave."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from compat_helpers import cifar_args
from torch import nn

from sbfast import compat, reference
from sbfast.compat import engine, membership
from sbfast.compat.utils import CustomDataset, ImageArrayDataset, ReleaseTransform

pytestmark = pytest.mark.usefixtures("one_thread")

SGD = dict(rho=0.2, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _net(seed: int = 0, d: int = 6, c: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, c)).double()


def _batch(b: int, n: int = 40, d: int = 6, c: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randperm(n, generator=g)[:b],
        torch.randn(b, d, generator=g, dtype=torch.float64),
        torch.randint(0, c, (b,), generator=g),
    )


# --------------------------------------------------------------------------------------------
# membership: the release's `indice[i].item() in idx`
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "idx",
    [
        [np.int64(3), np.int64(0), np.int64(7)],  # the release's split output
        np.array([3, 0, 7]),
        torch.tensor([7, 3, 0]),
        {0, 3, 7},
        [3.0, 0.0, 7.0, -1],  # integral floats match; -1 is the release's "none" sentinel
    ],
)
def test_lookup_marks_exactly_the_indices_in_idx(idx):
    table = membership.normal_lookup(idx, 10)
    assert table.dtype == torch.bool and table.shape == (10,)
    assert torch.nonzero(table).flatten().tolist() == [0, 3, 7]


def test_lookup_sentinel_and_unknown_size():
    assert membership.normal_lookup(np.array([-1]), 5).tolist() == [False] * 5
    assert membership.normal_lookup([], None).shape == (0,)
    assert membership.normal_lookup([4], None).tolist() == [False] * 4 + [True]


def test_lookup_is_cached_per_object_and_rebuilt_after_a_change():
    idx = [np.int64(1), np.int64(4)]
    a = membership.normal_lookup(idx, 6)
    assert membership.normal_lookup(idx, 6) is a
    assert membership.normal_lookup(list(idx), 6) is not a  # another object: built anew
    idx[1] = np.int64(5)  # changed in place: the cache must notice
    assert torch.nonzero(membership.normal_lookup(idx, 6)).flatten().tolist() == [1, 5]
    arr = np.array([2, 3])
    b = membership.normal_lookup(arr, 6)
    arr[0] = 0
    assert membership.normal_lookup(arr, 6) is not b and membership.normal_lookup(arr, 6)[0]


@pytest.mark.parametrize(
    "idx,n,match",
    [
        ([0, -2], 5, "negative sample index -2"),
        ([0, 5], 5, "index 5, outside the data set of 5"),
        ([0.5], 5, "non-integral"),
        (["a"], 5, "integer sample indices"),
        ([True, False], 5, "integer sample indices"),
    ],
)
def test_lookup_rejects_what_the_release_silently_never_matches(idx, n, match):
    with pytest.raises((ValueError, TypeError), match=match):
        membership.normal_lookup(idx, n)


@pytest.mark.parametrize("b", [1, 7, 129])
def test_split_batch_equals_the_release_loop(b):
    g = torch.Generator().manual_seed(b)
    indice = torch.randint(0, 300, (b,), generator=g)
    idx = list(np.unique(torch.randint(0, 250, (120,), generator=g).numpy()))
    normal_pos, sam_pos = membership.split_batch(indice, membership.normal_lookup(idx), b)
    want_normal = [i for i in range(b) if indice[i].item() in idx]
    assert normal_pos.dtype == sam_pos.dtype == torch.int64
    assert normal_pos.tolist() == want_normal
    assert sam_pos.tolist() == [i for i in range(b) if i not in want_normal]


def test_split_batch_errors():
    table = membership.normal_lookup([1], 4)
    with pytest.raises(ValueError, match="3 entries but the batch has 2"):
        membership.split_batch(torch.tensor([0, 1, 2]), table, 2)
    with pytest.raises(ValueError, match="negative sample index -1"):
        membership.split_batch(torch.tensor([0, -1]), table, 2)
    with pytest.raises(ValueError, match="1-D integer"):
        membership.split_batch(torch.tensor([0.0, 1.0]), table, 2)


# --------------------------------------------------------------------------------------------
# mix_step / train_one_epoch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("idx", [np.array([-1]), "half", "all"], ids=["all-sam", "mixed", "all-normal"])
def test_mix_step_matches_the_reference_and_returns_the_release_types(idx):
    indice, x, y = _batch(7)
    if isinstance(idx, str):
        idx = [np.int64(i) for i in indice[::2].tolist()] if idx == "half" else list(range(40))
    net, twin = _net(), _net()
    opt = compat.NSAM(net.parameters(), torch.optim.SGD, **SGD)
    ref = reference.SAM(twin.parameters(), torch.optim.SGD, **SGD)
    normal = torch.tensor([int(i) in {int(v) for v in np.asarray(idx)} for i in indice])
    with torch.no_grad():  # the loss at w, by hand: |N|/b mean CE(N) + |S|/b mean CE(S)
        logits = net(x)
        parts = [(m, F.cross_entropy(logits[m], y[m]) * (int(m.sum()) / 7)) for m in (normal, ~normal) if m.any()]
        want_loss = sum(v for _, v in parts)
        want_correct = int((logits.argmax(1) == y).sum())
    for step in range(3):
        opt.zero_grad()
        correct, loss = engine.mix_step(None, net, indice, x, y, idx, opt, 0, "cpu")
        reference.mixed_step(twin, ref, x, y, ~normal)
        if step == 0:
            assert type(correct) is int and correct == want_correct
            assert isinstance(loss, torch.Tensor) and loss.shape == () and not loss.requires_grad
            assert loss.item() == pytest.approx(want_loss.item(), rel=1e-14)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_mix_step_on_an_empty_batch_raises():
    net = _net()
    opt = compat.NSAM(net.parameters(), torch.optim.SGD, **SGD)
    with pytest.raises(ValueError, match="empty"):
        engine.mix_step(
            None,
            net,
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, 6, dtype=torch.float64),
            torch.zeros(0, dtype=torch.long),
            [1],
            opt,
            0,
            "cpu",
        )


class _Loader(list):
    """A list of batches with the loader attributes train_one_epoch reads."""

    def __init__(self, batches, n):
        super().__init__(batches)
        self.dataset = range(n)


def _epoch_batches(n_batches: int, b: int = 5):
    return _Loader([_batch(b, seed=s) for s in range(n_batches)], 40)


def test_train_one_epoch_sam_branch_prints_and_sums_losses(capsys):
    loader = _epoch_batches(3)
    idx = list(range(0, 40, 2))
    net, twin = _net(), _net()
    opt = compat.NSAM(net.parameters(), torch.optim.SGD, **SGD)
    args = compat.release_args(sam="True", print_freq=2)
    total = engine.train_one_epoch(args, net, loader, opt, idx, None, 0, "cpu")
    ref = reference.SAM(twin.parameters(), torch.optim.SGD, **SGD)
    mask = torch.ones(40, dtype=torch.bool)
    mask[idx] = False
    want = reference.train_member_epoch(twin, ref, loader, "mixed", sam_mask=mask, dtype=torch.float64)
    assert isinstance(total, torch.Tensor) and total.shape == () and not total.requires_grad
    assert total.item() / 3 == pytest.approx(want, rel=1e-13)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    out = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in out] == ["Iter 0/3", "Iter 2/3"] and "lr 0.10000" in out[0]


def test_train_one_epoch_sgd_branch_is_plain_sgd():
    loader = _epoch_batches(2)
    net, twin = _net(), _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    args = compat.release_args(sam="False", print_freq=1000)
    total = engine.train_one_epoch(args, net, loader, opt, np.arange(40), None, 0, "cpu")
    want = reference.train_member_epoch(twin, ref, loader, "sgd", dtype=torch.float64)
    assert total.item() / 2 == pytest.approx(want, rel=1e-13)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    assert engine.train_one_epoch(args, net, _Loader([], 40), opt, [], None, 0, "cpu") == 0.0


def test_train_one_epoch_rejects_an_index_outside_the_data_set_before_any_step():
    net = _net()
    before = [p.clone() for p in net.parameters()]
    opt = compat.NSAM(net.parameters(), torch.optim.SGD, **SGD)
    with pytest.raises(ValueError, match="index 40, outside the data set of 40"):
        engine.train_one_epoch(compat.release_args(sam="True"), net, _epoch_batches(2), opt, [3, 40], None, 0, "cpu")
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))


# --------------------------------------------------------------------------------------------
# evaluate / evaluate_c
# --------------------------------------------------------------------------------------------


class _Fixed(nn.Module):
    """Logits chosen by hand: x's first 3 features."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x.flatten(1)[:, :3] + self.w


def test_evaluate_hand_made():
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    y = torch.tensor([0, 1, 0, 2, 1])
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    loss, acc = engine.evaluate(None, _Fixed(), loader)
    want_loss = sum(F.cross_entropy(x[i : i + 2], y[i : i + 2]).item() for i in (0, 2, 4)) / 5
    assert type(loss) is float and type(acc) is float
    assert loss == want_loss and acc == 3 / 5
    with pytest.raises(ValueError, match=r"\(images, targets\) pairs"):
        engine.evaluate(None, _Fixed(), [(torch.tensor([0]), x[:1], y[:1])])


def test_evaluate_c_reads_every_corruption_and_mutates_the_data_set(tmp_path, capsys):
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 3, 4)
    for c in engine.CORRUPTIONS:
        np.save(tmp_path / f"{c}.npy", rng.randint(0, 256, (4, 2, 2, 3)).astype(np.uint8))
    np.save(tmp_path / "labels.npy", labels)
    test_data = ImageArrayDataset(np.zeros((1, 2, 2, 3), np.uint8), [0], ReleaseTransform((0.0,) * 3, (1.0,) * 3))
    args = compat.release_args(batch_size=3, num_workers=0)
    net = _Fixed()
    mean_acc, accs = engine.evaluate_c(args, net, test_data, str(tmp_path) + "/")
    assert list(accs) == engine.CORRUPTIONS
    for c in engine.CORRUPTIONS:
        px = torch.from_numpy(np.load(tmp_path / f"{c}.npy")).permute(0, 3, 1, 2).float() / 255
        assert accs[c] == (net(px).argmax(1).numpy() == labels).mean()
    assert isinstance(mean_acc, np.floating) and mean_acc == np.mean(list(accs.values()))
    assert test_data.data.shape == (4, 2, 2, 3) and torch.equal(test_data.targets, torch.as_tensor(labels))
    assert capsys.readouterr().out.count("Test Error") == 15
    with pytest.raises(TypeError, match="data and .targets"):
        engine.evaluate_c(args, net, torch.utils.data.Subset(test_data, [0]), str(tmp_path) + "/")


# --------------------------------------------------------------------------------------------
# test_fisher / main_fisher / test_sharpness_loss
# --------------------------------------------------------------------------------------------


def _scoring_loader(n: int = 11, b: int = 4):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)
    ds = CustomDataset(torch.utils.data.TensorDataset(x, y))
    return torch.utils.data.DataLoader(ds, batch_size=b, shuffle=False)


@pytest.mark.parametrize("trials", [1, 2])
def test_test_fisher_matches_the_reference(trials):
    net = _net().float()
    loader = _scoring_loader()
    scores = engine.test_fisher(net, loader, trials, "cpu")
    want = reference.fisher_scores(copy.deepcopy(net).double(), loader, num_samples=11)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.shape == (11,)
    np.testing.assert_allclose(scores, want.numpy(), rtol=1e-5)  # float32 model
    assert not net.training  # the release leaves the model in eval mode


def test_test_fisher_errors():
    net = _net().float()
    with pytest.raises(ValueError, match="trials"):
        engine.test_fisher(net, _scoring_loader(), 0, "cpu")
    partial = torch.utils.data.DataLoader(_scoring_loader().dataset, batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="3 of 11 samples were never yielded"):
        engine.test_fisher(net, partial, 1, "cpu")


def test_main_fisher_fills_the_shared_dict(tmp_path):
    args = cifar_args(tmp_path, n_train=13, width=2, flat_trial=1)
    torch.manual_seed(0)
    model = compat.create_model(args, 10)
    shared = {}
    out = engine.main_fisher(args, 1, shared, model)
    assert list(shared) == [1] and out is shared[1]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (13,)
    loader = torch.utils.data.DataLoader(CustomDataset(compat.create_dataset(args, is_fisher=True)), batch_size=16)
    want = reference.fisher_scores(copy.deepcopy(model).double(), loader, num_samples=13)
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-5)


def test_test_sharpness_loss_is_the_per_sample_sam_gap():
    net = _net()
    twin = copy.deepcopy(net)
    opt = compat.NSAM(net.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    loader = [(i, x.double(), y) for i, x, y in _scoring_loader()]
    wrapped = _Loader(loader, 11)
    crit = nn.CrossEntropyLoss(reduction="none")
    gaps = engine.test_sharpness_loss(net, wrapped, opt, crit, "cpu")
    assert isinstance(gaps, torch.Tensor) and gaps.dtype == torch.get_default_dtype() and gaps.shape == (11,)
    ref = reference.SAM(twin.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    want = torch.zeros(11, dtype=torch.float64)
    for idx, x, y in loader:  # by hand: l_i(w + e) - l_i(w), e from the batch's mean loss
        ref.zero_grad()
        at_w = crit(twin(x), y)
        at_w.mean().backward()
        ref.first_step(zero_grad=True)
        with torch.no_grad():
            want[idx] = crit(twin(x), y) - at_w.detach()
        for group in ref.param_groups:
            for p in group["params"]:
                p.data = ref.state[p]["old_p"]
    torch.testing.assert_close(gaps, want.float(), rtol=1e-6, atol=1e-7)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)  # back_step put w back
    with pytest.raises(ValueError, match="reduction='none'"):
        engine.test_sharpness_loss(net, wrapped, opt, nn.CrossEntropyLoss(), "cpu")
