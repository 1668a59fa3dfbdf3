"""fisher_scores: per-sample squared gradient norms of the paper's model, the width-64 CIFAR
ResNet18 with 100 classes on 32x32 inputs (11.2M parameters).

Rows (samples/s over one batch of N samples):
* reference: ``sbfast.reference.fisher_scores``, vmap(grad) in batches of 16, as the release;
* sbfast fisher_scores: one forward + one backward of the batch, per-layer identities;
* plain fwd+bwd: one ordinary forward + backward of the same batch (eval mode, mean CE, weight
  gradients): the floor the issue measures against.
Peak memory of one call of each (CPU: growth of the process's peak RSS, each method in a fresh
subprocess; CUDA: torch.cuda.max_memory_allocated) goes into the rows' ``extra`` when
SBFAST_BENCH_MEMORY=1. Target on CPU: sbfast >= 0.8x the plain pass's throughput.

``python -m bench --ops sharpness`` prints the table; ``python -m bench.bench_sharpness`` prints
the three rows with their memory and the ratios.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from bench.harness import BenchCase, pytest_params, run_pytest_benchmark, time_ms
from sbfast import reference
from sbfast.models import create_model
from sbfast.sharpness import fisher_scores

CLASSES = 100
REFERENCE_BATCH = 16  # the release's vmap batch


def batch_size(device: torch.device) -> int:
    return 64 if device.type == "cpu" else 512


def _setup(device: torch.device, n: int):
    torch.manual_seed(0)
    model = create_model("resnet18", CLASSES).to(device).eval()
    x = torch.randn(n, 3, 32, 32, device=device)
    y = torch.randint(0, CLASSES, (n,), device=device)
    return model, x, y


def _methods(model, x, y):
    n = len(x)
    ref_batches = [
        (torch.arange(i, min(n, i + REFERENCE_BATCH)), x[i : i + REFERENCE_BATCH], y[i : i + REFERENCE_BATCH])
        for i in range(0, n, REFERENCE_BATCH)
    ]

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    return {
        "reference": lambda: reference.fisher_scores(model, ref_batches),
        "sbfast fisher_scores": lambda: fisher_scores(model, [(torch.arange(n), x, y)], batch_size=n, progress=False),
        "plain fwd+bwd": plain,
    }


# A self-contained child: it must not import this module (whose pytest parametrisation builds
# the cases), so it repeats the few lines of setup it needs.
_CHILD = """
import json, sys
import torch
import torch.nn.functional as F
from sbfast import reference
from sbfast.models import create_model
from sbfast.sharpness import fisher_scores
method, n, threads, classes, ref_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = create_model("resnet18", classes).eval()
x, y = torch.randn(n, 3, 32, 32), torch.randint(0, classes, (n,))
if method == "reference":
    batches = [(torch.arange(i, min(n, i + ref_batch)), x[i:i + ref_batch], y[i:i + ref_batch]) for i in range(0, n, ref_batch)]
    fn = lambda: reference.fisher_scores(model, batches)
elif method == "sbfast fisher_scores":
    fn = lambda: fisher_scores(model, [(torch.arange(n), x, y)], batch_size=n, progress=False)
else:
    fn = lambda: F.cross_entropy(model(x), y).backward()
def hwm():  # peak RSS of this process image in kB (getrusage's maxrss survives fork+exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
try:  # restart the peak at the current RSS, so the setup's own peak is not counted
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
before = hwm()
fn()
print(json.dumps((hwm() - before) * 1024))
"""


def _peak_in_subprocess(method: str, n: int) -> int:
    """Bytes by which one call of ``method`` raises a fresh CPU process's peak RSS (VmHWM)."""
    args = [method, str(n), str(torch.get_num_threads()), str(CLASSES), str(REFERENCE_BATCH)]
    env = {**os.environ, "SBFAST_BENCH_MEMORY": "0"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, check=True, env=env, timeout=600
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


@cache
def peak_memory(device_type: str, n: int) -> dict[str, int]:
    """Peak extra memory (bytes) of one call of each method."""
    if device_type == "cpu":
        return {name: _peak_in_subprocess(name, n) for name in ("reference", "sbfast fisher_scores", "plain fwd+bwd")}
    device = torch.device(device_type)
    model, x, y = _setup(device, n)
    peaks = {}
    for name, fn in _methods(model, x, y).items():
        fn()  # first-call allocations (workspaces, autotuning) are not the method's steady state
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peaks[name] = torch.cuda.max_memory_allocated(device) - base
    return peaks


def cases(device: torch.device) -> list[BenchCase]:
    n = batch_size(device)
    model, x, y = _setup(device, n)
    methods = _methods(model, x, y)
    # opt-in: the CPU measurement runs each method once more in a fresh process (~30 s)
    mem = peak_memory(device.type, n) if os.environ.get("SBFAST_BENCH_MEMORY", "0") == "1" else {}
    extra = {f"peak_MB[{k}]": round(v / 2**20, 1) for k, v in mem.items()}
    return [
        BenchCase(
            op="fisher_scores",
            shape=f"resnet18 w64, C{CLASSES}, 32x32, N={n}",
            reference=methods["reference"],
            faces={k: v for k, v in methods.items() if k != "reference"},
            samples=n,
            notes=f"reference: vmap(grad) in batches of {REFERENCE_BATCH}; plain: one forward+backward, eval mode",
            extra=extra,
        )
    ]


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = batch_size(device)
    model, x, y = _setup(device, n)
    times = {name: time_ms(fn, device, 0.5) for name, fn in _methods(model, x, y).items()}
    mem = peak_memory(device.type, n)
    for name, ms in times.items():
        print(f"{name:22s} {ms:9.1f} ms  {n / ms * 1e3:8.1f} samples/s  peak +{mem[name] / 2**20:8.1f} MB")
    print(
        f"sbfast / plain throughput: {times['plain fwd+bwd'] / times['sbfast fisher_scores']:.2f}  "
        f"sbfast / reference: {times['reference'] / times['sbfast fisher_scores']:.2f}"
    )
    return 0


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case,face", pytest_params(cases, _DEVICE), ids=lambda v: getattr(v, "shape", v))
def bench_fisher_scores(benchmark, case, face):
    run_pytest_benchmark(benchmark, case, face)


if __name__ == "__main__":
    raise SystemExit(main())
