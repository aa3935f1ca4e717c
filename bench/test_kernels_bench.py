"""pytest-benchmark microbenchmarks of the fused conv block, per backend.

    pytest bench/ --benchmark-only                 # CPU
    pytest bench/ --benchmark-only --device cuda   # on a GPU machine

The user-facing report with ratios measured in one interleaved run is `anydepth bench --kernels`;
these are for regression tracking with pytest-benchmark's own statistics and comparison tools.
"""
import pytest
import torch

import anydepth_kernels as ak
from anydepth_kernels.benchmark import DEFAULT_CASES, _eager_block, available_backends

CASES = [c for c in DEFAULT_CASES if c.name.startswith(("3x3 64->64 @160", "1x1 128", "1x1 256"))]


@pytest.fixture(scope="session")
def device(pytestconfig):
    dev = torch.device(pytestconfig.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device cuda given but no CUDA device is visible")
    return dev


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "_"))
@pytest.mark.parametrize("backend", ["eager", "reference", "cpp", "cuda", "triton"])
def test_conv_block(benchmark, device, case, backend):
    if backend != "eager":
        why = available_backends(device, torch.float32)[backend]
        if why is not None:
            pytest.skip(f"{backend}: {why}")
    eager = _eager_block(case, device, torch.float32)
    fused = ak.FusedConvNormAct.from_modules(eager[0], eager[1], act=eager[2],
                                             backend=backend if backend != "eager" else "auto")
    x = torch.randn(1, case.cin, case.hw, case.hw, device=device)
    mod = eager if backend == "eager" else fused

    def run():
        with torch.no_grad():
            mod(x)
        _sync(device)

    benchmark.group = case.name
    benchmark(run)
