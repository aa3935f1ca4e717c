"""anydepth: any-depth object detectors and classifiers — one network, one set of weights, depth
chosen per call.

    model = anydepth.create_model("yolov12s-anydepth")        # or a converter in anydepth.convert
    model(x, depth="base") / model(x, depth=0.5) / model.predict(images, depth="full")
    clf = anydepth.create_model("resnet50-anydepth")          # logits [N, 1000]; from_torchvision(...)

The fused kernels live in :mod:`anydepth_kernels`.
"""
from . import checkpoint
from .budget import BudgetError, DepthController, DepthProfile, load_profile
from .checkpoint import load, save
from .classify import AnyDepthClassifier, Classification
from .depth import DepthConfig, DepthSpace, KnobSpec
from .detection import Detections
from .family import ModelFamily, families, family_of, register_family
from .model import AnyDepthModel
from .nn import ConvNormAct, SkipAwareBatchNorm2d, SkipAwareLayerNorm, SkippableStage, split_blocks
from .registry import create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "AnyDepthClassifier",
    "AnyDepthModel",
    "BudgetError",
    "Classification",
    "ConvNormAct",
    "DepthConfig",
    "DepthController",
    "DepthProfile",
    "DepthSpace",
    "Detections",
    "KnobSpec",
    "ModelFamily",
    "SkipAwareBatchNorm2d",
    "SkipAwareLayerNorm",
    "SkippableStage",
    "checkpoint",
    "create_model",
    "families",
    "family_of",
    "list_models",
    "load",
    "load_profile",
    "register_family",
    "register_model",
    "save",
    "split_blocks",
]
