"""torchvision ``resnet18/34/50/101`` and ``mobilenet_v2`` -> ``resnet*-anydepth`` /
``mobilenetv2-anydepth``.

:func:`from_torchvision` copies every conv weight, BatchNorm (weights and running statistics) and
the classifier into the any-depth model; each skip-aware norm's shallow-path set starts as a copy
of its full-depth set, so the converted model at full depth computes what torchvision's does (on
``(x - mean) / std``: our classifiers normalise inside). Shallow depths need any-depth training
(fine-tuning). Variants we do not build (ResNeXt / wide ResNets, dilation, other MobileNetV2
widths) raise ``ValueError``.

:func:`build_peer` builds torchvision's model with random weights and BatchNorm statistics
(seeded) and our conversion: the fidelity oracle of the tests and the benchmark's speed peer.
torchvision is imported only in this file.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, List, Mapping, Tuple

import torch
from torch import nn

from .._optional import require

__all__ = ["build_peer", "from_torchvision", "from_torchvision_state_dict"]


def _tv():
    return require("torchvision", "converting torchvision models")


@torch.no_grad()
def _load_cna(ours, conv: nn.Conv2d, bn: nn.BatchNorm2d, where: str) -> None:
    """Copy ``conv`` + ``bn`` into a ConvNormAct (both norm sets of a skip-aware BN)."""
    if ours.conv.weight.shape != conv.weight.shape:
        raise ValueError(f"{where}: conv weight {tuple(conv.weight.shape)} does not fit "
                         f"{tuple(ours.conv.weight.shape)}")
    if (conv.stride, conv.padding, conv.groups, conv.dilation) != (
            ours.conv.stride, ours.conv.padding, ours.conv.groups, ours.conv.dilation) or conv.bias is not None:
        raise ValueError(f"{where}: unsupported conv settings {conv}")
    if bn.eps != 1e-5 or not bn.affine or not bn.track_running_stats:
        raise ValueError(f"{where}: unsupported BatchNorm settings {bn}")
    ours.conv.weight.copy_(conv.weight)
    targets = [ours.bn.bn, ours.bn.bn_skip] if ours.skip_aware else [ours.bn]
    for t in targets:
        t.load_state_dict(bn.state_dict())


def _resnet_arch(model) -> str:
    from ..models.resnet import RESNETS

    tv = _tv().models.resnet
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]
    block = type(model.layer1[0])
    kind = {tv.BasicBlock: "basic", tv.Bottleneck: "bottleneck"}.get(block)
    if kind is None:
        raise ValueError(f"unsupported ResNet block {block.__name__}")
    depths = tuple(len(s) for s in layers)
    for name, (k, d) in RESNETS.items():
        if (k, d) == (kind, depths):
            arch = name
            break
    else:
        raise ValueError(f"unsupported ResNet: {kind} blocks {list(depths)}; supported: "
                         + ", ".join(f"{n} ({k} {list(d)})" for n, (k, d) in RESNETS.items()))
    if kind == "bottleneck" and model.layer1[0].conv2.out_channels != 64:
        raise ValueError("ResNeXt / wide ResNets (groups or width_per_group) are not supported")
    if kind == "bottleneck" and any(b.conv2.groups != 1 or b.conv2.dilation != (1, 1) for s in layers for b in s):
        raise ValueError("grouped or dilated ResNets (replace_stride_with_dilation) are not supported")
    return arch


def _resnet_pairs(tv_model, ours) -> Iterator[Tuple[Any, nn.Conv2d, nn.BatchNorm2d, str]]:
    body = ours.backbone
    yield body.stem[0], tv_model.conv1, tv_model.bn1, "conv1"
    for i in range(1, 5):
        stage = getattr(body, f"stage{i}")
        blocks = list(stage.essential.blocks) + (list(stage.refinement.blocks) if stage.refinement else [])
        tv_blocks = list(getattr(tv_model, f"layer{i}"))
        for j, (b, t) in enumerate(zip(blocks, tv_blocks)):
            where = f"layer{i}.{j}"
            convs = ("conv1", "conv2", "conv3") if hasattr(t, "conv3") else ("conv1", "conv2")
            for k, c in enumerate(convs):
                yield getattr(b, c), getattr(t, c), getattr(t, f"bn{k + 1}"), f"{where}.{c}"
            if (t.downsample is None) != (b.shortcut is None):
                raise ValueError(f"{where}: shortcut projection differs from torchvision's")
            if t.downsample is not None:
                yield b.shortcut.conv, t.downsample[0], t.downsample[1], f"{where}.downsample"


def _mobilenet_parts(block) -> List[Tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) pairs of a torchvision InvertedResidual: [expand], depthwise, projection."""
    seq = list(block.conv)
    pairs = [(m[0], m[1]) for m in seq[:-2]]
    pairs.append((seq[-2], seq[-1]))
    return pairs


def _mobilenet_pairs(tv_model, ours) -> Iterator[Tuple[Any, nn.Conv2d, nn.BatchNorm2d, str]]:
    feats = list(tv_model.features)
    if len(feats) != 19:
        raise ValueError(f"unsupported MobileNetV2: {len(feats)} feature modules (expected 19: width 1.0, "
                         "the default inverted-residual setting)")
    yield ours.stem.cna, feats[0][0], feats[0][1], "features.0"
    ours_blocks = [ours.block0]
    for i in range(1, ours.num_stages + 1):
        stage = getattr(ours, f"stage{i}")
        ours_blocks += list(stage.essential.blocks) + list(stage.refinement.blocks)
    ours_blocks.append(ours.last_block)
    for idx, (b, t) in enumerate(zip(ours_blocks, feats[1:18])):
        mods = ([b.expand.cna] if b.expand is not None else []) + [b.dw.cna, b.project]
        parts = _mobilenet_parts(t)
        if len(mods) != len(parts) or t.use_res_connect != b.use_res:
            raise ValueError(f"features.{idx + 1}: block structure differs from torchvision's default")
        for m, (conv, bn) in zip(mods, parts):
            yield m, conv, bn, f"features.{idx + 1}"
    yield ours.head_conv.cna, feats[18][0], feats[18][1], "features.18"


