"""Multi-scale deformable attention: ``anydepth_kernels.ms_deform_attn(...)``.

Same signature as Deformable-DETR's ``MSDeformAttnFunction`` / HF's
``multi_scale_deformable_attention``; see :func:`anydepth_kernels.reference.ms_deform_attn` for
the semantics. This module is the single entry point: fast backends plug in behind it.
"""
from __future__ import annotations

import torch

from .. import reference

MS_DEFORM_BACKENDS = ("auto", "reference")


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    op = "ms_deform_attn"
    for name, t in (("value", value), ("spatial_shapes", spatial_shapes),
                    ("level_start_index", level_start_index),
                    ("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise ValueError(f"{op}: value must be [N, S, M, D], got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{op}: value must be floating point, got {value.dtype}")
    n, s, m, d = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.is_floating_point():
        raise ValueError(f"{op}: spatial_shapes must be an integer [L, 2] tensor, got "
                         f"{tuple(spatial_shapes.shape)} {spatial_shapes.dtype}")
    levels = spatial_shapes.shape[0]
    if level_start_index.shape != (levels,) or level_start_index.is_floating_point():
        raise ValueError(f"{op}: level_start_index must be an integer [L={levels}] tensor, got "
                         f"{tuple(level_start_index.shape)} {level_start_index.dtype}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[0] != n or sampling_locations.shape[2] != m \
            or sampling_locations.shape[3] != levels or sampling_locations.shape[5] != 2:
        raise ValueError(f"{op}: sampling_locations must be [N={n}, Q, M={m}, L={levels}, P, 2], got "
                         f"{tuple(sampling_locations.shape)}")
    q, p = sampling_locations.shape[1], sampling_locations.shape[4]
    if tuple(attention_weights.shape) != (n, q, m, levels, p):
        raise ValueError(f"{op}: attention_weights must be [N, Q, M, L, P] = {(n, q, m, levels, p)}, "
                         f"got {tuple(attention_weights.shape)}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.dtype != value.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but value has {value.dtype}")
        if t.device != value.device:
            raise ValueError(f"{op}: {name} is on {t.device} but value is on {value.device}")
    if not torch.compiler.is_compiling():
        hw = spatial_shapes.prod(1)
        if int(hw.sum()) != s:
            raise ValueError(f"{op}: value has S={s} positions but spatial_shapes sum to {int(hw.sum())}")
        starts = torch.cat([hw.new_zeros(1), hw.cumsum(0)[:-1]])
        if not torch.equal(starts.to(level_start_index.device), level_start_index.long()):
            raise ValueError(f"{op}: level_start_index {level_start_index.tolist()} does not match "
                             f"spatial_shapes (expected {starts.tolist()})")


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                   backend: str = "auto") -> torch.Tensor:
    """Multi-scale deformable attention ``-> [N, Q, M*D]`` (see module docstring)."""
    if backend not in MS_DEFORM_BACKENDS:
        raise ValueError(f"ms_deform_attn: unknown backend {backend!r}; expected one of {MS_DEFORM_BACKENDS}")
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return reference.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights)
