"""sbfast.sharpness: fisher_scores and sam_loss_gap_scores against the plain-PyTorch reference.

float32: against ``sbfast.reference.fisher_scores`` (vmap of per-sample gradients) within 1e-4
relative. float64: the per-batch scores (``sample_fisher_scores``, which keep float64) against
the reference's computation kept in float64 within 1e-10 relative.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_DEVICE
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset

from sbfast import ops, reference
from sbfast.models import create_model
from sbfast.sharpness import (
    choose_form,
    fisher_scores,
    linear_conv,
    loss_gap,
    sam_loss_gap_scores,
    sample_fisher_scores,
)
from sbfast.sharpness.scorer import Scorer

F32, F64 = torch.float32, torch.float64
# (dtype, relative tolerance against the reference)
TOLS = [(F32, 1e-4), (F64, 1e-10)]


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list:
    return [(torch.arange(i, min(i + size, len(x))), x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def vmap_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The reference's computation (vmap of per-sample gradients, eval mode) in the model's dtype."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def loss(p, x1, y1):
        return F.cross_entropy(functional_call(model, (p, fixed), (x1.unsqueeze(0),)), y1.unsqueeze(0))

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    finally:
        for m, t in modes:
            m.training = t
    return sum(g.pow(2).flatten(1).sum(1) for g in grads.values())


def randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so every identity is exercised."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model


def check_parity(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, rtol: float, **kw
) -> torch.Tensor:
    """fisher_scores against the reference; returns the fast scores."""
    model = model.to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    if dtype == F64:
        fast = sample_fisher_scores(model, x, y, **kw)
        assert fast.dtype == F64
        torch.testing.assert_close(fast, vmap_scores(model, x, y), rtol=rtol, atol=0)
    else:
        fast = fisher_scores(model, batches(x, y, 3), progress=False, **kw)
        assert fast.dtype == F32 and fast.shape == (len(x),)
        torch.testing.assert_close(fast, reference.fisher_scores(model, batches(x, y, 4)), rtol=rtol, atol=0)
    assert bool((fast > 0).all())  # a test on all-zero scores would prove nothing
    return fast


@contextlib.contextmanager
def no_fallback():
    """Fails the test if the vmap fallback warns (the fast path must cover the model)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="sbfast.sharpness: no per-layer rule")
        yield


# --------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------


class GroupedCNN(nn.Module):
    """Convolutions with groups, dilation, stride, padding modes and 'same' padding, no BN."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        self.c2 = nn.Conv2d(6, 9, (2, 3), stride=(1, 2), padding=(1, 0), groups=3, bias=False)
        self.c3 = nn.Conv2d(9, 9, 3, padding="same", padding_mode="reflect", groups=9)
        self.c4 = nn.Conv2d(9, 5, 1, padding=1, padding_mode="circular")
        self.c5 = nn.Conv1d(5, 4, 3, stride=2, dilation=2, padding=1)
        self.head = nn.Linear(4 * 2, 3)

    def forward(self, x):
        h = self.c4(F.relu(self.c3(F.relu(self.c2(torch.tanh(self.c1(x)))))))
        h = self.c5(h.mean(2))  # [B, 5, W] -> Conv1d
        return self.head(torch.tanh(h).flatten(1))


class BNNet(nn.Module):
    """BatchNorm 2d and 1d (on [B, C] and [B, C, L]) with in-place ReLUs after them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.bn_seq = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6 * 5, 7)
        self.bn_flat = nn.BatchNorm1d(7)
        self.head = nn.Linear(7, 4)

    def forward(self, x):
        h = self.relu(self.bn(self.conv(x)))  # [B, 6, 5, 5]
        h = self.bn_seq(h.mean(3))  # BatchNorm1d on [B, 6, 5]
        h = self.bn_flat(self.fc(h.flatten(1)))
        return self.head(F.relu(h, inplace=True))


class NormNet(nn.Module):
    """GroupNorm, LayerNorm over two dims and one dim (with and without bias), RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.gn = nn.GroupNorm(3, 6)
        self.ln2 = nn.LayerNorm([3, 3])
        self.fc = nn.Linear(3, 5)
        self.ln1 = nn.LayerNorm(5, bias=False)
        self.rms = nn.RMSNorm(5)
        self.head = nn.Linear(6 * 3 * 5, 3)

    def forward(self, x):
        h = self.ln2(torch.tanh(self.gn(self.conv(x))))  # [B, 6, 3, 3]
        h = self.rms(torch.tanh(self.ln1(self.fc(h))))  # Linear on [B, 6, 3, 3]: T = 18
        return self.head(h.flatten(1))


class EmbedNet(nn.Module):
    """Embedding with padding_idx, a sequence Linear and a LayerNorm over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, tok):
        h = self.fc(self.ln(self.emb(tok)))  # [B, T, 6]
        return self.head(torch.tanh(h).mean(1))


