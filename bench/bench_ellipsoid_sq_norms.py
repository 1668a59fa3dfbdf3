"""ellipsoid_sq_norms: the sharpness measure's bisection step on an 11M-parameter ResNet18's flat
vector (width 64), 1 and 7 lambdas per pass (7: the CPU's three levels of the bisection's tree).
Reference: the plain-PyTorch twin, and the release's way of testing one lambda (form the
candidate z / (1 + 2 lambda / c^2), then its weighted norm), once per lambda. Bytes moved: one
read of z and 1/c."""

from __future__ import annotations

import pytest
import torch

from bench.harness import BenchCase, print_cases, pytest_params, run_pytest_benchmark
from sbfast import ops, reference, registry

PARAMS = 11_173_962  # ResNet18 at width 64


def _one_lambda_at_a_time(z: torch.Tensor, s: torch.Tensor, lambdas: list[float]) -> list[float]:
    return [float(((z / (1 + 2 * lam * s**2)) * s).pow(2).sum()) for lam in lambdas]


def cases(device: torch.device) -> list[BenchCase]:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(PARAMS, generator=g) * 0.05).to(device)
    s = 1 / w.abs()
    z = (torch.randn(PARAMS, generator=g) * 0.3).to(device) * w.abs()
    out = []
    for k in (1, 7):
        lambdas = [0.1 * (i + 1) for i in range(k)]
        faces = {
            "dispatched": lambda lam=lambdas: ops.ellipsoid_sq_norms(z, s, lam).tolist(),
            "release's way": lambda lam=lambdas: _one_lambda_at_a_time(z, s, lam),
        }
        if device.type == "cuda" and registry.has_triton("ellipsoid_sq_norms"):
            faces["triton"] = lambda lam=lambdas: registry.triton_op("ellipsoid_sq_norms")(z, s, lam).tolist()
        out.append(
            BenchCase(
                op="ellipsoid_sq_norms",
                shape=f"resnet18 w64 flat (11.2M), {k} lambda{'s' if k > 1 else ''}",
                reference=lambda lam=lambdas: reference.ellipsoid_sq_norms(z, s, lam).tolist(),
                faces=faces,
                bytes_moved=2 * z.numel() * z.element_size(),
            )
        )
    return out


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case,face", pytest_params(cases, _DEVICE), ids=lambda v: getattr(v, "shape", v))
def bench_ellipsoid_sq_norms(benchmark, case, face):
    run_pytest_benchmark(benchmark, case, face)


if __name__ == "__main__":
    print_cases(cases)
