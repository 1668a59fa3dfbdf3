"""Divergences between the members' predictive distributions: KL (both directions) and JS.

Natural log throughout; every function returns an [M, M] float64 matrix on the input's device
and computes in float64 (the probabilities are cast once).
"""

from __future__ import annotations

import torch

from sbfast.measure.diversity_checks import check_probs

KL_EPS = 1e-12  # floor on a probability inside a log: a member that gives a class exactly 0
# contributes p_i log(p_i / 1e-12) instead of inf
JS_EPS = 1e-7  # the release's clamp of the mixture in compare_classification


def kl_divergence(probs: torch.Tensor, *, eps: float = KL_EPS) -> torch.Tensor:
    """Pairwise mean KL divergence, directional.

        KL[i, j] = (1/n) sum_x sum_c p_i(x)_c (log p_i(x)_c - log max(p_j(x)_c, eps))

    with 0 log 0 = 0 (a class member i gives probability 0 adds nothing). Row i is the
    reference distribution: KL[i, j] is KL(p_i || p_j), KL[j, i] the other direction; the
    diagonal is 0. Cost: one [M, nC] x [nC, M] product (the cross-entropy terms of every pair),
    plus one log per probability.

    Args:
        probs: [M, n, C] softmax outputs, M >= 2. eps: floor inside the logs (> 0).
    Returns:
        [M, M] float64 on probs' device.
    """
    p = check_probs(probs, min_members=2).to(torch.float64)
    m, n, _ = p.shape
    log_p = p.clamp_min(eps).log()
    flat_p, flat_log = p.reshape(m, -1), log_p.reshape(m, -1)
    neg_entropy = torch.xlogy(flat_p, flat_p).sum(-1) / n  # (1/n) sum p_i log p_i, [M]
    cross = flat_p @ flat_log.T / n  # (1/n) sum p_i log p_j, [M, M]
    kl = neg_entropy[:, None] - cross
    kl.fill_diagonal_(0.0)
    return kl


def symmetric_kl_divergence(probs: torch.Tensor, *, eps: float = KL_EPS) -> torch.Tensor:
    """(KL[i, j] + KL[j, i]) / 2 of :func:`kl_divergence`: symmetric, zero diagonal, [M, M]."""
    kl = kl_divergence(probs, eps=eps)
    return (kl + kl.T) / 2


def js_divergence(probs: torch.Tensor, *, eps: float = JS_EPS) -> torch.Tensor:
    """Pairwise Jensen-Shannon divergence: the release's ``compare_classification`` "divergence".

        JS[i, j] = (1/n) sum_x (KL(p_i || m) + KL(p_j || m)) / 2,  m = clamp((p_i + p_j)/2, eps, 1)

    (the release's clamp at 1e-7; 0 log 0 = 0 as ``F.kl_div``). Symmetric, zero diagonal,
    bounded by log 2. Cost: M(M-1)/2 passes over [n, C].

    Args:
        probs: [M, n, C] softmax outputs, M >= 2.
    Returns:
        [M, M] float64 on probs' device.
    """
    p = check_probs(probs, min_members=2).to(torch.float64)
    m, n, _ = p.shape
    ent = torch.xlogy(p, p).sum((1, 2))  # sum p log p per member, [M]
    js = torch.zeros(m, m, dtype=torch.float64, device=p.device)
    for i, j in torch.triu_indices(m, m, offset=1).T.tolist():  # host indices: no device sync
        log_mix = ((p[i] + p[j]) / 2).clamp(eps, 1).log()
        # KL(p_i || m) + KL(p_j || m) = sum p_i log p_i + sum p_j log p_j - sum (p_i + p_j) log m
        js[i, j] = (ent[i] + ent[j] - ((p[i] + p[j]) * log_mix).sum()) / (2 * n)
    return js + js.T
