"""Evaluation of a trained ensemble: test probabilities, metrics, diversity, corruption accuracy,
the members' mean Fisher score."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from sbfast import metrics as metrics_mod
from sbfast.common import module_modes, restore_modes
from sbfast.measure import cka_matrix, symmetric_kl_divergence, worst_case_sharpness
from sbfast.train.config import SHARPNESS_SUBSET_SEED, WORST_CASE_SUBSET_SEED, TrainConfig
from sbfast.train.data import TrainData, device_data


@torch.no_grad()
def predict_outputs(
    models: Sequence[nn.Module],
    batches: Callable[[], Iterator[torch.Tensor]],
    dtype: torch.dtype,
    *,
    logits: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax outputs and logits of every member from one forward pass: two float32 [M, n, C]
    tensors on the CPU (probs, logits; logits None when not asked for). The probabilities are the
    softmax of each batch in the model's dtype, then float32.

    ``batches()`` yields float32 inputs on the models' device, in sample order; each member is
    put in eval mode and its mode restored after."""
    probs, outs = [], []
    for model in models:
        modes = module_modes(model)
        model.eval()
        p_parts, l_parts = [], []
        try:
            for x in batches():
                out = model(x.to(dtype))
                p_parts.append(torch.softmax(out, dim=1).float())
                if logits:
                    l_parts.append(out.float())
        finally:
            restore_modes(modes)
        probs.append(torch.cat(p_parts).cpu())
        if logits:
            outs.append(torch.cat(l_parts).cpu())
    return torch.stack(probs), (torch.stack(outs) if logits else None)


