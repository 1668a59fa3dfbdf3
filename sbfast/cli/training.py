"""``sbfast compare`` (alias ``run``), ``sbfast train`` and ``sbfast tradeoff`` (a sweep of rho): build the
configs from the flags, check everything before the first epoch, train, print and save."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sbfast.cli import checks
from sbfast.cli.errors import CliError
from sbfast.cli.flags import add_config_flags, config_overrides, read_config_file
from sbfast.train.compare import MAIN_JOB, MAIN_SEEDS, QUICK, QUICK_SEEDS
from sbfast.train.config import METHODS
from sbfast.train.tradeoff import TRADEOFF_JOB, TRADEOFF_RHOS, TRADEOFF_SB_RHOS, TRADEOFF_SEEDS

COMPARE_HELP = f"""\
Train and compare the methods (default: de, de_sam and sharpbalance) with the same seeds on one
data set, then print mean ± standard deviation over seeds of every metric and the paired
differences between methods, and write the comparison's JSON, text and figures.

The main job, `sbfast compare` without flags, runs on the embedded digits data with seeds
{" ".join(map(str, MAIN_SEEDS))} and {", ".join(f"{k}={v}" for k, v in MAIN_JOB.items())} (its defaults on digits, shown
below), so that each member makes enough test errors for DER and EIR to mean something.

Precedence: TrainConfig defaults and dataset presets < the main job's digits defaults (or
--quick) < --config FILE < flags. Output folder (default runs/compare-<timestamp>):
  comparison.txt, comparison.json, comparison.png, curves.png, sharpness_diversity.png,
  <method>/seed<k>/  one run folder per method and seed (docs/cli.md).
"""

TRAIN_HELP = """\
Train one ensemble with one method and write its run folder (default runs/train-<method>-<timestamp>):
config.json, log.csv, checkpoints/, results.json, metrics.txt, plot.png (docs/cli.md).

  sbfast train --method de_sam --epochs 40
  sbfast train --resume RUN_DIR                       continue a stopped run from its checkpoint
  sbfast train --from-phase1 RUN_DIR --ratio 0.3      sharpbalance from a de_sam run's phase 1

Precedence: TrainConfig defaults and dataset presets < --quick < --config FILE < flags.
"""


# Earlier spellings of some flags (the first command line's), kept so that old commands still run.
OLD_NAMES = {"eval_corruptions": ["--corruptions"], "eval_severities": ["--severities"], "num_threads": ["--threads"]}


def _common_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run options")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="JSON file of TrainConfig fields, e.g. a run's config.json or "
        "results.json (its output/resume folders are ignored); flags override it",
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in seconds: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    g.add_argument(
        "--width",
        type=int,
        metavar="N",
        help="shortcut for --model-kwargs '{\"width\": N}' (cnn, resnet18, resnet18_tiny, resnet18_imagenet)",
    )
    g.add_argument(
        "--reference-trainer",
        action="store_true",
        help="train with sbfast.train.train_ensemble_reference, the slow plain-PyTorch twin",
    )


def add_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``compare`` (and its old name ``run``), ``train`` and ``tradeoff`` (the CLI lists this module
    in ``sbfast.cli.SUBCOMMAND_MODULES``)."""
    add_compare_parser(sub, parents)
    add_train_parser(sub, parents)
    add_tradeoff_parser(sub, parents)


