"""Ultralytics YOLO12 -> AnyDepth-YOLOv12 weight import.

Ultralytics (AGPL) is an optional dependency: it is imported here only to recognise its model
objects, never for any of our computation. State dicts and ``weights_only``-loadable files need no
Ultralytics at all.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Tuple

import torch

from .._optional import require
from ..models.yolov12 import SCALES, AnyDepthYOLOv12
from ..testing import randomize_

# width of layer 0 (64 * width multiple) -> candidate scales; depth tells m from l
_STEM_WIDTH = {16: "n", 32: "s", 64: "ml", 96: "x"}


def _infer_scale(sd: Mapping[str, torch.Tensor]) -> str:
    w = sd.get("model.0.conv.weight")
    if w is None:
        raise ValueError("not a YOLO12 state dict: no 'model.0.conv.weight'")
    cands = _STEM_WIDTH.get(int(w.shape[0]))
    if cands is None:
        raise ValueError(f"stem width {w.shape[0]} matches no YOLO12 scale ({sorted(_STEM_WIDTH)} expected)")
    if len(cands) == 1:
        return cands
    blocks = {int(m.group(1)) for k in sd for m in [re.match(r"model\.6\.m\.(\d+)\.", k)] if m}
    return "l" if len(blocks) >= 4 else "m"


def _state_dict_from(obj) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """(state dict, scale if known) from a DetectionModel, YOLO wrapper, dict or file path."""
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no file at {path!r}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"{path!r} does not load with torch.load(weights_only=True) ({type(e).__name__}). "
                "Ultralytics .pt files pickle whole model objects; if you trust the file, load it with "
                "ultralytics.YOLO(path).model and pass that model here, or save its state_dict()."
            ) from e
    if isinstance(obj, torch.nn.Module):
        inner = getattr(obj, "model", None)
        if isinstance(inner, torch.nn.Module) and not isinstance(inner, torch.nn.Sequential):
            obj = inner  # ultralytics.YOLO wrapper -> DetectionModel
        yaml = getattr(obj, "yaml", None) or {}
        scale = yaml.get("scale") if isinstance(yaml, dict) else None
        yaml_file = str(yaml.get("yaml_file", "")) if isinstance(yaml, dict) else ""
        if yaml_file and "12" not in os.path.basename(yaml_file):
            raise ValueError(f"expected a YOLO12 model, got one built from {yaml_file!r}")
        return {k: v.detach() for k, v in obj.state_dict().items()}, scale
    if isinstance(obj, Mapping):
        if "model" in obj and isinstance(obj["model"], Mapping):
            obj = obj["model"]
        if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError("expected a state dict of tensors")
        return dict(obj), None
    raise TypeError(f"from_ultralytics: expected an Ultralytics DetectionModel, a state dict or a path, "
                    f"got {type(obj).__name__}")


def _source_key(key: str) -> str:
    key = "model." + key[len("layers."):]
    return key.replace(".bn.bn_skip.", ".bn.").replace(".bn.bn.", ".bn.")


def from_ultralytics(model_or_checkpoint, shallow_out: str = "slice") -> AnyDepthYOLOv12:
    """Build ``yolov12{n,s,m,l,x}-anydepth`` from an Ultralytics YOLO12 model or its weights.

    Accepts a ``DetectionModel`` (or ``ultralytics.YOLO`` wrapper), its ``state_dict()``, or a
    path to a file loadable with ``torch.load(weights_only=True)`` holding such a state dict.
    Every Ultralytics weight is copied (a missing or unused one raises ``ValueError``); both norm
    sets of each skip-aware BatchNorm start from Ultralytics' BN, and separate shallow output convs
    (``shallow_out="separate"``) from the matching slice of the full output conv. At full depth the
    result reproduces Ultralytics' output. Returned in eval mode.
    """
    sd, scale = _state_dict_from(model_or_checkpoint)
    scale = scale or _infer_scale(sd)
    if scale not in SCALES:
        raise ValueError(f"unsupported YOLO12 scale {scale!r}; supported: {list(SCALES)}")
    cls_w = sd.get("model.21.cv3.0.2.weight")
    if cls_w is None:
        raise ValueError("not a YOLO12 detection state dict: no 'model.21.cv3.0.2.weight' (class head)")
    nc = int(cls_w.shape[0])
    model = AnyDepthYOLOv12(scale, nc, shallow_out)
    target = model.state_dict()
    new: Dict[str, torch.Tensor] = {}
    used = set()
    for key, ref in target.items():
        if ".conv_skip." in key:
            src = _source_key(key.replace(".conv_skip.", ".cv2."))
        else:
            src = _source_key(key)
        if src not in sd:
            raise ValueError(f"Ultralytics weights have no {src!r} (needed for {key!r}); "
                             f"is this a YOLO12-{scale} detection model?")
        t = sd[src]
        if ".conv_skip.conv.weight" in key:
            t = t[:, : ref.shape[1]]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"shape mismatch for {key!r}: Ultralytics {src!r} has {tuple(t.shape)}, "
                             f"expected {tuple(ref.shape)}")
        new[key] = t.to(ref.dtype).clone()
        used.add(src)
    ignorable = re.compile(r"model\.21\.dfl\.conv\.weight$")
    unused = [k for k in sd if k not in used and not ignorable.match(k)]
    if unused:
        raise ValueError(f"Ultralytics weights not used by yolov12{scale}-anydepth: {unused[:8]}"
                         f"{'...' if len(unused) > 8 else ''}")
    model.load_state_dict(new, strict=True)
    model.model_name = f"yolov12{scale}-anydepth"
    model.model_kwargs = {"num_classes": nc, "shallow_out": shallow_out}
    return model.eval()


def build_peer(model_name: str = "yolov12s-anydepth", num_classes: int = 80, seed: int = 0):
    """An Ultralytics YOLO12 ``DetectionModel`` with random non-trivial weights and BN statistics
    (built offline from its YAML), and our model converted from it: ``(peer, ours)``, both eval."""
    DetectionModel = require("ultralytics.nn.tasks", "building the Ultralytics YOLO12 peer").DetectionModel

    m = re.fullmatch(r"yolov12([nsmlx])-anydepth", model_name)
    if m is None:
        raise ValueError(f"no Ultralytics peer for {model_name!r}")
    torch.manual_seed(seed)
    peer = DetectionModel(f"yolo12{m.group(1)}.yaml", nc=num_classes, verbose=False)
    randomize_(peer, seed)
    peer.eval()
    return peer, from_ultralytics(peer)