def _tokens(n: int, t: int) -> torch.Tensor:
    tok = torch.randint(0, 5, (n, t))  # small vocabulary used: many repeats within a sample
    tok[0] = 3  # one sample of a single repeated token
    tok[1, ::2] = 0  # padding positions
    return tok


MODELS = {
    "mlp": lambda: (create_model("mlp", 5, in_channels=1, image_size=4, hidden=7), torch.randn(7, 1, 4, 4)),
    "grouped_cnn": lambda: (GroupedCNN(), torch.randn(7, 4, 9, 13)),
    "bn_net": lambda: (randomise_norms(BNNet()), torch.randn(7, 3, 5, 5)),
    "cnn": lambda: (randomise_norms(create_model("cnn", 5, in_channels=2, width=4)), torch.randn(7, 2, 8, 8)),
    "norm_net": lambda: (randomise_norms(NormNet()), torch.randn(7, 2, 5, 5)),
    "embed_net": lambda: (randomise_norms(EmbedNet()), _tokens(7, 9)),
    "resnet18": lambda: (randomise_norms(create_model("resnet18", 5, width=4)), torch.randn(5, 3, 16, 16)),
    # the release's Tiny-ImageNet model: its shortcut scales are depthwise 1x1 convolutions
    "resnet18_tiny": lambda: (randomise_norms(create_model("resnet18_tiny", 5, width=4)), torch.randn(5, 3, 16, 16)),
}


@pytest.mark.parametrize("dtype,rtol", TOLS)
@pytest.mark.parametrize("name", list(MODELS))
def test_models_match_reference(name, dtype, rtol):
    model, x = MODELS[name]()
    y = torch.randint(0, 3, (len(x),))
    with no_fallback():
        check_parity(model, x, y, dtype, rtol)


@pytest.mark.parametrize("dtype,rtol", TOLS)
def test_wrn40_2_matches_reference(dtype, rtol):
    model = randomise_norms(create_model("wrn40_2", 4))
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 3, 1])
    with no_fallback():
        check_parity(model, x, y, dtype, rtol)


@pytest.mark.parametrize("dtype,rtol", TOLS)
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_tiny_vit_matches_reference(pool, dtype, rtol):
    # the class token and positional embedding are TinyViT's own parameters: vmap fallback
    model = create_model("vit_tiny", 4, in_channels=1, image_size=8, patch_size=2, dim=16, depth=1, heads=2, pool=pool)
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    with pytest.warns(RuntimeWarning, match="TinyViT"):
        check_parity(randomise_norms(model), x, y, dtype, rtol)


@pytest.mark.parametrize("form", ["direct", "gram"])
def test_forced_forms_match_reference(form):
    for name in ("grouped_cnn", "norm_net", "embed_net"):
        model, x = MODELS[name]()
        y = torch.randint(0, 3, (len(x),))
        check_parity(model, x, y, F64, 1e-10, form=form)


# --------------------------------------------------------------------------------------------
# Each layer type alone, on odd shapes (the rest of the model frozen)
# --------------------------------------------------------------------------------------------


class Alone(nn.Module):
    """layer -> tanh -> frozen linear head: the score is the layer's own."""

    def __init__(self, layer: nn.Module, in_shape: tuple[int, ...], classes: int = 3) -> None:
        super().__init__()
        self.layer = layer
        with torch.no_grad():
            probe = (
                torch.zeros(2, *in_shape, dtype=torch.long)
                if isinstance(layer, nn.Embedding)
                else torch.zeros(2, *in_shape)
            )
            width = layer.eval()(probe).flatten(1).shape[1]
        self.head = nn.Linear(width, classes).requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x)).flatten(1))


def _frozen(layer: nn.Module, name: str) -> nn.Module:
    getattr(layer, name).requires_grad_(False)
    return layer


