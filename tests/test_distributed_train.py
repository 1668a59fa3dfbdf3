"""The trainer under torch.distributed: 3 members on 1, 2 and 3 gloo ranks compute the same
scores, masks, parameters and metrics as one process (bit for bit in float64); data-parallel
members; rank 0 alone writes the run folder, its checkpoints hold every member and resume on
another number of ranks; a placement change that would change the numbers is refused.

Ranks are forked from the test process and rendezvous through a file (see test_distributed.py);
``train_ensemble`` finds their process group and uses it, as it would torchrun's.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sbfast.distributed import CollectiveError, init_distributed, place, shutdown
from sbfast.distributed.ensemble import check_resume_placement
from sbfast.train import TrainConfig, load_checkpoint, load_data, train_ensemble

pytestmark = pytest.mark.usefixtures("one_thread")

F64_DP_ATOL = 1e-10  # float64, data parallel (sam_grad_sync="all", no BatchNorm): the order of a few sums

BASE = dict(
    method="sharpbalance",
    dataset="synthetic",
    train_subset=48,
    test_subset=40,
    model_kwargs={"width": 4},
    members=3,
    dtype="float64",
    epochs=3,
    swap_epoch=1,
    batch_size=16,
    batching="exact",
    augment=True,
    eval_corruptions=(),
    sharpness_samples=16,
    progress=False,
    device="cpu",
    num_threads=1,
)


def _rank_main(rank, world, out, fn, args):
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", init_method=f"file://{out}/store", rank=rank, world_size=world, timeout_s=60)
    try:
        result = fn(ctx, *args)
    except (CollectiveError, ValueError) as e:
        result = {"error": f"{type(e).__name__}: {e}"}
    torch.save(result, out / f"rank{rank}.pt")
    shutdown(ctx)


def run_ranks(tmp_path: Path, world: int, fn, *args) -> list:
    out = tmp_path / f"job{time.monotonic_ns()}"
    out.mkdir()
    pc = mp.start_processes(_rank_main, args=(world, out, fn, args), nprocs=world, join=False, start_method="fork")
    while not pc.join(timeout=120):
        pass
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _summary(result, members: tuple[int, ...]) -> dict:
    return {
        "scores": result.scores,
        "masks": result.masks,
        "metrics": result.metrics,
        "fisher_mean": result.fisher_mean,
        "train_loss": [h["train_loss"] for h in result.history],
        "test_acc": [h["test_acc"] for h in result.history],
        "params": {
            j: [p.detach().clone() for p in m.state_dict().values()]
            for j, m in zip(members, result.models, strict=True)
        },
        "probs": result.probs,
    }


def _train_job(ctx, config):
    cfg = TrainConfig(**config)
    result = train_ensemble(cfg, data=load_data(cfg))
    return _summary(result, place(cfg.members, ctx.world_size, cfg.placement).members_of(ctx.rank))


def _one_process(config) -> dict:
    cfg = TrainConfig(**config)
    return _summary(train_ensemble(cfg, data=load_data(cfg)), tuple(range(cfg.members)))


def _merged_params(out: list[dict]) -> dict:
    params = {}
    for o in out:
        for j, ps in o["params"].items():
            if j in params:  # a data-parallel member: every rank of its group holds the same copy
                assert all(torch.equal(a, b) for a, b in zip(params[j], ps, strict=True)), f"member {j}'s copies differ"
            params[j] = ps
    return dict(sorted(params.items()))


@pytest.mark.parametrize("batching", ["exact", "static"])
def test_three_members_on_one_two_and_three_ranks_equal_one_process_bit_for_bit(tmp_path, batching):
    config = dict(BASE, batching=batching)
    ref = _one_process(config)
    assert ref["masks"] is not None and 0 < ref["masks"].double().mean() < 1
    for world in (1, 2, 3):
        out = run_ranks(tmp_path, world, _train_job, config)
        for r, o in enumerate(out):
            where = f"{world} rank(s), rank {r}"
            assert torch.equal(o["scores"], ref["scores"]), f"{where}: scores differ"
            assert torch.equal(o["masks"], ref["masks"]), f"{where}: masks differ"
            assert o["train_loss"] == ref["train_loss"], f"{where}: losses differ"
            assert o["test_acc"] == ref["test_acc"] and o["metrics"] == ref["metrics"], f"{where}: metrics differ"
            assert o["fisher_mean"] == ref["fisher_mean"], f"{where}: fisher_mean differs"
        assert torch.equal(out[0]["probs"], ref["probs"]) and all(o["probs"] is None for o in out[1:])
        params = _merged_params(out)
        assert sorted(params) == [0, 1, 2]
        for j in range(3):
            assert all(torch.equal(a, b) for a, b in zip(params[j], ref["params"][j], strict=True)), (
                f"{world} rank(s): member {j}'s parameters differ"
            )


def test_data_parallel_members_equal_one_process_to_rounding(tmp_path):
    # 2 members on 3 ranks: member 0 alone, member 1 over ranks 1-2; no BatchNorm (mlp) and the
    # perturbation's gradient averaged: one rank on the whole batch, to rounding
    config = dict(BASE, members=2, model="mlp", model_kwargs={"hidden": 8}, placement="0,1-2", sam_grad_sync="all")
    ref = _one_process(config)
    out = run_ranks(tmp_path, 3, _train_job, config)
    params = _merged_params(out)
    for j in range(2):
        err = max((a - b).abs().max().item() for a, b in zip(params[j], ref["params"][j], strict=True))
        assert err <= F64_DP_ATOL, f"member {j}: max |distributed - one process| = {err:.3g}"
    # member 1's scores come from two slices of the training set, scored on two ranks
    assert torch.allclose(out[0]["scores"].double(), ref["scores"].double(), rtol=1e-5, atol=0)
    assert all(torch.equal(o["masks"], out[0]["masks"]) and torch.equal(o["scores"], out[0]["scores"]) for o in out)
    assert out[0]["metrics"]["member_acc"] == pytest.approx(ref["metrics"]["member_acc"], abs=1 / 40 + 1e-12)


def _run_folder_job(ctx, config, snapshot):
    cfg = TrainConfig(**config)

    def on_epoch_end(epoch, record):
        # before epoch 2's checkpoint is written: the folder holds the checkpoint of epoch 1
        if epoch == 2 and ctx.rank == 0:
            shutil.copytree(cfg.output_dir, snapshot)

    result = train_ensemble(cfg, [on_epoch_end], data=load_data(cfg))
    return _summary(result, place(cfg.members, ctx.world_size, cfg.placement).members_of(ctx.rank))


def _lock_job(ctx, config):
    """Train ``config``, reading the folder's lock at every epoch's end on every rank."""
    from sbfast.train.checkpoint import LOCK_FILE, read_holder

    cfg = TrainConfig(**config)
    seen = []
    train_ensemble(cfg, [lambda e, r: seen.append(read_holder(Path(cfg.output_dir) / LOCK_FILE))], data=load_data(cfg))
    return {"pid": os.getpid(), "seen": seen}


def test_rank0_holds_the_folders_lock_and_a_held_folder_stops_every_rank(tmp_path):
    from sbfast.train.checkpoint import LOCK_FILE, RunLock

    folder = tmp_path / "run"
    config = dict(BASE, epochs=2, swap_epoch=0, eval_corruptions=(), sharpness_samples=0, output_dir=str(folder))
    out = run_ranks(tmp_path, 2, _lock_job, config)
    assert [h["pid"] for o in out for h in o["seen"]] == [out[0]["pid"]] * 4  # rank 0 holds it, every epoch
    assert not (folder / LOCK_FILE).exists()  # released at the end
    shutil.rmtree(folder)
    folder.mkdir()
    with RunLock(folder):  # another writer (this process) holds it: every rank stops with the same line
        out = run_ranks(tmp_path, 2, _lock_job, config)
    for o in out:
        assert (
            o["error"].startswith("RunFolderLocked: run folder")
            and f"in use by pid {os.getpid()} on host" in o["error"]
        )
    assert sorted(p.name for p in folder.iterdir()) == []  # nothing written


def _resume_job(ctx, folder, extra):
    result = train_ensemble(dict(extra), resume=folder)
    cfg = result.config
    return _summary(result, place(cfg.members, ctx.world_size, cfg.placement).members_of(ctx.rank))


def test_rank0_writes_one_run_folder_whose_checkpoints_resume_on_any_number_of_ranks(tmp_path):
    folder, snapshot = tmp_path / "run", tmp_path / "snapshot"
    config = dict(BASE, epochs=4, swap_epoch=1, output_dir=str(folder))
    out = run_ranks(tmp_path, 2, _run_folder_job, config, str(snapshot))
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoints",
        "config.json",
        "log.csv",
        "metrics.txt",
        "plot.png",
        "results.json",
    ]
    rows = [line.split(",")[:3] for line in (folder / "log.csv").read_text().strip().splitlines()[1:]]
    expected = [
        [str(e), p, w] for e, p in enumerate(["sam", "sam", "mixed", "mixed"]) for w in ["0", "1", "2", "ensemble"]
    ]
    assert rows == expected  # written once, by rank 0
    payload = load_checkpoint(folder / "checkpoints" / "last.pt")
    assert len(payload["members"]) == 3 and payload["placement"]["groups"] == [[0], [0], [1]]
    final = _merged_params(out)
    for j in range(3):  # the checkpoint holds what the ranks hold
        saved = list(payload["members"][j]["model"].values())
        assert all(torch.equal(a, b) for a, b in zip(saved, final[j], strict=True))
    # the snapshot stopped after epoch 1; continue it on 3 ranks, and in one process
    for world in (3, None):
        copy = tmp_path / f"resume-{world}"
        shutil.copytree(snapshot, copy)
        assert load_checkpoint(copy / "checkpoints" / "last.pt")["position"]["epoch"] == 2  # stopped after epoch 1
        if world is None:
            got = [_summary(train_ensemble({}, resume=str(copy)), tuple(range(3)))]
        else:
            got = run_ranks(tmp_path, world, _resume_job, str(copy), {})
        params = _merged_params(got)
        assert got[0]["train_loss"] == out[0]["train_loss"] and got[0]["metrics"] == out[0]["metrics"]
        for j in range(3):
            assert all(torch.equal(a, b) for a, b in zip(params[j], final[j], strict=True)), (
                f"resumed on {world or 1} rank(s): member {j} differs from the uninterrupted run"
            )


def test_a_data_parallel_checkpoint_refuses_a_resume_that_changes_the_numbers(tmp_path):
    folder = tmp_path / "run"
    config = dict(BASE, members=2, epochs=2, swap_epoch=0, method="de_sam", placement="0,1-2", output_dir=str(folder))
    run_ranks(tmp_path, 3, _train_job, config)
    payload = load_checkpoint(folder / "checkpoints" / "last.pt")
    assert payload["placement"]["groups"] == [[0], [1, 2]]
    out = run_ranks(tmp_path, 2, _resume_job, str(folder), {"placement": "auto", "epochs": 2})
    for o in out:
        assert o["error"].startswith(
            "ValueError: cannot resume: member 1 was trained on 2 rank(s) and would continue on 1"
        ), o
        assert "Resume on 3 rank(s) with placement '0,1-2'" in o["error"]


def test_resume_placement_rules():
    one = None
    two = {"world_size": 2, "groups": [[0], [0], [1]]}
    dp = {"world_size": 4, "groups": [[0, 1], [2, 3]]}
    assert check_resume_placement(one, None, 3, "local", False, True) is None
    assert check_resume_placement(two, place(3, 2), 3, "local", False, True) is None
    assert check_resume_placement(two, place(3, 3), 3, "local", False, True) == (
        "resuming on 3 rank(s) (placement 0,1,2) a run checkpointed on 2 (placement 0,0,1)"
    )
    assert check_resume_placement(two, None, 3, "local", False, True).startswith("resuming on 1 rank(s)")
    with pytest.raises(ValueError, match="member 0 was trained on 2 rank\\(s\\) and would continue on 1"):
        check_resume_placement(dp, place(2, 2), 2, "local", False, False)
    with pytest.raises(ValueError, match="member 0 was trained on 2"):
        check_resume_placement(dp, place(2, 2), 2, "all", False, True)  # BatchNorm per slice
    # the perturbation averaged and no (or synchronised) BatchNorm: only roundings change
    assert check_resume_placement(dp, place(2, 2), 2, "all", False, False) is not None
    assert check_resume_placement(dp, place(2, 2), 2, "all", True, True) is not None
    with pytest.raises(ValueError, match="places 3 members, the run has 2"):
        check_resume_placement(two, place(2, 2), 2, "all", True, True)


def test_config_fields_of_a_distributed_run():
    c = TrainConfig()
    assert (c.placement, c.sam_grad_sync, c.sync_batchnorm, c.dist_timeout) == ("auto", "local", False, 600.0)
    with pytest.raises(ValueError, match="placement '0,1' has 2 entries; expected one per member \\(3\\)"):
        TrainConfig(placement="0,1")
    with pytest.raises(ValueError, match="unknown sam_grad_sync 'sum'"):
        TrainConfig(sam_grad_sync="sum")
    with pytest.raises(ValueError, match="dist_timeout must be > 0"):
        TrainConfig(dist_timeout=0.0)
    with pytest.raises(TypeError, match="sync_batchnorm must be a bool"):
        TrainConfig(sync_batchnorm="yes")


def test_a_single_process_checkpoint_from_inside_an_epoch_resumes_on_ranks(tmp_path, monkeypatch):
    import os
    import signal

    import sbfast.train.steps as steps_mod
    from sbfast.train import RunInterrupted

    config = dict(BASE, epochs=4, swap_epoch=1)
    ref = _one_process(config)
    # one process, stopped by SIGINT in the first mixed epoch (2) after member 1's first step
    # (3 steps per member and epoch): member 0 has finished the epoch, member 1 is inside it
    calls = {"n": 0}
    original = steps_mod.mixed_step_exact

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    folder = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(steps_mod, "mixed_step_exact", step)
        with pytest.raises(RunInterrupted):
            train_ensemble(dict(config, output_dir=str(folder)))
    pos = load_checkpoint(folder / "checkpoints" / "last.pt")["position"]
    assert (pos["epoch"], pos["member"], pos["step"]) == (2, 1, 1)
    for world in (2, 3):
        copy = tmp_path / f"resume-{world}"
        shutil.copytree(folder, copy)
        out = run_ranks(tmp_path, world, _resume_job, str(copy), {})
        params = _merged_params(out)
        assert out[0]["train_loss"] == ref["train_loss"], f"{world} ranks: the epoch losses differ"
        for j in range(3):
            assert all(torch.equal(a, b) for a, b in zip(params[j], ref["params"][j], strict=True)), (
                f"{world} ranks: member {j} differs from the uninterrupted run"
            )


def test_torchrun_sbfast_train_writes_one_run_folder_and_reports_once(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "sbfast",
        "train",
        "--method",
        "sharpbalance",
        "--dataset",
        "synthetic",
        "--train-subset",
        "48",
        "--test-subset",
        "40",
        "--epochs",
        "3",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, f"run folders: {runs}"  # rank 1's own folder was not kept
    assert {p.name for p in runs[0].iterdir()} >= {"config.json", "log.csv", "checkpoints", "results.json"}
    out = proc.stdout
    assert out.count("placement: 3 members on 2 ranks (members): rank 0: members 0, 1 | rank 1: member 2") == 1
    assert out.count("sbfast train: sharpbalance on synthetic") == 1 and out.count("== sharpbalance") == 1


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_a_data_parallel_run_resumes_on_its_placement_bit_for_bit(tmp_path, backend):
    folder, snapshot = tmp_path / "run", tmp_path / "snapshot"
    config = dict(BASE, members=2, epochs=4, swap_epoch=1, placement="0,1-2", backend=backend, output_dir=str(folder))
    out = run_ranks(tmp_path, 3, _run_folder_job, config, str(snapshot))
    final = _merged_params(out)
    payload = load_checkpoint(folder / "checkpoints" / "last.pt")
    for j in range(2):
        assert all(torch.equal(a, b) for a, b in zip(payload["members"][j]["model"].values(), final[j], strict=True))
    got = run_ranks(tmp_path, 3, _resume_job, str(snapshot), {})
    params = _merged_params(got)
    assert got[0]["train_loss"] == out[0]["train_loss"] and got[0]["metrics"] == out[0]["metrics"]
    for j in range(2):
        assert all(torch.equal(a, b) for a, b in zip(params[j], final[j], strict=True)), f"member {j} differs"
