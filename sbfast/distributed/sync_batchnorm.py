"""Synchronised BatchNorm for a data-parallel member: statistics over the whole group's batch.

With data parallel each rank sees a slice of the batch; plain BatchNorm normalises each slice
with its own statistics (DDP's default, and sbfast's). :func:`convert_sync_batchnorm` replaces
the model's BatchNorm layers so that, in training mode, every layer normalises with the mean and
variance of the batch across the member's group, and its backward all-reduces the two sums the
input gradient needs: the member then computes what one rank computes on the whole batch.

On CUDA under NCCL it uses ``torch.nn.SyncBatchNorm``. torch's has no CPU path, so on gloo it uses
:class:`GroupBatchNorm`, written here: per channel, each rank's (count, mean, biased variance)
are all-gathered and combined (Chan et al.'s pairwise formula, no E[x^2] - E[x]^2 cancellation);
backward: y = xhat * w + b, xhat = (x - mean) * invstd, and with the group's sums
S1 = sum(dy), S2 = sum(dy * xhat) over all N samples,
dx = w * invstd * (dy - S1 / N - xhat * S2 / N); dw and db are this rank's own sums (the
gradient average over the group completes them). Running statistics take the group's mean and
unbiased variance (N / (N - 1)), the same on every rank.

Every rank must run every training forward and backward of such a model, even on an empty slice
(``collective_forward=True`` in the data-parallel steps); eval mode communicates nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sbfast.distributed.collectives import guard, traffic
from sbfast.distributed.launch import DistContext

__all__ = ["GroupBatchNorm", "convert_sync_batchnorm", "has_collective_forward"]


def _dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _shape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


class _GroupBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        fctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        eps: float,
        factor: float,
        dctx: DistContext,
        group: Any,
    ) -> torch.Tensor:
        c = x.shape[1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xa = x.to(acc)
        count = x.numel() // c if c else 0
        if count > 0:
            var_l, mean_l = torch.var_mean(xa, dim=_dims(x), correction=0)
        else:
            mean_l = var_l = torch.zeros(c, dtype=acc, device=x.device)
        mine = torch.cat([torch.tensor([float(count)], dtype=acc, device=x.device), mean_l, var_l])
        mine = mine.to(dctx.comm_device)
        size = dist.get_world_size(group)
        parts = [torch.empty_like(mine) for _ in range(size)]
        traffic.add("the BatchNorm statistics", mine.numel() * mine.element_size())
        with guard(dctx, "the BatchNorm statistics all-gather"):
            dist.all_gather(parts, mine, group=group)
        st = torch.stack(parts).to(x.device)
        counts, means, variances = st[:, :1], st[:, 1 : c + 1], st[:, c + 1 :]
        n = counts.sum()
        if float(n) == 0:
            raise ValueError("BatchNorm in training mode got no samples on any rank of the group")
        mean = (counts * means).sum(0) / n
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / n
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                unbiased = var * (n / (n - 1)) if float(n) > 1 else var
                running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype) * factor)
                running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype) * factor)
        invstd = torch.rsqrt(var + eps)
        xhat = (xa - mean.view(_shape(x))) * invstd.view(_shape(x))
        y = xhat
        if weight is not None:
            y = y * weight.to(acc).view(_shape(x))
        if bias is not None:
            y = y + bias.to(acc).view(_shape(x))
        fctx.save_for_backward(xhat, invstd, weight)
        fctx.n, fctx.dctx, fctx.group, fctx.has_bias = n, dctx, group, bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(fctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        xhat, invstd, weight = fctx.saved_tensors
        dctx = fctx.dctx
        dya = dy.to(xhat.dtype)
        dims = _dims(xhat)
        sum_dy = dya.sum(dims)
        sum_dy_xhat = (dya * xhat).sum(dims)
        both = torch.cat([sum_dy, sum_dy_xhat]).to(dctx.comm_device)
        traffic.add("the BatchNorm gradient sums", both.numel() * both.element_size())
        with guard(dctx, "the BatchNorm gradient all-reduce"):
            dist.all_reduce(both, group=fctx.group)
        both = both.to(xhat.device)
        c = xhat.shape[1]
        g1, g2 = both[:c] / fctx.n, both[c:] / fctx.n
        shape = _shape(xhat)
        scale = invstd if weight is None else invstd * weight.to(xhat.dtype)
        dx = scale.view(shape) * (dya - g1.view(shape) - xhat * g2.view(shape))
        dw = sum_dy_xhat.to(weight.dtype) if weight is not None and fctx.needs_input_grad[1] else None
        db = sum_dy.to(dy.dtype) if fctx.has_bias and fctx.needs_input_grad[2] else None
        return dx.to(dy.dtype), dw, db, None, None, None, None, None, None


class GroupBatchNorm(_BatchNorm):
    """BatchNorm (1d/2d/3d) whose training statistics are those of the whole batch across
    ``group`` (see the module docstring). Eval mode is plain BatchNorm with the running
    statistics. Built by :func:`convert_sync_batchnorm`."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        dist_ctx: DistContext,
        group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.dist_ctx = dist_ctx
        self.group = group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input [N, C, ...], got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch = self.training or not self.track_running_stats
        if not use_batch or dist.get_world_size(self.group) == 1:
            return super().forward(input)
        factor = 0.0
        if self.training and self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        rm = self.running_mean if self.training and self.track_running_stats else None
        rv = self.running_var if self.training and self.track_running_stats else None
        return _GroupBatchNormFn.apply(
            input, self.weight, self.bias, rm, rv, self.eps, factor, self.dist_ctx, self.group
        )


def convert_sync_batchnorm(model: nn.Module, ctx: DistContext, group: Any = None) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` by a synchronised one over ``group``, keeping
    its Parameters (the same objects) and buffers. Returns the model (a new object only when
    ``model`` itself is a BatchNorm layer). Do it before building the optimizer."""
    if ctx.backend == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    return _convert(model, ctx, group)


def _convert(module: nn.Module, ctx: DistContext, group: Any) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (GroupBatchNorm, nn.SyncBatchNorm)):
        out = GroupBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            dist_ctx=ctx,
            group=group,
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child, ctx, group))
    return out


def has_collective_forward(model: nn.Module) -> bool:
    """Whether a training forward of ``model`` communicates (synchronised BatchNorm): then every
    rank of its group must run every forward and backward."""
    return any(isinstance(m, (GroupBatchNorm, nn.SyncBatchNorm)) for m in model.modules())
