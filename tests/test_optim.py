"""sbfast.optim.SharpBalanceSAM against sbfast.reference.SAM (+ torch.optim.SGD).

Parity after 25 steps that mix normal-only, SAM-only and mixed batches (reference.mixed_step
drives both optimizers): bit for bit in float64 and (here, in fact) float32 on CPU, the
2x-plain-error rule in bfloat16 against a float64 run. Then the layout (flat buffers, views),
state, LR schedules, param groups, non-finite handling without host syncs, mixed precision,
BatchNorm freezing, gradient accumulation, torch.compile and bad inputs.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within_plain_error
from torch import nn

from sbfast import reference
from sbfast.models import create_model
from sbfast.optim import SharpBalanceSAM

RELEASE = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, rho=0.2)  # the release's SGD, a smaller lr


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests are about numbers, not speed: one intra-op thread keeps them quick on a
    busy shared machine (spinning OpenMP workers slow down 10x when cores are taken). The
    element-wise kernels give the same bits for any thread count; test_sam_ops covers the
    multi-threaded chunking on large buffers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(name: str, dtype: torch.dtype = torch.float64, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    if name == "resnet18":
        return create_model("resnet18", 10, width=4).to(dtype)
    return create_model("mlp", 10, hidden=32).to(dtype)


def _batches(name: str, steps: int, dtype: torch.dtype, seed: int = 3, b: int | None = None):
    """(x, y, sam_mask): normal-only, SAM-only and mixed batches in turn."""
    g = torch.Generator().manual_seed(seed)
    channels = 3 if name == "resnet18" else 1
    b = b or (8 if name == "resnet18" else 16)  # small: the file runs on 2 shared cores
    out = []
    for step in range(steps):
        x = torch.randn(b, channels, 8, 8, generator=g).to(dtype)
        y = torch.randint(0, 10, (b,), generator=g)
        kind = step % 3
        if kind == 0:
            mask = torch.zeros(b, dtype=torch.bool)
        elif kind == 1:
            mask = torch.ones(b, dtype=torch.bool)
        else:  # half and half: BatchNorm at 1x1 (ResNet18's last stage) needs 2+ samples a part
            mask = torch.randperm(b, generator=g) < b // 2
        out.append((x, y, mask))
    return out


def _train(model, opt, batches, scheduler=None):
    for x, y, mask in batches:
        reference.mixed_step(model, opt, x, y, mask)
        if scheduler is not None:
            scheduler.step()


def _pair(name, dtype, **kw):
    m_ref = _model(name, dtype)
    m_fast = copy.deepcopy(m_ref)
    ref = reference.SAM(m_ref.parameters(), torch.optim.SGD, **kw)
    fast = SharpBalanceSAM(m_fast.parameters(), **kw)
    return m_ref, ref, m_fast, fast


def _momenta(opt, model):
    base = opt.base_optimizer if isinstance(opt, reference.SAM) else opt
    return [base.state[p]["momentum_buffer"] for p in model.parameters()]


# ----------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mlp"])
def test_parity_float64_bit_exact(name):
    m_ref, ref, m_fast, fast = _pair(name, torch.float64, **RELEASE)
    batches = _batches(name, 25, torch.float64)
    _train(m_ref, ref, batches)
    _train(m_fast, fast, batches)
    for a, b in zip(m_fast.parameters(), m_ref.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(_momenta(fast, m_fast), _momenta(ref, m_ref), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(m_fast.buffers(), m_ref.buffers(), strict=True):  # BatchNorm statistics
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["resnet18", "mlp"])
def test_parity_float32_within_1e6(name):
    m_ref, ref, m_fast, fast = _pair(name, torch.float32, **RELEASE)
    batches = _batches(name, 25, torch.float32)
    _train(m_ref, ref, batches)
    _train(m_fast, fast, batches)
    pairs = list(zip(m_fast.parameters(), m_ref.parameters(), strict=True))
    pairs += list(zip(_momenta(fast, m_fast), _momenta(ref, m_ref), strict=True))
    for a, b in pairs:
        assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() <= 1e-6


@pytest.mark.parametrize("name", ["resnet18", "mlp"])
def test_parity_bfloat16_within_plain_error(name):
    # fast bf16 vs the float64 run must be within 2x the error of the plain bf16 reference
    m_exact = _model(name, torch.float64)
    m_plain = copy.deepcopy(m_exact).to(torch.bfloat16)
    m_fast = copy.deepcopy(m_plain)
    kw = dict(lr=0.005, momentum=0.9, weight_decay=5e-4, rho=0.05)
    exact = reference.SAM(m_exact.parameters(), torch.optim.SGD, **kw)
    plain = reference.SAM(m_plain.parameters(), torch.optim.SGD, **kw)
    fast = SharpBalanceSAM(m_fast.parameters(), **kw)
    batches = _batches(name, 25, torch.float64)
    _train(m_exact, exact, batches)
    _train(m_plain, plain, [(x.bfloat16(), y, m) for x, y, m in batches])
    _train(m_fast, fast, [(x.bfloat16(), y, m) for x, y, m in batches])
    # over the whole model: after 25 bf16 steps the trajectories have drifted apart through the
    # (shared) bf16 forward/backward, so a single small tensor's error is a coin toss
    flat = lambda m: torch.cat([p.detach().double().flatten() for p in m.parameters()])  # noqa: E731
    exact_w = flat(m_exact)
    assert_within_plain_error(flat(m_fast), flat(m_plain), exact_w, atol=1e-3 * exact_w.abs().max().item())
    rms = lambda m: (flat(m) - exact_w).norm().item()  # noqa: E731
    assert rms(m_fast) <= 2 * rms(m_plain)


def test_param_groups_nesterov_dampening_asam_and_scheduler_bit_exact():
    groups = lambda m: [  # noqa: E731
        dict(
            params=list(m.net[0].parameters()),
            lr=0.03,
            momentum=0.9,
            nesterov=True,
            weight_decay=1e-3,
            rho=0.1,
            adaptive=True,
        ),
        dict(
            params=[p for n, p in m.named_parameters() if not n.startswith("net.0.")],
            momentum=0.5,
            dampening=0.2,
            weight_decay=0.0,
            rho=0.3,
        ),
    ]
    m_ref = _model("mlp")
    m_fast = copy.deepcopy(m_ref)
    ref = reference.SAM(groups(m_ref), torch.optim.SGD, lr=0.05, rho=0.05)
    fast = SharpBalanceSAM(groups(m_fast), lr=0.05, rho=0.05)
    s_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    s_fast = torch.optim.lr_scheduler.StepLR(fast, step_size=2, gamma=0.5)
    batches = _batches("mlp", 9, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        _train(m_ref, ref, batches, s_ref)
        _train(m_fast, fast, batches, s_fast)
    assert fast.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.03 * 0.5**4
    for a, b in zip(m_fast.parameters(), m_ref.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(_momenta(fast, m_fast), _momenta(ref, m_ref), strict=True):
        assert torch.equal(a, b)


def test_global_norm_mode_matches_within_rounding():
    # grad_norm="global": one fused sum of squares instead of the norm of per-tensor norms;
    # same SAM step up to the summation order (float64: ~1e-15 relative per step)
    def groups(m):
        return [
            dict(params=list(m.net[0].parameters()), adaptive=True),
            dict(params=[p for n, p in m.named_parameters() if not n.startswith("net.0.")]),
        ]

    m_ref = _model("mlp")
    m_fast = copy.deepcopy(m_ref)
    ref = reference.SAM(groups(m_ref), torch.optim.SGD, **RELEASE)
    fast = SharpBalanceSAM(groups(m_fast), **RELEASE, grad_norm="global")
    batches = _batches("mlp", 6, torch.float64)
    _train(m_ref, ref, batches)
    _train(m_fast, fast, batches)
    for a, b in zip(m_fast.parameters(), m_ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_lr_as_a_tensor_follows_the_scheduler_in_place():
    m_ref = _model("mlp")
    m_fast = copy.deepcopy(m_ref)
    ref = reference.SAM(m_ref.parameters(), torch.optim.SGD, **RELEASE)
    lr = torch.tensor(RELEASE["lr"], dtype=torch.float64)
    fast = SharpBalanceSAM(m_fast.parameters(), **dict(RELEASE, lr=lr))
    s_ref = torch.optim.lr_scheduler.ExponentialLR(ref, gamma=0.7)
    s_fast = torch.optim.lr_scheduler.ExponentialLR(fast, gamma=0.7)
    batches = _batches("mlp", 5, torch.float64)
    _train(m_ref, ref, batches, s_ref)
    _train(m_fast, fast, batches, s_fast)
    assert fast.param_groups[0]["lr"] is lr  # filled in place: a captured graph would see it
    for a, b in zip(m_fast.parameters(), m_ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_lr_tensor_on_another_device_is_refused_inside_a_graph_capture(monkeypatch):
    # outside a capture it is copied to the parameters' device each step; inside one the copy
    # cannot be captured, so the step says why instead of failing in the capture
    from sbfast.optim import sharpbalance_sam

    model = _model("mlp").double()
    opt = SharpBalanceSAM(model.parameters(), **dict(RELEASE, lr=torch.tensor(0.1, device="meta")))
    for x, y, _ in _batches("mlp", 1, torch.float64):
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        monkeypatch.setattr(sharpbalance_sam, "is_capturing", lambda device: True)
        with pytest.raises(
            ValueError,
            match=r"param group 0: lr is a tensor on meta, but a CUDA-graph capture needs "
            r"it on the parameters' device cpu \(nothing changed\)",
        ):
            opt.second_step(zero_grad=True)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


def test_step_with_closure_matches_reference():
    m_ref, ref, m_fast, fast = _pair("mlp", torch.float64, **RELEASE)
    for x, y, _ in _batches("mlp", 4, torch.float64):
        for m, opt in ((m_ref, ref), (m_fast, fast)):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            loss = opt.step(lambda m=m, x=x, y=y: F.cross_entropy(m(x), y).backward() or 1.5)
            assert loss == 1.5
    for a, b in zip(m_fast.parameters(), m_ref.parameters(), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------


def test_parameters_are_the_same_objects_in_one_flat_buffer():
    model = _model("resnet18", torch.float32)
    before = list(model.parameters())
    values = [p.detach().clone() for p in before]
    opt = SharpBalanceSAM(model.parameters(), lr=0.1)
    after = list(model.parameters())
    assert all(a is b for a, b in zip(after, before, strict=True))
    assert all(torch.equal(p, v) for p, v in zip(after, values, strict=True))
    flat = opt.flat_buffers()[0]["param"]
    for p in after:
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert p.is_leaf and p._base is None and p.data_ptr() % 64 == 0  # aligned slices
    views = [p.grad for p in after]
    x = torch.randn(4, 3, 8, 8)
    F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
    assert all(p.grad is v for p, v in zip(after, views, strict=True))  # accumulated in place
    assert opt.flat_buffers()[0]["grad"].abs().sum() > 0
    opt.zero_grad()
    assert all(p.grad is v for p, v in zip(after, views, strict=True))
    assert opt.flat_buffers()[0]["grad"].abs().sum() == 0
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})  # copies in place
    assert torch.equal(after[0], values[0] + 1)


def test_zero_grad_set_to_none_gives_reference_semantics_for_params_without_grad():
    # a frozen parameter and one outside the forward: both skipped, as in the reference
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 3)
            self.unused = nn.Linear(3, 3)
            self.a.bias.requires_grad_(False)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    m_ref = Net().double()
    m_fast = copy.deepcopy(m_ref)
    ref = reference.SAM(m_ref.parameters(), torch.optim.SGD, **RELEASE)
    fast = SharpBalanceSAM(m_fast.parameters(), **RELEASE)
    unused_before = m_fast.unused.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        for m, opt in ((m_ref, ref), (m_fast, fast)):
            opt.zero_grad(set_to_none=True)
            if step % 2:
                F.cross_entropy(m(x[:4]), y[:4]).backward()
                opt.normal_step()
                opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.first_step()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.second_step()
    assert torch.equal(m_fast.unused.weight, unused_before)
    for a, b in zip(m_fast.parameters(), m_ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_moving_the_model_after_construction_rebuilds_with_a_warning():
    kw = dict(RELEASE, momentum=0.0)  # torch.optim.SGD's own buffers would stay float32 on .double()
    m_ref = _model("mlp", torch.float32)
    m_fast = copy.deepcopy(m_ref)
    ref = reference.SAM(m_ref.parameters(), torch.optim.SGD, **kw)
    fast = SharpBalanceSAM(m_fast.parameters(), **kw)
    batches = _batches("mlp", 2, torch.float32)
    _train(m_ref, ref, batches)
    _train(m_fast, fast, batches)
    m_ref.double()
    m_fast.double()  # Module.to swaps storages: the flat buffer must follow
    with pytest.warns(RuntimeWarning, match="moved"):
        _train(m_fast, fast, _batches("mlp", 4, torch.float64, seed=9))
    _train(m_ref, ref, _batches("mlp", 4, torch.float64, seed=9))
    assert fast.flat_buffers()[0]["dtype"] == torch.float64
    for a, b in zip(m_fast.parameters(), m_ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_add_param_group_after_construction():
    m_ref = _model("mlp")
    m_fast = copy.deepcopy(m_ref)
    first = lambda m: list(m.net[0].parameters())  # noqa: E731
    rest = lambda m: [p for n, p in m.named_parameters() if not n.startswith("net.0.")]  # noqa: E731
    ref = reference.SAM(first(m_ref), torch.optim.SGD, **RELEASE)
    fast = SharpBalanceSAM(first(m_fast), **RELEASE)
    batches = _batches("mlp", 6, torch.float64)
    _train(m_ref, ref, batches[:3])
    _train(m_fast, fast, batches[:3])
    ref.add_param_group(dict(params=rest(m_ref), lr=0.02))
    fast.add_param_group(dict(params=rest(m_fast), lr=0.02))
    _train(m_ref, ref, batches[3:])
    _train(m_fast, fast, batches[3:])
    for a, b in zip(m_fast.parameters(), m_ref.parameters(), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------


def test_state_dict_round_trip():
    model = _model("mlp")
    opt = SharpBalanceSAM(model.parameters(), **RELEASE)
    batches = _batches("mlp", 7, torch.float64)
    _train(model, opt, batches[:4])
    clone = copy.deepcopy(model)
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd["state"][0]) == {"momentum_buffer"} and sd["param_groups"][0]["rho"] == RELEASE["rho"]
    opt2 = SharpBalanceSAM(clone.parameters(), lr=1.0)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == RELEASE["lr"]
    _train(model, opt, batches[4:])
    _train(clone, opt2, batches[4:])
    for a, b in zip(clone.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_loads_a_reference_sam_state_dict():
    m_ref = _model("mlp")
    ref = reference.SAM(m_ref.parameters(), torch.optim.SGD, **RELEASE)
    batches = _batches("mlp", 7, torch.float64)
    _train(m_ref, ref, batches[:4])
    m_fast = copy.deepcopy(m_ref)
    fast = SharpBalanceSAM(m_fast.parameters(), lr=1.0)
    fast.load_state_dict(copy.deepcopy(ref.state_dict()))
    for a, b in zip(_momenta(fast, m_fast), _momenta(ref, m_ref), strict=True):
        assert torch.equal(a, b)
    _train(m_ref, ref, batches[4:])
    _train(m_fast, fast, batches[4:])
    for a, b in zip(m_fast.parameters(), m_ref.parameters(), strict=True):
        assert torch.equal(a, b)
    # and the other way: torch.optim.SGD takes ours
    sgd = torch.optim.SGD(m_fast.parameters(), lr=1.0, momentum=0.9)
    sgd.load_state_dict(
        {
            "state": fast.state_dict()["state"],
            "param_groups": [dict(sgd.param_groups[0], params=list(range(len(list(m_fast.parameters())))))],
        }
    )
    assert torch.equal(sgd.state[next(m_fast.parameters())]["momentum_buffer"], _momenta(fast, m_fast)[0])


# ----------------------------------------------------------------------------------------
# Non-finite gradients, host syncs, mixed precision
# ----------------------------------------------------------------------------------------


def _grads_at(model, x, y):
    F.cross_entropy(model(x), y).backward()


def test_nonfinite_error_mode_raises_before_any_change():
    model = _model("mlp")
    opt = SharpBalanceSAM(model.parameters(), **RELEASE)
    x, y, _ = _batches("mlp", 1, torch.float64)[0]
    _train(model, opt, _batches("mlp", 2, torch.float64))
    w = [p.detach().clone() for p in model.parameters()]
    bufs = [b.clone() for b in _momenta(opt, model)]
    opt.zero_grad()
    _grads_at(model, x, y)
    next(model.parameters()).grad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        opt.first_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))
    opt.zero_grad()
    _grads_at(model, x, y)
    opt.first_step(zero_grad=True)
    _grads_at(model, x, y)
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="restored"):
        opt.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))  # w, not w + e
    assert all(torch.equal(a, b) for a, b in zip(_momenta(opt, model), bufs, strict=True))
    opt.zero_grad()
    _grads_at(model, x, y)
    opt.normal_step(zero_grad=True)
    opt._layout.buckets[0].grads[opt._st.normal_buf][0] = float("nan")
    with pytest.raises(ValueError, match="no update"):
        opt.third_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))
    _train(model, opt, _batches("mlp", 2, torch.float64))  # usable afterwards


def test_found_nonfinite_is_set_by_a_nonfinite_first_norm_and_cleared_when_the_step_ends():
    model = _model("mlp")
    opt = SharpBalanceSAM(model.parameters(), **RELEASE, nonfinite="skip")
    x, y, _ = _batches("mlp", 1, torch.float64)[0]
    flag = opt.found_nonfinite
    assert flag.shape == () and flag.dtype == torch.float32 and flag.device == next(model.parameters()).device
    for poison in (True, False, True):
        w = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        _grads_at(model, x, y)
        if poison:
            next(model.parameters()).grad[0, 0] = float("inf")
        opt.first_step(zero_grad=True)
        assert bool(opt.found_nonfinite > 0) is poison
        _grads_at(model, x, y)
        opt.second_step(zero_grad=True)
        assert opt.found_nonfinite.item() == 0
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True)) is poison
    assert opt.skipped_steps.item() == 2


def test_restore_goes_back_to_w_bit_for_bit_and_leaves_no_trace():
    model = _model("resnet18")
    twin = copy.deepcopy(model)
    opt = SharpBalanceSAM(model.parameters(), **RELEASE, bn_freeze=model)
    other = SharpBalanceSAM(twin.parameters(), **RELEASE, bn_freeze=twin)
    batches = _batches("resnet18", 6, torch.float64)
    _train(model, opt, batches[:3])  # momentum started
    _train(twin, other, batches[:3])
    x, y, _ = batches[3]
    for o, m in ((opt, model), (other, twin)):  # g_n kept, and g at w
        o.zero_grad()
        _grads_at(m, x, y)
        o.normal_step(zero_grad=True)
        _grads_at(m, x, y)
    w = [p.detach().clone() for p in model.parameters()]
    stats = [b.clone() for b in model.buffers()]
    opt.first_step(zero_grad=True)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))
    _grads_at(model, x, y)  # the forward at w + e moves the running statistics
    assert not all(torch.equal(a, b) for a, b in zip(model.buffers(), stats, strict=True))
    opt.restore(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), stats, strict=True))
    assert all(not p.grad.any() for p in model.parameters())
    assert opt.has_normal  # g_n stays for the coming step
    opt.third_step(zero_grad=True)  # the kept g_n alone: as the twin's step that drops g
    other.zero_grad()
    other.third_step(zero_grad=True)
    _train(model, opt, batches[4:])  # a later first_step works
    _train(twin, other, batches[4:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_momenta(opt, model), _momenta(other, twin), strict=True))


def test_restore_when_not_perturbed_is_a_no_op():
    model = _model("mlp")
    opt = SharpBalanceSAM(model.parameters(), **RELEASE)
    x, y, _ = _batches("mlp", 1, torch.float64)[0]
    opt.zero_grad()
    _grads_at(model, x, y)
    opt.normal_step(zero_grad=True)
    _grads_at(model, x, y)
    w = [p.detach().clone() for p in model.parameters()]
    g = [p.grad.clone() for p in model.parameters()]
    opt.restore()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))
    assert all(torch.equal(p.grad, q) for p, q in zip(model.parameters(), g, strict=True))
    assert opt.has_normal
    opt.restore(zero_grad=True)  # zeroes the gradients all the same
    assert all(not p.grad.any() for p in model.parameters()) and opt.has_normal
    _grads_at(model, x, y)
    opt.first_step(zero_grad=True)
    _grads_at(model, x, y)
    opt.second_step(zero_grad=True)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))


def test_restore_after_a_nonfinite_first_norm_clears_the_skip_flag():
    model = _model("mlp")
    opt = SharpBalanceSAM(model.parameters(), **RELEASE, nonfinite="skip")
    x, y, _ = _batches("mlp", 1, torch.float64)[0]
    w = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    _grads_at(model, x, y)
    next(model.parameters()).grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True)
    assert opt.found_nonfinite.item() > 0
    opt.restore()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))
    assert opt.found_nonfinite.item() == 0
    _grads_at(model, x, y)
    opt.first_step(zero_grad=True)
    _grads_at(model, x, y)
    opt.second_step(zero_grad=True)  # not skipped: the dropped step left no flag behind
    assert opt.skipped_steps.item() == 0
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))


@pytest.fixture
def no_host_sync(monkeypatch):
    """Make every host read of a tensor value raise (CPU stand-in for cuda sync debug mode)."""

    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name} called in a step")

        return raiser

    def install():
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, forbid(name))

    return install


def test_skip_mode_is_device_side_without_host_sync(no_host_sync):
    model = _model("resnet18", torch.float32)
    opt = SharpBalanceSAM(model.parameters(), **RELEASE, nonfinite="skip")
    batches = _batches("resnet18", 3, torch.float32)
    _train(model, opt, batches)  # warm: buffers initialised
    x, y, mask = batches[2]
    w = [p.detach().clone() for p in model.parameters()]
    bufs = [b.clone() for b in _momenta(opt, model)]
    first_param = next(model.parameters())

    def step(poison_first, poison_second, poison_normal):
        opt.zero_grad()
        F.cross_entropy(model(x[~mask]), y[~mask]).backward()
        if poison_normal:
            first_param.grad[0].fill_(float("nan"))
        opt.normal_step(zero_grad=True)
        F.cross_entropy(model(x[mask]), y[mask]).backward()
        if poison_first:
            first_param.grad[0].fill_(float("inf"))
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x[mask]), y[mask]).backward()
        if poison_second:
            first_param.grad[0].fill_(float("nan"))
        opt.second_step(zero_grad=True)

    no_host_sync()
    step(True, False, False)
    step(False, True, False)
    step(False, False, True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_momenta(opt, model), bufs, strict=True))
    step(False, False, False)  # a good step still updates
    monkeypatch_free = [p.detach() for p in model.parameters()]
    assert not all(torch.equal(p, q) for p, q in zip(monkeypatch_free, w, strict=True))
    assert torch.equal(opt.skipped_steps, torch.tensor(3))


def test_grad_scaler_across_both_passes():
    # fp16 autocast + GradScaler (fp32 master weights) equals the unscaled run; an overflow skips
    # the step device-side, is counted, and makes the scaler back off
    m_plain = _model("mlp", torch.float32)
    m_amp = copy.deepcopy(m_plain)
    plain = SharpBalanceSAM(m_plain.parameters(), **RELEASE)
    amp = SharpBalanceSAM(m_amp.parameters(), **RELEASE)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)

    def loss_of(m, x, y, dtype):
        with torch.autocast("cpu", dtype=dtype):
            return F.cross_entropy(m(x), y)

    for x, y, mask in _batches("mlp", 6, torch.float32):
        for m, opt, s in ((m_plain, plain, None), (m_amp, amp, scaler)):
            scale = (lambda t: t) if s is None else s.scale
            opt.zero_grad()
            if (~mask).any():
                scale(loss_of(m, x[~mask], y[~mask], torch.float16) * (~mask).float().mean()).backward()
                opt.normal_step(zero_grad=True)
            if mask.any():
                scale(loss_of(m, x[mask], y[mask], torch.float16)).backward()
                opt.first_step(zero_grad=True, grad_scaler=s)
                scale(loss_of(m, x[mask], y[mask], torch.float16) * mask.float().mean()).backward()
                opt.second_step(zero_grad=True, grad_scaler=s)
            else:
                opt.third_step(zero_grad=True, grad_scaler=s)
            if s is not None:
                s.update()
    for a, b in zip(m_amp.parameters(), m_plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp16 rounding of unscaled grads
    assert amp.skipped_steps.item() == 0
    w = [p.detach().clone() for p in m_amp.parameters()]
    x, y, _ = _batches("mlp", 1, torch.float32)[0]
    scale_before = scaler.get_scale()
    amp.zero_grad()
    scaler.scale(loss_of(m_amp, x, y, torch.float16)).backward()
    next(m_amp.parameters()).grad[0, 0] = float("inf")  # an fp16 overflow in the first pass
    amp.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(loss_of(m_amp, x, y, torch.float16)).backward()
    amp.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(m_amp.parameters(), w, strict=True))
    assert amp.skipped_steps.item() == 1 and scaler.get_scale() == scale_before * 0.5


def test_bf16_autocast_matches_reference():
    m_ref, ref, m_fast, fast = _pair("mlp", torch.float32, **RELEASE)
    for x, y, mask in _batches("mlp", 6, torch.float32):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference.mixed_step(m_ref, ref, x, y, mask)
            reference.mixed_step(m_fast, fast, x, y, mask)
    for a, b in zip(m_fast.parameters(), m_ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bn_freeze_keeps_statistics_of_the_perturbed_pass_out():
    model = _model("resnet18", torch.float64)
    twin = copy.deepcopy(model)
    opt = SharpBalanceSAM(model.parameters(), **RELEASE, bn_freeze=model)
    x, y, _ = _batches("resnet18", 1, torch.float64)[0]
    opt.zero_grad()
    _grads_at(model, x, y)
    twin(x)  # the statistics after the unperturbed forward only
    opt.first_step(zero_grad=True)
    _grads_at(model, x, y)
    opt.second_step(zero_grad=True)
    for a, b in zip(model.buffers(), twin.buffers(), strict=True):
        assert torch.equal(a, b)
    m_ref, ref, m_fast, fast = _pair("resnet18", torch.float64, **RELEASE)  # off by default: release
    batches = _batches("resnet18", 2, torch.float64)
    _train(m_ref, ref, batches)
    _train(m_fast, fast, batches)
    for a, b in zip(m_fast.buffers(), m_ref.buffers(), strict=True):
        assert torch.equal(a, b)


def test_gradient_accumulation_over_micro_batches():
    model = _model("mlp")
    whole = copy.deepcopy(model)
    opt = SharpBalanceSAM(model.parameters(), **RELEASE)
    opt_whole = SharpBalanceSAM(whole.parameters(), **RELEASE)
    for x, y, mask in _batches("mlp", 6, torch.float64):
        n = mask.numel()
        for m, o, parts in ((model, opt, 2), (whole, opt_whole, 1)):
            xs, ys, ms = x.chunk(parts), y.chunk(parts), mask.chunk(parts)
            o.zero_grad()
            for xi, yi, mi in zip(xs, ys, ms, strict=True):
                if (~mi).any():
                    F.cross_entropy(m(xi[~mi]), yi[~mi], reduction="sum").div(n).backward()
            if (~mask).any():
                o.normal_step(zero_grad=True)
            if mask.any():
                for xi, yi, mi in zip(xs, ys, ms, strict=True):
                    if mi.any():
                        F.cross_entropy(m(xi[mi]), yi[mi], reduction="sum").backward()
                o.first_step(zero_grad=True)
                for xi, yi, mi in zip(xs, ys, ms, strict=True):
                    if mi.any():
                        F.cross_entropy(m(xi[mi]), yi[mi], reduction="sum").div(n).backward()
                o.second_step(zero_grad=True)
            else:
                o.third_step(zero_grad=True)
    for a, b in zip(model.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------------------
# torch.compile and CUDA graphs
# ----------------------------------------------------------------------------------------


def _compiled_step(model, opt, x, y):
    """A mixed step with static shapes: odd samples normal, even samples SAM."""
    opt.zero_grad()
    F.cross_entropy(model(x[1::2]), y[1::2]).mul(0.5).backward()
    opt.normal_step(zero_grad=True)
    F.cross_entropy(model(x[::2]), y[::2]).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x[::2]), y[::2]).mul(0.5).backward()
    opt.second_step(zero_grad=True)


def test_torch_compile_of_a_training_step_matches_eager():
    torch._dynamo.reset()
    m_eager = _model("mlp", torch.float32)
    m_comp = copy.deepcopy(m_eager)
    kw = dict(RELEASE, nonfinite="skip")
    o_eager = SharpBalanceSAM(m_eager.parameters(), **kw)
    o_comp = SharpBalanceSAM(m_comp.parameters(), **kw)
    step = torch.compile(_compiled_step, backend="aot_eager")
    for x, y, _ in _batches("mlp", 3, torch.float32):
        _compiled_step(m_eager, o_eager, x, y)
        step(m_comp, o_comp, x, y)
    for a, b in zip(m_comp.parameters(), m_eager.parameters(), strict=True):
        assert torch.equal(a, b)
    o_comp.state_dict()  # self.state catches up outside compiled code
    for a, b in zip(_momenta(o_comp, m_comp), _momenta(o_eager, m_eager), strict=True):
        assert torch.equal(a, b)
    # graph breaks: only backward() (not traced) and the phase boundaries, never a host sync
    explain = torch._dynamo.explain(_compiled_step)(m_comp, o_comp, x, y)
    reasons = [r.reason for r in explain.break_reasons]
    assert reasons and all("backward" in r or "graph_break()" in r for r in reasons), reasons


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_graph_capture_of_a_whole_step_and_no_sync():
    m_eager = _model("mlp", torch.float32).cuda()
    m_graph = copy.deepcopy(m_eager)
    kw = dict(RELEASE, lr=torch.tensor(RELEASE["lr"], device="cuda"), nonfinite="skip")
    o_eager = SharpBalanceSAM(m_eager.parameters(), **kw)
    o_graph = SharpBalanceSAM(m_graph.parameters(), **dict(kw, lr=kw["lr"].clone()))
    batches = [(x.cuda(), y.cuda(), None) for x, y, _ in _batches("mlp", 6, torch.float32)]
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in a step raises
    try:
        with torch.cuda.stream(side):  # warm up on a side stream, as CUDA graphs need
            for x, y, _ in batches[:2]:
                _compiled_step(m_eager, o_eager, x, y)
                static_x.copy_(x)
                static_y.copy_(y)
                _compiled_step(m_graph, o_graph, static_x, static_y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _compiled_step(m_graph, o_graph, static_x, static_y)
    for x, y, _ in batches[2:]:
        _compiled_step(m_eager, o_eager, x, y)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    for a, b in zip(m_graph.parameters(), m_eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def test_bad_hyperparameters_name_the_problem():
    params = list(_model("mlp").parameters())
    with pytest.raises(ValueError, match="rho"):
        SharpBalanceSAM(params, lr=0.1, rho=-0.1)
    with pytest.raises(ValueError, match="lr"):
        SharpBalanceSAM(params, lr=-0.1)
    with pytest.raises(ValueError, match="nesterov"):
        SharpBalanceSAM(params, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="nonfinite"):
        SharpBalanceSAM(params, lr=0.1, nonfinite="ignore")
    with pytest.raises(ValueError, match="rho"):
        SharpBalanceSAM([dict(params=params[:2], rho=-1.0)], lr=0.1)
    opt = SharpBalanceSAM(params[:2], lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group(dict(params=params[2:], rho=float("nan")))
    with pytest.raises(ValueError, match="empty"):
        SharpBalanceSAM([], lr=0.1)


def test_bad_parameters_and_gradients():
    with pytest.raises(ValueError, match="one device"):
        SharpBalanceSAM([nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3, device="meta"))], lr=0.1)
    with pytest.raises(ValueError, match="floating"):
        SharpBalanceSAM([torch.zeros(3, dtype=torch.long)], lr=0.1)
    with pytest.raises(ValueError, match="dense"):
        SharpBalanceSAM([nn.Parameter(torch.zeros(4, 6)[:, ::2])], lr=0.1)
    shared = torch.zeros(10)
    with pytest.raises(ValueError, match="shares its storage"):
        SharpBalanceSAM([nn.Parameter(shared[:5])], lr=0.1)

    emb = nn.Embedding(10, 4, sparse=True)
    opt = SharpBalanceSAM(emb.parameters(), lr=0.1)
    before = emb.weight.detach().clone()
    opt.zero_grad(set_to_none=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.first_step()
    assert torch.equal(emb.weight, before)

    model = _model("mlp")
    opt = SharpBalanceSAM(model.parameters(), lr=0.1)
    opt.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        opt.first_step()
    x, y, _ = _batches("mlp", 1, torch.float64)[0]
    opt.zero_grad()
    _grads_at(model, x, y)
    opt.param_groups[0]["lr"] = -1.0  # e.g. a broken schedule: caught before any update
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="lr"):
        opt.third_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))
    opt.first_step(zero_grad=True)
    _grads_at(model, x, y)
    perturbed = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="still pending"):
        opt.second_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), perturbed, strict=True))
    opt.param_groups[0]["lr"] = 0.0  # fixed: the pending SAM step completes (lr 0: back to w)
    opt.second_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))


def test_phase_order_errors():
    model = _model("mlp")
    opt = SharpBalanceSAM(model.parameters(), lr=0.1)
    x, y, _ = _batches("mlp", 1, torch.float64)[0]
    _grads_at(model, x, y)
    opt.first_step()
    with pytest.raises(ValueError, match="twice"):
        opt.first_step()
    with pytest.raises(ValueError, match="third_step after first_step"):
        opt.third_step()
    with pytest.raises(ValueError, match="normal_step after first_step"):
        opt.normal_step()
    with pytest.raises(ValueError, match="closure"):
        SharpBalanceSAM(_model("mlp").parameters(), lr=0.1).step()
    opt.second_step()


# ----------------------------------------------------------------------------------------
# Faults: silent wrong results and unrecoverable states that the optimizer now refuses
# ----------------------------------------------------------------------------------------


def test_skipped_step_does_not_start_momentum_through_a_state_dict_round_trip():
    # skip mode: a step skipped on the device leaves the momentum buffers unstarted. The state
    # dict must say so (no momentum_buffer entry, torch.optim layout): a zero buffer counted as
    # started would be damped (buf = m * 0 + (1 - dampening) * d) instead of set to d.
    kw = dict(RELEASE, dampening=0.5, nonfinite="skip")
    model = _model("mlp")
    twin = copy.deepcopy(model)
    opt = SharpBalanceSAM(model.parameters(), **kw)
    batches = _batches("mlp", 5, torch.float64)
    x, y, _ = batches[0]
    opt.zero_grad()
    _grads_at(model, x, y)
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.first_step(zero_grad=True)
    _grads_at(model, x, y)
    opt.second_step(zero_grad=True)
    assert opt.skipped_steps.item() == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))
    sd = copy.deepcopy(opt.state_dict())
    assert sd["state"] == {}  # nothing started
    resumed = copy.deepcopy(model)
    opt_resumed = SharpBalanceSAM(resumed.parameters(), lr=1.0, nonfinite="skip")
    opt_resumed.load_state_dict(sd)
    # the reference that never saw the skipped step: fresh SGD state, as the state dict says
    ref = reference.SAM(twin.parameters(), torch.optim.SGD, **{k: v for k, v in kw.items() if k != "nonfinite"})
    _train(model, opt, batches[1:])
    _train(resumed, opt_resumed, batches[1:])
    _train(twin, ref, batches[1:])
    for a, b, c in zip(resumed.parameters(), model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer"}  # started by the good steps


def test_duplicate_parameters_are_refused():
    params = list(_model("mlp").parameters())
    with pytest.raises(ValueError, match="duplicate parameters.*entries 0 and 2"):
        SharpBalanceSAM([params[0], params[1], params[0]], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch.optim's own check
        SharpBalanceSAM([dict(params=params[:2]), dict(params=params[1:3])], lr=0.1)
    opt = SharpBalanceSAM(params[:2], lr=0.1)
    with pytest.raises(ValueError, match="duplicate parameters"):
        opt.add_param_group(dict(params=iter([params[2], params[2]])))
    assert len(opt.param_groups) == 1  # nothing added
    opt.add_param_group(dict(params=iter(params[2:])))  # a generator is consumed once, as a list
    assert len(opt.param_groups[1]["params"]) == len(params) - 2


def test_moving_the_model_mid_step_restores_w_and_stays_usable():
    kw = dict(RELEASE, momentum=0.0)  # torch.optim.SGD's own buffers would stay float32 on .double()
    model = _model("mlp", torch.float32)
    opt = SharpBalanceSAM(model.parameters(), **kw)
    _train(model, opt, _batches("mlp", 2, torch.float32))
    w = [p.detach().clone() for p in model.parameters()]
    x, y, _ = _batches("mlp", 1, torch.float32, seed=5)[0]
    opt.zero_grad()
    _grads_at(model, x, y)
    opt.first_step(zero_grad=True)  # the parameters are at w + e
    model.double()
    _grads_at(model, x.double(), y)
    with pytest.raises(RuntimeError, match="moved.*back at w"):
        opt.second_step()
    for p, q in zip(model.parameters(), w, strict=True):
        assert p.dtype == torch.float64 and torch.equal(p, q.double())  # w, bit for bit (exact widening)
    twin = copy.deepcopy(model)
    ref = reference.SAM(twin.parameters(), torch.optim.SGD, **kw)
    batches = _batches("mlp", 3, torch.float64, seed=7)
    _train(model, opt, batches)  # no warning: the layout was rebuilt with the error
    _train(twin, ref, batches)
    assert opt.flat_buffers()[0]["dtype"] == torch.float64
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_meta_parameters_are_refused_at_construction():
    with pytest.raises(ValueError, match="meta device"):
        SharpBalanceSAM(nn.Linear(3, 2, device="meta").parameters(), lr=0.1)
