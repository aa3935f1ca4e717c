"""``anydepth demo`` / ``make demo``: the any-depth recipe end to end on a laptop CPU, no downloads.

1. generates a synthetic detection data set (``anydepth data synth``: 5 shape classes on
   textured backgrounds, train + val);
2. stage 1 trains a *static* ``yolov12n`` (full depth only, ``shallow="none"``): the "trained
   model" a user starts from;
3. stage 2 fine-tunes it into an any-depth model twice, with the same steps and seed:
   self-distillation on (the authors' recipe, ``recipe="finetune"``: the shallow pass is
   ``alpha_base * GT + (1 - alpha_base) * KD``) and off (both depths on ground truth);
4. the same for ``rtdetr-r18`` at a size a CPU can train from scratch in minutes: 64 px images
   of its own synthetic set drawn at 64 px (objects 10..50 px, i.e. large relative to the image),
   30 queries, 30 denoising queries, a 128-wide encoder/decoder (the ResNet-18 backbone is
   unchanged);
5. evaluates every configuration of each depth ladder on the validation split (COCO AP, GFLOPs,
   latency from one depth profile per model) and writes ``RESULTS.md`` + ``results.json``, per run
   its report, AP-vs-GFLOPs/latency plot and detections picture (base | middle | full), per model
   the distillation on/off comparison plot (:mod:`anydepth.demo_report`).

What the paper leads one to expect: base with distillation >= base without, and full depth
within 1 AP of the stage-1 model. The budget is fixed by epochs/steps (the two stage-2 runs of a
model follow the same schedule) with a time limit per run as a guard.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional


@dataclass
class DemoRun:
    tag: str
    model: str
    distill: bool
    epochs: int
    batch_size: int
    imgsz: int
    time_limit: float
    max_steps_per_epoch: Optional[int] = None
    model_kwargs: Optional[dict] = None
    lr: Optional[float] = None
    shallow: str = "base"               # "none": static training (stage 1)
    init_from: Optional[str] = None     # tag of an earlier run whose final.pt is the starting point
    options: Optional[dict] = None      # further TrainConfig fields (recipe, alpha_base, ...)
    stage: str = ""                     # label in the summary: "static", "distill", "no-distill"
    data_imgsz: Optional[int] = None    # train/evaluate on a synthetic set drawn at this size (None: the main set)


def default_runs(imgsz: int = 160, yolo_static_epochs: int = 5, yolo_finetune_epochs: int = 2,
                 rtdetr_imgsz: int = 64, rtdetr_static_steps: int = 300, rtdetr_finetune_steps: int = 40,
                 rtdetr_queries: int = 30, time_limit_scale: float = 1.0) -> List[DemoRun]:
    """Stage 1 (static) then stage 2 (any-depth fine-tuning, distillation on and off) per model.

    Stage 2 uses the family's fine-tuning recipe (``recipe="finetune"``: for YOLO the authors'
    SGD 1e-3 -> 1e-5, momentum 0.9, alpha_base 0.2) with the nominal batch equal to the batch
    (no gradient accumulation: a few hundred steps on a CPU) and a half-epoch warm-up.

    RT-DETR trains from scratch (no pretrained backbone here), which a DETR does slowly: at 128 px
    on the 256-px set with the full-width encoder it stayed at chance (0.2 AP after 300 steps).
    The demo therefore gives it its own synthetic set drawn at ``rtdetr_imgsz`` (objects large
    relative to the image), a 128-wide encoder/decoder, ``num_denoising`` = ``num_queries``, AdamW
    at 1e-3 with the backbone at 1x, a short warm-up and an EMA of decay 0.99 (the default 0.9999
    averages over about half of a 300-step run). Stage 2 keeps the backbone at 1x (the stage-1
    model was trained so) at lr 2e-4."""
    yolo_ft = {"recipe": "finetune", "nbs": 16, "warmup_epochs": 0.5}
    rt_kw = {"num_queries": rtdetr_queries, "num_denoising": rtdetr_queries, "encoder_hidden_dim": 128,
             "encoder_ffn_dim": 512, "d_model": 128, "decoder_ffn_dim": 512}
    rt_static_epochs = max(1, -(-rtdetr_static_steps // 125))
    rt_static = {"lr_scales": {}, "warmup_epochs": 0.25, "ema_decay": 0.99}  # from scratch: backbone at 1x
    rt_ft = {"recipe": "finetune", "warmup_epochs": 0.1, "lr_scales": {}}
    k = float(time_limit_scale)
    return [
        DemoRun("yolov12n-static", "yolov12n-anydepth", False, yolo_static_epochs, 16, imgsz, 12.0 * k,
                shallow="none", stage="static"),
        DemoRun("yolov12n-distill", "yolov12n-anydepth", True, yolo_finetune_epochs, 16, imgsz, 8.0 * k,
                init_from="yolov12n-static", options=yolo_ft, stage="distill"),
        DemoRun("yolov12n-no-distill", "yolov12n-anydepth", False, yolo_finetune_epochs, 16, imgsz, 8.0 * k,
                init_from="yolov12n-static", options=yolo_ft, stage="no-distill"),
        DemoRun("rtdetr-r18-static", "rtdetr-r18-anydepth", False, rt_static_epochs, 8, rtdetr_imgsz, 15.0 * k,
                max_steps_per_epoch=-(-rtdetr_static_steps // rt_static_epochs), model_kwargs=rt_kw, lr=1e-3,
                shallow="none", stage="static", options=rt_static, data_imgsz=rtdetr_imgsz),
        DemoRun("rtdetr-r18-distill", "rtdetr-r18-anydepth", True, 1, 8, rtdetr_imgsz, 8.0 * k,
                max_steps_per_epoch=rtdetr_finetune_steps, model_kwargs=rt_kw, lr=2e-4,
                init_from="rtdetr-r18-static", options=rt_ft, stage="distill", data_imgsz=rtdetr_imgsz),
        DemoRun("rtdetr-r18-no-distill", "rtdetr-r18-anydepth", False, 1, 8, rtdetr_imgsz, 8.0 * k,
                max_steps_per_epoch=rtdetr_finetune_steps, model_kwargs=rt_kw, lr=2e-4,
                init_from="rtdetr-r18-static", options=rt_ft, stage="no-distill", data_imgsz=rtdetr_imgsz),
    ]


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def run_demo(out: str = "runs/demo", images: int = 1000, val_images: int = 200, imgsz: int = 256,
             runs: Optional[List[DemoRun]] = None, workers: int = 1, seed: int = 0,
             progress: bool = True, latency: bool = True) -> Dict[str, object]:
    from .data import open_dataset, synth
    from .demo_report import evaluate_run
    from .train import TrainConfig, Trainer

    t_start = time.time()
    runs = runs if runs is not None else default_runs(imgsz)
    data = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(data, "val", "annotations.json")):
        synth.generate(data, images=images, imgsz=imgsz, seed=seed, split="train", progress=progress)
        synth.generate(data, images=val_images, imgsz=imgsz, seed=seed + 1, split="val", progress=progress)
    results: Dict[str, object] = {"imgsz": imgsz, "train_images": images, "val_images": val_images, "runs": {}}
    for run in runs:
        run_data = data
        if run.data_imgsz is not None and run.data_imgsz != imgsz:
            run_data = os.path.join(out, f"data-{run.data_imgsz}")
            if not os.path.isfile(os.path.join(run_data, "val", "annotations.json")):
                synth.generate(run_data, images=images, imgsz=run.data_imgsz, seed=seed, split="train",
                               progress=progress)
                synth.generate(run_data, images=val_images, imgsz=run.data_imgsz, seed=seed + 1, split="val",
                               progress=progress)
        kind = "static (full depth only)" if run.shallow == "none" else \
            f"any-depth, distillation {'on' if run.distill else 'off'}"
        print(f"\n== {run.tag}: {run.model}, {kind}, {run.epochs} epoch(s), batch {run.batch_size}, "
              f"{run.imgsz} px{', from ' + run.init_from if run.init_from else ''} ==", flush=True)
        weights = None
        if run.init_from:
            weights = os.path.join(out, run.init_from, "final.pt")
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"demo run {run.tag} starts from {run.init_from}, whose {weights} is missing "
                                        "(run it first, in the same --out directory)")
        cfg = TrainConfig(model=run.model, data=os.path.join(run_data, "train"), out=os.path.join(out, run.tag),
                          epochs=run.epochs, batch_size=run.batch_size, imgsz=run.imgsz, distill=run.distill,
                          workers=workers, seed=seed, time_limit=run.time_limit, eval_interval=0,
                          max_steps_per_epoch=run.max_steps_per_epoch, model_kwargs=dict(run.model_kwargs or {}),
                          lr=run.lr, progress=progress, device="cpu", shallow=run.shallow, weights=weights,
                          **dict(run.options or {}))
        t0 = time.time()
        trainer = Trainer(cfg)
        summary = trainer.fit()
        train_min = (time.time() - t0) / 60
        if summary["stopped_early"]:
            print(f"WARNING: {run.tag} was stopped by its time limit after {summary['steps']} steps "
                  f"(of {trainer.total_steps}); its numbers are not the planned budget's", flush=True)
        model = trainer.eval_model().eval()
        val = open_dataset(os.path.join(run_data, "val"), imgsz=run.imgsz, mode=trainer.mode, augment=False)
        evaluated = evaluate_run(out, run.tag, model, val, run.imgsz, latency=latency, progress=progress)
        report = evaluated.pop("_report")
        results["runs"][run.tag] = {
            "model": run.model, "imgsz": run.imgsz, "data_imgsz": run.data_imgsz or imgsz, "distill": run.distill,
            "stage": run.stage or run.tag,
            "shallow": run.shallow,
            "init_from": run.init_from, "options": dict(run.options or {}), "lr": trainer.lr,
            "optimizer": trainer.config.optimizer, "alpha_base": trainer.config.alpha_base,
            "epochs": summary["epochs"], "steps": summary["steps"],
            "stopped_early": summary["stopped_early"], "train_minutes": round(train_min, 2),
            **evaluated,  # rows, report files, plots, latency (anydepth.demo_report.evaluate_run)
        }
        print(report.table(), flush=True)
        _write_results(out, results, imgsz, images, t_start)  # after every run: a cut demo keeps its runs
    md, merged = _write_results(out, results, imgsz, images, t_start)
    print("\n" + md)
    return merged


def _write_results(out: str, results: Dict[str, object], imgsz: int, images: int, t_start: Optional[float]):
    """Write results.json + RESULTS.md (+ the comparison plots); runs of an earlier results.json in
    ``out`` (same data) that were not re-run now are kept. ``t_start`` None: the results' own
    ``total_minutes`` stands (re-evaluation). Returns (markdown, the merged results)."""
    from .demo_report import UNITS, comparison_plots

    if t_start is not None:
        results["total_minutes"] = round((time.time() - t_start) / 60, 2)
    merged = dict(results)
    previous = os.path.join(out, "results.json")
    if os.path.isfile(previous):  # runs done earlier into the same directory (not re-run now) are kept
        with open(previous) as f:
            old = json.load(f)
        if (old.get("imgsz"), old.get("train_images")) == (imgsz, images):
            kept = {k: v for k, v in old.get("runs", {}).items() if k not in results["runs"]}
            if kept:
                merged["runs"] = {**kept, **results["runs"]}
                merged["total_minutes"] = round(results["total_minutes"] + sum(
                    v.get("train_minutes", 0) for v in kept.values()), 2)
    merged["units"] = dict(UNITS)
    merged["comparisons"] = comparison_plots(out, merged)
    with open(previous, "w") as f:
        json.dump(merged, f, indent=1, default=str)
    md = render_results(merged)
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write(md)
    return md, merged


def _ap(run, name: str, key: str = "AP"):
    return next((x[key] for x in run["rows"] if x["name"] == name), None)


def summary_rows(results: Dict[str, object]) -> List[Dict[str, object]]:
    """One row per model: stage-1 full AP and the two stage-2 runs' full/base AP (fractions)."""
    by_model: Dict[str, Dict[str, dict]] = {}
    for tag, r in results["runs"].items():
        by_model.setdefault(r["model"], {})[r.get("stage", tag)] = r
    rows = []
    for model, st in by_model.items():
        on, off, static = st.get("distill"), st.get("no-distill"), st.get("static")
        if not (on and off):
            continue
        rows.append({"model": model,
                     "static_full": _ap(static, "full") if static else None,
                     "static_base": _ap(static, "base") if static else None,
                     "on_full": _ap(on, "full"), "on_base": _ap(on, "base"),
                     "off_full": _ap(off, "full"), "off_base": _ap(off, "base"),
                     "steps": on["steps"]})
    return rows


