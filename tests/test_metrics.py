"""sbfast.metrics on hand-built cases, every number worked out in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from sbfast.metrics import NLL_EPS, ensemble_metrics, expected_calibration_error, format_table, ood_metrics


def _rows(preds: list[int], c: int = 3, hi: float = 0.7) -> torch.Tensor:
    """One member's probabilities: ``hi`` on the predicted class, the rest shared equally."""
    p = torch.full((len(preds), c), (1 - hi) / (c - 1), dtype=torch.float64)
    p[torch.arange(len(preds)), torch.tensor(preds)] = hi
    return p


# 3 members, 4 samples, 3 classes. Each member puts 0.7 on its argmax and 0.15 on the others.
#   member 0 predicts [0, 1, 2, 0]
#   member 1 predicts [0, 1, 1, 1]
#   member 2 predicts [0, 2, 2, 0]
#   targets           [0, 1, 2, 1]
PREDS = [[0, 1, 2, 0], [0, 1, 1, 1], [0, 2, 2, 0]]
TARGETS = torch.tensor([0, 1, 2, 1])
PROBS = torch.stack([_rows(p) for p in PREDS])  # [3, 4, 3]


def test_hand_built_ensemble():
    r = ensemble_metrics(PROBS, TARGETS)
    # Member accuracy: m0 right on samples 0,1,2 -> 3/4; m1 on 0,1,3 -> 3/4; m2 on 0,2 -> 2/4.
    assert r["member_acc"] == pytest.approx([0.75, 0.75, 0.5])
    assert r["member_acc_mean"] == pytest.approx(2 / 3)
    # Mean probability of class k = 0.15 + 0.55 * (number of members voting k) / 3:
    #   sample 0: votes {0: 3}       -> p = (0.70, 0.15, 0.15),       argmax 0, target 0: right
    #   sample 1: votes {1: 2, 2: 1} -> p = (0.15, 0.5167, 0.3333),   argmax 1, target 1: right
    #   sample 2: votes {2: 2, 1: 1} -> p = (0.15, 0.3333, 0.5167),   argmax 2, target 2: right
    #   sample 3: votes {0: 2, 1: 1} -> p = (0.5167, 0.3333, 0.15),   argmax 0, target 1: wrong
    assert r["ensemble_acc"] == pytest.approx(0.75)
    p2 = 0.15 + 0.55 * 2 / 3  # 0.51667
    p1 = 0.15 + 0.55 * 1 / 3  # 0.33333
    # NLL: -(log 0.7 + log p2 + log p2 + log p1) / 4 = 0.6940
    assert r["ensemble_nll"] == pytest.approx(-(math.log(0.7) + 2 * math.log(p2) + math.log(p1)) / 4)
    assert r["ensemble_nll"] == pytest.approx(0.6940, abs=1e-4)
    # ECE, 15 bins of width 1/15: conf 0.7 lies in bin 10 = (0.667, 0.733] with 1 right sample;
    # conf 0.5167 (x3) in bin 7 = (0.467, 0.533] with 2 right of 3.
    #   ECE = 1/4 * |1 - 0.7| + 3/4 * |2/3 - 0.5167| = 0.075 + 0.1125 = 0.1875
    assert r["ece"] == pytest.approx(0.25 * 0.3 + 0.75 * abs(2 / 3 - p2))
    assert r["ece"] == pytest.approx(0.1875)
    # Disagreement: d(0,1) = samples 2, 3 -> 2/4; d(0,2) = sample 1 -> 1/4; d(1,2) = samples 1, 2, 3 -> 3/4.
    assert r["disagreement"] == [[0.0, 0.5, 0.25], [0.5, 0.0, 0.75], [0.25, 0.75, 0.0]]  # exact quarters
    assert r["mean_disagreement"] == pytest.approx(0.5)
    # DER = mean disagreement / mean member error = 0.5 / (1/3) = 1.5
    assert r["der"] == pytest.approx(1.5)
    # EIR = (mean member error - ensemble error) / mean member error = (1/3 - 1/4) / (1/3) = 0.25
    assert r["eir"] == pytest.approx(0.25)
    assert r["num_members"] == 3 and r["num_samples"] == 4


