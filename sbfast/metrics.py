"""Ensemble metrics of the paper (docs/algorithm.md, section 7), OOD summaries and a table printer.

Conventions: ``probs`` is [M, n, C] (M members, n samples, C classes), each row a softmax
output; ``targets`` is [n] int64. Everything is computed in float64 on the CPU (metrics are
off the hot path; this keeps NLL and ECE free of float32 round-off), and returned as Python
floats / lists so results serialise to JSON as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

NLL_EPS = 1e-12  # floor on the true-class ensemble probability before the log: a member set that
# gives a true class exactly 0 yields -log(1e-12) = 27.6 instead of inf.
ECE_BINS = 15
PROB_SUM_TOL = 1e-3  # |sum_c p - 1| allowed per row (float32 softmax / half precision outputs)


def _check_probs(probs: Any, shape_doc: str, dims: int) -> torch.Tensor:
    """probs as float64 on the CPU, after checking: floating, ``dims`` dims, none empty, finite,
    every value in [0, 1] and every row (last dim) summing to 1, within PROB_SUM_TOL."""
    if not isinstance(probs, torch.Tensor):
        probs = torch.as_tensor(probs)
    if not probs.is_floating_point():
        raise TypeError(f"probs must be floating (softmax outputs), got {probs.dtype}")
    if dims == 3 and probs.dim() == 2:
        raise ValueError(
            f"probs must be {shape_doc}, got shape {tuple(probs.shape)}; for a single model use probs.unsqueeze(0)"
        )
    if probs.dim() != dims:
        raise ValueError(f"probs must be {shape_doc}, got shape {tuple(probs.shape)}")
    if probs.numel() == 0:
        raise ValueError(f"probs needs at least one member, sample and class, got shape {tuple(probs.shape)}")
    p = probs.detach().to(device="cpu", dtype=torch.float64)
    finite = torch.isfinite(p)
    if not bool(finite.all()):
        first = int((~finite).reshape(-1).nonzero()[0, 0])
        c = p.shape[-1]
        row, cls = divmod(first, c)
        where = f"member {row // p.shape[1]}, sample {row % p.shape[1]}" if dims == 3 else f"sample {row}"
        count = int((~finite).sum())
        raise ValueError(
            f"probs contains NaN or inf: {where}, class {cls} is {float(p.reshape(-1)[first])} "
            f"({count} non-finite value{'s' if count > 1 else ''} in all)"
        )
    dev = (p.sum(-1) - 1).abs()
    if bool((dev > PROB_SUM_TOL).any()):
        bad = int(dev.argmax())
        rows = p.reshape(-1, p.shape[-1])
        where = f"member {bad // p.shape[1]}, sample {bad % p.shape[1]}" if dims == 3 else f"sample {bad}"
        raise ValueError(
            f"probs rows must sum to 1 (tolerance {PROB_SUM_TOL}): {where} sums to "
            f"{float(rows[bad].sum()):.6f}; pass softmax outputs, not logits"
        )
    lo, hi = float(p.min()), float(p.max())
    if lo < -PROB_SUM_TOL or hi > 1 + PROB_SUM_TOL:
        raise ValueError(f"probs must be in [0, 1] (tolerance {PROB_SUM_TOL}), found values in [{lo:.6g}, {hi:.6g}]")
    return p


def _check_targets(targets: Any, n: int, c: int) -> torch.Tensor:
    """targets as int64 on the CPU, after checking: integer (not bool) [n] in [0, c)."""
    if not isinstance(targets, torch.Tensor):
        targets = torch.as_tensor(targets)
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must be [n] with n = {n} (probs' sample dim), got shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer class indices, got {targets.dtype}")
    t = targets.detach().to(device="cpu", dtype=torch.int64)
    lo, hi = int(targets.min()), int(targets.max())  # before the cast: a uint64 label must not wrap
    if lo < 0 or hi >= c:
        raise ValueError(f"targets must be in [0, {c}), got values in [{lo}, {hi}]")
    return t


def _check_probs_targets(probs: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
    p = _check_probs(probs, "[M, n, C] (members, samples, classes)", 3)
    return p, _check_targets(targets, p.shape[1], p.shape[2])


def _ece(p: torch.Tensor, t: torch.Tensor, n_bins: int) -> float:
    conf, pred = p.max(dim=1)
    correct = (pred == t).to(torch.float64)
    # Right-closed bins (b/B, (b+1)/B]: bucketize against the inner edges k/B (correctly rounded
    # divisions, so a confidence of exactly 0.4 = 6/15 lands in bin 5, not 6); conf 0 -> bin 0.
    edges = torch.arange(1, n_bins, dtype=torch.float64) / n_bins
    idx = torch.bucketize(conf, edges, right=False)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    # sum_b |B_b|/n |acc_b - conf_b| = sum_b |sum_{i in b} correct_i - sum_{i in b} conf_i| / n
    return float((acc_sum - conf_sum).abs().sum() / p.shape[0])


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE of one predictive distribution.

    confidence = max_c p, prediction = argmax_c p; bins B_b = (b/n_bins, (b+1)/n_bins] for
    b = 0..n_bins-1 (a confidence of exactly 0 goes to the first bin);
    ECE = sum_b |B_b|/n * |acc(B_b) - mean conf(B_b)|, empty bins contributing 0.

    Args:
        probs: [n, C] floating probabilities, n >= 1: finite, in [0, 1] and each row summing to 1,
            within ``PROB_SUM_TOL`` (1e-3). targets: [n] integer labels in [0, C). n_bins: int >= 1.
    Raises:
        ValueError / TypeError on wrong shapes or dtypes, rows not summing to 1, values outside
        [0, 1], NaN, labels out of range.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")
    p = _check_probs(probs, "[n, C] (samples, classes)", 2)
    return _ece(p, _check_targets(targets, p.shape[0], p.shape[1]), n_bins)


def ensemble_metrics(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """The paper's in-distribution metrics of an ensemble.

    Args:
        probs: [M, n, C] floating softmax outputs of M members on n samples, none of M, n, C
            zero: finite, in [0, 1] and each row summing to 1, within ``PROB_SUM_TOL`` (1e-3).
        targets: [n] integer labels in [0, C).
    Returns:
        dict with
          * ``member_acc``: list of M floats, accuracy of each member's argmax;
          * ``member_acc_mean``: their mean;
          * ``ensemble_acc``: accuracy of argmax of the mean probability (mean over members);
          * ``ensemble_nll``: mean over samples of -log max(mean_m p_m[y], NLL_EPS) (1e-12);
          * ``ece``: :func:`expected_calibration_error` of the mean probability, 15 bins;
          * ``disagreement``: M x M nested list, share of samples where members i and j have
            different argmax (0 on the diagonal, symmetric);
          * ``mean_disagreement``: mean of d(i, j) over pairs i < j (nan when M = 1);
          * ``der``: mean_disagreement / mean member error (nan when M = 1, or when every member
            is always right, where the ratio is 0/0: no diversity and no error to explain);
          * ``eir``: (mean member error - ensemble error) / mean member error (nan when the mean
            member error is 0);
          * ``num_members``, ``num_samples``.
        Argmax ties go to the lowest class index (torch.argmax).
    Raises:
        ValueError / TypeError on wrong shapes or dtypes, rows not summing to 1, values outside
        [0, 1], NaN, labels out of range.
    """
    p, t = _check_probs_targets(probs, targets)
    m, n, _ = p.shape
    preds = p.argmax(dim=2)  # [M, n]
    member_acc = (preds == t).to(torch.float64).mean(dim=1)  # [M]
    mean_p = p.mean(dim=0)  # [n, C]
    ens_acc = float((mean_p.argmax(dim=1) == t).to(torch.float64).mean())
    true_p = mean_p.gather(1, t[:, None]).squeeze(1).clamp_min(NLL_EPS)
    nll = float(-true_p.log().mean())
    dis = (preds[:, None, :] != preds[None, :, :]).to(torch.float64).mean(dim=2)  # [M, M]
    if m > 1:
        iu = torch.triu_indices(m, m, offset=1)
        mean_dis = float(dis[iu[0], iu[1]].mean())
    else:
        mean_dis = math.nan
    mean_err = 1.0 - float(member_acc.mean())
    ens_err = 1.0 - ens_acc
    der = mean_dis / mean_err if (m > 1 and mean_err > 0) else math.nan
    eir = (mean_err - ens_err) / mean_err if mean_err > 0 else math.nan
    return {
        "member_acc": [float(a) for a in member_acc],
        "member_acc_mean": float(member_acc.mean()),
        "ensemble_acc": ens_acc,
        "ensemble_nll": nll,
        "ece": _ece(mean_p, t, ECE_BINS),
        "disagreement": dis.tolist(),
        "mean_disagreement": mean_dis,
        "der": der,
        "eir": eir,
        "num_members": m,
        "num_samples": n,
    }


def ood_metrics(results: Mapping[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Accuracy under corruption, per (corruption, severity), per severity and overall.

    Args:
        results: {(corruption name: str, severity: int >= 1): (probs [M, n, C], targets [n])},
            e.g. the ensemble's softmax outputs on each set of
            :func:`sbfast.data.make_corrupted_sets`; probs and targets as
            :func:`ensemble_metrics` checks them.
    Returns:
        dict with
          * ``per_set``: list of dicts {corruption, severity, ensemble_acc, member_acc_mean,
            ensemble_nll, n} in the mapping's order;
          * ``per_severity``: {severity: {ensemble_acc, member_acc_mean}}, unweighted means over
            the corruptions at that severity (the benchmark's convention);
          * ``per_corruption``: {name: {ensemble_acc, member_acc_mean}}, means over severities;
          * ``mean``: {ensemble_acc, member_acc_mean} over every (corruption, severity).
    """
    if not isinstance(results, Mapping) or len(results) == 0:
        raise ValueError("results must be a non-empty mapping {(corruption, severity): (probs, targets)}")
    per_set = []
    for key, value in results.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"keys must be (corruption, severity) pairs, got {key!r}")
        name, sev = key
        if not isinstance(name, str):
            raise TypeError(f"corruption name must be a str, got {name!r} in key {key!r}")
        # int() would turn "3" or 2.7 into a severity; only a real int is one.
        if isinstance(sev, bool) or not isinstance(sev, int) or sev < 1:
            raise ValueError(f"severity must be an int >= 1, got {sev!r} in key {key!r}")
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            raise ValueError(f"value for {key!r} must be (probs, targets)")
        try:
            p, t = _check_probs_targets(*value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{key!r}: {exc}") from exc
        preds = p.argmax(2)
        mean_p = p.mean(0)
        per_set.append(
            {
                "corruption": name,
                "severity": sev,
                "ensemble_acc": float((mean_p.argmax(1) == t).to(torch.float64).mean()),
                "member_acc_mean": float((preds == t).to(torch.float64).mean()),
                "ensemble_nll": float(-mean_p.gather(1, t[:, None]).clamp_min(NLL_EPS).log().mean()),
                "n": int(t.numel()),
            }
        )

    def means(rows: list[dict]) -> dict[str, float]:
        return {k: sum(r[k] for r in rows) / len(rows) for k in ("ensemble_acc", "member_acc_mean")}

    severities = sorted({r["severity"] for r in per_set})
    names = list(dict.fromkeys(r["corruption"] for r in per_set))
    return {
        "per_set": per_set,
        "per_severity": {s: means([r for r in per_set if r["severity"] == s]) for s in severities},
        "per_corruption": {c: means([r for r in per_set if r["corruption"] == c]) for c in names},
        "mean": means(per_set),
    }


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, bool) or v is None:
        return str(v) if v is not None else ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return _fmt(v.item(), digits)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x, digits) for x in v) + "]"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """Plain-text table: one row per dict, columns in first-seen key order (or ``columns``).

    Floats print with ``digits`` decimals (nan as "nan"), lists inline, missing keys blank;
    numbers are right-aligned, text left-aligned. An empty ``rows`` gives "".

    Args:
        rows: a list or tuple of mappings. columns: column names (str), or None for every key.
        digits: decimals of floats, an int >= 0.

    Example::

        method  ensemble_acc  der
        ------  ------------  ------
        de            0.9500  0.8000
    """
    if not isinstance(rows, (list, tuple)):
        raise TypeError(f"rows must be a list of dicts, got {type(rows).__name__}")
    bad = next((r for r in rows if not isinstance(r, Mapping)), None)
    if bad is not None:
        raise TypeError(f"every row must be a dict (mapping), got {type(bad).__name__}: {bad!r}")
    if columns is not None and (isinstance(columns, str) or not all(isinstance(c, str) for c in columns)):
        raise TypeError(f"columns must be a sequence of str, got {columns!r}")
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 0:
        raise ValueError(f"digits must be an int >= 0, got {digits!r}")
    if not rows:
        return ""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c), digits) for c in columns] for r in rows]
    numeric = [
        all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows if c in r)
        for c in columns
    ]
    widths = [max(len(str(c)), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]

    def line(vals: Sequence[str], header: bool = False) -> str:
        out = []
        for i, v in enumerate(vals):
            out.append(v.rjust(widths[i]) if numeric[i] and not header else v.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [line([str(c) for c in columns], header=True), line(["-" * w for w in widths], header=True)]
    lines += [line(row) for row in cells]
    return "\n".join(lines)
