"""optimize(model): swaps into our models and Ultralytics models, outputs unchanged."""
import copy

import pytest
import torch
from torch import nn

import anydepth
import anydepth_kernels as ak
from anydepth.testing import randomize_

from helpers import needs_transformers, needs_ultralytics, rel_err


def test_optimize_anydepth_yolov12_every_depth():
    m = randomize_(anydepth.create_model("yolov12n-anydepth", num_classes=4), seed=5,
                   calibrate_shape=(2, 3, 64, 64)).eval()
    exact = copy.deepcopy(m).double()
    opt, report = ak.optimize(copy.deepcopy(m), return_report=True)
    assert report.swapped and "to_inference()" in " ".join(report.notes)
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for depth in ("full", "base", {"neck.p4_down": True}, 0.3):
            ref = exact(x.double(), depth=depth)
            # This random network amplifies rounding: float32 eager itself is up to 1.2e-5 off the
            # float64 run on some inputs (measured over 40 seeds; the fused form up to 2.3e-5 there).
            # The fused form must be as exact as float32 eager: within 1e-5 plus twice eager's own
            # float32 error on this input (two independent float32 roundings of the same function).
            eager_err = rel_err(m(x, depth=depth), ref)
            assert rel_err(opt(x, depth=depth), ref) <= 1e-5 + 2 * eager_err


def _type_counts(model):
    import collections

    return collections.Counter(type(m).__name__ for m in model.modules())


def _added(before, after):
    return {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}


@pytest.mark.parametrize("name", ["yolov12n-anydepth", "rtdetr-r18-anydepth"])
def test_optimize_anydepth_swaps_what_its_inference_form_does(name):
    """Each model family registers its rule from `anydepth` (register_family): optimize() gives the
    model's own inference form, in place, and reports the same module types as calling it."""
    m = anydepth.create_model(name, num_classes=3).eval()
    direct = copy.deepcopy(m).to_inference()
    expected = _added(_type_counts(m), _type_counts(direct))
    assert expected
    opt, report = ak.optimize(m, return_report=True)
    assert opt is m and report.swapped == expected and _type_counts(opt) == _type_counts(direct)
    assert report.notes == [f"{type(m).__name__}: its own inference form (to_inference())"]
    assert opt.is_inference
    # nested in a plain container, the same rule applies to it as a submodule
    wrapped = nn.Sequential(anydepth.create_model(name, num_classes=3))
    _, report = ak.optimize(wrapped, return_report=True)
    assert report.swapped == {f"anydepth.{type(m).__name__}": 1}
    assert _type_counts(wrapped[0]) == _type_counts(direct)


def test_register_swap_applies_to_the_model_itself_with_a_note():
    from anydepth_kernels.optimize import SWAPS

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

    def rule(mod, backend):
        mod.lin = nn.Identity()
        return mod

    key = (Toy.__module__.split(".", 1)[0], "Toy")
    try:
        ak.register_swap(*key, rule, note="toy form")
        out, report = ak.optimize(Toy().eval(), return_report=True)
        assert isinstance(out.lin, nn.Identity) and report.swapped == {"Identity": 1}
        assert report.notes == ["Toy: toy form"]
        with pytest.raises(TypeError, match="callable"):
            ak.register_swap(*key, "not a rule")
    finally:
        SWAPS.pop(key, None)


def test_optimize_leaves_unknown_modules_and_reports(capsys):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Linear(4, 2))
    net.train()
    out, report = ak.optimize(net, verbose=True, return_report=True)
    assert out is net and not net.training
    assert report.swapped == {} and report.left_alone == {"Conv2d": 1, "BatchNorm2d": 1, "Linear": 1}
    assert "left alone" in capsys.readouterr().out
    with pytest.raises(TypeError, match="nn.Module"):
        ak.optimize("not a model")




@needs_ultralytics
@pytest.mark.parametrize("scale", ["n", "l"])
def test_optimize_ultralytics_yolo12(scale):
    from anydepth.convert._ultralytics import build_peer

    peer, _ = build_peer(f"yolov12{scale}-anydepth", seed=6)
    exact = copy.deepcopy(peer).double()
    opt, report = ak.optimize(copy.deepcopy(peer), return_report=True)
    for kind in ("ultralytics.Conv", "ultralytics.ABlock", "ultralytics.Bottleneck", "ultralytics.DWConv"):
        assert report.swapped.get(kind, 0) > 0, kind
    assert not any(type(m).__name__ in ("AAttn", "ABlock") for m in opt.modules())
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        ref = exact(x.double())[0]
        assert rel_err(opt(x)[0], ref) <= 1e-5
        assert rel_err(peer(x)[0], ref) <= 1e-5


@needs_ultralytics
def test_optimize_after_ultralytics_fuse():
    """Ultralytics' own fuse() removes the BNs (conv gets a bias): still swappable."""
    from anydepth.convert._ultralytics import build_peer

    peer, _ = build_peer("yolov12n-anydepth", seed=7)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = peer(x)[0]
        folded = copy.deepcopy(peer).fuse(verbose=False)
        opt = ak.optimize(folded)
        assert rel_err(opt(x)[0], ref) <= 1e-5


