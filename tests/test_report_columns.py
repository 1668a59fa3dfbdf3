"""The diversity columns of ``sbfast compare`` and ``sbfast eval`` (KL, CKA of the logits, mean
disagreement), the rename of the mean Fisher score (``sharpness`` -> ``fisher_mean``) with old
files still read, and the sharpness-diversity figure's axes.

The columns must be sbfast.measure's functions of the evaluation's own test probabilities and
logits, and those a plain twin written from their definitions."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sbfast import measure
from sbfast import train as T
from sbfast.train.compare import Comparison, upgrade_record
from sbfast.train.evaluate import diversity_measures, predict_outputs, predict_probs
from sbfast.train.plots import DIVERSITY_AXES, sharpness_axis

pytestmark = pytest.mark.usefixtures("one_thread")


def _probs_logits(m: int, n: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, n, c, generator=g) * 2
    return torch.softmax(logits, -1), logits


def _plain_mean_symmetric_kl(p: torch.Tensor) -> float:
    """(1/(M(M-1))) sum_{i != j} (KL(p_i||p_j) + KL(p_j||p_i)) / 2, KL averaged over samples."""
    p = p.double()
    m, n, _ = p.shape
    total = 0.0
    for i in range(m):
        for j in range(m):
            if i != j:
                kl_ij = float((p[i] * (p[i].log() - p[j].log())).sum()) / n
                kl_ji = float((p[j] * (p[j].log() - p[i].log())).sum()) / n
                total += (kl_ij + kl_ji) / 2
    return total / (m * (m - 1))


def _plain_unbiased_linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA with the unbiased HSIC estimator of Song et al. (2012), from the Gram matrices."""

    def hsic(k: torch.Tensor, l_: torch.Tensor) -> float:
        n = k.shape[0]
        k, l_ = k.clone(), l_.clone()
        k.fill_diagonal_(0)
        l_.fill_diagonal_(0)
        one = torch.ones(n, dtype=k.dtype)
        t1 = float((k * l_).sum())
        t2 = float(one @ k @ one) * float(one @ l_ @ one) / ((n - 1) * (n - 2))
        t3 = 2 * float(one @ k @ l_ @ one) / (n - 2)
        return (t1 + t2 - t3) / (n * (n - 3))

    x, y = x.double(), y.double()
    kx, ky = x @ x.T, y @ y.T
    return hsic(kx, ky) / math.sqrt(hsic(kx, kx) * hsic(ky, ky))


@pytest.mark.parametrize(("m", "n", "c"), [(2, 7, 3), (3, 129, 10), (4, 33, 1)])
def test_diversity_columns_are_the_measures_of_the_same_probabilities(m, n, c):
    probs, logits = _probs_logits(m, n, c, seed=m + n)
    d = diversity_measures(probs, logits)
    kl = measure.symmetric_kl_divergence(probs)
    cka = measure.cka_matrix([x.double() for x in logits], kernel="linear", debiased=True)
    off = ~torch.eye(m, dtype=torch.bool)
    assert d["kl"] == float(kl[off].mean()) or d["kl"] == pytest.approx(float(kl[off].mean()), rel=1e-14)
    assert d["kl_matrix"] == kl.tolist() and d["cka_matrix"] == cka.tolist()
    assert d["cka"] == pytest.approx(float(cka[off].mean()), rel=1e-14, abs=1e-15)
    # and the plain twins of the definitions (float64; C = 1 is one class: KL 0, logits constant)
    assert d["kl"] == pytest.approx(_plain_mean_symmetric_kl(probs), rel=1e-9, abs=1e-12)
    if c > 1:
        pairs = [_plain_unbiased_linear_cka(logits[i], logits[j]) for i in range(m) for j in range(m) if i != j]
        assert d["cka"] == pytest.approx(sum(pairs) / len(pairs), rel=1e-9, abs=1e-12)


def test_identical_members_are_not_diverse():
    probs, logits = _probs_logits(1, 50, 5)
    d = diversity_measures(probs.expand(3, -1, -1), logits.expand(3, -1, -1))
    assert d["kl"] == pytest.approx(0.0, abs=1e-12) and d["cka"] == pytest.approx(1.0, abs=1e-12)


def test_one_member_has_no_diversity():
    probs, logits = _probs_logits(1, 20, 4)
    assert diversity_measures(probs, logits) == {"kl": None, "cka": None, "kl_matrix": None, "cka_matrix": None}
    d = diversity_measures(*_probs_logits(2, 3, 4))  # 3 samples: no unbiased HSIC, KL still defined
    assert d["cka"] is None and d["kl"] is not None


