"""anydepth.export: per-depth ONNX, the multi-depth ONNX (depth as graph inputs, one If per
refinement path), TensorRT's deformable-attention node, AOTInductor packages, the CLI and errors.

Each model is traced once (module-scoped fixtures: the traces and the AOTInductor compilation are
the slow part; the ONNX and the AOTInductor exports share the multi-depth trace) at 64 px; every
file runs in onnxruntime / AOTInductor and is compared with the eager model. The tracing, ONNX
translation and AOTInductor compilation take minutes on a 2-core machine: those tests are marked
``slow`` (``-m "not slow"`` leaves the argument checks and the CLI)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import anydepth
from anydepth.testing import randomize_

IMGSZ = 64
MODELS = {
    "yolov12n-anydepth": dict(num_classes=4),
    "rtdetr-r18-anydepth": dict(num_classes=4, num_queries=20),
}
TOL = 1e-4  # max |out - eager| / max |eager|, per output


def _model(name):
    torch.manual_seed(0)
    m = anydepth.create_model(name, **MODELS[name]).eval()
    return randomize_(m, calibrate_shape=(2, 3, IMGSZ, IMGSZ))


def _rel(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _eager(model, x, config):
    with torch.no_grad():
        out = model(x, depth=config)
    return [t.numpy() for t in (out.values() if isinstance(out, dict) else [out])]


def _session(path):
    from anydepth.export import ort_session

    return ort_session(path, threads=1)


@pytest.fixture(scope="module")
def models():
    """name -> (model, traces): one random model per name and the dict its traces are kept in
    (``export(traces=...)``), so the ONNX and AOTInductor exports trace it once."""
    done = {}

    def get(name):
        if name not in done:
            done[name] = _model(name), {}
        return done[name]
    return get


def _mid(model):
    """A mid-ladder depth: some switches skipped, some run."""
    ladder = model.depth_configs((1, 3, IMGSZ, IMGSZ))
    return ladder[len(ladder) // 2]


@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory, models):
    """name -> (model, ExportResult) of depth='all' with a dynamic batch (every ladder file + the
    multi-depth file), exported once per module on first use."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from anydepth.export import export

    done = {}

    def get(name):
        if name not in done:
            model, traces = models(name)
            out = tmp_path_factory.mktemp(name)
            done[name] = model, export(model, out, format="onnx", depth="all", imgsz=IMGSZ, dynamic_batch=True,
                                       check=False, name=name, traces=traces)
        return done[name]
    return get


@pytest.fixture(scope="module")
def aoti_exports(tmp_path_factory, models):
    """name -> (model, ExportResult) of the multi-depth AOTInductor package (from the ONNX
    export's trace when it ran first) and one mid-ladder per-depth package, dynamic batch."""
    from anydepth.export import export

    done = {}

    def get(name):
        if name not in done:
            model, traces = models(name)
            out = tmp_path_factory.mktemp(f"{name}-aoti")
            done[name] = model, export(model, out, format="aoti", depth=["multi", _mid(model).code], imgsz=IMGSZ,
                                       dynamic_batch=True, check=False, name=name, traces=traces)
        return done[name]
    return get


@pytest.fixture(params=list(MODELS))
def onnx_all(request, onnx_exports):
    return onnx_exports(request.param)


