"""Triton kernels of multi-scale deformable attention (forward and backward).

Layout and semantics as :func:`anydepth_kernels.reference.ms_deform_attn` (Deformable-DETR
convention; bilinear sampling with zero padding, ``grid_sample(align_corners=False)``).

``_msda_fwd_kernel``
    Grid ``(cdiv(Q, BLOCK_Q), M, N)``: one program per (batch, block of queries, head). It holds
    an fp32 ``[BLOCK_Q, BLOCK_D]`` accumulator (``BLOCK_D`` = the head dim rounded up to a power
    of two, the excess channels masked), loops over levels and points, gathers the four corner
    rows of ``value`` (masked loads: corners outside the map read 0) and adds
    ``a * sum_c w_c * v_c``. The output is stored once.

``_msda_bwd_kernel``
    Same grid. Per point it computes the four corner dot products ``<grad_out, v_c>`` (row sums
    of the tile), from which ``grad_attention_weights`` and ``grad_sampling_locations`` follow,
    and ``tl.atomic_add``-s ``a * w_c * grad_out`` into an fp32 ``grad_value`` buffer (cast to
    the value dtype by the launcher).

Non-finite inputs follow the reference: a non-finite location samples NaN, the weight
multiplies the sample (``inf * 0 = NaN``). float32, float16 and bfloat16 inputs, fp32 arithmetic.
The kernels bound the level table themselves (they read no host copy of it): every point of a
level that is empty or does not lie inside ``[0, S)`` is treated as a non-finite location (NaN
output and gradients, nothing read or written), so a table the Python layer did not re-check (on
CUDA it checks each table once, and not at all during CUDA graph capture) cannot reach outside
``value``.
Runs on CUDA tensors and, under ``TRITON_INTERPRET=1`` (set before this module is imported), on
CPU tensors.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

# No module-level NaN/inf constants: before each launch, Triton's launcher compares every global
# a kernel reads with its value at compile time using ``!=``, and a NaN global never equals
# itself ("Global variable _NAN has changed since we compiled this kernel" on the first GPU run).
# The kernels write ``float("nan")`` / ``float("inf")`` inline: compile-time constants, not
# globals (tests/test_ms_deform_attn.py::test_triton_kernel_globals_compare_equal checks this).

#: Elements of the ``[BLOCK_Q, BLOCK_D]`` tile of one program.
MSDA_TILE = 2048
#: Head-dim blocks the launchers use (the smallest power of two >= D, at least 16).
MSDA_BLOCK_DS = (16, 32, 64, 128, 256, 512)


class MsdaConfig(NamedTuple):
    block_q: int
    block_d: int
    num_warps: int


def msda_config(d: int) -> MsdaConfig:
    """The tile for head dim ``d``: ``BLOCK_D`` covers ``d``, ``BLOCK_Q * BLOCK_D <= MSDA_TILE``."""
    block_d = max(16, triton.next_power_of_2(d))
    block_q = max(1, min(64, MSDA_TILE // block_d))
    return MsdaConfig(block_q, block_d, 4)


@triton.jit
def _corner(value_nm, row_stride, xi, yi, H, W, start, ok, ds, d_mask):
    """Value rows of one corner ``[BLOCK_Q, BLOCK_D]`` (0 outside the map) and its mask/offsets."""
    valid = ok & (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
    row = (start + yi.to(tl.int64) * W + xi).to(tl.int64)
    row = tl.where(valid, row, 0)
    offs = row[:, None] * row_stride + ds[None, :]
    mask = valid[:, None] & d_mask[None, :]
    v = tl.load(value_nm + offs, mask=mask, other=0.0).to(tl.float32)
    return v, offs, mask


@triton.jit
def _level(shapes_ptr, starts_ptr, l, S):
    """``(H, W, start, ok)`` of level ``l``; ``ok``: the level is non-empty and lies inside
    ``[0, S)``. The Python layer validates the table, but on CUDA it may skip that (a table it
    has already checked, CUDA graph capture), so the kernels bound it themselves: the points of
    a level that does not fit sample NaN and read nothing."""
    H = tl.load(shapes_ptr + 2 * l)
    W = tl.load(shapes_ptr + 2 * l + 1)
    start = tl.load(starts_ptr + l)
    ok = (H > 0) & (W > 0) & (start >= 0) & (start <= S)
    ok = ok & (H <= (S - start) // tl.maximum(W, 1))
    return H, W, start, ok


@triton.jit
def _point(loc_ptr, attn_ptr, pi, q_mask, H, W, level_ok):
    """Weight, pixel coordinates and validity flags of one point per query of the block
    (every point of a level that does not fit is treated as a non-finite location)."""
    a = tl.load(attn_ptr + pi, mask=q_mask, other=0.0).to(tl.float32)
    Wf = W.to(tl.float32)
    Hf = H.to(tl.float32)
    x = tl.load(loc_ptr + 2 * pi, mask=q_mask, other=0.0).to(tl.float32) * Wf - 0.5
    y = tl.load(loc_ptr + 2 * pi + 1, mask=q_mask, other=0.0).to(tl.float32) * Hf - 0.5
    x = tl.where(level_ok, x, float("nan"))  # a level that does not fit: a non-finite point
    finite = (tl.abs(x) < float("inf")) & (tl.abs(y) < float("inf"))  # False for NaN too
    inside = finite & (x >= -1.0) & (y >= -1.0) & (x < Wf) & (y < Hf) & q_mask
    xf = tl.floor(tl.where(inside, x, 0.0))
    yf = tl.floor(tl.where(inside, y, 0.0))
    return a, finite, inside, xf, yf, x - xf, y - yf


@triton.jit
def _msda_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    S, M, D, L, Q, P,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    m = tl.program_id(1)
    n = tl.program_id(2)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ds = tl.arange(0, BLOCK_D)
    q_mask = qs < Q
    d_mask = ds < D
    nqm = (n.to(tl.int64) * Q + qs) * M + m
    row_stride = M * D
    value_nm = value_ptr + (n.to(tl.int64) * S * M + m) * D
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for l in range(0, L):
        H, W, start, level_ok = _level(shapes_ptr, starts_ptr, l, S)
        for p in range(0, P):
            pi = (nqm * L + l) * P + p
            a, finite, inside, xf, yf, fx, fy = _point(loc_ptr, attn_ptr, pi, q_mask, H, W,
                                                       level_ok)
            x0 = xf.to(tl.int64)
            y0 = yf.to(tl.int64)
            v00, _o00, _m00 = _corner(value_nm, row_stride, x0, y0, H, W, start, inside, ds, d_mask)
            v01, _o01, _m01 = _corner(value_nm, row_stride, x0 + 1, y0, H, W, start, inside, ds, d_mask)
            v10, _o10, _m10 = _corner(value_nm, row_stride, x0, y0 + 1, H, W, start, inside, ds, d_mask)
            v11, _o11, _m11 = _corner(value_nm, row_stride, x0 + 1, y0 + 1, H, W, start, inside, ds, d_mask)
            gx = 1.0 - fx
            gy = 1.0 - fy
            s = ((gx * gy)[:, None] * v00 + (fx * gy)[:, None] * v01
                 + (gx * fy)[:, None] * v10 + (fx * fy)[:, None] * v11)
            s = tl.where(finite[:, None], s, float("nan"))
            acc += a[:, None] * s
    out_offs = nqm[:, None] * D + ds[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty),
             mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _msda_bwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    S, M, D, L, Q, P,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    m = tl.program_id(1)
    n = tl.program_id(2)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ds = tl.arange(0, BLOCK_D)
    q_mask = qs < Q
    d_mask = ds < D
    nqm = (n.to(tl.int64) * Q + qs) * M + m
    row_stride = M * D
    nm_offset = (n.to(tl.int64) * S * M + m) * D
    value_nm = value_ptr + nm_offset
    gvalue_nm = grad_value_ptr + nm_offset
    g = tl.load(grad_out_ptr + nqm[:, None] * D + ds[None, :],
                mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    for l in range(0, L):
        H, W, start, level_ok = _level(shapes_ptr, starts_ptr, l, S)
        for p in range(0, P):
            pi = (nqm * L + l) * P + p
            a, finite, inside, xf, yf, fx, fy = _point(loc_ptr, attn_ptr, pi, q_mask, H, W,
                                                       level_ok)
            x0 = xf.to(tl.int64)
            y0 = yf.to(tl.int64)
            gx = 1.0 - fx
            gy = 1.0 - fy
            w00 = gx * gy
            w01 = fx * gy
            w10 = gx * fy
            w11 = fx * fy
            v00, o00, m00 = _corner(value_nm, row_stride, x0, y0, H, W, start, inside, ds, d_mask)
            v01, o01, m01 = _corner(value_nm, row_stride, x0 + 1, y0, H, W, start, inside, ds, d_mask)
            v10, o10, m10 = _corner(value_nm, row_stride, x0, y0 + 1, H, W, start, inside, ds, d_mask)
            v11, o11, m11 = _corner(value_nm, row_stride, x0 + 1, y0 + 1, H, W, start, inside, ds, d_mask)
            dot00 = tl.sum(g * v00, axis=1)
            dot01 = tl.sum(g * v01, axis=1)
            dot10 = tl.sum(g * v10, axis=1)
            dot11 = tl.sum(g * v11, axis=1)
            tl.atomic_add(gvalue_nm + o00, (a * w00)[:, None] * g, mask=m00)
            tl.atomic_add(gvalue_nm + o01, (a * w01)[:, None] * g, mask=m01)
            tl.atomic_add(gvalue_nm + o10, (a * w10)[:, None] * g, mask=m10)
            tl.atomic_add(gvalue_nm + o11, (a * w11)[:, None] * g, mask=m11)
            g_attn = w00 * dot00 + w01 * dot01 + w10 * dot10 + w11 * dot11
            g_x = a * W.to(tl.float32) * (gy * (dot01 - dot00) + fy * (dot11 - dot10))
            g_y = a * H.to(tl.float32) * (gx * (dot10 - dot00) + fx * (dot11 - dot01))
            g_attn = tl.where(finite, tl.where(inside, g_attn, 0.0), float("nan"))
            g_x = tl.where(finite, tl.where(inside, g_x, 0.0), float("nan"))
            g_y = tl.where(finite, tl.where(inside, g_y, 0.0), float("nan"))
            tl.store(grad_attn_ptr + pi, g_attn.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * pi, g_x.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * pi + 1, g_y.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)


def _check(value, spatial_shapes, level_start_index, loc, attn):
    if value.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton ms_deform_attn: unsupported dtype {value.dtype} "
                        "(float32, float16, bfloat16)")
    for t in (value, spatial_shapes, level_start_index, loc, attn):
        if t.device != value.device or not t.is_contiguous():
            raise ValueError("triton ms_deform_attn: all tensors must be contiguous and on "
                             f"{value.device}")
    if spatial_shapes.dtype != torch.int64 or level_start_index.dtype != torch.int64:
        raise TypeError("triton ms_deform_attn: spatial_shapes and level_start_index must be int64")


def _grid(n: int, q: int, m: int, block_q: int) -> Tuple[int, int, int]:
    return (triton.cdiv(q, block_q), m, n)


def ms_deform_attn_forward(value: torch.Tensor, spatial_shapes: torch.Tensor,
                           level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                           attention_weights: torch.Tensor) -> torch.Tensor:
    """``[N, Q, M * D]`` output; contiguous inputs on one device, int64 level tables."""
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, s, m, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    out = torch.empty((n, q, m * d), dtype=value.dtype, device=value.device)
    if out.numel() == 0:
        return out
    cfg = msda_config(d)
    _msda_fwd_kernel[_grid(n, q, m, cfg.block_q)](
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
        s, m, d, levels, q, points,
        BLOCK_Q=cfg.block_q, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )
    return out


def ms_deform_attn_backward(value: torch.Tensor, spatial_shapes: torch.Tensor,
                            level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                            attention_weights: torch.Tensor, grad_output: torch.Tensor):
    """``(grad_value, grad_sampling_locations, grad_attention_weights)``."""
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, s, m, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    if tuple(grad_output.shape) != (n, q, m * d) or not grad_output.is_contiguous() \
            or grad_output.dtype != value.dtype:
        raise ValueError("triton ms_deform_attn backward: grad_output must be a contiguous "
                         f"[N, Q, M*D] = {(n, q, m * d)} tensor of value's dtype")
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    grad_loc = torch.zeros_like(sampling_locations)
    grad_attn = torch.zeros_like(attention_weights)
    if grad_attn.numel() and d:
        cfg = msda_config(d)
        _msda_bwd_kernel[_grid(n, q, m, cfg.block_q)](
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output, grad_value, grad_loc, grad_attn,
            s, m, d, levels, q, points,
            BLOCK_Q=cfg.block_q, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
        )
    return grad_value.to(value.dtype), grad_loc, grad_attn
