"""Joining the job that torchrun started: its environment, the process group, the device.

``torchrun --nproc-per-node K -m sbfast train ...`` starts K processes and tells each who it is
through environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``). :func:`init_distributed` reads them and joins PyTorch's
process group: NCCL when the run's device is CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on
the CPU. Without those variables it returns None and the run is the ordinary single process.
There is no transport of sbfast's own: every exchange is a torch.distributed collective.

A collective that waits longer than ``timeout_s`` (a rank died, hangs, or raised) fails instead
of hanging: the timeout goes to ``init_process_group``, and :mod:`sbfast.distributed.collectives`
turns the failure into one line saying which exchange and which rank.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "LaunchEnv",
    "init_distributed",
    "launch_env",
    "quiet_unless_rank0",
    "shutdown",
]

# Long enough for the slowest rank to finish an epoch's scoring (every collective of a run waits
# for it), short enough that a dead rank ends the job within minutes.
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun (or any env:// launcher) told this process."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None


def _int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise ValueError(
                f"environment variable {name} is missing (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK together)"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The launcher's variables, or None when the process was not started by one (neither
    ``RANK`` nor ``WORLD_SIZE`` set). Raises ValueError for an inconsistent set."""
    env = os.environ if env is None else env
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    rank = _int_var(env, "RANK")
    world = _int_var(env, "WORLD_SIZE")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    local = _int_var(env, "LOCAL_RANK", rank)
    local_world = _int_var(env, "LOCAL_WORLD_SIZE", world)
    port = env.get("MASTER_PORT")
    return LaunchEnv(rank, world, local, local_world, env.get("MASTER_ADDR"), int(port) if port else None)


@dataclass
class DistContext:
    """This process's place in the job.

    Attributes:
        rank, world_size, local_rank: as the launcher said.
        backend: "gloo" or "nccl".
        device: the device this rank trains on (``cuda:LOCAL_RANK`` under NCCL).
        comm_device: where tensors must be for the backend's collectives (CPU for gloo).
        timeout_s: every collective's timeout.
        owns_group: whether :func:`init_distributed` created the process group (then
            :func:`shutdown` destroys it).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    comm_device: torch.device
    timeout_s: float
    owns_group: bool = True

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that selects, writes logs, metrics, plots and checkpoints."""
        return self.rank == 0


def _run_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    d = torch.device(device) if device is not None else torch.device("cpu")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine")
        if d.index is None:
            if local_rank >= torch.cuda.device_count():
                raise ValueError(
                    f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                    "devices; start at most that many processes per node"
                )
            d = torch.device("cuda", local_rank)
    return d


def init_distributed(
    device: str | torch.device | None = None,
    *,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> DistContext | None:
    """Join the process group the launcher set up, or return None when there is none. A process
    group that already exists (the caller's) is used as it is, and left to its owner.

    Args:
        device: the run's device ("cpu", "cuda"). "cuda" without an index becomes
            ``cuda:LOCAL_RANK`` (one GPU per process), which becomes the current CUDA device.
        backend: "gloo" or "nccl"; default NCCL for CUDA, gloo otherwise.
        timeout_s: timeout of every collective (> 0).
        init_method, rank, world_size: for callers that start processes themselves (tests):
            e.g. ``init_method="file:///tmp/x"`` with an explicit rank and world size. Default:
            ``env://`` from the launcher's variables.
    Returns:
        DistContext, or None without a launcher (a single-process run).
    Raises:
        ValueError for inconsistent arguments or environment, before joining anything.
    """
    if not (isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}")
    if (rank is None) != (world_size is None):
        raise ValueError("give rank and world_size together (or neither, to read them from the launcher)")
    env = launch_env()
    if rank is None:
        if dist.is_available() and dist.is_initialized():  # the caller's own job: join it as it is
            rank, world_size = dist.get_rank(), dist.get_world_size()
            local_rank = env.local_rank if env is not None else rank
        elif env is None:
            return None
        else:
            rank, world_size, local_rank = env.rank, env.world_size, env.local_rank
    else:
        assert world_size is not None
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        local_rank = env.local_rank if env is not None else rank
    run_device = _run_device(device, local_rank)
    if backend is None:
        backend = "nccl" if run_device.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and run_device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs a CUDA device; this run's device is {run_device}")
    if run_device.type == "cuda":
        torch.cuda.set_device(run_device)
    timeout = datetime.timedelta(seconds=float(timeout_s))
    owns = not dist.is_initialized()
    if owns:
        kwargs = {}
        if backend == "nccl":
            kwargs["device_id"] = run_device  # eager NCCL init: a bad GPU fails here, not at the first exchange
        dist.init_process_group(
            backend, init_method=init_method or "env://", rank=rank, world_size=world_size, timeout=timeout, **kwargs
        )
    else:
        if dist.get_rank() != rank or dist.get_world_size() != world_size:
            raise ValueError(
                f"a process group already exists as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"not rank {rank} of {world_size}"
            )
        backend = str(dist.get_backend())
    comm_device = run_device if backend == "nccl" else torch.device("cpu")
    return DistContext(rank, int(world_size), local_rank, backend, run_device, comm_device, float(timeout_s), owns)


def shutdown(ctx: DistContext | None) -> None:
    """Leave the process group if :func:`init_distributed` created it (no-op otherwise)."""
    if ctx is not None and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def quiet_unless_rank0() -> None:
    """Under a launcher, send this process's standard output to /dev/null unless it is rank 0:
    a command line then prints its report once, not once per rank (errors still reach stderr)."""
    env = launch_env()
    if env is not None and env.rank > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
