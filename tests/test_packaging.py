"""Packaging boundaries: ``anydepth_kernels`` stands alone (torch only, no ``anydepth``, no
benchmark modules, no evaluation/plotting deps on import); ``import anydepth`` stays light; the
optional dependencies fail with a message naming their extra."""
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("scipy", "matplotlib", "pycocotools", "faster_coco_eval", "PIL", "ultralytics", "transformers")


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter with the repository first on ``sys.path``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("TRITON_INTERPRET", "1")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


# Set before anything is imported: `anydepth` (the model package) cannot be imported at all.
_BLOCK_ANYDEPTH = """
import sys, importlib.abc

class _NoAnydepth(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "anydepth" or name.startswith("anydepth."):
            raise ImportError(f"blocked for this test: {name}")
        return None

sys.meta_path.insert(0, _NoAnydepth())
sys.modules.pop("anydepth", None)
"""


def test_kernels_work_without_the_model_package():
    out = _run(_BLOCK_ANYDEPTH + """
import torch
from torch import nn
import anydepth_kernels as ak
try:
    import anydepth
except ImportError:
    pass
else:
    raise SystemExit("anydepth should be unimportable here")

torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU()).eval()
with torch.no_grad():
    net[1].running_mean.uniform_(-0.5, 0.5); net[1].running_var.uniform_(0.5, 2.0)
x = torch.rand(2, 3, 12, 10)
with torch.no_grad():
    ref = net(x)
    opt, report = ak.optimize(net, return_report=True)
    assert opt is net and torch.allclose(opt(x), ref, atol=1e-5)
    fused = ak.FusedConvNormAct.from_modules(net[0], net[1], None, "silu", "reference")
    assert torch.allclose(fused(x, 0), ref, atol=1e-5), "FusedConvNormAct"
    scale, bias = ak.fold_batchnorm(net[1], net[0].bias)
    y = ak.conv_norm_act(x, net[0].weight, scale, bias, padding=1, act="silu")
    assert torch.allclose(y, ref, atol=1e-5), "conv_norm_act"
    q, k, v = (torch.rand(2, 2, 16, 8) for _ in range(3))
    out = ak.attention(q, k, v)
    exp = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out, exp, atol=1e-5), "attention"
assert not any(m == "anydepth" or m.startswith("anydepth.") for m in sys.modules)
print("ok", report.swapped)
""")
    assert out.startswith("ok")


def test_import_kernels_is_light():
    out = _run("""
import sys
import anydepth_kernels
bad = sorted(m for m in sys.modules
             if m.startswith("anydepth_kernels.benchmark") or m == "anydepth" or m.startswith("anydepth.")
             or m.split(".")[0] in %r)
print("bad:", bad)
""" % (HEAVY,))
    assert out.strip() == "bad: []"


def test_import_anydepth_does_not_import_eval_plot_or_matching_deps():
    out = _run("""
import sys
import anydepth, anydepth.models, anydepth.cli, anydepth.evaluation, anydepth.data, anydepth.losses
import anydepth.train, anydepth.convert  # not anydepth.benchmark: it is a benchmark module
bad = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in %r}
             | {m for m in sys.modules if m.startswith("anydepth_kernels.benchmark")})
print("bad:", bad)
""" % (HEAVY,))
    assert out.strip() == "bad: []"


def test_kernel_sources_do_not_name_the_model_package():
    """Our model package registers its own swap rules: no import of it, no module-name checks."""
    pat = re.compile(r"(^\s*(from|import)\s+anydepth(\.(?!_kernels)|\s|$))|(['\"]anydepth\.['\"])"
                     r"|(__module__[^\n]*['\"]anydepth\b(?!_kernels))", re.M)
    hits = [f"{p.relative_to(ROOT)}:{m.group(0).strip()}"
            for p in (ROOT / "anydepth_kernels").rglob("*.py") for m in pat.finditer(p.read_text())]
    assert hits == []


def test_anydepth_registers_its_rules():
    # a family registers its rule when its module is imported (any model of it exists by then)
    import anydepth.models.rtdetr  # noqa: F401
    import anydepth.models.yolov12  # noqa: F401
    from anydepth_kernels.optimize import SWAPS

    assert {("anydepth", "AnyDepthYOLOv12"), ("anydepth", "AnyDepthRTDETR")} <= set(SWAPS)


@pytest.mark.parametrize("module, extra", [("scipy.optimize", "train"), ("pycocotools.coco", "eval"),
                                           ("matplotlib", "plot"), ("PIL.Image", "data"), ("yaml", "data"),
                                           ("ultralytics.nn.tasks", "peers"), ("transformers", "peers"),
                                           ("timm", "peers"), ("torchvision", "vision")])
def test_missing_optional_dependency_names_its_extra(monkeypatch, module, extra):
    from anydepth._optional import require

    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ImportError, match=re.escape(f'pip install "anydepth[{extra}]"')):
        require(module, "this feature")


def test_coco_evaluation_without_pycocotools_says_which_extra(monkeypatch):
    from anydepth import evaluation

    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ImportError, match=re.escape('anydepth[eval]')):
        evaluation._backend_classes("pycocotools")


def test_hungarian_matcher_without_scipy_says_which_extra(monkeypatch):
    import torch
    from anydepth.losses.rtdetr import HungarianMatcher

    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(ImportError, match=re.escape('anydepth[train]')):
        HungarianMatcher()(torch.zeros(1, 3, 2), torch.rand(1, 3, 4), targets)


def test_peer_converters_without_their_package_say_which_extra(monkeypatch, tmp_path):
    from anydepth.convert import _transformers, _ultralytics
    from anydepth.models import rtdetr

    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "ultralytics.nn.tasks", None)
    with pytest.raises(ImportError, match=re.escape('anydepth[peers]')):
        _transformers.hf_config_for("rtdetr-r18-anydepth")
    with pytest.raises(ImportError, match=re.escape('anydepth[peers]')):
        _transformers.build_peer("rtdetr-r18-anydepth")
    with pytest.raises(ImportError, match=re.escape('anydepth[peers]')):
        _ultralytics.build_peer("yolov12n-anydepth")
    with pytest.raises(ImportError, match=r"a directory: a HuggingFace model\?.*anydepth\[peers\]"):
        rtdetr._import_transformers(str(tmp_path))
