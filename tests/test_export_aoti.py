"""anydepth.export to AOTInductor packages: one multi-depth package (``torch.cond``) and one
per-depth package per model, at every depth against the eager model, and run in a process where
our code cannot be imported. (The ONNX export: tests/test_export.py; a file of its own so that the
two test processes of ``make test`` export in parallel.)

Each model (yolov12n and rtdetr-r18 at 64 px, the ONNX tests' models) is traced and compiled once
per module (a module-scoped fixture: the multi-depth package and a mid-ladder per-depth package,
dynamic batch). The compilation takes minutes on a 2-core machine: these tests are marked
``slow``."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import EXPORT_IMGSZ as IMGSZ
from helpers import EXPORT_MODELS as MODELS
from helpers import EXPORT_TOL as TOL
from helpers import export_depth_grid as _depth_grid
from helpers import export_eager as _eager
from helpers import export_input as _x
from helpers import export_mid as _mid
from helpers import export_model as _model
from helpers import export_rel as _rel


@pytest.fixture(scope="module")
def aoti_exports(tmp_path_factory):
    """name -> (model, ExportResult) of the multi-depth AOTInductor package and one mid-ladder
    per-depth package, dynamic batch, made once per module on first use."""
    from anydepth.export import export

    done = {}

    def get(name):
        if name not in done:
            model = _model(name)
            out = tmp_path_factory.mktemp(f"{name}-aoti")
            done[name] = model, export(model, out, format="aoti", depth=["multi", _mid(model).code], imgsz=IMGSZ,
                                       dynamic_batch=True, check=False, name=name)
        return done[name]
    return get


@pytest.fixture(params=list(MODELS))
def aoti_all(request, aoti_exports):
    return aoti_exports(request.param)


@pytest.mark.slow
def test_aoti_multi_depth_package_equals_eager_at_every_depth(aoti_all):
    """One AOTInductor package of the multi-depth graph (torch.cond) serves every depth: compared
    with eager at every ladder depth and off the ladder (batch 2; the batch axis is dynamic), and the
    per-depth package at its depth (batch 1)."""
    from anydepth.export import aoti_depth_inputs, aoti_load

    model, result = aoti_all
    multi, mid = result.file("multi"), result.file(_mid(model).code)
    assert multi.path.endswith("-multidepth.pt2") and mid.path.endswith(f"-{_mid(model).code}.pt2")
    runner = aoti_load(multi.path)
    x = _x(batch=2)
    outs = {}
    for config in _depth_grid(model):
        with torch.no_grad():
            got = runner(x, *aoti_depth_inputs(model, config))
        for o, r in zip(got, _eager(model, x, config)):
            assert _rel(o.numpy(), r) <= TOL, (config.code, _rel(o.numpy(), r))
        outs[config] = got[0]
    space = model.depth_space
    assert not torch.allclose(outs[space.base()], outs[space.full()])
    x1 = _x(batch=1, seed=2)
    with torch.no_grad():
        got = aoti_load(mid.path)(x1)
    for o, r in zip(got, _eager(model, x1, _mid(model))):
        assert _rel(o.numpy(), r) <= TOL


@pytest.mark.slow
def test_aoti_packages_run_without_our_code(aoti_exports, tmp_path):
    """The multi-depth and the per-depth package of each model, loaded in a process where anydepth
    cannot be imported, at the mid-ladder depth (batch 2: a dynamic-batch multi-depth package
    takes batch >= 2, see the README)."""
    from anydepth.export import aoti_depth_inputs

    runs = []
    x = _x(batch=2)
    torch.save(x, tmp_path / "x.pt")
    for name in MODELS:
        model, result = aoti_exports(name)
        config = _mid(model)
        ref = _eager(model, x, config)
        depth = tmp_path / f"{name}-depth.pt"
        torch.save(list(aoti_depth_inputs(model, config)), depth)
        none = tmp_path / "none.pt"
        torch.save([], none)
        runs.append((result.file("multi").path, depth, tmp_path / f"{name}-multi-y.pt", ref))
        runs.append((result.file(config.code).path, none, tmp_path / f"{name}-mid-y.pt", ref))
    script = textwrap.dedent("""
        import sys
        for mod in ("anydepth", "anydepth_kernels"):
            sys.modules[mod] = None  # importing our code would fail here
        import torch
        x = torch.load(sys.argv[1], weights_only=True)
        for pkg, depth, y in zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3]):
            runner = torch._inductor.aoti_load_package(pkg)
            with torch.no_grad():
                out = runner(x, *torch.load(depth, weights_only=True))
            torch.save([t.contiguous() for t in out], y)
        """)
    args = [str(tmp_path / "x.pt"), *(str(a) for run in runs for a in run[:3])]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for _, _, y, ref in runs:
        got = torch.load(y, weights_only=True)
        assert len(got) == len(ref)
        for o, r in zip(got, ref):
            assert _rel(o.numpy(), r) <= TOL
