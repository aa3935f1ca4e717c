"""AnyDepth-YOLOv12: shapes, switches, skipped paths, fidelity against Ultralytics, checkpoints,
predict, bad inputs."""
import copy
import random

import numpy as np
import pytest
import torch

import anydepth
from anydepth import checkpoint
from anydepth.testing import randomize_
from anydepth.models.yolov12 import SCALES, SWITCHES, AnyDepthYOLOv12, essential_blocks

from helpers import needs_ultralytics, rel_err

SWITCH_NAMES = [name for name, _ in SWITCHES]


@pytest.fixture(scope="module")
def model_n():
    torch.manual_seed(0)
    m = anydepth.create_model("yolov12n-anydepth", num_classes=7)
    return randomize_(m, seed=0, calibrate_shape=(4, 3, 96, 64)).eval()


def test_registry_lists_all_scales():
    assert anydepth.list_models("yolov12*") == sorted(f"yolov12{s}-anydepth" for s in SCALES)
    with pytest.raises(ValueError, match="registered models"):
        anydepth.create_model("yolov12q-anydepth")


def test_split_rule():
    assert [essential_blocks(n) for n in (1, 2, 3, 4, 6)] == [0, 1, 2, 2, 3]


@pytest.mark.parametrize("scale", list(SCALES))
def test_shapes_every_scale(scale):
    torch.manual_seed(0)
    m = anydepth.create_model(f"yolov12{scale}-anydepth", num_classes=5).eval()
    x = torch.rand(1, 3, 64, 96)
    anchors = (8 * 12) + (4 * 6) + (2 * 3)
    with torch.no_grad():
        for depth in ("full", "base"):
            y = m(x, depth=depth)
            assert y.shape == (1, 4 + 5, anchors) and y.dtype == torch.float32
            assert torch.isfinite(y).all()
            assert ((y[:, 4:] >= 0) & (y[:, 4:] <= 1)).all()  # class probabilities
    m.train()
    out = m(x, depth="base")
    assert out["boxes"].shape == (1, 64, anchors) and out["scores"].shape == (1, 5, anchors)
    assert [f.shape[2:] for f in out["feats"]] == [(8, 12), (4, 6), (2, 3)]


def test_float64_and_batch(model_n):
    m = copy.deepcopy(model_n).double()
    y = m(torch.rand(3, 3, 64, 64, dtype=torch.float64))
    assert y.dtype == torch.float64 and y.shape[0] == 3


def _counting_hooks(model):
    calls = {}
    handles = []
    for name, mod in model.named_modules():
        handles.append(mod.register_forward_hook(lambda m, i, o, n=name: calls.__setitem__(n, calls.get(n, 0) + 1)))
    return calls, handles


@pytest.mark.parametrize("switch", SWITCH_NAMES)
def test_each_switch_skips_only_its_refinement(model_n, switch):
    m = model_n
    layer = dict(SWITCHES)[switch]
    csp = m.layers[layer]
    x = torch.rand(1, 3, 64, 64)
    calls, handles = _counting_hooks(m)
    try:
        with torch.no_grad():
            y = m(x, depth={switch: True})
    finally:
        for h in handles:
            h.remove()
    ne = csp.n_essential
    for j in range(len(csp.m)):
        called = f"layers.{layer}.m.{j}" in calls
        assert called == (j < ne), (switch, j)
    # the shallow-path norms of this module ran, and no other module's
    assert f"layers.{layer}.cv1.bn.bn_skip" in calls and f"layers.{layer}.cv1.bn.bn" not in calls
    for other, li in SWITCHES:
        if other != switch:
            assert f"layers.{li}.cv1.bn.bn" in calls and f"layers.{li}.cv1.bn.bn_skip" not in calls
    with torch.no_grad():
        full = m(x)
    assert y.shape == full.shape and not torch.equal(y, full)
    assert m.flops({switch: True}, (1, 3, 64, 64)) < m.flops("full", (1, 3, 64, 64))


def test_shallow_output_conv_reads_only_present_channels(model_n):
    """The skipped blocks' chunk never exists: the output conv's input has only the kept channels."""
    csp = model_n.layers[6]
    captured = []
    orig = torch.nn.functional.conv2d

    def spy(inp, w, *a, **k):
        captured.append((inp.shape[1], w.shape[1]))
        return orig(inp, w, *a, **k)

    torch.nn.functional.conv2d = spy
    try:
        with torch.no_grad():
            csp(torch.rand(1, csp.cv1.conv.in_channels, 8, 8), True)
    finally:
        torch.nn.functional.conv2d = orig
    assert (csp.shallow_in_channels, csp.shallow_in_channels) in captured
    assert csp.shallow_in_channels == (1 + csp.n_essential) * csp.c < csp.cv2.conv.in_channels