def test_float32_input_and_targets_as_list():
    r = ensemble_metrics(PROBS.float(), TARGETS.tolist())
    assert r["der"] == pytest.approx(1.5) and r["ece"] == pytest.approx(0.1875, abs=1e-6)


def test_single_member_and_zero_error_cases():
    # One member: no pairs -> mean disagreement and DER are nan; ensemble = member -> EIR 0.
    r = ensemble_metrics(PROBS[:1], TARGETS)
    assert r["disagreement"] == [[0.0]] and math.isnan(r["mean_disagreement"]) and math.isnan(r["der"])
    assert r["ensemble_acc"] == pytest.approx(0.75) and r["eir"] == pytest.approx(0.0)
    # Every member always right: member error 0 -> DER and EIR are 0/0 -> nan.
    perfect = torch.stack([_rows([0, 1, 2, 1])] * 2)
    r = ensemble_metrics(perfect, TARGETS)
    assert r["ensemble_acc"] == 1.0 and r["mean_disagreement"] == 0.0
    assert math.isnan(r["der"]) and math.isnan(r["eir"])


def test_nll_eps_floor():
    # Both members give the true class probability exactly 0: -log(max(0, 1e-12)) = 27.63.
    probs = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    r = ensemble_metrics(probs, torch.tensor([1]))
    assert r["ensemble_nll"] == pytest.approx(-math.log(NLL_EPS))