def _x(batch=1, seed=1):
    return torch.rand((batch, 3, IMGSZ, IMGSZ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_per_depth_onnx_equals_eager_at_every_ladder_depth(onnx_all):
    import onnx

    model, result = onnx_all
    ladder = model.depth_configs((1, 3, IMGSZ, IMGSZ))
    assert result.ladder == [c.code for c in ladder]
    x = _x()
    for config in ladder:
        f = result.file(config.code, "onnx")
        proto = onnx.load(f.path)
        onnx.checker.check_model(proto)
        ops = {(n.domain or "ai.onnx", n.op_type) for n in proto.graph.node}
        assert all(domain == "ai.onnx" for domain, _ in ops), ops  # standard ONNX only
        assert ("ai.onnx", "If") not in ops  # a static graph
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
        # norms folded: every conv carries its bias; no BatchNormalization and no runtime weight math
        convs = [n for n in proto.graph.node if n.op_type == "Conv"]
        assert convs and all(len(n.input) == 3 for n in convs)
        assert ("ai.onnx", "BatchNormalization") not in ops
        inits = {i.name for i in proto.graph.initializer}
        assert not [n for n in proto.graph.node if n.op_type == "Mul" and all(i in inits for i in n.input)]
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["anydepth.depth"] == config.code
        got = _session(f.path).run(None, {"images": x.numpy()})
        for o, r in zip(got, _eager(model, x, config)):
            assert _rel(o, r) <= TOL, (config.code, _rel(o, r))


def _depth_grid(model):
    """Every ladder depth, and off the ladder: alternating switches and (RT-DETR) each decoder
    depth at base switches."""
    space = model.depth_space
    configs = list(model.depth_configs((1, 3, IMGSZ, IMGSZ)))
    configs.append(space.make({s: i % 2 == 0 for i, s in enumerate(space.switches)}))
    for k, spec in space.knob_specs.items():
        configs += [space.make(dict.fromkeys(space.switches, True), {k: v}) for v in range(spec.low, spec.high + 1)]
    return list(dict.fromkeys(configs))


@pytest.mark.slow
def test_multi_depth_onnx_equals_eager_at_every_depth(onnx_all):
    from anydepth.export import onnx_depth_inputs

    model, result = onnx_all
    space = model.depth_space
    sess = _session(result.file("multi").path)
    assert [i.name for i in sess.get_inputs()] == ["images", "skip", *space.knob_specs]
    assert sess.get_inputs()[1].type == "tensor(bool)" and sess.get_inputs()[1].shape == [len(space.switches)]
    x = _x(batch=2)  # the batch axis is dynamic
    outs = {}
    for config in _depth_grid(model):
        got = sess.run(None, {"images": x.numpy(), **onnx_depth_inputs(model, config)})
        for o, r in zip(got, _eager(model, x, config)):
            assert _rel(o, r) <= TOL, (config.code, _rel(o, r))
        outs[config] = got[0]
    # the depth input really switches: base and full differ
    assert not np.allclose(outs[space.base()], outs[space.full()])


@pytest.mark.slow
def test_multi_depth_onnx_is_one_model_with_an_if_per_switch(onnx_all):
    import onnx

    model, result = onnx_all
    proto = onnx.load(result.file("multi").path)
    onnx.checker.check_model(proto)
    ifs = [n for n in proto.graph.node if n.op_type == "If"]
    knob_ifs = sum(spec.high - 1 for spec in model.depth_space.knob_specs.values())  # layer 0 always runs
    assert len(ifs) == len(model.depth_space.switches) + knob_ifs
    full = result.file(model.depth_space.full().code).size_bytes
    per_depth = [f.size_bytes for f in result.files if f.depth != "multi"]
    # the weights are stored once (the If branches read the outer graph's initializers)
    assert result.file("multi").size_bytes < 1.1 * full
    assert result.file("multi").size_bytes < 0.5 * sum(per_depth)
    # each branch holds the constants its convs read (onnxruntime blocks a conv for NCHWc only when
    # its weight and bias are initializers of its own graph): the bias is one, the weight is one
    # or the branch's own product of a shared weight and its norm scale
    branch_convs = 0
    for node in ifs:
        for attr in node.attribute:
            inits = {i.name for i in attr.g.initializer}
            made = {o for n in attr.g.node for o in n.output}
            for conv in (n for n in attr.g.node if n.op_type == "Conv"):
                assert len(conv.input) == 3 and conv.input[2] in inits, conv.name
                assert conv.input[1] in inits or conv.input[1] in made, conv.name
                branch_convs += 1
    assert branch_convs > 0
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["anydepth.switches"]) == list(model.depth_space.switches)
    assert json.loads(meta["anydepth.ladder"]) == result.ladder


def _executed_convs(path, feeds, prefix):
    """Conv kernels onnxruntime runs for one call (its profiler lists subgraph nodes too)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(prefix)
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    return sum(1 for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
               and "Conv" in e.get("args", {}).get("op_name", ""))


@pytest.mark.slow
def test_multi_depth_onnx_runs_only_the_taken_branches(onnx_all, tmp_path):
    from anydepth.export import onnx_depth_inputs

    model, result = onnx_all
    x = _x().numpy()
    space = model.depth_space
    counts = {}
    for config in (space.base(), space.full()):
        multi = _executed_convs(result.file("multi").path, {"images": x, **onnx_depth_inputs(model, config)},
                                tmp_path / "multi")
        single = _executed_convs(result.file(config.code).path, {"images": x}, tmp_path / "single")
        assert multi == single > 0, (config.code, multi, single)
        counts[config] = multi
    assert counts[space.base()] < counts[space.full()]


@pytest.mark.slow
def test_trt_plugin_node_has_tensorrt_signature(tmp_path):
    pytest.importorskip("onnxscript")
    import onnx
    from onnx import numpy_helper

    from anydepth.export import TRT_DOMAIN, TRT_PLUGIN, export

    model = _model("rtdetr-r18-anydepth")
    result = export(model, tmp_path, format="onnx", depth="base", imgsz=IMGSZ, msda="trt-plugin",
                    name="r18")
    proto = onnx.load(result.files[0].path)
    nodes = [n for n in proto.graph.node if n.op_type == TRT_PLUGIN]
    base_layers = model.depth_space.base().knob("decoder_layers")
    assert len(nodes) == base_layers and all(n.domain == TRT_DOMAIN for n in nodes)
    assert not [n for n in proto.graph.node if n.op_type == "GridSample"]
    assert any(o.domain == TRT_DOMAIN for o in proto.opset_import)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in nodes:
        assert len(n.input) == 5 and len(n.output) == 1
        attrs = {a.name: a.s.decode() for a in n.attribute}
        assert attrs["plugin_version"] == "1"
        shapes, starts = inits[n.input[1]], inits[n.input[2]]
        assert shapes.dtype == np.int32 and starts.dtype == np.int32
        assert shapes.tolist() == [[8, 8], [4, 4], [2, 2]] and starts.tolist() == [0, 64, 80]  # strides 8/16/32


@pytest.fixture(params=list(MODELS))
def aoti_all(request, aoti_exports):
    pytest.importorskip("onnxruntime")  # the shared trace is made by the ONNX fixture first
    return aoti_exports(request.param)


@pytest.mark.slow
def test_aoti_multi_depth_package_equals_eager_at_every_depth(aoti_all):
    """One AOTInductor package of the multi-depth graph (torch.cond) serves every depth: compared
    with eager at every ladder depth and off the ladder (batch 2; the batch axis is dynamic), and the
    per-depth package at its depth (batch 1)."""
    from anydepth.export import aoti_depth_inputs, aoti_load

    model, result = aoti_all
    multi, mid = result.file("multi"), result.file(_mid(model).code)
    assert multi.path.endswith("-multidepth.pt2") and mid.path.endswith(f"-{_mid(model).code}.pt2")
    runner = aoti_load(multi.path)
    x = _x(batch=2)
    outs = {}
    for config in _depth_grid(model):
        with torch.no_grad():
            got = runner(x, *aoti_depth_inputs(model, config))
        for o, r in zip(got, _eager(model, x, config)):
            assert _rel(o.numpy(), r) <= TOL, (config.code, _rel(o.numpy(), r))
        outs[config] = got[0]
    space = model.depth_space
    assert not torch.allclose(outs[space.base()], outs[space.full()])
    x1 = _x(batch=1, seed=2)
    with torch.no_grad():
        got = aoti_load(mid.path)(x1)
    for o, r in zip(got, _eager(model, x1, _mid(model))):
        assert _rel(o.numpy(), r) <= TOL


@pytest.mark.slow
def test_aoti_packages_run_without_our_code(aoti_exports, tmp_path):
    """The multi-depth and the per-depth package of each model, loaded in a process where anydepth
    cannot be imported, at the mid-ladder depth (batch 2: a dynamic-batch multi-depth package
    takes batch >= 2, see the README)."""
    from anydepth.export import aoti_depth_inputs

    runs = []
    x = _x(batch=2)
    torch.save(x, tmp_path / "x.pt")
    for name in MODELS:
        model, result = aoti_exports(name)
        config = _mid(model)
        ref = _eager(model, x, config)
        depth = tmp_path / f"{name}-depth.pt"
        torch.save(list(aoti_depth_inputs(model, config)), depth)
        none = tmp_path / "none.pt"
        torch.save([], none)
        runs.append((result.file("multi").path, depth, tmp_path / f"{name}-multi-y.pt", ref))
        runs.append((result.file(config.code).path, none, tmp_path / f"{name}-mid-y.pt", ref))
    script = textwrap.dedent("""
        import sys
        for mod in ("anydepth", "anydepth_kernels"):
            sys.modules[mod] = None  # importing our code would fail here
        import torch
        x = torch.load(sys.argv[1], weights_only=True)
        for pkg, depth, y in zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3]):
            runner = torch._inductor.aoti_load_package(pkg)
            with torch.no_grad():
                out = runner(x, *torch.load(depth, weights_only=True))
            torch.save([t.contiguous() for t in out], y)
        """)
    args = [str(tmp_path / "x.pt"), *(str(a) for run in runs for a in run[:3])]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for _, _, y, ref in runs:
        got = torch.load(y, weights_only=True)
        assert len(got) == len(ref)
        for o, r in zip(got, ref):
            assert _rel(o.numpy(), r) <= TOL


@pytest.mark.slow
def test_bench_onnx_rows(onnx_exports, monkeypatch):
    """``anydepth bench --onnx``: onnxruntime rows per depth from both files next to eager, with the
    depth-efficiency summary (the export itself is the fixture's, so nothing is traced twice)."""
    import anydepth.export as ex
    from anydepth import benchmark

    name = "yolov12n-anydepth"
    _, result = onnx_exports(name)
    monkeypatch.setattr(ex, "export", lambda *a, **k: result)
    report = benchmark.run_model_benchmark(name, imgsz=IMGSZ, rounds=1, warmup=0, peer=False, fuse=False,
                                           onnx=True, progress=False)
    names = {r.name for r in report.rows}
    n = len(result.ladder)
    assert {"base+ort", "full+ort", "base+ort-multi", "full+ort-multi"} <= names
    assert sum(r.name.endswith("+ort") for r in report.rows) == n
    assert sum(r.name.endswith("+ort-multi") for r in report.rows) == n
    assert all(r.median_ms > 0 for r in report.rows)
    assert any("depth efficiency" in line for line in report.summary())
    assert "+ort-multi" in report.table()


# -- errors and the CLI -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yolo():
    return anydepth.create_model("yolov12n-anydepth", num_classes=4).eval()


def test_unknown_depth_names_the_ladder(yolo, tmp_path):
    from anydepth.export import export

    with pytest.raises(ValueError, match=r"unknown depth 'deep'.*TTTTTTTT"):
        export(yolo, tmp_path, depth="deep", imgsz=IMGSZ)
    with pytest.raises(ValueError, match="unknown depth 'TTF'"):
        export(yolo, tmp_path, depth="TTF", imgsz=IMGSZ)
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export(yolo, tmp_path, format="tflite", imgsz=IMGSZ)
    with pytest.raises(ValueError, match="multiples of 32"):
        export(yolo, tmp_path, imgsz=50)
    official = anydepth.create_model("yolov12n-anydepth", num_classes=4, split="official").eval()
    with pytest.raises(NotImplementedError, match="split='official'"):
        export(official, tmp_path, depth="multi", imgsz=IMGSZ)


def test_opset_too_old(yolo, tmp_path):
    from anydepth.export import export

    rtdetr = anydepth.create_model("rtdetr-r18-anydepth", num_classes=4, num_queries=20).eval()
    with pytest.raises(ValueError, match=r"GridSample, which needs opset >= 16"):
        export(rtdetr, tmp_path, depth="base", imgsz=IMGSZ, opset=15)
    with pytest.raises(ValueError, match=r"opset 16 is too old.*>= 17"):
        export(yolo, tmp_path, depth="base", imgsz=IMGSZ, opset=16)


def test_missing_export_extra(yolo, tmp_path, monkeypatch):
    from anydepth.export import export

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r'pip install "anydepth\[export\]"'):
        export(yolo, tmp_path, depth="base", imgsz=IMGSZ)