LAYERS = {
    "linear_1_to_7": (lambda: nn.Linear(1, 7), (1,)),
    "linear_129_to_1": (lambda: nn.Linear(129, 1), (129,)),
    "linear_seq_T1": (lambda: nn.Linear(7, 5), (1, 7)),
    "linear_seq_T7": (lambda: nn.Linear(7, 129), (7, 7)),
    "linear_seq_T129": (lambda: nn.Linear(3, 2), (129, 3)),
    "linear_4d_input": (lambda: nn.Linear(7, 3), (2, 3, 7)),
    "linear_no_bias": (lambda: nn.Linear(7, 5, bias=False), (7,)),
    "linear_bias_only": (lambda: _frozen(nn.Linear(7, 5), "weight"), (3, 7)),
    "linear_weight_only": (lambda: _frozen(nn.Linear(7, 5), "bias"), (3, 7)),
    "conv1d": (lambda: nn.Conv1d(3, 7, 3, stride=2, dilation=2, padding=3), (3, 29)),
    "conv1d_same_replicate_groups": (
        lambda: nn.Conv1d(4, 6, 4, padding="same", padding_mode="replicate", groups=2),
        (4, 7),
    ),
    "conv1d_k1": (lambda: nn.Conv1d(1, 1, 1), (1, 1)),
    "conv2d_stride_dilation": (
        lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 2)),
        (3, 7, 6),
    ),
    "conv2d_groups": (lambda: nn.Conv2d(6, 9, 3, groups=3, bias=False), (6, 5, 5)),
    "conv2d_depthwise_circular": (lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="circular"), (4, 4, 4)),
    "conv2d_valid_1x1": (lambda: nn.Conv2d(7, 1, 1, padding="valid"), (7, 1, 1)),
    "conv2d_bias_only": (lambda: _frozen(nn.Conv2d(3, 4, 2), "weight"), (3, 3, 3)),
    "batchnorm1d_flat": (lambda: nn.BatchNorm1d(7), (7,)),
    "batchnorm1d_seq": (lambda: nn.BatchNorm1d(3), (3, 7)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(5), (5, 3, 2)),
    "batchnorm2d_weight_only": (lambda: _frozen(nn.BatchNorm2d(5), "bias"), (5, 2, 2)),
    "layernorm_last": (lambda: nn.LayerNorm(7), (3, 7)),
    "layernorm_two_dims": (lambda: nn.LayerNorm([2, 5]), (3, 2, 5)),
    "layernorm_flat": (lambda: nn.LayerNorm(129), (129,)),
    "groupnorm": (lambda: nn.GroupNorm(3, 6), (6, 3, 3)),
    "groupnorm_flat": (lambda: nn.GroupNorm(1, 7), (7,)),
    "rmsnorm": (lambda: nn.RMSNorm([2, 3], eps=1e-5), (4, 2, 3)),
    "embedding_padding": (lambda: nn.Embedding(7, 5, padding_idx=2), (9,)),
    "embedding_single_token": (lambda: nn.Embedding(129, 3), (1,)),
}


@pytest.mark.parametrize("dtype,rtol", TOLS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_alone_matches_reference(name, dtype, rtol):
    build, in_shape = LAYERS[name]
    model = randomise_norms(Alone(build(), in_shape))
    n = 7
    x = torch.randint(0, 4, (n, *in_shape)) if isinstance(model.layer, nn.Embedding) else torch.randn(n, *in_shape)
    y = torch.randint(0, 3, (n,))
    with no_fallback():
        check_parity(model, x, y, dtype, rtol)


@pytest.mark.parametrize("form", ["direct", "gram"])
@pytest.mark.parametrize("name", [k for k in LAYERS if k.startswith(("linear_seq", "linear_4d", "conv"))])
def test_layer_alone_both_forms(name, form):
    build, in_shape = LAYERS[name]
    model = Alone(build(), in_shape)
    x, y = torch.randn(5, *in_shape), torch.randint(0, 3, (5,))
    check_parity(model, x, y, F64, 1e-10, form=form)


def test_choose_form_compares_arithmetic():
    assert choose_form(1024, 576, 64) == "direct"  # ResNet18 stage 1
    assert choose_form(256, 1152, 128) == "direct"  # stage 2 (the 2T^2 <= dp rule says gram)
    assert choose_form(64, 2304, 256) == "gram"  # stage 3
    assert choose_form(16, 4608, 512) == "gram"  # stage 4
    assert choose_form(1, 7, 7) == "gram"  # one position: two dot products beat a 7x7 outer product


# --------------------------------------------------------------------------------------------
# Module structure: weight sharing, fallbacks, unobserved parameters, in-place inputs
# --------------------------------------------------------------------------------------------


class Scale(nn.Module):
    """A custom module with its own parameter: no per-layer rule."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.scale


def test_custom_parameter_falls_back_and_warns_once():
    model = nn.Sequential(nn.Linear(5, 6), Scale(6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fast = fisher_scores(model, batches(x, y, 2), progress=False)  # 5 batches, one warning
    ours = [w for w in seen if "no per-layer rule" in str(w.message)]
    assert len(ours) == 1 and "Scale" in str(ours[0].message) and ours[0].category is RuntimeWarning
    torch.testing.assert_close(fast, reference.fisher_scores(model, batches(x, y, 4)), rtol=1e-4, atol=0)
    with pytest.warns(RuntimeWarning, match="Scale"):
        check_parity(model, x, y, F64, 1e-10)


class OwnParameters(nn.Module):
    """Own parameters used three ways: added by broadcasting over the batch (per-sample copies
    give each sample's gradient), summed over their first axis (copies would silently mix the
    samples) and multiplied (copies fail loudly)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.offset = nn.Parameter(torch.randn(1, 6) * 0.5)
        self.mixed = nn.Parameter(torch.randn(1, 6) * 0.5)
        self.proj = nn.Parameter(torch.randn(6, 6) * 0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x) + self.offset)
        h = torch.tanh(h + self.mixed.sum(0))
        return self.head(h @ self.proj)


