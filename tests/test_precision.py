"""bf16 (``optimize(model, dtype=torch.bfloat16)``) and int8 per depth
(``optimize(model, quantize="int8", ...)``) against the float32 model, at a tiny size.

Tolerances are derived from each format's precision (see each test's comment); the models carry
random, well-conditioned weights (randomize_: activations stay normalised, as in a trained net).
"""
import copy

import pytest
import torch

import anydepth
import anydepth_kernels as ak
from anydepth.testing import randomize_

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64


@pytest.fixture(scope="module")
def yolo():
    model = anydepth.create_model("yolov12n-anydepth", num_classes=5).eval()
    randomize_(model, seed=3, calibrate_shape=(2, 3, SIZE, SIZE))
    return model.eval()


def _errors(out: torch.Tensor, ref: torch.Tensor):
    """YOLO output [B, 4 + C, A]: mean absolute error of the boxes (relative to the largest box
    coordinate: boxes are decoded in pixels, with random weights reaching past the image) and of
    the scores (sigmoids in [0, 1])."""
    box = (out[:, :4] - ref[:, :4]).abs().mean() / ref[:, :4].abs().max()
    score = (out[:, 4:] - ref[:, 4:]).abs().mean()
    print(f"mean relative box error {float(box):.2e}, mean score error {float(score):.2e}")
    return float(box), float(score)


def _images(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, SIZE, SIZE, generator=g) for _ in range(n)]


def _noisy_reference(model, x: torch.Tensor, depth: str, kind: str):
    """Mean box and score errors of the float32 model when every convolution's output is perturbed
    by noise the size of one rounding of the format (``kind``): ``"bf16"`` a relative error
    uniform in [-2^-8, 2^-8] (bf16 keeps 8 significant bits), ``"int8"`` an absolute error uniform
    in [-step/2, step/2] with step = (max - min) / 255 of that output (per-tensor 8-bit levels over
    its range). This is the format's error simulated on the same network, so the bound adapts to
    how sensitive this particular (random, untrained, chaotic) network is: rounding the input
    alone moves single scores by up to 0.2 here, so a fixed bound would say nothing."""
    noisy = _perturbed_forward(model, model.modules(), (torch.nn.Conv2d,), x, depth, kind)
    with torch.no_grad():
        return _errors(noisy, model(x, depth=depth))


def _perturbed_forward(model, modules, types, x: torch.Tensor, depth: str, kind: str):
    """``model(x, depth)`` with every output of ``modules`` of ``types`` perturbed by one rounding of
    the format (see :func:`_noisy_reference`), the noise seeded."""
    g = torch.Generator().manual_seed(11)

    def perturb(module, args, out):
        noise = torch.rand(out.shape, generator=g) * 2 - 1
        if kind == "bf16":
            return out * (1 + noise * 2.0 ** -8)
        return out + noise * (out.max() - out.min()) / 255 / 2

    hooks = [m.register_forward_hook(perturb) for m in modules if isinstance(m, types)]
    try:
        with torch.no_grad():
            return model(x, depth=depth)
    finally:
        for h in hooks:
            h.remove()


#: the format rounds more tensors than the simulation perturbs (weights, the input, attention and
#: concatenation intermediates besides the conv outputs: about twice as many); independent errors
#: of equal size would add up to sqrt(2)x the simulated one, rounded up to 2x (measured here:
#: int8 0.9-1.4x the simulation)
FACTOR = 2


@pytest.mark.skipif(not ak.bf16_supported("cpu"), reason="this CPU has no native bfloat16 (the fallback is "
                    "tested in test_bf16_falls_back_to_float32_where_unsupported)")
