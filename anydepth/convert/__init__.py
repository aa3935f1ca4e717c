"""Weight import from the implementations people already run.

* :func:`from_ultralytics` — an Ultralytics YOLO12 ``DetectionModel`` (or its checkpoint / state
  dict) to ``yolov12{n,s,m,l,x}-anydepth``.
* :func:`from_transformers` — a HuggingFace ``RTDetrForObjectDetection`` (or its state dict and
  config) to ``rtdetr-r{18,34,50,101}-anydepth``.
* :func:`from_authors_yolo` — the authors' released AnyDepth-YOLOv12 checkpoints (their
  Ultralytics fork, arXiv 2605.09407) to ``yolov12{n,s,m,l,x}-anydepth`` with ``split="official"``:
  their outputs at every depth (see :mod:`anydepth.convert._authors` for the correspondence).
* :func:`from_authors_rtdetr` — the authors' AnyDepth-RT-DETR checkpoints (their RT-DETR fork) to
  ``rtdetr-r{50,101}-anydepth`` with ``split="official"``: their outputs at every depth.
* :func:`from_timm` — a timm ``VisionTransformer`` / ``SwinTransformer`` to ``vit-*-anydepth`` /
  ``swin-*-anydepth``; :func:`from_torchvision_transformer` — torchvision's ``vit_b_16`` /
  ``swin_t`` family to the same; :func:`from_vit_swin_state_dict` — either one's state dict or
  weights file (see :mod:`anydepth.convert._timm`).

* :func:`from_torchvision` — a torchvision ``resnet18/34/50/101`` or ``mobilenet_v2`` to
  ``resnet*-anydepth`` / ``mobilenetv2-anydepth`` (:func:`from_torchvision_state_dict` from a
  ``.pth`` state dict).

The peers are optional dependencies, imported only inside these adapters. The converted model
at full depth reproduces the peer's output; the shallow-path norms start as copies of the main
ones.
"""
from __future__ import annotations


def from_ultralytics(model_or_checkpoint, **kwargs):
    from ._ultralytics import from_ultralytics as impl

    return impl(model_or_checkpoint, **kwargs)


def from_authors_yolo(state_dict_or_path, **kwargs):
    from ._authors import from_authors_yolo as impl

    return impl(state_dict_or_path, **kwargs)


def from_authors_rtdetr(state_dict_or_path, **kwargs):
    from ._authors import from_authors_rtdetr as impl

    return impl(state_dict_or_path, **kwargs)


def from_transformers(model_or_state_dict, **kwargs):
    from ._transformers import from_transformers as impl

    return impl(model_or_state_dict, **kwargs)


def from_torchvision(model, **kwargs):
    """Any torchvision classifier we build: ResNet / MobileNetV2 (:mod:`anydepth.convert._torchvision`)
    or VisionTransformer / SwinTransformer (:func:`from_torchvision_transformer`)."""
    if type(model).__name__ in ("VisionTransformer", "SwinTransformer"):
        return from_torchvision_transformer(model, **kwargs)
    from ._torchvision import from_torchvision as impl

    return impl(model, **kwargs)


def from_torchvision_state_dict(state_dict_or_path, **kwargs):
    from ._torchvision import from_torchvision_state_dict as impl

    return impl(state_dict_or_path, **kwargs)


def from_timm(model, **kwargs):
    from ._timm import from_timm as impl

    return impl(model, **kwargs)


def from_vit_swin_state_dict(state_dict_or_path, **kwargs):
    from ._timm import from_vit_swin_state_dict as impl

    return impl(state_dict_or_path, **kwargs)


def from_torchvision_transformer(model, **kwargs):
    from ._timm import from_torchvision_transformer as impl

    return impl(model, **kwargs)


__all__ = ["from_authors_rtdetr", "from_authors_yolo", "from_timm", "from_torchvision", "from_torchvision_state_dict",
           "from_torchvision_transformer", "from_transformers", "from_ultralytics", "from_vit_swin_state_dict"]
