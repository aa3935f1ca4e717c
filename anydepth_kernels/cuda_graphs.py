"""CUDA graphs per depth: ``runner = CUDAGraphRunner(model); runner(x, depth="base")``.

The first call with a new key captures one CUDA graph of the model's forward; later calls with
that key copy the input into the graph's static input buffer and replay it, so switching depth
costs a dictionary look-up and kernel-launch overhead disappears. On the CPU (or with autograd
recording) the runner simply calls the model: the same code runs everywhere.

Behaviour, precisely:

* Key: ``(depth, input shape, dtype, device, contiguity)``. Depth arguments are normalised with
  ``model.resolve_depth`` when the model has one, so ``"base"`` and the equivalent
  ``DepthConfig`` share a graph. The key does not depend on ``torch.inference_mode``: a graph
  captured inside ``torch.inference_mode()`` serves ``torch.no_grad()`` callers and vice versa.
* Capture: ``warmup`` eager calls on a side stream (lazy initialisation, autotuning, Triton
  compilation, filling the model's shape caches), then one captured call, all under
  ``torch.no_grad()`` with inference mode *off*, so the static input and outputs are normal
  tensors whatever the caller's mode (an inference tensor could not be updated in place outside
  inference mode). The capture uses ``capture_error_mode="thread_local"``: work that other
  threads do meanwhile is neither broken by the capture nor breaks it.
* Memory: every graph has its own private memory pool, so replaying one graph never writes the
  memory (outputs included) of another. The cost is that graphs do not share activation memory;
  ``max_graphs`` bounds how many are kept (least recently used are dropped).
* Constants: tensors that the forward reads but does not allocate during the capture (the shape
  caches of the models: level tables, anchors, position embeddings) must outlive the graph. Code
  that hands out such cached tensors reports them with :func:`keep_alive`; the runner collects
  what is reported during its capture and keeps a reference with the graph, so evicting them
  from a cache cannot free (and let something else overwrite) memory the graph still reads.
* Outputs: with ``clone_outputs=True`` (default) each call returns fresh copies. With
  ``clone_outputs=False`` it returns the graph's static output tensors, the same objects on every
  call with that key: they hold that call's results until the next call *with the same key*
  (from any thread) replays the graph and overwrites them in place. Calls with other keys never
  touch them, and dropping the graph (:meth:`CUDAGraphRunner.reset`, eviction) leaves their
  values as they are. Like any result, they are ready on the current stream.

The model must be in eval mode and its forward must be capturable (no host synchronisation, no
host-to-device copy, no data-dependent shapes): the raw forward of the anydepth models is.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Any, Hashable, Iterator, List, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = ["CUDAGraphRunner", "collect_graph_constants", "keep_alive"]

_local = threading.local()


def keep_alive(*objs: Any) -> None:
    """Report objects (tensors, or containers of them) that the running code reads without owning
    them, e.g. values handed out by a cache that may later drop them. While
    :func:`collect_graph_constants` is active on this thread (a :class:`CUDAGraphRunner`
    capture), they are appended to its list; otherwise this does nothing (cheap enough for every
    cache hit)."""
    collectors = getattr(_local, "collectors", None)
    if collectors:
        for refs in collectors:
            refs.extend(objs)


@contextlib.contextmanager
def collect_graph_constants() -> Iterator[List[Any]]:
    """Collect into the yielded list everything reported with :func:`keep_alive` on this thread
    while the block runs (other threads' reports are not collected). Keep the list as long as a
    graph captured in the block may replay."""
    collectors = _local.__dict__.setdefault("collectors", [])
    refs: List[Any] = []
    collectors.append(refs)
    try:
        yield refs
    finally:
        collectors.pop()


def static_input(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` (same shape, dtype, device and, where dense, strides) that is a normal
    tensor, detached, even when ``x`` is an inference tensor or inference mode is on: the graph's
    input buffer, updated in place by every replay in either mode."""
    with torch.inference_mode(False), torch.no_grad():
        buf = torch.empty_like(x, requires_grad=False)
        buf.copy_(x)
    return buf


def _clone(out: Any) -> Any:
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


class _Entry:
    __slots__ = ("graph", "static_in", "static_out", "constants")

    def __init__(self, graph, static_in, static_out, constants=()):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out
        self.constants = tuple(constants)  # tensors the graph reads but does not own


class CUDAGraphRunner(nn.Module):
    """Wrap ``model`` (called as ``model(x, depth=...)``, or ``model(x)`` when ``depth`` is not
    given) with one captured CUDA graph per (depth, shape, dtype, device, contiguity); see the
    module docstring for the exact behaviour.

    ``warmup``: eager calls before each capture. ``max_graphs``: least-recently-used graphs beyond
    this are dropped (each holds its own memory pool). ``clone_outputs``: return copies (default);
    with ``False``, the graph's static output tensors are returned, valid until the next call with
    the *same key* overwrites them in place (calls with other keys never touch them). Captures and
    replays are serialised with a lock, so one runner may be shared by threads (with
    ``clone_outputs=False`` another thread's call with the same key may overwrite the outputs).
    After changing the model's weights other than in place, call :meth:`reset`.
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

    def _key(self, x: torch.Tensor, depth: Any) -> Tuple[Any, ...]:
        """The graph key: independent of inference mode and of autograd state."""
        return (self._depth_key(x, depth), tuple(x.shape), x.dtype, x.device, x.is_contiguous())

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
        key = self._key(x, depth)
        with self._lock, torch.cuda.device(x.device):
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(x, key[0] if depth is not None else None)
                self._graphs[key] = entry
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
            return self._replay(entry, x)

    def _replay(self, entry: _Entry, x: torch.Tensor):
        """Copy ``x`` in, replay, return the outputs (cloned if ``clone_outputs``); works inside
        and outside inference mode (the static buffers are normal tensors)."""
        with torch.no_grad():
            entry.static_in.copy_(x)
            entry.graph.replay()
            return _clone(entry.static_out) if self.clone_outputs else entry.static_out

    def _capture(self, x: torch.Tensor, depth: Any) -> _Entry:
        device = x.device
        static_in = static_input(x)
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        # inference mode off: the static outputs (and whatever the warm-up caches) are normal
        # tensors, usable in place and cloned the same way in either mode
        with torch.inference_mode(False), torch.no_grad():
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):  # lazy inits, cuDNN autotuning, Triton compiles, shape caches
                    self._call(static_in, depth)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # no pool argument: a private memory pool for this graph alone
            with collect_graph_constants() as constants, \
                    torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                static_out = self._call(static_in, depth)
        return _Entry(graph, static_in, static_out, constants)

    def reset(self) -> None:
        """Drop every captured graph (e.g. after replacing the model's weights)."""
        with self._lock:
            self._graphs.clear()
