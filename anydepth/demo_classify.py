"""``anydepth demo --task classify``: the Adaptive Depth Networks recipe on a CPU in a few minutes.

1. writes a synthetic classification set (``anydepth data synth --task classify``: the synthetic
   shapes, one object per image, cropped to ``imgsz`` x ``imgsz``; 5 classes, train + val);
2. stage 1 trains a *static* ``resnet18`` (full depth only, ``shallow="none"``): the trained
   model a user starts from (the same topology as torchvision's, so a torchvision ``.pth`` can
   take its place through ``weights=``);
3. stage 2 fine-tunes it into an any-depth model twice with the same steps and seed
   (``recipe="finetune"``: SGD lr 0.01): self-distillation on (the paper's recipe: full pass
   0.5 x CE with label smoothing, base pass 0.5 x KL(base || full)) and off (the base pass on
   ground truth, 0.5 x CE);
4. evaluates every configuration of the depth ladder (top-1/top-5, GFLOPs) and writes
   ``RESULTS.md`` + ``results.json``.

What the paper leads one to expect: base top-1 with distillation >= without, full depth near the
static model. With a few hundred steps on synthetic data the differences are small and noisy:
the demo shows the pipeline, not the paper's ImageNet numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional


def run_classify_demo(out: str = "runs/demo-classify", model: str = "resnet18-anydepth", images: int = 3000,
                      val_images: int = 200, imgsz: int = 32, batch_size: int = 32, static_epochs: int = 3,
                      finetune_steps: int = 80, seed: int = 0, workers: int = 0, progress: bool = True,
                      time_limit: float = 15.0) -> Dict[str, object]:
    from .data import classify
    from .evaluation import evaluate
    from .train import TrainConfig, Trainer

    t_start = time.time()
    data = os.path.join(out, "data")
    if not os.path.isdir(os.path.join(data, "val")):
        classify.synth(data, images=images, imgsz=imgsz, seed=seed, split="train", progress=progress)
        classify.synth(data, images=val_images, imgsz=imgsz, seed=seed + 1, split="val", progress=progress)
    steps_per_epoch = max(1, images // batch_size)
    ft_epochs = max(1, -(-finetune_steps // steps_per_epoch))
    ft = dict(epochs=ft_epochs, max_steps_per_epoch=-(-finetune_steps // ft_epochs), recipe="finetune")
    runs = [
        ("static", dict(shallow="none", distill=False, epochs=static_epochs)),
        ("distill", dict(distill=True, **ft)),
        ("no-distill", dict(distill=False, **ft)),
    ]
    results: Dict[str, object] = {"model": model, "imgsz": imgsz, "train_images": images, "val_images": val_images,
                                  "runs": {}}
    val = classify.open_image_folder(os.path.join(data, "val"), imgsz=imgsz, augment=False)
    for tag, opts in runs:
        weights = None if tag == "static" else os.path.join(out, "static", "final.pt")
        print(f"\n== {tag}: {model}{', from the static model' if weights else ', from scratch'} ==", flush=True)
        cfg = TrainConfig(model=model, data=os.path.join(data, "train"), out=os.path.join(out, tag),
                          batch_size=batch_size, imgsz=imgsz, workers=workers, seed=seed, time_limit=time_limit,
                          eval_interval=0, progress=progress, device="cpu", weights=weights, augment=False,
                          ema=False, **opts)
        t0 = time.time()
        trainer = Trainer(cfg)
        summary = trainer.fit()
        minutes = (time.time() - t0) / 60
        report = evaluate(trainer.eval_model().eval(), val, imgsz=imgsz, batch_size=64, device="cpu",
                          progress=False, measure_latency=False)
        report.save(os.path.join(out, tag), f"eval-{tag}")
        print(report.table(), flush=True)
        results["runs"][tag] = {
            "steps": summary["steps"], "stopped_early": summary["stopped_early"], "train_minutes": round(minutes, 2),
            "optimizer": trainer.config.optimizer, "lr": trainer.lr,
            "rows": [{"name": r.name, "code": r.code, "gflops": r.gflops, **r.metrics} for r in report.rows]}
    results["total_minutes"] = round((time.time() - t_start) / 60, 2)
    md = render(results)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write(md)
    print("\n" + md)
    return results


def _top1(run, name: str) -> Optional[float]:
    return next((r["top1"] for r in run["rows"] if r["name"] == name), None)


def render(results: Dict[str, object]) -> str:
    runs = results["runs"]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = [f"{results['model']}, synthetic shapes (one object per image), {results['train_images']} training / "
             f"{results['val_images']} validation images at {results['imgsz']} px, CPU; total "
             f"{results['total_minutes']} min.", "",
             "| run | steps | optimizer | full (FFFF) top-1 % | base (TTTT) top-1 % |", "|---|---:|---|---:|---:|"]
    for tag, r in runs.items():
        lines.append(f"| {tag} | {r['steps']} | {r['optimizer']} lr {r['lr']:g} | {pct(_top1(r, 'full'))} | "
                     f"{pct(_top1(r, 'base'))} |")
    lines.append("")
    for tag, r in runs.items():
        cut = ", stopped by the time limit" if r["stopped_early"] else ""
        lines.append(f"**{tag}** ({r['train_minutes']} min{cut})")
        lines.append("")
        lines.append("| depth | code | GFLOPs | top-1 % | top-5 % |")
        lines.append("|---|---|---:|---:|---:|")
        for row in r["rows"]:
            lines.append(f"| {row['name']} | {row['code']} | {row['gflops']:.3f} | {pct(row.get('top1'))} | "
                         f"{pct(row.get('top5'))} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="anydepth demo --task classify", description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=["classify"], default="classify")
    p.add_argument("--out", default="runs/demo-classify")
    p.add_argument("--model", default="resnet18-anydepth")
    p.add_argument("--images", type=int, default=3000,
                   help="training images (600 overfit: 100%% train vs 55%% val top-1 after 216 steps)")
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--imgsz", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--static-epochs", type=int, default=3, help="stage 1: full epochs over the training set")
    p.add_argument("--finetune-steps", type=int, default=80)
    p.add_argument("--time-limit", type=float, default=15.0, help="minutes per run (a guard)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    run_classify_demo(a.out, a.model, a.images, a.val_images, a.imgsz, a.batch_size, a.static_epochs,
                      a.finetune_steps, progress=not a.quiet, time_limit=a.time_limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
