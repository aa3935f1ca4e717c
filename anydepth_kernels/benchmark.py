"""Kernel microbenchmarks: each fused op per backend against the eager modules it replaces.

Timing method (the numbers users read before trusting a speedup):
  * every backend of a case is timed in the same process, interleaved in rounds (round r times
    each backend ``reps`` times, in turn), so drift and noise of the machine hit all of them alike;
  * the reported time is the median over all timed calls after ``warmup`` calls;
  * the speedup is eager median / backend median, both measured in this run;
  * CUDA timings synchronise the device around each call.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from . import _ext
from .modules import FusedConvNormAct


@dataclass(frozen=True)
class ConvCase:
    """One switchable conv block shape (batch 1)."""

    name: str
    cin: int
    cout: int
    hw: int
    k: int
    stride: int = 1
    residual: bool = False


#: Conv blocks of YOLOv12-s at 640x640 input (channels x spatial size as they occur there).
DEFAULT_CASES = [
    ConvCase("stem 3x3/2 3->32 @640", 3, 32, 640, 3, 2),
    ConvCase("3x3 64->64 @160", 64, 64, 160, 3),
    ConvCase("3x3 64->64 @160 +res", 64, 64, 160, 3, residual=True),
    ConvCase("1x1 128->128 @80", 128, 128, 80, 1),
    ConvCase("3x3/2 128->256 @80", 128, 256, 80, 3, 2),
    ConvCase("1x1 256->256 @40", 256, 256, 40, 1),
    ConvCase("1x1 512->256 @20", 512, 256, 20, 1),
]


@dataclass
class Result:
    case: str
    backend: str
    median_ms: float
    speedup_vs_eager: float
    samples: int
    max_rel_err: Optional[float] = None


@dataclass
class Report:
    machine: Dict[str, str]
    device: str
    dtype: str
    results: List[Result] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    ratio_label: str = "vs eager"  # what the ratio column divides by

    def table(self) -> str:
        wc = max([len("case")] + [len(r.case) for r in self.results])
        wb = max([len("backend")] + [len(r.backend) for r in self.results])
        head = f"{'case':<{wc}} {'backend':<{wb}} {'median ms':>10} {self.ratio_label:>9} {'rel err':>9}"
        lines = [head, "-" * len(head)]
        for r in self.results:
            err = "" if r.max_rel_err is None else f"{r.max_rel_err:.1e}"
            lines.append(f"{r.case:<{wc}} {r.backend:<{wb}} {r.median_ms:>10.3f} "
                         f"{r.speedup_vs_eager:>8.2f}x {err:>9}")
        for name, why in self.skipped.items():
            lines.append(f"(skipped {name}: {why})")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"machine": self.machine, "device": self.device, "dtype": self.dtype,
                "method": "median over interleaved rounds after warm-up; speedup = eager / backend "
                          "measured in the same run",
                "results": [r.__dict__ for r in self.results], "skipped": self.skipped}


def machine_info(device: torch.device) -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if _ext.CPU_AVAILABLE:
        info["anydepth_cpu_isa"] = torch.ops.anydepth._ext_cpu_isa()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def _eager_block(case: ConvCase, device, dtype) -> nn.Sequential:
    conv = nn.Conv2d(case.cin, case.cout, case.k, case.stride, case.k // 2, bias=False)
    bn = nn.BatchNorm2d(case.cout)
    g = torch.Generator().manual_seed(0)
    bn.weight.data = torch.rand(case.cout, generator=g) + 0.5
    bn.bias.data = torch.randn(case.cout, generator=g)
    bn.running_mean = torch.randn(case.cout, generator=g) * 0.1
    bn.running_var = torch.rand(case.cout, generator=g) + 0.5
    return nn.Sequential(conv, bn, nn.SiLU()).eval().to(device=device, dtype=dtype)


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A function that runs ``fn()`` once and returns its wall time in milliseconds on ``device``
    (CUDA events around the call on a GPU, ``time.perf_counter`` with the call finished on the CPU).
    The one timer of every benchmark here and in :mod:`anydepth.benchmark`."""
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return timed


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _max_rel_err(out, ref) -> float:
    if isinstance(out, torch.Tensor):
        return rel_err(out, ref)
    return max(rel_err(a, b) for a, b in zip(out, ref))


