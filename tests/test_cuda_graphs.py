"""CUDAGraphRunner: one graph per depth on CUDA, a plain call on the CPU."""
import pytest
import torch

import anydepth
import anydepth_kernels as ak
from anydepth.testing import randomize_


def _model(device="cpu"):
    m = anydepth.create_model("yolov12n-anydepth", num_classes=3)
    return randomize_(m, seed=1, calibrate_shape=(2, 3, 64, 64)).eval().to(device)


def test_cpu_is_a_plain_call():
    m = _model()
    runner = ak.CUDAGraphRunner(m)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for depth in ("full", "base", 0.5):
            assert torch.equal(runner(x, depth=depth), m(x, depth=depth))
    assert runner.num_graphs == 0
    with pytest.raises(TypeError, match="nn.Module"):
        ak.CUDAGraphRunner(lambda x: x)
    with pytest.raises(TypeError, match="tensor"):
        runner([1, 2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_graph_per_depth_on_cuda():
    m = _model("cuda")
    runner = ak.CUDAGraphRunner(m)
    x = torch.rand(2, 3, 64, 96, device="cuda")
    with torch.no_grad():
        for depth in ("full", "base", {"neck.p3_up": True}, "full", m.depth_space.base()):
            out = runner(x, depth=depth)
            ref = m(x, depth=depth)
            assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
        assert runner.num_graphs == 3  # "base" and the base DepthConfig share one graph
        y = torch.rand_like(x)
        assert torch.allclose(runner(y, depth="base"), m(y, depth="base"), rtol=1e-4, atol=1e-4)
        runner.reset()
        assert runner.num_graphs == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rtdetr_graphs_per_depth_on_cuda():
    m = anydepth.create_model("rtdetr-r18-anydepth", num_classes=3, num_queries=20).eval().cuda()
    runner = ak.CUDAGraphRunner(m)
    x = torch.rand(1, 3, 128, 128, device="cuda")
    with torch.no_grad():
        for depth in ("full", "base", {"decoder_layers": 2}):
            out, ref = runner(x, depth=depth), m(x, depth=depth)
            assert torch.allclose(out["logits"], ref["logits"], rtol=1e-3, atol=1e-3)
            assert torch.allclose(out["pred_boxes"], ref["pred_boxes"], rtol=1e-3, atol=1e-3)
    assert runner.num_graphs == 3
