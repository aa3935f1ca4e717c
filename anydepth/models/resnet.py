"""ResNet, one implementation for two uses: RT-DETR's ResNet-vd backbone and the any-depth ResNet
classifiers ``resnet{18,34,50,101}-anydepth`` (Adaptive Depth Networks, arXiv 2312.16392).

:class:`ResNet` (the body: stem, max-pool, ``stage1..stage4``) has two styles:

* ``"vd"`` (RT-DETR, PaddleDetection's ResNet-vd): a stem of three 3x3 conv-BN-ReLU (stride 2 on
  the first); the projection shortcut of a stride-2 block is 2x2 avg-pool + 1x1 conv-BN; a basic
  block (R18/R34) projects the first shortcut of every stage, stage 1 included.
* ``"torchvision"`` (ResNet v1.5, torchvision's ``resnet18/34/50/101``): a 7x7/2 conv-BN-ReLU stem;
  the projection shortcut is a 1x1 stride-2 conv-BN, present only where the shape changes.

Both put a bottleneck's stride on its 3x3 conv. Each stage is a
:class:`~anydepth.nn.SkippableStage` split with :func:`~anydepth.nn.split_blocks` (the papers'
rule: ``min(n - 1, (n + 1) // 2)`` essential blocks; ResNet-50 [3, 4, 6, 3] -> refinement
[1, 2, 3, 1]); every conv of an essential block has a skip-aware BatchNorm. The shortcut conv's BN
is skip-aware in RT-DETR's backbone (the AnyDepth-DETR code) and plain in the classifiers (the
authors' ``models/resnet.py``: ``downsample`` keeps one BatchNorm); the stem's BN is plain in both.

:class:`AnyDepthResNet` is the classifier: ``ResNet(style="torchvision")``, global average pool,
``fc``. Switches ``stage1..stage4`` (``TTTT`` = base). ResNet-50 at 224x224: 4.11 G multiply-adds
full, 2.58 G base (the paper's figures; ``model.flops()`` counts 2 per multiply-add).
Import torchvision weights with :func:`anydepth.convert.from_torchvision`.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..classify import AnyDepthClassifier, stage_switches
from ..depth import DepthConfig, DepthSpace
from ..family import ModelFamily, Peer, TrainDefaults, WeightImport, lazy, register_family
from ..nn import ConvNormAct, SharedBasisConvNormAct, SkippableStage, inplace_ok, split_blocks

__all__ = ["AnyDepthResNet", "BasicBlock", "Blocks", "Bottleneck", "RESNETS", "ResNet", "Shortcut", "conv_bn",
           "parse_shared_bases", "to_shared_bases"]

STYLES = ("vd", "torchvision")
STEMS = ("deep", "7x7", "3x3")
#: ``shared_bases=`` keys and defaults (see :func:`parse_shared_bases`)
SHARED_BASES_DEFAULTS = dict(shared_rank=None, unique_rank=0, bases=1, coefficients=True, blocks="all")

#: torchvision's ResNets: block type and blocks per stage (stage widths 64..512, x4 for bottlenecks)
RESNETS: Dict[str, Tuple[str, Tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


def conv_bn(cin: int, cout: int, k: int, s: int = 1, act: str = "identity", skip_aware: bool = False,
            eps: float = 1e-5) -> ConvNormAct:
    """Conv (no bias, padding ``k // 2``) + BatchNorm (eps 1e-5, momentum 0.1) + activation."""
    return ConvNormAct(cin, cout, k, s, act=act, skip_aware=skip_aware, bn_eps=eps, bn_momentum=0.1)


def parse_shared_bases(spec) -> Optional[Dict[str, object]]:
    """Validate a ``shared_bases=`` option (``None``/``False``: none) into a full dict:

    * ``shared_rank`` (required, int >= 1) and ``unique_rank`` (int >= 0, default 0): ranks of the
      first stage; stage ``i`` uses them times its width over the first stage's (x1, 2, 4, 8),
      as the authors' ``ResNet34_SingleShared(shared_rank, unique_rank)`` (``S48U1``: 48 + 1 in
      stage 1 ... 384 + 8 in stage 4);
    * ``bases``: 1 (one shared basis per stage serves both 3x3 convs of a basic block; the
      paper's ``SingleShared``) or 2 (one for the blocks' first convs, one for their second:
      ``DoubleShared``; basic blocks only: a bottleneck has one 3x3 conv);
    * ``coefficients``: True (basis ++ own filters -> BN -> 1x1 coefficients -> BN) or False (the
      shared basis is the whole 3x3 conv, ``shared_rank`` = the conv's width, ``unique_rank`` 0:
      the paper's ResNet-50 "Shared");
    * ``blocks``: ``"all"`` (every block of a stage but the first: the paper) or ``"refinement"``
      (only the stage's skippable refinement blocks).
    """
    if spec is None or spec is False:
        return None
    if not isinstance(spec, dict):
        raise TypeError(f"shared_bases must be a dict (e.g. dict(shared_rank=48, unique_rank=1)) or None, "
                        f"got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SHARED_BASES_DEFAULTS))
    if unknown:
        raise ValueError(f"shared_bases: unknown keys {unknown}; valid: {sorted(SHARED_BASES_DEFAULTS)}")
    cfg = {**SHARED_BASES_DEFAULTS, **spec}
    for key, lo in (("shared_rank", 1), ("unique_rank", 0)):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"shared_bases: {key} must be an int >= {lo}, got {v!r}")
    if cfg["bases"] not in (1, 2):
        raise ValueError(f"shared_bases: bases must be 1 or 2, got {cfg['bases']!r}")
    if not isinstance(cfg["coefficients"], bool):
        raise ValueError(f"shared_bases: coefficients must be True or False, got {cfg['coefficients']!r}")
    if cfg["blocks"] not in ("all", "refinement"):
        raise ValueError(f"shared_bases: blocks must be 'all' or 'refinement', got {cfg['blocks']!r}")
    if not cfg["coefficients"] and cfg["unique_rank"] != 0:
        raise ValueError("shared_bases: coefficients=False shares the whole conv: unique_rank must be 0")
    return cfg


class _BlockBasis:
    """The shared bases of one stage, handed to its blocks: ``conv(cin, cout, stride, act,
    skip_aware, which)`` builds a :class:`~anydepth.nn.SharedBasisConvNormAct` on basis
    ``which`` (0: the first, -1: the last)."""

    def __init__(self, bases: Sequence[nn.Module], unique_rank: int, coefficients: bool):
        self.bases, self.unique_rank, self.coefficients = list(bases), unique_rank, coefficients

    def conv(self, cin: int, cout: int, stride: int, act: str, skip_aware: bool, which: int) -> nn.Module:
        return SharedBasisConvNormAct(cin, cout, stride, self.unique_rank, self.bases[which], act, skip_aware,
                                      self.coefficients)


def _relu(y: torch.Tensor) -> torch.Tensor:
    """ReLU of a block's fresh output, in place at inference (same values)."""
    return torch.relu_(y) if inplace_ok(y) else F.relu(y)


class Blocks(nn.Module):
    """A sequence of blocks sharing one ``skip`` argument."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        for b in self.blocks:
            x = b(x, skip)
        return x


class Shortcut(nn.Module):
    """Projection shortcut: optional 2x2 avg-pool (ceil mode; the "vd" downsampling) + 1x1 conv-BN
    (stride ``stride`` when there is no pool)."""

    def __init__(self, cin: int, cout: int, stride: int, pool: bool, skip_aware: bool):
        super().__init__()
        self.pool = nn.AvgPool2d(2, 2, 0, ceil_mode=True) if pool else None
        self.conv = conv_bn(cin, cout, 1, 1 if pool else stride, skip_aware=skip_aware)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        return self.conv(x, skip)


def _shortcut(cin: int, cout: int, stride: int, style: str, project: bool, skip_aware: bool) -> Optional[Shortcut]:
    if not project:
        return None
    return Shortcut(cin, cout, stride, pool=style == "vd" and stride == 2, skip_aware=skip_aware)


class BasicBlock(nn.Module):
    """``relu(bn(conv3x3(relu(bn(conv3x3/s(x))))) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int, first: bool, skip_aware: bool, style: str = "vd",
                 shortcut_skip_aware: Optional[bool] = None, basis: Optional["_BlockBasis"] = None):
        super().__init__()
        sc_aware = skip_aware if shortcut_skip_aware is None else (skip_aware and shortcut_skip_aware)
        if style == "vd":
            # RT-DETR's ResNet-18/34 always project the shortcut of a stage's first block (avg-pool
            # only where the width changes, i.e. the stride-2 stages)
            self.shortcut = (Shortcut(cin, cout, stride, pool=cin != cout, skip_aware=sc_aware) if first else None)
        else:
            self.shortcut = _shortcut(cin, cout, stride, style, cin != cout or stride != 1, sc_aware)
        if basis is None:
            self.conv1: nn.Module = conv_bn(cin, cout, 3, stride, "relu", skip_aware)
            self.conv2: nn.Module = conv_bn(cout, cout, 3, 1, "identity", skip_aware)
        else:
            self.conv1 = basis.conv(cin, cout, stride, "relu", skip_aware, 0)
            self.conv2 = basis.conv(cout, cout, 1, "identity", skip_aware, -1)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        r = x if self.shortcut is None else self.shortcut(x, skip)
        return _relu(self.conv2(self.conv1(x, skip), skip, residual=r))


class Bottleneck(nn.Module):
    """``relu(bn(conv1x1(relu(bn(conv3x3/s(relu(bn(conv1x1(x))))))) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int, skip_aware: bool, style: str = "vd",
                 shortcut_skip_aware: Optional[bool] = None, basis: Optional["_BlockBasis"] = None):
        super().__init__()
        mid = cout // 4
        project = cin != cout or stride != 1
        sc_aware = skip_aware if shortcut_skip_aware is None else (skip_aware and shortcut_skip_aware)
        self.shortcut = _shortcut(cin, cout, stride, style, project, sc_aware)
        self.pool_only = nn.AvgPool2d(2, 2, 0, ceil_mode=True) if (stride == 2 and not project) else None
        self.conv1 = conv_bn(cin, mid, 1, 1, "relu", skip_aware)
        self.conv2: nn.Module = (conv_bn(mid, mid, 3, stride, "relu", skip_aware) if basis is None
                                 else basis.conv(mid, mid, stride, "relu", skip_aware, 0))
        self.conv3 = conv_bn(mid, cout, 1, 1, "identity", skip_aware)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        if self.shortcut is not None:
            r = self.shortcut(x, skip)
        else:
            r = x if self.pool_only is None else self.pool_only(x)
        return _relu(self.conv3(self.conv2(self.conv1(x, skip), skip), skip, residual=r))


def _max_pool_3x3s2(x: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(x, 3, 2, 1)`` as two separable strided maxima: exact, and about 5x faster than
    the library's NCHW CPU kernel on the stem's 64 x 320 x 320 map (inference only: the gradient
    of ``maximum`` treats ties differently from max-pool's)."""
    h, w = x.shape[-2:]
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    r = torch.maximum(torch.maximum(xp[..., 0:2 * ho:2, :], xp[..., 1:2 * ho + 1:2, :]), xp[..., 2:2 * ho + 2:2, :])
    return torch.maximum(torch.maximum(r[..., 0:2 * wo:2], r[..., 1:2 * wo + 1:2]), r[..., 2:2 * wo + 2:2])


class ResNet(nn.Module):
    """The ResNet body: stem, 3x3/2 max-pool, ``stage1..stage<n>`` (each a
    :class:`~anydepth.nn.SkippableStage`). ``forward(x, skips)`` returns the outputs of the stages
    in ``out_stages`` (1-based; RT-DETR: stages 2..4).

    ``layer_type``: ``"basic"`` or ``"bottleneck"``; ``hidden_sizes``: stage output widths;
    ``style``: ``"vd"`` or ``"torchvision"`` (see the module docstring); ``shortcut_skip_aware``:
    whether an essential block's projection shortcut has a skip-aware BN; ``stem``: ``"deep"`` (three
    3x3 convs) or ``"7x7"`` (one 7x7/2 conv), by default the style's (the authors' ResNet_ADN under
    RT-DETR is ``style="vd"`` with a 7x7 stem and plain shortcut BNs), or ``"3x3"`` (one 3x3/1
    conv and no max-pool: the CIFAR ResNets of the shared-filter-basis paper).

    ``shared_bases``: deeply shared filter bases in every stage (see :func:`parse_shared_bases`);
    the stage's bases are :class:`anydepth_kernels.SharedBasis` modules in the
    :class:`anydepth_kernels.SharedBasisGroup` ``stage<i>.shared_bases`` (stored once, referenced
    by the blocks' convs; the orthogonality penalty takes a stage's bases jointly); a shared conv
    in an essential block keeps one BN pair per depth (:class:`~anydepth.nn.SharedBasisConvNormAct`)."""

    def __init__(self, layer_type: str, depths: Sequence[int], hidden_sizes: Sequence[int],
                 stem_size: int = 64, style: str = "vd", shortcut_skip_aware: bool = True,
                 out_stages: Sequence[int] = (2, 3, 4), stem: Optional[str] = None, shared_bases=None):
        super().__init__()
        from anydepth_kernels.shared_basis import SharedBasis, SharedBasisGroup

        sb = parse_shared_bases(shared_bases)
        if layer_type not in ("basic", "bottleneck"):
            raise ValueError(f"layer_type must be 'basic' or 'bottleneck', got {layer_type!r}")
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        if len(depths) != len(hidden_sizes) or not depths:
            raise ValueError(f"depths {list(depths)} and hidden_sizes {list(hidden_sizes)} need one entry per stage")
        if not all(1 <= s <= len(depths) for s in out_stages):
            raise ValueError(f"out_stages must be in 1..{len(depths)}, got {list(out_stages)}")
        self.style = style
        #: run the stem (and its max-pool) channels-last on the CPU, the stages NCHW: an inference
        #: form's choice (RT-DETR's ``to_inference`` sets it: its fused stem convs run ~25% faster
        #: channels-last and the library's channels-last max-pool ~4x faster than the NCHW one)
        self.stem_channels_last = False
        self.out_stages = tuple(out_stages)
        self.num_stages = len(depths)
        stem = stem or ("deep" if style == "vd" else "7x7")
        if stem not in STEMS:
            raise ValueError(f"stem must be 'deep' (three 3x3 convs), '7x7' or '3x3' (CIFAR), got {stem!r}")
        if stem == "deep":
            self.stem = nn.ModuleList([
                conv_bn(3, stem_size // 2, 3, 2, "relu"),
                conv_bn(stem_size // 2, stem_size // 2, 3, 1, "relu"),
                conv_bn(stem_size // 2, stem_size, 3, 1, "relu"),
            ])
        elif stem == "7x7":
            self.stem = nn.ModuleList([conv_bn(3, stem_size, 7, 2, "relu")])
        else:
            self.stem = nn.ModuleList([conv_bn(3, stem_size, 3, 1, "relu")])
        self.pool: Optional[nn.Module] = None if stem == "3x3" else nn.MaxPool2d(3, 2, 1)
        cin = stem_size
        for i, (n, cout) in enumerate(zip(depths, hidden_sizes)):
            stride = 1 if i == 0 else 2
            ess, _ = split_blocks(n)
            blocks: List[nn.Module] = []
            basis, bases = None, []
            first_shared = 1 if sb is None or sb["blocks"] == "all" else ess
            if sb is not None and n > first_shared:
                width = cout if layer_type == "basic" else cout // 4
                mult = width // (hidden_sizes[0] if layer_type == "basic" else hidden_sizes[0] // 4)
                rank, unique = int(sb["shared_rank"]) * mult, int(sb["unique_rank"]) * mult  # type: ignore[call-overload]
                if not sb["coefficients"] and rank != width:
                    raise ValueError(f"shared_bases: coefficients=False needs shared_rank x {mult} = {width} (the "
                                     f"conv's width) in stage {i + 1}, got {rank}")
                nb = int(sb["bases"])  # type: ignore[call-overload]
                if nb == 2 and layer_type != "basic":
                    raise ValueError("shared_bases: bases=2 shares one basis per 3x3 conv of a basic block; a "
                                     "bottleneck has one 3x3 conv: use bases=1")
                bases = [SharedBasis(width, rank, 3) for _ in range(nb)]
                basis = _BlockBasis(bases, unique, bool(sb["coefficients"]))
            for j in range(n):
                aware = j < ess
                c_in, s = (cin, stride) if j == 0 else (cout, 1)
                b = basis if j >= first_shared else None
                if layer_type == "basic":
                    blocks.append(BasicBlock(c_in, cout, s, j == 0, aware, style, shortcut_skip_aware, b))
                else:
                    blocks.append(Bottleneck(c_in, cout, s, aware, style, shortcut_skip_aware, b))
            refinement = Blocks(blocks[ess:]) if n > ess else None
            stage = SkippableStage(Blocks(blocks[:ess]), refinement)
            if bases:
                stage.shared_bases = SharedBasisGroup(bases)   # penalised jointly (bases=2: DoubleShared)
            setattr(self, f"stage{i + 1}", stage)
            cin = cout
        self.out_channels = tuple(hidden_sizes[s - 1] for s in self.out_stages)

    def _stem_channels_last(self, x: torch.Tensor) -> bool:
        return self.stem_channels_last and x.device.type == "cpu" and not torch.compiler.is_compiling()

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if self._stem_channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last)
        for conv in self.stem:
            x = conv(x)
        return x

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is None:
            return x.contiguous()
        if self._stem_channels_last(x):  # the library's channels-last max-pool is fast; stages run NCHW
            return self.pool(x).contiguous()
        if torch.is_grad_enabled() or x.device.type != "cpu":
            return self.pool(x)
        return _max_pool_3x3s2(x)

    def forward(self, x: torch.Tensor, skips: Sequence[bool]) -> List[torch.Tensor]:
        if len(skips) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} stage skips, got {len(skips)}")
        x = self._pool(self._stem(x))
        outs = []
        for i, skip in enumerate(skips):
            x = getattr(self, f"stage{i + 1}")(x, skip)
            if i + 1 in self.out_stages:
                outs.append(x)
        return outs


def _stage_blocks(stage: nn.Module) -> List[nn.Module]:
    blocks = list(stage.essential.blocks)
    return blocks + (list(stage.refinement.blocks) if stage.refinement is not None else [])


@torch.no_grad()
def to_shared_bases(model: nn.Module, shared_bases) -> nn.Module:
    """A copy of ``model`` (an any-depth ResNet classifier or RT-DETR built by
    :func:`anydepth.create_model`, without shared bases) rebuilt with ``shared_bases=`` and
    initialised from its weights: every weight outside the shared convs is copied, and the 3x3
    convs of each stage that share a basis are converted by
    :func:`anydepth_kernels.shared_basis.share_bases` (the shared basis = the top right singular
    vectors of their stacked filters, each conv's own filters the top ones of what is left, the
    coefficients the least-squares fit, its BatchNorm kept as the output norm; an essential
    block's shallow-path norm goes to the shallow-path twin).

    Exact in eval mode (outputs equal at every depth up to float rounding) when each stage's
    ranks cover its shared convs' filters: ``shared_rank x mult`` >= the stacked filters sharing a
    basis (e.g. RT-DETR-R18 / resnet18, two shared convs of width ``w`` per stage:
    ``shared_rank=128``), or ``unique_rank + shared_rank`` = ``9 x`` the stage-1 width (all of
    a filter's values). Below that it is the best low-rank start (a projection). ``coefficients=False``
    is not convertible (one conv shared by several cannot reproduce different filters)."""
    from anydepth_kernels.shared_basis import share_bases

    from ..registry import create_model

    name = getattr(model, "model_name", None)
    kwargs = dict(getattr(model, "model_kwargs", None) or {})
    backbone = getattr(model, "backbone", None)
    if name is None or not isinstance(backbone, ResNet):
        raise TypeError(f"to_shared_bases needs an any-depth ResNet or RT-DETR built by anydepth.create_model, got "
                        f"{type(model).__name__}")
    if any(isinstance(m, SharedBasisConvNormAct) for m in backbone.modules()):
        raise ValueError("to_shared_bases: the model already has shared bases")
    spec = parse_shared_bases(shared_bases)
    if spec is None:
        raise ValueError("to_shared_bases: give shared_bases=dict(shared_rank=..., ...)")
    if not spec["coefficients"]:
        raise ValueError("to_shared_bases: coefficients=False shares one whole conv among blocks with different "
                         "filters; no weights reproduce them (use coefficients=True)")
    kwargs["shared_bases"] = shared_bases
    new = create_model(name, **kwargs)
    ref = next(model.parameters())
    new.to(ref.device, ref.dtype).train(model.training)
    old_sd, new_sd = model.state_dict(), new.state_dict()
    same = {k: v for k, v in old_sd.items() if k in new_sd and new_sd[k].shape == v.shape}
    new.load_state_dict(same, strict=False)
    ours = (".layer.", ".layer_skip.", ".shared_bases.")
    left = [k for k in new_sd if k not in same and not any(p in k for p in ours)]
    if left:
        raise ValueError(f"to_shared_bases: {len(left)} tensors of the shared model have no counterpart in "
                         f"{name} (first: {left[0]!r}); was the model built with other options than model_kwargs?")
    for i in range(1, backbone.num_stages + 1):
        groups: Dict[int, Tuple[nn.Module, List[Tuple[nn.Module, nn.Module]]]] = {}
        old_blocks, new_blocks = (_stage_blocks(getattr(b, f"stage{i}")) for b in (backbone, new.backbone))
        for ob, nb in zip(old_blocks, new_blocks):
            for attr in ("conv1", "conv2"):
                n = getattr(nb, attr)
                if isinstance(n, SharedBasisConvNormAct):
                    groups.setdefault(id(n.layer.shared), (n.layer.shared, []))[1].append((getattr(ob, attr), n))
        for basis, pairs in groups.values():
            norms = [o.bn.bn if o.skip_aware else o.bn for o, _ in pairs]
            _, layers = share_bases([o.conv for o, _ in pairs], basis.rank, pairs[0][1].layer.unique_rank, norms)
            basis.weight.copy_(layers[0].shared.weight)
            for (o, n), layer in zip(pairs, layers):
                if layer.unique is not None:
                    n.layer.unique.copy_(layer.unique)
                n.layer.coeff.weight.copy_(layer.coeff.weight)
                n.layer.basis_norm.load_state_dict(layer.basis_norm.state_dict())
                n.layer.norm.load_state_dict(layer.norm.state_dict())
                if n.layer_skip is not None:    # the shallow-path twin: tied filters, its own norms
                    n.layer_skip.basis_norm.load_state_dict(layer.basis_norm.state_dict())
                    n.layer_skip.norm.load_state_dict(o.bn.bn_skip.state_dict())
    return new


class AnyDepthResNet(AnyDepthClassifier):
    """Any-depth ResNet classifier (torchvision's v1.5 topology): ``model(x, depth=...)`` ->
    logits ``[N, num_classes]``; ``x`` float RGB in [0, 1], normalised inside (ImageNet mean/std).

    Switches ``stage1..stage4``; the feature-distillation term (off by default) compares the
    outputs of stages 1..3, as the authors' ``--fpn`` run does.

    ``stem``: ``"7x7"`` (default) or ``"3x3"`` (one 3x3/1 conv, no max-pool: CIFAR);
    ``shared_bases``: deeply shared filter bases (:func:`parse_shared_bases`), e.g. the paper's
    ImageNet ResNet34-S48U1 = ``create_model("resnet34-anydepth", shared_bases=dict(shared_rank=48,
    unique_rank=1, bases=2))``; the trainer's criterion then adds the orthogonality penalty."""

    def __init__(self, arch: str = "resnet50", num_classes: int = 1000, stem: Optional[str] = None,
                 shared_bases=None, **kwargs):
        super().__init__(**kwargs)
        if arch not in RESNETS:
            raise ValueError(f"unknown ResNet {arch!r}; valid: {list(RESNETS)}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        layer_type, depths = RESNETS[arch]
        widths = (64, 128, 256, 512)
        expansion = 4 if layer_type == "bottleneck" else 1
        self.arch = arch
        self.num_classes = num_classes
        self.depth_space = DepthSpace(stage_switches(len(depths)))
        self.backbone = ResNet(layer_type, depths, [w * expansion for w in widths], style="torchvision",
                               shortcut_skip_aware=False, out_stages=(1, 2, 3, 4), stem=stem,
                               shared_bases=shared_bases)
        self.fc = nn.Linear(widths[-1] * expansion, num_classes)
        if stem == "3x3":
            self.stride = 8   # no stride-2 stem, no max-pool
        for m in self.modules():  # torchvision's initialisation (shared bases keep their orthogonal one)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def switchable_modules(self) -> Dict[str, nn.Module]:
        return {f"stage{i}": getattr(self.backbone, f"stage{i}") for i in range(1, 5)}

    def forward_logits(self, x: torch.Tensor, depth: DepthConfig) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        feats = self.backbone(x, [depth.is_skipped(s) for s in self.depth_space.switches])
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(feats[-1], 1), 1))
        return logits, feats[:-1]


def _factory(arch: str):
    def build(num_classes: int = 1000, **kwargs) -> AnyDepthResNet:
        return AnyDepthResNet(arch, num_classes, **kwargs)

    build.__name__ = f"{arch}_anydepth"
    build.__doc__ = f"Any-depth {arch} classifier (torchvision topology); options: :class:`AnyDepthResNet`."
    return build


def _is_state_dict_file(path: str) -> bool:
    """torchvision's weight files end in ``.pth`` (``.pt`` files are left to the detector families:
    Ultralytics checkpoints; call :func:`anydepth.convert.from_torchvision_state_dict` for others)."""
    return os.path.isfile(path) and path.lower().endswith(".pth")


def _import_torchvision_file(path: str):
    from ..convert import from_torchvision_state_dict

    return from_torchvision_state_dict(path).eval()


#: AdamW 1e-3 by default (the trainer's optimizer); the authors' ImageNet script (train_adn.py) is
#: SGD lr 0.1, momentum 0.9, weight decay 1e-4 (``--optimizer sgd --lr 0.1``). Fine-tuning from
#: trained weights (``recipe="finetune"``): SGD lr 0.01, no warm-up.
_TRAIN = TrainDefaults(lr=1e-3, weight_decay=1e-4, clip_grad=0.0,
                       finetune=(("optimizer", "sgd"), ("lr", 1e-2), ("warmup_epochs", 0.0)))

FAMILY = register_family(ModelFamily(
    name="resnet",
    model_class=AnyDepthResNet,
    factories={f"{arch}-anydepth": _factory(arch) for arch in RESNETS},
    task="classify",
    preprocess="resize",
    criterion=lazy("anydepth.losses.classify:ClassificationCriterion"),
    train=_TRAIN,
    converters={"torchvision": lazy("anydepth.convert:from_torchvision")},
    weight_import=WeightImport("a torchvision ResNet/MobileNetV2 state dict (.pth)", _is_state_dict_file,
                               _import_torchvision_file),
    peer=Peer("torchvision", lazy("anydepth.convert._torchvision:build_peer"),
              lambda m, x: m(x)),
))
