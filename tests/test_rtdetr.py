"""AnyDepth-RT-DETR: fidelity against HuggingFace's RT-DETR, the any-depth switches and knob, the
deployed form, predict, checkpoints and input errors. Small images (128x128 / 160x160) keep the
file fast on a CPU."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import anydepth  # noqa: E402
from anydepth import checkpoint  # noqa: E402
from anydepth.convert import from_transformers  # noqa: E402
from anydepth.convert._transformers import build_peer, hf_config_for  # noqa: E402
from anydepth.convert._transformers import randomize_uniform_ as randomize_  # noqa: E402
from anydepth.detection import resize_batch  # noqa: E402
from anydepth.models.rtdetr import AnyDepthRTDETR, RepVGGBlock, RepVGGDeployed  # noqa: E402
from anydepth.nn import SkipAwareBatchNorm2d, SkipAwareLayerNorm  # noqa: E402
from anydepth.registry import create_model, list_models  # noqa: E402
from anydepth_kernels import reference  # noqa: E402

from helpers import rel_err  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def r18():
    return build_peer("rtdetr-r18-anydepth", num_classes=80, seed=0)


@pytest.fixture(scope="module")
def r50():
    return build_peer("rtdetr-r50-anydepth", num_classes=80, seed=1)


def _images(n=2, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


@torch.no_grad()
def _perturb_skip_norms(model, seed=5):
    """Make the shallow-path norm sets differ from the main ones (the converter copies them), so a
    mix-up of the two sets cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, SkipAwareBatchNorm2d):
            n = m.bn_skip.num_features
            m.bn_skip.weight.mul_(torch.rand(n, generator=g) + 0.5)
            m.bn_skip.bias.add_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.bn_skip.running_mean.add_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.bn_skip.running_var.mul_(torch.rand(n, generator=g) + 0.5)
        elif isinstance(m, SkipAwareLayerNorm):
            m.ln_skip.weight.mul_(torch.rand(m.ln_skip.weight.shape, generator=g) + 0.5)
            m.ln_skip.bias.add_(torch.rand(m.ln_skip.bias.shape, generator=g) * 0.2 - 0.1)
    return model


# ------------------------------------------------------------------------------------------------
# fidelity against HF
# ------------------------------------------------------------------------------------------------
MARGIN = 2e-6


def _selection_margin(enc_logits, num_queries):
    """Smallest gap between consecutive scores among the selected queries and the first one left
    out (RT-DETR's query selection sorts encoder positions by their best class logit)."""
    top = enc_logits.max(-1).values.sort(dim=1, descending=True).values[:, : num_queries + 1]
    return (top[:, :-1] - top[:, 1:]).min().item()


@torch.no_grad()
def _separated_input(hf, n, size):
    """An input whose query selection is well defined: RT-DETR picks the top-``num_queries``
    encoder positions by class score, and two positions whose scores differ by float rounding
    noise (~1e-7) may come out in either order in any two correct implementations. Seeds are tried
    until the oracle's selected scores (and the first one left out) are ``MARGIN`` apart."""
    for seed in range(50):
        x = _images(n, size, seed=seed)
        ref = hf(pixel_values=x)
        if _selection_margin(ref.enc_outputs_class, hf.config.num_queries) > MARGIN:
            return x, ref
    raise AssertionError("no input with a well-separated query selection found")


@torch.no_grad()
def _separated_for(model, depths, n=1, size=128):
    """As :func:`_separated_input`, with our eager model as the oracle, at every one of ``depths``."""
    seen = []
    handle = model.decoder.enc_score_head.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        for seed in range(50):
            x = _images(n, size, seed=100 + seed)
            outs = []
            for d in depths:
                seen.clear()
                outs.append(model(x, depth=d))
                if _selection_margin(seen[0], model.num_queries) <= MARGIN:
                    break
            else:
                return x, outs
    finally:
        handle.remove()
    raise AssertionError("no input with a well-separated query selection found")


