"""Worst-case and average-case sharpness (sbfast.measure) against the release's algorithm, on the
CIFAR ResNet18 at width 16 in eval mode, batches of 5 (the release's protocol), float32.

Cases:
* worst_case_sharpness, 4 batches of 5, 20 iterations, l2 adaptive rho 0.5, problems one by one
  (the CPU's default) and the 4 side by side (CUDA's): reference = the plain
  twin (``sbfast.reference.measures_apgd``), which runs the release's algorithm the release's way
  (an extra forward per iteration, a parameter copy at every improvement, a loop over parameter
  tensors). The release's own ``eval_APGD_sharpness`` was timed beside it on the same CPU outside
  the repository (its code calls ``.cuda()``); docs/measure.md gives both.
* APGD iteration vs forward + backward: reference = 20 forward + backward passes of one batch of 5,
  the face = worst-case on that batch with 20 iterations; speedup >= 0.91 means an iteration costs
  <= 1.1x a forward + backward.
* average_sharpness, 4 batches of 5, 20 draws: reference = the plain twin (one forward per draw on a
  perturbed copy); faces: draws one after another and vmapped in chunks of 10 (what CUDA uses).

``python -m bench --ops measure_sharpness`` prints the table.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.harness import BenchCase, print_cases, pytest_params, run_pytest_benchmark
from sbfast.measure import average_sharpness, draw_noise, worst_case_sharpness
from sbfast.models import create_model
from sbfast.reference.measures_apgd import reference_average_sharpness, reference_worst_case_sharpness

WIDTH = 16
CLASSES = 10
BATCHES = 4
ITERS = 20
DRAWS = 20


def _setup(device: torch.device, n_batches: int = BATCHES):
    torch.manual_seed(0)
    model = create_model("resnet18", CLASSES, width=WIDTH).to(device).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.uniform_(-0.1, 0.1)  # trained-like: no exact zeros
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(5, 3, 32, 32, generator=g).to(device), torch.randint(0, CLASSES, (5,), generator=g).to(device))
        for _ in range(n_batches)
    ]
    return model, batches


def _worst_case(device: torch.device) -> BenchCase:
    model, batches = _setup(device)
    return BenchCase(
        op="worst_case_sharpness",
        shape=f"resnet18 w{WIDTH}, {BATCHES} batches of 5, {ITERS} iters, l2 adaptive rho 0.5",
        reference=lambda: reference_worst_case_sharpness(model, batches, rho=0.5, n_iters=ITERS),
        faces={
            "sbfast worst_case_sharpness": lambda: worst_case_sharpness(model, batches, rho=0.5, n_iters=ITERS),
            "stacked (4 problems per vmapped pass)": lambda: worst_case_sharpness(
                model, batches, rho=0.5, n_iters=ITERS, stack=True
            ),
        },
        samples=5 * BATCHES,
        notes="reference = the plain twin (the release's algorithm, its extra forward and state copies)",
    )


def _iteration(device: torch.device) -> BenchCase:
    model, batches = _setup(device, 1)
    x, y = batches[0]
    params = list(model.parameters())

    def forward_backward():
        for _ in range(ITERS):
            torch.autograd.grad(F.cross_entropy(model(x), y), params)

    return BenchCase(
        op="apgd iteration",
        shape=f"resnet18 w{WIDTH}, one batch of 5, {ITERS} iters",
        reference=forward_backward,
        faces={"sbfast worst_case_sharpness": lambda: worst_case_sharpness(model, batches, rho=0.5, n_iters=ITERS)},
        samples=5,
        notes=f"reference = {ITERS} forward+backward of the batch; speedup >= 0.91 = an iteration <= 1.1x F+B",
    )


def _average_case(device: torch.device) -> BenchCase:
    model, batches = _setup(device)
    g = torch.Generator().manual_seed(2)
    noise = [draw_noise(model, DRAWS, "l2", g) for _ in batches]
    return BenchCase(
        op="average_sharpness",
        shape=f"resnet18 w{WIDTH}, {BATCHES} batches of 5, {DRAWS} draws",
        reference=lambda: reference_average_sharpness(model, batches, noise, rho=0.5),
        faces={
            "draws one by one": lambda: average_sharpness(
                model, batches, rho=0.5, n_draws=DRAWS, noise=noise, stack=False
            ),
            "draws vmapped (chunks of 10)": lambda: average_sharpness(
                model, batches, rho=0.5, n_draws=DRAWS, noise=noise, stack=True, chunk=10
            ),
        },
        samples=5 * BATCHES,
        notes="reference = the plain twin (one forward per draw on a perturbed copy)",
    )


def cases(device: torch.device) -> list[BenchCase]:
    return [_worst_case(device), _iteration(device), _average_case(device)]


def main() -> int:
    return print_cases(cases)


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case,face", pytest_params(cases, _DEVICE), ids=lambda v: getattr(v, "op", v))
def bench_measure_sharpness(benchmark, case, face):
    run_pytest_benchmark(benchmark, case, face)


if __name__ == "__main__":
    raise SystemExit(main())
