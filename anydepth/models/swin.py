"""Any-depth Swin Transformer classifiers: ``swin-t-anydepth`` (and ``swin-s-anydepth``).

Swin (Liu et al. 2021) as timm's ``swin_{tiny,small}_patch4_window7_224`` and torchvision's
``swin_t``/``swin_s`` build it (patch embedding + LayerNorm; stages of window / shifted-window
attention blocks with relative position bias, a patch merging between stages; final LayerNorm,
average pool, linear head), with the any-depth structure of Adaptive Depth Networks (Kang & Lee,
NeurIPS 2024; the authors' ``wchkang/depth``, ``models/swin_transformer.py``):

* the four Swin stages are the four switches ``stage1..stage4``; each keeps
  ``min(n - 1, (n + 1) // 2)`` essential blocks (Swin-T ``[2, 2, 6, 2]`` -> ``[1, 1, 3, 1]``, the
  authors' ``depths_base``); the others are the refinement path;
* skip-aware norms: ``norm1``/``norm2`` of every essential block, and the LayerNorm of the patch
  merging that feeds a stage (it takes that stage's switch, as in their code, where merging layer
  ``i`` reads ``skip[(i + 1) // 2]``); the stem norm and the final norm are plain.

Paper figures (multiply-adds at 224x224): Swin-T FFFF 4.49 G, TFFF 4.11 G, TTFF 3.75 G, TTTT
2.34 G; :meth:`AnyDepthSwin.flops` / 2 matches them within 1%.

Window attention has a relative position bias and (shifted windows) a mask, which our fused
attention op does not take: the attention stays eager in the inference form too.

Windows follow timm: at a stage whose side is not larger than the window, the window shrinks to
the side and is not shifted (at 224x224 with window 7 this is the last stage, where torchvision
does the same). Every stage side must be a multiple of its window.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..classify import AnyDepthClassifier, stage_switches
from ..depth import DepthConfig, DepthSpace
from ..family import ModelFamily, Peer, TrainDefaults, WeightImport, lazy, register_family
from ..nn import SkipAwareLayerNorm, SkippableStage, split_blocks
from ._transformer import BlockChain, Mlp, apply_norm, drop_path, drop_path_rates, init_transformer_, layer_norm

#: name -> (embed dim, blocks per stage, heads per stage); patch 4, window 7, MLP ratio 4
VARIANTS: Dict[str, Tuple[int, Tuple[int, ...], Tuple[int, ...]]] = {
    "t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
}


def relative_position_index(window: int) -> torch.Tensor:
    """``[w*w, w*w]`` index into the ``(2w-1)^2``-row bias table for each (query, key) pair of a
    window: row offset * (2w - 1) + column offset, both shifted to start at 0."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # [2, N, N]
    return rel[0] * (2 * window - 1) + rel[1]


