"""CUDA graph capture and replay of a training step, one graph per input shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class GraphedStep:
    """One CUDA graph per input shape for a step function whose inputs are tensors.

    Warm-up steps run eagerly on a side stream (they are real training steps), then the step is
    captured once per shape and replayed; inputs are copied into static buffers first. The graph
    is dropped when ``key`` (the learning rates, which an optimizer may bake in) changes.

    ``pool``: a memory pool (``torch.cuda.graph_pool_handle()``) shared by every graph of a run,
    members and step kinds alike. Sharing is safe here because the graphs replay one at a time on
    one stream, and a replay's output is cloned before any other graph runs; without it each
    graph keeps a private pool of its peak temporaries (M members x 2-3 step kinds of them).
    """

    WARMUP = 3

    def __init__(self, fn: Callable[..., torch.Tensor], pool: Any = None) -> None:
        self.fn = fn
        self.pool = pool
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.warm: dict[tuple, int] = {}
        self.key: Any = None
        self.captures = 0

    def __call__(self, key: Any, *inputs: torch.Tensor) -> torch.Tensor:
        if key != self.key:
            self.graphs.clear()
            self.key = key
        shape = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self.graphs.get(shape)
        if entry is None:
            if self.warm.get(shape, 0) < self.WARMUP:
                self.warm[shape] = self.warm.get(shape, 0) + 1
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    out = self.fn(*inputs)
                torch.cuda.current_stream().wait_stream(stream)
                return out
            static_in = [t.clone() for t in inputs]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = self.fn(*static_in)
            self.graphs[shape] = entry = (graph, static_in, static_out)
            self.captures += 1
            # capture records but does not run: replay below does this step's work
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs, strict=True):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return static_out.clone()
