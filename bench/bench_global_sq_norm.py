"""global_sq_norm: the norm SAM takes over every gradient, on an 11M-parameter ResNet18's
list of tensors and on one 100M-element buffer. Bytes moved: one read of every element."""

from __future__ import annotations

import pytest
import torch

from bench.harness import BenchCase, pytest_params, resnet18_param_shapes, run_pytest_benchmark
from sbfast import ops, reference, registry


def cases(device: torch.device) -> list[BenchCase]:
    out = []
    for label, tensors in [
        ("resnet18 grads (62 tensors, 11.2M)", [torch.randn(s, device=device) for s in resnet18_param_shapes()]),
        ("one flat buffer (100M)", [torch.randn(100_000_000, device=device)]),
    ]:
        faces = {"dispatched": lambda t=tensors: ops.global_sq_norm(t)}
        if device.type == "cuda":
            faces["cuda-c++"] = lambda t=tensors: torch.ops.sbfast.global_sq_norm.default(t)
            if registry.has_triton("global_sq_norm"):
                faces["triton"] = lambda t=tensors: registry.triton_op("global_sq_norm")(t)
        out.append(
            BenchCase(
                op="global_sq_norm",
                shape=label,
                reference=lambda t=tensors: reference.global_sq_norm(t),
                faces=faces,
                bytes_moved=sum(t.numel() * t.element_size() for t in tensors),
            )
        )
    return out


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case,face", pytest_params(cases, _DEVICE), ids=lambda v: getattr(v, "shape", v))
def bench_global_sq_norm(benchmark, case, face):
    run_pytest_benchmark(benchmark, case, face)
