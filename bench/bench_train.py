"""train: one epoch of SharpBalance's phase 2 (mixed steps) for the digits CNN (width 16, 3
members' masks from a balance selection, batch 64, 1,257 training samples with crop augmentation).

reference: ``sbfast.reference.train_member_epoch`` (reference SAM over torch.optim.SGD, a shuffled
DataLoader with the augmentation as a data-set transform, ``reference.mixed_step`` per batch).
faces: ``sbfast.train.EnsembleTrainer.train_epoch`` with the fast components, static batches
(fixed SAM/normal counts per batch, no host sync) and exact batches (the release's random
batches, one host sync per step); and, as the yardstick, one plain SGD epoch of the same trainer
(section 5's floor for the mixed epoch is (1 + SAM share) times it). ``samples`` = training
samples per epoch, so samples/s counts each sample once although SAM samples cost two extra
passes. One intra-op thread for every face
(the digits preset: 8x8 convolutions lose more to threading than they gain).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

from bench.harness import BenchCase, pytest_params, run_pytest_benchmark
from sbfast import reference
from sbfast import train as T
from sbfast.data import RandomCropFlip, make_loader


def _one_thread(fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(n)

    return call


def cases(device: torch.device) -> list[BenchCase]:
    base = T.TrainConfig(
        method="sharpbalance",
        dataset="digits",
        device=str(device),
        progress=False,
        eval_corruptions=(),
        sharpness_samples=0,
    )
    data = T.load_data(base)
    n = len(data.train)
    masks = reference.select_sam_masks(
        torch.rand(base.members, n, generator=torch.Generator().manual_seed(0)), base.ratio, base.variant
    )
    faces: dict[str, Callable[[], object]] = {}
    names = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batching in ("static", "exact"):
            trainer = T.EnsembleTrainer(base.replace(batching=batching), data)
            trainer.set_masks(masks)
            names = trainer.components.names

            def epoch(tr: T.EnsembleTrainer = trainer) -> object:
                loss = tr.train_epoch(0, "mixed")
                if tr.device.type == "cuda":
                    torch.cuda.synchronize(tr.device)
                return loss

            faces[f"trainer/{batching}"] = _one_thread(epoch)
            if batching == "static":
                # the floor: section 5 costs (1 + SAM share) plain SGD epochs of forward+backward
                faces["floor: sgd epoch"] = _one_thread(lambda tr=trainer: tr.train_epoch(1, "sgd"))

    model = T.build_member(base, data, 0, device)
    opt = reference.SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=base.rho,
        lr=base.lr,
        momentum=base.momentum,
        weight_decay=base.weight_decay,
    )
    aug = RandomCropFlip(base.augment_pad, 0, flip=base.augment_flip, mean=data.train.mean, std=data.train.std)
    loader = make_loader(data.train.with_transform(aug), base.batch_size, shuffle=True, seed=0)

    def ref_epoch() -> object:
        return reference.train_member_epoch(model, opt, loader, "mixed", sam_mask=masks[0], device=device)

    share = float(masks[0].double().mean())
    return [
        BenchCase(
            op="train_epoch",
            shape=f"digits cnn16, mixed phase, N={n}, b={base.batch_size}, SAM share {share:.2f}",
            reference=_one_thread(ref_epoch),
            faces=faces,
            samples=n,
            notes=f"optimizer: {names.get('optimizer')}",
        )
    ]


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case,face", pytest_params(cases, _DEVICE), ids=lambda v: getattr(v, "shape", v))
def bench_train(benchmark, case, face):
    run_pytest_benchmark(benchmark, case, face)
