"""pytest-benchmark microbenchmarks of multi-scale deformable attention, per backend.

    pytest bench/test_ms_deform_bench.py --benchmark-only                 # CPU
    pytest bench/test_ms_deform_bench.py --benchmark-only --device cuda   # on a GPU machine

The report with ratios measured in one interleaved run is
``anydepth_kernels.benchmark_ms_deform.run_ms_deform_benchmarks``; these are for regression
tracking with pytest-benchmark's own statistics and comparison tools.
"""
import pytest
import torch

from anydepth_kernels import reference
from anydepth_kernels.benchmark_ms_deform import (
    DEFAULT_MS_DEFORM_CASES,
    make_case_inputs,
    ms_deform_backends,
)
from anydepth_kernels.ops.ms_deform_attn import ms_deform_attn

CASE = DEFAULT_MS_DEFORM_CASES[0]  # the RT-DETR decoder at 640


@pytest.fixture(scope="session")
def device(pytestconfig):
    dev = torch.device(pytestconfig.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device cuda given but no CUDA device is visible")
    return dev


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", ["grid_sample", "reference", "cpp", "cuda", "triton"])
def test_ms_deform_attn(benchmark, device, backend, mode):
    if backend != "grid_sample":
        why = ms_deform_backends(device, torch.float32)[backend]
        if why is not None:
            pytest.skip(f"{backend}: {why}")
    value, ss, starts, loc, attn = make_case_inputs(CASE, device, torch.float32)
    grad = torch.randn(CASE.n, CASE.q, CASE.m * CASE.d, device=device)

    def call(v, sl, aw):
        if backend == "grid_sample":  # the eager reference itself, outside the op
            return reference.ms_deform_attn(v, ss, starts, sl, aw)
        return ms_deform_attn(v, ss, starts, sl, aw, backend=backend)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                call(value, loc, attn)
        else:
            leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
            call(*leaves).backward(grad)
        _sync(device)

    benchmark.group = f"{CASE.name} {mode}"
    benchmark(run)
