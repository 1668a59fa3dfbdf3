"""SharpBalanceSAM under misuse and faults: a phase with no backward, a state dict that does not
fit, hyperparameters broken after construction, a non-finite batch and the BatchNorm statistics
it would leave, the GradScaler through its public API only, the op layer, and what
``torch.save`` of one layer writes. Each is checked to change nothing it should not."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sbfast import ops, reference
from sbfast.optim import SharpBalanceSAM

RELEASE = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, rho=0.2)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).double()


def _data(n: int = 9, features: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()


def _values(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Equal bit for bit, NaN included."""
    return all(
        torch.equal(u.isnan(), v.isnan()) and torch.equal(u.nan_to_num(), v.nan_to_num())
        for u, v in zip(a, b, strict=True)
    )


@pytest.fixture
def no_host_sync(monkeypatch):
    """Make every host read of a tensor value raise (CPU stand-in for cuda sync debug mode)."""

    def install():
        def forbid(name):
            def raiser(self, *args, **kwargs):
                raise AssertionError(f"host synchronisation: Tensor.{name} called in a step")

            return raiser

        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, forbid(name))

    return install


# ---- a phase with no backward ------------------------------------------------------------


@pytest.mark.parametrize("nonfinite", ["error", "skip"])
def test_first_step_without_a_backward_is_refused_like_the_reference(nonfinite):
    model = _mlp()
    x, y = _data()
    opt = SharpBalanceSAM(model.parameters(), **RELEASE, nonfinite=nonfinite)
    ref_model = copy.deepcopy(model)
    ref = reference.SAM(ref_model.parameters(), torch.optim.SGD, **RELEASE)
    for o in (opt, ref):  # one full step first: momentum and gradients exist
        o.zero_grad()
        _backward(model if o is opt else ref_model, x, y)
        o.first_step(zero_grad=True)
        _backward(model if o is opt else ref_model, x, y)
        o.second_step(zero_grad=True)
    # the case: zero_grad(), then first_step() with no backward
    before = _values(model)
    opt.zero_grad()
    with pytest.raises(ValueError, match="no backward since the last zero_grad"):
        opt.first_step()
    ref.zero_grad()
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        ref.first_step()
    assert _same(_values(model), before) and not opt.has_normal
    # step(closure) likewise, before the closure runs
    ran = []
    with pytest.raises(ValueError, match="no backward since the last zero_grad"):
        opt.step(lambda: ran.append(1))
    assert not ran and _same(_values(model), before)
    # after a backward the step goes through; a normal_step(zero_grad=True) zeroes again
    _backward(model, x, y)
    opt.normal_step(zero_grad=True)
    with pytest.raises(ValueError, match="no backward"):
        opt.first_step()
    _backward(model, x, y)
    opt.first_step(zero_grad=True)
    _backward(model, x, y)
    opt.second_step(zero_grad=True)
    assert not _same(_values(model), before)


def test_a_step_that_leaves_the_gradient_sum_in_grad_counts_as_a_backward():
    """normal_step(zero_grad=True), then second_step(zero_grad=False) with no SAM pass: the fused
    update writes g' + g_n into .grad (the reference leaves that there too), so a first_step that
    follows takes it like the reference, instead of refusing it as the zeros of zero_grad."""
    model = _mlp()
    x, y = _data()
    opt = SharpBalanceSAM(model.parameters(), **RELEASE)
    ref_model = copy.deepcopy(model)
    ref = reference.SAM(ref_model.parameters(), torch.optim.SGD, **RELEASE)
    for o, m in ((opt, model), (ref, ref_model)):
        o.zero_grad()
        _backward(m, x, y)
        o.normal_step(zero_grad=True)
        o.second_step(zero_grad=False)
    assert _same([p.grad for p in model.parameters()], [p.grad for p in ref_model.parameters()])
    assert any(bool(p.grad.any()) for p in model.parameters())
    opt.first_step(zero_grad=True)
    ref.first_step(zero_grad=True)
    assert _same(_values(model), _values(ref_model))