def test_depth_ladder_and_all_combinations(model_n):
    shape = (1, 3, 64, 64)
    ladder = model_n.depth_configs(shape)
    assert len(ladder) >= 6
    assert ladder[0] == model_n.depth_space.base() and ladder[-1] == model_n.depth_space.full()
    flops = [model_n.flops(c, shape) for c in ladder]
    assert flops == sorted(flops) and flops[0] < flops[-1]
    combos = list(model_n.depth_space.all_configs())
    assert len(combos) == 256 and len(set(combos)) == 256
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for cfg in random.Random(0).sample(combos, 6):
            assert model_n(x, depth=cfg).shape == model_n(x).shape
    assert model_n.resolve_depth(0.0, shape) == ladder[0]
    assert model_n.resolve_depth(1.0, shape) == ladder[-1]


def test_bad_inputs(model_n):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model_n(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="multiples of 32"):
        model_n(torch.rand(1, 3, 65, 64))
    with pytest.raises(TypeError, match="floating-point"):
        model_n(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        model_n(torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(ValueError, match="valid switches"):
        model_n(torch.rand(1, 3, 64, 64), depth={"backbone.p9": True})
    with pytest.raises(ValueError, match="valid presets"):
        model_n(torch.rand(1, 3, 64, 64), depth="deepest")
    with pytest.raises(ValueError, match="scale"):
        AnyDepthYOLOv12("q")
    with pytest.raises(ValueError, match="shallow_out"):
        AnyDepthYOLOv12("n", shallow_out="other")


def test_predict_arbitrary_sizes(model_n):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (75, 113, 3), dtype=np.uint8), torch.rand(3, 50, 41)]
    res = model_n.predict(imgs, conf=0.0, imgsz=96, max_det=20)
    assert len(res) == 2
    for r, (h, w) in zip(res, [(75, 113), (50, 41)]):
        assert 0 < len(r) <= 20
        assert (r.boxes[:, 0] >= 0).all() and (r.boxes[:, 2] <= w).all()
        assert (r.boxes[:, 1] >= 0).all() and (r.boxes[:, 3] <= h).all()
        assert (r.scores[:-1] >= r.scores[1:]).all() and r.labels.max() < 7
    base = model_n.predict(imgs[0], depth="base", conf=0.0, imgsz=64)
    assert len(base) == 1
    for bad in (0, -32, 96.0, True, "96"):  # any positive int is a size; nothing else is
        with pytest.raises(ValueError, match="imgsz must be a positive int"):
            model_n.predict(imgs[0], imgsz=bad)
    with pytest.raises(ValueError, match="HxWx3"):
        model_n.predict(np.zeros((10, 10, 5), np.uint8))  # grayscale and RGBA are converted, 5 channels not
    with pytest.raises(ValueError, match="NaN"):
        model_n.predict(torch.full((3, 10, 10), float("nan")))
    with pytest.raises(ValueError, match="empty"):
        model_n.predict([])


def test_predict_pads_an_imgsz_that_is_not_a_stride_multiple(model_n):
    """imgsz=100: the image is letterboxed to fit 100 px, centred on a 128 px canvas (the next
    multiple of 32). The network input is then exactly the 128 px canvas the test builds itself,
    so the boxes equal those of that canvas predicted at imgsz=128, shifted by the padding and
    scaled by the resize (bit for bit: same input, same decoding)."""
    import torch.nn.functional as F

    rng = np.random.default_rng(3)
    fill = 114 / 255
    for (h, w), gain in (((100, 60), 1.0), ((200, 120), 0.5)):   # fits as is / halved to 100 x 60
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        chw = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
        if gain != 1.0:
            chw = F.interpolate(chw[None], size=(100, 60), mode="bilinear", align_corners=False, antialias=True)[0]
        top, left = (128 - 100) // 2, (128 - 60) // 2
        canvas = torch.full((3, 128, 128), fill)
        canvas[:, top:top + 100, left:left + 60] = chw
        got = model_n.predict(img, depth="base", conf=0.0, imgsz=100)[0]
        ref = model_n.predict(canvas, depth="base", conf=0.0, imgsz=128)[0]
        assert len(ref) > 0 and torch.equal(got.scores, ref.scores) and torch.equal(got.labels, ref.labels)
        expect = ref.boxes.clone()
        expect[:, [0, 2]] = ((expect[:, [0, 2]] - left) / gain).clamp(0, w)
        expect[:, [1, 3]] = ((expect[:, [1, 3]] - top) / gain).clamp(0, h)
        assert torch.equal(got.boxes, expect)
        assert (got.boxes[:, [0, 2]] <= w).all() and (got.boxes[:, [1, 3]] <= h).all()


