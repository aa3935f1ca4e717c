"""The accuracy cost of a faster numeric form, per depth: :func:`evaluate_precision`
(``anydepth eval --compile / --dtype bf16 / --int8``).

Each form is built from a copy of the float32 model with :func:`anydepth_kernels.optimize` and
scored by :func:`~anydepth.evaluation.evaluate` on the same images and depths as the float32
model; the report holds the float32 rows (``full``, ``base``, ...) and one row per form and depth
(``full+bf16``, ``base+int8``, ...), and its notes give each row's AP difference from float32.

* ``"compiled"``: float32, ``optimize(model, compile=True)`` (Inductor with freezing);
* ``"bf16"``: ``optimize(model, dtype=torch.bfloat16)`` (bf16 weights and activations, compiled;
  a family's registered float32 submodules, e.g. RT-DETR's decoder, stay float32);
* ``"int8"``: ``optimize(model, quantize="int8", calibration=..., depths=...)``, calibrated per
  depth on ``calibration_images`` images of ``calibration`` (preprocessed as ``model.predict``
  preprocesses them, one image per batch), compiled. The int8 graphs are static: ``predict``
  feeds ``imgsz`` x ``imgsz`` batches (letterbox or resize), which run in chunks of the
  calibration batch.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, List, Optional, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .report import EvalReport, EvalRow

__all__ = ["FORMS", "Int8Detector", "calibration_batches", "evaluate_precision", "precision_form"]

#: the forms :func:`evaluate_precision` builds
FORMS = ("compiled", "bf16", "int8")


class _Captured(Exception):
    pass


def calibration_batches(model: nn.Module, dataset, n: int, imgsz: int) -> List[torch.Tensor]:
    """The first ``n`` images of ``dataset`` (``load_original``) as ``model.predict`` feeds them to
    the network (letterboxed / resized to ``imgsz``, float in [0, 1]): one ``[1, 3, H, W]`` batch
    each, captured at the model's forward (which does not run)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"calibration_images must be a positive int, got {n!r}")
    if len(dataset) < n:
        raise ValueError(f"the calibration set has {len(dataset)} images, fewer than the {n} asked for")
    out: List[torch.Tensor] = []

    def grab(module, args, kwargs):
        out.append(args[0].detach().float().cpu())
        raise _Captured

    hook = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(n):
            with contextlib.suppress(_Captured):
                model.predict([dataset.load_original(i)[0]], imgsz=imgsz)
    finally:
        hook.remove()
    return out


@contextlib.contextmanager
def _forward_replaced(model: nn.Module, forward) -> Iterator[None]:
    model.forward = forward  # an instance attribute: Module.__call__ runs it
    try:
        yield
    finally:
        del model.forward


class Int8Detector(nn.Module):
    """``model.predict`` (its pre- and post-processing) around the int8 graphs of
    :class:`~anydepth.quantize.PerDepthInt8`: a batch of another size than the calibrated one runs
    in chunks of that size (the last one zero-padded, its padding dropped). Depth resolution,
    GFLOPs and the names come from ``model``."""

    def __init__(self, model: nn.Module, int8: nn.Module):
        super().__init__()
        self.model, self.int8 = model, int8
        self.model_name = getattr(model, "model_name", type(model).__name__)
        self.num_classes = getattr(model, "num_classes", None)

    def resolve_depth(self, depth, input_shape=None):
        return self.model.resolve_depth(depth, input_shape)

    def depth_configs(self, input_shape=None):
        return self.model.depth_configs(input_shape)

    @property
    def depth_space(self):
        return self.model.depth_space

    def flops(self, depth=None, input_shape=None):
        return self.model.flops(depth, input_shape)

    def forward(self, x: torch.Tensor, depth=None):
        step = self.int8.input_shape[0]
        if tuple(x.shape[1:]) != tuple(self.int8.input_shape[1:]) or x.shape[0] == step:
            return self.int8(x, depth=depth)  # the runner's own shape check speaks for other shapes
        parts, spec = [], None
        for start in range(0, x.shape[0], step):
            chunk = x[start:start + step]
            n = chunk.shape[0]
            if n < step:
                chunk = torch.cat([chunk, chunk.new_zeros((step - n, *chunk.shape[1:]))])
            leaves, spec = tree_flatten(self.int8(chunk, depth=depth))
            parts.append([leaf[:n] for leaf in leaves])
        return tree_unflatten([torch.cat(p) for p in zip(*parts)], spec)

    @torch.no_grad()
    def predict(self, images, depth=None, **kwargs):
        with _forward_replaced(self.model, lambda x, depth=None: self.forward(x, depth)):
            return self.model.predict(images, depth=depth, **kwargs)


