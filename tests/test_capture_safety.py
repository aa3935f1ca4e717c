"""Capture safety on the CPU: after a warm-up call, the eval forward of RT-DETR and YOLOv12 creates
no tensor from host data and reads no tensor value back to the host, so it can be captured in a
CUDA graph (where a host->device copy or a synchronisation fails) and costs no sync per call.

The guard sees tensors created from Python data (``torch.tensor``/``torch.as_tensor``, which on a
CUDA device are host->device copies), device->host reads (``item``, ``bool(t)``, ``int(t)``,
``tolist``, ``numpy``, ``cpu``), data-dependent shapes (``nonzero``, ...) and cross-device copies.
Two eager-only checks are allowed: they skip themselves while a CUDA graph is being captured
(``test_allowed_sites_skip_themselves_during_capture`` keeps that true).
"""
import contextlib
import inspect
import threading
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import anydepth
from anydepth.models import rtdetr
from anydepth.testing import randomize_
from anydepth_kernels.cuda_graphs import collect_graph_constants, keep_alive

# (file suffix, function) of the checks that run eagerly and return early during a capture
ALLOWED_SITES = (("anydepth/model.py", "check_input"),
                 ("anydepth_kernels/ops/ms_deform_attn.py", "_check_levels"))

_SYNC_OPS = {"_local_scalar_dense", "lift_fresh", "lift_fresh_copy", "nonzero", "masked_select",
             "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave"}


def _allowed() -> bool:
    return any(f.filename.replace("\\", "/").endswith(path) and f.name == name
               for f in traceback.extract_stack() for path, name in ALLOWED_SITES)


class _Guard(TorchDispatchMode):
    def __init__(self, found):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        bad = name in _SYNC_OPS
        if name == "_to_copy" and "device" in kwargs and isinstance(args[0], torch.Tensor):
            bad = torch.device(kwargs["device"]) != args[0].device
        if name == "copy_" and isinstance(args[1], torch.Tensor):
            bad = args[0].device != args[1].device
        if bad and not _allowed():
            self.found.append(f"aten.{name}\n{''.join(traceback.format_stack(limit=8)[:-1])}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync():
    """Fail if the block creates a tensor from host data or reads tensor data on the host."""
    found = []

    def flag(what, fn):
        def wrapper(*args, **kwargs):
            if not _allowed():
                found.append(f"{what}\n{''.join(traceback.format_stack(limit=8)[:-1])}")
            return fn(*args, **kwargs)
        return wrapper

    patches = [(torch, "tensor"), (torch, "as_tensor"), (torch, "from_numpy"),
               (torch.Tensor, "tolist"), (torch.Tensor, "numpy"), (torch.Tensor, "cpu"),
               (torch.Tensor, "item")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in patches]
    for obj, name, fn in saved:
        setattr(obj, name, flag(f"{getattr(obj, '__name__', obj)}.{name}", fn))
    try:
        with _Guard(found):
            yield found
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    assert not found, "host sync / host->device copy in a capturable forward:\n" + "\n".join(found)


def _rtdetr():
    m = anydepth.create_model("rtdetr-r18-anydepth", num_classes=3, num_queries=20)
    return randomize_(m, seed=0, calibrate_shape=(1, 3, 64, 64)).eval()


def _yolo():
    m = anydepth.create_model("yolov12n-anydepth", num_classes=3)
    return randomize_(m, seed=1, calibrate_shape=(1, 3, 64, 64)).eval()


# ------------------------------------------------------------------------------------------------
def test_guard_catches_what_it_should():
    x = torch.ones(3)
    for bad in (lambda: torch.tensor([1, 2]), lambda: x.sum().item(), lambda: bool(x.sum() > 0),
                lambda: x.tolist(), lambda: torch.as_tensor([1.0]), lambda: x.nonzero(), lambda: x.cpu()):
        with pytest.raises(AssertionError, match="host sync"):
            with no_host_sync():
                bad()
    with no_host_sync():  # device kernels with scalar arguments are fine
        t = torch.empty(4, dtype=torch.long)
        t[1].fill_(3)
        torch.full((2,), 5.0) * x[:2]


def test_allowed_sites_skip_themselves_during_capture():
    from anydepth.model import AnyDepthModel
    from anydepth_kernels.ops import ms_deform_attn as msda

    for fn in (AnyDepthModel.check_input, msda._check_levels):
        assert "is_current_stream_capturing" in inspect.getsource(fn), fn


@pytest.mark.parametrize("family", ["rtdetr", "yolov12"])
def test_eval_forward_is_capture_safe_after_warmup(family):
    m = _rtdetr() if family == "rtdetr" else _yolo()
    depths = ("full", "base", {"decoder_layers": 2}) if family == "rtdetr" else ("full", "base")
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        for depth in depths:
            ref = m(x, depth=depth)  # warm-up: fills the shape caches
            with no_host_sync():
                out = m(x, depth=depth)
            if isinstance(out, dict):
                for k in out:
                    assert torch.equal(out[k], ref[k]), k
            else:
                assert torch.equal(out, ref)


def test_rtdetr_cache_miss_during_capture_is_capture_safe(monkeypatch):
    """A cache miss while a graph is captured computes the constant with device kernels only and
    does not store it (a captured tensor is only filled by replays)."""
    m = _rtdetr()
    x = torch.rand(1, 3, 96, 128)
    caches = (rtdetr._level_tables, rtdetr._anchors, rtdetr._sincos_2d)
    with torch.no_grad():
        ref = m(x, depth="base")
        for c in caches:
            c.cache_clear()
        monkeypatch.setattr(rtdetr, "_capturing", lambda: True)
        with no_host_sync():
            out = m(x, depth="base")
        assert all(len(c) == 0 for c in caches)
        monkeypatch.setattr(rtdetr, "_capturing", lambda: False)
        m(x, depth="base")
        assert all(len(c) == 1 for c in caches)
    assert torch.equal(out["logits"], ref["logits"]) and torch.equal(out["pred_boxes"], ref["pred_boxes"])


def test_level_tables():
    rtdetr._level_tables.cache_clear()
    shapes = ((5, 7), (3, 4), (2, 2))
    with no_host_sync():
        table, starts = rtdetr._level_tables(shapes, torch.device("cpu"))
    assert table.dtype == starts.dtype == torch.long
    assert table.tolist() == [[5, 7], [3, 4], [2, 2]] and starts.tolist() == [0, 35, 47]
    again = rtdetr._level_tables(shapes, torch.device("cpu"))
    assert again[0] is table and again[1] is starts  # cached per (shapes, device)


def test_shape_cache_lru_keep_alive_and_threads():
    calls = []

    def build(n):
        calls.append(n)
        return torch.full((n,), float(n))

    cache = rtdetr._ShapeCache(build, maxsize=2)
    a = cache(1)
    assert cache(1) is a and calls == [1]
    cache(2)
    cache(3)  # evicts 1, the least recently used
    assert len(cache) == 2 and cache(1) is not a and calls == [1, 2, 3, 1]
    with collect_graph_constants() as refs:
        b = cache(3)
        c = cache(4)
        seen_elsewhere = []

        def other_thread():  # reports from another thread do not land in this collector
            with collect_graph_constants() as mine:
                cache(3)
                keep_alive("x")
            seen_elsewhere.extend(mine)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert len(refs) == 2 and refs[0] is b and refs[1] is c
    assert len(seen_elsewhere) == 2 and seen_elsewhere[0] is b
    keep_alive(b)  # no collector: nothing happens
