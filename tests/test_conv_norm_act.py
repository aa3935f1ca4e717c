"""conv_norm_act / scale_bias_act: every backend available here against the eager reference."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anydepth_kernels as ak
from anydepth_kernels import reference
from helpers import needs_cuda, rel_err

CPU_BACKENDS = ["reference", "cpp", "triton"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _case(seed, n, cin, cout, h, w, k, stride, groups, dtype, residual, channels_last):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).to(dtype)
    wt = (torch.randn(cout, cin // groups, k, k, generator=g) / (cin // groups * k * k) ** 0.5).to(dtype)
    scale = torch.rand(cout, generator=g) + 0.5
    bias = torch.randn(cout, generator=g)
    pad = k // 2
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    res = torch.randn(n, cout, oh, ow, generator=g).to(dtype) if residual else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, wt, scale, bias, pad, res


def _reference(x, wt, scale, bias, stride, pad, groups, act, res):
    """fp32 (fp64 for fp64) reference on upcast inputs."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = None if res is None else res.to(cdt)
    return reference.conv_norm_act(x.to(cdt), wt.to(cdt), scale, bias, stride, pad, 1, groups, act, r)


# A grid of random shapes: (n, cin, cout, h, w, k, stride, groups)
SHAPES = [
    (1, 3, 16, 9, 7, 3, 2, 1),
    (2, 16, 32, 8, 8, 1, 1, 1),
    (1, 17, 24, 13, 11, 1, 2, 1),
    (2, 32, 32, 10, 6, 3, 1, 32),  # depthwise
    (1, 24, 48, 7, 9, 3, 1, 2),
    (1, 8, 8, 5, 5, 5, 1, 1),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ["silu", "relu", "identity"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
def test_conv_norm_act_fp32(backend, shape, act, residual):
    if backend == "triton" and not ak.extension_info()["triton"]["available"]:
        pytest.fail(f"triton backend unavailable: {ak.extension_info()['triton']['reason']}")
    n, cin, cout, h, w, k, stride, groups = shape
    seed = hash((shape, act, residual)) % 10_000
    for channels_last in (False, True):
        x, wt, scale, bias, pad, res = _case(seed, n, cin, cout, h, w, k, stride, groups,
                                             torch.float32, residual, channels_last)
        out = ak.conv_norm_act(x, wt, scale, bias, stride, pad, 1, groups, act, res, backend=backend)
        ref = _reference(x, wt, scale, bias, stride, pad, groups, act, res)
        assert out.shape == ref.shape and out.dtype == x.dtype
        assert not out.isnan().any()
        assert rel_err(out, ref) <= 1e-5, (channels_last, rel_err(out, ref))
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_conv_norm_act_dtypes(dtype, backend):
    for i, (n, cin, cout, h, w, k, stride, groups) in enumerate(SHAPES[:4]):
        for act, residual in itertools.product(["silu", "relu"], [False, True]):
            x, wt, scale, bias, pad, res = _case(i, n, cin, cout, h, w, k, stride, groups, dtype,
                                                 residual, False)
            out = ak.conv_norm_act(x, wt, scale, bias, stride, pad, 1, groups, act, res, backend=backend)
            ref = _reference(x, wt, scale, bias, stride, pad, groups, act, res)
            assert out.dtype == dtype and not out.isnan().any()
            assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_scale_bias_act(backend, channels_last):
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 5, 7, 9), (2, 32, 8, 8), (3, 17, 1, 1)]:
        y = torch.randn(shape, generator=g)
        if channels_last:
            y = y.to(memory_format=torch.channels_last)
        scale, bias = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
        for act, res in itertools.product(["silu", "relu", "identity"], [None, torch.randn(shape, generator=g)]):
            out = ak.scale_bias_act(y, scale, bias, act, res, backend=backend)
            ref = reference.scale_bias_act(y, scale, bias, act, res)
            assert rel_err(out, ref) <= 1e-5


