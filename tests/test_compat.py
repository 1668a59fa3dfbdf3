"""sbfast.compat.NSAM: the release's optimizer, in a training loop written like the release's
(engine.py's mix_step, main.py's optimizer and scheduler set-up), against sbfast.reference.SAM."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from sbfast import compat, reference
from sbfast.compat import NSAM, FusedNSAM, ReferenceNSAM
from sbfast.models import create_model
from sbfast.optim import SharpBalanceSAM

ARGS = dict(rho=0.2, lr=0.1, momentum=0.9, weight_decay=5e-4)  # main.py's NSAM(...) call


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # numbers, not speed (see test_optim)
    yield
    torch.set_num_threads(threads)


def mix_step(net, indice, data, target, idx, optimizer):
    """engine.py's mix_step, minus the accuracy bookkeeping: samples whose index is in ``idx``
    are normal, the rest SAM; the release calls second_step/third_step with zero_grad=False."""
    criterion = nn.CrossEntropyLoss()
    flat_indice, normal_indice = [], []
    for i in range(data.shape[0]):
        (normal_indice if indice[i].item() in idx else flat_indice).append(i)
    total_loss = 0
    if len(normal_indice) > 0:
        loss = criterion(net(data[normal_indice]), target[normal_indice]) * (len(normal_indice) / len(indice))
        total_loss += loss
        loss.backward()
        optimizer.normal_step(zero_grad=True)
    if len(flat_indice) > 0:
        flat_ratio = len(flat_indice) / len(indice)
        loss = criterion(net(data[flat_indice]), target[flat_indice])
        total_loss += loss * flat_ratio
        loss.backward()
        optimizer.first_step(zero_grad=True)
        loss = criterion(net(data[flat_indice]), target[flat_indice]) * flat_ratio
        loss.backward()
        optimizer.second_step(zero_grad=False)
    else:
        optimizer.third_step(zero_grad=False)
    return total_loss


def train_one_epoch(net, loader, optimizer, normal_indice):
    """engine.py's train_one_epoch (SAM branch)."""
    net.train()
    loss_ema = 0.0
    for indice, images, targets in loader:
        optimizer.zero_grad()
        loss_ema += mix_step(net, indice, images, targets, normal_indice, optimizer)
    return loss_ema


def _loader(n_batches: int, b: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.arange(i * b, (i + 1) * b),
            torch.randn(b, 3, 8, 8, generator=g),
            torch.randint(0, 10, (b,), generator=g),
        )
        for i in range(n_batches)
    ]


def test_release_training_loop_matches_reference_bit_for_bit():
    torch.manual_seed(0)
    net_ref = create_model("resnet18", 10, width=4)
    net = copy.deepcopy(net_ref)
    # main.py builds the optimizer first and moves the model afterwards (here: to float64)
    ref = reference.SAM(net_ref.parameters(), torch.optim.SGD, **ARGS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = NSAM(net.parameters(), torch.optim.SGD, **ARGS)
        net_ref.double()
        net.double()
        assert isinstance(opt, NSAM) and isinstance(opt, FusedNSAM) and isinstance(opt, SharpBalanceSAM)
        sched_ref = torch.optim.lr_scheduler.MultiStepLR(ref.base_optimizer, milestones=[1, 2])
        sched = torch.optim.lr_scheduler.MultiStepLR(opt.base_optimizer, milestones=[1, 2])
        loader = [(i, x.double(), y) for i, x, y in _loader(5)]
        # epoch 0: SAM on every sample; later: the sample indices in normal_indice are normal
        for normal_indice in [[-1], list(range(0, 40, 3)), list(range(40))]:
            loss_ref = train_one_epoch(net_ref, loader, ref, normal_indice)
            loss = train_one_epoch(net, loader, opt, normal_indice)
            assert torch.equal(loss, loss_ref)
            sched_ref.step()
            sched.step()
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    for a, b in zip(net.parameters(), net_ref.parameters(), strict=True):
        assert torch.equal(a, b)
    for p, q in zip(net.parameters(), net_ref.parameters(), strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], ref.base_optimizer.state[q]["momentum_buffer"])
    # the release leaves p.grad = g' + g_n (second_step) or g_n (third_step) after a step
    for p, q in zip(net.parameters(), net_ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_other_base_optimizers_fall_back_to_the_reference_and_warn_once(monkeypatch):
    monkeypatch.setattr(compat.nsam, "_warned_unfused", False)
    net = create_model("mlp", 10, hidden=16)
    with pytest.warns(RuntimeWarning, match="unfused"):
        opt = NSAM(net.parameters(), torch.optim.Adam, rho=0.1, lr=1e-3)
    assert isinstance(opt, ReferenceNSAM) and isinstance(opt, NSAM) and isinstance(opt.base_optimizer, torch.optim.Adam)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NSAM(net.parameters(), torch.optim.Adam, rho=0.1, lr=1e-3)  # no second warning
    twin = copy.deepcopy(net)
    ref = reference.SAM(twin.parameters(), torch.optim.Adam, rho=0.1, lr=1e-3)
    loader = [(i, x[:, :1], y) for i, x, y in _loader(3)]
    train_one_epoch(net, loader, opt, [0, 5, 9])
    train_one_epoch(twin, loader, ref, [0, 5, 9])
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam])
def test_back_step_returns_to_w_exactly(base, monkeypatch):
    monkeypatch.setattr(compat.nsam, "_warned_unfused", True)
    net = create_model("mlp", 10, hidden=16)
    opt = NSAM(net.parameters(), base, rho=0.5, lr=0.1)
    w = [p.detach().clone() for p in net.parameters()]
    _, x, y = _loader(1)[0]
    nn.CrossEntropyLoss()(net(x[:, :1]), y).backward()
    opt.first_step(zero_grad=True)
    assert not all(torch.equal(p, q) for p, q in zip(net.parameters(), w, strict=True))
    opt.back_step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), w, strict=True))
    nn.CrossEntropyLoss()(net(x[:, :1]), y).backward()
    opt.first_step(zero_grad=True)  # usable again: the SAM step was closed


def test_constructor_checks():
    params = list(create_model("mlp", 10, hidden=16).parameters())
    with pytest.raises(ValueError, match="rho"):
        NSAM(params, torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(TypeError, match="betas"):
        NSAM(params, torch.optim.SGD, lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="maximize"):
        NSAM(params, torch.optim.SGD, lr=0.1, maximize=True)
    opt = NSAM(params, torch.optim.SGD)  # torch.optim.SGD's default lr
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.base_optimizer is opt


def test_state_dict_of_a_fused_nsam_loads_into_a_reference_sam():
    net = create_model("mlp", 10, hidden=16)
    opt = NSAM(net.parameters(), torch.optim.SGD, **ARGS)
    loader = [(i, x[:, :1], y) for i, x, y in _loader(3)]
    train_one_epoch(net, loader, opt, [1, 2, 3])
    twin = copy.deepcopy(net)
    ref = reference.SAM(twin.parameters(), torch.optim.SGD, **ARGS)
    ref.base_optimizer.load_state_dict(opt.state_dict())
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], ref.base_optimizer.state[q]["momentum_buffer"])
