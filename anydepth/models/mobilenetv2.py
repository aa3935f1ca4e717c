"""Any-depth MobileNetV2 classifier ``mobilenetv2-anydepth`` (Adaptive Depth Networks, arXiv
2312.16392; torchvision's ``mobilenet_v2`` topology, width 1.0).

Inverted-residual settings (t, c, n, s): (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
(6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1). As in the authors' ``models/mobilenetv2.py``:

* the five groups with two or more blocks are the switchable stages ``stage1..stage5``, split
  with :func:`~anydepth.nn.split_blocks` (essential 1, 2, 2, 2, 2 of 2, 3, 4, 3, 3);
* every conv of an essential block has a skip-aware BatchNorm; so do the single-block parts at
  both ends: the stem conv and the first block (t=1) switch their norms with ``stage1``, the last
  block (320) and the 1x1 head conv (1280) with ``stage5``.

ReLU6 is computed as ``relu(...).clamp_max(6)`` so that the inference form can use the fused
conv + BN + ReLU kernel (:class:`~anydepth.nn.FusedConv`) followed by one clamp: exact.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..classify import AnyDepthClassifier, classification_head, stage_switches
from ..depth import DepthConfig, DepthSpace
from ..family import ModelFamily, Peer, WeightImport, lazy, register_family
from ..nn import ConvNormAct, SkippableStage, split_blocks
from .resnet import _TRAIN, Blocks, _import_torchvision_file, _is_state_dict_file

__all__ = ["AnyDepthMobileNetV2", "ConvReLU6", "InvertedResidual", "SETTING"]

#: torchvision's inverted-residual setting: expansion t, channels c, blocks n, first stride s
SETTING: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _cna(cin: int, cout: int, k: int, s: int, act: str, skip_aware: bool, groups: int = 1) -> ConvNormAct:
    return ConvNormAct(cin, cout, k, s, g=groups, act=act, skip_aware=skip_aware, bn_eps=1e-5, bn_momentum=0.1)


class ConvReLU6(nn.Module):
    """Conv-BN-ReLU6: a :class:`~anydepth.nn.ConvNormAct` with ReLU, then ``clamp_max(6)``."""

    def __init__(self, cin: int, cout: int, k: int, s: int, skip_aware: bool, groups: int = 1):
        super().__init__()
        self.cna = _cna(cin, cout, k, s, "relu", skip_aware, groups)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        return self.cna(x, skip).clamp_max(6.0)


class InvertedResidual(nn.Module):
    """1x1 expand (when t != 1) -> 3x3 depthwise/s -> 1x1 linear projection (+ input when the shape
    is kept)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, skip_aware: bool):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res = stride == 1 and cin == cout
        self.expand = ConvReLU6(cin, hidden, 1, 1, skip_aware) if expand != 1 else None
        self.dw = ConvReLU6(hidden, hidden, 3, stride, skip_aware, groups=hidden)
        self.project = _cna(hidden, cout, 1, 1, "identity", skip_aware)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        y = x if self.expand is None else self.expand(x, skip)
        return self.project(self.dw(y, skip), skip, residual=x if self.use_res else None)


class AnyDepthMobileNetV2(AnyDepthClassifier):
    """Any-depth MobileNetV2: ``model(x, depth=...)`` -> logits ``[N, num_classes]``; ``x`` float
    RGB in [0, 1] (normalised inside). Switches ``stage1..stage5`` (``TTTTT`` = base)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.num_classes = num_classes
        self.stem = ConvReLU6(3, 32, 3, 2, skip_aware=True)
        cin = 32
        stages = 0
        for t, c, n, s in SETTING:
            if n == 1:
                block = InvertedResidual(cin, c, s, t, skip_aware=True)
                setattr(self, "block0" if stages == 0 else "last_block", block)
            else:
                stages += 1
                ess, _ = split_blocks(n)
                blocks = [InvertedResidual(cin if j == 0 else c, c, s if j == 0 else 1, t, skip_aware=j < ess)
                          for j in range(n)]
                setattr(self, f"stage{stages}", SkippableStage(Blocks(blocks[:ess]), Blocks(blocks[ess:])))
            cin = c
        self.num_stages = stages
        self.head_conv = ConvReLU6(cin, 1280, 1, 1, skip_aware=True)
        self.classifier = classification_head(1280, num_classes, float(dropout))
        self.depth_space = DepthSpace(stage_switches(stages))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def switchable_modules(self) -> Dict[str, nn.Module]:
        return {f"stage{i}": getattr(self, f"stage{i}") for i in range(1, self.num_stages + 1)}

    def forward_logits(self, x: torch.Tensor, depth: DepthConfig) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        skips = [depth.is_skipped(s) for s in self.depth_space.switches]
        x = self.block0(self.stem(x, skips[0]), skips[0])
        for i, skip in enumerate(skips):
            x = getattr(self, f"stage{i + 1}")(x, skip)
        x = self.head_conv(self.last_block(x, skips[-1]), skips[-1])
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)), []


def mobilenetv2_anydepth(num_classes: int = 1000, **kwargs) -> AnyDepthMobileNetV2:
    """Any-depth MobileNetV2 (torchvision topology, width 1.0); options: :class:`AnyDepthMobileNetV2`."""
    return AnyDepthMobileNetV2(num_classes, **kwargs)


FAMILY = register_family(ModelFamily(
    name="mobilenetv2",
    model_class=AnyDepthMobileNetV2,
    factories={"mobilenetv2-anydepth": mobilenetv2_anydepth},
    task="classify",
    preprocess="resize",
    criterion=lazy("anydepth.losses.classify:ClassificationCriterion"),
    train=_TRAIN,
    converters={"torchvision": lazy("anydepth.convert:from_torchvision")},
    # one loader for both families' files: it reads the architecture from the state dict's keys
    weight_import=WeightImport("a torchvision ResNet/MobileNetV2 state dict (.pth)", _is_state_dict_file,
                               _import_torchvision_file),
    peer=Peer("torchvision", lazy("anydepth.convert._torchvision:build_peer"), lambda m, x: m(x)),
))
