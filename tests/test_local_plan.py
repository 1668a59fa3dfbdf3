"""A one-process run is a world of size one: ``LocalPlan`` answers every question the trainer asks
a torchrun ``RankPlan``, with the one-process answers (leads every member, an exchange is a
stack, a selection a call, a broadcast the value), so the trainer has one loop."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from pathlib import Path

import pytest
import torch

from sbfast.distributed.ensemble import RankPlan, check_resume_placement
from sbfast.distributed.local_plan import LocalPlan
from sbfast.select import select_sam_masks

TRAIN = Path(__file__).resolve().parents[1] / "sbfast" / "train"


def _plan_attributes() -> set[str]:
    """Every ``plan.<name>`` / ``self.plan.<name>`` the trainer's modules read."""
    names = set()
    for path in (TRAIN / "trainer.py", TRAIN / "run.py", TRAIN / "run_folder.py", TRAIN / "steps.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                inner = node.value
                if (isinstance(inner, ast.Name) and inner.id == "plan") or (
                    isinstance(inner, ast.Attribute) and inner.attr == "plan"
                ):
                    names.add(node.attr)
    return names


def _instance_attributes(cls: type) -> set[str]:
    """The names ``cls.__init__`` assigns as ``self.<name> = ...``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    return {
        t.attr
        for node in ast.walk(tree)
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }


def test_both_plans_have_everything_the_trainer_asks_for():
    asked = _plan_attributes()
    assert {"leads", "epoch_end", "exchange_scores", "select", "gather_states", "on_rank0", "device"} <= asked
    for cls in (LocalPlan, RankPlan):
        missing = sorted(a for a in asked if not hasattr(cls, a) and a not in _instance_attributes(cls))
        assert not missing, f"{cls.__name__} lacks what the trainer uses: {missing}"


@pytest.mark.parametrize("members", [1, 3, 7])
def test_a_world_of_size_one(members):
    plan = LocalPlan(members, torch.device("cpu"))
    assert plan.local == tuple(range(members)) and plan.is_main and plan.stops_inside_epoch
    assert all(plan.leads(j) and not plan.data_parallel(j) for j in range(members))
    assert plan.saved_placement() is None and plan.evaluation(list(range(members)), 10) is None
    n = 129
    assert plan.score_pieces(n) == [(j, 0, n) for j in range(members)]
    rows = [torch.randn(n) for _ in range(members)]
    assert torch.equal(plan.exchange_scores(rows, n), torch.stack(rows))
    scores = torch.randn(members, n)
    seeds = list(range(members))
    assert torch.equal(
        plan.select(scores, select_sam_masks, 0.5, "random", seeds), select_sam_masks(scores, 0.5, "random", seeds)
    )
    losses = {j: torch.tensor(0.1 * (j + 1), dtype=torch.float64) for j in reversed(range(members))}
    got, stop = plan.epoch_end(losses, True)
    assert got == [0.1 * (j + 1) for j in range(members)] and stop is True
    assert plan.member_counts({j: torch.tensor(j) for j in range(members)}) == list(range(members))
    states = {j: {"j": j} for j in reversed(range(members))}
    assert plan.gather_states(states) == [{"j": j} for j in range(members)]
    model = torch.nn.Linear(2, 2)
    assert plan.prepare_model(0, model) is model and plan.wrap_optimizer(0, "opt") == "opt"
    assert plan.broadcast({"a": 1}, "x") == {"a": 1} and plan.on_rank0(lambda: 5, "x") == 5
    with pytest.raises(ValueError, match="boom"):
        plan.on_rank0(lambda: (_ for _ in ()).throw(ValueError("boom")), "x")
    with pytest.raises(RuntimeError, match="no member is data parallel"):
        plan.step(0)


def test_resume_placement_of_a_world_of_size_one_is_the_one_process_placement():
    plan = LocalPlan(3, torch.device("cpu"))
    # a one-process checkpoint (placement None) continues unchanged, with no note
    assert check_resume_placement(None, plan.placement, 3, "local", False, True) is None
    # a checkpoint of whole members on two ranks continues here with a note
    saved = {"world_size": 2, "groups": [[0], [1], [0]]}
    assert re.match(r"resuming on 1 rank", check_resume_placement(saved, plan.placement, 3, "local", False, True))
    # a data-parallel member's numbers would change: refused as for any placement
    with pytest.raises(ValueError, match="member 1 was trained on 2 rank"):
        check_resume_placement({"world_size": 2, "groups": [[0], [0, 1], [1]]}, plan.placement, 3, "local", False, True)