@pytest.mark.parametrize("which,n,size", [("r50", 1, 128), ("r18", 2, 160)])
def test_full_depth_matches_transformers(which, n, size, request):
    hf, ours = request.getfixturevalue(which)
    x, ref = _separated_input(hf, n, size)
    with torch.no_grad():
        out = ours(x)
    assert out["logits"].shape == ref.logits.shape == (n, 300, 80)
    assert rel_err(out["logits"], ref.logits) <= TOL
    assert rel_err(out["pred_boxes"], ref.pred_boxes) <= TOL


def test_decoder_knob_matches_transformers_intermediate_layers(r18):
    """decoder_layers=k is RT-DETR's own knob: the output of the first k layers' heads."""
    hf, ours = r18
    x, ref = _separated_input(hf, 1, 128)
    with torch.no_grad():
        for k in range(1, 4):
            out = ours(x, depth={"decoder_layers": k})
            assert rel_err(out["logits"], ref.intermediate_logits[:, k - 1]) <= TOL
            assert rel_err(out["pred_boxes"], ref.intermediate_reference_points[:, k - 1]) <= TOL


def test_ms_deform_attn_matches_transformers():
    from transformers.models.rt_detr.modeling_rt_detr import MultiScaleDeformableAttention

    g = torch.Generator().manual_seed(0)
    shapes_list = [(12, 10), (6, 5), (3, 3)]
    shapes = torch.tensor(shapes_list, dtype=torch.long)
    hw = shapes.prod(1)
    starts = torch.cat([hw.new_zeros(1), hw.cumsum(0)[:-1]])
    n, q, m, d, p = 2, 17, 8, 32, 4
    value = torch.randn(n, int(hw.sum()), m, d, generator=g)
    loc = torch.rand(n, q, m, 3, p, 2, generator=g) * 1.6 - 0.3  # many points outside [0, 1]
    assert ((loc < 0) | (loc > 1)).any()
    attn = torch.rand(n, q, m, 3, p, generator=g).flatten(-2).softmax(-1).view(n, q, m, 3, p)
    ref = MultiScaleDeformableAttention()(value, shapes, shapes_list, starts, loc, attn, 64)
    out = reference.ms_deform_attn(value, shapes, starts, loc, attn)
    assert out.shape == ref.shape == (n, q, m * d)
    assert rel_err(out, ref) <= TOL
    assert rel_err(anydepth_kernels_op(value, shapes, starts, loc, attn), ref) <= TOL


def anydepth_kernels_op(*args):
    from anydepth_kernels import ms_deform_attn

    return ms_deform_attn(*args)


# ------------------------------------------------------------------------------------------------
# depth space
# ------------------------------------------------------------------------------------------------
def test_every_switch_and_decoder_depth_runs(r18):
    _, ours = r18
    model = _perturb_skip_norms(copy.deepcopy(ours))
    x = _images(1, 128, seed=6)
    space = model.depth_space
    assert space.switches == ("backbone.stage1", "backbone.stage2", "backbone.stage3", "backbone.stage4", "encoder")
    with torch.no_grad():
        full = model(x)
        for s in space.switches:
            out = model(x, depth={s: True})
            assert out["logits"].shape == (1, 300, 80) and out["pred_boxes"].shape == (1, 300, 4)
            assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["pred_boxes"]).all()
            assert not torch.equal(out["logits"], full["logits"]), s
        for k in range(1, 4):
            out = model(x, depth={"decoder_layers": k})
            assert out["logits"].shape == (1, 300, 80)
            assert (out["pred_boxes"] >= 0).all() and (out["pred_boxes"] <= 1).all()


