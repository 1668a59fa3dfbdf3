"""sbfast.distributed: placement rules, the score/mask/probability exchanges, data parallel inside
a member (both SAM perturbation options, synchronised BatchNorm), and a killed rank.

Ranks are real processes joined by gloo. They are forked from the test process (not spawned):
a spawned rank imports torch and sbfast again, ~10 s each on the shared 2-core machine, a fork
~0.1 s. Each rank runs with one intra-op thread, rendezvouses through a file in tmp_path (no
port to collide with), and writes its result for the test to read. One test starts a real
``torchrun --standalone`` (env:// rendezvous on a port torchrun picks itself).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from sbfast import reference
from sbfast.distributed import (
    CollectiveError,
    DataParallelOptimizer,
    broadcast_buffers,
    convert_sync_batchnorm,
    dp_mixed_step,
    dp_sam_step,
    dp_sgd_step,
    exchange_scores,
    gather_probs,
    has_collective_forward,
    init_distributed,
    launch_env,
    place,
    row_pieces,
    select_on_rank0,
    shard,
    shutdown,
    traffic,
)
from sbfast.models import create_model
from sbfast.optim import SharpBalanceSAM
from sbfast.select import select_sam_masks
from sbfast.train.steps import mixed_step_static, sam_step, sgd_step

F64_ATOL = 1e-10  # float64: data parallel vs one rank differ only in the order of a few sums

pytestmark = pytest.mark.usefixtures("one_thread")


# -- running ranks ---------------------------------------------------------------------------


def _rank_main(rank, world, out, timeout_s, fn, args):
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", init_method=f"file://{out}/store", rank=rank, world_size=world, timeout_s=timeout_s)
    try:
        result = fn(ctx, *args)
    except CollectiveError as e:
        (out / f"rank{rank}.err").write_text(str(e))
        os._exit(3)  # what a run does: the error is printed and the process ends
    torch.save(result, out / f"rank{rank}.pt")
    shutdown(ctx)


def run_ranks(tmp_path: Path, world: int, fn, *args, timeout_s: float = 30.0) -> list:
    """Run ``fn(ctx, *args)`` on ``world`` forked ranks; their return values, by rank."""
    out = tmp_path / f"job{time.monotonic_ns()}"
    out.mkdir()
    pc = mp.start_processes(
        _rank_main, args=(world, out, timeout_s, fn, args), nprocs=world, join=False, start_method="fork"
    )
    while not pc.join(timeout=60):
        pass
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# -- placement (pure) --------------------------------------------------------------------------


@pytest.mark.parametrize("members", [1, 2, 3, 7])
def test_auto_placement_up_to_m_ranks_places_whole_members_in_balanced_blocks(members):
    for world in range(1, members + 1):
        p = place(members, world)
        owned = [p.members_of(r) for r in range(world)]
        assert sorted(j for js in owned for j in js) == list(range(members))  # each member exactly once
        sizes = [len(js) for js in owned]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # balanced, larger first
        for js in owned:
            assert list(js) == list(range(js[0], js[-1] + 1))  # contiguous
        assert all(len(p.ranks_of(j)) == 1 for j in range(members))
        assert p.mode == "members"


def test_three_members_on_two_ranks():
    p = place(3, 2)
    assert (p.members_of(0), p.members_of(1)) == ((0, 1), (2,))
    assert p.describe() == "placement: 3 members on 2 ranks (members): rank 0: members 0, 1 | rank 1: member 2"
    assert p.spec() == "0,0,1"


@pytest.mark.parametrize(("members", "world"), [(1, 2), (2, 4), (3, 6), (2, 6)])
def test_more_ranks_than_members_spreads_each_member_over_a_group(members, world):
    p = place(members, world)
    g = world // members
    assert p.mode == "data-parallel"
    for j in range(members):
        assert p.ranks_of(j) == tuple(range(j * g, (j + 1) * g))
        assert p.leader(j) == j * g and p.data_parallel(j)
    for r in range(world):
        assert len(p.members_of(r)) == 1
    assert "\n" not in p.describe() and "data parallel" in p.describe()


@pytest.mark.parametrize(("members", "world"), [(3, 4), (3, 5), (2, 3), (4, 6)])
def test_a_world_that_is_not_a_multiple_of_m_is_refused_saying_what_is_allowed(members, world):
    with pytest.raises(ValueError, match=rf"cannot spread {members} members evenly over {world} ranks") as e:
        place(members, world)
    assert f"1..{members} ranks" in str(e.value) and f"multiple of {members}" in str(e.value)


def test_named_modes_and_their_limits():
    assert place(3, 3, "data-parallel").groups == ((0,), (1,), (2,))
    assert place(2, 2, "members").groups == ((0,), (1,))
    with pytest.raises(ValueError, match="needs at most 2 ranks"):
        place(2, 4, "members")
    with pytest.raises(ValueError, match="cannot spread 3 members"):
        place(3, 2, "data-parallel")
    with pytest.raises(ValueError, match="unknown placement 'ring'"):
        place(3, 2, "ring")
    with pytest.raises(TypeError, match="placement must be a string"):
        place(3, 2, 3)  # type: ignore[arg-type]
    for bad in [(0, 1), (1, 0), (True, 1), (2.0, 1)]:
        with pytest.raises(ValueError, match="must be an int >= 1"):
            place(*bad)  # type: ignore[arg-type]


def test_explicit_placements():
    p = place(3, 2, "0,0,1")
    assert p.groups == ((0,), (0,), (1,)) and p.mode == "explicit"
    p = place(3, 2, " 1 , 0,0 ")
    assert p.members_of(0) == (1, 2) and p.members_of(1) == (0,)
    p = place(2, 3, "0,1-2")
    assert p.groups == ((0,), (1, 2)) and p.led_by(1) == (1,) and p.led_by(2) == ()
    assert place(2, 3, p.spec()) == p
    cases = {
        "0,1": "has 2 entries; expected one per member \\(3\\)",
        "0,0,0": "leaves rank 1 without a member",
        "0,a,1": "entry 1 \\('a'\\) is not a rank",
        "0,2,1": "names rank 2, but the world has ranks 0..1",
        "1-0,0,1": "empty range",
        "0-1,1,0": "rank 0 shares a member \\(data parallel\\) and holds another",
    }
    for spec, msg in cases.items():
        with pytest.raises(ValueError, match=msg):
            place(3, 2, spec)


def test_placement_queries_check_their_arguments():
    p = place(3, 2)
    with pytest.raises(ValueError, match="rank 2 out of range"):
        p.members_of(2)
    with pytest.raises(ValueError, match="member 3 out of range"):
        p.ranks_of(3)


@pytest.mark.parametrize("n", [0, 1, 7, 129])
@pytest.mark.parametrize(
    ("members", "world", "spec"), [(3, 2, "auto"), (2, 4, "auto"), (2, 3, "0,1-2"), (1, 3, "auto")]
)
def test_row_pieces_cover_every_row_of_every_member_once(n, members, world, spec):
    p = place(members, world, spec)
    seen = torch.zeros(members, n, dtype=torch.int64)
    for r, pieces in enumerate(row_pieces(p, n)):
        for j, s, e in pieces:
            assert r in p.ranks_of(j)
            seen[j, s:e] += 1
    assert bool((seen == 1).all())
    for r, pieces in enumerate(row_pieces(p, n, split=False)):
        assert [j for j, _, _ in pieces] == list(p.led_by(r))


# -- launch (no process group) -----------------------------------------------------------------


def test_launch_env_reads_torchrun_variables():
    assert launch_env({}) is None
    env = {
        "RANK": "1",
        "WORLD_SIZE": "3",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "3",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    e = launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_port) == (1, 3, 1, 29500)
    with pytest.raises(ValueError, match="WORLD_SIZE is missing"):
        launch_env({"RANK": "0"})
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        launch_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="expected 0 <= RANK < WORLD_SIZE"):
        launch_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_without_a_launcher_init_is_a_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed("cpu") is None
    shutdown(None)
    with pytest.raises(ValueError, match="timeout_s must be a number > 0"):
        init_distributed("cpu", timeout_s=0)
    with pytest.raises(ValueError, match="give rank and world_size together"):
        init_distributed("cpu", rank=0)


# -- exchanges -----------------------------------------------------------------------------------


def _scores(m: int, n: int) -> torch.Tensor:
    s = torch.rand(m, n, generator=torch.Generator().manual_seed(3))
    s[:, ::5] = 0.5  # ties: the selection breaks them by index, on rank 0 as anywhere
    return s


def _exchange_job(ctx, members, spec, n, classes):
    p = place(members, ctx.world_size, spec)
    full = _scores(members, n)
    traffic.reset()
    local = [full[j, s:e].clone() for j, s, e in row_pieces(p, n)[ctx.rank]]
    scores = exchange_scores(ctx, p, local, n)
    masks = select_on_rank0(ctx, scores, select_sam_masks, 0.5, "balance")
    probs_full = torch.softmax(torch.randn(members, 5, classes, generator=torch.Generator().manual_seed(4)), -1)
    probs = gather_probs(ctx, p, {j: probs_full[j] for j in p.led_by(ctx.rank)}, 5, classes)
    try:  # rank 0's selection fails: it raises its own error, the others are told at once
        select_on_rank0(ctx, scores, select_sam_masks, 2.0, "balance")
        failure = None
    except Exception as e:
        failure = (type(e).__name__, str(e))
    return {"scores": scores, "masks": masks, "probs": probs, "failure": failure, "traffic": traffic.snapshot()}


@pytest.mark.parametrize(("members", "world", "spec"), [(3, 2, "auto"), (2, 3, "0,1-2")], ids=["3m-on-2", "dp-0,1-2"])
def test_score_exchange_and_rank0_selection_equal_the_local_ones(tmp_path, members, world, spec):
    n, classes = 37, 4
    out = run_ranks(tmp_path, world, _exchange_job, members, spec, n, classes)
    full = _scores(members, n)
    expected = select_sam_masks(full, 0.5, "balance")
    probs_full = torch.softmax(torch.randn(members, 5, classes, generator=torch.Generator().manual_seed(4)), -1)
    for r, o in enumerate(out):
        assert torch.equal(o["scores"], full), f"rank {r}'s scores differ"
        assert o["masks"].dtype == torch.bool and torch.equal(o["masks"], expected), f"rank {r}'s masks differ"
        if r == 0:
            assert torch.equal(o["probs"], probs_full)
            assert o["failure"][0] == "ValueError" and "ratio" in o["failure"][1]
        else:
            assert o["probs"] is None
            assert o["failure"] == (
                "CollectiveError",
                f"rank {r}/{world}: the selection failed on rank 0 (its error says why)",
            )
    longest = max(sum(e - s for _, s, e in pieces) for pieces in row_pieces(place(members, world, spec), n))
    assert out[0]["traffic"]["the score exchange"] == {"calls": 1, "bytes": 4 * longest}


# -- data parallel inside a member ------------------------------------------------------------

LR, MOMENTUM, WD, RHO = 0.1, 0.9, 5e-4, 0.2
# (kind, k_n, k_s): the batch is k_n normal samples then k_s SAM samples; odd counts give the two
# ranks slices of different sizes, k_s = 1 leaves rank 1's SAM slice empty
PLAN = [("sgd", 9, 0), ("sam", 0, 9), ("mixed", 4, 5), ("mixed", 6, 1), ("mixed", 3, 0), ("mixed", 0, 7), ("sam", 0, 8)]


def _mlp() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model("mlp", 3, in_channels=1, image_size=4, hidden=6, depth=2).double()


def _cnn() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model("cnn", 3, in_channels=1, width=2).double()


def _batches(image: int = 4) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _, k_n, k_s in PLAN:
        x = torch.randn(k_n + k_s, 1, image, image, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (k_n + k_s,), generator=g)
        out.append((x[:k_n], y[:k_n], x[k_n:], y[k_n:]))
    return out


def _dp_train(ctx, model, opt, batches, collective):
    k, g = ctx.rank, ctx.world_size
    for (kind, k_n, k_s), (xn, yn, xs, ys) in zip(PLAN, batches, strict=True):
        if kind == "sgd":
            x, y = torch.cat([xn, xs]), torch.cat([yn, ys])
            dp_sgd_step(model, opt, shard(x, k, g), shard(y, k, g), k_n + k_s, collective_forward=collective)
        elif kind == "sam":
            dp_sam_step(model, opt, shard(xs, k, g), shard(ys, k, g), k_s, collective_forward=collective)
        else:
            dp_mixed_step(
                model,
                opt,
                shard(xn, k, g),
                shard(yn, k, g),
                shard(xs, k, g),
                shard(ys, k, g),
                k_n,
                k_s,
                collective_forward=collective,
            )
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.detach().clone() for b in model.buffers()],
    }


def _dp_job(ctx, sam_grad_sync, optimizer, sync_bn):
    batches = _batches(8 if sync_bn else 4)
    model = _cnn() if sync_bn else _mlp()
    if sync_bn:
        model = convert_sync_batchnorm(model, ctx)
        assert has_collective_forward(model)
    if optimizer == "fused":
        inner = SharpBalanceSAM(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD, rho=RHO)
    else:
        inner = reference.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    # a tiny bucket cap: several chunks (flat buffer) or buckets (.grad tensors) per all-reduce
    opt = DataParallelOptimizer(inner, ctx, sam_grad_sync=sam_grad_sync, bucket_cap_mb=0.0005)
    traffic.reset()
    out = _dp_train(ctx, model, opt, batches, sync_bn)
    out["traffic"] = traffic.snapshot()
    return out


def _single_rank_whole_batch(model: torch.nn.Module, batches) -> list[torch.Tensor]:
    """One rank, the whole batch: the trainer's own step functions."""
    opt = SharpBalanceSAM(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD, rho=RHO)
    for (kind, _, _), (xn, yn, xs, ys) in zip(PLAN, batches, strict=True):
        if kind == "sgd":
            sgd_step(model, opt, torch.cat([xn, xs]), torch.cat([yn, ys]))
        elif kind == "sam":
            sam_step(model, opt, xs, ys)
        else:
            mixed_step_static(model, opt, xn, yn, xs, ys)
    return [p.detach().clone() for p in model.parameters()]


