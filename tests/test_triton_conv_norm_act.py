"""Triton conv-block kernels against the eager reference.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
set below before the kernels are imported), and ``test_aot_compile`` compiles them for sm_80
and sm_90 in subprocesses without the interpreter, so the GPU compiler's rules are checked
too. ``test_cuda`` runs them on a GPU when there is one.
"""
from __future__ import annotations

import importlib
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from anydepth_kernels import reference, triton_kernels  # noqa: E402

if not triton_kernels.AVAILABLE:  # pragma: no cover - the test extra installs Triton
    pytest.skip(triton_kernels.UNAVAILABLE_REASON, allow_module_level=True)

from anydepth_kernels.reference import ACTIVATIONS  # noqa: E402
from anydepth_kernels.triton_kernels import (  # noqa: E402
    conv1x1_norm_act,
    conv_norm_act,
    scale_bias_act,
)

# The module itself (the package re-exports a function of the same name).
tk = importlib.import_module("anydepth_kernels.triton_kernels.conv_norm_act")

if not torch.cuda.is_available() and not tk._INTERPRETED:
    raise RuntimeError(
        "anydepth_kernels.triton_kernels was imported before TRITON_INTERPRET=1 was set, so its "
        "kernels are compiled-only and cannot run on this CPU-only machine; set the variable "
        "before that import (e.g. at the top of conftest.py)"
    )

