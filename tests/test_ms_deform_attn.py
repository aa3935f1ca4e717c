"""ms_deform_attn: every backend available here against the grid_sample reference.

On this CPU machine: the reference, the C++ kernels and the Triton kernels (in Triton's
interpreter, ``TRITON_INTERPRET=1`` set by conftest.py) run; the CUDA kernels are checked to be
compiled and registered, the Triton kernels are compiled for sm_80/sm_90, and the tests marked
``gpu`` run every backend on a CUDA device when there is one.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import anydepth_kernels as ak
from anydepth_kernels import _ext, reference
from anydepth_kernels.ops import ms_deform_attn as msda_ops
from helpers import aot_compile, needs_cuda, rel_err

REPO = Path(__file__).resolve().parents[1]
CPU_BACKENDS = ["reference", "cpp", "triton"]


def _unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of rounding a real number to nearest in dtype."""
    return torch.finfo(dtype).eps / 2


# Normwise relative error allowed against the float64 oracle of ref_grads, which is evaluated at
# the very same (already rounded) inputs, so rounding the inputs is not part of the error.
# float16/bfloat16: every backend loads the 16-bit inputs exactly into float32, computes in
# float32 and rounds each result once to the 16-bit type (the CUDA, Triton and C++ kernels, and
# the reference backend, which upcasts). Rounding to nearest is off by at most u per element,
# hence at most u normwise; the float32 arithmetic adds about (4 L P + D) * 2^-24 relative (a few
# 1e-6 for these shapes, amplified somewhat where the corner dot products of the location
# gradients cancel), well under u (4.9e-4 for float16, 3.9e-3 for bfloat16). So 2u: measured
# errors are 0.4-0.5 u for every backend and output. (The reference computed *in* half
# precision is far off that: grid_sample rounds the grid 2 * loc - 1 to 8 or 11 bits, moving
# the samples, and accumulates the grid gradient over the D channels in half precision; its
# location gradients were 77-200 u off, 9.7e-2 for float16 on the first GPU run, which is why
# the reference backend computes float16/bfloat16 in float32.)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12,
       torch.float16: 2 * _unit_roundoff(torch.float16),
       torch.bfloat16: 2 * _unit_roundoff(torch.bfloat16)}


def level_tables(shapes):
    ss = torch.tensor(shapes, dtype=torch.int64)
    hw = ss.prod(1)
    starts = torch.cat([hw.new_zeros(1), hw.cumsum(0)[:-1]])
    return ss, starts, int(hw.sum())


def make_inputs(n, q, m, shapes, p, d, seed, dtype=torch.float32, device="cpu"):
    """Random inputs; locations in [-0.25, 1.25] with a share of them exactly on the borders."""
    g = torch.Generator().manual_seed(seed)
    ss, starts, s = level_tables(shapes)
    levels = len(shapes)
    value = torch.randn(n, s, m, d, generator=g)
    loc = torch.rand(n, q, m, levels, p, 2, generator=g) * 1.5 - 0.25
    # Exactly on the map borders (0 and 1) for some coordinates.
    border = torch.rand(loc.shape, generator=g)
    loc = torch.where(border < 0.08, torch.zeros_like(loc), loc)
    loc = torch.where(border > 0.92, torch.ones_like(loc), loc)
    attn = torch.rand(n, q, m, levels, p, generator=g)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return (value.to(device, dtype), ss.to(device), starts.to(device), loc.to(device, dtype),
            attn.to(device, dtype))


