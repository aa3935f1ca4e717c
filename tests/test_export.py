"""anydepth.export to ONNX: per-depth ONNX, the multi-depth ONNX (depth as graph inputs, one If per
refinement path), TensorRT's deformable-attention node, the CLI and errors (the AOTInductor
packages: tests/test_export_aoti.py, a file of its own so that the two test processes of ``make
test`` export in parallel).

Each model is traced once at 64 px (a module-scoped fixture: every depth in one trace, the
per-depth files are its specialisations); every file runs in onnxruntime and is compared with the
eager model. The tracing and the ONNX translation take minutes on a 2-core machine: those tests
are marked ``slow`` (``-m "not slow"`` leaves the argument checks and the CLI)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import anydepth
from helpers import EXPORT_IMGSZ as IMGSZ
from helpers import EXPORT_MODELS as MODELS
from helpers import EXPORT_TOL as TOL
from helpers import export_depth_grid as _depth_grid
from helpers import export_eager as _eager
from helpers import export_input as _x
from helpers import export_model as _model
from helpers import export_rel as _rel


def _session(path):
    from anydepth.export import ort_session

    return ort_session(path, threads=1)


@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory):
    """name -> (model, ExportResult) of depth='all' with a dynamic batch (every ladder file + the
    multi-depth file), exported once per module on first use."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from anydepth.export import export

    done = {}

    def get(name):
        if name not in done:
            model = _model(name)
            out = tmp_path_factory.mktemp(name)
            done[name] = model, export(model, out, format="onnx", depth="all", imgsz=IMGSZ, dynamic_batch=True,
                                       check=False, name=name)
        return done[name]
    return get


@pytest.fixture(params=list(MODELS))
def onnx_all(request, onnx_exports):
    return onnx_exports(request.param)


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
