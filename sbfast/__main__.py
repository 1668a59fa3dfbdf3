"""Command line: ``python -m sbfast run ...`` trains and compares ensembles; ``python -m sbfast info``.

``run`` trains every requested method (default: de, de_sam and sharpbalance on the embedded
digits, about 1.5-2 minutes on 2 busy CPU cores), prints each method's results and one comparison table, and
writes under the output folder (default ``runs/<timestamp>``)::

    <method>/results.json  <method>/metrics.txt  <method>/plot.png
    comparison.json  comparison.txt  comparison.png

Every option left out takes the data set's preset (``sbfast.train.PRESETS``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

QUICK = dict(epochs=5, train_subset=384, test_subset=180, batch_size=32, sharpness_samples=64,
             eval_corruptions=("gaussian_noise", "contrast"), eval_severities=(1, 5))  # fmt: skip

COMPARISON_COLUMNS = ["method", "member_acc", "ensemble_acc", "nll", "ece", "der", "eir", "ood_acc", "sharpness", "wall_s"]


def _parser() -> argparse.ArgumentParser:
    from sbfast import train as T

    p = argparse.ArgumentParser(prog="python -m sbfast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, op backends, devices, trainer components")

    r = sub.add_parser("run", help="train and compare ensembles", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    r.add_argument("--methods", nargs="+", default=list(T.METHODS), choices=T.METHODS)
    r.add_argument("--dataset", default="digits", choices=T.DATASETS)
    r.add_argument("--data-root", help="CIFAR archive or folder (cifar10/cifar100)")
    r.add_argument("--corruption-root", help="CIFAR-10-C/-100-C folder of .npy files (else generated)")
    r.add_argument("--model", help="sbfast.models name (preset: cnn for digits, resnet18 for CIFAR)")
    r.add_argument("--width", type=int, help="model width keyword (cnn, resnet18)")
    r.add_argument("--members", type=int, default=3)
    r.add_argument("--epochs", type=int)
    r.add_argument("--swap-epoch", type=int, help="T_d: phase 1 is epochs 0..T_d (sharpbalance)")
    r.add_argument("--rho", type=float)
    r.add_argument("--ratio", type=float, default=0.5, help="flat_ratio r")
    r.add_argument("--variant", choices=["balance", "boost", "random", "same"])
    r.add_argument("--lr", type=float, default=0.1)
    r.add_argument("--batch-size", type=int)
    r.add_argument("--lr-schedule", choices=T.LR_SCHEDULES, default="step")
    r.add_argument("--no-augment", action="store_true")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--train-subset", type=int)
    r.add_argument("--test-subset", type=int)
    r.add_argument("--corruptions", nargs="*", help="OOD corruption names (none: no OOD evaluation)")
    r.add_argument("--severities", nargs="+", type=int)
    r.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    r.add_argument("--dtype", choices=list(T.DTYPES), default="float32")
    r.add_argument("--backend", choices=T.BACKENDS, default="fast",
                   help="fast: fused optimizer + fast scoring/selection; reference: the reference components")
    r.add_argument("--reference-trainer", action="store_true",
                   help="run sbfast.train.train_ensemble_reference (the slow plain twin) instead")
    r.add_argument("--batching", choices=T.BATCHINGS, default="static")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--cuda-graphs", action="store_true", help="capture full-size steps as CUDA graphs")
    r.add_argument("--threads", type=int, help="torch CPU threads during the run (0 = leave as is)")
    r.add_argument("--output", help="output folder (default runs/<timestamp>)")
    r.add_argument("--quick", action="store_true",
                   help=f"a smoke run in seconds: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    r.add_argument("--no-progress", action="store_true")
    return p


def _config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "dataset": args.dataset, "members": args.members, "ratio": args.ratio, "lr": args.lr,
        "lr_schedule": args.lr_schedule, "seed": args.seed, "dtype": args.dtype, "backend": args.backend,
        "batching": args.batching, "compile": args.compile, "cuda_graphs": args.cuda_graphs,
        "progress": not args.no_progress,
    }  # fmt: skip
    if args.quick:
        kw.update(QUICK)
    optional = {
        "data_root": args.data_root, "corruption_root": args.corruption_root, "model": args.model,
        "epochs": args.epochs, "swap_epoch": args.swap_epoch, "rho": args.rho, "variant": args.variant,
        "batch_size": args.batch_size, "train_subset": args.train_subset, "test_subset": args.test_subset,
        "device": args.device, "num_threads": args.threads,
    }  # fmt: skip
    kw.update({k: v for k, v in optional.items() if v is not None})
    if args.corruptions is not None:
        kw["eval_corruptions"] = tuple(args.corruptions)
    if args.severities is not None:
        kw["eval_severities"] = tuple(args.severities)
    if args.no_augment:
        kw["augment"] = False
    if args.width is not None:
        kw["model_kwargs"] = {"width": args.width}
    return kw


def cmd_run(args: argparse.Namespace) -> int:
    from sbfast import train as T
    from sbfast.metrics import format_table

    base = _config_kwargs(args)
    out = Path(args.output or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    try:
        configs = [T.TrainConfig(method=m, output_dir=str(out / m), **base) for m in args.methods]
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = T.load_data(configs[0])
    c0 = configs[0]
    print(f"sbfast run: {', '.join(args.methods)} on {c0.dataset} (train {len(data.train)}, test {len(data.test)}), "
          f"model {c0.model}, M = {c0.members}, {c0.epochs} epochs, device {c0.resolved_device()}, "
          f"{'reference trainer' if args.reference_trainer else f'backend {c0.backend}, batching {c0.batching}'}")  # fmt: skip
    results = []
    for cfg in configs:
        trainer = T.train_ensemble_reference if args.reference_trainer else T.train_ensemble
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. torch's lr-scheduler order notice
            res = trainer(cfg, data=data)
        results.append(res)
        print(f"\n== {cfg.method} ({res.components.get('optimizer')}, {res.timing['total_s']:.1f} s) ==")
        print(res.table())
    rows = [r.summary() for r in results]
    table = format_table(rows, COMPARISON_COLUMNS)
    print("comparison (test split; ood_acc: ensemble accuracy averaged over the corrupted test sets; "
          "sharpness: mean Fisher score on a fixed training subset)")  # fmt: skip
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.txt").write_text(table + "\n")
    payload = {"rows": rows, "config": {r.config.method: r.config.to_dict() for r in results},
               "components": {r.config.method: r.components for r in results}}  # fmt: skip
    (out / "comparison.json").write_text(json.dumps(payload, indent=1) + "\n")
    T.plot_results(results, out / "comparison.png")
    print(f"\nwrote {out}/ (comparison.txt, comparison.json, comparison.png, <method>/results.json, metrics.txt, plot.png)")
    return 0


def cmd_info() -> int:
    import numpy
    import torch

    import sbfast
    from sbfast import train as T

    print(f"sbfast {sbfast.__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"numpy {numpy.__version__}")  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        return cmd_info()
    return cmd_run(args)


if __name__ == "__main__":
    raise SystemExit(main())
