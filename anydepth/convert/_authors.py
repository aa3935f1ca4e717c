"""The authors' released any-depth checkpoints -> our models (``split="official"``).

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
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Tuple

import torch

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
