"""The ``anydepth`` command.

  anydepth info                                 what is compiled and available here
  anydepth models                               registered model names
  anydepth bench --model NAME [--imgsz 640]     per-depth latency/GFLOPs table, JSON and plot
  anydepth bench --kernels [options]            kernel microbenchmarks against eager PyTorch
  anydepth data synth --out DIR --images N      a synthetic detection dataset (images + COCO JSON;
                                                --task classify: an ImageFolder of cropped shapes)
  anydepth train --model NAME --data DIR        self-distillation training (anydepth train -h)
  anydepth eval --weights CKPT --data DIR       COCO AP per depth configuration, table + JSON + plot
                [--compile] [--dtype bf16] [--int8]  + the optimized CPU forms, next to float32
  anydepth demo [--out runs/demo]               synth data -> train (distill on/off) -> eval every depth
  anydepth profile --weights CKPT [--imgsz 640]  latency of every depth on this device, JSON beside the weights
  anydepth predict --weights CKPT --source SRC --save DIR [--depth D | --budget-ms 40]
                                                annotated images/videos + COCO-style JSON (classifiers:
                                                their top-k classes per image)
  anydepth budget-demo [--model NAME]           the depth controller under a real CPU load, measured
  anydepth export --model NAME --format onnx|aoti --depth all --out DIR
                                                per-depth ONNX / AOTInductor files + one multi-depth file
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import List, Optional

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _cmd_info(args) -> int:
    import anydepth_kernels

    print(json.dumps(anydepth_kernels.extension_info(), indent=1))
    return 0


def _cmd_models(args) -> int:
    import anydepth

    for name in anydepth.list_models(args.pattern):
        print(name)
    return 0


def _bench_kernels(args, dtype) -> None:
    from anydepth_kernels import benchmark

    if args.device == "cpu" and dtype != torch.float32:
        print("anydepth bench: note: reduced precision on the CPU is not what the kernels are "
              "tuned for", file=sys.stderr)
    report = benchmark.run_conv_benchmarks(
        device=args.device, dtype=dtype, rounds=args.rounds, reps=args.reps, warmup=args.warmup,
        compile_eager=args.compile, progress=not args.quiet,
    )
    m = report.machine
    where = m.get("gpu") or m["cpu"]
    print(f"conv+norm+act blocks, batch 1, {report.dtype}, on {report.device}: {where} "
          f"({m['cores']} cores, torch {m['torch']}, {m['torch_threads']} threads)")
    print(report.table())
    device_tag = re.sub(r"[^A-Za-z0-9]+", "-", m.get("gpu", "cpu")).strip("-").lower()
    path = benchmark.save_report(report, args.out, f"kernels-{device_tag}-{report.dtype}")
    print(f"written: {path}")
    report = benchmark.run_concat_benchmarks(device=args.device, dtype=dtype, rounds=args.rounds,
                                             reps=args.reps, warmup=args.warmup, progress=not args.quiet,
                                             compile_eager=args.compile)
    print(f"\nconcat-free CSP output conv (+ folded BN + SiLU), {report.dtype}, on {report.device}: {where}")
    print(report.table())
    print(f"written: {benchmark.save_report(report, args.out, f'concat_conv-{device_tag}-{report.dtype}')}")
    from anydepth_kernels import benchmark_shared_basis

    report = benchmark_shared_basis.run_basis_benchmarks(device=args.device, dtype=dtype, rounds=args.rounds,
                                                         reps=args.reps, warmup=args.warmup,
                                                         progress=not args.quiet)
    print(f"\nshared filter basis layer (+ folded BNs + ReLU): eager factored vs fused factored vs folded "
          f"plain conv, {report.dtype}, on {report.device}: {where}")
    print(report.table())
    print(f"written: {benchmark.save_report(report, args.out, f'shared_basis-{device_tag}-{report.dtype}')}")
    try:
        from anydepth_kernels import benchmark_attention
    except ImportError:
        benchmark_attention = None
    if benchmark_attention is not None:
        report = benchmark_attention.run_attention_benchmarks(
            device=args.device, dtype=dtype, rounds=args.rounds, reps=args.reps, warmup=args.warmup,
            compile_reference=args.compile, progress=not args.quiet)
        print(f"\nattention (YOLOv12 area attention / AIFI shapes), {report.dtype}, on {report.device}: {where}")
        print(report.table())
        print(f"written: {benchmark.save_report(report, args.out, f'attention-{device_tag}-{report.dtype}')}")
    try:
        from anydepth_kernels import benchmark_ms_deform
    except ImportError:
        return
    report = benchmark_ms_deform.run_ms_deform_benchmarks(
        device=args.device, dtype=dtype, rounds=args.rounds, reps=args.reps, warmup=args.warmup,
        compile_reference=args.compile, progress=not args.quiet,
    )
    print(f"\nmulti-scale deformable attention, {report.dtype}, on {report.device}: {where}")
    print(report.table())
    path = benchmark.save_report(report, args.out, f"ms_deform_attn-{device_tag}-{report.dtype}")
    print(f"written: {path}")


def _bench_model(args, name, dtype) -> None:
    from anydepth import benchmark

    precisions = ["int8"] if args.int8 else []
    if dtype == torch.bfloat16 and args.device == "cpu":
        # on the CPU bf16 is a compiled path (optimize(model, dtype=torch.bfloat16)), timed beside
        # the float32 rows it is read against
        precisions.insert(0, "bf16")
        dtype = torch.float32
    report = benchmark.run_model_benchmark(
        name, imgsz=args.imgsz, batch=args.batch, device=args.device, dtype=dtype,
        rounds=args.rounds, warmup=args.warmup, peer=not args.no_peer, compile=args.compile,
        progress=not args.quiet, onnx=args.onnx, aoti=args.aoti, precisions=precisions,
    )
    m = report.machine
    where = m.get("gpu") or m["cpu"]
    print(f"\n{name} at {args.imgsz}x{args.imgsz}, batch {args.batch}, {report.dtype}, on {report.device}: "
          f"{where} ({m['cores']} cores, torch {m['torch']}, {m['torch_threads']} threads), "
          f"median of {report.rounds} interleaved rounds")
    print(report.table())
    for line in report.summary() + report.notes:
        print(line)
    json_path, png = benchmark.save_model_report(report, args.out)
    print(f"written: {json_path}" + (f", {png}" if png else ""))


def _cmd_bench(args) -> int:
    dtype = DTYPES[args.dtype]
    if args.imgsz is None:   # 640 for the detectors, 224 when every --model is a classifier
        from anydepth.family import family_of

        names = list(args.model or [])
        classify = bool(names) and all(family_of(n, None) is not None and family_of(n).task == "classify"
                                       for n in names)
        args.imgsz = 224 if classify else 640
    if args.imgsz % 32 or args.imgsz <= 0:
        print(f"anydepth bench: --imgsz must be a positive multiple of 32, got {args.imgsz}", file=sys.stderr)
        return 2
    models = list(args.model or [])
    if not models and not args.kernels:
        models = ["yolov12s-anydepth"]
    if models:
        import anydepth

        known = anydepth.list_models()
        unknown = [m for m in models if m not in known]
        if unknown:
            print(f"anydepth bench: unknown model(s) {unknown}; registered: {known}", file=sys.stderr)
            return 2
    if args.kernels:
        _bench_kernels(args, dtype)
    for name in models:
        _bench_model(args, name, dtype)
    return 0


def _cmd_synth(args) -> int:
    from anydepth.data import synth

    splits = [("train", args.images)] + ([("val", args.val_images)] if args.val_images else [])
    for i, (split, n) in enumerate(splits):
        if args.task == "classify":   # ImageFolder: one cropped object per image
            from anydepth.data import classify

            summary = classify.synth(args.out, images=n, imgsz=args.imgsz or 64, seed=args.seed + 1000 * i,
                                     split=split if args.val_images else None, progress=not args.quiet)
        else:
            summary = synth.generate(args.out, images=n, imgsz=args.imgsz or 320, seed=args.seed + 1000 * i,
                                     split=split if args.val_images else None, progress=not args.quiet)
        print(json.dumps({k: v for k, v in summary.items()}, default=str))
    return 0


def _split_top_level(text: str) -> list:
    """``text`` split at the commas outside brackets, braces and double quotes."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "{[":
            depth += 1
        elif not quoted and ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0 and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _parse_mapping(text: str, what: str) -> dict:
    """``a=1,b=2.5,c=name`` -> dict (numbers parsed); a value in braces or brackets is JSON
    (``shared_bases={"shared_rank": 8, "unique_rank": 1}``), as are ``true``/``false``/``null``."""
    out = {}
    for item in filter(None, (t.strip() for t in _split_top_level(text))):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"{what}: expected key=value pairs, got {item!r}")
        k, v = item.split("=", 1)
        v = v.strip()
        if (v and v[0] in "{[") or v in ("true", "false", "null"):
            try:
                out[k.strip()] = json.loads(v)
            except json.JSONDecodeError as e:
                raise argparse.ArgumentTypeError(f"{what}: {k.strip()}={v!r} is not valid JSON ({e})") from None
            continue
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                continue
        out[k.strip()] = v
    return out


def _on_off(text: str) -> bool:
    t = text.lower()
    if t in ("on", "true", "yes", "1"):
        return True
    if t in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {text!r}")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--batch-size``, ``--distill on|off``, ``--loss box=7.5``)."""
    import dataclasses
    import typing

    from anydepth.train import TrainConfig

    helps = {
        "model": "registered model name (anydepth models); default: the model of --weights (with its options, "
                 "e.g. split=official for the authors' files), else yolov12n-anydepth",
        "data": "training set directory (COCO-JSON or YOLO-txt; classifiers: an ImageFolder)",
        "val_data": "validation set, evaluated at full and base depth", "out": "output directory",
        "distill": "on: distil the shallow pass from the full pass; off: both on ground truth (the ablation)",
        "weights": "initial weights: anydepth checkpoint, Ultralytics YOLO12 .pt, HF RT-DETR directory, the "
                   "authors' any-depth YOLO12 / RT-DETR file, or a torchvision ResNet/MobileNetV2 .pth; the model "
                   "built is the one they belong to",
        "loss": "loss weight overrides, e.g. box=7.5,kd_cls=0.5",
        "model_kwargs": "model options, e.g. num_queries=100; a value in braces is JSON: "
                        "'shared_bases={\"shared_rank\": 8, \"unique_rank\": 1}'",
        "amp": "mixed precision on CUDA: off, bf16, fp16", "time_limit": "stop (checkpointed) after this many minutes",
        "lr": "peak learning rate (default: the family's)", "clip_grad": "max gradient norm, 0 = off",
        "alpha_base": "shallow pass = alpha_base * GT + (1 - alpha_base) * KD (YOLO default 0.2, RT-DETR 0)",
        "kd_warmup_epochs": "ramp the KD weight from 0 to 1 (half cosine) over these epochs",
        "kd_style": "distillation loss: authors (as the authors' code) or legacy (this project's first version)",
        "recipe": "finetune: the authors' fine-tuning settings (YOLO: SGD 1e-3 -> 1e-5, nbs 256, 3 warm-up "
                  "epochs, alpha_base 0.2) for every option left at its default; use with --weights",
        "shallow": "student depth: base (all refinement paths skipped), shallowest, none (static: full only)",
        "optimizer": "adamw or sgd", "schedule": "cosine or linear (after the warm-up)",
        "nbs": "nominal batch size: accumulate gradients over nbs / batch-size batches",
        "lr_scales": "lr factor per parameter-name prefix, e.g. backbone.=1.0 (default: the family's; "
                     "RT-DETR's backbone 0.1 assumes a pretrained backbone)",
    }
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        hint = hints[f.name]
        if typing.get_origin(hint) is dict:
            kind = dict
        else:  # Optional[X] -> X
            kind = ([a for a in typing.get_args(hint) if a is not type(None)] or [hint])[0]
        h = helps.get(f.name, "") + f" (default: {default})"
        if kind is bool:
            p.add_argument(flag, type=_on_off, default=default, metavar="on|off", help=h)
        elif kind in (int, float, str):
            p.add_argument(flag, type=kind, default=default, help=h)
        else:  # dicts
            p.add_argument(flag, type=lambda t, n=f.name: _parse_mapping(t, n), default=default,
                           metavar="k=v,...", help=h)
    p.add_argument("--resume", default=None, metavar="LAST_PT",
                   help="continue the run saved in this last.pt (its config; --epochs/--out may change)")


def _cmd_train(args) -> int:
    import dataclasses

    from anydepth.train import TrainConfig, Trainer

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if args.resume:
        trainer = Trainer(TrainConfig(**{**values, "data": values["data"] or "-"}), resume=args.resume)
    else:
        if not values["data"]:
            print("anydepth train: --data is required (a dataset directory; make one with "
                  "`anydepth data synth --out DIR --images N`)", file=sys.stderr)
            return 2
        trainer = Trainer(TrainConfig(**values))
    summary = trainer.fit()
    print(json.dumps({k: summary[k] for k in ("final", "last", "epochs", "steps", "stopped_early")}))
    return 0


def _load_for_eval(args):
    import anydepth
    from anydepth import checkpoint

    try:
        payload = checkpoint.read(args.weights)
    except ValueError:
        payload = None
    if payload is not None:
        model = anydepth.load(args.weights)
        if args.model and args.model != payload["model"]:
            raise ValueError(f"--model {args.model} but {args.weights} holds {payload['model']}")
        return model
    from anydepth.family import import_weights

    return import_weights(args.weights).eval()


def _model_from_args(args, what: str):
    """The model of ``--weights`` (a checkpoint, or peer weights) or ``--model`` (random weights,
    seeded; ``--num-classes`` where the command has it). ValueError naming the command otherwise."""
    import anydepth

    if args.weights is None and args.model is None:
        raise ValueError(f"anydepth {what}: give --weights (a checkpoint) or --model (random weights)")
    if args.weights is not None:
        return _load_for_eval(args)
    known = anydepth.list_models()
    if args.model not in known:
        raise ValueError(f"anydepth {what}: unknown model {args.model!r}; registered: {known}")
    num_classes = getattr(args, "num_classes", None)
    kwargs = {"num_classes": num_classes} if num_classes else {}
    torch.manual_seed(0)
    return anydepth.create_model(args.model, **kwargs).eval()


def _device(text: str) -> str:
    """``--device``: ``auto`` is CUDA when there is one, else the CPU."""
    return text if text != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def _cmd_eval(args) -> int:
    from anydepth.data import open_dataset
    from anydepth.evaluation import evaluate
    from anydepth.family import family_of

    try:
        model = _model_from_args(args, "eval")
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    name = getattr(model, "model_name", args.model or "model")
    family = family_of(model)
    if args.imgsz is None:
        args.imgsz = 224 if family.task == "classify" else 640
    if family.task == "classify":   # an ImageFolder; top-1/top-5 per depth
        from anydepth.data import classify

        try:
            dataset = classify.open_image_folder(args.data, imgsz=args.imgsz, augment=False)
        except (ValueError, FileNotFoundError) as e:
            print(f"anydepth eval: {e}", file=sys.stderr)
            return 2
    else:
        mode = args.mode or family.preprocess
        dataset = open_dataset(args.data, imgsz=args.imgsz, mode=mode, augment=False)
    if dataset.num_classes != getattr(model, "num_classes", dataset.num_classes):
        print(f"anydepth eval: the model predicts {model.num_classes} classes, the dataset has "
              f"{dataset.num_classes}", file=sys.stderr)
        return 2
    forms = (["compiled"] if args.compile else []) + (["bf16"] if args.dtype == "bf16" else []) + \
        (["int8"] if args.int8 else [])
    if forms and family.task != "detect":
        print("anydepth eval: --compile / --dtype bf16 / --int8 are evaluated for detectors", file=sys.stderr)
        return 2
    if args.depths is None:
        args.depths = "full,base" if forms else "ladder"
    depths = None if args.depths == "ladder" else [d.strip() for d in args.depths.split(",") if d.strip()]
    device = _device(args.device)
    if forms and device != "cpu":
        print("anydepth eval: --compile / --dtype bf16 / --int8 are the CPU forms; use --device cpu", file=sys.stderr)
        return 2
    model = model.to(device)
    try:
        report = evaluate(model, dataset, depths=depths, imgsz=args.imgsz, batch_size=args.batch, device=device,
                          progress=not args.quiet, measure_latency=not args.no_latency, max_images=args.max_images,
                          latency_rounds=args.latency_rounds, latency_form=args.latency_form, profile=args.profile)
        if forms:
            from anydepth.evaluation.precision import evaluate_precision

            calib_dir = args.calib_data or args.data
            calib = open_dataset(calib_dir, imgsz=args.imgsz, mode=args.mode or family.preprocess, augment=False) \
                if "int8" in forms else None
            report = evaluate_precision(model, dataset, forms, depths=depths, imgsz=args.imgsz, batch_size=args.batch,
                                        calibration=calib, calibration_images=args.calib_images,
                                        calibration_name=calib_dir, reference=report, progress=not args.quiet,
                                        max_images=args.max_images, compile_int8=not args.int8_no_compile)
    except (FileNotFoundError, ValueError) as e:
        if args.profile is None or "profile" not in str(e):
            raise
        print(f"anydepth eval: {e}", file=sys.stderr)
        return 2
    n_images = len(dataset) if args.max_images is None else args.max_images
    print(f"{name} on {args.data} at {args.imgsz}, {n_images} images")
    print(report.table())
    for note in report.notes:
        print(f"- {note}")
    stem = f"eval-{name}-{args.imgsz}" + "".join(f"-{f}" for f in forms)
    pictures = {}
    if args.pictures > 0 and report.task == "classify":
        print("anydepth eval: --pictures draws detections; not drawn for a classifier", file=sys.stderr)
    elif args.pictures > 0:
        from anydepth.evaluation.plots import depth_picture

        try:
            pictures["detections at base, the middle of the ladder and full depth"] = depth_picture(
                model, dataset, os.path.join(args.out, f"{stem}-depths.png"), images=args.pictures, imgsz=args.imgsz,
                report=report)
        except ImportError as e:
            print(f"anydepth eval: no picture: {e}", file=sys.stderr)
    paths = report.save(args.out, stem, pictures=pictures)
    print(f"written: {paths}" + (f", {list(pictures.values())}" if pictures else ""))
    return 0


# -- depth under a latency budget: profile, predict, budget-demo (anydepth.budget, anydepth.predict) --------
def _profile_path(args, model, imgsz: int, device: str, form: str) -> str:
    import os

    from anydepth.budget import default_profile_path

    dtype = next(model.parameters()).dtype
    base = args.weights if args.weights is not None else os.path.join(args.profile_dir, model.model_name)
    return default_profile_path(base, imgsz, getattr(args, "batch", 1), device, form, dtype)


def _prepared_model(args, what: str):
    """The model of ``--weights`` / ``--model`` for ``anydepth <what>`` (:func:`_model_from_args`),
    with ``--threads`` applied (where the command has it), on ``--device`` (default the CPU) in
    eval mode: ``(model, device)``; ``None`` after printing why when the arguments name no
    loadable model (the command then exits with 2)."""
    try:
        model = _model_from_args(args, what)
    except (ValueError, FileNotFoundError) as e:
        print(e, file=sys.stderr)
        return None
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    device = _device(getattr(args, "device", "cpu"))
    return model.to(device).eval(), device


def _is_classifier(model) -> bool:
    return getattr(model, "task", "detect") == "classify"


def _cmd_profile(args) -> int:
    from anydepth.predict import default_imgsz

    loaded = _prepared_model(args, "profile")
    if loaded is None:
        return 2
    model, device = loaded
    imgsz = args.imgsz or default_imgsz(model)
    path = args.out or _profile_path(args, model, imgsz, device, args.form)
    try:
        profile = model.profile_depths(imgsz=imgsz, batch=args.batch, device=device, form=args.form,
                                       rounds=args.rounds, reps=args.reps, warmup=args.warmup, path=path,
                                       progress=not args.quiet)
    except ValueError as e:
        print(f"anydepth profile: {e}", file=sys.stderr)
        return 2
    print(f"{profile.describe()}, {torch.get_num_threads()} threads, median and p90 of "
          f"{profile.rounds} interleaved rounds x {profile.reps} calls")
    print(profile.table())
    steps = "resize + centre crop + softmax/top-k" if _is_classifier(model) else "letterbox + NMS"
    print(f"predict() overhead ({steps} of one {imgsz}x{imgsz} image): {profile.overhead_ms:.2f} ms")
    print(f"written: {profile.path}")
    return 0


def _cmd_predict(args) -> int:
    import os

    from anydepth.budget import DepthProfile, parse_depth
    from anydepth.checkpoint import class_names
    from anydepth.predict import default_imgsz, read_names, run_predict

    if args.depth is not None and args.budget_ms is not None:
        print("anydepth predict: give --depth or --budget-ms, not both", file=sys.stderr)
        return 2
    loaded = _prepared_model(args, "predict")
    if loaded is None:
        return 2
    model, device = loaded
    classify = _is_classifier(model)
    name = getattr(model, "model_name", type(model).__name__)
    if classify and args.conf is not None:
        print(f"anydepth predict: --conf is a detection score threshold; {name} is a classifier (task classify): "
              "give --topk (classes per image) instead", file=sys.stderr)
        return 2
    if not classify and args.topk is not None:
        print(f"anydepth predict: --topk is for classifiers; {name} is a detector (task detect): "
              "give --conf (score threshold) instead", file=sys.stderr)
        return 2
    try:
        names = read_names(args.names)
        depth = parse_depth(model, args.depth) if args.depth is not None else None
    except (ValueError, FileNotFoundError) as e:
        print(e, file=sys.stderr)
        return 2
    if names is None and args.weights is not None:
        names = class_names(args.weights)   # the training set's, when the checkpoint carries them
    if args.form == "fused":
        model.to_inference()
    profile = None
    imgsz = args.imgsz
    if args.budget_ms is not None:
        try:
            if args.profile is not None:
                profile = DepthProfile.load(args.profile, model=model, device=device, form=args.form)
                if imgsz is None:
                    imgsz = profile.imgsz
                profile.check(imgsz=imgsz)
            else:
                imgsz = imgsz or default_imgsz(model)
                path = _profile_path(args, model, imgsz, device, args.form)
                if os.path.isfile(path):
                    profile = DepthProfile.load(path, model=model, imgsz=imgsz, device=device, form=args.form)
                    print(f"anydepth predict: depth profile {path}", file=sys.stderr)
                else:
                    print(f"anydepth predict: no depth profile for this device yet: measuring one ({path})",
                          file=sys.stderr)
                    profile = model.profile_depths(imgsz=imgsz, device=device, form=args.form, rounds=5,
                                                   path=path, progress=not args.quiet)
        except (ValueError, FileNotFoundError) as e:
            print(f"anydepth predict: {e}", file=sys.stderr)
            return 2
    if classify:
        task_args = {"topk": 5 if args.topk is None else args.topk}
    else:
        task_args = {"conf": 0.25 if args.conf is None else args.conf}
    try:
        summary = run_predict(model, args.source, args.save, depth=depth, budget_ms=args.budget_ms, profile=profile,
                              imgsz=imgsz, names=names, progress=not args.quiet,
                              info={"weights": args.weights, "form": args.form, "device": device}, **task_args)
    except (ValueError, FileNotFoundError) as e:
        print(f"anydepth predict: {e}", file=sys.stderr)
        return 2
    keys = ("images", "frames", "json") if classify else ("images", "frames", "detections", "json")
    for file_name, classes in summary.get("classes", []):   # a classifier: its top classes per image
        print(f"{file_name}: " + ", ".join(f"{c.get('name', c['category_id'])} {c['score']:.3f}" for c in classes))
    print(json.dumps({k: summary[k] for k in keys} | {"errors": len(summary["errors"])}))
    return 1 if summary["errors"] and not summary["images"] and not summary["frames"] else 0


def _cmd_budget_demo(args) -> int:
    from anydepth.budget import DepthProfile, demo_under_load
    from anydepth.predict import default_imgsz

    if args.weights is None and args.model is None:
        args.model = "yolov12n-anydepth"
    loaded = _prepared_model(args, "budget-demo")
    if loaded is None:
        return 2
    model, _device_used = loaded
    imgsz = args.imgsz or (default_imgsz(model) if _is_classifier(model) else 320)
    try:
        if args.profile:
            profile = DepthProfile.load(args.profile, model=model, imgsz=imgsz, form="eager")
        else:
            profile = model.profile_depths(imgsz=imgsz, rounds=args.rounds, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"anydepth budget-demo: {e}", file=sys.stderr)
        return 2
    print(profile.table())
    result = demo_under_load(model, profile, target_ms=args.target_ms, frames=args.frames, burners=args.burners,
                             compare_fixed=not args.no_fixed, progress=not args.quiet, duty=args.duty)
    print(result["text"])
    if args.out:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "text"}, f, indent=1)
        print(f"written: {args.out}")
    return 0