def test_mark_gradients_ready_takes_zero_gradients_on_purpose(no_host_sync):
    model = _mlp()
    opt = SharpBalanceSAM(model.parameters(), **RELEASE, nonfinite="skip")
    opt.zero_grad()
    before = _values(model)
    no_host_sync()  # the check reads version counters, never the device
    with pytest.raises(ValueError, match="no backward"):
        opt.first_step()
    opt.mark_gradients_ready()  # e.g. a data-parallel rank whose slice was empty
    opt.first_step(zero_grad=True)
    opt.mark_gradients_ready()
    opt.second_step(zero_grad=True)
    # zero gradients: e = 0, then weight decay only (momentum starts from it)
    assert not _same(_values(model), before)


def test_gradients_written_in_place_count_as_a_backward():
    model = _mlp()
    opt = SharpBalanceSAM(model.parameters(), lr=0.1)
    opt.zero_grad()
    for p in model.parameters():
        p.grad.add_(1.0)  # a hand-made gradient, written into the views
    opt.first_step(zero_grad=True)
    _backward(model, *_data())
    opt.second_step()


# ---- load_state_dict ---------------------------------------------------------------------


def _state(opt: SharpBalanceSAM) -> tuple:
    sd = opt.state_dict()
    buffers = {k: v["momentum_buffer"].clone() for k, v in sd["state"].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return buffers, groups


def _trained_opt(model: nn.Module, lr: float = 0.05) -> SharpBalanceSAM:
    opt = SharpBalanceSAM(model.parameters(), **{**RELEASE, "lr": lr})
    x, y = _data(features=model[0].in_features)
    opt.zero_grad()
    _backward(model, x, y)
    opt.third_step(zero_grad=True)
    return opt


def test_load_state_dict_of_other_shapes_is_refused_before_anything_changes():
    model = _mlp()
    opt = _trained_opt(model)
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()  # same count, other shapes
    foreign = _trained_opt(other, lr=0.7).state_dict()
    foreign["param_groups"][0]["momentum"] = 0.5
    before = _state(opt)
    with pytest.raises(ValueError, match=r"momentum_buffer of parameter 0 has shape \(5, 4\), the parameter \(7, 6\)"):
        opt.load_state_dict(copy.deepcopy(foreign))
    after = _state(opt)
    assert after[1] == before[1]  # lr and momentum not replaced
    assert after[0].keys() == before[0].keys() and all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    x, y = _data()
    _backward(model, x, y)
    opt.third_step()  # still usable


@pytest.mark.parametrize(
    "spoil,match",
    [
        (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "2 param groups, this optimizer 1"),
        (lambda sd: sd["param_groups"][0]["params"].pop(), "param group 0 has 3 parameters in the state dict, 4 here"),
        (lambda sd: sd["state"][0].update(momentum_buffer=[1.0]), "momentum_buffer of parameter 0 is list"),
        (lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(7, 6, dtype=torch.int64)), "torch.int64"),
        (lambda sd: sd["state"].update({9: {"momentum_buffer": torch.zeros(3)}}), "state entry 9 names no parameter"),
        (lambda sd: sd["param_groups"][0].update(lr=float("nan")), "lr must be a finite float"),
        (lambda sd: sd.pop("param_groups"), "expected an optimizer state dict"),
    ],
)
def test_load_state_dict_checks_everything_first(spoil, match):
    model = _mlp()
    opt = _trained_opt(model)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 0.3  # would be loaded with the rest
    spoil(sd)
    before = _state(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = _state(opt)
    assert after[1] == before[1] and all(torch.equal(after[0][k], before[0][k]) for k in before[0])


# ---- hyperparameters set after construction ----------------------------------------------


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("weight_decay", float("nan"), "param group 0: weight_decay must be a finite float >= 0, got nan"),
        ("momentum", -1, "param group 0: momentum must be a finite float >= 0, got -1"),
        ("dampening", float("inf"), "param group 0: dampening must be a finite float, got inf"),
        ("nesterov", "yes", "param group 0: nesterov must be a bool"),
    ],
)
@pytest.mark.parametrize("phase", ["second_step", "third_step"])
def test_a_hyperparameter_broken_after_construction_is_refused_at_the_next_step(key, value, match, phase):
    model = _mlp()
    x, y = _data()
    opt = SharpBalanceSAM(model.parameters(), **RELEASE)
    opt.zero_grad()
    _backward(model, x, y)
    if phase == "second_step":
        opt.first_step(zero_grad=True)
        _backward(model, x, y)
    good = opt.param_groups[0][key]
    opt.param_groups[0][key] = value
    before = _values(model)
    with pytest.raises(ValueError, match=match + r".*\(nothing changed; the step is still pending\)"):
        getattr(opt, phase)()
    assert _same(_values(model), before)  # at w + e still, when it was
    opt.param_groups[0][key] = good  # fixed: the pending step completes
    getattr(opt, phase)()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_broken_rho_is_refused_by_first_step():
    model = _mlp()
    opt = SharpBalanceSAM(model.parameters(), **RELEASE)
    opt.zero_grad()
    _backward(model, *_data())
    opt.param_groups[0]["rho"] = float("nan")
    before = _values(model)
    with pytest.raises(ValueError, match="param group 0: rho must be a finite float >= 0, got nan"):
        opt.first_step()
    assert _same(_values(model), before)


