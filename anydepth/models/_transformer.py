"""Pieces shared by the any-depth transformer classifiers (:mod:`anydepth.models.vit`,
:mod:`anydepth.models.swin`): the MLP, the chain of blocks one sub-path holds, weight init."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..nn import SkipAwareLayerNorm


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` (exact GELU, as timm's and torchvision's ViT/Swin)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(branch: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch: in training, each sample's branch is zeroed with
    probability ``rate`` and the kept ones scaled by ``1 / (1 - rate)``; identity otherwise."""
    if not training or rate <= 0.0:
        return branch
    keep = 1.0 - rate
    mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.dim() - 1)).bernoulli_(keep)
    return branch * mask / keep


def drop_path_rates(rate: float, n: int) -> list:
    """Per-block stochastic-depth rates rising linearly from 0 to ``rate`` over ``n`` blocks (timm's
    and torchvision's schedule)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {rate!r}")
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def layer_norm(dim: int, eps: float, skip_aware: bool) -> nn.Module:
    """A :class:`~anydepth.nn.SkipAwareLayerNorm` (a block of an essential sub-path) or a plain
    LayerNorm (refinement blocks, which never run shallow)."""
    return SkipAwareLayerNorm(dim, eps=eps) if skip_aware else nn.LayerNorm(dim, eps=eps)


def apply_norm(norm: nn.Module, x: torch.Tensor, skip: bool) -> torch.Tensor:
    return norm(x, skip) if isinstance(norm, SkipAwareLayerNorm) else norm(x)


class BlockChain(nn.Module):
    """One sub-path of a stage: an optional ``downsample`` (Swin's patch merging, which belongs to
    the stage it feeds) then ``blocks`` in order. ``forward(x, skip)`` hands ``skip`` to every
    member (each picks its norm set; plain-norm members ignore it)."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module] = None):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x, skip)
        for block in self.blocks:
            x = block(x, skip)
        return x


@torch.no_grad()
def init_transformer_(model: nn.Module) -> None:
    """timm's default init: truncated normal (std 0.02) linear weights, zero biases, unit
    LayerNorms (both sets of skip-aware ones)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
