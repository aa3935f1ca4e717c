"""anydepth: any-depth object detectors — one network, one set of weights, depth chosen per call.

This release holds the depth-control API and the building blocks of the model families; the
fused kernels live in :mod:`anydepth_kernels`.
"""
from .depth import DepthConfig, DepthSpace, KnobSpec
from .model import AnyDepthModel
from .nn import ConvNormAct, SkipAwareBatchNorm2d, SkipAwareLayerNorm, SkippableStage, split_blocks

__version__ = "0.1.0"

__all__ = [
    "AnyDepthModel",
    "ConvNormAct",
    "DepthConfig",
    "DepthSpace",
    "KnobSpec",
    "SkipAwareBatchNorm2d",
    "SkipAwareLayerNorm",
    "SkippableStage",
    "split_blocks",
]
