"""Worst-case and average-case sharpness against their plain twins (sbfast.reference.measures_apgd),
the APGD schedule, the projections, the model left as it came, and every refusal."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sbfast.measure import apgd_checkpoints, average_sharpness, draw_noise, worst_case_sharpness
from sbfast.measure.perturbation import project, weighted_norm
from sbfast.models import create_model
from sbfast.reference.measures_apgd import reference_average_sharpness, reference_worst_case_sharpness

# float64: the same operations up to summation order; float32: ~1e-5 relative on these small nets
TOL = {torch.float64: 1e-9, torch.float32: 2e-4}


def _mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 5)).to(dtype)


def _cnn(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    with torch.no_grad():
        m[1].bias.uniform_(-0.3, 0.3)  # away from 0 (an exact 0 is left out of the adaptive norm)
        m[1].running_var.uniform_(0.5, 1.5)
    return m.to(dtype)


def _resnet(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(2)
    m = create_model("resnet18", num_classes=5, width=2)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.bias.uniform_(-0.3, 0.3)
    return m.to(dtype)


def _batches(
    dtype: torch.dtype, sizes=(5, 1, 7), hw: int = 4, seed: int = 3
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, hw, hw, generator=g).to(dtype), torch.randint(0, 5, (b,), generator=g)) for b in sizes]


def test_checkpoints_are_the_releases_floating_point_schedule():
    assert apgd_checkpoints(20) == [5, 9, 12, 15, 16, 18, 19, 20]  # 15, not the exact 14
    assert apgd_checkpoints(10) == [3, 5, 6, 8, 8]
    assert apgd_checkpoints(100) == [22, 41, 58, 70, 80, 87, 93, 99, 105]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize(("norm", "rho", "adaptive"), [("l2", 0.5, True), ("l2", 0.3, False), ("linf", 0.01, True)])
def test_worst_case_equals_the_twin(make, dtype, norm, rho, adaptive):
    model, data = make(dtype), _batches(dtype)
    ref = reference_worst_case_sharpness(model, data, rho=rho, norm=norm, adaptive=adaptive, n_iters=12)
    got = worst_case_sharpness(model, data, rho=rho, norm=norm, adaptive=adaptive, n_iters=12)
    assert got.value > 0
    torch.testing.assert_close(
        torch.tensor(got.per_batch), torch.tensor(ref[2]), rtol=TOL[dtype], atol=TOL[dtype] * 1e-2
    )
    assert math.isclose(got.error_delta, ref[1], abs_tol=1e-12)
    assert len(got.per_batch) == 3 and all(v >= 0 for v in got.per_batch)


def test_worst_case_on_a_resnet_and_masks_equal_the_twin():
    model, data = _resnet(torch.float64), _batches(torch.float64, sizes=(5, 2), hw=8)
    ref = reference_worst_case_sharpness(model, data, rho=0.5, n_iters=6)
    got = worst_case_sharpness(model, data, rho=0.5, n_iters=6)
    assert math.isclose(got.value, ref[0], rel_tol=1e-9)
    named = list(model.named_parameters())
    masks = {n: (torch.rand(p.shape) > 0.5).double() for n, p in named if n.endswith("weight") and p.dim() > 1}
    ref_m = reference_worst_case_sharpness(model, data, rho=0.5, n_iters=6, masks=[masks.get(n) for n, _ in named])
    got_m = worst_case_sharpness(model, data, rho=0.5, n_iters=6, masks=masks)
    assert math.isclose(got_m.value, ref_m[0], rel_tol=1e-9) and got_m.value != got.value


def test_the_perturbation_stays_in_its_set():
    torch.manual_seed(4)
    w = torch.randn(300, dtype=torch.float64)
    c = w.abs()
    z = torch.randn(300, dtype=torch.float64)
    on = project(z * 10, c, 0.5, "l2")
    assert abs(float(weighted_norm(on, c)) - 0.5) <= 1e-5  # on the ellipsoid's boundary
    inside = z * 1e-4
    assert torch.equal(project(inside, c, 0.5, "l2"), inside)  # already inside: unchanged
    box = project(z, c, 0.1, "linf")
    assert bool((box.abs() <= 0.1 * c + 1e-15).all())
    assert math.isclose(float(project(z * 9, None, 0.5, "l2").norm()), 0.5, rel_tol=1e-12)
    c0 = c.clone()
    c0[:10] = 0  # zero weights: out of the norm, and they cannot move
    p0 = project(z * 10, c0, 0.5, "l2")
    assert bool((p0[:10] == 0).all()) and abs(float(weighted_norm(p0, c0)) - 0.5) <= 1e-5


def test_random_init_and_restarts_are_seeded_and_keep_the_worst():
    model, data = _cnn(torch.float64), _batches(torch.float64)
    a = worst_case_sharpness(
        model, data, rho=0.5, n_iters=6, init="random", restarts=3, generator=torch.Generator().manual_seed(7)
    )
    b = worst_case_sharpness(
        model, data, rho=0.5, n_iters=6, init="random", restarts=3, generator=torch.Generator().manual_seed(7)
    )
    assert a.per_batch == b.per_batch and a.settings["restarts"] == 3
    one = worst_case_sharpness(
        model, data, rho=0.5, n_iters=6, init="random", restarts=1, generator=torch.Generator().manual_seed(7)
    )
    # batch 0's first restart draws what the single restart draws: the worst over three is at least it
    assert a.per_batch[0] >= one.per_batch[0] and all(v >= 0 for v in a.per_batch)


@pytest.mark.parametrize("stack", [False, True])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_average_case_equals_the_twin_on_the_same_draws(norm, stack):
    model, data = _cnn(torch.float64), _batches(torch.float64)
    g = torch.Generator().manual_seed(9)
    noise = [draw_noise(model, 6, norm, g) for _ in data]
    ref = reference_average_sharpness(model, data, noise, rho=0.2)
    got = average_sharpness(model, data, rho=0.2, norm=norm, n_draws=6, noise=noise, stack=stack, chunk=4)
    assert math.isclose(got.value, ref[0], rel_tol=1e-9, abs_tol=1e-14)
    assert math.isclose(got.error_delta, ref[1], abs_tol=1e-12)
    again = average_sharpness(model, data, rho=0.2, norm=norm, n_draws=6, generator=torch.Generator().manual_seed(9))
    assert math.isclose(again.value, got.value, rel_tol=1e-12)  # the generator gives the same draws


def test_the_model_leaves_as_it_came_also_after_an_error():
    model = _cnn(torch.float64).train()
    params = [(n, p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()]
    model[1].weight.requires_grad_(False)
    stats = model[1].running_mean.clone()
    worst_case_sharpness(model, _batches(torch.float64), rho=0.5, n_iters=4)
    worst_case_sharpness(model, _batches(torch.float64), rho=0.5, n_iters=4, stack=True)
    average_sharpness(model, _batches(torch.float64), rho=0.5, n_draws=3)
    bad = [(torch.full((2, 3, 4, 4), float("nan"), dtype=torch.float64), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="batch 0"):
        worst_case_sharpness(model, bad, rho=0.5)
    assert model.training and all(m.training for m in model.modules())
    assert model[1].weight.requires_grad is False
    assert torch.equal(model[1].running_mean, stats)
    for n, p, v, _ in params:
        assert model.get_parameter(n) is p and torch.equal(p, v)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rho=0.0), "rho must be a finite number > 0"),
        (dict(rho=float("inf")), "rho must be a finite number > 0"),
        (dict(rho=0.5, norm="l1"), "norm must be one of l2, linf"),
        (dict(rho=0.5, n_iters=0), "n_iters must be a positive integer"),
        (dict(rho=0.5, restarts=2), "needs init='random'"),
        (dict(rho=0.5, masks={"nope": torch.ones(1)}), "not a parameter"),
        (dict(rho=0.5, masks={"1.weight": torch.ones(7, 3)}), r"mask of '1.weight' has shape \(7, 3\)"),
        (dict(rho=0.5, chunk=0), "chunk must be a positive integer, got 0"),
    ],
)
def test_bad_input_is_one_line_before_work(kwargs, match):
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5)).double()
    with pytest.raises(ValueError, match=match) as info:
        worst_case_sharpness(model, _batches(torch.float64), **kwargs)
    assert "\n" not in str(info.value)


def test_stack_must_be_a_bool_or_none():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5)).double()
    with pytest.raises(TypeError, match="stack must be True, False or None, got 'yes'"):
        worst_case_sharpness(model, _batches(torch.float64), rho=0.5, stack="yes")


# --------------------------------------------------------------------------------------------
# Problems side by side (apgd_stacked): the same steps per problem as one by one.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_mlp, _cnn, _resnet], ids=["mlp", "cnn", "resnet"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rho=0.5),
        dict(rho=0.01, norm="linf"),
        dict(rho=0.3, adaptive=False),
        dict(rho=0.5, restart_from_best=True),
        dict(rho=0.5, init="random", restarts=3),
    ],
    ids=["l2-adaptive", "linf", "l2-plain", "restart-from-best", "random-restarts"],
)
@pytest.mark.parametrize("chunk", [1, 2, 16])
def test_stacked_problems_take_the_sequential_steps(make, kwargs, chunk):
    # batches of 5, 5, 1, 7, 5: shapes change mid-list, so groups break there and at the chunk
    model = make(torch.float64)
    data = _batches(torch.float64, sizes=(5, 5, 1, 7, 5), hw=4)
    gens = [torch.Generator().manual_seed(11) for _ in range(2)]
    one = worst_case_sharpness(model, data, n_iters=10, stack=False, generator=gens[0], **kwargs)
    side = worst_case_sharpness(model, data, n_iters=10, stack=True, chunk=chunk, generator=gens[1], **kwargs)
    assert not one.settings["stacked"] and side.settings["stacked"]
    torch.testing.assert_close(torch.tensor(side.per_batch), torch.tensor(one.per_batch), rtol=1e-9, atol=1e-12)
    assert side.per_batch_error == one.per_batch_error
    assert math.isclose(side.extra["max_delta_norm"], one.extra["max_delta_norm"], rel_tol=1e-9)
    assert torch.equal(gens[0].get_state(), gens[1].get_state())  # the same draws, in the same order


def test_stacked_problems_with_masks_equal_the_twin():
    model, data = _resnet(torch.float64), _batches(torch.float64, sizes=(5, 5, 2), hw=8)
    named = list(model.named_parameters())
    g = torch.Generator().manual_seed(4)
    masks = {n: (torch.rand(p.shape, generator=g) > 0.5).double() for n, p in named if p.dim() > 1}
    ref = reference_worst_case_sharpness(model, data, rho=0.5, n_iters=6, masks=[masks.get(n) for n, _ in named])
    got = worst_case_sharpness(model, data, rho=0.5, n_iters=6, masks=masks, stack=True)
    assert math.isclose(got.value, ref[0], rel_tol=1e-9)


def test_the_cpu_solves_one_by_one_by_default():
    model = _mlp(torch.float64)
    assert worst_case_sharpness(model, _batches(torch.float64), rho=0.5, n_iters=3).settings["stacked"] is False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_stacks_by_default_and_equals_the_cpu():
    model = _cnn(torch.float64)
    data = _batches(torch.float64, sizes=(5, 5, 5))
    cpu = worst_case_sharpness(model, data, rho=0.5, n_iters=8)
    gpu_model = _cnn(torch.float64).cuda()
    got = worst_case_sharpness(gpu_model, [(x.cuda(), y.cuda()) for x, y in data], rho=0.5, n_iters=8)
    assert got.settings["stacked"] is True
    torch.testing.assert_close(torch.tensor(got.per_batch), torch.tensor(cpu.per_batch), rtol=1e-8, atol=1e-12)


def test_bad_batches_and_draws_are_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5)).double()
    with pytest.raises(ValueError, match="0 batches"):
        worst_case_sharpness(model, [], rho=0.5)
    with pytest.raises(ValueError, match="n_draws must be a positive integer"):
        average_sharpness(model, _batches(torch.float64), rho=0.5, n_draws=0)
    with pytest.raises(ValueError, match=r"noise\[0\] has shape"):
        average_sharpness(model, _batches(torch.float64, sizes=(5,)), rho=0.5, n_draws=2, noise=[torch.zeros(3, 3)])


@pytest.mark.parametrize("measure", ["worst_case", "average_case"])
def test_a_batch_without_a_finite_starting_loss_is_refused_before_any_measuring(measure):
    """Both measures check every batch's loss at w0 first: a bad third batch is named before the
    first batch is measured (average-case: no noise drawn from the generator)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5)).double()
    batches = _batches(torch.float64)
    batches[2] = (torch.full_like(batches[2][0], float("nan")), batches[2][1])
    g = torch.Generator().manual_seed(7)
    before = g.get_state()
    with pytest.raises(ValueError, match=r"not finite on batch 2 \(nan\): nothing to measure") as info:
        if measure == "worst_case":
            worst_case_sharpness(model, batches, rho=0.5, n_iters=3)
        else:
            average_sharpness(model, batches, rho=0.5, n_draws=4, generator=g)
    assert "\n" not in str(info.value)
    assert torch.equal(g.get_state(), before)


class _Tied(nn.Module):
    """One weight registered in two modules (named_parameters lists it once)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
        self.mid = nn.Linear(5, 5)
        self.again = nn.Linear(5, 5)
        self.again.weight = self.mid.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


@pytest.mark.parametrize("stack", [False, True])
def test_a_tied_weight_moves_as_one_in_every_place(stack):
    torch.manual_seed(4)
    model, data = _Tied().double(), _batches(torch.float64)
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == 5  # the tied weight once
    ref = reference_worst_case_sharpness(model, data, rho=0.5, n_iters=8)
    got = worst_case_sharpness(model, data, rho=0.5, n_iters=8, stack=stack)
    torch.testing.assert_close(torch.tensor(got.per_batch), torch.tensor(ref[2]), rtol=1e-9, atol=1e-11)
    g = torch.Generator().manual_seed(9)
    noise = [draw_noise(model, 4, "l2", g) for _ in data]
    avg = average_sharpness(model, data, rho=0.2, n_draws=4, noise=noise, stack=stack)
    assert math.isclose(avg.value, reference_average_sharpness(model, data, noise, rho=0.2)[0], rel_tol=1e-9)
    assert [id(p) for p in model.parameters()] == ids and model.again.weight is model.mid.weight
