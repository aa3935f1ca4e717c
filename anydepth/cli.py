"""The ``anydepth`` command.

  anydepth info                                 what is compiled and available here
  anydepth models                               registered model names
  anydepth bench --model NAME [--imgsz 640]     per-depth latency/GFLOPs table, JSON and plot
  anydepth bench --kernels [options]            kernel microbenchmarks against eager PyTorch
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import List, Optional

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
                                             reps=args.reps, warmup=args.warmup, progress=not args.quiet)
    print(f"\nconcat-free CSP output conv (+ folded BN + SiLU), {report.dtype}, on {report.device}: {where}")
    print(report.table())
    print(f"written: {benchmark.save_report(report, args.out, f'concat_conv-{device_tag}-{report.dtype}')}")
    try:
        from anydepth_kernels import benchmark_attention
    except ImportError:
        benchmark_attention = None
    if benchmark_attention is not None:
        report = benchmark_attention.run_attention_benchmarks(
            device=args.device, dtype=dtype, rounds=args.rounds, reps=args.reps, warmup=args.warmup,
            progress=not args.quiet)
        print(f"\nattention (YOLOv12 area attention / AIFI shapes), {report.dtype}, on {report.device}: {where}")
        print(report.table())
        print(f"written: {benchmark.save_report(report, args.out, f'attention-{device_tag}-{report.dtype}')}")
    try:
        from anydepth_kernels import benchmark_ms_deform
    except ImportError:
        return
    report = benchmark_ms_deform.run_ms_deform_benchmarks(
        device=args.device, dtype=dtype, rounds=args.rounds, reps=args.reps, warmup=args.warmup,
        progress=not args.quiet,
    )
    print(f"\nmulti-scale deformable attention, {report.dtype}, on {report.device}: {where}")
    print(report.table())
    path = benchmark.save_report(report, args.out, f"ms_deform_attn-{device_tag}-{report.dtype}")
    print(f"written: {path}")


def _bench_model(args, name, dtype) -> None:
    from anydepth import benchmark

    report = benchmark.run_model_benchmark(
        name, imgsz=args.imgsz, batch=args.batch, device=args.device, dtype=dtype,
        rounds=args.rounds, warmup=args.warmup, peer=not args.no_peer, progress=not args.quiet,
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
    b.add_argument("--imgsz", type=int, default=640, help="square input size for --model")
    b.add_argument("--batch", type=int, default=1, help="batch size for --model")
    b.add_argument("--no-peer", action="store_true", help="do not time the Ultralytics/HF peer")
    b.add_argument("--kernels", action="store_true", help="kernel microbenchmarks")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    b.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    b.add_argument("--reps", type=int, default=3, help="timed calls per backend per round")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--compile", action="store_true", help="also time torch.compile of eager")
    b.add_argument("--out", default="bench/results", help="directory for the JSON report")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