def add_compare_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "compare",
        aliases=["run"],
        parents=parents,
        help="train and compare methods over seeds (the main job)",
        description=COMPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("comparison")
    g.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="METHOD",
        help=f"methods to compare, from {', '.join(METHODS)} (TrainConfig.method, one per run; default: all)",
    )
    g.add_argument(
        "--seeds",
        "--seed",
        nargs="+",
        type=int,
        metavar="N",
        help="seeds; every method runs with each (TrainConfig.seed, one per run; default "
        f"{' '.join(map(str, MAIN_SEEDS))}, with --quick {' '.join(map(str, QUICK_SEEDS))})",
    )
    g.add_argument(
        "--output",
        "--output-dir",
        dest="output",
        metavar="PATH",
        help="folder of the comparison (TrainConfig.output_dir of each run is PATH/<method>/seed<k>; "
        "default runs/compare-<timestamp>)",
    )
    g.add_argument(
        "--diversity",
        choices=("der", "disagreement", "kl", "cka"),
        default="der",
        help="the diversity measure on the y axis of sharpness_diversity.png (default der; cka is a "
        "similarity: lower is more diverse)",
    )
    g.add_argument(
        "--no-fork",
        action="store_true",
        help="train sharpbalance's phase 1 itself instead of starting from de_sam's (same numbers, slower)",
    )
    _common_run_flags(p)
    add_config_flags(
        p,
        exclude=("method", "seed", "output_dir", "resume", "from_phase1"),
        aliases=OLD_NAMES,
        defaults={k: f"{v} on digits" for k, v in MAIN_JOB.items()},
    )
    p.set_defaults(handler=cmd_compare)


def add_train_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        parents=parents,
        help="train one method (also resume a run, or fork from phase 1)",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_run_flags(p)
    add_config_flags(p, aliases={"output_dir": ["--output"], **OLD_NAMES})
    p.set_defaults(handler=cmd_train)


