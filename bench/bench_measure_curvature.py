"""The curvature measures (sbfast.measure: Hessian-vector products, Hutchinson trace, Fisher
trace, NTK) against what the release runs, on the CIFAR ResNet18 at width 8 in eval mode
(random inputs: the timings do not depend on the values).

Cases (the release's protocol: batches of 5 training samples):
* hessian-vector product, 200 samples: reference = ONE GRADIENT of the same loss (forward +
  backward, mean CE), so "speedup" is gradient time / HVP time; target on CPU >= 0.4 (an HVP
  <= 2.5x a gradient). Faces: double backward through the kept gradient graph (what the
  measures use when the samples fit one chunk), double backward with the graph built for the
  product, forward-over-reverse (jvp of grad).
* hessian_trace, 20 batches of 5, 3 and 10 probes, no early stop: reference = pyhessian's data-loader
  trace (``pyhessian.hessian(..., dataloader=batches).trace``), the class the release meant to
  call (the plain twin's batch loop, the same algorithm, when pyhessian is not installed);
  target >= 5x. Faces: the default (second-order forward, ``hvp_mode="auto"`` picks it for a
  ResNet) and the double backward through the kept gradient graph.
* fisher_trace, 20 batches of 5: reference = vmap(grad) per batch of 5 (the release's
  ``test_fisher``; here ``sbfast.reference.fisher_scores``).
* ntk_logdet, 20 batches of 5: reference = one backward per sample over the kept graph (the
  release's ``get_ntk``; here the plain twin).

``python -m bench --ops measure_curvature`` prints the table; ``python -m
bench.bench_measure_curvature`` prints the rows and the ratios.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.harness import BenchCase, print_cases, pytest_params, run_pytest_benchmark
from sbfast import reference
from sbfast.measure import fisher_trace, hessian_trace, measuring, ntk_logdet
from sbfast.measure.hvp import HessianOperator
from sbfast.models import create_model
from sbfast.reference import measures_curvature as twin

WIDTH = 8
CLASSES = 10
HVP_SAMPLES = 200
BATCHES = 20  # of 5, the release's batch size
PROBES = (3, 10)  # the trace at few probes (the recorded forward's first probe weighs) and more


def _setup(device: torch.device, n_batches: int, batch: int = 5):
    torch.manual_seed(0)
    model = create_model("resnet18", CLASSES, width=WIDTH).to(device).eval()
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(batch, 3, 32, 32, generator=g).to(device),
            torch.randint(0, CLASSES, (batch,), generator=g).to(device),
        )
        for _ in range(n_batches)
    ]
    return model, batches


def _pyhessian_trace(model: nn.Module, batches, probes: int):
    try:
        import pyhessian
    except ImportError:
        return None

    def run():
        h = pyhessian.hessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
        return h.trace(maxIter=probes, tol=1e-300)

    return run


def _hvp_case(device: torch.device) -> BenchCase:
    model, batches = _setup(device, HVP_SAMPLES // 5)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    ops = {mode: HessianOperator(model, batches, mode=mode) for mode in ("backward", "jvp")}
    v = torch.randn(ops["backward"].size, generator=torch.Generator().manual_seed(2)).to(device)

    def gradient():
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    def fresh(op):
        op.release()
        return op(v)

    return BenchCase(
        op="hessian-vector product",
        shape=f"resnet18 w{WIDTH}, {HVP_SAMPLES} samples 32x32",
        reference=gradient,
        faces={
            "double backward, graph kept": lambda: ops["backward"](v),
            "double backward, graph built": lambda: fresh(ops["backward"]),
            "jvp of grad": lambda: ops["jvp"](v),
        },
        samples=HVP_SAMPLES,
        notes="reference = one gradient of the same loss; speedup = gradient / HVP (target >= 0.4)",
    )


def _trace_case(device: torch.device, probes: int) -> BenchCase:
    model, batches = _setup(device, BATCHES)
    ref = _pyhessian_trace(model, batches, probes) if device.type == "cpu" else None
    note = "reference = pyhessian data-loader trace"
    if ref is None:
        size = sum(p.numel() for p in model.parameters())
        vectors = [torch.ones(size, device=device) for _ in range(probes)]
        ref = lambda: twin.hutchinson_trace(model, batches, vectors)  # noqa: E731
        note = "reference = the plain twin's batch loop (pyhessian not installed)"
    return BenchCase(
        op="hessian_trace",
        shape=f"resnet18 w{WIDTH}, {BATCHES} batches of 5, {probes} probes",
        reference=ref,
        faces={
            "sbfast hessian_trace": lambda: hessian_trace(model, batches, max_iter=probes, tol=1e-300),
            "sbfast hessian_trace, double backward": lambda: hessian_trace(
                model, batches, max_iter=probes, tol=1e-300, hvp_mode="backward"
            ),
        },
        samples=5 * BATCHES,
        notes=f"{note} at the same probes, no early stop (target >= 5x)",
    )


def _fisher_case(device: torch.device) -> BenchCase:
    model, batches = _setup(device, BATCHES)
    indexed = [(torch.arange(5 * k, 5 * k + 5), x, y) for k, (x, y) in enumerate(batches)]
    return BenchCase(
        op="fisher_trace",
        shape=f"resnet18 w{WIDTH}, {BATCHES} batches of 5",
        reference=lambda: reference.fisher_scores(model, indexed).mean(),
        faces={"sbfast fisher_trace": lambda: fisher_trace(model, batches)},
        samples=5 * BATCHES,
        notes="reference = vmap(grad) per batch of 5 (the release's test_fisher)",
    )


def _ntk_case(device: torch.device) -> BenchCase:
    model, batches = _setup(device, BATCHES)

    def loop():
        with measuring(model):
            return [twin.ntk_logdet(twin.ntk_gram(model, x)) for x, _ in batches]

    return BenchCase(
        op="ntk_logdet",
        shape=f"resnet18 w{WIDTH}, {BATCHES} batches of 5",
        reference=loop,
        faces={"sbfast ntk_logdet": lambda: ntk_logdet(model, batches)},
        samples=5 * BATCHES,
        notes="reference = one backward per sample on the kept graph (the release's get_ntk)",
    )


def cases(device: torch.device) -> list[BenchCase]:
    return [_hvp_case(device), *(_trace_case(device, p) for p in PROBES), _fisher_case(device), _ntk_case(device)]


def main() -> int:
    return print_cases(cases)


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case,face", pytest_params(cases, _DEVICE), ids=lambda v: getattr(v, "op", v))
def bench_measure_curvature(benchmark, case, face):
    run_pytest_benchmark(benchmark, case, face)


if __name__ == "__main__":
    raise SystemExit(main())
