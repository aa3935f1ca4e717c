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
    g = torch.Generator().manual_seed(11)

    def perturb(module, args, out):
        noise = torch.rand(out.shape, generator=g) * 2 - 1
        if kind == "bf16":
            return out * (1 + noise * 2.0 ** -8)
        return out + noise * (out.max() - out.min()) / 255 / 2

    hooks = [m.register_forward_hook(perturb) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            noisy = model(x, depth=depth)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        return _errors(noisy, model(x, depth=depth))


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
