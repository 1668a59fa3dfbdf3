"""sbfast.train: the ensemble trainer, its config, its static batcher and its results; and its
parity with the plain twin sbfast.train.train_ensemble_reference.

Every run is tiny (synthetic 8x8 images, a width-4 CNN, 2 members, 3-4 epochs), so the whole
file stays within a few tens of seconds on a busy 2-core machine.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sbfast import reference
from sbfast import train as T
from sbfast.data import make_loader, make_synthetic_images

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> T.TrainConfig:
    base = dict(
        dataset="synthetic",
        members=2,
        epochs=3,
        train_subset=64,
        test_subset=32,
        batch_size=16,
        model_kwargs={"width": 4},
        sharpness_samples=16,
        progress=False,
        eval_corruptions=(),
    )
    base.update(kw)
    return T.TrainConfig(**base)


@pytest.fixture(scope="module")
def data() -> T.TrainData:
    return T.load_data(tiny())


def max_param_diff(a: T.EnsembleResult, b: T.EnsembleResult) -> float:
    d = 0.0
    for ma, mb in zip(a.models, b.models, strict=True):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            if sa[k].is_floating_point():
                d = max(d, float((sa[k].double() - sb[k].double()).abs().max()))
            else:
                assert torch.equal(sa[k], sb[k]), k  # BatchNorm's num_batches_tracked
    return d


# ------------------------------------------------------------------------------ configuration


def test_presets_fill_unset_fields():
    c = T.TrainConfig()
    assert (c.method, c.dataset, c.model, c.members) == ("sharpbalance", "digits", "cnn", 3)
    assert c.epochs == 40 and c.swap_epoch == 20 and c.rho == T.PRESETS["digits"]["rho"]
    assert c.augment and c.augment_pad == 1 and c.augment_flip is False  # no mirrored digits
    assert c.eval_corruptions == T.DEFAULT_CORRUPTIONS and "frost" not in c.eval_corruptions
    c = T.TrainConfig(dataset="cifar10", data_root="/nowhere")
    assert (c.model, c.epochs, c.swap_epoch, c.rho, c.batch_size, c.variant) == (
        "resnet18",
        200,
        100,
        0.2,
        128,
        "boost",
    )
    assert (c.augment_pad, c.augment_flip) == (4, True)
    assert T.TrainConfig(dataset="cifar100", data_root="/x").variant == "balance"
    # swap_epoch follows epochs when unset, and stays valid for sharpbalance
    assert T.TrainConfig(epochs=3).swap_epoch == 1
    assert T.TrainConfig(epochs=2).swap_epoch == 0
    # explicit values win over the preset
    assert T.TrainConfig(rho=0.3, batch_size=7).rho == 0.3


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(method="sgd"), "unknown method 'sgd'"),
        (dict(dataset="mnist"), "unknown dataset 'mnist'"),
        (dict(model="resnet50"), "unknown model 'resnet50'"),
        (dict(rho=-0.1), "rho must be a finite real number >= 0"),
        (dict(rho=float("nan")), "rho must be"),
        (dict(ratio=1.5), r"ratio must be a finite real number in \[0.0, 1.0\]"),
        (dict(ratio=-0.01), "ratio must be"),
        (dict(members=0), "members must be an int >= 1"),
        (dict(epochs=0), "epochs must be an int >= 1"),
        (dict(epochs=10, swap_epoch=10), "swap_epoch .* must be <= epochs - 2"),
        (dict(epochs=10, swap_epoch=9), "swap_epoch .* must be <= epochs - 2"),
        (dict(epochs=1), "swap_epoch .* must be <= epochs - 2"),
        (dict(variant="flat"), "unknown variant 'flat'"),
        (dict(lr_schedule="linear"), "unknown lr_schedule"),
        (dict(backend="cuda"), "unknown backend"),
        (dict(batching="random"), "unknown batching"),
        (dict(dtype="float16"), "unknown dtype"),
        (dict(batch_size=0), "batch_size must be an int >= 1"),
        (dict(lr=-1.0), "lr must be"),
        (dict(momentum=1.5), "momentum must be"),
        (dict(dataset="cifar10"), "needs data_root"),
        (dict(eval_corruptions=("gaussian_noise", "frosty")), "unknown corruptions"),
        (dict(eval_severities=(0, 1)), "eval_severities must be"),
        (dict(eval_severities=()), "eval_severities must be"),
        (dict(device="gpu0"), "not a torch device"),
        (dict(cuda_graphs=True, batching="exact"), "cuda_graphs needs batching='static'"),
        (dict(cuda_graphs=True, backend="reference"), "cuda_graphs needs"),
        (dict(seed=2**70), "seed must be <="),
        (dict(seed=2**63 - 1), "seed must be <="),
        (dict(cuda_graphs=True, device="cpu"), "cuda_graphs needs a CUDA device"),
        (dict(train_subset=0), "train_subset must be"),
        (dict(compile="tensorrt"), "compile must be a bool or a torch.compile backend"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        T.TrainConfig(**kw)


def test_config_type_errors_and_tolerated_values():
    with pytest.raises(TypeError, match="augment must be a bool"):
        T.TrainConfig(augment=1)
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        T.TrainConfig(model_kwargs=[("width", 4)])
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        T.TrainConfig.from_dict({"method": "de", "flat_ratio": 0.5})
    # swap_epoch is T_d of sharpbalance only: other methods accept any value >= 0
    assert T.TrainConfig(method="de", epochs=3, swap_epoch=7).swap_epoch == 7
    assert T.TrainConfig(ratio=0).ratio == 0 and T.TrainConfig(ratio=1).ratio == 1


def test_config_round_trip():
    c = tiny(method="de_sam", eval_corruptions=["contrast"], eval_severities=[2, 5])
    d = json.loads(json.dumps(c.to_dict()))
    assert T.TrainConfig.from_dict(d) == c
    assert c.phase_of(0) == "sam" and tiny(method="de").phase_of(2) == "sgd"
    sb = tiny(method="sharpbalance", epochs=4, swap_epoch=1)
    assert [sb.phase_of(e) for e in range(4)] == ["sam", "sam", "mixed", "mixed"]


def test_unavailable_device_is_an_error_before_training(data, tmp_path):
    # no machine has 100 GPUs; without CUDA the message says CUDA is missing, with it, too few
    cfg = tiny(device="cuda:99", output_dir=str(tmp_path / "never"))
    for trainer in (T.train_ensemble, T.train_ensemble_reference):
        with pytest.raises(ValueError, match="requested but CUDA"):
            trainer(cfg, data=data)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            T.train_ensemble(tiny(device="cuda"), data=data)
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------ static batching


@pytest.mark.parametrize(
    ("flag", "cause"),
    [
        ("lr", "the learning rate (lr 1e+30) is likely too large"),
        ("rho", "SAM's radius (rho 1e+30) is likely too large"),
    ],
)
def test_a_diverged_run_stops_after_its_first_epoch_naming_member_and_cause(flag, cause, tmp_path, capsys):
    # the report: --lr 1e30 logged nan from epoch 0 and failed only at scoring or at the end;
    # --rho 1e30 skipped every step while BatchNorm's running mean reached 2e27
    from sbfast.cli import main

    args = ["--dataset", "synthetic", "--epochs", "3", "--train-subset", "48", "--test-subset", "24"]
    args += ["--members", "2", "--width", "4", "--batch-size", "16", "--eval-corruptions", "--no-progress"]
    code = main(["train", *args, f"--{flag}", "1e30", "--output", str(tmp_path / "cli")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("sbfast: error: the run diverged in epoch 0: member 0 ") and cause in err[0], err
    assert not (tmp_path / "cli" / "checkpoints").exists()  # stopped before the epoch's checkpoint

    models, epochs = [], []

    class Watch(T.Callback):
        def on_train_start(self, config, ms):
            models.extend(ms)
            self.initial = [{k: v.clone() for k, v in m.state_dict().items() if "running" in k} for m in ms]

        def on_epoch_end(self, epoch, record):
            epochs.append(epoch)

    watch = Watch()
    with pytest.raises(T.RunDiverged, match=r"diverged in epoch 0: member 0 ") as e:
        T.train_ensemble(tiny(**{flag: 1e30}), [watch])
    assert (e.value.epoch, e.value.member, epochs) == (0, 0, [0])
    if flag == "rho":  # every step skipped: BatchNorm's statistics are as they began, not 2e27
        assert "skipped all 4 of its steps for non-finite gradients" in str(e.value)
        for m, start in zip(models, watch.initial, strict=True):
            for k, v in start.items():
                assert torch.equal(m.state_dict()[k], v), k
    else:
        assert "has training loss nan" in str(e.value) or "has training loss inf" in str(e.value)


def test_static_plan_by_hand():
    # 8 SAM + 8 normal in batches of 4: two of each per batch, four batches, no tail
    assert T.static_batch_plan(8, 8, 4) == T.StaticPlan(2, 2, 4, ())
    # 6 SAM + 10 normal, b = 4: target 1.5 SAM per batch; k = 1 and k = 2 both fill 3 full batches
    # (k=1: min(6, 10 // 3); k=2: min(3, 10 // 2)), equally close to 1.5 -> the smaller k; the
    # leftover 3 SAM + 1 normal is one tail batch
    assert T.static_batch_plan(6, 10, 4) == T.StaticPlan(1, 3, 3, ((3, 1),))
    # no normal samples (ratio 1 for that member): SAM-only batches, last one partial
    assert T.static_batch_plan(10, 0, 4) == T.StaticPlan(4, 0, 2, ((2, 0),))
    # fewer samples than a batch: one full batch of all of them
    assert T.static_batch_plan(2, 3, 16) == T.StaticPlan(2, 3, 1, ())
    with pytest.raises(ValueError, match="no samples"):
        T.static_batch_plan(0, 0, 4)
    with pytest.raises(ValueError, match="batch_size must be"):
        T.static_batch_plan(3, 3, 0)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 400), st.integers(0, 400), st.integers(1, 70))
def test_static_plan_invariants(n_sam, n_normal, b):
    if n_sam + n_normal == 0:
        return
    p = T.static_batch_plan(n_sam, n_normal, b)
    n = n_sam + n_normal
    assert p.batch_size == min(b, n)
    assert p.full_batches * p.n_sam + sum(s for s, _ in p.tail) == n_sam
    assert p.full_batches * p.n_normal + sum(k for _, k in p.tail) == n_normal
    assert all(s >= 0 and k >= 0 and 0 < s + k <= p.batch_size for s, k in p.tail)
    assert p.full_batches >= 1
    # the full batches carry the member's SAM share to within one sample (floor or ceil)
    assert abs(p.n_sam - p.batch_size * n_sam / n) < 1
    # and no other composition fills more full batches
    best = max(
        min(n_sam // k if k else n, n_normal // (p.batch_size - k) if p.batch_size - k else n, n // p.batch_size)
        for k in range(p.batch_size + 1)
    )
    assert p.full_batches == best


def test_static_batcher_fixed_shapes_and_exact_cover():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(301, generator=g) < 0.63
    sam_idx, nor_idx = torch.nonzero(mask).squeeze(1), torch.nonzero(~mask).squeeze(1)
    batcher = T.StaticBatcher(sam_idx, nor_idx, 32, torch.Generator().manual_seed(1))
    p = batcher.plan
    assert p.full_batches >= 8 and len(batcher) == p.full_batches + len(p.tail)
    orders = []
    for _ in range(3):
        seen = []
        batches = list(batcher.epoch())
        assert len(batches) == len(batcher)
        shapes = [(s.numel(), k.numel()) for s, k in batches]
        # the full batches all have one composition; the tail's batches come in among them
        assert sorted(shapes) == sorted([(p.n_sam, p.n_normal)] * p.full_batches + list(p.tail))
        for s, k in batches:
            assert bool(mask[s].all()) and not bool(mask[k].any())
            seen += s.tolist() + k.tolist()
        assert sorted(seen) == list(range(301))  # every sample exactly once per epoch
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled every epoch


def test_release_order_matches_the_shuffled_loader():
    ds = make_synthetic_images(23, 3)
    loader = make_loader(ds, 5, shuffle=True, seed=7)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):  # several epochs: the generator must be consumed as the sampler does
        expected = torch.cat([idx for idx, _, _ in loader])
        assert torch.equal(T.release_order(23, g), expected)


# ------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("method", ["de", "de_sam", "sharpbalance"])
def test_methods_run_end_to_end(method, backend, data):
    epochs_seen = []
    cfg = tiny(method=method, backend=backend, epochs=4, swap_epoch=1)
    r = T.train_ensemble(cfg, callbacks=[lambda e, rec: epochs_seen.append(e)], data=data)
    assert epochs_seen == [0, 1, 2, 3]
    assert [h["phase"] for h in r.history] == [cfg.phase_of(e) for e in range(4)]
    assert r.history[0]["lr"] == cfg.lr and r.history[3]["lr"] == pytest.approx(cfg.lr * 0.01)  # step schedule
    for h in r.history:
        assert len(h["train_loss"]) == 2 and all(math.isfinite(v) for v in h["train_loss"])
        assert len(h["test_acc"]) == 2 and 0 <= h["ensemble_test_acc"] <= 1 and h["time_s"] > 0
    m = r.metrics
    assert m["num_members"] == 2 and m["num_samples"] == 32 and len(r.fisher_mean) == 2
    assert r.probs.shape == (2, 32, 10) and len(r.models) == 2
    assert all(s > 0 for s in r.fisher_mean)
    # the learning is real: training loss falls from the first epoch to the last
    assert sum(r.history[-1]["train_loss"]) < sum(r.history[0]["train_loss"])
    if method == "sharpbalance":
        assert r.scores.shape == (2, 64) and r.scores.dtype == torch.float32
        assert r.masks.shape == (2, 64) and r.masks.dtype == torch.bool
    else:
        assert r.scores is None and r.masks is None


def test_scoring_happens_once_at_the_start_of_epoch_td_plus_1(data, monkeypatch):
    calls: list[tuple[str, int]] = []
    epoch_now = [-1]
    real = T.get_components

    def spying_components(backend):
        comp = real(backend)
        fisher = comp.fisher

        def counted(model, ds, **kw):
            calls.append(("fisher", epoch_now[0]))
            return fisher(model, ds, **kw)

        return dataclasses.replace(comp, fisher=counted)

    monkeypatch.setattr(T.trainer, "get_components", spying_components)

    class Spy(T.Callback):
        def on_epoch_start(self, epoch, phase):
            epoch_now[0] = epoch
            calls.append(("start", epoch))

        def on_scores(self, epoch, scores, masks):
            calls.append(("scores", epoch))
            self.scores, self.masks = scores, masks

        def on_epoch_end(self, epoch, record):
            calls.append(("end", epoch))

    spy = Spy()
    cfg = tiny(method="sharpbalance", members=3, epochs=5, swap_epoch=2, sharpness_samples=0, ratio=0.5)
    r = T.train_ensemble(cfg, callbacks=[spy], data=data)
    # every member scores exactly once, right after epoch T_d + 1 = 3 starts, before it trains
    assert [c for c in calls if c[0] != "start" and c[0] != "end"] == [("fisher", 3)] * 3 + [("scores", 3)]
    i = calls.index(("start", 3))
    assert calls[i + 1 : i + 5] == [("fisher", 3)] * 3 + [("scores", 3)] and calls[i + 5] == ("end", 3)
    assert [h["score_s"] is not None for h in r.history] == [False, False, False, True, False]
    # the masks are the selection of the shared scores, and every member's share is as section 4 says
    assert spy.scores.shape == (3, 64) and torch.equal(spy.masks, r.masks)
    assert torch.equal(r.masks, reference.select_sam_masks(r.scores, 0.5, "balance", [0, 1, 2]))
    k = 32  # floor(64 * 0.5) flattest per member
    flat = torch.zeros(3, 64, dtype=torch.bool)
    flat.scatter_(1, torch.argsort(r.scores, dim=1, stable=True)[:, :k], True)
    for i in range(3):
        others = flat[[j for j in range(3) if j != i]].any(0)
        assert bool(r.masks[i][others].all())  # flat for the others -> SAM for i
        assert int(r.masks[i].sum()) >= int(others.sum())


def test_static_batches_follow_each_members_sam_share(data):
    cfg = tiny(method="sharpbalance", epochs=3, swap_epoch=0, members=3)
    trainer = T.EnsembleTrainer(cfg, data)
    scores = torch.rand(3, 64, generator=torch.Generator().manual_seed(3))
    masks = reference.select_sam_masks(scores, 0.5, "balance")
    trainer.set_masks(masks)
    for j, m in enumerate(trainer.members):
        share = float(masks[j].double().mean())
        p = m.batcher.plan
        assert p.batch_size == 16 and abs(p.n_sam - 16 * share) <= 1
        assert p.full_batches * p.n_sam + sum(s for s, _ in p.tail) == int(masks[j].sum())
    with pytest.raises(ValueError, match="masks must be bool"):
        trainer.set_masks(masks[:2])


def test_phase_one_does_not_depend_on_batching(data):
    # static and exact batching differ only after selection: same masks, same phase-1 losses
    a = T.train_ensemble(tiny(method="sharpbalance", batching="static", epochs=4, swap_epoch=1), data=data)
    b = T.train_ensemble(tiny(method="sharpbalance", batching="exact", epochs=4, swap_epoch=1), data=data)
    assert [h["train_loss"] for h in a.history[:2]] == [h["train_loss"] for h in b.history[:2]]
    assert torch.equal(a.masks, b.masks)


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("method", ["de", "de_sam", "sharpbalance"])
def test_reference_components_match_the_plain_twin_bit_for_bit(method, data):
    # float64, augmentation on: the trainer's on-device batches and augmentation, its exact mixed
    # step and its schedule must reproduce the plain DataLoader loop exactly
    cfg = tiny(
        method=method,
        backend="reference",
        batching="exact",
        dtype="float64",
        epochs=4,
        swap_epoch=1,
        augment=True,
        augment_flip=True,
    )
    fast = T.train_ensemble(cfg, data=data)
    ref = T.train_ensemble_reference(cfg, data=data)
    assert max_param_diff(fast, ref) == 0.0
    assert ref.config.backend == "reference" and ref.config.batching == "exact"
    for hf, hr in zip(fast.history, ref.history, strict=True):
        assert hf["train_loss"] == pytest.approx(hr["train_loss"], rel=1e-12)
        assert hf["test_acc"] == hr["test_acc"]
    assert fast.metrics == ref.metrics and fast.fisher_mean == ref.fisher_mean
    if method == "sharpbalance":
        assert torch.equal(fast.scores, ref.scores) and torch.equal(fast.masks, ref.masks)


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("method", ["de", "de_sam", "sharpbalance"])
def test_fast_backend_matches_the_plain_twin(method, dtype, tol, data):
    # the fast components (fused SharpBalanceSAM, fast Fisher scores, fast selection) against
    # the plain loop, with the release's random batches. Measured: 0.0 in both dtypes (the
    # fused optimizer is bit-exact).
    cfg = tiny(method=method, backend="fast", batching="exact", dtype=dtype, epochs=4, swap_epoch=1)
    fast = T.train_ensemble(cfg, data=data)
    ref = T.train_ensemble_reference(cfg, data=data)
    assert fast.components["optimizer"] == "sbfast.optim.SharpBalanceSAM"
    assert fast.components["fisher"] == "sbfast.sharpness.fisher_scores"
    assert fast.components["select"] == "sbfast.select.select_sam_masks"
    assert ref.components["optimizer"].startswith(("reference.SAM", "torch.optim.SGD"))
    assert ref.components["fisher"] == "reference.fisher_scores"
    assert max_param_diff(fast, ref) <= tol
    if method == "sharpbalance":
        torch.testing.assert_close(fast.scores, ref.scores, rtol=1e-5 if dtype == "float32" else 1e-12, atol=0)
        assert torch.equal(fast.masks, ref.masks)


# ------------------------------------------------------------------------------ results


@pytest.fixture(scope="module")
def sb_result(data) -> T.EnsembleResult:
    return T.train_ensemble(
        tiny(method="sharpbalance", members=3, eval_corruptions=("contrast", "gaussian_noise"), eval_severities=(1, 3)),
        data=data,
    )


def test_result_metrics_and_ood(sb_result):
    r = sb_result
    m = r.metrics
    assert len(m["member_acc"]) == 3 and len(m["disagreement"]) == 3
    assert 0 <= m["ensemble_acc"] <= 1 and m["ensemble_nll"] > 0
    assert r.ood is not None and len(r.ood["per_set"]) == 4 and set(r.ood["per_severity"]) == {1, 3}
    s = r.summary()
    assert s["method"] == "sharpbalance" and s["ood_acc"] == r.ood["mean"]["ensemble_acc"]
    assert s["ensemble_acc"] == m["ensemble_acc"] and s["der"] == m["der"] and s["wall_s"] > 0


def test_result_json_round_trip(sb_result, tmp_path):
    path = tmp_path / "r.json"
    text = sb_result.to_json(path)
    back = T.EnsembleResult.from_json(path)
    assert back.to_json() == text
    assert back.config == sb_result.config
    assert torch.equal(back.masks, sb_result.masks) and torch.equal(back.scores, sb_result.scores)
    assert back.ood["per_severity"].keys() == sb_result.ood["per_severity"].keys()
    assert back.history == json.loads(text)["history"]
    assert T.EnsembleResult.from_json(text).metrics == back.metrics  # the text itself works too


def test_result_save_writes_json_table_and_png(sb_result, tmp_path):
    paths = sb_result.save(tmp_path / "out")
    assert json.loads(paths["json"].read_text())["config"]["method"] == "sharpbalance"
    table = paths["table"].read_text()
    assert "ensemble_acc" in table and "sam_share" in table and "OOD accuracy per severity" in table
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].stat().st_size > 10_000


def test_output_dir_saves_automatically(data, tmp_path):
    T.train_ensemble(tiny(method="de", epochs=2, output_dir=str(tmp_path / "de")), data=data)
    assert (tmp_path / "de" / "results.json").is_file() and (tmp_path / "de" / "plot.png").is_file()


# ------------------------------------------------------------------------------ devices


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("method", ["de", "sharpbalance"])
def test_cuda_twin_and_graphs(method, data, monkeypatch):
    # the same run on CUDA, eager and with CUDA graphs: the graphs replay the very same kernels.
    # cuDNN may pick different convolution algorithms per call unless told not to; with the
    # determinism flags both runs use the same ones, and the remaining 1e-5 covers the float32
    # atomics of cuBLAS/cuDNN reductions that graphs do not reorder but a fresh autotune may.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = tiny(method=method, device="cuda", batching="static", epochs=4, swap_epoch=1, train_subset=64)
    eager = T.train_ensemble(cfg, data=data)
    graphed = T.train_ensemble(cfg.replace(cuda_graphs=True), data=data)
    assert int(graphed.components["cuda_graph_captures"]) >= 1
    assert max_param_diff(eager, graphed) <= 1e-5
    assert eager.metrics["ensemble_acc"] > 0.1


@pytest.mark.parametrize("backend, tol", [("eager", 0.0), ("aot_eager", 1e-5)])
def test_compiled_model_trains_like_eager(backend, tol, data, monkeypatch):
    # torch.compile's tracing of the training forward/backward (static shapes: the full batches,
    # the tails and the last partial batch of phase 1 each compile once); inductor itself is
    # too slow to compile in a unit test on CPU (~70 s for the digits CNN)
    import torch._dynamo

    # The run's device is the GPU where there is one. cuDNN's default convolution-backward
    # algorithms may add with atomics, so two eager runs can differ in the last bits there; the
    # "eager" backend's tolerance of 0 holds only with deterministic algorithms (no effect on CPU).
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch._dynamo.reset()
    cfg = tiny(method="sharpbalance", epochs=3, swap_epoch=0, members=1, sharpness_samples=0)
    eager = T.train_ensemble(cfg, data=data)
    compiled = T.train_ensemble(cfg.replace(compile=backend), data=data)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert max_param_diff(eager, compiled) <= tol
    for hc, he in zip(compiled.history, eager.history, strict=True):
        assert hc["train_loss"] == pytest.approx(he["train_loss"], abs=1e-5)
