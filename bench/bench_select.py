"""select_sam_masks: SharpBalance's subset selection for M members x N samples, at
the paper's 3 x 50k (CIFAR), 8 x 50k and 8 x 1.28M (ImageNet-sized), ratio 0.5, variant
balance; against sbfast.reference.select_sam_masks (the release takes 0.115 s at 3 x 50k).

Rows: the whole selection (validation included, which syncs once), then each op alone against
its reference twin. samples/s counts M * N scores a call.
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import BenchCase, pytest_params, run_pytest_benchmark
from sbfast import reference, registry, select
from sbfast.common import floor_count

SHAPES = [(3, 50_000), (8, 50_000), (8, 1_280_000)]
RATIO = 0.5


def _scores(m: int, n: int, device: torch.device) -> torch.Tensor:
    # Fisher scores are positive and spread over decades: log-normal.
    g = torch.Generator().manual_seed(0)
    return torch.randn(m, n, generator=g).mul(2).exp().to(device)


def cases(device: torch.device) -> list[BenchCase]:
    out = []
    cuda_ks, cuda_alg = torch.ops.sbfast.ksmallest_mask.default, torch.ops.sbfast.sharpbalance_masks.default
    has_triton = registry.has_triton("ksmallest_mask")
    if has_triton:
        tri_ks, tri_alg = registry.triton_op("ksmallest_mask"), registry.triton_op("sharpbalance_masks")
    for m, n in SHAPES:
        scores = _scores(m, n, device)
        k = floor_count(n, RATIO)
        flat = reference.ksmallest_mask(scores, k)
        shape = f"{m} x {n:,}"

        pipeline = {"dispatched": lambda s=scores: select.select_sam_masks(s, RATIO, "balance")}
        ks_faces = {"dispatched": lambda s=scores, k=k: registry.op_for("ksmallest_mask", s.device)(s, k)}
        alg_faces = {"dispatched": lambda f=flat: registry.op_for("sharpbalance_masks", f.device)(f, 0)}
        if device.type == "cuda":
            pipeline["cuda-c++ ops"] = lambda s=scores, k=k: cuda_alg(cuda_ks(s, k), 0)
            ks_faces["cuda-c++"] = lambda s=scores, k=k: cuda_ks(s, k)
            alg_faces["cuda-c++"] = lambda f=flat: cuda_alg(f, 0)
            if has_triton:
                pipeline["triton ops"] = lambda s=scores, k=k: tri_alg(tri_ks(s, k), 0)
                ks_faces["triton"] = lambda s=scores, k=k: tri_ks(s, k)
                alg_faces["triton"] = lambda f=flat: tri_alg(f, 0)
        out += [
            BenchCase(
                op="select_sam_masks",
                shape=shape,
                samples=m * n,
                faces=pipeline,
                reference=lambda s=scores: reference.select_sam_masks(s, RATIO, "balance"),
                notes="balance, ratio 0.5; includes the finiteness check (one host sync)",
            ),
            BenchCase(
                op="ksmallest_mask",
                shape=shape,
                samples=m * n,
                faces=ks_faces,
                reference=lambda s=scores, k=k: reference.ksmallest_mask(s, k),
                notes="reference: stable argsort + scatter",
            ),
            BenchCase(
                op="sharpbalance_masks",
                shape=shape,
                samples=m * n,
                faces=alg_faces,
                reference=lambda f=flat: reference.sharpbalance_masks(f, 0),
            ),
        ]
    return out


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case,face", pytest_params(cases, _DEVICE), ids=lambda v: getattr(v, "shape", v))
def bench_select(benchmark, case, face):
    run_pytest_benchmark(benchmark, case, face)
