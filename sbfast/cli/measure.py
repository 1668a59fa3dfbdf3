"""``sbfast measure RUN_DIR``: the paper's measures of a saved run's members, into
``RUN_DIR/measures.json``.

The members come from :func:`sbfast.load_ensemble`, the data from the run's own config (the
training split with test-time transforms, no augmentation). The release's protocol is the
default sample: T = ``--batches`` (100) batches of B = ``--batch-size`` (5) training samples,
the first T*B positions of ``randperm(N)`` drawn from a generator seeded ``--seed`` (13), in
consecutive batches; every member sees the same batches, and the positions used are written
beside every result. Diversity measures run on the run's test split.

``MEASURES`` is the one table of what can be measured: name -> (function of the members, the
data and the options returning a JSON-ready dict, one-line help, where the function lives). A
measure whose function is not in this build is refused before any work, like an unknown name.

``measures.json`` is strict JSON: {"run_dir", "measures": {name: {"per_member": [...],
"mean": ..., "settings": {...}}}}; measures already in the file are kept unless measured again.
It is written atomically (a temporary file in the folder, then a rename), so an error or Ctrl-C
before the end leaves the folder exactly as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sbfast.cli.errors import CliError

MEASURES_FILE = "measures.json"
RELEASE_SEED = 13  # the release seeds everything with 13 before drawing its sharpness sample
QUICK = {"batches": 10, "batch_size": 5, "probes": 10, "iters": 5, "draws": 10}
DEFAULTS = {"batches": 100, "batch_size": 5, "probes": 100, "iters": 20, "draws": 100}


@dataclass
class MeasureData:
    """What the measures run on: the training batches [(x [B, ...], y [B])] in the members'
    dtype and device, the training positions they hold, and the run's test split."""

    batches: list[tuple[Any, Any]]
    positions: list[int]
    test: tuple[Any, Any]
    corrupted: dict[tuple[str, int], tuple[Any, Any]] | None = None
    layers: list[str] | None = None


def _per_member(results: list[Any], sample: dict[str, Any]) -> dict[str, Any]:
    """{"per_member", "mean", "settings"} from one MeasureResult per member."""
    values = [r.value for r in results]
    if isinstance(values[0], list):
        width = min(len(v) for v in values)
        mean: Any = [math.fsum(v[i] for v in values) / len(values) for i in range(width)]
    else:
        mean = math.fsum(values) / len(values)
    return {"per_member": [r.to_dict() for r in results], "mean": mean, "settings": {**results[0].settings, **sample}}


def _sample(data: MeasureData, opts: argparse.Namespace) -> dict[str, Any]:
    return {"batches": len(data.batches), "batch_size": opts.batch_size, "seed": opts.seed, "positions": data.positions}


def _generator(seed: int) -> Any:
    import torch

    return torch.Generator().manual_seed(seed)


def _fisher(members: Sequence[Any], data: MeasureData, opts: argparse.Namespace, bar: Callable) -> dict[str, Any]:
    from sbfast.measure import fisher_trace

    return _per_member([bar(fisher_trace(m, data.batches)) for m in members], _sample(data, opts))


def _hessian_trace(members: Sequence[Any], data: MeasureData, opts: argparse.Namespace, bar: Callable) -> dict:
    from sbfast.measure import hessian_trace

    rs = [
        bar(hessian_trace(m, data.batches, max_iter=opts.probes, tol=opts.tol, generator=_generator(opts.seed)))
        for m in members
    ]
    return _per_member(rs, _sample(data, opts))


def _hessian_eigenvalues(members: Sequence[Any], data: MeasureData, opts: argparse.Namespace, bar: Callable) -> dict:
    from sbfast.measure import hessian_eigenvalues

    rs = [
        bar(
            hessian_eigenvalues(
                m, data.batches, k=opts.k, max_iter=opts.probes, tol=opts.tol, generator=_generator(opts.seed)
            )
        )
        for m in members
    ]
    return _per_member(rs, _sample(data, opts))


def _ntk(members: Sequence[Any], data: MeasureData, opts: argparse.Namespace, bar: Callable) -> dict[str, Any]:
    from sbfast.measure import ntk_logdet

    return _per_member([bar(ntk_logdet(m, data.batches)) for m in members], _sample(data, opts))


def _worst_case(members: Sequence[Any], data: MeasureData, opts: argparse.Namespace, bar: Callable) -> dict:
    from sbfast.measure import worst_case_sharpness

    rs = [
        bar(worst_case_sharpness(m, data.batches, rho=opts.rho, norm=opts.norm, adaptive=True, n_iters=opts.iters))
        for m in members
    ]
    return _per_member(rs, _sample(data, opts))


