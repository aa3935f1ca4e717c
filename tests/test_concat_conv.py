"""Concat-free output conv vs its reference (cat + conv + epilogue)."""
import random

import pytest
import torch

import anydepth_kernels as ak
from anydepth_kernels import reference

from conftest import rel_err

BACKENDS = ["reference", "cpp"]


def _case(rng, n_branches, dtype=torch.float32, extra_in=0, n=None):
    n = n if n is not None else rng.choice([1, 2])
    h, w = rng.choice([(1, 1), (5, 7), (8, 8), (13, 4)])
    chans = [rng.choice([1, 3, 8, 16]) for _ in range(n_branches)]
    cout = rng.choice([1, 5, 16, 24])
    xs = [torch.randn(n, c, h, w, dtype=dtype) for c in chans]
    weight = torch.randn(cout, sum(chans) + extra_in, 1, 1, dtype=dtype) / (sum(chans) ** 0.5)
    scale = torch.rand(cout) + 0.5
    bias = torch.randn(cout) * 0.1
    return xs, weight, scale, bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(12))
def test_matches_reference(backend, seed):
    rng = random.Random(seed)
    xs, weight, scale, bias = _case(rng, rng.choice([1, 2, 3, 4]), extra_in=rng.choice([0, 0, 8]))
    act = rng.choice(["silu", "relu", "identity"])
    residual = torch.randn(xs[0].shape[0], weight.shape[0], *xs[0].shape[2:]) if seed % 3 == 0 else None
    ref = reference.concat_conv1x1(xs, weight, scale, bias, act, residual)
    out = ak.concat_conv1x1(xs, weight, scale, bias, act, residual, backend=backend)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_of_the_weight_and_non_contiguous_branches(backend):
    """A shallow path passes fewer branches: only the weight's first columns are read. Branches
    that are channel chunks of one tensor (C3k2's cv1 output) are strided views."""
    torch.manual_seed(0)
    y = torch.randn(2, 16, 6, 6)
    a, b = y.chunk(2, 1)
    c = torch.randn(2, 8, 6, 6)
    weight = torch.randn(12, 32, 1, 1)
    scale, bias = torch.rand(12) + 0.5, torch.randn(12)
    full = ak.concat_conv1x1([a, b, c, c], weight, scale, bias, backend=backend)
    shallow = ak.concat_conv1x1([a, b], weight, scale, bias, backend=backend)
    ref_full = torch.nn.functional.silu(torch.nn.functional.conv2d(torch.cat([a, b, c, c], 1), weight)
                                        * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    ref_shallow = torch.nn.functional.silu(torch.nn.functional.conv2d(y, weight[:, :16])
                                           * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    assert rel_err(full, ref_full) <= 1e-5 and rel_err(shallow, ref_shallow) <= 1e-5


def test_float64_and_gradients():
    rng = random.Random(3)
    xs, weight, scale, bias = _case(rng, 3, torch.float64, n=2)
    xs = [x.requires_grad_() for x in xs]
    weight.requires_grad_()
    # the epilogue's scale/bias are float32 by contract (folded norms): gradcheck the float64
    # inputs, and compare the scale/bias gradients with the reference's autograd
    assert torch.autograd.gradcheck(
        lambda *t: ak.concat_conv1x1(list(t[:3]), t[3], scale, bias, act="silu", backend="cpp"),
        (*xs, weight), eps=1e-6, atol=1e-6)
    s = scale.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    out = ak.concat_conv1x1(xs, weight, s, b, act="silu", backend="cpp")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [*xs, weight, s, b], g)
    s2, b2 = scale.clone().requires_grad_(), bias.clone().requires_grad_()
    want = torch.autograd.grad(reference.concat_conv1x1(xs, weight, s2, b2, "silu"), [*xs, weight, s2, b2], g)
    for a, e in zip(got, want):
        assert rel_err(a, e) <= 1e-5


def test_compile():
    rng = random.Random(4)
    xs, weight, scale, bias = _case(rng, 2)
    fn = torch.compile(lambda a, b: ak.concat_conv1x1([a, b], weight, scale, bias), backend="eager", fullgraph=True)
    assert rel_err(fn(*xs), reference.concat_conv1x1(xs, weight, scale, bias)) <= 1e-5


def test_bad_inputs():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(6, 8, 1, 1)
    s, b = torch.ones(6), torch.zeros(6)
    with pytest.raises(ValueError, match="non-empty"):
        ak.concat_conv1x1([], w, s, b)
    with pytest.raises(ValueError, match="spatial size"):
        ak.concat_conv1x1([x, torch.randn(1, 4, 4, 5)], w, s, b)
    with pytest.raises(ValueError, match="weight reads"):
        ak.concat_conv1x1([x, x, x], w, s, b)
    with pytest.raises(ValueError, match=r"\[C_out, C_in, 1, 1\]"):
        ak.concat_conv1x1([x], torch.randn(6, 8, 3, 3), s, b)
    with pytest.raises(TypeError, match="dtype"):
        ak.concat_conv1x1([x, x.double()], w, s, b)
    with pytest.raises(ValueError, match="elements"):
        ak.concat_conv1x1([x], w, torch.ones(5), b)
    with pytest.raises(ValueError, match="unknown backend"):
        ak.concat_conv1x1([x], w, s, b, backend="gpu")
    with pytest.raises(ValueError, match="activation"):
        ak.concat_conv1x1([x], w, s, b, act="gelu")
