"""The slow end-to-end twin of the trainer, built from :mod:`sbfast.reference` pieces.

Reference SAM over torch.optim.SGD, one shuffled DataLoader per member (the release's random
batches, augmentation as a data-set transform), reference scoring and selection; the members
train one after another within each epoch of one process and meet at the start of epoch
T_d + 1 to share their scores. Data loading, model construction, the LR schedule and the final
evaluation are shared with the fast trainer, so the two differ only in how they train.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from sbfast.data import RandomCropFlip, make_loader
from sbfast.reference import select_sam_masks, train_member_epoch
from sbfast.train.config import as_config, thread_limit
from sbfast.train.data import load_data, member_seeds
from sbfast.train.evaluate import accuracies, evaluate_ensemble, predict_probs
from sbfast.train.results import EnsembleResult
from sbfast.train.run_state import CallbackList, build_member, make_lr_scheduler, progress_bar
from sbfast.train.steps import reference_fisher, reference_optimizer


def train_ensemble_reference(config: Any, callbacks: Sequence[Any] | None = None, *, data: Any = None) -> Any:
    """Section 6 for ``de``, ``de_sam`` and ``sharpbalance``, plainly (see the module docstring).

    Args:
        config: a ``sbfast.train.TrainConfig`` (or a dict of its fields). Its ``backend``,
            ``batching``, ``compile`` and ``cuda_graphs`` are ignored: this twin always runs the
            reference components on the release's random batches, and the returned config says
            so (backend "reference", batching "exact").
        callbacks: as ``sbfast.train.train_ensemble``. data: a ``sbfast.train.TrainData`` to reuse.
    Returns:
        ``sbfast.train.EnsembleResult``. Same seeds as the fast trainer (member j: seed + j for
        its initialisation and batch order, seed + j + AUG_SEED_OFFSET for its augmentation), so
        ``sbfast.train.train_ensemble`` with backend "reference" and batching "exact" gives the
        same parameters.
    """
    config = as_config(config).replace(backend="reference", batching="exact", compile=False, cuda_graphs=False)
    device, dtype = config.check_device(), config.torch_dtype
    cbs = CallbackList(callbacks)
    data = data if data is not None else load_data(config)
    n = len(data.train)
    m_count = config.members
    t_start = time.perf_counter()

    def test_batches() -> Iterator[torch.Tensor]:
        return (x.to(device) for _, x, _ in make_loader(data.test, config.eval_batch_size, shuffle=False))

    with thread_limit(config.num_threads, device):
        models, optimizers, schedulers, loaders = [], [], [], []
        for j in range(m_count):
            model = build_member(config, data, j, device)
            if config.method == "de":
                opt: torch.optim.Optimizer = torch.optim.SGD(
                    model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
                )
            else:
                opt = reference_optimizer(model, config)
            seeds = member_seeds(config, j)
            transform = None
            if config.augment:
                transform = RandomCropFlip(
                    config.augment_pad,
                    seeds["augment"],
                    flip=config.augment_flip,
                    mean=data.train.mean,
                    std=data.train.std,
                )
            models.append(model)
            optimizers.append(opt)
            schedulers.append(make_lr_scheduler(opt, config))
            loaders.append(
                make_loader(data.train.with_transform(transform), config.batch_size, shuffle=True, seed=seeds["order"])
            )
        cbs.call("on_train_start", config, models)

        scores = masks = None
        history = []
        train_s = score_s = eval_s = 0.0
        for epoch in progress_bar(range(config.epochs), config.progress, f"{config.method} [reference trainer]"):
            phase = config.phase_of(epoch)
            cbs.call("on_epoch_start", epoch, phase)
            score_time = None
            if config.method == "sharpbalance" and epoch == config.swap_epoch + 1:
                t0 = time.perf_counter()
                scores = torch.stack(
                    [
                        reference_fisher(m, data.train, config=config, device=device, progress=False).float().cpu()
                        for m in models
                    ]
                )
                seeds_all = [member_seeds(config, j)["init"] for j in range(m_count)]
                masks = select_sam_masks(scores, config.ratio, config.variant, seeds_all)
                score_time = time.perf_counter() - t0
                score_s += score_time
                cbs.call("on_scores", epoch, scores, masks)
            lr = float(optimizers[0].param_groups[0]["lr"])
            t1 = time.perf_counter()
            losses = []
            for j in range(m_count):
                mask = masks[j] if masks is not None else None
                losses.append(
                    train_member_epoch(
                        models[j], optimizers[j], loaders[j], phase, sam_mask=mask, device=device, dtype=dtype
                    )
                )
                schedulers[j].step()
            t2 = time.perf_counter()
            train_s += t2 - t1
            record: dict[str, Any] = {
                "epoch": epoch,
                "phase": phase,
                "lr": lr,
                "train_loss": losses,
                "test_acc": None,
                "ensemble_test_acc": None,
                "time_s": t2 - t1,
                "score_s": score_time,
                "samples_per_s": m_count * n / max(t2 - t1, 1e-12),
            }
            if (epoch + 1) % config.eval_every == 0 or epoch == config.epochs - 1:
                probs = predict_probs(models, test_batches, dtype)
                record["test_acc"], record["ensemble_test_acc"] = accuracies(probs, data.test.y)
            record["eval_s"] = time.perf_counter() - t2
            eval_s += record["eval_s"]
            history.append(record)
            cbs.call("on_epoch_end", epoch, record)

        ev = evaluate_ensemble(models, data, config, device, reference_fisher, test_batches=test_batches)
    timing = {
        "total_s": time.perf_counter() - t_start,
        "train_s": train_s,
        "score_s": score_s,
        "epoch_eval_s": eval_s,
        **ev["timing"],
    }
    components = {
        "optimizer": "torch.optim.SGD" if config.method == "de" else "reference.SAM(torch.optim.SGD)",
        "fisher": "reference.fisher_scores",
        "select": "reference.select_sam_masks",
        "batching": "exact",
        "device": str(device),
        "trainer": "reference.train_ensemble",
    }
    result = EnsembleResult(
        config=config,
        metrics=ev["metrics"],
        ood=ev["ood"],
        history=history,
        fisher_mean=ev["fisher_mean"],
        worst_case_sharpness=ev.get("worst_case_sharpness", []),
        diversity=ev["diversity"],
        scores=scores,
        masks=masks,
        timing=timing,
        components=components,
        models=models,
        probs=ev["probs"],
    )
    cbs.call("on_train_end", result)
    if config.output_dir:
        result.save(config.output_dir)
    return result
