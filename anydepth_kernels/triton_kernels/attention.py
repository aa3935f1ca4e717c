"""Triton fused attention ``softmax(q k^T * scale) v`` (no mask, non-causal), forward and backward.

FlashAttention-2 scheme:

``_attn_fwd_kernel``
    One program per (batch*head, query block of ``BLOCK_M``). The query tile stays in registers;
    the program loops over key/value blocks of ``BLOCK_N``, keeping the running row maximum
    ``m``, the running softmax denominator ``l`` and the unnormalised output ``acc`` in fp32
    (online softmax, in base 2: the scores are pre-multiplied by ``scale * log2(e)`` so every
    exponential is an ``exp2``). At the end it stores ``acc / l`` in the input's dtype and the
    log-sum-exp ``lse = (m + log2 l) * ln 2`` (natural log of the scaled scores, fp32) that the
    backward needs to recompute the probabilities without a second softmax pass.

``_attn_bwd_preprocess_kernel``
    ``delta = rowsum(dO * O)`` per query row (fp32).

``_attn_bwd_dkdv_kernel``
    One program per (batch*head, key block): keeps ``k``, ``v`` and the fp32 ``dk``, ``dv``
    accumulators resident and streams every query block: ``P^T = exp(k q^T * scale - lse)``,
    ``dv += P^T dO``, ``dS^T = P^T * (v dO^T - delta)``, ``dk += dS^T q`` (times ``scale``).

``_attn_bwd_dq_kernel``
    One program per (batch*head, query block): streams the key blocks,
    ``dq += (P * (dO v^T - delta)) k`` (times ``scale``).

Layout-free addressing. Every tensor is addressed as ``base + b*s_b + a*s_a + h*s_h + n*s_n +
d*s_d`` with its own five strides, where the program's batch index ``z`` is split as
``b = z // AREA``, ``a = z % AREA``. For ``[B, H, N, D]`` tensors ``AREA = 1`` (any strides: no
contiguous copies). For YOLOv12 area attention the q/k/v of head ``h`` are read straight from the
qkv 1x1-conv output ``[B, 3*C, Hm, Wm]`` (channel ``h*3*hd + {0, hd, 2hd} + d``; token ``t`` of
area ``a`` is map position ``a * N/area + t``), the output is written straight into an NCHW
``[B, C, Hm, Wm]`` map, and the backward writes dq/dk/dv straight into an NCHW ``d(qkv)``: the
area reshape is folded into the indexing instead of being copied. The forward can also write the
value map (``WRITE_V``), which area attention returns for its positional conv.

Head dims: any ``D`` from 1 to ``MAX_HEAD_DIM`` (128). The head-dim tile ``BLOCK_D`` is the next
power of two, at least 16 (``tl.dot`` needs 16 along every dimension); the padding lanes are
loaded as zeros and never stored. Sequence lengths that are not multiples of the blocks are
masked (padded keys get a score of -inf; padded query rows are never stored). Query and key
lengths may differ (cross-attention); ``v`` has ``k``'s length and ``q``'s head dim.

Dtypes: fp32, fp16, bf16 inputs; all accumulation in fp32. fp16/bf16 dots take the tensor-core
path (the probabilities are rounded to the input dtype before the ``P V`` product, as in
FlashAttention). fp32 dots use ``tl.dot(..., input_precision=...)``: ``"ieee"`` (default, exact
fp32) or ``"tf32"``/``"tf32x3"`` (tensor cores on GPUs; the interpreter ignores it). The same
spelling works in Triton 3.6 and 3.8.

Every launch works on CUDA tensors and, under ``TRITON_INTERPRET=1`` (read when the kernels are
decorated, so set before this module is first imported), on CPU tensors.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..ops._backends import INPUT_PRECISIONS, TRITON_MAX_HEAD_DIM
from .conv_norm_act import _INTERPRETED

#: Largest head dim the kernels take (``BLOCK_D`` up to 128; the backend table's limit).
MAX_HEAD_DIM = TRITON_MAX_HEAD_DIM
#: The head-dim tiles compiled (a head dim ``D`` uses the smallest one >= D).
ATTN_BLOCK_DS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


class AttnConfig(NamedTuple):
    """Tiles of one head-dim block: forward (queries x keys), backward dk/dv (resident keys x
    streamed queries) and backward dq (resident queries x streamed keys)."""

    block_d: int
    fwd_m: int
    fwd_n: int
    bwd_kv_n: int
    bwd_kv_m: int
    bwd_q_m: int
    bwd_q_n: int
    num_warps: int


def attn_config(head_dim: int) -> AttnConfig:
    """The tile configuration for head dim ``head_dim`` (1 ..= ``MAX_HEAD_DIM``)."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"triton attention: head dim {head_dim} is not supported; supported "
                         f"head dims are 1 to {MAX_HEAD_DIM}")
    block_d = next(b for b in ATTN_BLOCK_DS if b >= head_dim)
    if block_d <= 64:
        return AttnConfig(block_d, 64, 64, 32, 64, 64, 32, 4)
    return AttnConfig(block_d, 64, 32, 32, 32, 32, 32, 8)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _base(ptr, z, h, AREA, s_b, s_a, s_h):
    b = (z // AREA).to(tl.int64)
    a = (z % AREA).to(tl.int64)
    return ptr + b * s_b + a * s_a + h.to(tl.int64) * s_h


@triton.jit
def _tile_offsets(rows, cols, s_n, s_d):
    """``[R, C]`` offsets of rows (sequence positions) x cols (head-dim lanes)."""
    return rows.to(tl.int64)[:, None] * s_n + cols.to(tl.int64)[None, :] * s_d


@triton.jit
def _mm(a, b, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``a @ b`` accumulated in fp32 (operands of one dtype)."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=INPUT_PRECISION)


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, vmap_ptr,
    sq_b, sq_a, sq_h, sq_n, sq_d,
    sk_b, sk_a, sk_h, sk_n, sk_d,
    sv_b, sv_a, sv_h, sv_n, sv_d,
    so_b, so_a, so_h, so_n, so_d,
    H, AREA, N_Q, N_K, D, qk_scale,
    WRITE_V: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    zh = tl.program_id(0)
    z = zh // H
    h = zh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N_Q
    d_mask = offs_d < D
    q_mask = m_mask[:, None] & d_mask[None, :]

    q_base = _base(q_ptr, z, h, AREA, sq_b, sq_a, sq_h)
    k_base = _base(k_ptr, z, h, AREA, sk_b, sk_a, sk_h)
    v_base = _base(v_ptr, z, h, AREA, sv_b, sv_a, sv_h)
    q = tl.load(q_base + _tile_offsets(offs_m, offs_d, sq_n, sq_d), mask=q_mask, other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N_K
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # k^T tile [BLOCK_D, BLOCK_N]
        kt = tl.load(k_base + offs_n.to(tl.int64)[None, :] * sk_n
                     + offs_d.to(tl.int64)[:, None] * sk_d,
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        s = _mm(q, kt, INPUT_PRECISION, UPCAST_DOT) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + _tile_offsets(offs_n, offs_d, sv_n, sv_d), mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, INPUT_PRECISION, UPCAST_DOT)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_base = _base(o_ptr, z, h, AREA, so_b, so_a, so_h)
    o_offs = _tile_offsets(offs_m, offs_d, so_n, so_d)
    tl.store(o_base + o_offs, acc.to(o_ptr.dtype.element_ty), mask=q_mask)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + zh.to(tl.int64) * N_Q + offs_m, lse, mask=m_mask)
    if WRITE_V:
        # The value rows at this program's positions (N_Q == N_K), in the output's layout.
        v_rows = tl.load(v_base + _tile_offsets(offs_m, offs_d, sv_n, sv_d), mask=q_mask, other=0.0)
        vmap_base = _base(vmap_ptr, z, h, AREA, so_b, so_a, so_h)
        tl.store(vmap_base + o_offs, v_rows, mask=q_mask)


@triton.jit
def _attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr,
    so_b, so_a, so_h, so_n, so_d,
    sdo_b, sdo_a, sdo_h, sdo_n, sdo_d,
    H, AREA, N_Q, D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    zh = tl.program_id(0)
    z = zh // H
    h = zh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N_Q
    mask = m_mask[:, None] & (offs_d < D)[None, :]
    o = tl.load(_base(o_ptr, z, h, AREA, so_b, so_a, so_h) + _tile_offsets(offs_m, offs_d, so_n, so_d),
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(_base(do_ptr, z, h, AREA, sdo_b, sdo_a, sdo_h)
                 + _tile_offsets(offs_m, offs_d, sdo_n, sdo_d), mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + zh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=m_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    sq_b, sq_a, sq_h, sq_n, sq_d,
    sk_b, sk_a, sk_h, sk_n, sk_d,
    sv_b, sv_a, sv_h, sv_n, sv_d,
    sdo_b, sdo_a, sdo_h, sdo_n, sdo_d,
    sdk_b, sdk_a, sdk_h, sdk_n, sdk_d,
    sdv_b, sdv_a, sdv_h, sdv_n, sdv_d,
    H, AREA, N_Q, N_K, D, scale, qk_scale,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    zh = tl.program_id(0)
    z = zh // H
    h = zh % H
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N_K
    d_mask = offs_d < D
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(_base(k_ptr, z, h, AREA, sk_b, sk_a, sk_h) + _tile_offsets(offs_n, offs_d, sk_n, sk_d),
                mask=kv_mask, other=0.0)
    v = tl.load(_base(v_ptr, z, h, AREA, sv_b, sv_a, sv_h) + _tile_offsets(offs_n, offs_d, sv_n, sv_d),
                mask=kv_mask, other=0.0)
    q_base = _base(q_ptr, z, h, AREA, sq_b, sq_a, sq_h)
    do_base = _base(do_ptr, z, h, AREA, sdo_b, sdo_a, sdo_h)
    row = zh.to(tl.int64) * N_Q

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < N_Q
        # q^T and dO^T tiles [BLOCK_D, BLOCK_M]; q and dO [BLOCK_M, BLOCK_D]
        qt_mask = d_mask[:, None] & m_mask[None, :]
        qt = tl.load(q_base + offs_m.to(tl.int64)[None, :] * sq_n + offs_d.to(tl.int64)[:, None] * sq_d,
                     mask=qt_mask, other=0.0)
        dot_t = tl.load(do_base + offs_m.to(tl.int64)[None, :] * sdo_n
                        + offs_d.to(tl.int64)[:, None] * sdo_d, mask=qt_mask, other=0.0)
        lse = tl.load(lse_ptr + row + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + row + offs_m, mask=m_mask, other=0.0)
        st = _mm(k, qt, INPUT_PRECISION, UPCAST_DOT) * qk_scale  # [BLOCK_N, BLOCK_M], base 2
        pt = tl.exp2(st - lse[None, :])
        pt = tl.where(m_mask[None, :], pt, 0.0)
        do = tl.trans(dot_t)
        dv += _mm(pt.to(do.dtype), do, INPUT_PRECISION, UPCAST_DOT)
        dpt = _mm(v, dot_t, INPUT_PRECISION, UPCAST_DOT)  # (dO v^T)^T
        dst = pt * (dpt - delta[None, :])
        q = tl.trans(qt)
        dk += _mm(dst.to(q.dtype), q, INPUT_PRECISION, UPCAST_DOT)
    dk = dk * scale
    tl.store(_base(dk_ptr, z, h, AREA, sdk_b, sdk_a, sdk_h) + _tile_offsets(offs_n, offs_d, sdk_n, sdk_d),
             dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(_base(dv_ptr, z, h, AREA, sdv_b, sdv_a, sdv_h) + _tile_offsets(offs_n, offs_d, sdv_n, sdv_d),
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    sq_b, sq_a, sq_h, sq_n, sq_d,
    sk_b, sk_a, sk_h, sk_n, sk_d,
    sv_b, sv_a, sv_h, sv_n, sv_d,
    sdo_b, sdo_a, sdo_h, sdo_n, sdo_d,
    sdq_b, sdq_a, sdq_h, sdq_n, sdq_d,
    H, AREA, N_Q, N_K, D, scale, qk_scale,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    zh = tl.program_id(0)
    z = zh // H
    h = zh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N_Q
    d_mask = offs_d < D
    q_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(_base(q_ptr, z, h, AREA, sq_b, sq_a, sq_h) + _tile_offsets(offs_m, offs_d, sq_n, sq_d),
                mask=q_mask, other=0.0)
    do = tl.load(_base(do_ptr, z, h, AREA, sdo_b, sdo_a, sdo_h)
                 + _tile_offsets(offs_m, offs_d, sdo_n, sdo_d), mask=q_mask, other=0.0)
    row = zh.to(tl.int64) * N_Q
    lse = tl.load(lse_ptr + row + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row + offs_m, mask=m_mask, other=0.0)
    k_base = _base(k_ptr, z, h, AREA, sk_b, sk_a, sk_h)
    v_base = _base(v_ptr, z, h, AREA, sv_b, sv_a, sv_h)

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N_K
        t_mask = d_mask[:, None] & n_mask[None, :]
        kt = tl.load(k_base + offs_n.to(tl.int64)[None, :] * sk_n + offs_d.to(tl.int64)[:, None] * sk_d,
                     mask=t_mask, other=0.0)
        vt = tl.load(v_base + offs_n.to(tl.int64)[None, :] * sv_n + offs_d.to(tl.int64)[:, None] * sv_d,
                     mask=t_mask, other=0.0)
        s = _mm(q, kt, INPUT_PRECISION, UPCAST_DOT) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(n_mask[None, :], p, 0.0)
        dp = _mm(do, vt, INPUT_PRECISION, UPCAST_DOT)
        ds = p * (dp - delta[:, None])
        k = tl.trans(kt)
        dq += _mm(ds.to(k.dtype), k, INPUT_PRECISION, UPCAST_DOT)
    dq = dq * scale
    tl.store(_base(dq_ptr, z, h, AREA, sdq_b, sdq_a, sdq_h) + _tile_offsets(offs_m, offs_d, sdq_n, sdq_d),
             dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


#: Under the interpreter (``_INTERPRETED``, defined once in :mod:`.conv_norm_act`) bf16 tiles are
#: upcast to fp32 right before each dot (``UPCAST_DOT``): the interpreter keeps bf16 as raw bits and
#: cannot multiply them in ``tl.dot``; the products (bf16 x bf16 is exact in fp32) and the fp32
#: accumulation are those of the compiled tensor-core path, which never upcasts.


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

class View(NamedTuple):
    """A tensor (or a base tensor) plus the five strides ``(b, a, h, n, d)`` of its
    ``[B, AREA, H, N, D]`` view (see the module docstring)."""

    t: torch.Tensor
    strides: Tuple[int, int, int, int, int]


def bhnd(t: torch.Tensor) -> View:
    """``[B, H, N, D]`` with any strides (``AREA = 1``)."""
    sb, sh, sn, sd = t.stride()
    return View(t, (sb, 0, sh, sn, sd))


def _check_precision(input_precision: str) -> str:
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"triton attention: unknown input_precision {input_precision!r}; "
                         f"expected one of {INPUT_PRECISIONS}")
    return input_precision


def _flags(dtype: torch.dtype, input_precision: str):
    return dict(INPUT_PRECISION=_check_precision(input_precision),
                UPCAST_DOT=_INTERPRETED and dtype == torch.bfloat16)


def fwd_views(q: View, k: View, v: View, o: View, lse: torch.Tensor, heads: int, area: int,
              n_q: int, n_k: int, d: int, z: int, scale: float, input_precision: str = "ieee",
              vmap: Optional[torch.Tensor] = None) -> None:
    """Forward over strided views: writes ``o`` (and ``vmap`` in ``o``'s layout) and ``lse``
    ``[z*heads, n_q]`` (fp32, contiguous). ``z`` is the number of (batch, area) pairs."""
    cfg = attn_config(d)
    grid = (z * heads, triton.cdiv(n_q, cfg.fwd_m))
    _attn_fwd_kernel[grid](
        q.t, k.t, v.t, o.t, lse, vmap if vmap is not None else o.t,
        *q.strides, *k.strides, *v.strides, *o.strides,
        heads, area, n_q, n_k, d, scale * _LOG2E,
        WRITE_V=vmap is not None, **_flags(q.t.dtype, input_precision),
        BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )


def bwd_views(q: View, k: View, v: View, o: View, do: View, lse: torch.Tensor, dq: View, dk: View,
              dv: View, heads: int, area: int, n_q: int, n_k: int, d: int, z: int, scale: float,
              input_precision: str = "ieee") -> None:
    """Backward over strided views: writes ``dq``, ``dk``, ``dv``."""
    cfg = attn_config(d)
    delta = torch.empty_like(lse)
    _attn_bwd_preprocess_kernel[(z * heads, triton.cdiv(n_q, 64))](
        o.t, do.t, delta, *o.strides, *do.strides, heads, area, n_q, d,
        BLOCK_M=64, BLOCK_D=cfg.block_d, num_warps=4,
    )
    flags = _flags(q.t.dtype, input_precision)
    _attn_bwd_dkdv_kernel[(z * heads, triton.cdiv(n_k, cfg.bwd_kv_n))](
        q.t, k.t, v.t, do.t, lse, delta, dk.t, dv.t,
        *q.strides, *k.strides, *v.strides, *do.strides, *dk.strides, *dv.strides,
        heads, area, n_q, n_k, d, scale, scale * _LOG2E, **flags,
        BLOCK_N=cfg.bwd_kv_n, BLOCK_M=cfg.bwd_kv_m, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )
    _attn_bwd_dq_kernel[(z * heads, triton.cdiv(n_q, cfg.bwd_q_m))](
        q.t, k.t, v.t, do.t, lse, delta, dq.t,
        *q.strides, *k.strides, *v.strides, *do.strides, *dq.strides,
        heads, area, n_q, n_k, d, scale, scale * _LOG2E, **flags,
        BLOCK_M=cfg.bwd_q_m, BLOCK_N=cfg.bwd_q_n, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )


def _check(*tensors: torch.Tensor) -> None:
    dtype, device = tensors[0].dtype, tensors[0].device
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton attention: unsupported dtype {dtype} (float32, float16, bfloat16)")
    for t in tensors:
        if t.dtype != dtype or t.device != device:
            raise ValueError("triton attention: all tensors must share one dtype and device")


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      input_precision: str = "ieee") -> Tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[B, H, Nq, D]``, ``k``/``v`` ``[B, H, Nk, D]`` (any strides) ->
    ``(out [B, H, Nq, D] contiguous, lse [B, H, Nq] fp32)``."""
    _check(q, k, v)
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    out = torch.empty((b, h, n_q, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device)
    fwd_views(bhnd(q), bhnd(k), bhnd(v), bhnd(out), lse, h, 1, n_q, n_k, d, b, scale,
              input_precision)
    return out, lse


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, grad_out: torch.Tensor, scale: float,
                       input_precision: str = "ieee") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` from the forward's output and log-sum-exp (any strides)."""
    _check(q, k, v, out, grad_out)
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    bwd_views(bhnd(q), bhnd(k), bhnd(v), bhnd(out), bhnd(grad_out), lse.contiguous(), bhnd(dq),
              bhnd(dk), bhnd(dv), h, 1, n_q, n_k, d, b, scale, input_precision)
    return dq, dk, dv


def _spatial_ok(t: torch.Tensor) -> bool:
    """Whether map position ``p = y * W + x`` has one stride (NCHW or channels-last strides)."""
    return t.dim() == 4 and t.stride(2) == t.shape[3] * t.stride(3)


def _map_strides(t: torch.Tensor, channel_step: int, run: int) -> Tuple[int, int, int, int, int]:
    """``(b, area, head, token, d)`` strides of a ``[B, channels, Hm, Wm]`` map whose head
    ``h`` starts at channel ``h * channel_step``."""
    sb, sc, _, sp = t.stride()
    return (sb, run * sp, channel_step * sc, sp, sc)


def _area_views(qkv: torch.Tensor, num_heads: int, area: int):
    """Views of q, k, v inside the qkv map ``[B, 3C, Hm, Wm]``."""
    _, c3, hm, wm = qkv.shape
    hd = c3 // (3 * num_heads)
    run = hm * wm // area
    strides = _map_strides(qkv, 3 * hd, run)
    return (View(qkv, strides), View(qkv[:, hd:], strides), View(qkv[:, 2 * hd:], strides),
            hd, run)


def _map_view(t: torch.Tensor, hd: int, run: int) -> View:
    """A ``[B, C, Hm, Wm]`` map as the ``[B, area, heads, run, hd]`` view."""
    return View(t, _map_strides(t, hd, run))


def _check_maps(op: str, **maps: torch.Tensor) -> None:
    for name, t in maps.items():
        if not _spatial_ok(t):
            raise ValueError(f"triton {op}: {name} must have NCHW or channels-last strides, got "
                             f"{t.stride()}")


def area_attention_forward(qkv: torch.Tensor, num_heads: int, area: int, scale: float,
                           input_precision: str = "ieee"):
    """YOLOv12 area attention straight from the qkv map ``[B, 3C, Hm, Wm]`` (NCHW or
    channels-last strides): ``(out, v_map, lse)`` with ``out`` and ``v_map`` ``[B, C, Hm, Wm]``
    in ``qkv``'s memory format and ``lse`` ``[B*area, heads, N/area]`` fp32."""
    _check(qkv)
    _check_maps("area_attention", qkv=qkv)
    b, c3, hm, wm = qkv.shape
    q, k, v, hd, run = _area_views(qkv, num_heads, area)
    fmt = torch.channels_last if not qkv.is_contiguous() else torch.contiguous_format
    out = torch.empty((b, c3 // 3, hm, wm), dtype=qkv.dtype, device=qkv.device,
                      memory_format=fmt)
    vmap = torch.empty_like(out)
    lse = torch.empty((b * area, num_heads, run), dtype=torch.float32, device=qkv.device)
    fwd_views(q, k, v, _map_view(out, hd, run), lse, num_heads, area, run, run, hd, b * area,
              scale, input_precision, vmap=vmap)
    return out, vmap, lse


def area_attention_backward(qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                            grad_out: torch.Tensor, num_heads: int, area: int, scale: float,
                            input_precision: str = "ieee") -> torch.Tensor:
    """``d(qkv)`` ``[B, 3C, Hm, Wm]`` (``qkv``'s strides) of the attention output: dq, dk and dv
    are written straight into the interleaved gradient map. Every map needs NCHW or
    channels-last strides (each its own)."""
    _check(qkv, out, grad_out)
    _check_maps("area_attention backward", qkv=qkv, out=out, grad_out=grad_out)
    b = qkv.shape[0]
    q, k, v, hd, run = _area_views(qkv, num_heads, area)
    dqkv = torch.empty_like(qkv)
    dq, dk, dv, _, _ = _area_views(dqkv, num_heads, area)
    bwd_views(q, k, v, _map_view(out, hd, run), _map_view(grad_out, hd, run), lse.contiguous(),
              dq, dk, dv, num_heads, area, run, run, hd, b * area, scale, input_precision)
    return dqkv


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