def test_skipped_stage_returns_essential_tensor_itself(r18):
    _, model = r18
    seen = {}

    def keep(name):
        def hook(_m, _i, out):
            seen[name] = out
        return hook

    stage = model.backbone.stage2
    csp = model.encoder.fpn_blocks[0].bottlenecks
    handles = [stage.essential.register_forward_hook(keep("ess")), stage.register_forward_hook(keep("stage")),
               csp.essential.register_forward_hook(keep("csp_ess")), csp.register_forward_hook(keep("csp"))]
    try:
        x = _images(1, 128)
        with torch.no_grad():
            model(x, depth="base")
            assert seen["stage"] is seen["ess"]
            assert seen["stage"].data_ptr() == seen["ess"].data_ptr()
            assert seen["csp"] is seen["csp_ess"]
            model(x, depth="full")
            assert seen["stage"].data_ptr() != seen["ess"].data_ptr()
            assert seen["csp"].data_ptr() != seen["csp_ess"].data_ptr()
    finally:
        for h in handles:
            h.remove()


def test_split_and_knob_per_variant():
    expect = {"r18": ([1, 1, 1, 1], 3, 1), "r34": ([1, 2, 3, 1], 4, 2),
              "r50": ([1, 2, 3, 1], 6, 4), "r101": ([1, 2, 11, 1], 6, 4)}
    assert list_models("rtdetr-*") == sorted(f"rtdetr-{v}-anydepth" for v in expect)
    for v, (refine, layers, base) in expect.items():
        model = create_model(f"rtdetr-{v}-anydepth", num_classes=7)
        got = [len(getattr(model.backbone, f"stage{i}").refinement) for i in range(1, 5)]
        assert got == refine, v
        spec = model.depth_space.knob_specs["decoder_layers"]
        assert (spec.low, spec.high, spec.base) == (1, layers, base)
        assert len(model.decoder.layers) == layers
        for csp in [*model.encoder.fpn_blocks, *model.encoder.pan_blocks]:
            assert len(csp.bottlenecks.essential) == 1 and len(csp.bottlenecks.refinement) == 2
        if v == "r101":
            assert model.encoder.aifi[0].mlp.fc1.out_features == 2048
            assert model.encoder.input_proj[0].conv.out_channels == 384


def test_base_preset_is_all_skipped_with_four_decoder_layers(r50):
    _, model = r50
    space = model.depth_space
    base = model.resolve_depth("base")
    assert base == space.make({s: True for s in space.switches}, {"decoder_layers": 4})
    assert base.code == "TTTTT-decoder_layers4"
    assert model.resolve_depth("full").code == "FFFFF-decoder_layers6"


def test_depth_configs_are_flop_ordered():
    model = _small("rtdetr-r18-anydepth", seed=12)
    shape = (1, 3, 96, 96)
    configs = model.depth_configs(shape)
    assert len(configs) >= 6
    assert configs[0] == model.resolve_depth("base") and configs[-1] == model.resolve_depth("full")
    flops = [model.flops(c, shape) for c in configs]
    assert flops == sorted(flops) and flops[0] < flops[-1]
    # a float depth walks this ladder
    assert model.resolve_depth(0.0, shape) == configs[0] and model.resolve_depth(1.0, shape) == configs[-1]


# ------------------------------------------------------------------------------------------------
# deployed form
# ------------------------------------------------------------------------------------------------
def test_repvgg_reparam_gives_one_conv_per_norm_set():
    torch.manual_seed(0)
    block = RepVGGBlock(16, "silu", skip_aware=True, eps=1e-5)
    randomize_(block, seed=2)
    _perturb_skip_norms(block, seed=3)
    block.eval()
    x = torch.randn(2, 16, 9, 11)
    dep = block.reparameterize()
    assert isinstance(dep, RepVGGDeployed) and dep.fused.kernel_size == (3, 3)
    assert not torch.allclose(dep.fused.weight, dep.fused_skip.weight)  # the 1x1 BN differs per set
    dep_ref = block.reparameterize(backend="reference")
    with torch.no_grad():
        for skip in (False, True):
            assert rel_err(dep(x, skip), block(x, skip)) <= TOL
            assert rel_err(dep_ref(x, skip), block(x, skip)) <= TOL