def test_silu_full_range_every_isa():
    """The C++ fp32 epilogue has AVX-512 / AVX2 / baseline variants; check each one this CPU runs
    (in a subprocess, since the variant is chosen once per process) over the whole float range."""
    code = (
        "import torch, anydepth_kernels as ak\n"
        "y = torch.linspace(-120, 120, 200003).view(1, 1, 1, -1)\n"
        "ref = torch.nn.functional.silu(y.double())\n"
        "out = ak.scale_bias_act(y, torch.ones(1), torch.zeros(1), 'silu', backend='cpp').double()\n"
        "big = ref.abs() > 1e-30\n"
        "print(torch.ops.anydepth._ext_cpu_isa(), ((out - ref).abs()[big] / ref.abs()[big]).max().item(),"
        " ((out - ref).abs()).max().item(), int(out.isnan().sum()))\n"
    )
    import torch.backends.cpu as cpu

    cap = cpu.get_cpu_capability()
    isas = ["base"] + (["avx2"] if cap in ("AVX2", "AVX512") else []) + (["avx512"] if cap == "AVX512" else [])
    for isa in isas:
        env = dict(os.environ, ANYDEPTH_CPU_ISA=isa)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        name, max_rel, max_abs, nans = out.stdout.split()
        assert name == isa
        assert float(max_rel) < 2e-6 and float(max_abs) < 1e-5 and int(nans) == 0, out.stdout