def test_own_parameters_per_sample_copies_are_checked():
    model = OwnParameters().double()
    x, y = torch.randn(11, 4, dtype=F64), torch.randint(0, 3, (11,))
    with pytest.warns(RuntimeWarning, match="OwnParameters"):
        scorer = Scorer(model, None, "auto")
    with scorer:
        got = torch.cat([scorer.score_split(x[i : i + 2], y[i : i + 2], y[i : i + 2]) for i in range(0, 11, 2)])
    # batch 1 copies all three and fails (proj), then one at a time: offset passes the check
    # against vmap, mixed fails it, proj fails again; the last batches use offset's copies
    assert scorer.expand_state == {"offset": "yes", "mixed": "no", "proj": "no"}
    torch.testing.assert_close(got, vmap_scores(model, x, y), rtol=1e-10, atol=0)
    with pytest.warns(RuntimeWarning, match="OwnParameters"):
        fast = fisher_scores(model.float(), batches(x.float(), y, 2), progress=False)
    torch.testing.assert_close(fast, reference.fisher_scores(model, batches(x.float(), y, 4)), rtol=1e-4, atol=0)


def test_vit_embeddings_take_per_sample_copies_after_the_check():
    model = create_model("vit_tiny", 4, in_channels=1, image_size=8, patch_size=2, dim=16, depth=1, heads=2).double()
    x, y = torch.randn(6, 1, 8, 8, dtype=F64), torch.tensor([0, 1, 2, 3, 0, 1])
    with pytest.warns(RuntimeWarning, match="TinyViT"):
        scorer = Scorer(model, None, "auto")
    calls = []
    real = scorer._fallback_scores
    scorer._fallback_scores = lambda *a: calls.append(a[2]) or real(*a)
    model.eval()
    with scorer:
        got = torch.cat([scorer.score_split(x[i : i + 3], y[i : i + 3], y[i : i + 3]) for i in range(0, 6, 3)])
    assert scorer.expand_state == {"cls_token": "yes", "pos_embed": "yes"}
    assert len(calls) == 1  # vmap on the first batch only
    torch.testing.assert_close(got, vmap_scores(model, x, y), rtol=1e-10, atol=0)


