"""What a trainer saves and loads: its members, its position in the schedule, and the
checkpoint payload built from them (``TrainerState``, mixed into ``EnsembleTrainer``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sbfast import reference
from sbfast.distributed.data_parallel import DataParallelOptimizer
from sbfast.distributed.ensemble import check_resume_placement
from sbfast.train.batching import StaticBatcher
from sbfast.train.checkpoint import LAST, PAYLOAD_FORMAT, encode, save_checkpoint
from sbfast.train.config import TrainConfig
from sbfast.train.graphs import GraphedStep
from sbfast.train.resume import model_spec
from sbfast.train.run_folder import versions
from sbfast.train.steps import Forward


@dataclass
class Member:
    index: int
    model: nn.Module  # the module itself (scored, evaluated, returned)
    forward: Forward  # the module or its torch.compile wrapper (training)
    opt: Any
    sched: Any
    order_gen: torch.Generator
    aug_gen: torch.Generator | None
    batcher: StaticBatcher | None = None
    mask: torch.Tensor | None = None  # bool [N] on the device (exact batching)
    order_start: torch.Tensor | None = None  # order_gen's state before this epoch's draw
    graphs: dict[str, GraphedStep] = field(default_factory=dict)


@dataclass
class Position:
    """The next thing a run does, and what its unfinished epoch has gathered so far.

    ``member`` members have finished epoch ``epoch`` (their mean losses in ``losses``); member
    ``member`` has done ``step`` steps of it (its running loss sum in ``loss_sum``).
    """

    epoch: int = 0
    member: int = 0
    step: int = 0
    losses: list[torch.Tensor] = field(default_factory=list)
    loss_sum: torch.Tensor | None = None
    lr: float | None = None  # members' lr at the start of the epoch (the history's)
    score_s: float | None = None
    train_s: float = 0.0  # training seconds of this epoch so far

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "member": self.member,
            "step": self.step,
            "losses": list(self.losses),
            "loss_sum": self.loss_sum,
            "lr": self.lr,
            "score_s": self.score_s,
            "train_s": self.train_s,
        }


def optimizer_state_for(opt: Any, state: Mapping[str, Any]) -> dict[str, Any]:
    """A saved optimizer state in the layout ``opt`` loads. Checkpoints hold torch.optim.SGD's
    layout (what ``SharpBalanceSAM.state_dict`` gives); ``reference.SAM`` keeps momentum in its
    base optimizer, so it gets the state there (and ``SharpBalanceSAM`` reads a reference SAM's
    ``base_optimizer`` entry itself)."""
    state = dict(state)
    if len(state["param_groups"]) == len(opt.param_groups):
        # keys the other optimizer has and the saved groups lack (torch.optim.SGD's "fused",
        # "foreach", ...) keep the loading optimizer's values
        state["param_groups"] = [
            {**{k: v for k, v in cur.items() if k != "params"}, **saved}
            for cur, saved in zip(opt.param_groups, state["param_groups"], strict=True)
        ]
    if isinstance(opt, reference.SAM) and "base_optimizer" not in state:
        groups = state["param_groups"]
        return {
            "state": {},
            "param_groups": groups,
            "base_optimizer": {"state": state["state"], "param_groups": groups},
        }
    return state


def describe_position(p: Position, c: TrainConfig) -> str:
    if p.member == 0 and p.step == 0:
        return (
            "the checkpoint at the end of training"
            if p.epoch >= c.epochs
            else f"the checkpoint at the end of epoch {p.epoch - 1}"
        )
    return f"the checkpoint in epoch {p.epoch} (member {p.member}, step {p.step})"


def check_same_tensors(expected: Mapping[str, torch.Tensor], saved: Mapping[str, Any], where: str) -> None:
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{where}: the checkpoint's parameters do not match the model (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    for k, t in expected.items():
        s = saved[k]
        if not isinstance(s, torch.Tensor) or s.shape != t.shape or s.dtype != t.dtype:
            got = f"{s.dtype} {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"{where}: {k} is {got} in the checkpoint, {t.dtype} {tuple(t.shape)} in the model")


class TrainerState:
    """The checkpoint face of :class:`~sbfast.train.trainer.EnsembleTrainer`: ``state_dict``,
    ``load_state_dict`` and ``save`` over the trainer's members, position, scores, masks,
    history and clocks."""

    def state_dict(self) -> dict[str, Any] | None:
        """Everything the rest of the run depends on (the checkpoint's payload): members'
        parameters and buffers, optimizer states (torch.optim.SGD's layout), LR schedulers, every
        generator (torch CPU/CUDA, per-member order and augmentation), the position (epoch,
        member, step, and the unfinished epoch's losses), scores, masks, the history, the
        config, the data's fingerprint and the versions. Tensors and plain containers only.

        Under torchrun every rank must call it: rank 0 gathers every member's state and returns
        the whole payload (with the placement it ran under); the other ranks return None."""
        p = self.position
        members = []
        for m in self.members:
            mid_epoch = p.step > 0 and m.index == p.member
            members.append(
                {
                    "model": m.model.state_dict(),
                    "optimizer": m.opt.state_dict(),
                    "scheduler": m.sched.state_dict(),
                    # a member stopped mid-epoch draws that epoch's order again on resume
                    "order_gen": m.order_start if mid_epoch else m.order_gen.get_state(),
                    "aug_gen": m.aug_gen.get_state() if m.aug_gen is not None else None,
                    "skipped_steps": getattr(m.opt, "skipped_steps", None),
                }
            )
        placement = None
        if self.plan is not None:
            gathered = self.plan.gather_states({m.index: s for m, s in zip(self.members, members, strict=True)})
            if gathered is None:
                return None
            members = gathered
            placement = {
                "world_size": self.plan.ctx.world_size,
                "groups": [list(g) for g in self.plan.placement.groups],
                "sam_grad_sync": self.config.sam_grad_sync,
                "sync_batchnorm": self.config.sync_batchnorm,
            }
        # the training device's CUDA generator only: a resume may see another number of GPUs
        cuda_rng = [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []
        return {
            "format": PAYLOAD_FORMAT,
            "config": self.config.to_dict(),
            "versions": versions(),
            "device": str(self.device),
            "data": {"fingerprint": self.fingerprint, "train": len(self.data.train), "test": len(self.data.test)},
            "model": model_spec(self.config, self.data),
            "components": dict(self.components.names),
            "position": p.to_dict(),
            "members": members,
            "rng": {"torch": torch.get_rng_state(), "cuda": list(cuda_rng)},
            "scores": self.scores,
            "masks": self.masks,
            "history": list(self.history),
            "clock": dict(self.clock, elapsed_s=self.elapsed()),
            "forked_from": self.forked_from,
            "placement": placement,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, fork: bool = False) -> None:
        """Continue from a checkpoint's payload (``state_dict()``'s). Everything is checked
        before anything is loaded: the data's fingerprint, the device kind, the members and their
        parameter shapes. ``fork``: a phase-1 checkpoint of another run, whose clocks are not
        carried (the run's timing counts its own work).

        Raises:
            ValueError naming what does not match.
        """
        c = self.config
        if state.get("format") != PAYLOAD_FORMAT:
            raise ValueError(f"not an sbfast training checkpoint payload (format {state.get('format')!r})")
        if state["data"]["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"the checkpoint was written for other data than this run's (train {state['data']['train']} / test "
                f"{state['data']['test']} samples there, {len(self.data.train)} / {len(self.data.test)} here, and the "
                "values differ): point data_root at the run's data"
            )
        saved_dev = torch.device(state["device"])
        if saved_dev.type != self.device.type:
            raise ValueError(
                f"the checkpoint was written on {saved_dev.type}, this run uses {self.device}: pass device={saved_dev.type!r}"
            )
        saved_members = state["members"]
        if len(saved_members) != c.members:
            raise ValueError(f"the checkpoint has {len(saved_members)} members, the config {c.members}")
        self.placement_note = (
            check_resume_placement(
                state.get("placement"),
                self.plan.placement if self.plan is not None else None,
                c.members,
                c.sam_grad_sync,
                c.sync_batchnorm,
                any(isinstance(x, nn.modules.batchnorm._BatchNorm) for m in self.members for x in m.model.modules()),
            )
            if not fork
            else None
        )
        mine = [(m, saved_members[m.index]) for m in self.members]
        for m, s in mine:
            check_same_tensors(m.model.state_dict(), s["model"], f"member {m.index}")
            if (s["aug_gen"] is None) != (m.aug_gen is None):
                raise ValueError(
                    f"member {m.index}: augmentation generator saved={s['aug_gen'] is not None}, config augment={c.augment}"
                )
        cuda_rng = state["rng"]["cuda"]

        for m, s in mine:
            m.model.load_state_dict(s["model"])
            inner = m.opt.optimizer if isinstance(m.opt, DataParallelOptimizer) else m.opt  # the layout it loads
            m.opt.load_state_dict(optimizer_state_for(inner, s["optimizer"]))
            m.sched.load_state_dict(s["scheduler"])
            m.order_gen.set_state(s["order_gen"])
            if m.aug_gen is not None:
                m.aug_gen.set_state(s["aug_gen"])
            skipped = getattr(m.opt, "skipped_steps", None)
            if skipped is not None and s["skipped_steps"] is not None:
                skipped.copy_(s["skipped_steps"])
        torch.set_rng_state(state["rng"]["torch"])
        if cuda_rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng[0], self.device)
        if state["masks"] is not None:
            self.set_masks(state["masks"].bool())
            self.scores = state["scores"]
        self.history = [dict(r) for r in state["history"]]
        pos = dict(state["position"])
        pos["losses"] = [t.to(self.device) for t in pos["losses"]]
        if pos["loss_sum"] is not None:
            pos["loss_sum"] = pos["loss_sum"].to(self.device)
        self.position = Position(**pos)
        self.forked_from = state.get("forked_from")
        if not fork:
            self.clock = {k: float(v) for k, v in state["clock"].items()}
            self._saved = describe_position(self.position, c)

    def save(self, *names: str) -> None:
        """Write the current state as ``checkpoints/<name>`` for each name (serialised once)."""
        if self.run_dir is None:
            raise ValueError("this trainer has no run folder to checkpoint into (run_dir=None)")
        state = self.state_dict()  # under torchrun: gathered on rank 0, which alone writes
        if state is not None:
            data = encode(state)
            for name in names:
                save_checkpoint(self.run_dir, data, name)
        if LAST in names:
            p = self.position
            self._saved, self._saved_at = describe_position(p, self.config), (p.epoch, p.member, p.step)