def _fields(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    """base (quick / main job) < --config file < flags; --width into model_kwargs. A
    comparison's file is a config only for ``compare`` (its runs' shared config)."""
    fields = dict(base)
    chosen: set[str] = set()
    if args.config:
        from_file = read_config_file(args.config, comparison=args.command in ("compare", "run"))
        fields.update(from_file)
        chosen |= set(from_file)
    given = config_overrides(args)
    fields.update(given)
    chosen |= set(given)
    if args.width is not None:
        fields["model_kwargs"] = {**dict(fields.get("model_kwargs") or {}), "width": args.width}
    if args.quick:
        fields = checks.fit_quick_subsets(fields, chosen)
    return fields


class _Started:
    """Whether training has begun (set by the callback of :func:`_callback`): a ValueError
    before it is a bad argument or folder (exit 2), after it a failure of the run."""

    def __init__(self) -> None:
        self.started = False

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Run training inside: a ValueError/TypeError before training began is a bad input
        (one CliError line, exit 2); after it, the run's own failure. Torch's UserWarnings
        (e.g. the LR scheduler's order notice) are silenced."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                yield
            except (ValueError, TypeError) as e:
                if not self.started:
                    raise CliError(str(e)) from None
                raise


def _callback(started: _Started) -> Any:
    from sbfast.train import Callback

    class _OnStart(Callback):
        def on_train_start(self, config: Any, models: Any) -> None:
            started.started = True

    return _OnStart()


def _trainer(args: argparse.Namespace) -> Any:
    from sbfast import train as T

    return T.train_ensemble_reference if args.reference_trainer else T.train_ensemble


def _tracked_trainer(args: argparse.Namespace) -> tuple[_Started, Any]:
    """The trainer the flags pick, wrapped so that ``started`` knows when training began."""
    started = _Started()
    trainer = _trainer(args)

    def tracked(cfg: Any, **kw: Any) -> Any:
        return trainer(cfg, [_callback(started)], **kw)

    return started, tracked


def _cell(v: Any) -> str:
    """A number in a progress line: 4 decimals, "-" where undefined."""
    return "-" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _describe(cfg: Any, data: Any) -> str:
    td = f", T_d {cfg.swap_epoch}" if cfg.method == "sharpbalance" or cfg.method == "de_sam" else ""
    return (
        f"{cfg.dataset} (train {len(data.train)}, test {len(data.test)}), model {cfg.model}, M = {cfg.members}, "
        f"{cfg.epochs} epochs{td}, device {cfg.resolved_device()}, backend {cfg.backend}, batching {cfg.batching}"
    )


def cmd_compare(args: argparse.Namespace) -> int:
    from sbfast.train.compare import run_comparison, run_order

    base: dict[str, Any] = dict(QUICK) if args.quick else {}
    fields = _fields(args, base)
    if fields.get("dataset", "digits") == "digits" and not args.quick:
        for k, v in MAIN_JOB.items():
            fields.setdefault(k, v)
    seeds = args.seeds if args.seeds is not None else list(QUICK_SEEDS if args.quick else MAIN_SEEDS)
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise CliError(f"--seeds {' '.join(map(str, seeds))}: expected distinct integers >= 0")
    methods = run_order(args.methods)
    configs = [checks.build_config({**fields, "method": m, "seed": s}) for m in methods for s in seeds]
    data = checks.preflight(configs)
    out = (
        checks.check_output_dir(Path(args.output), empty=True)
        if args.output
        else checks.new_run_dir("runs", "compare-")
    )
    base_cfg = configs[0]
    print(f"sbfast compare: {', '.join(methods)} x seeds {' '.join(map(str, seeds))} on {_describe(base_cfg, data)}")
    print(f"writing {out}/", flush=True)

    def on_run(record: dict[str, Any], result: Any) -> None:
        m = record["metrics"]
        cells = "  ".join(f"{k} {_cell(m.get(k))}" for k in ("ensemble_acc", "member_acc", "der", "eir", "kl", "cka"))
        print(
            f"  {record['method']:<13} seed {record['seed']}: {cells}  ood_acc {_cell(m.get('ood_acc'))}  "
            f"({m.get('wall_s') or 0:.1f} s)",
            flush=True,
        )

    started, tracked = _tracked_trainer(args)
    with started.guard():
        comp = run_comparison(
            base_cfg,
            methods,
            seeds,
            out,
            data=data,
            trainer=tracked,
            fork_phase1=not args.no_fork and not args.reference_trainer,
            on_run=on_run,
            diversity=args.diversity,
        )
    print()
    print(comp.report())
    print(
        f"\nwrote {out}/ (comparison.txt, comparison.json, comparison.png, curves.png, sharpness_diversity.png, "
        f"<method>/seed<k>/); {comp.timing['total_s']:.0f} s"
    )
    return 0


def _phase1_config(source: str) -> dict[str, Any]:
    """The config of the run whose phase 1 a fork starts from (its folder or its phase1.pt)."""
    from sbfast.train.checkpoint import load_checkpoint, phase1_path

    try:
        payload = load_checkpoint(phase1_path(source))
    except (ValueError, OSError) as e:
        raise CliError(f"--from-phase1 {source}: {e}") from None
    return {k: v for k, v in payload["config"].items() if k not in ("output_dir", "resume", "from_phase1")}


def cmd_train(args: argparse.Namespace) -> int:
    from sbfast import train as T
    from sbfast.distributed.launch import quiet_unless_rank0

    quiet_unless_rank0()  # under torchrun every rank runs this command; rank 0 reports

    given = config_overrides(args)
    resume = given.get("resume")
    started = _Started()
    if resume is not None:
        if args.config or args.quick or args.width is not None:
            raise CliError("--resume takes the run's own config.json; --config, --quick and --width do not apply")
        from sbfast.train.run_folder import saved_config

        try:
            run_dir = T.check_output_dir(resume, resume=True)
            saved = saved_config(run_dir)  # config.json, or the checkpoint's config where it is gone
        except ValueError as e:
            raise CliError(f"--resume {resume}: {e}") from None
        checks.preflight(
            [checks.build_config({**saved.to_dict(), **given, "resume": None, "output_dir": str(run_dir)})]
        )
        print(f"sbfast train: resuming {run_dir}", flush=True)
        requested = {k: v for k, v in given.items() if k != "resume"}
        with started.guard():
            result = T.train_ensemble(requested, [_callback(started)], resume=str(run_dir))
        _print_result(result, run_dir)
        return 0

    base: dict[str, Any] = dict(QUICK) if args.quick else {}
    if given.get("from_phase1") is not None and not args.config:
        base.update(_phase1_config(given["from_phase1"]))
        base["method"] = "sharpbalance"
    fields = _fields(args, base)
    cfg = checks.build_config(fields)
    data = checks.preflight([cfg])
    if cfg.output_dir:
        out = checks.check_output_dir(Path(cfg.output_dir))
    else:
        out = checks.new_run_dir("runs", f"train-{cfg.method}-")
    cfg = cfg.replace(output_dir=str(out))
    print(f"sbfast train: {cfg.method} on {_describe(cfg, data)}")
    print(f"writing {out}/", flush=True)
    with started.guard():
        result = _trainer(args)(cfg, [_callback(started)], data=data)
    _print_result(result, out)
    return 0


def _print_result(result: Any, out: Path) -> None:
    print(
        f"\n== {result.config.method} ({result.components.get('optimizer')}, {result.timing.get('total_s', 0):.1f} s) =="
    )
    print(result.table())
    print(f"wrote {out}/")
    sys.stdout.flush()


QUICK_TRADEOFF_RHOS = (0.05, 0.2)
QUICK_TRADEOFF_SB_RHOS = (0.2,)
QUICK_TRADEOFF_SEEDS = (0, 1)


def _show_rhos(xs: Any) -> str:
    return " ".join(f"{x:g}" for x in xs)


TRADEOFF_HELP = f"""\
Train de (rho 0), de_sam at each --rhos and sharpbalance at each --sharpbalance-rhos (its
phase 1 is de_sam's at the same rho, trained once), with every seed; measure each member's
worst-case adaptive sharpness (at --worst-case-rho, the same for every run) and each ensemble's
DER, disagreement, KL, EIR and accuracy; print the table and write tradeoff.txt,
tradeoff.json and tradeoff.png (sharpness x; DER, disagreement, KL, EIR y) into --output.

Defaults on the embedded digits: rhos {_show_rhos(TRADEOFF_RHOS)}, sharpbalance rhos {_show_rhos(TRADEOFF_SB_RHOS)},
seeds {_show_rhos(TRADEOFF_SEEDS)}, {", ".join(f"{k}={v}" for k, v in TRADEOFF_JOB.items())} (minutes on 2 CPU cores).
--quick: rhos {_show_rhos(QUICK_TRADEOFF_RHOS)}, sharpbalance {_show_rhos(QUICK_TRADEOFF_SB_RHOS)}, seeds {_show_rhos(QUICK_TRADEOFF_SEEDS)} and the smoke config.

Resumable: the same command on the same --output continues a stopped sweep (finished runs are
read back, a stopped run resumes from its checkpoint); other settings on that folder are refused.
Runs: <output>/de/seed<k>/, <output>/<method>/rho<r>/seed<k>/.
"""


def add_tradeoff_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tradeoff",
        parents=parents,
        help="the sharpness-diversity trade-off over a sweep of rho, measured on trained ensembles",
        description=TRADEOFF_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("sweep")
    g.add_argument("--rhos", nargs="+", type=float, metavar="R", help="de_sam's SAM radii (> 0)")
    g.add_argument(
        "--sharpbalance-rhos",
        nargs="*",
        type=float,
        metavar="R",
        help="radii of sharpbalance runs, each one of --rhos (none: no sharpbalance)",
    )
    g.add_argument("--seeds", nargs="+", type=int, metavar="N", help="seeds; every point runs with each")
    g.add_argument(
        "--output",
        default="runs/tradeoff",
        metavar="DIR",
        help="folder of the sweep (default runs/tradeoff; the same folder continues a stopped sweep)",
    )
    _common_run_flags(p)
    add_config_flags(
        p,
        exclude=("method", "rho", "seed", "output_dir", "resume", "from_phase1"),
        aliases=OLD_NAMES,
        defaults={k: f"{v} on digits" for k, v in TRADEOFF_JOB.items()},
    )
    p.set_defaults(handler=cmd_tradeoff)


def cmd_tradeoff(args: argparse.Namespace) -> int:
    from sbfast.train.tradeoff import check_sweep, check_tradeoff_dir, run_tradeoff, sweep_runs
    from sbfast.train.tradeoff import sweep_plan as plan_of

    if args.reference_trainer:
        raise CliError(
            "--reference-trainer: sbfast tradeoff forks sharpbalance from de_sam's phase 1 and resumes stopped "
            "runs, which the reference twin cannot; it is for compare and train"
        )
    fields = _fields(args, dict(QUICK) if args.quick else {})
    if fields.get("dataset", "digits") == "digits" and not args.quick:
        for k, v in TRADEOFF_JOB.items():
            fields.setdefault(k, v)
    rhos = args.rhos if args.rhos is not None else list(QUICK_TRADEOFF_RHOS if args.quick else TRADEOFF_RHOS)
    sb = args.sharpbalance_rhos
    if sb is None:
        sb = [r for r in (QUICK_TRADEOFF_SB_RHOS if args.quick else TRADEOFF_SB_RHOS) if r in rhos]
    seeds = args.seeds if args.seeds is not None else list(QUICK_TRADEOFF_SEEDS if args.quick else TRADEOFF_SEEDS)
    try:
        check_sweep(rhos, sb, seeds)
    except ValueError as e:
        raise CliError(str(e).replace("rhos must", "--rhos must").replace("seeds must", "--seeds must")) from None
    runs = sweep_runs(rhos, sb, seeds)
    configs = [checks.build_config({**fields, "method": m, "rho": r, "seed": s}) for m, r, s in runs]
    data = checks.preflight(configs)
    out = Path(args.output)
    base = configs[0]
    try:
        continuing = check_tradeoff_dir(out, plan_of(base, [float(r) for r in rhos], [float(r) for r in sb], seeds))
    except ValueError as e:
        raise CliError(str(e)) from None
    if not continuing:
        checks.check_output_dir(out, empty=True)
    print(
        f"sbfast tradeoff: de, de_sam at rho {_show_rhos(rhos)}"
        + (f", sharpbalance at rho {_show_rhos(sb)}" if sb else "")
        + f" x seeds {' '.join(map(str, seeds))}: {len(runs)} runs on {base.dataset}, model {base.model}, "
        f"M = {base.members}, {base.epochs} epochs; worst-case sharpness at rho {base.worst_case_rho}"
    )
    print(f"{'continuing' if continuing else 'writing'} {out}/", flush=True)

    def on_run(point: dict[str, Any], i: int, n: int) -> None:
        m = point["metrics"]
        cells = "  ".join(f"{k} {_cell(m.get(k))}" for k in ("der", "disagreement", "kl", "eir", "ensemble_acc"))
        print(
            f"  [{i + 1}/{n}] {point['method']:<12} rho {point['rho']:<5g} seed {point['seed']}: {point['how']:<7} "
            f"worst-case {_cell(m.get('worst_case_sharpness'))}  {cells}",
            flush=True,
        )

    started, tracked = _tracked_trainer(args)
    try:
        with started.guard():
            result = run_tradeoff(base, rhos, sb, seeds, out, data=data, trainer=tracked, on_run=on_run)
    except KeyboardInterrupt:  # the stopped run has saved its checkpoint; the sweep goes on from it
        print(f"sbfast tradeoff: stopped; the same command with --output {out} continues the sweep", file=sys.stderr)
        raise
    print()
    print(result.report())
    print(f"\nwrote {out}/ (tradeoff.txt, tradeoff.json, tradeoff.png, run folders); {result.timing['total_s']:.0f} s")
    return 0


__all__ = ["OLD_NAMES", "add_compare_parser", "add_parsers", "add_tradeoff_parser", "add_train_parser"]
