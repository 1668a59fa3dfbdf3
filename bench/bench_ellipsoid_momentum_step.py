"""ellipsoid_momentum_step_: APGD's step after its ellipsoid projection on an 11M-parameter
ResNet18's flat vector (width 64): divide by 1 + lambda 2/c^2, the 0.75 momentum lerp and
w0 + delta in one pass. Reference: the plain-PyTorch twin; "five torch passes": the ops the
sharpness measure ran before the op (mul, add_, div_, lerp, add into preallocated buffers).
Bytes moved: reads of z, 2/c^2, prev and w0, writes of z and point."""

from __future__ import annotations

import pytest
import torch

from bench.harness import BenchCase, print_cases, pytest_params, run_pytest_benchmark
from sbfast import ops, reference, registry

PARAMS = 11_173_962  # ResNet18 at width 64
LAMBDA, MOMENTUM = 0.37, 0.75


def cases(device: torch.device) -> list[BenchCase]:
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(PARAMS, generator=g) * 0.05).to(device)
    t = 2 / w0.square()
    prev = (torch.randn(PARAMS, generator=g) * 0.01).to(device)
    z0 = (torch.randn(PARAMS, generator=g) * 0.01).to(device)
    z, point, work = z0.clone(), torch.empty_like(w0), torch.empty_like(w0)

    def five_passes() -> None:
        z.div_(torch.mul(t, LAMBDA, out=work).add_(1))
        torch.lerp(prev, z, MOMENTUM, out=z)
        torch.add(w0, z, out=point)

    # each timing starts from the same z (the step is in place): the copy is timed too, in every face
    def run(face) -> None:
        z.copy_(z0)
        face(z, point, t, prev, w0, LAMBDA, MOMENTUM)

    faces = {
        "dispatched": lambda: run(ops.ellipsoid_momentum_step_),
        "five torch passes": lambda: (z.copy_(z0), five_passes()),
    }
    if device.type == "cuda" and registry.has_triton("ellipsoid_momentum_step_"):
        faces["triton"] = lambda: run(registry.triton_op("ellipsoid_momentum_step_"))
    return [
        BenchCase(
            op="ellipsoid_momentum_step_",
            shape="resnet18 w64 flat (11.2M), one step (+ a copy of z)",
            reference=lambda: run(reference.ellipsoid_momentum_step_),
            faces=faces,
            bytes_moved=8 * z.numel() * z.element_size(),
        )
    ]


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case,face", pytest_params(cases, _DEVICE), ids=lambda v: getattr(v, "shape", v))
def bench_ellipsoid_momentum_step(benchmark, case, face):
    run_pytest_benchmark(benchmark, case, face)


if __name__ == "__main__":
    print_cases(cases)
