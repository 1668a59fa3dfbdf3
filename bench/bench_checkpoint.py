"""checkpoint: writing and reading a run's checkpoint at the paper's scale, against an epoch.

The state is a real ``EnsembleTrainer``'s (``state_dict()``): 3 CIFAR ResNet18 members at width
64 (11,173,962 parameters each) with their BatchNorm buffers, the fused optimizer's momentum
(torch.optim.SGD's layout), LR schedulers, generators, and a 200-epoch history. The data is a
small random stand-in of CIFAR's shape (the checkpoint holds no data, only its fingerprint,
which a run computes once).

- ``checkpoint_write``: reference = a plain ``torch.save`` of the same state to a file (no
  checksum, no fsync, no atomic rename); face = ``EnsembleTrainer.save("last.pt")``: state_dict,
  serialise, sha256, write a temporary file, fsync, rotate last.pt to prev.pt, rename, fsync
  the folder. What a run pays after every epoch (``checkpoint_every`` thins it).
- ``checkpoint_load``: reference = ``torch.load(weights_only=True)`` of the plain file; faces =
  ``load_checkpoint`` (header, sha256, weights_only load) and that plus
  ``EnsembleTrainer.load_state_dict`` (what a resume does).

The epoch it is measured against: one step of the trainer's own step functions
(``sbfast.train.sgd_step`` and ``sam_step``, which bench_train's epochs are made of) on this
ResNet18 at batch 128, 32x32, timed here, times 391 steps (CIFAR's 50,000 / 128) times 3
members. The plain-SGD epoch is the shortest a run has (a SAM epoch costs about twice as much),
so the write's share of it is the worst case; ``python -m bench.bench_checkpoint`` prints it,
and the training saved by the phase-1 fork in a full comparison.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch

from bench.harness import BenchCase, device_name, pytest_params, run_pytest_benchmark, time_ms
from sbfast import train as T
from sbfast.data import IndexedTensorDataset
from sbfast.train.checkpoint import LAST, load_checkpoint

MEMBERS, WIDTH, BATCH, STEPS_PER_EPOCH = 3, 64, 128, 391  # CIFAR: ceil(50,000 / 128) = 391 steps
EPOCHS, SWAP_EPOCH = 200, 100  # the release's schedule
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _data(n: int = 256) -> T.TrainData:
    g = torch.Generator().manual_seed(0)

    def split(k: int) -> IndexedTensorDataset:
        x = torch.randint(0, 256, (k, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (k,), generator=g)
        return IndexedTensorDataset(x, y, mean=CIFAR_MEAN, std=CIFAR_STD)

    return T.TrainData("cifar-shaped", split(n), split(n // 2), 10)


def _trainer(device: torch.device, run_dir: Path) -> T.EnsembleTrainer:
    cfg = T.TrainConfig(
        dataset="synthetic",
        model="resnet18",
        model_kwargs={"width": WIDTH},
        members=MEMBERS,
        batch_size=BATCH,
        epochs=EPOCHS,
        swap_epoch=SWAP_EPOCH,
        augment=True,
        augment_pad=4,
        augment_flip=True,
        progress=False,
        eval_corruptions=(),
        sharpness_samples=0,
        device=str(device),
        num_threads=0,
    )
    trainer = T.EnsembleTrainer(cfg, _data(), run_dir=run_dir)
    x = torch.randn(2, 3, 32, 32, device=device)
    y = torch.tensor([0, 1], device=device)
    for m in trainer.members:  # one tiny step: every momentum buffer exists, as after epoch 0
        T.sgd_step(m.forward, m.opt, x, y)
    record = {
        "epoch": 0,
        "phase": "sam",
        "lr": 0.1,
        "train_loss": [2.3] * MEMBERS,
        "test_acc": [0.1] * MEMBERS,
        "ensemble_test_acc": 0.1,
        "time_s": 1.0,
        "score_s": None,
        "samples_per_s": 1.0,
        "eval_s": 0.1,
        "sam_share": [1.0] * MEMBERS,
        "skipped_steps": [0] * MEMBERS,
        "wall_s": 1.0,
    }
    trainer.state.history = [dict(record, epoch=e) for e in range(EPOCHS)]
    trainer.state.position = T.run_state.Position(epoch=EPOCHS)
    return trainer


def step_seconds(trainer: T.EnsembleTrainer, repeats: int = 2) -> dict[str, float]:
    """Median seconds of one sgd_step and one sam_step of member 0 at batch 128 (after a warm-up)."""
    m = trainer.members[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 32, 32, generator=g).to(trainer.device)
    y = torch.randint(0, 10, (BATCH,), generator=g).to(trainer.device)
    out = {}
    for name, step in (("sgd", T.sgd_step), ("sam", T.sam_step)):
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            step(m.forward, m.opt, x, y)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            if i:
                times.append(time.perf_counter() - t0)
        out[name] = sorted(times)[len(times) // 2]
    return out


def fork_savings(epochs: int = EPOCHS, swap_epoch: int = SWAP_EPOCH, sam_share: float = 0.75) -> dict[str, float]:
    """What the phase-1 fork saves in one seed of a de / de_sam / sharpbalance comparison.

    Without it sharpbalance trains all ``epochs``; with it, it starts at T_d + 1 from de_sam's
    phase1.pt, so T_d + 1 SAM epochs (of every member) are not trained again. In plain-SGD epoch
    equivalents (a SAM epoch ~ 2, a mixed epoch ~ 1 + SAM share, per section 5 of the algorithm).
    """
    saved = swap_epoch + 1
    cost = {
        "de": epochs * 1.0,
        "de_sam": epochs * 2.0,
        "sharpbalance": saved * 2.0 + (epochs - saved) * (1.0 + sam_share),
    }
    total = sum(cost.values())
    return {
        "epochs_avoided": saved,
        "epochs_total": 3 * epochs,
        "sgd_epochs_avoided": 2.0 * saved,
        "sgd_epochs_total": total,
        "share_of_comparison": 2.0 * saved / total,
    }


_TMP: list[str] = []


def _tmpdir() -> Path:
    d = tempfile.mkdtemp(prefix="sbfast-bench-ckpt-")
    if not _TMP:
        atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in _TMP])
    _TMP.append(d)
    return Path(d)


def _setup(device: torch.device) -> tuple[T.EnsembleTrainer, Path, Path, dict[str, float]]:
    run_dir = _tmpdir()
    trainer = _trainer(device, run_dir)
    steps = step_seconds(trainer)
    trainer.save(LAST)
    plain = run_dir / "plain.pt"
    torch.save(trainer.state_dict(), plain)
    return trainer, run_dir / "checkpoints" / LAST, plain, steps


def cases(device: torch.device) -> list[BenchCase]:
    trainer, path, plain, steps = _setup(device)
    size = path.stat().st_size
    epoch_sgd = steps["sgd"] * STEPS_PER_EPOCH * MEMBERS
    epoch_sam = steps["sam"] * STEPS_PER_EPOCH * MEMBERS
    shape = f"resnet18 w{WIDTH} x{MEMBERS} + momentum, {size / 2**20:.0f} MiB"
    extra = {
        "size_MiB": round(size / 2**20, 1),
        "epoch_s_sgd_estimate": round(epoch_sgd, 1),
        "epoch_s_sam_estimate": round(epoch_sam, 1),
        "budget_ms_2pct_sgd_epoch": round(0.02 * epoch_sgd * 1e3, 1),
    }
    notes = (
        f"epoch = step x {STEPS_PER_EPOCH} x {MEMBERS} members: sgd_step {steps['sgd']:.2f} s, "
        f"sam_step {steps['sam']:.2f} s at b={BATCH}"
    )

    def write() -> object:
        trainer.save(LAST)
        return None

    def load_restore() -> object:
        trainer.load_state_dict(load_checkpoint(path))
        return None

    return [
        BenchCase(
            op="checkpoint_write",
            shape=shape,
            reference=lambda: torch.save(trainer.state_dict(), plain),
            faces={"save last.pt (atomic, sha256, fsync)": write},
            bytes_moved=size,
            notes="reference = plain torch.save; " + notes,
            extra=extra,
        ),
        BenchCase(
            op="checkpoint_load",
            shape=shape,
            reference=lambda: torch.load(plain, weights_only=True),
            faces={
                "load_checkpoint (sha256, weights_only)": lambda: load_checkpoint(path),
                "load + restore the trainer": load_restore,
            },
            bytes_moved=size,
            notes="reference = torch.load(weights_only=True) of the plain file",
            extra=extra,
        ),
    ]


def report(device: torch.device, min_run_time: float = 0.5) -> str:
    """The figures the budget is about: write/load time and size, the write's share of an
    epoch, and the fork's saving in a full comparison."""
    c_write, c_load = cases(device)
    e = c_write.extra
    write_ms = time_ms(c_write.faces["save last.pt (atomic, sha256, fsync)"], device, min_run_time)
    plain_ms = time_ms(c_write.reference, device, min_run_time)
    load_ms = time_ms(c_load.faces["load_checkpoint (sha256, weights_only)"], device, min_run_time)
    restore_ms = time_ms(c_load.faces["load + restore the trainer"], device, min_run_time)
    f = fork_savings()
    return "\n".join(
        [
            f"checkpoint of {c_write.shape} on {device_name(device)}",
            f"  write last.pt {write_ms:.0f} ms (plain torch.save {plain_ms:.0f} ms); load {load_ms:.0f} ms, "
            f"load + restore {restore_ms:.0f} ms",
            f"  {c_write.notes}",
            f"  epoch estimate: SGD {e['epoch_s_sgd_estimate']:.0f} s, SAM {e['epoch_s_sam_estimate']:.0f} s; "
            f"write = {100 * write_ms / 1e3 / e['epoch_s_sgd_estimate']:.3f}% of an SGD epoch, "
            f"{100 * write_ms / 1e3 / e['epoch_s_sam_estimate']:.3f}% of a SAM epoch (budget 2%)",
            f"  phase-1 fork, per seed of a de/de_sam/sharpbalance comparison ({EPOCHS} epochs, T_d = {SWAP_EPOCH}): "
            f"{f['epochs_avoided']} of {f['epochs_total']} member-set epochs not trained again, "
            f"{f['sgd_epochs_avoided']:.0f} of {f['sgd_epochs_total']:.0f} SGD-epoch equivalents "
            f"({100 * f['share_of_comparison']:.1f}%); each further ratio/variant setting saves {f['epochs_avoided']} SAM epochs",
        ]
    )


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case,face", pytest_params(cases, _DEVICE), ids=lambda v: getattr(v, "shape", v))
def bench_checkpoint(benchmark, case: BenchCase, face: str) -> None:
    run_pytest_benchmark(benchmark, case, face)


def _main() -> None:
    print(report(_DEVICE))


if __name__ == "__main__":
    _main()