def _small(name, seed):
    """A randomised model with fewer queries (so 96x96 images suffice), both norm sets distinct."""
    torch.manual_seed(seed)
    return randomize_(create_model(name, num_queries=100), seed).eval()


@pytest.mark.parametrize("name", ["rtdetr-r18-anydepth", "rtdetr-r50-anydepth"])
def test_deploy_matches_eager_at_every_depth(name):
    eager = _small(name, seed=11)
    deployed = copy.deepcopy(eager).deploy()
    assert deployed.deploy() is deployed and deployed.deployed  # in place, idempotent
    assert not any(isinstance(m, (RepVGGBlock, torch.nn.BatchNorm2d)) for m in deployed.modules())
    mixed = {"backbone.stage2": True, "encoder": True, "decoder_layers": 2}
    depths = ("full", "base", mixed)
    x, eager_outs = _separated_for(eager, depths, size=96)
    with torch.no_grad():
        for depth, b in zip(depths, eager_outs):
            a = deployed(x, depth=depth)
            assert rel_err(a["logits"], b["logits"]) <= TOL, depth
            assert rel_err(a["pred_boxes"], b["pred_boxes"]) <= TOL, depth


# ------------------------------------------------------------------------------------------------
# predict, checkpoints, conversion
# ------------------------------------------------------------------------------------------------
def test_predict_on_arbitrary_images(r18):
    _, model = r18
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (100, 150, 3), dtype=np.uint8), rng.integers(0, 256, (77, 203, 3), dtype=np.uint8)]
    dets = model.predict(imgs, conf=0.0, imgsz=128, max_det=20)
    assert len(dets) == 2
    for d, im in zip(dets, imgs):
        h, w = im.shape[:2]
        assert len(d) == 20 and d.boxes.shape == (20, 4)
        assert (d.scores[:-1] >= d.scores[1:]).all() and ((d.scores > 0) & (d.scores < 1)).all()
        assert ((d.labels >= 0) & (d.labels < 80)).all()
        assert (d.boxes[:, [0, 2]] >= 0).all() and (d.boxes[:, [0, 2]] <= w).all()
        assert (d.boxes[:, [1, 3]] >= 0).all() and (d.boxes[:, [1, 3]] <= h).all()
        assert (d.boxes[:, 2] >= d.boxes[:, 0]).all() and (d.boxes[:, 3] >= d.boxes[:, 1]).all()
    # the scores are the top sigmoid(logit) over queries x classes of the resized batch
    batch, _ = resize_batch(imgs, 128)
    with torch.no_grad():
        top = model(batch)["logits"].sigmoid().flatten(1).topk(20).values
    assert torch.allclose(torch.stack([d.scores for d in dets]), top)
    # conf filters; base depth runs too
    strict = model.predict(imgs[0], depth="base", conf=0.99, imgsz=128)
    assert len(strict) == 1 and (strict[0].scores > 0.99).all()


def test_predict_pads_an_imgsz_that_is_not_a_stride_multiple(r18):
    """imgsz=100: the image is resized to 100 x 100 and zero-padded bottom/right to 128 (the next
    multiple of 32, as HF's processor pads). The network input is exactly the canvas the test
    builds, so the boxes equal those of that canvas predicted at imgsz=128, scaled back by the
    resize (bit for bit)."""
    import torch.nn.functional as F

    _, model = r18
    rng = np.random.default_rng(4)
    for (h, w) in ((100, 100), (200, 150)):    # no resize / resized to 100 x 100
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        chw = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
        canvas = torch.zeros(3, 128, 128)
        canvas[:, :100, :100] = F.interpolate(chw[None], size=(100, 100), mode="bilinear", align_corners=False,
                                              antialias=(h > 100 or w > 100))[0]
        got = model.predict(img, depth="base", conf=0.0, imgsz=100, max_det=30)[0]
        ref = model.predict(canvas, depth="base", conf=0.0, imgsz=128, max_det=30)[0]
        assert len(ref) == 30 and torch.equal(got.scores, ref.scores) and torch.equal(got.labels, ref.labels)
        expect = ref.boxes.clone()
        expect[:, [0, 2]] = (expect[:, [0, 2]] / (100 / w)).clamp(0, w)
        expect[:, [1, 3]] = (expect[:, [1, 3]] / (100 / h)).clamp(0, h)
        assert torch.equal(got.boxes, expect)


