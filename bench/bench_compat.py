"""compat: the release's engine.py loop against sbfast.compat's, at CIFAR size (N = 50,000,
batch 128, a member's normal set of 20,000 indices as the release's split returns it: a Python
list of numpy int64 in set order).

Rows:
- ``mix_step batch split (host)``: deciding which samples of a batch are normal. reference: the
  release's loop, ``indice[i].item() in idx`` per sample (a linear scan of the list each);
  sbfast: ``compat.membership`` (the cached table, checked unchanged, then one gather and two
  nonzero on the CPU index tensor). Pure host time: nothing else in mix_step differs.
- ``train_one_epoch phase 2``: one epoch of mixed steps for a small MLP (3072-32-10) on 50,000
  synthetic 3x32x32 samples (uint8 storage, converted per batch as ToTensor would), the same
  shuffled batches for both. reference: the release's train_one_epoch/mix_step loop written out
  here, over ``sbfast.reference.SAM`` (the release's NSAM semantics); sbfast:
  ``compat.train_one_epoch`` with ``compat.NSAM`` (fused SharpBalanceSAM). ``samples`` = 50,000.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bench.harness import BenchCase, pytest_params, run_pytest_benchmark
from sbfast import compat, reference
from sbfast.compat import membership

N, B, N_NORMAL = 50_000, 128, 20_000
SGD = dict(rho=0.05, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _release_idx() -> list[np.int64]:
    """20,000 normal indices out of 50,000, in the shape of the release's split output."""
    rng = np.random.RandomState(0)
    return list(set(np.arange(N)) - set(rng.permutation(N)[N_NORMAL:].astype(np.float64)))


def _release_split(indice: torch.Tensor, idx: list) -> tuple[list[int], list[int]]:
    normal, flat = [], []
    for i in range(indice.shape[0]):
        (normal if indice[i].item() in idx else flat).append(i)
    return normal, flat


def _release_mix_step(
    net: nn.Module, indice: torch.Tensor, data: torch.Tensor, target: torch.Tensor, idx: list, optimizer: reference.SAM
) -> torch.Tensor:
    """engine.py's mix_step (minus its per-part accuracy syncs), the baseline."""
    criterion = nn.CrossEntropyLoss()
    normal_indice, flat_indice = _release_split(indice, idx)
    total_loss = 0
    if normal_indice:
        loss = criterion(net(data[normal_indice]), target[normal_indice]) * (len(normal_indice) / len(indice))
        total_loss += loss
        loss.backward()
        optimizer.normal_step(zero_grad=True)
    if flat_indice:
        ratio = len(flat_indice) / len(indice)
        loss = criterion(net(data[flat_indice]), target[flat_indice])
        total_loss += loss * ratio
        loss.backward()
        optimizer.first_step(zero_grad=True)
        (criterion(net(data[flat_indice]), target[flat_indice]) * ratio).backward()
        optimizer.second_step(zero_grad=False)
    else:
        optimizer.third_step(zero_grad=False)
    return total_loss


class _Loader:
    """Shuffled batches (indice, x, y) of uint8 storage, converted per batch; the same order on
    every pass so that both loops see the same batches."""

    def __init__(self, device: torch.device) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=g)
        self.y = torch.randint(0, 10, (N,), generator=g)
        self.order = torch.randperm(N, generator=g).split(B)
        self.dataset = range(N)
        self.device = device

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        for ix in self.order:
            yield ix, self.x[ix].float().div_(255), self.y[ix]


def _mlp(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 32), nn.ReLU(), nn.Linear(32, 10)).to(device)


def cases(device: torch.device) -> list[BenchCase]:
    idx = _release_idx()
    g = torch.Generator().manual_seed(1)
    indice = torch.randperm(N, generator=g)[:B]
    membership.normal_lookup(idx, N)  # built once, as train_one_epoch does at the start of an epoch
    split = BenchCase(
        op="mix_step batch split (host)",
        shape=f"batch {B}, idx {N_NORMAL:,} of {N:,}",
        samples=B,
        reference=lambda: _release_split(indice, idx),
        faces={"compat (cached lookup)": lambda: membership.split_batch(indice, membership.normal_lookup(idx, N), B)},
        notes="reference: the release's `indice[i].item() in idx` on its list; the lookup is validated unchanged per call",
    )

    loader = _Loader(device)
    args = compat.release_args(sam="True", print_freq=10**9)
    ref_net, net = _mlp(device), _mlp(device)
    ref_opt = reference.SAM(ref_net.parameters(), torch.optim.SGD, **SGD)
    opt = compat.NSAM(net.parameters(), torch.optim.SGD, **SGD)

    def release_epoch() -> object:
        ref_net.train()
        loss_ema = 0.0
        for ix, x, y in loader:
            x, y = x.to(device), y.to(device)
            ref_opt.zero_grad()
            loss_ema += _release_mix_step(ref_net, ix, x, y, idx, ref_opt)
        return loss_ema

    def compat_epoch() -> object:
        return float(compat.train_one_epoch(args, net, loader, opt, idx, None, 0, device))

    epoch = BenchCase(
        op="train_one_epoch phase 2",
        shape=f"MLP 3072-32-10, {N:,} x 3x32x32, batch {B}, {N_NORMAL:,} normal",
        samples=N,
        reference=release_epoch,
        faces={"compat (fused NSAM)": compat_epoch},
        notes="reference: the release's loop over sbfast.reference.SAM; same batches for both",
    )
    return [split, epoch]


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case,face", pytest_params(cases, _DEVICE), ids=lambda v: getattr(v, "shape", v))
def bench_compat(benchmark, case, face):
    run_pytest_benchmark(benchmark, case, face)
