"""Any-depth Vision Transformer (ViT) classifiers: ``vit-{ti16,s16,b16}-anydepth``.

The ViT of Dosovitskiy et al. (class token, learned position embedding, pre-norm blocks, final
LayerNorm, linear head on the class token), as timm's ``vit_*_patch16_224`` and torchvision's
``vit_b_16`` build it, with the any-depth structure of Adaptive Depth Networks (Kang & Lee,
NeurIPS 2024, arXiv 2312.16392). ViT has no stages of its own; the authors' code
(``wchkang/depth``, ``models/vision_transformer.py``) groups consecutive encoder blocks into
stages of 3 (ViT-B/16: 12 blocks = 4 stages, switches ``stage1..stage4``). Inside each stage:

* the split rule of the papers (:func:`anydepth.nn.split_blocks`): ``min(n - 1, (n + 1) // 2)``
  essential blocks, the rest refinement; a stage of 3 keeps 2 and skips its last block, as the
  authors' code does ("every last block of stages is skippable");
* skip-aware norms: both LayerNorms (``norm1`` before attention, ``norm2`` before the MLP) of every
  essential block are :class:`~anydepth.nn.SkipAwareLayerNorm` and use their second set when the
  stage runs shallow; refinement blocks, the patch embedding and the final norm have plain ones.

Paper figures (multiply-adds at 224x224): ViT-B/16 FFFF 17.58 G, TTFF 14.67 G, TTFT 13.21 G,
TTTT 11.76 G; :meth:`AnyDepthViT.flops` / 2 gives them within 0.2% (ours counts the matmuls
only; the paper's counter adds the LayerNorms, 0.1%).

Attention is ``F.scaled_dot_product_attention`` in the trainable form; the inference form
(:meth:`~anydepth.model.AnyDepthModel.to_inference`, ``anydepth_kernels.optimize``) calls our
fused attention op (:func:`anydepth_kernels.attention`: Triton FlashAttention on CUDA, the
library's flash kernel on the CPU).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..classify import AnyDepthClassifier, stage_switches
from ..depth import DepthConfig, DepthSpace
from ..family import ModelFamily, Peer, TrainDefaults, WeightImport, lazy, register_family
from ..nn import SkippableStage, split_blocks
from ._transformer import BlockChain, Mlp, apply_norm, drop_path, drop_path_rates, init_transformer_, layer_norm
from anydepth_kernels import attention

#: name -> (embed dim, blocks, heads); patch 16, MLP ratio 4 (timm's vit_{tiny,small,base}_patch16_224)
VARIANTS: Dict[str, Tuple[int, int, int]] = {
    "ti16": (192, 12, 3),
    "s16": (384, 12, 6),
    "b16": (768, 12, 12),
}

#: blocks per stage in the authors' grouping of ViT blocks
BLOCKS_PER_STAGE = 3


def default_stage_blocks(depth: int, per_stage: int = BLOCKS_PER_STAGE) -> Tuple[int, ...]:
    """Consecutive groups of ``per_stage`` blocks (a shorter last group when it does not divide)."""
    full, rest = divmod(depth, per_stage)
    return tuple([per_stage] * full + ([rest] if rest else []))


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``[B, N, C]`` tokens: one ``qkv`` linear (q, k, v stacked,
    heads contiguous inside each, as timm and ``nn.MultiheadAttention`` lay them out), then
    ``proj``. ``use_kernel`` (set by the inference form) routes the attention through
    :func:`anydepth_kernels.attention`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_kernel = False
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_kernel:
            o = attention(q, k, v, backend=self.backend)
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    """Pre-norm encoder block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``. ``skip_aware``
    (essential blocks): both norms are skip-aware."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool = True,
                 eps: float = 1e-6, skip_aware: bool = False, drop_path: float = 0.0):
        super().__init__()
        self.drop_path_rate = drop_path
        self.norm1 = layer_norm(dim, eps, skip_aware)
        self.attn = SelfAttention(dim, num_heads, qkv_bias)
        self.norm2 = layer_norm(dim, eps, skip_aware)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        # stochastic depth in training, not on the shallow path (as the authors' base-net)
        rate = 0.0 if skip else self.drop_path_rate
        x = x + drop_path(self.attn(apply_norm(self.norm1, x, skip)), rate, self.training)
        return x + drop_path(self.mlp(apply_norm(self.norm2, x, skip)), rate, self.training)


