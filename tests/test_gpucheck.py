"""``make gpu-check``'s CPU rehearsal: every step of the one-shot GPU check runs here at tiny sizes
(the orchestrator, the pytest and sanitizer-workload steps, the per-depth end-to-end benchmark with
the CUDA-graph runner, the kernel benchmarks, the target read-out and the output files), so a
GPU window never finds a broken script."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpucheck")
    # The rehearsal takes ~25 s on a quiet 2-core machine; the budget is generous so that a loaded
    # machine still runs every step (a step past the budget is skipped, which the tests catch).
    proc = subprocess.run([sys.executable, "-m", "anydepth.gpucheck", "run", "--rehearse", "--out", str(out),
                           "--budget", "1200"], cwd=REPO, capture_output=True, text=True, timeout=1500)
    return out, proc


def test_rehearsal_runs_every_step(rehearsal):
    out, proc = rehearsal
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-3000:]
    assert "CPU REHEARSAL" in summary and "all steps passed" in summary
    for step in ("pytest -m gpu", "sanitizer memcheck (workload only)", "e2e yolov12n-anydepth float32",
                 "e2e rtdetr-r18-anydepth float32", "pytest triton interpreter",
                 "kernel benchmarks float32 (conv,concat,attention,msda,basis)"):
        assert f"ok   {step} rc=0" in summary, step
    assert "SKIP" not in summary and "FAIL" not in summary
    # at most 8 files, the summary among them; the environment is named
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8 and "summary.txt" in names, names
    assert "torch" in (out / "env_build.log").read_text()
    assert "workload done" in (out / "sanitizer.log").read_text()


def test_rehearsal_reports(rehearsal):
    out, _ = rehearsal
    with tarfile.open(out / "results.tgz") as t:
        reports = {m.name: json.load(t.extractfile(m)) for m in t.getmembers()}
    for stem in ("kernels", "concat_conv", "attention", "ms_deform_attn", "shared_basis"):
        rep = reports[f"{stem}-float32.json"]
        assert rep["results"] and all(r["median_ms"] > 0 for r in rep["results"]), stem
    for model in ("yolov12n-anydepth", "rtdetr-r18-anydepth"):
        rep = reports[f"e2e-{model}-float32.json"]
        rows = rep["rows"]
        assert len(rows) == 2 and rows[0]["gflops"] < rows[-1]["gflops"], rows  # base, then full
        for row in rows:
            for form in ("eager", "fused"):
                assert row[f"graph_{form}_ms"] > 0 and row[f"graph_{form}_rel_err"] == 0.0, row
            assert row["fused_rel_err"] < 1e-3 or model.startswith("rtdetr"), row
    assert "extension_info.json" in reports and reports["extension_info.json"]["cpu"]["available"]


def test_sub_commands_reject_bad_arguments(tmp_path, capsys):
    from anydepth import gpucheck

    with pytest.raises(SystemExit):
        gpucheck.main(["e2e"])  # model, dtype and out are required
    # an unknown kernel family fails the step (exit 1) and names itself; the others still run
    assert gpucheck.main(["kbench", str(tmp_path), "float32", "nope,concat", "--tiny", "--device", "cpu"]) == 1
    assert "unknown kernel family 'nope'" in capsys.readouterr().err
    assert (tmp_path / "concat_conv-float32.json").exists()


def test_interpreter_probe_tells_a_broken_triton_interpreter(aot_triton, tmp_path):
    """Triton 3.6's interpreter cannot run a loop bounded by a scalar argument under NumPy >= 2.4
    (seen on the GPU machines): gpu-check's probe says so and names the versions; Triton 3.8's runs it."""
    import numpy as np

    from anydepth import gpucheck

    c = gpucheck.Check(tmp_path, 60, True, sys.executable)
    env = dict(c.env, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    if aot_triton.path is not None:
        env["PYTHONPATH"] = f"{aot_triton.path}:{env['PYTHONPATH']}"
    why = gpucheck._interpreter_defect(c, env)
    if aot_triton.label == "venv":
        assert why is None
    elif tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4):
        assert why is not None and "triton 3.6" in why and "0-dimensional" in why, why
    else:  # older NumPy: either it runs, or the reason names the version
        assert why is None or "triton 3.6" in why, why
