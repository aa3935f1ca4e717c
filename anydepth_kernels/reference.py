"""Eager references: the oracle for every fast implementation.

One function per op, plain PyTorch, written to be read. Every backend (C++ CPU, CUDA, Triton) is
tested against these, and the dispatcher falls back to them when no fast implementation applies.
Inputs are assumed validated (see ``anydepth_kernels.ops._checks``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

#: Activations the fused epilogues implement. Index in this tuple is the integer code used by
#: the compiled kernels.
ACTIVATIONS = ("identity", "relu", "silu")

IntOr2 = Union[int, Sequence[int]]


def apply_activation(z: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(z)
    if act == "relu":
        return F.relu(z)
    if act == "identity":
        return z
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def scale_bias_act(
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    act: str = "silu",
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``act(y * scale[c] + bias[c]) + residual`` for ``y`` of shape ``[N, C, H, W]``.

    This is a folded BatchNorm (or one of the two BatchNorm sets of a skip-aware norm) followed by
    the activation and an optional residual add, the epilogue of every switchable conv block.
    Arithmetic is in fp32 (in fp64 for fp64 inputs); the result has ``y``'s dtype, as in every
    fast implementation.
    """
    shape = (1, -1) + (1,) * (y.dim() - 2)
    cdt = torch.float64 if y.dtype == torch.float64 else torch.float32
    z = y.to(cdt) * scale.to(cdt).view(shape) + bias.to(cdt).view(shape)
    out = apply_activation(z, act)
    if residual is not None:
        out = out + residual.to(cdt)
    return out.to(y.dtype)


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
) -> torch.Tensor:
    """``act(conv2d(x, weight) * scale + bias) + residual`` (conv without bias: fold it into ``bias``)."""
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    return scale_bias_act(y, scale, bias, act, residual)


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
) -> torch.Tensor:
    """The factored conv block of a shared filter basis: ``act((coeff @ conv2d(x, basis)) * scale
    + bias) + residual``, with ``basis`` ``[R, C, kh, kw]`` (R basis filters), ``coeff``
    ``[C_out, R]`` or ``[C_out, R, 1, 1]`` (the 1x1 coefficient conv, the basis norm folded in) and
    the output norm folded into ``(scale, bias)``. Two convolutions, the ``[N, R, H, W]``
    intermediate materialised in between."""
    y = F.conv2d(x, basis, None, stride, padding, dilation)
    y = F.conv2d(y, coeff.reshape(coeff.shape[0], -1, 1, 1))
    return scale_bias_act(y, scale, bias, act, residual)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: Union[torch.Tensor, Sequence[Sequence[int]]],
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable-DETR convention).

    ``value[N, S, M, D]`` holds the flattened feature maps of ``L`` levels (``S = sum(H_l * W_l)``,
    level ``l`` starting at ``level_start_index[l]``, shape ``spatial_shapes[l] = (H_l, W_l)``),
    ``M`` heads of ``D`` channels. Each query ``q`` and head ``m`` samples ``P`` points per level at
    ``sampling_locations[n, q, m, l, p] = (x, y)`` in [0, 1] (normalised over width and height),
    bilinearly with zero padding outside the map (``grid_sample(align_corners=False,
    padding_mode="zeros")``), and sums them weighted by ``attention_weights[n, q, m, l, p]``.
    Returns ``[N, Q, M * D]``. ``spatial_shapes`` may also be a list of ``(H, W)`` (a traceable
    form with the shapes fixed: the export's decomposition; ``level_start_index`` is not read).
    """
    n, _, m, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        v = values[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # [N, Q, M, P, 2] -> [N*M, Q, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N*M, D, Q, L, P] weighted by [N*M, 1, Q, L, P]
    stacked = torch.stack(sampled, dim=-2)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, q, levels, points)
    out = (stacked * weights).sum((-1, -2)).view(n, m * d, q)
    return out.transpose(1, 2).contiguous()


def concat_conv1x1(
    xs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    act: str = "silu",
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``act(conv1x1(cat(xs), weight[:, :C]) * scale + bias) + residual`` with ``C`` the inputs'
    total channels: the output conv of a CSP module over the branches present (a shallow path
    passes fewer branches and reads the weight's first input channels)."""
    x = torch.cat(list(xs), 1)
    y = F.conv2d(x, weight[:, : x.shape[1]])
    return scale_bias_act(y, scale, bias, act, residual)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over ``[..., N, D]`` tensors (no mask, non-causal).

    Written out (scores, softmax, weighted sum) and computed in at least float32 (float16/bfloat16
    inputs are upcast, the result is cast back); ``scale`` defaults to ``1/sqrt(D)``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ct = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    return torch.matmul(scores.softmax(dim=-1), v.to(ct)).to(q.dtype)


def area_attention(
    qkv: torch.Tensor, num_heads: int, area: int, scale: Optional[float] = None
):
    """YOLOv12 area attention on the qkv 1x1-conv output ``[B, 3C, H, W]`` -> ``(out, v_map)``.

    Positions ``p = y * W + x`` are split into ``area`` contiguous runs of ``H*W / area``; each run
    is a separate attention problem. Channel ``head * 3*hd + {0: q, hd: k, 2hd: v} + d`` holds
    head ``head``'s query, key or value lane ``d`` (``hd = C / num_heads``). Both outputs are
    ``[B, C, H, W]``: the attention output and the values, each in map layout (channel
    ``head * hd + d``). The explicit reshapes below are the definition.
    """
    b, c3, h, w = qkv.shape
    c, n = c3 // 3, h * w
    hd = c // num_heads
    tokens = qkv.flatten(2).transpose(1, 2)  # [B, N, 3C]
    tokens = tokens.reshape(b * area, n // area, num_heads, 3 * hd).transpose(1, 2)
    q, k, v = tokens.split(hd, dim=-1)  # each [B*area, heads, N/area, hd]

    def to_map(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(b, n, c).transpose(1, 2).reshape(b, c, h, w)

    return to_map(attention(q, k, v, scale)), to_map(v)
