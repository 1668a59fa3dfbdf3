"""``sbfast eval``, ``sbfast score``, ``sbfast bench`` and ``sbfast info``: what one does with
a finished run, the benchmark table, and what this installation is."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

from sbfast.cli import checks
from sbfast.cli.errors import CliError


def add_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``eval``, ``score``, ``bench`` and ``info`` (the CLI lists this module in
    ``sbfast.cli.SUBCOMMAND_MODULES``)."""
    add_tool_parsers(sub, parents)


def add_tool_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    e = sub.add_parser(
        "eval",
        parents=parents,
        help="recompute a run's metrics from its saved members",
        description="Recompute a finished run's test metrics, diversity, OOD accuracy and mean Fisher score from its "
        "checkpoint, with the run's own config (docs/cli.md). Prints the table; --json writes it.",
    )
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (one that holds config.json and checkpoints/)")
    e.add_argument("--data-root", metavar="PATH", help="where the run's CIFAR data lives now, if it moved")
    e.add_argument("--corruption-root", metavar="PATH", help="where the run's CIFAR-C folder lives now, if it moved")
    e.add_argument("--device", default="cpu", help="device to evaluate on (default: cpu)")
    e.add_argument("--json", metavar="FILE", help="also write the metrics as strict JSON to FILE")
    e.set_defaults(handler=cmd_eval)

    s = sub.add_parser(
        "score",
        parents=parents,
        help="Fisher scores of a run's saved members",
        description="Per-sample Fisher scores s_i = ||grad_w CE(f_w(x_i), y_i)||^2 of every saved member "
        "on the run's training set (eval mode, no augmentation): a float32 array [M, N], written as "
        ".npy or .pt (by the file's extension).",
    )
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (one that holds config.json and checkpoints/)")
    s.add_argument("--output", metavar="FILE", help="FILE.npy or FILE.pt (default RUN_DIR/fisher_scores.npy)")
    s.add_argument("--data-root", metavar="PATH", help="where the run's CIFAR data lives now, if it moved")
    s.add_argument("--device", default="cpu", help="device to score on (default: cpu)")
    s.add_argument(
        "--batch-size", type=int, metavar="N", help="scoring batch size (default: the run's scoring_batch_size)"
    )
    s.set_defaults(handler=cmd_score)

    b = sub.add_parser(
        "bench",
        parents=parents,
        add_help=False,
        help="the benchmark table (python -m bench)",
        description="Runs the bench package of a source checkout: every op against the reference. "
        "Arguments are passed on; see 'sbfast bench --help'.",
    )
    # listed for --help only: main() hands every argument after "bench" to the bench package
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of python -m bench")

    i = sub.add_parser("info", parents=parents, help="versions, op backends, devices, trainer components")
    i.set_defaults(handler=cmd_info)


def _run_config(run_dir: str, **changes: Any) -> Any:
    """The config of a run folder, with ``changes`` (data_root, corruption_root) applied."""
    p = Path(run_dir)
    if not p.is_dir():
        raise CliError(f"RUN_DIR {run_dir!r}: no such folder; expected a run folder (config.json, checkpoints/)")
    try:
        from sbfast.train.run_folder import saved_config
    except ImportError:
        raise CliError("saved runs are not available in this build (sbfast.train.run_folder is missing)") from None
    try:
        config = saved_config(p)  # config.json, or the checkpoint's config where it is gone
    except ValueError as e:
        raise CliError(f"RUN_DIR {run_dir!r}: {e}") from None
    changes = {k: v for k, v in changes.items() if v is not None}
    return checks.build_config({**config.to_dict(), **changes}) if changes else config


def _device(name: str) -> str:
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise CliError(f"--device {name!r}: not a device name; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise CliError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); expected cpu or an existing one"
        )
    if dev.type not in ("cpu", "cuda"):
        raise CliError(f"--device {name}: expected cpu or cuda")
    return name


