"""AnyDepth-YOLOv12: the Ultralytics ``yolo12{n,s,m,l,x}.yaml`` topology with skippable stages.

Our own plain-PyTorch code; module and parameter names follow Ultralytics' layer indices
(``layers.{i}`` <-> ``model.{i}``) so that :func:`anydepth.convert.from_ultralytics` is a rename.

Network (layer index: module, output stride)::

    0 Conv 3x3/2 (P1)   1 Conv 3x3/2 (P2)   2 C3k2  [backbone.p2]
    3 Conv 3x3/2 (P3)   4 C3k2  [backbone.p3]
    5 Conv 3x3/2 (P4)   6 A2C2f area=4 [backbone.p4]
    7 Conv 3x3/2 (P5)   8 A2C2f area=1 [backbone.p5]
    9 up  10 cat(9, 6)  11 A2C2f [neck.p4_up]
   12 up  13 cat(12, 4) 14 A2C2f [neck.p3_up]      -> P3 output
   15 Conv 3x3/2  16 cat(15, 11)  17 A2C2f [neck.p4_down]  -> P4 output
   18 Conv 3x3/2  19 cat(18, 8)   20 C3k2  [neck.p5_down]  -> P5 output
   21 Detect (DFL box head + class head per level)

Any-depth split (arXiv 2605.09407): each of the 8 bracketed CSP modules concatenates the
outputs of its inner blocks before a 1x1 output conv. A module of ``n`` inner blocks keeps
``min(n - 1, (n + 1) // 2)`` of them on the shallow path (4 -> 2, 2 -> 1, 1 -> 0); the skipped
blocks drop out of the concat, and the output conv reads only the channels present: a slice of
its weight's input channels (default) or a separate shallow output conv (``shallow_out="separate"``,
the authors' later choice against gradient conflict). The essential convs of a switchable module
(``cv1``, the output conv, the kept blocks) carry skip-aware BatchNorm.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..depth import DepthConfig, DepthLike, DepthSpace
from ..detection import Detections, batched_nms, canvas_side, letterbox_batch
from ..family import ModelFamily, Peer, TrainDefaults, WeightImport, is_file, lazy, register_family
from ..model import AnyDepthModel, warn_deprecated
from ..nn import ConvNormAct
from anydepth_kernels import area_attention, concat_conv1x1
from anydepth_kernels.cuda_graphs import keep_alive

#: scale -> (depth multiple, width multiple, max channels), as in Ultralytics' yolo12.yaml.
SCALES: Dict[str, Tuple[float, float, int]] = {
    "n": (0.50, 0.25, 1024),
    "s": (0.50, 0.50, 1024),
    "m": (0.50, 1.00, 512),
    "l": (1.00, 1.00, 512),
    "x": (1.00, 1.50, 512),
}

#: The 8 switches, in network order, with the layer index each one controls.
SWITCHES: Tuple[Tuple[str, int], ...] = (
    ("backbone.p2", 2),
    ("backbone.p3", 4),
    ("backbone.p4", 6),
    ("backbone.p5", 8),
    ("neck.p4_up", 11),
    ("neck.p3_up", 14),
    ("neck.p4_down", 17),
    ("neck.p5_down", 20),
)

SHALLOW_OUT = ("slice", "separate")

#: ``"paper"``: the papers' split rule everywhere (our default). ``"official"``: the split (and
#: the block details) of the authors' released any-depth YOLOv12 code, so that their checkpoints
#: load exactly (:func:`anydepth.convert.from_authors_yolo`); see :class:`AnyDepthYOLOv12`.
SPLITS = ("paper", "official")

#: stride-2 convs that are skip-aware under ``split="official"`` -> the switch whose flag they take
#: (their ``SwitchableConv`` layers take the flag of the next switchable module)
OFFICIAL_DOWNSAMPLE = {3: "backbone.p3", 5: "backbone.p4", 7: "backbone.p5", 15: "neck.p4_down",
                       18: "neck.p5_down"}


def essential_blocks(n: int) -> int:
    """Inner blocks a CSP module keeps on its shallow path: ``min(n - 1, (n + 1) // 2)``."""
    return min(n - 1, (n + 1) // 2)


def official_essential_blocks(n: int) -> int:
    """The authors' ``SkippableA2C2f`` rule: ``(n + 1) // 2`` blocks for ``n >= 2``, else all ``n``
    (a one-block A2C2f is not skippable in their code: its shallow path only switches norms)."""
    return (n + 1) // 2 if n >= 2 else n


def _width(c: int, width: float, max_channels: int) -> int:
    return int(math.ceil(min(c, max_channels) * width / 8) * 8)


def _repeats(n: int, depth: float) -> int:
    return max(round(n * depth), 1) if n > 1 else n


class _Conv(ConvNormAct):
    """Ultralytics-style Conv: conv (no bias) + BN(eps=1e-3) + SiLU/identity, optionally skip-aware."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, act: bool = True,
                 skip_aware: bool = False):
        super().__init__(c1, c2, k, s, None, 1, g, "silu" if act else "identity", skip_aware)


def _call(module: nn.Module, x: torch.Tensor, skip: bool) -> torch.Tensor:
    """Run a block with ``skip`` (its norms pick their set) if it is skip-aware, plain otherwise."""
    return module(x, skip) if getattr(module, "skip_aware", False) else module(x)


class Bottleneck(nn.Module):
    """Two convs (k x k), residual add when shapes allow."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, k: Tuple[int, int] = (3, 3),
                 e: float = 0.5, skip_aware: bool = False):
        super().__init__()
        c_ = int(c2 * e)
        self.skip_aware = skip_aware
        self.cv1 = _Conv(c1, c_, k[0], 1, skip_aware=skip_aware)
        self.cv2 = _Conv(c_, c2, k[1], 1, g=g, skip_aware=skip_aware)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        return self.cv2(self.cv1(x, skip), skip, residual=x if self.add else None)


class C3k(nn.Module):
    """CSP block with 3 convs and a chain of ``n`` bottlenecks of kernel ``k``.

    ``inner_essential`` (``split="official"``, the authors' ``SkippableC3k``): with ``skip`` only
    the first that many bottlenecks of the chain run (they and the three convs use their
    shallow-path norms; the rest are plain). ``None``: every bottleneck always runs.
    """

    def __init__(self, c1: int, c2: int, n: int = 2, shortcut: bool = True, g: int = 1, e: float = 0.5,
                 k: int = 3, skip_aware: bool = False, inner_essential: Optional[int] = None):
        super().__init__()
        c_ = int(c2 * e)
        self.skip_aware = skip_aware
        self.inner_essential = inner_essential
        ne = n if inner_essential is None else inner_essential
        self.cv1 = _Conv(c1, c_, 1, 1, skip_aware=skip_aware)
        self.cv2 = _Conv(c1, c_, 1, 1, skip_aware=skip_aware)
        self.cv3 = _Conv(2 * c_, c2, 1, skip_aware=skip_aware)
        self.m = nn.ModuleList(Bottleneck(c_, c_, shortcut, g, (k, k), 1.0, skip_aware and i < ne)
                               for i in range(n))

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        a = self.cv1(x, skip)
        blocks = self.m[: self.inner_essential] if skip and self.inner_essential is not None else self.m
        for b in blocks:
            a = b(a, skip)
        return self.cv3(torch.cat((a, self.cv2(x, skip)), 1), skip)


class AAttn(nn.Module):
    """Area attention: multi-head self-attention within ``area`` horizontal strips of the map,
    plus a 7x7 depthwise positional conv on the values and a 1x1 projection. The attention itself
    is ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, area: int = 1, skip_aware: bool = False, pe_kernel: int = 7):
        super().__init__()
        self.area = area
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        all_head_dim = self.head_dim * num_heads
        self.skip_aware = skip_aware
        self.qkv = _Conv(dim, all_head_dim * 3, 1, act=False, skip_aware=skip_aware)
        self.proj = _Conv(all_head_dim, dim, 1, act=False, skip_aware=skip_aware)
        self.pe = _Conv(all_head_dim, all_head_dim, pe_kernel, 1, g=all_head_dim, act=False, skip_aware=skip_aware)
        self.use_kernel = False  # set by AnyDepthYOLOv12.to_inference(): anydepth_kernels.area_attention

    def forward(self, x: torch.Tensor, skip: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.use_kernel:  # fused form: the area reshapes are folded into the kernel's indexing
            o, v = area_attention(self.qkv(x, skip), self.num_heads, self.area if self.area > 1 else 1)
            return self.proj(self.pe(v, skip, residual=o), skip, residual=residual)
        b, _, h, w = x.shape
        n = h * w
        # [B, N, 3C] with channels contiguous: the fused SDPA kernels need a unit-stride head dim
        qkv = self.qkv(x, skip).flatten(2).transpose(1, 2).contiguous()
        c = qkv.shape[-1] // 3
        area = self.area if self.area > 1 else 1
        if n % area:
            raise ValueError(f"area attention: {h}x{w} = {n} positions do not split into {area} areas")
        # areas are contiguous runs of N / area positions; heads interleave [q|k|v] per head
        qkv = qkv.reshape(b * area, n // area, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each [B*area, heads, N/area, hd]
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
        v = v.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
        # o + pe(v), then the projection (+ the caller's residual), each add fused into a conv
        return self.proj(self.pe(v.contiguous(), skip, residual=o), skip, residual=residual)


class ABlock(nn.Module):
    """Area-attention block: ``x + attn(x)``, then ``x + mlp(x)`` (two 1x1 convs)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 1.2, area: int = 1,
                 skip_aware: bool = False, pe_kernel: int = 7):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.skip_aware = skip_aware
        self.attn = AAttn(dim, num_heads, area, skip_aware, pe_kernel)
        self.mlp = nn.ModuleList([_Conv(dim, hidden, 1, skip_aware=skip_aware),
                                  _Conv(hidden, dim, 1, act=False, skip_aware=skip_aware)])

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        x = self.attn(x, skip, residual=x)
        return self.mlp[1](self.mlp[0](x, skip), skip, residual=x)


