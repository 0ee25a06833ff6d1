"""train.cuda_graph: the whole training step recorded once as a CUDA graph, then replayed.

A tiny expert's step is a few hundred small kernels; launched one by one from Python, the host
is the bottleneck. Recorded as one graph (batch gather, forward, backward, finite check, Adam,
the epoch's sums), a step is one index copy and one replay. torch.compile's reduce-overhead
mode graphs only the compiled forward and backward; this graphs everything.

What a graph needs, and where it is met:
- fixed inputs: the step reads a fixed index buffer; each call copies this step's row of the
  epoch's sample indices (on the device) into it;
- no host sync inside the step: train.host_sync=log (tests/unit/test_host_sync.py);
- an optimizer whose step counts live on the device: Adam with capturable=True (optim.py);
- autocast without its weight cache (trainer);
- state updated in place only (epoch sums, skip counters), so the graph's pointers stay valid.
Python inside the step runs once, at recording: anything that changes from step to step must be
a tensor. On a CPU there is nothing to record: each call runs the step as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StepGraph:
    """Calls `step(idx_B)` (one training step on the samples idx_B; returns a tensor of the
    step's values) so that every call is exactly one step: the first `warmup` calls run it
    eagerly on a side stream (Adam's state, compilation, cuBLAS workspaces), the next records
    it and replays it, every later one replays it."""

    def __init__(
        self,
        step: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int,
        device: torch.device,
        warmup: int = 3,
    ) -> None:
        self.step, self.device, self.warmup = step, device, warmup
        self.idx_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.eager_calls = 0
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, idx_B: torch.Tensor) -> torch.Tensor:
        self.idx_B.copy_(idx_B, non_blocking=True)
        if self.device.type != "cuda":
            return self.step(self.idx_B)
        if self.graph is not None:
            self.graph.replay()
            assert self.out is not None
            return self.out
        if self.eager_calls < self.warmup:
            self.eager_calls += 1
            current, side = torch.cuda.current_stream(self.device), self.side
            assert side is not None
            side.wait_stream(current)
            with torch.cuda.stream(side):
                out = self.step(self.idx_B)
            current.wait_stream(side)
            out.record_stream(current)  # made on the side stream, read on this one
            return out
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self.step(self.idx_B)
        self.graph = graph
        graph.replay()  # recording ran nothing: this is the step
        return self.out
