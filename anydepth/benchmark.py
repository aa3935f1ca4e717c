"""Per-depth model benchmark: ``anydepth bench --model yolov12s-anydepth --imgsz 640``.

For every configuration of the model's depth ladder: GFLOPs (``torch.utils.flop_counter``; a
multiply-add counts as 2 FLOPs), parameters read, median latency and speedup against full depth,
plus the peer implementation (Ultralytics / HuggingFace eager) with the same weights at full depth.
All timings are interleaved round by round in one run, so the ratios share the machine's state.
Written as a table, JSON and a latency-vs-GFLOPs plot (PNG).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from anydepth_kernels.benchmark import machine_info, timer

from .registry import create_model


@dataclass
class Row:
    name: str
    code: str
    gflops: Optional[float]
    params_m: Optional[float]
    median_ms: float
    p10_ms: float
    p90_ms: float
    speedup_vs_full: float = 1.0
    skip: Dict[str, bool] = field(default_factory=dict)
    knobs: Dict[str, int] = field(default_factory=dict)

    @property
    def gflop_per_s(self) -> Optional[float]:
        """Achieved arithmetic rate: GFLOPs / median seconds."""
        return None if self.gflops is None else self.gflops / (self.median_ms / 1e3)


#: row-name suffixes of the lower-precision forms (``full+bf16``, ``base+int8``)
LOW_PRECISION = ("bf16", "int8")


@dataclass
class ModelReport:
    model: str
    imgsz: int
    batch: int
    device: str
    dtype: str
    rounds: int
    machine: Dict[str, str]
    rows: List[Row]
    peer: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    #: dense matrix-multiply rate measured in the same run (same device, dtype and threads): the
    #: practical ceiling for a conv network, against which ``GFLOP/s`` per row is read
    gemm_gflop_per_s: Optional[float] = None

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def table(self) -> str:
        head = (f"{'depth':<20}{'code':<24}{'GFLOPs':>9}{'params(M)':>11}{'median ms':>11}{'p10-p90 ms':>17}"
                f"{'speedup':>9}{'GFLOP/s':>9}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            g = f"{r.gflops:9.2f}" if r.gflops is not None else f"{'-':>9}"
            p = f"{r.params_m:11.2f}" if r.params_m is not None else f"{'-':>11}"
            rate = f"{r.gflop_per_s:9.0f}" if r.gflop_per_s is not None else f"{'-':>9}"
            lines.append(f"{r.name:<20}{r.code[:23]:<24}{g}{p}{r.median_ms:11.1f}"
                         f"{f'{r.p10_ms:.1f}-{r.p90_ms:.1f}':>17}{r.speedup_vs_full:8.2f}x{rate}")
        return "\n".join(lines)

    def summary(self) -> List[str]:
        full, base = self.row("full"), self.row("base")
        out = []
        if full.gflops and base.gflops:
            flop_ratio = full.gflops / base.gflops
            lat_ratio = full.median_ms / base.median_ms
            out.append(f"full/base: GFLOPs ratio {flop_ratio:.2f}, latency ratio {lat_ratio:.2f} "
                       f"(= {lat_ratio / flop_ratio:.2f} x the FLOP ratio)")
        names = {r.name for r in self.rows}
        if "full+ort" in names and "full+ort-multi" in names:
            saving = {form: 1 - self.row(f"base+{form}").median_ms / self.row(f"full+{form}").median_ms
                      for form in ("ort", "ort-multi")}
            eager_saving = 1 - base.median_ms / full.median_ms
            eff = saving["ort-multi"] / saving["ort"] if saving["ort"] > 0 else float("nan")
            out.append(f"onnxruntime base vs full: per-depth files save {saving['ort']:.0%}, the multi-depth file "
                       f"{saving['ort-multi']:.0%} (eager {eager_saving:.0%}); depth efficiency of the multi-depth "
                       f"file {eff:.2f} (its saving / the per-depth files')")
            over = [self.row(f"{r.name.split('+')[0]}+ort-multi").median_ms / r.median_ms
                    for r in self.rows if r.name.endswith("+ort")]
            out.append(f"multi-depth file vs per-depth files, same depth: {min(over):.2f}x-{max(over):.2f}x latency")
        for depth in ("full", "base"):
            for form in ("bf16", "int8"):
                if f"{depth}+{form}" in names and f"{depth}+compiled" in names:
                    base_row, fast = self.row(f"{depth}+compiled"), self.row(f"{depth}+{form}")
                    out.append(f"{depth}: {form} compiled vs float32 compiled: "
                               f"{base_row.median_ms / fast.median_ms:.2f}x "
                               f"({fast.median_ms:.1f} ms vs {base_row.median_ms:.1f} ms)")
            for form, what in (("fused", "fused inference form"), ("compiled", "optimize(compile=True)"),
                               ("ort", "onnxruntime (per-depth file)"), ("aoti", "AOTInductor package")):
                if f"{depth}+{form}" in names:
                    eager, fast = self.row(depth), self.row(f"{depth}+{form}")
                    out.append(f"{depth}: {what} vs eager: {eager.median_ms / fast.median_ms:.2f}x "
                               f"({fast.median_ms:.1f} ms vs {eager.median_ms:.1f} ms)")
        if self.gemm_gflop_per_s:
            peak = self.gemm_gflop_per_s
            out.append(f"dense matmul rate in this run: {peak:.0f} GFLOP/s ({self.dtype}); a conv network cannot "
                       f"run much faster than its GFLOPs at this rate")
            for depth in ("full", "base"):
                eager = self.row(depth)
                # the ceiling holds in the run's dtype: bf16 / int8 rows multiply faster than the
                # float32 matmul that was measured, so they are not read against it
                same = [r for r in self.rows
                        if r.name.split("+")[0] == depth and r.name.split("+")[-1] not in LOW_PRECISION]
                best = min(same, key=lambda r: r.median_ms)
                if eager.gflop_per_s:
                    out.append(f"{depth}: eager {eager.gflop_per_s:.0f} GFLOP/s = "
                               f"{eager.gflop_per_s / peak:.0%} of the "
                               f"matmul rate, fastest {self.dtype} form ({best.name}) {best.gflop_per_s / peak:.0%}; "
                               f"ceiling for any {self.dtype} speedup over eager at this FLOP count "
                               f"~{peak / eager.gflop_per_s:.2f}x")
        if self.peer is not None:
            peer = self.row("peer")
            out.append(f"full depth vs {self.peer} eager, same weights: {peer.median_ms / full.median_ms:.2f}x "
                       f"({full.median_ms:.1f} ms vs {peer.median_ms:.1f} ms)")
            for form in ("fused", "compiled"):
                if f"full+{form}" in names:
                    fast = self.row(f"full+{form}")
                    out.append(f"full+{form} vs {self.peer} eager, same weights: "
                               f"{peer.median_ms / fast.median_ms:.2f}x "
                               f"({fast.median_ms:.1f} ms vs {peer.median_ms:.1f} ms)")
            best_peer = min((r for r in self.rows if r.name.startswith("peer")), key=lambda r: r.median_ms)
            ours = [r for r in self.rows if r.name.split("+")[0] == "full"]
            for r in sorted(ours, key=lambda r: r.median_ms):
                out.append(f"{r.name} vs the best peer row ({self.peer} {best_peer.name}), full depth, same "
                           f"weights: {best_peer.median_ms / r.median_ms:.2f}x "
                           f"({r.median_ms:.1f} ms vs {best_peer.median_ms:.1f} ms)")
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary()
        return d


def build_with_peer(model_name: str, num_classes: int = 80, seed: int = 0):
    """``(ours, peer, peer_name, peer_call)``: our model with random well-conditioned weights and,
    when the peer package is installed, the peer implementation holding the same weights."""
    from .family import family_of

    note = None
    spec = family_of(model_name).peer
    if spec is not None:
        try:
            peer, ours = spec.build(model_name, num_classes, seed)
            return ours, peer, spec.name, spec.call, None
        except ImportError as e:
            note = f"peer not timed: {e}"
    from .testing import randomize_

    torch.manual_seed(seed)
    ours = create_model(model_name, num_classes=num_classes)
    randomize_(ours, seed)
    return ours.eval(), None, None, None, note


def run_model_benchmark(model_name: str, imgsz: int = 640, batch: int = 1, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, rounds: int = 7, warmup: int = 2,
                        peer: bool = True, fuse: bool = True, compile: bool = False,
                        progress: bool = True, onnx: bool = False, aoti: bool = False,
                        export_dir: Optional[str] = None, precisions: Sequence[str] = (),
                        calibration_batches: int = 4) -> ModelReport:
    """Per-depth latency of ``model_name`` (random well-conditioned weights): every ladder
    configuration eager, full/base in the fused inference form (``fuse``), full/base compiled with
    ``anydepth_kernels.optimize(model, compile=True)`` (``compile``; compile time is excluded and
    reported as a note) and the peer implementation at full depth, interleaved in ``rounds``.

    ``onnx``: also every ladder configuration in onnxruntime (CPU), from its per-depth file
    (``+ort``) and from the one multi-depth file (``+ort-multi``), exported by
    :func:`anydepth.export.export` (timed, not checked: the tests check) into ``export_dir`` (a temporary
    directory by default). ``aoti``: full and base as AOTInductor packages (``+aoti``).

    ``precisions``: ``"bf16"`` adds full and base through ``optimize(model, dtype=torch.bfloat16)``
    (``+bf16``), ``"int8"`` full and base through ``optimize(model, quantize="int8")`` calibrated on
    ``calibration_batches`` random images per depth (``+int8``; random weights: a latency
    measurement, not an accuracy one). Either one also times the float32 compiled rows, the
    baseline they are read against."""
    precisions = tuple(precisions)
    unknown = set(precisions) - {"bf16", "int8"}
    if unknown:
        raise ValueError(f"precisions: unknown {sorted(unknown)} (known: bf16, int8)")
    if precisions:
        if dtype != torch.float32:
            raise ValueError("the bf16 / int8 rows are read against float32 rows: run with dtype=torch.float32")
        compile = True
    dev = torch.device(device)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    log(f"building {model_name} (random weights{', with peer' if peer else ''}) ...")
    from .family import family_of

    num_classes = 1000 if family_of(model_name).task == "classify" else 80   # ImageNet / COCO heads
    ours, peer_model, peer_name, peer_call, note = build_with_peer(model_name, num_classes=num_classes)
    if not peer:
        peer_model = peer_name = None
    ours = ours.to(dev, dtype).eval()
    shape = (batch, 3, imgsz, imgsz)
    log("counting FLOPs of the depth ladder ...")
    ladder = ours.depth_configs(shape)
    names = []
    for i, c in enumerate(ladder):
        names.append("base" if i == 0 else "full" if i == len(ladder) - 1 else f"ladder{i}")
    gflops = {c: ours.flops(c, shape) / 1e9 for c in ladder}
    params = {c: ours.params_used(c, shape) / 1e6 for c in ladder}
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
    fns: Dict[str, Callable[[], object]] = {}
    for n, c in zip(names, ladder):
        fns[n] = (lambda c=c: ours(x, depth=c))
    fused = None
    if fuse:
        import copy

        if hasattr(ours, "to_inference"):
            log("building the fused inference form ...")
            fused = copy.deepcopy(ours).to_inference()
            fns["full+fused"] = lambda: fused(x, depth=ladder[-1])
            fns["base+fused"] = lambda: fused(x, depth=ladder[0])
    compile_notes = []
    if compile:
        import copy
        import time

        from anydepth_kernels import optimize

        compiled = optimize(copy.deepcopy(ours), compile=True)
        for tag, c in (("full", ladder[-1]), ("base", ladder[0])):
            log(f"compiling {tag} depth (torch.compile, Inductor with freezing) ...")
            t0 = time.perf_counter()
            with torch.inference_mode():
                compiled(x, depth=c)
            compile_notes.append(f"{tag}+compiled: first call (compilation) took {time.perf_counter() - t0:.0f} s")
            fns[f"{tag}+compiled"] = (lambda c=c: compiled(x, depth=c))
    extra_rows: List[Tuple[str, object]] = []
    if "bf16" in precisions:
        import copy
        import time

        from anydepth_kernels import optimize

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bf16 = optimize(copy.deepcopy(ours), dtype=torch.bfloat16)
        compile_notes += [f"bf16: {w.message}" for w in caught]
        for tag, c in (("full", ladder[-1]), ("base", ladder[0])):
            log(f"compiling {tag} depth in bfloat16 ...")
            t0 = time.perf_counter()
            with torch.inference_mode():
                bf16(x, depth=c)
            compile_notes.append(f"{tag}+bf16: first call (compilation) took {time.perf_counter() - t0:.0f} s")
            fns[f"{tag}+bf16"] = (lambda c=c: bf16(x, depth=c))
            extra_rows.append((f"{tag}+bf16", c))
    if "int8" in precisions:
        import time

        from anydepth_kernels import optimize

        g = torch.Generator().manual_seed(1)
        calib = [torch.rand(shape, generator=g).to(dev) for _ in range(calibration_batches)]
        log(f"quantizing to int8 (PT2E, {calibration_batches} calibration batches per depth) ...")
        t0 = time.perf_counter()
        int8 = optimize(ours, quantize="int8", calibration=calib, depths=[ladder[-1], ladder[0]])
        compile_notes.append(f"int8: trace + calibration of 2 depths took {time.perf_counter() - t0:.0f} s")
        for tag, c in (("full", ladder[-1]), ("base", ladder[0])):
            log(f"compiling {tag} depth in int8 ...")
            t0 = time.perf_counter()
            int8(x, depth=c)
            compile_notes.append(f"{tag}+int8: first call (compilation) took {time.perf_counter() - t0:.0f} s; "
                                 f"max |int8 - fp32| on a calibration batch {int8.max_abs_diff[c]:.3g}")
            fns[f"{tag}+int8"] = (lambda c=c: int8(x, depth=c))
            extra_rows.append((f"{tag}+int8", c))
    if onnx or aoti:
        import tempfile

        from .export import export, ort_session, onnx_depth_inputs, aoti_load

        if dev.type != "cpu" or dtype != torch.float32:
            raise ValueError("the ONNX / AOTInductor rows are measured on the CPU in float32")
        where = export_dir or tempfile.mkdtemp(prefix="anydepth-export-")
        threads = torch.get_num_threads()
        xn = x.numpy()
        if onnx:
            log(f"exporting ONNX (every depth + the multi-depth file) to {where} ...")
            # not checked against eager here (tests/test_export.py does): with random weights RT-DETR's
            # query selection ties (border anchors share one score), and any two top-k implementations
            # may pick different ones among equals
            res = export(ours, where, format="onnx", depth="all", imgsz=imgsz, batch=batch, name=model_name,
                         check=False)
            multi_sess = ort_session(res.file("multi").path, threads)
            compile_notes.append(f"ONNX export (trace, per-depth + multi-depth files): {res.seconds:.0f} s; "
                                 f"multi-depth file {res.file('multi').size_bytes / 2**20:.1f} MB, full-depth file "
                                 f"{res.file(ladder[-1].code).size_bytes / 2**20:.1f} MB")
            for n, c in zip(names, ladder):
                sess = ort_session(res.file(c.code).path, threads)
                fns[f"{n}+ort"] = (lambda s=sess: s.run(None, {"images": xn}))
                feeds = {"images": xn, **onnx_depth_inputs(ours, c)}
                fns[f"{n}+ort-multi"] = (lambda f=feeds: multi_sess.run(None, f))
                extra_rows += [(f"{n}+ort", c), (f"{n}+ort-multi", c)]
        if aoti:
            log(f"exporting AOTInductor packages (full, base) to {where} ...")
            res = export(ours, where, format="aoti", depth=[ladder[-1], ladder[0]], imgsz=imgsz, batch=batch,
                         name=model_name, check=False)
            compile_notes.append(f"AOTInductor export of 2 packages (trace + compile): {res.seconds:.0f} s")
            for n, c in (("full", ladder[-1]), ("base", ladder[0])):
                runner = aoti_load(res.file(c.code).path)
                fns[f"{n}+aoti"] = (lambda r=runner: r(x))
                extra_rows.append((f"{n}+aoti", c))
    if peer_model is not None:
        peer_model = peer_model.to(dev, dtype).eval()
        fns["peer"] = lambda: peer_call(peer_model, x)
        if compile:
            import copy
            import time

            # the peer under torch.compile with the same Inductor options as ours (weights frozen):
            # what a user of the peer package would compare with
            from anydepth_kernels.optimize import compile_frozen_

            peer_compiled = compile_frozen_(copy.deepcopy(peer_model))
            log(f"compiling the peer ({peer_name}, torch.compile, Inductor with freezing) ...")
            t0 = time.perf_counter()
            with torch.inference_mode():
                peer_call(peer_compiled, x)
            compile_notes.append(f"peer+compiled: first call (compilation) took {time.perf_counter() - t0:.0f} s")
            fns["peer+compiled"] = lambda: peer_call(peer_compiled, x)
    timed = timer(dev)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for k, fn in fns.items():
            for _ in range(warmup):
                fn()
        for r in range(rounds):
            for k, fn in fns.items():
                times[k].append(timed(fn))
            log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.0f}ms" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}

    def pct(v, q):
        s = sorted(v)
        return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]

    rows = []
    for n, c in zip(names, ladder):
        rows.append(Row(n, c.code, gflops[c], params[c], med[n], pct(times[n], 0.1), pct(times[n], 0.9),
                        med["full"] / med[n], dict(c.skip), dict(c.knobs)))
    for n, c in (("full+fused", ladder[-1]), ("base+fused", ladder[0]),
                 ("full+compiled", ladder[-1]), ("base+compiled", ladder[0])):
        if n in fns:
            rows.append(Row(n, c.code, gflops[c], params[c], med[n], pct(times[n], 0.1), pct(times[n], 0.9),
                            med["full"] / med[n], dict(c.skip), dict(c.knobs)))
    for n, c in extra_rows:
        rows.append(Row(n, c.code, gflops[c], params[c], med[n], pct(times[n], 0.1), pct(times[n], 0.9),
                        med["full"] / med[n], dict(c.skip), dict(c.knobs)))
    for n in ("peer", "peer+compiled"):
        if n in fns:
            rows.append(Row(n, peer_name, None, sum(p.numel() for p in peer_model.parameters()) / 1e6,
                            med[n], pct(times[n], 0.1), pct(times[n], 0.9), med["full"] / med[n]))
    report = ModelReport(model_name, imgsz, batch, str(dev), str(dtype).replace("torch.", ""), rounds,
                         machine_info(dev), rows, peer_name, gemm_gflop_per_s=gemm_rate(dev, dtype))
    if note:
        report.notes.append(note)
    report.notes.extend(compile_notes)
    return report


def gemm_rate(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an ``n x n`` by ``n x n`` matrix multiply on ``device`` in ``dtype`` with the current
    thread count (median of ``repeats`` after one warm-up): the practical compute ceiling the
    model rows are compared with."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(n, n, generator=g).to(device, dtype)
    b = torch.rand(n, n, generator=g).to(device, dtype)
    timed = timer(torch.device(device))
    with torch.inference_mode():
        torch.matmul(a, b)
        ms = statistics.median(timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    return 2 * n**3 / (ms / 1e3) / 1e9


def device_tag(report: ModelReport) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", report.machine.get("gpu", "cpu")).strip("-").lower()


def save_model_report(report: ModelReport, out_dir: str) -> Tuple[str, Optional[str]]:
    """Write ``<model>-<imgsz>-<device>.json`` and the latency-vs-GFLOPs ``.png``; return paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"model-{report.model}-{report.imgsz}-{device_tag(report)}-{report.dtype}")
    with open(stem + ".json", "w") as f:
        json.dump(report.to_json(), f, indent=1)
    png = None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in report.rows if r.gflops is not None and "+" not in r.name]
        fused_rows = [r for r in report.rows if "+fused" in r.name]
        compiled_rows = [r for r in report.rows if "+compiled" in r.name]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ax.plot([r.gflops for r in rows], [r.median_ms for r in rows], "o-",
                label=f"{report.model} (one set of weights)")
        for r in rows:
            ax.annotate(r.name, (r.gflops, r.median_ms), textcoords="offset points", xytext=(4, -10), fontsize=7)
        if fused_rows:
            ax.plot([r.gflops for r in fused_rows], [r.median_ms for r in fused_rows], "s--",
                    label="fused inference form (model.to_inference())")
        if compiled_rows:
            ax.plot([r.gflops for r in compiled_rows], [r.median_ms for r in compiled_rows], "^:",
                    label="optimize(compile=True)")
        if report.peer:
            peer = report.row("peer")
            full = report.row("full")
            ax.plot([full.gflops], [peer.median_ms], "x", color="red", label=f"{report.peer} eager (full)")
        ax.set_xlabel("GFLOPs (multiply-add = 2)")
        ax.set_ylabel("median latency (ms)")
        where = report.machine.get("gpu") or report.machine.get("cpu", "")
        ax.set_title(f"{report.model} @ {report.imgsz}, batch {report.batch}, {report.device}\n{where}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        png = stem + ".png"
        fig.savefig(png)
        plt.close(fig)
    except ImportError:
        report.notes.append("matplotlib not installed: no plot written (pip install \"anydepth[plot]\")")
    return stem + ".json", png
