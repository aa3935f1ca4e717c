"""Triton kernels for the conv block ``act(conv2d(x, W) * scale[c] + bias[c]) + residual``.

Two kernels:

``_scale_bias_act_kernel`` (the epilogue alone)
    An elementwise pass over a 4-D ``y`` that reads each element once and writes it once. The
    tensor is viewed as a row-major matrix ``[R, L]`` whose channel index is cheap to find:

    * NCHW contiguous: ``R = N * C`` rows of ``L = H * W`` pixels; the channel is ``row % C``.
    * channels-last: ``R = N * H * W`` rows of ``L = C`` channels; the channel is the column.

    The ``CHANNELS_LAST`` constexpr picks the view, so both layouts are handled in place (no
    transposing copy) and the output keeps ``y``'s layout. Each program owns a
    ``[BLOCK_R, BLOCK_L]`` tile of ``EPILOGUE_TILE`` elements; the only integer division is one
    modulo per row, never per element. Element offsets are 64-bit.

``_conv1x1_kernel`` (a 1x1 convolution as a GEMM with the epilogue fused)
    For each image ``n`` the output is ``out[n] = W[C_out, C_in] @ X[n][C_in, P]`` where ``P`` is
    the number of output pixels and ``X[n][:, p]`` is the input pixel under output pixel ``p``
    (``p`` itself at stride 1; ``(oh * SH, ow * SW)`` otherwise, selected by the ``UNIT_STRIDE``
    constexpr so the stride-1 loads stay contiguous). The grid is
    ``(cdiv(P, BLOCK_P), cdiv(C_out, BLOCK_CO), N)``; each program accumulates a
    ``[BLOCK_CO, BLOCK_P]`` fp32 tile over ``C_in`` in ``BLOCK_K`` steps with ``tl.dot`` (masked
    loads pad ragged edges with zeros), then applies scale, bias, the activation and the
    residual to the accumulator in registers and stores the result once: the pre-activation
    never touches memory. ``UPCAST_DOT`` exists for the interpreter only (see ``_INTERPRETED``).

Everything is computed in fp32 and stored in the input's dtype, as in
:mod:`anydepth_kernels.reference`. fp32 GEMMs use ``tl.dot(..., input_precision=...)``:
``"ieee"`` (the default here) is exact fp32, ``"tf32"``/``"tf32x3"`` use tensor cores on GPUs.
The same spelling is accepted by Triton 3.6 and 3.8.

Every launch works on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU tensors. The
variable is read when ``@triton.jit`` decorates the kernels, so it must be set before this module
is first imported.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ..ops._backends import INPUT_PRECISIONS  # the one definition; fp32 inputs only (fp16/bf16
#                                              always take the tensor-core path, whatever the value)
from ..reference import ACTIVATIONS

IntOr2 = Union[int, Sequence[int]]


#: Elements per program of the epilogue kernel.
EPILOGUE_TILE = 2048
#: Row lengths ``BLOCK_L`` of the epilogue tiles; ``BLOCK_R = EPILOGUE_TILE // BLOCK_L``.
EPILOGUE_BLOCK_LS = (16, 64, 256)


class Conv1x1Config(NamedTuple):
    """Tile of the 1x1-conv GEMM: output channels x output pixels x input-channel step."""

    block_co: int
    block_p: int
    block_k: int
    num_warps: int


#: The fixed set of GEMM tiles (see :func:`conv1x1_config` for the choice).
CONV1X1_CONFIGS = (
    Conv1x1Config(block_co=32, block_p=64, block_k=32, num_warps=4),
    Conv1x1Config(block_co=64, block_p=64, block_k=32, num_warps=4),
    Conv1x1Config(block_co=128, block_p=128, block_k=32, num_warps=8),
)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _activation(z, ACT: tl.constexpr):
    """``ACT`` is the index in ``reference.ACTIVATIONS``: 0 identity, 1 relu, 2 silu."""
    if ACT == 1:
        # where(z < 0) rather than maximum: NaN stays NaN, as in torch.relu.
        z = tl.where(z < 0.0, 0.0, z)
    elif ACT == 2:
        z = z / (1.0 + tl.exp(-z))
    return z


@triton.jit
def _scale_bias_act_kernel(
    y_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr,
    R, L, C,
    ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    row_mask = rows < R
    col_mask = cols < L
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * L + cols[None, :]

    if CHANNELS_LAST:
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    else:
        chan = rows % C
        scale = tl.load(scale_ptr + chan, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        bias = tl.load(bias_ptr + chan, mask=row_mask, other=0.0).to(tl.float32)[:, None]

    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = _activation(y * scale + bias, ACT)
    if HAS_RESIDUAL:
        z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv1x1_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr,
    C_in, C_out, HW_in, W_in, OW, P, SH, SW,
    ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    UNIT_STRIDE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    co_mask = co < C_out
    p_mask = p < P
    # Offset inside one input channel plane of the input pixel read by output pixel p.
    if UNIT_STRIDE:
        pix = p
    else:
        pix = (p // OW) * (SH * W_in) + (p % OW) * SW
    x_img = x_ptr + n * C_in * HW_in
    k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, C_in, BLOCK_K):
        kk = k0 + k
        k_mask = kk < C_in
        w = tl.load(w_ptr + co[:, None] * C_in + kk[None, :],
                    mask=co_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_img + kk.to(tl.int64)[:, None] * HW_in + pix[None, :],
                    mask=k_mask[:, None] & p_mask[None, :], other=0.0)
        if UPCAST_DOT:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(w, x, acc, input_precision=INPUT_PRECISION)

    scale = tl.load(scale_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
    z = _activation(acc * scale[:, None] + bias[:, None], ACT)
    out_offs = n * C_out * P + co.to(tl.int64)[:, None] * P + p[None, :]
    mask = co_mask[:, None] & p_mask[None, :]
    if HAS_RESIDUAL:
        z += tl.load(res_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, z.to(out_ptr.dtype.element_ty), mask=mask)


#: True when ``TRITON_INTERPRET=1`` was set at import: ``@triton.jit`` then gives interpreted
#: functions. The interpreter keeps bf16 as raw ``uint16`` bits and its ``tl.dot`` multiplies
#: those bits (bf16 dots are unsupported there), so under it the GEMM upcasts bf16 tiles to fp32
#: before the dot (``UPCAST_DOT``): the same products (bf16 x bf16 is exact in fp32) and the same
#: fp32 accumulation as the tensor-core path compiled for GPUs, which never upcasts.
_INTERPRETED = isinstance(_conv1x1_kernel, InterpretedFunction)


# --------------------------------------------------------------------------------------------
# Launch parameters (shared with the AOT check in ``aot.py``)
# --------------------------------------------------------------------------------------------

def act_code(act: str) -> int:
    """Integer code of ``act`` (its index in ``reference.ACTIVATIONS``)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    return ACTIVATIONS.index(act)


