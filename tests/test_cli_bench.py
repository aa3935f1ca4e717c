"""The `anydepth` command and the per-depth benchmark report (smoke-sized: timing is not tested)."""
import json
import os

import pytest

from anydepth import benchmark
from anydepth.cli import main


def test_models_and_bad_arguments(capsys):
    assert main(["models", "yolov12*"]) == 0
    assert capsys.readouterr().out.split() == [f"yolov12{s}-anydepth" for s in "lmnsx"]
    assert main(["bench", "--model", "nope"]) == 2
    assert "registered" in capsys.readouterr().err
    assert main(["bench", "--model", "yolov12n-anydepth", "--imgsz", "100"]) == 2


def test_model_report_end_to_end(tmp_path):
    report = benchmark.run_model_benchmark("yolov12n-anydepth", imgsz=64, rounds=1, warmup=1, progress=False)
    names = [r.name for r in report.rows]
    assert names[0] == "base" and "full" in names and "full+fused" in names and "base+fused" in names
    ladder = [r for r in report.rows if r.name not in ("peer", "full+fused", "base+fused")]
    assert len(ladder) >= 6
    gflops = [r.gflops for r in ladder]
    assert gflops == sorted(gflops) and gflops[0] < gflops[-1]
    assert all(r.median_ms > 0 for r in report.rows)
    assert report.row("full").speedup_vs_full == pytest.approx(1.0)
    if report.peer is not None:  # Ultralytics installed (the test extras)
        assert report.row("peer").params_m == pytest.approx(report.row("full").params_m, rel=0.05)
        assert any(line.startswith("full+fused vs ultralytics eager") for line in report.summary())
    js, png = benchmark.save_model_report(report, str(tmp_path))
    data = json.load(open(js))
    assert data["model"] == "yolov12n-anydepth" and data["machine"]["cores"] and data["summary"]
    assert png is not None and os.path.getsize(png) > 1000
    assert "full/base" in report.table() + "\n".join(report.summary())
    # the achieved-rate column and the matmul-rate ceiling measured in the same run
    assert report.gemm_gflop_per_s > 0 and data["gemm_gflop_per_s"] == report.gemm_gflop_per_s
    full = report.row("full")
    assert full.gflop_per_s == pytest.approx(full.gflops / (full.median_ms / 1e3))
    assert "GFLOP/s" in report.table().splitlines()[0]
    assert any("matmul rate" in line for line in report.summary())


def test_matmul_ceiling_is_read_in_the_runs_dtype_only():
    # a bf16 / int8 row beats the float32 matmul rate by design: the "fastest form" against that
    # rate is the fastest row of the run's own dtype
    def row(name, ms):
        return benchmark.Row(name, "F", 10.0, 1.0, ms, ms, ms)

    report = benchmark.ModelReport("m", 64, 1, "cpu", "float32", 1, {}, gemm_gflop_per_s=100.0, rows=[
        row("full", 200.0), row("base", 150.0), row("full+compiled", 125.0), row("base+compiled", 120.0),
        row("full+bf16", 50.0), row("base+bf16", 40.0), row("full+int8", 25.0), row("base+int8", 20.0)])
    lines = [line for line in report.summary() if "of the matmul rate" in line]
    assert len(lines) == 2
    assert "fastest float32 form (full+compiled) 80%" in lines[0]
    assert "fastest float32 form (base+compiled) 83%" in lines[1]


def test_gemm_rate_counts_flops_of_the_product(monkeypatch):
    # a fixed 2 ms per product: 2 n^3 FLOPs / 2 ms
    monkeypatch.setattr(benchmark, "timer", lambda device: (lambda fn: (fn(), 2.0)[1]))
    assert benchmark.gemm_rate("cpu", n=64, repeats=3) == pytest.approx(2 * 64**3 / 2e-3 / 1e9)
