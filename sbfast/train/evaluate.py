"""Evaluation of a trained ensemble: test probabilities, metrics, corruption accuracy, sharpness."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from sbfast import metrics as metrics_mod
from sbfast.common import module_modes, restore_modes
from sbfast.train.config import SHARPNESS_SUBSET_SEED, TrainConfig
from sbfast.train.data import TrainData, device_data


@torch.no_grad()
def predict_probs(
    models: Sequence[nn.Module],
    batches: Callable[[], Iterator[torch.Tensor]],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Softmax outputs of every member: float32 [M, n, C] on the CPU.

    ``batches()`` yields float32 inputs on the models' device, in sample order; each member is
    put in eval mode and its mode restored after.
    """
    out = []
    for model in models:
        modes = module_modes(model)
        model.eval()
        try:
            parts = [torch.softmax(model(x.to(dtype)), dim=1).float() for x in batches()]
        finally:
            restore_modes(modes)
        out.append(torch.cat(parts).cpu())
    return torch.stack(out)


class Gather(Protocol):
    """How a rank that evaluated some members completes the ensemble's evaluation (under
    torchrun, ``sbfast.distributed.ensemble.EvaluationGather``)."""

    def probs(self, local: torch.Tensor, n: int) -> torch.Tensor | None:
        """This rank's members' float32 [m, n, C] -> every member's [M, n, C] on the rank that
        computes the metrics, None elsewhere."""
        ...

    def floats(self, local: Sequence[float]) -> list[float]:
        """This rank's members' values -> every member's, on every rank."""
        ...


def ensemble_probs(
    models: Sequence[nn.Module],
    batches: Callable[[], Iterator[torch.Tensor]],
    dtype: torch.dtype,
    n: int,
    num_classes: int,
    gather: Gather | None = None,
) -> torch.Tensor | None:
    """Every member's softmax outputs float32 [M, n, C]: ``predict_probs`` of ``models``, or with
    ``gather`` (a distributed run) this rank's members' completed where ``gather.probs`` returns
    them (None on the other ranks)."""
    if gather is None:
        return predict_probs(models, batches, dtype)
    local = predict_probs(models, batches, dtype) if models else torch.zeros(0, n, num_classes)
    return gather.probs(local, n)


def accuracies(probs: torch.Tensor, targets: torch.Tensor) -> tuple[list[float], float]:
    t = targets.cpu()
    member = [float((p.argmax(1) == t).double().mean()) for p in probs]
    ens = float((probs.double().mean(0).argmax(1) == t).double().mean())
    return member, ens


def evaluate_ensemble(
    models: Sequence[nn.Module],
    data: TrainData,
    config: TrainConfig,
    device: torch.device,
    fisher: Callable[..., torch.Tensor],
    *,
    test_batches: Callable[[], Iterator[torch.Tensor]] | None = None,
    gather: Gather | None = None,
) -> dict[str, Any]:
    """Final evaluation: ``metrics`` (ensemble_metrics on the test split), ``ood``
    (ood_metrics over the corrupted test sets, or None), ``sharpness`` (each member's mean Fisher
    score on a fixed training subset of ``sharpness_samples``), the test ``probs`` and timings.

    With ``gather`` (a distributed run), ``models`` are the members this rank evaluates: their
    probabilities are gathered and the metrics computed where ``gather.probs`` returns them
    (``metrics`` and ``ood`` are None on the other ranks); sharpness comes back for every member.
    """
    dtype = config.torch_dtype
    classes = data.num_classes

    def probs_of(batches: Callable[[], Iterator[torch.Tensor]], n: int) -> torch.Tensor | None:
        return ensemble_probs(models, batches, dtype, n, classes, gather)

    t0 = time.perf_counter()
    if test_batches is None:
        test_dev = device_data(data.test, device)

        def test_batches() -> Iterator[torch.Tensor]:
            return (x for x, _ in test_dev.slices(config.eval_batch_size))

    probs = probs_of(test_batches, len(data.test))
    metrics = metrics_mod.ensemble_metrics(probs, data.test.y) if probs is not None else None
    t1 = time.perf_counter()
    ood = None
    if config.eval_corruptions:
        sets = data.corrupted(config.eval_corruptions, config.eval_severities)
        results = {}
        for key, ds in sets.items():
            dd = device_data(ds, device)
            p = probs_of(lambda dd=dd: (x for x, _ in dd.slices(config.eval_batch_size)), len(ds))
            if p is not None:
                results[key] = (p, ds.y)
        ood = metrics_mod.ood_metrics(results) if results else None
    t2 = time.perf_counter()
    sharpness: list[float] = []
    if config.sharpness_samples > 0:
        n = min(config.sharpness_samples, len(data.train))
        perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(SHARPNESS_SUBSET_SEED))
        sub = data.train.subset(perm[:n].sort().values)
        for model in models:
            s = fisher(model, sub, config=config, device=device, progress=False)
            sharpness.append(float(s.double().mean()))
        if gather is not None:
            sharpness = gather.floats(sharpness)
    t3 = time.perf_counter()
    return {
        "metrics": metrics,
        "ood": ood,
        "sharpness": sharpness,
        "probs": probs,
        "timing": {"eval_test_s": t1 - t0, "eval_ood_s": t2 - t1, "eval_sharpness_s": t3 - t2},
    }
