"""sbfast::global_sq_norm: every face (C++ CPU, CUDA C++, Triton, reference) against float64."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, ODD_SIZES, TRITON_DEVICE
from helpers import assert_within_plain_error

import sbfast
from sbfast import ops, reference, registry

# (dtype, atol): atol covers the cases where plain PyTorch is exact and only scales with |x|^2.
DTYPES = [
    (torch.float32, 1e-6),
    (torch.float64, 1e-12),
    (torch.bfloat16, 1e-6),
    (torch.float16, 1e-6),
]


def _plain(tensors: list[torch.Tensor]) -> torch.Tensor:
    """What a user would write in plain PyTorch, in the tensors' own dtype."""
    return torch.stack([t.pow(2).sum() for t in tensors]).sum()


def _exact(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The float64 value on the CPU, whatever the tensors' device (compared with ``out.cpu()``;
    a CPU zero plus CUDA sums would land on the GPU, and assert_close compares devices)."""
    return sum((t.double().pow(2).sum().cpu() for t in tensors), torch.zeros((), dtype=torch.float64))


def _lists(dtype: torch.dtype, device: str) -> list[list[torch.Tensor]]:
    return (
        [[torch.randn(n, dtype=dtype, device=device)] for n in ODD_SIZES]
        + [
            [torch.randn(n, 3, dtype=dtype, device=device) for n in ODD_SIZES],  # several shapes
            [torch.randn(5, dtype=dtype, device=device) for _ in range(40)],  # many small tensors
            [torch.randn(0, dtype=dtype, device=device), torch.randn(7, dtype=dtype, device=device)],  # an empty one
            [torch.randn(64, 33, dtype=dtype, device=device).t()],  # non-contiguous
            [
                torch.randn(4 * 1031, dtype=dtype, device=device)[1::4],
                torch.randn(9, 4, dtype=dtype, device=device)[:, 1],
            ],
        ]
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_dispatched_op_matches_float64(device, dtype, atol):
    for tensors in _lists(dtype, device):
        out = ops.global_sq_norm(tensors)
        assert out.shape == () and out.device.type == device
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        exact = _exact(tensors)
        assert_within_plain_error(out, _plain(tensors), exact, atol=atol * max(1.0, exact.item()))


@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_reference_matches_float64(dtype, atol):
    for tensors in _lists(dtype, "cpu"):
        exact = _exact(tensors)
        assert_within_plain_error(
            reference.global_sq_norm(tensors), _plain(tensors), exact, atol=atol * max(1.0, exact.item())
        )


def _triton_block() -> int:
    from sbfast.kernels.global_sq_norm import BLOCK

    return BLOCK


@pytest.mark.triton
@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_triton_matches_float64(dtype, atol):
    triton_face = registry.triton_op("global_sq_norm")
    block = _triton_block()
    # the GPU's launch: one program per BLOCK, so sizes just under, at and past a block, and a
    # grid of several programs with a ragged last one
    crossing = [
        [torch.randn(n, dtype=dtype, device=TRITON_DEVICE)] for n in (block - 1, block, block + 1, 3 * block + 5)
    ]
    for tensors in _lists(dtype, TRITON_DEVICE) + crossing:
        exact = _exact(tensors)
        assert_within_plain_error(triton_face(tensors), _plain(tensors), exact, atol=atol * max(1.0, exact.item()))


@pytest.mark.parametrize("device", DEVICES)
def test_large_tensor_accumulates_accurately(device):
    # 2^22 float32 values: a naive float32 running sum drifts; chunked accumulation must not.
    t = torch.rand(1 << 22, device=device)
    exact = _exact([t])
    assert abs(ops.global_sq_norm([t]).item() - exact.item()) / exact.item() < 1e-6


def test_mixed_dtypes_accumulate_in_float64():
    tensors = [torch.randn(7, dtype=torch.float32), torch.randn(9, dtype=torch.float64)]
    out = ops.global_sq_norm(tensors)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _exact(tensors), rtol=1e-7, atol=0)


def test_empty_list_is_zero():
    out = ops.global_sq_norm([])
    assert out.shape == () and out.item() == 0.0


def test_bad_inputs_name_the_problem():
    with pytest.raises(TypeError, match="floating dtype"):
        ops.global_sq_norm([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.global_sq_norm([torch.ones(3), [1.0, 2.0]])
    with pytest.raises(TypeError, match="element 0 is a float, expected a torch.Tensor"):
        ops.global_sq_norm([1.0, torch.ones(3)])  # the first element was read as a tensor (AttributeError)
    with pytest.raises(TypeError, match="sparse"):
        ops.global_sq_norm([torch.ones(3).to_sparse()])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            ops.global_sq_norm([torch.ones(3), torch.ones(3, device="cuda")])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    tensors = [torch.randn(7, device=device), torch.randn(3, 5, device=device)]
    torch.library.opcheck(torch.ops.sbfast.global_sq_norm.default, (tensors,))


def test_no_host_sync_under_compile():
    tensors = [torch.randn(129), torch.randn(7, 3)]
    compiled = torch.compile(ops.global_sq_norm, fullgraph=True)
    torch.testing.assert_close(compiled(tensors), ops.global_sq_norm(tensors))


def test_backends_report_every_op():
    table = sbfast.backends()
    assert set(table) == set(registry.OPS)
    for choice in table.values():
        assert choice["cpu"] in ("c++", "reference")
        assert choice["cuda"] in ("cuda-c++", "triton", "missing")


# --------------------------------------------------------------------------------------------
# The CUDA kernel's multi-tensor launch (tables of up to 96 tensors, chunks per block, a fixed
# summation order). The same tests run the CPU kernel, the twin that runs everywhere.
# --------------------------------------------------------------------------------------------


def _resnet18_like(dtype: torch.dtype, device: str, width: int = 16) -> list[torch.Tensor]:
    """The 62 parameter shapes of a CIFAR ResNet18 (at a reduced width) and 100 small tensors,
    some empty: two launch tables of the CUDA kernel."""
    shapes: list[tuple[int, ...]] = [(width, 3, 3, 3), (width,), (width,)]
    c_in = width
    for mult in (1, 2, 4, 8):
        c_out = width * mult
        for block in range(2):
            c = c_in if block == 0 else c_out
            shapes += [(c_out, c, 3, 3), (c_out,), (c_out,), (c_out, c_out, 3, 3), (c_out,), (c_out,)]
            if block == 0 and c != c_out:
                shapes += [(c_out, c, 1, 1), (c_out,), (c_out,)]
        c_in = c_out
    shapes += [(10, 8 * width), (10,)]
    assert len(shapes) == 62
    shapes += [(n,) for n in [0, 1, 7, 129, 4097] * 20]
    return [torch.randn(s, dtype=dtype, device=device) for s in shapes]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_multi_tensor_lists_match_float64_and_repeat_bitwise(device, dtype, atol):
    tensors = _resnet18_like(dtype, device)
    tensors.insert(30, torch.randn(33, 64, dtype=dtype, device=device).t())  # strided, mid-table
    out = ops.global_sq_norm(tensors)
    exact = _exact(tensors)
    assert_within_plain_error(out, _plain(tensors), exact, atol=atol * max(1.0, exact.item()))
    # a fixed summation order: the same inputs give the same bits
    assert torch.equal(ops.global_sq_norm(tensors), out)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_in_one_list_accumulate_in_float64(device):
    # dtypes interleaved: one launch per dtype group, partials of every group in one sum
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    tensors = [
        torch.randn(n, dtype=dtypes[i % 4], device=device) for i, n in enumerate([7, 4097, 1, 129, 0, 70001] * 3)
    ]
    out = ops.global_sq_norm(tensors)
    assert out.dtype == torch.float64
    # rtol: the CPU kernel sums each chunk of a float32/half tensor in float32 before float64
    torch.testing.assert_close(out.cpu(), _exact(tensors), rtol=1e-6, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_kernel_agrees_with_cpu_kernel():
    for dtype, rtol in [(torch.float32, 1e-6), (torch.float64, 1e-13)]:
        tensors = _resnet18_like(dtype, "cpu", width=64)
        torch.testing.assert_close(
            ops.global_sq_norm([t.cuda() for t in tensors]).cpu(), ops.global_sq_norm(tensors), rtol=rtol, atol=0
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_graph_replays_the_multi_tensor_launch():
    tensors = _resnet18_like(torch.float32, "cuda")
    ops.global_sq_norm(tensors)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.global_sq_norm(tensors)
    for scale in (1.0, 3.0):
        for t in tensors:
            t.mul_(scale)
        graph.replay()
        torch.testing.assert_close(out.cpu(), _exact(tensors).float(), rtol=1e-5, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_tensor_past_2_31_elements():
    # 64-bit offsets: elements past index 2^31 count (bfloat16 keeps it at 4 GiB)
    n = (1 << 31) + 4097
    big = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    big[-3:] = 2.0
    big[(1 << 31) + 1] = 3.0
    big[5] = 1.0
    assert ops.global_sq_norm([big, torch.ones(7, device="cuda")]).item() == 3 * 4.0 + 9.0 + 1.0 + 7.0
