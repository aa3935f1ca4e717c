"""RT-DETR training losses: Hungarian matching, varifocal + L1 + GIoU ground-truth losses with
auxiliary, encoder and denoising terms, and the any-depth self-distillation loss (arXiv 2605.09407).

Conventions
-----------
* Predictions come from :meth:`anydepth.models.rtdetr.AnyDepthRTDETR.forward_train`: ``logits``
  ``[B, Q, nc]`` (sigmoid classifier, no background class), ``pred_boxes`` ``[B, Q, 4]`` normalised
  (cx, cy, w, h), ``aux_outputs``, ``enc_outputs``, ``dn_outputs`` / ``dn_meta``,
  ``distill_feats`` and ``image_size``.
* Targets: a list of ``B`` dicts, ``boxes`` float ``[N, 4]`` xyxy in pixels of the network input and
  ``labels`` int64 ``[N]`` in ``0 .. nc-1``. :func:`normalize_targets` turns them into normalised
  cxcywh with ``image_size`` (boxes are clipped to the image first).
* Normalisation: every box / class term of one output set is a sum divided by the number of GT
  boxes of the batch (clamped to >= 1), as in RT-DETR; the denoising terms divide by that number
  times the number of denoising groups (each GT has one positive query per group). The count is
  that of the local batch (no all-reduce across processes).
* Losses are computed in float32, even under ``torch.autocast``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .boxes import bbox_iou, box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou
from .yolo import bernoulli_kl, softmax_kl

__all__ = [
    "HungarianMatcher",
    "RTDETRCriterion",
    "bernoulli_kl",
    "normalize_targets",
    "varifocal_loss",
]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


# -- targets --------------------------------------------------------------------------------------
def normalize_targets(targets, image_size: Sequence[int], num_classes: int, batch: Optional[int] = None,
                      device=None) -> List[Dict[str, torch.Tensor]]:
    """Validate per-image targets (``boxes`` xyxy pixels ``[N, 4]``, ``labels`` ``[N]``) and return
    them as ``[{"boxes": float32 [N, 4] normalised cxcywh, "labels": int64 [N]}]`` on ``device``.

    Boxes are clipped to the image ``image_size = (H, W)`` before normalisation. Raises
    ``TypeError`` / ``ValueError`` naming the image and the problem for: not a list of dicts, a
    batch size mismatch, wrong shapes or dtypes, labels outside ``0 .. num_classes-1``, non-finite
    boxes, or boxes with x2 < x1 or y2 < y1.
    """
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets must be a list of per-image dicts (boxes, labels), got {type(targets).__name__}")
    if batch is not None and len(targets) != batch:
        raise ValueError(f"got {len(targets)} target dicts for a batch of {batch} images")
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)):
        raise ValueError(f"image_size must be (H, W) positive ints, got {image_size!r}")
    h, w = image_size
    checked = []
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or "boxes" not in t or "labels" not in t:
            raise TypeError(f"targets[{i}] must be a dict with 'boxes' and 'labels'")
        bx, lb = torch.as_tensor(t["boxes"]), torch.as_tensor(t["labels"])
        if bx.numel() == 0 and bx.ndim in (1, 2):
            bx = bx.reshape(0, 4)
        if bx.ndim != 2 or bx.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must have shape [N, 4] (xyxy pixels), got {tuple(bx.shape)}")
        if not bx.is_floating_point():
            raise TypeError(f"targets[{i}]['boxes'] must be floating point, got {bx.dtype}")
        if lb.ndim != 1 or lb.shape[0] != bx.shape[0]:
            raise ValueError(f"targets[{i}]['labels'] must have shape [N] = [{bx.shape[0]}], got {tuple(lb.shape)}")
        if lb.is_floating_point() or lb.is_complex() or lb.dtype == torch.bool:
            raise TypeError(f"targets[{i}]['labels'] must be an integer tensor, got {lb.dtype}")
        dev = bx.device if device is None else torch.device(device)
        checked.append((bx.to(device=dev, dtype=torch.float32), lb.to(device=dev, dtype=torch.long)))
    if any(len(lb) for _, lb in checked):  # value checks: one host sync for the whole batch
        first = checked[0][0].device
        flags = torch.stack([torch.stack((((lb < 0) | (lb >= num_classes)).any(), ~torch.isfinite(bx).all(),
                                          ((bx[:, 2] < bx[:, 0]) | (bx[:, 3] < bx[:, 1])).any())).to(first)
                             for bx, lb in checked]).tolist()
        for i, ((bx, lb), (bad_label, nonfinite, inverted)) in enumerate(zip(checked, flags)):
            if bad_label:
                raise ValueError(f"targets[{i}]['labels'] has values outside 0..{num_classes - 1}: "
                                 f"{lb[(lb < 0) | (lb >= num_classes)].tolist()}")
            if nonfinite:
                raise ValueError(f"targets[{i}]['boxes'] contains NaN or infinite values")
            if inverted:
                raise ValueError(f"targets[{i}]['boxes'] has boxes with x2 < x1 or y2 < y1 (expected xyxy pixels)")
    out = []
    for bx, lb in checked:
        xs, ys = bx[:, 0::2].clamp(0, w) / w, bx[:, 1::2].clamp(0, h) / h  # (x1, x2), (y1, y2)
        xyxy = torch.stack((xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]), -1)
        out.append({"boxes": box_xyxy_to_cxcywh(xyxy), "labels": lb})
    return out


# -- elementwise losses ---------------------------------------------------------------------------
def varifocal_loss(logits: torch.Tensor, target_score: torch.Tensor, positive: torch.Tensor,
                   alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """Elementwise varifocal loss (VarifocalNet, as RT-DETR uses it).

    ``BCE(logits, target_score)`` weighted by ``target_score`` on positive entries (the matched
    query's GT class, whose target is the IoU of its box with the GT box) and by
    ``alpha * sigmoid(logits)^gamma`` elsewhere (target 0). The weight is not differentiated.
    """
    p = logits.detach().sigmoid()
    weight = torch.where(positive, target_score, alpha * p.pow(gamma))
    return F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")


# -- matching -------------------------------------------------------------------------------------
class HungarianMatcher:
    """One-to-one assignment of queries to GT objects per image (scipy's
    ``linear_sum_assignment``), minimising

    ``cost_class * C_cls + cost_bbox * L1(cxcywh) - cost_giou * GIoU(xyxy)``

    with the focal-style class cost ``C_cls = alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma
    (-log(1-p))`` at the GT class (``p`` = sigmoid of the query's logit). Defaults are RT-DETR's
    (2, 5, 2, alpha 0.25, gamma 2).

    ``matcher(logits [B, Q, nc], boxes [B, Q, 4], targets)`` with normalised targets (see
    :func:`normalize_targets`) returns ``B`` pairs ``(query_idx, gt_idx)`` of int64 tensors on
    the predictions' device, sorted by query index; ``min(Q, N_i)`` pairs per image (none for an
    image without objects).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        for name, v in dict(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou, gamma=gamma).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"HungarianMatcher: {name} must be a number >= 0, got {v!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"HungarianMatcher: alpha must be in [0, 1], got {alpha!r}")
        self.cost_class, self.cost_bbox, self.cost_giou = float(cost_class), float(cost_bbox), float(cost_giou)
        self.alpha, self.gamma = float(alpha), float(gamma)

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                    gt_boxes: torch.Tensor) -> torch.Tensor:
        """Cost ``[Q, N]`` of one image: ``logits [Q, nc]``, ``boxes [Q, 4]``, ``labels [N]``,
        ``gt_boxes [N, 4]`` (normalised cxcywh)."""
        p = logits.float().sigmoid()[:, labels]
        pos = self.alpha * (1 - p).pow(self.gamma) * -(p + 1e-8).log()
        neg = (1 - self.alpha) * p.pow(self.gamma) * -(1 - p + 1e-8).log()
        boxes = boxes.float()
        cost_l1 = torch.cdist(boxes, gt_boxes, p=1)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(gt_boxes))
        return self.cost_class * (pos - neg) + self.cost_bbox * cost_l1 - self.cost_giou * giou

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, boxes: torch.Tensor,
                 targets: Sequence[Dict[str, torch.Tensor]]) -> Indices:
        from .._optional import require

        linear_sum_assignment = require("scipy.optimize", "HungarianMatcher (RT-DETR loss)").linear_sum_assignment

        if logits.ndim != 3 or boxes.shape != (*logits.shape[:2], 4):
            raise ValueError(f"HungarianMatcher expects logits [B, Q, nc] and boxes [B, Q, 4], got "
                             f"{tuple(logits.shape)} and {tuple(boxes.shape)}")
        if len(targets) != logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]}")
        device = logits.device
        costs = [self.cost_matrix(logits[i], boxes[i], t["labels"], t["boxes"]) if len(t["labels"]) else None
                 for i, t in enumerate(targets)]
        present = [c for c in costs if c is not None]
        if present:  # one host transfer for the whole batch
            flat = torch.cat([c.flatten() for c in present]).cpu()
            if not torch.isfinite(flat).all():
                raise FloatingPointError("the matching cost is not finite: the predictions contain NaN or inf")
            host = iter(flat.split([c.numel() for c in present]))
        out: Indices = []
        for c in costs:
            if c is None:
                empty = torch.zeros(0, dtype=torch.long, device=device)
                out.append((empty, empty.clone()))
                continue
            rows, cols = linear_sum_assignment(next(host).view(c.shape).numpy())
            out.append((torch.as_tensor(rows, dtype=torch.long, device=device),
                        torch.as_tensor(cols, dtype=torch.long, device=device)))
        return out