# ---- a non-finite batch and BatchNorm's statistics ---------------------------------------


def _bn_step(model, opt, x, y, kind):
    opt.zero_grad()
    _backward(model, x, y)
    if kind == "sam":
        opt.first_step(zero_grad=True)
        _backward(model, x, y)
        opt.second_step(zero_grad=True)
    else:
        opt.third_step(zero_grad=True)


@pytest.mark.parametrize("kind", ["sam", "sgd"])
@pytest.mark.parametrize("guard", ["bn_freeze", "bn_guard"])
def test_a_skipped_step_keeps_the_batchnorm_statistics(kind, guard, no_host_sync):
    model = _bn_net()
    opt = SharpBalanceSAM(model.parameters(), **RELEASE, nonfinite="skip", **{guard: model})
    x, y = _data(features=5)
    _bn_step(model, opt, x, y, kind)  # a good step first: statistics and momentum move
    before = _values(model)
    bad = x.clone()
    bad[3, 2] = float("inf")  # one inf input
    no_host_sync()
    _bn_step(model, opt, bad, y, kind)
    assert _same(_values(model), before)  # weights and every BatchNorm statistic, bit for bit
    assert torch.equal(opt.skipped_steps, torch.tensor(1))  # torch.equal: no Tensor.__bool__


def test_a_skipped_step_is_counted_and_the_next_good_step_takes_it_from_there():
    model = _bn_net()
    twin = copy.deepcopy(model)
    opt = SharpBalanceSAM(model.parameters(), **RELEASE, nonfinite="skip", bn_guard=model)
    twin_opt = SharpBalanceSAM(twin.parameters(), **RELEASE, nonfinite="skip", bn_guard=twin)
    x, y = _data(features=5)
    bad = x.clone()
    bad[0, 0] = float("nan")
    _bn_step(model, opt, x, y, "sam")
    _bn_step(model, opt, bad, y, "sam")  # skipped: as if it never ran
    _bn_step(model, opt, x, y, "sam")
    _bn_step(twin, twin_opt, x, y, "sam")
    _bn_step(twin, twin_opt, x, y, "sam")
    assert opt.skipped_steps.item() == 1 and twin_opt.skipped_steps.item() == 0
    assert _same(_values(model), _values(twin))


