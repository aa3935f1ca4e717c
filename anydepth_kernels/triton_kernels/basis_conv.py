"""Triton kernel for the factored conv block ``act((coeff @ conv2d(x, basis)) * scale + bias) + residual``.

``_basis_conv_kernel``: one program owns ``BLOCK_P`` output pixels of one image and every output
channel. It first computes the intermediate tile ``mid[BLOCK_P, BLOCK_R]`` (all ``R`` basis
responses of its pixels, ``BLOCK_R`` the rank padded to a power of two >= 16) as an implicit GEMM
over ``K = C * KH * KW``: each ``BLOCK_K`` step gathers the input patch (im2col on the fly,
masked loads give the zero padding) and multiplies it by the matching slice of the basis with
``tl.dot``. The tile stays in registers; the program then loops over the output channels in
``BLOCK_CO`` steps, multiplies ``mid`` by the coefficient slice ``[BLOCK_R, BLOCK_CO]`` and
applies scale, bias, activation and residual before the single store. The ``[N, R, H, W]``
intermediate never exists in memory.

fp32 dots take ``input_precision`` (``"ieee"`` exact by default, ``"tf32"``/``"tf32x3"``);
fp16/bf16 inputs use tensor cores and the intermediate is rounded to the input dtype before the
coefficient GEMM, as the two-convolution reference does. ``UPCAST_DOT`` is the interpreter's bf16
workaround of :mod:`.conv_norm_act`. Block shapes are powers of two and every ``tl.dot`` operand is
at least 16 in each dimension, so the variants compile for sm_80 and sm_90 (checked by
``aot.py``'s ``"basis_conv"`` family).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from ..ops._backends import TRITON_MAX_BASIS_RANK
from .conv_norm_act import _INTERPRETED, _activation, _pair, act_code, check_input_precision

IntOr2 = Union[int, Sequence[int]]

#: Largest rank (basis filters) the kernel takes: ``mid`` is ``BLOCK_P x BLOCK_R`` fp32 registers.
MAX_RANK = TRITON_MAX_BASIS_RANK


class BasisConvConfig(NamedTuple):
    """Tile of the fused factored conv: pixels x padded rank x K step x output-channel step."""

    block_p: int
    block_r: int
    block_k: int
    block_co: int
    num_warps: int


#: Padded ranks the kernel is compiled for (``basis_conv_config`` picks the smallest that fits).
BLOCK_RS = (16, 32, 64, 128, 256, 512)


def basis_conv_config(rank: int) -> BasisConvConfig:
    """Tile for ``rank`` basis filters: the intermediate tile ``block_p x block_r`` shrinks in
    pixels as the rank grows (at most 4096 fp32 values, 32 per thread at 4 warps)."""
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"basis rank {rank} is not supported; expected 1 to {MAX_RANK}")
    block_r = next(b for b in BLOCK_RS if b >= rank)
    block_p = max(16, min(64, 4096 // block_r))
    block_co = 64 if block_r <= 128 else 32
    return BasisConvConfig(block_p, block_r, 32, block_co, 4)


@triton.jit
def _basis_conv_kernel(
    x_ptr, basis_ptr, coeff_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr,
    C, H, W, R, C_out, OW, P, K, SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    iy0 = (p // OW) * SH - PH
    ix0 = (p % OW) * SW - PW
    r = tl.arange(0, BLOCK_R)
    r_mask = r < R
    kk = tl.arange(0, BLOCK_K)
    x_img = x_ptr + n * C * H * W

    # The basis GEMM: mid[p, r] = sum_k patch[p, k] * basis[r, k], patch gathered on the fly.
    mid = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_mask = k < K
        c = k // (KH * KW)
        rem = k % (KH * KW)
        iy = iy0[:, None] + ((rem // KW) * DH)[None, :]
        ix = ix0[:, None] + ((rem % KW) * DW)[None, :]
        inside = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        a = tl.load(x_img + c.to(tl.int64)[None, :] * H * W + iy * W + ix,
                    mask=p_mask[:, None] & k_mask[None, :] & inside, other=0.0)
        b = tl.load(basis_ptr + r[None, :] * K + k[:, None],
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        mid = tl.dot(a, b, mid, input_precision=INPUT_PRECISION)

    # The intermediate in the input dtype (a no-op in fp32), as the reference's conv output.
    if UPCAST_DOT:
        mid_in = mid.to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        mid_in = mid.to(x_ptr.dtype.element_ty)

    # The coefficient GEMM and the epilogue, BLOCK_CO output channels at a time.
    cos = tl.arange(0, BLOCK_CO)
    for co0 in range(0, C_out, BLOCK_CO):
        co = co0 + cos
        co_mask = co < C_out
        w = tl.load(coeff_ptr + co[None, :] * R + r[:, None],
                    mask=r_mask[:, None] & co_mask[None, :], other=0.0)
        if UPCAST_DOT:
            w = w.to(tl.float32)
        acc = tl.dot(mid_in, w, input_precision=INPUT_PRECISION)
        scale = tl.load(scale_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
        z = _activation(acc * scale[None, :] + bias[None, :], ACT)
        offs = n * C_out * P + co.to(tl.int64)[None, :] * P + p[:, None]
        mask = p_mask[:, None] & co_mask[None, :]
        if HAS_RESIDUAL:
            z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


def basis_conv_norm_act(
    x: torch.Tensor,
    basis: torch.Tensor,
    coeff: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    stride: IntOr2 = 1,
    padding: IntOr2 = 0,
    dilation: IntOr2 = 1,
    act: str = "identity",
    residual: Optional[torch.Tensor] = None,
    *,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """``act((coeff @ conv2d(x, basis)) * scale + bias) + residual`` in one kernel.

    ``x`` ``[N, C, H, W]``, ``basis`` ``[R, C, kh, kw]`` and ``coeff`` ``[C_out, R]`` of one dtype
    (fp32, fp16 or bf16), ``scale``/``bias`` fp32 ``[C_out]``; returns NCHW ``[N, C_out, OH, OW]``.
    Inputs are validated by the op (:mod:`anydepth_kernels.ops.basis_conv`).
    """
    code = act_code(act)
    precision = check_input_precision(input_precision)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    x = x.contiguous()
    n, c, h, w = x.shape
    rank, _, kh, kw = basis.shape
    c_out = coeff.shape[0]
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = torch.empty((n, c_out, oh, ow), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    cfg = basis_conv_config(rank)
    basis2 = basis.reshape(rank, -1).contiguous()
    coeff2 = coeff.reshape(c_out, rank).contiguous()
    res = residual.contiguous() if residual is not None else out
    n_pix = oh * ow
    grid = (triton.cdiv(n_pix, cfg.block_p), n)
    _basis_conv_kernel[grid](
        x, basis2, coeff2, scale.contiguous(), bias.contiguous(), res, out,
        c, h, w, rank, c_out, ow, n_pix, c * kh * kw, sh, sw, ph, pw, dh, dw,
        KH=kh, KW=kw,
        ACT=code,
        HAS_RESIDUAL=residual is not None,
        INPUT_PRECISION=precision,
        UPCAST_DOT=_INTERPRETED and x.dtype == torch.bfloat16,
        BLOCK_P=cfg.block_p,
        BLOCK_R=cfg.block_r,
        BLOCK_K=cfg.block_k,
        BLOCK_CO=cfg.block_co,
        num_warps=cfg.num_warps,
    )
    return out