def cmd_eval(args: argparse.Namespace) -> int:
    from sbfast import train as T
    from sbfast.metrics import format_table
    from sbfast.train.results import shown, summary_row, write_strict_json

    device = _device(args.device)
    if args.json:
        checks.check_output_file(args.json, "--json")  # before the evaluation, which may take long
    config = _run_config(args.run_dir, data_root=args.data_root, corruption_root=args.corruption_root)
    data = checks.load_checked_data(config)
    checks.check_corruption_root(config, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            ev = T.evaluate_run(
                args.run_dir, data_root=args.data_root, corruption_root=args.corruption_root, device=device
            )
        except ValueError as e:
            raise CliError(f"RUN_DIR {args.run_dir!r}: {e}") from None
    row = summary_row(
        config.method,
        ev["metrics"],
        ev.get("diversity"),
        ev.get("ood"),
        ev.get("fisher_mean") or [],
        ev.get("worst_case_sharpness") or [],
    )
    print(f"sbfast eval: {args.run_dir} ({config.method}, {config.dataset}, M = {config.members}) on {device}")
    print(format_table([{k: shown(v) for k, v in row.items()}]))
    if args.json:
        write_strict_json({"run_dir": str(args.run_dir), "summary": row, **ev}, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from sbfast import train as T

    device = _device(args.device)
    if args.batch_size is not None and args.batch_size < 1:
        raise CliError(f"--batch-size {args.batch_size}: expected an integer >= 1")
    config = _run_config(args.run_dir, data_root=args.data_root)
    if args.batch_size is not None:
        config = config.replace(scoring_batch_size=args.batch_size)
    out = Path(args.output) if args.output else Path(args.run_dir) / "fisher_scores.npy"
    checks.check_output_file(out, "--output")  # before the scoring, which may take long
    if out.suffix not in (".npy", ".pt"):
        raise CliError(f"--output {str(out)!r}: expected a file name ending in .npy or .pt")
    data = checks.load_checked_data(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            models = T.load_ensemble(args.run_dir, device=device)
        except ValueError as e:
            raise CliError(f"RUN_DIR {args.run_dir!r}: {e}") from None
    fisher = T.get_components(config.backend).fisher
    dev = torch.device(device)
    rows = [fisher(m, data.train, config=config, device=dev, progress=False).float().cpu() for m in models]
    scores = torch.stack(rows)  # [M, N] float32
    if out.suffix == ".npy":
        np.save(out, scores.numpy())
    else:
        torch.save(scores, out)
    print(f"sbfast score: {args.run_dir} ({config.method}, M = {len(models)}), {scores.shape[1]} training samples")
    for j, r in enumerate(rows):
        print(
            f"  member {j}: mean {float(r.double().mean()):.4f}  median {float(r.median()):.4f}  max {float(r.max()):.4f}"
        )
    print(f"wrote {out} (float32 [{scores.shape[0]}, {scores.shape[1]}], row j = member j, column i = sample index i)")
    return 0


def find_bench_main() -> Any:
    """The bench package's entry point: importable as it is (run from a source checkout), or
    loaded as the package ``bench`` from the checkout this sbfast was installed from in editable
    mode (by its path, without putting the checkout on ``sys.path``)."""
    try:
        from bench.__main__ import main as bench_main

        return bench_main
    except ImportError:
        pass
    import sbfast

    package = Path(sbfast.__file__).resolve().parent.parent / "bench"
    if not (package / "__main__.py").is_file():
        raise CliError("sbfast bench needs a source checkout of sbfast (its bench/ folder); run it from the checkout")
    spec = importlib.util.spec_from_file_location(
        "bench", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
    from bench.__main__ import main as bench_main

    return bench_main


def cmd_info(args: argparse.Namespace) -> int:
    import numpy
    import torch

    import sbfast
    from sbfast import train as T

    print(
        f"sbfast {sbfast.__version__}  python {platform.python_version()}  torch {torch.__version__}  "
        f"numpy {numpy.__version__}"
    )
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    try:
        import sbfast._C  # noqa: F401

        print("sbfast._C: loaded")
    except ImportError as e:
        print(f"sbfast._C: missing ({e})")
    print(f"CPU threads: {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("CUDA: not available")
    print("op backends (per device):")
    for op, where in sbfast.backends().items():
        print(f"  {op}: {where}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comps = T.get_components("fast").names
    print("trainer components (backend 'fast'):")
    for k, v in comps.items():
        print(f"  {k}: {v}")
    return 0


__all__ = ["add_parsers", "add_tool_parsers", "find_bench_main"]
