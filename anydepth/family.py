"""Model families: one :class:`ModelFamily` spec per family, registered beside its models.

A family module (``anydepth/models/<family>.py``) defines its model class and factories and ends
with one :func:`register_family` call. The spec is the only place that knows the family: the
trainer (defaults, criterion), the losses (``build_criterion``), the CLI and evaluation
(preprocessing, weight import), the benchmark (peer) ask :func:`family_of` for it instead of
matching name prefixes or class names. Adding a family is one new file in ``anydepth/models/``
(found by :mod:`anydepth.registry` on its own) holding the model and its registration.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from anydepth_kernels import register_float32_modules, register_swap, unregister_swap

PREPROCESSING = ("letterbox", "resize")
#: ``"detect"``: boxes + classes (COCO AP); ``"classify"``: one label per image (top-1/top-5),
#: models derived from :class:`anydepth.classify.AnyDepthClassifier`
TASKS = ("detect", "classify")


def lazy(target: str) -> Callable:
    """``"pkg.module:attr"`` -> a callable that imports ``attr`` on first call and forwards to it
    (keeps heavy or circular imports, e.g. a criterion module, out of the family module)."""
    mod, _, attr = target.partition(":")
    if not mod or not attr:
        raise ValueError(f"expected 'package.module:attribute', got {target!r}")

    def call(*args, **kwargs):
        return getattr(importlib.import_module(mod), attr)(*args, **kwargs)

    call.__name__ = attr
    call.__qualname__ = attr
    call.target = target
    return call


@dataclass(frozen=True)
class TrainDefaults:
    """A family's training recipe (used where ``TrainConfig`` leaves a field ``None``)."""

    lr: float
    weight_decay: float
    clip_grad: float                                          # max gradient norm, 0 = off
    lr_scales: Tuple[Tuple[str, float], ...] = ()             # (parameter-name prefix, lr factor)
    amp_warning: Optional[str] = None                         # warned when amp is requested
    # TrainConfig fields of the any-depth fine-tuning recipe (``recipe="finetune"``): the
    # authors' settings for fine-tuning from a trained model
    finetune: Tuple[Tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class WeightImport:
    """Foreign weights a family imports from a path (a peer's checkpoint file or directory)."""

    describe: str                                   # "an Ultralytics YOLO12 checkpoint"
    accepts: Callable[[str], bool]                  # path -> does this family claim it
    load: Callable[[str], Any]                      # path -> AnyDepthModel (eval mode)


@dataclass(frozen=True)
class Peer:
    """The reference implementation a family is converted from and benchmarked against."""

    name: str                                       # "ultralytics" (benchmark label, package)
    build: Callable[..., Tuple[Any, Any]]           # (model_name, num_classes, seed) -> (peer, ours)
    call: Callable[[Any, Any], Any]                 # (peer, x) -> peer's raw output


@dataclass(frozen=True)
class ModelFamily:
    """Everything the library needs to know about one model family.

    * ``name``: short family name (``"yolov12"``); ``model_class``: its :class:`AnyDepthModel`.
    * ``factories``: registered model name -> ``fn(num_classes=80, **kwargs)``.
    * ``task``: ``"detect"`` or ``"classify"`` (:data:`TASKS`; a classifier family's model class
      derives from :class:`anydepth.classify.AnyDepthClassifier`); ``preprocess``: ``"letterbox"``
      or ``"resize"`` (datasets, eval; a classifier's "resize" is the ImageNet resize + centre
      crop, its mean/std normalisation is inside the model).
    * ``criterion``: ``fn(model, **weights) -> criterion`` (``gt_loss`` / ``distill_loss``).
    * ``train``: :class:`TrainDefaults`, or ``None`` for a family that cannot be trained.
    * ``converters``: peer name -> converter (e.g. ``anydepth.convert.from_ultralytics``).
    * ``weight_import``: :class:`WeightImport` for peer weights given as a path, or ``None``.
    * ``peer``: :class:`Peer` (builder with equal weights, call convention, benchmark label).
    * ``float32_modules``: submodule names that stay float32 in ``optimize(model,
      dtype=torch.bfloat16)`` and ``quantize="int8"`` (numerically sensitive parts, e.g.
      RT-DETR's decoder: deformable sampling at box coordinates).
    """

    name: str
    model_class: type
    factories: Mapping[str, Callable]
    preprocess: str
    criterion: Callable
    task: str = "detect"
    train: Optional[TrainDefaults] = None
    converters: Mapping[str, Callable] = field(default_factory=dict)
    weight_import: Optional[WeightImport] = None
    peer: Optional[Peer] = None
    float32_modules: Tuple[str, ...] = ()

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"ModelFamily.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.model_class, type):
            raise TypeError(f"ModelFamily.model_class must be a class, got {self.model_class!r}")
        if not self.factories:
            raise ValueError(f"family {self.name!r} registers no factories")
        if self.preprocess not in PREPROCESSING:
            raise ValueError(f"family {self.name!r}: preprocess must be one of {PREPROCESSING}, "
                             f"got {self.preprocess!r}")
        if self.task not in TASKS:
            raise ValueError(f"family {self.name!r}: task must be one of {TASKS}, got {self.task!r}")
        if not callable(self.criterion):
            raise TypeError(f"family {self.name!r}: criterion must be callable")
        object.__setattr__(self, "factories", dict(self.factories))
        object.__setattr__(self, "converters", dict(self.converters))

    @property
    def model_names(self) -> List[str]:
        return sorted(self.factories)

    @property
    def benchmark_peer(self) -> Optional[str]:
        return self.peer.name if self.peer is not None else None

    def build_criterion(self, model, **weights):
        return self.criterion(model, **weights)

    def replace(self, **changes) -> "ModelFamily":
        return dataclasses.replace(self, **changes)


_FAMILIES: Dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Register ``family`` and its factories (with :func:`anydepth.registry.register_model`).
    Registering the same spec again is a no-op; another spec under a taken name is an error."""
    from .registry import register_model

    old = _FAMILIES.get(family.name)
    if old is not None and old is not family:
        raise ValueError(f"model family {family.name!r} is registered twice")
    for other in _FAMILIES.values():
        if other is not family and set(other.factories) & set(family.factories):
            raise ValueError(f"family {family.name!r} re-registers models of {other.name!r}: "
                             f"{sorted(set(other.factories) & set(family.factories))}")
    for name, fn in family.factories.items():
        register_model(name)(fn)
    # anydepth_kernels.optimize(model) turns a family's model into its own inference form
    cls = family.model_class
    register_swap(cls.__module__.split(".", 1)[0], cls.__name__, _inference_form,
                  note="its own inference form (to_inference())")
    register_float32_modules(cls.__module__.split(".", 1)[0], cls.__name__, family.float32_modules)
    _FAMILIES[family.name] = family
    return family


def _inference_form(model, backend: str):
    """The ``optimize()`` rule of every family's model: its inference form, in place."""
    return model.to_inference(backend=backend)


def unregister_family(name: str) -> None:
    """Remove a family, its model names and its optimize() rule (tests register toy families and
    take them back)."""
    from .registry import _REGISTRY

    fam = _FAMILIES.pop(name)
    for n in fam.factories:
        _REGISTRY.pop(n, None)
    cls = fam.model_class
    unregister_swap(cls.__module__.split(".", 1)[0], cls.__name__)
    register_float32_modules(cls.__module__.split(".", 1)[0], cls.__name__, ())


def families() -> List[ModelFamily]:
    """Every registered family, by name."""
    from .registry import _load_families

    _load_families()
    return [_FAMILIES[k] for k in sorted(_FAMILIES)]


def family_of(model_or_name, default: Any = ...) -> ModelFamily:
    """The :class:`ModelFamily` of a model instance, model class, registered model name or family
    name. Raises ``ValueError`` naming the families (or returns ``default`` when given)."""
    from .registry import _load_families

    _load_families()
    fams = list(_FAMILIES.values())
    if isinstance(model_or_name, str):
        for f in fams:
            if model_or_name in f.factories or model_or_name == f.name:
                return f
        what = f"model {model_or_name!r}"
    else:
        cls = model_or_name if isinstance(model_or_name, type) else type(model_or_name)
        name = getattr(model_or_name, "model_name", None)
        for f in fams:  # the most derived registered class wins
            if issubclass(cls, f.model_class) and not any(
                    g is not f and issubclass(g.model_class, f.model_class) and issubclass(cls, g.model_class)
                    for g in fams):
                return f
        if isinstance(name, str):
            return family_of(name, default)
        what = f"model class {cls.__name__!r}"
    if default is not ...:
        return default
    raise ValueError(f"no model family for {what}; registered families: {sorted(_FAMILIES)}")


def import_weights(path: str):
    """A model from a peer's weights at ``path`` (file or directory), trying each family whose
    :class:`WeightImport` accepts it. Raises ``ValueError`` saying what each one said."""
    errors = []
    for f in families():
        wi = f.weight_import
        if wi is None or not wi.accepts(path):
            continue
        try:
            return wi.load(path)
        except Exception as e:  # noqa: BLE001 - reported below, with every family's reason
            errors.append((wi.describe, e))
    if not errors:
        kinds = ", ".join(f.weight_import.describe for f in families() if f.weight_import is not None)
        raise ValueError(f"{path!r}: no model family imports it (known: {kinds or 'none'})")
    if len(errors) == 1 and isinstance(errors[0][1], ImportError):
        raise errors[0][1]
    raise ValueError(f"{path!r} is not " + " nor ".join(
        f"{d} ({type(e).__name__}: {e})" for d, e in errors))


def is_dir(path: str) -> bool:
    return os.path.isdir(path)


def is_file(path: str) -> bool:
    return os.path.isfile(path)


__all__ = ["TASKS", "ModelFamily", "Peer", "TrainDefaults", "WeightImport", "families", "family_of",
           "import_weights", "lazy", "register_family", "unregister_family"]
