"""The report side of ``anydepth demo``: per-run evaluation files, the latency profile the runs of
a model share, the distillation on/off comparison plots and re-evaluating finished runs.

Per run ``<out>/<tag>/``: ``eval-<tag>.json|.md|.png`` (table, notes, AP/AP50 against GFLOPs and
latency) and ``eval-<tag>-depths.png`` (the same validation images with the detections of base,
the middle of the ladder and full depth). Per model: ``<out>/compare-<model>.png`` (every run of
the model on shared axes). Latency: every run of a model reads it from one depth profile,
``<out>/profiles/<model>-<imgsz>.json``, measured once (interleaved rounds over the ladder, as the
benchmarks time), so that the runs' points line up on the latency axis and the comparison is of
accuracy alone.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

#: The demo's units (results.json keeps fractions; RESULTS.md shows percent).
UNITS = {"AP": "fractions in [0, 1] in results.json and eval-*.json; percent in RESULTS.md, eval-*.md and plots",
         "gflops": "GFLOPs of one forward of one image at the run's imgsz (multiply-add = 2)",
         "latency_ms": "ms of one network forward (batch 1, no pre/post-processing): median of the model's depth "
                       "profile; latency_p10_ms-latency_p90_ms its spread"}

#: Labels of the demo's stages in the comparison plots, in drawing order.
STAGE_LABELS = {"distill": "stage 2, distillation on", "no-distill": "stage 2, distillation off",
                "static": "stage 1 (static model)"}

PROFILE_ROUNDS = 15
DATASET_NAME = "synthetic shapes (data/val)"


def latency_profile(out: str, model, imgsz: int, progress: bool = True):
    """The depth profile every run of ``model``'s architecture at ``imgsz`` reads its latency from:
    ``<out>/profiles/<model>-<imgsz>.json``, measured now when absent or made for other options."""
    from .budget import DepthProfile, profile_depths

    path = os.path.join(out, "profiles", f"{model.model_name}-{imgsz}.json")
    if os.path.isfile(path):
        try:
            return DepthProfile.load(path, model=model, imgsz=imgsz)
        except ValueError:  # another model option (e.g. num_queries) or a damaged file: measure again
            pass
    if progress:
        print(f"measuring the latency profile of {model.model_name} at {imgsz} px "
              f"({PROFILE_ROUNDS} interleaved rounds over the ladder) ...", flush=True)
    return profile_depths(model, imgsz=imgsz, batch=1, device="cpu", form="eager", rounds=PROFILE_ROUNDS, reps=2,
                          warmup=2, overhead=False, path=path)


def evaluate_run(out: str, tag: str, model, val, imgsz: int, latency: bool = True, progress: bool = True,
                 picture_images: int = 3) -> Dict[str, Any]:
    """Evaluate one demo run's model at every depth of its ladder and write its report files;
    returns its ``results.json`` fields (rows, report paths, plots relative to ``out``) and the
    report itself under ``"_report"`` (not serialised)."""
    from .evaluation import evaluate
    from .evaluation.plots import depth_picture

    profile = latency_profile(out, model, imgsz, progress) if latency else None
    report = evaluate(model, val, imgsz=imgsz, batch_size=8, device="cpu", progress=progress,
                      measure_latency=latency, latency_batch=1, profile=profile)
    report.dataset = DATASET_NAME  # not the temporary path of --out
    run_dir = os.path.join(out, tag)
    pictures = {}
    try:
        picture = depth_picture(model, val, os.path.join(run_dir, f"eval-{tag}-depths.png"), images=picture_images,
                                imgsz=imgsz, report=report)
        pictures["detections at base, the middle of the ladder and full depth"] = picture
    except ImportError as e:
        print(f"no pictures: {e}", flush=True)
    paths = report.save(run_dir, f"eval-{tag}", pictures=pictures)
    plots = {}
    if paths.get("png"):
        plots["tradeoff"] = os.path.relpath(paths["png"], out)
    if pictures:
        plots["depths"] = os.path.relpath(next(iter(pictures.values())), out)
    rows = [{"name": r.name, "code": r.code, "gflops": r.gflops, "latency_ms": r.latency_ms,
             "latency_p10_ms": r.latency_p10_ms, "latency_p90_ms": r.latency_p90_ms,
             **{k: r.metrics.get(k) for k in ("AP", "AP50", "AP75")}} for r in report.rows]
    files = {k: (os.path.relpath(v, out) if v else None) for k, v in paths.items()}  # relocatable with out
    return {"rows": rows, "report": files, "plots": plots, "latency": dict(report.latency), "_report": report}


def _report_json(out: str, tag: str, run: Dict[str, Any]) -> Optional[str]:
    given = (run.get("report", {}) or {}).get("json")
    for path in (os.path.join(out, given) if given else None), os.path.join(out, tag, f"eval-{tag}.json"):
        if path and os.path.isfile(path):
            return path
    return None


def comparison_plots(out: str, results: Dict[str, Any]) -> Dict[str, str]:
    """``<out>/compare-<model>.png`` for every model with at least two evaluated runs (its stages
    on shared axes); returns model -> path relative to ``out``. Nothing without matplotlib."""
    from .evaluation import EvalReport
    from .evaluation.plots import plot_comparison

    by_model: Dict[str, Dict[str, Any]] = {}
    for tag, run in results.get("runs", {}).items():
        path = _report_json(out, tag, run)
        if path is not None:
            by_model.setdefault(run["model"], {})[run.get("stage") or tag] = (tag, path)
    written = {}
    for model, stages in by_model.items():
        if len(stages) < 2:
            continue
        order = [s for s in STAGE_LABELS if s in stages] + [s for s in stages if s not in STAGE_LABELS]
        reports = {STAGE_LABELS.get(s, s): EvalReport.from_json(stages[s][1]) for s in order}
        first = next(iter(reports.values()))
        title = (f"{model} @ {first.imgsz} px, synthetic shapes ({first.num_images} validation images): "
                 "stage 2 with and without self-distillation, from the same stage-1 model")
        path = os.path.join(out, f"compare-{model}.png")
        try:
            plot_comparison(reports, path, title=title)
        except ImportError as e:
            print(f"no comparison plot: {e}", flush=True)
            return {}
        written[model] = os.path.relpath(path, out)
    return written


def image_lines(results: Dict[str, Any]) -> List[str]:
    """Markdown embedding the comparison plots (per model), for RESULTS.md."""
    lines = []
    for model, rel in results.get("comparisons", {}).items():
        lines += [f"![{model}: AP and AP50 against GFLOPs and latency, every stage]({rel})", ""]
    return lines


def run_images(run: Dict[str, Any]) -> List[str]:
    """Markdown embedding one run's trade-off plot and detections picture, for RESULTS.md."""
    plots = run.get("plots") or {}
    lines = []
    if plots.get("tradeoff"):
        lines += [f"![AP against GFLOPs and latency]({plots['tradeoff']})", ""]
    if plots.get("depths"):
        lines += [f"![detections at base, the middle of the ladder and full depth]({plots['depths']})", ""]
    return lines


