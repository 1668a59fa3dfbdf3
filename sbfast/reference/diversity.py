"""Plain twins of the diversity measures: disagreement, DER / EIR, KL, JS, CKA, bias-variance.

Written from the definitions, for clarity: explicit loops over member pairs, the centring matrix
H = I - 11^T/n, Song et al.'s formula for the unbiased HSIC (a different derivation from the
U-centring the fast path uses), squared distances from differences. Everything in float64.
"""

from __future__ import annotations

import math

import torch


def disagreement(probs: torch.Tensor) -> torch.Tensor:
    """D[i, j] = 1 - (1/n) sum_x 1[argmax p_i(x) == argmax p_j(x)]; [M, n, C] -> [M, M]."""
    m = probs.shape[0]
    labels = [probs[i].argmax(-1) for i in range(m)]
    out = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            out[i, j] = 1.0 - (labels[i] == labels[j]).double().mean()
    return out


def der_eir(probs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """DER = mean_{i<j} D[i, j] / mean member error; EIR = (mean member error - ensemble error)
    / mean member error, the ensemble predicting argmax of the mean probability."""
    m = probs.shape[0]
    d = disagreement(probs)
    pairs = [float(d[i, j]) for i in range(m) for j in range(i + 1, m)]
    member_err = sum(float((probs[i].argmax(-1) != targets).double().mean()) for i in range(m)) / m
    ens_err = float((probs.double().mean(0).argmax(-1) != targets).double().mean())
    return (sum(pairs) / len(pairs)) / member_err, (member_err - ens_err) / member_err


def _kl_rows(p: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """sum_c p (log p - q_log) per row, with 0 log 0 = 0."""
    p = p.double()
    log_p = torch.where(p > 0, p.log(), torch.zeros_like(p))
    return (torch.where(p > 0, p * (log_p - q_log), torch.zeros_like(p))).sum(-1)


def kl_divergence(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL[i, j] = mean_x KL(p_i(x) || p_j(x)), log(max(p_j, eps)); [M, n, C] -> [M, M]."""
    m = probs.shape[0]
    out = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            if i != j:
                out[i, j] = _kl_rows(probs[i], probs[j].double().clamp_min(eps).log()).mean()
    return out


def js_divergence(probs: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """JS[i, j] = mean_x (KL(p_i || mix) + KL(p_j || mix)) / 2, mix = clamp((p_i + p_j)/2, eps, 1)."""
    m = probs.shape[0]
    out = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            if i != j:
                log_mix = ((probs[i].double() + probs[j].double()) / 2).clamp(eps, 1).log()
                out[i, j] = ((_kl_rows(probs[i], log_mix) + _kl_rows(probs[j], log_mix)) / 2).mean()
    return out


def linear_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x @ x.T


def rbf_gram(x: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """exp(-||x_a - x_b||^2 / (2 threshold^2 median)), the median over all n^2 squared
    distances (the mean of the middle two for an even count)."""
    x = x.double()
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    flat = sq.flatten().sort().values
    k = flat.numel()
    median = flat[k // 2] if k % 2 else (flat[k // 2 - 1] + flat[k // 2]) / 2
    return torch.exp(-sq / (2 * threshold**2 * median))


def hsic_biased(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """tr(K H L H) / (n - 1)^2."""
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    return torch.trace(k @ h @ m @ h) / (n - 1) ** 2


def hsic_unbiased(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Song et al. 2012: [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)),
    K~, L~ the Grams K = ``k`` and L = ``m`` with a zeroed diagonal."""
    n = k.shape[0]
    kt = k.double() - torch.diag(torch.diag(k.double()))
    lt = m.double() - torch.diag(torch.diag(m.double()))
    one = torch.ones(n, dtype=torch.float64)
    term = torch.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term = term - 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return term / (n * (n - 3))


def cka_from_grams(k: torch.Tensor, m: torch.Tensor, debiased: bool = False) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) of Grams K = ``k``, L = ``m``."""
    hsic = hsic_unbiased if debiased else hsic_biased
    return float(hsic(k, m) / math.sqrt(float(hsic(k, k)) * float(hsic(m, m))))


def cka(
    x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", debiased: bool = False, threshold: float = 1.0
) -> float:
    """CKA of [n, d_x] and [n, d_y] features (linear or RBF kernel, biased or unbiased HSIC)."""
    gram = linear_gram if kernel == "linear" else (lambda f: rbf_gram(f, threshold))
    return cka_from_grams(gram(x), gram(y), debiased)


def minibatch_cka(
    x: torch.Tensor, y: torch.Tensor, bounds: list[tuple[int, int]], kernel: str = "linear", threshold: float = 1.0
) -> float:
    """Nguyen et al. 2021: sum_k HSIC_u(K_k, L_k) / sqrt(sum_k HSIC_u(K_k, K_k) sum_k HSIC_u(L_k, L_k))
    over the minibatches [start, stop) in ``bounds``."""
    gram = linear_gram if kernel == "linear" else (lambda f: rbf_gram(f, threshold))
    kl = kk = ll = 0.0
    for start, stop in bounds:
        k, m = gram(x[start:stop]), gram(y[start:stop])
        kl += float(hsic_unbiased(k, m))
        kk += float(hsic_unbiased(k, k))
        ll += float(hsic_unbiased(m, m))
    return kl / math.sqrt(kk * ll)


def bias_variance(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(bias^2, variance): mean over samples of ||mean_m o_m - e_y||^2 and of the unbiased
    across-member variance summed over classes, sum_c var_m(o_m[c]) with 1/(M-1)."""
    o = outputs.double()
    m, n, c = o.shape
    bias2 = var = 0.0
    for s in range(n):
        onehot = torch.zeros(c, dtype=torch.float64)
        onehot[int(targets[s])] = 1.0
        bias2 += float(((o[:, s].mean(0) - onehot) ** 2).sum())
        var += float(o[:, s].var(dim=0, unbiased=True).sum())
    return bias2 / n, var / n
