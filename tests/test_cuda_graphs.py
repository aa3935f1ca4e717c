"""CUDAGraphRunner: one graph per depth on CUDA, a plain call on the CPU."""
import pytest
import torch

from helpers import needs_cuda

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
@needs_cuda
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
@needs_cuda
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


def _close(a, b, tol=1e-4):
    return torch.allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.gpu
@needs_cuda
def test_uncloned_outputs_belong_to_their_graph_on_cuda():
    """clone_outputs=False: a graph's outputs change only when that same graph replays (each graph
    has its own memory pool, so another depth's replay cannot overwrite them)."""
    m = _model("cuda")
    runner = ak.CUDAGraphRunner(m, clone_outputs=False)
    x = torch.rand(2, 3, 64, 96, device="cuda")
    y = torch.rand_like(x)
    with torch.no_grad():
        ref_full_x, ref_base_x, ref_full_y = m(x, depth="full"), m(x, depth="base"), m(y, depth="full")
        full = runner(x, depth="full")
        base = runner(x, depth="base")
        assert _close(full, ref_full_x) and _close(base, ref_base_x)
        assert runner(y, depth="full") is full  # the same static tensor, overwritten in place
        assert _close(full, ref_full_y) and _close(base, ref_base_x)
        for _ in range(3):
            runner(torch.rand_like(x), depth="base")
        assert _close(full, ref_full_y)
    assert runner.num_graphs == 2


@pytest.mark.gpu
@needs_cuda
def test_inference_mode_capture_then_normal_mode_calls_on_cuda():
    m = _model("cuda")
    runner = ak.CUDAGraphRunner(m)
    x = torch.rand(1, 3, 64, 64, device="cuda")
    y = torch.rand_like(x)
    with torch.no_grad():
        ref_x, ref_y = m(x, depth="base"), m(y, depth="base")
    with torch.inference_mode():
        out = runner(x.clone(), depth="base")  # captured in inference mode
    assert _close(out, ref_x)
    with torch.no_grad():
        out = runner(y, depth="base")  # replayed outside it: the same graph
    assert not out.is_inference() and _close(out, ref_y)
    with torch.inference_mode():
        assert _close(runner(x, depth="base"), ref_x)
    assert runner.num_graphs == 1

    raw = ak.CUDAGraphRunner(m, clone_outputs=False)
    with torch.inference_mode():
        first = raw(x, depth="full")
    with torch.no_grad():
        again = raw(y, depth="full")
    assert again is first and not first.is_inference()
    first.add_(0)  # a normal tensor: in-place use outside inference mode works
    assert raw.num_graphs == 1


@pytest.mark.gpu
@needs_cuda
def test_rtdetr_graph_survives_shape_cache_eviction_on_cuda():
    """The graph keeps the cached constants it reads (level tables, anchors, position embedding):
    dropping them from the caches and refilling the caches and memory with other data changes
    nothing."""
    from anydepth.models import rtdetr

    m = anydepth.create_model("rtdetr-r18-anydepth", num_classes=3, num_queries=20).eval().cuda()
    runner = ak.CUDAGraphRunner(m)
    x = torch.rand(1, 3, 128, 128, device="cuda")
    with torch.no_grad():
        ref = m(x, depth="base")
        runner(x, depth="base")
        (entry,) = runner._graphs.values()
        assert len(entry.constants) >= 3
        for cache in (rtdetr._level_tables, rtdetr._anchors, rtdetr._sincos_2d):
            cache.cache_clear()
        junk = [torch.full((n,), float("nan"), device="cuda")
                for n in (8, 9, 16, 64, 336, 1344, 4096) for _ in range(8)]
        for side in (96, 160, 192):  # other shapes refill the caches
            m(torch.rand(1, 3, side, side, device="cuda"), depth="base")
        out = runner(x, depth="base")
    del junk
    assert _close(out["logits"], ref["logits"], 1e-3) and _close(out["pred_boxes"], ref["pred_boxes"], 1e-3)


@pytest.mark.gpu
@needs_cuda
def test_rtdetr_shape_constants_capture_on_a_cache_miss_on_cuda():
    """A cache miss inside a capture builds the constants with device kernels (no host->device
    copy) and does not store them; replays fill them."""
    from anydepth.models import rtdetr

    dev = torch.device("cuda", torch.cuda.current_device())
    shapes = ((5, 7), (3, 4), (2, 2))
    rtdetr._level_tables(((4, 4), (2, 2), (1, 1)), dev)  # load the kernels before the capture
    rtdetr._anchors(((4, 4), (2, 2), (1, 1)), dev, torch.float32)
    torch.cuda.synchronize()
    rtdetr._level_tables.cache_clear()
    rtdetr._anchors.cache_clear()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        table, starts = rtdetr._level_tables(shapes, dev)
        anchors, valid = rtdetr._anchors(shapes, dev, torch.float32)
    assert len(rtdetr._level_tables) == 0 and len(rtdetr._anchors) == 0
    graph.replay()
    torch.cuda.synchronize()
    assert table.tolist() == [[5, 7], [3, 4], [2, 2]] and starts.tolist() == [0, 35, 47]
    ref_anchors, ref_valid = rtdetr._anchors(shapes, dev, torch.float32)
    assert torch.equal(anchors, ref_anchors) and torch.equal(valid, ref_valid)


# ------------------------------------------------------------------------------------------------
# the runner's capture logic on the CPU, with the CUDA graph API replaced by recording fakes
# ------------------------------------------------------------------------------------------------
class _FakeStream:
    def __init__(self, device=None):
        self.device = device

    def wait_stream(self, other):
        pass


