"""RT-DETR's contrastive denoising queries (training only): :func:`build_denoising_queries` builds
the noised label/box queries and their attention mask for one batch; the decoder's training path
(:meth:`anydepth.models.rtdetr.RTDETRDecoder.forward_train`) embeds and runs them. Inference never
uses this module. (Re-exported by :mod:`anydepth.models.rtdetr`, its former home.)"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

__all__ = ["build_denoising_queries"]


def _uniform(shape, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """``torch.rand`` drawn from ``generator`` (on the generator's device) then moved to ``device``."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def build_denoising_queries(targets: Sequence[Dict[str, torch.Tensor]], num_classes: int, num_queries: int,
                            num_denoising: int = 100, label_noise_ratio: float = 0.5,
                            box_noise_scale: float = 1.0,
                            generator: Optional[torch.Generator] = None) -> Optional[Dict[str, object]]:
    """Contrastive denoising queries of RT-DETR (from DINO) for one batch.

    ``targets``: one dict per image with ``labels`` int64 ``[n_i]`` and ``boxes`` ``[n_i, 4]``
    normalised (cx, cy, w, h) (see :func:`anydepth.losses.rtdetr.normalize_targets`). With
    ``M = max n_i`` the batch is padded to ``M`` objects and ``G = max(1, num_denoising // M)``
    groups are built; group ``g`` occupies query positions ``[2Mg, 2M(g+1))``: ``M`` positive
    copies of the GT objects, then ``M`` negative copies (padding slots get label
    ``num_classes``, the padding index of the denoising embedding, and an all-zero box).

    * label noise: each real copy's label is replaced by a uniformly random class with
      probability ``label_noise_ratio / 2`` (the reference's convention);
    * box noise, in corner form: each corner coordinate moves by ``s * u * box_noise_scale *
      (w/2 or h/2)`` with a random sign ``s`` and ``u`` uniform in ``[0, 1)`` for positives,
      ``[1, 2)`` for negatives, then is clipped to ``[0, 1]`` (a negative copy may come out with
      x1 > x2: its extent becomes ~0 through the decoder's clamping inverse sigmoid).
    * attention mask ``[Nd + Q, Nd + Q]`` (``Nd = 2MG``, ``Q = num_queries``), ``True`` = blocked:
      the ``Q`` matching queries (after the ``Nd`` denoising queries) cannot see any denoising
      query, and a denoising group cannot see another group (it does see the matching queries).

    Returns ``None`` when no image has an object or ``num_denoising <= 0``, else a dict with
    ``labels [B, Nd]``, ``boxes [B, Nd, 4]`` (noised, cxcywh), ``attn_mask`` and ``meta`` =
    ``dict(num_groups=G, max_gt=M, num_denoising=Nd, num_queries=Q, positive_idx=[...],
    gt_idx=[...])`` where ``positive_idx[i][k]`` is the denoising query (position in
    ``[0, Nd)``) that must reconstruct GT object ``gt_idx[i][k]`` of image ``i`` (``n_i * G``
    pairs, group-major).
    """
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError("build_denoising_queries needs a non-empty list of per-image target dicts")
    counts = [int(t["labels"].shape[0]) for t in targets]
    m = max(counts)
    if num_denoising <= 0 or m == 0:
        return None
    groups = max(1, num_denoising // m)
    device = targets[0]["boxes"].device
    dtype = targets[0]["boxes"].dtype if targets[0]["boxes"].is_floating_point() else torch.float32
    b, nd = len(targets), 2 * m * groups
    labels = torch.full((b, m), num_classes, dtype=torch.long, device=device)
    boxes = torch.zeros(b, m, 4, dtype=dtype, device=device)
    real = torch.zeros(b, m, dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, counts)):
        labels[i, :n] = t["labels"].to(device)
        boxes[i, :n] = t["boxes"].to(device=device, dtype=dtype)
        real[i, :n] = True
    labels = labels.repeat(1, 2 * groups)
    boxes = boxes.repeat(1, 2 * groups, 1)
    real = real.repeat(1, 2 * groups)
    negative = torch.zeros(2 * m, dtype=torch.bool, device=device)
    negative[m:] = True
    negative = negative.repeat(groups)  # [Nd]

    if label_noise_ratio > 0:
        flip = _uniform((b, nd), generator, device) < label_noise_ratio * 0.5
        random_labels = (_uniform((b, nd), generator, device) * num_classes).long().clamp_(max=num_classes - 1)
        labels = torch.where(flip & real, random_labels, labels)
    if box_noise_scale > 0:
        half = boxes[..., 2:].repeat(1, 1, 2) * (0.5 * box_noise_scale)
        sign = torch.where(_uniform((b, nd, 4), generator, device) < 0.5, -1.0, 1.0).to(dtype)
        magnitude = _uniform((b, nd, 4), generator, device).to(dtype) + negative[None, :, None].to(dtype)
        cx, cy, w, h = boxes.unbind(-1)
        corners = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1)
        x1, y1, x2, y2 = (corners + sign * magnitude * half).clamp(0.0, 1.0).unbind(-1)
        boxes = torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), -1)

    size = nd + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    group = torch.arange(nd, device=device) // (2 * m)
    mask[:nd, :nd] = group[:, None] != group[None, :]  # a group sees only itself (and the matching queries)
    mask[nd:, :nd] = True  # the matching queries see no denoising query
    offsets = torch.arange(groups, device=device)[:, None] * (2 * m)
    positive_idx = [(offsets + torch.arange(n, device=device)[None]).flatten() for n in counts]
    gt_idx = [torch.arange(n, device=device).repeat(groups) for n in counts]
    meta = {"num_groups": groups, "max_gt": m, "num_denoising": nd, "num_queries": num_queries,
            "positive_idx": positive_idx, "gt_idx": gt_idx}
    return {"labels": labels, "boxes": boxes, "attn_mask": mask, "meta": meta}