def test_bf16_matches_float32_within_bf16_precision(yolo):
    from anydepth_kernels.optimize import _bf16_hooks

    model = ak.optimize(copy.deepcopy(yolo), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    # the format itself, eagerly: every weight and every intermediate tensor rounded to bf16
    eager_bf16 = copy.deepcopy(yolo).to(torch.bfloat16)
    _bf16_hooks(eager_bf16)
    x = _images(1, 1)[0]
    for depth in ("full",):  # one compile (minutes on a loaded 2-core machine); base: the benchmark
        with torch.no_grad():
            ref = yolo(x, depth=depth)
            out = model(x, depth=depth)
            plain = eager_bf16(x, depth=depth)
        assert out.dtype == torch.float32 and plain.dtype == torch.float32  # cast back on the way out
        box, score = _errors(out, ref)
        box_eager, score_eager = _errors(plain, ref)
        # bf16 keeps 8 significant bits (a relative rounding error <= 2^-8, products accumulated in
        # float32): each rounded tensor perturbs the network like rounding its input to bf16
        box_ref, score_ref = _noisy_reference(yolo, x, depth, "bf16")
        # plus what the simulation leaves out: the head decodes boxes and scores in bf16 after the
        # last conv (anchor + distance, times the stride; a sigmoid): two more roundings of the
        # outputs themselves, each <= 2^-9 of the value (round to nearest, 8 significant bits)
        out_rounding = 2 * 2.0 ** -9
        assert box_eager <= FACTOR * box_ref + out_rounding and score_eager <= FACTOR * score_ref + out_rounding
        # the compiled graph rounds a different set of tensors than the eager bf16 model (norms
        # folded into the weights before rounding, pointwise tails fused into the conv): about as
        # many, so its error stays within FACTOR x the format's own (measured: 1.1-1.2x)
        assert box <= FACTOR * box_eager and score <= FACTOR * score_eager, depth


def test_bf16_falls_back_to_float32_where_unsupported(yolo, monkeypatch):
    import sys

    opt = sys.modules["anydepth_kernels.optimize"]  # the module (the package exports the function by that name)
    monkeypatch.setattr(opt, "bf16_supported", lambda device="cpu": False)
    with pytest.warns(UserWarning, match="no native bfloat16"):
        model, report = ak.optimize(copy.deepcopy(yolo), dtype=torch.bfloat16, compile=False, return_report=True)
    assert next(model.parameters()).dtype == torch.float32
    assert any("float32 kept" in n for n in report.notes)


def test_precision_arguments_are_checked(yolo):
    with pytest.raises(ValueError, match="dtype"):
        ak.optimize(copy.deepcopy(yolo), dtype=torch.float16)
    if ak.bf16_supported("cpu"):
        with pytest.raises(ValueError, match="compiled path"):
            ak.optimize(copy.deepcopy(yolo), dtype=torch.bfloat16, compile=False)
    with pytest.raises(ValueError, match="quantize"):
        ak.optimize(yolo, quantize="int4", calibration=[])
    with pytest.raises(ValueError, match="calibration"):
        ak.optimize(yolo, quantize="int8")
    with pytest.raises(TypeError, match="any-depth model"):
        ak.optimize(torch.nn.Conv2d(3, 3, 1), quantize="int8", calibration=[torch.rand(1, 3, 8, 8)])
    with pytest.raises(ValueError, match="one shape"):
        ak.optimize(yolo, quantize="int8", calibration=[torch.rand(1, 3, 64, 64), torch.rand(1, 3, 96, 96)])


@pytest.fixture(scope="module")
def int8(yolo):
    # calibrated per depth on 4 batches; compile=False keeps the reference int8 graphs (the same
    # quantize/dequantize numerics Inductor lowers to oneDNN's int8 kernels; compiling them costs
    # minutes on this machine and is what the benchmark runs)
    from anydepth.quantize import quantize_int8

    return quantize_int8(yolo, [(b, None) for b in _images(4, 2)], depths=["full", "base"], compile=False)


def test_int8_per_depth_close_to_float32(yolo, int8):
    assert set(int8.depths) == {yolo.resolve_depth("full"), yolo.resolve_depth("base")}
    x = _images(1, 7)[0]  # not a calibration batch
    for depth in ("full", "base"):
        with torch.no_grad():
            ref = yolo(x, depth=depth)
        out = int8(x, depth=depth)
        assert out.shape == ref.shape and out.dtype == torch.float32
        box, score = _errors(out, ref)
        # int8 activations per tensor: 256 levels over the calibrated range (weights per channel,
        # finer), simulated as noise of half a level on every conv output
        box_ref, score_ref = _noisy_reference(yolo, x, depth, "int8")
        assert box <= FACTOR * box_ref and score <= FACTOR * score_ref, depth
        assert int8.max_abs_diff[yolo.resolve_depth(depth)] > 0  # measured on the quantized graph
    # the two depths are different graphs (different calibration, different modules)
    assert not torch.equal(int8(x, depth="full"), int8(x, depth="base"))


def test_int8_refuses_uncalibrated_depth_and_shape(yolo, int8):
    ladder = yolo.depth_configs((1, 3, SIZE, SIZE))
    middle = ladder[len(ladder) // 2]
    with pytest.raises(KeyError, match=f"depth {middle.code} was not calibrated"):
        int8(_images(1, 0)[0], depth=middle)
    with pytest.raises(ValueError, match="calibrated for inputs of shape"):
        int8(torch.rand(1, 3, 96, 96), depth="full")


def test_optimize_quantize_int8_returns_per_depth_graphs(yolo):
    q, report = ak.optimize(yolo, quantize="int8", calibration=_images(2, 3), depths=["base"], return_report=True)
    assert [c for c in q.depths] == [yolo.resolve_depth("base")]
    assert report.swapped == {"int8 PT2E graphs (one per depth)": 1}


def test_bench_summary_reads_precision_rows_and_the_best_peer_row():
    from anydepth.benchmark import ModelReport, Row

    rows = [Row("base", "T", 1.0, 1.0, 50.0, 49, 51), Row("full", "F", 2.0, 2.0, 100.0, 99, 101),
            Row("full+compiled", "F", 2.0, 2.0, 80.0, 79, 81), Row("full+bf16", "F", 2.0, 2.0, 50.0, 49, 51),
            Row("full+int8", "F", 2.0, 2.0, 40.0, 39, 41), Row("peer", "p", None, 2.0, 120.0, 119, 121),
            Row("peer+compiled", "p", None, 2.0, 90.0, 89, 91)]
    lines = ModelReport("m", 64, 1, "cpu", "float32", 1, {}, rows, peer="ultralytics").summary()
    assert "full: bf16 compiled vs float32 compiled: 1.60x (50.0 ms vs 80.0 ms)" in lines
    assert "full: int8 compiled vs float32 compiled: 2.00x (40.0 ms vs 80.0 ms)" in lines
    best = [line for line in lines if "best peer row" in line]
    # every full-depth form of ours against the faster peer row (compiled), fastest first
    assert len(best) == 4 and best[0].startswith("full+int8 vs the best peer row (ultralytics peer+compiled)")
    assert "2.25x (40.0 ms vs 90.0 ms)" in best[0]


# --------------------------------------------------------------------------- RT-DETR
#: a tiny RT-DETR-R18 at 64 px. num_queries=84 is every encoder position (8x8 + 4x4 + 2x2 at
#: strides 8/16/32): the top-k query selection then keeps all of them, only their order can
#: differ, and the decoder (self-attention without a per-slot embedding) is permutation
#: equivariant, so the outputs compare as sets (_set_error) instead of through a discrete top-k
#: that a random network flips under any rounding
RT_KW = dict(num_classes=3, num_queries=84, num_denoising=10, encoder_hidden_dim=32, encoder_ffn_dim=64,
             d_model=32, decoder_ffn_dim=64, num_heads=4, encoder_heads=4, decoder_layers=2)


@pytest.fixture(scope="module")
def rtdetr():
    model = anydepth.create_model("rtdetr-r18-anydepth", **RT_KW).eval()
    randomize_(model, seed=3, calibrate_shape=(2, 3, SIZE, SIZE))
    return model.eval()


def _set_error(out, ref) -> float:
    """Mean distance between the two sets of queries (boxes in [0, 1] and class scores, per
    coordinate), each query to the nearest of the other set, both ways (a symmetric Chamfer
    distance: the order of the queries is free, see RT_KW)."""
    a = torch.cat([out["pred_boxes"].float(), out["logits"].float().sigmoid()], -1)[0]
    b = torch.cat([ref["pred_boxes"].float(), ref["logits"].float().sigmoid()], -1)[0]
    d = torch.cdist(a, b, p=1) / a.shape[-1]
    return float(d.min(0).values.mean() + d.min(1).values.mean()) / 2


def _rounded(model, kind: str):
    """A copy of ``model`` with its weights rounded as the format rounds them outside the
    float32 submodules (RT-DETR's decoder): ``"bf16"`` every floating parameter and buffer to
    bfloat16 and back, ``"int8"`` every conv / linear weight to 255 levels per output channel
    (symmetric, scale max|w| / 127, as the quantizer's per-channel weight observer). Returns the
    copy and its modules outside the float32 submodules."""
    sim = copy.deepcopy(model)
    kept = {id(m) for name in ak.float32_modules(sim) for m in sim.get_submodule(name).modules()}
    mods = [m for m in sim.modules() if id(m) not in kept]
    with torch.no_grad():
        for m in mods:
            if kind == "bf16":
                for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                    if t.is_floating_point():
                        t.copy_(t.to(torch.bfloat16).float())
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                w = m.weight
                scale = w.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *[1] * (w.dim() - 1)) / 127
                w.copy_((w / scale).round().clamp(-127, 127) * scale)
    return sim, mods


def _simulated_rtdetr(model, x: torch.Tensor, depth: str, kind: str) -> float:
    """``_set_error`` of the format simulated on the float32 network: weights rounded
    (:func:`_rounded`) and every conv / linear output outside the float32 submodules perturbed by
    one rounding of the format, as :func:`_noisy_reference` does."""
    sim, mods = _rounded(model, kind)
    noisy = _perturbed_forward(sim, mods, (torch.nn.Conv2d, torch.nn.Linear), x, depth, kind)
    with torch.no_grad():
        return _set_error(noisy, model(x, depth=depth))


@pytest.fixture(scope="module")
def rtdetr_int8(rtdetr):
    from anydepth.quantize import quantize_int8

    # reference int8 graphs (compile=False), as for yolov12n above
    return quantize_int8(rtdetr, _images(4, 2), depths=["full", "base"], compile=False)


@pytest.mark.slow
def test_rtdetr_int8_per_depth_close_to_float32(rtdetr, rtdetr_int8):
    # the decoder depth is part of the depth: full runs 2 decoder layers, base 1 (and skips stages)
    full, base = rtdetr.resolve_depth("full"), rtdetr.resolve_depth("base")
    assert full.knob("decoder_layers") == 2 and base.knob("decoder_layers") == 1
    assert set(rtdetr_int8.depths) == {full, base}
    assert rtdetr_int8.float32_modules == ("decoder",)
    for config in (full, base):  # int8 convolutions in the backbone and encoder, a float32 decoder
        targets = [str(n.target) for n in rtdetr_int8.graphs[config].graph.nodes]
        assert any("quantize_per_tensor" in t for t in targets)
        assert any("quantize_per_channel" in t or "dequantize_per_channel" in t for t in targets)
    x = _images(1, 7)[0]  # not a calibration batch
    for depth in ("full", "base"):
        with torch.no_grad():
            ref = rtdetr(x, depth=depth)
        out = rtdetr_int8(x, depth=depth)
        assert set(out) == set(ref) and out["logits"].dtype == torch.float32
        err = _set_error(out, ref)
        sim = _simulated_rtdetr(rtdetr, x, depth, "int8")
        print(f"rtdetr int8 {depth}: set error {err:.2e}, simulated {sim:.2e}")
        assert err <= FACTOR * sim, depth
    assert not torch.equal(rtdetr_int8(x, depth="full")["logits"], rtdetr_int8(x, depth="base")["logits"])


@pytest.mark.slow
@pytest.mark.skipif(not ak.bf16_supported("cpu"), reason="this CPU has no native bfloat16 (the fallback is "
                    "tested in test_bf16_falls_back_to_float32_where_unsupported)")
def test_rtdetr_bf16_keeps_the_decoder_float32(rtdetr):
    model, report = ak.optimize(copy.deepcopy(rtdetr), dtype=torch.bfloat16, return_report=True)
    assert any("kept in float32" in n and "decoder" in n for n in report.notes)
    assert all(p.dtype == torch.float32 for p in model.decoder.parameters())
    # the backbone in bf16 but for its batch norms, whose float32 parameters fold into the convs
    norms = {id(p) for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             for p in m.parameters()}
    assert norms and all(p.dtype == (torch.float32 if id(p) in norms else torch.bfloat16)
                         for p in model.backbone.parameters())
    x = _images(1, 7)[0]
    with torch.no_grad():  # one compile (full: both decoder layers)
        ref = rtdetr(x, depth="full")
        out = model(x, depth="full")
    assert out["logits"].dtype == torch.float32 and out["pred_boxes"].dtype == torch.float32
    err = _set_error(out, ref)
    sim = _simulated_rtdetr(rtdetr, x, "full", "bf16")
    print(f"rtdetr bf16 full: set error {err:.2e}, simulated {sim:.2e}")
    assert err <= FACTOR * sim


def test_float32_modules_registration_is_checked():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="list of submodule names"):
        ak.register_float32_modules("test_precision", "Toy", "head")
    assert ak.float32_modules(anydepth.create_model("rtdetr-r18-anydepth", **RT_KW)) == ("decoder",)
    key = Toy.__module__.split(".", 1)[0]
    ak.register_float32_modules(key, "Toy", ["missing"])
    try:
        assert ak.float32_modules(Toy()) == ("missing",)
        if ak.bf16_supported("cpu"):
            with pytest.raises(ValueError, match="'missing' to stay float32, but has no such submodule"):
                ak.optimize(Toy(), dtype=torch.bfloat16)
    finally:
        ak.register_float32_modules(key, "Toy", [])
    assert ak.float32_modules(Toy()) == ()


