"""fisher_scores against a brute-force per-sample loop on random models (hypothesis).

Each example draws a small model from every layer type that has a rule (Conv2d with random
kernel, stride, padding, padding mode, dilation and groups; BatchNorm2d/1d on random running
statistics; GroupNorm; Conv1d, again random; Linear on [B, d] and on [B, T, d]; LayerNorm;
RMSNorm; Embedding with or without padding_idx) plus one module without a rule (its own
nn.Parameter, used either by broadcasting over the batch or by a matrix product, so both the
per-sample-copy path and the vmap fallback come up), some parameters frozen, the model left in
train or eval mode (some submodules the other way), a batch of 1 to 6 samples, a forced or
automatic form and a memory budget that may split the batch.

The truth is one backward per sample of a deep copy in eval mode: s_i = sum over trainable
parameters of ||grad||^2. float64: within 1e-10 relative (of the batch's largest score); the
float32 result of ``fisher_scores`` (computed in float64, cast at the end) within 1e-6.
Also checked: the given model's modes are restored, its weights and gradients untouched, and
the fallback warns exactly when the rule-less module has trainable parameters.

Cost: ``EXAMPLES`` (100) examples, about 10 s of one core.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sbfast.sharpness import fisher_scores, linear_conv, sample_fisher_scores

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = 100
F64 = torch.float64


class Odd(nn.Module):
    """No per-layer rule: a parameter of its own, broadcast over the batch or multiplied in."""

    def __init__(self, width: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.randn(width, width) / width if kind == "matmul" else torch.randn(width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight if self.kind == "matmul" else h * self.weight


def _padding(draw, size: int, kernel: int, dilation: int, mode: str) -> int:
    """A padding that leaves at least one output position and that the padding mode accepts
    (-1: none does)."""
    need = max(0, -(-(dilation * (kernel - 1) + 1 - size) // 2))
    top = size - 1 if mode == "reflect" else size  # reflect needs padding < size
    if need > top:
        return -1
    return draw(st.integers(need, min(top, need + 2)))


@st.composite
def specs(draw):
    """The random architecture: every choice of ``RandomNet`` as plain data."""
    s = {}
    s["c_in"] = draw(st.integers(1, 4))
    s["h"], s["w"] = draw(st.integers(3, 6)), draw(st.integers(3, 7))
    s["groups"] = draw(st.sampled_from([g for g in (1, 2, 3, 4) if s["c_in"] % g == 0]))
    s["c1"] = s["groups"] * draw(st.integers(1, 3))
    s["k"] = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    s["stride"] = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    s["dilation"] = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    s["mode"] = draw(st.sampled_from(["zeros", "reflect", "circular", "replicate"]))
    if s["stride"] == (1, 1) and s["mode"] == "zeros" and draw(st.booleans()):
        s["padding"] = "same"
    else:
        pads = [
            _padding(draw, n, k, d, s["mode"]) for n, k, d in zip((s["h"], s["w"]), s["k"], s["dilation"], strict=True)
        ]
        if -1 in pads:
            s["k"], s["dilation"], pads = (1, 1), (1, 1), [0, 0]
        s["padding"] = tuple(pads)
    s["conv_bias"] = draw(st.booleans())
    s["bn2"], s["gn"] = draw(st.booleans()), draw(st.booleans())
    s["gn_groups"] = draw(st.sampled_from([g for g in (1, 2, 3) if s["c1"] % g == 0]))
    s["groups1"] = draw(st.sampled_from([g for g in (1, 2, 3) if s["c1"] % g == 0]))
    s["c2"] = s["groups1"] * draw(st.integers(1, 2))
    s["k1"], s["stride1"], s["dilation1"] = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    s["hidden"] = draw(st.integers(2, 6))
    s["ln_affine"], s["ln_bias"] = draw(st.booleans()), draw(st.booleans())
    s["rms"], s["bn1"] = draw(st.booleans()), draw(st.booleans())
    s["tokens"] = draw(st.integers(1, 4))
    s["padding_idx"] = draw(st.sampled_from([None, 0, 3]))
    s["e_dim"], s["e_out"] = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    s["odd"] = draw(st.sampled_from([None, "broadcast", "matmul"]))
    s["classes"] = draw(st.integers(2, 5))
    return s


class RandomNet(nn.Module):
    """Image branch (Conv2d, norms, Conv1d, Linear 2-D, norms, the rule-less module) and token
    branch (Embedding of tokens read off the input's signs, Linear on [B, T, d], LayerNorm)."""

    def __init__(self, s: dict) -> None:
        super().__init__()
        self.s = s
        self.conv = nn.Conv2d(
            s["c_in"],
            s["c1"],
            s["k"],
            s["stride"],
            s["padding"],
            s["dilation"],
            s["groups"],
            bias=s["conv_bias"],
            padding_mode=s["mode"],
        )
        with torch.no_grad():
            h_out, w_out = self.conv(torch.zeros(1, s["c_in"], s["h"], s["w"])).shape[2:]
        self.bn2 = nn.BatchNorm2d(s["c1"]) if s["bn2"] else None
        per_group = s["c1"] // s["gn_groups"] * h_out * w_out  # torch refuses to normalise one value
        self.gn = nn.GroupNorm(s["gn_groups"], s["c1"]) if s["gn"] and per_group > 1 else None
        k1 = min(s["k1"], w_out)
        pad1 = max(0, -(-(s["dilation1"] * (k1 - 1) + 1 - w_out) // 2))
        self.conv1d = nn.Conv1d(s["c1"], s["c2"], k1, s["stride1"], pad1, s["dilation1"], s["groups1"])
        with torch.no_grad():
            length = self.conv1d(torch.zeros(1, s["c1"], w_out)).shape[2]
        self.fc = nn.Linear(s["c2"] * length, s["hidden"])
        self.ln = nn.LayerNorm(s["hidden"], elementwise_affine=s["ln_affine"], bias=s["ln_bias"])
        self.rms = nn.RMSNorm(s["hidden"]) if s["rms"] else None
        self.bn1 = nn.BatchNorm1d(s["hidden"]) if s["bn1"] else None
        self.odd = Odd(s["hidden"], s["odd"]) if s["odd"] else None
        self.emb = nn.Embedding(4, s["e_dim"], padding_idx=s["padding_idx"])
        self.seq = nn.Linear(s["e_dim"], s["e_out"])
        self.seq_ln = nn.LayerNorm(s["e_out"])
        self.head = nn.Linear(s["hidden"] + s["e_out"], s["classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        if self.bn2 is not None:
            h = self.bn2(h)
        if self.gn is not None:
            h = self.gn(h)
        h = torch.tanh(self.conv1d(h.mean(2))).flatten(1)
        h = self.ln(self.fc(h))
        if self.rms is not None:
            h = self.rms(h)
        if self.bn1 is not None:
            h = self.bn1(h)
        h = torch.tanh(h)
        if self.odd is not None:
            h = self.odd(h)
        flat = x.flatten(1)
        t = self.s["tokens"]
        tok = (flat[:, :t] > 0).long() + 2 * (flat[:, -t:] > 0.5).long()  # [B, T] in 0..3
        e = self.seq_ln(self.seq(torch.tanh(self.emb(tok)))).mean(1)
        return self.head(torch.cat([h, e], 1))


def _randomise(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so every identity is exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen, dtype=F64) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=F64) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
                for p in (m.weight, getattr(m, "bias", None)):
                    if p is not None:
                        p.copy_(torch.rand(p.shape, generator=gen, dtype=F64) + 0.5)


def brute_force(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One backward per sample of a copy in eval mode: sum of squared trainable gradients."""
    m = copy.deepcopy(model).eval()
    out = []
    for i in range(x.shape[0]):
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).backward()
        out.append(sum(p.grad.pow(2).sum() for p in m.parameters() if p.requires_grad and p.grad is not None))
    return torch.stack(out)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's note, not ours
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), data=st.data())
def test_fisher_scores_equal_one_backward_per_sample(spec, data):
    seed = data.draw(st.integers(0, 2**16), label="seed")
    torch.manual_seed(seed)
    model = RandomNet(spec).double()
    gen = torch.Generator().manual_seed(seed)
    _randomise(model, gen)
    params = list(model.parameters())
    for i in data.draw(st.sets(st.integers(0, len(params) - 1), max_size=3), label="frozen"):
        params[i].requires_grad_(False)
    if not any(p.requires_grad for p in params):
        params[-1].requires_grad_(True)
    model.train(data.draw(st.booleans(), label="train mode"))
    for m in model.children():
        if data.draw(st.booleans(), label="flip a child's mode"):
            m.train(not m.training)
    modes = [m.training for m in model.modules()]
    weights = [p.detach().clone() for p in model.parameters()]
    b = data.draw(st.integers(1, 6), label="batch")
    x = torch.randn(b, spec["c_in"], spec["h"], spec["w"], generator=gen, dtype=F64)
    y = torch.randint(0, spec["classes"], (b,), generator=gen)
    form = data.draw(st.sampled_from(["auto", "direct", "gram"]), label="form")
    budget = data.draw(st.sampled_from([1, 4096, linear_conv.TRANSIENT_BUDGET_BYTES]), label="budget")

    expected = brute_force(model, x, y)
    saved = linear_conv.TRANSIENT_BUDGET_BYTES
    linear_conv.TRANSIENT_BUDGET_BYTES = budget
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = sample_fisher_scores(model, x, y, form=form)
            batch_size = data.draw(st.integers(1, 6), label="fisher_scores batch_size")
            got32 = fisher_scores(model, [(torch.arange(b), x, y)], batch_size=batch_size, form=form, progress=False)
    finally:
        linear_conv.TRANSIENT_BUDGET_BYTES = saved

    assert got.dtype == F64 and got.shape == (b,)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))
    torch.testing.assert_close(got32, expected.float(), rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert all(p.grad is None for p in model.parameters())
    fallback = [str(w.message) for w in caught if "no per-layer rule" in str(w.message)]
    odd_trainable = model.odd is not None and model.odd.weight.requires_grad
    assert bool(fallback) == odd_trainable, fallback
    assert all("Odd" in msg for msg in fallback), fallback