def test_logits_come_from_the_same_pass_as_the_probabilities():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4)) for _ in range(3)]
    x = torch.randn(37, 6)
    calls = [0]

    def batches():
        calls[0] += 1
        return iter(x.split(10))

    probs, logits = predict_outputs(models, batches, torch.float32)
    assert calls[0] == 3  # one pass per member
    assert torch.equal(probs, predict_probs(models, batches, torch.float32))  # bit for bit
    with torch.no_grad():
        want = torch.stack([mod(x) for mod in models])
    torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-6)


def _tiny(**kw):
    base = dict(
        dataset="synthetic",
        method="de",
        members=2,
        epochs=1,
        train_subset=48,
        test_subset=40,
        batch_size=16,
        model_kwargs={"width": 2},
        sharpness_samples=8,
        progress=False,
        eval_corruptions=(),
    )
    base.update(kw)
    return T.TrainConfig(**base)


def test_a_run_reports_the_columns_of_its_own_test_probabilities(tmp_path):
    res = T.train_ensemble(_tiny(output_dir=str(tmp_path / "run")))
    want = diversity_measures(res.probs, None)
    assert res.diversity["kl"] == want["kl"] and res.diversity["cka"] is not None
    row = res.summary()
    assert row["kl"] == res.diversity["kl"] and row["cka"] == res.diversity["cka"]
    assert row["disagreement"] == res.metrics["mean_disagreement"]
    assert row["fisher_mean"] == sum(res.fisher_mean) / 2 and "sharpness" not in row
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "sharpness" not in saved and saved["fisher_mean"] == res.fisher_mean
    assert saved["diversity"]["kl"] == res.diversity["kl"]
    again = T.evaluate_run(tmp_path / "run")
    assert again["diversity"] == saved["diversity"] and again["fisher_mean"] == saved["fisher_mean"]
    assert "fisher_mean" in res.table() and "sharpness" not in res.table().split("\n")[0].split()


def test_an_old_results_file_loads_its_sharpness_as_the_fisher_mean(tmp_path):
    res = T.train_ensemble(_tiny(output_dir=str(tmp_path / "run")))
    d = json.loads(res.to_json())
    d["sharpness"] = d.pop("fisher_mean")  # what results.json held before the rename
    del d["diversity"]  # ... and before the diversity columns
    old = T.EnsembleResult.from_dict(d)
    assert old.fisher_mean == res.fisher_mean and old.diversity is None
    row = old.summary()
    assert row["fisher_mean"] == res.summary()["fisher_mean"] and math.isnan(row["kl"]) and math.isnan(row["cka"])
    assert "-" in old.table()  # the missing diversity shows as undefined, not as an error


def _old_record(method: str, seed: int, fisher: float, der: float) -> dict:
    """A run record as comparison.json held it before the rename (no kl, cka, disagreement)."""
    return {
        "method": method,
        "seed": seed,
        "metrics": {"member_acc": 0.9, "ensemble_acc": 0.93, "der": der, "eir": 0.2, "sharpness": fisher},
        "member_acc": [0.9, 0.9],
        "member_sharpness": [fisher, fisher],
        "curve": {"epoch": [0, 1], "ensemble_acc": [0.5, 0.93], "member_acc": [0.4, 0.9]},
        "ood_per_severity": {"1": 0.8},
        "swap_epoch": None,
        "epochs": 2,
        "dataset": "digits",
        "members": 2,
        "n_test": 360,
    }


def test_an_old_comparison_file_loads_reports_and_draws(tmp_path):
    old = {
        "methods": ["de", "sharpbalance"],
        "seeds": [0, 1],
        "config": {"dataset": "digits"},
        "runs": [_old_record("de", 0, 0.3, 1.0), _old_record("de", 1, 0.5, 1.2)]
        + [_old_record("sharpbalance", 0, 0.2, 1.3), _old_record("sharpbalance", 1, 0.3, 1.1)],
    }
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(old))
    comp = Comparison.from_json(path)
    agg = {a["method"]: a for a in comp.aggregate()}
    assert agg["de"]["fisher_mean_mean"] == pytest.approx(0.4, abs=1e-15)
    assert agg["sharpbalance"]["fisher_mean_mean"] == pytest.approx(0.25, abs=1e-15)
    assert agg["de"]["kl_mean"] is None  # not measured then: undefined, not 0
    assert comp.runs[0]["member_fisher_mean"] == [0.3, 0.3] and "member_sharpness" not in comp.runs[0]
    p = {(r["pair"], r["metric"]): r for r in comp.paired()}
    assert p[("sharpbalance - de", "fisher_mean")]["mean_diff"] == pytest.approx(-0.15, abs=1e-15)
    # no row named after the old key ("worst_case_sharpness" is the paper's measure, another row)
    assert "fisher_mean" in comp.report() and all(
        ln.split()[0] != "sharpness" for ln in comp.table().splitlines() if ln.strip()
    )
    assert sharpness_axis(comp.runs)[0] == "fisher_mean"
    paths = comp.save(tmp_path / "again")
    assert paths["sharpness_diversity"].read_bytes()[:4] == b"\x89PNG"
    assert "sharpness" not in json.loads(paths["json"].read_text())["runs"][0]["metrics"]