class AnyDepthViT(AnyDepthClassifier):
    """Any-depth ViT classifier (see the module docstring).

    ``model(x, depth)``: ``x`` float RGB in [0, 1], ``[N, 3, img_size, img_size]`` (normalised
    inside with ``mean``/``std``, ImageNet's by default; timm's ImageNet-21k ViTs use 0.5/0.5);
    returns logits ``[N, num_classes]``.

    Args:
        img_size, patch_size: the input side (fixed: the position embedding has one entry per
            patch) and the patch side.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, eps: the transformer (timm's names).
        stage_blocks: blocks per switchable stage, summing to ``depth``; default groups of 3 as the
            authors (ViT-B/16: ``(3, 3, 3, 3)``). Each stage is split by the papers' rule.
        drop_path: stochastic depth for training, rising linearly to this rate over the blocks
            (0 by default, as the authors' ViT); never applied on a shallow path.
    """

    def __init__(self, num_classes: int = 1000, img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, eps: float = 1e-6, stage_blocks: Optional[Sequence[int]] = None,
                 drop_path: float = 0.0, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None):
        kw = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
        super().__init__(**kw)
        for name, val in (("num_classes", num_classes), ("img_size", img_size), ("patch_size", patch_size),
                          ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        stage_blocks = tuple(stage_blocks) if stage_blocks is not None else default_stage_blocks(depth)
        if not stage_blocks or sum(stage_blocks) != depth or min(stage_blocks) < 1:
            raise ValueError(f"stage_blocks {stage_blocks} must be positive and sum to depth={depth}")
        self.num_classes = num_classes
        self.img_size = img_size
        self.default_input_shape = (1, 3, img_size, img_size)
        self.patch_size = patch_size
        self.stride = patch_size
        self.embed_dim = embed_dim
        self.stage_blocks = stage_blocks
        self.depth_space = DepthSpace(stage_switches(len(stage_blocks)))
        hidden = int(embed_dim * mlp_ratio)
        grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))

        rates = iter(drop_path_rates(drop_path, depth))

        def blocks(n: int, skip_aware: bool) -> List[ViTBlock]:
            return [ViTBlock(embed_dim, num_heads, hidden, qkv_bias, eps, skip_aware, next(rates)) for _ in range(n)]

        stages = []
        for n in stage_blocks:
            ess, ref = split_blocks(n)
            essential = BlockChain(blocks(ess, True))
            stages.append(SkippableStage(essential, BlockChain(blocks(ref, False)) if ref else None))
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.head = nn.Linear(embed_dim, num_classes)
        init_transformer_(self)
        with torch.no_grad():
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)

    @property
    def switchable_modules(self) -> Dict[str, nn.Module]:
        return dict(zip(self.depth_space.switches, self.stages))

    def blocks(self) -> List[ViTBlock]:
        """Every encoder block in network order (essential then refinement of each stage)."""
        out: List[ViTBlock] = []
        for stage in self.stages:
            out.extend(stage.essential.blocks)
            if stage.refinement is not None:
                out.extend(stage.refinement.blocks)
        return out

    def _extra_params_used(self, config: DepthConfig, ran: set) -> int:
        # the class token and position embedding belong to the model itself (no module hook sees them)
        return self.cls_token.numel() + self.pos_embed.numel()

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        if tuple(x.shape[2:]) != (self.img_size, self.img_size):
            raise ValueError(f"this ViT takes {self.img_size}x{self.img_size} inputs (its position embedding "
                             f"has one entry per {self.patch_size}-pixel patch), got "
                             f"{x.shape[2]}x{x.shape[3]}")

    def forward_logits(self, x: torch.Tensor, depth: DepthConfig) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        feats = []
        for name, stage in zip(self.depth_space.switches, self.stages):
            x = stage(x, depth.is_skipped(name))
            feats.append(x.transpose(1, 2))  # [N, C, tokens]: channels on dim 1 for the feature KD
        # the final norm is per token: normalising the class token alone gives the same logits
        return self.head(self.norm(x[:, 0])), feats

    def _to_inference(self, backend: str, **options) -> None:
        if options:
            raise TypeError(f"{type(self).__name__}.to_inference() takes no options {sorted(options)}")
        for m in self.modules():
            if isinstance(m, SelfAttention):
                m.use_kernel = True
                m.backend = backend if backend in ("auto", "triton", "sdpa", "reference") else "auto"


def _factory(variant: str):
    dim, depth, heads = VARIANTS[variant]

    def build(num_classes: int = 1000, **kwargs) -> AnyDepthViT:
        """ViT-{variant} any-depth; keyword options as :class:`AnyDepthViT` (e.g. ``img_size``,
        ``depth``, ``embed_dim``, ``num_heads``, ``stage_blocks`` for small test models)."""
        cfg = {"embed_dim": dim, "depth": depth, "num_heads": heads, **kwargs}
        return AnyDepthViT(num_classes=num_classes, **cfg)

    build.__name__ = f"vit_{variant}_anydepth"
    return build


def _import_file(path: str):
    from ..convert._timm import import_file

    return import_file("vit")(path)


FAMILY = register_family(ModelFamily(
    name="vit",
    model_class=AnyDepthViT,
    factories={f"vit-{v}-anydepth": _factory(v) for v in VARIANTS},
    task="classify",
    preprocess="resize",
    criterion=lazy("anydepth.losses.classify:ClassificationCriterion"),
    # the authors' ViT-B/16 run (wchkang/depth README): AdamW lr 7.5e-4 at batch 4 x 256, weight
    # decay 0.2, gradient clip 1
    train=TrainDefaults(lr=7.5e-4, weight_decay=0.2, clip_grad=1.0),
    converters={"timm": lazy("anydepth.convert:from_timm"),
                "torchvision": lazy("anydepth.convert:from_torchvision")},
    weight_import=WeightImport("a timm or torchvision ViT state dict (.pth/.bin/.safetensors)",
                               lazy("anydepth.convert._timm:is_state_dict_file"), _import_file),
    peer=Peer("timm", lazy("anydepth.convert._timm:build_peer"), lazy("anydepth.convert._timm:call_peer")),
))