def test_unknown_isa_is_a_clear_error():
    env = dict(os.environ, ANYDEPTH_CPU_ISA="sse9")
    code = ("import torch, anydepth_kernels as ak; "
            "ak.scale_bias_act(torch.randn(1,2,3,3), torch.ones(2), torch.zeros(2), backend='cpp')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "ANYDEPTH_CPU_ISA=sse9" in out.stderr


# ------------------------------------------------------------------------------------------
# module, two epilogue sets
# ------------------------------------------------------------------------------------------

def _random_bn(c, seed):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    bn.weight.data = torch.rand(c, generator=g) + 0.5
    bn.bias.data = torch.randn(c, generator=g)
    bn.running_mean = torch.randn(c, generator=g)
    bn.running_var = torch.rand(c, generator=g) + 0.1
    return bn.eval()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("conv_bias", [False, True])
def test_fused_module_two_epilogues(backend, conv_bias):
    conv = nn.Conv2d(12, 20, 3, stride=2, padding=1, bias=conv_bias)
    bn, bn_skip = _random_bn(20, 1), _random_bn(20, 2)
    fused = ak.FusedConvNormAct.from_modules(conv, bn, bn_skip, nn.SiLU(), backend=backend)
    x = torch.randn(2, 12, 11, 9)
    res = torch.randn(2, 20, 6, 5)
    with torch.no_grad():
        for epi, norm in enumerate((bn, bn_skip)):
            ref = F.silu(norm(conv(x)))
            assert rel_err(fused(x, epilogue=epi), ref) <= 1e-5
            assert rel_err(fused(x, epi, residual=res), ref + res) <= 1e-5
        assert rel_err(fused(x, 0), fused(x, 1)) > 1e-2  # the two sets really differ


def test_fused_module_padding_same_and_repr():
    conv = nn.Conv2d(4, 8, 3, padding="same")
    fused = ak.FusedConvNormAct.from_modules(conv, _random_bn(8, 0), act=None)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert rel_err(fused(x), _random_bn(8, 0)(conv(x))) <= 1e-5
    assert "num_epilogues=1" in repr(fused) and "act='identity'" in repr(fused)


# ------------------------------------------------------------------------------------------
# autograd, op registration, torch.compile
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gradcheck(backend):
    """Gradients of x, weight and residual by finite differences in fp64. scale and bias are
    float32 epilogue parameters (the op rounds them), too coarse for fp64 finite differences:
    their gradients are checked against autograd through the pure reference below."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.rand(6, generator=g) + 0.5
    b = torch.randn(6, generator=g)
    r = torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for act in ("silu", "relu", "identity"):
        f = lambda x, w, r: ak.conv_norm_act(x, w, s, b, 2, 1, 1, 1, act, r, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, w, r))
        f2 = lambda y, r: ak.scale_bias_act(y, s, b, act, r, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(f2, (r.detach().clone().requires_grad_(), r))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_grad_scale_bias(backend):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 4, 6, 6, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    grad = torch.randn(2, 6, 6, 6, generator=g)
    s0, b0 = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    for act in ("silu", "relu"):
        grads = []
        for fn in (lambda *a: ak.conv_norm_act(*a, 1, 1, 1, 1, act, backend=backend),
                   lambda *a: reference.conv_norm_act(*a, 1, 1, 1, 1, act)):
            s, b = s0.clone().requires_grad_(), b0.clone().requires_grad_()
            xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
            fn(xx, ww, s, b).backward(grad)
            grads.append((xx.grad, ww.grad, s.grad, b.grad))
        for got, want in zip(*grads):
            assert rel_err(got, want) <= 1e-5


def test_opcheck():
    x = torch.randn(2, 8, 7, 7)
    w = torch.randn(16, 8, 3, 3)
    s, b, r = torch.rand(16) + 0.5, torch.randn(16), torch.randn(2, 16, 7, 7)
    torch.library.opcheck(torch.ops.anydepth.conv_norm_act.default,
                          (x, w, s, b, [1, 1], [1, 1], [1, 1], 1, "silu", r, "auto"))
    torch.library.opcheck(torch.ops.anydepth.scale_bias_act.default, (r, s, b, "relu", None, "auto"))


def test_torch_compile_cpu():
    torch._dynamo.reset()
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    mod = nn.ModuleList([ak.FusedConvNormAct.from_modules(conv, _random_bn(16, 3), _random_bn(16, 4)),
                         ak.FusedConvNormAct.from_modules(nn.Conv2d(16, 16, 1), _random_bn(16, 5))]).eval()

    def f(x):
        y = mod[0](x, 1)
        return mod[1](y, residual=y)

    x = torch.randn(1, 8, 12, 12)
    with torch.no_grad():
        compiled = torch.compile(f, fullgraph=True)
        assert rel_err(compiled(x), f(x)) <= 1e-6


# ------------------------------------------------------------------------------------------
# compiled extensions
# ------------------------------------------------------------------------------------------

def test_cpu_extension_compiled():
    info = ak.extension_info()
    assert info["cpu"]["available"], info["cpu"]["reason"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("anydepth::_ext_conv_norm_act", "CPU")


def test_cuda_extension_compiled_when_toolchain_present():
    """Where torch has CUDA and nvcc exists (as on the dev machines and CI), the CUDA ops must have
    been compiled and registered; a .cu that does not build fails the install before this."""
    from torch.utils.cpp_extension import CUDA_HOME

    info = ak.extension_info()
    toolchain = torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc"))
    if not toolchain:
        assert not info["cuda"]["compiled"] and info["cuda"]["reason"]
        return
    assert info["cuda"]["compiled"], info["cuda"]["reason"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("anydepth::_ext_conv_norm_act", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("anydepth::_ext_scale_bias_act", "CUDA")
    assert info["cuda"]["arch_list"]


def test_auto_backend_choice_cpu():
    from anydepth_kernels.ops import select_backend

    assert select_backend("t", torch.randn(1), "auto") == "cpp"


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------

def _args():
    return torch.randn(1, 4, 8, 8), torch.randn(8, 4, 3, 3), torch.ones(8), torch.zeros(8)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_inputs(backend):
    x, w, s, b = _args()
    call = lambda **kw: ak.conv_norm_act(**{**dict(x=x, weight=w, scale=s, bias=b, padding=1, backend=backend), **kw})  # noqa: E731
    with pytest.raises(TypeError, match="dtype torch.int64"):
        call(x=x.long())
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has torch.float32"):
        call(weight=w.double())
    with pytest.raises(ValueError, match="x must be 4-D"):
        call(x=x[0])
    with pytest.raises(ValueError, match="x has 5 channels but weight expects 4"):
        call(x=torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="scale has 7 elements but the output has 8 channels"):
        call(scale=torch.ones(7))
    with pytest.raises(ValueError, match="residual has shape"):
        call(residual=torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="empty channel dimension"):
        call(x=torch.randn(1, 0, 8, 8), weight=torch.randn(8, 0, 3, 3))
    with pytest.raises(ValueError, match="too small"):
        call(x=torch.randn(1, 4, 1, 1), padding=0)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        call(act="gelu")
    with pytest.raises(ValueError, match="stride must be >= 1"):
        call(stride=0)
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        call(weight=w.to("meta"))
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        call(backend="fast")


def test_unavailable_backend_is_named():
    x, w, s, b = _args()
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: it runs on CUDA tensors"):
        ak.conv_norm_act(x, w, s, b, padding=1, backend="cuda")


@pytest.mark.triton_cpu
def test_empty_batch_and_non_contiguous():
    x, w, s, b = _args()
    out = ak.conv_norm_act(torch.randn(0, 4, 8, 8), w, s, b, padding=1)
    assert out.shape == (0, 8, 8, 8)
    xs = torch.randn(2, 8, 8, 8)[:, ::2]  # non-contiguous channel slice: handled, not an error
    assert not xs.is_contiguous()
    for backend in CPU_BACKENDS:
        out = ak.conv_norm_act(xs, w, s, b, padding=1, backend=backend)
        assert rel_err(out, reference.conv_norm_act(xs.contiguous(), w, s, b, 1, 1)) <= 1e-5
        res = torch.randn(2, 8, 16, 8)[:, :, ::2]
        out_in = torch.randn(2, 8, 8, 16)[..., ::2]  # non-contiguous y for the epilogue alone
        ref = reference.scale_bias_act(out_in, s, b, "silu", res.contiguous())
        assert rel_err(ak.scale_bias_act(out_in, s, b, "silu", res, backend=backend), ref) <= 1e-5


def test_module_bad_inputs():
    conv = nn.Conv2d(4, 8, 3)
    with pytest.raises(ValueError, match="running_var contains NaN"):
        bn = _random_bn(8, 0)
        bn.running_var[0] = float("nan")
        ak.FusedConvNormAct.from_modules(conv, bn)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        ak.FusedConvNormAct.from_modules(conv, nn.BatchNorm2d(8, track_running_stats=False))
    with pytest.raises(ValueError, match="has 6 features but the conv has 8"):
        ak.FusedConvNormAct.from_modules(conv, _random_bn(6, 0))
    with pytest.raises(ValueError, match="no fused kernel"):
        ak.FusedConvNormAct.from_modules(conv, _random_bn(8, 0), act=nn.GELU())
    fused = ak.FusedConvNormAct.from_modules(conv, _random_bn(8, 0))
    with pytest.raises(ValueError, match=r"epilogue must be an int in \[0, 0\], got 1"):
        fused(torch.randn(1, 4, 5, 5), epilogue=1)


# ------------------------------------------------------------------------------------------
# GPU (only where one is present: the device machine)
# ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_backends(backend, dtype):
    tol = 3e-3 if dtype == torch.float32 else 1e-2  # tf32 convolutions on the GPU
    for i, (n, cin, cout, h, w, k, stride, groups) in enumerate(SHAPES):
        for act, residual, cl in itertools.product(["silu", "relu", "identity"], [False, True], [False, True]):
            x, wt, scale, bias, pad, res = _case(i, n, cin, cout, h, w, k, stride, groups, dtype, residual, cl)
            x, wt, scale, bias = x.cuda(), wt.cuda(), scale.cuda(), bias.cuda()
            res = None if res is None else res.cuda()
            out = ak.conv_norm_act(x, wt, scale, bias, stride, pad, 1, groups, act, res, backend=backend)
            ref = _reference(x.cpu(), wt.cpu(), scale.cpu(), bias.cpu(), stride, pad, groups, act,
                             None if res is None else res.cpu())
            assert not out.isnan().any()
            assert rel_err(out.cpu(), ref) <= tol, (backend, dtype, i, act, residual, cl)
