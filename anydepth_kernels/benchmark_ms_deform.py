"""Microbenchmark of multi-scale deformable attention: every backend against the grid_sample
reference, forward and forward+backward, in one interleaved run.

Same method and report as :mod:`anydepth_kernels.benchmark`: every function of a case is timed in
the same process, interleaved in rounds (round r times each function ``reps`` times, in turn);
the reported time is the median over all timed calls after ``warmup`` calls; the ratio is the
reference's median / the backend's median measured in this run; CUDA timings synchronise the
device around each call. The baseline is :func:`anydepth_kernels.reference.ms_deform_attn`
called directly (``grid_sample`` per level, eager; its backward is autograd's).

    from anydepth_kernels.benchmark_ms_deform import run_ms_deform_benchmarks
    report = run_ms_deform_benchmarks("cpu")
    print(report.table())
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from . import reference
from .benchmark import Report, bench_backends, machine_info, measure, timer
from .ops import ms_deform_attn as msda_ops

#: Name of the baseline row of every case.
BASELINE = "reference (grid_sample)"


@dataclass(frozen=True)
class MsDeformCase:
    """One deformable-attention call: batch, queries, heads, level shapes, points, head dim."""

    name: str
    n: int
    q: int
    m: int
    shapes: Tuple[Tuple[int, int], ...]
    p: int
    d: int


#: RT-DETR at 640x640: the decoder's cross-attention (300 queries, 3 levels) and, smaller, an
#: encoder-style self-attention over a 4-level pyramid at 320x320 (every position is a query).
DEFAULT_MS_DEFORM_CASES = [
    MsDeformCase("RT-DETR decoder @640", 1, 300, 8, ((80, 80), (40, 40), (20, 20)), 4, 32),
    MsDeformCase("encoder Q=S=2125 @320", 1, 2125, 8, ((40, 40), (20, 20), (10, 10), (5, 5)), 4, 32),
]


def make_case_inputs(case: MsDeformCase, device, dtype, seed: int = 0):
    """Random inputs of a case: value, spatial_shapes, level_start_index, locations, weights."""
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(case.shapes, dtype=torch.int64)
    hw = ss.prod(1)
    starts = torch.cat([hw.new_zeros(1), hw.cumsum(0)[:-1]])
    s, levels = int(hw.sum()), len(case.shapes)
    value = torch.randn(case.n, s, case.m, case.d, generator=g)
    loc = torch.rand(case.n, case.q, case.m, levels, case.p, 2, generator=g)
    attn = torch.rand(case.n, case.q, case.m, levels * case.p, generator=g).softmax(-1)
    attn = attn.view(case.n, case.q, case.m, levels, case.p)
    return (value.to(device, dtype), ss.to(device), starts.to(device), loc.to(device, dtype),
            attn.to(device, dtype))


def ms_deform_backends(device: torch.device, dtype: torch.dtype) -> Dict[str, Optional[str]]:
    """Backend name -> None if it can run here, else the reason it cannot."""
    return bench_backends("ms_deform_attn", device, dtype)


def run_ms_deform_benchmarks(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cases: Optional[Sequence[MsDeformCase]] = None,
    rounds: int = 10,
    reps: int = 3,
    warmup: int = 3,
    compile_reference: bool = False,
    progress: bool = True,
) -> Report:
    """Time ``ms_deform_attn`` per backend against the grid_sample reference.

    Two rows groups per case: ``"<case> fwd"`` (forward under ``no_grad``) and
    ``"<case> fwd+bwd"`` (forward, then backward of a fixed random gradient into value,
    sampling locations and attention weights). ``compile_reference`` adds
    ``torch.compile(reference)``. Returns a :class:`anydepth_kernels.benchmark.Report`
    subclass (``.table()``, ``save_report``); ``rel err`` is against the reference's output (fwd) or the
    largest relative error of the three gradients (fwd+bwd).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is visible")
    cases = DEFAULT_MS_DEFORM_CASES if cases is None else list(cases)
    report = Report(machine_info(dev), str(dev), str(dtype).replace("torch.", ""), ratio_label="vs ref")
    backends = ms_deform_backends(dev, dtype)
    for name, why in backends.items():
        if why is not None:
            report.skipped[name] = why
    timed = timer(dev)
    compiled_ref = torch.compile(reference.ms_deform_attn) if compile_reference else None

    for ci, case in enumerate(cases):
        if progress:
            print(f"[{ci + 1}/{len(cases)}] {case.name}", file=sys.stderr, flush=True)
        value, ss, starts, loc, attn = make_case_inputs(case, dev, dtype, seed=ci)
        grad = torch.randn(case.n, case.q, case.m * case.d,
                           generator=torch.Generator().manual_seed(100 + ci)).to(dev, dtype)

        calls: Dict[str, Callable[..., torch.Tensor]] = {
            BASELINE: lambda v, sl, aw: reference.ms_deform_attn(v, ss, starts, sl, aw)}
        if compiled_ref is not None:
            calls["torch.compile(reference)"] = lambda v, sl, aw: compiled_ref(v, ss, starts, sl, aw)
        for name, why in backends.items():
            if why is None:
                calls[name] = (lambda v, sl, aw, b=name: msda_ops.ms_deform_attn(v, ss, starts, sl,
                                                                                  aw, backend=b))

        def fwd(fn=None):
            with torch.no_grad():
                return fn(value, loc, attn)

        def fwd_bwd(fn=None):
            leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
            fn(*leaves).backward(grad)
            return [t.grad for t in leaves]

        for mode, runner in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            fns = {name: (lambda fn=fn, runner=runner: runner(fn)) for name, fn in calls.items()}
            report.results += measure(f"{case.name} {mode}", fns, BASELINE, timed, rounds, reps, warmup)
    return report


if __name__ == "__main__":  # python -m anydepth_kernels.benchmark_ms_deform [cpu|cuda]
    rep = run_ms_deform_benchmarks(sys.argv[1] if len(sys.argv) > 1 else "cpu",
                                   compile_reference="--compile" in sys.argv)
    print(rep.table())
