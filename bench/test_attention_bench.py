"""pytest-benchmark microbenchmarks of the fused attention ops, per backend.

    pytest bench/test_attention_bench.py --benchmark-only                 # CPU
    pytest bench/test_attention_bench.py --benchmark-only --device cuda   # on a GPU machine

The report with ratios measured in one interleaved run is
``anydepth_kernels.benchmark_attention.run_attention_benchmarks``; these are for regression
tracking with pytest-benchmark's own statistics and comparison tools.
"""
import pytest
import torch

from anydepth_kernels.benchmark_attention import (
    BASELINE,
    DEFAULT_ATTENTION_CASES,
    _case_calls,
    attention_backends,
    make_case_inputs,
)

CASES = {c.name: c for c in DEFAULT_ATTENTION_CASES}


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
@pytest.mark.parametrize("backend", [BASELINE, "reference", "sdpa", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention(benchmark, device, case, backend, mode):
    backends = attention_backends(device, torch.float32)
    if backend != BASELINE and backends[backend] is not None:
        pytest.skip(f"{backend}: {backends[backend]}")
    c = CASES[case]
    fn = _case_calls(c, backends, None)[backend]
    inputs = make_case_inputs(c, device, torch.float32)
    with torch.no_grad():
        outs = fn(*inputs)
    grads = [torch.randn_like(o) for o in outs]

    def run():
        if mode == "fwd":
            with torch.no_grad():
                fn(*inputs)
        else:
            leaves = [t.detach().requires_grad_() for t in inputs]
            torch.autograd.backward(fn(*leaves), grads)
        _sync(device)

    benchmark.group = f"{c.name} {mode}"
    benchmark(run)