@needs_transformers
@pytest.mark.parametrize("variant", ["r18", "r50"])
def test_optimize_hf_rtdetr(variant):
    from anydepth.convert._transformers import build_peer

    hf, _ = build_peer(f"rtdetr-{variant}-anydepth", num_classes=5, seed=8, num_queries=30)
    exact = copy.deepcopy(hf).double()
    opt, report = ak.optimize(copy.deepcopy(hf), return_report=True)
    for kind in ("RTDetrCSPRepLayer", "RTDetrConvNormLayer", "MultiScaleDeformableAttention"):
        assert report.swapped.get(f"transformers.{kind}", 0) > 0, (kind, report)
    assert sum(v for k, v in report.swapped.items() if "RTDetrResNet" in k) > 0
    assert not any(type(m).__name__ in ("RTDetrRepVggBlock", "RTDetrResNetConvLayer") for m in opt.modules())
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        ref = exact(pixel_values=x.double())
        out = opt(pixel_values=x)
        assert rel_err(out.logits, ref.logits) <= 1e-5
        assert rel_err(out.pred_boxes, ref.pred_boxes) <= 1e-5


# -- optimize(model, compile=True): Inductor with weight freezing ------------------------------
def test_optimize_compile_yolov12_full_and_base():
    model = anydepth.create_model("yolov12n-anydepth", num_classes=5).eval()
    randomize_(model, seed=3, calibrate_shape=(2, 3, 96, 96))
    model.eval()
    limit_before = torch._dynamo.config.recompile_limit
    compiled, report = ak.optimize(copy.deepcopy(model), compile=True, return_report=True)
    assert "torch.compile(inductor, freezing)" in report.swapped
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for depth in ("full", "base"):
            assert rel_err(compiled(x, depth=depth), model(x, depth=depth)) < 1e-5, depth
        # predict() calls the module itself, so it runs the compiled graph too
        img = (torch.rand(70, 90, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
        a = compiled.predict(img, depth="base", imgsz=96, conf=0.01)[0]
        b = model.predict(img, depth="base", imgsz=96, conf=0.01)[0]
    assert len(a) == len(b)
    if len(a):
        assert rel_err(a.boxes, b.boxes) < 1e-4
    with pytest.raises(TypeError, match="compile"):
        ak.optimize(model, compile="yes")
    # the ladder's recompile limit holds inside the compiled model's calls only
    assert torch._dynamo.config.recompile_limit == limit_before


def test_recompile_limit_and_freezing_are_set_only_inside_the_call():
    import torch._dynamo
    import torch._inductor.config
    from anydepth_kernels.optimize import RECOMPILE_LIMIT, _with_recompile_limit

    before, freezing_before = torch._dynamo.config.recompile_limit, torch._inductor.config.freezing
    seen = []
    wrapped = _with_recompile_limit(
        lambda x: seen.append((torch._dynamo.config.recompile_limit, torch._inductor.config.freezing)) or x,
        RECOMPILE_LIMIT)
    assert wrapped(3) == 3
    assert seen == [(max(before, RECOMPILE_LIMIT), True)]
    assert torch._dynamo.config.recompile_limit == before and torch._inductor.config.freezing == freezing_before


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs a oneDNN (mkldnn) CPU build of torch")
def test_compile_frozen_folds_norms_into_prepacked_convs():
    # torch.compile(options={"freezing": True}) leaves conv -> batch norm unfolded (torch 2.14); the
    # compiled call must run the frozen graph: a pre-packed oneDNN conv, the norm folded into it
    from torch.profiler import profile

    from anydepth_kernels.optimize import compile_frozen_

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16),
                              torch.nn.SiLU()).eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    ref = copy.deepcopy(net)
    compile_frozen_(net)
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        net(x)
        with profile() as prof:
            y = net(x)
        assert rel_err(y, ref(x)) < 1e-5
    ops = {e.key for e in prof.key_averages()}
    assert "mkldnn::_convolution_pointwise" in ops, sorted(ops)
    assert "aten::mkldnn_convolution" not in ops and "aten::native_batch_norm" not in ops, sorted(ops)


def test_optimize_compile_rtdetr_matches_up_to_query_order():
    # every encoder position becomes a query (num_queries = all tokens), so the query set does not
    # depend on top-k ties that 1e-6 differences could flip; the decoder is permutation-equivariant
    tokens = 8 * 8 + 4 * 4 + 2 * 2
    model = anydepth.create_model("rtdetr-r18-anydepth", num_classes=3, num_queries=tokens).eval()
    randomize_(model, seed=4, calibrate_shape=(2, 3, 64, 64))
    model.eval()
    compiled = ak.optimize(copy.deepcopy(model), compile=True)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for depth in ("base",):   # full depth compiled in the YOLOv12 test; each compile costs ~30 s here
            a, b = model(x, depth=depth), compiled(x, depth=depth)
            ea = torch.cat([a["logits"][0], a["pred_boxes"][0]], -1)
            eb = torch.cat([b["logits"][0], b["pred_boxes"][0]], -1)
            dist = torch.cdist(eb.double(), ea.double())
            nearest = dist.min(1)
            assert nearest.indices.unique().numel() == tokens, depth      # a one-to-one pairing
            assert nearest.values.max() < 1e-4 * ea.abs().max(), depth
