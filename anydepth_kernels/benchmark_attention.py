"""Microbenchmark of the fused attention ops: every backend against the explicit eager reference,
forward and forward+backward, at the models' shapes, in one interleaved run.

Same method and report as :mod:`anydepth_kernels.benchmark`: every function of a case is timed in
the same process, interleaved in rounds (round r times each function ``reps`` times, in turn);
the reported time is the median over all timed calls after ``warmup`` calls; the ratio is the
reference's median / the function's median measured in this run; CUDA timings synchronise the
device around each call. The baseline is the eager reference called directly:
:func:`anydepth_kernels.reference.attention` (scores, softmax, weighted sum in float32) or, for
area attention, :func:`anydepth_kernels.reference.area_attention` (the explicit reshapes around
it); its backward is autograd's.

    from anydepth_kernels.benchmark_attention import run_attention_benchmarks
    report = run_attention_benchmarks("cpu")
    print(report.table())
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import reference
from .benchmark import Report, bench_backends, machine_info, measure, timer
from .ops import attention as attn_ops

#: Name of the baseline row of every case.
BASELINE = "reference (eager)"


@dataclass(frozen=True)
class AttnCase:
    """One attention call. ``kind="attention"``: ``[b, heads, n, d]`` q/k/v. ``kind="area"``:
    the qkv map ``[b, 3*heads*d, map_h, map_w]`` of YOLOv12's AAttn split into ``area`` runs."""

    name: str
    kind: str
    b: int
    heads: int
    d: int
    n: int = 0
    map_hw: Tuple[int, int] = (0, 0)
    area: int = 1


#: YOLOv12-s at 640 (P4: 40x40 map, 4 heads of 32, area 4 -> 4 problems of 400 tokens; P5: 20x20,
#: 8 heads, area 1), the P4 problem as plain ``[B*area, H, N, D]`` attention, and RT-DETR's AIFI
#: encoder self-attention at 640 (20x20 = 400 tokens, 8 heads of 32).
DEFAULT_ATTENTION_CASES = [
    AttnCase("YOLOv12-s P4 area attn @640", "area", 1, 4, 32, map_hw=(40, 40), area=4),
    AttnCase("YOLOv12-s P5 area attn @640", "area", 1, 8, 32, map_hw=(20, 20), area=1),
    AttnCase("P4 as [4,4,400,32] attention", "attention", 4, 4, 32, n=400),
    AttnCase("RT-DETR AIFI [1,8,400,32]", "attention", 1, 8, 32, n=400),
]


def make_case_inputs(case: AttnCase, device, dtype, seed: int = 0) -> List[torch.Tensor]:
    """``[q, k, v]`` or ``[qkv]`` of a case (random normal, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    if case.kind == "area":
        h, w = case.map_hw
        shapes = [(case.b, 3 * case.heads * case.d, h, w)]
    elif case.kind == "attention":
        shapes = [(case.b, case.heads, case.n, case.d)] * 3
    else:
        raise ValueError(f"unknown case kind {case.kind!r}")
    return [torch.randn(s, generator=g).to(device, dtype) for s in shapes]


def attention_backends(device: torch.device, dtype: torch.dtype) -> Dict[str, Optional[str]]:
    """Backend name -> None if it can run here (head dim 32), else the reason it cannot."""
    return bench_backends("attention", device, dtype, head_dim=32)


def _case_calls(case: AttnCase, backends: Dict[str, Optional[str]], compiled_ref):
    """Name -> function of the case's inputs returning a tuple of output tensors."""
    def area_ref(qkv):
        return reference.area_attention(qkv, case.heads, case.area)

    def attention_ref(q, k, v):
        return (reference.attention(q, k, v),)

    def op(b):
        if case.kind == "area":
            return lambda qkv: attn_ops.area_attention(qkv, case.heads, case.area, backend=b)
        return lambda q, k, v: (attn_ops.attention(q, k, v, backend=b),)

    ref_fn = area_ref if case.kind == "area" else attention_ref
    calls: Dict[str, Callable[..., Tuple[torch.Tensor, ...]]] = {BASELINE: ref_fn}
    if compiled_ref is not None:
        calls["torch.compile(reference)"] = compiled_ref(ref_fn)
    for name, why in backends.items():
        if why is None:
            calls[name] = op(name)
    return calls


def run_attention_benchmarks(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cases: Optional[Sequence[AttnCase]] = None,
    rounds: int = 10,
    reps: int = 5,
    warmup: int = 3,
    compile_reference: bool = False,
    progress: bool = True,
) -> Report:
    """Time ``attention`` / ``area_attention`` per backend against the eager reference.

    Two row groups per case: ``"<case> fwd"`` (forward under ``no_grad``) and
    ``"<case> fwd+bwd"`` (forward, then backward of fixed random output gradients into the
    inputs). ``compile_reference`` adds ``torch.compile(reference)``. Returns a
    :class:`anydepth_kernels.benchmark.Report` subclass (``.table()``, ``save_report``); ``rel
    err`` is against the reference's outputs (fwd) or the largest relative error of the input
    gradients (fwd+bwd).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is visible")
    cases = DEFAULT_ATTENTION_CASES if cases is None else list(cases)
    report = Report(machine_info(dev), str(dev), str(dtype).replace("torch.", ""), ratio_label="vs ref")
    backends = attention_backends(dev, dtype)
    for name, why in backends.items():
        if why is not None:
            report.skipped[name] = why
    timed = timer(dev)
    compiled_ref = torch.compile if compile_reference else None

    for ci, case in enumerate(cases):
        if progress:
            print(f"[{ci + 1}/{len(cases)}] {case.name}", file=sys.stderr, flush=True)
        inputs = make_case_inputs(case, dev, dtype, seed=ci)
        calls = _case_calls(case, backends, compiled_ref)
        with torch.no_grad():
            outs = calls[BASELINE](*inputs)
        g = torch.Generator().manual_seed(100 + ci)
        grads = [torch.randn(o.shape, generator=g).to(dev, dtype) for o in outs]

        def fwd(fn):
            with torch.no_grad():
                return fn(*inputs)

        def fwd_bwd(fn):
            leaves = [t.detach().requires_grad_() for t in inputs]
            torch.autograd.backward(fn(*leaves), grads)
            return [t.grad for t in leaves]

        for mode, runner in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            fns = {name: (lambda fn=fn, runner=runner: runner(fn)) for name, fn in calls.items()}
            report.results += measure(f"{case.name} {mode}", fns, BASELINE, timed, rounds, reps, warmup)
    return report


if __name__ == "__main__":  # python -m anydepth_kernels.benchmark_attention [cpu|cuda] [--compile]
    rep = run_attention_benchmarks(sys.argv[1] if len(sys.argv) > 1 else "cpu",
                                   compile_reference="--compile" in sys.argv)
    print(rep.table())