def reevaluate(out: str, runs, latency: bool = True, progress: bool = True, write=None) -> Dict[str, Any]:
    """Evaluate again the runs of ``runs`` whose ``<out>/<tag>/final.pt`` exists (no training), keep
    their training fields from ``<out>/results.json``, and rewrite the reports (``write``: the
    demo's results writer, called with the updated results)."""
    import anydepth

    from .data import open_dataset
    from .family import family_of

    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"anydepth demo --eval-only: no {path}; run the demo into {out!r} first")
    with open(path) as f:
        results = json.load(f)
    done = []
    for run in runs:
        weights = os.path.join(out, run.tag, "final.pt")
        if not os.path.isfile(weights) or run.tag not in results.get("runs", {}):
            continue
        model = anydepth.load(weights).eval()
        data_imgsz = results["runs"][run.tag].get("data_imgsz") or results.get("imgsz")
        data = "data" if data_imgsz in (None, results.get("imgsz")) else f"data-{data_imgsz}"  # as run_demo
        val = open_dataset(os.path.join(out, data, "val"), imgsz=run.imgsz, mode=family_of(model).preprocess,
                           augment=False)
        print(f"\n== {run.tag}: evaluating {weights} at every depth ==", flush=True)
        fields = evaluate_run(out, run.tag, model, val, run.imgsz, latency=latency, progress=progress)
        report = fields.pop("_report")
        print(report.table(), flush=True)
        results["runs"][run.tag].update(fields)
        done.append(run.tag)
    if not done:
        raise FileNotFoundError(f"anydepth demo --eval-only: no run of {[r.tag for r in runs]} has a final.pt in {out}")
    if write is not None:
        write(results)
    return results