def measure(case: str, fns: Mapping[str, Callable[..., object]], baseline: str, timed, rounds: int,
            reps: int, warmup: int) -> List[Result]:
    """Time every function of ``fns`` interleaved round by round (``reps`` calls each per round,
    after ``warmup`` calls), with the error of its output (a tensor or a sequence of tensors)
    against ``baseline``'s; the ratio is the baseline's median over each median."""
    ref = fns[baseline]()
    errors: Dict[str, float] = {}
    for name, fn in fns.items():
        errors[name] = _max_rel_err(fn(), ref)
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(reps):
                samples[name].append(timed(fn))
    base = statistics.median(samples[baseline])
    return [Result(case, name, statistics.median(s), base / statistics.median(s), len(s), errors[name])
            for name, s in samples.items()]


#: Why a Triton backend is not timed off the GPU (the backend table allows CPU tensors under the
#: interpreter, which runs but is no measure of the kernels).
TRITON_NEEDS_GPU = "timing Triton needs a GPU (on the CPU it runs only in its interpreter)"


def bench_backends(op: str, device: torch.device, dtype: torch.dtype, **ctx) -> Dict[str, Optional[str]]:
    """Backend name -> None if ``op`` can be timed on it here, else the reason it cannot: the
    backend table's :func:`~anydepth_kernels.ops._backends.availability`, less Triton off the GPU."""
    from .ops import _backends

    out: Dict[str, Optional[str]] = {}
    for name, why in _backends.availability(op, device, dtype, **ctx).items():
        if name == "triton" and device.type != "cuda":
            out[name] = TRITON_NEEDS_GPU
        else:
            out[name] = None if why is None else str(why)
    return out


def available_backends(device: torch.device, dtype: torch.dtype) -> Dict[str, Optional[str]]:
    """Backend name -> None if ``conv_norm_act`` can run on it here, else the reason it cannot."""
    return bench_backends("conv_norm_act", device, dtype)