# -- criterion ------------------------------------------------------------------------------------
class RTDETRCriterion:
    """GT and self-distillation losses of AnyDepth-RT-DETR.

    ``RTDETRCriterion(model)`` reads ``num_classes`` from an :class:`AnyDepthRTDETR`;
    ``RTDETRCriterion(num_classes)`` builds it without a model. Keywords (the paper's defaults, arXiv 2605.09407):

    * GT losses: ``vfl`` 1 (varifocal, ``alpha`` 0.75, ``gamma`` 2), ``l1`` 5, ``giou`` 2;
      ``aux``: also on every earlier decoder layer and on the encoder's top-k outputs (each with
      its own matching); ``denoising``: also on the denoising outputs of every layer (paired
      with their GT through ``dn_meta``, no matching). Matcher costs: ``cost_class`` 2,
      ``cost_bbox`` 5, ``cost_giou`` 2, ``match_alpha`` 0.25, ``match_gamma`` 2.
    * distillation: ``kd_cls`` 1, ``kd_l1`` 5, ``kd_giou`` 2 on query pairs, ``kd_backbone`` 1,
      ``kd_encoder`` 1 on pooled features, temperature ``kd_temperature`` 1.

    ``gt_loss(outputs, targets) -> (loss, logs)``: per output set ``vfl * L_vfl + l1 * L_l1 + giou
    * L_giou`` summed over the final output, the aux and encoder outputs and the denoising outputs.
    Logs ``vfl``, ``l1``, ``giou`` (unweighted, final output), ``aux``, ``enc``, ``dn`` (weighted
    sums of those sets) and ``loss``.

    ``distill_loss(student, teacher, targets) -> (loss, logs)`` (the shallow pass; ``teacher`` is
    the detached full-depth output): ``distill_gt * GT(final student output) + distill_kd *
    kd_scale * KD + side losses``. ``distill_gt`` is 0 and ``distill_kd`` 1 by default (the
    authors' RT-DETR recipe has no GT term on the student's final output; ``alpha_base`` maps to
    ``distill_gt = alpha_base``, ``distill_kd = 1 - alpha_base``); ``kd_scale`` is an attribute
    (1) that the trainer lowers during a KD warm-up.

    * the final outputs of both are Hungarian-matched to the GT; a student query and a teacher
      query matched to the *same* GT object form a pair. ``kd_l1`` = L1 between the cxcywh boxes
      of the pairs, ``kd_giou`` = ``1 - GIoU``, each summed over pairs and divided by the GT count.
    * ``kd_style="authors"`` (default; the authors' ``SetCriterionKD``): ``kd_cls`` =
      ``T^2 KL(softmax(teacher / T) || softmax(student / T))`` over the classes of each pair,
      averaged over the classes, summed over the pairs, times the number of queries and divided
      by the GT count (their normalisation); ``kd_backbone`` / ``kd_encoder``: the 3 backbone
      (C3..C5) / encoder maps are global-average-pooled and *concatenated* to one ``[B, sum C]``
      vector per image, and the term is ``T^2 KL(softmax(t / T) || softmax(s / T))`` over all
      those channels, averaged over the batch.
    * ``kd_style="legacy"`` (this project's first version): ``kd_cls`` = per-class Bernoulli KL
      (:func:`bernoulli_kl`) summed over classes and pairs, divided by the GT count; the
      feature terms take the channel-softmax KL of each map separately and average over the 3 maps.
    * the student's aux, encoder and denoising outputs keep their GT losses (as in ``gt_loss``,
      with the same switches). The paper: "Auxiliary and denoising decoder outputs keep GT
      losses".

    Logs ``kd_cls``, ``kd_l1``, ``kd_giou``, ``kd_backbone``, ``kd_encoder`` (unweighted), ``kd``
    (weighted KD sum), ``aux``, ``enc``, ``dn``, ``pairs`` and ``loss``. Every KD term is zero
    when student and teacher outputs are equal (the GIoU term up to the IoU ``eps``).

    ``orth`` (10, the authors' ``--lambdaR``): for a model built with ``shared_bases=`` (deeply
    shared filter bases in the backbone), ``gt_loss`` adds ``orth x``
    :func:`anydepth_kernels.orthogonality_penalty` over the model's shared bases (logged as
    ``orth``, unweighted); ``orth=0`` turns it off. Without shared bases it adds nothing.
    """

    def __init__(self, model=None, *, vfl: float = 1.0, l1: float = 5.0, giou: float = 2.0, alpha: float = 0.75,
                 gamma: float = 2.0, aux: bool = True, denoising: bool = True, kd_cls: float = 1.0,
                 kd_l1: float = 5.0, kd_giou: float = 2.0, kd_backbone: float = 1.0, kd_encoder: float = 1.0,
                 kd_temperature: float = 1.0, cost_class: float = 2.0, cost_bbox: float = 5.0,
                 cost_giou: float = 2.0, match_alpha: float = 0.25, match_gamma: float = 2.0,
                 distill_gt: float = 0.0, distill_kd: float = 1.0, kd_style: str = "authors", orth: float = 10.0):
        if isinstance(model, int) and not isinstance(model, bool):
            num_classes = model
        elif model is not None and isinstance(getattr(model, "num_classes", None), int) and hasattr(model, "decoder"):
            num_classes = model.num_classes
        else:
            raise TypeError(f"RTDETRCriterion needs an AnyDepthRTDETR model or num_classes (int), "
                            f"got {type(model).__name__}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        weights = dict(vfl=vfl, l1=l1, giou=giou, gamma=gamma, kd_cls=kd_cls, kd_l1=kd_l1, kd_giou=kd_giou,
                       kd_backbone=kd_backbone, kd_encoder=kd_encoder, distill_gt=distill_gt, distill_kd=distill_kd,
                       orth=orth)
        for name, v in weights.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"loss weight {name} must be a number >= 0, got {v!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if isinstance(kd_temperature, bool) or not isinstance(kd_temperature, (int, float)) or not kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {kd_temperature!r}")
        if kd_style not in ("authors", "legacy"):
            raise ValueError(f"kd_style must be 'authors' or 'legacy', got {kd_style!r}")
        self.kd_style = kd_style
        self.distill_gt, self.distill_kd = float(distill_gt), float(distill_kd)
        self.kd_scale = 1.0  # the trainer's KD warm-up factor
        self.num_classes = int(num_classes)
        self.vfl, self.l1, self.giou = float(vfl), float(l1), float(giou)
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.aux, self.denoising = bool(aux), bool(denoising)
        self.kd_cls, self.kd_l1, self.kd_giou = float(kd_cls), float(kd_l1), float(kd_giou)
        self.kd_backbone, self.kd_encoder = float(kd_backbone), float(kd_encoder)
        self.kd_temperature = float(kd_temperature)
        self.matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou, match_alpha, match_gamma)
        from anydepth_kernels.shared_basis import SharedBasisGroup, basis_groups

        self.orth = float(orth)
        # the model's shared bases (references, not copies), a stage's together: the penalty's units
        self.basis_groups = torch.nn.ModuleList(
            SharedBasisGroup(g) for g in (basis_groups(model) if isinstance(model, torch.nn.Module) else []))

    # -- checks -----------------------------------------------------------------------------------
    def _pred(self, out, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(out, dict) or "logits" not in out or "pred_boxes" not in out:
            raise TypeError(f"{what} must be a dict with 'logits' and 'pred_boxes' (model.forward_train())")
        logits, boxes = out["logits"], out["pred_boxes"]
        if not torch.is_tensor(logits) or logits.ndim != 3 or logits.shape[-1] != self.num_classes:
            raise ValueError(f"{what}['logits'] must be [B, Q, num_classes={self.num_classes}], got "
                             f"{tuple(getattr(logits, 'shape', ()))}")
        if not torch.is_tensor(boxes) or boxes.shape != (*logits.shape[:2], 4):
            raise ValueError(f"{what}['pred_boxes'] must be [B, Q, 4] matching logits {tuple(logits.shape)}, got "
                             f"{tuple(getattr(boxes, 'shape', ()))}")
        return logits.float(), boxes.float()

    def _targets(self, outputs, targets, what: str):
        logits, _ = self._pred(outputs, what)
        if "image_size" not in outputs:
            raise ValueError(f"{what} has no 'image_size' (use model.forward_train())")
        image_size = tuple(int(v) for v in outputs["image_size"])
        tg = normalize_targets(targets, image_size, self.num_classes, logits.shape[0], logits.device)
        num_boxes = max(float(sum(len(t["labels"]) for t in tg)), 1.0)
        return tg, num_boxes

    # -- building blocks --------------------------------------------------------------------------
    def set_terms(self, out, targets, indices: Indices, num_boxes: float) -> Dict[str, torch.Tensor]:
        """``vfl``, ``l1`` and ``giou`` of one output set (``dict(logits, pred_boxes)``) for the
        given ``(query_idx, gt_idx)`` pairs per image and normalised targets; each term is a sum
        divided by ``num_boxes``. The VFL target of a matched query at its GT class is the
        (detached) IoU of its box with the GT box; every other entry has target 0."""
        logits, boxes = self._pred(out, "output")
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
        query_idx = torch.cat([q for q, _ in indices])
        gt_boxes = torch.cat([t["boxes"][g] for t, (_, g) in zip(targets, indices)])
        gt_labels = torch.cat([t["labels"][g] for t, (_, g) in zip(targets, indices)])
        target = torch.zeros_like(logits)
        positive = torch.zeros_like(logits, dtype=torch.bool)
        if query_idx.numel():
            src = boxes[batch_idx, query_idx]
            src_xyxy, gt_xyxy = box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(gt_boxes)
            iou = bbox_iou(src_xyxy, gt_xyxy, kind="iou").detach().clamp(0, 1)
            l1 = (src - gt_boxes).abs().sum() / num_boxes
            giou = (1 - bbox_iou(src_xyxy, gt_xyxy, kind="giou")).sum() / num_boxes
            target[batch_idx, query_idx, gt_labels] = iou
            positive[batch_idx, query_idx, gt_labels] = True
        else:
            l1 = giou = boxes.sum() * 0.0
        vfl = varifocal_loss(logits, target, positive, self.alpha, self.gamma).sum() / num_boxes
        return {"vfl": vfl, "l1": l1, "giou": giou}

    def _weighted(self, terms: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.vfl * terms["vfl"] + self.l1 * terms["l1"] + self.giou * terms["giou"]

    def _matched(self, out, targets, num_boxes: float, what: str) -> Dict[str, torch.Tensor]:
        logits, boxes = self._pred(out, what)
        return self.set_terms(out, targets, self.matcher(logits, boxes, targets), num_boxes)

    @staticmethod
    def dn_indices(dn_meta, batch: int) -> Indices:
        """The ``(denoising query, GT index)`` pairs per image recorded in ``dn_meta``."""
        if not isinstance(dn_meta, dict) or "positive_idx" not in dn_meta or "gt_idx" not in dn_meta:
            raise ValueError("dn_outputs need the dn_meta dict of model.forward_train() (positive_idx, gt_idx)")
        if len(dn_meta["positive_idx"]) != batch or len(dn_meta["gt_idx"]) != batch:
            raise ValueError(f"dn_meta describes {len(dn_meta['positive_idx'])} images for a batch of {batch}")
        return list(zip(dn_meta["positive_idx"], dn_meta["gt_idx"]))

    def _side_losses(self, outputs, targets, num_boxes: float, what: str) -> Dict[str, torch.Tensor]:
        """Weighted GT losses of the aux + encoder outputs and of the denoising outputs."""
        zero = outputs["pred_boxes"].float().sum() * 0.0
        side = {"aux": zero, "enc": zero, "dn": zero}
        if self.aux:
            for k, aux in enumerate(outputs.get("aux_outputs") or []):
                side["aux"] = side["aux"] + self._weighted(self._matched(aux, targets, num_boxes,
                                                                         f"{what}['aux_outputs'][{k}]"))
            enc = outputs.get("enc_outputs")
            if enc is not None:
                side["enc"] = self._weighted(self._matched(enc, targets, num_boxes, f"{what}['enc_outputs']"))
        dn_outputs = outputs.get("dn_outputs")
        if self.denoising and dn_outputs:
            meta = outputs.get("dn_meta")
            indices = self.dn_indices(meta, len(targets))
            n_dn = num_boxes * int(meta["num_groups"])
            for dn in dn_outputs:
                side["dn"] = side["dn"] + self._weighted(self.set_terms(dn, targets, indices, n_dn))
        return side

    # -- public losses ----------------------------------------------------------------------------
    def gt_loss(self, outputs, targets) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Ground-truth loss of one pass (see the class docstring)."""
        with _no_autocast(outputs):
            tg, num_boxes = self._targets(outputs, targets, "outputs")
            terms = self._matched(outputs, tg, num_boxes, "outputs")
            side = self._side_losses(outputs, tg, num_boxes, "outputs")
            loss = self._weighted(terms) + side["aux"] + side["enc"] + side["dn"]
        logs = {k: float(v.detach()) for k, v in {**terms, **side}.items()}
        if len(self.basis_groups) and self.orth > 0:
            from anydepth_kernels.shared_basis import orthogonality_penalty

            orth = orthogonality_penalty(self.basis_groups, weight=1.0)
            logs["orth"] = float(orth.detach())
            loss = loss + self.orth * orth
        logs["loss"] = float(loss.detach())
        return loss, logs

    def distill_loss(self, student, teacher, targets) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Shallow-pass loss: KD terms on the final outputs and features + the student's aux,
        encoder and denoising GT losses (see the class docstring)."""
        with _no_autocast(student):
            return self._distill_loss(student, teacher, targets)

    def _distill_loss(self, student, teacher, targets):
        tg, num_boxes = self._targets(student, targets, "student outputs")
        s_logits, s_boxes = self._pred(student, "student outputs")
        t_logits, t_boxes = self._pred(teacher, "teacher outputs")
        t_logits, t_boxes = t_logits.detach(), t_boxes.detach()
        if t_logits.shape != s_logits.shape:
            raise ValueError(f"student and teacher outputs differ in shape: {tuple(s_logits.shape)} vs "
                             f"{tuple(t_logits.shape)}")
        s_idx = self.matcher(s_logits, s_boxes, tg)
        t_idx = self.matcher(t_logits, t_boxes, tg)
        b_l, s_l, t_l = [], [], []
        for i, ((sq, sg), (tq, tgi)) in enumerate(zip(s_idx, t_idx)):
            n = len(tg[i]["labels"])
            if not n:
                continue
            s_of = torch.full((n,), -1, dtype=torch.long, device=s_logits.device)
            t_of = s_of.clone()
            s_of[sg], t_of[tgi] = sq, tq
            both = (s_of >= 0) & (t_of >= 0)
            b_l.append(torch.full((int(both.sum()),), i, dtype=torch.long, device=s_logits.device))
            s_l.append(s_of[both])
            t_l.append(t_of[both])
        T = self.kd_temperature
        if b_l and sum(len(x) for x in b_l):
            bi, sq, tq = torch.cat(b_l), torch.cat(s_l), torch.cat(t_l)
            sb, tb = s_boxes[bi, sq], t_boxes[bi, tq]
            if self.kd_style == "authors":
                kd_cls = (softmax_kl(t_logits[bi, tq], s_logits[bi, sq], T).sum() / self.num_classes
                          * s_logits.shape[1] / num_boxes * T**2)
            else:
                kd_cls = bernoulli_kl(t_logits[bi, tq], s_logits[bi, sq], T).sum() / num_boxes
            kd_l1 = (sb - tb).abs().sum() / num_boxes
            kd_giou = (1 - bbox_iou(box_cxcywh_to_xyxy(sb), box_cxcywh_to_xyxy(tb), kind="giou")).sum() / num_boxes
            pairs = len(bi)
        else:
            kd_cls = kd_l1 = kd_giou = s_boxes.sum() * 0.0
            pairs = 0
        fs, ft = student.get("distill_feats"), teacher.get("distill_feats")
        if not isinstance(fs, dict) or not isinstance(ft, dict):
            raise ValueError("distill_loss needs 'distill_feats' dicts (backbone, encoder) in both outputs "
                             "(use model.forward_train())")
        kd_backbone = self._feature_kl(fs.get("backbone"), ft.get("backbone"), "backbone")
        kd_encoder = self._feature_kl(fs.get("encoder"), ft.get("encoder"), "encoder")
        kd = (self.kd_cls * kd_cls + self.kd_l1 * kd_l1 + self.kd_giou * kd_giou
              + self.kd_backbone * kd_backbone + self.kd_encoder * kd_encoder)
        side = self._side_losses(student, tg, num_boxes, "student outputs")
        loss = self.distill_kd * float(self.kd_scale) * kd + side["aux"] + side["enc"] + side["dn"]
        extra = {}
        if self.distill_gt:
            gt = self._weighted(self._matched(student, tg, num_boxes, "student outputs"))
            loss = loss + self.distill_gt * gt
            extra["gt"] = gt
        logs = {"kd_cls": kd_cls, "kd_l1": kd_l1, "kd_giou": kd_giou, "kd_backbone": kd_backbone,
                "kd_encoder": kd_encoder, "kd": kd, **side, **extra}
        logs = {k: float(v.detach()) for k, v in logs.items()}
        logs.update(pairs=float(pairs), kd_scale=float(self.kd_scale), loss=float(loss.detach()))
        return loss, logs

    def _feature_kl(self, student_maps, teacher_maps, name: str) -> torch.Tensor:
        """Channel-softmax KL of globally average-pooled features (see the class docstring):
        of the concatenated pooled maps (``kd_style="authors"``) or the mean over the maps of each
        map's own (``"legacy"``); ``T^2 KL(softmax(t / T) || softmax(s / T))``, batch mean."""
        if not isinstance(student_maps, (list, tuple)) or not isinstance(teacher_maps, (list, tuple)) \
                or not student_maps or len(student_maps) != len(teacher_maps):
            raise ValueError(f"distill_feats['{name}'] must be equally long non-empty lists of maps in student "
                             f"and teacher")
        T = self.kd_temperature
        ps, pt = [], []
        for i, (s, t) in enumerate(zip(student_maps, teacher_maps)):
            if s.shape != t.shape or s.ndim != 4:
                raise ValueError(f"distill_feats['{name}'][{i}]: student {tuple(s.shape)} vs teacher "
                                 f"{tuple(t.shape)} (expected equal [B, C, H, W])")
            ps.append(s.float().mean((2, 3)))
            pt.append(t.detach().float().mean((2, 3)))
        if self.kd_style == "authors":
            return softmax_kl(torch.cat(pt, 1), torch.cat(ps, 1), T).mean() * T**2
        return torch.stack([softmax_kl(t, s, T).mean() for s, t in zip(ps, pt)]).mean() * T**2


def _no_autocast(outputs):
    """Losses run in float32 even when the caller wraps them in ``torch.autocast``."""
    logits = outputs.get("logits") if isinstance(outputs, dict) else None
    return torch.autocast(logits.device.type if torch.is_tensor(logits) else "cpu", enabled=False)
