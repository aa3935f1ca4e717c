"""The training criterion of the any-depth classifiers (Adaptive Depth Networks, arXiv 2312.16392;
the authors' ``train_adn.py``).

* full pass (``gt_loss``): ``full x CE(logits, labels, label_smoothing)`` (``full`` = alpha = 0.5);
* base pass (``distill_loss``): ``kd x (KL_logits + feature_kd x KL_features)`` (``kd`` = 1 -
  alpha = 0.5), the base net gets no ground-truth loss:

  - ``KL_logits``: KL(teacher || student) at temperature ``T`` (1) times ``T^2``, over the
    teacher's top-``topk`` classes (500; all classes when there are fewer): the student's logits
    are gathered at the teacher's top-k classes and both softmaxes are taken over those k; summed
    over classes, averaged over the batch (``KLDivLoss(reduction="batchmean")``);
  - ``KL_features``: for each stage output the model lists in ``forward_train``'s ``features``,
    KL of the channel softmax at every position (teacher detached) times ``T^2``, batch-mean. The
    authors' code adds it only in its ``--fpn`` experiment (ResNet-50, layer1..layer3), off by
    default: ``feature_kd`` defaults to 0 (``--loss feature_kd=1`` turns it on).

A model with deeply shared filter bases (``shared_bases=`` of the ResNets) adds, once per step
(in the full pass), ``orth x`` :func:`anydepth_kernels.orthogonality_penalty` over its shared
bases (``orth`` = 10, the authors' ``--lambdaR``; ``--loss orth=0`` turns it off).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F


def labels_tensor(targets, n: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """Class labels as int64 ``[n]`` from a tensor, a sequence of ints or of ``{"label": int}``
    dicts; ``ValueError`` for a wrong count or a label out of range."""
    if isinstance(targets, torch.Tensor):
        labels = targets.reshape(-1)
    else:
        labels = torch.as_tensor([int(t["label"]) if isinstance(t, dict) else int(t) for t in targets])
    if labels.numel() != n:
        raise ValueError(f"expected {n} class labels (one per image), got {labels.numel()}")
    if labels.is_floating_point():
        raise ValueError(f"class labels must be integers, got {labels.dtype}")
    labels = labels.to(device=device, dtype=torch.long)
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"class labels must be in [0, {num_classes}), got min {int(labels.min())}, "
                         f"max {int(labels.max())}")
    return labels


def topk_kl(student: torch.Tensor, teacher: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """``KL(softmax(t_k / T) || softmax(s_k / T)) * T^2`` summed over the teacher's top-``k``
    classes, averaged over rows (``t_k``, ``s_k``: logits gathered at the teacher's top-k)."""
    k = min(k, teacher.shape[-1])
    t_top, idx = teacher.topk(k, dim=-1, largest=True, sorted=True)
    s_top = student.gather(-1, idx)
    return kl_batchmean(s_top, t_top, temperature, dim=-1)


def kl_batchmean(student: torch.Tensor, teacher: torch.Tensor, temperature: float, dim: int = 1) -> torch.Tensor:
    """``KLDivLoss(reduction="batchmean")(log_softmax(s / T), softmax(t / T)) * T^2`` along ``dim``."""
    t = float(temperature)
    log_p = F.log_softmax(student.float() / t, dim=dim)
    q = F.softmax(teacher.float() / t, dim=dim)
    return F.kl_div(log_p, q, reduction="sum") / student.shape[0] * (t * t)


class ClassificationCriterion:
    """``gt_loss(outputs, labels)`` and ``distill_loss(student, teacher, labels)`` (see the module
    docstring). Weights: ``full`` (0.5), ``kd`` (0.5), ``label_smoothing`` (0.1),
    ``temperature`` (1.0), ``topk`` (500), ``feature_kd`` (0.0), ``orth`` (10.0: the shared
    bases' orthogonality penalty, only for a model that has some). ``distill_gt`` adds ``distill_gt
    x CE`` to the base pass and, when given, ``distill_kd`` replaces ``kd`` (the trainer's
    ``alpha_base``)."""

    def __init__(self, model, full: float = 0.5, kd: float = 0.5, label_smoothing: float = 0.1,
                 temperature: float = 1.0, topk: int = 500, feature_kd: float = 0.0, distill_gt: float = 0.0,
                 distill_kd=None, orth: float = 10.0):
        from anydepth_kernels.shared_basis import SharedBasisGroup, basis_groups, shared_bases

        for name, v in (("full", full), ("kd", kd), ("label_smoothing", label_smoothing),
                        ("feature_kd", feature_kd), ("distill_gt", distill_gt), ("orth", orth)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if label_smoothing >= 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        self.num_classes = int(model.num_classes)
        self.full = float(full)
        self.kd = float(kd if distill_kd is None else distill_kd)
        self.label_smoothing = float(label_smoothing)
        self.temperature = float(temperature)
        self.topk = int(topk)
        self.feature_kd = float(feature_kd)
        self.distill_gt = float(distill_gt)
        self.kd_scale = 1.0   # the trainer's KD warm-up factor
        self.orth = float(orth)
        self.bases = torch.nn.ModuleList(shared_bases(model))   # references, not copies
        # the penalty's units: a stage's bases together (orthogonality_penalty(joint=True))
        self.basis_groups = torch.nn.ModuleList(SharedBasisGroup(g) for g in basis_groups(model))

    def _ce(self, logits: torch.Tensor, targets) -> torch.Tensor:
        labels = labels_tensor(targets, logits.shape[0], self.num_classes, logits.device)
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def gt_loss(self, outputs: Dict[str, object], targets) -> Tuple[torch.Tensor, Dict[str, float]]:
        ce = self._ce(outputs["logits"], targets)
        loss, logs = self.full * ce, {"ce": float(ce.detach())}
        if len(self.bases) and self.orth > 0:
            from anydepth_kernels.shared_basis import orthogonality_penalty

            orth = orthogonality_penalty(self.basis_groups, weight=1.0)
            logs["orth"] = float(orth.detach())
            loss = loss + self.orth * orth
        return loss, logs

    def distill_loss(self, student: Dict[str, object], teacher: Dict[str, object], targets
                     ) -> Tuple[torch.Tensor, Dict[str, float]]:
        s_logits, t_logits = student["logits"], teacher["logits"]
        kl = topk_kl(s_logits, t_logits.detach(), self.topk, self.temperature)
        logs = {"kd_logits": float(kl.detach())}
        total = kl
        if self.feature_kd > 0:
            feat = features_kl(student.get("features", []), teacher.get("features", []), self.temperature)
            logs["kd_features"] = float(feat.detach())
            total = total + self.feature_kd * feat
        loss = self.kd * self.kd_scale * total
        if self.distill_gt > 0:
            ce = self._ce(s_logits, targets)
            logs["ce"] = float(ce.detach())
            loss = loss + self.distill_gt * ce
        return loss, logs


def features_kl(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """Sum over the feature maps of the channel-softmax KL (teacher detached), batch-mean, x T^2."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"feature distillation needs the same non-empty list of features from both passes, "
                         f"got {len(student)} and {len(teacher)}")
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"feature shapes differ between passes: {tuple(s.shape)} vs {tuple(t.shape)}")
        total = total + kl_batchmean(s, t.detach(), temperature, dim=1)
    return total


__all__ = ["ClassificationCriterion", "features_kl", "kl_batchmean", "labels_tensor", "topk_kl"]
