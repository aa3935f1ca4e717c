"""timm and torchvision ViT / Swin -> ``vit-*-anydepth`` / ``swin-*-anydepth`` weight import.

timm and torchvision are optional: their model objects are read (attributes and parameters),
never run. Every parameter of the source model must land somewhere (an unused one, e.g. a layer
scale, a register token, a norm we do not have, raises ``ValueError``), and the configurations we
do not build (global-average-pool ViTs, conv stems, Swin V2, ...) are refused by name. Both sets
of each skip-aware LayerNorm start from the source norm, so at full depth the result equals the
source model on ``(x - mean) / std`` (our models normalise inside; mean/std come from the timm
model's ``pretrained_cfg``, ImageNet's otherwise).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..classify import IMAGENET_MEAN, IMAGENET_STD
from ..models.swin import VARIANTS as SWIN_VARIANTS
from ..models.swin import AnyDepthSwin
from ..models.vit import VARIANTS as VIT_VARIANTS
from ..models.vit import AnyDepthViT
from ..nn import SkipAwareLayerNorm

#: our model name -> timm's (the benchmark peer)
TIMM_NAMES = {
    "vit-ti16-anydepth": "vit_tiny_patch16_224",
    "vit-s16-anydepth": "vit_small_patch16_224",
    "vit-b16-anydepth": "vit_base_patch16_224",
    "swin-t-anydepth": "swin_tiny_patch4_window7_224",
    "swin-s-anydepth": "swin_small_patch4_window7_224",
}


class _Copier:
    """Copies source parameters into ours and remembers which source parameters were used."""

    def __init__(self, source: nn.Module, what: str):
        self.what = what
        self.names = {id(p): n for n, p in source.named_parameters()}
        self.used: set = set()

    def tensor(self, dst: torch.Tensor, src: torch.Tensor, label: str) -> None:
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"{self.what}: {label} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(src.detach().to(dst.dtype))
        self.used.add(id(src))

    def module(self, dst: nn.Module, src: nn.Module, label: str) -> None:
        """Same-named parameters of ``dst`` and ``src`` (a Linear, Conv2d or LayerNorm); a
        skip-aware ``dst`` norm gets ``src`` in both sets."""
        if isinstance(dst, SkipAwareLayerNorm):
            self.module(dst.ln, src, label)
            self.module(dst.ln_skip, src, label)
            return
        if not isinstance(src, type(dst)):
            raise ValueError(f"{self.what}: {label} is a {type(src).__name__}, expected {type(dst).__name__}")
        if isinstance(dst, nn.LayerNorm) and dst.eps != src.eps:
            raise ValueError(f"{self.what}: {label} has eps {src.eps}, expected {dst.eps}")
        for name, p in dst.named_parameters(recurse=False):
            q = getattr(src, name, None)
            if q is None:
                raise ValueError(f"{self.what}: {label} has no {name!r}")
            self.tensor(p, q, f"{label}.{name}")

    def check_all_used(self, source: nn.Module) -> None:
        unused = [n for n, p in source.named_parameters() if id(p) not in self.used]
        if unused:
            raise ValueError(f"{self.what}: parameters our model has no place for: {unused[:8]}"
                             f"{'...' if len(unused) > 8 else ''} (an unsupported configuration)")


def _square(v: Any, what: str) -> int:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(t) != 2 or t[0] != t[1]:
        raise ValueError(f"only square {what} are supported, got {t}")
    return int(t[0])


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"unsupported configuration: {what}")


def _mean_std(model: nn.Module) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _vit_name(dim: int) -> str:
    for name, (d, _, _) in VIT_VARIANTS.items():
        if d == dim:
            return f"vit-{name}-anydepth"
    return "vit-b16-anydepth"


def _swin_name(dim: int, depths: Sequence[int]) -> str:
    for name, (d, ds, _) in SWIN_VARIANTS.items():
        if d == dim and tuple(ds) == tuple(depths):
            return f"swin-{name}-anydepth"
    return "swin-t-anydepth"


def _finish(model, name: str, cfg: Dict[str, Any]):
    model.model_name = name
    model.model_kwargs = dict(cfg)
    return model.eval()


# -- timm ----------------------------------------------------------------------------------------
def _vit_from_timm(m: nn.Module, stage_blocks: Optional[Sequence[int]]) -> AnyDepthViT:
    what = "timm VisionTransformer"
    _require(getattr(m, "cls_token", None) is not None and getattr(m, "num_prefix_tokens", 1) == 1,
             "a ViT without a class token or with register tokens")
    _require(getattr(m, "global_pool", "token") == "token", f"global_pool={m.global_pool!r} (only 'token')")
    _require(not getattr(m, "dynamic_img_size", False), "dynamic_img_size=True")
    _require(not getattr(m, "no_embed_class", False), "no_embed_class=True")
    _require(getattr(m, "attn_pool", None) is None, "an attention-pool head")
    _require(isinstance(m.head, nn.Linear), "num_classes=0 (no linear head)")
    blocks = list(m.blocks)
    b0 = blocks[0]
    _require(type(b0).__name__ == "Block", f"blocks of type {type(b0).__name__} (only timm's Block)")
    for b in blocks:
        act = getattr(b.mlp, "act", None)
        _require(isinstance(act, nn.GELU) and act.approximate == "none", "an MLP activation other than exact GELU")
    dim = int(m.embed_dim)
    cfg: Dict[str, Any] = dict(
        num_classes=int(m.head.out_features), img_size=_square(m.patch_embed.img_size, "images"),
        patch_size=_square(m.patch_embed.patch_size, "patches"), embed_dim=dim, depth=len(blocks),
        num_heads=int(b0.attn.num_heads), mlp_ratio=b0.mlp.fc1.out_features / dim,
        qkv_bias=b0.attn.qkv.bias is not None, eps=float(b0.norm1.eps))
    if stage_blocks is not None:
        cfg["stage_blocks"] = tuple(stage_blocks)
    mean, std = _mean_std(m)
    cfg.update(mean=mean, std=std)
    ours = AnyDepthViT(**cfg)
    c = _Copier(m, what)
    c.module(ours.patch_embed, m.patch_embed.proj, "patch_embed.proj")
    c.tensor(ours.cls_token, m.cls_token, "cls_token")
    c.tensor(ours.pos_embed, m.pos_embed, "pos_embed")
    for i, (o, t) in enumerate(zip(ours.blocks(), blocks)):
        for name in ("norm1", "norm2"):
            c.module(getattr(o, name), getattr(t, name), f"blocks.{i}.{name}")
        c.module(o.attn.qkv, t.attn.qkv, f"blocks.{i}.attn.qkv")
        c.module(o.attn.proj, t.attn.proj, f"blocks.{i}.attn.proj")
        c.module(o.mlp.fc1, t.mlp.fc1, f"blocks.{i}.mlp.fc1")
        c.module(o.mlp.fc2, t.mlp.fc2, f"blocks.{i}.mlp.fc2")
    c.module(ours.norm, m.norm, "norm")
    c.module(ours.head, m.head, "head")
    c.check_all_used(m)
    return _finish(ours, _vit_name(dim), cfg)


def _swin_from_timm(m: nn.Module) -> AnyDepthSwin:
    what = "timm SwinTransformer"
    _require(getattr(m, "global_pool", "avg") == "avg", f"global_pool={m.global_pool!r} (only 'avg')")
    _require(isinstance(getattr(m.head, "fc", None), nn.Linear), "num_classes=0 (no linear head)")
    _require(isinstance(m.patch_embed.norm, nn.LayerNorm), "patch_norm=False")
    layers = list(m.layers)
    blocks0 = layers[0].blocks[0]
    _require(type(blocks0).__name__ == "SwinTransformerBlock", f"blocks of type {type(blocks0).__name__}")
    dim = int(m.embed_dim)
    window = max(_square(layer.blocks[0].window_size, "windows") for layer in layers)
    for layer in layers:
        for b in layer.blocks:
            _require(not getattr(b, "always_partition", False), "always_partition=True")
            _require(not getattr(b, "dynamic_mask", False), "dynamic_mask=True (strict_img_size=False)")
            act = getattr(b.mlp, "act", None)
            _require(isinstance(act, nn.GELU) and act.approximate == "none", "an MLP activation other than exact GELU")
    depths = tuple(len(layer.blocks) for layer in layers)
    cfg: Dict[str, Any] = dict(
        num_classes=int(m.head.fc.out_features), img_size=_square(m.patch_embed.img_size, "images"),
        patch_size=_square(m.patch_embed.patch_size, "patches"), window_size=window, embed_dim=dim,
        depths=depths, num_heads=tuple(int(layer.blocks[0].attn.num_heads) for layer in layers),
        mlp_ratio=blocks0.mlp.fc1.out_features / dim, qkv_bias=blocks0.attn.qkv.bias is not None,
        eps=float(blocks0.norm1.eps))
    mean, std = _mean_std(m)
    cfg.update(mean=mean, std=std)
    ours = AnyDepthSwin(**cfg)
    c = _Copier(m, what)
    c.module(ours.patch_embed.proj, m.patch_embed.proj, "patch_embed.proj")
    c.module(ours.patch_embed.norm, m.patch_embed.norm, "patch_embed.norm")
    for i, (stage, layer, ob) in enumerate(zip(ours.stages, layers, ours.blocks())):
        if i > 0:
            ds = layer.downsample
            _require(type(ds).__name__ == "PatchMerging", f"downsample {type(ds).__name__} (only PatchMerging)")
            c.module(stage.essential.downsample.norm, ds.norm, f"layers.{i}.downsample.norm")
            c.module(stage.essential.downsample.reduction, ds.reduction, f"layers.{i}.downsample.reduction")
        for j, (o, t) in enumerate(zip(ob, layer.blocks)):
            lab = f"layers.{i}.blocks.{j}"
            theirs = (_square(t.window_size, "windows"), _square(t.shift_size, "shifts"))
            _require((o.attn.window, o.attn.shift) == theirs, f"{lab}: window/shift {t.window_size}/{t.shift_size}")
            for name in ("norm1", "norm2"):
                c.module(getattr(o, name), getattr(t, name), f"{lab}.{name}")
            c.module(o.attn.qkv, t.attn.qkv, f"{lab}.attn.qkv")
            c.module(o.attn.proj, t.attn.proj, f"{lab}.attn.proj")
            c.tensor(o.attn.relative_position_bias_table, t.attn.relative_position_bias_table,
                     f"{lab}.attn.relative_position_bias_table")
            c.module(o.mlp.fc1, t.mlp.fc1, f"{lab}.mlp.fc1")
            c.module(o.mlp.fc2, t.mlp.fc2, f"{lab}.mlp.fc2")
    c.module(ours.norm, m.norm, "norm")
    c.module(ours.head, m.head.fc, "head.fc")
    c.check_all_used(m)
    return _finish(ours, _swin_name(dim, depths), cfg)


def from_timm(model: nn.Module, stage_blocks: Optional[Sequence[int]] = None):
    """``vit-*-anydepth`` from a timm ``VisionTransformer`` (class-token ViTs such as
    ``vit_{tiny,small,base}_patch16_224``) or ``swin-*-anydepth`` from a timm ``SwinTransformer``
    (``swin_{tiny,small}_patch4_window7_224``), with the same weights (any configuration: depth,
    width, heads, image size are read from the model).

    ``stage_blocks`` (ViT only): blocks per switchable stage, default groups of 3 as the authors.
    The result, in eval mode, equals ``model((x - mean) / std)`` at full depth for inputs ``x`` in
    [0, 1] (``mean``/``std`` from the model's ``pretrained_cfg``). Unsupported configurations raise
    ``ValueError`` naming what is not supported.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_timm: expected a timm model (nn.Module), got {type(model).__name__}")
    kind = type(model).__name__
    if kind == "VisionTransformer" and hasattr(model, "blocks"):
        return _vit_from_timm(model, stage_blocks)
    if stage_blocks is not None:
        raise ValueError("stage_blocks applies to ViTs only")
    if kind == "SwinTransformer" and hasattr(model, "layers"):
        return _swin_from_timm(model)
    raise ValueError(f"from_timm: {kind} is not supported (timm VisionTransformer or SwinTransformer)")


# -- torchvision ---------------------------------------------------------------------------------
def _vit_from_torchvision(m: nn.Module, stage_blocks: Optional[Sequence[int]]) -> AnyDepthViT:
    what = "torchvision VisionTransformer"
    _require(isinstance(m.conv_proj, nn.Conv2d), "a conv stem (conv_stem_configs)")
    _require(len(m.heads) == 1 and isinstance(m.heads.head, nn.Linear), "a representation (pre_logits) layer")
    layers = list(m.encoder.layers)
    l0 = layers[0]
    dim = int(m.hidden_dim)
    cfg: Dict[str, Any] = dict(
        num_classes=int(m.num_classes), img_size=int(m.image_size), patch_size=int(m.patch_size), embed_dim=dim,
        depth=len(layers), num_heads=int(l0.self_attention.num_heads), mlp_ratio=m.mlp_dim / dim,
        qkv_bias=l0.self_attention.in_proj_bias is not None, eps=float(l0.ln_1.eps))
    if stage_blocks is not None:
        cfg["stage_blocks"] = tuple(stage_blocks)
    ours = AnyDepthViT(**cfg)
    c = _Copier(m, what)
    c.module(ours.patch_embed, m.conv_proj, "conv_proj")
    c.tensor(ours.cls_token, m.class_token, "class_token")
    c.tensor(ours.pos_embed, m.encoder.pos_embedding, "encoder.pos_embedding")
    for i, (o, t) in enumerate(zip(ours.blocks(), layers)):
        lab = f"encoder.layers.{i}"
        c.module(o.norm1, t.ln_1, f"{lab}.ln_1")
        c.module(o.norm2, t.ln_2, f"{lab}.ln_2")
        sa = t.self_attention
        _require(sa.batch_first and sa._qkv_same_embed_dim and sa.bias_k is None, f"{lab}: attention layout")
        c.tensor(o.attn.qkv.weight, sa.in_proj_weight, f"{lab}.self_attention.in_proj_weight")
        if sa.in_proj_bias is not None:
            c.tensor(o.attn.qkv.bias, sa.in_proj_bias, f"{lab}.self_attention.in_proj_bias")
        c.module(o.attn.proj, sa.out_proj, f"{lab}.self_attention.out_proj")
        c.module(o.mlp.fc1, t.mlp[0], f"{lab}.mlp.0")
        c.module(o.mlp.fc2, t.mlp[3], f"{lab}.mlp.3")
    c.module(ours.norm, m.encoder.ln, "encoder.ln")
    c.module(ours.head, m.heads.head, "heads.head")
    c.check_all_used(m)
    return _finish(ours, _vit_name(dim), cfg)


def _swin_from_torchvision(m: nn.Module, img_size: int) -> AnyDepthSwin:
    what = "torchvision SwinTransformer"
    feats = list(m.features)
    stem = feats[0]
    conv, norm0 = stem[0], stem[2]
    stages = feats[1::2]
    merges = feats[2::2]
    b0 = stages[0][0]
    _require(type(b0).__name__ == "SwinTransformerBlock", f"blocks of type {type(b0).__name__} (Swin V1 only)")
    for pm in merges:
        _require(type(pm).__name__ == "PatchMerging", f"{type(pm).__name__} (Swin V1 only)")
    dim = int(conv.out_channels)
    patch = _square(conv.kernel_size, "patches")
    window = _square(b0.attn.window_size, "windows")
    side = img_size // patch
    for i, stage in enumerate(stages):
        s = side // 2 ** i
        # torchvision pads a stage smaller than its window (timm and we shrink the window)
        _require(s >= window and s % window == 0,
                 f"img_size {img_size}: stage {i + 1} is {s}x{s}, not a multiple of the {window}x{window} window")
    depths = tuple(len(s) for s in stages)
    cfg: Dict[str, Any] = dict(
        num_classes=int(m.head.out_features), img_size=int(img_size), patch_size=patch, window_size=window,
        embed_dim=dim, depths=depths, num_heads=tuple(int(s[0].attn.num_heads) for s in stages),
        mlp_ratio=b0.mlp[0].out_features / dim, qkv_bias=b0.attn.qkv.bias is not None, eps=float(b0.norm1.eps))
    ours = AnyDepthSwin(**cfg)
    c = _Copier(m, what)
    c.module(ours.patch_embed.proj, conv, "features.0.0")
    c.module(ours.patch_embed.norm, norm0, "features.0.2")
    for i, (stage, ob, tstage) in enumerate(zip(ours.stages, ours.blocks(), stages)):
        if i > 0:
            pm = merges[i - 1]
            c.module(stage.essential.downsample.norm, pm.norm, f"features.{2 * i}.norm")
            c.module(stage.essential.downsample.reduction, pm.reduction, f"features.{2 * i}.reduction")
        for j, (o, t) in enumerate(zip(ob, tstage)):
            lab = f"features.{2 * i + 1}.{j}"
            c.module(o.norm1, t.norm1, f"{lab}.norm1")
            c.module(o.norm2, t.norm2, f"{lab}.norm2")
            c.module(o.attn.qkv, t.attn.qkv, f"{lab}.attn.qkv")
            c.module(o.attn.proj, t.attn.proj, f"{lab}.attn.proj")
            c.tensor(o.attn.relative_position_bias_table, t.attn.relative_position_bias_table,
                     f"{lab}.attn.relative_position_bias_table")
            c.module(o.mlp.fc1, t.mlp[0], f"{lab}.mlp.0")
            c.module(o.mlp.fc2, t.mlp[3], f"{lab}.mlp.3")
    c.module(ours.norm, m.norm, "norm")
    c.module(ours.head, m.head, "head")
    c.check_all_used(m)
    return _finish(ours, _swin_name(dim, depths), cfg)


def from_torchvision_transformer(model: nn.Module, img_size: int = 224,
                                 stage_blocks: Optional[Sequence[int]] = None):
    """``vit-*-anydepth`` from a torchvision ``VisionTransformer`` (``vit_b_16``, ...) or
    ``swin-*-anydepth`` from a torchvision ``SwinTransformer`` (``swin_t``, ``swin_s``; V1 only),
    same weights. ``img_size``: the input side our Swin is built for (torchvision's Swin takes
    any; every stage side must be a multiple of the window, 224 for the standard models).
    ``stage_blocks``: as :func:`from_timm`. The result (eval mode) equals
    ``model((x - mean) / std)`` at full depth with ImageNet's mean/std."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torchvision model (nn.Module), got {type(model).__name__}")
    kind = type(model).__name__
    if kind == "VisionTransformer" and hasattr(model, "encoder"):
        return _vit_from_torchvision(model, stage_blocks)
    if stage_blocks is not None:
        raise ValueError("stage_blocks applies to ViTs only")
    if kind == "SwinTransformer" and hasattr(model, "features"):
        return _swin_from_torchvision(model, img_size)
    raise ValueError(f"{kind} is not supported here (torchvision VisionTransformer or SwinTransformer)")


# -- random weights, the benchmark peer ----------------------------------------------------------
@torch.no_grad()
def randomize_transformer_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial random weights for fidelity checks (timm's init leaves LayerNorms identities and
    linear weights tiny): linear/conv weights N(0, 1/fan_in), biases N(0, 0.1^2), LayerNorm scales
    U(0.75, 1.25) and shifts N(0, 0.1^2), embeddings and position-bias tables N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * std)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(owner, nn.LayerNorm):
            if leaf == "weight":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.75)
            else:
                rnd(p, 0.1)
        elif leaf in ("weight", "in_proj_weight") and p.dim() >= 2:
            rnd(p, (1.0 / p[0].numel()) ** 0.5)
        elif leaf in ("bias", "in_proj_bias"):
            rnd(p, 0.1)
        else:  # cls token, position embedding, relative position bias tables
            rnd(p, 0.5)
    return model


def call_peer(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The timm peer on our input convention (``x`` in [0, 1], normalised with its mean/std)."""
    mean, std = _mean_std(model)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return model((x - m) / s)


def build_peer(model_name: str = "vit-b16-anydepth", num_classes: int = 1000, seed: int = 0):
    """The timm model our ``model_name`` matches, with random non-trivial weights, and ours
    converted from it: ``(peer, ours)``, both eval."""
    from .._optional import require

    timm = require("timm", "building the timm ViT / Swin peer")
    if model_name not in TIMM_NAMES:
        raise ValueError(f"no timm peer for {model_name!r}; known: {sorted(TIMM_NAMES)}")
    torch.manual_seed(seed)
    peer = timm.create_model(TIMM_NAMES[model_name], pretrained=False, num_classes=num_classes)
    randomize_transformer_(peer, seed)
    peer.eval()
    return peer, from_timm(peer)





# -- state-dict files (weight import from a path) --------------------------------------------------
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
#: embed dim -> heads where the head dim is not 64 (ViT-H: 1280 / 16 = 80)
_VIT_HEADS = {1280: 16}


def is_state_dict_file(path: str) -> bool:
    import os

    return os.path.isfile(path) and path.endswith(STATE_DICT_SUFFIXES)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.load(weights_only=True)`` file (a plain
    state dict, or one under ``"model"`` / ``"state_dict"``, as timm's and torchvision's scripts save)."""
    if path.endswith(".safetensors"):
        from .._optional import require

        sd = require("safetensors.torch", "reading .safetensors weights").load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path!r} holds no state dict of tensors")
    return sd


def state_dict_kind(sd: Dict[str, torch.Tensor]) -> Optional[str]:
    """``"timm-vit"``, ``"torchvision-vit"``, ``"timm-swin"``, ``"torchvision-swin"`` or None."""
    if "cls_token" in sd and "blocks.0.attn.qkv.weight" in sd:
        return "timm-vit"
    if "class_token" in sd and "encoder.pos_embedding" in sd:
        return "torchvision-vit"
    if "layers.0.blocks.0.attn.relative_position_bias_table" in sd:
        return "timm-swin"
    if "features.1.0.attn.relative_position_bias_table" in sd:
        return "torchvision-swin"
    return None


def _count(sd: Dict[str, torch.Tensor], prefix: str) -> int:
    """How many ``prefix{i}.`` indices the keys hold."""
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix) and k[len(prefix):][:1].isdigit()}
    return max(idx) + 1 if idx else 0


def _window(table: torch.Tensor) -> int:
    side = round(table.shape[0] ** 0.5)  # (2w - 1)^2 rows
    return (side + 1) // 2


def from_vit_swin_state_dict(state_dict_or_path, num_heads: Optional[int] = None, img_size: int = 224,
                    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
    """A ViT or Swin from a timm or torchvision state dict (or a file holding one: ``.pth``/``.pt``/
    ``.bin`` read with ``weights_only=True``, ``.safetensors``). The architecture is read from the
    keys and shapes; the peer's model is built with it (timm or torchvision must be installed),
    loaded strictly, and converted with :func:`from_timm` / :func:`from_torchvision_transformer`.

    Not in a state dict, so given here when not the default: ``num_heads`` (ViT; default
    ``embed_dim // 64``, 16 for ViT-H; Swin's are read from its position-bias tables),
    ``img_size`` (Swin; a ViT's follows from its position embedding) and ``mean``/``std`` (default
    ImageNet's; timm's ImageNet-21k ViT weights expect 0.5/0.5)."""
    import os

    from .._optional import require

    sd = read_state_dict(os.fspath(state_dict_or_path)) if isinstance(state_dict_or_path, (str, os.PathLike)) \
        else dict(state_dict_or_path)
    kind = state_dict_kind(sd)
    if kind is None:
        raise ValueError("not a timm or torchvision ViT / Swin state dict (no cls_token + blocks, class_token + "
                         "encoder, or window-attention position-bias tables)")
    if kind == "timm-swin":  # buffers older timm versions saved (now rebuilt, not persistent)
        sd = {k: v for k, v in sd.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    if kind == "timm-vit":
        timm = require("timm", "reading timm ViT weights")
        dim = int(sd["cls_token"].shape[-1])
        patch = int(sd["patch_embed.proj.weight"].shape[-1])
        grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
        peer = timm.models.VisionTransformer(
            img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=_count(sd, "blocks."),
            num_heads=num_heads or _VIT_HEADS.get(dim, dim // 64),
            mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim, qkv_bias="blocks.0.attn.qkv.bias" in sd,
            num_classes=int(sd["head.weight"].shape[0]))
    elif kind == "torchvision-vit":
        tv = require("torchvision", "reading torchvision ViT weights")
        dim = int(sd["class_token"].shape[-1])
        patch = int(sd["conv_proj.weight"].shape[-1])
        grid = round((sd["encoder.pos_embedding"].shape[1] - 1) ** 0.5)
        peer = tv.models.VisionTransformer(
            image_size=grid * patch, patch_size=patch, num_layers=_count(sd, "encoder.layers.encoder_layer_"),
            num_heads=num_heads or _VIT_HEADS.get(dim, dim // 64), hidden_dim=dim,
            mlp_dim=int(sd["encoder.layers.encoder_layer_0.mlp.0.weight"].shape[0]),
            num_classes=int(sd["heads.head.weight"].shape[0]))
    elif kind == "timm-swin":
        timm = require("timm", "reading timm Swin weights")
        if "layers.0.downsample.reduction.weight" in sd:
            raise ValueError("a timm Swin state dict of the old layout (patch merging at the end of each stage): "
                             "load it with timm.create_model(name, pretrained_cfg_overlay=dict(file=path)) "
                             "and convert that model with from_timm")
        n = _count(sd, "layers.")
        depths = tuple(_count(sd, f"layers.{i}.blocks.") for i in range(n))
        dim = int(sd["patch_embed.proj.weight"].shape[0])
        peer = timm.models.SwinTransformer(
            img_size=img_size, patch_size=int(sd["patch_embed.proj.weight"].shape[-1]),
            window_size=_window(sd["layers.0.blocks.0.attn.relative_position_bias_table"]), embed_dim=dim,
            depths=depths, num_heads=tuple(int(sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
                                           for i in range(n)),
            mlp_ratio=sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / dim,
            num_classes=int(sd["head.fc.weight"].shape[0]))
    else:
        tv = require("torchvision", "reading torchvision Swin weights")
        if any(".cpb_mlp." in k for k in sd):
            raise ValueError("a torchvision Swin V2 state dict: only Swin V1 is supported")
        n = _count(sd, "features.") // 2
        dim = int(sd["features.0.0.weight"].shape[0])
        patch = int(sd["features.0.0.weight"].shape[-1])
        tables = [sd[f"features.{2 * i + 1}.0.attn.relative_position_bias_table"] for i in range(n)]
        w = _window(tables[0])
        peer = tv.models.SwinTransformer(
            patch_size=[patch, patch], embed_dim=dim, depths=[_count(sd, f"features.{2 * i + 1}.") for i in range(n)],
            num_heads=[int(t.shape[1]) for t in tables], window_size=[w, w],
            mlp_ratio=sd["features.1.0.mlp.0.weight"].shape[0] / dim, num_classes=int(sd["head.weight"].shape[0]))
    try:
        peer.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the {kind} state dict does not load into the architecture read from it: {e}") from e
    peer.eval()
    ours = from_timm(peer) if kind.startswith("timm") else from_torchvision_transformer(peer, img_size=img_size)
    if mean is not None or std is not None:
        cfg = dict(ours.model_kwargs, mean=tuple(mean or ours.mean), std=tuple(std or ours.std))
        again = type(ours)(**cfg)
        again.load_state_dict(ours.state_dict())
        ours = _finish(again, ours.model_name, cfg)
    return ours


def import_file(family: str):
    """The ``WeightImport.load`` of the ``vit`` / ``swin`` family: a state-dict file of that kind."""

    def load(path: str):
        sd = read_state_dict(path)
        kind = state_dict_kind(sd)
        if kind is None or not kind.endswith(family):
            raise ValueError(f"not a timm or torchvision {family} state dict" + (f" (it is {kind})" if kind else ""))
        return from_vit_swin_state_dict(sd)

    return load

__all__ = ["build_peer", "call_peer", "from_vit_swin_state_dict", "from_timm", "from_torchvision_transformer",
           "randomize_transformer_", "read_state_dict"]