def ref_grads(value, ss, starts, loc, attn, grad):
    """Forward and gradients of the reference, in float64 on the CPU (the oracle)."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (value, loc, attn)]
    out = reference.ms_deform_attn(leaves[0], ss.cpu(), starts.cpu(), leaves[1], leaves[2])
    out.backward(grad.cpu().double())
    return out.detach(), [t.grad for t in leaves]


def run_backend(backend, value, ss, starts, loc, attn, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = ak.ms_deform_attn(leaves[0], ss, starts, leaves[1], leaves[2], backend=backend)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def check_close(out, ref, tol, what):
    assert out.shape == ref.shape, what
    assert torch.isfinite(out).all(), f"{what}: NaN or inf"
    err = rel_err(out.cpu(), ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


# (N, Q, M, level shapes, P, D): non-power-of-two D, 1xK and Kx1 maps, a 1x1 map, one level.
SHAPES = [
    (1, 7, 2, [(5, 6), (3, 3)], 2, 8),
    (2, 5, 3, [(1, 7), (4, 1), (2, 2)], 3, 5),
    (1, 9, 1, [(8, 8)], 4, 32),
    (3, 4, 2, [(3, 5), (1, 1), (2, 6), (7, 2)], 1, 33),
    (1, 1, 4, [(1, 1)], 1, 1),
    (2, 6, 8, [(10, 10), (5, 5), (3, 3)], 4, 16),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}Q{s[1]}M{s[2]}L{len(s[3])}P{s[4]}D{s[5]}")
def test_forward_and_grads_fp32(backend, shape):
    n, q, m, shapes, p, d = shape
    value, ss, starts, loc, attn = make_inputs(n, q, m, shapes, p, d, seed=len(shapes) * 100 + d)
    grad = torch.randn(n, q, m * d, generator=torch.Generator().manual_seed(d))
    ref, ref_g = ref_grads(value, ss, starts, loc, attn, grad)
    out, grads = run_backend(backend, value, ss, starts, loc, attn, grad)
    assert out.dtype == torch.float32
    check_close(out, ref, 1e-5, f"{backend} forward")
    for name, g, rg in zip(("value", "sampling_locations", "attention_weights"), grads, ref_g):
        check_close(g, rg, 1e-5, f"{backend} grad {name}")


def test_rtdetr_decoder_shape_cpp():
    """The benchmark shape (RT-DETR decoder at 640), smaller Q: C++ forward and backward."""
    value, ss, starts, loc, attn = make_inputs(1, 40, 8, [(80, 80), (40, 40), (20, 20)], 4, 32, 7)
    grad = torch.randn(1, 40, 256)
    ref, ref_g = ref_grads(value, ss, starts, loc, attn, grad)
    out, grads = run_backend("cpp", value, ss, starts, loc, attn, grad)
    check_close(out, ref, 1e-5, "forward")
    for g, rg in zip(grads, ref_g):
        check_close(g, rg, 1e-5, "grad")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n, m", [(1, 1), (2, 3)])
def test_cpp_backward_any_thread_count(threads, n, m):
    """Both grad_value strategies: one task per (batch, head) slice, and split query ranges with
    private buffers (fewer slices than threads); the result must not depend on the count."""
    value, ss, starts, loc, attn = make_inputs(n, 23, m, [(6, 7), (3, 4)], 3, 12, seed=threads)
    grad = torch.randn(n, 23, m * 12)
    ref, ref_g = ref_grads(value, ss, starts, loc, attn, grad)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, grads = run_backend("cpp", value, ss, starts, loc, attn, grad)
    finally:
        torch.set_num_threads(old)
    check_close(out, ref, 1e-5, "forward")
    for g, rg in zip(grads, ref_g):
        check_close(g, rg, 1e-5, "grad")


def test_cpp_gradcheck_fp64():
    value, ss, starts, loc, attn = make_inputs(1, 3, 2, [(3, 4), (2, 1)], 2, 3, seed=5,
                                               dtype=torch.float64)
    # Strictly inside and outside regions, away from the pixel-centre kinks of bilinear sampling.
    loc = loc.clamp(-0.2, 1.2)

    def fn(v, sl, aw):
        return ak.ms_deform_attn(v, ss, starts, sl, aw, backend="cpp")

    inputs = tuple(t.clone().requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_fp64_forward_matches_reference_cpp():
    value, ss, starts, loc, attn = make_inputs(2, 6, 2, [(4, 5), (2, 3)], 3, 7, seed=11,
                                               dtype=torch.float64)
    out = ak.ms_deform_attn(value, ss, starts, loc, attn, backend="cpp")
    assert out.dtype == torch.float64
    check_close(out, reference.ms_deform_attn(value, ss, starts, loc, attn), 1e-12, "fp64")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cpu(backend, dtype):
    value, ss, starts, loc, attn = make_inputs(1, 8, 2, [(6, 5), (3, 2)], 2, 16, seed=3, dtype=dtype)
    grad = torch.randn(1, 8, 32).to(dtype)
    ref, ref_g = ref_grads(value, ss, starts, loc, attn, grad)
    out, grads = run_backend(backend, value, ss, starts, loc, attn, grad)
    assert out.dtype == dtype
    check_close(out, ref, TOL[dtype], f"{backend} {dtype} forward")
    for g, rg in zip(grads, ref_g):
        assert g.dtype == dtype
        check_close(g, rg, TOL[dtype], f"{backend} {dtype} grad")


def _special_locations():
    """x (or y) values: borders, pixel centres, just outside the (-1, W) window, far away."""
    w = 4
    return torch.tensor([0.0, 1.0, 0.5 / w, 1.5 / w, 1.0 - 0.5 / w, -0.5 / w, 1.0 + 0.5 / w,
                         -0.49 / w, 1.0 + 0.49 / w, 2.0, -1.0, 1e6, -1e6, 0.37])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_borders_and_far_points(backend):
    vals = _special_locations()
    k = len(vals)
    xs, ys = torch.meshgrid(vals, vals, indexing="ij")
    # One query per (x, y) pair, one head, one 3x4 level (W = 4 as in _special_locations).
    loc = torch.stack([xs.flatten(), ys.flatten()], -1).view(1, k * k, 1, 1, 1, 2)
    ss, starts, s = level_tables([(3, 4)])
    value = torch.randn(1, s, 1, 5, generator=torch.Generator().manual_seed(0))
    attn = torch.rand(1, k * k, 1, 1, 1, generator=torch.Generator().manual_seed(1)) + 0.5
    grad = torch.randn(1, k * k, 5)
    ref, ref_g = ref_grads(value, ss, starts, loc, attn, grad)
    out, grads = run_backend(backend, value, ss, starts, loc, attn, grad)
    check_close(out, ref, 1e-5, "forward")
    # Points sampling nothing give exact zeros (never garbage).
    assert torch.equal(out[ref == 0], torch.zeros_like(out[ref == 0]))
    for g, rg in zip(grads, ref_g):
        check_close(g, rg, 1e-5, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_policy(backend):
    """Same NaN/inf propagation as the reference (see the module docstring of the op)."""
    value, ss, starts, loc, attn = make_inputs(1, 6, 2, [(4, 4), (2, 3)], 2, 8, seed=9)
    loc = loc.clamp(0.05, 0.95)  # every point inside, so the policy alone makes the difference
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    loc[0, 1, 1, 1, 1, 1] = float("inf")
    attn[0, 2, 0, 1, 0] = float("inf")
    attn[0, 3, 1, 0, 1] = float("nan")
    loc[0, 4, 0, 0, 0] = torch.tensor([3.0, 3.0])  # outside the map ...
    attn[0, 4, 0, 0, 0] = float("inf")  # ... with an infinite weight: inf * 0 = NaN
    value[0, 20, 1, 3] = float("nan")  # one channel of one pixel of level 1, head 1
    ref = reference.ms_deform_attn(value, ss, starts, loc, attn)
    out = ak.ms_deform_attn(value, ss, starts, loc, attn, backend=backend)
    nan_ref = torch.isnan(ref)
    assert nan_ref.any() and not nan_ref.all()
    assert torch.equal(torch.isnan(out), nan_ref)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert rel_err(out[fin], ref[fin]) <= 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    value, ss, starts, loc, attn = make_inputs(2, 5, 3, [(4, 3), (2, 2)], 2, 6, seed=21)
    # The same values behind transposed / sliced storage.
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_nc = torch.cat([loc, loc], dim=-1)[..., :2]
    attn_nc = attn.permute(4, 3, 2, 1, 0).contiguous().permute(4, 3, 2, 1, 0)
    ss_nc = torch.stack([ss[:, 0], ss[:, 1]], dim=0).t()
    starts_i32 = starts.to(torch.int32)
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or attn_nc.is_contiguous()
                or ss_nc.is_contiguous())
    grad = torch.randn(2, 10, 18)[:, ::2]
    ref, ref_g = ref_grads(value, ss, starts, loc, attn, grad)
    out, grads = run_backend(backend, value_nc, ss_nc, starts_i32, loc_nc, attn_nc, grad)
    check_close(out, ref, 1e-5, "forward")
    for g, rg in zip(grads, ref_g):
        check_close(g, rg, 1e-5, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n, q, p", [(2, 0, 2), (0, 3, 2), (2, 3, 0)])
def test_empty(backend, n, q, p):
    value, ss, starts, loc, attn = make_inputs(max(n, 1), max(q, 1), 2, [(3, 3)], max(p, 1), 4, 0)
    value = value[:n]
    loc, attn = loc[:n, :q, :, :, :p], attn[:n, :q, :, :, :p]
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ak.ms_deform_attn(leaves[0], ss, starts, leaves[1], leaves[2], backend=backend)
    assert out.shape == (n, q, 8)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in leaves:
        assert t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t))


def test_torch_compile_cpu():
    value, ss, starts, loc, attn = make_inputs(1, 6, 2, [(5, 4), (2, 2)], 2, 8, seed=4)
    grad = torch.randn(1, 6, 16)
    ref, ref_g = ref_grads(value, ss, starts, loc, attn, grad)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(v, sl, aw):
        return ak.ms_deform_attn(v, ss, starts, sl, aw) * 2.0

    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(*leaves)
    (out * 0.5).backward(grad)
    check_close(out.detach() / 2.0, ref, 1e-5, "compiled forward")
    for t, rg in zip(leaves, ref_g):
        check_close(t.grad, rg, 1e-5, "compiled grad")


def test_torch_compile_inductor_forward():
    value, ss, starts, loc, attn = make_inputs(1, 6, 2, [(5, 4), (2, 2)], 2, 8, seed=4)
    fn = torch.compile(lambda v, sl, aw: ak.ms_deform_attn(v, ss, starts, sl, aw).relu(),
                       fullgraph=True)
    with torch.no_grad():
        out = fn(value, loc, attn)
    check_close(out, reference.ms_deform_attn(value, ss, starts, loc, attn).relu(), 1e-5, "inductor")


def test_backend_selection_and_fallback(monkeypatch):
    value, ss, starts, loc, attn = make_inputs(1, 3, 2, [(3, 3)], 2, 4, seed=0)
    assert msda_ops._resolve(value, "auto") == "cpp"
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: it runs on CUDA"):
        ak.ms_deform_attn(value, ss, starts, loc, attn, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ak.ms_deform_attn(value, ss, starts, loc, attn, backend="fast")
    # Without the C++ extension: auto runs the reference and warns once; "cpp" raises.
    monkeypatch.setattr(_ext, "CPU_AVAILABLE", False)
    monkeypatch.setattr(_ext, "_CPU_ERROR", "not compiled (test)")
    monkeypatch.setattr(_ext, "_warned", set())
    with pytest.warns(RuntimeWarning, match="ms_deform_attn on cpu runs the eager reference"):
        out = ak.ms_deform_attn(value, ss, starts, loc, attn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ak.ms_deform_attn(value, ss, starts, loc, attn)  # no second warning
    assert torch.equal(out, reference.ms_deform_attn(value, ss, starts, loc, attn))
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available: not compiled"):
        ak.ms_deform_attn(value, ss, starts, loc, attn, backend="cpp")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        ak.ms_deform_attn(value, ss, starts, loc, attn, backend="triton")


def test_triton_rejects_fp64():
    value, ss, starts, loc, attn = make_inputs(1, 3, 2, [(3, 3)], 2, 4, 0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="not float64"):
        ak.ms_deform_attn(value, ss, starts, loc, attn, backend="triton")


def _bad(**override):
    value, ss, starts, loc, attn = make_inputs(2, 3, 2, [(3, 4), (2, 2)], 2, 4, 0)
    args = dict(value=value, spatial_shapes=ss, level_start_index=starts, sampling_locations=loc,
                attention_weights=attn)
    args.update(override)
    return args


BAD_INPUTS = [
    ("value int", lambda: _bad(value=torch.zeros(2, 16, 2, 4, dtype=torch.int32)), TypeError,
     "value has dtype torch.int32"),
    ("value 3-D", lambda: _bad(value=torch.zeros(2, 16, 8)), ValueError, r"value must be \[N, S, M, D\]"),
    ("loc dtype", lambda: _bad(sampling_locations=torch.rand(2, 3, 2, 2, 2, 2, dtype=torch.float64)),
     TypeError, "sampling_locations has dtype torch.float64"),
    ("attn dtype", lambda: _bad(attention_weights=torch.rand(2, 3, 2, 2, 2).half()), TypeError,
     "attention_weights has dtype"),
    ("loc device", lambda: _bad(sampling_locations=torch.rand(2, 3, 2, 2, 2, 2, device="meta")),
     ValueError, "sampling_locations is on meta"),
    ("loc shape", lambda: _bad(sampling_locations=torch.rand(2, 3, 2, 2, 2, 3)), ValueError,
     "sampling_locations must be"),
    ("loc heads", lambda: _bad(sampling_locations=torch.rand(2, 3, 3, 2, 2, 2)), ValueError,
     "sampling_locations must be"),
    ("attn shape", lambda: _bad(attention_weights=torch.rand(2, 3, 2, 2, 3)), ValueError,
     "attention_weights must be"),
    ("shapes float", lambda: _bad(spatial_shapes=torch.tensor([[3.0, 4.0], [2.0, 2.0]])),
     ValueError, "spatial_shapes must be an integer"),
    ("shapes 1-D", lambda: _bad(spatial_shapes=torch.tensor([3, 4])), ValueError,
     "spatial_shapes must be an integer"),
    ("no levels", lambda: _bad(spatial_shapes=torch.zeros(0, 2, dtype=torch.int64)), ValueError,
     "at least one level"),
    ("S mismatch", lambda: _bad(spatial_shapes=torch.tensor([[3, 4], [2, 3]])), ValueError,
     "value has S=16 positions but spatial_shapes"),
    ("empty level", lambda: _bad(spatial_shapes=torch.tensor([[4, 4], [0, 5]])), ValueError,
     "level 1 has an empty feature map 0x5"),
    ("start index", lambda: _bad(level_start_index=torch.tensor([0, 11])), ValueError,
     r"level_start_index \[0, 11\] does not match spatial_shapes \(expected \[0, 12\]\)"),
    ("start length", lambda: _bad(level_start_index=torch.tensor([0])), ValueError,
     "level_start_index must be an integer"),
    ("start float", lambda: _bad(level_start_index=torch.tensor([0.0, 12.0])), ValueError,
     "level_start_index must be an integer"),
    ("not a tensor", lambda: _bad(attention_weights=[[0.5]]), TypeError,
     "attention_weights must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c[0])
def test_bad_inputs(backend, case):
    _, make, exc, match = case
    with pytest.raises(exc, match=match):
        ak.ms_deform_attn(**make(), backend=backend)


def test_bad_inputs_reach_the_op_directly():
    """The registered op validates too (torch.ops.anydepth.ms_deform_attn called directly)."""
    args = _bad(level_start_index=torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="does not match spatial_shapes"):
        torch.ops.anydepth.ms_deform_attn(*args.values(), "cpp")
    grad = torch.randn(2, 3, 7)
    with pytest.raises(ValueError, match="grad_output must be"):
        torch.ops.anydepth.ms_deform_attn_backward(*_bad().values(), grad, "cpp")


def test_cpp_kernel_checks_its_arguments():
    """The C++ kernels refuse what they cannot read safely, with a Python exception."""
    value, ss, starts, loc, attn = make_inputs(1, 3, 2, [(3, 3)], 2, 4, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.anydepth._ext_ms_deform_attn_forward(torch.randn(1, 9, 2, 8)[..., ::2], ss,
                                                       starts, loc, attn)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.anydepth._ext_ms_deform_attn_forward(value, ss.int(), starts, loc, attn)
    with pytest.raises(RuntimeError, match="attention_weights must be"):
        torch.ops.anydepth._ext_ms_deform_attn_forward(value, ss, starts, loc, attn[..., :1])


# --------------------------------------------------------------------------------------------
# CUDA: compiled here, run where there is a GPU
# --------------------------------------------------------------------------------------------

def test_cuda_kernels_compiled_and_registered():
    info = ak.extension_info()["cuda"]
    assert info["compiled"], info["reason"]
    for name in ("_ext_ms_deform_attn_forward", "_ext_ms_deform_attn_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"anydepth::{name}", "CUDA"), name


def test_triton_aot_compile(tmp_path, aot_triton):
    """Compile the Triton forward and backward for sm_80 and sm_90 (PTX and cubin), with the venv's
    Triton and with Triton 3.6 (sm_90 only)."""
    for arch, names in aot_compile(tmp_path, ['ms_deform_attn'], triton=aot_triton).items():
        for direction in ("fwd", "bwd"):
            for dt in ("fp32", "fp16", "bf16"):
                assert any(x.startswith(f"ms_deform_attn_{direction}[{dt},") for x in names), \
                    (arch, direction, dt)


GPU_CASES = [
    (2, 50, 8, [(20, 20), (10, 10), (5, 5)], 4, 32),
    (1, 17, 3, [(1, 9), (7, 1), (4, 6)], 3, 20),
    (2, 9, 2, [(6, 5)], 2, 64),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_CASES, ids=lambda s: f"M{s[2]}L{len(s[3])}D{s[5]}")
def test_gpu_backends(backend, dtype, shape):
    n, q, m, shapes, p, d = shape
    value, ss, starts, loc, attn = make_inputs(n, q, m, shapes, p, d, seed=d, dtype=dtype,
                                               device="cuda")
    grad = torch.randn(n, q, m * d, device="cuda").to(dtype)
    ref, ref_g = ref_grads(value, ss, starts, loc, attn, grad)
    out, grads = run_backend(backend, value, ss, starts, loc, attn, grad)
    assert out.dtype == dtype and out.device.type == "cuda"
    # No tensor cores involved here, so the CPU tolerances hold (see TOL for the 16-bit types).
    check_close(out, ref, TOL[dtype], f"{backend} forward")
    for g, rg in zip(grads, ref_g):
        check_close(g, rg, TOL[dtype], f"{backend} grad")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_non_finite_and_borders(backend):
    vals = _special_locations()
    k = len(vals)
    xs, ys = torch.meshgrid(vals, vals, indexing="ij")
    loc = torch.stack([xs.flatten(), ys.flatten()], -1).view(1, k * k, 1, 1, 1, 2).cuda()
    ss, starts, s = level_tables([(3, 4)])
    value = torch.randn(1, s, 1, 5).cuda()
    attn = (torch.rand(1, k * k, 1, 1, 1) + 0.5).cuda()
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    attn[0, 5] = float("inf")
    ref = reference.ms_deform_attn(value.cpu().double(), ss, starts, loc.cpu().double(),
                                   attn.cpu().double())
    out = ak.ms_deform_attn(value, ss.cuda(), starts.cuda(), loc, attn, backend=backend).cpu()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    fin = torch.isfinite(ref)
    assert rel_err(out[fin], ref[fin]) <= 1e-5


@pytest.mark.gpu
@needs_cuda
def test_gpu_auto_picks_cuda_and_compiles():
    value, ss, starts, loc, attn = make_inputs(1, 8, 2, [(5, 4)], 2, 8, seed=1, device="cuda")
    assert msda_ops._resolve(value, "auto") == "cuda"
    fn = torch.compile(lambda v, sl, aw: ak.ms_deform_attn(v, ss, starts, sl, aw), fullgraph=True)
    check_close(fn(value, loc, attn), reference.ms_deform_attn(value.cpu(), ss, starts, loc.cpu(),
                                                               attn.cpu()), 1e-5, "compiled")


def test_cpp_every_instruction_set():
    """The float32 kernels are compiled for AVX-512, AVX2+FMA and the baseline; the other tests
    use the best one this CPU has (AVX-512 on the dev machine), this runs the AVX2 and baseline
    variants (ANYDEPTH_CPU_ISA) in subprocesses against the reference."""
    code = (
        "import sys, torch; sys.path.insert(0, 'tests');"
        "from test_ms_deform_attn import make_inputs, ref_grads, run_backend;"
        "from helpers import aot_compile, rel_err;"
        "args = make_inputs(2, 13, 3, [(6, 7), (1, 5), (3, 1)], 3, 19, seed=8);"
        "grad = torch.randn(2, 13, 57);"
        "ref, rg = ref_grads(*args, grad); out, g = run_backend('cpp', *args, grad);"
        "print(max([rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(g, rg)]))"
    )
    isas = ["base", "avx2"]
    procs = {isa: subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True,
                                   env=dict(os.environ, ANYDEPTH_CPU_ISA=isa),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for isa in isas}
    for isa, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        if proc.returncode != 0 and "lacks" in stderr:
            continue  # this CPU cannot run that instruction set
        assert proc.returncode == 0, f"{isa}: {stderr[-3000:]}"
        err = float(stdout.strip().splitlines()[-1])
        assert err <= 1e-5, f"{isa}: relative error {err:.3e}"


def test_cpp_kernel_bounds_the_level_table():
    """Called directly (bypassing the Python checks), the C++ kernels still refuse a level
    table that would read outside value."""
    value, ss, starts, loc, attn = make_inputs(1, 3, 2, [(3, 4), (2, 2)], 2, 4, 0)
    grad = torch.randn(1, 3, 8)
    for bad_ss, bad_starts in ((torch.tensor([[3, 4], [3, 3]]), starts),
                               (ss, torch.tensor([0, 13])),
                               (torch.tensor([[3, 4], [0, 2]]), starts),
                               (ss, torch.tensor([-1, 12]))):
        with pytest.raises(RuntimeError, match="does not fit in value's S=16"):
            torch.ops.anydepth._ext_ms_deform_attn_forward(value, bad_ss, bad_starts, loc, attn)
        with pytest.raises(RuntimeError, match="does not fit in value's S=16"):
            torch.ops.anydepth._ext_ms_deform_attn_backward(value, bad_ss, bad_starts, loc, attn, grad)


def test_opcheck():
    """torch.library.opcheck: schema, autograd registration, fake kernel, AOT dispatch."""
    value, ss, starts, loc, attn = make_inputs(1, 4, 2, [(3, 4), (2, 2)], 2, 4, 0)
    args = (value.requires_grad_(), ss, starts, loc.requires_grad_(), attn.requires_grad_(), "cpp")
    result = torch.library.opcheck(torch.ops.anydepth.ms_deform_attn.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


# --------------------------------------------------------------------------------------------
# Triton launcher: the kernels' globals
# --------------------------------------------------------------------------------------------

def test_triton_kernel_globals_compare_equal(aot_triton):
    """Before every launch Triton re-checks each global a kernel read at compile time with
    ``current != compiled`` and raises on a difference: a NaN constant never passes ("Global
    variable _NAN has changed ... from constexpr[nan] to constexpr[nan]", the first GPU run,
    Triton 3.6). The interpreter skips that check, so resolve the kernels' globals as the
    compiled launcher does (in a process without TRITON_INTERPRET, with the venv's Triton and
    the GPU machines') and run the same comparison."""
    code = (
        f"import triton; assert triton.__version__.startswith({aot_triton.version or ''!r})\n"
        "from triton.runtime.jit import JITFunction\n"
        "import anydepth_kernels.triton_kernels.ms_deform_attn as mod\n"
        "kernels = [k for k in vars(mod).values() if isinstance(k, JITFunction)]\n"
        "assert len(kernels) >= 2, kernels\n"
        "for k in kernels:\n"
        "    k.cache_key  # collects used_global_vals, as the first launch does\n"
        "    for (name, _), (val, scope) in k.used_global_vals.items():\n"
        "        assert not (scope.get(name) != val), f'{k.__name__}: global {name}={val!r}'\n"
        "print('ok', len(kernels))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(aot_triton.path or ""), str(REPO),
                                                      env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# The kernels bound the level table (no host copy of it on CUDA)
# --------------------------------------------------------------------------------------------

# (spatial_shapes, level_start_index, the level that does not fit in S=16); overflow-sized
# shapes too (H * W overflows int64).
BAD_TABLES = [
    ([[3, 4], [3, 3]], [0, 12], 1),
    ([[3, 4], [2, 2]], [0, 13], 1),
    ([[3, 4], [0, 2]], [0, 12], 1),
    ([[3, 4], [2, -2]], [0, 12], 1),
    ([[3, 4], [2, 2]], [-1, 12], 0),
    ([[2 ** 40, 2 ** 40], [2, 2]], [0, 12], 0),
    ([[3, 4], [2, 2]], [0, 2 ** 62], 1),
]


def _kernel_fns(backend):
    if backend == "cuda":
        return (torch.ops.anydepth._ext_ms_deform_attn_forward,
                torch.ops.anydepth._ext_ms_deform_attn_backward)
    from anydepth_kernels.triton_kernels import ms_deform_attn as tk

    return tk.ms_deform_attn_forward, tk.ms_deform_attn_backward


_ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                               reason="needs a CUDA device")]


