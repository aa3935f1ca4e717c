"""Benchmark of a shared-filter-basis layer's inference forms, in one interleaved run
(the method of :mod:`anydepth_kernels.benchmark`):

* ``eager factored``: :class:`~anydepth_kernels.SharedBasisConv2d` in eval mode (basis conv,
  BatchNorm, 1x1 coefficient conv, BatchNorm, ReLU: the intermediate written and read back);
* ``fused factored [backend]``: :meth:`~anydepth_kernels.SharedBasisConv2d.factored`, the one op
  :func:`anydepth_kernels.basis_conv_norm_act` on each backend that runs here;
* ``folded plain conv``: :meth:`~anydepth_kernels.SharedBasisConv2d.fold`, one ``k x k`` conv with
  the norm epilogue (:func:`anydepth_kernels.conv_norm_act`, ``auto`` backend).

The ratio column is eager factored / each, measured in the same run. ``clock="thread"`` (CPU
only) times each call by the calling thread's CPU time (``time.thread_time``) instead of the wall
clock: on a shared machine it leaves out the time a call waits preempted (run with one torch
thread, or the worker threads' time is missed).
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

from .benchmark import Report, bench_backends, machine_info, measure, timer
from .shared_basis import SharedBasis, SharedBasisConv2d


class BasisCase(NamedTuple):
    """One 3x3 layer of a shared-basis ResNet (batch 1): channels, spatial size, own + shared rank."""

    name: str
    channels: int
    hw: int
    unique_rank: int
    shared_rank: int


#: The four stages of a ResNet-34 at 224 px with the authors' CIFAR scaling of S16U1 (ranks double
#: with the width: S16U1, S32U2, S64U4, S128U8).
BASIS_CASES = [
    BasisCase("3x3 64->64 @56 u1+s16", 64, 56, 1, 16),
    BasisCase("3x3 128->128 @28 u2+s32", 128, 28, 2, 32),
    BasisCase("3x3 256->256 @14 u4+s64", 256, 14, 4, 64),
    BasisCase("3x3 512->512 @7 u8+s128", 512, 7, 8, 128),
]

EAGER = "eager factored (nn modules)"


def _layer(case: BasisCase, seed: int, device, dtype) -> SharedBasisConv2d:
    g = torch.Generator().manual_seed(seed)
    basis = SharedBasis(case.channels, case.shared_rank)
    layer = SharedBasisConv2d(case.channels, case.channels, case.unique_rank, basis, act="relu")
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
        for bn in (layer.basis_norm, layer.norm):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)  # type: ignore[union-attr]
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)  # type: ignore[union-attr]
    return layer.eval().to(device=device, dtype=dtype)


def _thread_timer(fn: Callable[[], object]) -> float:
    t0 = time.thread_time()
    fn()
    return (time.thread_time() - t0) * 1e3


def run_basis_benchmarks(device: str = "cpu", dtype: torch.dtype = torch.float32, rounds: int = 10,
                         reps: int = 3, warmup: int = 3, progress: bool = True,
                         cases: Optional[List[BasisCase]] = None, clock: str = "wall") -> Report:
    """Time the eager factored layer, the fused factored op on every backend that runs on
    ``device`` and the folded plain conv, per case (default :data:`BASIS_CASES`)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is visible")
    cases = BASIS_CASES if cases is None else cases
    report = Report(machine_info(dev), str(dev), str(dtype).replace("torch.", ""))
    backends = bench_backends("basis_conv_norm_act", dev, dtype)
    for name, why in backends.items():
        if why is not None:
            report.skipped[f"fused factored [{name}]"] = why
    if clock not in ("wall", "thread") or (clock == "thread" and dev.type != "cpu"):
        raise ValueError(f"clock must be 'wall', or 'thread' on the CPU; got {clock!r} on {dev}")
    timed = timer(dev) if clock == "wall" else _thread_timer
    for ci, case in enumerate(cases):
        if progress:
            print(f"[{ci + 1}/{len(cases)}] {case.name}", file=sys.stderr, flush=True)
        layer = _layer(case, 200 + ci, dev, dtype)
        g = torch.Generator().manual_seed(300 + ci)
        x = torch.randn(1, case.channels, case.hw, case.hw, generator=g).to(dev, dtype)
        folded = layer.fold()
        fns: Dict[str, Callable[..., object]] = {EAGER: lambda m=layer, x=x: m(x)}
        for name, why in backends.items():
            if why is None and name != "reference":
                fns[f"fused factored [{name}]"] = lambda m=layer.factored(name), x=x: m(x)
        fns["folded plain conv"] = lambda m=folded, x=x: m(x)
        with torch.no_grad():
            report.results += measure(case.name, fns, EAGER, timed, rounds, reps, warmup)
    return report
