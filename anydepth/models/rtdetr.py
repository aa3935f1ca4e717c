"""AnyDepth-RT-DETR: RT-DETR (ResNet-vd backbone, hybrid encoder, deformable decoder) whose depth is
chosen per call.

Topology (matches HuggingFace ``RTDetrForObjectDetection`` / the official RT-DETR, so its weights
load with :func:`anydepth.convert.from_transformers`):

* ``backbone``: ResNet-vd. A stem of three 3x3 conv-BN-ReLU (stride 2 on the first) and a 3x3/2
  max-pool, then ``stage1..stage4`` of basic blocks (R18/R34) or bottlenecks (R50/R101). The first
  block of a downsampling stage uses an avg-pool + 1x1 conv shortcut (the "vd" trick).
* ``encoder`` (hybrid encoder): a conv-BN input projection per level (C3, C4, C5 -> hidden), one
  AIFI transformer layer on the stride-32 map with a 2D sin-cos position embedding, then CCFM:
  top-down and bottom-up fusion with CSP blocks of three RepVGG blocks.
* ``decoder``: conv-BN input projections, query selection from the encoder memory with anchors
  (top-``num_queries`` by class score), then decoder layers (self-attention, multi-scale deformable
  cross-attention through :func:`anydepth_kernels.ms_deform_attn`, FFN) with iterative box
  refinement.

Any-depth split (the AnyDepth-DETR paper):

* switches ``backbone.stage1`` .. ``backbone.stage4``: each ResNet stage is a
  :class:`~anydepth.nn.SkippableStage` split with :func:`~anydepth.nn.split_blocks`; every conv of
  the essential blocks (shortcut included) has a skip-aware BatchNorm.
* switch ``encoder``: each CSP block's three RepVGG blocks = 1 essential + 2 refinement. Every
  conv-BN of the hybrid encoder outside the refinement blocks (input projections, lateral and
  downsample convs, CSP convs, essential RepVGG blocks) has a skip-aware BatchNorm keyed on this
  switch, since everything downstream of the first CSP block sees different statistics when it
  runs shallow. (The input projections belong to the hybrid encoder in the official code.) The
  AIFI layer always runs, with its own LayerNorm set (:class:`~anydepth.nn.SkipAwareLayerNorm`)
  when the switch is on.
* knob ``decoder_layers`` in ``1..L`` (``L`` = the variant's decoder layers; RT-DETR's own
  no-retrain knob: the first ``k`` layers run and layer ``k``'s heads give the output). Its base
  value is ``max(1, L - 2)``: 4 for the 6-layer R50/R101 (the published base = every switch
  skipped + 4 decoder layers), 1 for R18 (3 layers) and 2 for R34 (4 layers).

``split="official"`` builds what the authors' released code builds (R50/R101: a 7x7 stem and
one-norm projection shortcuts), so that their checkpoints load exactly
(:func:`anydepth.convert.from_authors_rtdetr`); see :class:`AnyDepthRTDETR`.

Training: :meth:`AnyDepthRTDETR.forward_train` returns every decoder layer's outputs (auxiliary
losses), the encoder's top-k query outputs and, when targets are given, the outputs of contrastive
denoising queries (:func:`build_denoising_queries`) built with the denoising class embedding
``decoder.denoising_class_embed`` (present when ``denoising=True``, the default; HuggingFace
checkpoints carry it). Inference (``forward``) never reads it and is unchanged by the training path.

:meth:`AnyDepthRTDETR.deploy` reparameterises every RepVGG block into one 3x3 conv per norm set
and folds every conv-BN into :class:`anydepth_kernels.FusedConvNormAct` (two epilogues where the
BN is skip-aware).
"""
from __future__ import annotations

import functools
import math
import os
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from anydepth_kernels import FusedConvNormAct, fold_batchnorm, ms_deform_attn
from anydepth_kernels.modules import swap_modules
from anydepth_kernels.cuda_graphs import keep_alive

from .._optional import require
from ..depth import DepthConfig, DepthLike, DepthSpace, KnobSpec
from ..detection import Detections, canvas_side, resize_batch
from ..family import ModelFamily, Peer, TrainDefaults, WeightImport, is_dir, is_file, lazy, register_family
from ..model import AnyDepthModel, warn_deprecated
from ..nn import (ConvNormAct, FusedConv, SkipAwareLayerNorm, SkippableStage, act_, deploy_shared_basis_convs,
                  inplace_ok)
from .resnet import BasicBlock, Blocks, Bottleneck, ResNet, Shortcut, _max_pool_3x3s2, conv_bn  # noqa: F401 (re-exported)
from .rtdetr_denoising import build_denoising_queries

__all__ = ["AnyDepthRTDETR", "SPLITS", "VARIANTS", "build_denoising_queries", "decoder_base_layers"]

#: The official variants: backbone block type, stage depths, stage widths, encoder in-channels,
#: CSP expansion, decoder layers, encoder hidden size and FFN size.
VARIANTS: Dict[str, Dict] = {
    "r18": dict(layer_type="basic", depths=(2, 2, 2, 2), hidden_sizes=(64, 128, 256, 512),
                hidden_expansion=0.5, decoder_layers=3, encoder_hidden_dim=256, encoder_ffn_dim=1024),
    "r34": dict(layer_type="basic", depths=(3, 4, 6, 3), hidden_sizes=(64, 128, 256, 512),
                hidden_expansion=0.5, decoder_layers=4, encoder_hidden_dim=256, encoder_ffn_dim=1024),
    "r50": dict(layer_type="bottleneck", depths=(3, 4, 6, 3), hidden_sizes=(256, 512, 1024, 2048),
                hidden_expansion=1.0, decoder_layers=6, encoder_hidden_dim=256, encoder_ffn_dim=1024),
    "r101": dict(layer_type="bottleneck", depths=(3, 4, 23, 3), hidden_sizes=(256, 512, 1024, 2048),
                 hidden_expansion=1.0, decoder_layers=6, encoder_hidden_dim=384, encoder_ffn_dim=2048),
}

SWITCHES = ("backbone.stage1", "backbone.stage2", "backbone.stage3", "backbone.stage4", "encoder")

#: ``"paper"``: our default (ResNet-vd stem, every norm of an essential block skip-aware).
#: ``"official"``: what the authors' released AnyDepth-RT-DETR code builds, so that their
#: checkpoints load exactly (:func:`anydepth.convert.from_authors_rtdetr`); see :class:`AnyDepthRTDETR`.
SPLITS = ("paper", "official")
_TRANSFORMER_ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def decoder_base_layers(layers: int) -> int:
    """Base value of the ``decoder_layers`` knob: ``max(1, layers - 2)`` (4 of 6 as published)."""
    return max(1, layers - 2)


