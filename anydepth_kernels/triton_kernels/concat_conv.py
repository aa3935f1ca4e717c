"""Triton kernel for the concat-free output conv ``act(conv1x1(cat(xs), W[:, :C]) * scale + bias) + residual``.

``_concat_conv1x1_kernel`` is the 1x1-conv GEMM of :mod:`.conv_norm_act` with its input split
into up to four branches that are never concatenated. For each image ``n`` the output tile
``out[n][co, p]`` (``[BLOCK_CO, BLOCK_P]``, ``p`` over the ``P = H * W`` pixels) is

    sum over branches b:  W[co, off_b : off_b + C_b] @ X_b[n][:, p]

where ``off_b = C_0 + ... + C_{b-1}`` is the branch's first column in the weight. The K loop
runs branch by branch over each branch's channels in ``BLOCK_K`` steps (masked loads pad the
ragged end of every branch with zeros), accumulating into one fp32 tile with ``tl.dot``; then the
fused epilogue (scale, bias, activation, residual) runs in registers and the tile is stored once,
NCHW-contiguous. Columns past ``sum(C_b)`` (the weight's extra input channels of a shallow path)
are never read.

Branches are addressed by their own batch and channel strides (so channel chunks of one tensor,
``y.chunk(k, 1)``, are read in place); inside a channel the ``H * W`` plane must be contiguous
(true for any channel slice of an NCHW-contiguous tensor). A branch whose plane is not contiguous
(channels-last, spatially strided) is copied to NCHW first. Unused branch slots get 0 channels
(their loops run zero times). More than four branches: the fourth and later ones are
concatenated into one (a partial copy; the CSP modules of the models pass at most four).

Grid: ``(cdiv(P, BLOCK_P), cdiv(C_out, BLOCK_CO), N)``; tiles from ``conv1x1_config``. fp32 dots
take ``input_precision`` (``"ieee"`` exact by default, ``"tf32"``/``"tf32x3"``); fp16/bf16 use
tensor cores. ``UPCAST_DOT`` is the interpreter's bf16 workaround of :mod:`.conv_norm_act`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from .conv_norm_act import (
    _INTERPRETED,
    _activation,
    act_code,
    check_input_precision,
    conv1x1_config,
)

#: Branch slots of the kernel.
MAX_BRANCHES = 4


@triton.jit
def _branch_gemm(
    acc, x_ptr, w_ptr, n, C, stride_n, stride_c, k_off, stride_wo, stride_wk,
    co, co_mask, p, p_mask,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc += W[co, k_off : k_off + C] @ X[n][:C, p]`` for one branch (no-op when ``C == 0``)."""
    k = tl.arange(0, BLOCK_K)
    x_img = x_ptr + n * stride_n
    w_rows = w_ptr + co.to(tl.int64)[:, None] * stride_wo
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + k
        k_mask = kk < C
        w = tl.load(w_rows + (k_off + kk)[None, :] * stride_wk,
                    mask=co_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_img + kk.to(tl.int64)[:, None] * stride_c + p[None, :],
                    mask=k_mask[:, None] & p_mask[None, :], other=0.0)
        if UPCAST_DOT:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(w, x, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _concat_conv1x1_kernel(
    x0_ptr, x1_ptr, x2_ptr, x3_ptr, w_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr,
    C0, C1, C2, C3,
    sn0, sc0, sn1, sc1, sn2, sc2, sn3, sc3,
    stride_wo, stride_wk, C_out, P,
    ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
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

    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
    acc = _branch_gemm(acc, x0_ptr, w_ptr, n, C0, sn0, sc0, 0, stride_wo, stride_wk,
                       co, co_mask, p, p_mask, INPUT_PRECISION, UPCAST_DOT, BLOCK_K)
    acc = _branch_gemm(acc, x1_ptr, w_ptr, n, C1, sn1, sc1, C0, stride_wo, stride_wk,
                       co, co_mask, p, p_mask, INPUT_PRECISION, UPCAST_DOT, BLOCK_K)
    acc = _branch_gemm(acc, x2_ptr, w_ptr, n, C2, sn2, sc2, C0 + C1, stride_wo, stride_wk,
                       co, co_mask, p, p_mask, INPUT_PRECISION, UPCAST_DOT, BLOCK_K)
    acc = _branch_gemm(acc, x3_ptr, w_ptr, n, C3, sn3, sc3, C0 + C1 + C2, stride_wo, stride_wk,
                       co, co_mask, p, p_mask, INPUT_PRECISION, UPCAST_DOT, BLOCK_K)

    scale = tl.load(scale_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
    z = _activation(acc * scale[:, None] + bias[:, None], ACT)
    out_offs = n * C_out * P + co.to(tl.int64)[:, None] * P + p[None, :]
    mask = co_mask[:, None] & p_mask[None, :]
    if HAS_RESIDUAL:
        z += tl.load(res_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, z.to(out_ptr.dtype.element_ty), mask=mask)


def _plane_contiguous(x: torch.Tensor) -> bool:
    """Each channel's ``H * W`` plane is one contiguous run (row stride W, element stride 1)."""
    _, _, h, w = x.shape
    return (w == 1 or x.stride(3) == 1) and (h == 1 or x.stride(2) == w)


def _branches(xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    xs = [x for x in xs if x.shape[1] > 0]
    if len(xs) > MAX_BRANCHES:
        xs = xs[:MAX_BRANCHES - 1] + [torch.cat(xs[MAX_BRANCHES - 1:], 1)]
    return [x if _plane_contiguous(x) else x.contiguous() for x in xs]


def concat_conv1x1(
    xs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    act: str = "silu",
    residual: Optional[torch.Tensor] = None,
    *,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """``act(conv1x1(cat(xs), weight[:, :C]) * scale + bias) + residual`` without the concat.

    ``xs``: ``[N, C_i, H, W]`` tensors of one dtype (fp32, fp16 or bf16) and device, in the
    order of their channels in the conv's input; any batch/channel strides. ``weight``
    ``[C_out, C_in, 1, 1]`` with ``C_in >= sum(C_i)`` (only the first ``sum(C_i)`` columns are
    read). Returns NCHW-contiguous ``[N, C_out, H, W]`` in the inputs' dtype. Inputs are assumed
    validated (the op in :mod:`anydepth_kernels.ops.concat_conv` does it).
    """
    code = act_code(act)
    precision = check_input_precision(input_precision)
    x_first = xs[0]
    n, _, h, w = x_first.shape
    c_out = weight.shape[0]
    out = torch.empty((n, c_out, h, w), dtype=x_first.dtype, device=x_first.device)
    branches = _branches(xs)
    if not branches:
        raise ValueError("concat_conv1x1: the inputs have no channels")
    if out.numel() == 0:
        return out
    w2d = weight.reshape(c_out, weight.shape[1])
    res = residual.contiguous() if residual is not None else out
    ptrs = branches + [branches[0]] * (MAX_BRANCHES - len(branches))
    chans = [int(x.shape[1]) for x in branches] + [0] * (MAX_BRANCHES - len(branches))
    strides = []
    for x in ptrs:
        strides += [x.stride(0), x.stride(1)]
    p = h * w
    cfg = conv1x1_config(c_out, n * p)
    grid = (triton.cdiv(p, cfg.block_p), triton.cdiv(c_out, cfg.block_co), n)
    _concat_conv1x1_kernel[grid](
        *ptrs, w2d, scale.contiguous(), bias.contiguous(), res, out,
        *chans, *strides, w2d.stride(0), w2d.stride(1), c_out, p,
        ACT=code,
        HAS_RESIDUAL=residual is not None,
        INPUT_PRECISION=precision,
        UPCAST_DOT=_INTERPRETED and x_first.dtype == torch.bfloat16,
        BLOCK_CO=cfg.block_co,
        BLOCK_P=cfg.block_p,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
    )
    return out

