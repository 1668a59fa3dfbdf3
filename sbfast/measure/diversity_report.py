"""Every diversity measure of an ensemble on every data set, as one JSON-ready dict.

One prediction pass per member and data set (:func:`sbfast.measure.predictions`), then
arithmetic on the cached [M, n, C] tensors: disagreement (+ DER, EIR), KL and JS, bias-variance
(probabilities by default, logits as the release), and member-against-member CKA on one data set.
When hidden layers are asked for, their forward (with hooks) on the CKA set is that set's
prediction pass too, so the count stays one forward per member and data set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sbfast.measure.disagreement import disagreement_of_labels, disagreement_ratios, mean_pairwise
from sbfast.measure.divergence import js_divergence, kl_divergence
from sbfast.measure.member_cka import DEFAULT_MINIBATCH, member_cka
from sbfast.measure.predictions import (
    DEFAULT_BATCH,
    DataKey,
    SetPredictions,
    check_data,
    check_members,
    key_name,
    run_predictions,
    use_stacked,
)
from sbfast.measure.variance import DEFAULT_SPACE, SPACES, bias_variance, variance_outputs

MEASURES = ("disagreement", "kl", "cka", "variance")


def _num(v: float) -> float | None:
    """A float for strict JSON: NaN / inf (a ratio with a zero denominator) become None."""
    return v if math.isfinite(v) else None


def _matrix(t: torch.Tensor) -> list[list[float | None]]:
    """Nested lists; a NaN (CKA of a constant representation: 0/0) becomes None."""
    return [[_num(v) for v in row] for row in t.detach().cpu().tolist()]


def _off_diagonal_mean(t: torch.Tensor) -> torch.Tensor:
    mask = ~torch.eye(t.shape[0], dtype=torch.bool, device=t.device)
    return t[mask].mean()


def _set_measures(pred: SetPredictions, measures: Sequence[str], variance_space: str) -> dict[str, Any]:
    out: dict[str, Any] = {"n": int(pred.targets.shape[0])}
    if "disagreement" in measures:
        dis = disagreement_of_labels(pred.probs.argmax(-1))
        ratios = disagreement_ratios(pred.probs, pred.targets)
        out["disagreement"] = {
            "matrix": _matrix(dis),
            "mean": float(mean_pairwise(dis)),
            **{k: _num(v) for k, v in ratios.items() if k != "mean_disagreement"},
        }
    if "kl" in measures:
        kl = kl_divergence(pred.probs)
        sym = (kl + kl.T) / 2
        js = js_divergence(pred.probs)
        out["kl"] = {
            "matrix": _matrix(kl),
            "mean": float(_off_diagonal_mean(kl)),
            "symmetric": _matrix(sym),
            "symmetric_mean": float(mean_pairwise(sym)),
        }
        out["js"] = {"matrix": _matrix(js), "mean": float(mean_pairwise(js))}
    if "variance" in measures:
        spaces = {}
        for space in SPACES:
            bv = bias_variance(variance_outputs(pred.logits, space), pred.targets)
            spaces[space] = {"bias2": float(bv.bias2), "variance": float(bv.variance), "mse": float(bv.mse)}
        out["variance"] = {"space": variance_space, **spaces[variance_space], **spaces}
    return out


def diversity_report(
    members: Sequence[nn.Module],
    data: Mapping[DataKey, tuple[torch.Tensor, torch.Tensor]],
    *,
    measures: Sequence[str] = MEASURES,
    layers: str | Sequence[str] = (),
    clean: str = "test",
    cka_set: DataKey | None = None,
    cka_kernel: str = "linear",
    cka_minibatch: int | None = DEFAULT_MINIBATCH,
    variance_space: str = DEFAULT_SPACE,
    batch_size: int = DEFAULT_BATCH,
    stack: bool | None = None,
) -> dict[str, Any]:
    """All diversity measures of M >= 2 members on every data set, as plain JSON-ready values.

    Args:
        members: M >= 2 nn.Modules (eval mode is set and restored) on one device.
        data: {key: (x, y)}: names, and (corruption, severity) keys for copies of ``clean``.
        measures: any of "disagreement" (matrix, mean, DER, EIR), "kl" (KL both directions,
            symmetric KL, and the Jensen-Shannon form as "js"), "cka", "variance".
        layers: hidden layers for CKA (module names or "blocks"), besides input/logits/softmax.
        clean: the clean set's key. cka_set: the set CKA runs on (default ``clean`` if present,
            else the first set). cka_kernel: "linear" or "rbf". cka_minibatch: minibatch size
            of the unbiased estimator, or None for the full-batch biased one (the release's).
        variance_space: "probs" (default) or "logits": which decomposition is headlined; both
            are reported.
        batch_size: forward batch. stack: see :func:`sbfast.measure.predictions`.
    Returns:
        {"num_members", "measures", "sets": {name: {"n", "disagreement", "kl", "js",
        "variance"}}, "corrupted_mean": means over the (corruption, severity) sets,
        "cka": {"set", "estimator", "representations": {name: {"matrix", "mean"}}}}; matrices
        are M x M nested lists, means over pairs i < j (KL's "mean": over i != j); a ratio
        with a zero denominator is None. Set names of corrupted sets are "corruption/severity".
    Raises:
        TypeError / ValueError before any forward (see the functions it calls).
    """
    members = check_members(members)
    if len(members) < 2:
        raise ValueError(f"diversity measures are pairwise: they need at least 2 members, got {len(members)}")
    bad = [m for m in measures if m not in MEASURES] if not isinstance(measures, str) else [measures]
    if bad or not measures:
        raise ValueError(f"measures must be a non-empty list of {MEASURES}, got {list(measures)!r}")
    if variance_space not in SPACES:
        raise ValueError(f"variance_space must be one of {SPACES}, got {variance_space!r}")
    sets = check_data(data, clean)
    cka_key = cka_set if cka_set is not None else (clean if clean in sets else next(iter(sets)))
    if "cka" in measures and cka_key not in sets:
        raise ValueError(f"cka_set {cka_key!r} is not in data; found {[key_name(k) for k in sets]}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    stacked = use_stacked(members, stack)
    report: dict[str, Any] = {"num_members": len(members), "measures": list(measures)}
    cache: dict[DataKey, SetPredictions] = {}
    if "cka" in measures:
        x, y = sets[cka_key]
        hidden = layers if isinstance(layers, str) else list(layers)
        result = member_cka(
            members, x, layers=hidden, kernel=cka_kernel, minibatch=cka_minibatch, batch_size=batch_size
        )
        # member_cka ran the members on this set (no logits were passed in): that forward is
        # the set's prediction pass, so it is not run again
        device = result.logits.device
        cache[cka_key] = SetPredictions(result.logits, result.logits.softmax(-1), y.to(device, torch.int64))
    rest = {k: v for k, v in sets.items() if k not in cache}
    if rest:
        cache.update(run_predictions(members, rest, batch_size=batch_size, stacked=stacked))
    report["sets"] = {key_name(k): _set_measures(cache[k], measures, variance_space) for k in sets}
    corrupted = [key_name(k) for k in sets if isinstance(k, tuple)]
    if corrupted:
        summary: dict[str, Any] = {"num_sets": len(corrupted)}
        for measure, field in (
            ("disagreement", "mean"),
            ("kl", "symmetric_mean"),
            ("js", "mean"),
            ("variance", "variance"),
        ):
            if measure in report["sets"][corrupted[0]]:
                summary[measure] = sum(report["sets"][c][measure][field] for c in corrupted) / len(corrupted)
        report["corrupted_mean"] = summary
    if "cka" in measures:
        report["cka"] = {
            "set": key_name(cka_key),
            "estimator": result.estimator,
            "representations": {
                name: {"matrix": _matrix(mat), "mean": _num(float(mean_pairwise(mat)))}
                for name, mat in result.matrices.items()
            },
        }
    return report
