"""Subset selection: sbfast.select and the ops sbfast::ksmallest_mask and
sbfast::sharpbalance_masks, every face (C++ CPU, CUDA C++, Triton, reference) against
sbfast.reference.select_sam_masks. Masks are bools, so every comparison is exact equality."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, ODD_SIZES, TRITON_DEVICE
from hypothesis import given, settings
from hypothesis import strategies as st

import sbfast
from sbfast import ops, reference, registry, select
from sbfast.common import floor_count

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MASK_VARIANTS = ["balance", "boost"]
SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, float("inf"), float("-inf"), float("nan"), -float("nan")]


pytestmark = pytest.mark.usefixtures("one_thread")


def _stable_first_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The definition: True at the first k of a stable ascending sort of every row."""
    flat = torch.zeros(scores.shape, dtype=torch.bool)
    flat.scatter_(1, torch.argsort(scores.cpu(), dim=1, stable=True)[:, :k], True)
    return flat


def _scores(m: int, n: int, kind: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * m + n)
    if kind == "random":  # sharpness-like: positive, spread over decades
        s = torch.randn(m, n, generator=g, dtype=torch.float64).mul(2).exp()  # < float16 max
    elif kind == "ties":  # rounded to 4 values: ties everywhere, also across the k-th place
        s = torch.randint(0, 4, (m, n), generator=g).double() * 0.25
    elif kind == "special":  # signed zeros, infinities, NaNs of both signs
        pool = torch.tensor(SPECIAL, dtype=torch.float64)
        s = pool[torch.randint(0, len(pool), (m, n), generator=g)]
    else:
        raise ValueError(kind)
    return s.to(dtype=dtype, device=device)


