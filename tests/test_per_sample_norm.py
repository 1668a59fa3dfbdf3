"""sbfast::per_sample_grad_sq_norm_direct / _gram: every face against float64.

Both ops compute s_i = ||sum_t g_it a_it^T||_F^2 for a [B, T, d], g [B, T, p].
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import DEVICES, TRITON_DEVICE
from helpers import assert_within_plain_error

from sbfast import ops, reference, registry

FORMS = ["direct", "gram"]

# (dtype, atol relative to the largest exact score): atol covers the cases where plain PyTorch
# is exact; half and bfloat16 inputs are rounded first, so their exact value is taken from the
# rounded inputs.
DTYPES = [
    (torch.float32, 1e-6),
    (torch.float64, 1e-13),
    (torch.bfloat16, 1e-6),
    (torch.float16, 1e-6),
]

# (B, T, d, p): the odd sizes 1, 7, 129, 4097 on every axis, and empty cases
SHAPES = [
    (1, 1, 1, 1),
    (3, 7, 7, 7),
    (2, 1, 129, 7),
    (3, 7, 1, 129),
    (2, 129, 7, 1),
    (1, 7, 4097, 3),
    (1, 4097, 3, 7),
    (0, 7, 7, 7),
    (3, 0, 7, 7),
    (3, 7, 0, 7),
    (3, 7, 7, 0),
]


def _exact(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    a, g = a.double().cpu(), g.double().cpu()
    return torch.einsum("btp,btd->bpd", g, a).pow(2).sum((1, 2))


def _plain(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """What a user would write, in the inputs' own dtype (half accumulates as torch does)."""
    return torch.bmm(g.transpose(1, 2), a).pow(2).sum((1, 2))


def _inputs(shape, dtype, device, seed=0):
    b, t, d, p = shape
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(b, t, d, generator=gen).to(dtype).to(device)
    g = torch.randn(b, t, p, generator=gen).to(dtype).to(device)
    return a, g


def _check(out, a, g, dtype, atol):
    assert out.shape == (a.shape[0],)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    exact = _exact(a, g)
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    assert_within_plain_error(out, _plain(a.cpu(), g.cpu()), exact, atol=atol * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dispatched_op_matches_float64(device, form, dtype, atol, shape):
    a, g = _inputs(shape, dtype, device)
    out = getattr(ops, f"per_sample_grad_sq_norm_{form}")(a, g)
    assert out.device.type == device
    _check(out, a, g, dtype, atol)


@pytest.mark.parametrize("form", FORMS)
def test_reference_matches_float64(form):
    for shape in SHAPES:
        a, g = _inputs(shape, torch.float64, "cpu")
        torch.testing.assert_close(
            getattr(reference, f"per_sample_grad_sq_norm_{form}")(a, g), _exact(a, g), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("device", DEVICES)
def test_forms_agree_and_accept_strided_views(device):
    # the unfold of a convolution arrives as a transposed view [B, d, T] -> [B, T, d]
    a = torch.randn(3, 33, 7, device=device).transpose(1, 2)
    g = torch.randn(3, 5, 7, device=device, dtype=torch.float64)[:, ::2].transpose(1, 2)
    assert not a.is_contiguous() and not g.is_contiguous()
    direct = ops.per_sample_grad_sq_norm_direct(a, g)
    gram = ops.per_sample_grad_sq_norm_gram(a, g)
    assert direct.dtype == gram.dtype == torch.float64  # a float64 input decides
    torch.testing.assert_close(direct, gram, rtol=1e-6, atol=0)
    torch.testing.assert_close(direct.cpu(), _exact(a, g), rtol=1e-6, atol=0)


def test_identity_by_hand():
    # one sample, T = 2: a = [[1, 0], [0, 2]], g = [[3], [4]] -> grad = g^T a = [3, 8], s = 73
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    g = torch.tensor([[[3.0], [4.0]]])
    for form in FORMS:
        assert getattr(ops, f"per_sample_grad_sq_norm_{form}")(a, g).tolist() == [73.0]


# The kernels' tiles are 32 wide in p, d and T, and the Gram kernel steps through d and p by 16:
# shapes below, at and past those widths, so every grid has several programs and ragged tails.
TRITON_SHAPES = [(3, t, d, p) for t, d, p in itertools.product([1, 7], [1, 7, 33], [1, 7, 33])] + [
    (2, 40, 5, 3),  # more than one T block: off-diagonal Gram tiles count twice
    (2, 33, 33, 65),  # 2 T blocks, 2 d tiles, 3 p tiles: ragged in every direction
    (1, 65, 16, 32),  # 3 T blocks (6 Gram pairs); d and p exactly one step / one tile
    (0, 7, 7, 7),
    (3, 0, 7, 7),
]


# bfloat16 runs on a GPU only: the Triton interpreter's tl.dot multiplies bfloat16 operands as
# their raw 16-bit patterns (3.6 and 3.8 alike). scripts/triton_aot_check.py compiles the bfloat16
# twin of every float16 specialisation, so the GPU's bfloat16 kernels are still compiled in CI.
TRITON_DTYPES = [
    (torch.float32, 1e-6),
    (torch.float64, 1e-13),
    (torch.float16, 1e-6),
    pytest.param(
        torch.bfloat16,
        1e-6,
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not torch.cuda.is_available(), reason="no CUDA GPU (the interpreter's bfloat16 tl.dot is wrong)"
            ),
        ],
    ),
]


