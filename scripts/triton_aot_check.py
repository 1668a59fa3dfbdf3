#!/usr/bin/env python
"""Compile every Triton specialisation that sbfast launches for the GPU, on a machine without one.

The Triton tests run the kernels under the interpreter, which never compiles them; this script
does what the first GPU launch would do. Each specialisation (kernel, argument types and
divisibility hints, constexprs, num_warps) recorded from those tests by
``sbfast.kernels.launch`` (``SBFAST_TRITON_RECORD``) is compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``
for every compute capability asked (default 80 and 90: A100 and H100/H200) down to a cubin by
Triton's own ptxas. Any error fails the run. Per kernel it reports registers and spills from
ptxas (``n_spills`` as Triton defines it: local memory bytes / 4) and the compile time.

    python scripts/triton_aot_check.py                        # the committed specialisations
    python scripts/triton_aot_check.py --record               # re-record them from the Triton tests first
    python scripts/triton_aot_check.py --specs more.jsonl --markdown docs/triton_aot.md

Exit status: 0 when every specialisation compiled for every target, 1 otherwise.
"""

from __future__ import annotations

import os
import sys
import tempfile

# Before triton is imported: a real compile (not the interpreter) into a fresh cache, so that
# ptxas runs, and logs, for every kernel.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sbfast-triton-aot-")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPECS = ROOT / "scripts" / "triton_specializations.jsonl"


@dataclass
class Result:
    kernel: str
    arch: int
    spec: dict
    seconds: float
    n_regs: int | None = None
    n_spills: int | None = None  # local memory bytes / 4, as Triton's CompiledKernel.n_spills
    spill_stores: int | None = None  # bytes
    spill_loads: int | None = None  # bytes
    shared: int | None = None  # bytes of shared memory
    error: str | None = None


