"""YOLOv12 training losses: task-aligned assignment, CIoU + DFL + BCE, and the any-depth
self-distillation loss (the any-depth detection paper, arXiv 2605.09407).

Conventions
-----------
* Predictions come from ``AnyDepthYOLOv12.forward_train``: ``boxes [B, 4*R, A]`` DFL logits
  (``R = reg_max`` bins per side, sides ordered left, top, right, bottom), ``scores [B, nc, A]``
  class logits, ``feats`` (the head inputs, for the anchor grid), ``distill_feats``,
  ``image_size``.
* A box side is a distance from the anchor centre in *grid units* of the anchor's level
  (pixels / stride); the predicted distance is the expectation of the softmax over the ``R``
  bins ``0 .. R-1``.
* Targets: a list of ``B`` dicts, ``boxes`` float ``[N, 4]`` xyxy in input pixels and
  ``labels`` int64 ``[N]`` in ``0 .. nc-1``.

Loss scale: every term is a sum over the whole batch divided by the sum of the target scores
over the whole batch (clamped to >= 1), i.e. roughly a mean per positive anchor, independent
of the batch size. Unlike Ultralytics we do *not* multiply the total by the batch size; the
trainer uses the value as is (AdamW is insensitive to the overall scale apart from weight decay
and gradient clipping).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F

from .boxes import bbox_iou

__all__ = [
    "Assignment",
    "TaskAlignedAssigner",
    "YOLOCriterion",
    "bernoulli_kl",
    "distribution_focal_loss",
    "softmax_kl",
    "make_anchors",
]


# -- building blocks ------------------------------------------------------------------------------
def make_anchors(grid_shapes: Sequence[Tuple[int, int]], strides: Sequence[int], device=None,
                 dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres ``[2, A]`` (x, y in grid units, cell centre = index + 0.5) and strides
    ``[1, A]`` for levels of ``grid_shapes`` ``[(h, w), ...]``, row-major within a level and
    levels in order (the layout of ``Detect.anchors``)."""
    if len(grid_shapes) != len(strides):
        raise ValueError(f"{len(grid_shapes)} grid shapes for {len(strides)} strides")
    pts, strs = [], []
    for (h, w), s in zip(grid_shapes, strides):
        ys = torch.arange(h, device=device, dtype=dtype) + 0.5
        xs = torch.arange(w, device=device, dtype=dtype) + 0.5
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        pts.append(torch.stack((gx.reshape(-1), gy.reshape(-1))))
        strs.append(torch.full((1, h * w), float(s), device=device, dtype=dtype))
    return torch.cat(pts, 1), torch.cat(strs, 1)


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution focal loss, elementwise.

    ``logits [..., R]`` over the bins ``0 .. R-1``, ``target [...]`` a real distance, clamped to
    ``[0, R - 1 - 0.01]``. With ``l = floor(t)`` the loss is
    ``(l + 1 - t) * CE(logits, l) + (t - l) * CE(logits, l + 1)``: cross entropy to the two
    neighbouring integer bins with linear weights. Returns shape ``[...]``.
    """
    r = logits.shape[-1]
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"DFL logits {tuple(logits.shape)} do not match targets {tuple(target.shape)} + (R,)")
    t = target.clamp(0, r - 1 - 0.01)
    left = t.floor().long()
    w_left = (left + 1).to(t.dtype) - t
    logp = logits.log_softmax(-1)
    ce_left = -logp.gather(-1, left.unsqueeze(-1)).squeeze(-1)
    ce_right = -logp.gather(-1, (left + 1).unsqueeze(-1)).squeeze(-1)
    return w_left * ce_left + (1 - w_left) * ce_right


def bernoulli_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0
                 ) -> torch.Tensor:
    """Per-element KL between independent Bernoulli class distributions, scaled by ``T^2``.

    With ``p = sigmoid(t / T)`` (teacher) and ``q = sigmoid(s / T)`` (student):
    ``T^2 * [p * (log p - log q) + (1 - p) * (log(1 - p) - log(1 - q))]``, computed with
    log-sigmoids (stable for large logits). Exactly 0 where the logits are equal.
    """
    t = teacher_logits / temperature
    s = student_logits / temperature
    p = torch.sigmoid(t)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl * temperature**2


def softmax_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0
               ) -> torch.Tensor:
    """``KL(softmax(t / T) || softmax(s / T))`` over the last dimension (no ``T^2`` factor).

    Returns the shape of the inputs without their last dimension; exactly 0 where the logits are
    equal."""
    log_p = (teacher_logits / temperature).log_softmax(-1)
    log_q = (student_logits / temperature).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _decode_ltrb(box_logits: torch.Tensor, reg_max: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[B, 4*R, A]`` -> (logits ``[B, A, 4, R]``, expected distances ``[B, A, 4]``)."""
    b, c, a = box_logits.shape
    logits = box_logits.reshape(b, 4, reg_max, a).permute(0, 3, 1, 2)
    proj = torch.arange(reg_max, device=logits.device, dtype=logits.dtype)
    return logits, (logits.softmax(-1) * proj).sum(-1)


