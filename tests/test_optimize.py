"""optimize(model): swaps into our models and Ultralytics models, outputs unchanged."""
import copy

import pytest
import torch
from torch import nn

import anydepth
import anydepth_kernels as ak
from anydepth.testing import randomize_

from conftest import rel_err


def test_optimize_anydepth_yolov12_every_depth():
    m = randomize_(anydepth.create_model("yolov12n-anydepth", num_classes=4), seed=5,
                   calibrate_shape=(2, 3, 64, 64)).eval()
    exact = copy.deepcopy(m).double()
    opt, report = ak.optimize(copy.deepcopy(m), return_report=True)
    assert report.swapped and "fuse()" in " ".join(report.notes)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        for depth in ("full", "base", {"neck.p4_down": True}, 0.3):
            assert rel_err(opt(x, depth=depth), exact(x.double(), depth=depth)) <= 1e-5


def test_optimize_leaves_unknown_modules_and_reports(capsys):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Linear(4, 2))
    net.train()
    out, report = ak.optimize(net, verbose=True, return_report=True)
    assert out is net and not net.training
    assert report.swapped == {} and report.left_alone == {"Conv2d": 1, "BatchNorm2d": 1, "Linear": 1}
    assert "left alone" in capsys.readouterr().out
    with pytest.raises(TypeError, match="nn.Module"):
        ak.optimize("not a model")


ultralytics = pytest.importorskip("ultralytics", reason="the Ultralytics peer is in the test extras")


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


transformers = pytest.importorskip("transformers", reason="the HF peer is in the test extras")


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
