"""Plain-PyTorch twins of the element-level ops: ``global_sq_norm``, the per-sample gradient
norms behind the fast Fisher scores, the fused optimizer's two passes ``sam_perturb_`` and
``sam_restore_sgd_``, and ``ellipsoid_sq_norms`` / ``ellipsoid_momentum_step_`` behind the sharpness
measure's projection and its momentum step.

Each is the meaning of its op and the CPU implementation where ``sbfast._C`` was not built. The SAM
passes run, line for line, the torch ops that ``SAM.first_step`` / ``SAM.second_step`` +
``torch.optim.SGD`` run on one parameter, so in float32/float64 they give the same bits; the fast
kernels compute in float for bfloat16/float16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def global_sq_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared global L2 norm of a list of tensors, sum_t sum_i t_i^2.

    Args:
        tensors: any number of floating tensors, any shapes, on one device.
    Returns:
        0-d tensor on the tensors' device (CPU for an empty list); float64 if any input is
        float64, else float32 (half and bfloat16 inputs accumulate in float32).
    """
    if len(tensors) == 0:
        return torch.zeros((), dtype=torch.float32)
    acc_dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    total = torch.zeros((), dtype=acc_dtype, device=tensors[0].device)
    for t in tensors:
        total = total + t.detach().to(acc_dtype).pow(2).sum()
    return total


