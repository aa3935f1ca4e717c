"""Any-depth image classifiers (Adaptive Depth Networks with Skippable Sub-Paths, arXiv 2312.16392).

:class:`AnyDepthClassifier` is the base class of every classifier family (``task="classify"`` in
its :class:`~anydepth.family.ModelFamily`): ResNet and MobileNetV2 (:mod:`anydepth.models.resnet`,
:mod:`anydepth.models.mobilenetv2`), ViT and Swin. A classifier

* takes ``[N, 3, H, W]`` float RGB in [0, 1] (like the detectors) and normalises it itself with
  :attr:`~AnyDepthClassifier.mean` / :attr:`~AnyDepthClassifier.std` (ImageNet's by default), so
  ``ours(x) == torchvision_model((x - mean) / std)``;
* returns class logits ``[N, num_classes]`` from ``model(x, depth=...)``;
* has one switch per stage, named ``"stage1"``, ``"stage2"``, ... (True = skip that stage's
  refinement path: ``"FFFF"`` is full, ``"TTTT"`` base, as in the paper);
* gives the training criterion ``forward_train(x, depth) -> {"logits", "features"}``.

Subclasses implement :meth:`AnyDepthClassifier.forward_logits`.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
from torch import nn

from .depth import DepthConfig, DepthLike
from .model import AnyDepthModel

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)


class Classification(NamedTuple):
    """Top-``k`` classes of one image: ``labels`` int64 ``[k]`` and ``scores`` (softmax
    probabilities) ``[k]``, by decreasing score."""

    labels: torch.Tensor
    scores: torch.Tensor


def stage_switches(n: int) -> Tuple[str, ...]:
    """The switch names of a classifier with ``n`` switchable stages: ``stage1`` .. ``stage<n>``."""
    return tuple(f"stage{i + 1}" for i in range(n))


class AnyDepthClassifier(AnyDepthModel):
    """Base class of the any-depth classifiers.

    Subclasses set ``depth_space`` (switches from :func:`stage_switches`), ``num_classes`` and
    implement :meth:`forward_logits`; they may override :meth:`_to_inference` (the default fuses
    every :class:`~anydepth.nn.ConvNormAct` into a :class:`~anydepth.nn.FusedConv` and deploys
    shared-filter-basis convs (:func:`~anydepth.nn.deploy_shared_basis_convs`): those with
    coefficients folded or kept factored, whichever costs fewer FLOPs, those without folded).
    """

    task = "classify"
    default_input_shape = (1, 3, 224, 224)
    stride = 32
    num_classes: int

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values (std > 0), got {mean!r}, {std!r}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # not in the state dict: constants of the input convention, moved with .to()
        self.register_buffer("input_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_scale", 1.0 / torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    # -- hooks ------------------------------------------------------------------------------------
    def forward_logits(self, x: torch.Tensor, depth: DepthConfig) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``x``: normalised input. Returns ``(logits [N, num_classes], features)``, ``features`` =
        the stage outputs the feature-distillation term compares (may be empty)."""
        raise NotImplementedError

    # -- forward ----------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel."""
        return (x - self.input_mean.to(x.dtype)) * self.input_scale.to(x.dtype)

    def forward_depth(self, x: torch.Tensor, depth: DepthConfig) -> torch.Tensor:
        self.check_input(x)
        return self.forward_logits(self.normalize(x), depth)[0]

    def forward_train(self, x: torch.Tensor, depth: DepthLike = None, targets=None) -> Dict[str, object]:
        """Training pass at ``depth`` (``None`` = full): ``{"logits": [N, C], "features": [...]}``.
        ``targets`` is accepted (and unused) for the trainer's common call."""
        if not self.training:
            raise RuntimeError("forward_train() needs the model in training mode: call model.train() first")
        if self.is_inference:
            raise RuntimeError("forward_train() cannot run on the inference form (model.to_inference())")
        config = self.resolve_depth(depth, x.shape if isinstance(x, torch.Tensor) else None)
        self.check_input(x)
        logits, feats = self.forward_logits(self.normalize(x), config)
        return {"logits": logits, "features": list(feats)}

    def _to_inference(self, backend: str, **options) -> None:
        from .nn import deploy_shared_basis_convs, fuse_conv_norm_acts

        if options:
            raise TypeError(f"{type(self).__name__}.to_inference() takes no options {sorted(options)}")
        fuse_conv_norm_acts(self, backend)
        deploy_shared_basis_convs(self, backend)

    # -- images in, classes out -------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images, depth: DepthLike = None, imgsz: int = 224, topk: int = 5) -> List[Classification]:
        """Classify ``images`` (one or a list; HxWx3 uint8 RGB or 3xHxW float in [0, 1], any size):
        resize the short side to ``imgsz / 0.875`` and centre-crop ``imgsz`` (the ImageNet
        evaluation transform), run at ``depth``, return the top-``topk`` classes of each image."""
        from .data.classify import eval_transform

        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0 or imgsz % self.stride:
            raise ValueError(f"imgsz must be a positive multiple of {self.stride}, got {imgsz!r}")
        if not isinstance(images, (list, tuple)):
            images = [images]
        param = next(self.parameters())
        batch = torch.stack([eval_transform(_as_uint8_hwc(im), imgsz) for im in images])
        batch = batch.to(param.device, param.dtype).div_(255.0)
        was_training = self.training
        self.eval()
        try:
            logits = self(batch, depth=depth)
        finally:
            self.train(was_training)
        prob = logits.float().softmax(-1)
        scores, labels = prob.topk(min(topk, prob.shape[-1]), dim=-1)
        return [Classification(lab, sc) for lab, sc in zip(labels, scores)]


def _as_uint8_hwc(image):
    """An HxWx3 uint8 numpy array from a numpy image, an HxWx3 uint8 tensor (channels-last, as the
    detectors take it) or a 3xHxW tensor (float in [0, 1], or uint8)."""
    import numpy as np

    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8 and image.dim() == 3 and image.shape[-1] == 3:
            return image.detach().cpu().numpy()
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an HxWx3 uint8 or a 3xHxW tensor, got shape {tuple(image.shape)}")
        t = image.detach().cpu()
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255.0).round()
        return t.to(torch.uint8).permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise TypeError(f"numpy images must be uint8 HxWx3 RGB, got {arr.dtype}")
    return arr if arr.flags.writeable else arr.copy()   # np.asarray(PIL image) is read-only


def classification_head(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Dropout (when ``dropout > 0``) + Linear, as torchvision's classifiers end."""
    if dropout > 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Linear(in_features, num_classes)


__all__ = ["AnyDepthClassifier", "Classification", "IMAGENET_MEAN", "IMAGENET_STD", "classification_head",
           "stage_switches"]
