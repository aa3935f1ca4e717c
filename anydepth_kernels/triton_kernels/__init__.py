"""Triton implementations of the fused ops (:mod:`.conv_norm_act`, :mod:`.concat_conv`,
:mod:`.basis_conv`, :mod:`.ms_deform_attn`).

Importing this package never raises: when Triton cannot be imported, ``AVAILABLE`` is False and
``UNAVAILABLE_REASON`` says why; otherwise the kernels' entry points are re-exported here.
They run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton
was first imported.
"""
from __future__ import annotations

from typing import Optional

AVAILABLE: bool
UNAVAILABLE_REASON: Optional[str]

try:
    from .conv_norm_act import conv1x1_norm_act, conv_norm_act, scale_bias_act
    from .concat_conv import concat_conv1x1
    from .basis_conv import basis_conv_norm_act
    from .ms_deform_attn import ms_deform_attn_backward, ms_deform_attn_forward
    from .attention import (
        area_attention_backward,
        area_attention_forward,
        attention_backward,
        attention_forward,
    )
except Exception as exc:  # noqa: BLE001 - any failure (missing, broken install) disables it
    AVAILABLE = False
    UNAVAILABLE_REASON = f"Triton is not usable: {type(exc).__name__}: {exc}"
    __all__ = ["AVAILABLE", "UNAVAILABLE_REASON"]
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = None
    __all__ = [
        "AVAILABLE",
        "UNAVAILABLE_REASON",
        "area_attention_backward",
        "area_attention_forward",
        "attention_backward",
        "attention_forward",
        "basis_conv_norm_act",
        "concat_conv1x1",
        "conv1x1_norm_act",
        "conv_norm_act",
        "ms_deform_attn_backward",
        "ms_deform_attn_forward",
        "scale_bias_act",
    ]
