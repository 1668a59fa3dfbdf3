"""Using a finished run again: its members (``load_ensemble``) and its metrics recomputed from
them (``evaluate_run``), from the run folder's newest good checkpoint."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sbfast.models import create_model
from sbfast.train.checkpoint import load_latest
from sbfast.train.config import TrainConfig, thread_limit
from sbfast.train.data import load_data
from sbfast.train.evaluate import evaluate_ensemble
from sbfast.train.results import EnsembleResult
from sbfast.train.run_folder import data_fingerprint
from sbfast.train.steps import get_components

METRIC_KEYS: tuple[str, ...] = ("metrics", "diversity", "ood", "fisher_mean", "worst_case_sharpness")


def _members(payload: dict[str, Any], device: torch.device, run_dir: str | Path) -> list[nn.Module]:
    config = TrainConfig.from_dict(payload["config"])
    pos = payload["position"]
    if pos["epoch"] < config.epochs:
        warnings.warn(
            f"run {run_dir} has not finished training (its checkpoint is in epoch {pos['epoch']} of {config.epochs}): "
            "these are the members as of that checkpoint",
            RuntimeWarning,
            stacklevel=3,
        )
    spec = payload["model"]
    models = []
    for saved in payload["members"]:
        # create_model draws its initial weights from the global RNG: leave the caller's alone
        with torch.random.fork_rng(devices=[]):
            model = create_model(spec["name"], spec["num_classes"], **spec["kwargs"])
        model = model.to(dtype=config.torch_dtype)
        model.load_state_dict(saved["model"])
        models.append(model.to(device).eval())
    return models


def load_ensemble(run_dir: str | Path, device: str | torch.device = "cpu") -> list[nn.Module]:
    """The members of a run, in eval mode on ``device``, from its newest good checkpoint
    (``checkpoints/last.pt``, else ``prev.pt``); the trained ensemble once the run has finished
    (a RuntimeWarning says so when it has not).

    Returns:
        M modules of the run's architecture and dtype (``config.json``), parameters and buffers
        as the run left them; no optimizer is attached.
    Raises:
        CheckpointError (a ValueError) when no checkpoint of the folder is usable.
    """
    _, payload = load_latest(run_dir)
    return _members(payload, torch.device(device), run_dir)


def evaluate_run(
    run_dir: str | Path,
    *,
    data_root: str | None = None,
    corruption_root: str | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Recompute a run's final metrics from its saved members: test metrics, accuracy on the
    corrupted test sets, the members' diversity and each member's mean Fisher score, with the run's own config (data, subsets,
    corruptions, severities, batch sizes, backend, threads).

    Args:
        run_dir: the run folder. data_root / corruption_root: where the data lives now, if it
            moved (the data is checked against the checkpoint's fingerprint). device: where to
            evaluate; on the device the run used (and CPU with its thread count) the numbers
            are the run's own bit for bit.
    Returns:
        {"metrics", "diversity", "ood", "fisher_mean", "worst_case_sharpness"} exactly as the run's results
        file (``EnsembleResult.save``)
        holds them: the same JSON values.
    Raises:
        ValueError (CheckpointError included) for an unusable folder or data that is not the run's.
    """
    _, payload = load_latest(run_dir)
    config = TrainConfig.from_dict(payload["config"])
    changes = {k: v for k, v in (("data_root", data_root), ("corruption_root", corruption_root)) if v is not None}
    if changes:
        config = config.replace(**changes)
    data = load_data(config)
    if data_fingerprint(data) != payload["data"]["fingerprint"]:
        raise ValueError(
            f"the data loaded for run {run_dir} is not the data it trained on: point data_root at the run's data"
        )
    dev = torch.device(device)
    models = _members(payload, dev, run_dir)
    with thread_limit(config.num_threads, dev):
        ev = evaluate_ensemble(models, data, config, dev, get_components(config.backend).fisher)
    result = EnsembleResult(
        config=config,
        metrics=ev["metrics"],
        ood=ev["ood"],
        history=[],
        fisher_mean=ev["fisher_mean"],
        worst_case_sharpness=ev.get("worst_case_sharpness", []),
        diversity=ev["diversity"],
    )
    as_saved = json.loads(result.to_json())  # the results file's own conversion, so the values compare equal
    return {k: as_saved[k] for k in METRIC_KEYS}