# ------------------------------------------------------------------------------------------------
# conv blocks: eager form and deployed (folded) form share one call signature
# ------------------------------------------------------------------------------------------------
#: RT-DETR's conv-BN(-act) blocks are the shared :class:`~anydepth.nn.ConvNormAct` (skip-aware
#: BatchNorm, ``forward(x, skip, residual)``) and their folded form :class:`~anydepth.nn.FusedConv`;
#: the old names stay as aliases.
ConvBN = ConvNormAct
FusedConvBN = FusedConv


_conv_bn = conv_bn


class ResNetVd(ResNet):
    """RT-DETR's backbone: the shared :class:`~anydepth.models.resnet.ResNet` in its ``"vd"`` style
    (3-conv stem, avg-pool projection shortcuts, skip-aware shortcut BNs), stages 2..4 out.

    Or the authors' ``ResNet_ADN`` (``official=True``): one 7x7/2 conv-BN-ReLU stem instead of three
    3x3 convs, and a projection shortcut with one norm (not skip-aware) in the first block of a
    stage; the rest (split, "vd" avg-pool shortcut, stride on the 3x3 conv) is the same.

    ``shared_bases``: deeply shared filter bases in the stages (the option of
    :class:`~anydepth.models.resnet.ResNet`, :func:`~anydepth.models.resnet.parse_shared_bases`)."""

    def __init__(self, layer_type: str, depths: Sequence[int], hidden_sizes: Sequence[int], stem_size: int = 64,
                 official: bool = False, shared_bases=None):
        super().__init__(layer_type, depths, hidden_sizes, stem_size, style="vd", shortcut_skip_aware=not official,
                         out_stages=(2, 3, 4), stem="7x7" if official else None, shared_bases=shared_bases)


# ------------------------------------------------------------------------------------------------
# hybrid encoder
# ------------------------------------------------------------------------------------------------
class RepVGGBlock(nn.Module):
    """``act(bn(conv3x3(x)) + bn(conv1x1(x)))``; :meth:`reparameterize` turns it into one 3x3 conv
    per norm set (:class:`RepVGGDeployed`)."""

    def __init__(self, channels: int, act: str, skip_aware: bool, eps: float):
        super().__init__()
        self.conv1 = _conv_bn(channels, channels, 3, 1, "identity", skip_aware, eps)
        self.conv2 = _conv_bn(channels, channels, 1, 1, "identity", skip_aware, eps)
        self.act_name = act
        self.act = {"silu": nn.SiLU, "relu": nn.ReLU, "identity": nn.Identity}[act]()

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        y = self.conv1(x, skip)
        if inplace_ok(y):  # inference: same values, two tensors fewer
            return act_(self.act, y.add_(self.conv2(x, skip)))
        return self.act(y + self.conv2(x, skip))

    def reparameterize(self, backend: str = "auto") -> "RepVGGDeployed":
        """One fused 3x3 conv per norm set (the 1x1 branch's BN differs per set, so the combined
        weights differ: set ``s`` gives ``W3 * s3_s + pad(W1) * s1_s`` and bias ``b3_s + b1_s``)."""
        c3, c1 = self.conv1, self.conv2
        aware = c3.skip_aware
        fused = []
        for name in (("bn", "bn_skip") if aware else ("bn",)):
            bn3 = getattr(c3.bn, name) if aware else c3.bn
            bn1 = getattr(c1.bn, name) if aware else c1.bn
            s3, b3 = fold_batchnorm(bn3)
            s1, b1 = fold_batchnorm(bn1)
            w = c3.conv.weight.detach().double() * s3.double().view(-1, 1, 1, 1)
            w[:, :, 1, 1] += c1.conv.weight.detach().double()[:, :, 0, 0] * s1.double().view(-1, 1)
            f = FusedConvNormAct(c3.conv.in_channels, c3.conv.out_channels, 3, 1, 1, act=self.act_name,
                                 backend=backend, device=w.device, dtype=c3.conv.weight.dtype)
            with torch.no_grad():
                f.weight.copy_(w)
            f.set_epilogue(0, torch.ones_like(b3), b3.double() + b1.double())
            fused.append(f)
        return RepVGGDeployed(*fused)


class RepVGGDeployed(nn.Module):
    """Deployed RepVGG block: ``fused`` at full depth, ``fused_skip`` (if any) when shallow."""

    def __init__(self, fused: FusedConvNormAct, fused_skip: Optional[FusedConvNormAct] = None):
        super().__init__()
        self.fused = fused
        self.fused_skip = fused_skip

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        return self.fused_skip(x) if (skip and self.fused_skip is not None) else self.fused(x)


class CSPRepLayer(nn.Module):
    """CSP block (RepC3-like): ``conv3(bottlenecks(conv1(x)) + conv2(x))``, ``bottlenecks`` = 3
    RepVGG blocks split 1 essential + 2 refinement."""

    def __init__(self, cin: int, cout: int, expansion: float, act: str, eps: float, num_blocks: int = 3):
        super().__init__()
        hidden = int(cout * expansion)
        self.conv1 = _conv_bn(cin, hidden, 1, 1, act, True, eps)
        self.conv2 = _conv_bn(cin, hidden, 1, 1, act, True, eps)
        # the paper's encoder split: 1 essential block, the rest refinement (not split_blocks' rule)
        ess = 1
        blocks = [RepVGGBlock(hidden, act, j < ess, eps) for j in range(num_blocks)]
        self.bottlenecks = SkippableStage(Blocks(blocks[:ess]), Blocks(blocks[ess:]) if num_blocks > ess else None)
        self.conv3 = _conv_bn(hidden, cout, 1, 1, act, True, eps) if hidden != cout else None

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        y = self.conv2(x, skip, residual=self.bottlenecks(self.conv1(x, skip), skip))
        return y if self.conv3 is None else self.conv3(y, skip)


