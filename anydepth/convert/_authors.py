"""The authors' released any-depth checkpoints (YOLOv12, RT-DETR) -> our models (``split="official"``).

Source: ``HyungseopLee/Dynamic-Routing-AnyDepthYOLO`` (arXiv 2605.09407), folder
``anydepth-yolov12/``, an Ultralytics fork (AGPL; none of its code is used or copied here: this
module reads tensors by name and shape only).

YOLOv12: what their code builds and how it maps onto :class:`~anydepth.models.yolov12.AnyDepthYOLOv12`
with ``split="official"`` (switch order = their ``skip`` list order, layers 2, 4, 6, 8, 11, 14, 17, 20):

=========================================  =================================================
theirs                                     ours (``split="official"``)
=========================================  =================================================
``SwitchableC3k2`` (layers 2, 4, 20)       C3k2: every inner block runs at every depth with
                                           its shallow-path norms; a C3k block (m/l/x, and
                                           layer 20) is their ``SkippableC3k``: bottleneck 2 of
                                           its chain is skipped; output conv reads everything
``SkippableA2C2f`` (6, 8, 11, 14, 17)      A2C2f: ``(n + 1) // 2`` essential blocks for
                                           ``n >= 2``, all ``n`` for ``n == 1`` (not skippable:
                                           only the norms switch); ``n >= 4``: the shallow path
                                           has its own output conv (their ``cv2.conv_skip``),
                                           else it reads the first input channels of ``cv2``
                                           (their ``base_n_channels``)
``SwitchableConv`` stride-2 convs          skip-aware stride-2 convs 3, 5, 7, 15, 18, taking the
(3, 5, 7, 15, 18)                          flag of the module they feed (their
                                           ``_predict_once`` passes the next module's flag)
``residual=True`` for every A2C2f          ``gamma`` layer scale on every attention A2C2f
``mlp_ratio=1.5`` for l/x (2.0 else)       same (upstream YOLO12 uses 1.2)
``AAttn``: ``qk`` + ``v`` 1x1 convs,       one ``qkv`` conv (rows interleaved per head:
``pe`` 5x5 depthwise                       ``[q_h, k_h, v_h]``), ``pe`` 5x5 (``pe_kernel=5``)
``bn`` / ``bn_skip`` of each conv          ``bn.bn`` / ``bn.bn_skip`` (``SkipAwareBatchNorm2d``)
=========================================  =================================================

A stride-2 conv that is a plain ``Conv`` in a checkpoint (no ``bn_skip``) gets its one norm in both
sets: it then behaves as their plain conv at every depth.

Two things cannot be read in their public repository and were reconstructed from how their code
uses them (the converter accepts both plausible layouts where they differ): ``SwitchableConv``
(``nn/modules/conv.py``: a conv with ``bn`` and ``bn_skip``; a ``base_n_channels`` input slice;
an optional ``conv_skip``, stored either as a bare ``Conv2d`` followed by ``bn_skip`` or as a
``Conv`` with its own ``bn``) and the released YAML (``yolo-ad-v12s-orig.yaml``): the scale is
inferred from the tensors' shapes, so any depth/width/max-channel multipliers load.

Their ``.pt`` files pickle whole model objects of their fork, which ``torch.load(weights_only=True)``
refuses. :func:`from_authors_yolo` then reads them with :func:`read_pickled_checkpoint`, a
restricted unpickler: every class the pickle names becomes an inert stand-in and only torch's
tensor rebuilders run (the ones ``weights_only=True`` runs), so no code from the file executes.
Or extract the weights once where their code is installed::

    python -c "import torch; c = torch.load('yolo-ad.pt', weights_only=False); \\
    torch.save((c.get('ema') or c['model']).float().state_dict(), 'yolo-ad_sd.pt')"

and pass ``yolo-ad_sd.pt`` (or the state dict itself).

RT-DETR (:func:`from_authors_rtdetr`): folder ``anydepth-rt-detr/`` (an RT-DETR fork, upstream
Apache-2.0), whose backbone ``ResNet_ADN`` and ``depth``-taking decoder are read from
``anydepth-detr/`` of the same repository (``anydepth-rt-detr/`` lacks both files). It maps onto
:class:`~anydepth.models.rtdetr.AnyDepthRTDETR` with ``split="official"`` (R50/R101): their 7x7
stem, their one-norm projection shortcuts; backbone split, encoder split (1 of 3 RepVGG blocks
essential), skip-aware norms and decoder depth are ours. Keys: ``backbone.conv1/bn1`` -> the stem,
``backbone.layer{s}.{j}.conv{k}/bn{k}/bn{k}_skip`` -> ``backbone.stage{s}.essential|refinement``,
``downsample.{conv,norm}`` -> ``shortcut.conv``, ``norm``/``norm_skippable`` -> ``bn.bn``/``bn.bn_skip``
(``ln``/``ln_skip`` for the AIFI LayerNorms), the packed ``nn.MultiheadAttention`` ``in_proj`` ->
``q_proj``/``k_proj``/``v_proj``, ``decoder.decoder.layers`` -> ``decoder.layers``,
``dec_score_head``/``dec_bbox_head`` -> ``class_embed``/``bbox_embed``.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Tuple

import torch

from ..models.rtdetr import VARIANTS, AnyDepthRTDETR
from ..models.yolov12 import SCALES, AnyDepthYOLOv12

EXTRACT_HINT = (
    "The authors' .pt files pickle model objects of their Ultralytics fork and do not load with "
    "weights_only=True. Where their code is installed, extract the weights once:\n"
    "  python -c \"import torch; c = torch.load('IN.pt', weights_only=False); "
    "torch.save((c.get('ema') or c['model']).float().state_dict(), 'OUT.pt')\"\n"
    "then pass OUT.pt (or that state dict).")


# ------------------------------------------------------------------- restricted unpickling
class _Inert:
    """What every class or function a pickle names becomes (except the tensor rebuilders): it
    records its arguments and state and runs nothing."""

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __call__(self, *args, **kwargs):
        return _Inert(*args)


def _inert_class(module: str, name: str):
    return type(name, (_Inert,), {"__module__": f"inert.{module}"})


#: the only callables a restricted load may run: those torch's own weights_only loader runs to
#: rebuild tensors, plus OrderedDict and set (nn.Module keeps its non-persistent buffer names in one)
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
}


def _restricted_pickle_module():
    import pickle
    import types

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            module = {"__builtin__": "builtins"}.get(module, module)  # protocol-2 names
            if (module, name) in _ALLOWED:
                return super().find_class(module, name)
            if module == "torch" and (name.endswith("Storage") or name in ("Size", "device")):
                return super().find_class(module, name)  # storage types (dtype tags), shapes, devices
            return _inert_class(module, name)

    mod = types.ModuleType("anydepth_restricted_pickle")
    mod.Unpickler = Unpickler
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()
    mod.__name__ = "anydepth_restricted_pickle"
    return mod


def _module_state(obj, prefix: str, out: Dict[str, torch.Tensor], depth: int = 0) -> None:
    """state_dict() of an inert copy of a pickled ``nn.Module`` tree (parameters, persistent buffers)."""
    if depth > 64:
        raise ValueError("module tree nested more than 64 levels deep")
    d = getattr(obj, "__dict__", {})
    if not isinstance(d, Mapping):
        return
    names = d.get("_non_persistent_buffers_set")
    skip = set(names) if isinstance(names, (set, frozenset)) else set()

    def items(group):
        g = d.get(group)
        return [(k, v) for k, v in g.items() if isinstance(k, str)] if isinstance(g, Mapping) else []

    for group in ("_parameters", "_buffers"):
        for k, v in items(group):
            if isinstance(v, torch.Tensor) and not (group == "_buffers" and k in skip):
                out[prefix + k] = v.detach()
    for k, child in items("_modules"):
        if isinstance(child, _Inert):
            _module_state(child, f"{prefix}{k}.", out, depth + 1)


def read_pickled_checkpoint(path) -> Dict[str, torch.Tensor]:
    """The state dict of a model pickled whole in a ``.pt`` file (an Ultralytics-style checkpoint:
    ``{"model": ..., "ema": ...}``), read WITHOUT running code from the file.

    A restricted unpickler: every class or function the pickle names becomes an inert stand-in
    that only stores what it is given, except the tensor rebuild functions that
    ``torch.load(weights_only=True)`` itself runs; the tensors of the pickled module tree are then
    collected by attribute name (``_parameters``, ``_buffers``, ``_modules``), as
    ``state_dict()`` would name them. ``ema`` is preferred over ``model``; half tensors become
    float32.
    """
    path = os.fspath(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module())
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(ckpt, Mapping):
        for key in ("ema", "model"):  # a dict of state dicts (RT-DETR's solver: {"ema": {"module": sd}})
            inner = ckpt.get(key)
            if isinstance(inner, Mapping) and isinstance(inner.get("module"), Mapping):
                inner = inner["module"]
            if isinstance(inner, Mapping) and inner and all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in inner.items()):
                return {k: (v.float() if v.is_floating_point() else v) for k, v in inner.items()}
        obj = ckpt.get("ema") if isinstance(ckpt.get("ema"), _Inert) else ckpt.get("model")
    else:
        obj = ckpt
    if not isinstance(obj, _Inert) or "_modules" not in obj.__dict__:
        raise ValueError(f"{path!r} holds no pickled model under 'ema' or 'model'")
    out: Dict[str, torch.Tensor] = {}
    _module_state(obj, "", out)
    if not out:
        raise ValueError(f"{path!r}: the pickled model holds no tensors")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in out.items()}


def _state_dict(obj, what: str, restricted_unpickle: bool = True) -> Dict[str, torch.Tensor]:
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no file at {path!r}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if not restricted_unpickle:
                raise ValueError(f"{path!r} does not load with torch.load(weights_only=True) "
                                 f"({type(e).__name__}). {EXTRACT_HINT}") from e
            try:
                return read_pickled_checkpoint(path)
            except ValueError as e2:
                raise ValueError(f"{path!r} does not load with torch.load(weights_only=True) "
                                 f"({type(e).__name__}), nor as a pickled model ({e2}). {EXTRACT_HINT}") from e
    if isinstance(obj, torch.nn.Module):
        return {k: v.detach() for k, v in obj.state_dict().items()}
    if isinstance(obj, Mapping):
        for key in ("ema", "model", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and isinstance(inner.get("module"), Mapping):
                inner = inner["module"]  # an RT-DETR solver checkpoint: {"ema": {"module": sd, "updates": n}}
            if isinstance(inner, torch.nn.Module):
                return {k: v.detach() for k, v in inner.state_dict().items()}
            if isinstance(inner, Mapping):
                obj = inner
                break
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"expected a state dict of tensors for {what}; {bad[:3]} are not tensors")
        return dict(obj)
    raise TypeError(f"expected {what} as a state dict, a weights_only file path or a module, "
                    f"got {type(obj).__name__}")


# ------------------------------------------------------------------------------------------ YOLO
def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def infer_yolo_config(sd: Mapping[str, torch.Tensor]) -> Tuple[str, Optional[Tuple[float, float, int]], int]:
    """``(scale, multipliers or None, num_classes)`` of an authors' any-depth YOLOv12 state dict,
    from tensor shapes alone. ``ValueError`` naming the problem if it is not one."""
    need = {
        "model.0.conv.weight": "a YOLO12 state dict (stem conv)",
        "model.21.cv3.0.2.weight": "a detection head (class branch of layer 21)",
        "model.6.cv1.bn_skip.weight": "an any-depth checkpoint (shallow-path norms 'bn_skip')",
    }
    for key, meaning in need.items():
        if key not in sd:
            hint = ("; a plain Ultralytics YOLO12 loads with anydepth.convert.from_ultralytics"
                    if "bn_skip" in key else "")
            raise ValueError(f"not {meaning}: no {key!r}{hint}")
    if "model.6.m.0.0.attn.qk.conv.weight" not in sd:
        form = "qkv" if "model.6.m.0.0.attn.qkv.conv.weight" in sd else "unknown"
        raise ValueError(f"area attention of layer 6 is in the {form!r} form; the authors' released "
                         "models have separate 'attn.qk' and 'attn.v' convs (YOLOv12 v1.0)")
    stem = int(sd["model.0.conv.weight"].shape[0])
    w = stem / 64
    out8 = int(sd["model.8.cv2.conv.weight"].shape[0])
    mc = 1024 if round(out8 / w) >= 1024 else int(round(out8 / w))
    n6 = _count(sd, "model.6.m.")
    if n6 < 1:
        raise ValueError("layer 6 (A2C2f) has no inner blocks in this state dict")
    d = n6 / 4
    c3k = "model.2.m.0.cv3.conv.weight" in sd
    hidden = int(sd["model.6.cv1.conv.weight"].shape[0])
    mlp = int(sd["model.6.m.0.0.mlp.0.conv.weight"].shape[0]) / hidden
    if not c3k:
        scale = "n" if w <= 0.25 else "s"
    elif abs(mlp - 2.0) < 1e-6:
        scale = "m"
    elif abs(mlp - 1.5) < 1e-6:
        scale = "l" if w <= 1.0 else "x"
    else:
        raise ValueError(f"layer 6's MLP ratio is {mlp:g}; the authors' models use 2.0 (n/s/m) or 1.5 (l/x)")
    mult = (d, w, mc)
    nc = int(sd["model.21.cv3.0.2.weight"].shape[0])
    ref = SCALES[scale]
    same = abs(ref[0] - d) < 1e-9 and abs(ref[1] - w) < 1e-9 and ref[2] == mc
    return scale, (None if same else mult), nc


def _qkv_index(channels: int, head_dim: int = 32) -> torch.Tensor:
    """Our qkv row ``h*3hd + j*hd + d`` <- row ``j*C + h*hd + d`` of their ``cat(qk, v)``."""
    heads = channels // head_dim
    h = torch.arange(heads).view(heads, 1, 1)
    j = torch.arange(3).view(1, 3, 1)
    d = torch.arange(head_dim).view(1, 1, head_dim)
    return (j * channels + h * head_dim + d).reshape(-1)


def from_authors_yolo(state_dict_or_path, restricted_unpickle: bool = True) -> AnyDepthYOLOv12:
    """An authors' AnyDepth-YOLOv12 checkpoint -> ``yolov12{n,s,m,l,x}-anydepth`` built with
    ``split="official"``, giving their outputs at every one of the 256 depth configurations.

    Accepts their model's ``state_dict()`` (keys ``model.{i}...``), a ``weights_only``-loadable
    file holding it, their released ``.pt`` itself (it pickles model objects: read by
    :func:`read_pickled_checkpoint`, a restricted unpickler that runs no code from the file;
    ``restricted_unpickle=False`` refuses such files and names the one-line extraction instead), or
    their model object. Scale, multipliers and class count are read from tensor shapes. Every
    weight is used exactly once (a missing, extra or mis-shaped tensor raises ``ValueError``
    naming it). Returned in eval mode.
    """
    sd = _state_dict(state_dict_or_path, "an authors' AnyDepth-YOLOv12 checkpoint", restricted_unpickle)
    scale, mult, nc = infer_yolo_config(sd)
    model = AnyDepthYOLOv12(scale, nc, split="official", multipliers=mult)
    target = model.state_dict()
    new: Dict[str, torch.Tensor] = {}
    used = set()

    def take(key: str, ours: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"the checkpoint has no {key!r} (needed for {ours!r}); "
                             f"is it an authors' AnyDepth-YOLOv12-{scale}?")
        used.add(key)
        return sd[key]

    for key, ref in target.items():
        src = "model." + key[len("layers."):]
        m = re.match(r"(.*\.attn)\.qkv\.(.*)$", src)
        if m:  # their qk + v -> our qkv, rows interleaved per head
            base, rest = m.groups()
            rest = rest.replace("bn.bn.", "bn.").replace("bn.bn_skip.", "bn_skip.")
            qk, v = take(f"{base}.qk.{rest}", key), take(f"{base}.v.{rest}", key)
            if qk.dim() == 0:  # num_batches_tracked
                t = qk
            else:
                t = torch.cat((qk, v), 0)[_qkv_index(v.shape[0])]
        elif ".conv_skip." in src:  # separate shallow output conv of a 4-block A2C2f
            head, _, rest = src.partition(".conv_skip.")
            bare = f"{head}.cv2.conv_skip.weight" in sd
            if rest == "conv.weight":
                t = take(f"{head}.cv2.conv_skip.weight" if bare else f"{head}.cv2.conv_skip.conv.weight", key)
            else:  # conv_skip.bn.X: their bn_skip follows a bare conv_skip
                t = take(f"{head}.cv2.bn_skip.{rest[3:]}" if bare else f"{head}.cv2.conv_skip.{rest}", key)
        elif ".bn.bn_skip." in src:
            k = src.replace(".bn.bn_skip.", ".bn_skip.")
            module = src.split(".bn.bn_skip.")[0]
            if k not in sd and f"{module}.bn.weight" in sd and not any(
                    x.startswith(f"{module}.bn_skip.") for x in sd):
                k = src.replace(".bn.bn_skip.", ".bn.")  # a plain conv there: one norm for both depths
            t = take(k, key)
        else:
            t = take(src.replace(".bn.bn.", ".bn."), key)
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"shape mismatch for {key!r}: the checkpoint has {tuple(t.shape)}, "
                             f"yolov12{scale}-anydepth (split='official', multipliers={model.multipliers}) "
                             f"expects {tuple(ref.shape)}")
        new[key] = t.to(ref.dtype).clone()
    ignorable = re.compile(r"model\.21\.dfl\.conv\.weight$")
    unused = [k for k in sd if k not in used and not ignorable.match(k)]
    if unused:
        raise ValueError(f"checkpoint tensors with no place in yolov12{scale}-anydepth (split='official'): "
                         f"{unused[:8]}{'...' if len(unused) > 8 else ''}")
    model.load_state_dict(new, strict=True)
    model.model_name = f"yolov12{scale}-anydepth"
    model.model_kwargs = {"num_classes": nc, "split": "official",
                          **({"multipliers": list(mult)} if mult is not None else {})}
    return model.eval()


# --------------------------------------------------------------------------------------- RT-DETR
#: backbone stage depths of their ``ResNet_ADN`` (``resnet_adn.py``: ResNet-50 and -101 only)
_ADN_DEPTHS = {(3, 4, 6, 3): "r50", (3, 4, 23, 3): "r101"}


def infer_rtdetr_config(sd: Mapping[str, torch.Tensor]) -> Tuple[str, Dict[str, object]]:
    """``(variant, model options)`` of an authors' AnyDepth-RT-DETR state dict, from tensor shapes
    alone (options off :class:`~anydepth.models.rtdetr.AnyDepthRTDETR`'s defaults only, plus
    ``num_classes`` and ``split="official"``). ``ValueError`` naming the problem if it is not one.
    The query count and the attention head counts are not in a state dict: see
    :func:`from_authors_rtdetr`."""
    if "backbone.conv1.weight" not in sd:
        hint = (": a PResNet (ResNet-vd) backbone, i.e. their static baseline or an upstream RT-DETR"
                if any(k.startswith("backbone.conv1.conv1_1.") for k in sd) else "")
        raise ValueError(f"not an authors' AnyDepth-RT-DETR state dict: no 'backbone.conv1.weight' (the 7x7 "
                         f"stem of their ResNet_ADN){hint}")
    if tuple(sd["backbone.conv1.weight"].shape) != (64, 3, 7, 7):
        raise ValueError(f"backbone.conv1.weight has shape {tuple(sd['backbone.conv1.weight'].shape)}; their "
                         "ResNet_ADN stem is (64, 3, 7, 7)")
    if "backbone.layer1.0.bn1_skip.weight" not in sd:
        raise ValueError("not an any-depth checkpoint: no shallow-path norm 'backbone.layer1.0.bn1_skip.weight'")
    for key in ("encoder.input_proj.0.conv.weight", "decoder.enc_score_head.weight",
                "encoder.input_proj.0.norm_skippable.weight"):
        if key not in sd:
            raise ValueError(f"not an authors' AnyDepth-RT-DETR state dict (HybridEncoderADN + RTDETRTransformer): "
                             f"no {key!r}")
    depths = tuple(_count(sd, f"backbone.layer{i}.") for i in range(1, 5))
    if depths not in _ADN_DEPTHS:
        raise ValueError(f"backbone stages of {list(depths)} blocks; their ResNet_ADN has [3, 4, 6, 3] (R50) or "
                         "[3, 4, 23, 3] (R101)")
    variant = _ADN_DEPTHS[depths]
    if sd.get("backbone.layer2.0.downsample.0.weight") is not None:
        raise ValueError("backbone.layer2.0.downsample.0 is a strided 1x1 conv (their ResNet_ADN variant 'a'); "
                         "only variant 'd' (avg-pool + 1x1 conv, their rtdetr_r50vd_adn.yml) is supported")
    if _count(sd, "encoder.encoder.") != 1:
        raise ValueError(f"{_count(sd, 'encoder.encoder.')} transformer encoders (use_encoder_idx); "
                         "only one, on the stride-32 map, is supported")
    if _count(sd, "encoder.input_proj.") != 3 or _count(sd, "decoder.input_proj.") != 3:
        raise ValueError("only 3 feature levels (strides 8, 16, 32) are supported")
    if "decoder.tgt_embed.weight" in sd:
        raise ValueError("learnt_init_query (decoder.tgt_embed) is not supported")
    for block in ("fpn_blocks", "pan_blocks"):
        n = _count(sd, f"encoder.{block}.0.bottlenecks.")
        if n != 3:
            raise ValueError(f"encoder.{block} CSP blocks of {n} RepVGG blocks; only 3 (depth_mult 1) are supported")
    if any(k.startswith("encoder.fpn_blocks.0.conv3.") for k in sd):
        raise ValueError("encoder CSP blocks with an output conv (expansion != 1) are not supported")
    hidden = int(sd["encoder.input_proj.0.conv.weight"].shape[0])
    d_model = int(sd["decoder.input_proj.0.conv.weight"].shape[0])
    layers = _count(sd, "decoder.decoder.layers.")
    v = VARIANTS[variant]
    found = {
        "encoder_hidden_dim": hidden,
        "encoder_ffn_dim": int(sd["encoder.encoder.0.layers.0.linear1.weight"].shape[0]),
        "aifi_layers": _count(sd, "encoder.encoder.0.layers."),
        "hidden_expansion": int(sd["encoder.fpn_blocks.0.conv1.conv.weight"].shape[0]) / hidden,
        "d_model": d_model,
        "decoder_ffn_dim": int(sd["decoder.decoder.layers.0.linear1.weight"].shape[0]),
        "decoder_layers": layers,
        "denoising": "decoder.denoising_class_embed.weight" in sd,
    }
    defaults = {"encoder_hidden_dim": v["encoder_hidden_dim"], "encoder_ffn_dim": v["encoder_ffn_dim"],
                "aifi_layers": 1, "hidden_expansion": 1.0, "d_model": 256, "decoder_ffn_dim": 1024,
                "decoder_layers": v["decoder_layers"], "denoising": True}
    opts: Dict[str, object] = {"num_classes": int(sd["decoder.enc_score_head.weight"].shape[0]), "split": "official"}
    opts.update({k: val for k, val in found.items() if val != defaults[k]})
    return variant, opts


def _rtdetr_source(ours: str, essential: Mapping[int, int]) -> Tuple[str, Optional[int]]:
    """Their key for our key ``ours`` of ``split="official"``, and which third of a packed
    attention input projection (``in_proj_weight`` rows ``[q; k; v]``) it is, or ``None``.
    ``essential``: stage -> essential blocks."""
    m = re.match(r"backbone\.stem\.0\.(conv|bn)\.(.*)$", ours)
    if m:
        return ("backbone.conv1." if m.group(1) == "conv" else "backbone.bn1.") + m.group(2), None
    m = re.match(r"backbone\.stage(\d)\.(essential|refinement)\.blocks\.(\d+)\.(.*)$", ours)
    if m:
        s, path, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        block = j if path == "essential" else essential[s] + j
        head = f"backbone.layer{s}.{block}."
        m2 = re.match(r"shortcut\.conv\.(conv|bn)\.(.*)$", rest)
        if m2:  # their downsample: [AvgPool2d,] conv1x1, norm (the pool only where the stride is 2)
            i = (0 if s == 1 else 1) + (m2.group(1) == "bn")
            return f"{head}downsample.{i}.{m2.group(2)}", None
        m2 = re.match(r"conv(\d)\.(conv|bn)\.(bn_skip\.|bn\.)?(.*)$", rest)
        if m2:
            k, part, norm, leaf = m2.groups()
            if part == "conv":
                return f"{head}conv{k}.{leaf}", None
            return f"{head}bn{k}{'_skip' if norm == 'bn_skip.' else ''}.{leaf}", None
        return ours, None
    m = re.match(r"encoder\.aifi\.(\d+)\.(.*)$", ours)
    if m:
        head, rest = f"encoder.encoder.0.layers.{m.group(1)}.", m.group(2)
        return _attention_source(head, rest, {"self_attn_layer_norm.ln.": "norm1.",
                                              "self_attn_layer_norm.ln_skip.": "norm1_skippable.",
                                              "final_layer_norm.ln.": "norm2.",
                                              "final_layer_norm.ln_skip.": "norm2_skippable.",
                                              "mlp.fc1.": "linear1.", "mlp.fc2.": "linear2."})
    if ours.startswith("encoder."):
        key = re.sub(r"bottlenecks\.essential\.blocks\.(\d+)\.", lambda mm: f"bottlenecks.{mm.group(1)}.", ours)
        key = re.sub(r"bottlenecks\.refinement\.blocks\.(\d+)\.",
                     lambda mm: f"bottlenecks.{1 + int(mm.group(1))}.", key)  # their 1 essential block
        key = key.replace(".bn.bn_skip.", ".norm_skippable.").replace(".bn.bn.", ".norm.")
        return key.replace(".bn.", ".norm."), None
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)$", ours)
    if m:
        head, rest = f"decoder.decoder.layers.{m.group(1)}.", m.group(2)
        return _attention_source(head, rest, {"self_attn_layer_norm.": "norm1.", "encoder_attn_layer_norm.": "norm2.",
                                              "final_layer_norm.": "norm3.", "encoder_attn.": "cross_attn.",
                                              "mlp.fc1.": "linear1.", "mlp.fc2.": "linear2."})
    for a, b in (("decoder.enc_output_norm.", "decoder.enc_output.1."),
                 ("decoder.enc_output.", "decoder.enc_output.0."),
                 ("decoder.class_embed.", "decoder.dec_score_head."),
                 ("decoder.bbox_embed.", "decoder.dec_bbox_head.")):
        if ours.startswith(a):
            return b + ours[len(a):], None
    if ours.startswith("decoder.input_proj."):
        return ours.replace(".bn.", ".norm."), None
    return ours, None


def _attention_source(head: str, rest: str, renames: Mapping[str, str]) -> Tuple[str, Optional[int]]:
    m = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
    if m:  # nn.MultiheadAttention: one in_proj [q; k; v]
        return f"{head}self_attn.in_proj_{m.group(2)}", "qkv".index(m.group(1))
    if rest.startswith("self_attn.o_proj."):
        return f"{head}self_attn.out_proj.{rest[len('self_attn.o_proj.'):]}", None
    for a, b in renames.items():
        if rest.startswith(a):
            return head + b + rest[len(a):], None
    return head + rest, None


def from_authors_rtdetr(state_dict_or_path, num_queries: int = 300, encoder_heads: int = 8, num_heads: int = 8,
                        restricted_unpickle: bool = True) -> AnyDepthRTDETR:
    """An authors' AnyDepth-RT-DETR checkpoint -> ``rtdetr-r{50,101}-anydepth`` built with
    ``split="official"``, giving their outputs at every depth their code runs (4 backbone skips x
    encoder skip x decoder depth ``1..L``).

    Accepts their model's ``state_dict()`` (keys ``backbone.layer{s}...``, ``encoder...``,
    ``decoder...``), their training checkpoint (``{"ema": {"module": sd}, "model": sd, ...}``: the
    EMA weights are taken), a file holding either (``weights_only``, or else read by the restricted
    unpickler of :func:`read_pickled_checkpoint`), or their model object. Variant, widths, layer
    counts and class count are read from tensor shapes; what a state dict does not hold is given
    here: ``num_queries`` (their configs: 300), ``encoder_heads`` and ``num_heads`` (8). Every
    tensor is used exactly once (a missing, extra or mis-shaped one raises ``ValueError`` naming
    it); their frozen backbone norms carry no ``num_batches_tracked`` (ours start at 0). Returned in
    eval mode.
    """
    sd = _state_dict(state_dict_or_path, "an authors' AnyDepth-RT-DETR checkpoint", restricted_unpickle)
    variant, opts = infer_rtdetr_config(sd)
    for name, value in (("num_queries", num_queries), ("encoder_heads", encoder_heads), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    aw = sd["decoder.decoder.layers.0.cross_attn.attention_weights.weight"]
    points, rem = divmod(int(aw.shape[0]), 3 * num_heads)
    if rem or points < 1:
        raise ValueError(f"cross-attention weights of {aw.shape[0]} rows do not split into {num_heads} heads x 3 "
                         "levels x points; give num_heads=")
    extra = {"num_queries": num_queries, "encoder_heads": encoder_heads, "num_heads": num_heads,
             "decoder_points": points}
    defaults = {"num_queries": 300, "encoder_heads": 8, "num_heads": 8, "decoder_points": 4}
    opts.update({k: val for k, val in extra.items() if val != defaults[k]})
    model = AnyDepthRTDETR(variant, **opts)
    essential = {i: len(getattr(model.backbone, f"stage{i}").essential) for i in range(1, 5)}
    target = model.state_dict()
    new: Dict[str, torch.Tensor] = {}
    used = set()
    for key, ref in target.items():
        src, third = _rtdetr_source(key, essential)
        if src not in sd:
            if key.endswith("num_batches_tracked"):  # their frozen norms have none
                new[key] = torch.zeros_like(ref)
                continue
            raise ValueError(f"the checkpoint has no {src!r} (needed for {key!r}); is it an authors' "
                             f"AnyDepth-RT-DETR-{variant.upper()}?")
        used.add(src)
        t = sd[src]
        if third is not None:
            n = t.shape[0] // 3
            t = t[third * n:(third + 1) * n]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"shape mismatch for {key!r}: the checkpoint's {src!r} gives {tuple(t.shape)}, "
                             f"rtdetr-{variant}-anydepth (split='official', {opts}) expects {tuple(ref.shape)}")
        new[key] = t.to(ref.dtype).clone()
    unused = [k for k in sd if k not in used]
    if unused:
        raise ValueError(f"checkpoint tensors with no place in rtdetr-{variant}-anydepth (split='official'): "
                         f"{unused[:8]}{'...' if len(unused) > 8 else ''}")
    model.load_state_dict(new, strict=True)
    model.model_name = f"rtdetr-{variant}-anydepth"
    model.model_kwargs = dict(opts)
    return model.eval()


def is_authors_rtdetr(sd: Mapping[str, object]) -> bool:
    """Whether a state dict looks like the authors' any-depth RT-DETR (their backbone's shallow
    norms and their encoder's ``norm_skippable``)."""
    return "backbone.layer1.0.bn1_skip.weight" in sd and any(
        isinstance(k, str) and k.startswith("encoder.") and ".norm_skippable." in k for k in sd)
