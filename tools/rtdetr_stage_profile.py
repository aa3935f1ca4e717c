"""Per-stage latency of an any-depth RT-DETR on the CPU: where the fixed costs are.

Runs the model's forward split into its stages (input check, stem, max-pool, backbone stages,
encoder input projections, AIFI, CCFF, decoder input projections + memory, query selection, each
decoder layer, post-processing as ``predict`` does it), timed stage by stage, for full and base
depth, eager and the fused inference form (``model.to_inference()``), at each thread count asked
for; every (threads, form, depth) configuration runs once per round, rounds interleaved, so the
ratios share the machine's state. The staged forward is checked to give exactly the model's own
output. Prints a table of median ms and GFLOP/s per stage, the depth efficiency
``(full/base latency ratio) / (full/base FLOP ratio)`` of the staged and of the whole forward
and, with ``--compile``, of ``anydepth_kernels.optimize(model, compile=True)`` (whole forward
only: Inductor compiles one graph).

``--baseline`` adds the same rows with the fixed-cost paths as they were before the
stage-profile work (issue 20, part 4: see :func:`baseline_paths`), patched in for those rows only,
so that before and after are measured in one run.

    nice -n 19 python tools/rtdetr_stage_profile.py --threads 2 1 --rounds 7 --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from anydepth.models import rtdetr as R  # noqa: E402
from anydepth.registry import create_model  # noqa: E402
from anydepth.testing import randomize_  # noqa: E402
from anydepth_kernels.benchmark import machine_info  # noqa: E402
from anydepth_kernels.flops import flop_mapping  # noqa: E402

Stage = Tuple[str, Callable[[dict], None]]


def stages(model: R.AnyDepthRTDETR, depth) -> List[Stage]:
    """The forward of ``model`` at ``depth`` as named steps over a state dict ``s`` (``s["x"]``:
    the input). Mirrors ``AnyDepthRTDETR.forward``; :func:`check_staged` compares the two."""
    cfg = model.resolve_depth(depth)
    skips = [cfg.is_skipped(f"backbone.stage{i}") for i in range(1, 5)]
    eskip = cfg.is_skipped("encoder")
    layers = cfg.knob("decoder_layers")
    bb, enc, dec = model.backbone, model.encoder, model.decoder
    out: List[Stage] = []

    def check(s):
        model.check_input(s["x"])
        s["h"] = s["x"]

    out.append(("input check", check))

    def stem(s):
        s["h"] = bb._stem(s["h"])

    out.append(("stem (3 convs)", stem))

    def pool(s):
        s["h"] = bb._pool(s["h"])

    out.append(("stem max-pool", pool))
    for i, skip in enumerate(skips):
        def stage(s, i=i, skip=skip):
            s["h"] = getattr(bb, f"stage{i + 1}")(s["h"], skip)
            if i + 1 in bb.out_stages:
                s.setdefault("feats", []).append(s["h"])
        out.append((f"backbone stage{i + 1}", stage))

    def in_proj(s):
        s["maps"] = [proj(f, eskip) for proj, f in zip(enc.input_proj, s.pop("feats"))]

    out.append(("encoder input proj", in_proj))

    def aifi(s):
        s["maps"][-1] = enc._aifi(s["maps"][-1], eskip)

    out.append(("AIFI", aifi))

    def ccff(s):
        s["enc"] = enc._ccff(s.pop("maps"), eskip)

    out.append(("CCFF (fpn + pan)", ccff))

    def memory(s):
        s["mem"] = dec._memory(s.pop("enc"))

    out.append(("decoder input proj + memory", memory))

    def select(s):
        memory, shapes_list = s["mem"][0], s["mem"][3]
        s["q"] = dec._query_selection(memory, shapes_list)

    out.append(("query selection", select))
    for i in range(layers):
        def layer(s, i=i):
            memory, shapes, starts = s["mem"][:3]
            x, ref = s["q"][:2]
            x, ref, logits = dec._layer(i, x, ref, memory, shapes, starts, logits=i == layers - 1)
            s["q"] = (x, ref, logits)
        out.append((f"decoder layer {i + 1}", layer))

    def post(s):
        _, boxes, logits = s["q"]
        s["out"] = {"logits": logits, "pred_boxes": boxes}
        s["det"] = R._top_detections(logits, boxes, 300, int(s["x"].shape[-1]))  # predict()'s defaults

    out.append(("postprocess (predict's top-k)", post))
    return out


def run_staged(st: List[Stage], x: torch.Tensor, times: Dict[str, List[float]] = None) -> dict:
    s = {"x": x}
    for name, fn in st:
        t0 = time.perf_counter()
        fn(s)
        if times is not None:
            times.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
    return s


def check_staged(model, depth, x) -> None:
    """The staged forward gives exactly what ``model(x, depth)`` gives."""
    with torch.inference_mode():
        a = run_staged(stages(model, depth), x)["out"]
        b = model(x, depth=depth)
    for k in ("logits", "pred_boxes"):
        if not torch.equal(a[k], b[k]):
            raise AssertionError(f"the staged forward differs from model(x) in {k} at depth {depth}: "
                                 "tools/rtdetr_stage_profile.py no longer mirrors AnyDepthRTDETR.forward")


def stage_flops(model, depth, x) -> Dict[str, float]:
    res = {}
    s = {"x": x}
    with torch.inference_mode():
        for name, fn in stages(model, depth):
            counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
            with counter:
                fn(s)
            res[name] = counter.get_total_flops() / 1e9
    return res


# ------------------------------------------------------------------------------------------------
# the paths as they were before (for --baseline): patched in for the baseline rows only
# ------------------------------------------------------------------------------------------------
def _baseline_query_selection(self, memory, shapes_list):
    """Before: the box head over every encoder token, gathers afterwards."""
    device, dtype = memory.device, memory.dtype
    anchors, valid = R._anchors(shapes_list, device, dtype)
    out_mem = self.enc_output_norm(self.enc_output(valid.to(dtype) * memory))
    enc_logits = self.enc_score_head(out_mem)
    enc_coord = self.enc_bbox_head(out_mem) + anchors
    idx = torch.topk(enc_logits.max(-1).values, self.num_queries, dim=1).indices
    ref_unact = enc_coord.gather(1, idx[..., None].expand(-1, -1, 4))
    x = out_mem.gather(1, idx[..., None].expand(-1, -1, out_mem.shape[-1]))
    return x, ref_unact.sigmoid()


def _baseline_all_finite(x):
    """Before: a boolean tensor of the whole input, then ``all``."""
    return bool(torch.isfinite(x).all())


@contextlib.contextmanager
def baseline_paths():
    """The fixed-cost paths as they were: query selection over every token, the input check
    through ``isfinite(x).all()``, no in-place pointwise ops in the eager blocks, and the fused
    stem NCHW with the separable max-pool."""
    import anydepth.model as M
    import anydepth.models.resnet as RN
    import anydepth.nn as NN

    never = lambda t: False  # noqa: E731
    patches = [(R.RTDETRDecoder, "_query_selection", _baseline_query_selection),
               (RN.ResNet, "_stem_channels_last", lambda self, x: False),
               (M, "all_finite", _baseline_all_finite),
               (NN, "inplace_ok", never), (RN, "inplace_ok", never), (R, "inplace_ok", never)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


# ------------------------------------------------------------------------------------------------
def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _niceness() -> int:
    return os.nice(0)


def _report_form(title, st, whole, flops, model_flops):
    """Print one form's per-stage table and its depth-efficiency lines; return its summary dict.
    ``st``: depth -> stage -> [ms] (None for the compiled form), ``whole``: depth -> [ms],
    ``flops``: depth -> stage -> GFLOP of this form, ``model_flops``: depth -> GFLOP of the
    model (the eager count, as ``anydepth bench``: the denominator of the efficiency)."""
    med = statistics.median
    print(f"\n### {title}")
    out = {"title": title}
    if st is not None:
        print("| stage | GFLOP full | ms full | GFLOP/s full | GFLOP base | ms base | GFLOP/s base | full - base ms |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        names = list(dict.fromkeys(n for d in ("full", "base") for n in st[d]))
        out["stages"] = []
        for n in names:
            cells, row = [], {"stage": n}
            for d in ("full", "base"):
                t, g = st[d].get(n), flops[d].get(n)
                if t is None:
                    cells += ["-", "-", "-"]
                else:
                    ms = med(t)
                    row[d] = {"gflop": g, "ms": ms}
                    cells += [f"{g:.2f}", f"{ms:.1f}", f"{g / ms * 1e3:.0f}" if g > 0.01 else "-"]
            diff = row.get("full", {}).get("ms", 0.0) - row.get("base", {}).get("ms", 0.0)
            out["stages"].append(row)
            print(f"| {n} | " + " | ".join(cells) + f" | {diff:+.1f} |")
        sums = {d: sum(med(t) for t in st[d].values()) for d in ("full", "base")}
        gf = {d: sum(flops[d].values()) for d in ("full", "base")}
        print("| **sum of stages** | " + " | ".join(
            f"{gf[d]:.2f} | {sums[d]:.1f} | {gf[d] / sums[d] * 1e3:.0f}" for d in ("full", "base"))
            + f" | {sums['full'] - sums['base']:+.1f} |")
        out["staged_ms"] = sums
    w = {d: med(whole[d]) for d in ("full", "base")}
    out["whole_ms"] = w
    print(f"| **whole forward** | | {w['full']:.1f} | | | {w['base']:.1f} | | {w['full'] - w['base']:+.1f} |")
    fr = model_flops["full"] / model_flops["base"]
    lr = w["full"] / w["base"]
    dF, dT = model_flops["full"] - model_flops["base"], w["full"] - w["base"]
    need = w["full"] / (0.95 * fr)
    out.update(flop_ratio=fr, latency_ratio=lr, efficiency=lr / fr, marginal_gflops_per_s=dF / dT * 1e3,
               base_gflops_per_s=model_flops["base"] / w["base"] * 1e3, base_ms_for_0_95=need)
    print(f"depth efficiency (whole forward): latency ratio {lr:.3f} / FLOP ratio {fr:.3f} "
          f"({model_flops['full']:.2f} / {model_flops['base']:.2f} GFLOP) = **{lr / fr:.3f}**")
    print(f"base runs at {out['base_gflops_per_s']:.0f} GFLOP/s, the work that full adds at "
          f"{out['marginal_gflops_per_s']:.0f} GFLOP/s ({dF:.2f} GFLOP in {dT:.1f} ms); 0.95 needs base <= "
          f"{need:.1f} ms at this full ({w['base'] - need:+.1f} ms to go), i.e. base at >= "
          f"{(0.95 * fr - 1) / (fr - 1) * 100:.0f}% of the added work's GFLOP/s")
    if st is not None:
        lr_s = sums["full"] / sums["base"]
        print(f"(sum of the timed stages: latency ratio {lr_s:.3f}, efficiency {lr_s / fr:.3f})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rtdetr-r50-anydepth")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--num-queries", type=int, default=300, help="the model's num_queries (small images need fewer)")
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--forms", nargs="+", default=["eager", "fused"], choices=["eager", "fused"])
    p.add_argument("--baseline", action="store_true", help="also time the paths as they were before")
    p.add_argument("--compile", action="store_true", help="also time optimize(model, compile=True), whole forward")
    p.add_argument("--json", help="write the raw results here")
    a = p.parse_args(argv)

    import copy

    torch.set_num_threads(min(a.threads))  # setup (checks, FLOP counts) on the fewest threads asked for
    torch.manual_seed(0)
    model = randomize_(create_model(a.model, num_classes=80, num_queries=a.num_queries), 0).eval()
    models = {"eager": model}
    if "fused" in a.forms:
        models["fused"] = copy.deepcopy(model).to_inference()
    if "eager" not in a.forms:
        del models["eager"]
    x = torch.rand(1, 3, a.imgsz, a.imgsz, generator=torch.Generator().manual_seed(0))
    depths = ("full", "base")
    variants = {"new": contextlib.nullcontext, **({"old": baseline_paths} if a.baseline else {})}
    configs = [(v, f, d) for v in variants for f in models for d in depths]

    print(f"# {a.model} {a.imgsz}x{a.imgsz}, batch 1, threads {a.threads}, {a.rounds} rounds interleaved; "
          f"load {_load()} at start, niceness {_niceness()}", flush=True)
    flops = {}
    for v, f, d in configs:
        with variants[v]():
            check_staged(models[f], d, x)
            flops[(v, f, d)] = stage_flops(models[f], d, x)
    model_flops = {v: {d: sum(stage_flops(model, d, x).values()) if "eager" not in models
                       else sum(flops[(v, "eager", d)].values()) for d in depths} for v in variants}
    compiled = {}
    compile_s = {}
    if a.compile:
        from anydepth_kernels import optimize

        for v in variants:
            compiled[v] = optimize(copy.deepcopy(model), compile=True)
            for d in depths:
                t0 = time.perf_counter()
                with variants[v](), torch.inference_mode():
                    compiled[v](x, depth=d)
                compile_s[f"{v} {d}"] = time.perf_counter() - t0
                print(f"# {v} compiled {d}: first call {compile_s[f'{v} {d}']:.0f} s", flush=True)

    st: Dict[tuple, Dict[str, List[float]]] = {}  # (threads, variant, form, depth) -> stage -> [ms]
    tot: Dict[tuple, List[float]] = {}  # (threads, variant, form, depth) -> [ms] of the whole call
    loads = []
    with torch.inference_mode():
        for r in range(a.warmup + a.rounds):
            loads.append(_load())
            keep = r >= a.warmup
            for th in a.threads:
                torch.set_num_threads(th)
                for v, f, d in configs:
                    with variants[v]():
                        times = st.setdefault((th, v, f, d), {}) if keep else {}
                        run_staged(stages(models[f], d), x, times)
                        t0 = time.perf_counter()
                        models[f](x, depth=d)
                        if keep:
                            tot.setdefault((th, v, f, d), []).append((time.perf_counter() - t0) * 1e3)
                for v, cm in compiled.items():
                    for d in depths:
                        with variants[v]():
                            t0 = time.perf_counter()
                            cm(x, depth=d)
                            if keep:
                                tot.setdefault((th, v, "compiled", d), []).append((time.perf_counter() - t0) * 1e3)
            print(f"# round {r + 1}/{a.warmup + a.rounds} done, load {loads[-1]}", file=sys.stderr, flush=True)

    result = {"model": a.model, "imgsz": a.imgsz, "rounds": a.rounds, "machine": machine_info(torch.device("cpu")),
              "load_per_round": loads, "niceness": _niceness(), "compile_s": compile_s, "forms": []}
    try:
        result["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        pass
    for th in a.threads:
        print(f"\n## {th} thread(s)")
        for v in variants:
            label = "" if v == "new" else "before (--baseline): "
            for f in list(models) + (["compiled"] if v in compiled else []):
                title = f"{label}{f}" + (": median ms and GFLOP/s per stage" if f != "compiled" else
                                         " (optimize(compile=True); one graph, whole forward only)")
                stage_t = None if f == "compiled" else {d: st[(th, v, f, d)] for d in depths}
                whole = {d: tot[(th, v, f, d)] for d in depths}
                fl = {d: flops.get((v, f, d), {}) for d in depths}
                row = _report_form(title, stage_t, whole, fl, model_flops[v])
                row.update(threads=th, variant=v, form=f)
                result["forms"].append(row)
    m = result["machine"]
    print(f"\n# load (1/5/15 min) per round: {loads}; niceness {result['niceness']}; machine: {m.get('cpu')}, "
          f"{m.get('cores')} cores, torch {m.get('torch')}, Python {platform.python_version()}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