# --------------------------------------------------------------------------- AP of a form: anydepth eval --int8
def test_int8_detector_runs_other_batch_sizes_in_chunks(yolo, int8):
    from anydepth.evaluation.precision import Int8Detector

    det = Int8Detector(yolo, int8)  # calibrated at batch 1: a batch of 3 runs as three chunks
    xs = _images(3, 5)
    out = det(torch.cat(xs), depth="base")
    assert torch.equal(out, torch.cat([int8(x, depth="base") for x in xs]))
    images = [(x[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy() for x in xs]
    preds = det.predict(images, depth="base", conf=0.0, imgsz=SIZE)
    assert len(preds) == 3 and all(p.boxes.shape[1] == 4 for p in preds)
    assert "forward" not in yolo.__dict__  # predict's forward replacement is undone


@pytest.fixture(scope="module")
def synth_val(tmp_path_factory):
    from anydepth.data import open_dataset, synth

    root = tmp_path_factory.mktemp("precision") / "data"
    synth.generate(str(root), images=3, imgsz=SIZE, seed=1, split="val", progress=False)
    return root / "val", open_dataset(str(root / "val"), imgsz=SIZE, mode="letterbox", augment=False)


def test_calibration_batches_are_what_predict_feeds_the_network(yolo, synth_val):
    from anydepth.detection import letterbox_batch
    from anydepth.evaluation.precision import calibration_batches

    _, ds = synth_val
    batches = calibration_batches(yolo, ds, 2, SIZE)
    assert [tuple(b.shape) for b in batches] == [(1, 3, SIZE, SIZE)] * 2
    assert torch.equal(batches[1], letterbox_batch([ds.load_original(1)[0]], SIZE, yolo.stride)[0])
    with pytest.raises(ValueError, match="fewer than the 5 asked for"):
        calibration_batches(yolo, ds, 5, SIZE)


def test_cli_eval_int8_scores_the_form_next_to_float32(yolo, synth_val, tmp_path, capsys):
    """`anydepth eval --int8`: rows <depth> and <depth>+int8 on the same images, the AP difference
    in the notes. --int8-no-compile: the reference graphs Inductor would lower (the same quantize
    / dequantize numerics; compiling costs minutes here)."""
    from anydepth import checkpoint
    from anydepth.cli import main
    from anydepth.evaluation import EvalReport

    val_dir, _ = synth_val
    checkpoint.save(yolo, tmp_path / "m.pt")
    args = ["eval", "--weights", str(tmp_path / "m.pt"), "--data", str(val_dir), "--imgsz", str(SIZE), "--device",
            "cpu", "--quiet", "--pictures", "0", "--no-latency", "--out", str(tmp_path / "ev")]
    assert main(args + ["--int8", "--int8-no-compile", "--calib-images", "2", "--depths", "base"]) == 0
    report = EvalReport.from_json(tmp_path / "ev" / "eval-yolov12n-anydepth-64-int8.json")
    assert [r.name for r in report.rows] == ["base", "base+int8"]
    assert report.rows[1].code == report.rows[0].code and report.rows[1].metrics.keys() == report.rows[0].metrics.keys()
    out = capsys.readouterr().out
    assert f"calibrated per depth on the first 2 images of {val_dir}" in out and "not compiled" in out
    assert "base+int8: AP" in out and "vs float32" in out
    assert main(args + ["--int8", "--device", "cuda"]) == 2
    assert "use --device cpu" in capsys.readouterr().err


def test_precision_forms_are_checked(yolo):
    from anydepth.evaluation.precision import evaluate_precision, precision_form

    with pytest.raises(ValueError, match="unknown precision form 'fp8'"):
        precision_form(yolo, "fp8")
    with pytest.raises(ValueError, match="needs calibration images"):
        precision_form(yolo, "int8")
    with pytest.raises(TypeError, match="detectors"):
        precision_form(anydepth.create_model("resnet18-anydepth", num_classes=3), "bf16")
    with pytest.raises(ValueError, match="non-empty list"):
        evaluate_precision(yolo, None, ["float16"])