def _add_budget_commands(sub) -> None:
    def model_args(p):
        p.add_argument("--weights", default=None, help="anydepth checkpoint (or Ultralytics .pt / HF directory)")
        p.add_argument("--model", default=None, help="registered model name (random weights without --weights)")
        p.add_argument("--num-classes", type=int, default=None, help="classes of a --model without weights")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
        p.add_argument("--profile-dir", default="runs/profiles",
                       help="where profiles of a --model without --weights are kept")

    pr = sub.add_parser("profile", help="measure the latency of every depth on this device (JSON beside the weights)")
    model_args(pr)
    pr.add_argument("--imgsz", type=int, default=None, help="input size (default 640; a classifier its own, 224)")
    pr.add_argument("--batch", type=int, default=1)
    pr.add_argument("--form", default="eager", choices=["eager", "fused", "compiled", "cuda-graph"])
    pr.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    pr.add_argument("--reps", type=int, default=2, help="timed calls per configuration per round")
    pr.add_argument("--warmup", type=int, default=2)
    pr.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    pr.add_argument("--out", default=None, help="profile path (default: beside the weights)")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=_cmd_profile)

    pp = sub.add_parser("predict", help="detect (classifiers: top-k classes) in images / a folder / a video; "
                                        "annotated copies + COCO-style JSON")
    model_args(pp)
    pp.add_argument("--source", required=True, help="image file, directory of images/videos, or video file")
    pp.add_argument("--save", required=True, help="output directory")
    pp.add_argument("--depth", default=None, help="base, full, a number in [0, 1] (ladder position) or a config "
                                                  "code such as TTFFFFFF (default: full)")
    pp.add_argument("--budget-ms", type=float, default=None,
                    help="per-frame latency target: the depth controller picks the depth of every image/frame")
    pp.add_argument("--profile", default=None, help="depth profile JSON (default: the one beside the weights, "
                                                    "measured now if there is none)")
    pp.add_argument("--form", default="eager", choices=["eager", "fused"], help="run the model eager or fused")
    pp.add_argument("--imgsz", type=int, default=None,
                    help="input size: any positive int for a detector (padded up to a multiple of 32; boxes in "
                         "image pixels), a multiple of 32 for a classifier (default 640, a classifier's own: 224, "
                         "or the profile's)")
    pp.add_argument("--conf", type=float, default=None, help="detectors: score threshold (default 0.25)")
    pp.add_argument("--topk", type=int, default=None, help="classifiers: classes per image (default 5)")
    pp.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    pp.add_argument("--names", default=None, help="class names: a comma list or a file (one a line, or JSON list); "
                                                  "default: those the checkpoint carries (anydepth train saves them)")
    pp.add_argument("--quiet", action="store_true", help="no progress bar")
    pp.set_defaults(func=_cmd_predict)

    bd = sub.add_parser("budget-demo", help="the depth controller under a real CPU load (burner processes), measured")
    model_args(bd)
    bd.set_defaults(device="cpu")   # a CPU-load demonstration; --model: yolov12n-anydepth without --weights
    bd.add_argument("--imgsz", type=int, default=None, help="input size (default 320; a classifier its own, 224)")
    bd.add_argument("--target-ms", type=float, default=None,
                    help="frame-time target (default: 1.1 x full depth's profiled frame cost)")
    bd.add_argument("--frames", type=int, default=240, help="frames: a third without load, a third loaded, a third not")
    bd.add_argument("--burners", type=int, default=2, help="busy-looping processes during the loaded third")
    bd.add_argument("--duty", type=float, default=1.0, help="share of the time each burner is busy (0-1]")
    bd.add_argument("--rounds", type=int, default=10, help="profile rounds")
    bd.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    bd.add_argument("--profile", default=None, help="an eager depth profile JSON to use instead of measuring")
    bd.add_argument("--no-fixed", action="store_true", help="skip the fixed-depth comparison run")
    bd.add_argument("--out", default=None, help="also write the numbers as JSON here")
    bd.add_argument("--quiet", action="store_true")
    bd.set_defaults(func=_cmd_budget_demo)