class ChunkNet(nn.Module):
    """Every batch-wide transient of the rules: a convolution called twice (its calls unfolded
    and concatenated), explicit padding, groups, a Conv1d, a Linear on [B, T, d] sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect")
        self.shared = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.seq = nn.Conv1d(6, 8, 3, stride=2)
        self.mix = nn.Linear(8, 5)
        self.head = nn.Linear(5 * 3, 4)

    def forward(self, x):
        h = self.shared(torch.tanh(self.shared(torch.tanh(self.stem(x)))))  # [B, 6, 6, 6]
        h = self.seq(torch.tanh(h.mean(2)))  # [B, 8, 2]
        h = self.mix(torch.tanh(h.transpose(1, 2)))  # [B, 2, 5]
        return self.head(torch.cat([h.flatten(1), h[:, :1].flatten(1)], 1))


@pytest.mark.parametrize("form", ["auto", "direct", "gram"])
def test_memory_budget_chunks_equal_the_whole_batch(monkeypatch, form):
    # a budget below one sample's transient takes the batch one sample at a time: the same
    # per-sample numbers as the whole batch at once (float64: within 1e-12), and the vmap ones
    model = ChunkNet().double()
    x, y = torch.randn(7, 3, 6, 6, dtype=F64), torch.randint(0, 4, (7,))
    whole = sample_fisher_scores(model, x, y, form=form)
    sizes = {}
    for name in ("per_sample_conv_grad_sq_norm", "per_sample_grad_sq_norm_gram", "per_sample_grad_sq_norm_direct"):
        real = getattr(ops, name)
        monkeypatch.setattr(
            ops,
            name,
            lambda a, *rest, real=real, name=name: sizes.setdefault(name, []).append(a.shape[0]) or real(a, *rest),
        )
    monkeypatch.setattr(linear_conv, "TRANSIENT_BUDGET_BYTES", 1)
    with no_fallback():
        chunked = sample_fisher_scores(model, x, y, form=form)
    # every convolution and every Gram form one sample at a time (a grouped convolution's Gram
    # op sees its 2 groups of one sample); a Linear's direct form forms nothing and is not split
    conv_calls = [n for n, b in sizes.items() for _ in b if n != "per_sample_grad_sq_norm_direct"]
    assert len(conv_calls) >= 7 * (2 if form == "gram" else 1), sizes
    assert all(max(b) <= 2 for n, b in sizes.items() if n != "per_sample_grad_sq_norm_direct"), sizes
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
    torch.testing.assert_close(chunked, vmap_scores(model, x, y), rtol=1e-10, atol=0)
    assert bool((chunked > 0).all())
    assert linear_conv.batch_step(10, budget=35) == 3 and linear_conv.batch_step(10**9, budget=1) == 1


class TwiceLinear(nn.Module):
    """One Linear called twice in a forward: one gradient per sample, not two norms."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.shared(torch.tanh(self.inp(x)))
        h = self.bn(self.shared(torch.tanh(h)))
        h = torch.cat([h[:, :3], self.bn(h)[:, 3:]], 1)  # the BN twice too
        return self.head(torch.tanh(h))


