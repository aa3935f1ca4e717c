"""One-shot GPU check: build, verify and measure everything in one command that fits a 10-minute
window on a fresh GPU machine (``make gpu-check``, or ``python -m anydepth.gpucheck run``).

GPU time is scarce: a machine is lent for minutes, start-up included. So one command builds the
extensions for the machine's own architecture (failing loudly), runs the GPU tests (with a per-test
timeout) next to compute-sanitizer (memcheck of every CUDA and Triton kernel on tiny ragged
shapes, racecheck of the CUDA deformable-attention backward), then the per-depth end-to-end
benchmark of YOLOv12-s and RT-DETR-R50 (eager, fused, CUDA graphs of both; fp32 and fp16) and the
kernel benchmarks against eager and ``torch.compile``. A global time budget shrinks or skips the
later steps. Everything lands in at most 8 files in ``--out`` (``summary.txt`` first: every step
with its status and time, the failures, the target checks; then the logs and two archives: the
JUnit XML files and the JSON reports).

``--rehearse`` (the default when no CUDA device is visible) runs every step that can run on a
CPU at tiny sizes (Triton through its interpreter, CPU kernels, the benchmark code paths, the
output files), so the day a GPU is lent does not find a broken script; ``tests/test_gpucheck.py``
runs the rehearsal.

The orchestrator (``run``) imports only the standard library: the package may not be built yet
when it starts. Each step is a subprocess (``python -m anydepth.gpucheck e2e|kbench|sanitize``)
in its own process group, killed with its children when its time is up.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]

#: the test files whose ``gpu``-marked tests run on the GPU: every test file that marks one
GPU_TEST_FILES = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py")
                        if "mark.gpu" in f.read_text(errors="replace"))
#: the Triton file whose unmarked tests run on CUDA tensors when a GPU is visible
TRITON_ON_CUDA_FILE = "tests/test_triton_conv_norm_act.py"
#: files with Triton cases on CPU tensors (``--only-triton-cpu`` selects them): on a GPU machine they
#: run in a separate process with CUDA hidden and the interpreter on
INTERPRETER_TEST_FILES = ["tests/test_attention.py", "tests/test_ms_deform_attn.py", "tests/test_conv_norm_act.py",
                          "tests/test_concat_conv.py"]

#: the targets of issue 13, checked from the JSON reports (name, report stem, how)
TARGETS_DOC = """targets (ratios measured in this run):
  yolov12s-anydepth fp16 @640 b1, CUDA graph of the fused model: full <= 1.0 ms, base <= 0.7 ms;
    depth efficiency = (FLOPs base / full) / (latency base / full) >= 0.9
  rtdetr-r50-anydepth fp32 and fp16 @640 b1, CUDA graph: full <= 3 ms
  ms_deform_attn fp16, RT-DETR decoder @640: cuda or triton >= 5x the grid_sample reference fwd,
    >= 1.5x torch.compile(reference) fwd, fwd+bwd >= 3x the reference
  Triton attention at YOLOv12 area-attention shapes: within 1.2x of PyTorch SDPA"""


# ----------------------------------------------------------------------------- orchestration
class Check:
    def __init__(self, out: Path, budget_s: float, rehearse: bool, python: str):
        self.out, self.rehearse, self.python = out, rehearse, python
        self.t0 = time.time()
        self.deadline = self.t0 + budget_s
        self.total = budget_s
        self.work = Path(tempfile.mkdtemp(prefix="gpucheck."))
        (self.work / "res").mkdir()
        self.summary = out / "summary.txt"
        self.summary.write_text("")
        self.failed: List[str] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        if rehearse:
            self.env["TRITON_INTERPRET"] = "1"
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            self.env.pop("TRITON_INTERPRET", None)
            self.env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        self.env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))

    def elapsed(self) -> int:
        return int(time.time() - self.t0)

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():4d}s] {msg}"
        print(line, flush=True)
        with open(self.summary, "a") as f:
            f.write(line + "\n")

    def budget(self, want: float, reserve: float, least: float = 20) -> float:
        """``want`` seconds, or less so that ``reserve`` seconds stay for the later steps; 0 (skip)
        when less than ``least`` would be left."""
        t = min(want, self.left() - reserve)
        if t < least:
            t = min(least, self.left() - 5)
        return t if t >= least else 0

    def start(self, name: str, cmd: Sequence[str], logfile: Path, env: Optional[dict] = None):
        f = open(logfile, "a")
        f.write(f"\n######## {name}: {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env or self.env,
                                start_new_session=True)
        return proc, f, time.time()

    def finish(self, name: str, handle, timeout: float, critical: bool = True) -> int:
        proc, f, t = handle
        try:
            rc = proc.wait(timeout=max(1.0, timeout - (time.time() - t)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
        f.write(f"######## {name}: rc={rc}\n")
        f.close()
        self.log(f"{'ok  ' if rc == 0 else 'FAIL'} {name} rc={rc} ({time.time() - t:.0f}s, limit {timeout:.0f}s)"
                 + (" TIMED OUT" if rc == 124 else ""))
        if rc != 0 and critical:
            self.failed.append(name)
        return rc

    def step(self, name: str, cmd: Sequence[str], logfile: Path, timeout: float, env=None, critical=True) -> int:
        if timeout <= 0:
            self.log(f"SKIP {name} (time budget)")
            return 99
        return self.finish(name, self.start(name, cmd, logfile, env), timeout, critical)

    def sub(self, *args: str) -> List[str]:
        return [self.python, "-m", "anydepth.gpucheck", *args]


def _environment(c: Check) -> None:
    lines = []
    if not c.rehearse and shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True)
        lines.append("nvidia-smi: " + r.stdout.strip())
    for tool in ("nvcc", "compute-sanitizer", "gcc"):
        lines.append(f"{tool}: {shutil.which(tool)}")
    probe = ("import importlib, sys, torch\n"
             "print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda)\n"
             "print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (CPU)')\n"
             "for m in ('triton', 'setuptools', 'ninja', 'pytest', 'xdist', 'pytest_timeout', 'transformers',"
             " 'ultralytics', 'pycocotools', 'numpy'):\n"
             "    try: print(f'  {m:15s}', getattr(importlib.import_module(m), '__version__', 'present'))\n"
             "    except Exception as e: print(f'  {m:15s} MISSING ({type(e).__name__})')\n")
    r = subprocess.run([c.python, "-c", probe], capture_output=True, text=True, env=c.env)
    lines += [r.stdout.strip(), r.stderr.strip()[-2000:]]
    (c.out / "env_build.log").write_text("\n".join(x for x in lines if x) + "\n")
    for line in lines:
        for key in ("nvidia-smi:", "python "):
            if line.startswith(key):
                c.log("env: " + line.splitlines()[0])
        if line.startswith("device"):
            c.log("env: " + line.splitlines()[0])


def _build(c: Check) -> None:
    log = c.out / "env_build.log"
    cmd = [c.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v", "-e", "."]
    env = dict(c.env, ANYDEPTH_BUILD_CUDA="1")  # fails the build if CUDA cannot be built
    rc = c.step("build (sm_%s, %s jobs)" % (c.env["TORCH_CUDA_ARCH_LIST"], c.env["MAX_JOBS"]), cmd, log,
                c.budget(300, min(200.0, 0.5 * c.total), least=60), env=env)
    if rc != 0:
        tail = log.read_text().splitlines()[-15:]
        c.log("build failed, last lines:\n    " + "\n    ".join(tail))


def _extension_info(c: Check) -> None:
    info = subprocess.run([c.python, "-c", "import anydepth_kernels as a, json; print(json.dumps(a.extension_info()))"],
                          capture_output=True, text=True, env=c.env, cwd=REPO)
    text = info.stdout.strip() or info.stderr.strip()[-500:]
    c.log("extension_info: " + text)
    (c.work / "res" / "extension_info.json").write_text(text + "\n")
    try:
        ext = json.loads(info.stdout)
        if not c.rehearse and not (ext["cuda"]["available"] and ext["triton"]["available"]):
            c.failed.append("extensions (CUDA or Triton unavailable)")
    except (ValueError, KeyError):
        c.failed.append("extension_info")


def _pytest_cmd(c: Check, junit: str, workers: int) -> List[str]:
    cmd = [c.python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", "--continue-on-collection-errors",
           f"--junitxml={c.work / 'res' / junit}"]
    probe = subprocess.run([c.python, "-c", "import xdist, pytest_timeout"], capture_output=True, env=c.env)
    if probe.returncode == 0:
        cmd += ["--timeout=150"] + (["-n", str(workers)] if workers > 1 else [])
    return cmd


#: a loop bounded by a scalar kernel argument, as every kernel here has. Triton 3.6's interpreter
#: turns scalar arguments into 1-element arrays and ``range()`` calls ``int()`` on them, which
#: NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): there
#: the interpreter cannot run any of these kernels (the compiled kernels are unaffected).
_INTERPRETER_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def _probe(x_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n, BLOCK):
        acc += tl.load(x_ptr + i + tl.arange(0, BLOCK))
    tl.store(x_ptr + tl.arange(0, BLOCK), acc)
x = torch.ones(8)
_probe[(1,)](x, 8, BLOCK=4)
assert x[:4].tolist() == [2.0] * 4, x
"""