def run_conv_benchmarks(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cases: Optional[List[ConvCase]] = None,
    rounds: int = 10,
    reps: int = 3,
    warmup: int = 3,
    compile_eager: bool = False,
    progress: bool = True,
) -> Report:
    """Time eager Conv2d+BatchNorm2d+SiLU(+add) against FusedConvNormAct on every backend."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is visible")
    cases = DEFAULT_CASES if cases is None else cases
    report = Report(machine_info(dev), str(dev), str(dtype).replace("torch.", ""))
    backends = available_backends(dev, dtype)
    for name, why in backends.items():
        if why is not None:
            report.skipped[name] = why
    timed = timer(dev)
    for ci, case in enumerate(cases):
        if progress:
            print(f"[{ci + 1}/{len(cases)}] {case.name}", file=sys.stderr, flush=True)
        eager = _eager_block(case, dev, dtype)
        conv, bn, act = eager
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        fused = FusedConvNormAct.from_modules(conv, bn, act=act).to(dev)
        g = torch.Generator().manual_seed(ci)
        x = torch.randn(1, case.cin, case.hw, case.hw, generator=g).to(dev, dtype)
        oh = (case.hw + 2 * (case.k // 2) - case.k) // case.stride + 1
        res = torch.randn(1, case.cout, oh, oh, generator=g).to(dev, dtype) if case.residual else None

        def eager_fn(m=eager, x=x, res=res):
            y = m(x)
            return y + res if res is not None else y

        fns: Dict[str, Callable[..., object]] = {"eager (nn modules)": eager_fn}
        if compile_eager:
            fns["torch.compile(eager)"] = torch.compile(eager_fn)
        for name, why in backends.items():
            if why is None:
                fns[name] = (lambda b=name: torch.ops.anydepth.conv_norm_act(
                    x, fused.weight, fused.scale[0], fused.bias[0], list(fused.stride),
                    list(fused.padding), [1, 1], 1, "silu", res, b))
        with torch.no_grad():
            report.results += measure(case.name, fns, "eager (nn modules)", timed, rounds, reps, warmup)
    return report


def save_report(report: Report, out_dir: str, stem: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}.json")
    with open(path, "w") as f:
        json.dump(report.to_json(), f, indent=1)
    return path




#: CSP output convs of YOLOv12-s at 640 (branch channels, output channels, spatial size); the
#: shallow variant passes only the essential branches (the weight's first input channels).
CONCAT_CASES = [
    ("C3k2 p3 full 4x64->256 @80", [64, 64, 64], 256, 80, None),
    ("A2C2f p4 full 3x128->256 @40", [128, 128, 128], 256, 40, None),
    ("A2C2f p4 shallow 2x128 @40", [128, 128], 256, 40, 384),
    ("C3k2 p5 full 3x256->512 @20", [256, 256, 256], 512, 20, None),
]


def concat_backends(device: torch.device, dtype: torch.dtype) -> Dict[str, Optional[str]]:
    """Backend name -> None if ``concat_conv1x1`` can be timed on it here, else the reason."""
    return bench_backends("concat_conv1x1", device, dtype)


def run_concat_benchmarks(device: str = "cpu", dtype: torch.dtype = torch.float32, rounds: int = 10,
                          reps: int = 3, warmup: int = 3, progress: bool = True,
                          compile_eager: bool = False, cases: Optional[list] = None) -> Report:
    """Time eager ``cat -> Conv2d 1x1 -> BatchNorm2d -> SiLU`` (the shallow path: a sliced weight)
    against ``concat_conv1x1`` on every backend that runs on ``device`` (the C++ kernel on the
    CPU, Triton on CUDA; the reference everywhere), and ``torch.compile`` of the eager block when
    ``compile_eager``. ``cases``: ``(name, branch channels, cout, hw, weight cin or None)`` tuples,
    default :data:`CONCAT_CASES`."""
    from .modules import fold_batchnorm
    from .ops.concat_conv import concat_conv1x1

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is visible")
    cases = CONCAT_CASES if cases is None else cases
    report = Report(machine_info(dev), str(dev), str(dtype).replace("torch.", ""))
    backends = concat_backends(dev, dtype)
    for name, why in backends.items():
        if why is not None:
            report.skipped[name] = why
    timed = timer(dev)
    for ci, (name, chans, cout, hw, cin_total) in enumerate(cases):
        if progress:
            print(f"[{ci + 1}/{len(cases)}] {name}", file=sys.stderr, flush=True)
        g = torch.Generator().manual_seed(100 + ci)
        cin = cin_total or sum(chans)
        xs = [torch.randn(1, c, hw, hw, generator=g).to(dev, dtype) for c in chans]
        conv = nn.Conv2d(cin, cout, 1, bias=False).to(dev, dtype)
        bn = nn.BatchNorm2d(cout).to(dev, dtype).eval()
        assert bn.running_mean is not None and bn.running_var is not None
        with torch.no_grad():
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
        scale, bias = fold_batchnorm(bn)
        scale, bias = scale.to(dev), bias.to(dev)
        c = sum(chans)

        def eager_fn(xs=xs, conv=conv, bn=bn, c=c):
            return torch.nn.functional.silu(bn(torch.nn.functional.conv2d(torch.cat(xs, 1), conv.weight[:, :c])))

        fns: Dict[str, Callable[..., object]] = {"eager (cat+conv+bn+silu)": eager_fn}
        if compile_eager:
            fns["torch.compile(eager)"] = torch.compile(eager_fn)
        for b, why in backends.items():
            if why is None:
                fns[b] = (lambda b=b, xs=xs, w=conv.weight, s=scale, bb=bias:
                          concat_conv1x1(xs, w, s, bb, "silu", None, b))
        with torch.no_grad():
            report.results += measure(name, fns, "eager (cat+conv+bn+silu)", timed, rounds, reps, warmup)
    return report
