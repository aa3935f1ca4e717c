"""Fused kernels for any-depth detectors, usable on their own.

Ops are registered as ``torch.ops.anydepth.*`` (schema, fake kernel, autograd) and dispatch to a
compiled C++ (CPU), CUDA or Triton implementation, with the eager reference in
:mod:`anydepth_kernels.reference` as the fallback. :func:`extension_info` says what is available.
"""
from ._ext import extension_info
from .cuda_graphs import CUDAGraphRunner
from .modules import FusedConvNormAct, activation_name, fold_batchnorm
from .ops import BACKENDS, conv_norm_act, scale_bias_act
from .ops.concat_conv import concat_conv1x1
from .ops.basis_conv import basis_conv_norm_act
from .ops.ms_deform_attn import ms_deform_attn
from .ops.attention import area_attention, attention
from .optimize import (OptimizeReport, bf16_supported, float32_modules, optimize, register_float32_modules,
                       register_swap, unregister_swap)
from .shared_basis import (
    FactoredConvNormAct,
    SharedBasis,
    SharedBasisConv2d,
    SharedBasisGroup,
    deploy_table,
    orthogonality_penalty,
    share_bases,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "CUDAGraphRunner",
    "FactoredConvNormAct",
    "SharedBasis",
    "SharedBasisConv2d",
    "SharedBasisGroup",
    "basis_conv_norm_act",
    "deploy_table",
    "orthogonality_penalty",
    "share_bases",
    "FusedConvNormAct",
    "activation_name",
    "area_attention",
    "attention",
    "bf16_supported",
    "concat_conv1x1",
    "conv_norm_act",
    "extension_info",
    "fold_batchnorm",
    "ms_deform_attn",
    "optimize",
    "OptimizeReport",
    "register_float32_modules",
    "float32_modules",
    "register_swap",
    "unregister_swap",
    "scale_bias_act",
]