@torch.no_grad()
def from_torchvision(model, **kwargs):
    """An any-depth classifier holding the weights of a torchvision ``ResNet`` (18/34/50/101) or
    ``MobileNetV2`` (width 1.0); ``kwargs`` go to the factory (e.g. ``dropout``). Returns the model
    in eval mode. ``ours(x) == model((x - mean) / std)`` at full depth."""
    from ..registry import create_model

    tv = _tv().models
    if isinstance(model, tv.ResNet):
        arch = _resnet_arch(model)
        fc = model.fc
        ours = create_model(f"{arch}-anydepth", num_classes=fc.out_features, **kwargs)
        pairs = _resnet_pairs(model, ours)
        head = ours.fc
    elif isinstance(model, tv.MobileNetV2):
        fc = model.classifier[-1]
        drop = model.classifier[0].p if isinstance(model.classifier[0], nn.Dropout) else 0.0
        kwargs.setdefault("dropout", float(drop))
        ours = create_model("mobilenetv2-anydepth", num_classes=fc.out_features, **kwargs)
        pairs = _mobilenet_pairs(model, ours)
        head = ours.classifier[-1] if isinstance(ours.classifier, nn.Sequential) else ours.classifier
    else:
        raise ValueError(f"from_torchvision takes a torchvision ResNet or MobileNetV2, got {type(model).__name__}")
    n = 0
    for dst, conv, bn, where in pairs:
        _load_cna(dst, conv, bn, where)
        n += 1
    if not isinstance(fc, nn.Linear) or head.weight.shape != fc.weight.shape:
        raise ValueError(f"unsupported classifier head {fc}")
    head.weight.copy_(fc.weight)
    head.bias.copy_(fc.bias)
    expected = sum(1 for m in ours.modules() if type(m).__name__ == "ConvNormAct")
    if n != expected:
        raise ValueError(f"converted {n} conv-BN pairs, the any-depth model has {expected}")
    param = next(model.parameters())
    return ours.to(param.device, param.dtype).eval()


def _arch_of_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    if "features.18.0.weight" in sd:
        return "mobilenet_v2"
    if "conv1.weight" not in sd or "fc.weight" not in sd:
        raise ValueError("not a torchvision ResNet or MobileNetV2 state dict (no conv1/fc or features.18 keys)")
    counts = []
    for i in range(1, 5):
        idx = {int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}.")}
        counts.append(max(idx) + 1 if idx else 0)
    bottleneck = "layer1.0.conv3.weight" in sd
    table = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
             ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101"}
    arch = table.get(("bottleneck" if bottleneck else "basic", tuple(counts)))
    if arch is None:
        raise ValueError(f"unsupported torchvision ResNet state dict: {'bottleneck' if bottleneck else 'basic'} "
                         f"blocks {counts}")
    return arch


def from_torchvision_state_dict(state_dict_or_path, **kwargs):
    """:func:`from_torchvision` from a torchvision state dict (or the path of a ``.pth`` file
    holding one, read with ``weights_only=True``): the architecture is read from its keys."""
    sd = state_dict_or_path
    if isinstance(sd, (str, os.PathLike)):
        sd = torch.load(os.fspath(sd), map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and isinstance(sd.get("model"), dict):   # torchvision reference scripts
            sd = sd["model"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("expected a state dict (parameter name -> tensor)")
    arch = _arch_of_state_dict(sd)
    head = "classifier.1.weight" if arch == "mobilenet_v2" else "fc.weight"
    if head not in sd:
        raise ValueError(f"torchvision {arch} state dict without {head!r}")
    tv_model = getattr(_tv().models, arch)(weights=None, num_classes=int(sd[head].shape[0]))
    tv_model.load_state_dict(sd)
    return from_torchvision(tv_model, **kwargs)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random non-trivial BatchNorm weights, biases and running statistics (seeded), so that a
    fidelity check exercises every norm; conv and linear weights keep their (seeded) init."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
    return model


class Normalized(nn.Module):
    """``model((x - mean) / std)``: a torchvision classifier taking [0, 1] input as ours do."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


_PEERS = {"resnet18-anydepth": "resnet18", "resnet34-anydepth": "resnet34", "resnet50-anydepth": "resnet50",
          "resnet101-anydepth": "resnet101", "mobilenetv2-anydepth": "mobilenet_v2"}


def build_peer(model_name: str, num_classes: int = 1000, seed: int = 0):
    """``(Normalized(torchvision_model).eval(), ours.eval())`` with the same random weights and
    BatchNorm statistics (seeded)."""
    from ..classify import IMAGENET_MEAN, IMAGENET_STD

    if model_name not in _PEERS:
        raise ValueError(f"no torchvision peer for {model_name!r}; known: {sorted(_PEERS)}")
    torch.manual_seed(seed)
    tv_model = getattr(_tv().models, _PEERS[model_name])(weights=None, num_classes=num_classes)
    randomize_(tv_model, seed).eval()
    ours = from_torchvision(tv_model)
    return Normalized(tv_model, IMAGENET_MEAN, IMAGENET_STD).eval(), ours