def _per_slice_perturbation_reference(model: torch.nn.Module, batches, slices: int) -> list[torch.Tensor]:
    """What ``sam_grad_sync="local"`` computes, written out on one rank: the gradient handed to
    SGD is g_n (the normal part's gradient of sum CE / b, at w) plus, for every slice S_r of the
    SAM part, the gradient of sum_{S_r} CE / b at w + e_r, where e_r = rho g_r / (||g_r|| + 1e-12)
    and g_r is the gradient of the slice's own mean CE at w (an empty slice adds nothing)."""
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)

    def grad(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, params))

    for (kind, k_n, k_s), (xn, yn, xs, ys) in zip(PLAN, batches, strict=True):
        b = k_n + k_s
        total = [torch.zeros_like(p) for p in params]
        if kind == "sgd":
            total = grad(F.cross_entropy(model(torch.cat([xn, xs])), torch.cat([yn, ys])))
        else:
            if k_n:
                total = grad(F.cross_entropy(model(xn), yn, reduction="sum") / b)
            for r in range(slices):
                xr, yr = shard(xs, r, slices), shard(ys, r, slices)
                if xr.shape[0] == 0:
                    continue
                g = grad(F.cross_entropy(model(xr), yr))
                norm = torch.norm(torch.stack([t.norm() for t in g]))
                saved = [p.detach().clone() for p in params]
                with torch.no_grad():
                    for p, t in zip(params, g, strict=True):
                        p.add_(t * (RHO / (norm + 1e-12)))
                g2 = grad(F.cross_entropy(model(xr), yr, reduction="sum") / b)
                with torch.no_grad():
                    for p, s in zip(params, saved, strict=True):
                        p.copy_(s)
                total = [a + c for a, c in zip(total, g2, strict=True)]
        for p, t in zip(params, total, strict=True):
            p.grad = t
        sgd.step()
    return [p.detach().clone() for p in params]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("sam_grad_sync", "optimizer"), [("all", "fused"), ("local", "fused"), ("all", "reference")])