@pytest.mark.triton
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype,atol", TRITON_DTYPES)
def test_triton_matches_float64(form, dtype, atol):
    face = registry.triton_op(f"per_sample_grad_sq_norm_{form}")
    for shape in TRITON_SHAPES:
        a, g = _inputs(shape, dtype, TRITON_DEVICE, seed=sum(shape))
        _check(face(a, g), a, g, dtype, atol)


@pytest.mark.triton
@pytest.mark.parametrize("form", FORMS)
def test_triton_strided_and_mixed_dtype(form):
    face = registry.triton_op(f"per_sample_grad_sq_norm_{form}")
    a = torch.randn(3, 33, 7, device=TRITON_DEVICE).transpose(1, 2)  # [3, 7, 33], T stride 1
    g = torch.randn(3, 7, 9, device=TRITON_DEVICE, dtype=torch.float64)
    out = face(a, g)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.cpu(), _exact(a, g), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_opcheck(device, form):
    a = torch.randn(3, 7, 5, device=device)
    g = torch.randn(3, 7, 4, device=device)
    torch.library.opcheck(getattr(torch.ops.sbfast, f"per_sample_grad_sq_norm_{form}").default, (a, g))


@pytest.mark.parametrize("form", FORMS)
def test_bad_inputs_name_the_problem(form):
    op = getattr(ops, f"per_sample_grad_sq_norm_{form}")
    with pytest.raises(ValueError, match=r"a \[B, T, d\]"):
        op(torch.ones(3, 4), torch.ones(3, 4, 2))
    with pytest.raises(ValueError, match="differ in B or T"):
        op(torch.ones(3, 4, 5), torch.ones(3, 5, 2))
    with pytest.raises(ValueError, match="differ in B or T"):
        op(torch.ones(2, 4, 5), torch.ones(3, 4, 2))
    with pytest.raises(TypeError, match="floating dtype"):
        op(torch.ones(3, 4, 5, dtype=torch.int64), torch.ones(3, 4, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        op(torch.ones(3, 4, 5), [[1.0]])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            op(torch.ones(3, 4, 5), torch.ones(3, 4, 2, device="cuda"))


# --------------------------------------------------------------------------------------------
# sbfast::per_sample_conv_grad_sq_norm
# --------------------------------------------------------------------------------------------

# (x shape, C_out, kernel, stride, padding, dilation, groups): 1-D and 2-D, odd sizes, empty
CONVS = [
    ((3, 1, 7), 1, (1,), (1,), (0,), (1,), 1),
    ((2, 4, 129), 6, (3,), (2,), (1,), (2,), 2),
    ((3, 7, 4097), 1, (5,), (7,), (2,), (1,), 1),
    ((3, 3, 7, 7), 5, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((2, 6, 9, 7), 9, (2, 3), (2, 1), (0, 2), (1, 2), 3),
    ((2, 4, 5, 5), 4, (3, 3), (1, 1), (1, 1), (1, 1), 4),  # depthwise
    ((1, 7, 1, 1), 129, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    ((0, 3, 5, 5), 2, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    # sizes where convolution libraries take their fast (and not thread-safe) paths, several
    # samples per thread: the patch embedding of a ViT and a ResNet stage-1 convolution
    ((8, 3, 32, 32), 64, (4, 4), (4, 4), (0, 0), (1, 1), 1),
    ((8, 32, 16, 16), 32, (3, 3), (1, 1), (1, 1), (1, 1), 1),
]


def _conv_case(case, dtype, device, seed=0):
    shape, c_out, kernel, stride, padding, dilation, groups = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    conv = torch.nn.functional.conv1d if len(kernel) == 1 else torch.nn.functional.conv2d
    w_size = [c_out, shape[1] // groups, *kernel]
    out_shape = conv(x, torch.zeros(w_size), None, stride, padding, dilation, groups).shape
    g = torch.randn(out_shape, generator=gen)
    return x.to(dtype).to(device), g.to(dtype).to(device), (w_size, list(stride), list(padding), list(dilation), groups)


def _conv_exact(x, g, w_size, stride, padding, dilation, groups):
    """Per sample, the weight gradient by autograd in float64, then its squared norm."""
    conv = torch.nn.functional.conv1d if x.dim() == 3 else torch.nn.functional.conv2d
    out = []
    for i in range(x.shape[0]):
        w = torch.zeros(w_size, dtype=torch.float64, requires_grad=True)
        y = conv(x[i : i + 1].double().cpu(), w, None, stride, padding, dilation, groups)
        (dw,) = torch.autograd.grad(y, w, g[i : i + 1].double().cpu())
        out.append(dw.pow(2).sum())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


# (dtype, relative tolerance against float64)
CONV_DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 1e-5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,rtol", CONV_DTYPES)
@pytest.mark.parametrize("case", CONVS, ids=str)
def test_conv_op_matches_float64(device, dtype, rtol, case):
    x, g, geometry = _conv_case(case, dtype, device)
    out = ops.per_sample_conv_grad_sq_norm(x, g, *geometry)
    assert out.shape == (x.shape[0],) and out.device.type == device
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # bfloat16 inputs are exact in float32 and the kernel computes in float32
    torch.testing.assert_close(out.double().cpu(), _conv_exact(x, g, *geometry), rtol=rtol, atol=0)


def test_conv_reference_matches_float64():
    for case in CONVS:
        x, g, geometry = _conv_case(case, torch.float64, "cpu")
        torch.testing.assert_close(
            reference.per_sample_conv_grad_sq_norm(x, g, *geometry), _conv_exact(x, g, *geometry), rtol=1e-12, atol=0
        )


@pytest.mark.triton
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_triton_conv_matches_float64(dtype, rtol):
    face = registry.triton_op("per_sample_conv_grad_sq_norm")
    for case in [c for c in CONVS if c[0][-1] < 16]:  # the interpreter is slow
        x, g, geometry = _conv_case(case, dtype, TRITON_DEVICE)
        torch.testing.assert_close(
            face(x, g, *geometry).double().cpu(), _conv_exact(x, g, *geometry), rtol=rtol, atol=0
        )


@pytest.mark.parametrize("device", DEVICES)
def test_conv_opcheck(device):
    x, g, geometry = _conv_case(CONVS[4], torch.float32, device)
    torch.library.opcheck(torch.ops.sbfast.per_sample_conv_grad_sq_norm.default, (x, g, *geometry))


def test_conv_bad_inputs_name_the_problem():
    x, g, (w_size, stride, padding, dilation, groups) = _conv_case(CONVS[3], torch.float32, "cpu")
    op = ops.per_sample_conv_grad_sq_norm
    with pytest.raises(ValueError, match="spatial dims"):
        op(x.flatten(2).flatten(1), g.flatten(1), w_size, stride, padding, dilation, groups)
    with pytest.raises(ValueError, match="stride"):
        op(x, g, w_size, [1], padding, dilation, groups)
    with pytest.raises(ValueError, match="do not fit one convolution"):
        op(x, g, w_size, stride, padding, dilation, 3)
    with pytest.raises(ValueError, match="do not fit one convolution"):
        op(x[:2], g, w_size, stride, padding, dilation, groups)
    with pytest.raises(TypeError, match="floating dtype"):
        op(x.long(), g, w_size, stride, padding, dilation, groups)


# --------------------------------------------------------------------------------------------
# The CUDA kernels' chunked workspace and the convolution's two forms. The same tests run the
# CPU kernels, the twins that run everywhere.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_products_larger_than_the_workspace(device):
    # direct: B x p x d float32 products of 354 MB, gram: B x 2 x T^2 of 281 MB, past the CUDA
    # kernels' 256 MiB workspace, so they run in chunks of samples; the exact value comes from
    # the other (small) form in float64
    a, g = _inputs((600, 4, 384, 384), torch.float32, "cpu", seed=1)
    a64, g64 = a.double(), g.double()
    exact = (torch.bmm(a64, a64.transpose(1, 2)) * torch.bmm(g64, g64.transpose(1, 2))).sum((1, 2))
    out = ops.per_sample_grad_sq_norm_direct(a.to(device), g.to(device))
    torch.testing.assert_close(out.double().cpu(), exact, rtol=1e-5, atol=0)
    a, g = _inputs((130, 520, 3, 2), torch.float32, "cpu", seed=2)
    exact = torch.bmm(g.double().transpose(1, 2), a.double()).pow(2).sum((1, 2))
    out = ops.per_sample_grad_sq_norm_gram(a.to(device), g.to(device))
    torch.testing.assert_close(out.double().cpu(), exact, rtol=1e-5, atol=0)


# Convolutions where the Gram form is cheaper (T (d + p) <= d p: few positions, wide channels)
# and where the direct form is, with groups, 1-D, and channels_last inputs.
CONV_FORMS = [
    ((4, 64, 4, 4), 128, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # gram: T 16, d 576, p 128
    ((3, 32, 2, 2), 64, (3, 3), (2, 2), (1, 1), (1, 1), 2),  # gram, grouped, stride 2
    ((2, 64, 5), 96, (3,), (1,), (1,), (1,), 1),  # 1-D gram
    ((3, 8, 17, 13), 16, (3, 3), (1, 2), (2, 1), (2, 1), 1),  # direct, dilation
    ((2, 6, 9, 7), 9, (2, 3), (2, 1), (0, 2), (1, 2), 3),  # direct, grouped
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("case", CONV_FORMS, ids=str)
def test_conv_both_forms_and_layouts(device, dtype, rtol, case):
    x, g, geometry = _conv_case(case, dtype, device, seed=7)
    exact = _conv_exact(x, g, *geometry)
    torch.testing.assert_close(
        ops.per_sample_conv_grad_sq_norm(x, g, *geometry).double().cpu(), exact, rtol=rtol, atol=0
    )
    if x.dim() == 4:  # channels_last input and output gradient: strided, handled by a dense copy
        xl, gl = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
        torch.testing.assert_close(
            ops.per_sample_conv_grad_sq_norm(xl, gl, *geometry).double().cpu(), exact, rtol=rtol, atol=0
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_kernels_agree_with_cpu_kernels():
    for shape in [(3, 7, 7, 7), (2, 129, 7, 1), (1, 7, 4097, 3), (64, 16, 33, 65)]:
        a, g = _inputs(shape, torch.float64, "cpu")
        for form in FORMS:
            op = getattr(ops, f"per_sample_grad_sq_norm_{form}")
            torch.testing.assert_close(op(a.cuda(), g.cuda()).cpu(), op(a, g), rtol=1e-12, atol=0)
    for case in CONVS + CONV_FORMS:
        x, g, geometry = _conv_case(case, torch.float64, "cpu")
        torch.testing.assert_close(
            ops.per_sample_conv_grad_sq_norm(x.cuda(), g.cuda(), *geometry).cpu(),
            ops.per_sample_conv_grad_sq_norm(x, g, *geometry),
            rtol=1e-12,
            atol=0,
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_graph_replays_the_per_sample_norms():
    a, g = _inputs((8, 16, 33, 17), torch.float32, "cuda")
    x, gc, geometry = _conv_case(CONV_FORMS[0], torch.float32, "cuda")

    def all_norms():
        return (
            ops.per_sample_grad_sq_norm_direct(a, g),
            ops.per_sample_grad_sq_norm_gram(a, g),
            ops.per_sample_conv_grad_sq_norm(x, gc, *geometry),
        )

    all_norms()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = all_norms()
    for scale in (2.0, 0.5):
        for t in (a, g, x, gc):
            t.mul_(scale)
        graph.replay()
        for out, fresh in zip(outs, all_norms(), strict=True):
            torch.testing.assert_close(out, fresh)  # float32 tolerance: cuBLAS may pick another algorithm
        torch.testing.assert_close(outs[0].double().cpu(), _exact(a, g), rtol=1e-5, atol=0)