def precision_form(model: nn.Module, form: str, calibration: Optional[Sequence[torch.Tensor]] = None,
                   depths: Optional[Sequence[Any]] = None, compile_int8: bool = True) -> nn.Module:
    """``model`` (left unchanged) in ``form`` (:data:`FORMS`), ready for
    :func:`~anydepth.evaluation.evaluate`: a compiled copy, or an :class:`Int8Detector` calibrated
    on ``calibration`` (image batches) at ``depths``."""
    import anydepth_kernels as ak

    if form not in FORMS:
        raise ValueError(f"unknown precision form {form!r}; valid: {list(FORMS)}")
    if getattr(model, "task", "detect") != "detect" or not callable(getattr(model, "predict", None)):
        raise TypeError(f"precision forms are evaluated for any-depth detectors (with predict), got "
                        f"{type(model).__name__}")
    if form == "int8":
        if not calibration:
            raise ValueError("the int8 form needs calibration images")
        from ..quantize import quantize_int8

        return Int8Detector(model, quantize_int8(model, calibration, depths=depths, compile=compile_int8))
    return ak.optimize(copy.deepcopy(model), compile=True, dtype=torch.bfloat16 if form == "bf16" else None)


def evaluate_precision(model: nn.Module, dataset, forms: Sequence[str], depths: Optional[Sequence[Any]] = None,
                       imgsz: int = 640, batch_size: int = 8, calibration=None, calibration_images: int = 32,
                       calibration_name: Optional[str] = None, reference: Optional[EvalReport] = None,
                       compile_int8: bool = True, progress: bool = True, **kwargs) -> EvalReport:
    """Score ``model`` in float32 (or take ``reference``, a report of it on the same images and
    depths) and in each of ``forms`` (:data:`FORMS`) on ``dataset`` at ``depths`` (default: full
    and base: every depth of a form is its own compile or calibration). ``calibration``: the data
    set whose first ``calibration_images`` images calibrate int8 (default ``dataset``;
    ``calibration_name`` names it in the notes). Other keyword arguments go to
    :func:`~anydepth.evaluation.evaluate` (the forms' rows are not timed: ``anydepth bench
    --compile --dtype bf16 --int8`` measures their speed)."""
    from .run import evaluate

    forms = list(dict.fromkeys(forms))
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms:
        raise ValueError(f"forms must be a non-empty list of {list(FORMS)}, got {forms!r}")
    depths = list(depths) if depths is not None else ["full", "base"]
    base = reference if reference is not None else evaluate(model, dataset, depths=depths, imgsz=imgsz,
                                                            batch_size=batch_size, progress=progress, **kwargs)
    rows: List[EvalRow] = list(base.rows)
    notes = list(base.notes)
    kwargs.pop("measure_latency", None)
    for form in forms:
        calib = None
        if form == "int8":
            calib_set = calibration if calibration is not None else dataset
            calib = calibration_batches(model, calib_set, calibration_images, imgsz)
            where = calibration_name or getattr(calib_set, "name", None) or type(calib_set).__name__
            notes.append(f"int8: calibrated per depth on the first {len(calib)} images of {where}, one image per "
                         "batch (PT2E, X86InductorQuantizer: int8 activations per tensor, weights per channel); "
                         + ("compiled by Inductor" if compile_int8 else "scored on the quantized reference graphs "
                            "(quantize / dequantize around float ops, not compiled)"))
        runner = precision_form(model, form, calib, depths=depths, compile_int8=compile_int8)
        report = evaluate(runner, dataset, depths=depths, imgsz=imgsz, batch_size=batch_size, progress=progress,
                          measure_latency=False, **kwargs)
        for r, ref in zip(report.rows, base.rows):
            r.name = f"{ref.name}+{form}"
            rows.append(r)
            if r.ap is not None and ref.ap is not None:
                notes.append(f"{r.name}: AP {100 * r.ap:.1f} vs float32 {100 * ref.ap:.1f} "
                             f"({100 * (r.ap - ref.ap):+.1f})")
    notes.append("rows <depth>+<form>: the same weights in that form (compiled: float32 under torch.compile; bf16; "
                 "int8), not timed (anydepth bench --compile --dtype bf16 --int8 measures their speed)")
    base_dict = {k: v for k, v in base.__dict__.items() if k not in ("rows", "notes")}
    return EvalReport(**base_dict, rows=rows, notes=notes)
