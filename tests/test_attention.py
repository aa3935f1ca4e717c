"""Fused attention and YOLOv12 area attention: every backend available here against the explicit
reference.

On this CPU machine the reference, SDPA and the Triton kernels (in Triton's interpreter,
``TRITON_INTERPRET=1`` set by conftest.py) run; the Triton kernels are also compiled for
sm_80/sm_90 without a GPU, and the tests marked ``gpu`` run them on a CUDA device when there is
one. The oracle is the reference computed in float64.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import anydepth_kernels as ak
from anydepth_kernels import reference
from anydepth_kernels.ops import attention as attn_ops
from helpers import aot_compile, needs_cuda, rel_err

CPU_BACKENDS = ["reference", "sdpa", "triton"]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def make_qkv(b, h, n_q, n_k, d, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g)
    k = torch.randn(b, h, n_k, d, generator=g)
    v = torch.randn(b, h, n_k, d, generator=g)
    return [t.to(device, dtype) for t in (q, k, v)]


def ref_grads(q, k, v, grad, scale=None):
    """Forward and gradients of the reference in float64 on the CPU (the oracle)."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    out = reference.attention(*leaves, scale)
    out.backward(grad.detach().cpu().double())
    return out.detach(), [t.grad for t in leaves]


def run_backend(backend, q, k, v, grad, scale=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = ak.attention(*leaves, scale=scale, backend=backend)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def check_close(out, ref, tol, what, zero_scale=None):
    """Relative error <= tol. A reference that is exactly zero (dq and dk with a single key: the
    softmax is constant) has no scale of its own: the error is then measured against
    ``zero_scale``, the norm of all the gradients together."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: NaN or inf"
    if not ref.any():
        assert zero_scale is not None, f"{what}: the reference is zero"
        err = (out.double().cpu() - ref).norm().item() / zero_scale
    else:
        err = rel_err(out.cpu(), ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def check_grads(grads, ref_g, tol, what):
    total = torch.cat([g.flatten() for g in ref_g]).norm().item()
    for name, g, rg in zip("qkv", grads, ref_g):
        check_close(g, rg, tol, f"{what} d{name}", zero_scale=total)


# (B, H, Nq, Nk, D), a sample of the grid: head dims 16/32/64 (plus 128 and a non-power-of-two
# 24, padded to a tile), lengths below, at and past the 64/32 blocks and not multiples of them,
# Nq != Nk (cross-attention), a single key.
SHAPES = [
    (1, 2, 70, 70, 32),
    (2, 1, 5, 130, 16),
    (1, 3, 64, 33, 64),
    (2, 2, 17, 17, 16),
    (1, 1, 40, 1, 32),
    (1, 1, 9, 45, 24),
    (1, 1, 20, 36, 128),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Nq{}Nk{}D{}".format(*s))
def test_forward_and_grads_fp32(backend, shape):
    b, h, n_q, n_k, d = shape
    q, k, v = make_qkv(b, h, n_q, n_k, d, seed=sum(shape))
    grad = torch.randn(b, h, n_q, d, generator=torch.Generator().manual_seed(7))
    ref, ref_g = ref_grads(q, k, v, grad)
    out, grads = run_backend(backend, q, k, v, grad)
    assert out.dtype == torch.float32
    check_close(out, ref, 1e-5, f"{backend} forward")
    check_grads(grads, ref_g, 1e-5, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_explicit_scale_and_strided_inputs(backend):
    """A non-default scale; q/k/v as transposed views of [B, N, H, D] (no copies needed)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 2, 50, 3, 32, generator=g)  # [qkv, B, N, H, D]
    q, k, v = (base[i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    grad = torch.randn(2, 3, 50, 32, generator=g)
    ref, ref_g = ref_grads(q, k, v, grad, scale=0.3)
    out, grads = run_backend(backend, q, k, v, grad, scale=0.3)
    check_close(out, ref, 1e-5, f"{backend} forward")
    for name, gr, rg in zip("qkv", grads, ref_g):
        check_close(gr, rg, 1e-5, f"{backend} d{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    q, k, v = make_qkv(1, 2, 45, 45, 32, seed=11, dtype=dtype)
    grad = torch.randn(1, 2, 45, 32, generator=torch.Generator().manual_seed(5)).to(dtype)
    ref, ref_g = ref_grads(q, k, v, grad)
    out, grads = run_backend(backend, q, k, v, grad)
    assert out.dtype == dtype and all(t.dtype == dtype for t in grads)
    check_close(out, ref, TOL[dtype], f"{backend} {dtype} forward")
    for name, gr, rg in zip("qkv", grads, ref_g):
        check_close(gr, rg, TOL[dtype], f"{backend} {dtype} d{name}")


@pytest.mark.triton_cpu
def test_saved_log_sum_exp():
    """triton, and sdpa on the CPU (the library's flash kernel), save the natural-log lse."""
    q, k, v = make_qkv(2, 2, 37, 50, 16, seed=2)
    scores = q.double() @ k.double().transpose(-1, -2) / 4.0
    for backend in ("triton", "sdpa"):
        out, lse = torch.ops.anydepth.attention(q, k, v, None, backend, "ieee")
        assert lse.shape == (2, 2, 37) and lse.dtype == torch.float32
        check_close(lse, torch.logsumexp(scores, -1), 1e-6, f"{backend} lse")
        check_close(out, reference.attention(q.double(), k.double(), v.double()), 1e-5, "out")
    # The reference needs no lse (its backward is autograd's): an empty tensor in its place.
    _, none = torch.ops.anydepth.attention(q, k, v, None, "reference", "ieee")
    assert none.numel() == 0


def test_sdpa_without_the_cpu_flash_kernel(monkeypatch):
    """Where the library's CPU flash ops are missing (or on CUDA without Triton), "sdpa" runs
    F.scaled_dot_product_attention and its backward recomputes it under autograd."""
    monkeypatch.setattr(attn_ops, "_CPU_FLASH", None)
    q, k, v = make_qkv(1, 2, 30, 41, 32, seed=6)
    grad = torch.randn(1, 2, 30, 32, generator=torch.Generator().manual_seed(1))
    ref, ref_g = ref_grads(q, k, v, grad)
    out, grads = run_backend("sdpa", q, k, v, grad)
    assert torch.ops.anydepth.attention(q, k, v, None, "sdpa", "ieee")[1].numel() == 0
    check_close(out, ref, 1e-5, "sdpa forward")
    check_grads(grads, ref_g, 1e-5, "sdpa")
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(1, 192, 4, 6, generator=g)
    grad_out, grad_v = torch.randn(2, 1, 64, 4, 6, generator=g)
    ref_out, ref_v, ref_dqkv = area_ref(qkv, 2, 2, grad_out, grad_v)
    x = qkv.clone().requires_grad_()
    out, v_map = ak.area_attention(x, 2, 2, backend="sdpa")
    torch.autograd.backward((out, v_map), (grad_out, grad_v))
    check_close(out, ref_out, 1e-5, "area out")
    assert torch.equal(v_map, ref_v.float())
    check_close(x.grad, ref_dqkv, 1e-5, "area d(qkv)")


# --------------------------------------------------------------------------------------------
# Area attention
# --------------------------------------------------------------------------------------------

def area_ref(qkv, heads, area, grad_out, grad_v):
    x = qkv.detach().double().requires_grad_()
    out, v_map = reference.area_attention(x, heads, area)
    torch.autograd.backward((out, v_map), (grad_out.double(), grad_v.double()))
    return out.detach(), v_map.detach(), x.grad


# (B, C, H, W, heads, area): YOLOv12's area=4 (head dim 32, as in the model) and area=1 (P5),
# runs that are not block multiples, one head, head dim 16 and 64.
AREA_CASES = [
    (1, 64, 8, 10, 2, 4),
    (2, 64, 5, 7, 2, 1),
    (1, 32, 6, 6, 1, 1),
    (1, 48, 4, 9, 3, 3),
    (1, 128, 6, 4, 2, 2),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", AREA_CASES, ids=lambda c: "B{}C{}{}x{}h{}a{}".format(*c))
def test_area_attention(backend, case):
    b, c, h, w, heads, area = case
    g = torch.Generator().manual_seed(sum(case))
    qkv = torch.randn(b, 3 * c, h, w, generator=g)
    grad_out, grad_v = torch.randn(2, b, c, h, w, generator=g)
    ref_out, ref_v, ref_dqkv = area_ref(qkv, heads, area, grad_out, grad_v)
    x = qkv.clone().requires_grad_()
    out, v_map = ak.area_attention(x, heads, area, backend=backend)
    torch.autograd.backward((out, v_map), (grad_out, grad_v))
    assert out.is_contiguous() and v_map.is_contiguous()
    check_close(out, ref_out, 1e-5, f"{backend} out")
    assert torch.equal(v_map, ref_v.float()), f"{backend}: v_map is not the value map"
    check_close(x.grad, ref_dqkv, 1e-5, f"{backend} d(qkv)")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_area_attention_channels_last(backend):
    """Channels-last qkv in, channels-last outputs (the kernels address either layout)."""
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(1, 96, 4, 8, generator=g).contiguous(memory_format=torch.channels_last)
    grad_out, grad_v = torch.randn(2, 1, 32, 4, 8, generator=g)
    ref_out, ref_v, ref_dqkv = area_ref(qkv, 1, 4, grad_out, grad_v)
    x = qkv.clone().requires_grad_()
    out, v_map = ak.area_attention(x, 1, 4, backend=backend)
    torch.autograd.backward((out, v_map), (grad_out, grad_v))
    for t in (out, v_map):
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    check_close(out, ref_out, 1e-5, f"{backend} out")
    assert torch.equal(v_map, ref_v.float())
    check_close(x.grad, ref_dqkv, 1e-5, f"{backend} d(qkv)")


@pytest.mark.triton_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_area_attention_triton_half(dtype):
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(1, 192, 4, 8, generator=g)
    grad_out, grad_v = torch.randn(2, 1, 64, 4, 8, generator=g)
    ref_out, ref_v, ref_dqkv = area_ref(qkv.to(dtype), 2, 2, grad_out.to(dtype), grad_v.to(dtype))
    x = qkv.to(dtype).requires_grad_()
    out, v_map = ak.area_attention(x, 2, 2, backend="triton")
    torch.autograd.backward((out, v_map), (grad_out.to(dtype), grad_v.to(dtype)))
    assert out.dtype == dtype and x.grad.dtype == dtype
    check_close(out, ref_out, TOL[dtype], "out")
    assert torch.equal(v_map, ref_v.to(dtype))
    check_close(x.grad, ref_dqkv, TOL[dtype], "d(qkv)")


@pytest.mark.triton_cpu
def test_area_attention_matches_yolov12_aattn_layout():
    """The op on AAttn's qkv equals AAttn's own SDPA computation (head-interleaved channels)."""
    b, heads, hd, h, w, area = 1, 2, 32, 4, 8, 4
    c = heads * hd
    qkv = torch.randn(b, 3 * c, h, w, generator=torch.Generator().manual_seed(1))
    t = qkv.flatten(2).transpose(1, 2).reshape(b * area, h * w // area, heads, 3 * hd)
    q, k, v = t.transpose(1, 2).split(hd, dim=-1)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    o = o.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
    vm = v.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
    for backend in CPU_BACKENDS:
        out, v_map = ak.area_attention(qkv, heads, area, backend=backend)
        check_close(out, o, 1e-5, backend)
        assert torch.equal(v_map, vm)


# --------------------------------------------------------------------------------------------
# torch.compile, opcheck, selection, errors
# --------------------------------------------------------------------------------------------

def test_torch_compile_cpu_sdpa():
    q, k, v = make_qkv(1, 2, 30, 30, 32, seed=8)
    grad = torch.randn(1, 2, 30, 32)
    ref, ref_g = ref_grads(q, k, v, grad)
    qkv = torch.randn(1, 96, 4, 6)
    area_out, area_v = reference.area_attention(qkv.double(), 1, 2)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(a, b, c, m):
        o, vm = ak.area_attention(m, 1, 2, backend="sdpa")
        return ak.attention(a, b, c, backend="sdpa") * 2.0, o + 1.0, vm

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, o, vm = fn(*leaves, qkv)
    (out * 0.5).backward(grad)
    check_close(out.detach() / 2.0, ref, 1e-5, "compiled forward")
    for t, rg in zip(leaves, ref_g):
        check_close(t.grad, rg, 1e-5, "compiled grad")
    check_close(o - 1.0, area_out, 1e-5, "compiled area attention")
    assert torch.equal(vm, area_v.float())


def test_torch_compile_inductor_forward():
    q, k, v = make_qkv(1, 2, 30, 30, 16, seed=9)
    fn = torch.compile(lambda a, b, c: ak.attention(a, b, c).relu(), fullgraph=True)
    with torch.no_grad():
        out = fn(q, k, v)
    check_close(out, reference.attention(q.double(), k.double(), v.double()).relu(), 1e-5,
                "inductor")


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_opcheck(backend):
    """torch.library.opcheck: schema, autograd registration, fake kernel, AOT dispatch."""
    q, k, v = make_qkv(1, 2, 20, 24, 16, seed=1)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, backend, "ieee")
    result = torch.library.opcheck(torch.ops.anydepth.attention.default, args)
    assert set(result.values()) == {"SUCCESS"}, result
    qkv = torch.randn(1, 96, 4, 4).requires_grad_()
    result = torch.library.opcheck(torch.ops.anydepth.area_attention.default,
                                   (qkv, 2, 2, 0.25, backend, "ieee"))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.triton_cpu
def test_backend_selection(monkeypatch):
    q, k, v = make_qkv(1, 1, 8, 8, 32, seed=0)
    # CPU: "auto" is SDPA (the library's fast path), even with the interpreter on.
    assert attn_ops.resolve_backend("t", q, 32, "auto") == "sdpa"
    assert torch.equal(ak.attention(q, k, v), ak.attention(q, k, v, backend="sdpa"))
    # Head dims past the Triton tiles: triton says which ones it supports; auto still runs.
    big = make_qkv(1, 1, 4, 4, 160, seed=0)
    with pytest.raises(RuntimeError, match=r"backend 'triton' is not available: head dim 160 .*"
                                           r"support head dims 1 to 128"):
        ak.attention(*big, backend="triton")
    check_close(ak.attention(*big), reference.attention(*(t.double() for t in big)), 1e-5, "D=160")
    with pytest.raises(RuntimeError, match="head dim 160"):
        ak.area_attention(torch.randn(1, 480, 2, 2), 1, 1, backend="triton")
    with pytest.raises(RuntimeError, match="not available: it supports float32, float16 and "
                                           "bfloat16, not torch.float64"):
        ak.attention(q.double(), k.double(), v.double(), backend="triton")
    check_close(ak.attention(q.double(), k.double(), v.double()),
                reference.attention(q.double(), k.double(), v.double()), 1e-12, "fp64 auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton runs on CUDA tensors"):
        ak.attention(q, k, v, backend="triton")
    with pytest.raises(RuntimeError, match="Triton runs on CUDA tensors"):
        ak.area_attention(torch.randn(1, 96, 2, 2), 1, 1, backend="triton")


def _bad_attention_cases():
    q, k, v = make_qkv(1, 2, 6, 5, 8, seed=0)
    return {
        "not a tensor": ((q.tolist(), k, v), {}, TypeError, "q must be a torch.Tensor"),
        "rank": ((q[0], k, v), {}, ValueError, r"q must be 4-D, got shape \(2, 6, 8\)"),
        "int dtype": ((q.long(), k, v), {}, TypeError, "q has dtype torch.int64"),
        "dtype mismatch": ((q, k.half(), v), {}, TypeError, "k has dtype torch.float16 but q has"),
        "device mismatch": ((q, k.to("meta"), v), {}, ValueError, "k is on meta but q is on cpu"),
        "head dim": ((q, k[..., :4], v), {}, ValueError, "k must be"),
        "batch": ((q, k.expand(2, 2, 5, 8), v), {}, ValueError, "k must be"),
        "v length": ((q, k, v[:, :, :3]), {}, ValueError, "v must have k's shape"),
        "empty": ((q[:, :, :0], k, v), {}, ValueError, "q is empty"),
        "backend": ((q, k, v), {"backend": "flash"}, ValueError, "unknown backend 'flash'"),
        "scale": ((q, k, v), {"scale": float("nan")}, ValueError, "scale must be finite"),
        "scale type": ((q, k, v), {"scale": "1"}, TypeError, "scale must be a float"),
        "precision": ((q, k, v), {"input_precision": "fp8"}, ValueError, "input_precision"),
    }


@pytest.mark.parametrize("case", list(_bad_attention_cases()))
def test_bad_inputs(case):
    args, kwargs, exc, match = _bad_attention_cases()[case]
    with pytest.raises(exc, match=match):
        ak.attention(*args, **kwargs)


@pytest.mark.parametrize("args,exc,match", [
    ((torch.randn(1, 96, 4), 1, 1), ValueError, "qkv must be 4-D"),
    ((torch.randn(1, 95, 4, 4), 1, 1), ValueError, "not a multiple of 3 \\* num_heads"),
    ((torch.randn(1, 96, 4, 4), 5, 1), ValueError, "not a multiple of 3 \\* num_heads = 15"),
    ((torch.randn(1, 96, 3, 5), 1, 4), ValueError, r"3x5 = 15 positions do not split into 4"),
    ((torch.randn(1, 96, 4, 4), 0, 1), ValueError, "num_heads must be a positive int"),
    ((torch.randn(1, 96, 4, 4), 1, 0), ValueError, "area must be a positive int"),
    ((torch.randn(1, 96, 4, 4), 1, 1.5), ValueError, "area must be a positive int"),
    ((torch.randn(1, 96, 0, 4), 1, 1), ValueError, "qkv is empty"),
    ((torch.randn(1, 96, 4, 4).int(), 1, 1), TypeError, "qkv has dtype torch.int32"),
])
def test_area_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        ak.area_attention(*args)


def test_bad_inputs_reach_the_op_directly():
    q, k, v = make_qkv(1, 2, 6, 5, 8, seed=0)
    with pytest.raises(ValueError, match="v must have k's shape"):
        torch.ops.anydepth.attention(q, k, v[:, :1], None, "sdpa", "ieee")
    with pytest.raises(ValueError, match="do not split into 4"):
        torch.ops.anydepth.area_attention(torch.randn(1, 96, 3, 3), 1, 4, None, "triton", "ieee")


def test_benchmark_report(tmp_path):
    """The microbenchmark runs (tiny cases, one timed call each) and its report saves."""
    from anydepth_kernels.benchmark import save_report
    from anydepth_kernels.benchmark_attention import AttnCase, run_attention_benchmarks

    cases = [AttnCase("area", "area", 1, 2, 16, map_hw=(4, 4), area=2),
             AttnCase("plain", "attention", 1, 2, 16, n=20)]
    report = run_attention_benchmarks("cpu", cases=cases, rounds=1, reps=1, warmup=0,
                                      progress=False)
    rows = {(r.case, r.backend): r for r in report.results}
    for case in ("area fwd", "area fwd+bwd", "plain fwd", "plain fwd+bwd"):
        for backend in ("reference (eager)", "reference", "sdpa"):
            r = rows[(case, backend)]
            assert r.median_ms > 0 and r.max_rel_err <= 1e-5, (case, backend, r)
    assert "triton" in report.skipped and "sdpa" in report.table()
    path = save_report(report, str(tmp_path), "attention")
    assert json.loads(Path(path).read_text())["results"]


# --------------------------------------------------------------------------------------------
# GPU: compiled here, run where there is a GPU
# --------------------------------------------------------------------------------------------

def test_triton_aot_compile(tmp_path, aot_triton):
    """Compile forward, backward and preprocess kernels for sm_80 and sm_90 (PTX and cubin), with the
    venv's Triton and with Triton 3.6 (sm_90 only)."""
    for arch, names in aot_compile(tmp_path, ['attention'], triton=aot_triton).items():
        for kernel in ("fwd", "bwd_dkdv", "bwd_dq", "bwd_preprocess"):
            for block_d in (16, 32, 64, 128):
                assert f"attention_{kernel}[fp32,ieee,block_d={block_d},write_v=0]" in names
            for dt in ("fp16", "bf16"):
                assert f"attention_{kernel}[{dt},ieee,block_d=32,write_v=1]" in names
        assert any(x.startswith("attention_fwd[fp32,tf32,") for x in names)


GPU_CASES = [(4, 4, 100, 100, 32), (1, 8, 400, 400, 32), (2, 3, 77, 130, 64), (1, 2, 50, 50, 16)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_CASES, ids=lambda s: "B{}H{}Nq{}Nk{}D{}".format(*s))
def test_gpu_backends(backend, dtype, shape):
    b, h, n_q, n_k, d = shape
    q, k, v = make_qkv(b, h, n_q, n_k, d, seed=0, dtype=dtype, device="cuda")
    grad = torch.randn(b, h, n_q, d, device="cuda", dtype=dtype)
    ref, ref_g = ref_grads(q, k, v, grad)
    tol = TOL[dtype]
    out, grads = run_backend(backend, q, k, v, grad)
    check_close(out, ref, tol, f"{backend} forward")
    for name, g, rg in zip("qkv", grads, ref_g):
        check_close(g, rg, tol, f"{backend} d{name}")


@pytest.mark.gpu
@needs_cuda
def test_gpu_auto_tf32_and_area():
    q, k, v = make_qkv(1, 8, 400, 400, 32, seed=1, device="cuda")
    assert attn_ops.resolve_backend("t", q, 32, "auto") == "triton"
    ref = reference.attention(q.double(), k.double(), v.double())
    out = ak.attention(q, k, v, input_precision="tf32", backend="triton")
    check_close(out, ref, 3e-3, "tf32")
    qkv = torch.randn(2, 192, 20, 20, device="cuda").requires_grad_()
    grad_out, grad_v = torch.randn(2, 2, 64, 20, 20, device="cuda")
    ref_out, ref_v, ref_dqkv = area_ref(qkv.cpu(), 2, 4, grad_out.cpu(), grad_v.cpu())
    out, v_map = ak.area_attention(qkv, 2, 4)
    torch.autograd.backward((out, v_map), (grad_out, grad_v))
    check_close(out, ref_out, 1e-5, "area out")
    assert torch.equal(v_map.cpu(), ref_v.float())
    check_close(qkv.grad, ref_dqkv, 1e-5, "area d(qkv)")