class _FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda`` stream/graph API as no-ops that record each capture's arguments."""
    import contextlib

    captures = []

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global", **kwargs):
        captures.append({"graph": cuda_graph, "pool": pool, "stream": stream,
                         "capture_error_mode": capture_error_mode, "inference": torch.is_inference_mode_enabled(),
                         "grad": torch.is_grad_enabled()})
        yield

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return captures


def test_each_graph_has_a_private_pool_and_thread_local_capture(fake_cuda):
    m = _model()
    runner = ak.CUDAGraphRunner(m, warmup=1)
    x = torch.rand(1, 3, 64, 64)
    entries = [runner._capture(x, m.resolve_depth(d)) for d in ("full", "base")]
    assert len(fake_cuda) == 2
    for rec, entry in zip(fake_cuda, entries):
        assert rec["pool"] is None  # no shared pool: each graph gets its own private one
        assert rec["capture_error_mode"] == "thread_local"
        assert rec["stream"] is not None and rec["graph"] is entry.graph
        assert not rec["inference"] and not rec["grad"]
    # the docstring promises what the private pools guarantee
    doc = " ".join(ak.CUDAGraphRunner.__doc__.split())
    assert "valid until the next call with the *same key*" in doc
    assert "other keys never touch them" in doc


def test_static_input_is_a_normal_tensor():
    from anydepth_kernels.cuda_graphs import static_input

    base = torch.rand(2, 3, 8, 8)
    with torch.inference_mode():
        xi = base.clone()
        buf = static_input(xi.to(memory_format=torch.channels_last))
    assert xi.is_inference() and not buf.is_inference() and not buf.requires_grad
    assert torch.equal(buf, base) and buf.is_contiguous(memory_format=torch.channels_last)
    y = torch.rand_like(base)
    buf.copy_(y)  # outside inference mode
    assert torch.equal(buf, y)
    with torch.inference_mode():
        buf.copy_(xi)  # and inside
    assert torch.equal(buf, base)
    assert not static_input(torch.rand(3, requires_grad=True)).requires_grad


def test_capture_in_inference_mode_then_replay_in_both_modes(fake_cuda):
    m = _model()
    runner = ak.CUDAGraphRunner(m, warmup=1)
    cfg = m.resolve_depth("base")
    with torch.inference_mode():
        x = torch.rand(1, 3, 64, 64)
        entry = runner._capture(x, cfg)
    assert not entry.static_in.is_inference() and not entry.static_out.is_inference()
    y = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = runner._replay(entry, y)  # normal mode: copy into the static input must work
    assert torch.equal(entry.static_in, y) and entry.graph.replays == 1
    assert torch.equal(out, entry.static_out) and out is not entry.static_out
    with torch.inference_mode():
        runner._replay(entry, x)
    assert torch.equal(entry.static_in, x) and entry.graph.replays == 2
    runner.clone_outputs = False
    with torch.no_grad():
        assert runner._replay(entry, y) is entry.static_out


def test_clone_of_inference_outputs_outside_inference_mode():
    from anydepth_kernels.cuda_graphs import _clone

    with torch.inference_mode():
        out = {"a": torch.rand(3), "b": (torch.rand(2), 5)}
    copy = _clone(out)
    assert not copy["a"].is_inference() and torch.equal(copy["a"], out["a"])
    assert copy["b"][1] == 5 and copy["b"][0] is not out["b"][0]


def test_entry_keeps_the_rtdetr_shape_constants_alive(fake_cuda):
    from anydepth.models import rtdetr

    m = anydepth.create_model("rtdetr-r18-anydepth", num_classes=3, num_queries=20)
    m = randomize_(m, seed=0, calibrate_shape=(1, 3, 64, 64)).eval()
    runner = ak.CUDAGraphRunner(m, warmup=1)
    x = torch.rand(1, 3, 64, 96)
    entry = runner._capture(x, m.resolve_depth("base"))
    cpu = torch.device("cpu")
    shapes = ((8, 12), (4, 6), (2, 3))
    expected = [rtdetr._level_tables(shapes, cpu), rtdetr._anchors(shapes, cpu, torch.float32),
                rtdetr._sincos_2d(2, 3, 256, m.encoder.temperature, cpu, torch.float32)]
    for value in expected:
        assert any(c is value for c in entry.constants), value
    # the caches may now drop them: the entry still holds them
    for cache in (rtdetr._level_tables, rtdetr._anchors, rtdetr._sincos_2d):
        cache.cache_clear()
    assert all(any(c is value for c in entry.constants) for value in expected)


def test_keep_alive_outside_a_capture_is_a_no_op():
    from anydepth_kernels.cuda_graphs import collect_graph_constants, keep_alive

    keep_alive(torch.zeros(1))
    with collect_graph_constants() as outer:
        keep_alive(1)
        with collect_graph_constants() as inner:
            keep_alive(2)
        keep_alive(3)
    assert outer == [1, 2, 3] and inner == [2]


def test_entry_keeps_the_yolov12_anchors_alive(fake_cuda):
    m = _model()
    runner = ak.CUDAGraphRunner(m, warmup=1)
    x = torch.rand(1, 3, 64, 96)
    entry = runner._capture(x, m.resolve_depth("base"))
    head = next(mod for mod in m.modules() if hasattr(mod, "_anchor_cache"))
    (cached,) = head._anchor_cache.values()
    assert any(c is cached for c in entry.constants)
    head._anchor_cache.clear()  # the cache drops them (it clears past 16 shapes): the entry holds them
    assert any(c is cached for c in entry.constants)