def test_upgrade_leaves_a_new_record_alone():
    r = {"metrics": {"fisher_mean": 0.1, "sharpness": 0.7}, "member_fisher_mean": [0.1]}
    assert upgrade_record(r) == r  # a paper's sharpness beside the Fisher mean is not renamed


def test_the_figure_uses_the_papers_sharpness_when_present_and_the_chosen_diversity(tmp_path):
    runs = [_old_record("de", 0, 0.3, 1.0), _old_record("de", 1, 0.5, 1.2)]
    runs = [upgrade_record(r) for r in runs]
    for r, kl in zip(runs, (0.01, 0.02), strict=True):
        r["metrics"].update(kl=kl, cka=0.9, disagreement=0.03)
    assert sharpness_axis(runs)[0] == "fisher_mean" and "not the paper's" in sharpness_axis(runs)[1]
    runs[0]["metrics"]["sharpness"] = 2.5
    assert sharpness_axis(runs)[0] == "sharpness"
    comp = Comparison(methods=["de"], seeds=[0, 1], runs=runs)
    for div in DIVERSITY_AXES:
        p = T.plot_sharpness_diversity(comp, tmp_path / f"{div}.png", div)
        assert p.stat().st_size > 10_000
    with pytest.raises(ValueError, match="diversity must be one of"):
        T.plot_sharpness_diversity(comp, tmp_path / "x.png", "variance")


def test_run_comparison_refuses_an_unknown_diversity_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="diversity must be one of"):
        T.run_comparison(_tiny(), ["de"], [0], tmp_path / "c", diversity="entropy")
    assert not (tmp_path / "c").exists()


def test_compare_takes_a_diversity_axis_and_refuses_others():
    from sbfast.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["compare", "--quick"]).diversity == "der"
    for div in DIVERSITY_AXES:
        assert parser.parse_args(["compare", "--diversity", div]).diversity == div
    # the CLI's parser raises its own one-line error (exit 2 in main) instead of argparse's exit
    with pytest.raises(Exception, match="--diversity: invalid choice: 'variance'"):
        parser.parse_args(["compare", "--diversity", "variance"])


def test_a_run_reports_each_members_worst_case_sharpness_as_the_measure_gives_it(tmp_path):
    """The worst_case_sharpness column is sbfast.measure.worst_case_sharpness of each member on the
    fixed batches of 5 training samples (seed WORST_CASE_SUBSET_SEED), at the config's settings;
    evaluate_run gives the same numbers; worst_case_batches=0 leaves it out."""
    from sbfast.measure import worst_case_sharpness
    from sbfast.train.config import WORST_CASE_SUBSET_SEED
    from sbfast.train.data import load_data

    cfg = _tiny(output_dir=str(tmp_path / "run"), worst_case_batches=3, worst_case_iters=4, worst_case_rho=0.3)
    res = T.train_ensemble(cfg)
    train = load_data(res.config).train
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(WORST_CASE_SUBSET_SEED))
    _, x, y = train[perm[:15]]
    batches = [(x[i : i + 5], y[i : i + 5]) for i in range(0, 15, 5)]
    want = [worst_case_sharpness(m, batches, rho=0.3, n_iters=4).value for m in res.models]
    assert res.worst_case_sharpness == want and all(v > 0 for v in want)
    assert res.summary()["worst_case_sharpness"] == pytest.approx(sum(want) / 2, rel=1e-15)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["worst_case_sharpness"] == want
    assert T.evaluate_run(tmp_path / "run")["worst_case_sharpness"] == want
    none = T.train_ensemble(_tiny(worst_case_batches=0))
    assert none.worst_case_sharpness == [] and math.isnan(none.summary()["worst_case_sharpness"])