def ellipsoid_sq_norms(z: torch.Tensor, inv_scale: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
    """Squared weighted norms of ``z``'s candidate projections onto an ellipsoid, one per multiplier.

    With s = ``inv_scale`` (1/c, 0 where a coordinate cannot move) and each lambda_k of ``lambdas``:

        out[k] = sum_j (z_j s_j)^2 / (1 + 2 lambda_k s_j^2)^2

    the squared norm ||u_k / c||^2 of u_k = z / (1 + 2 lambda_k / c^2), the candidate that a
    bisection on lambda tests when it projects z onto sum_j (u_j / c_j)^2 <= rho^2.

    Args:
        z, inv_scale: floating tensors of one shape, dtype and device (any strides, empty allowed).
        lambdas: K >= 1 finite multipliers >= 0.
    Returns:
        [K] on z's device: float64 if z is float64, else float32 (half and bfloat16 in float32).
    """
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    zs = z.detach().to(acc).reshape(-1)
    s = inv_scale.detach().to(acc).reshape(-1)
    a = (zs * s).square()
    b = 2 * s.square()
    return torch.stack([(a / (1 + lam * b).square()).sum() for lam in lambdas])


def ellipsoid_momentum_step_(
    z: torch.Tensor,
    point: torch.Tensor,
    two_inv2: torch.Tensor,
    prev: torch.Tensor,
    w0: torch.Tensor,
    lmbd: float,
    momentum: float,
) -> None:
    """One APGD step after its ellipsoid projection, in place, with t = ``two_inv2`` (2 / c^2, 0
    where c = 0) and m = ``momentum``:

        u = z / (1 + lmbd t)          (lmbd = 0: u = z, z already inside the set)
        z <- lerp(prev, u, m) = prev + m (u - prev)
        point <- w0 + z

    the ops the measure ran one pass each before this op (``torch.mul``, ``add``, ``div``,
    ``torch.lerp``, ``torch.add``), so in float32/float64 the C++ CPU kernel gives their bits;
    bfloat16/float16 compute in float32 and round z and point once each.

    Args:
        z, point, two_inv2, prev, w0: [P] floating, one dtype, contiguous (z, point written).
        lmbd: the projection's multiplier, finite >= 0; momentum: in [0, 1].
    """
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    u = z.to(acc)
    if lmbd != 0:
        u = u / torch.mul(two_inv2.to(acc), lmbd).add_(1)
    v = torch.lerp(prev.to(acc), u, momentum)
    z.copy_(v)
    point.copy_(torch.add(w0.to(acc), z.to(acc)))


def _per_sample_acc_dtype(a: torch.Tensor, g: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (a.dtype, g.dtype) else torch.float32


def per_sample_grad_sq_norm_direct(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """s_i = ||G_i^T A_i||_F^2 = ||sum_t g_it a_it^T||_F^2, by forming each per-sample gradient.

    Args:
        a: [B, T, d] layer inputs (activations), floating.
        g: [B, T, p] gradients of the layer's outputs, floating.
    Returns:
        [B], float64 if either input is float64, else float32.
    """
    acc = _per_sample_acc_dtype(a, g)
    return torch.bmm(g.to(acc).transpose(1, 2), a.to(acc)).pow(2).sum((1, 2))


def per_sample_grad_sq_norm_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The same s_i by the Gram ("ghost norm") identity: sum_{t,s} (a_t . a_s)(g_t . g_s).

    Args and return as :func:`per_sample_grad_sq_norm_direct`.
    """
    acc = _per_sample_acc_dtype(a, g)
    a, g = a.to(acc), g.to(acc)
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))


def per_sample_conv_grad_sq_norm(
    x: torch.Tensor,
    g: torch.Tensor,
    weight_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """s_i = ||dW_i||_F^2, dW_i the weight gradient of a 1-D/2-D convolution for sample i alone.

    The input unfolded to [B, T, C_in/groups * k] per group is a Linear's input, so
    s_i = sum over groups of ||G_ig^T A_ig||_F^2 (:func:`per_sample_grad_sq_norm_direct`).

    Args:
        x: [B, C_in, *S] the convolution's input (explicit padding modes already applied),
        g: [B, C_out, *S'] the gradient of its output; weight_size: [C_out, C_in/groups, *k];
        stride, padding (zeros), dilation: one int per spatial dim; groups.
    Returns:
        [B], float64 if either input is float64, else float32.
    """
    b = x.shape[0]
    acc = _per_sample_acc_dtype(x, g)
    if b == 0 or x.numel() == 0 or g.numel() == 0:
        return torch.zeros(b, dtype=acc, device=x.device)
    kernel = tuple(weight_size[2:])
    if x.dim() == 3:  # Conv1d as a 2-D unfold with a height-1 kernel
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride, padding, dilation = (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    cols = F.unfold(x.to(acc), kernel, dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
    t = cols.shape[2]
    a = cols.view(b, groups, -1, t).transpose(2, 3).reshape(b * groups, t, -1)
    gg = g.to(acc).reshape(b, groups, -1, t).transpose(2, 3).reshape(b * groups, t, -1)
    return per_sample_grad_sq_norm_direct(a, gg).view(b, groups).sum(1)


def sam_perturb_(
    param: torch.Tensor, backup: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, adaptive: bool
) -> None:
    """backup <- w; w <- w + e, e = (adaptive ? w^2 * g : g) * s (SAM.first_step's order).

    Args:
        param, backup, grad: contiguous, same dtype and shape; ``param`` and ``backup`` are written.
        scale: 0-d s = rho / (||g|| + 1e-12); s == 0 (rho = 0, or a step skipped for a non-finite
            norm) leaves w untouched, also where g is infinite.
    """
    backup.copy_(param)
    e = (torch.pow(param, 2) * grad if adaptive else grad) * scale.to(param)
    param.add_(torch.where(scale != 0, e, torch.zeros_like(e)))


def sam_restore_sgd_(
    param: torch.Tensor,
    backup: torch.Tensor | None,
    grad: torch.Tensor,
    normal_grad: torch.Tensor | None,
    momentum_buf: torch.Tensor | None,
    momentum_ready: torch.Tensor | None,
    lr: torch.Tensor,
    skip: torch.Tensor,
    inv_scale: torch.Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    write_grad_sum: bool,
) -> None:
    """w <- backup (exactly; w itself when backup is None), then one torch.optim.SGD step on
    g = (g' + g_n) * inv_scale (g' alone when normal_grad is None).

    SGD, as torch's single-tensor path: d = g + wd * w; buf = d on the buffer's first step
    (momentum_ready[0] == 0), else momentum * buf + (1 - dampening) * d; d = d + momentum * buf
    (nesterov) or buf; w = w - lr * d. After the step momentum_ready is set to 1.
    With skip != 0 only the restore happens (buffers, flags and grads untouched).
    write_grad_sum stores g' + g_n (before inv_scale) into grad, the gradient the reference
    leaves in p.grad after the step. The scalars are read with float() (this twin serves CPU).
    """
    w0 = backup if backup is not None else param
    if float(skip) != 0:
        param.copy_(w0)
        return
    g = grad if normal_grad is None else grad + normal_grad
    if write_grad_sum and normal_grad is not None:
        grad.copy_(g)
    g = g * inv_scale.to(g.dtype)
    d = g.add(w0, alpha=weight_decay) if weight_decay != 0 else g
    if momentum != 0:
        if int(momentum_ready.reshape(-1)[0]) == 0:
            momentum_buf.copy_(d)
        else:
            momentum_buf.mul_(momentum).add_(d, alpha=1 - dampening)
        momentum_ready.fill_(1)
        d = d.add(momentum_buf, alpha=momentum) if nesterov else momentum_buf
    param.copy_(w0.add(d, alpha=-float(lr)))