@pytest.mark.parametrize("backend, dev", [
    ("triton", "cpu"),  # the interpreter
    pytest.param("triton", "cuda", marks=_ON_GPU),
    pytest.param("cuda", "cuda", marks=_ON_GPU),
])
def test_kernels_bound_the_level_table(backend, dev):
    """Called directly with a table that does not fit in value (the Python layer checks each
    device table only once, and not during a CUDA graph capture), the CUDA and Triton kernels
    read nothing of a level that does not fit: its points give NaN, nothing else does."""
    fwd, bwd = _kernel_fns(backend)
    value, ss, starts, loc, attn = make_inputs(1, 5, 2, [(3, 4), (2, 2)], 2, 4, 0, device=dev)
    grad = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(1)).to(dev)
    good_out = fwd(value, ss.to(dev), starts.to(dev), loc, attn)
    for shapes, offsets, bad in BAD_TABLES:
        bad_ss = torch.tensor(shapes, device=dev)
        bad_starts = torch.tensor(offsets, device=dev)
        out = fwd(value, bad_ss, bad_starts, loc, attn)
        g_value, g_loc, g_attn = bwd(value, bad_ss, bad_starts, loc, attn, grad)
        # every query samples both levels: each output row holds a NaN sample
        assert torch.isnan(out).all(), (shapes, offsets)
        assert torch.isnan(g_attn[..., bad, :]).all() and torch.isnan(g_loc[..., bad, :, :]).all()
        assert torch.isfinite(g_attn[..., 1 - bad, :]).all()
        assert torch.isfinite(g_value).all()
    if dev == "cuda":
        torch.cuda.synchronize()  # no illegal access was queued
    assert torch.equal(fwd(value, ss.to(dev), starts.to(dev), loc, attn), good_out)


