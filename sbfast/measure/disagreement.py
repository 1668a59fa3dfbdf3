"""Pairwise prediction disagreement of ensemble members, and the paper's DER and EIR from it.

    D[i, j] = 1 - (1/n) sum_x 1[argmax_c p_i(x) = argmax_c p_j(x)]

an M x M symmetric matrix with a zero diagonal (argmax ties go to the lowest class, as
``torch.argmax`` and the release's ``np.argmax``). Cost: one argmax per member, then M^2
comparisons of n labels; no pass over the classes beyond the argmax.
"""

from __future__ import annotations

import math

import torch

from sbfast.measure.diversity_checks import check_probs, check_targets


def disagreement_of_labels(labels: torch.Tensor) -> torch.Tensor:
    """[M, n] integer labels -> [M, M] float64, 1 - (agreeing samples) / n.

    Written as the release writes it (one minus the agreement count over n), so that the matrix
    equals its ``test_ensemble_disagreement`` bit for bit on the same argmaxes."""
    agree = (labels[:, None, :] == labels[None, :, :]).sum(-1, dtype=torch.float64)
    return 1.0 - agree / labels.shape[1]


def disagreement(probs: torch.Tensor) -> torch.Tensor:
    """Pairwise disagreement matrix of M members.

    Args:
        probs: [M, n, C] floating softmax outputs (M >= 2, rows summing to 1), any device.
    Returns:
        [M, M] float64 on probs' device: D[i, j] = share of the n samples where members i and j
        predict different classes; symmetric, zero diagonal.
    Raises:
        ValueError / TypeError: not [M, n, C], M < 2, rows that are not distributions.
    """
    p = check_probs(probs, min_members=2)
    return disagreement_of_labels(p.argmax(-1))


def mean_pairwise(matrix: torch.Tensor) -> torch.Tensor:
    """Mean over distinct pairs i < j of an [M, M] matrix (M >= 2), a 0-d tensor."""
    iu = torch.triu_indices(matrix.shape[0], matrix.shape[1], offset=1, device=matrix.device)
    return matrix[iu[0], iu[1]].mean()


def disagreement_ratios(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The paper's ratios from the same argmaxes as :func:`disagreement`.

    * ``mean_disagreement``: mean of D[i, j] over pairs i < j;
    * ``mean_member_error``: mean over members of the share of misclassified samples;
    * ``ensemble_error``: error of argmax of the mean probability (mean over members);
    * ``der`` = mean_disagreement / mean_member_error (nan when the members never err);
    * ``eir`` = (mean_member_error - ensemble_error) / mean_member_error (nan likewise).

    Equal to ``sbfast.metrics.ensemble_metrics``' ``der`` and ``eir`` on the same probabilities.

    Args:
        probs: [M, n, C] softmax outputs, M >= 2. targets: [n] integer labels in [0, C).
    Returns:
        dict of Python floats (one host read at the end).
    """
    p = check_probs(probs, min_members=2)
    t = check_targets(targets, p.shape[1], p.shape[2]).to(p.device)
    labels = p.argmax(-1)  # [M, n]
    # The same float64 expressions as sbfast.metrics.ensemble_metrics (mean of the disagreeing
    # indicator, error = 1 - accuracy), so that the ratios equal its ratios bit for bit.
    dis = (labels[:, None, :] != labels[None, :, :]).to(torch.float64).mean(-1)
    member_acc = (labels == t).to(torch.float64).mean(-1)  # [M]
    ens_acc = (p.to(torch.float64).mean(0).argmax(-1) == t).to(torch.float64).mean()
    mean_dis, acc, ens_acc = torch.stack([mean_pairwise(dis), member_acc.mean(), ens_acc]).tolist()
    mean_err, ens_err = 1.0 - acc, 1.0 - ens_acc
    return {
        "mean_disagreement": mean_dis,
        "mean_member_error": mean_err,
        "ensemble_error": ens_err,
        "der": mean_dis / mean_err if mean_err > 0 else math.nan,
        "eir": (mean_err - ens_err) / mean_err if mean_err > 0 else math.nan,
    }
