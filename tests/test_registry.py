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
    assert "global_sq_norm" in registry._TRITON_OPS


def test_bad_cuda_backend_setting_names_the_choices(monkeypatch):
    monkeypatch.setenv("SBFAST_CUDA_BACKEND", "opencl")
    with pytest.raises(ValueError, match="SBFAST_CUDA_BACKEND='opencl'"):
        sbfast.backends()


def test_cuda_backend_setting_selects_triton(monkeypatch):
    monkeypatch.setenv("SBFAST_CUDA_BACKEND", "triton")
    assert all(choice["cuda"] == "triton" for name, choice in sbfast.backends().items() if name in registry._TRITON_OPS)
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
