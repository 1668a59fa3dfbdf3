"""sbfast.reference against hand-worked results (float64 where a closed form exists).

The reference is the baseline of every parity test, so it is checked here against independent
computations: SGD/SAM worked out by hand, the closed-form per-sample gradient norm of a linear
model, direct per-sample loops, and a pure-Python rendering of the selection rules.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from sbfast.reference import SAM, fisher_scores, mixed_step, sam_loss_gap_scores, select_sam_masks

F64 = torch.float64
EPS = 1e-12  # the release's SAM denominator guard


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- helpers


def mlp(seed: int = 0, dtype: torch.dtype = F64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def bn_cnn(seed: int = 0, dtype: torch.dtype = F64) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 4),
    ).to(dtype)
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train mode
        model(torch.randn(16, 1, 5, 5, dtype=dtype) * 2 + 1)
    return model


def batches(x: torch.Tensor, y: torch.Tensor, size: int, order: torch.Tensor | None = None) -> list:
    idx = torch.arange(len(x)) if order is None else order
    return [(idx[i : i + size], x[idx[i : i + size]], y[idx[i : i + size]]) for i in range(0, len(x), size)]


def quad_setup():
    """One parameter w [3] and L(w) = 0.5 (w.x - t)^2, whose gradient is (w.x - t) x."""
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    t = 0.3
    w0 = torch.tensor([0.2, 0.1, -0.4], dtype=F64)
    return x, t, w0


# ------------------------------------------------------------------------------------ SAM


def test_sam_step_by_hand_sgd_momentum_weight_decay():
    x, t, w0 = quad_setup()
    rho, lr, mom, wd = 0.1, 0.05, 0.9, 0.01
    w = nn.Parameter(w0.clone())
    opt = SAM([w], rho=rho, lr=lr, momentum=mom, weight_decay=wd)

    def closure():
        loss = 0.5 * (w @ x - t) ** 2
        loss.backward()
        return loss

    exp, buf = w0.clone(), None
    for _ in range(3):
        opt.zero_grad()
        closure()
        opt.step(closure)
        g = (exp @ x - t) * x
        g_e = ((exp + rho * g / (g.norm() + EPS)) @ x - t) * x
        d = g_e + wd * exp
        buf = d if buf is None else mom * buf + d  # buf = d on the first step
        exp = exp - lr * buf
        torch.testing.assert_close(w.detach(), exp, rtol=0, atol=1e-14)


def test_first_step_is_rho_g_over_global_norm():
    model = nn.Linear(3, 2).to(F64)
    rho = 0.07
    opt = SAM(model.parameters(), rho=rho, lr=0.1)
    F.cross_entropy(model(torch.randn(5, 3, dtype=F64)), torch.tensor([0, 1, 1, 0, 1])).backward()
    w0 = [p.detach().clone() for p in model.parameters()]
    g = [p.grad.clone() for p in model.parameters()]
    n = math.sqrt(sum(float((gi**2).sum()) for gi in g))  # one norm over weight and bias
    opt.first_step()
    for p, p0, gi in zip(model.parameters(), w0, g, strict=True):
        torch.testing.assert_close(p.detach(), p0 + rho * gi / (n + EPS), rtol=0, atol=1e-15)
        assert torch.equal(opt.state[p]["old_p"], p0)


def test_first_step_adaptive():
    model = nn.Linear(3, 2).to(F64)
    rho = 0.5
    opt = SAM(model.parameters(), rho=rho, adaptive=True, lr=0.1)
    F.cross_entropy(model(torch.randn(5, 3, dtype=F64)), torch.tensor([0, 1, 1, 0, 1])).backward()
    w0 = [p.detach().clone() for p in model.parameters()]
    g = [p.grad.clone() for p in model.parameters()]
    n = math.sqrt(sum(float(((w.abs() * gi) ** 2).sum()) for w, gi in zip(w0, g, strict=True)))
    opt.first_step()
    for p, p0, gi in zip(model.parameters(), w0, g, strict=True):
        torch.testing.assert_close(p.detach(), p0 + rho * p0**2 * gi / (n + EPS), rtol=0, atol=1e-15)


def test_global_norm_across_groups_with_own_rho():
    model = nn.Linear(3, 2).to(F64)
    opt = SAM([{"params": [model.weight]}, {"params": [model.bias], "rho": 0.5}], rho=0.1, lr=0.1)
    F.cross_entropy(model(torch.randn(4, 3, dtype=F64)), torch.tensor([0, 1, 1, 0])).backward()
    (w0, b0), (gw, gb) = (
        (model.weight.detach().clone(), model.bias.detach().clone()),
        (model.weight.grad.clone(), model.bias.grad.clone()),
    )
    n = float(torch.sqrt((gw**2).sum() + (gb**2).sum()))
    opt.first_step()
    torch.testing.assert_close(model.weight.detach(), w0 + 0.1 * gw / (n + EPS), rtol=0, atol=1e-15)
    torch.testing.assert_close(model.bias.detach(), b0 + 0.5 * gb / (n + EPS), rtol=0, atol=1e-15)


def test_second_step_restores_bit_exactly_before_base_step():
    model = mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), rho=0.3, lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    storages = [p.data_ptr() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    F.cross_entropy(model(x), y).backward()
    seen = []
    real_step = opt.base_optimizer.step
    opt.base_optimizer.step = lambda: (seen.append([p.detach().clone() for p in model.parameters()]), real_step())
    opt.second_step()
    assert all(torch.equal(s, b) for s, b in zip(seen[0], before, strict=True))
    assert storages == [p.data_ptr() for p in model.parameters()]  # restored in place


def test_normal_then_sam_is_sgd_on_sum_of_gradients():
    x, t, w0 = quad_setup()
    a = torch.tensor([0.5, -0.5, 1.0], dtype=F64)
    rho, lr = 0.2, 0.1
    w = nn.Parameter(w0.clone())
    opt = SAM([w], rho=rho, lr=lr)
    (0.5 * ((w - a) ** 2).sum()).backward()  # normal part: g_n = w - a
    opt.normal_step(zero_grad=True)
    assert w.grad is None and opt.has_normal
    (0.5 * (w @ x - t) ** 2).backward()
    opt.first_step(zero_grad=True)
    (0.5 * (w @ x - t) ** 2).backward()
    opt.second_step()
    g = (w0 @ x - t) * x
    g_e = ((w0 + rho * g / (g.norm() + EPS)) @ x - t) * x
    torch.testing.assert_close(w.detach(), w0 - lr * (g_e + (w0 - a)), rtol=0, atol=1e-15)
    assert not opt.has_normal


def test_third_step_is_sgd_on_normal_gradient():
    a = torch.tensor([0.5, -0.5, 1.0], dtype=F64)
    w0 = torch.tensor([0.2, 0.1, -0.4], dtype=F64)
    w = nn.Parameter(w0.clone())
    opt = SAM([w], rho=0.2, lr=0.1, weight_decay=0.01)
    (0.5 * ((w - a) ** 2).sum()).backward()
    opt.normal_step(zero_grad=True)
    opt.third_step(zero_grad=True)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * ((w0 - a) + 0.01 * w0), rtol=0, atol=1e-15)
    assert w.grad is None and "normal_g" not in opt.state[w]


def test_params_without_grad_are_skipped():
    used, unused = nn.Parameter(torch.ones(3, dtype=F64)), nn.Parameter(torch.full((2,), 2.0, dtype=F64))
    opt = SAM([used, unused], rho=0.1, lr=0.1, momentum=0.9, weight_decay=0.1)
    (used**2).sum().backward()
    opt.first_step(zero_grad=True)
    assert torch.equal(unused.detach(), torch.full((2,), 2.0, dtype=F64))
    assert "old_p" not in opt.state.get(unused, {})
    (used**2).sum().backward()
    opt.second_step()
    assert torch.equal(unused.detach(), torch.full((2,), 2.0, dtype=F64))
    assert not torch.equal(used.detach(), torch.ones(3, dtype=F64))


def test_lr_scheduler_drives_base_optimizer():
    a = torch.tensor([0.5, -0.5], dtype=F64)
    w = nn.Parameter(torch.zeros(2, dtype=F64))
    opt = SAM([w], rho=0.1, lr=1.0)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler stepped before optimizer" warning
        for _ in range(2):
            opt.zero_grad()
            (0.5 * ((w - a) ** 2).sum()).backward()
            opt.normal_step(zero_grad=True)
            opt.third_step()
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    # step 1 at lr 1 lands on a; step 2 at lr 0.1 then has zero gradient
    torch.testing.assert_close(w.detach(), a, rtol=0, atol=1e-15)


def _run_mixed(model, opt, steps, start=0):
    gen = torch.Generator().manual_seed(123)
    data = [
        (
            torch.randn(8, 4, generator=gen, dtype=F64),
            torch.randint(0, 3, (8,), generator=gen),
            torch.rand(8, generator=gen) < 0.5,
        )
        for _ in range(start + steps)
    ]
    for x, y, m in data[start:]:
        mixed_step(model, opt, x, y, m)


def test_state_dict_round_trip():
    model_a = mlp(1)
    opt_a = SAM(model_a.parameters(), rho=0.2, lr=0.1, momentum=0.9, weight_decay=5e-4)
    _run_mixed(model_a, opt_a, 5)

    model_b = mlp(1)
    opt_b = SAM(model_b.parameters(), rho=0.2, lr=0.1, momentum=0.9, weight_decay=5e-4)
    _run_mixed(model_b, opt_b, 2)
    saved_opt, saved_model = copy.deepcopy(opt_b.state_dict()), copy.deepcopy(model_b.state_dict())
    assert saved_opt["base_optimizer"]["state"]  # momentum buffers travel with the SAM state

    model_c = mlp(99)
    model_c.load_state_dict(saved_model)
    opt_c = SAM(model_c.parameters(), rho=0.9, lr=0.5, momentum=0.9, weight_decay=5e-4)
    opt_c.load_state_dict(saved_opt)
    assert opt_c.base_optimizer.param_groups is opt_c.param_groups
    assert opt_c.param_groups[0]["rho"] == 0.2 and opt_c.param_groups[0]["lr"] == 0.1
    _run_mixed(model_c, opt_c, 3, start=2)
    for pa, pc in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(pa, pc)


@pytest.mark.parametrize("rho", [-0.1, float("nan"), float("inf"), "0.1", None])
def test_bad_rho_raises(rho):
    with pytest.raises(ValueError, match="rho"):
        SAM([nn.Parameter(torch.zeros(2))], rho=rho, lr=0.1)


def test_bad_group_rho_raises():
    with pytest.raises(ValueError, match="rho"):
        SAM([{"params": [nn.Parameter(torch.zeros(2))], "rho": -1.0}], lr=0.1)
    opt = SAM([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "rho": float("nan")})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "rho": 0.3})
    assert len(opt.base_optimizer.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.1


@pytest.mark.parametrize("base", [object, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), "SGD"])
def test_bad_base_optimizer_raises(base):
    with pytest.raises(ValueError, match="base_optimizer"):
        SAM([nn.Parameter(torch.zeros(2))], base_optimizer=base, lr=0.1)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradient_raises_before_perturbing(bad):
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = SAM([p, q], rho=0.1, lr=0.1)
    p.grad = torch.tensor([1.0, bad, 0.0])
    q.grad = torch.ones(2)
    with pytest.raises(ValueError, match="not finite"):
        opt.first_step()
    assert torch.equal(p.detach(), torch.ones(3)) and torch.equal(q.detach(), torch.ones(2))
    assert "old_p" not in opt.state.get(p, {}) and "old_p" not in opt.state.get(q, {})


def test_first_step_without_grads_and_step_without_closure_raise():
    opt = SAM([nn.Parameter(torch.ones(2))], rho=0.1, lr=0.1)
    with pytest.raises(ValueError, match="gradient"):
        opt.first_step()
    with pytest.raises(ValueError, match="closure"):
        opt.step()


# ------------------------------------------------------------------------- fisher_scores


def linear_data(n=11, d=5, c=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=F64), torch.randint(0, c, (n,), generator=gen)


@pytest.mark.parametrize("frozen_bias", [False, True])
def test_fisher_closed_form_linear(frozen_bias):
    x, y = linear_data()
    model = nn.Linear(5, 4).to(F64)
    model.bias.requires_grad_(not frozen_bias)
    scores = fisher_scores(model, batches(x, y, 4), device="cpu")
    # dCE/dW = (p - onehot) x^T, dCE/db = p - onehot  =>  ||p - y||^2 (||x||^2 + 1)
    p = torch.softmax(model(x), 1).detach()
    expected = ((p - F.one_hot(y, 4)) ** 2).sum(1) * ((x**2).sum(1) + (0.0 if frozen_bias else 1.0))
    assert scores.dtype == torch.float32 and scores.shape == (11,)
    # computed in float64; the float32 result can only differ from the rounded closed form by an ulp
    torch.testing.assert_close(scores, expected.float(), rtol=1.2e-7, atol=0)


def test_fisher_bn_model_matches_eval_loop_and_restores_modes():
    model = bn_cnn()
    model[1].eval()  # a submodule deliberately in eval must stay so
    modes = [m.training for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 1, 5, 5, generator=gen, dtype=F64), torch.randint(0, 4, (7,), generator=gen)
    scores = fisher_scores(model, batches(x, y, 3))
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # eval mode: running statistics untouched
    ref = copy.deepcopy(model).eval()
    expected = []
    for i in range(7):
        ref.zero_grad()
        F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]).backward()
        expected.append(sum(float((p.grad**2).sum()) for p in ref.parameters()))
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)


def test_fisher_independent_of_batching_and_order():
    x, y = linear_data(n=13)
    model = mlp(dtype=F64)
    model[0] = nn.Linear(5, 6).to(F64)
    y = y % 3
    base = fisher_scores(model, batches(x, y, 1))
    for size in (4, 13):
        torch.testing.assert_close(fisher_scores(model, batches(x, y, size)), base, rtol=1e-6, atol=0)
    shuffled = batches(x, y, 5, order=torch.randperm(13, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(fisher_scores(model, shuffled), base, rtol=1e-6, atol=0)


class _PassLoader:
    """Re-iterable loader whose inputs change with every pass, like random augmentation."""

    def __init__(self, x, y):
        self.x, self.y, self.passes = x, y, 0

    def __iter__(self):
        shift = 0.5 * self.passes
        self.passes += 1
        return iter(batches(self.x + shift, self.y, 4))


def test_fisher_trials_average_passes():
    x, y = linear_data()
    model = nn.Linear(5, 4).to(F64)
    averaged = fisher_scores(model, _PassLoader(x, y), trials=3)
    singles = [fisher_scores(model, batches(x + 0.5 * t, y, 4)).double() for t in range(3)]
    torch.testing.assert_close(averaged, (sum(singles) / 3).float(), rtol=2e-7, atol=0)


def test_fisher_num_samples_and_unseen_indices():
    x, y = linear_data(n=4)
    model = nn.Linear(5, 4).to(F64)
    loader = [(torch.tensor([0, 3]), x[:2], y[:2])]
    scores = fisher_scores(model, loader, num_samples=6)
    assert scores.shape == (6,) and scores[[0, 3]].isfinite().all()
    assert scores[[1, 2, 4, 5]].isnan().all()
    with pytest.raises(ValueError, match="num_samples"):
        fisher_scores(model, loader, num_samples=3)


def test_fisher_errors_and_mode_restored_on_error():
    x, y = linear_data(n=4)
    model = nn.Linear(5, 4).to(F64)
    with pytest.raises(ValueError, match="no samples"):
        fisher_scores(model, [])
    for bad in (4, -1):
        with pytest.raises(ValueError, match="targets"):
            fisher_scores(model, [(torch.arange(4), x, torch.tensor([0, 1, bad, 2]))])
        assert model.training
    with pytest.raises(ValueError, match="trials"):
        fisher_scores(model, batches(x, y, 2), trials=0)
    with pytest.raises(ValueError, match="batch sizes"):
        fisher_scores(model, [(torch.arange(3), x, y)])
    frozen = nn.Linear(5, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        fisher_scores(frozen, batches(x.float(), y, 2))


# ------------------------------------------------------------------- sam_loss_gap_scores


def _gap_loop(model, loader, rho, adaptive):
    """Direct computation: per batch, SAM-perturb a copy of the model in place, evaluate both."""
    out = {}
    for index, x, y in loader:
        m = copy.deepcopy(model).eval()
        loss = F.cross_entropy(m(x), y, reduction="none")
        loss.mean().backward()
        with torch.no_grad():
            ps = list(m.parameters())
            n = torch.norm(torch.stack([((p.abs() if adaptive else 1.0) * p.grad).norm() for p in ps]))
            for p in ps:
                p.add_((p**2 if adaptive else 1.0) * p.grad * (rho / (n + EPS)))
            gap = F.cross_entropy(m(x), y, reduction="none") - loss
        out.update({int(i): float(g) for i, g in zip(index, gap, strict=True)})
    return torch.tensor([out[i] for i in range(len(out))], dtype=torch.float32)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_loss_gap_matches_loop_and_leaves_model_untouched(adaptive):
    model = bn_cnn(2)
    state = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 1, 5, 5, generator=gen, dtype=F64), torch.randint(0, 4, (9,), generator=gen)
    loader = batches(x, y, 4)
    scores = sam_loss_gap_scores(model, loader, 0.3, adaptive=adaptive)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert scores.dtype == torch.float32 and scores.shape == (9,)
    torch.testing.assert_close(scores, _gap_loop(model, loader, 0.3, adaptive), rtol=1e-5, atol=1e-9)


def test_sam_loss_gap_rho_zero_is_zero_and_bad_rho_raises():
    x, y = linear_data(n=6)
    model = nn.Linear(5, 4).to(F64)
    assert torch.equal(sam_loss_gap_scores(model, batches(x, y, 4), 0.0), torch.zeros(6))
    with pytest.raises(ValueError, match="rho"):
        sam_loss_gap_scores(model, batches(x, y, 4), -1.0)


# ---------------------------------------------------------------------- select_sam_masks

HAND_SCORES = torch.tensor(
    [
        [0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # F_0 = {0, 1}: the tie among 1..9 goes to index 1
        [9.0, 0.1, 0.2, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0],  # F_1 = {1, 2}
        [3.0, 3.0, 3.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0],  # F_2 = {3, 4}: the tie among 3, 4, 5 goes to 3, 4
    ],
    dtype=F64,
)
# k = 2, U = {0..4}, R = [5, 6, 7, 8, 9], R_0 = [5, 8], R_1 = [6, 9], R_2 = [7]
# A_0 = {1, 2, 3, 4}, A_1 = {0, 1, 3, 4}, A_2 = {0, 1, 2}
HAND_BALANCE = [  # A_i | R_i
    [0, 1, 1, 1, 1, 1, 0, 0, 1, 0],
    [1, 1, 0, 1, 1, 0, 1, 0, 0, 1],
    [1, 1, 1, 0, 0, 0, 0, 1, 0, 0],
]
HAND_BOOST = [  # A_i | (R - R_i)
    [0, 1, 1, 1, 1, 0, 1, 1, 0, 1],
    [1, 1, 0, 1, 1, 1, 0, 1, 1, 0],
    [1, 1, 1, 0, 0, 1, 1, 0, 1, 1],
]


@pytest.mark.parametrize("variant,expected", [("balance", HAND_BALANCE), ("boost", HAND_BOOST)])
def test_select_by_hand(variant, expected):
    masks = select_sam_masks(HAND_SCORES, 0.2, variant)
    assert masks.dtype == torch.bool and masks.shape == (3, 10)
    assert masks.tolist() == [[bool(v) for v in row] for row in expected]
    assert torch.equal(select_sam_masks(HAND_SCORES.float(), 0.2, variant), masks)


def test_select_ratio_rounding_and_single_member():
    scores = torch.arange(100, dtype=F64).flip(0)[None]  # sample 99 is the flattest
    balance = select_sam_masks(scores, 0.29, "balance")  # k = 29, not 28 = int(100 * 0.29)
    assert int(balance.sum()) == 71 and not balance[0, 71:].any()  # M = 1: A_0 empty, R_0 = R
    assert not select_sam_masks(scores, 0.29, "boost").any()  # R minus R_0 is empty


@pytest.mark.parametrize("m", [1, 3])
def test_select_ratio_zero_and_one(m):
    scores = torch.rand(m, 8, dtype=F64)
    bal0, boost0 = select_sam_masks(scores, 0.0, "balance"), select_sam_masks(scores, 0.0, "boost")
    assert (bal0.sum(0) == 1).all() and (boost0.sum(0) == m - 1).all()  # R = everything
    assert bal0[0].nonzero().squeeze(1).tolist() == list(range(0, 8, m))
    for variant in ("balance", "boost"):  # k = N: every F_j is everything, R is empty
        full = select_sam_masks(scores, 1.0, variant)
        assert full.all() if m > 1 else not full.any()  # M = 1: A_0 and R are both empty
    for variant in ("random", "same"):
        assert not select_sam_masks(scores, 0.0, variant).any()
        assert select_sam_masks(scores, 1.0, variant).all()


def test_select_random_and_same():
    scores = torch.zeros(3, 20)
    rnd = select_sam_masks(scores, 0.3, "random", seeds=[7, 8, 9])
    n_normal = 14  # floor(20 * 0.7)
    assert (rnd.sum(1) == 20 - n_normal).all()
    for row, seed in zip(rnd, [7, 8, 9], strict=True):
        normal = torch.randperm(20, generator=torch.Generator().manual_seed(seed))[:n_normal]
        assert sorted((~row).nonzero().squeeze(1).tolist()) == sorted(normal.tolist())
    assert torch.equal(select_sam_masks(scores, 0.3, "random", seeds=[7, 8, 9]), rnd)
    default = select_sam_masks(scores, 0.3, "random")
    assert torch.equal(default, select_sam_masks(scores, 0.3, "random", seeds=[0, 1, 2]))
    same = select_sam_masks(scores, 0.3, "same", seeds=[7, 8, 9])
    assert (same == same[0]).all() and torch.equal(same[0], default[0])


def _python_masks(rows: list[list[float]], n: int, ratio: float, variant: str) -> list[list[bool]]:
    """Section 4 with Python sets and sorted(): an independent rendering of the rules."""
    m = len(rows)
    k = math.floor(n * ratio + 1e-9)
    flat = [set(sorted(range(n), key=lambda i, r=r: (r[i], i))[:k]) for r in rows]
    rest = [i for i in range(n) if not any(i in f for f in flat)]
    out = []
    for i in range(m):
        others = set().union(*(flat[j] for j in range(m) if j != i))
        mine = set(rest[i::m])
        sam = others | mine if variant == "balance" else others | (set(rest) - mine)
        out.append([s in sam for s in range(n)])
    return out


@settings(max_examples=150, deadline=None)
@given(
    m=st.integers(1, 4),
    n=st.integers(0, 25),
    ratio=st.floats(0.0, 1.0),
    variant=st.sampled_from(["balance", "boost"]),
    data=st.data(),
)
def test_select_matches_python_rules(m, n, ratio, variant, data):
    # few distinct values, so ties are everywhere
    rows = [data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)) for _ in range(m)]
    scores = torch.tensor(rows, dtype=F64).reshape(m, n)
    masks = select_sam_masks(scores, ratio, variant)
    assert masks.shape == (m, n) and masks.dtype == torch.bool
    assert masks.tolist() == _python_masks(rows, n, ratio, variant)
    k = math.floor(n * ratio + 1e-9)
    order = torch.argsort(scores, dim=1, stable=True)[:, :k]
    for i in range(m):  # A_i (flat for another member) is always SAM for i
        others = {int(s) for j in range(m) if j != i for s in order[j]}
        assert all(masks[i, s] for s in others)


@pytest.mark.parametrize(
    "scores,kwargs,match",
    [
        (torch.zeros(5), {}, "2-D"),
        (torch.zeros(0, 5), {}, "M = 0"),
        (torch.zeros(2, 5, dtype=torch.long), {}, "floating"),
        (torch.tensor([[0.0, float("nan")]]), {}, "NaN"),
        (torch.tensor([[0.0, float("inf")]]), {}, "inf"),
        (torch.zeros(2, 5), {"ratio": -0.1}, "ratio"),
        (torch.zeros(2, 5), {"ratio": 1.5}, "ratio"),
        (torch.zeros(2, 5), {"ratio": float("nan")}, "ratio"),
        (torch.zeros(2, 5), {"ratio": "0.5"}, "ratio"),
        (torch.zeros(2, 5), {"ratio": True}, "ratio"),
        (torch.zeros(2, 5), {"variant": "sharp"}, "variant"),
        (torch.zeros(2, 5), {"seeds": [1]}, "seeds"),
        (torch.zeros(2, 5), {"seeds": [1, 2.5]}, "seeds"),
    ],
)
def test_select_errors(scores, kwargs, match):
    kwargs = {"ratio": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        select_sam_masks(scores, **kwargs)


def test_select_scores_not_tensor():
    with pytest.raises(TypeError):
        select_sam_masks([[0.0, 1.0]], 0.5)


# ---------------------------------------------------------------------------- mixed_step


def _manual_mixed(model, x, y, mask, rho):
    """Gradient of the batch-mean loss with the SAM samples at w + e, by plain autograd."""
    names = [n for n, _ in model.named_parameters()]
    w = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    b = len(x)
    e = {n: torch.zeros_like(p) for n, p in w.items()}
    if mask.any():
        g = torch.autograd.grad(F.cross_entropy(functional_call(model, w, (x[mask],)), y[mask]), list(w.values()))
        n = torch.sqrt(sum((gi**2).sum() for gi in g))
        e = {name: (rho * gi / (n + EPS)).detach() for name, gi in zip(names, g, strict=True)}
    w_e = {name: w[name] + e[name] for name in names}
    total = (
        F.cross_entropy(functional_call(model, w, (x[~mask],)), y[~mask], reduction="sum")
        + F.cross_entropy(functional_call(model, w_e, (x[mask],)), y[mask], reduction="sum")
    ) / b
    loss_w = F.cross_entropy(functional_call(model, w, (x,)), y)
    return torch.autograd.grad(total, list(w.values())), float(loss_w.detach())


def test_mixed_step_matches_manual_sgd():
    rho, lr, mom, wd = 0.2, 0.1, 0.9, 5e-4
    model = mlp(3)
    opt = SAM(model.parameters(), rho=rho, lr=lr, momentum=mom, weight_decay=wd)
    gen = torch.Generator().manual_seed(4)
    masks = [
        torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool),
        torch.ones(8, dtype=torch.bool),
        torch.zeros(8, dtype=torch.bool),
        torch.tensor([0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool),
    ]
    bufs = None
    for mask in masks:
        x, y = torch.randn(8, 4, generator=gen, dtype=F64), torch.randint(0, 3, (8,), generator=gen)
        grads, loss_w = _manual_mixed(model, x, y, mask, rho)
        w = [p.detach().clone() for p in model.parameters()]
        d = [g + wd * wi for g, wi in zip(grads, w, strict=True)]
        bufs = d if bufs is None else [mom * bi + di for bi, di in zip(bufs, d, strict=True)]
        expected = [wi - lr * bi for wi, bi in zip(w, bufs, strict=True)]
        got_loss = mixed_step(model, opt, x, y, mask)
        assert got_loss == pytest.approx(loss_w, rel=1e-12, abs=1e-12)
        for p, ex in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.detach(), ex, rtol=0, atol=1e-12)
        assert all(p.grad is None for p in model.parameters())


def test_mixed_step_bad_inputs():
    model = mlp()
    opt = SAM(model.parameters(), rho=0.1, lr=0.1)
    x, y = torch.randn(4, 4, dtype=F64), torch.tensor([0, 1, 2, 0])
    ok = torch.tensor([True, False, True, False])
    for args in [
        (x, y[:3], ok),
        (x, y, ok[:3]),
        (x[:3], y, ok),
        (x, y, ok.long()),
        (x[:0], y[:0], ok[:0]),
        (x, y[:, None], ok),
    ]:
        with pytest.raises(ValueError):
            mixed_step(model, opt, *args)
    with pytest.raises(TypeError):
        mixed_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, ok)