def test_ece_bins_are_right_closed():
    # Confidence exactly 0.4 = 6/15 belongs to bin 5 = (5/15, 6/15], confidence 0.45 to bin 6.
    # sample A: conf 0.40, right; sample B: conf 0.45, wrong.
    #   separate bins: 1/2 * |1 - 0.40| + 1/2 * |0 - 0.45| = 0.3 + 0.225 = 0.525
    #   (were A put in bin 6 with B: 2/2 * |1/2 - 0.425| = 0.075)
    probs = torch.tensor([[0.4, 0.3, 0.3], [0.45, 0.35, 0.2]], dtype=torch.float64)
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == pytest.approx(0.525)
    # One bin: |acc - conf| of the whole set; a sure, right prediction (conf 1, last bin) costs 0.
    assert expected_calibration_error(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == 0.0
    assert expected_calibration_error(probs, torch.tensor([0, 1]), n_bins=1) == pytest.approx(abs(0.5 - 0.425))
    # The lowest confidence a valid row can have is 1/C: 20 uniform classes give 0.05, in bin 0
    # = [0, 1/15]; right on one of two samples: ECE = |1/2 - 0.05| = 0.45.
    uniform = torch.full((2, 20), 0.05, dtype=torch.float64)
    assert expected_calibration_error(uniform, torch.tensor([0, 1])) == pytest.approx(0.45)


def test_validation_errors():
    with pytest.raises(ValueError, match="unsqueeze"):
        ensemble_metrics(PROBS[0], TARGETS)
    with pytest.raises(ValueError, match="targets must be"):
        ensemble_metrics(PROBS, TARGETS[:3])
    with pytest.raises(ValueError, match="sum to 1"):
        ensemble_metrics(PROBS * 2, TARGETS)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ensemble_metrics(PROBS, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ensemble_metrics(PROBS, torch.tensor([0, -1, 2, 0]))
    with pytest.raises(TypeError, match="integer"):
        ensemble_metrics(PROBS, TARGETS.float())
    with pytest.raises(TypeError, match="floating"):
        ensemble_metrics(PROBS.long(), TARGETS)
    bad = PROBS.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ensemble_metrics(bad, TARGETS)
    with pytest.raises(ValueError, match="at least one"):
        ensemble_metrics(torch.zeros(2, 0, 3), torch.zeros(0, dtype=torch.int64))


def test_ece_refuses_what_is_not_a_probability_table():
    # Rows of PROBS[0] doubled sum to 2: without the check this gave an ECE above 1.
    with pytest.raises(ValueError, match=r"rows must sum to 1 \(tolerance 0.001\): sample 0 sums to 2.000000"):
        expected_calibration_error(PROBS[0] * 2, TARGETS)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        expected_calibration_error(torch.zeros(1, 2), torch.tensor([0]))
    # Rows that sum to 1 but leave [0, 1]; and the tolerance itself: 1e-3 passes, 2e-3 does not.
    with pytest.raises(ValueError, match=r"in \[0, 1\].*\[-0.5, 1.5\]"):
        expected_calibration_error(torch.tensor([[1.5, -0.5]]), torch.tensor([0]))
    assert expected_calibration_error(torch.tensor([[1.0009, 0.0]], dtype=torch.float64), torch.tensor([0])) >= 0
    with pytest.raises(ValueError, match="sum to 1"):
        expected_calibration_error(torch.tensor([[1.002, 0.0]], dtype=torch.float64), torch.tensor([0]))
    nan = PROBS[0].clone()
    nan[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        expected_calibration_error(nan, TARGETS)
    with pytest.raises(ValueError, match=r"\[n, C\]"):
        expected_calibration_error(PROBS, TARGETS)
    with pytest.raises(ValueError, match="at least one"):
        expected_calibration_error(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating"):
        expected_calibration_error(PROBS[0].long(), TARGETS)
    with pytest.raises(TypeError, match="integer"):
        expected_calibration_error(PROBS[0], TARGETS.float())
    with pytest.raises(TypeError, match="integer"):
        expected_calibration_error(PROBS[0], TARGETS.bool())
    with pytest.raises(ValueError, match=r"targets must be \[n\] with n = 4"):
        expected_calibration_error(PROBS[0], TARGETS[:3])
    with pytest.raises(ValueError, match=r"in \[0, 3\), got values in \[0, 3\]"):
        expected_calibration_error(PROBS[0], torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        expected_calibration_error(PROBS[0], torch.tensor([0, -1, 2, 0]))
    for bins in (0, True, 2.0):
        with pytest.raises(ValueError, match="n_bins"):
            expected_calibration_error(PROBS[0], TARGETS, n_bins=bins)


def test_ensemble_metrics_range_and_message():
    # A member row [1.5, -0.5, 0] sums to 1 but is no distribution.
    bad = PROBS.clone()
    bad[1, 2] = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ensemble_metrics(bad, TARGETS)
    # The message names the offending member and sample.
    bad = PROBS.clone()
    bad[2, 1] *= 3
    with pytest.raises(ValueError, match="member 2, sample 1 sums to 3.000000"):
        ensemble_metrics(bad, TARGETS)


def test_ood_metrics_refuses_bad_keys_and_values():
    t = torch.tensor([0, 1])
    ok = (torch.stack([_rows([0, 1], c=2)]), t)
    for key in (("fog", "3"), ("fog", 2.7), ("fog", True), ("fog", 0)):
        with pytest.raises(ValueError, match="severity must be an int >= 1"):
            ood_metrics({key: ok})
    with pytest.raises(TypeError, match="corruption name must be a str"):
        ood_metrics({(3, 1): ok})
    # A bad table in one set names that set.
    with pytest.raises(ValueError, match=r"\('fog', 2\): probs rows must sum to 1"):
        ood_metrics({("fog", 1): ok, ("fog", 2): (ok[0] * 2, t)})
    with pytest.raises(ValueError, match=r"\('fog', 1\): targets must be in \[0, 2\)"):
        ood_metrics({("fog", 1): (ok[0], torch.tensor([0, 2]))})


def test_format_table_refuses_bad_arguments():
    with pytest.raises(TypeError, match="rows must be a list"):
        format_table({"method": "de"})
    with pytest.raises(TypeError, match="every row must be a dict"):
        format_table([{"method": "de"}, ["de"]])
    with pytest.raises(TypeError, match="columns must be a sequence of str"):
        format_table([{"method": "de"}], columns="method")
    for digits in (-1, True, 2.5):
        with pytest.raises(ValueError, match="digits"):
            format_table([{"a": 1.0}], digits=digits)


def test_ood_metrics_means():
    # Two corruptions x two severities, 2 members, 2 samples each:
    #   ("fog", 1): both members right on both            -> ensemble 1.0, members 1.0
    #   ("fog", 2): m0 right on 1 of 2, m1 right on both  -> members 0.75; mean probs right on both -> 1.0
    #   ("blur", 1): both wrong on sample 1               -> ensemble 0.5, members 0.5
    #   ("blur", 2): both wrong on both                   -> 0.0, 0.0
    t = torch.tensor([0, 1])
    right = _rows([0, 1], c=2, hi=0.9)
    half_wrong = _rows([0, 0], c=2, hi=0.6)  # wrong on sample 1 with 0.6, mean with 0.9-right stays right
    results = {
        ("fog", 1): (torch.stack([right, right]), t),
        ("fog", 2): (torch.stack([half_wrong, right]), t),
        ("blur", 1): (torch.stack([half_wrong, half_wrong]), t),
        ("blur", 2): (torch.stack([_rows([1, 0], c=2)] * 2), t),
    }
    r = ood_metrics(results)
    accs = {(s["corruption"], s["severity"]): (s["ensemble_acc"], s["member_acc_mean"]) for s in r["per_set"]}
    assert accs == {("fog", 1): (1.0, 1.0), ("fog", 2): (1.0, 0.75), ("blur", 1): (0.5, 0.5), ("blur", 2): (0.0, 0.0)}
    # Per severity, unweighted over corruptions: sev 1 -> (1 + 0.5) / 2; sev 2 -> (1 + 0) / 2.
    assert r["per_severity"] == {
        1: pytest.approx({"ensemble_acc": 0.75, "member_acc_mean": 0.75}),
        2: pytest.approx({"ensemble_acc": 0.5, "member_acc_mean": 0.375}),
    }
    assert r["per_corruption"]["fog"] == pytest.approx({"ensemble_acc": 1.0, "member_acc_mean": 0.875})
    assert r["mean"] == pytest.approx({"ensemble_acc": 0.625, "member_acc_mean": 0.5625})
    with pytest.raises(ValueError, match="non-empty"):
        ood_metrics({})
    with pytest.raises(ValueError, match="severity"):
        ood_metrics({"fog": results[("fog", 1)]})


def test_format_table():
    rows = [
        {"method": "de", "ensemble_acc": 0.95, "der": float("nan"), "epochs": 3},
        {"method": "sharpbalance", "ensemble_acc": 0.9612345, "member_acc": [0.9, 0.8]},
    ]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["method", "ensemble_acc", "der", "epochs", "member_acc"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert "0.9612" in lines[3] and "nan" in lines[2] and "[0.9000, 0.8000]" in lines[3]
    # Numbers right-aligned: both ensemble_acc values end in the same column.
    assert lines[2].index("0.9500") + 6 == lines[3].index("0.9612") + 6
    assert format_table(rows, columns=["method"], digits=2).splitlines()[2].strip() == "de"
    assert format_table([]) == ""


def test_a_non_finite_probability_names_its_member_and_sample():
    probs = PROBS.clone()
    probs[1, 2, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"probs contains NaN or inf: member 1, sample 2, class 0 is nan \(1 non-finite"
    ):
        ensemble_metrics(probs, TARGETS)
    probs[0, 3, 1] = float("inf")  # the first in member-major order is named
    with pytest.raises(ValueError, match=r"member 0, sample 3, class 1 is inf \(2 non-finite values in all\)"):
        ensemble_metrics(probs, TARGETS)
    with pytest.raises(ValueError, match=r"NaN or inf: sample 2, class 0 is nan"):
        expected_calibration_error(probs[1], TARGETS)
    with pytest.raises(ValueError, match=r"\('gauss', 3\): probs contains NaN or inf: member 0, sample 2"):
        ood_metrics({("gauss", 3): (probs[1:], TARGETS)})
