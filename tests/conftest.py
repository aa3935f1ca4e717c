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
    """||out - ref|| / ||ref|| in float64 (the DESIGN.md accuracy measure)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture
def rel():
    return rel_err


def aot_compile(tmp_path, families=None):
    """Compile Triton kernel families for sm_80 and sm_90 (PTX and cubin) in two subprocesses
    without the interpreter, each with a fresh cache so every variant really goes through the
    compiler and ptxas. Returns ``{arch: [kernel variant names]}``; fails on any compile error."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    code = ("import json, sys; from anydepth_kernels.triton_kernels.aot import compile_all_for; "
            f"print(json.dumps(compile_all_for(int(sys.argv[1]){'' if families is None else ', ' + repr(list(families))})))")
    procs = {arch: subprocess.Popen([sys.executable, "-c", code, str(arch)],
                                    env=dict(env, TRITON_CACHE_DIR=str(tmp_path / f"cache{arch}")), cwd=repo,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in (80, 90)}
    names = {}
    for arch, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"sm_{arch} AOT compilation failed:\n{stderr[-6000:]}"
        names[arch] = json.loads(stdout.strip().splitlines()[-1])
    return names