def test_depth_codes_round_trip():
    space = anydepth.create_model("rtdetr-r18-anydepth", num_queries=20).depth_space
    for config in [*space.default_ladder(), space.make({"encoder": True}, {"decoder_layers": 2})]:
        assert space.from_code(config.code) == config
    with pytest.raises(ValueError, match="not a knob"):
        space.from_code("TTTTT-layers2")


def test_cli_export_parses_and_reports(monkeypatch, tmp_path, capsys):
    from anydepth import cli
    import anydepth.export as ex

    seen = {}

    def fake_export(model, out, **kw):
        seen.update(kw, out=out, model=model)
        return ex.ExportResult(model=kw["name"], imgsz=kw["imgsz"], batch=1, dynamic_batch=kw["dynamic_batch"],
                               opset=kw["opset"], msda=kw["msda"], input_names=["images"], output_names=["output"],
                               switches=[], knobs={}, ladder=[], manifest=str(tmp_path / "export.json"))

    monkeypatch.setattr(ex, "export", fake_export)
    rc = cli.main(["export", "--model", "yolov12n-anydepth", "--num-classes", "3", "--format", "aoti", "--depth",
                   "base,full", "--imgsz", "96", "128", "--dynamic-batch", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    assert seen["format"] == "aoti" and seen["depth"] == ["base", "full"] and seen["imgsz"] == (96, 128)
    assert seen["dynamic_batch"] and seen["msda"] == "decompose" and seen["model"].num_classes == 3
    assert "export.json" in capsys.readouterr().out