def _cmd_export(args) -> int:
    from anydepth.export import export
    from anydepth.predict import default_imgsz

    loaded = _prepared_model(args, "export")
    if loaded is None:
        return 2
    model, _ = loaded
    name = getattr(model, "model_name", None) or args.model or "model"
    sizes = args.imgsz or [default_imgsz(model)]
    if len(sizes) not in (1, 2):
        print(f"anydepth export: --imgsz takes N or H W, got {args.imgsz}", file=sys.stderr)
        return 2
    imgsz = sizes if len(sizes) == 2 else sizes * 2
    depths = [d.strip() for d in args.depth.split(",") if d.strip()]
    try:
        result = export(model, args.out, format=args.format, depth=depths, imgsz=tuple(imgsz), batch=args.batch,
                        dynamic_batch=args.dynamic_batch, opset=args.opset, msda=args.msda, check=not args.no_check,
                        name=name, progress=not args.quiet)
    except (ValueError, NotImplementedError) as e:   # bad sizes / depths, a graph this model cannot have
        print(f"anydepth export: {e}", file=sys.stderr)
        return 2
    print(f"{name}: {len(result.files)} file(s) in {args.out} ({result.seconds:.0f} s)")
    print(result.table())
    print(f"written: {result.manifest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anydepth", description="Any-depth object detection")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="show which compiled kernels are available")
    info.set_defaults(func=_cmd_info)

    models = sub.add_parser("models", help="list the registered models")
    models.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'rtdetr-*'")
    models.set_defaults(func=_cmd_models)

    b = sub.add_parser("bench", help="benchmarks (printed as a table, written as JSON)")
    b.add_argument("--model", action="append", metavar="NAME",
                   help="per-depth benchmark of a registered model (repeatable; default yolov12s-anydepth "
                        "unless --kernels is given)")
    b.add_argument("--imgsz", type=int, default=None,
                   help="square input size for --model (default 640; 224 for classifiers)")
    b.add_argument("--batch", type=int, default=1, help="batch size for --model")
    b.add_argument("--no-peer", action="store_true", help="do not time the Ultralytics/HF/torchvision peer")
    b.add_argument("--kernels", action="store_true", help="kernel microbenchmarks")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="with --model on the CPU, bf16 (= bfloat16) adds full and base through "
                        "optimize(model, dtype=torch.bfloat16) beside the float32 rows (eager, compiled, peers)")
    b.add_argument("--int8", action="store_true",
                   help="with --model: also full and base as int8 PT2E graphs calibrated per depth "
                        "(optimize(model, quantize='int8'); needs the quant extra), beside the float32 compiled rows")
    b.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    b.add_argument("--reps", type=int, default=3, help="timed calls per backend per round")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--compile", action="store_true",
                   help="also time torch.compile: of the eager reference (--kernels) and "
                        "anydepth_kernels.optimize(model, compile=True) at full and base depth (--model)")
    b.add_argument("--onnx", action="store_true",
                   help="with --model: also every depth in onnxruntime, from its per-depth file and from the "
                        "multi-depth file (anydepth export; needs the export extra)")
    b.add_argument("--aoti", action="store_true", help="with --model: also full and base as AOTInductor packages")
    b.add_argument("--out", default="bench/results", help="directory for the JSON report")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=_cmd_bench)

    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    syn = dsub.add_parser("synth", help="generate a synthetic detection dataset (images + COCO JSON)")
    syn.add_argument("--out", required=True, help="output directory")
    syn.add_argument("--images", type=int, required=True, help="number of training images")
    syn.add_argument("--val-images", type=int, default=0,
                     help="also write a validation split (then OUT/train and OUT/val)")
    syn.add_argument("--imgsz", type=int, default=None,
                     help="longest image side (default 320; --task classify: the square crop side, default 64)")
    syn.add_argument("--task", choices=["detect", "classify"], default="detect",
                     help="detect: images + COCO JSON; classify: an ImageFolder of cropped single objects")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--quiet", action="store_true")
    syn.set_defaults(func=_cmd_synth)

    t = sub.add_parser("train", help="self-distillation training (full teaches base)")
    _add_train_args(t)
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="COCO AP (classifiers: top-1/top-5) per depth configuration")
    e.add_argument("--weights", default=None,
                   help="anydepth checkpoint (or Ultralytics .pt / HF directory / torchvision .pth)")
    e.add_argument("--model", default=None, help="model name (checked against the checkpoint)")
    e.add_argument("--data", required=True,
                   help="dataset directory (COCO-JSON or YOLO-txt; classifiers: an ImageFolder)")
    e.add_argument("--imgsz", type=int, default=None, help="input size (default 640; classifiers 224)")
    e.add_argument("--depths", default=None,
                   help="'ladder' (every configuration of the FLOP ladder; the default) or a comma list, e.g. "
                        "full,base (the default with --compile / --dtype bf16 / --int8)")
    e.add_argument("--batch", type=int, default=8)
    e.add_argument("--mode", choices=["letterbox", "resize"], default=None,
                   help="dataset preprocessing (default: the model family's)")
    e.add_argument("--device", default="auto")
    e.add_argument("--max-images", type=int, default=None)
    e.add_argument("--no-latency", action="store_true", help="skip the per-depth latency measurement")
    e.add_argument("--latency-rounds", type=int, default=10,
                   help="interleaved timing rounds over the scored depths (2 calls each per round, after 2 warm-up)")
    e.add_argument("--latency-form", choices=["eager", "fused", "compiled", "cuda-graph"], default="eager",
                   help="the form whose latency is measured (as `anydepth profile --form`)")
    e.add_argument("--profile", default=None,
                   help="read the latency from this depth profile (JSON of `anydepth profile`, e.g. measured on the "
                        "deployment device) instead of measuring it")
    e.add_argument("--pictures", type=int, default=3,
                   help="validation images in the per-depth detections picture (<stem>-depths.png; 0: none)")
    e.add_argument("--compile", action="store_true",
                   help="also score the float32 model compiled (optimize(model, compile=True)), rows <depth>+compiled")
    e.add_argument("--dtype", choices=["float32", "bf16"], default="float32",
                   help="bf16: also score optimize(model, dtype=torch.bfloat16), rows <depth>+bf16")
    e.add_argument("--int8", action="store_true",
                   help="also score the int8 model (optimize(model, quantize='int8'), calibrated per depth), rows "
                        "<depth>+int8")
    e.add_argument("--calib-data", default=None,
                   help="--int8: the data set whose first --calib-images images calibrate (default: --data; better "
                        "a training split)")
    e.add_argument("--calib-images", type=int, default=32, help="--int8: how many calibration images")
    e.add_argument("--int8-no-compile", action="store_true",
                   help="--int8: score the quantized reference graphs (quantize / dequantize around float ops: the "
                        "numerics Inductor lowers to int8 kernels) without compiling them (minutes per depth)")
    e.add_argument("--out", default="runs/eval")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_cmd_eval)

    x = sub.add_parser("export", help="deployable graphs: ONNX files or AOTInductor packages, per depth + "
                                      "one multi-depth file")
    x.add_argument("--model", default=None, help="registered model name (random weights unless --weights)")
    x.add_argument("--weights", default=None, help="anydepth checkpoint (or Ultralytics .pt / HF directory)")
    x.add_argument("--num-classes", type=int, default=None, help="with --model alone: the class count")
    x.add_argument("--format", choices=["onnx", "aoti"], default="onnx")
    x.add_argument("--depth", default="all",
                   help="all (every ladder configuration + the multi-depth file), multi (the multi-depth "
                        "file alone), base, full, a float in [0, 1] or a ladder code such as TTFFFFFF; "
                        "comma-separated for several")
    x.add_argument("--imgsz", type=int, nargs="+", default=None, metavar="N",
                   help="input size: N or H W (multiples of 32; the graphs are static in space; default 640, "
                        "a classifier its own: 224, a ViT/Swin its img_size)")
    x.add_argument("--batch", type=int, default=1, help="traced batch size")
    x.add_argument("--dynamic-batch", action="store_true", help="make the batch a dynamic axis")
    x.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    x.add_argument("--msda", choices=["decompose", "trt-plugin"], default="decompose",
                   help="RT-DETR deformable attention: GridSample decomposition (any runtime) or TensorRT's "
                        "MultiscaleDeformableAttnPlugin_TRT node")
    x.add_argument("--no-check", action="store_true",
                   help="do not run the files against the eager model (onnxruntime / AOTInductor)")
    x.add_argument("--out", default="exports", help="output directory")
    x.add_argument("--quiet", action="store_true")
    x.set_defaults(func=_cmd_export)

    dm = sub.add_parser("demo", help="synthetic data -> self-distillation training -> per-depth AP (CPU, <30 min)",
                        add_help=False)
    dm.add_argument("demo_args", nargs=argparse.REMAINDER)
    dm.set_defaults(func=lambda a: __import__("anydepth.demo", fromlist=["main"]).main(a.demo_args))
    _add_budget_commands(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # its own parser (anydepth.demo), options passed through unchanged
        from anydepth.demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
