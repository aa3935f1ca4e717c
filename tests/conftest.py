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