def test_checkpoint_round_trip(r18, tmp_path):
    _, model = r18
    path = tmp_path / "r18.pt"
    checkpoint.save(model, path)
    loaded = checkpoint.load(path)
    assert isinstance(loaded, AnyDepthRTDETR) and loaded.model_name == "rtdetr-r18-anydepth"
    x = _images(1, 128, seed=8)
    with torch.no_grad():
        for depth in ("full", "base"):
            assert torch.equal(loaded(x, depth=depth)["logits"], model(x, depth=depth)["logits"])


def test_converter_from_state_dict_and_errors(r18):
    hf, ours = r18
    sd = hf.state_dict()
    again = from_transformers(sd, config=hf.config)
    assert again.model_kwargs == ours.model_kwargs
    for k, v in again.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k
    # the shallow-path norms start as copies of the main ones
    aware = [m for m in again.modules() if isinstance(m, (SkipAwareBatchNorm2d, SkipAwareLayerNorm))]
    assert len(aware) >= 40
    for m in aware:
        main, shallow = (m.bn, m.bn_skip) if isinstance(m, SkipAwareBatchNorm2d) else (m.ln, m.ln_skip)
        for (name, a), (_, b) in zip(main.state_dict().items(), shallow.state_dict().items()):
            if name != "num_batches_tracked":
                assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="config"):
        from_transformers(sd)
    with pytest.raises(ValueError, match="unmapped HF keys.*model.extra"):
        from_transformers({**sd, "model.extra.weight": torch.zeros(1)}, config=hf.config)
    short = {k: v for k, v in sd.items() if "decoder.layers.0.mlp.fc1.weight" not in k}
    with pytest.raises(ValueError, match="missing weights"):
        from_transformers(short, config=hf.config)
    with pytest.raises(ValueError, match="num_classes"):
        from_transformers(sd, config=hf.config, num_classes=3)
    bad = hf_config_for("r18")
    bad.backbone_config.depths = [2, 2, 3, 2]
    with pytest.raises(ValueError, match="depths"):
        from_transformers(sd, config=bad)
    bad = hf_config_for("r50", normalize_before=True)
    with pytest.raises(ValueError, match="normalize_before"):
        from_transformers(sd, config=bad)


def test_bad_inputs_raise_clear_errors(r18):
    _, model = r18
    with pytest.raises(ValueError, match="3 RGB channels"):
        model(torch.rand(1, 4, 128, 128))
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 100, 128))
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((1, 3, 128, 128), float("nan")))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    with pytest.raises(ValueError, match="num_queries"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="unknown switch"):
        model(torch.rand(1, 3, 128, 128), depth={"backbone.stage5": True})
    for k in (0, 4):
        with pytest.raises(ValueError, match="decoder_layers"):
            model(torch.rand(1, 3, 128, 128), depth={"decoder_layers": k})
    for bad in (0, -128, 128.0, False):
        with pytest.raises(ValueError, match="imgsz must be a positive int"):
            model.predict(np.zeros((50, 50, 3), np.uint8), imgsz=bad)
    with pytest.raises(ValueError, match="conf"):
        model.predict(np.zeros((50, 50, 3), np.uint8), conf=1.5)
    with pytest.raises(ValueError, match="unknown RT-DETR variant"):
        AnyDepthRTDETR("r152")
    with pytest.raises(ValueError, match="unknown model"):
        anydepth.registry.create_model("rtdetr-r152-anydepth")


