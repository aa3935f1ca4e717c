"""Concat-free output conv vs its reference (cat + conv + epilogue)."""
import random

import pytest
import torch

import anydepth_kernels as ak
from anydepth_kernels import reference

from helpers import aot_compile, needs_cuda, rel_err

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


# --------------------------------------------------------------------------------------------
# Triton backend (CPU tensors through the interpreter here; CUDA in test_triton_cuda)
# --------------------------------------------------------------------------------------------

import os  # noqa: E402

from anydepth_kernels import triton_kernels  # noqa: E402

needs_triton = pytest.mark.skipif(
    not triton_kernels.AVAILABLE or (not torch.cuda.is_available()
                                     and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs Triton (CUDA, or CPU tensors under TRITON_INTERPRET=1)")


def _triton_case(seed, device="cpu", dtype=torch.float32, max_hw=9):
    """Random branches: 1-4 of them, channel counts off multiples of 16, some channel chunks of
    one tensor (strided views), a weight with extra input channels, maybe a residual."""
    rng = random.Random(1000 + seed)
    g = torch.Generator().manual_seed(seed)
    n = rng.choice([1, 2])
    h, w = rng.choice([(1, 1), (3, 5), (max_hw, max_hw - 1), (2, 9)])
    n_branches = rng.choice([1, 2, 3, 4])
    xs = []
    while len(xs) < n_branches:
        if rng.random() < 0.4 and n_branches - len(xs) >= 2:
            c = rng.choice([3, 8, 17])
            y = torch.randn(n, 2 * c + rng.choice([0, 5]), h, w, generator=g)
            xs += list(y[:, :2 * c].chunk(2, 1))  # strided chunks of one tensor
        else:
            xs.append(torch.randn(n, rng.choice([1, 5, 16, 33, 40]), h, w, generator=g))
    total = sum(x.shape[1] for x in xs)
    cout = rng.choice([1, 7, 16, 40, 70])
    weight = torch.randn(cout, total + rng.choice([0, 0, 9]), 1, 1, generator=g) / total ** 0.5
    scale = torch.rand(cout, generator=g) + 0.5
    bias = torch.randn(cout, generator=g) * 0.1
    residual = torch.randn(n, cout, h, w, generator=g) if seed % 2 else None
    act = ["identity", "relu", "silu"][seed % 3]
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return [cast(x) for x in xs], cast(weight), scale.to(device), bias.to(device), act, cast(residual)


@pytest.mark.triton_cpu
@needs_triton
@pytest.mark.parametrize("seed", range(12))
def test_triton_matches_reference(seed):
    xs, weight, scale, bias, act, residual = _triton_case(seed)
    ref = reference.concat_conv1x1(xs, weight, scale, bias, act, residual)
    out = ak.concat_conv1x1(xs, weight, scale, bias, act, residual, backend="triton")
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    assert rel_err(out, ref) <= 1e-5, (seed, [tuple(x.shape) for x in xs], tuple(weight.shape))


@pytest.mark.triton_cpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    for seed in (1, 4):
        xs, weight, scale, bias, act, residual = _triton_case(seed, dtype=dtype)
        up = lambda t: None if t is None else t.float()  # noqa: E731
        ref = reference.concat_conv1x1([up(x) for x in xs], up(weight), scale, bias, act, up(residual))
        out = ak.concat_conv1x1(xs, weight, scale, bias, act, residual, backend="triton")
        assert out.dtype == dtype
        assert rel_err(out, ref) <= 1e-2


@pytest.mark.triton_cpu
@needs_triton
def test_triton_prefix_chunks_more_branches_and_layouts():
    torch.manual_seed(0)
    y = torch.randn(2, 34, 5, 6)
    a, b = y.split([17, 17], 1)
    c = torch.randn(2, 6, 5, 6).contiguous(memory_format=torch.channels_last)  # copied to NCHW
    d = torch.randn(2, 3, 10, 12)[:, :, ::2, ::2]  # spatially strided: copied to NCHW
    e = torch.randn(2, 0, 5, 6)  # no channels: dropped
    weight = torch.randn(20, 140, 1, 1)[:, ::2]  # non-contiguous weight, extra input channels
    scale, bias = torch.rand(20) + 0.5, torch.randn(20)
    for xs in ([a, b], [a, b, c, d, a], [a, e, c, d]):  # five branches: the last two are concatenated
        ref = reference.concat_conv1x1(xs, weight, scale, bias, "silu")
        out = ak.concat_conv1x1(xs, weight, scale, bias, "silu", backend="triton")
        assert rel_err(out, ref) <= 1e-5


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    x = torch.randn(1, 4, 3, 3)
    w, s, b = torch.randn(6, 4, 1, 1), torch.ones(6), torch.zeros(6)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        ak.concat_conv1x1([x], w, s, b, backend="triton")
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        ak.concat_conv1x1([x.double()], w.double(), s, b, backend="triton")


def test_triton_aot_compile(tmp_path, aot_triton):
    """Compile the concat-conv kernel variants for sm_80 and sm_90 (PTX and cubin), with the venv's
    Triton and with Triton 3.6 (sm_90 only)."""
    if not triton_kernels.AVAILABLE:
        pytest.skip(triton_kernels.UNAVAILABLE_REASON)
    for arch, names in aot_compile(tmp_path, ['concat_conv'], triton=aot_triton).items():
        assert all(name.startswith("concat_conv1x1[") for name in names)
        for act in ("identity", "relu", "silu"):
            for res in (0, 1):
                assert any(f",{act},residual={res}," in name for name in names), (arch, act, res)
        for dt in ("fp32,ieee", "fp32,tf32", "fp16", "bf16"):
            assert any(name.startswith(f"concat_conv1x1[{dt}") for name in names), (arch, dt)


@pytest.mark.gpu
@needs_cuda
def test_triton_cuda():
    from anydepth_kernels.ops.concat_conv import _select

    assert _select(torch.empty(1, device="cuda"), "auto") == "triton"
    for seed in range(12):
        xs, weight, scale, bias, act, residual = _triton_case(seed, "cuda", max_hw=40)
        ref = reference.concat_conv1x1(xs, weight, scale, bias, act, residual)
        for backend in ("triton", "auto"):
            out = ak.concat_conv1x1(xs, weight, scale, bias, act, residual, backend=backend)
            assert rel_err(out, ref) <= 1e-5, (seed, backend)
        for dtype in (torch.float16, torch.bfloat16):
            xs_h, w_h, _, _, _, res_h = _triton_case(seed, "cuda", dtype, max_hw=40)
            up = lambda t: None if t is None else t.float()  # noqa: E731
            ref_h = reference.concat_conv1x1([up(x) for x in xs_h], up(w_h), scale, bias, act, up(res_h))
            out_h = ak.concat_conv1x1(xs_h, w_h, scale, bias, act, res_h, backend="triton")
            assert out_h.dtype == dtype and rel_err(out_h, ref_h) <= 1e-2, (seed, dtype)
    # A large CSP-like case: four branches, two of them chunks of one tensor.
    y = torch.randn(4, 256, 40, 40, device="cuda")
    xs = [*y.chunk(2, 1), torch.randn(4, 128, 40, 40, device="cuda"), torch.randn(4, 128, 40, 40, device="cuda")]
    weight = torch.randn(256, 512, 1, 1, device="cuda") / 512 ** 0.5
    scale, bias = torch.rand(256, device="cuda") + 0.5, torch.randn(256, device="cuda")
    out = ak.concat_conv1x1(xs, weight, scale, bias, "silu", backend="triton")
    ref = reference.concat_conv1x1(xs, weight, scale, bias, "silu")
    assert rel_err(out, ref) <= 1e-5
