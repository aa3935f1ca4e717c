"""Model registry: ``create_model("yolov12s-anydepth")`` (timm-style, one file per family).

Each family module (``anydepth/models/<family>.py``, found here on its own) registers its
:class:`~anydepth.family.ModelFamily` spec with :func:`anydepth.family.register_family`, which
registers the family's factories with :func:`register_model`. A factory takes ``num_classes``
plus keyword options and returns an
:class:`~anydepth.model.AnyDepthModel`; the registry records the name and options on the model
(``model.model_name``, ``model.model_kwargs``) so that checkpoints can rebuild it.
"""
from __future__ import annotations

import fnmatch
import importlib
import pkgutil
from typing import Callable, Dict, List, Optional

_REGISTRY: Dict[str, Callable] = {}
_loaded = False


def register_model(name: str):
    """Decorator registering ``fn(num_classes=80, **kwargs) -> AnyDepthModel`` under ``name``."""

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import models

    try:
        for info in pkgutil.iter_modules(models.__path__):  # every family file registers itself
            if not info.name.startswith("_"):
                importlib.import_module(f"{models.__name__}.{info.name}")
    except BaseException:
        _loaded = False
        raise


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Registered model names, sorted; ``pattern`` is a shell-style filter (``"rtdetr-*"``)."""
    _load_families()
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def create_model(name: str, num_classes: Optional[int] = None, **kwargs):
    """Build a registered model with fresh (random) weights.

    ``num_classes``: size of the classification head (default: the factory's, 80 for the COCO
    detectors, 1000 for the ImageNet classifiers). Other keyword options are family-specific
    and documented on the factory. Raises ``ValueError`` naming the registered models for an
    unknown name.
    """
    _load_families()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(_REGISTRY)}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    head = {} if num_classes is None else {"num_classes": num_classes}
    model = _REGISTRY[name](**head, **kwargs)
    nc = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    model.model_name = name
    model.model_kwargs = {**({"num_classes": nc} if nc is not None else {}), **kwargs}
    return model