def test_depth_is_a_call_argument_not_state(r18):
    """One instance serves different depths from several threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    _, model = r18
    x = _images(1, 128, seed=9)
    depths = ["full", "base", {"encoder": True, "decoder_layers": 2}]
    with torch.no_grad():
        serial = [model(x, depth=d)["logits"] for d in depths]
        with ThreadPoolExecutor(3) as pool:
            parallel = list(pool.map(lambda d: model(x, depth=d)["logits"], depths))
    for a, b in zip(serial, parallel):  # a mixed-up depth would differ by far more than TOL
        assert rel_err(b, a) <= TOL
    assert rel_err(serial[1], serial[0]) > 1e-2


@pytest.mark.parametrize("shape", [(1, 3, 7, 9), (2, 4, 8, 8), (1, 2, 5, 6), (1, 8, 32, 32), (1, 1, 1, 1)])
def test_stem_max_pool_is_exact(shape):
    from anydepth.models.rtdetr import _max_pool_3x3s2

    x = torch.randn(shape)
    x[..., 0, 0] = float("inf")  # infinities pass through like the library's max-pool
    assert torch.equal(_max_pool_3x3s2(x), torch.nn.functional.max_pool2d(x, 3, 2, 1))


# ------------------------------------------------------------------------------------------------
# fixed costs at inference (issue 20): each fast path against the path it replaces
# ------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("batch,shapes,queries,seed", [
    (1, ((16, 16), (8, 8), (4, 4)), 300, 0), (2, ((12, 20), (6, 10), (3, 5)), 100, 1),
    (3, ((8, 8), (4, 4), (2, 2)), 17, 2), (1, ((4, 4), (2, 2), (1, 1)), 3, 3)])
def test_query_selection_equals_the_training_path_selection(batch, shapes, queries, seed):
    """Inference query selection (box head on the selected rows only) against ``_select`` (every
    row, then gathered): same positions in the same order, the same queries bit for bit, the
    same boxes up to the matrix multiply's rounding for the row count."""
    from anydepth.models.rtdetr import RTDETRDecoder

    torch.manual_seed(seed)
    dec = randomize_(RTDETRDecoder([32] * 3, 7, 32, 4, 64, 2, 2, queries, "relu", 1e-5, 1e-5, False), seed).eval()
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, 32, h, w, generator=g) for h, w in shapes]
    with torch.no_grad():
        memory, shapes_t, starts, out_mem, enc_logits, enc_coord, idx = dec._select(feats)
        x, ref = dec._query_selection(memory, tuple(shapes))
    assert torch.equal(x, out_mem.gather(1, idx[..., None].expand(-1, -1, out_mem.shape[-1])))
    expect = enc_coord.gather(1, idx[..., None].expand(-1, -1, 4)).sigmoid()
    assert ref.shape == expect.shape == (batch, queries, 4)
    assert (ref - expect).abs().max().item() <= 1e-6


def _no_inplace(monkeypatch):
    import anydepth.models.resnet as rn
    import anydepth.models.rtdetr as rt
    import anydepth.nn as nn_mod

    for mod in (nn_mod, rn, rt):
        monkeypatch.setattr(mod, "inplace_ok", lambda t: False)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("act", ["relu", "silu", "identity"])
