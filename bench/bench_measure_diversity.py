"""Diversity measures: CKA of every block pair of two ResNet18s, the whole diversity report over
clean + 75 corrupted sets, and the stacked (vmap) forward against a loop over members.

Rows:
* ``cka_block_pairs`` (two cases): two width-64 CIFAR ResNet18 members (``create_model``), the
  outputs of their 8 BasicBlocks on n = 1,000 random 3x32x32 images (float32, d from 8,192 to
  65,536 per block), CKA of all 8 x 8 member-A-block x member-B-block pairs. The features are
  computed once outside the timing. Reference of the first case: the release's ``cka_utils``
  (imported from the checkout named by SBFAST_RELEASE; else a NumPy statement of the same
  computation) as its driver calls it, ``cka_compute(gram_linear(X), gram_linear(Y))`` per pair (NumPy, float32
  features, 128 Grams); of the second: the same functions with each block's Gram formed once
  (16 Grams, 64 ``cka_compute``), the best the release's functions allow. Faces: sbfast
  ``cka_matrix`` (full batch, biased: the same number, 16 Grams stacked and one product) and
  ``MinibatchCKA`` (unbiased minibatch estimator, batches of 250: a different, consistent
  estimator, 4x fewer Gram flops).
* ``diversity_report``: 3 width-16 ResNet18 members, a clean set and 15 corruptions x 5
  severities of N_SET synthetic 3x32x32 images each (76 sets), every measure (disagreement +
  DER/EIR, KL, JS, bias-variance on logits and probabilities, CKA input/logits/softmax on the
  clean set). Reference: the release's protocol, each measure running its own forwards
  (disagreement M, JS 2 per pair, variance M per set; CKA 2 per pair on the clean set), with the
  plain twins of ``sbfast.reference.diversity`` for the arithmetic. sbfast: one forward per
  member and set, then arithmetic on the cache. ``samples`` = images per member and pass.
* ``predictions_stack``: 3 width-16 ResNet18 members on a batch of 100: reference = a loop of
  member forwards, face = the stacked ``torch.func`` vmap forward. On this CPU the stacked
  forward is slower (speedup < 1), which is why ``predictions`` loops on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.harness import BenchCase, print_cases, pytest_params, run_pytest_benchmark
from sbfast import measure
from sbfast.measure.predictions import stacked_forward
from sbfast.models import create_model
from sbfast.reference import diversity as ref

N_CKA = 1000
N_SET = 40
CORRUPTIONS = 15
SEVERITIES = 5


def _release_cka_functions():
    """(gram_linear, cka_compute) of the release's ``cka_utils`` when SBFAST_RELEASE names a
    checkout of it (the committed rows were measured so), else a NumPy statement of the same
    computation: X X^T, centring by column means (H K H), Frobenius inner product over norms."""
    root = os.environ.get("SBFAST_RELEASE")
    if root:
        spec = importlib.util.spec_from_file_location("cka_utils", Path(root) / "cka_utils.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.gram_linear, module.cka_compute, "release cka_utils"

    def gram(x: np.ndarray) -> np.ndarray:
        return x @ x.T

    def centred(k: np.ndarray) -> np.ndarray:
        col = k.mean(0, dtype=np.float64)
        return k - (col - col.mean() / 2)[:, None] - (col - col.mean() / 2)[None, :]

    def cka_numpy(kx: np.ndarray, ky: np.ndarray) -> float:
        a, b = centred(kx), centred(ky)
        return float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)))

    return gram, cka_numpy, "NumPy Gram-form CKA (SBFAST_RELEASE unset)"


@cache
def _block_features(n: int, device_type: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The 8 BasicBlock outputs of two ResNet18s on n random images, flattened [n, d] float32."""
    torch.manual_seed(0)
    members = [create_model("resnet18", 10).to(device_type).eval() for _ in range(2)]
    x = torch.randn(n, 3, 32, 32, device=device_type)
    names = measure.block_names(members[0])
    out = []
    for m in members:
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        mods = dict(m.named_modules())
        handles = [
            mods[name].register_forward_hook(
                lambda mod, a, o, name=name, chunks=chunks: chunks[name].append(o.flatten(1))
            )
            for name in names
        ]
        with torch.no_grad():
            for start in range(0, n, 100):
                m(x[start : start + 100])
        for h in handles:
            h.remove()
        out.append([torch.cat(chunks[name]) for name in names])
    return out[0], out[1]