def render_results(results: Dict[str, object]) -> str:
    """Markdown: the stage-1 / distillation on / off summary, then one table per run (every
    ladder configuration)."""
    from .demo_report import image_lines, run_images

    lines = [f"Synthetic shapes, {results['train_images']} training / {results['val_images']} validation images, "
             f"CPU; total {results.get('total_minutes', '?')} min.", "",
             "AP, AP50, AP75 in percent (results.json and the eval-*.json reports keep fractions in [0, 1]); GFLOPs "
             "of one image; latency: ms of one network forward at batch 1 (no pre/post-processing), median and "
             "p10-p90 of the model's depth profile (profiles/), shared by its runs.", ""]
    runs = results["runs"]
    summary = summary_rows(results)
    if summary:
        lines.append("| model | stage 1 (static) full AP % | stage 1 base AP % | distill on: full | base "
                     "| distill off: full | base | base on - off | full on - stage 1 |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in summary:
            def d(a, b):
                return "-" if a is None or b is None else f"{100 * (a - b):+.1f}"
            lines.append(f"| {r['model']} | {_pct(r['static_full'])} | {_pct(r['static_base'])} | "
                         f"{_pct(r['on_full'])} | {_pct(r['on_base'])} | {_pct(r['off_full'])} | "
                         f"{_pct(r['off_base'])} | {d(r['on_base'], r['off_base'])} | "
                         f"{d(r['on_full'], r['static_full'])} |")
        lines.append("")
    lines += image_lines(results)
    for tag, r in runs.items():
        if r.get("shallow") == "none":
            what = "static: full depth only"
        else:
            what = f"any-depth, distillation {'on' if r['distill'] else 'off'}"
            if r.get("alpha_base") is not None and r["distill"]:
                what += f", alpha_base {r['alpha_base']}"
        if r.get("init_from"):
            what += f", from {r['init_from']}"
        if r.get("optimizer"):
            what += f", {r['optimizer']} lr {r.get('lr')}"
        px = r.get("imgsz", results.get("imgsz"))
        lines.append(f"**{tag}** ({r['model']}, {px} px, {what}, {r['epochs']} epoch(s), {r['steps']} steps, "
                     f"{r['train_minutes']} min{', stopped by the time limit' if r['stopped_early'] else ''})")
        lines.append("")
        lines.append("| depth | code | GFLOPs | latency ms | p10-p90 ms | AP % | AP50 % | AP75 % |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for row in r["rows"]:
            g = "-" if row["gflops"] is None else f"{row['gflops']:.2f}"
            lat = "-" if row["latency_ms"] is None else f"{row['latency_ms']:.1f}"
            lo, hi = row.get("latency_p10_ms"), row.get("latency_p90_ms")
            spread = "-" if lo is None or hi is None else f"{lo:.1f}-{hi:.1f}"
            lines.append(f"| {row['name']} | {row['code']} | {g} | {lat} | {spread} | {_pct(row['AP'])} "
                         f"| {_pct(row['AP50'])} | {_pct(row['AP75'])} |")
        lines.append("")
        lines += run_images(r)
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--task=classify" in argv or any(a == "--task" and b == "classify" for a, b in zip(argv, argv[1:])):
        from .demo_classify import main as classify_main   # the classifier demo (Adaptive Depth Networks)

        return classify_main(argv)
    p = argparse.ArgumentParser(prog="anydepth demo", description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=["detect", "classify"], default="detect",
                   help="classify: the classifier demo (anydepth demo --task classify -h)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--yolo-static-epochs", type=int, default=5)
    p.add_argument("--yolo-finetune-epochs", type=int, default=2)
    p.add_argument("--rtdetr-imgsz", type=int, default=64,
                   help="RT-DETR training/eval size; its synthetic set is drawn at this size")
    p.add_argument("--rtdetr-static-steps", type=int, default=300)
    p.add_argument("--rtdetr-finetune-steps", type=int, default=40)
    p.add_argument("--yolo-imgsz", type=int, default=160, help="YOLO training/eval size (the data: --imgsz)")
    p.add_argument("--time-limit-scale", type=float, default=1.0,
                   help="multiply every run's time limit (a guard; a stage-1 run cut by it is reported)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency column (a busy machine)")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: evaluate again the runs whose final.pt is in --out (with --only: those) and "
                        "rewrite their reports, plots and RESULTS.md")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--only", default=None, help="comma-separated run tags to run (the others are kept from "
                   "an earlier results.json in --out)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    runs = default_runs(a.yolo_imgsz, a.yolo_static_epochs, a.yolo_finetune_epochs, a.rtdetr_imgsz,
                        a.rtdetr_static_steps, a.rtdetr_finetune_steps, time_limit_scale=a.time_limit_scale)
    if a.only:
        wanted = [t.strip() for t in a.only.split(",") if t.strip()]
        unknown = sorted(set(wanted) - {r.tag for r in runs})
        if unknown:
            p.error(f"unknown run tag(s) {unknown}; the runs are {[r.tag for r in runs]}")
        runs = [r for r in runs if r.tag in wanted]
    if a.eval_only:
        from .demo_report import reevaluate

        def write(results):
            md, _ = _write_results(a.out, results, results["imgsz"], results["train_images"], None)
            print("\n" + md)

        reevaluate(a.out, runs, latency=not a.no_latency, progress=not a.quiet, write=write)
        return 0
    run_demo(a.out, a.images, a.val_images, a.imgsz, runs, workers=a.workers, progress=not a.quiet,
             latency=not a.no_latency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
