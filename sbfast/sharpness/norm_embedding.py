"""Rules for the normalisation layers (BatchNorm in eval mode, LayerNorm, GroupNorm, RMSNorm)
and Embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sbfast.sharpness.layer_rule import Rule, acc, norm_total, sq

__all__ = ["BatchNormRule", "EmbeddingRule", "GroupNormRule", "LayerNormRule", "RMSNormRule"]


class BatchNormRule(Rule):
    def capture(self, module, x):
        # inside the functional call these are the buffers actually used by the forward
        return x.detach(), module.running_mean, module.running_var, module.eps

    def inputs_of(self, ctx):
        return [ctx[0]]

    def score(self, module, calls, names, form):
        def normalised(call):
            x, mean, var, eps = call
            shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
            return (x - mean.view(shape)).mul_(torch.rsqrt(var.view(shape) + eps))  # one temporary

        return _channel_affine_total(calls, names, lambda ctx: ctx[0], normalised)


def _channel_affine_total(calls, names, input_of, normalise) -> torch.Tensor:
    """Per-sample squared norm of a per-channel affine (weight, bias) gradient, summed over the
    layer's calls. ``calls`` yields (ctx, g) with g the output gradient [B, C, ...];
    ``input_of(ctx)`` is the input and ``normalise(ctx)`` the normalised input, computed only
    where the weight is scored."""
    gw = gb = None
    for ctx, g in calls:
        x = input_of(ctx)
        b, c = x.shape[0], x.shape[1]
        g3 = g.reshape(b, c, -1)
        if "weight" in names:
            w = (g3 * normalise(ctx).reshape(b, c, -1)).sum(2)
            gw = w if gw is None else gw + w
        if "bias" in names:
            s = g3.sum(2)
            gb = s if gb is None else gb + s
    return norm_total(gw, gb)


class LayerNormRule(Rule):
    def score(self, module, calls, names, form):
        ns = tuple(module.normalized_shape)
        gw = gb = None
        for x, g in calls:
            dims = tuple(range(1, x.dim() - len(ns)))  # positions within a sample
            if "weight" in names:
                x_hat = F.layer_norm(x, ns, None, None, module.eps)
                w = (g * x_hat).sum(dims) if dims else g * x_hat
                gw = w if gw is None else gw + w
            if "bias" in names:
                s = g.sum(dims) if dims else g
                gb = s if gb is None else gb + s
        return norm_total(gw, gb)


class RMSNormRule(Rule):
    params = ("weight",)

    def score(self, module, calls, names, form):
        ns = tuple(module.normalized_shape)
        gw = None
        for x, g in calls:
            dims = tuple(range(1, x.dim() - len(ns)))
            w = g * F.rms_norm(x, ns, None, module.eps)
            w = w.sum(dims) if dims else w
            gw = w if gw is None else gw + w
        return sq(gw)


class GroupNormRule(Rule):
    def score(self, module, calls, names, form):
        return _channel_affine_total(
            calls, names, lambda x: x, lambda x: F.group_norm(x, module.num_groups, None, None, module.eps)
        )


class EmbeddingRule(Rule):
    params = ("weight",)

    def score(self, module, calls, names, form):
        b = calls[0][0].shape[0]
        tok = torch.cat([x.reshape(b, -1) for x, _ in calls], 1)  # [B, T]
        g = torch.cat([y.reshape(b, -1, y.shape[-1]) for _, y in calls], 1)  # [B, T, d]
        g = acc(g)
        if module.padding_idx is not None:  # that row never receives a gradient
            g = g * (tok != module.padding_idx).unsqueeze(-1).to(g.dtype)
        t = tok.shape[1]
        if t == 1:
            return sq(g)
        # sum g rows per (sample, token) without a [B, V, d] buffer: sort the keys, give each run
        # of equal keys a segment id, add rows into their segment, square, add per sample
        vocab = module.num_embeddings
        key = (torch.arange(b, device=tok.device).unsqueeze(1) * vocab + tok).reshape(-1)
        key, order = torch.sort(key)
        start = torch.ones_like(key, dtype=torch.bool)
        start[1:] = key[1:] != key[:-1]
        seg = torch.cumsum(start, 0) - 1
        rows = g.reshape(b * t, -1).index_select(0, order)
        sums = torch.zeros_like(rows).index_add_(0, seg, rows)
        seg_sample = torch.zeros(b * t, dtype=torch.long, device=tok.device).scatter_(0, seg, key // vocab)
        return torch.zeros(b, dtype=g.dtype, device=g.device).index_add_(0, seg_sample, sums.pow(2).sum(1))