# --------------------------------------------------------------------------------------------
# No host synchronisation on the hot path
# --------------------------------------------------------------------------------------------

@pytest.fixture
def host_reads(monkeypatch):
    """Count the host reads of tensor data (each one a device sync for a CUDA tensor)."""
    reads = []
    for name in ("tolist", "item", "numpy", "__bool__", "__int__", "__index__", "__float__"):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *args, _orig=orig, _name=name, **kwargs):
            reads.append(_name)
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    msda_ops._CHECKED_TABLES.clear()
    return reads


def _fwd_bwd(value, ss, starts, loc, attn, grad, backend="cpp"):
    out = torch.ops.anydepth.ms_deform_attn(value, ss, starts, loc, attn, backend)
    grads = torch.ops.anydepth.ms_deform_attn_backward(value, ss, starts, loc, attn, grad, backend)
    return out, grads


def test_device_tables_are_read_once(host_reads, monkeypatch):
    """Stand-in for CUDA level tables on this CPU machine: ``_checks.host_read_syncs`` reports
    every tensor as device-resident. The first call with a table reads it once (one sync on
    CUDA: both tables in one read); later calls with the same, unmodified tables read nothing,
    forward and backward; an in-place change is seen and re-checked with a clear error."""
    from anydepth_kernels.ops import _checks

    monkeypatch.setattr(_checks, "host_read_syncs", lambda t: True)
    value, ss, starts, loc, attn = make_inputs(2, 3, 2, [(3, 4), (2, 2)], 2, 4, 0)
    grad = torch.randn(2, 3, 8)
    ref, ref_g = ref_grads(value, ss, starts, loc, attn, grad)
    host_reads.clear()
    out, grads = _fwd_bwd(value, ss, starts, loc, attn, grad)
    assert host_reads == ["tolist"]
    host_reads.clear()
    for _ in range(2):
        out, grads = _fwd_bwd(value, ss, starts, loc, attn, grad)
        leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
        ak.ms_deform_attn(leaves[0], ss, starts, leaves[1], leaves[2], backend="cpp").backward(grad)
    assert host_reads == []
    check_close(out, ref, 1e-5, "forward")
    for g, rg in zip(grads, ref_g):
        check_close(g, rg, 1e-5, "grad")
    starts[1] = 11  # in place: bumps the version counter
    with pytest.raises(ValueError, match=r"level_start_index \[0, 11\] does not match"):
        _fwd_bwd(value, ss, starts, loc, attn, grad)
    starts[1] = 12
    host_reads.clear()
    _fwd_bwd(value, ss, starts, loc, attn, grad)
    assert host_reads == ["tolist"]
    # the check is keyed on the value's S too
    with pytest.raises(ValueError, match="value has S=20 positions"):
        _fwd_bwd(torch.cat([value, value[:, :4]], 1), ss, starts, loc, attn, grad)
    # other tensor objects (same content): checked again, once
    host_reads.clear()
    _fwd_bwd(value, ss.clone(), starts.clone(), loc, attn, grad)
    assert host_reads == ["tolist"]


