import os

import pytest

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. This must be set
# before triton is imported anywhere.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


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


def pytest_addoption(parser):
    parser.addoption("--only-triton-cpu", action="store_true",
                     help="select only the tests that run Triton on CPU tensors (the interpreter process of "
                          "make gpu-check on a GPU machine)")


def _triton_on_cpu(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return item.get_closest_marker("gpu") is None and (
        params.get("backend") == "triton" or item.get_closest_marker("triton_cpu") is not None)


def pytest_collection_modifyitems(config, items):
    """Tests that run the Triton backend on CPU tensors (a ``backend="triton"`` parameter or the
    ``triton_cpu`` marker), outside the ``gpu`` tests, need the interpreter: where it is off (a GPU
    machine) they are skipped here with the reason, and run in the interpreter process instead."""
    if config.getoption("--only-triton-cpu"):
        keep = [item for item in items if _triton_on_cpu(item)]
        config.hook.pytest_deselected(items=[item for item in items if not _triton_on_cpu(item)])
        items[:] = keep
    if triton_interpreted():
        return
    skip = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1: on a GPU machine these "
                                   "cases run in a separate interpreter process (make gpu-check)")
    for item in items:
        if _triton_on_cpu(item):
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _exact_cuda_references():
    """GPU references are compared at fp32 tolerances (1e-5): cuDNN convolutions and cuBLAS matmuls
    must not silently use TF32 (both are allowed by default for cuDNN). Tests that want TF32 ask
    for it explicitly (``input_precision="tf32"``)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def rel():
    return rel_err


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


@pytest.fixture(params=["venv", "triton36"])
def aot_triton(request):
    """Parametrizes the AOT-compile tests over the venv's Triton (3.8 with torch 2.14) and Triton
    3.6 (the GPU machines', with torch 2.11). The 3.6 case fails when ``$(VENV)/triton36`` is
    missing (``make test`` installs it), unless ``ANYDEPTH_NO_TRITON36=1`` makes it skip."""
    import sys
    from importlib import metadata
    from pathlib import Path

    if request.param == "venv":
        return AotTriton("venv")
    if metadata.version("triton").startswith(TRITON36_VERSION):
        pytest.skip(f"the venv's Triton is {metadata.version('triton')}: the venv case covers 3.6")
    folder = Path(sys.prefix) / "triton36"
    if not (folder / "triton" / "__init__.py").is_file():
        if os.environ.get("ANYDEPTH_NO_TRITON36") == "1":
            pytest.skip(f"ANYDEPTH_NO_TRITON36=1: no Triton 3.6 AOT compile ({folder} is missing)")
        repo = Path(__file__).resolve().parents[1]
        venv = os.path.relpath(sys.prefix, repo)
        pytest.fail(f"Triton 3.6 for the AOT-compile tests is missing: {folder} does not exist. Run "
                    f"`make test` (or `make {venv}/triton36/.installed`) to install it, or set "
                    "ANYDEPTH_NO_TRITON36=1 to skip these cases.", pytrace=False)
    return AotTriton("3.6", folder, TRITON36_VERSION, TRITON36_ARCHS)


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
