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
