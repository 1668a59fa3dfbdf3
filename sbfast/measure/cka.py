"""Centred kernel alignment (Kornblith et al. 2019) of two representations of the same samples.

For features X [n, d_x] and Y [n, d_y] with Gram matrices K, L (n x n):

    CKA(X, Y) = <HKH, HLH>_F / (||HKH||_F ||HLH||_F),   H = I - 11^T / n

* kernels: linear (K = X X^T) and RBF (K_ab = exp(-||x_a - x_b||^2 / (2 t^2 med)), med the
  median of the n^2 squared distances, t = ``threshold``), as the release's ``cka_utils``;
* ``debiased=True``: both centrings replaced by the U-centring of Szekely & Rizzo (zero the
  diagonal, subtract row/column sums over n - 2 corrected by the grand sum over 2(n - 1), zero
  the diagonal again); <U(K), U(L)> / (n(n - 3)) is the unbiased HSIC estimator of Song et al.
  2012, so the debiased CKA is a ratio of unbiased HSICs (CKA itself stays biased);
* feature-space linear form ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) (X_c the
  column-centred features), equal to the Gram form and cheaper when d < n;
* all pairs of several representations at once (:func:`cka_matrix`): the centred Grams are
  stacked as rows of one [L, n^2] matrix and a single product gives every <K_i, K_j>;
* the minibatch estimator of Nguyen et al. 2021 (:class:`MinibatchCKA`): unbiased HSIC of each
  minibatch summed over minibatches, CKA = sum HSIC(K, L) / sqrt(sum HSIC(K, K) sum HSIC(L, L)).
  The per-batch biased CKA is not consistent across batch sizes (about 0.06 on independent
  inputs at n = 128); the sum of unbiased HSICs is.

Precision: linear Grams and feature products are formed in the input's dtype (float32 stays
float32: that product is the cost), everything after them (centring, inner products, the ratio)
in float64. RBF Grams are formed in float64. Results are float64, clamped to [-1, 1] (the
Cauchy-Schwarz bound, which round-off may cross by an ulp).

Cost: Gram form 2 n^2 d per representation + n^2 per pair; feature form 2 n (d_x d_y + d_x^2 +
d_y^2); memory n^2 float64 per representation (full batch), b^2 per representation (minibatch b).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KERNELS = ("linear", "rbf")
MIN_BATCH = 4  # the unbiased HSIC divides by n (n - 3); U-centring divides by n - 2


def check_features(x: object, what: str = "x", *, min_samples: int = 2) -> torch.Tensor:
    """``x`` as a floating [n, d] tensor with n >= ``min_samples`` and d >= 1, finite."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor [n, d] of features, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be floating, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{what} must be [n, d] (samples, features; flatten first), got shape {tuple(x.shape)}")
    if x.shape[0] < min_samples or x.shape[1] == 0:
        raise ValueError(f"{what} needs n >= {min_samples} samples and d >= 1 features, got shape {tuple(x.shape)}")
    # one min/max pass (NaN propagates through both): a bool tensor of x's size from isfinite
    # would cost as much as a Gram's worth of memory traffic on wide features
    if not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):
        raise ValueError(f"{what} contains NaN or inf")
    return x


def check_kernel(kernel: str, threshold: float) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(
            f"threshold must be a number > 0 (the RBF bandwidth's fraction of the median), got {threshold!r}"
        )


