"""Training criteria for the any-depth detectors.

``build_criterion(model, **weights)`` builds the criterion the model's family spec names
(:class:`anydepth.family.ModelFamily`, ``criterion``):

* YOLOv12 -> :class:`anydepth.losses.yolo.YOLOCriterion`
* RT-DETR -> :class:`anydepth.losses.rtdetr.RTDETRCriterion`

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


def build_criterion(model, **weights):
    """Return the training criterion of ``model``'s family (``family_of(model).criterion``).

    ``weights`` are forwarded as keywords to the criterion constructor (loss weights, assigner
    settings...). Raises ``TypeError`` for a model of no registered family.
    """
    from ..family import family_of

    fam = family_of(model, default=None)
    if fam is None:
        from ..family import families

        raise TypeError(f"no criterion for model class {type(model).__name__!r}; supported: "
                        f"{', '.join(f.model_class.__name__ for f in families())}")
    return fam.build_criterion(model, **weights)


__all__ = [
    "build_criterion",
    "bbox_iou",
    "box_cxcywh_to_xyxy",
    "box_iou_pairwise",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
]