def predict_probs(
    models: Sequence[nn.Module],
    batches: Callable[[], Iterator[torch.Tensor]],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Softmax outputs of every member: float32 [M, n, C] on the CPU (``predict_outputs``
    without the logits)."""
    return predict_outputs(models, batches, dtype, logits=False)[0]


def _off_diagonal_mean(matrix: torch.Tensor) -> float:
    m = matrix.shape[0]
    return float((matrix.sum() - matrix.diagonal().sum()) / (m * (m - 1)))


def diversity_measures(probs: torch.Tensor, logits: torch.Tensor | None) -> dict[str, Any]:
    """The paper's diversity of the members on the test split, from the evaluation's own pass.

    * ``kl``: mean over pairs i != j of the symmetric KL divergence (KL(p_i||p_j) + KL(p_j||p_i))/2,
      nats (``sbfast.measure.symmetric_kl_divergence``); higher is more diverse.
    * ``cka``: mean over pairs of the linear CKA of the members' logits over the whole test split
      (full batch, unbiased HSIC: ``sbfast.measure.cka_matrix(..., debiased=True)``); lower is
      more diverse (1: the same representation up to rotation and scale).
    * ``kl_matrix``, ``cka_matrix``: the M x M matrices (nested lists).

    Mean disagreement is ``metrics["mean_disagreement"]`` (computed there). With one member
    (or fewer than 4 test samples for the unbiased CKA) the values are None.

    Args:
        probs: float32 [M, n, C] softmax outputs. logits: float32 [M, n, C], or None (no CKA).
    """
    m, n = probs.shape[0], probs.shape[1]
    out: dict[str, Any] = {"kl": None, "cka": None, "kl_matrix": None, "cka_matrix": None}
    if m < 2:
        return out
    kl = symmetric_kl_divergence(probs)
    out["kl"], out["kl_matrix"] = _off_diagonal_mean(kl), kl.tolist()
    if logits is not None and n >= 4:
        c = cka_matrix([x.double() for x in logits], kernel="linear", debiased=True)
        out["cka"], out["cka_matrix"] = _off_diagonal_mean(c), c.tolist()
    return out


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


def ensemble_outputs(
    models: Sequence[nn.Module],
    batches: Callable[[], Iterator[torch.Tensor]],
    dtype: torch.dtype,
    n: int,
    num_classes: int,
    gather: Gather | None = None,
    *,
    logits: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(probs, logits), each float32 [M, n, C], from one forward per member: ``predict_outputs``
    of ``models``, or with ``gather`` (a distributed run) this rank's members' completed where
    ``gather.probs`` returns them (None on the other ranks). logits is None when not asked for."""
    if gather is None:
        return predict_outputs(models, batches, dtype, logits=logits)
    if models:
        local_p, local_l = predict_outputs(models, batches, dtype, logits=logits)
    else:
        local_p = local_l = torch.zeros(0, n, num_classes)
    return gather.probs(local_p, n), (gather.probs(local_l, n) if logits else None)


def ensemble_probs(
    models: Sequence[nn.Module],
    batches: Callable[[], Iterator[torch.Tensor]],
    dtype: torch.dtype,
    n: int,
    num_classes: int,
    gather: Gather | None = None,
) -> torch.Tensor | None:
    """Every member's softmax outputs float32 [M, n, C]: ``ensemble_outputs`` without the logits."""
    return ensemble_outputs(models, batches, dtype, n, num_classes, gather, logits=False)[0]


def accuracies(probs: torch.Tensor, targets: torch.Tensor) -> tuple[list[float], float]:
    t = targets.cpu()
    member = [float((p.argmax(1) == t).double().mean()) for p in probs]
    ens = float((probs.double().mean(0).argmax(1) == t).double().mean())
    return member, ens


def worst_case_of(
    models: Sequence[nn.Module], data: TrainData, config: TrainConfig, device: torch.device
) -> list[float]:
    """Each member's worst-case adaptive l2 sharpness (the paper's; ``sbfast.measure``) on
    ``worst_case_batches`` batches of 5 training samples (a fixed draw, test-time transforms, the
    release's batch size), ``worst_case_iters`` APGD iterations at ``worst_case_rho``; [] when
    ``worst_case_batches`` is 0. Every member sees the same batches."""
    k = config.worst_case_batches
    if k <= 0:
        return []
    n = min(5 * k, len(data.train) - len(data.train) % 5)
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(WORST_CASE_SUBSET_SEED))
    _, x, y = data.train[perm[:n]]
    x = x.to(device=device, dtype=config.torch_dtype)
    batches = [(x[i : i + 5], y[i : i + 5].to(device)) for i in range(0, n, 5)]
    out = []
    for model in models:
        r = worst_case_sharpness(model, batches, rho=config.worst_case_rho, n_iters=config.worst_case_iters)
        out.append(float(r.value))
    return out


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
    """Final evaluation: ``metrics`` (ensemble_metrics on the test split), ``diversity``
    (``diversity_measures`` of the same test pass: KL, CKA of the logits), ``ood`` (ood_metrics
    over the corrupted test sets, or None), ``fisher_mean`` (each member's mean Fisher score on a
    fixed training subset of ``sharpness_samples``), the test ``probs`` and timings.

    With ``gather`` (a distributed run), ``models`` are the members this rank evaluates: their
    probabilities are gathered and the metrics computed where ``gather.probs`` returns them
    (``metrics``, ``diversity`` and ``ood`` are None on the other ranks); ``fisher_mean`` comes back
    for every member.
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

    probs, logits = ensemble_outputs(models, test_batches, dtype, len(data.test), classes, gather)
    metrics = metrics_mod.ensemble_metrics(probs, data.test.y) if probs is not None else None
    diversity = diversity_measures(probs, logits) if probs is not None else None
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
    fisher_mean: list[float] = []
    if config.sharpness_samples > 0:
        n = min(config.sharpness_samples, len(data.train))
        perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(SHARPNESS_SUBSET_SEED))
        sub = data.train.subset(perm[:n].sort().values)
        for model in models:
            s = fisher(model, sub, config=config, device=device, progress=False)
            fisher_mean.append(float(s.double().mean()))
        if gather is not None:
            fisher_mean = gather.floats(fisher_mean)
    t3 = time.perf_counter()
    worst_case = worst_case_of(models, data, config, device)
    if gather is not None and config.worst_case_batches > 0:
        worst_case = gather.floats(worst_case)
    t4 = time.perf_counter()
    return {
        "metrics": metrics,
        "diversity": diversity,
        "ood": ood,
        "fisher_mean": fisher_mean,
        "worst_case_sharpness": worst_case,
        "probs": probs,
        "timing": {
            "eval_test_s": t1 - t0,
            "eval_ood_s": t2 - t1,
            "eval_sharpness_s": t3 - t2,
            "eval_worst_case_s": t4 - t3,
        },
    }