def test_checkpoint_round_trip(model_n, tmp_path):
    path = tmp_path / "m.pt"
    checkpoint.save(model_n, path)
    raw = torch.load(path, weights_only=True)  # plain data: loads with weights_only
    assert raw["model"] == "yolov12n-anydepth" and raw["kwargs"]["num_classes"] == 7
    m2 = checkpoint.load(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for depth in ("full", "base", {"neck.p3_up": True}):
            assert torch.equal(m2(x, depth=depth), model_n(x, depth=depth))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.load(bad)
    other = tmp_path / "other.pt"
    torch.save({"a": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not an anydepth checkpoint"):
        checkpoint.load(other)


# ---------------------------------------------------------------- fidelity against Ultralytics
# Only the tests that use the peer need it: a machine without Ultralytics (the GPU machines) still
# runs the rest of this file.
from anydepth.convert._ultralytics import build_peer, from_ultralytics  # noqa: E402


# bigger scales on smaller images: the check is the arithmetic, not the receptive field
FIDELITY = {"n": (160, 128), "s": (128, 96), "m": (96, 96), "l": (96, 64), "x": (64, 64)}


@needs_ultralytics
@pytest.mark.parametrize("scale", list(SCALES))
def test_fidelity_against_ultralytics(scale):
    peer, ours = build_peer(f"yolov12{scale}-anydepth", seed=1)
    assert ours.model_name == f"yolov12{scale}-anydepth" and ours.scale == scale
    h, w = FIDELITY[scale]
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = peer(x)[0]
        out = ours(x, depth="full")
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-5
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    # in float64 the two computations agree to rounding: same arithmetic, not just close
    with torch.no_grad():
        ref64 = copy.deepcopy(peer).double()(x.double())[0]
        out64 = copy.deepcopy(ours).double()(x.double())
    assert rel_err(out64, ref64) <= 1e-10


@needs_ultralytics
def test_from_ultralytics_inputs(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    peer = randomize_(DetectionModel("yolo12n.yaml", nc=3, verbose=False), seed=3).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = peer(x)[0]
    # state dict (scale inferred from shapes) and a weights_only file
    sd = peer.state_dict()
    m1 = from_ultralytics(sd)
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    m2 = from_ultralytics(str(path))
    with torch.no_grad():
        for m in (m1, m2):
            assert m.num_classes == 3 and rel_err(m(x), ref) <= 1e-5
    # skip-aware norms start as copies: base-depth BN sets equal the main ones
    csp = m1.layers[6]
    assert torch.equal(csp.cv1.bn.bn.running_var, csp.cv1.bn.bn_skip.running_var)
    # the separate shallow output conv starts as the slice of the full one
    m3 = from_ultralytics(peer, shallow_out="separate")
    with torch.no_grad():
        assert torch.allclose(m3(x, depth="base"), m1(x, depth="base"), rtol=1e-5, atol=1e-6)
    # a pickled file that weights_only refuses, and non-YOLO12 input, give clear errors
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": peer}, pickled)
    with pytest.raises(ValueError, match="weights_only"):
        from_ultralytics(str(pickled))
    with pytest.raises(ValueError, match="model.0.conv.weight"):
        from_ultralytics({"x": torch.zeros(1)})
    broken = dict(sd)
    broken.pop("model.6.cv2.conv.weight")
    with pytest.raises(ValueError, match="model.6.cv2.conv.weight"):
        from_ultralytics(broken)
    extra = dict(sd)
    extra["model.99.foo"] = torch.zeros(1)
    with pytest.raises(ValueError, match="not used"):
        from_ultralytics(extra)


@pytest.mark.parametrize("concat_free", [True, False])
def test_fused_inference_form_matches_eager(model_n, concat_free):
    fused = copy.deepcopy(model_n).fuse(concat_free=concat_free)
    assert all(c.concat_free == concat_free for c in fused.switchable_modules.values())
    assert fused.is_fused and fused.fuse() is fused
    from anydepth.nn import ConvNormAct

    assert not any(isinstance(m, ConvNormAct) for m in fused.modules())
    # The oracle is the eager model evaluated in float64: end to end, fp32 rounding of the eager
    # model itself is ~7e-6 here, so fused-vs-eager-fp32 would measure two roundings, not one.
    exact = copy.deepcopy(model_n).double()
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        for depth in ("full", "base", {"backbone.p4": True, "neck.p5_down": True}, 0.5):
            assert rel_err(fused(x, depth=depth), exact(x.double(), depth=depth)) <= 1e-5
    assert fused.params_used("base") <= fused.params_used("full")
    with pytest.raises(RuntimeError, match="fused for inference"):
        fused.train()


def test_fused_separate_shallow_conv():
    m = randomize_(anydepth.create_model("yolov12n-anydepth", num_classes=3, shallow_out="separate"),
                   seed=4, calibrate_shape=(2, 3, 64, 64)).eval()
    f = copy.deepcopy(m).fuse()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for depth in ("full", "base"):
            assert rel_err(f(x, depth=depth), m(x, depth=depth)) <= 1e-5


def test_flops_count_attention_and_fused_ops(model_n):
    """SDPA's CPU kernel and our fused ops are opaque to flop_counter: the model registers their
    formulas, so the eager and fused forms count the same FLOPs."""
    fused = copy.deepcopy(model_n).fuse()
    shape = (1, 3, 64, 64)
    for depth in ("full", "base"):
        assert fused.flops(depth, shape) == model_n.flops(depth, shape)
    # attention is in the count: 4 * B * heads * N * (N / area) * head_dim per attention call
    from torch.utils.flop_counter import FlopCounterMode

    plain = FlopCounterMode(display=False)
    with torch.no_grad(), plain:
        model_n(torch.zeros(shape))
    assert model_n.flops("full", shape) > plain.get_total_flops()
