"""Shared vs unshared filter bases on the synthetic classification set, same budget.

Trains ``--model`` (an any-depth ResNet) once per ``--variant`` from scratch with the same data,
steps, seed and trainer settings (the trainer's defaults: AdamW, self-distillation of the base
pass; the shared variants add the orthogonality penalty, weight 10), then evaluates full and base
depth (and the rest of the ladder) on the validation split. Writes ``results.json`` (updated after
every run, so a cut run keeps what finished) and ``RESULTS.md`` under ``--out``; checkpoints stay
in ``--work`` (not for the repository).

Example (the committed bench/results/shared-bases run: one process per variant, then merged)::

    nice -n 19 python tools/shared_bases_compare.py --variants unshared --out /tmp/r-unshared \\
        --work /tmp/sb-compare --images 1600 --val-images 400 --epochs 8 --steps 50
    nice -n 19 python tools/shared_bases_compare.py --variants S8U1 --out /tmp/r-s8u1 \\
        --work /tmp/sb-compare --images 1600 --val-images 400 --epochs 8 --steps 50
    python tools/shared_bases_compare.py --merge /tmp/r-unshared/results.json /tmp/r-s8u1/results.json \\
        --out bench/results/shared-bases
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Tuple

#: name -> shared_bases option (None: the unshared model)
VARIANTS: Dict[str, Optional[dict]] = {
    "unshared": None,
    "S8U1": dict(shared_rank=8, unique_rank=1),
    "S16U1": dict(shared_rank=16, unique_rank=1),
    "S8U1-refinement": dict(shared_rank=8, unique_rank=1, blocks="refinement"),
}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(out: str, work: str, model: str, variants: List[str], images: int, val_images: int, imgsz: int,
        batch_size: int, epochs: int, steps: int, seed: int, threads: int, argv: List[str]) -> Dict[str, object]:
    import torch

    from anydepth import create_model
    from anydepth.data import classify
    from anydepth.evaluation import evaluate
    from anydepth.train import TrainConfig, Trainer

    torch.set_num_threads(threads)
    data = os.path.join(work, "data")
    if not os.path.isdir(os.path.join(data, "val")):
        classify.synth(data, images=images, imgsz=imgsz, seed=seed, split="train", progress=False)
        classify.synth(data, images=val_images, imgsz=imgsz, seed=seed + 1, split="val", progress=False)
    val = classify.open_image_folder(os.path.join(data, "val"), imgsz=imgsz, augment=False)
    os.makedirs(out, exist_ok=True)
    results: Dict[str, object] = {
        "command": "nice -n 19 python tools/shared_bases_compare.py " + " ".join(argv),
        "model": model, "imgsz": imgsz, "train_images": images, "val_images": val_images, "batch_size": batch_size,
        "epochs": epochs, "steps_per_epoch": steps, "seed": seed, "torch_threads": threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "runs": {}}
    for name in variants:
        sb = VARIANTS[name]
        kwargs = {} if sb is None else {"shared_bases": sb}
        print(f"\n== {name}: {model} {kwargs} ==", flush=True)
        cfg = TrainConfig(model=model, data=os.path.join(data, "train"), out=os.path.join(work, name),
                          batch_size=batch_size, imgsz=imgsz, epochs=epochs, max_steps_per_epoch=steps, workers=0,
                          seed=seed, eval_interval=0, progress=False, device="cpu", augment=False, ema=False,
                          model_kwargs=kwargs)
        t0, c0 = time.time(), time.process_time()
        trainer = Trainer(cfg)
        summary = trainer.fit()
        wall, cpu = time.time() - t0, time.process_time() - c0
        report = evaluate(trainer.eval_model().eval(), val, imgsz=imgsz, batch_size=64, device="cpu",
                          progress=False, measure_latency=False)
        print(report.table(), flush=True)
        n_params = _params(create_model(model, num_classes=len(val.classes), **kwargs))
        results["runs"][name] = {  # type: ignore[index]
            "shared_bases": sb, "parameters": n_params, "steps": summary["steps"],
            "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
            "rows": [{"name": r.name, "code": r.code, "gflops": r.gflops, **r.metrics} for r in report.rows]}
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(out, "RESULTS.md"), "w") as f:
            f.write(render(results))
    print("\n" + render(results))
    return results


def _top1(run: dict, name: str) -> Optional[float]:
    return next((r.get("top1") for r in run["rows"] if r["name"] == name), None)


def render(results: Dict[str, object]) -> str:
    def pct(v: Optional[float]) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    lines = [f"# Shared vs unshared filter bases: {results['model']} on the synthetic classification set", "",
             f"`{results['command']}`", "",
             f"{results['train_images']} training / {results['val_images']} validation images at "
             f"{results['imgsz']} px (5 shapes), batch {results['batch_size']}, {results['epochs']} epochs x "
             f"{results['steps_per_epoch']} steps, seed {results['seed']}, the trainer's defaults (AdamW 1e-3, "
             f"self-distillation; shared bases add 10 x the orthogonality penalty), CPU, "
             f"{results['torch_threads']} torch thread(s); {results['machine']}.", "",
             "| model | parameters | steps | val top-1 full % | val top-1 base % | train CPU s | train wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["runs"].items():  # type: ignore[attr-defined]
        lines.append(f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['steps']} | {pct(_top1(r, 'full'))} | "
                     f"{pct(_top1(r, 'base'))} | {r['train_cpu_s']:.0f} | {r['train_wall_s']:.0f} |")
    lines.append("")
    for name, r in results["runs"].items():  # type: ignore[attr-defined]
        lines += [f"**{name}** (`shared_bases={r['shared_bases']}`)", "",
                  "| depth | code | GFLOPs | top-1 % | top-5 % |", "|---|---|---:|---:|---:|"]
        for row in r["rows"]:
            lines.append(f"| {row['name']} | {row['code']} | {row['gflops']:.3f} | {pct(row.get('top1'))} | "
                         f"{pct(row.get('top5'))} |")
        lines.append("")
    return "\n".join(lines)


def merge(files: List[str], out: str) -> Dict[str, object]:
    """One results.json + RESULTS.md from the results.json files of runs made separately (e.g. one
    variant per process, in parallel) with the same data and budget: their settings must agree."""
    keys = ("model", "imgsz", "train_images", "val_images", "batch_size", "epochs", "steps_per_epoch", "seed",
            "torch_threads")
    merged: Dict[str, object] = {}
    commands: List[str] = []
    for path in files:
        with open(path) as f:
            r = json.load(f)
        if merged and any(r[k] != merged[k] for k in keys):
            raise SystemExit(f"{path}: other settings than {files[0]} ({[k for k in keys if r[k] != merged[k]]})")
        if not merged:
            merged = {**r, "runs": {}}
        commands.append(r["command"])
        merged["runs"].update(r["runs"])  # type: ignore[attr-defined]
    merged["command"] = " ; ".join(commands)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(merged, f, indent=1)
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write(render(merged))
    return merged


#: ``--rtdetr-params``: RT-DETR backbones with their refinement blocks sharing bases
RTDETR_SPECS: List[Tuple[str, Optional[dict]]] = [
    ("unshared", None),
    ("S8U1 refinement", dict(shared_rank=8, unique_rank=1, blocks="refinement")),
    ("S16U1 refinement", dict(shared_rank=16, unique_rank=1, blocks="refinement")),
    ("S32U1 refinement", dict(shared_rank=32, unique_rank=1, blocks="refinement")),
]


def rtdetr_params(out: str, variants: List[str], imgsz: int, argv: List[str]) -> Dict[str, object]:
    """Parameters (backbone, whole model) and FLOPs at full and base depth (``model.flops()``,
    eager form, batch 1, ``imgsz`` x ``imgsz``) of RT-DETR with and without shared bases in its
    backbone's refinement blocks; writes ``rtdetr-params.json`` and ``RTDETR-PARAMS.md``."""
    import torch

    from anydepth import create_model

    torch.set_num_threads(1)
    rows = []
    for variant in variants:
        for label, spec in RTDETR_SPECS:
            m = create_model(f"rtdetr-{variant}-anydepth", **({} if spec is None else {"shared_bases": spec})).eval()
            shape = (1, 3, imgsz, imgsz)
            rows.append({"model": f"rtdetr-{variant}-anydepth", "sharing": label, "shared_bases": spec,
                         "backbone_params": _params(m.backbone), "params": _params(m),
                         "gflops_full": m.flops("full", shape) / 1e9, "gflops_base": m.flops("base", shape) / 1e9})
            print(rows[-1], flush=True)
    res = {"command": "python tools/shared_bases_compare.py " + " ".join(argv), "imgsz": imgsz, "rows": rows}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "rtdetr-params.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = ["# RT-DETR backbones with shared bases in their refinement blocks", "", f"`{res['command']}`", "",
             f"FLOPs: `model.flops()` (2 per multiply-add) of the eager model, batch 1, {imgsz}x{imgsz}.", "",
             "| model | sharing | backbone params | saved | model params | GFLOPs full | GFLOPs base |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["shared_bases"] is None)
        saved = 1 - r["backbone_params"] / base["backbone_params"]
        lines.append(f"| {r['model']} | {r['sharing']} | {r['backbone_params'] / 1e6:.2f}M | {100 * saved:.1f}% | "
                     f"{r['params'] / 1e6:.2f}M | {r['gflops_full']:.1f} | {r['gflops_base']:.1f} |")
    with open(os.path.join(out, "RTDETR-PARAMS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/shared-bases")
    p.add_argument("--work", default="runs/shared-bases-compare", help="data set and checkpoints")
    p.add_argument("--model", default="resnet18-anydepth")
    p.add_argument("--variants", default="unshared,S8U1", help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--images", type=int, default=1600)
    p.add_argument("--val-images", type=int, default=400)
    p.add_argument("--imgsz", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--steps", type=int, default=50, help="steps per epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="only merge these results.json files (separate runs, same settings) into --out")
    p.add_argument("--rtdetr-params", default=None, metavar="VARIANTS",
                   help="only count RT-DETR parameters/FLOPs with refinement-only sharing, e.g. r18,r50 (at --imgsz)")
    a = p.parse_args(argv)
    if a.rtdetr_params:
        rtdetr_params(a.out, a.rtdetr_params.split(","), a.imgsz, argv)
        return 0
    if a.merge:
        merge(a.merge, a.out)
        return 0
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; valid: {list(VARIANTS)}")
    run(a.out, a.work, a.model, variants, a.images, a.val_images, a.imgsz, a.batch_size, a.epochs, a.steps,
        a.seed, a.threads, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