class TiedEmbedding(nn.Module):
    """Embedding and output layer share one weight: a parameter with two owners."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.out = nn.Linear(4, 5)
        self.out.weight = self.emb.weight

    def forward(self, tok):
        return self.out(torch.tanh(self.emb(tok).mean(1)))


class ReadsChildWeight(nn.Module):
    """Uses proj's parameters without calling proj (as nn.MultiheadAttention does with out_proj),
    and owns a never-used Linear (its score part is zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.proj = nn.Linear(6, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return F.linear(torch.tanh(self.fc(x)), self.proj.weight, self.proj.bias)


class SequenceFirst(nn.Module):
    """A Linear that sees [T, B, d]: its batch dimension is not first."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.inner = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x [B, T, 4]
        h = torch.tanh(self.fc(x)).transpose(0, 1)  # [T, B, 5]
        h = self.inner(h).transpose(0, 1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("dtype,rtol", TOLS)
def test_module_called_twice(dtype, rtol):
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    with no_fallback():
        check_parity(randomise_norms(TwiceLinear()), x, y, dtype, rtol)


@pytest.mark.parametrize("dtype,rtol", TOLS)
def test_tied_weights_fall_back(dtype, rtol):
    x, y = torch.randint(0, 5, (7, 6)), torch.randint(0, 5, (7,))
    with pytest.warns(RuntimeWarning, match="Embedding, Linear"):
        check_parity(TiedEmbedding(), x, y, dtype, rtol)


@pytest.mark.parametrize("dtype,rtol", TOLS)
def test_parameters_used_outside_their_module_fall_back(dtype, rtol):
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        check_parity(ReadsChildWeight(), x, y, dtype, rtol)
    messages = [str(w.message) for w in seen if "no per-layer rule" in str(w.message)]
    assert len(messages) == 1 and "Linear" in messages[0]


@pytest.mark.parametrize("dtype,rtol", TOLS)
def test_batch_dimension_not_first_falls_back(dtype, rtol):
    # T = 5 differs from every batch size used (3, 3, 1 and 7): with T == B the layout is
    # indistinguishable from a batch-first one, which the module docstring warns about
    x, y = torch.randn(7, 5, 4), torch.randint(0, 3, (7,))
    with pytest.warns(RuntimeWarning, match="Linear"):
        check_parity(SequenceFirst(), x, y, dtype, rtol)


class MixedLayout(nn.Module):
    """One Linear called batch-first and sequence-first in the same forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):  # x [B, T, 4]
        h = torch.tanh(self.fc(x)) + torch.tanh(self.fc(x.transpose(0, 1))).transpose(0, 1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("dtype,rtol", TOLS)
def test_module_seen_with_both_layouts_falls_back(dtype, rtol):
    x, y = torch.randn(7, 5, 4), torch.randint(0, 3, (7,))
    with pytest.warns(RuntimeWarning, match="Linear"):
        check_parity(MixedLayout(), x, y, dtype, rtol)


class InPlaceAfterUse(nn.Module):
    """fc2's input is scaled in place after fc2 read it (legal here: no weight gradient needs it)."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.fc1, self.fc2, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc1(x)
        h2 = self.fc2(h)
        h = h.mul_(2.0) if self.in_place else h * 2.0
        return self.head(torch.tanh(h2 + h))


def test_input_modified_in_place_is_copied():
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    in_place = InPlaceAfterUse(True)
    out_of_place = InPlaceAfterUse(False)
    out_of_place.load_state_dict(in_place.state_dict())
    expected = vmap_scores(out_of_place.double(), x.double(), y)  # the reference cannot run it
    torch.testing.assert_close(sample_fisher_scores(in_place.double(), x.double(), y), expected, rtol=1e-10, atol=0)


class FrozenFeatures(nn.Module):
    """Trainable parameters used under torch.no_grad(): their gradient is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.features, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.features(x)
        return self.head(torch.tanh(h))


def test_parameters_under_no_grad_score_zero():
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    check_parity(FrozenFeatures(), x, y, F64, 1e-10)


# --------------------------------------------------------------------------------------------
# Data handling, batching, modes, memory
# --------------------------------------------------------------------------------------------


class SampleSet(Dataset):
    """Yields single (index, x, y) samples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return torch.tensor(i), self.x[i], self.y[i]


def test_batch_size_and_data_form_do_not_matter():
    model, x = MODELS["bn_net"]()
    y = torch.randint(0, 3, (len(x),))
    base = fisher_scores(model, SampleSet(x, y), batch_size=1, progress=False)
    for bs in (2, 3, 256):
        torch.testing.assert_close(
            fisher_scores(model, SampleSet(x, y), batch_size=bs, progress=False), base, rtol=1e-5, atol=0
        )
    # a loader's big batch split into chunks of batch_size, shuffled order
    order = torch.randperm(len(x))
    shuffled = [(order, x[order], y[order])]
    torch.testing.assert_close(fisher_scores(model, shuffled, batch_size=3, progress=True), base, rtol=1e-5, atol=0)


class Passes:
    """A loader whose sample 2 differs between passes (as under random augmentation): pass 0
    yields x[1] under index 2, later passes x[3]; indices 1, 3 and 5 never come."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.passes = x, y, 0

    def __iter__(self):
        rows = torch.tensor([0, 2, 1 if self.passes == 0 else 3])
        self.passes += 1
        yield torch.tensor([0, 4, 2]), self.x[rows], self.y[rows]


def test_trials_num_samples_and_unseen_indices():
    model = create_model("mlp", 3, in_channels=1, image_size=2, hidden=5)
    x, y = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])
    data = [(torch.tensor([0, 4, 2]), x[[0, 2, 1]], y[[0, 2, 1]])]
    scores = fisher_scores(model, Passes(x, y), num_samples=6, trials=2, progress=False)  # index 2: the mean
    single = sample_fisher_scores(model, x, y)
    assert scores.shape == (6,) and torch.isnan(scores[[1, 3, 5]]).all()
    torch.testing.assert_close(scores[[0, 4]], single[[0, 2]], rtol=1e-6, atol=0)
    torch.testing.assert_close(scores[2], (single[1] + single[3]) / 2, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="num_samples=3"):
        fisher_scores(model, data, num_samples=3, progress=False)


def test_a_sample_index_twice_in_one_pass_is_refused():
    # two different samples under one index would be averaged into one score
    model = create_model("mlp", 3, in_channels=1, image_size=2, hidden=5)
    x, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    within = [(torch.tensor([0, 2, 4, 2]), x[:4], y[:4])]
    with pytest.raises(ValueError, match=r"sample index 2 appears 2 times in pass 0 \(batch 0\)"):
        fisher_scores(model, within, progress=False)
    across = [(torch.tensor([0, 1, 2]), x[:3], y[:3]), (torch.tensor([3, 1]), x[3:], y[3:])]
    with pytest.raises(ValueError, match=r"sample index 1 appears 2 times in pass 0 \(batches 0 and 1\)"):
        fisher_scores(model, across, trials=2, progress=False)
    with pytest.raises(ValueError, match=r"sample index 1 appears 2 times"):
        sam_loss_gap_scores(model, across, 0.1, progress=False)
    scores = fisher_scores(model, across[:1], trials=3, progress=False)  # once per pass: fine
    torch.testing.assert_close(scores, sample_fisher_scores(model, x[:3], y[:3]), rtol=1e-6, atol=0)


