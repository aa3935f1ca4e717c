"""Box conversions and IoU variants shared by the detection losses.

All functions work on boxes stored in the last dimension (``[..., 4]``) and accept any leading
shape unless stated otherwise. ``xyxy`` means (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1; ``cxcywh``
means (centre x, centre y, width, height). Degenerate boxes (zero or negative extent) are tolerated:
their area counts as zero, and every division is guarded by ``eps`` so results stay finite.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "box_xyxy_to_cxcywh",
    "box_cxcywh_to_xyxy",
    "box_iou_pairwise",
    "bbox_iou",
    "generalized_box_iou",
]

_IOU_KINDS = ("iou", "giou", "diou", "ciou")


def _check_boxes(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim == 0 or t.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4], got {tuple(t.shape)}")


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """Convert ``[..., 4]`` boxes from (x1, y1, x2, y2) to (cx, cy, w, h)."""
    _check_boxes("boxes", boxes)
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Convert ``[..., 4]`` boxes from (cx, cy, w, h) to (x1, y1, x2, y2)."""
    _check_boxes("boxes", boxes)
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def _inter_union(a: torch.Tensor, b: torch.Tensor, eps: float):
    """Elementwise intersection and union areas (broadcast over leading dims)."""
    wa = (a[..., 2] - a[..., 0]).clamp_min(0)
    ha = (a[..., 3] - a[..., 1]).clamp_min(0)
    wb = (b[..., 2] - b[..., 0]).clamp_min(0)
    hb = (b[..., 3] - b[..., 1]).clamp_min(0)
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0)
    inter = iw * ih
    union = wa * ha + wb * hb - inter + eps
    return inter, union


def box_iou_pairwise(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Elementwise IoU of two sets of xyxy boxes of the same (broadcastable) shape ``[..., 4]``.

    Returns a tensor of shape ``[...]``: ``inter / (union + eps)``. Use
    :func:`anydepth.detection.box_iou` for the all-pairs ``[N, M]`` matrix.
    """
    return bbox_iou(a, b, kind="iou", eps=eps)


def bbox_iou(a: torch.Tensor, b: torch.Tensor, kind: str = "iou", eps: float = 1e-7) -> torch.Tensor:
    """Elementwise IoU variant between xyxy boxes ``a`` and ``b`` (broadcastable ``[..., 4]``).

    kind:
      * ``"iou"``  : I / U
      * ``"giou"`` : IoU - (C - U) / C, C = area of the smallest enclosing box (range (-1, 1])
      * ``"diou"`` : IoU - rho^2 / c^2, rho = distance between centres, c = diagonal of the
        enclosing box
      * ``"ciou"`` : DIoU - alpha * v with v = 4/pi^2 * (atan(wb/hb) - atan(wa/ha))^2 and
        alpha = v / (v - IoU + 1 + eps). As in the CIoU paper, alpha is treated as a constant
        for the gradient (computed without autograd).

    ``eps`` is added to the union, to the enclosing area / squared diagonal and to the heights in
    the aspect-ratio term so degenerate boxes give finite values. Returns shape ``[...]``.
    """
    _check_boxes("a", a)
    _check_boxes("b", b)
    if kind not in _IOU_KINDS:
        raise ValueError(f"unknown IoU kind {kind!r}; expected one of {_IOU_KINDS}")
    inter, union = _inter_union(a, b, eps)
    iou = inter / union
    if kind == "iou":
        return iou
    cw = torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])
    ch = torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    if kind == "giou":
        c_area = cw * ch + eps
        return iou - (c_area - union) / c_area
    c2 = cw.pow(2) + ch.pow(2) + eps
    rho2 = ((a[..., 0] + a[..., 2] - b[..., 0] - b[..., 2]).pow(2)
            + (a[..., 1] + a[..., 3] - b[..., 1] - b[..., 3]).pow(2)) / 4
    if kind == "diou":
        return iou - rho2 / c2
    wa, ha = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
    wb, hb = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    v = (4 / math.pi**2) * (torch.atan(wb / (hb + eps)) - torch.atan(wa / (ha + eps))).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """All-pairs GIoU matrix between xyxy boxes ``a [N, 4]`` and ``b [M, 4]`` -> ``[N, M]``."""
    _check_boxes("a", a)
    _check_boxes("b", b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"generalized_box_iou expects [N, 4] and [M, 4], got {tuple(a.shape)} and {tuple(b.shape)}")
    return bbox_iou(a[:, None, :], b[None, :, :], kind="giou", eps=eps)
