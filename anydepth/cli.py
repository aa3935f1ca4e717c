"""The ``anydepth`` command.

  anydepth info                       what is compiled and available here
  anydepth bench --kernels [options]  kernel microbenchmarks against eager PyTorch
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


def _cmd_bench(args) -> int:
    from anydepth_kernels import benchmark

    if not args.kernels:
        print("anydepth bench: no model benchmarks exist yet; running the kernel benchmarks "
              "(--kernels)", file=sys.stderr)
    dtype = DTYPES[args.dtype]
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anydepth", description="Any-depth object detection")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="show which compiled kernels are available")
    info.set_defaults(func=_cmd_info)

    b = sub.add_parser("bench", help="benchmarks (printed as a table, written as JSON)")
    b.add_argument("--kernels", action="store_true", help="kernel microbenchmarks")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    b.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
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
