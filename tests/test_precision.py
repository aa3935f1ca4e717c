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


#: rounded tensors on yolov12n's longest path (convs, attention, concatenations), rounded down
ROUNDINGS = 64


def _bound(model, x: torch.Tensor, depth: str, rounded_input: torch.Tensor):
    """What rounding the input alone does to the float32 model (mean box and score errors).

    A network with random weights is chaotic (no training made it robust): here rounding the
    input to bf16 alone moves single scores by up to 0.2, so a bound on the largest difference
    would say nothing about the format. What a format does is round ROUNDINGS tensors along the
    way instead of one; independent rounding errors of the same relative size add like a random
    walk, so the mean error of the whole network is bounded by sqrt(ROUNDINGS) = 8 times the
    error of rounding the input alone."""
    with torch.no_grad():
        box, score = _errors(model(rounded_input, depth=depth), model(x, depth=depth))
    k = ROUNDINGS ** 0.5
    return k * box, k * score


def _images(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, SIZE, SIZE, generator=g) for _ in range(n)]


@pytest.mark.skipif(not ak.bf16_supported("cpu"), reason="this CPU has no native bfloat16 (the fallback is "
                    "tested in test_bf16_falls_back_to_float32_where_unsupported)")
def test_bf16_matches_float32_within_bf16_precision(yolo):
    model = ak.optimize(copy.deepcopy(yolo), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    x = _images(1, 1)[0]
    for depth in ("full", "base"):
        with torch.no_grad():
            ref = yolo(x, depth=depth)
            out = model(x, depth=depth)
        assert out.dtype == torch.float32  # cast back on the way out
        box, score = _errors(out, ref)
        # bf16 keeps 8 significant bits (a relative rounding error <= 2^-8, products accumulated in
        # float32): each rounded tensor perturbs the network like rounding its input to bf16
        box_bound, score_bound = _bound(yolo, x, depth, x.bfloat16().float())
        assert box <= box_bound and score <= score_bound, depth


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
        # finer); the input itself is quantized to ~1/255 steps of [0, 1], the others likewise to
        # 1/255 of their ranges: each perturbs the network like rounding the input to 1/255
        box_bound, score_bound = _bound(yolo, x, depth, (x * 255).round() / 255)
        assert box <= box_bound and score <= score_bound, depth
        assert int8.max_abs_diff[yolo.resolve_depth(depth)] < float("inf")
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