def shift_mask(side: int, window: int, shift: int) -> torch.Tensor:
    """``[num_windows, w*w, w*w]`` additive mask (0 or -100) of shifted-window attention: after the
    cyclic shift, tokens of a window that came from different regions do not attend each other."""
    region = torch.zeros(side, side)
    cuts = ((0, side - window), (side - window, side - shift), (side - shift, side))
    label = 0
    for h0, h1 in cuts:
        for w0, w1 in cuts:
            region[h0:h1, w0:w1] = label
            label += 1
    n = side // window
    win = region.view(n, window, n, window).permute(0, 2, 1, 3).reshape(n * n, window * window)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """(Shifted-)window multi-head self-attention over a ``[B, H, W, C]`` map of side ``side``:
    cyclic shift by ``-shift``, ``window x window`` windows, attention with relative position bias
    (and the shift mask), reverse."""

    def __init__(self, dim: int, num_heads: int, side: int, window: int, shift: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"stage width {dim} is not divisible by {num_heads} heads")
        if side % window:
            raise ValueError(f"a {side}x{side} stage does not split into {window}x{window} windows; choose an "
                             "input size whose stage sides are multiples of the window")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.side, self.window, self.shift = side, window, shift
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.register_buffer("attn_mask", shift_mask(side, window, shift) if shift else None, persistent=False)

    def position_bias(self) -> torch.Tensor:
        n = self.window * self.window
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws, s = self.window, self.shift
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        nh, nw = h // ws, w // ws
        win = x.view(b, nh, ws, nw, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, ws * ws, c)
        n = ws * ws
        q, k, v = self.qkv(win).view(-1, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.position_bias().unsqueeze(0)
        if self.attn_mask is not None:
            nwin = nh * nw
            attn = attn.view(b, nwin, self.num_heads, n, n) + self.attn_mask.to(attn.dtype)[None, :, None]
            attn = attn.view(-1, self.num_heads, n, n)
        out = self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c))
        out = out.view(b, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out


class SwinBlock(nn.Module):
    """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` on a ``[B, H, W, C]`` map."""

    def __init__(self, dim: int, num_heads: int, side: int, window: int, shift: int, mlp_hidden: int,
                 qkv_bias: bool = True, eps: float = 1e-5, skip_aware: bool = False, drop_path: float = 0.0):
        super().__init__()
        self.drop_path_rate = drop_path
        self.norm1 = layer_norm(dim, eps, skip_aware)
        self.attn = WindowAttention(dim, num_heads, side, window, shift, qkv_bias)
        self.norm2 = layer_norm(dim, eps, skip_aware)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        # stochastic depth in training, not on the shallow path (as the authors' base-net)
        rate = 0.0 if skip else self.drop_path_rate
        x = x + drop_path(self.attn(apply_norm(self.norm1, x, skip)), rate, self.training)
        return x + drop_path(self.mlp(apply_norm(self.norm2, x, skip)), rate, self.training)


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (order (0,0), (1,0), (0,1), (1,1) as (row, column) offsets, as
    timm and torchvision), skip-aware LayerNorm over the ``4C`` channels, linear to ``2C``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = SkipAwareLayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x, skip))


