"""``python -m bench.distributed_report [--repeats K] [--json PATH]``: what a distributed run costs on this machine.

A standalone script, not a ``bench/bench_*.py`` module: it starts its own rank processes (forked,
gloo, rendezvous through a file), which the ``python -m bench`` harness of single-process timings
does not do. One intra-op thread per rank. Three parts:

1. one epoch of 3 members (digits preset: CNN width 16, batch 64, 1,257 samples), SAM phase and
   mixed phase (masks of a balance selection of random scores), on 1, 2 and 3 ranks (placement
   "members"): the epoch's wall time is the slowest rank's, between two barriers;
2. the score exchange at T_d (all_gather of float32 [M, N]) and the mask broadcast: time and
   payload bytes per rank;
3. data parallel: one member over 1, 2 and 3 ranks, one SAM epoch, and the gradient all-reduce
   of a ResNet18-sized flat buffer (11.2M float32) on 2 ranks: time and bytes per step.

Bytes are the payload each rank hands to its collectives (``sbfast.distributed.traffic``): its
padded piece for a gather, the whole buffer for an all-reduce (a ring all-reduce moves about
2 (W - 1) / W times that over each rank's links).

Measured on the team's shared 2-core AMD EPYC (busy; loads of 5-9 from other agents), so the
times are noisy and more than 2 ranks cannot be faster than 2: see docs/distributed.md for a run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.harness import resnet18_param_shapes
from sbfast.distributed import DataParallelOptimizer, init_distributed, shutdown, traffic
from sbfast.distributed.ensemble import RankPlan
from sbfast.optim import SharpBalanceSAM
from sbfast.select import select_sam_masks
from sbfast.train import EnsembleTrainer, TrainConfig, load_data


def _rank_main(rank: int, world: int, out: Path, fn, args) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    ctx = init_distributed("cpu", init_method=f"file://{out}/store", rank=rank, world_size=world, timeout_s=600)
    try:
        result = fn(ctx, *args)
    finally:
        shutdown(ctx)
    torch.save(result, out / f"rank{rank}.pt")


def run_ranks(world: int, fn, *args) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        mp.start_processes(_rank_main, args=(world, out, fn, args), nprocs=world, join=True, start_method="fork")
        return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _timed(ctx, fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _epoch_job(ctx, members: int, placement: str, repeats: int) -> dict:
    cfg = TrainConfig(
        dataset="digits",
        members=members,
        placement=placement,
        progress=False,
        eval_corruptions=(),
        sharpness_samples=0,
        device="cpu",
    )
    plan = RankPlan(ctx, members, placement)
    trainer = EnsembleTrainer(cfg, load_data(cfg), plan=plan)
    n = trainer.train_dev.n
    scores = torch.rand(members, n, generator=torch.Generator().manual_seed(0))
    out: dict = {}
    traffic.reset()
    out["score_exchange_s"] = _timed(
        ctx, lambda: plan.exchange_scores([scores[j, s:e] for j, s, e in plan.score_pieces(n)], n)
    )
    out["mask_broadcast_s"] = _timed(
        ctx, lambda: trainer.set_masks(plan.select(scores, select_sam_masks, 0.5, "balance"))
    )
    out["exchange_bytes"] = traffic.snapshot()
    for phase in ("sam", "mixed"):
        times = []
        for _ in range(repeats):
            traffic.reset()
            times.append(
                _timed(
                    ctx,
                    lambda ph=phase: plan.epoch_end(
                        {m.index: trainer.train_epoch(m.index, ph) for m in trainer.members}, False
                    ),
                )
            )
        out[f"{phase}_epoch_s"] = min(times)
        out[f"{phase}_traffic"] = traffic.snapshot()
    return out


def _allreduce_job(ctx, repeats: int) -> dict:
    """The fastest of ``repeats`` averages of a ResNet18-sized flat gradient buffer."""
    params = [torch.zeros(s, requires_grad=True) for s in resnet18_param_shapes()]
    opt = DataParallelOptimizer(SharpBalanceSAM(params, lr=0.1, momentum=0.9), ctx)
    for p in params:
        p.grad.normal_()
    traffic.reset()
    times = [_timed(ctx, opt.average_gradients) for _ in range(repeats)]
    return {"allreduce_s": min(times), "bytes": traffic.snapshot()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="epochs timed per configuration (the fastest is kept)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    report: dict = {"torch": torch.__version__, "cpu_threads_per_rank": 1, "members": {}, "data_parallel": {}}
    print("one epoch of 3 members (digits CNN, batch 64, 1,257 samples), placement 'members', gloo")
    print(
        f"{'ranks':>5}  {'sam epoch s':>11}  {'mixed epoch s':>13}  {'scores all_gather s':>19}  {'score bytes/rank':>16}"
    )
    for world in (1, 2, 3):
        res = run_ranks(world, _epoch_job, 3, "members", args.repeats)
        r0 = res[0]
        sb = r0["exchange_bytes"]["the score exchange"]["bytes"]
        print(
            f"{world:>5}  {r0['sam_epoch_s']:>11.2f}  {r0['mixed_epoch_s']:>13.2f}  {r0['score_exchange_s']:>19.4f}  "
            f"{sb:>16,}"
        )
        report["members"][world] = r0
    print("\none member, data parallel over its ranks: one SAM epoch, gradient all-reduce per step")
    print(f"{'ranks':>5}  {'sam epoch s':>11}  {'all-reduce calls':>16}  {'bytes/step/rank':>15}")
    for world in (1, 2, 3):
        r0 = run_ranks(world, _epoch_job, 1, "auto", args.repeats)[0]
        t = {k: v for k, v in r0["sam_traffic"].items() if k.startswith("the gradient all-reduce")}
        calls = sum(v["calls"] for v in t.values())
        per_step = sum(v["bytes"] for v in t.values()) // max(1, -(-1257 // 64))
        print(f"{world:>5}  {r0['sam_epoch_s']:>11.2f}  {calls:>16}  {per_step:>15,}")
        report["data_parallel"][world] = r0
    repeats = 5
    ar = run_ranks(2, _allreduce_job, repeats)[0]
    t = ar["bytes"]["the gradient all-reduce"]
    print(
        f"\nResNet18 flat gradient buffer ({t['bytes'] / repeats / 2**20:.1f} MiB float32, "
        f"{t['calls'] // repeats} chunk(s) of at most 25 MiB) averaged over 2 gloo ranks: "
        f"{ar['allreduce_s'] * 1e3:.0f} ms per all-reduce"
    )
    report["resnet18_allreduce_2_ranks"] = ar
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