def test_non_finite_inputs_or_scores_are_refused_with_their_indices():
    model = create_model("mlp", 3, in_channels=1, image_size=2, hidden=5)
    x, y = torch.randn(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    x[4, 0, 1, 1] = float("nan")
    data = [(torch.arange(10, 13), x[:3], y[:3]), (torch.arange(13, 16), x[3:], y[3:])]
    with pytest.raises(ValueError, match=r"not finite for 1 sample.*sample index 14 \(pass 0, batch 1\).*input x"):
        fisher_scores(model, data, progress=False)
    with pytest.raises(
        ValueError,
        match=r"not finite for 3 samples.*13, 14, 15.*\(pass 0, batch 1\).*1 of them have "
        r"an input x that holds NaN or inf \(first: sample index 14\).*shares",
    ):
        sam_loss_gap_scores(model, data, 0.1, progress=False)  # e is the batch's: all three undefined
    x[4, 0, 1, 1] = 0.0
    with torch.no_grad():  # finite inputs, broken weights: every score is NaN
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not finite for 6 samples.*10, 11, 12, 13, 14.*inputs are finite"):
        fisher_scores(model, data, progress=False)


def test_modes_and_weights_untouched_also_on_error():
    model, x = MODELS["bn_net"]()
    y = torch.randint(0, 3, (len(x),))
    model.train()
    model.bn_seq.eval()  # a deliberately frozen submodule stays as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fisher_scores(model, batches(x, y, 4), progress=False)
    assert model.training and model.bn.training and not model.bn_seq.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics too
    assert all(p.grad is None for p in model.parameters())
    bad = [(torch.arange(2), x[:2], torch.tensor([0, 9]))]
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\)"):
        fisher_scores(model, bad, progress=False)
    assert model.training and model.bn.training and not model.bn_seq.training
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed


def test_out_of_memory_halves_the_chunk(monkeypatch):
    model, x = MODELS["cnn"]()
    y = torch.randint(0, 3, (len(x),))
    expected = fisher_scores(model, batches(x, y, 7), progress=False)
    seen = []
    real = Scorer.score

    def flaky(self, xb, yb, y_host):
        seen.append(xb.shape[0])
        if xb.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, xb, yb, y_host)

    monkeypatch.setattr(Scorer, "score", flaky)
    torch.testing.assert_close(fisher_scores(model, batches(x, y, 7), progress=False), expected, rtol=1e-5, atol=0)
    assert seen[:3] == [7, 3, 1] and max(seen[3:]) <= 2  # 7 -> 3 -> 1, then chunks of at most 2