def epilogue_block_l(row_len: int) -> int:
    """Smallest epilogue row block that covers ``row_len`` (the largest one past that)."""
    for block in EPILOGUE_BLOCK_LS:
        if row_len <= block:
            return block
    return EPILOGUE_BLOCK_LS[-1]


def conv1x1_config(c_out: int, n_pixels: int) -> Conv1x1Config:
    """GEMM tile for ``c_out`` output channels and ``n_pixels`` output pixels (all images).

    Narrow layers take the smallest tile so few rows are padding; wide layers with many pixels
    take the largest one for reuse; everything else the middle one.
    """
    if c_out <= 32:
        return CONV1X1_CONFIGS[0]
    if c_out >= 128 and n_pixels >= 4096:
        return CONV1X1_CONFIGS[2]
    return CONV1X1_CONFIGS[1]


def check_input_precision(input_precision: str) -> str:
    """Validate the ``INPUT_PRECISION`` constexpr of the GEMM (meaningful for fp32 inputs only)."""
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(
            f"unknown input_precision {input_precision!r}; expected one of {INPUT_PRECISIONS}"
        )
    return input_precision


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------

def _pair(v: IntOr2) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def _is_channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def scale_bias_act(
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    act: str,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``act(y * scale[c] + bias[c]) + residual`` for a 4-D ``y`` in one elementwise kernel.

    ``y`` NCHW-contiguous or channels-last is read in place; any other layout is made
    contiguous first. The result has ``y``'s dtype and layout; ``residual`` (any layout) is
    brought to that layout.
    """
    code = act_code(act)
    channels_last = _is_channels_last(y)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = y.contiguous(memory_format=fmt)
    out = torch.empty_like(y, memory_format=fmt)
    if y.numel() == 0:
        return out
    n, c, h, w = y.shape
    rows, row_len = (n * h * w, c) if channels_last else (n * c, h * w)
    block_l = epilogue_block_l(row_len)
    block_r = EPILOGUE_TILE // block_l
    res = residual.contiguous(memory_format=fmt) if residual is not None else y
    grid = (triton.cdiv(rows, block_r), triton.cdiv(row_len, block_l))
    _scale_bias_act_kernel[grid](
        y, scale.contiguous(), bias.contiguous(), res, out,
        rows, row_len, c,
        ACT=code,
        HAS_RESIDUAL=residual is not None,
        CHANNELS_LAST=channels_last,
        BLOCK_R=block_r,
        BLOCK_L=block_l,
        num_warps=4,
    )
    return out


def conv1x1_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    stride: IntOr2 = (1, 1),
    act: str = "silu",
    residual: Optional[torch.Tensor] = None,
    *,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """1x1 convolution (groups 1, no padding, any stride) with the epilogue fused.

    ``x`` ``[N, C_in, H, W]`` and ``weight`` ``[C_out, C_in, 1, 1]`` of one dtype (fp32, fp16
    or bf16); returns NCHW ``[N, C_out, OH, OW]`` in that dtype. ``input_precision`` applies to
    fp32 inputs: ``"ieee"`` (exact), ``"tf32"`` or ``"tf32x3"`` (tensor cores on GPU).
    """
    code = act_code(act)
    precision = check_input_precision(input_precision)
    sh, sw = _pair(stride)
    x = x.contiguous()
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    oh, ow = (h - 1) // sh + 1, (w - 1) // sw + 1
    out = torch.empty((n, c_out, oh, ow), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    w2d = weight.reshape(c_out, c_in).contiguous()
    res = residual.contiguous() if residual is not None else out
    n_pix = oh * ow
    cfg = conv1x1_config(c_out, n * n_pix)
    grid = (triton.cdiv(n_pix, cfg.block_p), triton.cdiv(c_out, cfg.block_co), n)
    _conv1x1_kernel[grid](
        x, w2d, scale.contiguous(), bias.contiguous(), res, out,
        c_in, c_out, h * w, w, ow, n_pix, sh, sw,
        ACT=code,
        HAS_RESIDUAL=residual is not None,
        UNIT_STRIDE=(sh, sw) == (1, 1),
        INPUT_PRECISION=precision,
        UPCAST_DOT=_INTERPRETED and x.dtype == torch.bfloat16,
        BLOCK_CO=cfg.block_co,
        BLOCK_P=cfg.block_p,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
    )
    return out


def conv_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    stride: IntOr2 = 1,
    padding: IntOr2 = 0,
    dilation: IntOr2 = 1,
    groups: int = 1,
    act: str = "silu",
    residual: Optional[torch.Tensor] = None,
    *,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """``act(conv2d(x, weight) * scale + bias) + residual``.

    A 1x1 kernel with ``groups == 1`` and no padding runs as the fused Triton GEMM
    (:func:`conv1x1_norm_act`; dilation does not matter for 1x1); any other convolution runs in
    ``torch.nn.functional.conv2d`` followed by the Triton epilogue (:func:`scale_bias_act`).
    ``input_precision`` is used by the GEMM path only.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if tuple(weight.shape[2:]) == (1, 1) and groups == 1 and padding == (0, 0):
        return conv1x1_norm_act(
            x, weight, scale, bias, stride, act, residual, input_precision=input_precision
        )
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    return scale_bias_act(y, scale, bias, act, residual)
