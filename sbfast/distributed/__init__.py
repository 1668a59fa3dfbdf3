"""Training an ensemble over several processes with torch.distributed (docs/distributed.md).

``torchrun --nproc-per-node K -m sbfast train ...`` runs the same command on K ranks (gloo on the
CPU, NCCL on GPUs); without torchrun the run is one process, a world of size one (``LocalPlan``).

| module | what |
|---|---|
| ``placement`` | ``place(M, W, spec)``: which rank trains which member (whole members, or a member over a group of ranks) |
| ``launch`` | ``init_distributed``: torchrun's environment, the process group, the rank's device; ``shutdown`` |
| ``collectives`` | ``exchange_scores`` (all_gather), ``select_on_rank0`` (broadcast), ``gather_probs`` (gather); ``CollectiveError``; ``traffic`` |
| ``data_parallel`` | ``DataParallelOptimizer`` (gradient all-reduce on the fused optimizer's flat buffers), ``dp_*_step``, ``shard`` |
| ``sync_batchnorm`` | ``convert_sync_batchnorm``: BatchNorm statistics over a data-parallel member's group (CPU and CUDA) |
| ``ensemble`` | ``RankPlan``: what one rank of a run trains and exchanges (the trainer's side); ``start_plan``, ``check_resume_placement`` |
| ``local_plan`` | ``LocalPlan``: a one-process run as a world of size one, with ``RankPlan``'s interface |
"""

from sbfast.distributed.collectives import (
    CollectiveError,
    Traffic,
    exchange_scores,
    gather_probs,
    row_pieces,
    select_on_rank0,
    traffic,
)
from sbfast.distributed.data_parallel import (
    SAM_GRAD_SYNC,
    DataParallelOptimizer,
    broadcast_buffers,
    dp_mixed_step,
    dp_sam_step,
    dp_sgd_step,
    shard,
)
from sbfast.distributed.launch import DEFAULT_TIMEOUT_S, DistContext, LaunchEnv, init_distributed, launch_env, shutdown
from sbfast.distributed.placement import PLACEMENT_MODES, Placement, place
from sbfast.distributed.sync_batchnorm import GroupBatchNorm, convert_sync_batchnorm, has_collective_forward

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PLACEMENT_MODES",
    "SAM_GRAD_SYNC",
    "CollectiveError",
    "DataParallelOptimizer",
    "DistContext",
    "GroupBatchNorm",
    "LaunchEnv",
    "Placement",
    "Traffic",
    "broadcast_buffers",
    "convert_sync_batchnorm",
    "dp_mixed_step",
    "dp_sam_step",
    "dp_sgd_step",
    "exchange_scores",
    "gather_probs",
    "has_collective_forward",
    "init_distributed",
    "launch_env",
    "place",
    "row_pieces",
    "select_on_rank0",
    "shard",
    "shutdown",
    "traffic",
]
