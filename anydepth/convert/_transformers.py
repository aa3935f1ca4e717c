"""HuggingFace ``RTDetrForObjectDetection`` -> ``rtdetr-r{18,34,50,101}-anydepth``.

:func:`from_transformers` reads the variant from the HF config, builds our model, and loads every
weight (an HF key with no place in our model, or a weight of ours that HF does not provide, is an
error). The shallow-path norms (``bn_skip`` / ``ln_skip``) start as copies of the main ones, so the
converted model at full depth reproduces HF's output; shallow depths need any-depth training.

HF config fields that change the computation and that we do not implement raise ``ValueError``
naming them. ``eval_size``/``anchor_image_size`` are accepted: we always compute the position
embedding and anchors for the actual input, which is what the official RT-DETR does with them (HF
drops the AIFI position embedding in eval mode when ``eval_size`` is set; we do not copy that).

:func:`build_peer` builds an HF model offline for a variant, with random non-trivial weights and
BatchNorm statistics, and its converted twin: the fidelity oracle of the tests and the speed peer
of the benchmark. ``transformers`` is imported only in this file.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from .._optional import require
from ..models.rtdetr import VARIANTS, AnyDepthRTDETR

__all__ = ["from_transformers", "build_peer", "hf_config_for"]

_PREFIX_RULES = (
    (r"^model\.backbone\.model\.embedder\.embedder\.(\d+)\.", r"backbone.stem.\1."),
    (r"^model\.encoder_input_proj\.(\d+)\.0\.", r"encoder.input_proj.\1.conv."),
    (r"^model\.encoder_input_proj\.(\d+)\.1\.", r"encoder.input_proj.\1.bn."),
    (r"^model\.decoder_input_proj\.(\d+)\.0\.", r"decoder.input_proj.\1.conv."),
    (r"^model\.decoder_input_proj\.(\d+)\.1\.", r"decoder.input_proj.\1.bn."),
    (r"^model\.encoder\.aifi\.0\.layers\.(\d+)\.", r"encoder.aifi.\1."),
    (r"^model\.enc_output\.0\.", "decoder.enc_output."),
    (r"^model\.enc_output\.1\.", "decoder.enc_output_norm."),
    (r"^model\.(enc_score_head|enc_bbox_head|denoising_class_embed)\.", r"decoder.\1."),
    (r"^model\.decoder\.", "decoder."),
    (r"^model\.encoder\.", "encoder."),
)


def _variant_of(config) -> str:
    bc = config.backbone_config
    if bc is None:
        raise ValueError("RTDetrConfig has no backbone_config; only the RT-DETR ResNet-vd backbones convert")
    if getattr(bc, "model_type", None) != "rt_detr_resnet":
        raise ValueError(f"unsupported backbone {getattr(bc, 'model_type', type(bc).__name__)!r}; "
                         "only 'rt_detr_resnet' (ResNet-vd) converts")
    depths, layer_type = tuple(bc.depths), bc.layer_type
    for name, v in VARIANTS.items():
        if v["layer_type"] == layer_type and tuple(v["depths"]) == depths:
            if tuple(bc.hidden_sizes) != tuple(v["hidden_sizes"]):
                raise ValueError(f"unsupported backbone hidden_sizes {list(bc.hidden_sizes)} for "
                                 f"{name}; expected {list(v['hidden_sizes'])}")
            return name
    raise ValueError(f"unsupported backbone: layer_type={layer_type!r} depths={list(depths)}; supported: "
                     + ", ".join(f"{n}={v['layer_type']} {list(v['depths'])}" for n, v in VARIANTS.items()))


def _check_supported(config, variant: str) -> None:
    bc = config.backbone_config
    v = VARIANTS[variant]
    hidden = config.encoder_hidden_dim
    wrong = []

    def need(name, value, expected):
        if (list(value) if isinstance(value, (list, tuple)) else value) != expected:
            wrong.append(f"{name}={value!r} (supported: {expected!r})")

    need("backbone_config.num_channels", bc.num_channels, 3)
    need("backbone_config.embedding_size", bc.embedding_size, 64)
    need("backbone_config.hidden_act", bc.hidden_act, "relu")
    need("backbone_config.downsample_in_first_stage", bc.downsample_in_first_stage, False)
    need("backbone_config.downsample_in_bottleneck", bc.downsample_in_bottleneck, False)
    need("backbone_config.out_indices", list(bc.out_indices), [2, 3, 4])
    need("encoder_in_channels", config.encoder_in_channels, list(v["hidden_sizes"][1:]))
    need("feat_strides", config.feat_strides, [8, 16, 32])
    need("encode_proj_layers", config.encode_proj_layers, [2])
    need("num_feature_levels", config.num_feature_levels, 3)
    need("decoder_in_channels", config.decoder_in_channels, [hidden] * 3)
    need("normalize_before", config.normalize_before, False)
    need("learn_initial_query", config.learn_initial_query, False)
    if config.activation_function not in ("silu", "relu"):
        wrong.append(f"activation_function={config.activation_function!r} (supported: 'silu', 'relu')")
    for name in ("encoder_activation_function", "decoder_activation_function"):
        if getattr(config, name) not in ("relu", "gelu", "silu"):
            wrong.append(f"{name}={getattr(config, name)!r} (supported: 'relu', 'gelu', 'silu')")
    if wrong:
        raise ValueError("unsupported RTDetrConfig for AnyDepth-RT-DETR: " + "; ".join(wrong))


def _model_kwargs(config, variant: str, num_classes: int, denoising: bool) -> Dict[str, Any]:
    """Options of :class:`AnyDepthRTDETR` reproducing ``config`` (only those off the variant's
    defaults, so that ``model_kwargs`` stays short)."""
    v = VARIANTS[variant]
    wanted = {
        "num_queries": config.num_queries,
        "decoder_layers": config.decoder_layers,
        "encoder_hidden_dim": config.encoder_hidden_dim,
        "encoder_ffn_dim": config.encoder_ffn_dim,
        "hidden_expansion": float(config.hidden_expansion),
        "d_model": config.d_model,
        "decoder_ffn_dim": config.decoder_ffn_dim,
        "num_heads": config.decoder_attention_heads,
        "encoder_heads": config.encoder_attention_heads,
        "decoder_points": config.decoder_n_points,
        "aifi_layers": config.encoder_layers,
        "activation": config.activation_function,
        "encoder_activation": config.encoder_activation_function,
        "decoder_activation": config.decoder_activation_function,
        "layer_norm_eps": float(config.layer_norm_eps),
        "batch_norm_eps": float(config.batch_norm_eps),
        "positional_temperature": float(config.positional_encoding_temperature),
        "denoising": denoising,
    }
    defaults = {"num_queries": 300, "decoder_layers": v["decoder_layers"],
                "encoder_hidden_dim": v["encoder_hidden_dim"], "encoder_ffn_dim": v["encoder_ffn_dim"],
                "hidden_expansion": v["hidden_expansion"], "d_model": 256, "decoder_ffn_dim": 1024,
                "num_heads": 8, "encoder_heads": 8, "decoder_points": 4, "aifi_layers": 1,
                "activation": "silu", "encoder_activation": "gelu", "decoder_activation": "relu",
                "layer_norm_eps": 1e-5, "batch_norm_eps": 1e-5, "positional_temperature": 10000.0,
                "denoising": True}
    kwargs = {k: val for k, val in wanted.items() if val != defaults[k]}
    return {"num_classes": num_classes, **kwargs}


def _translate(key: str, model: AnyDepthRTDETR) -> str:
    """Our name (main norm set) for an HF key."""
    m = re.match(r"^model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)$", key)
    if m:
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        stage = getattr(model.backbone, f"stage{i + 1}")
        ess = len(stage.essential)
        where = f"essential.blocks.{j}" if j < ess else f"refinement.blocks.{j - ess}"
        rest = re.sub(r"^layer\.(\d+)\.", lambda mm: f"conv{int(mm.group(1)) + 1}.", rest)
        rest = re.sub(r"^shortcut\.(1\.)?", "shortcut.conv.", rest)
        rest = rest.replace("convolution.", "conv.").replace("normalization.", "bn.")
        return f"backbone.stage{i + 1}.{where}.{rest}"
    for pattern, repl in _PREFIX_RULES:
        if re.match(pattern, key):
            key = re.sub(pattern, repl, key)
            break
    else:
        return key  # not ours: reported as unmapped
    key = key.replace("convolution.", "conv.").replace("normalization.", "bn.")
    key = re.sub(r"\.norm\.", ".bn.", key)
    key = re.sub(r"(fpn_blocks|pan_blocks)\.(\d+)\.bottlenecks\.(\d+)\.",
                 lambda mm: (f"{mm.group(1)}.{mm.group(2)}.bottlenecks."
                             + ("essential.blocks.0." if mm.group(3) == "0"
                                else f"refinement.blocks.{int(mm.group(3)) - 1}.")),
                 key)
    return key


def _targets(ours: str, own: Mapping[str, torch.Tensor]) -> Tuple[str, ...]:
    """Our keys receiving one HF tensor: the plain key, or both sets of a skip-aware norm."""
    if ours in own:
        return (ours,)
    head, _, leaf = ours.rpartition(".")
    for norm, skip_name in ((".bn", ("bn", "bn_skip")), ("_norm", ("ln", "ln_skip"))):
        if head.endswith(norm):
            keys = tuple(f"{head}.{s}.{leaf}" for s in skip_name)
            if all(k in own for k in keys):
                return keys
    return ()


def _state_and_config(model_or_state_dict, config):
    if isinstance(model_or_state_dict, nn.Module):
        if config is None:
            config = getattr(model_or_state_dict, "config", None)
        if type(model_or_state_dict).__name__ != "RTDetrForObjectDetection":
            raise TypeError(f"expected a transformers RTDetrForObjectDetection, got "
                            f"{type(model_or_state_dict).__name__}")
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = dict(model_or_state_dict)
    else:
        raise TypeError("from_transformers takes an RTDetrForObjectDetection or its state dict, got "
                        f"{type(model_or_state_dict).__name__}")
    if config is None:
        raise ValueError("from_transformers: a state dict needs its RTDetrConfig (config=...)")
    if isinstance(config, Mapping):
        config = require("transformers", "from_transformers").RTDetrConfig(**config)
    if getattr(config, "model_type", None) != "rt_detr":
        raise ValueError(f"expected an RTDetrConfig (model_type 'rt_detr'), got {type(config).__name__}")
    return state, config


@torch.no_grad()
def from_transformers(model_or_state_dict, config=None, num_classes: Optional[int] = None) -> AnyDepthRTDETR:
    """Convert an HF ``RTDetrForObjectDetection`` (or its state dict plus ``config``, an
    ``RTDetrConfig`` or its dict) to ``rtdetr-<variant>-anydepth`` (eval mode).

    The variant comes from the backbone config (layer type, depths, hidden sizes); decoder layers,
    query count, widths and the other computation-relevant fields are carried over as model
    options and recorded in ``model.model_kwargs``, so :func:`anydepth.checkpoint.save`/``load``
    rebuild it. ``num_classes``, if given, must match the checkpoint's class head. Raises
    ``ValueError`` for an unsupported config or any weight that does not map.
    """
    state, config = _state_and_config(model_or_state_dict, config)
    variant = _variant_of(config)
    _check_supported(config, variant)
    head = state.get("model.enc_score_head.weight")
    if head is None:
        raise ValueError("the state dict has no 'model.enc_score_head.weight': not an RTDetrForObjectDetection")
    ckpt_classes = int(head.shape[0])
    if num_classes is not None and num_classes != ckpt_classes:
        raise ValueError(f"num_classes={num_classes} but the checkpoint's class heads have {ckpt_classes} classes")
    denoising = "model.denoising_class_embed.weight" in state
    kwargs = _model_kwargs(config, variant, ckpt_classes, denoising)
    name = f"rtdetr-{variant}-anydepth"
    model = AnyDepthRTDETR(variant, **kwargs)
    own = model.state_dict()
    filled = set()
    unmapped, mismatched = [], []
    for key, value in state.items():
        targets = _targets(_translate(key, model), own)
        if not targets:
            unmapped.append(key)
            continue
        for t in targets:
            if own[t].shape != value.shape:
                mismatched.append(f"{key} {tuple(value.shape)} -> {t} {tuple(own[t].shape)}")
                continue
            own[t].copy_(value)
            filled.add(t)
    # HF's frozen backbone BatchNorms carry no num_batches_tracked: that counter is all we may lack
    missing = [k for k in own if k not in filled and not k.endswith("num_batches_tracked")]
    if unmapped or mismatched or missing:
        def show(xs):
            return f"{xs[:6]}{' ...' if len(xs) > 6 else ''} ({len(xs)})"

        raise ValueError("from_transformers: weights do not map onto " + name + ": "
                         + "; ".join(f"{what} {show(xs)}" for what, xs in
                                     (("unmapped HF keys", unmapped), ("shape mismatches", mismatched),
                                      ("missing weights", missing)) if xs))
    model.model_name = name
    model.model_kwargs = kwargs
    return model.eval()


def hf_config_for(model_name: str, num_classes: int = 80, **overrides):
    """An offline ``RTDetrConfig`` of the official variant ``model_name`` (``"rtdetr-r50-anydepth"``
    or ``"r50"``); ``overrides`` are extra ``RTDetrConfig`` fields."""
    transformers = require("transformers", "an RT-DETR configuration of HuggingFace transformers")
    RTDetrConfig, RTDetrResNetConfig = transformers.RTDetrConfig, transformers.RTDetrResNetConfig

    variant = model_name.removeprefix("rtdetr-").removesuffix("-anydepth")
    if variant not in VARIANTS:
        raise ValueError(f"unknown RT-DETR variant {model_name!r}; valid: "
                         f"{[f'rtdetr-{v}-anydepth' for v in VARIANTS]}")
    v = VARIANTS[variant]
    backbone = RTDetrResNetConfig(depths=list(v["depths"]), layer_type=v["layer_type"],
                                  hidden_sizes=list(v["hidden_sizes"]), out_indices=[2, 3, 4])
    fields = dict(use_pretrained_backbone=False, backbone_config=backbone,
                  encoder_in_channels=list(v["hidden_sizes"][1:]), hidden_expansion=v["hidden_expansion"],
                  decoder_layers=v["decoder_layers"], encoder_hidden_dim=v["encoder_hidden_dim"],
                  encoder_ffn_dim=v["encoder_ffn_dim"], decoder_in_channels=[v["encoder_hidden_dim"]] * 3,
                  num_labels=num_classes)
    fields.update(overrides)
    try:
        return RTDetrConfig(**fields)
    except TypeError:  # older transformers without use_pretrained_backbone
        fields.pop("use_pretrained_backbone")
        return RTDetrConfig(**fields)


@torch.no_grad()
def randomize_uniform_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every weight, bias, norm affine and BatchNorm statistic random non-trivial values
    (seeded uniform draws, scaled so activations stay in range), in place; any module tree, no
    calibration pass (HF's RT-DETR peer and our conversion of it). Not
    :func:`anydepth.testing.randomize_`, which calibrates BatchNorm statistics on a batch."""
    g = torch.Generator().manual_seed(seed)

    def rand(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64).mul(hi - lo).add(lo).to(t.dtype))

    for m in model.modules():
        names = {n for n, _ in m.named_parameters(recurse=False)} | {n for n, _ in m.named_buffers(recurse=False)}
        if {"running_mean", "running_var", "weight", "bias"} <= names:  # BatchNorm or frozen BN
            rand(m.weight, 0.5, 1.5)
            rand(m.bias, -0.2, 0.2)
            rand(m.running_mean, -0.2, 0.2)
            rand(m.running_var, 0.5, 1.5)
        elif isinstance(m, nn.LayerNorm):
            rand(m.weight, 0.5, 1.5)
            rand(m.bias, -0.2, 0.2)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            bound = (3.0 / fan_in) ** 0.5  # unit gain: std 1/sqrt(fan_in)
            rand(m.weight, -bound, bound)
            if m.bias is not None:
                rand(m.bias, -0.2, 0.2)
        elif isinstance(m, nn.Embedding):
            rand(m.weight, -1.0, 1.0)
    return model


def build_peer(model_name: str, num_classes: int = 80, seed: int = 0, **config_overrides):
    """``(hf_model.eval(), anydepth_model.eval())``: HF's ``RTDetrForObjectDetection`` for the
    variant, built offline with random non-trivial weights and BatchNorm statistics (seeded), and
    our conversion of it. ``config_overrides`` are extra ``RTDetrConfig`` fields (e.g.
    ``num_queries``)."""
    RTDetrForObjectDetection = require("transformers", "building the HF RT-DETR peer").RTDetrForObjectDetection

    config = hf_config_for(model_name, num_classes, **config_overrides)
    torch.manual_seed(seed)
    hf = RTDetrForObjectDetection(config)
    randomize_uniform_(hf, seed)
    hf.eval()
    return hf, from_transformers(hf)