def _average_case(members: Sequence[Any], data: MeasureData, opts: argparse.Namespace, bar: Callable) -> dict:
    from sbfast.measure import average_sharpness

    rs = [
        bar(
            average_sharpness(
                m,
                data.batches,
                rho=opts.rho,
                norm=opts.norm,
                adaptive=True,
                n_draws=opts.draws,
                generator=_generator(opts.seed),
            )
        )
        for m in members
    ]
    return _per_member(rs, _sample(data, opts))


def _diversity(name: str) -> Callable[..., dict[str, Any]]:
    def run(members: Sequence[Any], data: MeasureData, opts: argparse.Namespace, bar: Callable) -> dict[str, Any]:
        from sbfast.measure import diversity_report

        sets: dict[Any, tuple[Any, Any]] = {"test": data.test, **(data.corrupted or {})}
        layers: str | list[str] = "blocks" if data.layers == ["blocks"] else (data.layers or [])
        report = diversity_report(list(members), sets, measures=[name], layers=layers)
        for _ in members:
            bar(None)
        settings = {"set": "test", "samples": int(data.test[1].shape[0]), "corrupted_sets": len(data.corrupted or {})}
        if name == "cka" and data.layers:
            settings["layers"] = list(data.layers)
        return {"ensemble": report, "settings": settings}

    return run


# name -> (function, help, the sbfast.measure name it needs)
MEASURES: dict[str, tuple[Callable[..., dict[str, Any]], str, str]] = {
    "fisher": (_fisher, "Fisher trace: mean per-sample squared gradient norm", "fisher_trace"),
    "hessian_trace": (_hessian_trace, "Hutchinson estimate of tr(H), with its standard error", "hessian_trace"),
    "hessian_eigenvalues": (
        _hessian_eigenvalues,
        "top --k Hessian eigenvalues (power iteration)",
        "hessian_eigenvalues",
    ),
    "ntk": (_ntk, "log-determinant of each batch's empirical NTK Gram", "ntk_logdet"),
    "worst_case": (_worst_case, "worst-case adaptive sharpness (APGD) at --rho, --norm", "worst_case_sharpness"),
    "average_case": (_average_case, "average-case adaptive sharpness at --rho, --norm", "average_sharpness"),
    "disagreement": (
        _diversity("disagreement"),
        "prediction disagreement between members (test set)",
        "diversity_report",
    ),
    "kl": (_diversity("kl"), "KL / JS divergence between members' predictions (test set)", "diversity_report"),
    "cka": (_diversity("cka"), "CKA between members' representations (test set)", "diversity_report"),
    "variance": (_diversity("variance"), "bias-variance decomposition of the ensemble (test set)", "diversity_report"),
}
DEFAULT_MEASURES = ("fisher", "hessian_trace", "hessian_eigenvalues", "ntk")


def available(name: str) -> bool:
    """Whether this build has the function a measure needs."""
    return hasattr(importlib.import_module("sbfast.measure"), MEASURES[name][2])


