"""FLOP formulas for ``torch.utils.flop_counter`` that it does not know on its own: our fused ops
(opaque to it, so a fused model would otherwise count ~0) and the CPU flash-attention kernel
behind ``scaled_dot_product_attention``. A multiply-add counts as 2 FLOPs, as flop_counter does.

    with FlopCounterMode(custom_mapping=anydepth_kernels.flops.flop_mapping()): model(x)
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict

import torch


def _conv(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    # w: [C_out, C_in/groups, kh, kw]; out: [N, C_out, Ho, Wo]
    return 2 * math.prod(out_shape) * math.prod(w_shape[1:])


def _concat_conv(xs_shapes, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(out_shape) * sum(s[1] for s in xs_shapes)


def _basis_conv(x_shape, basis_shape, coeff_shape, *args, out_shape=None, **kwargs) -> int:
    # basis conv [R, C, kh, kw] over the output pixels, then the [C_out, R] coefficient GEMM
    pixels = out_shape[0] * out_shape[2] * out_shape[3]
    return 2 * pixels * (math.prod(basis_shape) + coeff_shape[0] * coeff_shape[1])


def _attention_bhnd(q_shape, k_shape, *args, **kwargs) -> int:
    b, h, nq, d = q_shape
    return 4 * b * h * nq * k_shape[-2] * d  # q k^T and p v


def _sdpa_cpu(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_bhnd(q_shape, k_shape)


def _area_attention(qkv_shape, num_heads, area=1, *args, **kwargs) -> int:
    b, c3, h, w = qkv_shape
    c = c3 // 3
    n = h * w
    return 4 * b * n * (n // max(area, 1)) * c  # per area: (n/area)^2 * d per head, area*heads of them


def _ms_deform(value_shape, shapes_shape, start_shape, loc_shape, *args, out_shape=None, **kwargs) -> int:
    n, q, m, levels, points, _ = loc_shape
    d = value_shape[-1]
    return 2 * 5 * n * q * m * levels * points * d  # 4 bilinear corners + the attention weight


def flop_mapping() -> Dict[Any, Callable]:
    """``{op overload packet: formula}`` for ``FlopCounterMode(custom_mapping=...)``."""
    ops = torch.ops.anydepth
    mapping: Dict[Any, Callable] = {}

    def add(namespace, name, fn):
        packet = getattr(namespace, name, None)
        if packet is not None:
            mapping[packet] = fn  # flop_counter keys its registry by overload packet

    add(ops, "conv_norm_act", _conv)
    add(ops, "concat_conv1x1", _concat_conv)
    add(ops, "basis_conv_norm_act", _basis_conv)
    add(ops, "attention", _attention_bhnd)
    add(ops, "area_attention", _area_attention)
    add(ops, "ms_deform_attn", _ms_deform)
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        mapping[cpu_flash] = _sdpa_cpu
    return mapping