def _ks(n: int) -> list[int]:
    return sorted({0, 1, n // 3, n // 2, n - 1, n} & set(range(n + 1)))


# ------------------------------------------------------------------ select_sam_masks parity


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("n", [1, 7, 1000, 50000])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_select_matches_reference(device, kind, n, m):
    scores = _scores(m, n, kind, device=device)
    for ratio in (0.0, 0.01, 0.5, 1.0):
        for variant in reference.VARIANTS:
            out = select.select_sam_masks(scores, ratio, variant)
            assert out.dtype == torch.bool and out.shape == (m, n) and out.device == scores.device
            expected = reference.select_sam_masks(scores.cpu(), ratio, variant)
            assert torch.equal(out.cpu(), expected), (ratio, variant)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_select_every_dtype(device, dtype):
    scores = _scores(3, 4097, "ties", dtype=dtype, device=device) + _scores(
        3, 4097, "random", dtype=dtype, device=device
    )
    for variant in MASK_VARIANTS:
        out = select.select_sam_masks(scores, 0.29, variant)
        assert torch.equal(out.cpu(), reference.select_sam_masks(scores.cpu(), 0.29, variant))


@pytest.mark.parametrize("device", DEVICES)
def test_select_seeds_and_hand_example(device):
    scores = torch.tensor(
        [
            [0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
            [9.0, 0.1, 0.2, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0],
            [3.0, 3.0, 3.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0],
        ],
        dtype=torch.float64,
        device=device,
    )
    # worked by hand in tests/test_reference.py: F = {0,1}, {1,2}, {3,4}; R = [5..9]
    assert select.select_sam_masks(scores, 0.2, "balance").cpu().int().tolist() == [
        [0, 1, 1, 1, 1, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 1, 0, 1, 0, 0, 1],
        [1, 1, 1, 0, 0, 0, 0, 1, 0, 0],
    ]
    for variant, seeds in [("random", [7, 8, 9]), ("same", [7, 8, 9]), ("random", None)]:
        out = select.select_sam_masks(scores, 0.3, variant, seeds=seeds)
        assert out.device == scores.device
        assert torch.equal(out.cpu(), reference.select_sam_masks(scores.cpu(), 0.3, variant, seeds=seeds))


@pytest.mark.parametrize("device", DEVICES)
def test_select_empty_samples(device):
    scores = torch.zeros(3, 0, device=device)
    for variant in reference.VARIANTS:
        out = select.select_sam_masks(scores, 0.5, variant)
        assert out.shape == (3, 0) and out.dtype == torch.bool
    assert select.sam_share(torch.zeros(3, 0, dtype=torch.bool)).tolist() == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------ the ops, dispatched faces


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_ksmallest_mask_is_a_stable_sorts_first_k(device, dtype, kind):
    for m, n in [(1, 1), (3, 7), (2, 129), (2, 4097), (1, 70001)]:
        scores = _scores(m, n, kind, dtype=dtype, device=device)
        for k in _ks(n):
            out = ops.ksmallest_mask(scores, k)
            assert out.dtype == torch.bool and out.shape == (m, n) and out.device == scores.device
            assert torch.equal(out.cpu(), _stable_first_k(scores, k)), (m, n, k)


@pytest.mark.parametrize("device", DEVICES)
def test_ksmallest_mask_adversarial_keys(device):
    # Keys that agree on every byte but the last (only the final radix pass separates them),
    # one value repeated with the tie straddling the k-th place, and a non-contiguous input.
    base = torch.tensor(1.0).view(torch.int32)
    close = (base + torch.randperm(300, dtype=torch.int32)).view(torch.float32)
    rows = torch.stack([close, torch.full((300,), 2.5), torch.linspace(-1, 1, 300).flip(0)])
    for scores in (rows.to(device), rows.t().contiguous().t().to(device), rows.double().to(device)):
        for k in (1, 150, 299):
            assert torch.equal(ops.ksmallest_mask(scores, k).cpu(), _stable_first_k(scores, k))
    wide = _scores(7, 2, "ties", device=device).t()  # [2, 7], strides (1, 2)
    assert not wide.is_contiguous()
    assert torch.equal(ops.ksmallest_mask(wide, 3).cpu(), _stable_first_k(wide, 3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", MASK_VARIANTS)
def test_sharpbalance_masks_matches_reference_twin(device, variant):
    g = torch.Generator().manual_seed(5)
    for m, sizes in [
        (1, ODD_SIZES + [50000]),
        (2, ODD_SIZES),
        (3, ODD_SIZES + [50000]),
        (8, ODD_SIZES),
        (300, [7, 4097]),
    ]:  # 300: past the uint8 counters of the CPU kernel
        for n in sizes:
            for density in (0.0, 0.05, 0.5, 1.0):
                flat = torch.rand(m, n, generator=g) < density
                out = ops.sharpbalance_masks(flat.to(device), variant)
                assert torch.equal(out.cpu(), reference.sharpbalance_masks(flat, MASK_VARIANTS.index(variant)))


def test_kernels_split_across_threads():
    # Big enough that rows of ksmallest_mask and chunks of the mask algebra are shared among
    # threads (the kernels keep smaller problems on one thread).
    scores = _scores(8, 150_000, "ties")
    expected = [reference.select_sam_masks(scores, 0.3, variant) for variant in MASK_VARIANTS]
    torch.set_num_threads(2)
    try:
        for variant, masks in zip(MASK_VARIANTS, expected, strict=True):
            assert torch.equal(select.select_sam_masks(scores, 0.3, variant), masks)
    finally:
        torch.set_num_threads(1)


def test_reference_twins_compose_to_select_sam_masks():
    scores = _scores(3, 1000, "ties")
    for ratio in (0.0, 0.3, 1.0):
        flat = reference.ksmallest_mask(scores, floor_count(1000, ratio))
        for code, variant in enumerate(MASK_VARIANTS):
            assert torch.equal(
                reference.sharpbalance_masks(flat, code), reference.select_sam_masks(scores, ratio, variant)
            )


# ------------------------------------------------------------------ Triton face (interpreter on CPU)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_triton_ksmallest_mask(dtype):
    # one program per row walks the row in SELECT_BLOCK chunks: rows of one chunk exactly, and
    # of two and a bit (the last chunk ragged)
    from sbfast.kernels.select import SELECT_BLOCK

    face = registry.triton_op("ksmallest_mask")
    for kind in ("ties", "special", "random"):
        long_rows = [(1, 2 * SELECT_BLOCK + 1), (1, SELECT_BLOCK)] if kind == "ties" else []
        for m, n in [(1, 1), (3, 7), (2, 129)] + long_rows:
            scores = _scores(m, n, kind, dtype=dtype, device=TRITON_DEVICE)
            for k in _ks(n):
                assert torch.equal(face(scores, k).cpu(), _stable_first_k(scores, k)), (kind, m, n, k)


@pytest.mark.triton
@pytest.mark.parametrize("variant", MASK_VARIANTS)
def test_triton_sharpbalance_masks(variant):
    # one program per ALGEBRA_BLOCK samples: tiles just under, at and past a block, and grids of
    # several tiles with a ragged last one (the rank in R is carried across tiles)
    from sbfast.kernels.select import ALGEBRA_BLOCK

    face = registry.triton_op("sharpbalance_masks")
    g = torch.Generator().manual_seed(6)
    code = MASK_VARIANTS.index(variant)
    for m in (1, 3, 8):
        for n in ODD_SIZES + [ALGEBRA_BLOCK, ALGEBRA_BLOCK + 1, 3 * ALGEBRA_BLOCK]:
            for density in (0.0, 0.2, 1.0):
                flat = torch.rand(m, n, generator=g) < density
                assert torch.equal(face(flat.to(TRITON_DEVICE), code).cpu(), reference.sharpbalance_masks(flat, code))


@pytest.mark.triton
def test_triton_pipeline_matches_select_sam_masks():
    ks_face, alg_face = registry.triton_op("ksmallest_mask"), registry.triton_op("sharpbalance_masks")
    scores = _scores(3, 1000, "ties", device=TRITON_DEVICE)
    for ratio in (0.01, 0.5):
        flat = ks_face(scores, floor_count(1000, ratio))
        for code, variant in enumerate(MASK_VARIANTS):
            assert torch.equal(alg_face(flat, code).cpu(), reference.select_sam_masks(scores.cpu(), ratio, variant))


# ------------------------------------------------------------------ invariants (hypothesis)


@settings(max_examples=120, deadline=None)
@given(
    m=st.integers(1, 5),
    n=st.integers(0, 60),
    ratio=st.floats(0.0, 1.0),
    levels=st.integers(1, 6),
    variant=st.sampled_from(MASK_VARIANTS),
    seed=st.integers(0, 2**31 - 1),
)
def test_select_invariants(m, n, ratio, levels, variant, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (m, n), generator=g).float()
    k = math.floor(n * ratio + 1e-9)
    flat = ops.ksmallest_mask(scores, k)
    masks = select.select_sam_masks(scores, ratio, variant)
    assert torch.equal(masks, ops.sharpbalance_masks(flat, variant))
    assert (flat.sum(1) == k).all()  # |F_j| = k
    for j in range(m):  # F_j is the k flattest, ties to the lower index
        inside, outside = scores[j][flat[j]], scores[j][~flat[j]]
        if inside.numel() and outside.numel():
            assert inside.max() <= outside.min()
            tie = scores[j] == inside.max()
            taken, left = (flat[j] & tie).nonzero(), (~flat[j] & tie).nonzero()
            assert not left.numel() or taken.max() < left.min()
    held = flat.sum(0)
    rest = held == 0
    for i in range(m):
        others = (held - flat[i].long()) > 0
        assert not (others & ~masks[i]).any()  # A_i within the SAM set
        sam_idx, normal_idx = select.sam_index_split(masks[i])
        assert torch.equal(torch.sort(torch.cat([sam_idx, normal_idx])).values, torch.arange(n))  # normal = complement
        assert torch.equal(sam_idx, masks[i].nonzero().squeeze(1)) and torch.equal(
            normal_idx, (~masks[i]).nonzero().squeeze(1)
        )
        assert not (masks[i] & ~others & ~rest).any()  # outside R, SAM only through A_i
    own_rest = (masks & rest).sum(1) if variant == "balance" else (~masks & rest).sum(1)  # |R_i|
    assert int(own_rest.sum()) == int(rest.sum())  # the R_i partition R
    assert int(own_rest.max() - own_rest.min()) <= 1  # round robin: sizes differ by at most 1
    if variant == "balance":
        assert not (masks.sum(0)[rest] != 1).any()  # each R member is SAM for exactly its owner
    torch.testing.assert_close(
        select.sam_share(masks), masks.float().mean(1) if n else torch.zeros(m), rtol=0, atol=1e-7
    )


@pytest.mark.triton
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 3), n=st.integers(1, 40), levels=st.integers(1, 4), data=st.data())
def test_triton_ksmallest_mask_property(m, n, levels, data):
    k = data.draw(st.integers(0, n))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    scores = torch.randint(0, levels, (m, n), generator=g).float() - 1.0
    out = registry.triton_op("ksmallest_mask")(scores.to(TRITON_DEVICE), k)
    assert torch.equal(out.cpu(), _stable_first_k(scores, k))


# ------------------------------------------------------------------ op plumbing


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    scores = _scores(3, 129, "ties", device=device)
    torch.library.opcheck(torch.ops.sbfast.ksmallest_mask.default, (scores, 40))
    torch.library.opcheck(torch.ops.sbfast.ksmallest_mask.default, (scores.double(), 0))
    flat = ops.ksmallest_mask(scores, 40)
    for code in (0, 1):
        torch.library.opcheck(torch.ops.sbfast.sharpbalance_masks.default, (flat, code))
    if device == "cuda" and registry.has_triton("ksmallest_mask"):
        # The Triton faces too (on CPU the interpreter cannot run under fake tensors).
        torch.library.opcheck(registry.triton_op("ksmallest_mask"), (scores, 40))
        torch.library.opcheck(registry.triton_op("sharpbalance_masks"), (flat, 1))


def test_no_host_sync_under_compile():
    scores = _scores(3, 1000, "ties")

    def pipeline(s: torch.Tensor) -> torch.Tensor:
        return ops.sharpbalance_masks(ops.ksmallest_mask(s, 300), "boost")

    compiled = torch.compile(pipeline, fullgraph=True)
    assert torch.equal(compiled(scores), reference.select_sam_masks(scores, 0.3, "boost"))


def test_cpu_kernels_are_served_by_the_extension():
    if registry.EXTENSION_ERROR is not None:
        pytest.fail(f"sbfast._C did not import: {registry.EXTENSION_ERROR}")
    table = sbfast.backends()
    assert table["ksmallest_mask"]["cpu"] == "c++" and table["sharpbalance_masks"]["cpu"] == "c++"


def test_sam_share_and_split_on_a_known_mask():
    masks = torch.tensor([[True, False, True, True], [False, False, False, False]])
    assert select.sam_share(masks).tolist() == [0.75, 0.0]
    assert select.sam_share(masks).dtype == torch.float32
    sam_idx, normal_idx = select.sam_index_split(masks[0])
    assert sam_idx.tolist() == [0, 2, 3] and normal_idx.tolist() == [1]
    assert sam_idx.dtype == normal_idx.dtype == torch.int64


# ------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "scores,kwargs,error,match",
    [
        (torch.zeros(5), {}, ValueError, "2-D"),
        (torch.zeros(0, 5), {}, ValueError, "M = 0"),
        (torch.zeros(2, 5, dtype=torch.long), {}, TypeError, "floating"),
        (torch.zeros(2, 5, dtype=torch.long), {}, ValueError, "floating"),  # the reference's type, too
        (torch.zeros(2, 5, dtype=torch.bool), {}, TypeError, "floating"),
        (torch.tensor([[0.0, float("nan")]]), {}, ValueError, "1 NaN"),
        (torch.tensor([[0.0, 1.0], [float("inf"), 0.0]]), {}, ValueError, r"1 inf values \(members \[1\]\)"),
        (torch.tensor([[0.0, float("-inf")]]), {}, ValueError, "inf"),
        (torch.zeros(2, 5), {"ratio": -0.1}, ValueError, "ratio"),
        (torch.zeros(2, 5), {"ratio": 1.5}, ValueError, "ratio"),
        (torch.zeros(2, 5), {"ratio": float("nan")}, ValueError, "ratio"),
        (torch.zeros(2, 5), {"ratio": "0.5"}, TypeError, "ratio"),
        (torch.zeros(2, 5), {"ratio": True}, TypeError, "ratio"),
        (torch.zeros(2, 5), {"variant": "sharp"}, ValueError, "variant"),
        (torch.zeros(2, 5), {"seeds": [1]}, ValueError, "seeds"),
        (torch.zeros(2, 5), {"seeds": [1, 2.5]}, TypeError, "seeds"),
    ],
)
def test_select_errors(scores, kwargs, error, match):
    kwargs = {"ratio": 0.5, **kwargs}
    with pytest.raises(error, match=match):
        select.select_sam_masks(scores, **kwargs)
    with pytest.raises(ValueError):  # the reference rejects the same inputs
        reference.select_sam_masks(scores, **kwargs)


def test_select_scores_not_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        select.select_sam_masks([[0.0, 1.0]], 0.5)


def test_op_wrappers_reject_bad_inputs():
    with pytest.raises(TypeError, match="floating"):
        ops.ksmallest_mask(torch.zeros(2, 3, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match="2-D"):
        ops.ksmallest_mask(torch.zeros(3), 1)
    with pytest.raises(ValueError, match=r"k = 4 outside \[0, N = 3\]"):
        ops.ksmallest_mask(torch.zeros(2, 3), 4)
    with pytest.raises(TypeError, match="int"):
        ops.ksmallest_mask(torch.zeros(2, 3), 1.0)
    with pytest.raises(TypeError, match="torch.bool"):
        ops.sharpbalance_masks(torch.zeros(2, 3), "balance")
    with pytest.raises(ValueError, match="variant"):
        ops.sharpbalance_masks(torch.zeros(2, 3, dtype=torch.bool), "random")
    with pytest.raises(ValueError, match="variant"):
        ops.sharpbalance_masks(torch.zeros(2, 3, dtype=torch.bool), 2)
    with pytest.raises(TypeError, match="bool"):
        select.sam_index_split(torch.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        select.sam_index_split(torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        select.sam_share(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="2-D"):
        select.sam_share(torch.zeros(3, dtype=torch.bool))


def _kernel_faces(device: str) -> list:
    """(ksmallest_mask face, sharpbalance_masks face, device, errors): the C++/CUDA kernels
    raise RuntimeError (TORCH_CHECK), the Python faces the wrapper's TypeError/ValueError."""
    cpp = (torch.ops.sbfast.ksmallest_mask, torch.ops.sbfast.sharpbalance_masks, device, RuntimeError, RuntimeError)
    faces = [cpp]
    if registry.TRITON_ERROR is None:
        faces.append(
            (
                registry.triton_op("ksmallest_mask"),
                registry.triton_op("sharpbalance_masks"),
                TRITON_DEVICE,
                TypeError,
                ValueError,
            )
        )
    return faces


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_check_their_inputs(device):
    # Called without the wrapper, every face (C++/CUDA and Triton) still refuses what it cannot do.
    for ks, alg, dev, type_error, value_error in _kernel_faces(device):
        with pytest.raises(value_error, match="outside"):
            ks(torch.zeros(2, 3, device=dev), 5)
        with pytest.raises(type_error, match="floating"):
            ks(torch.zeros(2, 3, dtype=torch.long, device=dev), 1)
        with pytest.raises(value_error, match="variant"):
            alg(torch.zeros(2, 3, dtype=torch.bool, device=dev), 7)
        with pytest.raises(type_error, match="bool"):
            alg(torch.zeros(2, 3, device=dev), 0)


# ------------------------------------------------------------------ the multi-block CUDA select
# Long rows are spread over many blocks on CUDA (tiles of a row histogram into one row
# histogram; tied keys are ranked across tiles). The same tests run the CPU kernel, the twin.


def _first_k_from_order(order: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(order.shape, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_ksmallest_mask_long_rows(device, kind):
    # 3 members x 1.28M samples (ImageNet-sized): "ties" puts a tie across the k-th place that
    # spans every tile of the row
    scores = _scores(3, 1_280_000, kind)
    order = torch.argsort(scores, dim=1, stable=True)
    on_device = scores.to(device)
    for k in (1, 640_000, 1_279_999):
        assert torch.equal(ops.ksmallest_mask(on_device, k).cpu(), _first_k_from_order(order, k)), k


@pytest.mark.parametrize("device", DEVICES)
def test_ksmallest_mask_float64_keys_split_in_the_last_pass(device):
    # float64 keys that differ only in their lowest bits (all 6 passes needed), repeated so that
    # the k-th place falls inside a run of equal keys, over enough scores for many tiles
    base = torch.tensor(1.0, dtype=torch.float64).view(torch.int64)
    values = (base + torch.randint(0, 64, (2, 300_000), generator=torch.Generator().manual_seed(3))).view(torch.float64)
    order = torch.argsort(values, dim=1, stable=True)
    for k in (1, 4689, 150_000, 299_999):
        assert torch.equal(ops.ksmallest_mask(values.to(device), k).cpu(), _first_k_from_order(order, k)), k


@pytest.mark.parametrize("device", DEVICES)
def test_ksmallest_mask_many_short_rows(device):
    # more rows than one CUDA launch chunk (4096 rows of histograms)
    scores = _scores(5000, 33, "ties")
    order = torch.argsort(scores, dim=1, stable=True)
    for k in (1, 16, 32):
        assert torch.equal(ops.ksmallest_mask(scores.to(device), k).cpu(), _first_k_from_order(order, k)), k


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_ksmallest_mask_agrees_with_cpu_kernel():
    for dtype in FLOAT_DTYPES:
        scores = _scores(8, 200_003, "ties", dtype=dtype) + _scores(8, 200_003, "special", dtype=dtype)
        for k in (1, 100_000, 200_002):
            assert torch.equal(ops.ksmallest_mask(scores.cuda(), k).cpu(), ops.ksmallest_mask(scores, k)), (dtype, k)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_graph_replays_the_selection():
    scores = _scores(3, 50_000, "ties", device="cuda")
    pipeline = lambda s: ops.sharpbalance_masks(ops.ksmallest_mask(s, 15_000), "boost")  # noqa: E731
    pipeline(scores)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pipeline(scores)
    for seed in (1, 2):
        scores.copy_(_scores(3, 50_000, "random" if seed == 1 else "ties", device="cuda").flip(1))
        graph.replay()
        assert torch.equal(out.cpu(), reference.select_sam_masks(scores.cpu(), 0.3, "boost"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_ksmallest_mask_row_past_2_31_scores():
    # 64-bit offsets: one row of 2^31 + 5 float16 scores (4 GiB). All ones but four zeros, three
    # of them past index 2^31; k = 6 takes the zeros and then the first two ones in index order.
    n = (1 << 31) + 5
    scores = torch.ones(1, n, dtype=torch.float16, device="cuda")
    zeros = [7, (1 << 31) + 1, n - 2, n - 1]
    scores[0, zeros] = 0.0
    out = ops.ksmallest_mask(scores, 6)
    assert out.sum().item() == 6
    assert out[0, zeros].all().item() and out[0, :2].all().item() and not out[0, 2].item()


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_a_seed_outside_the_generators_range_is_refused_in_one_line(seed):
    scores = torch.rand(2, 9, generator=torch.Generator().manual_seed(0))
    with pytest.raises(
        ValueError, match=rf"seeds must lie in \[-2\*\*63, 2\*\*64\) \(a torch.Generator seed\), got {seed}"
    ):
        select.select_sam_masks(scores, 0.5, variant="random", seeds=[0, seed])
    # the edges of the range are seeds like any other
    out = select.select_sam_masks(scores, 0.5, variant="random", seeds=[2**64 - 1, -(2**63)])
    assert torch.equal(out, reference.select_sam_masks(scores, 0.5, variant="random", seeds=[2**64 - 1, -(2**63)]))