def load_specs(paths: list[Path]) -> list[dict]:
    """The distinct specialisations in the given JSON-lines files, in a stable order."""
    seen: dict[str, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                spec = json.loads(line)
                seen.setdefault(json.dumps(spec, sort_keys=True), spec)
    return [seen[k] for k in sorted(seen)]


def with_bf16_twins(specs: list[dict]) -> list[dict]:
    """``specs`` and, for each one with float16 pointers, the same with bfloat16 ones. The Triton
    interpreter's ``tl.dot`` multiplies bfloat16 operands as raw 16-bit patterns, so the tests
    launch the per-sample norm kernels in bfloat16 only on a GPU; their twins stand in for them."""
    seen = {json.dumps(s, sort_keys=True) for s in specs}
    out = list(specs)
    for spec in specs:
        if "*fp16" in spec["signature"].values():
            twin = dict(spec, signature={n: "*bf16" if t == "*fp16" else t for n, t in spec["signature"].items()})
            key = json.dumps(twin, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(twin)
    return out


def record(out: Path) -> None:
    """Run the Triton tests under the interpreter with the launch recorder on; write what they
    launched to ``out`` (sorted, one JSON line per specialisation)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "launches.jsonl"
        env = {**os.environ, "TRITON_INTERPRET": "1", "SBFAST_TRITON_RECORD": str(log)}
        env.pop("TRITON_CACHE_DIR", None)
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "triton",
            "-p",
            "no:cacheprovider",
            "--ignore",
            str(ROOT / "tests" / "test_triton_aot.py"),
            str(ROOT / "tests"),
        ]
        print("recording:", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        specs = load_specs([log])
    out.write_text("".join(json.dumps(s, sort_keys=True) + "\n" for s in specs))
    print(f"recorded {len(specs)} specialisations in {out}")


_REGS = re.compile(r"Used (\d+) registers")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _parse_ptxas(log: str, name: str) -> tuple[int, int, int, int]:
    """(registers, stack frame bytes, spill store bytes, spill load bytes) of entry ``name``."""
    start = log.find(f"Compiling entry function '{name}'")
    if start < 0:
        raise RuntimeError(f"no ptxas report for {name} in:\n{log}")
    section = log[start:]
    regs, stack = _REGS.search(section), _STACK.search(section)
    if regs is None or stack is None:
        raise RuntimeError(f"unreadable ptxas report for {name}:\n{section}")
    return int(regs.group(1)), int(stack.group(1)), int(stack.group(2)), int(stack.group(3))


def compile_one(spec: dict, arch: int) -> Result:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend

    module_name, qualname = spec["kernel"].split(":")
    result = Result(kernel=spec["kernel"], arch=arch, spec=spec, seconds=0.0)
    start = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(module_name), qualname)
        names = list(fn.arg_names)
        missing = set(names) ^ set(spec["signature"])
        if missing:
            raise ValueError(f"recorded arguments differ from the kernel's: {sorted(missing)} (re-record)")
        signature = {n: spec["signature"][n] for n in names}
        constexprs = {n: spec["constexprs"][n] for n in names if n in spec["constexprs"]}
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        attrs = {(names.index(n),): backend.parse_attr(key) for n, key in spec["attrs"].items()}
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs, attrs), target=target, options=dict(spec["options"])
            )
        regs, stack, stores, loads = _parse_ptxas(log.getvalue(), compiled.metadata.name)
        result.n_regs, result.n_spills, result.spill_stores, result.spill_loads = regs, stack // 4, stores, loads
        result.shared = compiled.metadata.shared
    except Exception as exc:  # every failure is reported, and fails the run at the end
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    return result


def _compile_job(job: tuple[dict, int]) -> Result:
    return compile_one(*job)


def _describe(spec: dict) -> str:
    """A short, readable form of a specialisation: pointer dtypes, 1-valued ints, constexprs."""
    pointers = ["/".join(sorted({t[1:] for t in spec["signature"].values() if t.startswith("*")}))]
    consts = [f"{n}={v}" for n, v in spec["constexprs"].items()]
    opts = [f"{k}={v}" for k, v in spec["options"].items()]
    aligned = sum(1 for k in spec["attrs"].values() if "D" in k)
    return " ".join(pointers[:1] + consts + opts + [f"D-hints={aligned}"])


def markdown(results: list[Result], versions: str) -> str:
    by_kernel: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        by_kernel.setdefault((r.kernel, r.arch), []).append(r)
    lines = [
        "| kernel | target | specialisations | registers (min-max) | n_spills (max) | spill stores/loads, bytes (max) "
        "| shared, bytes (max) | compile s (total) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, arch), rs in sorted(by_kernel.items()):
        ok = [r for r in rs if r.error is None]
        if not ok:
            lines.append(f"| `{kernel.split(':')[1]}` | sm_{arch} | {len(rs)} | failed | | | | |")
            continue
        regs = [r.n_regs for r in ok]
        lines.append(
            f"| `{kernel.split(':')[1]}` ({kernel.split(':')[0].rsplit('.', 1)[1]}) | sm_{arch} | {len(rs)}"
            f"{'' if len(ok) == len(rs) else f' ({len(rs) - len(ok)} failed)'} | {min(regs)}-{max(regs)} "
            f"| {max(r.n_spills for r in ok)} | {max(r.spill_stores for r in ok)}/{max(r.spill_loads for r in ok)} "
            f"| {max(r.shared for r in ok)} | {sum(r.seconds for r in rs):.1f} |"
        )
    detail = ["| kernel | target | specialisation | registers | n_spills | compile s |", "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r.kernel, r.arch, _describe(r.spec))):
        name = r.kernel.split(":")[1]
        if r.error:
            detail.append(f"| `{name}` | sm_{r.arch} | {_describe(r.spec)} | error | | {r.seconds:.1f} |")
        else:
            detail.append(
                f"| `{name}` | sm_{r.arch} | {_describe(r.spec)} | {r.n_regs} | {r.n_spills} | {r.seconds:.1f} |"
            )
    return "\n".join(
        [
            f"Compiled with {versions}.",
            "",
            *lines,
            "",
            "<details><summary>Every specialisation</summary>",
            "",
            *detail,
            "",
            "</details>",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--specs",
        type=Path,
        action="append",
        help=f"JSON-lines file(s) of recorded specialisations (default {DEFAULT_SPECS.name})",
    )
    parser.add_argument("--archs", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument(
        "--record",
        action="store_true",
        help=f"first re-record {DEFAULT_SPECS.name} from the Triton tests (interpreter)",
    )
    parser.add_argument("--markdown", type=Path, help="also write the per-kernel table to this file")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes (default: one per CPU)"
    )
    args = parser.parse_args(argv)

    if args.record:
        record(DEFAULT_SPECS)
    specs = with_bf16_twins(load_specs(args.specs or [DEFAULT_SPECS]))
    if not specs:
        print("no specialisations to compile", file=sys.stderr)
        return 1
    archs = [int(a) for a in args.archs.split(",") if a]

    import torch
    import triton

    versions = f"Triton {triton.__version__}, torch {torch.__version__}, Python {platform.python_version()}"
    print(f"{versions}: compiling {len(specs)} specialisations for sm_{', sm_'.join(map(str, archs))}", flush=True)
    results = []
    start = time.perf_counter()
    jobs = [(spec, arch) for spec in specs for arch in archs]
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        for r in pool.imap(_compile_job, jobs, chunksize=4):
            results.append(r)
            status = r.error or f"{r.n_regs} regs, n_spills {r.n_spills}"
            print(
                f"  sm_{r.arch} {r.kernel.split(':')[1]:<28} {_describe(r.spec):<70} {status} ({r.seconds:.1f}s)",
                flush=True,
            )
    failed = [r for r in results if r.error]
    print(f"{len(results) - len(failed)}/{len(results)} compiled in {time.perf_counter() - start:.0f}s")
    table = markdown(results, versions)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    for r in failed:
        print(f"FAILED sm_{r.arch} {r.kernel} {json.dumps(r.spec, sort_keys=True)}\n  {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
