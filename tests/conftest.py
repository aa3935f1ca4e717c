import os

import pytest

from helpers import TRITON36_ARCHS, TRITON36_VERSION, AotTriton, rel_err, triton_interpreted

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. This must be set
# before triton is imported anywhere.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

# One torch thread per test process (ANYDEPTH_TEST_THREADS to change it), and one OpenMP thread in
# the processes the tests start: the suite's forwards are tiny, and ``make test`` runs two test
# processes on a 2-core machine, where a second spinning OpenMP thread per process multiplies the
# CPU time of every small op (measured on a loaded machine: four training tests take 9.7 s of CPU
# with one thread, 167 s with two). Tests that need more threads set them themselves. With a GPU
# (``make gpu-check``: large CPU references on a many-core machine) torch's default is kept
# unless ANYDEPTH_TEST_THREADS says otherwise.
_threads = os.environ.get("ANYDEPTH_TEST_THREADS", None if torch.cuda.is_available() else "1")
# (the test processes of pytest-xdist inherit OMP_NUM_THREADS=1: they read the count from here)
TORCH_DEFAULT_THREADS = int(os.environ.setdefault("ANYDEPTH_TORCH_DEFAULT_THREADS", str(torch.get_num_threads())))
#: files kept at torch's default thread count: test_yolov12.py::test_fused_separate_shallow_conv
#: (fused vs eager within 1e-5) gives 1.47e-5 with one thread (oneDNN's one-thread convolutions sum
#: in another order), 1e-5 or less with two; to be looked at, until then it runs as before
DEFAULT_THREAD_FILES = ("test_yolov12.py",)
if _threads is not None:
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    torch.set_num_threads(int(_threads))


def pytest_addoption(parser):
    parser.addoption("--only-triton-cpu", action="store_true",
                     help="select only the tests that run Triton on CPU tensors (the interpreter process of "
                          "make gpu-check on a GPU machine)")


def _triton_on_cpu(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return item.get_closest_marker("gpu") is None and (
        params.get("backend") == "triton" or item.get_closest_marker("triton_cpu") is not None)


#: The test files that take the most CPU time, the heaviest first (measured; see the README's
#: "Tests" notes). ``make test`` runs the suite in two processes, a file staying in one process
#: (``--dist loadfile --no-loadscope-reorder``): files are handed out in collection order, so these
#: go first and the small files fill in the gaps, and the two processes finish together. The rest
#: keep their order. A file missing here only runs later; a name of a file gone is ignored.
HEAVY_FILES = (
    "test_export_aoti.py", "test_export.py", "test_precision.py", "test_train.py", "test_attention.py",
    "test_optimize.py", "test_ms_deform_attn.py", "test_shared_basis.py", "test_triton_conv_norm_act.py",
    "test_concat_conv.py", "test_gpucheck.py",
)


def _file_rank(item) -> int:
    name = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return HEAVY_FILES.index(name) if name in HEAVY_FILES else len(HEAVY_FILES)


def pytest_collection_modifyitems(config, items):
    """The heavy files first (:data:`HEAVY_FILES`; a stable sort, so a file's tests keep their order).

    Tests that run the Triton backend on CPU tensors (a ``backend="triton"`` parameter or the
    ``triton_cpu`` marker), outside the ``gpu`` tests, need the interpreter: where it is off (a GPU
    machine) they are skipped here with the reason, and run in the interpreter process instead."""
    items.sort(key=_file_rank)
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


@pytest.fixture(autouse=True, scope="module")
def _default_threads_for_some_files(request):
    """torch's default thread count for the modules of :data:`DEFAULT_THREAD_FILES`."""
    if request.module.__name__.rsplit(".", 1)[-1] + ".py" not in DEFAULT_THREAD_FILES:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_DEFAULT_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of many tiny forwards (``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")``): on a loaded 2-core machine two spinning threads
    make every call far slower, and one thread repeats better. (The suite's default is one thread
    already, see TEST_THREADS; this keeps such a module at one when ANYDEPTH_TEST_THREADS is set.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
