"""Training criteria for the any-depth detectors.

``build_criterion(model, **weights)`` picks the criterion for a model class:

* ``AnyDepthYOLOv12`` -> :class:`anydepth.losses.yolo.YOLOCriterion`
* ``AnyDepthRTDETR``  -> :class:`anydepth.losses.rtdetr.RTDETRCriterion`

Every criterion exposes ``gt_loss(outputs, targets) -> (loss, logs)`` and
``distill_loss(student_outputs, teacher_outputs, targets) -> (loss, logs)``.
Box helpers live in :mod:`anydepth.losses.boxes`.
"""

from __future__ import annotations

from .boxes import (  # noqa: F401
    bbox_iou,
    box_cxcywh_to_xyxy,
    box_iou_pairwise,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
)

_SUPPORTED = ("AnyDepthYOLOv12", "AnyDepthRTDETR")


def build_criterion(model, **weights):
    """Return the training criterion matching ``model``'s class.

    ``weights`` are forwarded as keywords to the criterion constructor (loss weights, assigner
    settings...). Dispatch is on the class name so the model modules are not imported here.
    Raises ``TypeError`` for an unsupported model class.
    """
    name = type(model).__name__
    if name == "AnyDepthYOLOv12":
        from .yolo import YOLOCriterion

        return YOLOCriterion(model, **weights)
    if name == "AnyDepthRTDETR":
        from .rtdetr import RTDETRCriterion

        return RTDETRCriterion(model, **weights)
    raise TypeError(f"no criterion for model class {name!r}; supported: {', '.join(_SUPPORTED)}")


__all__ = [
    "build_criterion",
    "bbox_iou",
    "box_cxcywh_to_xyxy",
    "box_iou_pairwise",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
]