class SelfAttention(nn.Module):
    """Multi-head self-attention; the position embedding is added to queries and keys only."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor],
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``attn_mask`` (optional, broadcastable to ``[B, heads, N, N]``, rows = queries, columns =
        keys): boolean, ``True`` where a query may *not* attend to a key (as
        ``nn.MultiheadAttention``), or floating point, added to the attention logits. Every row
        must leave at least one key visible. Used by the decoder's training path (denoising
        queries); ``None`` (inference) computes exactly what it did without the argument."""
        b, n, c = x.shape
        qk = x if pos is None else x + pos
        shape = (b, n, self.heads, c // self.heads)
        q = self.q_proj(qk).view(shape).transpose(1, 2)
        k = self.k_proj(qk).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        # explicit matmuls rather than F.scaled_dot_product_attention: same result, and
        # torch.utils.flop_counter counts them (it does not count the CPU SDPA kernel)
        logits = torch.matmul(q, k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                logits = logits.masked_fill(attn_mask, float("-inf"))
            else:
                logits = logits + attn_mask.to(logits.dtype)
        out = torch.matmul(logits.softmax(-1), v)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    """``fc2(act(fc1(x)))`` (the transformer FFN)."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = _TRANSFORMER_ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AIFILayer(nn.Module):
    """Post-norm transformer encoder layer; its LayerNorms are skip-aware (encoder switch)."""

    def __init__(self, dim: int, heads: int, ffn: int, act: str, eps: float):
        super().__init__()
        self.self_attn = SelfAttention(dim, heads)
        self.self_attn_layer_norm = SkipAwareLayerNorm(dim, eps)
        self.mlp = MLP(dim, ffn, act)
        self.final_layer_norm = SkipAwareLayerNorm(dim, eps)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, skip: bool = False) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, pos), skip)
        return self.final_layer_norm(x + self.mlp(x), skip)


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (without initialising CUDA)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


_MISSING = object()


class _ShapeCache:
    """Least-recently-used cache (``maxsize`` entries, keyed on the positional arguments) of a
    constant-building function (level tables, anchors, position embeddings), safe for CUDA graphs
    and ``torch.compile``:

    * while ``torch.compile`` traces, the cache is bypassed (traced code should not read or
      mutate it; under compilation the constants fold anyway);
    * every value it returns is reported to :func:`anydepth_kernels.cuda_graphs.keep_alive`, so a
      graph captured by :class:`~anydepth_kernels.CUDAGraphRunner` holds its own reference and
      an eviction here cannot free memory that the graph still reads (a no-op outside a capture);
    * a miss while a CUDA graph is being captured computes the value without storing it: the
      capture does not run kernels, so the tensor would stay unfilled for eager callers (it is a
      graph intermediate instead, recomputed by each replay). The functions cached here build
      their tensors with device kernels only, never from host data, so a miss is capturable.
    """

    def __init__(self, fn, maxsize: int = 32):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.maxsize = maxsize
        self._data: "OrderedDict[tuple, object]" = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.fn(*args)
        with self._lock:
            value = self._data.get(args, _MISSING)
            if value is not _MISSING:
                self._data.move_to_end(args)
        if value is _MISSING:
            value = self.fn(*args)
            if not _capturing():
                with self._lock:
                    value = self._data.setdefault(args, value)  # another thread may have stored it first
                    self._data.move_to_end(args)
                    while len(self._data) > self.maxsize:
                        self._data.popitem(last=False)
        keep_alive(value)
        return value

    def __len__(self) -> int:
        return len(self._data)

    def cache_clear(self) -> None:
        with self._lock:
            self._data.clear()


def _shape_cache(fn):
    """Decorator: a :class:`_ShapeCache` of ``fn``."""
    return _ShapeCache(fn)


@_shape_cache
def _sincos_2d(h: int, w: int, dim: int, temperature: float, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """``[1, h*w, dim]`` 2D sin-cos embedding, row-major, laid out ``[sin_y | cos_y | sin_x | cos_x]``
    (computed in float64, as the reference does)."""
    if dim % 4:
        raise ValueError(f"the 2D sin-cos position embedding needs a dim divisible by 4, got {dim}")
    d = dim // 4
    omega = 1.0 / temperature ** (torch.arange(d, dtype=torch.float64, device=device) / d)
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device),
                            torch.arange(w, dtype=torch.float64, device=device), indexing="ij")
    ey, ex = gy.flatten().outer(omega), gx.flatten().outer(omega)
    return torch.cat([ey.sin(), ey.cos(), ex.sin(), ex.cos()], 1).to(dtype)[None]


class HybridEncoder(nn.Module):
    def __init__(self, in_channels: Sequence[int], hidden: int, ffn: int, heads: int, aifi_layers: int,
                 expansion: float, act: str, enc_act: str, ln_eps: float, bn_eps: float,
                 temperature: float):
        super().__init__()
        self.hidden = hidden
        self.temperature = temperature
        # the input projections keep BatchNorm's default eps (as in the reference)
        self.input_proj = nn.ModuleList([_conv_bn(c, hidden, 1, 1, "identity", True, 1e-5) for c in in_channels])
        self.aifi = nn.ModuleList([AIFILayer(hidden, heads, ffn, enc_act, ln_eps) for _ in range(aifi_layers)])
        n = len(in_channels) - 1
        self.lateral_convs = nn.ModuleList([_conv_bn(hidden, hidden, 1, 1, act, True, bn_eps) for _ in range(n)])
        self.fpn_blocks = nn.ModuleList([CSPRepLayer(2 * hidden, hidden, expansion, act, bn_eps) for _ in range(n)])
        self.downsample_convs = nn.ModuleList([_conv_bn(hidden, hidden, 3, 2, act, True, bn_eps) for _ in range(n)])
        self.pan_blocks = nn.ModuleList([CSPRepLayer(2 * hidden, hidden, expansion, act, bn_eps) for _ in range(n)])

    def forward(self, feats: Sequence[torch.Tensor], skip: bool = False) -> List[torch.Tensor]:
        maps = [proj(f, skip) for proj, f in zip(self.input_proj, feats)]
        maps[-1] = self._aifi(maps[-1], skip)
        return self._ccff(maps, skip)

    def _aifi(self, top: torch.Tensor, skip: bool) -> torch.Tensor:
        """The AIFI transformer layer(s) over the stride-32 map (unchanged without any)."""
        if not len(self.aifi):
            return top
        b, c, h, w = top.shape
        x = top.flatten(2).transpose(1, 2)
        pos = _sincos_2d(h, w, c, self.temperature, x.device, x.dtype)
        for layer in self.aifi:
            x = layer(x, pos, skip)
        return x.transpose(1, 2).reshape(b, c, h, w).contiguous()

    def _ccff(self, maps: List[torch.Tensor], skip: bool) -> List[torch.Tensor]:
        """CCFF: top-down then bottom-up fusion of the projected maps."""
        # top-down
        n = len(self.fpn_blocks)
        inner = [maps[-1]]
        for i in range(n):
            top = self.lateral_convs[i](inner[-1], skip)
            inner[-1] = top
            up = F.interpolate(top, scale_factor=2.0, mode="nearest")
            inner.append(self.fpn_blocks[i](torch.cat([up, maps[n - 1 - i]], 1), skip))
        inner.reverse()
        # bottom-up
        outs = [inner[0]]
        for i in range(n):
            down = self.downsample_convs[i](outs[-1], skip)
            outs.append(self.pan_blocks[i](torch.cat([down, inner[i + 1]], 1), skip))
        return outs


# ------------------------------------------------------------------------------------------------
# decoder
# ------------------------------------------------------------------------------------------------
class PredictionHead(nn.Module):
    """``num_layers`` Linear layers with ReLU between them."""

    def __init__(self, cin: int, hidden: int, cout: int, num_layers: int):
        super().__init__()
        dims = [cin] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [cout]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


class MSDeformableAttention(nn.Module):
    """Multi-scale deformable cross-attention with box reference points (RT-DETR form): offsets
    are scaled by half the reference box size over the number of points."""

    def __init__(self, dim: int, heads: int, levels: int, points: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"d_model {dim} is not divisible by {heads} heads")
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        #: the sampling function; ``None`` = :func:`anydepth_kernels.ms_deform_attn`. The exporter
        #: (:mod:`anydepth.export`) sets a traceable form with the level shapes fixed.
        self.sampler = None
        self._reset()

    def _reset(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.heads, 1, 1, 2)
        grid = grid.repeat(1, self.levels, self.points, 1) * torch.arange(1, self.points + 1).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, ref: torch.Tensor, memory: torch.Tensor,
                shapes: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        b, q, c = query.shape
        m, L, P = self.heads, self.levels, self.points
        value = self.value_proj(memory).view(b, memory.shape[1], m, c // m)
        off = self.sampling_offsets(query).view(b, q, m, L, P, 2)
        attn = self.attention_weights(query).view(b, q, m, L * P).softmax(-1).view(b, q, m, L, P)
        r = ref[:, :, None, None, None, :]
        loc = r[..., :2] + off / P * r[..., 2:] * 0.5
        sample = ms_deform_attn if self.sampler is None else self.sampler
        return self.output_proj(sample(value, shapes, starts, loc, attn))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, levels: int, points: int, act: str, eps: float):
        super().__init__()
        self.self_attn = SelfAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.encoder_attn = MSDeformableAttention(dim, heads, levels, points)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, ffn, act)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, pos, ref, memory, shapes, starts, attn_mask=None):
        x = self.self_attn_layer_norm(x + self.self_attn(x, pos, attn_mask))
        x = self.encoder_attn_layer_norm(x + self.encoder_attn(x + pos, ref, memory, shapes, starts))
        return self.final_layer_norm(x + self.mlp(x))


def _inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


@_shape_cache
def _level_tables(shapes: Tuple[Tuple[int, int], ...],
                  device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The level tables of :func:`~anydepth_kernels.ms_deform_attn`: ``(H, W)`` per level ``[L, 2]``
    and each level's start offset ``[L]``, int64 on ``device``. Filled element by element with
    device kernels rather than ``torch.tensor(..., device=device)``: that is a host->device copy,
    which a CUDA graph capture forbids (and which synchronises on every call)."""
    n = len(shapes)
    table = torch.empty(3 * n, dtype=torch.long, device=device)
    start = 0
    for i, (h, w) in enumerate(shapes):
        table[2 * i].fill_(h)
        table[2 * i + 1].fill_(w)
        table[2 * n + i].fill_(start)
        start += h * w
    return table[:2 * n].view(n, 2), table[2 * n:]


@_shape_cache
def _anchors(shapes: Tuple[Tuple[int, int], ...], device: torch.device, dtype: torch.dtype,
             grid_size: float = 0.05) -> Tuple[torch.Tensor, torch.Tensor]:
    """Anchor logits ``[1, S, 4]`` (cx, cy, w, h before the sigmoid) and their valid mask
    ``[1, S, 1]``; invalid anchors (too close to the border) get the dtype's max value."""
    out = []
    for lvl, (h, w) in enumerate(shapes):
        gy, gx = torch.meshgrid(torch.arange(h, device=device).to(dtype),
                                torch.arange(w, device=device).to(dtype), indexing="ij")
        xy = torch.stack([gx, gy], -1)[None] + 0.5
        xy[..., 0] /= w
        xy[..., 1] /= h
        wh = torch.ones_like(xy) * grid_size * (2.0 ** lvl)
        out.append(torch.cat([xy, wh], -1).reshape(1, h * w, 4))
    a = torch.cat(out, 1)
    valid = ((a > 1e-2) * (a < 1 - 1e-2)).all(-1, keepdim=True)
    a = torch.log(a / (1 - a))
    a = torch.where(valid, a, torch.full((), torch.finfo(dtype).max, dtype=dtype, device=device))
    return a, valid


class RTDETRDecoder(nn.Module):
    """Input projections, query selection, decoder layers and per-layer heads."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, dim: int, heads: int, ffn: int,
                 layers: int, points: int, num_queries: int, act: str, ln_eps: float, bn_eps: float,
                 denoising: bool):
        super().__init__()
        self.num_queries = num_queries
        self.input_proj = nn.ModuleList([_conv_bn(c, dim, 1, 1, "identity", False, bn_eps) for c in in_channels])
        self.enc_output = nn.Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim, eps=ln_eps)
        self.enc_score_head = nn.Linear(dim, num_classes)
        self.enc_bbox_head = PredictionHead(dim, dim, 4, 3)
        self.query_pos_head = PredictionHead(4, 2 * dim, dim, 2)
        levels = len(in_channels)
        self.layers = nn.ModuleList([DecoderLayer(dim, heads, ffn, levels, points, act, ln_eps) for _ in range(layers)])
        self.class_embed = nn.ModuleList([nn.Linear(dim, num_classes) for _ in range(layers)])
        self.bbox_embed = nn.ModuleList([PredictionHead(dim, dim, 4, 3) for _ in range(layers)])
        # training-only (contrastive denoising queries); never read at inference, kept for lossless
        # conversion and training
        self.denoising_class_embed = (nn.Embedding(num_classes + 1, dim, padding_idx=num_classes)
                                      if denoising else None)
        prior = -math.log((1 - 0.01) / 0.01)
        for head in [self.enc_score_head, *self.class_embed]:
            nn.init.constant_(head.bias, prior)
        for head in self.bbox_embed:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

    def _memory(self, feats: Sequence[torch.Tensor]):
        """Input projections and the flattened encoder memory: ``(memory [B, S, C], shapes,
        starts, shapes_list)`` (level tables as tensors and as a tuple of ``(H, W)``)."""
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        shapes_list = tuple((int(s.shape[2]), int(s.shape[3])) for s in srcs)
        memory = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        shapes, starts = _level_tables(shapes_list, memory.device)  # cached: no host->device copy per call
        if memory.shape[1] < self.num_queries:
            raise ValueError(f"the input gives {memory.shape[1]} encoder positions, fewer than num_queries="
                             f"{self.num_queries}; use a larger image")
        return memory, shapes, starts, shapes_list

    def _select(self, feats: Sequence[torch.Tensor]):
        """Encoder memory and top-``num_queries`` query selection, the training path's form. Returns
        ``(memory, shapes, starts, out_mem, enc_logits, enc_coord, idx)``: flattened memory
        ``[B, S, C]``, level shapes / start offsets, the projected memory, the encoder class logits
        ``[B, S, nc]``, box logits ``[B, S, 4]`` (before the sigmoid) and the selected positions
        ``[B, num_queries]``."""
        memory, shapes, starts, shapes_list = self._memory(feats)
        anchors, valid = _anchors(shapes_list, memory.device, memory.dtype)
        out_mem = self.enc_output_norm(self.enc_output(valid.to(memory.dtype) * memory))
        enc_logits = self.enc_score_head(out_mem)
        enc_coord = self.enc_bbox_head(out_mem) + anchors
        idx = torch.topk(enc_logits.max(-1).values, self.num_queries, dim=1).indices
        return memory, shapes, starts, out_mem, enc_logits, enc_coord, idx

    def _query_selection(self, memory: torch.Tensor, shapes_list) -> Tuple[torch.Tensor, torch.Tensor]:
        """Inference query selection: the ``num_queries`` encoder positions with the highest class
        logit, as ``(queries [B, Q, C], reference boxes [B, Q, 4])`` (boxes after the sigmoid).

        What :meth:`_select` computes, without what inference does not read: the box head runs on
        the ``Q`` selected rows only (a ``Q / S`` share of its work; 300 of 8400 at 640x640),
        not on every encoder position, and the class logits are reduced to their maximum before
        the top-k. The selection itself (scores, ``torch.topk`` and so its order and its ties)
        and the gathered queries are exactly the training path's; the boxes are the same
        per-row formula, equal up to the matrix-multiply library's rounding for the row count
        (bit-identical on the CPU here for more than a few rows)."""
        anchors, valid = _anchors(shapes_list, memory.device, memory.dtype)
        out_mem = self.enc_output_norm(self.enc_output(valid.to(memory.dtype) * memory))
        scores = self.enc_score_head(out_mem).max(-1).values
        idx = torch.topk(scores, self.num_queries, dim=1).indices[..., None]
        x = out_mem.gather(1, idx.expand(-1, -1, out_mem.shape[-1]))
        ref_unact = self.enc_bbox_head(x) + anchors.expand(x.shape[0], -1, -1).gather(1, idx.expand(-1, -1, 4))
        return x, ref_unact.sigmoid()

    def forward(self, feats: Sequence[torch.Tensor], num_layers) -> Dict[str, torch.Tensor]:
        """``num_layers``: an int, or a 0-d integer tensor (the export of one graph for every
        depth: :meth:`_forward_gated`)."""
        memory, shapes, starts, shapes_list = self._memory(feats)
        x, ref = self._query_selection(memory, shapes_list)
        if isinstance(num_layers, torch.Tensor):
            return self._forward_gated(x, ref, memory, shapes, starts, num_layers)
        logits = None
        for i in range(num_layers):
            x, ref, logits = self._layer(i, x, ref, memory, shapes, starts, logits=i == num_layers - 1)
        return {"logits": logits, "pred_boxes": ref}

    def _layer(self, i: int, x, ref, memory, shapes, starts, logits: bool = True):
        """Decoder layer ``i`` at inference: ``(x, ref, logits)`` after it (``ref``: its boxes;
        ``logits``: its class logits, ``None`` unless asked for)."""
        x = self.layers[i](x, self.query_pos_head(ref), ref, memory, shapes, starts)
        ref = torch.sigmoid(self.bbox_embed[i](x) + _inverse_sigmoid(ref))
        return x, ref, (self.class_embed[i](x) if logits else None)

    def _forward_gated(self, x, ref, memory, shapes, starts, num_layers: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The decoder with a tensor layer count, for export: layer 0 always runs, layer ``i > 0``
        under ``torch.cond(num_layers > i)`` (an ONNX ``If``: a runtime executes only the layers
        asked for; a count above the number of layers runs them all). Equal to :meth:`forward`
        with ``int(num_layers)``."""
        state = self._layer(0, x, ref, memory, shapes, starts)
        for i in range(1, len(self.layers)):
            def run(x, ref, logits, memory, i=i):
                return self._layer(i, x, ref, memory, shapes, starts)

            def keep(x, ref, logits, memory):
                return x.clone(), ref.clone(), logits.clone()

            state = tuple(torch.cond(num_layers > i, run, keep, (*state, memory)))
        return {"logits": state[2], "pred_boxes": state[1]}

    def forward_train(self, feats: Sequence[torch.Tensor], num_layers: int,
                      denoising: Optional[Dict[str, object]] = None) -> Dict[str, object]:
        """Training path: every layer's class logits and boxes, the encoder's top-k outputs and,
        with ``denoising`` (the dict of :func:`build_denoising_queries`), the denoising queries.

        Layer ``i``'s boxes are ``sigmoid(bbox_embed[i](x_i) + inverse_sigmoid(ref_i))`` with the
        gradient through layer ``i``'s head and query; the reference passed on to layer ``i + 1``
        is detached (as at inference). The denoising queries (class embedding of the noised
        labels, noised boxes as references) are placed *before* the ``num_queries`` selected
        queries and run through the same layers under ``denoising["attn_mask"]``. See
        :meth:`AnyDepthRTDETR.forward_train` for the returned dict.
        """
        memory, shapes, starts, out_mem, enc_logits, enc_coord, idx = self._select(feats)
        ref_unact = enc_coord.gather(1, idx[..., None].expand(-1, -1, 4))
        x = out_mem.gather(1, idx[..., None].expand(-1, -1, out_mem.shape[-1])).detach()
        enc_outputs = {"logits": enc_logits.gather(1, idx[..., None].expand(-1, -1, enc_logits.shape[-1])),
                       "pred_boxes": ref_unact.sigmoid()}
        ref = ref_unact.detach().sigmoid()
        mask, nd = None, 0
        if denoising is not None:
            if self.denoising_class_embed is None:
                raise ValueError("denoising queries need a model built with denoising=True")
            labels, dn_boxes = denoising["labels"], denoising["boxes"]
            nd = int(labels.shape[1])
            x = torch.cat([self.denoising_class_embed(labels).to(x.dtype), x], 1)
            # through the (clamping) inverse sigmoid, as the reference does with its noised boxes
            ref = torch.cat([torch.sigmoid(_inverse_sigmoid(dn_boxes.to(ref.dtype))), ref], 1)
            mask = denoising["attn_mask"]
        logits, boxes = [], []
        for i in range(num_layers):
            pos = self.query_pos_head(ref)
            x = self.layers[i](x, pos, ref, memory, shapes, starts, mask)
            new_ref = torch.sigmoid(self.bbox_embed[i](x) + _inverse_sigmoid(ref))
            logits.append(self.class_embed[i](x))
            boxes.append(new_ref)
            ref = new_ref.detach()
        per_layer = [{"logits": lg[:, nd:], "pred_boxes": bx[:, nd:]} for lg, bx in zip(logits, boxes)]
        return {
            "logits": per_layer[-1]["logits"],
            "pred_boxes": per_layer[-1]["pred_boxes"],
            "aux_outputs": per_layer[:-1],
            "enc_outputs": enc_outputs,
            "dn_outputs": (None if denoising is None else
                           [{"logits": lg[:, :nd], "pred_boxes": bx[:, :nd]} for lg, bx in zip(logits, boxes)]),
            "dn_meta": None if denoising is None else denoising["meta"],
        }


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
class AnyDepthRTDETR(AnyDepthModel):
    """RT-DETR with skippable backbone stages and encoder CSP blocks, and a decoder-depth knob.

    ``model(x, depth=...)``: ``x`` is ``[B, 3, H, W]`` float (normalised to [0, 1], as HF's
    processor gives), ``H`` and ``W`` positive multiples of 32. Returns a dict with ``logits``
    ``[B, num_queries, num_classes]`` (before the sigmoid) and ``pred_boxes``
    ``[B, num_queries, 4]`` (cx, cy, w, h normalised to [0, 1]). :meth:`predict` takes images of
    any size and returns :class:`~anydepth.detection.Detections`.

    ``split``: ``"paper"`` (default) or ``"official"``: what the authors' released code builds
    (``anydepth-rt-detr``: ``ResNet_ADN`` backbone, ``HybridEncoderADN``, decoder with a
    ``depth`` argument), so that their checkpoints load exactly
    (:func:`anydepth.convert.from_authors_rtdetr`). Same switches and knob; it differs in the
    backbone only: a 7x7/2 conv stem (not the three 3x3 convs of ResNet-vd) and one norm (not
    skip-aware) on the projection shortcut of a stage's first block. Their encoder split (1 of the
    3 RepVGG blocks of a CSP block essential, ``(n + 1) // 2 - 1``) and their decoder are ours.
    R50/R101 only (their backbone has no basic-block ResNet) and ``hidden_expansion=1.0`` (their
    CSP block cannot build the output conv another expansion needs).

    ``shared_bases``: deeply shared filter bases in the backbone's stages (Kang & Kim, NeurIPS
    2021), the any-depth ResNets' option (:func:`~anydepth.models.resnet.parse_shared_bases`),
    e.g. ``dict(shared_rank=8, unique_rank=1, blocks="refinement")``: the refinement blocks of
    each stage share one basis. The trainer's criterion adds the orthogonality penalty
    (``--loss orth=...``); :meth:`to_inference` folds the shared convs or keeps them factored.
    """

    def __init__(self, variant: str = "r50", num_classes: int = 80, num_queries: int = 300,
                 decoder_layers: Optional[int] = None, encoder_hidden_dim: Optional[int] = None,
                 encoder_ffn_dim: Optional[int] = None, hidden_expansion: Optional[float] = None,
                 d_model: int = 256, decoder_ffn_dim: int = 1024, num_heads: int = 8,
                 encoder_heads: int = 8, decoder_points: int = 4, aifi_layers: int = 1,
                 activation: str = "silu", encoder_activation: str = "gelu", decoder_activation: str = "relu",
                 layer_norm_eps: float = 1e-5, batch_norm_eps: float = 1e-5,
                 positional_temperature: float = 10000.0, denoising: bool = True,
                 num_denoising: int = 100, label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0,
                 split: str = "paper", shared_bases=None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown RT-DETR variant {variant!r}; valid: {list(VARIANTS)}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        v = VARIANTS[variant]
        layers = v["decoder_layers"] if decoder_layers is None else decoder_layers
        for name, value in (("num_queries", num_queries), ("decoder_layers", layers), ("d_model", d_model),
                            ("aifi_layers", aifi_layers), ("decoder_points", decoder_points)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "aifi_layers" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(num_denoising, bool) or not isinstance(num_denoising, int) or num_denoising < 0:
            raise ValueError(f"num_denoising must be an int >= 0, got {num_denoising!r}")
        for name, value in (("label_noise_ratio", label_noise_ratio), ("box_noise_scale", box_noise_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= (
                    1 if name == "label_noise_ratio" else math.inf):
                raise ValueError(f"{name} must be a number >= 0{' and <= 1' if name == 'label_noise_ratio' else ''}"
                                 f", got {value!r}")
        if activation not in ("silu", "relu"):
            raise ValueError(f"activation must be 'silu' or 'relu', got {activation!r}")
        for name, a in (("encoder_activation", encoder_activation), ("decoder_activation", decoder_activation)):
            if a not in _TRANSFORMER_ACTS:
                raise ValueError(f"{name} must be one of {list(_TRANSFORMER_ACTS)}, got {a!r}")
        self.variant = variant
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_decoder_layers = layers
        self.num_denoising = num_denoising
        self.label_noise_ratio = float(label_noise_ratio)
        self.box_noise_scale = float(box_noise_scale)
        hidden = v["encoder_hidden_dim"] if encoder_hidden_dim is None else encoder_hidden_dim
        ffn = v["encoder_ffn_dim"] if encoder_ffn_dim is None else encoder_ffn_dim
        expansion = v["hidden_expansion"] if hidden_expansion is None else hidden_expansion
        if split == "official":
            if v["layer_type"] != "bottleneck":
                raise ValueError(f'split="official" is the authors\' released code, whose backbone (ResNet_ADN) '
                                 f"exists for ResNet-50/101 only: use rtdetr-r50/r101, not {variant!r}")
            if expansion != 1.0:
                raise ValueError(f'split="official" needs hidden_expansion=1.0: the authors\' encoder cannot '
                                 f"build the CSP output conv that expansion {expansion} needs")
        self.split = split

        self.depth_space = DepthSpace(
            SWITCHES, {"decoder_layers": KnobSpec(1, layers, decoder_base_layers(layers))})
        self.backbone = ResNetVd(v["layer_type"], v["depths"], v["hidden_sizes"], official=split == "official",
                                 shared_bases=shared_bases)
        self.encoder = HybridEncoder(self.backbone.out_channels, hidden, ffn, encoder_heads, aifi_layers,
                                     expansion, activation, encoder_activation, layer_norm_eps,
                                     batch_norm_eps, positional_temperature)
        self.decoder = RTDETRDecoder([hidden] * 3, num_classes, d_model, num_heads, decoder_ffn_dim, layers,
                                     decoder_points, num_queries, decoder_activation, layer_norm_eps,
                                     batch_norm_eps, denoising)

    # -- input checks -------------------------------------------------------------------------
    # -- forward --------------------------------------------------------------------------------
    @property
    def switchable_modules(self) -> Dict[str, nn.Module]:
        """Switch name -> the module called with its ``skip`` (the backbone stages, the encoder)."""
        mods: Dict[str, nn.Module] = {f"backbone.stage{i}": getattr(self.backbone, f"stage{i}") for i in range(1, 5)}
        mods["encoder"] = self.encoder
        return mods

    def features(self, x: torch.Tensor, depth: DepthConfig) -> List[torch.Tensor]:
        """The three encoder outputs (strides 8, 16, 32) at ``depth``."""
        self.check_input(x)
        skips = [depth.is_skipped(f"backbone.stage{i}") for i in range(1, 5)]
        return self.encoder(self.backbone(x, skips), depth.is_skipped("encoder"))

    def forward_depth(self, x: torch.Tensor, depth: DepthConfig) -> Dict[str, torch.Tensor]:
        return self.decoder(self.features(x, depth), depth.knob("decoder_layers"))

    def forward_train(self, x: torch.Tensor, depth: DepthLike = None, targets=None,
                      generator: Optional[torch.Generator] = None) -> Dict[str, object]:
        """Training pass at ``depth`` (``None`` = full; as in ``forward``). The model must be in
        training mode and not in its inference form.

        ``x``: float ``[B, 3, H, W]`` in [0, 1]. ``targets`` (optional): ``B`` dicts with ``boxes``
        float ``[N, 4]`` xyxy in pixels of ``x`` and ``labels`` int64 ``[N]``; when given and the
        model was built with ``denoising=True`` and ``num_denoising > 0``, contrastive denoising
        queries are added (``num_denoising``, ``label_noise_ratio``, ``box_noise_scale``, see
        :func:`build_denoising_queries`; ``generator`` draws their noise). Returns a dict:

        * ``logits`` ``[B, Q, nc]`` and ``pred_boxes`` ``[B, Q, 4]`` (cxcywh normalised) of the last
          decoder layer that ran (the same values ``forward`` gives in eval mode without
          denoising queries);
        * ``aux_outputs``: ``[dict(logits, pred_boxes)]`` of the earlier layers that ran, in order
          (``decoder_layers - 1`` entries);
        * ``enc_outputs``: ``dict(logits, pred_boxes)`` of the ``Q`` encoder positions selected as
          queries (encoder class logits and sigmoid of the encoder box logits + anchors);
        * ``dn_outputs``: ``[dict(logits [B, Nd, nc], pred_boxes)]`` of the denoising queries, one
          per layer that ran, and ``dn_meta`` (group layout, see :func:`build_denoising_queries`);
          both ``None`` without denoising;
        * ``distill_feats``: ``dict(backbone=[C3, C4, C5], encoder=[three encoder outputs])``;
        * ``image_size``: ``(H, W)``.
        """
        if not self.training:
            raise RuntimeError("forward_train() needs the model in training mode: call model.train() first "
                               "(use model(x, depth=...) or predict() for inference)")
        if self.is_inference:
            raise RuntimeError("forward_train() cannot run on the inference form (model.to_inference(): "
                               "folded, inference-only)")
        config = self.resolve_depth(depth, x.shape if isinstance(x, torch.Tensor) else None)
        self.check_input(x)
        h, w = int(x.shape[2]), int(x.shape[3])
        dn = None
        if targets is not None:
            from ..losses.rtdetr import normalize_targets  # the losses import this module's helpers lazily too

            norm = normalize_targets(targets, (h, w), self.num_classes, x.shape[0], x.device)
            if self.decoder.denoising_class_embed is not None and self.num_denoising > 0:
                dn = build_denoising_queries(norm, self.num_classes, self.num_queries, self.num_denoising,
                                             self.label_noise_ratio, self.box_noise_scale, generator)
        skips = [config.is_skipped(f"backbone.stage{i}") for i in range(1, 5)]
        backbone = self.backbone(x, skips)
        encoder = self.encoder(backbone, config.is_skipped("encoder"))
        out = self.decoder.forward_train(encoder, config.knob("decoder_layers"), dn)
        out["distill_feats"] = {"backbone": list(backbone), "encoder": list(encoder)}
        out["image_size"] = (h, w)
        return out

    # -- inference form -----------------------------------------------------------------------
    def _to_inference(self, backend: str) -> None:
        """Inference form (:meth:`~anydepth.model.AnyDepthModel.to_inference`): each RepVGG block
        becomes one 3x3 conv per norm set and every conv-BN(-act) becomes a
        :class:`~anydepth_kernels.FusedConvNormAct` (two epilogues where the BN is skip-aware); the
        running statistics are folded. Shared-filter-basis convs of the backbone (``shared_bases=``)
        are folded or kept factored (:func:`~anydepth.nn.deploy_shared_basis_convs`). Outputs
        equal the eager model's at every depth."""

        def replace(child: nn.Module) -> Optional[nn.Module]:
            if isinstance(child, RepVGGBlock):
                return child.reparameterize(backend)
            if isinstance(child, ConvNormAct):
                return FusedConv.from_conv_norm_act(child, backend=backend)
            return None

        swap_modules(self, replace)
        deploy_shared_basis_convs(self.backbone, backend)
        self.backbone.stem_channels_last = True

    def deploy(self, backend: str = "auto") -> "AnyDepthRTDETR":
        """Deprecated alias of :meth:`to_inference` (warns once)."""
        warn_deprecated("AnyDepthRTDETR.deploy()", "model.to_inference()")
        return self.to_inference(backend)

    @property
    def deployed(self) -> bool:
        """Deprecated alias of :attr:`is_inference` (warns once)."""
        warn_deprecated("AnyDepthRTDETR.deployed", "model.is_inference")
        return self.is_inference

    # -- images in, detections out ----------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images, depth=None, conf: float = 0.5, imgsz: int = 640,
                max_det: int = 300) -> List[Detections]:
        """Detect objects in ``images`` (one or a list; HxWx3 uint8 RGB or 3xHxW float in [0, 1],
        any size): plain resize to ``imgsz`` x ``imgsz`` (as RT-DETR does; when ``imgsz`` is not a
        multiple of :attr:`stride`, the resized image sits at the top-left of the next multiple,
        zero-padded bottom/right as HF's processor pads), run at ``depth``, take the top-``max_det``
        (query, class) pairs by sigmoid score (as HF's post-processing does) and keep those above
        ``conf``. Returns one :class:`~anydepth.detection.Detections` per image (xyxy boxes in the
        original image's pixels, scores, labels), by decreasing score."""
        if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0.0 <= conf <= 1.0:
            raise ValueError(f"conf must be in [0, 1], got {conf!r}")
        if isinstance(max_det, bool) or not isinstance(max_det, int) or max_det < 1:
            raise ValueError(f"max_det must be a positive int, got {max_det!r}")
        side = canvas_side(imgsz, self.stride)
        param = next(self.parameters())
        batch, metas = resize_batch(images, int(imgsz), device=param.device, dtype=param.dtype, canvas=side)
        was_training = self.training
        self.eval()
        try:
            out = self(batch, depth=depth)
        finally:
            self.train(was_training)
        scores, labels, xyxy = _top_detections(out["logits"], out["pred_boxes"], max_det, side)  # canvas pixels
        results = []
        for i, meta in enumerate(metas):
            keep = scores[i] > conf
            results.append(Detections(meta.unmap(xyxy[i][keep]), scores[i][keep], labels[i][keep]))
        return results


def _top_detections(logits: torch.Tensor, pred_boxes: torch.Tensor, max_det: int, imgsz: int):
    """``predict``'s post-processing: the top-``max_det`` (query, class) pairs by sigmoid score as
    ``(scores [B, k], labels [B, k], xyxy boxes [B, k, 4] in pixels of the imgsz x imgsz input
    canvas)``."""
    prob = logits.float().sigmoid()
    b, q, c = prob.shape
    k = min(max_det, q * c)
    scores, index = prob.flatten(1).topk(k, dim=1)
    labels, query = index % c, index // c
    boxes = pred_boxes.float().gather(1, query[..., None].expand(-1, -1, 4))
    cxcy, wh = boxes[..., :2], boxes[..., 2:]
    xyxy = torch.cat([cxcy - wh / 2, cxcy + wh / 2], -1) * float(imgsz)
    return scores, labels, xyxy


def _factory(variant: str):
    def build(num_classes: int = 80, **kwargs) -> AnyDepthRTDETR:
        return AnyDepthRTDETR(variant, num_classes, **kwargs)

    build.__name__ = f"rtdetr_{variant}_anydepth"
    build.__doc__ = (f"RT-DETR-{variant.upper()}-vd any-depth ({VARIANTS[variant]['decoder_layers']} decoder "
                     "layers by default). Options are those of :class:`AnyDepthRTDETR`.")
    return build


def _import_transformers(path: str) -> AnyDepthRTDETR:
    RTDetrForObjectDetection = require(
        "transformers", f"loading {path!r} (a directory: a HuggingFace model?)").RTDetrForObjectDetection
    from ..convert import from_transformers

    return from_transformers(RTDetrForObjectDetection.from_pretrained(path)).eval()


def _import_weights(path: str) -> AnyDepthRTDETR:
    """A HuggingFace RT-DETR directory, or a file holding the authors' any-depth RT-DETR (their
    state dict or training checkpoint: :func:`anydepth.convert.from_authors_rtdetr`, ``split="official"``,
    their configs' 300 queries)."""
    if os.path.isdir(path):
        return _import_transformers(path)
    from ..convert._authors import _state_dict, from_authors_rtdetr, is_authors_rtdetr

    sd = _state_dict(path, "an RT-DETR checkpoint")
    if not is_authors_rtdetr(sd):
        raise ValueError("not the authors' any-depth RT-DETR (no shallow-path norms 'backbone.layer1.0.bn1_skip' "
                         "and encoder 'norm_skippable'); a HuggingFace RT-DETR is a directory")
    return from_authors_rtdetr(sd).eval()


FAMILY = register_family(ModelFamily(
    name="rtdetr",
    model_class=AnyDepthRTDETR,
    factories={f"rtdetr-{v}-anydepth": _factory(v) for v in VARIANTS},
    task="detect",
    preprocess="resize",
    criterion=lazy("anydepth.losses.rtdetr:RTDETRCriterion"),
    # the official recipe: AdamW 1e-4, backbone at 0.1x, clip 0.1, no mixed precision
    # finetune: the authors' RT-DETR solver keeps upstream's AdamW recipe; the shallow pass is KD
    # + the aux/denoising GT losses (alpha_base 0)
    train=TrainDefaults(lr=1e-4, weight_decay=1e-4, clip_grad=0.1, lr_scales=(("backbone.", 0.1),),
                        finetune=(("optimizer", "adamw"), ("lr", 1e-4), ("alpha_base", 0.0),
                                  ("kd_warmup_epochs", 0.0)),
                        amp_warning="the any-depth RT-DETR recipe trains without mixed precision (the paper: "
                                    "'No mixed precision'); amp is on at your request"),
    converters={"transformers": lazy("anydepth.convert:from_transformers"),
                "authors": lazy("anydepth.convert:from_authors_rtdetr")},
    weight_import=WeightImport("a HuggingFace RT-DETR directory (or the authors' any-depth RT-DETR file)",
                               lambda path: is_dir(path) or is_file(path), _import_weights),
    peer=Peer("transformers", lazy("anydepth.convert._transformers:build_peer"),
              lambda m, x: m(pixel_values=x)),
    # bf16 / int8 (optimize): the decoder (query selection, deformable sampling at box
    # coordinates, box refinement) stays float32
    float32_modules=("decoder",),
))