def add_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``measure``."""
    listed = "; ".join(f"{n}: {h}" for n, (_, h, _) in MEASURES.items())
    p = sub.add_parser(
        "measure",
        parents=parents,
        help="the paper's sharpness and diversity measures of a run's saved members",
        description="Measure a finished run's members (docs/measure_curvature.md) and merge the results into "
        f"RUN_DIR/{MEASURES_FILE}. Measures: {listed}.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (one that holds config.json and checkpoints/)")
    p.add_argument(
        "--measures",
        nargs="+",
        default=list(DEFAULT_MEASURES),
        metavar="NAME",
        help=f"which measures (space- or comma-separated; default: {' '.join(DEFAULT_MEASURES)})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a cheap preset: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    p.add_argument("--rho", type=float, default=0.5, help="perturbation radius of the sharpness measures (0.5)")
    p.add_argument("--norm", choices=("l2", "linf"), default="l2", help="perturbation norm (l2)")
    p.add_argument("--iters", type=int, help=f"APGD iterations ({DEFAULTS['iters']})")
    p.add_argument("--draws", type=int, help=f"average-case noise draws per batch ({DEFAULTS['draws']})")
    p.add_argument("--batches", type=int, help=f"T, training batches measured on ({DEFAULTS['batches']})")
    p.add_argument("--batch-size", type=int, help=f"B, samples per batch ({DEFAULTS['batch_size']})")
    p.add_argument("--probes", type=int, help=f"most Hessian-vector products per estimate ({DEFAULTS['probes']})")
    p.add_argument("--tol", type=float, default=1e-3, help="relative tolerance of the Hessian estimates (1e-3)")
    p.add_argument("--k", type=int, default=1, help="how many top Hessian eigenvalues (1)")
    p.add_argument("--seed", type=int, default=RELEASE_SEED, help=f"seed of the sample and probes ({RELEASE_SEED})")
    p.add_argument("--device", default="cpu", help="device to measure on (default: cpu)")
    p.add_argument("--data-root", metavar="PATH", help="where the run's CIFAR data lives now, if it moved")
    p.add_argument(
        "--corrupted",
        action="store_true",
        help="the diversity measures also on the run's corrupted test sets (its eval corruptions x severities; "
        "generated, or read from --corruption-root)",
    )
    p.add_argument(
        "--corruption-root",
        metavar="PATH",
        help="a CIFAR-10-C/-100-C folder (<corruption>.npy, labels.npy) matching the run's test set; implies --corrupted",
    )
    p.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME",
        help="hidden layers whose CKA is measured besides input, logits and softmax: module names, or 'blocks'",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_measure)


def _names(raw: Sequence[str]) -> list[str]:
    names = [n for part in raw for n in part.split(",") if n]
    if not names:
        raise CliError("--measures: expected at least one measure name")
    for n in names:
        if n not in MEASURES:
            raise CliError(f"--measures {n!r}: unknown measure; expected some of {', '.join(MEASURES)}")
        if not available(n):
            raise CliError(f"--measures {n}: not available in this build (sbfast.measure.{MEASURES[n][2]} is missing)")
    return list(dict.fromkeys(names))


def _resolve(args: argparse.Namespace) -> None:
    """Fill the presets in and check every number, before any work."""
    preset = QUICK if args.quick else DEFAULTS
    args.from_preset = {key for key in preset if getattr(args, key) is None}
    for key in args.from_preset:
        setattr(args, key, preset[key])
    for key in ("iters", "draws", "batches", "batch_size", "probes", "k"):
        v = getattr(args, key)
        if v < 1:
            raise CliError(f"--{key.replace('_', '-')} {v}: expected an integer >= 1")
    if not math.isfinite(args.rho) or args.rho <= 0:
        raise CliError(f"--rho {args.rho}: expected a finite number > 0")
    if not math.isfinite(args.tol) or args.tol <= 0:
        raise CliError(f"--tol {args.tol}: expected a finite number > 0")
    if not 0 <= args.seed < 2**63:
        raise CliError(f"--seed {args.seed}: expected an integer in [0, 2**63)")


def _layers(raw: Sequence[str], members: Sequence[Any]) -> list[str]:
    """The --layers names: "blocks", or module names every member has (one line naming a missing
    one and listing the valid names)."""
    names = [n for part in raw for n in part.split(",") if n]
    if names == ["blocks"]:
        return names
    valid = [n for n, _ in members[0].named_modules() if n]
    for n in names:
        if n not in valid:
            shown = ", ".join(valid[:12]) + (", ..." if len(valid) > 12 else "")
            raise CliError(f"--layers {n!r}: the members have no such module; expected 'blocks' or one of {shown}")
    return names


def _device(name: str) -> str:
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise CliError(f"--device {name!r}: not a device name; expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise CliError(f"--device {name}: expected cpu or cuda")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise CliError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def _existing(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CliError(f"{path}: not a readable measures file ({e}); move it away to start a new one") from None
    if not isinstance(old, dict) or not isinstance(old.get("measures", {}), dict):
        raise CliError(f"{path}: not a measures file (expected an object with 'measures'); move it away")
    return old


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def cmd_measure(args: argparse.Namespace) -> int:
    import warnings

    import torch
    from tqdm import tqdm

    from sbfast import train as T
    from sbfast.cli.checks import load_checked_data
    from sbfast.train.results import dumps_strict
    from sbfast.train.run_folder import read_config

    names = _names(args.measures)
    _resolve(args)
    device = _device(args.device)
    run = Path(args.run_dir)
    if not run.is_dir():
        raise CliError(f"RUN_DIR {args.run_dir!r}: no such folder; expected a run folder (config.json, checkpoints/)")
    try:
        config = read_config(run)
    except ValueError as e:
        raise CliError(f"RUN_DIR {args.run_dir!r}: {e}") from None
    if args.data_root is not None:
        config = config.replace(data_root=args.data_root)
    if args.corruption_root is not None:
        config = config.replace(corruption_root=args.corruption_root)
    corrupted = args.corrupted or args.corruption_root is not None
    if corrupted and not config.eval_corruptions:
        raise CliError("--corrupted: the run evaluates no corruptions (its eval_corruptions is empty)")
    out = run / MEASURES_FILE
    old = _existing(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an unfinished run still has members to measure
        try:
            members = T.load_ensemble(run, device=device)
        except ValueError as e:
            raise CliError(f"RUN_DIR {args.run_dir!r}: no members to measure ({e})") from None
    if not members:
        raise CliError(f"RUN_DIR {args.run_dir!r}: the checkpoint holds no members")
    if any(MEASURES[n][2] == "diversity_report" for n in names) and len(members) < 2:
        raise CliError(f"--measures: diversity measures need 2 members or more, the run has {len(members)}")
    data = load_checked_data(config)
    n_train = len(data.train)
    # the training sample is for the sharpness measures; diversity runs on the test split only
    sharp = any(MEASURES[n][2] != "diversity_report" for n in names)
    if args.quick and "batches" in args.from_preset and sharp and args.batch_size <= n_train:
        # --quick's batch count is a smoke run's, not the user's: a small training split gets fewer
        args.batches = min(args.batches, n_train // args.batch_size)
    need = args.batches * args.batch_size if sharp else 0
    if need > n_train:
        raise CliError(
            f"--batches {args.batches} x --batch-size {args.batch_size} = {need} samples, "
            f"the run's training split has {n_train}"
        )
    dtype = next(members[0].parameters()).dtype
    positions = torch.randperm(n_train, generator=_generator(args.seed))[:need]
    batches = []
    for b in range(args.batches if sharp else 0):
        _, x, y = data.train[positions[b * args.batch_size : (b + 1) * args.batch_size]]
        batches.append((x.to(device, dtype), y.to(device)))
    _, tx, ty = data.test[torch.arange(len(data.test))]
    sets = None
    if corrupted and any(MEASURES[n][2] == "diversity_report" for n in names):
        from sbfast.cli.checks import check_corruption_root

        check_corruption_root(config, data)
        sets = {}
        for key, ds in data.corrupted(config.eval_corruptions, config.eval_severities).items():
            _, cx, cy = ds[torch.arange(len(ds))]
            sets[key] = (cx.to(device, dtype), cy.to(device))
    layers = _layers(args.layers, members) if args.layers else None
    measure_data = MeasureData(
        batches, positions.tolist(), (tx.to(device, dtype), ty.to(device)), corrupted=sets, layers=layers
    )

    results: dict[str, Any] = {}
    with tqdm(total=len(names) * len(members), disable=args.no_progress, desc="sbfast measure", unit="member") as pb:
        for name in names:
            pb.set_postfix_str(name)

            def bar(r: Any) -> Any:
                pb.update(1)
                return r

            results[name] = MEASURES[name][0](members, measure_data, args, bar)
    merged = {**old.get("measures", {}), **results}
    doc = {"run_dir": str(run), "members": len(members), "measures": merged}
    _write_atomic(out, dumps_strict(doc) + "\n")
    print(f"sbfast measure: {args.run_dir} ({config.method}, M = {len(members)}), {need} training samples")
    for name in names:
        print(f"  {name}: {_summary(results[name])}")
    print(f"wrote {out}")
    return 0


def _summary(result: dict) -> str:
    """One line per measure: the mean over members for a per-member measure, else the ensemble's
    headline numbers on each data set (the mean of its M x M matrix, DER, EIR, bias^2, variance)."""
    mean = result.get("mean")
    if isinstance(mean, (int, float)):
        return f"mean over members {mean:.6g}"
    if mean is not None:
        return f"mean over members {mean}"
    parts = []
    for set_name, values in result.get("ensemble", {}).get("sets", {}).items():
        for measure, v in values.items():
            if not isinstance(v, dict):
                continue
            shown = {
                k: x for k, x in v.items() if k in ("mean", "der", "eir", "bias2", "variance") and isinstance(x, float)
            }
            if shown:
                parts.append(f"{set_name} {measure} " + " ".join(f"{k} {x:.4g}" for k, x in shown.items()))
    cka = result.get("ensemble", {}).get("cka", {})
    for rep, v in cka.get("representations", {}).items():
        if isinstance(v.get("mean"), float):
            parts.append(f"{cka.get('set', '')} cka {rep} mean {v['mean']:.4g}".strip())
    return "; ".join(parts) if parts else "see measures.json"