class AnyDepthSwin(AnyDepthClassifier):
    """Any-depth Swin classifier (see the module docstring).

    ``model(x, depth)``: ``x`` float RGB in [0, 1] ``[N, 3, img_size, img_size]`` (normalised
    inside, ImageNet mean/std by default); returns logits ``[N, num_classes]``.

    Args:
        img_size, patch_size, window_size: input side (fixed: masks and windows are built for it),
            patch side, attention window side.
        embed_dim, depths, num_heads, mlp_ratio, qkv_bias, eps: the transformer (timm's names);
            one switch per entry of ``depths``.
        drop_path: stochastic depth for training, rising linearly to this rate over the blocks (the
            authors trained Swin-T with 0.1; 0 by default); never applied on a shallow path.
    """

    def __init__(self, num_classes: int = 1000, img_size: int = 224, patch_size: int = 4, window_size: int = 7,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-5, drop_path: float = 0.0,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        kw = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
        super().__init__(**kw)
        depths, num_heads = tuple(depths), tuple(num_heads)
        for name, val in (("num_classes", num_classes), ("img_size", img_size), ("patch_size", patch_size),
                          ("window_size", window_size), ("embed_dim", embed_dim), *zip(
                              [f"depths[{i}]" for i in range(len(depths))], depths)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not depths or len(num_heads) != len(depths):
            raise ValueError(f"depths {depths} and num_heads {num_heads} need one entry per stage")
        self.num_classes = num_classes
        self.img_size = img_size
        self.default_input_shape = (1, 3, img_size, img_size)
        self.stride = patch_size * 2 ** (len(depths) - 1)
        if img_size % self.stride:
            raise ValueError(f"img_size {img_size} must be a multiple of {self.stride} (patch {patch_size} and "
                             f"{len(depths) - 1} patch mergings)")
        self.depths = depths
        self.depth_space = DepthSpace(stage_switches(len(depths)))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim, eps=eps)
        rates = iter(drop_path_rates(drop_path, sum(depths)))
        stages = []
        side = img_size // patch_size
        dim = embed_dim
        for i, (n, heads) in enumerate(zip(depths, num_heads)):
            down = None
            if i > 0:
                down = PatchMerging(dim, eps)
                dim, side = 2 * dim, side // 2
            window = min(window_size, side)
            shift = 0 if side <= window_size else window // 2
            ess, _ = split_blocks(n)
            blocks = [SwinBlock(dim, heads, side, window, shift if j % 2 else 0, int(dim * mlp_ratio), qkv_bias,
                                eps, skip_aware=j < ess, drop_path=next(rates))  # essential: skip-aware norms
                      for j in range(n)]
            stages.append(SkippableStage(BlockChain(blocks[:ess], down),
                                         BlockChain(blocks[ess:]) if n > ess else None))
        self.stages = nn.ModuleList(stages)
        self.num_features = dim
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, num_classes)
        init_transformer_(self)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, WindowAttention):
                    nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    @property
    def switchable_modules(self) -> Dict[str, nn.Module]:
        return dict(zip(self.depth_space.switches, self.stages))

    def blocks(self) -> List[List[SwinBlock]]:
        """The blocks of each stage in network order (essential then refinement)."""
        out = []
        for stage in self.stages:
            out.append(list(stage.essential.blocks) + (list(stage.refinement.blocks) if stage.refinement else []))
        return out

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        if tuple(x.shape[2:]) != (self.img_size, self.img_size):
            raise ValueError(f"this Swin takes {self.img_size}x{self.img_size} inputs (its windows and shift masks "
                             f"are built for that size), got {x.shape[2]}x{x.shape[3]}")

    def forward_logits(self, x: torch.Tensor, depth: DepthConfig) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        x = self.patch_embed.norm(self.patch_embed.proj(x).permute(0, 2, 3, 1))
        feats = []
        for name, stage in zip(self.depth_space.switches, self.stages):
            x = stage(x, depth.is_skipped(name))
            feats.append(x.permute(0, 3, 1, 2))  # NCHW view: channels on dim 1 for the feature KD
        return self.head(self.norm(x).mean(dim=(1, 2))), feats

    def _to_inference(self, backend: str, **options) -> None:
        if options:
            raise TypeError(f"{type(self).__name__}.to_inference() takes no options {sorted(options)}")
        # window attention (position bias + shift mask) is not what our fused attention op takes:
        # nothing to swap, the inference form is the eager model in eval mode


def _factory(variant: str):
    dim, depths, heads = VARIANTS[variant]

    def build(num_classes: int = 1000, **kwargs) -> AnyDepthSwin:
        """Swin-{variant} any-depth; keyword options as :class:`AnyDepthSwin` (e.g. ``img_size``,
        ``embed_dim``, ``depths``, ``num_heads``, ``window_size`` for small test models)."""
        cfg = {"embed_dim": dim, "depths": depths, "num_heads": heads, **kwargs}
        return AnyDepthSwin(num_classes=num_classes, **cfg)

    build.__name__ = f"swin_{variant}_anydepth"
    return build


def _import_file(path: str):
    from ..convert._timm import import_file

    return import_file("swin")(path)


FAMILY = register_family(ModelFamily(
    name="swin",
    model_class=AnyDepthSwin,
    factories={f"swin-{v}-anydepth": _factory(v) for v in VARIANTS},
    task="classify",
    preprocess="resize",
    criterion=lazy("anydepth.losses.classify:ClassificationCriterion"),
    # the authors' Swin-T run (wchkang/depth README): AdamW lr 1e-3 at batch 4 x 256, weight decay
    # 0.05, gradient clip 5
    train=TrainDefaults(lr=1e-3, weight_decay=0.05, clip_grad=5.0),
    converters={"timm": lazy("anydepth.convert:from_timm"),
                "torchvision": lazy("anydepth.convert:from_torchvision")},
    weight_import=WeightImport("a timm or torchvision Swin state dict (.pth/.bin/.safetensors)",
                               lazy("anydepth.convert._timm:is_state_dict_file"), _import_file),
    peer=Peer("timm", lazy("anydepth.convert._timm:build_peer"), lazy("anydepth.convert._timm:call_peer")),
))
