"""Functional ops (``torch.ops.anydepth.*``), each with one eager reference and fast backends."""
from .conv_norm_act import BACKENDS, conv_norm_act, scale_bias_act, select_backend

__all__ = ["BACKENDS", "conv_norm_act", "scale_bias_act", "select_backend"]