from helpers import aot_compile, needs_cuda, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def check(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "output has NaN or inf"
    err = rel_err(out.cpu(), ref)
    assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"


def make_epilogue(c: int, seed: int, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    scale = torch.randn(c, generator=g) * 0.5 + 1.0
    bias = torch.randn(c, generator=g)
    return scale.to(device), bias.to(device)


def randn(shape, seed: int, dtype=torch.float32, device=DEVICE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def up(t):
    """The reference's input: upcast to fp32, on the CPU (on CUDA, cuDNN may use TF32)."""
    return None if t is None else t.float().cpu()


# --------------------------------------------------------------------------------------------
# scale_bias_act
# --------------------------------------------------------------------------------------------

EPILOGUE_SHAPES = [(1, 3, 5, 7), (2, 17, 8, 8), (2, 48, 13, 11), (1, 32, 20, 20)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_scale_bias_act(dtype, channels_last, act, with_residual):
    seed = zlib.crc32(f"{dtype}{channels_last}{act}{with_residual}".encode()) % 1000
    shape = EPILOGUE_SHAPES[seed % len(EPILOGUE_SHAPES)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = randn(shape, seed, dtype).contiguous(memory_format=fmt)
    scale, bias = make_epilogue(shape[1], seed + 1)
    # The residual comes in the other layout: the kernel must bring it to y's.
    other = torch.contiguous_format if channels_last else torch.channels_last
    residual = None
    if with_residual:
        residual = randn(shape, seed + 2, dtype).contiguous(memory_format=other)

    out = scale_bias_act(y, scale, bias, act, residual)

    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=fmt)
    check(out, reference.scale_bias_act(up(y), up(scale), up(bias), act, up(residual)), TOL[dtype])


def test_scale_bias_act_same_dtype_scale_and_strided_input():
    # 16-bit scale/bias, and a y that is neither NCHW- nor channels-last-contiguous.
    y = randn((2, 17, 13, 22), 7, torch.bfloat16)[..., ::2]
    scale, bias = (t.to(torch.bfloat16) for t in make_epilogue(17, 8))
    out = scale_bias_act(y, scale, bias, "silu")
    assert out.is_contiguous()
    check(out, reference.scale_bias_act(up(y), up(scale), up(bias), "silu"), 1e-2)


# --------------------------------------------------------------------------------------------
# conv1x1_norm_act (the fused GEMM)
# --------------------------------------------------------------------------------------------

# (N, C_in, C_out, H, W, stride): ragged channel counts, odd and even sizes, every tile config.
CONV1X1_SHAPES = [
    (1, 3, 17, 5, 7, 1),
    (2, 17, 32, 8, 8, 2),
    (2, 48, 48, 13, 11, 1),
    (1, 32, 3, 13, 11, 2),
    (2, 40, 80, 9, 12, 2),
    (2, 24, 136, 48, 48, 1),
]


def run_conv1x1(shape, act, with_residual, dtype, seed, **kwargs):
    n, c_in, c_out, h, w, s = shape
    x = randn((n, c_in, h, w), seed, dtype)
    weight = randn((c_out, c_in, 1, 1), seed + 1, dtype) / c_in**0.5
    scale, bias = make_epilogue(c_out, seed + 2)
    oh, ow = (h - 1) // s + 1, (w - 1) // s + 1
    residual = randn((n, c_out, oh, ow), seed + 3, dtype) if with_residual else None
    out = conv1x1_norm_act(x, weight, scale, bias, (s, s), act, residual, **kwargs)
    ref = reference.conv_norm_act(up(x), up(weight), up(scale), up(bias), s, 0, 1, 1, act,
                                  up(residual))
    assert out.dtype == dtype and out.is_contiguous()
    return out, ref


def test_conv1x1_configs_cover_every_tile():
    used = {tk.conv1x1_config(c_out, n * ((h - 1) // s + 1) * ((w - 1) // s + 1))
            for n, _, c_out, h, w, s in CONV1X1_SHAPES}
    assert used == set(tk.CONV1X1_CONFIGS)


@pytest.mark.parametrize("shape", CONV1X1_SHAPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv1x1_fp32(shape, act, with_residual):
    out, ref = run_conv1x1(shape, act, with_residual, torch.float32, seed=sum(shape))
    check(out, ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CONV1X1_SHAPES, ids=str)
def test_conv1x1_half(dtype, shape):
    i = CONV1X1_SHAPES.index(shape)
    act = ACTIVATIONS[i % len(ACTIVATIONS)]
    out, ref = run_conv1x1(shape, act, i % 2 == 0, dtype, seed=i)
    check(out, ref, 1e-2)


def test_conv1x1_non_contiguous_input():
    x = randn((2, 24, 9, 14), 11).contiguous(memory_format=torch.channels_last)[..., 1:12]
    weight = randn((20, 24, 1, 1), 12)
    scale, bias = make_epilogue(20, 13)
    out = conv1x1_norm_act(x, weight, scale, bias, 2, "relu")
    ref = reference.conv_norm_act(up(x), up(weight), up(scale), up(bias), 2, 0, 1, 1, "relu")
    check(out, ref, 1e-5)


def test_conv1x1_rejects_unknown_arguments():
    x, weight = randn((1, 4, 3, 3), 0), randn((4, 4, 1, 1), 1)
    scale, bias = make_epilogue(4, 2)
    with pytest.raises(ValueError, match="input_precision"):
        conv1x1_norm_act(x, weight, scale, bias, input_precision="fp16")
    with pytest.raises(ValueError, match="activation"):
        conv1x1_norm_act(x, weight, scale, bias, act="gelu")


# --------------------------------------------------------------------------------------------
# conv_norm_act (GEMM for 1x1, library conv + Triton epilogue otherwise)
# --------------------------------------------------------------------------------------------

# (N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups, uses the GEMM)
CONV_CASES = [
    (2, 17, 32, 8, 8, 1, 2, 0, 1, 1, True),
    (1, 16, 24, 7, 9, 1, (1, 2), 0, 3, 1, True),  # dilation is irrelevant for 1x1
    (2, 16, 24, 6, 6, 1, 1, 1, 1, 1, False),  # padded 1x1
    (2, 17, 32, 13, 11, 3, 1, 1, 1, 1, False),
    (1, 24, 24, 13, 11, 3, 2, (1, 1), 1, 24, False),  # depthwise
    (2, 16, 32, 9, 9, 3, 1, 2, 2, 4, False),  # dilated, grouped
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_norm_act(case, dtype, channels_last, monkeypatch):
    n, c_in, c_out, h, w, k, stride, padding, dilation, groups, gemm = case
    i = CONV_CASES.index(case)
    act = ACTIVATIONS[(i + channels_last) % len(ACTIVATIONS)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = randn((n, c_in, h, w), i, dtype).contiguous(memory_format=fmt)
    weight = randn((c_out, c_in // groups, k, k), i + 1, dtype) / (c_in // groups * k * k) ** 0.5
    scale, bias = make_epilogue(c_out, i + 2)
    ref = reference.conv_norm_act(up(x), up(weight), up(scale), up(bias), stride, padding,
                                  dilation, groups, act)
    residual = randn(ref.shape, i + 3, dtype) if i % 2 else None
    if residual is not None:
        ref = ref + up(residual)

    calls = []
    monkeypatch.setattr(tk, "conv1x1_norm_act",
                        lambda *a, **kw: calls.append(1) or conv1x1_norm_act(*a, **kw))
    out = conv_norm_act(x, weight, scale, bias, stride, padding, dilation, groups, act, residual)

    assert bool(calls) == gemm
    assert out.dtype == dtype
    # The GEMM writes NCHW; the library conv keeps the input's layout and the epilogue follows.
    assert out.is_contiguous(memory_format=fmt if not gemm else torch.contiguous_format)
    check(out, ref, TOL[dtype])


# --------------------------------------------------------------------------------------------
# GPU compilation without a GPU, and GPU execution with one
# --------------------------------------------------------------------------------------------

def test_aot_compile(tmp_path, aot_triton):
    """Compile every kernel variant for sm_80 and sm_90 (PTX and cubin) without the interpreter, with
    the venv's Triton and with Triton 3.6 (sm_90 only)."""
    for arch, names in aot_compile(tmp_path, triton=aot_triton).items():
        kernels = {name.split("[")[0] for name in names}
        assert kernels == {"scale_bias_act", "conv1x1"}
        for kernel in kernels:
            for act in ACTIVATIONS:
                for res in (0, 1):
                    assert any(name.startswith(kernel) and f",{act},residual={res}," in name
                               for name in names), (arch, kernel, act, res)


@pytest.mark.gpu
@needs_cuda
def test_cuda():
    for shape in CONV1X1_SHAPES + [(4, 256, 256, 40, 40, 1)]:
        for act in ACTIVATIONS:
            out, ref = run_conv1x1(shape, act, True, torch.float32, seed=1,
                                   input_precision="ieee")
            check(out, ref, 1e-5)
            out, ref = run_conv1x1(shape, act, False, torch.float32, seed=2,
                                   input_precision="tf32")
            check(out, ref, 3e-3)
            out, ref = run_conv1x1(shape, act, True, torch.bfloat16, seed=3)
            check(out, ref, 1e-2)
    for channels_last in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            y = randn((4, 64, 37, 29), 5, dtype).contiguous(memory_format=fmt)
            scale, bias = make_epilogue(64, 6)
            residual = randn(y.shape, 7, dtype)
            out = scale_bias_act(y, scale, bias, "silu", residual)
            assert out.is_contiguous(memory_format=fmt)
            ref = reference.scale_bias_act(up(y), up(scale), up(bias), "silu", up(residual))
            check(out, ref, TOL[dtype])
