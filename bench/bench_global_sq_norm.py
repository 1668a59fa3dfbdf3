"""global_sq_norm: the norm SAM takes over every gradient, on an 11M-parameter ResNet18's
list of tensors and on one 100M-element buffer. Bytes moved: one read of every element."""

from __future__ import annotations

import pytest
import torch

from bench.harness import BenchCase, pytest_params, run_pytest_benchmark
from sbfast import _ops, ops, reference


def _resnet18_like(device: torch.device) -> list[torch.Tensor]:
    # Parameter shapes of the CIFAR ResNet18 (width 64, 10 classes): 62 tensors, 11.17M values.
    shapes = [(64, 3, 3, 3), (64,), (64,)]
    in_c = 64
    for out_c, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            c_in = in_c if block == 0 else out_c
            shapes += [(out_c, c_in, 3, 3), (out_c,), (out_c,), (out_c, out_c, 3, 3), (out_c,), (out_c,)]
            if block == 0 and (stride != 1 or c_in != out_c):
                shapes += [(out_c, c_in, 1, 1), (out_c,), (out_c,)]
        in_c = out_c
    shapes += [(10, 512), (10,)]
    return [torch.randn(s, device=device) for s in shapes]


def cases(device: torch.device) -> list[BenchCase]:
    out = []
    for label, tensors in [
        ("resnet18 grads (62 tensors, 11.2M)", _resnet18_like(device)),
        ("one flat buffer (100M)", [torch.randn(100_000_000, device=device)]),
    ]:
        faces = {"dispatched": lambda t=tensors: ops.global_sq_norm(t)}
        if device.type == "cuda":
            faces["cuda-c++"] = lambda t=tensors: torch.ops.sbfast.global_sq_norm.default(t)
            if "global_sq_norm" in _ops._TRITON_OPS:
                faces["triton"] = lambda t=tensors: _ops.triton_op("global_sq_norm")(t)
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
