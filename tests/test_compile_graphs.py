"""How many graphs ``TrainConfig(compile=...)`` makes in a run: one per distinct batch shape of
the model's forward/backward, never one per epoch or per learning-rate change (the optimizer's
phases stay outside the compiled graphs, and the LR lives in the optimizer). So a 200-epoch run
compiles what its first epoch of each phase compiles: for the static batcher, the full batch and
the last short batch of phase 1, and the mixed phase's fixed compositions and tail."""

from __future__ import annotations

import pytest

from sbfast import train as T

pytestmark = pytest.mark.usefixtures("one_thread")


class _Watch(T.Callback):
    """Records the training batch sizes the members' forward sees, and dynamo's graph count at
    the end of every epoch."""

    def __init__(self) -> None:
        self.sizes: set[int] = set()
        self.graphs_after: list[int] = []

    def on_train_start(self, config, models):
        for m in models:
            m.register_forward_pre_hook(lambda mod, args: self.sizes.add(args[0].shape[0]) if mod.training else None)

    def on_epoch_end(self, epoch, record):
        from torch._dynamo.utils import counters

        self.graphs_after.append(counters["stats"]["unique_graphs"])


def test_graph_count_is_the_number_of_batch_shapes_and_stops_growing():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # 70 samples in batches of 16: phase 1 has full batches and a last short batch of 6
    cfg = T.TrainConfig(
        dataset="synthetic",
        method="sharpbalance",
        members=2,
        epochs=8,
        swap_epoch=1,
        train_subset=70,
        test_subset=32,
        batch_size=16,
        model_kwargs={"width": 4},
        sharpness_samples=0,
        progress=False,
        eval_corruptions=(),
        compile="eager",
        lr_schedule="step",
    )
    watch = _Watch()
    result = T.train_ensemble(cfg, callbacks=[watch])
    assert len({h["lr"] for h in result.history}) == 3  # two LR milestones crossed
    first_mixed = cfg.swap_epoch + 1
    # nothing new compiles after the first epoch of the mixed phase: not for later epochs, not
    # for an LR change
    assert watch.graphs_after[first_mixed:] == [watch.graphs_after[first_mixed]] * (cfg.epochs - first_mixed)
    # one graph per distinct training batch size (the members share the model's code object)
    assert watch.graphs_after[-1] == len(watch.sizes)
    assert sum(counters["recompiles"].values()) == 0
    torch._dynamo.reset()