# Smallest row block of the triangular Gram product (below 2 blocks, one plain product).
GRAM_BLOCK = 128


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """X X^T of [n, d] features, formed in x's dtype (half types in float32), returned float64.

    For n >= 2 x GRAM_BLOCK the product is taken by row blocks over the upper triangle only (the
    lower one is its transpose): 5/8 of the multiply-adds with 4 blocks, 1.5x faster than ``x @ x.T`` on the bench's [1000, 65536] blocks on this CPU."""
    xm = x.to(_matmul_dtype(x))
    n = xm.shape[0]
    if n < 2 * GRAM_BLOCK:
        return (xm @ xm.T).to(torch.float64)
    out = torch.empty(n, n, dtype=torch.float64, device=xm.device)
    step = max(GRAM_BLOCK, -(-n // 4))
    for i in range(0, n, step):
        j = min(n, i + step)
        rows = (xm[i:j] @ xm[i:].T).to(torch.float64)  # [block, n - i]: the diagonal block and right of it
        out[i:j, i:] = rows
        out[j:, i:j] = rows[:, j - i :].T
    return out


def _median(values: torch.Tensor) -> torch.Tensor:
    """NumPy's median of a flat tensor (the mean of the two middle values for an even count)."""
    n = values.numel()
    hi = torch.kthvalue(values, n // 2 + 1).values
    if n % 2:
        return hi
    return (torch.kthvalue(values, n // 2).values + hi) / 2


def gram_rbf(x: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """RBF Gram exp(-d_ab^2 / (2 threshold^2 median(d^2))) of [n, d] features, float64.

    The squared distances are formed as the release forms them, ||x_a||^2 + ||x_b||^2 -
    2 x_a.x_b (the diagonal is 0 up to round-off), and the median runs over all n^2 of them."""
    xd = x.to(torch.float64)
    dots = xd @ xd.T
    sq_norms = dots.diagonal()
    sq_dist = -2 * dots + sq_norms[:, None] + sq_norms[None, :]
    return torch.exp(-sq_dist / (2 * threshold**2 * _median(sq_dist.flatten())))


def center_gram(gram: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """H K H (biased) or the U-centring of K (unbiased) of a symmetric [n, n] Gram, float64.

    Biased: subtract column means and add back half their mean, on both sides (= H K H).
    Unbiased (n >= 3): zero the diagonal, m_b = sum_a K_ab / (n - 2) - sum K / (2 (n-1)(n-2)),
    K_ab - m_a - m_b off the diagonal, 0 on it. Works on the last two dims (a stack of Grams)."""
    g = gram.to(torch.float64).clone()
    n = g.shape[-1]
    if unbiased:
        g.diagonal(dim1=-2, dim2=-1).zero_()
        means = g.sum(-2) / (n - 2)
        means = means - means.sum(-1, keepdim=True) / (2 * (n - 1))
        g = g - means[..., :, None] - means[..., None, :]
        g.diagonal(dim1=-2, dim2=-1).zero_()
    else:
        means = g.mean(-2)
        means = means - means.mean(-1, keepdim=True) / 2
        g = g - means[..., :, None] - means[..., None, :]
    return g


def _ratio(hsic: torch.Tensor) -> torch.Tensor:
    """[L, L] matrix of (scaled) HSICs -> CKA_ij = S_ij / sqrt(S_ii S_jj), clamped to [-1, 1].

    S is symmetrised first (a product U U^T need not be bit-symmetric); the diagonal is then
    exactly 1, since sqrt(s * s) == s in IEEE arithmetic."""
    hsic = (hsic + hsic.T) / 2
    d = hsic.diagonal()
    return (hsic / torch.sqrt(d[:, None] * d[None, :])).clamp(-1.0, 1.0)


def _gram(x: torch.Tensor, kernel: str, threshold: float) -> torch.Tensor:
    """The Gram the CKA paths centre. The features are column-centred first: both centrings
    annihilate the row and column effects that a feature mean adds to K (a_i + a_j + c), so the
    result is the same in exact arithmetic, while a float32 Gram of uncentred post-ReLU features
    would lose the small centred part to cancellation."""
    xc = x.to(_matmul_dtype(x))
    xc = xc - xc.mean(0, keepdim=True)
    return gram_linear(xc) if kernel == "linear" else gram_rbf(xc, threshold)


def cka_from_grams(gram_x: torch.Tensor, gram_y: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    """CKA of two [n, n] Gram matrices (the release's ``cka_compute``), a 0-d float64 tensor."""
    kx, ky = center_gram(gram_x, debiased), center_gram(gram_y, debiased)
    hsic = torch.stack([(kx * kx).sum(), (kx * ky).sum(), (ky * ky).sum()])
    return (hsic[1] / torch.sqrt(hsic[0] * hsic[2])).clamp(-1.0, 1.0)


def feature_space_linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    """Linear CKA from features, ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F), with the
    closed-form unbiased HSIC when ``debiased`` (the release's ``feature_space_linear_cka``).
    [n, d_x], [n, d_y] -> 0-d float64."""
    return _feature_cka_matrix([x, y], debiased)[0, 1]


def _feature_cka_matrix(features: Sequence[torch.Tensor], debiased: bool) -> torch.Tensor:
    """All pairs of linear CKA in feature space: one [D, D] product of the concatenated centred
    features (D = sum of the d_i), then per-block squared Frobenius norms."""
    n = features[0].shape[0]
    dtype = torch.float64 if any(f.dtype == torch.float64 for f in features) else torch.float32
    centred = [f.to(dtype) - f.to(dtype).mean(0, keepdim=True) for f in features]
    z = torch.cat(centred, dim=1)
    prod = (z.T @ z).to(torch.float64)  # [D, D]
    edges = torch.tensor([0] + [f.shape[1] for f in features]).cumsum(0).tolist()
    k = len(features)
    hsic = torch.empty(k, k, dtype=torch.float64, device=z.device)
    for i in range(k):
        for j in range(i, k):
            block = prod[edges[i] : edges[i + 1], edges[j] : edges[j + 1]]
            hsic[i, j] = hsic[j, i] = block.pow(2).sum()
    if debiased:
        rows = torch.stack([c.to(torch.float64).pow(2).sum(1) for c in centred])  # [k, n]
        totals = rows.sum(1)
        hsic = hsic - n / (n - 2.0) * (rows @ rows.T) + totals[:, None] * totals[None, :] / ((n - 1) * (n - 2))
    return _ratio(hsic)


def _centred_gram_rows(features: Sequence[torch.Tensor], kernel: str, debiased: bool, threshold: float) -> torch.Tensor:
    """The centred Grams of ``features`` flattened as the rows of one [L, n^2] float64 matrix.

    The column-centred copies of the features (see :func:`_gram`) are written into one scratch
    buffer, reused from representation to representation: fresh memory for each [n, d] copy cost
    more than the centring itself (page faults)."""
    by_dtype: dict[torch.dtype, torch.Tensor] = {}
    for f in features:
        dt = _matmul_dtype(f)
        if by_dtype.get(dt) is None or by_dtype[dt].numel() < f.numel():
            by_dtype[dt] = torch.empty(f.numel(), dtype=dt, device=f.device)
    rows = []
    for f in features:
        xm = f.to(_matmul_dtype(f))
        xc = torch.sub(xm, xm.mean(0, keepdim=True), out=by_dtype[xm.dtype][: xm.numel()].view(xm.shape))
        gram = gram_linear(xc) if kernel == "linear" else gram_rbf(xc, threshold)
        rows.append(center_gram(gram, debiased).flatten())
    return torch.stack(rows)


def cka_matrix(
    features: Sequence[torch.Tensor],
    *,
    kernel: str = "linear",
    debiased: bool = False,
    threshold: float = 1.0,
    form: str = "auto",
) -> torch.Tensor:
    """CKA of every pair of L representations of the same n samples.

    Args:
        features: L >= 1 floating tensors [n, d_i] (same n, same device; d_i may differ).
        kernel: "linear" or "rbf". debiased: unbiased HSIC (needs n >= 4). threshold: RBF.
        form: "gram" (stacked centred Grams, one [L, n^2] x [n^2, L] product), "feature"
            (linear only: one [D, D] product of the concatenated centred features), or "auto"
            (feature when linear and D = sum d_i < n, where it is cheaper).
    Returns:
        [L, L] float64 on the features' device, symmetric, 1 on the diagonal.
    """
    check_kernel(kernel, threshold)
    if isinstance(features, torch.Tensor) or len(features) == 0:
        raise TypeError("features must be a non-empty sequence of [n, d] tensors")
    feats = [check_features(f, f"features[{i}]", min_samples=4 if debiased else 2) for i, f in enumerate(features)]
    n = feats[0].shape[0]
    bad = next((i for i, f in enumerate(feats) if f.shape[0] != n or f.device != feats[0].device), None)
    if bad is not None:
        raise ValueError(
            f"features[{bad}] has {feats[bad].shape[0]} samples on {feats[bad].device}, features[0] has {n} on "
            f"{feats[0].device}: every representation must be of the same samples, on one device"
        )
    if form not in ("auto", "gram", "feature"):
        raise ValueError(f"form must be 'auto', 'gram' or 'feature', got {form!r}")
    if form == "feature" and kernel != "linear":
        raise ValueError("the feature-space form exists for the linear kernel only")
    if form == "feature" or (form == "auto" and kernel == "linear" and sum(f.shape[1] for f in feats) < n):
        return _feature_cka_matrix(feats, debiased)
    rows = _centred_gram_rows(feats, kernel, debiased, threshold)
    return _ratio(rows @ rows.T)


def cka(
    x: torch.Tensor, y: torch.Tensor, *, kernel: str = "linear", debiased: bool = False, threshold: float = 1.0
) -> float:
    """CKA of two representations [n, d_x], [n, d_y] of the same n samples, as a Python float.

    Linear kernel: the feature-space form when d_x + d_y < n, else the Gram form (equal up to
    round-off). See the module docstring for the kernels, ``debiased`` and the precision."""
    return float(cka_matrix([x, y], kernel=kernel, debiased=debiased, threshold=threshold)[0, 1])


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive minibatches of ``batch_size`` over n samples; a last batch
    of fewer than MIN_BATCH samples (which has no unbiased HSIC) joins the one before it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < MIN_BATCH:
        raise ValueError(f"batch_size must be an int >= {MIN_BATCH} (unbiased HSIC), got {batch_size!r}")
    if n < MIN_BATCH:
        raise ValueError(f"minibatch CKA needs at least {MIN_BATCH} samples, got {n}")
    bounds = [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_BATCH:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


class MinibatchCKA:
    """Accumulates unbiased HSIC of L representations over minibatches, all pairs at once.

    Each :meth:`update` U-centres the b x b Gram of every representation, stacks them as the
    rows of an [L, b^2] matrix U and adds U U^T / (b (b - 3)) (every pair's unbiased HSIC) to a
    float64 [L, L] sum on the features' device: one product per batch, no host read.
    :meth:`compute` gives CKA_ij = S_ij / sqrt(S_ii S_jj).

    Args:
        kernel: "linear" or "rbf" (its bandwidth from each batch's own median distance).
        threshold: RBF bandwidth fraction.
    """

    def __init__(self, *, kernel: str = "linear", threshold: float = 1.0) -> None:
        check_kernel(kernel, threshold)
        self.kernel, self.threshold = kernel, threshold
        self.sums: torch.Tensor | None = None
        self.batches = 0

    def update(self, features: Sequence[torch.Tensor]) -> None:
        """Add one minibatch: L tensors [b, ...] of the same b >= 4 samples (flattened per sample)."""
        if isinstance(features, torch.Tensor) or len(features) == 0:
            raise TypeError("features must be a non-empty sequence of [b, ...] tensors")
        flat = [f.reshape(f.shape[0], -1) if isinstance(f, torch.Tensor) and f.dim() > 1 else f for f in features]
        feats = [check_features(f, f"features[{i}]", min_samples=MIN_BATCH) for i, f in enumerate(flat)]
        b = feats[0].shape[0]
        if any(f.shape[0] != b for f in feats):
            raise ValueError(
                f"every representation of a minibatch needs the same samples, got {[f.shape[0] for f in feats]}"
            )
        if self.sums is not None and self.sums.shape[0] != len(feats):
            raise ValueError(f"this accumulator holds {self.sums.shape[0]} representations, got {len(feats)}")
        rows = _centred_gram_rows(feats, self.kernel, True, self.threshold)
        hsic = rows @ rows.T / (b * (b - 3))
        self.sums = hsic if self.sums is None else self.sums + hsic
        self.batches += 1

    def compute(self) -> torch.Tensor:
        """[L, L] float64 minibatch CKA (on the features' device)."""
        if self.sums is None:
            raise ValueError("MinibatchCKA.compute() before any update()")
        return _ratio(self.sums)


def minibatch_cka(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 256,
    kernel: str = "linear",
    threshold: float = 1.0,
) -> float:
    """Minibatch CKA (Nguyen et al. 2021) of [n, d_x] and [n, d_y] over consecutive batches of
    ``batch_size`` rows (a remainder under 4 rows joins the last batch), a Python float."""
    x, y = check_features(x, "x", min_samples=MIN_BATCH), check_features(y, "y", min_samples=MIN_BATCH)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same samples, got {x.shape[0]} and {y.shape[0]} rows")
    acc = MinibatchCKA(kernel=kernel, threshold=threshold)
    for start, stop in batch_bounds(x.shape[0], batch_size):
        acc.update([x[start:stop], y[start:stop]])
    return float(acc.compute()[0, 1])
