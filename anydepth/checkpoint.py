"""Checkpoints that rebuild their model: ``anydepth.save(model, path)`` / ``anydepth.load(path)``.

A checkpoint is a plain dict of tensors, strings and numbers, so it loads with
``torch.load(weights_only=True)``: no pickled code runs when a file is opened.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

import torch

FORMAT = "anydepth-checkpoint"
VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


def save(model, path: PathLike, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write ``model``'s weights plus what :func:`load` needs to rebuild it."""
    name = getattr(model, "model_name", None)
    if name is None:
        raise ValueError("save: the model has no registered name; build it with "
                         "anydepth.create_model(...) or a converter in anydepth.convert")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": name,
        "kwargs": dict(getattr(model, "model_kwargs", {})),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    torch.save(payload, os.fspath(path))


def read(path: PathLike) -> Dict[str, Any]:
    """The checkpoint dict, validated (``weights_only=True``); ``ValueError`` if corrupt."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, not a torch file at all
        raise ValueError(f"{path!r} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an anydepth checkpoint (no format={FORMAT!r} field)")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path!r} has checkpoint version {payload.get('version')!r}; "
                         f"this anydepth reads version {VERSION}")
    if not isinstance(payload.get("state_dict"), dict) or not isinstance(payload.get("model"), str):
        raise ValueError(f"{path!r} is missing its model name or state_dict")
    return payload


def class_names(path: PathLike) -> Optional[List[str]]:
    """The class names an anydepth checkpoint carries (``extra["class_names"]``, which ``anydepth
    train`` writes from its dataset), else None: also for a file that is not an anydepth checkpoint.
    Reads the file memory-mapped, without loading the weights."""
    try:
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch zip file (peer weights, a directory): no names
        return None
    extra = payload.get("extra") if isinstance(payload, dict) and payload.get("format") == FORMAT else None
    names = extra.get("class_names") if isinstance(extra, dict) else None
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def load(path: PathLike, map_location: Union[str, torch.device, None] = "cpu"):
    """Rebuild the model saved at ``path`` (in eval mode) and load its weights strictly."""
    from .registry import create_model

    payload = read(path)
    model = create_model(payload["model"], **payload.get("kwargs", {}))
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{os.fspath(path)!r} does not match {payload['model']!r}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    if map_location is not None:
        model = model.to(map_location)
    return model.eval()
