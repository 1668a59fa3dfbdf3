"""The op registry: ops exist without _C, report their backends, and fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import sbfast
from sbfast import registry


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_a_built_extension_that_does_not_import_is_an_error_not_a_slow_fallback():
    result = _run_python(
        """
        import sys
        sys.modules["sbfast._C"] = None  # the .so exists but cannot be loaded
        import sbfast
        """,
        SBFAST_NO_EXT="0",
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "sbfast._C is built" in last and "SBFAST_NO_EXT=1" in last


def test_import_without_extension_warns_once_and_falls_back_to_reference():
    # SBFAST_NO_EXT=1: the plain-PyTorch reference on CPU, chosen on purpose
    result = _run_python(
        """
        import sys, warnings, json
        sys.modules["sbfast._C"] = None  # as if the extension had not been built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import sbfast
            import sbfast.ops
        messages = [str(w.message) for w in caught if "sbfast._C" in str(w.message)]
        import torch
        x = [torch.arange(5.0), torch.ones(3, 2)]
        print(json.dumps({"warnings": len(messages), "backends": sbfast.backends(),
                          "norm": sbfast.ops.global_sq_norm(x).item()}))
        """,
        SBFAST_NO_EXT="1",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["warnings"] == 1
    assert all(choice["cpu"] == "reference" for choice in payload["backends"].values())
    assert payload["norm"] == 30.0 + 6.0


def test_extension_serves_cpu_when_built():
    if registry.EXTENSION_ERROR is not None:
        pytest.fail(f"sbfast._C did not import in this install: {registry.EXTENSION_ERROR}")
    assert sbfast.backends()["global_sq_norm"]["cpu"] == "c++"


def test_triton_kernels_ship_inside_the_package():
    import sbfast.kernels.global_sq_norm as module

    assert module.__name__ == "sbfast.kernels.global_sq_norm"
    assert registry.has_triton("global_sq_norm")


def test_bad_cuda_backend_setting_names_the_choices(monkeypatch):
    monkeypatch.setenv("SBFAST_CUDA_BACKEND", "opencl")
    with pytest.raises(ValueError, match="SBFAST_CUDA_BACKEND='opencl'"):
        sbfast.backends()


def test_cuda_backend_setting_selects_triton(monkeypatch):
    monkeypatch.setenv("SBFAST_CUDA_BACKEND", "triton")
    assert all(choice["cuda"] == "triton" for name, choice in sbfast.backends().items() if registry.has_triton(name))
    assert registry.op_for("global_sq_norm", torch.device("cuda")) is registry.triton_op("global_sq_norm")
    assert registry.op_for("global_sq_norm", torch.device("cpu")) is torch.ops.sbfast.global_sq_norm.default


def test_missing_cuda_kernel_stub_names_the_missing_build():
    with pytest.raises(RuntimeError, match="no CUDA implementation"):
        registry._missing_cuda_stub("global_sq_norm")([torch.ones(1)])


def test_public_api_names_resolve():
    for name in sbfast.__all__:
        assert getattr(sbfast, name) is not None, name
    assert sbfast.select_sam_masks is sbfast.select.select_sam_masks
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        sbfast.nonexistent  # noqa: B018


def test_reference_face_checks_its_inputs_like_the_wrapper():
    # Without _C the reference serves CPU; called directly (no wrapper) it refuses alike.
    result = _run_python(
        """
        import sys, json
        sys.modules["sbfast._C"] = None
        import torch, sbfast
        from sbfast import ops
        def err(fn, *a):
            try:
                fn(*a)
            except Exception as e:
                return [type(e).__name__, str(e)]
        w = torch.randn(7, 2).t()  # non-contiguous param
        args = (w, torch.empty(2, 7), torch.randn(2, 7), torch.tensor(0.1), False)
        before = w.clone()
        print(json.dumps({"face": err(torch.ops.sbfast.sam_perturb_, *args), "wrapper": err(ops.sam_perturb_, *args),
                          "kept": bool(torch.equal(w, before)),
                          "int": err(torch.ops.sbfast.global_sq_norm, [torch.ones(3, dtype=torch.long)])}))
        """,
        SBFAST_NO_EXT="1",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["face"] == payload["wrapper"] and payload["face"][0] == "ValueError"
    assert "contiguous" in payload["face"][1] and payload["kept"]
    assert payload["int"][0] == "TypeError" and "floating" in payload["int"][1]


@pytest.mark.triton
def test_triton_launch_mode_is_what_this_torch_needs():
    # Decided once at import: "direct" exactly where torch's wrap_triton refuses an interpreted
    # kernel (torch 2.11 under TRITON_INTERPRET=1); it is the Triton kernel that runs either way.
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    @triton.jit
    def probe(x_ptr):
        tl.store(x_ptr, 1.0)

    try:
        wrap_triton(probe)
        refused = False
    except RuntimeError:
        refused = True
    assert registry.TRITON_LAUNCH == ("direct" if refused else "wrap_triton")
    if torch.cuda.is_available():
        assert registry.TRITON_LAUNCH == "wrap_triton"
    # the Triton face really runs the kernel: the launch record sees it
    from sbfast.kernels import launch

    x = torch.arange(5.0, device="cuda" if torch.cuda.is_available() else "cpu")
    assert registry.triton_op("global_sq_norm")([x]).item() == 30.0
    assert any("global_sq_norm" in entry for entry in launch.recorded())
