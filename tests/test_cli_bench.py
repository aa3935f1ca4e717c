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
    js, png = benchmark.save_model_report(report, str(tmp_path))
    data = json.load(open(js))
    assert data["model"] == "yolov12n-anydepth" and data["machine"]["cores"] and data["summary"]
    assert png is not None and os.path.getsize(png) > 1000
    assert "full/base" in report.table() + "\n".join(report.summary())