def test_a_member_on_two_ranks_equals_one_rank_on_the_whole_batch(tmp_path, sam_grad_sync, optimizer):
    out = run_ranks(tmp_path, 2, _dp_job, sam_grad_sync, optimizer, False)
    assert all(torch.equal(a, b) for a, b in zip(out[0]["params"], out[1]["params"], strict=True)), (
        "the two ranks' copies of the member differ"
    )
    batches = _batches(4)
    if sam_grad_sync == "all":
        expected = _single_rank_whole_batch(_mlp(), batches)
    else:
        expected = _per_slice_perturbation_reference(_mlp(), batches, 2)
    err = _max_diff(out[0]["params"], expected)
    assert err <= F64_ATOL, f"{sam_grad_sync}/{optimizer}: max |data parallel - one rank| = {err:.3g}"
    # and the two options do differ (the test would not notice a perturbation that ignores them)
    other = (
        _per_slice_perturbation_reference(_mlp(), batches, 2)
        if sam_grad_sync == "all"
        else _single_rank_whole_batch(_mlp(), batches)
    )
    assert _max_diff(out[0]["params"], other) > 1e-6
    t = out[0]["traffic"]
    reduces = {k: v for k, v in t.items() if k.startswith("the gradient all-reduce")}
    # per step: g_n when there is a normal part, g (under "all") when there is a SAM part, and the
    # final gradient unless a normal part's g_n is all there is (a third_step after normal_step)
    normal = sum(1 for kind, k_n, _ in PLAN if kind == "mixed" and k_n)
    perturb = sum(1 for _, _, k_s in PLAN if k_s) if sam_grad_sync == "all" else 0
    final = sum(1 for kind, k_n, k_s in PLAN if k_s or kind == "sgd")
    assert {k: v["calls"] > 0 for k, v in reduces.items()} == {
        k: True
        for k, n in [
            ("the gradient all-reduce", final),
            ("the gradient all-reduce (normal part)", normal),
            ("the gradient all-reduce (SAM perturbation)", perturb),
        ]
        if n
    }
    if optimizer == "fused":  # one flat buffer, in chunks of 0.0005 MiB
        flat = SharpBalanceSAM(_mlp().parameters(), lr=LR).flat_buffers()[0]["grad"]
        chunks = -(-flat.numel() * 8 // (int(0.0005 * 2**20) // 8 * 8))
        assert sum(v["bytes"] for v in reduces.values()) == (normal + perturb + final) * flat.numel() * 8
        assert (
            sum(v["calls"] for v in reduces.values()) == (normal + perturb + final) * chunks > normal + perturb + final
        )


def test_synchronised_batchnorm_makes_two_ranks_equal_one_rank_with_batchnorm(tmp_path):
    out = run_ranks(tmp_path, 2, _dp_job, "all", "fused", True)
    batches = _batches(8)
    model = _cnn()
    expected = _single_rank_whole_batch(model, batches)
    err = _max_diff(out[0]["params"], expected)
    assert err <= F64_ATOL, f"max |data parallel with synchronised BatchNorm - one rank| = {err:.3g}"
    bufs = [b for b in model.buffers()]
    assert _max_diff(out[0]["buffers"], bufs) <= F64_ATOL  # running statistics of the whole batch
    assert _max_diff(out[1]["buffers"], bufs) <= F64_ATOL


def _per_rank_bn_job(ctx):
    model = _cnn()
    opt = DataParallelOptimizer(SharpBalanceSAM(model.parameters(), lr=LR, momentum=MOMENTUM, rho=RHO), ctx)
    out = _dp_train(ctx, model, opt, _batches(8), False)
    before = [b.clone() for b in model.buffers()]
    broadcast_buffers(ctx, model, src=0)
    return {**out, "before": before, "after": [b.clone() for b in model.buffers()]}


def test_per_rank_batchnorm_keeps_parameters_identical_and_buffers_are_made_one(tmp_path):
    out = run_ranks(tmp_path, 2, _per_rank_bn_job)
    assert all(torch.equal(a, b) for a, b in zip(out[0]["params"], out[1]["params"], strict=True))
    assert _max_diff(out[0]["before"], out[1]["before"]) > 0  # each rank's own running statistics...
    assert all(torch.equal(a, b) for a, b in zip(out[0]["after"], out[1]["after"], strict=True))  # ...until broadcast
    assert all(torch.equal(a, b) for a, b in zip(out[0]["after"], out[0]["before"], strict=True))


def _skip_flag_job(ctx):
    model = _mlp()
    inner = SharpBalanceSAM(model.parameters(), lr=LR, momentum=MOMENTUM, rho=RHO, nonfinite="skip")
    opt = DataParallelOptimizer(inner, ctx, sam_grad_sync="local")
    w = [p.detach().clone() for p in model.parameters()]
    _, _, xs, ys = _batches()[1]
    x, y = shard(xs, ctx.rank, ctx.world_size), shard(ys, ctx.rank, ctx.world_size)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if ctx.rank == 0:  # only rank 0's own perturbation gradient is not finite
        next(model.parameters()).grad[0, 0] = float("inf")
    traffic.reset()
    opt.first_step(zero_grad=True)
    after_first = inner.found_nonfinite.clone()
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    return {
        "after_first": after_first,
        "after_step": inner.found_nonfinite.clone(),
        "skipped": inner.skipped_steps.clone(),
        "traffic": traffic.snapshot(),
        "unchanged": all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True)),
    }