def test_inference_mode_tables_are_read_once(host_reads, monkeypatch):
    from anydepth_kernels.ops import _checks

    monkeypatch.setattr(_checks, "host_read_syncs", lambda t: True)
    value, ss, starts, loc, attn = make_inputs(1, 3, 2, [(3, 4), (2, 2)], 2, 4, 0)
    with torch.inference_mode():
        ss, starts = ss.clone(), starts.clone()  # inference tensors: no version counter
        host_reads.clear()
        for _ in range(3):
            ak.ms_deform_attn(value, ss, starts, loc, attn, backend="cpp")
    assert host_reads == ["tolist"]


def test_nothing_is_read_during_capture(host_reads, monkeypatch):
    """While a CUDA graph is captured (mocked here) device tables are never read, not even on
    first sight; host tables are read (no sync) but not copied unless already cached."""
    from anydepth_kernels.ops import _checks

    value, ss, starts, loc, attn = make_inputs(1, 3, 2, [(3, 4), (2, 2)], 2, 4, 0)
    grad = torch.randn(1, 3, 8)
    eager = _fwd_bwd(value, ss, starts, loc, attn, grad)
    monkeypatch.setattr(_checks, "host_read_syncs", lambda t: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    host_reads.clear()
    out, grads = _fwd_bwd(value, ss.clone(), starts.clone(), loc, attn, grad)
    assert host_reads == []
    assert torch.equal(out, eager[0]) and all(torch.equal(a, b) for a, b in zip(grads, eager[1]))


def test_host_tables_for_a_device_value_are_copied_once(monkeypatch):
    """CPU tables with a device ``value`` (stand-in: the CPU ``value`` reported as device
    resident): checked on every call (no sync), copied to the device once per content, and the
    copy is reused (also during a capture, where a copy of new content is refused clearly)."""
    from anydepth_kernels.ops import _checks

    monkeypatch.setattr(msda_ops, "_DEVICE_TABLES", msda_ops._DeviceTables(maxsize=2))
    value, ss, starts, loc, attn = make_inputs(1, 3, 2, [(3, 4), (2, 2)], 2, 4, 0)
    monkeypatch.setattr(_checks, "host_read_syncs", lambda t: t is value)
    first = msda_ops._check_levels(value, ss, starts)
    assert first[0].tolist() == [[3, 4], [2, 2]] and first[1].tolist() == [0, 12]
    again = msda_ops._check_levels(value, ss.clone(), starts.int())
    assert again[0] is first[0] and again[1] is first[1]
    with pytest.raises(ValueError, match="does not match"):
        msda_ops._check_levels(value, ss, torch.tensor([0, 11]))
    out = ak.ms_deform_attn(value, ss, starts, loc, attn, backend="cpp")
    assert torch.equal(out, ak.ms_deform_attn(value.clone(), ss, starts, loc, attn, backend="cpp"))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert msda_ops._check_levels(value, ss, starts)[0] is first[0]  # cached: fine in a capture
    other = torch.tensor([[2, 6], [2, 2]])
    with pytest.raises(RuntimeError, match="Call the op once before the capture"):
        msda_ops._check_levels(value, other, starts)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    # the copy handed out during the capture is kept; others are dropped beyond maxsize
    for k in range(1, 5):
        shapes = [[1, 12 + k], [2, 2]]
        v = torch.zeros(1, 12 + k + 4, 2, 4)
        monkeypatch.setattr(_checks, "host_read_syncs", lambda t, v=v: t is v)
        msda_ops._check_levels(v, torch.tensor(shapes), torch.tensor([0, 12 + k]))
    monkeypatch.setattr(_checks, "host_read_syncs", lambda t: t is value)
    assert msda_ops._check_levels(value, ss, starts)[0] is first[0]


# --------------------------------------------------------------------------------------------
# CUDA graphs and sync-free calls on the GPU
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tables_on", ["cuda", "cpu"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture_and_no_sync(backend, tables_on):
    """After one eager call, forward and backward synchronise nothing (sync debug mode "error"
    raises on any synchronising call) and capture in a CUDA graph whose replays on new inputs
    match eager calls."""
    n, q, m, shapes, p, d = GPU_CASES[0]
    value, ss, starts, loc, attn = make_inputs(n, q, m, shapes, p, d, seed=3, device="cuda")
    ss, starts = ss.to(tables_on), starts.to(tables_on)
    grad = torch.randn(n, q, m * d, generator=torch.Generator().manual_seed(4)).cuda()

    def step():
        return _fwd_bwd(value, ss, starts, loc, attn, grad, backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compiles, the tables are checked
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_grads = step()
    for seed in (5, 6):
        new = make_inputs(n, q, m, shapes, p, d, seed=seed, device="cuda")
        for dst, src in zip((value, loc, attn), (new[0], new[3], new[4])):
            dst.copy_(src)
        grad.copy_(torch.randn(grad.shape, generator=torch.Generator().manual_seed(seed)).cuda())
        graph.replay()
        eager_out, eager_grads = step()
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager_out), seed  # the forward is deterministic
        for g, eg in zip(static_grads, eager_grads):  # grad_value: float32 atomics, any order
            check_close(g, eg.cpu().double(), 1e-6, f"replay grad (seed {seed})")
        ref, ref_g = ref_grads(value, ss, starts, loc, attn, grad)
        check_close(static_out, ref, 1e-5, "replay forward")
        for g, rg in zip(static_grads, ref_g):
            check_close(g, rg, 1e-5, "replay grad")
