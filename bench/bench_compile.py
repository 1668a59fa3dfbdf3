"""compile: what ``torch.compile`` of the model gains for one training step of the trainer.

One SAM step (two forward/backward passes through the model plus the fused optimizer's two
passes, ``sbfast.train.sam_step``) and one mixed step (``mixed_step_static``, SAM share 1/2), with
the model eager (the reference column) and compiled with inductor (the face). The optimizer is
never compiled: its phases are graph breaks by design, because the flat buffers alias the
parameters (docs/design.md), so this measures the model's forward/backward only. The first call
of the compiled face compiles (tens of seconds on CPU) and is excluded from the timing as a
warm-up; the compile time itself is in the row's notes.

Models: the digits CNN (width 16, batch 64, 8x8) and the CIFAR ResNet18 (width 16 on CPU, where
width 64 takes seconds per step; width 64 batch 128 on CUDA).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

from bench.harness import BenchCase, pytest_params, run_pytest_benchmark
from sbfast.models import create_model
from sbfast.optim import SharpBalanceSAM
from sbfast.train import mixed_step_static, sam_step


def _eager_and_compiled(
    model_name: str, kw: dict, device: torch.device, run: Callable[[Callable, SharpBalanceSAM], torch.Tensor]
) -> tuple[list[Callable[[], object]], float]:
    """[eager step, compiled step] for ``run(forward, opt)`` on two identical fresh models, and
    the seconds the compiled step's first call took (it compiles)."""
    steps: list[Callable[[], object]] = []
    compile_s = 0.0
    for compiled in (False, True):
        torch.manual_seed(0)
        model = create_model(model_name, 10, **kw).to(device)
        opt = SharpBalanceSAM(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, rho=0.05)
        forward = torch.compile(model, dynamic=False) if compiled else model

        def step(forward: Callable = forward, opt: SharpBalanceSAM = opt) -> object:
            loss = run(forward, opt)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return loss

        if compiled:
            # dynamo caches per code object, so a model of the same class compiled before (by
            # another case, or when pytest collected this module) would make the first call free:
            # start from an empty cache to time a real compile (other cases recompile in warm-up)
            torch._dynamo.reset()
            t0 = time.perf_counter()
            step()
            compile_s = time.perf_counter() - t0
        steps.append(step)
    return steps, compile_s


def _batch(shape: tuple[int, ...], n: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def cases(device: torch.device) -> list[BenchCase]:
    on_gpu = device.type == "cuda"
    configs = [
        ("cnn", {"width": 16, "in_channels": 1}, (1, 8, 8), 64, "digits cnn16"),
        (
            "resnet18",
            {"width": 64 if on_gpu else 16},
            (3, 32, 32),
            128 if on_gpu else 32,
            f"cifar resnet18 w{64 if on_gpu else 16}",
        ),
    ]
    out = []
    for name, kw, shape, batch, label in configs:
        x, y = _batch(shape, batch, device, 0)
        (eager, compiled), compile_s = _eager_and_compiled(
            name, kw, device, lambda f, o, x=x, y=y: sam_step(f, o, x, y)
        )
        out.append(
            BenchCase(
                op="compile",
                shape=f"{label}, SAM step, b={batch}",
                reference=eager,
                faces={"torch.compile(model)": compiled},
                samples=batch,
                notes=f"reference = eager model; compile of the first step {compile_s:.1f} s",
            )
        )
        half = batch // 2
        (xn, yn), (xs, ys) = _batch(shape, half, device, 1), _batch(shape, batch - half, device, 2)
        (eager, compiled), _ = _eager_and_compiled(
            name, kw, device, lambda f, o, b=(xn, yn, xs, ys): mixed_step_static(f, o, *b)
        )
        out.append(
            BenchCase(
                op="compile",
                shape=f"{label}, mixed step (SAM share 1/2), b={batch}",
                reference=eager,
                faces={"torch.compile(model)": compiled},
                samples=batch,
                notes="reference = eager model",
            )
        )
    return out


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case,face", pytest_params(cases, _DEVICE), ids=lambda v: getattr(v, "shape", v))
def bench_compile(benchmark, case, face):
    run_pytest_benchmark(benchmark, case, face)