def test_without_a_guard_a_skipped_step_leaves_the_statistics_as_the_release_does():
    model = _bn_net()
    opt = SharpBalanceSAM(model.parameters(), **RELEASE, nonfinite="skip")
    x, y = _data(features=5)
    x[3, 2] = float("inf")
    _bn_step(model, opt, x, y, "sam")
    assert opt.skipped_steps.item() == 1 and not bool(torch.isfinite(model[1].running_mean).all())


@pytest.mark.parametrize("guard", ["bn_freeze", "bn_guard"])
def test_a_refused_step_puts_the_batchnorm_statistics_back_before_it_raises(guard):
    model = _bn_net()
    opt = SharpBalanceSAM(model.parameters(), **RELEASE, **{guard: model})
    x, y = _data(features=5)
    _bn_step(model, opt, x, y, "sam")
    before = _values(model)
    x[3, 2] = float("inf")
    opt.zero_grad()
    _backward(model, x, y)
    with pytest.raises(ValueError, match="gradient norm is not finite"):
        opt.first_step()
    assert _same(_values(model), before)
    with pytest.raises(ValueError, match="third_step: a gradient is not finite"):
        opt.third_step()
    assert _same(_values(model), before)


# ---- the GradScaler through its public API -----------------------------------------------


class PublicScaler:
    """A GradScaler seen through its public methods only (a private field raises)."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self._inner = scaler

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(f"private GradScaler field {name} read")
        return getattr(self._inner, name)


def test_the_grad_scaler_is_used_through_its_public_api_only():
    model = _mlp(dtype=torch.float32)
    opt = SharpBalanceSAM(model.parameters(), **RELEASE)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    public = PublicScaler(scaler)
    x, y = _data()
    x = x.float()
    for poison in (False, True):
        opt.zero_grad()
        public.scale(F.cross_entropy(model(x), y)).backward()
        if poison:
            next(model.parameters()).grad[0, 0] = float("inf")
        opt.first_step(zero_grad=True, grad_scaler=public)
        public.scale(F.cross_entropy(model(x), y)).backward()
        opt.second_step(zero_grad=True, grad_scaler=public)
        public.update()
    assert opt.skipped_steps.item() == 1 and scaler.get_scale() == 2.0**9


# ---- every op call through sbfast.ops ----------------------------------------------------


def test_the_phases_call_the_fused_ops_through_sbfast_ops(monkeypatch):
    calls = []
    for name in ("sam_perturb_", "sam_restore_sgd_"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    model = _mlp()
    x, y = _data()
    opt = SharpBalanceSAM(model.parameters(), **RELEASE)
    opt.zero_grad()
    _backward(model, x, y)
    opt.first_step(zero_grad=True)
    _backward(model, x, y)
    opt.second_step(zero_grad=True)
    assert "sam_perturb_" in calls and "sam_restore_sgd_" in calls


# ---- torch.save of one layer -------------------------------------------------------------


def _saved_bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def test_saving_one_layer_writes_the_flat_buffer_unless_its_tensors_are_cloned():
    # documented (docs/optimizer.md, "Saving one layer"): a parameter is a view of
    # its dtype's flat buffer, and torch.save writes a view's whole storage
    small, big = nn.Linear(50, 100), nn.Linear(500, 500)  # 20 KB and 1 MB of float32
    model = nn.Sequential(small, nn.ReLU(), nn.Linear(100, 500), big)
    small_bytes = sum(p.numel() * p.element_size() for p in small.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    before = _saved_bytes(small.state_dict())
    assert before < small_bytes + 4096
    SharpBalanceSAM(model.parameters(), lr=0.1)
    assert _saved_bytes(small.state_dict()) >= total_bytes  # the whole flat buffer
    compact = {k: v.clone() for k, v in small.state_dict().items()}  # the workaround
    assert _saved_bytes(compact) < small_bytes + 4096
    loaded = torch.load(io.BytesIO(_roundtrip(compact)))
    assert all(torch.equal(loaded[k], v) for k, v in small.state_dict().items())


def _roundtrip(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