def test_a_nonfinite_perturbation_norm_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    out = run_ranks(tmp_path, 2, _skip_flag_job)
    for rank, o in enumerate(out):
        assert o["after_first"].item() > 0, f"rank {rank}: found_nonfinite not raised after the all-reduce"
        assert o["after_step"].item() == 0 and o["skipped"].item() == 1, rank
        assert o["unchanged"], f"rank {rank} took the update that rank 0 skipped"
        assert o["traffic"]["the skip-flag all-reduce"] == {"calls": 1, "bytes": 4}


def test_data_parallel_optimizer_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="sam_grad_sync must be one of"):
        DataParallelOptimizer(object(), None, sam_grad_sync="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bucket_cap_mb must be a number > 0"):
        DataParallelOptimizer(object(), None, bucket_cap_mb=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="has no normal_step"):
        DataParallelOptimizer(torch.optim.SGD(_mlp().parameters(), lr=0.1), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shard index 2 out of range"):
        shard(torch.zeros(3), 2, 2)


# -- a rank that dies ------------------------------------------------------------------------


def _killed_job(ctx, victim):
    if ctx.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    p = place(3, ctx.world_size)
    local = [torch.zeros(e - s) for _, s, e in row_pieces(p, 11)[ctx.rank]]
    time.sleep(0.5)  # the victim is gone before the others reach the exchange
    return exchange_scores(ctx, p, local, 11)


def test_a_killed_rank_stops_the_others_with_a_clear_message_within_the_timeout(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    timeout_s = 5.0
    t0 = time.monotonic()
    pc = mp.start_processes(
        _rank_main, args=(3, out, timeout_s, _killed_job, (1,)), nprocs=3, join=False, start_method="fork"
    )
    for proc in pc.processes:
        proc.join(timeout=timeout_s + 30)
    elapsed = time.monotonic() - t0
    codes = [proc.exitcode for proc in pc.processes]
    for proc in pc.processes:
        if proc.is_alive():  # only reached when the test fails: leave nothing running
            proc.kill()
    assert codes[1] == -signal.SIGKILL
    assert codes[0] == 3 and codes[2] == 3, f"exit codes {codes}: the survivors did not stop with the error"
    assert elapsed < timeout_s + 25
    for r in (0, 2):
        msg = (out / f"rank{r}.err").read_text()
        assert msg.startswith(f"rank {r}/3: the score exchange failed: another rank died"), msg
        assert "\n" not in msg


# -- torchrun ----------------------------------------------------------------------------------

_TORCHRUN_SCRIPT = textwrap.dedent(
    """
    import torch
    from sbfast.distributed import exchange_scores, init_distributed, place, row_pieces, shutdown
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=60)
    p = place(3, ctx.world_size)
    if ctx.is_main:
        print(p.describe(), flush=True)
    full = torch.arange(3 * 5, dtype=torch.float32).reshape(3, 5)
    s = exchange_scores(ctx, p, [full[j, a:b] for j, a, b in row_pieces(p, 5)[ctx.rank]], 5)
    print(f"rank {ctx.rank} backend {ctx.backend} equal {torch.equal(s, full)}", flush=True)
    shutdown(ctx)
    """
)


def test_torchrun_standalone_joins_with_gloo(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(_TORCHRUN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "placement: 3 members on 2 ranks (members): rank 0: members 0, 1 | rank 1: member 2" in proc.stdout
    for r in (0, 1):
        assert f"rank {r} backend gloo equal True" in proc.stdout


def _hanging_job(ctx, sleeper, seconds):
    p = place(2, ctx.world_size)
    local = [torch.zeros(e - s) for _, s, e in row_pieces(p, 4)[ctx.rank]]
    if ctx.rank == sleeper:
        time.sleep(seconds)  # alive, but far behind: the others must not wait for it forever
    t0 = time.monotonic()
    try:
        exchange_scores(ctx, p, local, 4)
    except CollectiveError as e:
        return {"waited": time.monotonic() - t0, "error": str(e)}
    return {"waited": time.monotonic() - t0, "error": None}


def test_a_rank_that_does_not_arrive_fails_the_exchange_after_the_timeout(tmp_path):
    timeout_s = 3.0
    out = run_ranks(tmp_path, 2, _hanging_job, 1, 2 * timeout_s, timeout_s=timeout_s)
    assert out[0]["error"] is not None and out[0]["error"].startswith("rank 0/2: the score exchange failed"), out[0]
    assert f"within the {timeout_s:g} s timeout" in out[0]["error"]
    assert timeout_s * 0.9 <= out[0]["waited"] <= timeout_s + 10
