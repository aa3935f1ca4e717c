"""Helpers shared by the test files (``from helpers import ...``; pytest puts ``tests/`` on the
path): the accuracy measure, skip markers for optional hardware and peers, and the Triton
ahead-of-time compile driver. ``conftest.py`` keeps only pytest hooks and fixtures."""
import importlib.util
import os

import pytest
import torch

def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64 on the CPU (the project's accuracy measure); the two
    tensors may live on different devices."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def triton_interpreted() -> bool:
    """Triton kernels run on CPU tensors only through the interpreter; on a GPU machine the suite
    runs them on CUDA (the ``gpu`` tests) and the interpreter cases run in a second process with
    ``CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1`` (``make gpu-check`` does both)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


#: for tests that need a CUDA device (with ``pytest.mark.gpu`` where ``make gpu-check`` should run them)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Only the peer tests need the peers: a machine without Ultralytics (the GPU machines) runs the rest.
needs_ultralytics = pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None,
                                       reason="the Ultralytics peer is in the test extras")
needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="the torchvision peer is in the test extras")
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="the HF peer is in the test extras")
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="the timm peer is in the test extras")
needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="torchvision is in the test extras")


#: The Triton of the GPU machines, beside the venv's own for the AOT-compile tests: ``make test``
#: installs it (``make $(VENV)/triton36/.installed``: ``pip install --no-deps --target``, no second
#: torch) into ``$(VENV)/triton36``, which the compile subprocesses put first on ``PYTHONPATH``.
TRITON36_VERSION = "3.6."
#: Triton 3.6 compiles for the GPU machines' architecture only (sm_90, H200), in two processes
#: sharing the variants: sm_80 is covered by the venv's Triton, and this halves the added time.
TRITON36_ARCHS = (90,)


class AotTriton:
    """The Triton an AOT-compile test uses: ``path`` (a folder put first on ``PYTHONPATH``, None
    for the venv's own), the version prefix the subprocesses must import, the architectures."""

    def __init__(self, label, path=None, version=None, archs=(80, 90)):
        self.label, self.path, self.version, self.archs = label, path, version, tuple(archs)

    def __repr__(self):
        return f"AotTriton({self.label})"


def aot_compile(tmp_path, families=None, triton=None):
    """Compile Triton kernel families for sm_80 and sm_90 (PTX and cubin) in subprocesses without
    the interpreter, each with a fresh cache so every variant really goes through the compiler and
    ptxas. ``triton``: an :class:`AotTriton` (the ``aot_triton`` fixture) choosing the Triton and
    the architectures; None is the venv's for sm_80 and sm_90. A single architecture's variants are
    split over two processes. Returns ``{arch: [kernel variant names]}``; fails on any compile error."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    triton = triton or AotTriton("venv")
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(triton.path or ""), str(repo), env.get("PYTHONPATH")]))
    code = ("import json, sys, triton; from anydepth_kernels.triton_kernels.aot import compile_all_for; "
            f"assert triton.__version__.startswith({triton.version or ''!r}), triton.__version__; "
            "print(json.dumps(compile_all_for(int(sys.argv[1])"
            f"{'' if families is None else ', ' + repr(list(families))}, shard=(int(sys.argv[2]), int(sys.argv[3])))))")
    shards = max(1, 2 // len(triton.archs))
    procs = {(arch, i): subprocess.Popen([sys.executable, "-c", code, str(arch), str(i), str(shards)],
                                         env=dict(env, TRITON_CACHE_DIR=str(tmp_path / f"cache{arch}_{i}")),
                                         cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in triton.archs for i in range(shards)}
    names = {arch: [] for arch in triton.archs}
    for (arch, i), proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, \
            f"sm_{arch} AOT compilation with Triton {triton.label} failed:\n{stderr[-6000:]}"
        names[arch] += json.loads(stdout.strip().splitlines()[-1])
    return names


# -- the authors' fixtures (tests/fixtures/authors_*.npz, made by tools/authors_fixtures.py) --------
AUTHORS_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def authors_weight(key, shape, seed):
    """A weight the fixture stores as (key, shape) only: redrawn from a generator seeded by its
    state-dict key (``tools/authors_fixtures.py``'s ``conv_weight``)."""
    import math
    import zlib

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    fan_in = math.prod(shape[1:])
    return torch.randn(tuple(shape), generator=g) * (1.0 / fan_in) ** 0.5


def load_authors_fixture(name):
    """``(fixture dict, their state dict)`` of ``tests/fixtures/<name>``: plain arrays + JSON
    metadata (``np.load(allow_pickle=False)``); ``outputs`` (and ``outputs64`` where stored) become
    {depth key: output}; the redrawn weights are put back into the state dict."""
    import json

    import numpy as np

    with np.load(os.path.join(AUTHORS_FIXTURES, name), allow_pickle=False) as z:
        fx = json.loads(str(z["meta"]))
        fx.update({k: torch.from_numpy(z[k]) for k in ("input", "outputs", "outputs64") if k in z.files})
        fx["state_dict"] = {k.split("/", 1)[1]: torch.from_numpy(z[k]) for k in z.files
                            if k.startswith("state_dict/")}
    assert fx["format"] == "anydepth-authors-fixture"
    fx["outputs"] = dict(zip(fx["depths"], fx["outputs"]))
    if "outputs64" in fx:
        fx["outputs64"] = dict(zip(fx["depths64"], fx["outputs64"]))
    sd = dict(fx["state_dict"])
    for key, shape in fx["drawn"].items():
        sd[key] = authors_weight(key, shape, fx["weight_seed"])
    return fx, sd


# -- the export tests (tests/test_export.py: ONNX; tests/test_export_aoti.py: AOTInductor) ---------
#: the exported models, at 64 px (each file builds them from the same seed)
EXPORT_IMGSZ = 64
EXPORT_MODELS = {
    "yolov12n-anydepth": dict(num_classes=4),
    "rtdetr-r18-anydepth": dict(num_classes=4, num_queries=20),
}
EXPORT_TOL = 1e-4  # max |out - eager| / max |eager|, per output


def export_model(name):
    """A random model of ``EXPORT_MODELS`` (seed 0), its norm statistics calibrated at 64 px."""
    import anydepth
    from anydepth.testing import randomize_

    torch.manual_seed(0)
    m = anydepth.create_model(name, **EXPORT_MODELS[name]).eval()
    return randomize_(m, calibrate_shape=(2, 3, EXPORT_IMGSZ, EXPORT_IMGSZ))


def export_rel(out, ref):
    """max |out - ref| / max |ref| (same shapes)."""
    import numpy as np

    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def export_eager(model, x, config):
    """The eager model's outputs at ``config`` as numpy arrays, in the exported files' order."""
    with torch.no_grad():
        out = model(x, depth=config)
    return [t.numpy() for t in (out.values() if isinstance(out, dict) else [out])]


def export_mid(model):
    """A mid-ladder depth: some switches skipped, some run."""
    ladder = model.depth_configs((1, 3, EXPORT_IMGSZ, EXPORT_IMGSZ))
    return ladder[len(ladder) // 2]


def export_input(batch=1, seed=1):
    return torch.rand((batch, 3, EXPORT_IMGSZ, EXPORT_IMGSZ), generator=torch.Generator().manual_seed(seed))


def export_depth_grid(model):
    """Every ladder depth, and off the ladder: alternating switches and (RT-DETR) each decoder
    depth at base switches."""
    space = model.depth_space
    configs = list(model.depth_configs((1, 3, EXPORT_IMGSZ, EXPORT_IMGSZ)))
    configs.append(space.make({s: i % 2 == 0 for i, s in enumerate(space.switches)}))
    for k, spec in space.knob_specs.items():
        configs += [space.make(dict.fromkeys(space.switches, True), {k: v}) for v in range(spec.low, spec.high + 1)]
    return list(dict.fromkeys(configs))