def test_bad_inputs_raise_clear_errors():
    model = create_model("mlp", 3, in_channels=1, image_size=2, hidden=5)
    x, y = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])
    kw = dict(progress=False)
    with pytest.raises(ValueError, match="no samples"):
        fisher_scores(model, [], **kw)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\).*\[-1, 2\]"):
        fisher_scores(model, [(torch.arange(4), x, torch.tensor([0, 1, 2, -1]))], **kw)
    with pytest.raises(ValueError, match="batch sizes differ"):
        fisher_scores(model, [(torch.arange(3), x, y)], **kw)
    with pytest.raises(ValueError, match=r"\(index, x, y\) triples"):
        fisher_scores(model, [(x, y)], **kw)
    with pytest.raises(TypeError, match="data set or a loader"):
        fisher_scores(model, x, **kw)
    for bad in ({"trials": 0}, {"batch_size": 0}, {"batch_size": 2.0}, {"num_samples": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fisher_scores(model, batches(x, y, 2), **bad, **kw)
    with pytest.raises(ValueError, match="form"):
        fisher_scores(model, batches(x, y, 2), form="ghost", **kw)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fisher_scores(create_model("mlp", 3, in_channels=1, image_size=2).requires_grad_(False), batches(x, y, 2), **kw)
    with pytest.raises(ValueError, match="logits"):
        fisher_scores(nn.Linear(4, 3), [(torch.arange(2), torch.randn(2, 5, 4), torch.tensor([0, 1]))], **kw)
    batch_stats = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fisher_scores(batch_stats, batches(x, y, 2), **kw)


class StuckTraining(nn.Module):
    """A model whose eval() leaves its BatchNorm in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 3), nn.BatchNorm1d(3)

    def train(self, mode: bool = True):
        super().train(mode)
        self.bn.training = True
        return self

    def forward(self, x):
        return self.bn(self.fc(x))


def test_model_that_cannot_leave_training_mode_is_refused():
    model = StuckTraining()
    with pytest.raises(ValueError, match="stayed in training mode"):
        fisher_scores(model, batches(torch.randn(4, 4), torch.tensor([0, 1, 2, 0]), 2), progress=False)
    assert model.training


# --------------------------------------------------------------------------------------------
# sam_loss_gap_scores
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_loss_gap_matches_reference(adaptive):
    model, x = MODELS["bn_net"]()
    y = torch.randint(0, 3, (len(x),))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = reference.sam_loss_gap_scores(model, batches(x, y, 3), 0.3, adaptive=adaptive)
    fast = sam_loss_gap_scores(model, batches(x, y, 3), 0.3, adaptive=adaptive, progress=False)
    torch.testing.assert_close(fast, expected, rtol=1e-6, atol=1e-7)
    assert bool((fast.abs() > 0).any())
    # a data set is batched by batch_size: the same batches, the same scores
    torch.testing.assert_close(
        sam_loss_gap_scores(model, SampleSet(x, y), 0.3, batch_size=3, adaptive=adaptive, progress=False),
        expected,
        rtol=1e-6,
        atol=1e-7,
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sam_loss_gap_out_of_memory_keeps_the_batch_perturbation(monkeypatch):
    model, x = MODELS["cnn"]()
    y = torch.randint(0, 3, (len(x),))
    expected = sam_loss_gap_scores(model, batches(x, y, 7), 0.1, progress=False)
    real = loss_gap.functional_forward

    def flaky(module, params, args):
        if args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(module, params, args)

    monkeypatch.setattr(loss_gap, "functional_forward", flaky)
    torch.testing.assert_close(
        sam_loss_gap_scores(model, batches(x, y, 7), 0.1, progress=False), expected, rtol=1e-4, atol=1e-6
    )


def test_sam_loss_gap_bad_inputs():
    model = create_model("mlp", 3, in_channels=1, image_size=2, hidden=5)
    x, y = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="rho"):
        sam_loss_gap_scores(model, batches(x, y, 2), -0.1, progress=False)
    with pytest.raises(ValueError, match="no samples"):
        sam_loss_gap_scores(model, [], 0.1, progress=False)
    with pytest.raises(ValueError, match="targets must lie"):
        sam_loss_gap_scores(model, [(torch.arange(4), x, torch.tensor([0, 1, 3, 0]))], 0.1, progress=False)
    assert torch.equal(sam_loss_gap_scores(model, batches(x, y, 2), 0.0, progress=False), torch.zeros(4))


# --------------------------------------------------------------------------------------------
# The CUDA path's kernels (Triton) inside fisher_scores: on the GPU where there is one, else on
# CPU under the interpreter
# --------------------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("form", ["auto", "direct", "gram"])
def test_fisher_scores_through_triton_faces(monkeypatch, form):
    """What a GPU runs: every per-sample-norm op served by its Triton launcher."""
    from sbfast import registry

    real = registry.op_for
    used = set()

    def triton_everywhere(name, device):
        if name.startswith("per_sample_"):
            # compiled Triton kernels cannot read CPU tensors: off the interpreter the scorer
            # must run on the GPU
            assert device.type == TRITON_DEVICE, f"{name} asked for on {device}, Triton runs on {TRITON_DEVICE}"
            used.add(name)
            return registry.triton_op(name)
        return real(name, device)

    monkeypatch.setattr(registry, "op_for", triton_everywhere)
    for name in ("grouped_cnn", "norm_net"):
        model, x = MODELS[name]()
        x, y = x[:3].to(TRITON_DEVICE), torch.tensor([0, 2, 1], device=TRITON_DEVICE)
        model = model.double().to(TRITON_DEVICE)
        torch.testing.assert_close(
            sample_fisher_scores(model, x.double(), y, form=form), vmap_scores(model, x.double(), y), rtol=1e-10, atol=0
        )
    expected = {"auto": {"conv", "direct", "gram"}, "direct": {"conv"}, "gram": {"gram"}}[form]
    assert {n.rsplit("_", 1)[1] if not n.startswith("per_sample_conv") else "conv" for n in used} >= expected