def _cka_cases(device: torch.device) -> list[BenchCase]:
    fa, fb = _block_features(N_CKA, device.type)
    na = [f.cpu().numpy() for f in fa]
    nb = [f.cpu().numpy() for f in fb]
    k = len(fa)

    gram_linear, cka_compute, which = _release_cka_functions()

    def release_per_pair() -> np.ndarray:
        out = np.zeros((k, k))
        for i in range(k):
            for j in range(k):
                out[i, j] = cka_compute(gram_linear(na[i]), gram_linear(nb[j]))
        return out

    def release_grams_once() -> np.ndarray:
        ga, gb = [gram_linear(a) for a in na], [gram_linear(b) for b in nb]
        return np.array([[cka_compute(ga[i], gb[j]) for j in range(k)] for i in range(k)])

    def sbfast_full() -> torch.Tensor:
        return measure.cka_matrix([*fa, *fb], form="gram")[:k, k:]

    def sbfast_minibatch() -> torch.Tensor:
        acc = measure.MinibatchCKA()
        for start in range(0, N_CKA, 250):
            acc.update([f[start : start + 250] for f in (*fa, *fb)])
        return acc.compute()[:k, k:]

    dims = sorted({f.shape[1] for f in fa})
    shape = f"resnet18 w64 x2, {k} blocks each ({k * k} pairs), n={N_CKA}, d {dims[0]}..{dims[-1]}, float32"
    faces = {"sbfast cka_matrix (full batch)": sbfast_full, "sbfast MinibatchCKA (b=250, unbiased)": sbfast_minibatch}
    return [
        BenchCase(
            op="cka_block_pairs",
            shape=shape,
            reference=release_per_pair,
            faces=faces,
            samples=N_CKA,
            notes=f"reference: {which} per pair, as the release's driver calls it: 2 Grams per pair",
        ),
        BenchCase(
            op="cka_block_pairs",
            shape=shape + ", release Grams reused",
            reference=release_grams_once,
            faces={"sbfast cka_matrix (full batch)": sbfast_full},
            samples=N_CKA,
            notes=f"reference: {which} with each block's Gram formed once (16 Grams, 64 cka_compute)",
        ),
    ]


def _ensemble(device: torch.device):
    torch.manual_seed(1)
    members = [create_model("resnet18", 10, width=16).to(device).eval() for _ in range(3)]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N_SET, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (N_SET,), generator=g)
    data = {"test": (x, y)}
    for c in range(CORRUPTIONS):
        for s in range(1, SEVERITIES + 1):
            data[(f"corruption{c}", s)] = (x + 0.1 * s * torch.randn(x.shape, generator=g), y)
    return members, data


def _release_protocol(members, data) -> dict:
    """Each measure with its own forwards, as the release's drivers run them."""

    def forward(m, x):
        with torch.no_grad():
            return m(x)

    out = {}
    pairs = [(i, j) for i in range(len(members)) for j in range(i + 1, len(members))]
    for key, (x, y) in data.items():
        probs = torch.stack([forward(m, x).softmax(-1) for m in members])  # disagreement
        row = {"disagreement": ref.disagreement(probs), "der_eir": ref.der_eir(probs, y)}
        js = {}
        for i, j in pairs:  # compare_classification: both models per pair
            pair = torch.stack([forward(members[i], x).softmax(-1), forward(members[j], x).softmax(-1)])
            js[(i, j)] = ref.js_divergence(pair)[0, 1]
        row["js"] = js
        row["kl"] = ref.kl_divergence(probs)
        logits = torch.stack([forward(m, x) for m in members])  # variance_c
        row["variance"] = (ref.bias_variance(logits, y), ref.bias_variance(logits.softmax(-1), y))
        out[key] = row
    x = data["test"][0]
    cka = {}
    for i, j in pairs:  # all_latent: both models per pair
        a, b = forward(members[i], x), forward(members[j], x)
        cka[(i, j)] = [ref.cka(x.flatten(1), x.flatten(1)), ref.cka(a, b), ref.cka(a.softmax(-1), b.softmax(-1))]
    out["cka"] = cka
    return out


def _report_cases(device: torch.device) -> list[BenchCase]:
    members, data = _ensemble(device)
    sets = len(data)
    return [
        BenchCase(
            op="diversity_report",
            shape=f"resnet18 w16 x3, clean + {CORRUPTIONS}x{SEVERITIES} corrupted sets of {N_SET} 3x32x32",
            reference=lambda: _release_protocol(members, data),
            faces={
                "sbfast diversity_report": lambda: measure.diversity_report(members, data, cka_minibatch=None),
            },
            samples=sets * N_SET,
            notes="reference: the release's protocol (each measure its own forwards) with plain twins",
        )
    ]


def _stack_cases(device: torch.device) -> list[BenchCase]:
    torch.manual_seed(3)
    members = [create_model("resnet18", 10, width=16).to(device).eval() for _ in range(3)]
    x = torch.randn(100, 3, 32, 32, device=device)
    stacked = stacked_forward(members)

    def loop():
        with torch.no_grad():
            return [m(x) for m in members]

    def vmapped():
        with torch.no_grad():
            return stacked(x)

    return [
        BenchCase(
            op="predictions_stack",
            shape="resnet18 w16 x3, batch 100, 3x32x32",
            reference=loop,
            faces={"stacked vmap forward": vmapped},
            samples=300,
            notes="reference: loop over members; speedup < 1 means the loop wins here",
        )
    ]


def cases(device: torch.device) -> list[BenchCase]:
    return [*_stack_cases(device), *_report_cases(device), *_cka_cases(device)]


def main() -> int:
    return print_cases(cases)


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case,face", pytest_params(cases, _DEVICE), ids=lambda v: getattr(v, "shape", v))
def bench_measure_diversity(benchmark, case, face):
    run_pytest_benchmark(benchmark, case, face)


if __name__ == "__main__":
    raise SystemExit(main())
