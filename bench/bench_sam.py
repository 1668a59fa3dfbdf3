"""The SAM optimizer phases alone (first_step + second_step, no forward/backward) on the
11.2M-parameter ResNet18 parameter set and on a 100M-parameter stack: sbfast.optim
.SharpBalanceSAM against sbfast.reference.SAM over torch.optim.SGD (momentum 0.9, weight decay
5e-4: the release's settings), plus the machine's copy bandwidth as its own row.

Bytes that must move per SAM step, in parameter-sized passes (n values of the dtype each):
  norm          read g                                    1
  perturb       read w, g; write w, backup                4
  restore + SGD read backup, g', buf; write w, buf        5
  total                                                   10
GB/s is 10 n sizeof(dtype) over the fused time. The fused step also reads g' once more for the
non-finite check of the default nonfinite="error" (11 passes in all), which the count leaves out
on purpose: it is the price of the check, not of SAM. The reference moves about 21 passes, plus
the page faults of the tensors it allocates every step (old_p, e_w and SGD's temporaries).
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.harness import BenchCase, pytest_params, resnet18_param_shapes, run_pytest_benchmark
from sbfast import reference, registry
from sbfast.optim import SharpBalanceSAM

SETTINGS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.05)
PASSES = 10


def _params(shapes, device, seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g).mul_(0.05).to(device))
        p.grad = torch.randn(s, generator=g).to(device)
        params.append(p)
    return params


def _sam_step(opt):
    def run():
        opt.first_step()
        opt.second_step()

    return run


def _with_backend(backend: str, fn):
    def run():
        old = os.environ.get("SBFAST_CUDA_BACKEND")
        os.environ["SBFAST_CUDA_BACKEND"] = backend
        try:
            fn()
        finally:
            if old is None:
                os.environ.pop("SBFAST_CUDA_BACKEND")
            else:
                os.environ["SBFAST_CUDA_BACKEND"] = old

    return run


def _copy_case(device: torch.device) -> BenchCase:
    n = 64 * 1024 * 1024
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    return BenchCase(
        op="copy_ (bandwidth)",
        shape="256 MiB float32 -> 256 MiB",
        reference=copy,
        faces={"torch copy_": copy},
        bytes_moved=2 * n * 4,
        notes="the machine's copy bandwidth: read + write of 256 MiB",
    )


def cases(device: torch.device) -> list[BenchCase]:
    out = [_copy_case(device)]
    for label, shapes in [
        ("resnet18 params (62 tensors, 11.2M)", resnet18_param_shapes()),
        ("100M stack (100 x [1000, 1000])", [(1000, 1000)] * 100),
    ]:
        ref = reference.SAM(_params(shapes, device), torch.optim.SGD, **SETTINGS)
        fused = SharpBalanceSAM(_params(shapes, device), **SETTINGS)
        fused_global = SharpBalanceSAM(_params(shapes, device), **SETTINGS, grad_norm="global", nonfinite="skip")
        faces = {"fused (dispatched)": _sam_step(fused), "fused, global norm, skip": _sam_step(fused_global)}
        if device.type == "cuda":
            faces["fused cuda-c++"] = _with_backend("cuda", _sam_step(fused))
            if registry.has_triton("sam_perturb_"):
                faces["fused triton"] = _with_backend("triton", _sam_step(fused))
        n = sum(torch.Size(s).numel() for s in shapes)
        out.append(
            BenchCase(
                op="sam first+second step",
                shape=label,
                reference=_sam_step(ref),
                faces=faces,
                bytes_moved=PASSES * n * 4,
                notes="reference: sbfast.reference.SAM + torch.optim.SGD; GB/s counts 10 passes",
            )
        )
    return out


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case,face", pytest_params(cases, _DEVICE), ids=lambda v: getattr(v, "shape", v))
def bench_sam(benchmark, case, face):
    run_pytest_benchmark(benchmark, case, face)