def _interpreter_defect(c: Check, env: dict) -> Optional[str]:
    """None when this Triton's interpreter runs a scalar-bounded loop, else why not (with the
    Triton and NumPy versions)."""
    r = subprocess.run([c.python, "-c", _INTERPRETER_PROBE], capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode == 0:
        return None
    v = subprocess.run([c.python, "-c", "import triton, numpy; print(triton.__version__, numpy.__version__)"],
                       capture_output=True, text=True, env=env).stdout.split()
    last = (r.stderr.strip().splitlines() or ["?"])[-1][:200]
    return (f"this machine's Triton interpreter (triton {v[0] if v else '?'}, numpy {v[1] if len(v) > 1 else '?'}) "
            f"cannot run a loop bounded by a scalar kernel argument ({last}); the interpreter cases run in CI "
            "(Triton 3.8), the compiled kernels run in the GPU tests")


def _tests_and_sanitizer(c: Check) -> None:
    T = c.budget(150, min(230.0, 0.35 * c.total), least=60)
    if T <= 0:
        c.log("SKIP tests and sanitizer (time budget)")
        return
    files = [f for f in GPU_TEST_FILES if (REPO / f).exists()]
    pylog_gpu, pylog_tri, san = c.work / "pytest-gpu.log", c.work / "pytest-triton.log", c.out / "sanitizer.log"
    pylog_int = c.work / "pytest-interpreter.log"
    running = []
    if c.rehearse:  # the GPU tests skip here; one small CPU file shows the pytest plumbing works
        running.append(("pytest -m gpu", c.start("pytest -m gpu", _pytest_cmd(c, "junit-gpu.xml", 1) + [
            "-m", "gpu", *files], pylog_gpu)))
    else:
        env = dict(c.env, TORCHINDUCTOR_COMPILE_THREADS="1")
        running.append(("pytest -m gpu", c.start("pytest -m gpu", _pytest_cmd(c, "junit-gpu.xml", 6) + [
            "-m", "gpu", *files], pylog_gpu, env)))
        cmd = _pytest_cmd(c, "junit-triton.xml", 4) + [
            "-m", "not gpu", TRITON_ON_CUDA_FILE, "--deselect", f"{TRITON_ON_CUDA_FILE}::test_aot_compile"]
        running.append(("pytest triton-on-cuda", c.start("pytest triton-on-cuda", cmd, pylog_tri)))
    # the Triton-on-CPU-tensor cases (the interpreter) in their own process without CUDA
    interp_env = dict(c.env, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    broken = _interpreter_defect(c, interp_env)
    if broken:
        c.log(f"SKIP pytest triton interpreter: {broken}")
    else:
        running.append(("pytest triton interpreter", c.start("pytest triton interpreter", _pytest_cmd(
            c, "junit-interpreter.xml", 1 if c.rehearse else 4) + ["--only-triton-cpu", *INTERPRETER_TEST_FILES] + (
            ["-k", "saved_log_sum_exp"] if c.rehearse else []), pylog_int, interp_env)))
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer and not c.rehearse:
        env = dict(c.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        cmd = [sanitizer, "--tool", "memcheck", "--leak-check", "no", "--report-api-errors", "no",
               "--print-limit", "30", "--error-exitcode", "3", *c.sub("sanitize", "memcheck")]
        running.append(("sanitizer memcheck", c.start("sanitizer memcheck", cmd, san, env)))
    else:
        why = "rehearsal: the workload runs without compute-sanitizer" if c.rehearse else "compute-sanitizer not found"
        san.write_text(f"{why}\n")
        running.append(("sanitizer memcheck (workload only)",
                        c.start("sanitizer memcheck (workload only)", c.sub("sanitize", "memcheck"), san)))
    for name, handle in running:
        c.finish(name, handle, T + (20 if "sanitizer" in name else 0))
    if sanitizer and not c.rehearse and c.left() > 150:
        c.step("sanitizer racecheck (CUDA ms_deform_attn backward)", [
            sanitizer, "--tool", "racecheck", "--print-limit", "30", "--error-exitcode", "3",
            *c.sub("sanitize", "racecheck")], san, c.budget(60, 140))
    with open(c.out / "pytest.log", "w") as f:
        for name, path in (("pytest -m gpu", pylog_gpu), ("pytest triton-on-cuda", pylog_tri),
                           ("pytest triton interpreter", pylog_int)):
            if path.exists():
                f.write(f"######## {name}\n{path.read_text()}\n")
                tail = [ln for ln in path.read_text().splitlines() if " in " in ln and ("passed" in ln or "failed" in ln
                                                                                     or "skipped" in ln)]
                c.log(f"{name}: {tail[-1].strip('= ') if tail else 'no result line'}")
                for ln in path.read_text().splitlines():
                    if ln.startswith(("FAILED ", "ERROR ")):
                        c.log("  " + ln[:200])
    text = san.read_text()
    for ln in text.splitlines():
        if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln:
            c.log("sanitizer: " + ln.strip("= "))


#: default plan, in priority order (a short budget drops the tail): model:dtype, and
#: dtype[+compile]:family/family
DEFAULT_E2E = ("yolov12s-anydepth:float16,rtdetr-r50-anydepth:float32,rtdetr-r50-anydepth:float16,"
               "yolov12s-anydepth:float32")
DEFAULT_KBENCH = ("float16:msda/attention/conv/concat,float32:conv/concat/attention/msda/basis,"
                  "float32+compile:conv/concat/attention/msda")


def _benchmarks(c: Check, e2e_plan: str, kbench_plan: str) -> None:
    blog = c.out / "bench.log"
    res = str(c.work / "res")
    e2e = [tuple(x.split(":")) for x in e2e_plan.split(",") if x]
    kb = []
    for x in kbench_plan.split(","):
        if x:
            dt, fams = x.split(":")
            kb.append((dt.split("+")[0], dt.endswith("+compile"), fams.replace("/", ",")))
    if c.rehearse:
        e2e = [("yolov12n-anydepth", "float32"), ("rtdetr-r18-anydepth", "float32")]
        e2e_args = ["--imgsz", "64", "--max-depths", "2", "--reps", "1", "--device", "cpu", "--small"]
        kb = [("float32", False, "conv,concat,attention,msda,basis")]
    else:
        e2e_args = ["--imgsz", "640", "--budget", "25"]
    for i, (model, dt) in enumerate(e2e):
        later = 25 * (len(e2e) - i - 1) + (40 if kb else 0)
        c.step(f"e2e {model} {dt}", c.sub("e2e", model, dt, res, *e2e_args), blog, c.budget(60, later, least=30))
    for i, (dt, comp, fams) in enumerate(kb):
        args = ["kbench", res, dt, fams] + (["--compile"] if comp else [])
        args += ["--tiny", "--device", "cpu"] if c.rehearse else []
        c.step(f"kernel benchmarks {dt}{' +torch.compile' if comp else ''} ({fams})", c.sub(*args), blog,
               c.budget(150 if comp else 60, 5 + 30 * (len(kb) - i - 1), least=20))


def _targets(c: Check) -> None:
    res = c.work / "res"
    lines = []

    def load(name):
        p = res / name
        return json.loads(p.read_text()) if p.exists() else None

    for model, limits in (("yolov12s-anydepth", {"full": 1.0, "base": 0.7}), ("rtdetr-r50-anydepth", {"full": 3.0})):
        for dt in ("float16", "float32"):
            rep = load(f"e2e-{model}-{dt}.json")
            if not rep or not rep["rows"]:
                continue
            rows = rep["rows"]
            full, base = rows[-1], rows[0]
            form = "graph_fused_ms" if "graph_fused_ms" in full else "graph_eager_ms"
            if form not in full:
                why = full.get("graph_fused_error") or full.get("graph_eager_error")
                lines.append(f"  {model} {dt}: no CUDA-graph timing ({why})")
                continue
            targeted = dt == "float16" or "rtdetr" in model
            msg = [f"full {full[form]:.2f} ms" + (f" (target <= {limits['full']})" if targeted else "")]
            if form in base and base is not full:
                target = f" (target <= {limits['base']})" if "base" in limits and dt == "float16" else ""
                msg.append(f"base {base[form]:.2f} ms" + target)
                eff = (base["gflops"] / full["gflops"]) / (base[form] / full[form])
                msg.append(f"depth efficiency {eff:.2f}")
            lines.append(f"  {model} {dt} [{form.replace('_ms', '')}]: " + ", ".join(msg))
    rep = load("ms_deform_attn-float16.json")
    if rep:
        by = {(r["case"], r["backend"]): r for r in rep["results"]}
        for case in sorted({r["case"] for r in rep["results"] if "decoder" in r["case"]}):
            parts = [f"{b} {by[(case, b)]['speedup_vs_eager']:.1f}x" for b in ("cuda", "triton") if (case, b) in by]
            lines.append(f"  ms_deform_attn fp16 {case}: " + ", ".join(parts) + " vs reference")
    rep = load("ms_deform_attn-float16-compiled.json") or load("ms_deform_attn-float32-compiled.json")
    if rep:
        by = {(r["case"], r["backend"]): r for r in rep["results"]}
        for case in sorted({r["case"] for r in rep["results"] if "decoder" in r["case"] and r["case"].endswith("fwd")}):
            comp = by.get((case, "torch.compile(reference)"))
            for b in ("cuda", "triton"):
                if comp and (case, b) in by:
                    ratio = comp["median_ms"] / by[(case, b)]["median_ms"]
                    lines.append(f"  ms_deform_attn {rep['dtype']} {case}: {b} {ratio:.2f}x "
                                 "vs torch.compile(reference)")
    for dt in ("float16", "float32"):
        rep = load(f"attention-{dt}.json")
        if rep:
            by = {(r["case"], r["backend"]): r for r in rep["results"]}
            for case in sorted({r["case"] for r in rep["results"] if "area" in r["case"]}):
                if (case, "triton") in by and (case, "sdpa") in by:
                    ratio = by[(case, "triton")]["median_ms"] / by[(case, "sdpa")]["median_ms"]
                    lines.append(f"  attention {dt} {case}: triton / sdpa = {ratio:.2f} (target <= 1.2)")
    c.log(TARGETS_DOC)
    c.log("measured:\n" + ("\n".join(lines) if lines else "  (no GPU reports)"))


def run(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="anydepth.gpucheck run", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "bench/results/gpu")
    p.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET_S", 500)),
                   help="seconds of wall time for everything (later steps shrink or are skipped)")
    p.add_argument("--rehearse", action="store_true", help="CPU rehearsal at tiny sizes (default without CUDA)")
    p.add_argument("--skip-build", action="store_true", help="reuse the in-place build")
    p.add_argument("--steps", default="build,tests,bench", help="comma list of build,tests,bench")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--e2e", default=DEFAULT_E2E, help="end-to-end runs, model:dtype comma list, in priority order")
    p.add_argument("--kbench", default=DEFAULT_KBENCH,
                   help="kernel benchmark runs, dtype[+compile]:family/family comma list (families: conv, "
                        "concat, attention, msda, basis); '' for none")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rehearse = a.rehearse or not _cuda_visible(a.python)
    c = Check(out, a.budget, rehearse, a.python)
    steps = set(a.steps.split(","))
    c.log(f"anydepth gpu-check: {'CPU REHEARSAL (tiny sizes, no GPU)' if rehearse else 'GPU'}; budget {a.budget:.0f}s; "
          f"out {out}")
    _environment(c)
    if "build" in steps and not a.skip_build and not rehearse:
        _build(c)
    elif "build" in steps:
        c.log("build skipped (" + ("rehearsal: " if rehearse else "") + "the in-place build is used)")
    _extension_info(c)
    if "tests" in steps:
        _tests_and_sanitizer(c)
    if "bench" in steps:
        _benchmarks(c, a.e2e, a.kbench)
    _targets(c)
    res = c.work / "res"
    with tarfile.open(out / "junit.tgz", "w:gz") as t:
        for f in sorted(res.glob("junit-*.xml")):
            t.add(f, arcname=f.name)
    with tarfile.open(out / "results.tgz", "w:gz") as t:
        for f in sorted(res.glob("*.json")):
            t.add(f, arcname=f.name)
    c.log(("FAILED: " + "; ".join(c.failed)) if c.failed else "all steps passed")
    c.log(f"done in {c.elapsed()}s; files: {' '.join(sorted(x.name for x in out.iterdir()))}")
    shutil.rmtree(c.work, ignore_errors=True)
    return 1 if c.failed else 0


def _cuda_visible(python: str) -> bool:
    r = subprocess.run([python, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                       capture_output=True)
    return r.returncode == 0


# ----------------------------------------------------------------------------- workers
def sanitize(argv: Sequence[str]) -> int:
    """Tiny calls of every CUDA and Triton kernel (ragged shapes, fwd+bwd) for compute-sanitizer:
    ``memcheck`` (all kernels, fp32 and bf16) or ``racecheck`` (the CUDA deformable-attention
    backward, whose atomics are the shared-memory risk). On the CPU (rehearsal) the same calls run
    with the CPU tensors through the Triton interpreter and the C++ kernels."""
    import torch

    import anydepth_kernels as ak

    tool = argv[0] if argv else "memcheck"
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator().manual_seed(0)
    native = "cuda" if cuda else "cpp"

    def r(*s, dt=torch.float32, grad=False):
        t = torch.randn(*s, generator=g).to(dev, dt)
        return t.requires_grad_() if grad else t

    def tables(shapes):
        ss = torch.tensor(shapes, dtype=torch.int64)
        hw = ss.prod(1)
        return ss.to(dev), torch.cat([hw.new_zeros(1), hw.cumsum(0)[:-1]]).to(dev), int(hw.sum())

    def msda(dt, backend, nq=11):
        ss, st, S = tables([(5, 6), (1, 7), (3, 3)])
        val = r(2, S, 3, 20, dt=dt, grad=True)
        loc = (torch.rand(2, nq, 3, 3, 4, 2, generator=g) * 1.6 - 0.3).to(dev, dt).requires_grad_()
        att = torch.rand(2, nq, 3, 3, 4, generator=g).to(dev, dt).requires_grad_()
        ak.ms_deform_attn(val, ss, st, loc, att, backend=backend).backward(r(2, nq, 60, dt=dt))

    calls = 0
    if tool == "racecheck":
        for dt in (torch.float32, torch.float16):
            msda(dt, native, nq=33)
            calls += 1
    else:
        dtypes = (torch.float32, torch.bfloat16) if cuda else (torch.float32,)
        for dt in dtypes:
            for n, ci, co, h, w, s, k in [(1, 3, 17, 5, 7, 1, 1), (2, 17, 40, 9, 12, 2, 1), (1, 5, 9, 7, 6, 1, 3)] + (
                    [(2, 24, 136, 65, 63, 1, 1)] if cuda else []):
                oh, ow = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
                for b in ("triton", native):
                    x, wt = r(n, ci, h, w, dt=dt), r(co, ci, k, k, dt=dt)
                    ak.conv_norm_act(x, wt, r(co), r(co), s, k // 2, 1, 1, "silu", r(n, co, oh, ow, dt=dt), backend=b)
                    ak.conv_norm_act(x.contiguous(memory_format=torch.channels_last), wt, r(co), r(co), s, k // 2,
                                     backend=b)
                    calls += 2
            y = r(2, 34, 7, 9, dt=dt)
            a, b_ = y.split([17, 17], 1)
            xs = [a, b_, r(2, 5, 7, 9, dt=dt), r(2, 33, 7, 9, dt=dt), r(2, 3, 7, 9, dt=dt)]
            ak.concat_conv1x1(xs, r(70, 17 + 17 + 5 + 33 + 3 + 9, 1, 1, dt=dt), r(70), r(70), "silu",
                              r(2, 70, 7, 9, dt=dt), backend="triton")
            calls += 1
            for B, H, NQ, NK, D in [(1, 2, 37, 53, 20), (1, 1, 65, 31, 80), (2, 1, 5, 3, 128)]:
                q, k_, v = (r(B, H, n_, D, dt=dt, grad=True) for n_ in (NQ, NK, NK))
                ak.attention(q, k_, v, backend="triton").backward(r(B, H, NQ, D, dt=dt))
                calls += 1
            for fmt in (torch.contiguous_format, torch.channels_last):
                qkv = r(1, 3 * 64, 6, 8, dt=dt).contiguous(memory_format=fmt).requires_grad_()
                o, vm = ak.area_attention(qkv, 2, 4, backend="triton")
                torch.autograd.backward((o, vm), (torch.ones_like(o), torch.ones_like(vm)))
                calls += 1
            for b in ("triton", native):
                msda(dt, b)
                calls += 1
    if cuda:
        torch.cuda.synchronize()
    print(f"{tool} workload done: {calls} kernel calls on {dev}", flush=True)
    return 0


def e2e(argv: Sequence[str]) -> int:
    """Per-depth latency of one model, batch 1: eager, fused (``to_inference()``) and CUDA graphs
    of both (:class:`anydepth_kernels.CUDAGraphRunner`), with each output's relative error against
    eager. Writes ``e2e-<model>-<dtype>.json`` after every depth (a timeout keeps what was done)."""
    p = argparse.ArgumentParser(prog="anydepth.gpucheck e2e")
    p.add_argument("model")
    p.add_argument("dtype")
    p.add_argument("out")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", type=float, default=60, help="seconds; stops after the depth that passes it")
    p.add_argument("--max-depths", type=int, default=0, help="time only the base and full depths and this many "
                                                             "in between (0: every depth of the ladder)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--small", action="store_true", help="rehearsal: 20 RT-DETR queries, 3 classes")
    a = p.parse_args(argv)
    import copy
    import statistics
    import traceback

    import torch

    import anydepth
    import anydepth_kernels as ak
    from anydepth.testing import randomize_

    t_start = time.time()
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    # latency as users get it: torch's TF32 defaults are left as they are (cuDNN convolutions may use
    # TF32 in fp32; our Triton kernels use exact "ieee" dots) and recorded in the report
    tf32 = {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    torch.manual_seed(0)
    from anydepth.family import family_of

    detr = family_of(a.model).name == "rtdetr"  # query-based: fewer queries for the small run
    kwargs = {"num_classes": 3, **({"num_queries": 20} if detr else {})} if a.small else {}
    calib = (1, 3, 64, 64) if a.small else (1, 3, 128, 128)
    m = randomize_(anydepth.create_model(a.model, **kwargs), seed=0, calibrate_shape=calib).eval().to(dev, dtype)
    shape = (1, 3, a.imgsz, a.imgsz)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(fn, n, warm=1 if a.small else 2):
        for _ in range(warm):
            fn()
        sync()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            sync()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)

    def outs(y):
        return [y] if isinstance(y, torch.Tensor) else [y["logits"], y["pred_boxes"]]

    def rel(u, v):
        return max(((p_.double() - q_.double()).norm() / q_.double().norm().clamp_min(1e-30)).item()
                   for p_, q_ in zip(outs(u), outs(v)))

    rows: List[dict] = []
    notes: List[str] = []
    if detr:
        notes.append("rtdetr rel errs compare final outputs after the top-k query selection: near-ties in "
                     "random-weight encoder scores can flip it, so a large fused err alone is not a kernel bug")
    path = Path(a.out) / f"e2e-{a.model}-{a.dtype}.json"

    def dump():
        rep = {"model": a.model, "dtype": a.dtype, "imgsz": a.imgsz, "batch": 1, "device": str(dev),
               "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "torch": torch.__version__, "method": f"median of {a.reps} timed calls after 2 warm-up calls, "
                                                     "host wall time with a device sync per call",
               **tf32, "rows": rows, "notes": notes}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rep, indent=1))

    with torch.no_grad():
        ladder = list(m.depth_configs(shape))
        if a.max_depths and len(ladder) > a.max_depths:
            keep = [0] + [round(i * (len(ladder) - 1) / (a.max_depths - 1)) for i in range(1, a.max_depths)]
            ladder = [ladder[i] for i in sorted(set(keep))]
        fused = copy.deepcopy(m).to_inference()
        runners = {"eager": ak.CUDAGraphRunner(m), "fused": ak.CUDAGraphRunner(fused)}
        dead = set()
        for i, cfg in enumerate(ladder):
            if time.time() - t_start > a.budget and i < len(ladder) - 1:
                notes.append(f"budget: skipped depths {i + 1}..{len(ladder) - 1} of {len(ladder)}, "
                             "timed the full depth")
                ladder = ladder[:i] + [ladder[-1]]
                cfg = ladder[-1]
            row = {"depth": cfg.code, "gflops": round(m.flops(cfg, shape) / 1e9, 3)}
            ref = m(x, depth=cfg)
            row["eager_ms"] = timed(lambda: m(x, depth=cfg), max(1, a.reps // 3))
            try:
                row["fused_rel_err"] = rel(fused(x, depth=cfg), ref)
                row["fused_ms"] = timed(lambda: fused(x, depth=cfg), max(1, a.reps // 3))
            except Exception as e:  # noqa: BLE001 - reported in the JSON, the run goes on
                row["fused_error"] = f"{type(e).__name__}: {e}"[:300]
                traceback.print_exc()
            for form, runner in runners.items():
                if form in dead:
                    continue
                try:
                    t = time.perf_counter()
                    y = runner(x, depth=cfg)
                    sync()
                    row[f"graph_{form}_capture_s"] = round(time.perf_counter() - t, 3)
                    row[f"graph_{form}_rel_err"] = rel(y, ref if form == "eager" else fused(x, depth=cfg))
                    row[f"graph_{form}_ms"] = timed(lambda: runner(x, depth=cfg), a.reps)
                except Exception as e:  # noqa: BLE001
                    row[f"graph_{form}_error"] = f"{type(e).__name__}: {e}"[:300]
                    traceback.print_exc()
                    dead.add(form)
                    notes.append(f"graph {form} failed at depth {cfg.code}: {row[f'graph_{form}_error']}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            dump()
            if cfg is ladder[-1]:
                break
    dump()

    def f(r_, k):
        if isinstance(r_.get(k), float):
            return f"{r_[k]:8.2f}"
        return f"{'ERR' if k.replace('_ms', '_error') in r_ else '-':>8}"

    print(f"\n{a.model} {a.dtype} @{a.imgsz} batch 1 on {dev} (ms, median)")
    print(f"{'depth':26}{'GFLOPs':>8}{'eager':>8}{'fused':>8}{'graph':>8}{'g+fused':>8}"
          f"{'fused err':>10}{'graph err':>10}")
    for r_ in rows:
        def e(k, r_=r_):
            return f"{r_[k]:10.1e}" if k in r_ else f"{'-':>10}"

        print(f"{r_['depth'][:25]:26}{r_['gflops']:8.2f}{f(r_, 'eager_ms')}{f(r_, 'fused_ms')}{f(r_, 'graph_eager_ms')}"
              f"{f(r_, 'graph_fused_ms')}{e('fused_rel_err')}{e('graph_eager_rel_err')}")
    for n_ in notes:
        print("note:", n_)
    bad = [r_ for r_ in rows if any(k.endswith("_error") for k in r_)]
    # a graph replay must reproduce the call it captured (same kernels, same inputs)
    bad += [r_ for r_ in rows if max(r_.get("graph_eager_rel_err", 0), r_.get("graph_fused_rel_err", 0)) > 1e-3]
    return 1 if bad else 0


def kbench(argv: Sequence[str]) -> int:
    """Kernel benchmarks of the library (conv blocks, concat-free output conv, attention, deformable
    attention) on one device and dtype, each against eager and optionally ``torch.compile`` of it;
    on CUDA fp32 also Triton attention with exact ("ieee") vs TF32 dots vs SDPA. ``--tiny``: one
    small case per family (the CPU rehearsal)."""
    p = argparse.ArgumentParser(prog="anydepth.gpucheck kbench")
    p.add_argument("out")
    p.add_argument("dtype")
    p.add_argument("families", help="comma list of conv,concat,attention,msda,basis")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    import traceback

    import torch

    from anydepth_kernels import benchmark as B

    dtype, dev = getattr(torch, a.dtype), a.device
    if dev == "cuda":  # exact fp32 baselines (what the rel err column compares against), as in the tests
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    kw = dict(rounds=1 if a.tiny else a.rounds, reps=1 if a.tiny else 3, warmup=1 if a.tiny else 3)
    tag = "-compiled" if a.compile else ""
    failed = 0

    def save(rep, stem, title):
        print(f"\n== {title} ({a.dtype}{', with torch.compile rows' if a.compile else ''})\n{rep.table()}", flush=True)
        B.save_report(rep, a.out, f"{stem}-{a.dtype}{tag}")

    for fam in a.families.split(","):
        try:
            if fam == "conv":
                cases = [B.ConvCase("tiny 3x3 8->16 @12", 8, 16, 12, 3)] if a.tiny else None
                save(B.run_conv_benchmarks(dev, dtype, cases=cases, compile_eager=a.compile, progress=False, **kw),
                     "kernels", "conv+BN+SiLU blocks (YOLOv12-s @640)")
            elif fam == "concat":
                cases = [("tiny 2x8->16 @6", [8, 8], 16, 6, None)] if a.tiny else None
                save(B.run_concat_benchmarks(dev, dtype, compile_eager=a.compile, cases=cases, progress=False, **kw),
                     "concat_conv", "concat-free CSP output conv")
            elif fam == "attention":
                from anydepth_kernels import benchmark_attention as BA

                cases = [BA.AttnCase("tiny area", "area", 1, 2, 16, map_hw=(4, 4), area=2)] if a.tiny else None
                save(BA.run_attention_benchmarks(dev, dtype, cases=cases, compile_reference=a.compile,
                                                 progress=False, **kw),
                     "attention", "attention / area attention")
                if dev == "cuda" and dtype == torch.float32 and not a.compile:
                    save(_attention_precision(B, kw), "attention-precision",
                         "Triton attention: ieee vs tf32 dots vs SDPA")
            elif fam == "msda":
                from anydepth_kernels import benchmark_ms_deform as BM

                cases = [BM.MsDeformCase("tiny", 1, 7, 2, ((4, 4), (2, 2)), 2, 8)] if a.tiny else None
                save(BM.run_ms_deform_benchmarks(dev, dtype, cases=cases, compile_reference=a.compile,
                                                 progress=False, **kw),
                     "ms_deform_attn", "multi-scale deformable attention")
            elif fam == "basis":
                from anydepth_kernels import benchmark_shared_basis as BS

                cases = [BS.BasisCase("tiny 3x3 8->8 @6 u1+s4", 8, 6, 1, 4)] if a.tiny else None
                save(BS.run_basis_benchmarks(dev, dtype, cases=cases, progress=False, **kw),
                     "shared_basis", "shared filter basis layer: eager factored vs fused factored vs folded")
            else:
                raise ValueError(f"unknown kernel family {fam!r}")
        except Exception:  # noqa: BLE001 - one family's failure must not hide the others
            print(f"== {fam} FAILED", flush=True)
            traceback.print_exc()
            failed += 1
    return 1 if failed else 0


def _attention_precision(B, kw):
    import torch

    from anydepth_kernels.ops.attention import area_attention, attention

    d = torch.device("cuda")
    rep = B.Report(B.machine_info(d), "cuda", "float32", ratio_label="vs ieee")
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 384, 40, 40, generator=g).to(d)
    q, k, v = (torch.randn(1, 8, 400, 32, generator=g).to(d) for _ in range(3))
    with torch.no_grad():
        rep.results += B.measure("P4 area attn fwd", {
            "triton ieee": lambda: area_attention(qkv, 4, 4, backend="triton"),
            "triton tf32": lambda: area_attention(qkv, 4, 4, backend="triton", input_precision="tf32"),
            "sdpa": lambda: area_attention(qkv, 4, 4, backend="sdpa")}, "triton ieee", B.timer(d), **kw)
        rep.results += B.measure("AIFI [1,8,400,32] fwd", {
            "triton ieee": lambda: attention(q, k, v, backend="triton"),
            "triton tf32": lambda: attention(q, k, v, backend="triton", input_precision="tf32"),
            "sdpa": lambda: attention(q, k, v, backend="sdpa")}, "triton ieee", B.timer(d), **kw)
    return rep


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and argv[0] in ("run", "e2e", "kbench", "sanitize") else "run"
    return {"run": run, "e2e": e2e, "kbench": kbench, "sanitize": sanitize}[cmd](argv)


if __name__ == "__main__":
    sys.exit(main())
