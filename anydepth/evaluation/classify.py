"""Top-1 / top-5 accuracy of an any-depth classifier at every depth (``anydepth eval`` on an
ImageFolder; :func:`anydepth.evaluation.evaluate` dispatches here for a classifier).

The data set gives ``(uint8 [3, imgsz, imgsz], label)`` samples (:class:`anydepth.data.classify.
ImageFolder`, evaluation transform); they are batched once and run at each depth. Each row of the
:class:`~anydepth.evaluation.EvalReport` (``task="classify"``) carries ``top1``/``top5`` (fractions;
top-5 is top-``min(5, classes)``), the depth's GFLOPs and, optionally, its latency.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..depth import DepthConfig
from .report import EvalReport, EvalRow
from ..budget import FORMS
from .run import (_build_report, _depth_row, _given_profile, _model_device, _progress_bar, _resolve_depths,
                  _run_notes, _time_rows)


def _check(model, dataset, imgsz, batch_size, max_images) -> None:
    if not callable(getattr(model, "forward_depth", None)) or getattr(model, "task", None) != "classify":
        raise TypeError(f"evaluate_classifier: expected an any-depth classifier, got {type(model).__name__}")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"evaluate_classifier: the dataset ({type(dataset).__name__}) needs len() and [i] -> "
                        "(image tensor, label)")
    for name, v in (("imgsz", imgsz), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"evaluate_classifier: {name} must be a positive int, got {v!r}")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"evaluate_classifier: max_images must be a positive int, got {max_images!r}")
    nc = getattr(dataset, "num_classes", None)
    if nc is not None and nc != model.num_classes:
        raise ValueError(f"evaluate_classifier: the model predicts {model.num_classes} classes, the dataset has {nc}")


@torch.no_grad()
def evaluate_classifier(model, dataset, depths=None, imgsz: int = 224, batch_size: int = 32, device=None,
                        progress: bool = True, measure_latency: bool = True, latency_batch: int = 1,
                        max_images: Optional[int] = None, latency_reps: int = 2, latency_warmup: int = 2,
                        latency_rounds: int = 10, latency_form: str = "eager", profile=None,
                        **_ignored) -> EvalReport:
    """Top-1/top-5 accuracy, GFLOPs and latency of ``model`` at each depth (``depths``: ``None``
    = the model's FLOP ladder, or a list of depth-likes; as :func:`~anydepth.evaluation.evaluate`)
    on the first ``max_images`` samples of ``dataset`` (all by default). Latency as
    :func:`~anydepth.evaluation.evaluate` measures it (interleaved rounds over the scored depths,
    :func:`anydepth.budget.profile_depths`) or read from ``profile``. Returns an
    :class:`~anydepth.evaluation.EvalReport` with ``task="classify"``."""
    _check(model, dataset, imgsz, batch_size, max_images)
    if latency_form not in FORMS:
        raise ValueError(f"evaluate_classifier: latency_form must be one of {list(FORMS)}, got {latency_form!r}")
    for name, v in (("latency_batch", latency_batch), ("latency_reps", latency_reps),
                    ("latency_rounds", latency_rounds)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"evaluate_classifier: {name} must be a positive int, got {v!r}")
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    if n == 0:
        raise ValueError("evaluate_classifier: the dataset is empty (0 images)")
    if device is not None:
        model.to(device)
    dev = torch.device(device) if device is not None else _model_device(model)
    dtype = next(model.parameters()).dtype
    shape = (1, 3, imgsz, imgsz)
    was_training = model.training
    model.eval()
    try:
        entries = _resolve_depths(model, depths, shape)
        configs = [d for _, d in entries if isinstance(d, DepthConfig)]
        given = _given_profile(profile, model, imgsz, configs) if profile is not None else None
        can_time = given is not None or (measure_latency and len(configs) == len(entries))
        images, labels = [], []
        for i in range(n):
            img, label = dataset[i]
            if tuple(img.shape) != (3, imgsz, imgsz):
                raise ValueError(f"evaluate_classifier: sample {i} has shape {tuple(img.shape)}, expected "
                                 f"(3, {imgsz}, {imgsz}) (build the dataset with imgsz={imgsz})")
            images.append(img)
            labels.append(int(label))
        target = torch.tensor(labels, dtype=torch.long, device=dev)
        batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
        k5 = min(5, int(model.num_classes))
        bar = _progress_bar(len(entries) * len(batches), progress)
        done: Dict[object, EvalRow] = {}
        rows: List[EvalRow] = []
        for label, depth in entries:
            key = depth if isinstance(depth, DepthConfig) else repr(depth)
            if key in done:
                rows.append(EvalRow(**dict(done[key].__dict__, name=label)))
                continue
            import time

            correct1 = correct5 = 0
            t0 = time.perf_counter()
            for a, b in batches:
                x = torch.stack(images[a:b]).to(dev, dtype).div_(255.0)
                top = model(x, depth=depth).topk(k5, dim=-1).indices
                hit = top == target[a:b, None]
                correct1 += int(hit[:, 0].sum())
                correct5 += int(hit.any(-1).sum())
                if bar is not None:
                    bar.update(1)
            metrics = {"top1": correct1 / n, "top5": correct5 / n}
            row = _depth_row(model, label, depth, metrics, n, time.perf_counter() - t0, shape)
            done[key] = row
            rows.append(row)
        latency, latency_batch = _time_rows(rows, configs, given, can_time, model, imgsz, latency_batch, dev,
                                            latency_form, latency_rounds, latency_reps, latency_warmup, bar)
        if bar is not None:
            bar.close()
    finally:
        model.train(was_training)
    notes = [f"top-1 / top-5 (top-{k5}) accuracy over {n} images (resize {round(imgsz / 0.875)} + centre crop "
             f"{imgsz}): percent in tables and plots, fractions in [0, 1] in the JSON"]
    notes += [t for t in _run_notes(model, measure_latency or profile is not None, can_time, imgsz, latency)
              if t.startswith(("latency", "GFLOPs"))]
    report = _build_report(model, dataset, n, imgsz, batch_size, 0.0, k5, dev,
                           latency_batch if can_time else None, "top-k accuracy", rows, notes, latency)
    report.task = "classify"
    if getattr(dataset, "root", None) is not None:
        report.dataset = f"ImageFolder({dataset.root})"
    return report


__all__ = ["evaluate_classifier"]