class ABlockPair(nn.ModuleList):
    """The inner block of an attention A2C2f: two ABlocks in a chain."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, area: int, skip_aware: bool, pe_kernel: int = 7):
        super().__init__([ABlock(dim, num_heads, mlp_ratio, area, skip_aware, pe_kernel) for _ in range(2)])
        self.skip_aware = skip_aware

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        for blk in self:
            x = blk(x, skip)
        return x


class SwitchableCSP(nn.Module):
    """C3k2 / A2C2f with a skippable tail of inner blocks.

    ``cv1`` -> pieces (C3k2: two halves; A2C2f: one) -> inner blocks chained on the last piece ->
    concat of all pieces -> output 1x1 conv ``cv2`` (-> ``x + gamma * out`` for residual A2C2f).

    ``forward(x, skip)``: with ``skip`` only the first ``n_essential`` blocks run and the output
    conv reads only the channels they produced (``cv2``'s weight sliced to its first input
    channels, or ``conv_skip`` when built with ``shallow_out="separate"``); every essential conv
    uses its shallow-path norm set.
    """

    def __init__(self, kind: str, c1: int, c2: int, blocks: Sequence[nn.Module], hidden: int, pieces: int,
                 gamma: bool = False, shallow_out: str = "slice", n_essential: Optional[int] = None):
        super().__init__()
        if shallow_out not in SHALLOW_OUT:
            raise ValueError(f"shallow_out must be one of {SHALLOW_OUT}, got {shallow_out!r}")
        self.kind = kind
        self.c = hidden
        self.pieces = pieces
        n = len(blocks)
        self.n_essential = essential_blocks(n) if n_essential is None else n_essential
        self.cv1 = _Conv(c1, pieces * hidden, 1, skip_aware=True)
        self.m = nn.ModuleList(blocks)
        self.cv2 = _Conv((pieces + n) * hidden, c2, 1, skip_aware=True)
        self.shallow_out = shallow_out
        self.conv_skip = (_Conv((pieces + self.n_essential) * hidden, c2, 1)
                          if shallow_out == "separate" else None)
        self.gamma = nn.Parameter(0.01 * torch.ones(c2)) if gamma else None
        self.skip_aware = True
        self.cv2_skip: Optional[nn.Module] = None  # set by AnyDepthYOLOv12.to_inference()
        self.concat_free = False  # set by AnyDepthYOLOv12.to_inference(concat_free=True)

    @property
    def shallow_in_channels(self) -> int:
        return (self.pieces + self.n_essential) * self.c

    def _out_conv(self, y: torch.Tensor, skip: bool) -> torch.Tensor:
        if not skip or (self.conv_skip is None and self.n_essential == len(self.m)):
            return self.cv2(y, skip)  # full depth, or a shallow path that keeps every block
        if self.conv_skip is not None:
            return self.conv_skip(y)
        if self.cv2_skip is not None:  # fused form: the slice folded once
            return self.cv2_skip(y)
        cv = self.cv2
        w = cv.conv.weight[:, : y.shape[1]]
        z = F.conv2d(y, w)
        return cv.act(cv.bn(z, True))

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        y0 = self.cv1(x, skip)
        ys = list(y0.chunk(self.pieces, 1)) if self.pieces > 1 else [y0]
        last = ys[-1]
        blocks = self.m[: self.n_essential] if skip else self.m
        for i, blk in enumerate(blocks):
            last = blk(last, skip) if i < self.n_essential else blk(last)
            ys.append(last)
        if self.concat_free:  # fused form: the output conv reads the branches in place
            f = self.cv2.fused
            e = 1 if skip else 0
            out = concat_conv1x1(ys, f.weight, f.scale[e], f.bias[e], f.act, backend=f.backend)
        else:
            out = self._out_conv(torch.cat(ys, 1), skip)
        if self.gamma is not None:
            return x + self.gamma.view(1, -1, 1, 1) * out
        return out


def c3k2(c1: int, c2: int, n: int, c3k: bool, e: float = 0.5, shortcut: bool = True,
         shallow_out: str = "slice", split: str = "paper") -> SwitchableCSP:
    """C3k2. ``split="official"`` (the authors' ``SwitchableC3k2``): every inner block runs at every
    depth with its shallow-path norms; a C3k block skips the second bottleneck of its chain."""
    c = int(c2 * e)
    if split == "official":
        blocks = [C3k(c, c, 2, shortcut, skip_aware=True, inner_essential=1) if c3k else
                  Bottleneck(c, c, shortcut, skip_aware=True) for _ in range(n)]
        return SwitchableCSP("C3k2", c1, c2, blocks, c, 2, n_essential=n)
    ne = essential_blocks(n)
    blocks = [C3k(c, c, 2, shortcut, skip_aware=i < ne) if c3k else
              Bottleneck(c, c, shortcut, skip_aware=i < ne) for i in range(n)]
    return SwitchableCSP("C3k2", c1, c2, blocks, c, 2, shallow_out=shallow_out)


def a2c2f(c1: int, c2: int, n: int, a2: bool, area: int, residual: bool = False, mlp_ratio: float = 2.0,
          e: float = 0.5, shallow_out: str = "slice", split: str = "paper", pe_kernel: int = 7) -> SwitchableCSP:
    """A2C2f. ``split="official"`` (the authors' ``SkippableA2C2f``): ``official_essential_blocks(n)``
    essential blocks, and a separate shallow output conv for ``n >= 4`` (a slice otherwise)."""
    c = int(c2 * e)
    if c % 32:
        raise ValueError(f"A2C2f hidden channels must be a multiple of 32, got {c}")
    ne = official_essential_blocks(n) if split == "official" else essential_blocks(n)
    if split == "official":
        shallow_out = "separate" if n >= 4 else "slice"
    blocks = [ABlockPair(c, c // 32, mlp_ratio, area, i < ne, pe_kernel) if a2 else
              C3k(c, c, 2, True, skip_aware=i < ne) for i in range(n)]
    return SwitchableCSP("A2C2f", c1, c2, blocks, c, 1, gamma=a2 and residual, shallow_out=shallow_out,
                         n_essential=ne)


class _DWConv(_Conv):
    def __init__(self, c1: int, c2: int, k: int = 1):
        super().__init__(c1, c2, k, 1, g=math.gcd(c1, c2))


class Detect(nn.Module):
    """YOLO detection head: per level a DFL box branch (``cv2``) and a class branch (``cv3``);
    in eval mode returns ``[B, 4 + nc, anchors]`` (cx, cy, w, h in input pixels, then class
    probabilities), the layout of Ultralytics' ``Detect``."""

    def __init__(self, nc: int, ch: Sequence[int], strides: Sequence[int] = (8, 16, 32), reg_max: int = 16):
        super().__init__()
        self.nc = nc
        self.reg_max = reg_max
        self.strides = tuple(strides)
        c2 = max(16, ch[0] // 4, reg_max * 4)
        c3 = max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(_Conv(x, c2, 3), _Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for x in ch)
        self.cv3 = nn.ModuleList(
            nn.Sequential(nn.Sequential(_DWConv(x, x, 3), _Conv(x, c3, 1)),
                          nn.Sequential(_DWConv(c3, c3, 3), _Conv(c3, c3, 1)),
                          nn.Conv2d(c3, nc, 1)) for x in ch)
        self.register_buffer("proj", torch.arange(reg_max, dtype=torch.float32), persistent=False)
        self._anchor_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def anchors(self, feats: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Anchor centres ``[2, A]`` (grid units, +0.5) and strides ``[1, A]`` for these maps."""
        f0 = feats[0]
        key = (tuple(f.shape[2:] for f in feats), f0.device, f0.dtype)
        hit = self._anchor_cache.get(key)
        if hit is None:
            pts, strides = [], []
            for f, s in zip(feats, self.strides):
                h, w = f.shape[2:]
                sy, sx = torch.meshgrid(torch.arange(h, device=f0.device, dtype=f0.dtype) + 0.5,
                                        torch.arange(w, device=f0.device, dtype=f0.dtype) + 0.5, indexing="ij")
                pts.append(torch.stack((sx, sy)).view(2, -1))
                strides.append(torch.full((1, h * w), s, device=f0.device, dtype=f0.dtype))
            hit = (torch.cat(pts, 1), torch.cat(strides, 1))
            # a tensor made while a CUDA graph captures holds its values only after a replay:
            # used by that graph, never cached for eager calls
            if not (f0.is_cuda and torch.cuda.is_current_stream_capturing()):
                if len(self._anchor_cache) > 16:
                    self._anchor_cache.clear()
                self._anchor_cache[key] = hit
        keep_alive(hit)  # a captured graph keeps what it reads even after the cache drops it
        return hit

    def heads(self, feats: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Raw ``boxes [B, 4*reg_max, A]`` (DFL logits) and ``scores [B, nc, A]`` (logits)."""
        b = feats[0].shape[0]
        boxes = torch.cat([h(f).view(b, 4 * self.reg_max, -1) for h, f in zip(self.cv2, feats)], -1)
        scores = torch.cat([h(f).view(b, self.nc, -1) for h, f in zip(self.cv3, feats)], -1)
        return boxes, scores

    def decode(self, boxes: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """DFL logits -> (cx, cy, w, h) in input pixels, ``[B, 4, A]``."""
        b, _, a = boxes.shape
        dist = boxes.view(b, 4, self.reg_max, a).softmax(2)
        dist = torch.einsum("bkra,r->bka", dist, self.proj.to(dist.dtype))
        anchors, strides = self.anchors(feats)
        lt, rb = dist.chunk(2, 1)
        x1y1 = anchors - lt
        x2y2 = anchors + rb
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides

    def forward(self, feats: Sequence[torch.Tensor]):
        boxes, scores = self.heads(feats)
        if self.training:
            return {"boxes": boxes, "scores": scores, "feats": list(feats)}
        return torch.cat((self.decode(boxes, feats), scores.sigmoid()), 1)


class AnyDepthYOLOv12(AnyDepthModel):
    """YOLOv12 with 8 skippable CSP modules; ``model(x, depth=...)``.

    ``x``: ``[B, 3, H, W]`` float, H and W multiples of 32. Eval mode returns
    ``[B, 4 + num_classes, anchors]`` (Ultralytics' raw layout); training mode returns a dict of
    raw head outputs (``boxes``, ``scores``, ``feats``). :meth:`predict` takes images and returns
    :class:`~anydepth.detection.Detections`.

    ``split``: ``"paper"`` (default): every CSP module keeps ``min(n - 1, (n + 1) // 2)`` blocks on
    its shallow path, block details as Ultralytics' ``yolo12.yaml``. ``"official"``: what the
    authors' released code (their Ultralytics fork) builds, so that their checkpoints load exactly
    (:func:`anydepth.convert.from_authors_yolo`; same 8 switches, in the order of their ``skip``
    list):

    * C3k2 (``backbone.p2``, ``backbone.p3``, ``neck.p5_down``): no block is dropped; every block
      runs with its shallow-path norms, and a C3k block (m/l/x, and ``neck.p5_down`` always) skips
      the second bottleneck of its chain (their ``SwitchableC3k2`` / ``SkippableC3k``);
    * A2C2f: ``(n + 1) // 2`` essential blocks for ``n >= 2``; a one-block A2C2f keeps its block
      (only the norms switch: not skippable in their code); 4-block modules have a separate shallow
      output conv, others read ``cv2``'s first input channels (their ``SkippableA2C2f``);
    * the stride-2 convs 3, 5, 7, 15, 18 are skip-aware and take the flag of the module they feed;
    * block details of their YOLOv12 v1.0 base: area attention with a 5x5 positional conv, the
      ``gamma`` residual on every attention A2C2f, MLP ratio 1.5 for l/x (2.0 otherwise).

    ``multipliers``: ``(depth, width, max_channels)`` overriding the scale's (the scale letter still
    picks the block kinds: C3k inner blocks for m/l/x, MLP ratio and residual for l/x).
    """

    def __init__(self, scale: str = "s", num_classes: int = 80, shallow_out: Optional[str] = None,
                 split: str = "paper", multipliers: Optional[Sequence[float]] = None):
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"unknown YOLOv12 scale {scale!r}; valid scales: {list(SCALES)}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "official" and shallow_out is not None:
            raise ValueError('shallow_out is fixed by split="official" (separate for 4-block modules, '
                             "a slice otherwise); leave it unset")
        shallow_out = "slice" if shallow_out is None else shallow_out
        if shallow_out not in SHALLOW_OUT:
            raise ValueError(f"shallow_out must be one of {SHALLOW_OUT}, got {shallow_out!r}")
        self.scale = scale
        self.split = split
        self.num_classes = num_classes
        self.depth_space = DepthSpace([name for name, _ in SWITCHES])
        self._switch_layers = dict(SWITCHES)
        if multipliers is None:
            d, wm, mc = SCALES[scale]
        else:
            if len(multipliers) != 3 or min(multipliers) <= 0:
                raise ValueError(f"multipliers must be (depth, width, max_channels) > 0, got {multipliers!r}")
            d, wm, mc = float(multipliers[0]), float(multipliers[1]), int(multipliers[2])
        self.multipliers = (d, wm, mc)
        W = lambda c: _width(c, wm, mc)  # noqa: E731
        R = lambda n: _repeats(n, d)  # noqa: E731
        big = scale in ("m", "l", "x")  # C3k2 uses C3k inner blocks
        if split == "official":  # their parse_model: residual A2C2f everywhere, MLP 1.5 for l/x
            res, mlp, pe_k = True, (1.5 if scale in ("l", "x") else 2.0), 5
        else:
            res, mlp, pe_k = (True, 1.2, 7) if scale in ("l", "x") else (False, 2.0, 7)
        so = shallow_out
        sa = split == "official"  # the stride-2 convs before switchable modules are skip-aware
        L: List[Optional[nn.Module]] = [None] * 22
        L[0] = _Conv(3, W(64), 3, 2)
        L[1] = _Conv(W(64), W(128), 3, 2)
        L[2] = c3k2(W(128), W(256), R(2), big, e=0.25, shallow_out=so, split=split)
        L[3] = _Conv(W(256), W(256), 3, 2, skip_aware=sa)
        L[4] = c3k2(W(256), W(512), R(2), big, e=0.25, shallow_out=so, split=split)
        L[5] = _Conv(W(512), W(512), 3, 2, skip_aware=sa)
        L[6] = a2c2f(W(512), W(512), R(4), True, 4, res, mlp, shallow_out=so, split=split, pe_kernel=pe_k)
        L[7] = _Conv(W(512), W(1024), 3, 2, skip_aware=sa)
        L[8] = a2c2f(W(1024), W(1024), R(4), True, 1, res, mlp, shallow_out=so, split=split, pe_kernel=pe_k)
        L[11] = a2c2f(W(1024) + W(512), W(512), R(2), False, -1, shallow_out=so, split=split)
        L[14] = a2c2f(W(512) + W(512), W(256), R(2), False, -1, shallow_out=so, split=split)
        L[15] = _Conv(W(256), W(256), 3, 2, skip_aware=sa)
        L[17] = a2c2f(W(256) + W(512), W(512), R(2), False, -1, shallow_out=so, split=split)
        L[18] = _Conv(W(512), W(512), 3, 2, skip_aware=sa)
        L[20] = c3k2(W(512) + W(1024), W(1024), R(2), True, shallow_out=so, split=split)
        L[21] = Detect(num_classes, (W(256), W(512), W(1024)))
        self.layers = nn.ModuleList([m if m is not None else nn.Identity() for m in L])
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = 1e-3, 0.03
        det: Detect = self.layers[21]
        for a, b, s in zip(det.cv2, det.cv3, det.strides):  # prior: ~0.01 objects per cell
            nn.init.constant_(a[-1].bias, 2.0)
            nn.init.constant_(b[-1].bias, math.log(5 / self.num_classes / (640 / s) ** 2))

    @property
    def switchable_modules(self) -> Dict[str, SwitchableCSP]:
        """Switch name -> its CSP module."""
        return {name: self.layers[i] for name, i in SWITCHES}

    def _to_inference(self, backend: str, concat_free: bool = True) -> None:
        """Inference form (:meth:`~anydepth.model.AnyDepthModel.to_inference`): every conv + BN
        (+ activation, + residual add) becomes one fused op (``torch.ops.anydepth.conv_norm_act``)
        with one folded epilogue per norm set. With ``concat_free`` (default) each CSP module's
        output conv reads its branches in place (``anydepth_kernels.concat_conv1x1``: no concat; the
        shallow path reads the weight's first input channels); otherwise the concat stays and the
        shallow weight slice is folded once. Outputs match the eager model at every depth."""
        from ..nn import FusedConv, fuse_conv_norm_acts

        for csp in self.switchable_modules.values():
            if csp.conv_skip is None and not concat_free:
                csp.cv2_skip = FusedConv.from_conv_norm_act(
                    csp.cv2, in_channels=csp.shallow_in_channels, norm_set="skip", backend=backend)
            csp.concat_free = concat_free and csp.conv_skip is None
        for m in self.modules():
            if isinstance(m, AAttn):
                m.use_kernel = True
        fuse_conv_norm_acts(self, backend)

    def fuse(self, backend: str = "auto", concat_free: bool = True) -> "AnyDepthYOLOv12":
        """Deprecated alias of :meth:`to_inference` (warns once)."""
        warn_deprecated("AnyDepthYOLOv12.fuse()", "model.to_inference()")
        return self.to_inference(backend, concat_free=concat_free)

    @property
    def is_fused(self) -> bool:
        """Deprecated alias of :attr:`is_inference` (warns once)."""
        warn_deprecated("AnyDepthYOLOv12.is_fused", "model.is_inference")
        return self.is_inference

    def _extra_params_used(self, config: DepthConfig, ran: set) -> int:
        # a shallow output conv that reads a slice of cv2's weight calls F.conv2d directly: count
        # the slice and cv2's shallow norm set (skip-aware norms count the set that ran via hooks)
        extra = 0
        for name, csp in self.switchable_modules.items():
            if (config.is_skipped(name) and csp.conv_skip is None and csp.cv2_skip is None
                    and csp.n_essential < len(csp.m)):  # else cv2 itself runs (counted by hooks)
                if csp.concat_free:  # reads cv2's weight prefix and its second epilogue
                    extra += csp.cv2.fused.weight[:, : csp.shallow_in_channels].numel() + 2 * csp.cv2.out_channels
                    continue
                extra += csp.cv2.conv.weight[:, : csp.shallow_in_channels].numel()
                extra += sum(p.numel() for p in csp.cv2.bn.bn_skip.parameters())
        return extra

    def features(self, x: torch.Tensor, depth: DepthConfig) -> List[torch.Tensor]:
        """The P3, P4, P5 maps fed to the head."""
        self.check_input(x)
        s = {name: depth.is_skipped(name) for name, _ in SWITCHES}
        L = self.layers
        x = L[1](L[0](x))
        x = L[2](x, s["backbone.p2"])
        # the stride-2 convs take the flag of the module they feed (used when skip-aware:
        # split="official"; a plain conv ignores it)
        p3 = L[4](L[3](x, s["backbone.p3"]), s["backbone.p3"])
        p4 = L[6](L[5](p3, s["backbone.p4"]), s["backbone.p4"])
        p5 = L[8](L[7](p4, s["backbone.p5"]), s["backbone.p5"])
        up = F.interpolate(p5, scale_factor=2.0, mode="nearest")
        n4 = L[11](torch.cat((up, p4), 1), s["neck.p4_up"])
        up = F.interpolate(n4, scale_factor=2.0, mode="nearest")
        o3 = L[14](torch.cat((up, p3), 1), s["neck.p3_up"])
        o4 = L[17](torch.cat((L[15](o3, s["neck.p4_down"]), n4), 1), s["neck.p4_down"])
        o5 = L[20](torch.cat((L[18](o4, s["neck.p5_down"]), p5), 1), s["neck.p5_down"])
        return [o3, o4, o5]

    def forward_depth(self, x: torch.Tensor, depth: DepthConfig):
        return self.layers[21](self.features(x, depth))

    #: layer indices whose outputs join the three head inputs in ``distill_feats``
    DISTILL_LAYERS: Tuple[int, ...] = (6, 8)

    def forward_train(self, x: torch.Tensor, depth: DepthLike = None, targets=None) -> Dict[str, object]:
        """Training pass: raw head outputs plus the maps the distillation loss compares.

        ``x``: float ``[B, 3, H, W]`` in [0, 1]; ``depth`` as in ``forward`` (``None`` = full);
        ``targets`` is accepted for a uniform trainer interface and unused (YOLO has no
        target-dependent forward). The model must be in training mode.

        Returns a dict:

        * ``boxes``: ``[B, 4 * reg_max, A]`` DFL logits, ``scores``: ``[B, nc, A]`` class logits
          (``A`` anchors over strides 8, 16, 32, in that order, row-major per level);
        * ``feats``: ``[P3, P4, P5]``, the head inputs (neck outputs);
        * ``distill_feats``: the 5 maps of the feature-distillation term, in this order:
          the outputs of ``backbone.p4`` (layer 6) and ``backbone.p5`` (layer 8) and the three
          head inputs P3, P4, P5. The paper only says "pooled features of 5 layers"; we take the
          two deepest backbone stages (the last two switchable backbone modules, where a skipped
          refinement path changes the most channels) and the three maps the detection head
          sees, so every switchable module upstream of the head is covered by some map.
        * ``image_size``: ``(H, W)``.
        """
        if not self.training:
            raise RuntimeError("forward_train() needs the model in training mode: call model.train() first "
                               "(use model(x, depth=...) or predict() for inference)")
        config = self.resolve_depth(depth, x.shape)
        captured: Dict[int, torch.Tensor] = {}
        hooks = [self.layers[i].register_forward_hook(
            lambda _m, _args, out, i=i: captured.__setitem__(i, out)) for i in self.DISTILL_LAYERS]
        try:
            out = self.forward_depth(x, config)
        finally:
            for h in hooks:
                h.remove()
        out["distill_feats"] = [captured[i] for i in self.DISTILL_LAYERS] + list(out["feats"])
        out["image_size"] = (int(x.shape[2]), int(x.shape[3]))
        return out

    @torch.no_grad()
    def predict(self, images, depth=None, conf: float = 0.25, iou: float = 0.7, imgsz: int = 640,
                max_det: int = 300, classes: Optional[Sequence[int]] = None) -> List[Detections]:
        """Detect objects in ``images`` (one or a list; HxWx3 uint8 RGB or 3xHxW float in [0, 1],
        any size): letterbox (resize keeping the aspect ratio to fit ``imgsz``, centred on an
        ``imgsz`` canvas, rounded up to a multiple of :attr:`stride` when it is not one, the rest
        padded grey), run at ``depth``, decode, class-aware NMS.

        Returns one :class:`~anydepth.detection.Detections` per image (xyxy boxes in the original
        image's pixels, scores, labels), at most ``max_det`` each, by decreasing score.
        """
        if not 0.0 <= conf <= 1.0 or not 0.0 <= iou <= 1.0:
            raise ValueError(f"conf and iou must be in [0, 1], got conf={conf}, iou={iou}")
        side = canvas_side(imgsz, self.stride)
        param = next(self.parameters())
        batch, boxes_meta = letterbox_batch(images, side, self.stride, device=param.device, dtype=param.dtype,
                                            fit=int(imgsz))
        was_training = self.training
        self.eval()
        try:
            out = self(batch, depth=depth)
        finally:
            self.train(was_training)
        results = []
        for pred, meta in zip(out, boxes_meta):
            scores, labels = pred[4:].max(0)
            keep = scores > conf
            if classes is not None:
                keep &= torch.isin(labels, torch.as_tensor(list(classes), device=labels.device))
            box, scores, labels = pred[:4, keep].T, scores[keep], labels[keep]
            if scores.numel() > 30000:
                top = scores.topk(30000).indices
                box, scores, labels = box[top], scores[top], labels[top]
            xyxy = torch.cat((box[:, :2] - box[:, 2:] / 2, box[:, :2] + box[:, 2:] / 2), 1)
            k = batched_nms(xyxy, scores, labels, iou)[:max_det]
            results.append(Detections(meta.unmap(xyxy[k].float()), scores[k].float(), labels[k]))
        return results


def _factory(scale: str):
    def build(num_classes: int = 80, shallow_out: Optional[str] = None, split: str = "paper",
              multipliers: Optional[Sequence[float]] = None) -> AnyDepthYOLOv12:
        """YOLOv12-{scale} any-depth. ``shallow_out``: ``"slice"`` (default: shallow path reads a
        slice of each output conv) or ``"separate"`` (its own shallow output conv). ``split``:
        ``"paper"`` (default) or ``"official"`` (the authors' released code, see
        :class:`AnyDepthYOLOv12`). ``multipliers``: ``(depth, width, max_channels)`` instead of the
        scale's own (checkpoints trained with another YAML)."""
        return AnyDepthYOLOv12(scale, num_classes, shallow_out, split, multipliers)

    build.__name__ = f"yolov12{scale}_anydepth"
    return build


def _import_ultralytics(path: str) -> AnyDepthYOLOv12:
    """An Ultralytics YOLO12 state-dict file, or an authors' any-depth one, state dict or their
    pickled ``.pt`` (it has shallow-path norms ``bn_skip``: :func:`anydepth.convert.from_authors_yolo`,
    ``split="official"``)."""
    from ..convert import from_authors_yolo, from_ultralytics
    from ..convert._authors import read_pickled_checkpoint

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a pickled model (their released .pt), read without running code
        try:
            sd = read_pickled_checkpoint(path)
        except ValueError:  # from_ultralytics says what is wrong with the file
            sd = None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if isinstance(sd, dict) and any(isinstance(k, str) and ".bn_skip." in k for k in sd):
        return from_authors_yolo(sd).eval()
    return from_ultralytics(path).eval()


FAMILY = register_family(ModelFamily(
    name="yolov12",
    model_class=AnyDepthYOLOv12,
    factories={f"yolov12{s}-anydepth": _factory(s) for s in SCALES},
    task="detect",
    preprocess="letterbox",
    criterion=lazy("anydepth.losses.yolo:YOLOCriterion"),
    # AdamW 2e-3 as Ultralytics' automatic optimizer picks for small runs, weight decay 5e-4, clip 10
    train=TrainDefaults(
        lr=2e-3, weight_decay=5e-4, clip_grad=10.0,
        # the authors' fine-tuning runs (finetuning_AnyDepthYOLO/logs/**/args.yaml): SGD momentum
        # 0.9, lr0 1e-3 linear to lrf 0.01 (1e-5), weight decay 5e-4 at nominal batch 256, 3
        # warm-up epochs (momentum 0.8 -> 0.9), alpha_base 0.2, no KD warm-up, clip 10
        finetune=(("optimizer", "sgd"), ("lr", 1e-3), ("min_lr_ratio", 0.01), ("schedule", "linear"),
                  ("momentum", 0.9), ("weight_decay", 5e-4), ("nbs", 256), ("warmup_epochs", 3.0),
                  ("alpha_base", 0.2), ("kd_warmup_epochs", 0.0), ("clip_grad", 10.0))),
    converters={"ultralytics": lazy("anydepth.convert:from_ultralytics"),
                "authors": lazy("anydepth.convert:from_authors_yolo")},
    weight_import=WeightImport("an Ultralytics YOLO12 checkpoint (or the authors' any-depth one)", is_file,
                               _import_ultralytics),
    peer=Peer("ultralytics", lazy("anydepth.convert._ultralytics:build_peer"), lambda m, x: m(x)),
))
