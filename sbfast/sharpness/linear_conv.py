"""Rules for Linear (2-D and 3-D+ inputs) and Conv1d/Conv2d, and the choice between the direct
and the Gram form of ||sum_t g_t a_t^T||_F^2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sbfast import ops
from sbfast.sharpness.layer_rule import Rule, sq

__all__ = ["FORMS", "TRANSIENT_BUDGET_BYTES", "ConvRule", "LinearRule", "batch_step", "choose_form", "matrix_term"]

FORMS = ("auto", "direct", "gram")

# The most memory that one layer's rule may form at a time beyond the inputs and output
# gradients the scorer already holds: a convolution's unfolded input (k times its input: about
# 0.6 GB for a CIFAR ResNet18 stage-1 layer at batch 256), Gram matrices [T, T]. The rule takes
# the batch in chunks of samples that fit, so the scorer's peak stays near a training step's
# (which holds every layer's input at once) instead of adding a whole-batch unfold on top.
TRANSIENT_BUDGET_BYTES = 128 * 2**20


def batch_step(bytes_per_sample: int, budget: int | None = None) -> int:
    """Samples per chunk so that a chunk's transient memory stays within ``budget`` bytes
    (default :data:`TRANSIENT_BUDGET_BYTES`, read at call time); at least 1."""
    budget = TRANSIENT_BUDGET_BYTES if budget is None else budget
    return max(1, budget // max(1, bytes_per_sample))


def choose_form(t: int, d: int, p: int) -> str:
    """The cheaper way to get ||sum_t g_t a_t^T||_F^2 for T positions, input width d, output p.

    "direct" forms the p x d product: T*d*p multiply-adds per sample; "gram" forms two T x T Gram
    matrices: T^2*(d + p). Gram wins when T*(d + p) <= d*p. (The book-keeping paper's rule,
    2T^2 <= d*p, compares the memory of a materialised per-sample gradient with that of the Gram
    matrices; neither form here materialises anything large, so the rule compares arithmetic. On
    the CIFAR ResNet18's stage-2 convolutions, T=256, d=1152, p=128, the two rules disagree and
    the direct form measures faster.)
    """
    return "gram" if t * (d + p) <= d * p else "direct"


def matrix_term(a: torch.Tensor, g: torch.Tensor, form: str) -> torch.Tensor:
    """||G_i^T A_i||_F^2 for a [B, T, d], g [B, T, p]."""
    if form == "auto":
        form = choose_form(a.shape[1], a.shape[2], g.shape[2])
    if form == "gram":
        return ops.per_sample_grad_sq_norm_gram(a, g)
    return ops.per_sample_grad_sq_norm_direct(a, g)


class LinearRule(Rule):
    def score(self, module, calls, names, form):
        if len(calls) == 1 and calls[0][0].dim() == 2:
            a, g = calls[0]
            g_sq = sq(g)
            total = sq(a) * g_sq if "weight" in names else torch.zeros_like(g_sq)
            return total + g_sq if "bias" in names else total
        b = calls[0][0].shape[0]
        a = (
            torch.cat([x.reshape(b, -1, x.shape[-1]) for x, _ in calls], 1)
            if len(calls) > 1
            else calls[0][0].reshape(b, -1, calls[0][0].shape[-1])
        )
        g = (
            torch.cat([y.reshape(b, -1, y.shape[-1]) for _, y in calls], 1)
            if len(calls) > 1
            else calls[0][1].reshape(b, -1, calls[0][1].shape[-1])
        )
        if "weight" in names:
            t = a.shape[1]
            chosen = choose_form(t, a.shape[2], g.shape[2]) if form == "auto" else form
            # the Gram form's two [T, T] matrices per sample (float64 at most) are the transient
            step = batch_step(2 * t * t * 8) if chosen == "gram" else b
            total = torch.cat([matrix_term(a[s : s + step], g[s : s + step], chosen) for s in range(0, b, step)])
        else:
            total = sq(g[:, :0])
        if "bias" in names:
            total = total + sq(g.sum(1))
        return total


class ConvRule(Rule):
    """Conv1d / Conv2d as a Linear per group on the unfolded input."""

    def capture(self, module, x):
        return x.detach(), module.weight  # the weight only gives shapes to the CPU direct path

    def inputs_of(self, ctx):
        return [ctx[0]]

    @staticmethod
    def _explicit_pad(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The input as the convolution sees it, and the zero padding left to the convolution."""
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            return F.pad(x, m._reversed_padding_repeated_twice, mode=mode), [0] * (x.dim() - 2)
        return x, list(m.padding)

    def score(self, module, calls, names, form):
        m = module
        b = calls[0][0][0].shape[0]
        total = None
        if "weight" in names:
            t = sum(g[0, 0].numel() for _, g in calls)
            d = m.weight[0].numel()
            p = m.out_channels // m.groups
            chosen = choose_form(t, d, p) if form == "auto" else form
            step = batch_step(self._transient_bytes(m, calls, chosen))
            parts = [
                self._weight_term(m, [((x[s : s + step], w), g[s : s + step]) for (x, w), g in calls], chosen)
                for s in range(0, b, step)
            ]
            total = torch.cat(parts) if len(parts) > 1 else parts[0]
        if "bias" in names:
            g_sum = sum(g.reshape(b, m.out_channels, -1).sum(2) for _, g in calls)
            bias = sq(g_sum)
            total = bias if total is None else total + bias
        return total

    @staticmethod
    def _transient_bytes(m: nn.Module, calls: list, form: str) -> int:
        """Bytes per sample that the weight term forms: the explicitly padded input, the unfold
        [C_in * k, T] (the whole batch's on CUDA, where the direct kernel reads it; a second
        copy when several calls are concatenated), the output gradient regrouped and, in the
        Gram form, two [T, T] matrices per group (float64 at most)."""
        elem = calls[0][0][0].element_size()
        t = sum(g[0, 0].numel() for _, g in calls)
        copies = 2 if len(calls) > 1 else 1
        unfold = m.weight[0].numel() * m.groups * t
        nbytes = (sum(x[0].numel() for (x, _), _ in calls) + copies * (unfold + m.out_channels * t)) * elem
        if form == "gram":
            nbytes += 2 * m.groups * t * t * 8
        return nbytes

    def _weight_term(self, m: nn.Module, calls: list, form: str) -> torch.Tensor:
        """[b] squared norms of the weight gradient for the samples in ``calls`` (one chunk)."""
        if form == "direct" and len(calls) == 1:
            (x, w), g = calls[0]
            x, pad = self._explicit_pad(m, x)
            return ops.per_sample_conv_grad_sq_norm(x, g, w.shape, m.stride, pad, m.dilation, m.groups)
        return self._by_unfold(m, calls, form)

    def _by_unfold(self, m: nn.Module, calls: list, form: str) -> torch.Tensor:
        one = m.weight.dim() == 3  # Conv1d: a 2-D unfold with a height-1 kernel
        ks = (1, *m.kernel_size) if one else tuple(m.kernel_size)
        st = (1, *m.stride) if one else tuple(m.stride)
        dl = (1, *m.dilation) if one else tuple(m.dilation)
        groups = m.groups
        a_parts, g_parts = [], []
        for (x, _), g in calls:
            b = x.shape[0]
            x, pad = self._explicit_pad(m, x)
            if one:
                x, pad = x.unsqueeze(2), [0, *pad]
            cols = F.unfold(x, ks, dilation=dl, padding=pad, stride=st)  # [B, C*k, T]
            t = cols.shape[2]
            a_parts.append(cols.view(b, groups, -1, t).transpose(2, 3))  # [B, G, T, C/G*k]
            g_parts.append(g.reshape(b, groups, m.out_channels // groups, t).transpose(2, 3))
        a = torch.cat(a_parts, 2) if len(a_parts) > 1 else a_parts[0]
        gg = torch.cat(g_parts, 2) if len(g_parts) > 1 else g_parts[0]
        b, t, d, p = a.shape[0], a.shape[2], a.shape[3], gg.shape[3]
        per_group = matrix_term(a.reshape(b * groups, t, d), gg.reshape(b * groups, t, p), form)
        return per_group.view(b, groups).sum(1)