def test_conv_norm_act_in_place_inference_is_exact(act, monkeypatch):
    """The eager block's in-place activation and residual add give the functional result bit for
    bit (both norm sets, with and without a residual); with autograd on it stays functional."""
    from anydepth.nn import ConvNormAct

    torch.manual_seed(0)
    for k, s, cin, cout, size in ((3, 1, 4, 8, 9), (1, 1, 8, 8, 6), (3, 2, 3, 5, 11)):
        m = randomize_(ConvNormAct(cin, cout, k, s, act=act, skip_aware=True), 0).eval()
        x = torch.randn(2, cin, size, size)
        res = torch.randn(2, cout, (size - 1) // s + 1, (size - 1) // s + 1)
        with torch.no_grad():
            fast = [m(x, skip, r) for skip in (False, True) for r in (None, res)]
        with monkeypatch.context() as mp:
            _no_inplace(mp)
            with torch.no_grad():
                ref = [m(x, skip, r) for skip in (False, True) for r in (None, res)]
        assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    from anydepth.nn import inplace_ok

    t = torch.randn(3, requires_grad=True) * 2
    assert not inplace_ok(t)  # autograd needs it: the functional path
    with torch.no_grad():
        assert inplace_ok(t * 2)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name,size", [("rtdetr-r18-anydepth", 96), ("rtdetr-r50-anydepth", 64)])
def test_eager_inference_fast_paths_are_exact(name, size, monkeypatch):
    """The eager model with its inference fast paths (in-place pointwise ops in conv blocks,
    residual blocks and RepVGG blocks) equals the functional forward bit for bit at every depth."""
    torch.manual_seed(3)
    model = randomize_(create_model(name, num_queries=20), 3).eval()
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 3, size, size, generator=g)
    depths = ("full", "base", {"backbone.stage2": True, "encoder": True, "decoder_layers": 2})
    with torch.no_grad():
        fast = [model(x, depth=d) for d in depths]
    _no_inplace(monkeypatch)
    with torch.no_grad():
        ref = [model(x, depth=d) for d in depths]
    for a, b, d in zip(fast, ref, depths):
        assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"]), d


@pytest.mark.usefixtures("one_torch_thread")
def test_fused_stem_runs_channels_last_and_hands_nchw_on(r18):
    """The inference form runs its stem and max-pool channels-last on the CPU and hands stage 1 an
    NCHW tensor equal (max-pool exact, convs to rounding) to the NCHW stem's."""
    _, model = r18
    fused = copy.deepcopy(model).to_inference()
    bb = fused.backbone
    assert bb.stem_channels_last and not model.backbone.stem_channels_last
    x = _images(2, 96)
    with torch.no_grad():
        y = bb._pool(bb._stem(x))
        bb.stem_channels_last = False
        ref = bb._pool(bb._stem(x))
    assert y.is_contiguous() and ref.is_contiguous()
    assert rel_err(y, ref) <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_matches_isfinite(dtype):
    from anydepth.model import all_finite

    g = torch.Generator().manual_seed(0)
    for shape in ((1, 3, 32, 32), (2, 3, 7, 5), (1, 1, 1, 1)):
        x = torch.rand(shape, generator=g).to(dtype)
        assert all_finite(x)
        n = x.numel()
        for value in (float("nan"), float("inf"), float("-inf")):
            for pos in {0, n // 2, n - 1}:
                y = x.clone()
                y.view(-1)[pos] = value
                assert not all_finite(y) and not bool(torch.isfinite(y).all())


@pytest.mark.usefixtures("one_torch_thread")
def test_stage_profile_tool_mirrors_the_forward(capsys):
    """tools/rtdetr_stage_profile.py: its staged forward (new and baseline paths) equals the
    model's own output (it checks that itself before timing) and it prints one table per form."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "rtdetr_stage_profile.py"
    spec = importlib.util.spec_from_file_location("rtdetr_stage_profile", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    threads = torch.get_num_threads()
    try:
        assert tool.main(["--model", "rtdetr-r18-anydepth", "--imgsz", "64", "--num-queries", "20", "--rounds", "1",
                          "--warmup", "0", "--threads", "1", "--baseline"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for title in ("### eager", "### fused", "### before (--baseline): eager", "### before (--baseline): fused"):
        assert title in out
    assert out.count("depth efficiency (whole forward)") == 4
    import anydepth.models.rtdetr as rt
    import anydepth.nn as nn_mod

    assert nn_mod.inplace_ok is rt.inplace_ok  # the baseline patches were undone
