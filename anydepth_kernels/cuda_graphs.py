"""CUDA graphs per depth: ``runner = CUDAGraphRunner(model); runner(x, depth="base")``.

The first call with a new (depth, input shape, dtype, device) captures one CUDA graph of the
model's forward; later calls copy the input into the graph's static buffer and replay it, so
switching depth costs a dictionary look-up and kernel-launch overhead disappears. On the CPU (or
with autograd recording) the runner simply calls the model: the same code runs everywhere.

The model must be in eval mode and its forward must be capturable (no host synchronisation, no
data-dependent shapes): the raw forward of the anydepth models is. Depth arguments are normalised
with ``model.resolve_depth`` when the model has one, so ``"base"`` and the equivalent
``DepthConfig`` share a graph.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable

import torch
from torch import nn
from torch.utils._pytree import tree_map


class _Entry:
    __slots__ = ("graph", "static_in", "static_out")

    def __init__(self, graph, static_in, static_out):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out


class CUDAGraphRunner(nn.Module):
    """Wrap ``model`` (called as ``model(x, depth=...)``, or ``model(x)`` when ``depth`` is not
    given) with one captured CUDA graph per (depth, shape, dtype, device).

    ``max_graphs``: least-recently-used graphs beyond this are dropped (each holds its own
    activation memory). ``clone_outputs``: return copies (default) rather than the graph's static
    output buffers, which the next replay of the same graph overwrites. Replays are serialised
    with a lock, so one runner may be shared by threads.
    """

    def __init__(self, model: nn.Module, warmup: int = 2, max_graphs: int = 32, clone_outputs: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"CUDAGraphRunner: expected an nn.Module, got {type(model).__name__}")
        if warmup < 1 or max_graphs < 1:
            raise ValueError("CUDAGraphRunner: warmup and max_graphs must be >= 1")
        self.model = model
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.clone_outputs = clone_outputs
        self._graphs: "OrderedDict[Hashable, _Entry]" = OrderedDict()
        self._lock = threading.Lock()
        self._pool = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _depth_key(self, x: torch.Tensor, depth: Any) -> Any:
        resolve = getattr(self.model, "resolve_depth", None)
        if callable(resolve):
            return resolve(depth, tuple(x.shape))
        if depth is not None and not isinstance(depth, Hashable):
            raise TypeError(f"CUDAGraphRunner: depth must be hashable to key a graph, got {type(depth).__name__}")
        return depth

    def _call(self, x: torch.Tensor, depth: Any):
        return self.model(x) if depth is None else self.model(x, depth=depth)

    def forward(self, x: torch.Tensor, depth: Any = None):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"CUDAGraphRunner: expected a tensor input, got {type(x).__name__}")
        if x.device.type != "cuda" or (torch.is_grad_enabled() and
                                       (x.requires_grad or any(p.requires_grad for p in self.model.parameters()))):
            return self._call(x, depth)  # CPU, or autograd recording: plain call
        if self.model.training:
            raise RuntimeError("CUDAGraphRunner: put the model in eval mode first (graphs freeze the forward)")
        cfg = self._depth_key(x, depth)
        key = (cfg, tuple(x.shape), x.dtype, x.device, x.is_contiguous())
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(x, cfg if depth is not None else None)
                self._graphs[key] = entry
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
            entry.static_in.copy_(x)
            entry.graph.replay()
            out = entry.static_out
            return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out) if self.clone_outputs else out

    def _capture(self, x: torch.Tensor, depth: Any) -> _Entry:
        static_in = x.detach().clone()
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(self.warmup):  # lazy inits, cuDNN autotuning, Triton compiles
                self._call(static_in, depth)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool):
            static_out = self._call(static_in, depth)
        return _Entry(graph, static_in, static_out)

    def reset(self) -> None:
        """Drop every captured graph (e.g. after changing the model's weights)."""
        with self._lock:
            self._graphs.clear()