def _ltrb_to_xyxy(ltrb: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Distances ``[..., A, 4]`` around ``points [A, 2]`` -> xyxy ``[..., A, 4]``."""
    return torch.cat((points - ltrb[..., :2], points + ltrb[..., 2:]), -1)


# -- assignment -----------------------------------------------------------------------------------
class Assignment(NamedTuple):
    """Result of :class:`TaskAlignedAssigner` for ``B`` images and ``A`` anchors.

    labels ``[B, A]`` int64 (class of the assigned GT; 0 for background anchors), boxes
    ``[B, A, 4]`` (xyxy of the assigned GT; zeros for background), scores ``[B, A, C]``
    (normalised alignment on the GT's class, 0 elsewhere), fg ``[B, A]`` bool, gt_index
    ``[B, A]`` int64 (index of the GT in the padded per-image list; 0 for background).
    """

    labels: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    fg: torch.Tensor
    gt_index: torch.Tensor


class TaskAlignedAssigner:
    """Task-aligned label assignment (TOOD), our implementation.

    For every GT ``g`` and anchor ``a`` whose centre lies strictly inside ``g``'s box, the
    alignment metric is ``s ** alpha * IoU ** beta``, with ``s`` the predicted probability of
    ``g``'s class at ``a`` and ``IoU`` between the predicted box at ``a`` and ``g`` (plain IoU).
    Each GT takes its ``topk`` anchors by metric among those inside it (anchors inside with a
    zero metric may be taken when fewer than ``topk`` have a positive one). An anchor claimed by
    several GTs goes to the GT with the highest IoU. The target score of a foreground anchor is
    ``metric / max metric of its GT * max IoU of its GT`` (maxima over the GT's foreground
    anchors), on its GT's class.

    Call with ``pred_scores [B, A, C]`` probabilities, ``pred_boxes [B, A, 4]`` xyxy,
    ``anchor_points [A, 2]`` (same units as the boxes), ``gt_labels [B, M]``, ``gt_boxes
    [B, M, 4]`` xyxy and ``gt_mask [B, M]`` bool (False = padding). Returns an
    :class:`Assignment`. Runs without autograd.
    """

    def __init__(self, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9):
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk, self.alpha, self.beta, self.eps = int(topk), float(alpha), float(beta), float(eps)

    @torch.no_grad()
    def __call__(self, pred_scores: torch.Tensor, pred_boxes: torch.Tensor, anchor_points: torch.Tensor,
                 gt_labels: torch.Tensor, gt_boxes: torch.Tensor, gt_mask: torch.Tensor) -> Assignment:
        b, a, c = pred_scores.shape
        m = gt_boxes.shape[1]
        if pred_boxes.shape != (b, a, 4) or anchor_points.shape != (a, 2):
            raise ValueError(f"assigner: pred_boxes {tuple(pred_boxes.shape)} / anchor_points "
                             f"{tuple(anchor_points.shape)} do not match pred_scores {tuple(pred_scores.shape)}")
        if gt_labels.shape != (b, m) or gt_mask.shape != (b, m) or gt_boxes.shape != (b, m, 4):
            raise ValueError(f"assigner: gt_labels {tuple(gt_labels.shape)}, gt_boxes {tuple(gt_boxes.shape)}, "
                             f"gt_mask {tuple(gt_mask.shape)} are not [B, M], [B, M, 4], [B, M]")
        dev = pred_scores.device
        if m == 0:  # no GT in the whole batch: everything is background
            return Assignment(torch.zeros(b, a, dtype=torch.long, device=dev),
                              torch.zeros(b, a, 4, dtype=pred_boxes.dtype, device=dev),
                              torch.zeros_like(pred_scores),
                              torch.zeros(b, a, dtype=torch.bool, device=dev),
                              torch.zeros(b, a, dtype=torch.long, device=dev))
        gt_labels = gt_labels.long()
        # anchor centres strictly inside each GT: [B, M, A]
        pts = anchor_points.view(1, 1, a, 2)
        deltas = torch.cat((pts - gt_boxes[:, :, None, :2], gt_boxes[:, :, None, 2:] - pts), -1)
        inside = (deltas.amin(-1) > self.eps) & gt_mask[:, :, None]

        iou = bbox_iou(pred_boxes[:, None, :, :], gt_boxes[:, :, None, :], kind="iou").clamp_min(0)
        iou = torch.where(inside, iou, torch.zeros_like(iou))
        # probability of each GT's class at each anchor: [B, M, A]
        cls_prob = pred_scores.gather(2, gt_labels.clamp(0, c - 1)[:, None, :].expand(b, a, m)).transpose(1, 2)
        metric = cls_prob.clamp_min(0).pow(self.alpha) * iou.pow(self.beta)
        metric = torch.where(inside, metric, torch.zeros_like(metric))

        k = min(self.topk, a)
        ranked = torch.where(inside, metric, torch.full_like(metric, -1.0))  # outside never outranks inside
        top = ranked.topk(k, dim=-1).indices
        pos = torch.zeros_like(inside)
        pos.scatter_(-1, top, True)
        pos &= inside

        # an anchor claimed by several GTs keeps the one of highest IoU
        multi = pos.sum(1) > 1  # [B, A]
        if multi.any():
            best = torch.where(pos, iou, torch.full_like(iou, -1.0)).argmax(1)  # [B, A]
            best_onehot = F.one_hot(best, m).transpose(1, 2).bool()
            pos = torch.where(multi[:, None, :], best_onehot & pos, pos)
        fg = pos.any(1)
        gt_index = pos.to(torch.uint8).argmax(1)  # [B, A]; 0 for background

        labels = gt_labels.gather(1, gt_index)
        boxes = gt_boxes.gather(1, gt_index[..., None].expand(b, a, 4))
        labels = torch.where(fg, labels, torch.zeros_like(labels))
        boxes = torch.where(fg[..., None], boxes, torch.zeros_like(boxes))

        metric = metric * pos
        max_metric = metric.amax(-1, keepdim=True)  # [B, M, 1]
        max_iou = (iou * pos).amax(-1, keepdim=True)
        norm = (metric * max_iou / (max_metric + self.eps)).amax(1)  # [B, A]
        scores = F.one_hot(labels, c).to(pred_scores.dtype) * (norm * fg)[..., None]
        return Assignment(labels, boxes, scores, fg, gt_index)


# -- criterion ------------------------------------------------------------------------------------
def _targets_to_padded(targets, batch: int, num_classes: int, device, dtype
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the per-image target dicts and pad them to ``[B, M]`` tensors."""
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets must be a list of {batch} dicts (boxes, labels), got {type(targets).__name__}")
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} target dicts for a batch of {batch} images")
    boxes_l, labels_l = [], []
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or "boxes" not in t or "labels" not in t:
            raise TypeError(f"targets[{i}] must be a dict with 'boxes' and 'labels'")
        bx, lb = torch.as_tensor(t["boxes"]), torch.as_tensor(t["labels"])
        if bx.ndim != 2 or bx.shape[-1] != 4:
            if not (bx.numel() == 0 and bx.ndim in (1, 2)):
                raise ValueError(f"targets[{i}]['boxes'] must have shape [N, 4] (xyxy pixels), got {tuple(bx.shape)}")
            bx = bx.reshape(0, 4)
        if not bx.is_floating_point():
            raise TypeError(f"targets[{i}]['boxes'] must be floating point, got {bx.dtype}")
        if lb.ndim != 1 or lb.shape[0] != bx.shape[0]:
            raise ValueError(f"targets[{i}]['labels'] must have shape [N] = [{bx.shape[0]}], got {tuple(lb.shape)}")
        if lb.is_floating_point() or lb.is_complex() or lb.dtype == torch.bool:
            raise TypeError(f"targets[{i}]['labels'] must be an integer tensor, got {lb.dtype}")
        boxes_l.append(bx.to(device=device, dtype=dtype))
        labels_l.append(lb.to(device=device, dtype=torch.long))
    m = max((x.shape[0] for x in boxes_l), default=0)
    gt_boxes = torch.zeros(batch, m, 4, device=device, dtype=dtype)
    gt_labels = torch.zeros(batch, m, device=device, dtype=torch.long)
    gt_mask = torch.zeros(batch, m, device=device, dtype=torch.bool)
    for i, (bx, lb) in enumerate(zip(boxes_l, labels_l)):
        n = bx.shape[0]
        gt_boxes[i, :n], gt_labels[i, :n], gt_mask[i, :n] = bx, lb, True
    if m:  # one host sync for all checks
        valid = gt_mask
        bad_label = ((gt_labels < 0) | (gt_labels >= num_classes)) & valid
        nonfinite = ~torch.isfinite(gt_boxes).all(-1) & valid
        inverted = ((gt_boxes[..., 2] < gt_boxes[..., 0]) | (gt_boxes[..., 3] < gt_boxes[..., 1])) & valid
        flags = torch.stack((bad_label.any(), nonfinite.any(), inverted.any())).tolist()
        if flags[0]:
            i = int(bad_label.any(1).nonzero()[0])
            raise ValueError(f"targets[{i}]['labels'] has values outside 0..{num_classes - 1}: "
                             f"{labels_l[i][(labels_l[i] < 0) | (labels_l[i] >= num_classes)].tolist()}")
        if flags[1]:
            i = int(nonfinite.any(1).nonzero()[0])
            raise ValueError(f"targets[{i}]['boxes'] contains NaN or infinite values")
        if flags[2]:
            i = int(inverted.any(1).nonzero()[0])
            raise ValueError(f"targets[{i}]['boxes'] has boxes with x2 < x1 or y2 < y1 (expected xyxy)")
    return gt_boxes, gt_labels, gt_mask


def _no_autocast(outputs):
    """Losses run in float32 even when the caller wraps them in ``torch.autocast``."""
    dev = outputs["boxes"].device.type if isinstance(outputs, dict) and torch.is_tensor(outputs.get("boxes")) \
        else "cpu"
    return torch.autocast(dev, enabled=False)


class YOLOCriterion:
    """GT and self-distillation losses of AnyDepth-YOLOv12.

    ``YOLOCriterion(model)`` reads ``num_classes``, ``reg_max`` and the strides from the model's
    ``Detect`` head; ``YOLOCriterion((num_classes, reg_max, strides))`` builds it without a
    model. The anchor grid follows the shapes of ``outputs["feats"]`` (or ``image_size``).

    Weights (arXiv 2605.09407): ``box`` 7.5 (CIoU), ``cls`` 0.5 (BCE), ``dfl`` 1.5; assigner ``topk``
    10, ``alpha`` 0.5, ``beta`` 6. Distillation: ``distill_gt`` 0.2 and ``distill_kd`` 0.8
    (shallow-pass total = 0.2 * GT + 0.8 * KD: the authors' ``alpha_base`` 0.2), inside KD
    ``kd_cls`` 0.5 with temperature ``kd_cls_t`` 2, ``kd_box`` 7.5, ``kd_dfl`` 1.5 with
    ``kd_dfl_t`` 10, ``kd_feat`` 0.1 (the authors' ``args.yaml``).

    ``gt_loss(outputs, targets) -> (loss, logs)``: ``box * L_ciou + cls * L_bce + dfl * L_dfl``
    (see the module docstring for the normalisation; no batch-size factor).

    ``distill_loss(student, teacher, targets) -> (loss, logs)``: ``distill_gt * GT(student) +
    distill_kd * kd_scale * KD``. ``distill_gt = alpha_base`` and ``distill_kd = 1 - alpha_base``
    in the authors' terms; ``kd_scale`` (an attribute, 1 by default) is set by the trainer during
    a KD warm-up. The teacher and the student are each assigned to the GT by the task-aligned
    assigner; an anchor foreground for both but assigned to different GT objects is a *conflict*.
    ``kd_style="authors"`` (default; the authors' ``DetectionLossAnyDepth``):

    * ``kd_cls``: ``T^2 KL(softmax(teacher / T) || softmax(student / T))`` over the classes,
      ``T = kd_cls_t``, on the anchors foreground for the teacher and not in conflict, weighted
      per anchor by the teacher's target score (summed over classes) and divided by the sum of
      those weights (clamped >= 1);
    * ``kd_box``: ``1 - CIoU`` between student and teacher decoded boxes and ``kd_dfl``:
      ``KL(softmax(teacher / T) || softmax(student / T))`` over the ``reg_max`` bins with ``T =
      kd_dfl_t`` (no ``T^2``), averaged over the 4 sides; both on the anchors foreground for the
      teacher *and* the student and not in conflict, weighted like ``kd_cls``;
    * ``kd_feat``: for each of the 5 ``distill_feats`` maps, global-average-pool to ``[B, C]``,
      L2-normalise each vector and take the squared distance (``= 2 - 2 cos``), averaged over
      the batch and over the maps.

    ``kd_style="legacy"`` (this project's first version, kept for comparison): on the anchors
    foreground for the teacher, no conflict mask; ``kd_cls`` = per-class Bernoulli KL
    (:func:`bernoulli_kl`, ``T^2``) summed over classes and averaged over those anchors;
    ``kd_box`` = ``1 - IoU`` and ``kd_dfl`` = ``T^2 KL``, weighted by the teacher's target
    scores and divided by their sum over all anchors; ``kd_feat`` as above.

    Every term is exactly zero when student and teacher outputs are identical (the box term up
    to the IoU ``eps``). Losses are computed in float32.
    """

    def __init__(self, model=None, *, box: float = 7.5, cls: float = 0.5, dfl: float = 1.5, topk: int = 10,
                 alpha: float = 0.5, beta: float = 6.0, distill_gt: float = 0.2, distill_kd: float = 0.8,
                 kd_cls: float = 0.5, kd_cls_t: float = 2.0, kd_box: float = 7.5, kd_dfl: float = 1.5,
                 kd_dfl_t: float = 10.0, kd_feat: float = 0.1, kd_style: str = "authors"):
        self._anchor_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        if isinstance(model, (tuple, list)):
            if len(model) != 3:
                raise ValueError("YOLOCriterion without a model takes (num_classes, reg_max, strides)")
            nc, reg_max, strides = model
            self.num_classes, self.reg_max, self.strides = int(nc), int(reg_max), tuple(int(s) for s in strides)
        elif model is not None and hasattr(model, "layers") and hasattr(model.layers[-1], "anchors"):
            det = model.layers[-1]
            self.num_classes, self.reg_max, self.strides = int(det.nc), int(det.reg_max), tuple(det.strides)
        else:
            raise TypeError(f"YOLOCriterion needs an AnyDepthYOLOv12 model or (num_classes, reg_max, strides), "
                            f"got {type(model).__name__}")
        if self.num_classes < 1 or self.reg_max < 2 or not self.strides:
            raise ValueError(f"invalid head settings: num_classes={self.num_classes}, reg_max={self.reg_max}, "
                             f"strides={self.strides}")
        for name, v in dict(box=box, cls=cls, dfl=dfl, distill_gt=distill_gt, distill_kd=distill_kd,
                            kd_cls=kd_cls, kd_box=kd_box, kd_dfl=kd_dfl, kd_feat=kd_feat).items():
            if not v >= 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {v}")
        if not (kd_cls_t > 0 and kd_dfl_t > 0):
            raise ValueError(f"temperatures must be > 0, got kd_cls_t={kd_cls_t}, kd_dfl_t={kd_dfl_t}")
        self.box, self.cls, self.dfl = float(box), float(cls), float(dfl)
        self.distill_gt, self.distill_kd = float(distill_gt), float(distill_kd)
        self.kd_cls, self.kd_cls_t, self.kd_box = float(kd_cls), float(kd_cls_t), float(kd_box)
        self.kd_dfl, self.kd_dfl_t, self.kd_feat = float(kd_dfl), float(kd_dfl_t), float(kd_feat)
        if kd_style not in ("authors", "legacy"):
            raise ValueError(f"kd_style must be 'authors' or 'legacy', got {kd_style!r}")
        self.kd_style = kd_style
        self.kd_scale = 1.0  # the trainer's KD warm-up factor
        self.assigner = TaskAlignedAssigner(topk=topk, alpha=alpha, beta=beta)

    # -- helpers ----------------------------------------------------------------------------------
    def _check_outputs(self, outputs, what: str = "outputs") -> Tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(outputs, dict) or "boxes" not in outputs or "scores" not in outputs:
            raise TypeError(f"{what} must be the dict of model.forward_train() (boxes, scores, feats, ...)")
        boxes, scores = outputs["boxes"], outputs["scores"]
        if boxes.ndim != 3 or boxes.shape[1] != 4 * self.reg_max:
            raise ValueError(f"{what}['boxes'] must be [B, 4*reg_max={4 * self.reg_max}, A], got {tuple(boxes.shape)}")
        if scores.ndim != 3 or scores.shape[1] != self.num_classes or scores.shape[::2] != boxes.shape[::2]:
            raise ValueError(f"{what}['scores'] must be [B, num_classes={self.num_classes}, A] matching boxes "
                             f"{tuple(boxes.shape)}, got {tuple(scores.shape)}")
        return boxes.float(), scores.float()

    def anchors(self, outputs, num_anchors: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Anchor centres ``[A, 2]`` and strides ``[A, 1]`` (float32, grid units) for these outputs.

        The grid is that of ``Detect.anchors`` (same layout, checked by the tests), built here in
        float32 from the shapes of ``outputs["feats"]`` (or from ``image_size``): under autocast
        the feature maps are half precision, and so would be ``Detect.anchors``' cached grid."""
        feats = outputs.get("feats")
        if feats is not None:
            shapes = tuple(tuple(int(d) for d in f.shape[2:]) for f in feats)
        elif outputs.get("image_size") is not None:
            h, w = outputs["image_size"]
            shapes = tuple((-(-int(h) // s), -(-int(w) // s)) for s in self.strides)
        else:
            raise ValueError("outputs need 'feats' or 'image_size' to build the anchor grid")
        device = outputs["boxes"].device
        key = (shapes, device)
        hit = self._anchor_cache.get(key)
        if hit is None:
            pts, strides = make_anchors(shapes, self.strides, device=device)
            hit = (pts.T.contiguous(), strides.T.contiguous())
            if len(self._anchor_cache) > 16:
                self._anchor_cache.clear()
            self._anchor_cache[key] = hit
        if hit[0].shape[0] != num_anchors:
            raise ValueError(f"the anchor grid {list(shapes)} has {hit[0].shape[0]} anchors but the outputs have "
                             f"{num_anchors}")
        return hit

    def _prepare(self, outputs, targets, what: str = "outputs"):
        box_logits, cls_logits = self._check_outputs(outputs, what)
        b, _, a = box_logits.shape
        points, strides = self.anchors(outputs, a)
        dist_logits, ltrb = _decode_ltrb(box_logits, self.reg_max)  # [B, A, 4, R], [B, A, 4]
        pred_xyxy = _ltrb_to_xyxy(ltrb, points)  # grid units
        return dict(dist_logits=dist_logits, xyxy=pred_xyxy, cls=cls_logits.transpose(1, 2),
                    points=points, strides=strides, batch=b)

    def _assign(self, p, gt_boxes, gt_labels, gt_mask) -> Assignment:
        return self.assigner(p["cls"].detach().sigmoid(), (p["xyxy"].detach() * p["strides"]),
                             p["points"] * p["strides"], gt_labels, gt_boxes, gt_mask)

    def _gt_terms(self, p, asg: Assignment) -> Dict[str, torch.Tensor]:
        tss = asg.scores.sum().clamp_min(1.0)
        cls = F.binary_cross_entropy_with_logits(p["cls"], asg.scores, reduction="sum") / tss
        fg = asg.fg
        if fg.any():
            weight = asg.scores.sum(-1)[fg]  # [n_fg]
            tgt = (asg.boxes / p["strides"])[fg]  # grid units
            iou = bbox_iou(p["xyxy"][fg], tgt, kind="ciou")
            box = ((1.0 - iou) * weight).sum() / tss
            pts = p["points"].expand(p["batch"], -1, -1)[fg]
            tgt_ltrb = torch.cat((pts - tgt[:, :2], tgt[:, 2:] - pts), -1)
            dfl = (distribution_focal_loss(p["dist_logits"][fg], tgt_ltrb).mean(-1) * weight).sum() / tss
        else:
            box = dfl = p["xyxy"].sum() * 0.0  # keeps the graph connected
        return dict(box=box, cls=cls, dfl=dfl)

    # -- public API -------------------------------------------------------------------------------
    def gt_loss(self, outputs, targets) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Ground-truth loss of one pass: ``box * CIoU + cls * BCE + dfl * DFL``; logs ``box``,
        ``cls``, ``dfl`` (unweighted terms), ``fg`` (foreground anchors) and ``loss``."""
        with _no_autocast(outputs):
            return self._gt_loss(outputs, targets)

    def _gt_loss(self, outputs, targets):
        p = self._prepare(outputs, targets)
        gt_boxes, gt_labels, gt_mask = _targets_to_padded(targets, p["batch"], self.num_classes,
                                                          p["xyxy"].device, torch.float32)
        asg = self._assign(p, gt_boxes, gt_labels, gt_mask)
        terms = self._gt_terms(p, asg)
        loss = self.box * terms["box"] + self.cls * terms["cls"] + self.dfl * terms["dfl"]
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs["fg"] = float(asg.fg.sum())
        logs["loss"] = float(loss.detach())
        return loss, logs

    def distill_loss(self, student, teacher, targets) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Shallow-pass loss: ``distill_gt * GT(student) + distill_kd * KD(student, teacher)``
        (see the class docstring). ``teacher`` is the full-depth output (detached here too).
        Logs the GT terms, ``gt``, ``kd_cls``, ``kd_box``, ``kd_dfl``, ``kd_feat``, ``kd``,
        ``fg`` (student foreground), ``kd_fg`` (anchors of the class KD term), ``kd_conflicts``,
        ``kd_scale`` and ``loss``."""
        with _no_autocast(student):
            return self._distill_loss(student, teacher, targets)

    def _distill_loss(self, student, teacher, targets):
        ps = self._prepare(student, targets, "student outputs")
        with torch.no_grad():
            pt = self._prepare({k: (v.detach() if torch.is_tensor(v) else v) for k, v in teacher.items()},
                               targets, "teacher outputs")
        if pt["dist_logits"].shape != ps["dist_logits"].shape:
            raise ValueError(f"student and teacher outputs differ in shape: {tuple(student['boxes'].shape)} vs "
                             f"{tuple(teacher['boxes'].shape)}")
        gt_boxes, gt_labels, gt_mask = _targets_to_padded(targets, ps["batch"], self.num_classes,
                                                          ps["xyxy"].device, torch.float32)
        asg_s = self._assign(ps, gt_boxes, gt_labels, gt_mask)
        gt_terms = self._gt_terms(ps, asg_s)
        gt = self.box * gt_terms["box"] + self.cls * gt_terms["cls"] + self.dfl * gt_terms["dfl"]

        asg_t = self._assign(pt, gt_boxes, gt_labels, gt_mask)
        if self.kd_style == "authors":
            kd_cls, kd_box, kd_dfl, n_fg, n_conflict = self._kd_authors(ps, pt, asg_s, asg_t)
        else:
            kd_cls, kd_box, kd_dfl, n_fg = self._kd_legacy(ps, pt, asg_t)
            n_conflict = 0
        kd_feat = self._feature_term(student, teacher)
        kd = self.kd_cls * kd_cls + self.kd_box * kd_box + self.kd_dfl * kd_dfl + self.kd_feat * kd_feat
        loss = self.distill_gt * gt + self.distill_kd * float(self.kd_scale) * kd
        logs = {k: float(v.detach()) for k, v in gt_terms.items()}
        logs.update(gt=float(gt.detach()), kd_cls=float(kd_cls.detach()), kd_box=float(kd_box.detach()),
                    kd_dfl=float(kd_dfl.detach()), kd_feat=float(kd_feat.detach()), kd=float(kd.detach()),
                    fg=float(asg_s.fg.sum()), kd_fg=float(n_fg), kd_conflicts=float(n_conflict),
                    kd_scale=float(self.kd_scale), loss=float(loss.detach()))
        return loss, logs

    @staticmethod
    def conflicts(asg_s: Assignment, asg_t: Assignment) -> torch.Tensor:
        """``[B, A]`` bool: anchors foreground for both assignments but assigned to different GTs."""
        return asg_s.fg & asg_t.fg & (asg_s.gt_index != asg_t.gt_index)

    def _kd_authors(self, ps, pt, asg_s: Assignment, asg_t: Assignment):
        conflict = self.conflicts(asg_s, asg_t)
        weight = asg_t.scores.sum(-1)  # [B, A] the teacher's target score per anchor
        zero = ps["xyxy"].sum() * 0.0
        cls_mask = asg_t.fg & ~conflict
        n_cls = int(cls_mask.sum())
        if n_cls:
            T = self.kd_cls_t
            w = weight[cls_mask]
            kl = softmax_kl(pt["cls"][cls_mask], ps["cls"][cls_mask], T)
            kd_cls = (kl * w).sum() / w.sum().clamp_min(1.0) * T**2
        else:
            kd_cls = zero
        box_mask = cls_mask & asg_s.fg
        if int(box_mask.sum()):
            w = weight[box_mask]
            wsum = w.sum().clamp_min(1.0)
            iou = bbox_iou(ps["xyxy"][box_mask], pt["xyxy"][box_mask], kind="ciou")
            kd_box = ((1.0 - iou) * w).sum() / wsum
            kl = softmax_kl(pt["dist_logits"][box_mask], ps["dist_logits"][box_mask], self.kd_dfl_t).mean(-1)
            kd_dfl = (kl * w).sum() / wsum
        else:
            kd_box = kd_dfl = zero
        return kd_cls, kd_box, kd_dfl, n_cls, int(conflict.sum())

    def _kd_legacy(self, ps, pt, asg_t: Assignment):
        fg = asg_t.fg
        n_fg = int(fg.sum())
        if not n_fg:
            zero = ps["xyxy"].sum() * 0.0
            return zero, zero, zero, 0
        kd_cls = bernoulli_kl(pt["cls"][fg], ps["cls"][fg], self.kd_cls_t).sum() / n_fg
        weight = asg_t.scores.sum(-1)[fg]
        wsum = asg_t.scores.sum().clamp_min(1.0)
        iou = bbox_iou(ps["xyxy"][fg], pt["xyxy"][fg], kind="iou")
        kd_box = ((1.0 - iou) * weight).sum() / wsum
        T = self.kd_dfl_t
        kl = softmax_kl(pt["dist_logits"][fg], ps["dist_logits"][fg], T).mean(-1) * T**2
        kd_dfl = (kl * weight).sum() / wsum
        return kd_cls, kd_box, kd_dfl, n_fg

    @staticmethod
    def _feature_term(student, teacher) -> torch.Tensor:
        fs, ft = student.get("distill_feats"), teacher.get("distill_feats")
        if fs is None or ft is None:
            raise ValueError("distill_loss needs 'distill_feats' in both outputs (use model.forward_train)")
        if len(fs) != len(ft) or not fs:
            raise ValueError(f"student has {len(fs)} distill_feats maps, teacher {len(ft)}")
        terms = []
        for i, (s, t) in enumerate(zip(fs, ft)):
            if s.shape != t.shape:
                raise ValueError(f"distill_feats[{i}]: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
            vs = F.normalize(s.float().mean((2, 3)), dim=1)
            vt = F.normalize(t.detach().float().mean((2, 3)), dim=1)
            terms.append((vs - vt).pow(2).sum(1).mean())
        return torch.stack(terms).mean()
