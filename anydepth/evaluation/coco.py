"""COCO scoring: :func:`coco_evaluate` (pycocotools or faster-coco-eval) of detection results
against a COCO ground-truth dict, with the inputs validated first."""
from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

#: names of the 12 COCO summary numbers, in pycocotools' ``COCOeval.stats`` order
METRIC_NAMES: Tuple[str, ...] = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                                 "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
BACKENDS = ("pycocotools", "faster")

# -------------------------------------------------------------------------------------------------
# COCO metrics


def _check_gt(gt: Any) -> dict:
    """A validated copy of a COCO ground-truth dict, with the optional annotation fields that
    pycocotools needs filled in (``id``, ``area`` = w * h, ``iscrowd`` = 0)."""
    if not isinstance(gt, Mapping):
        raise TypeError(f"ground truth must be a COCO-format dict, got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"ground truth is not a COCO dict: missing the {key!r} list "
                             f"(keys present: {sorted(gt)})")
        if not isinstance(gt[key], (list, tuple)):
            raise ValueError(f"ground truth {key!r} must be a list, got {type(gt[key]).__name__}")
    if not gt["images"]:
        raise ValueError("ground truth has no images: nothing to evaluate")
    if not gt["categories"]:
        raise ValueError("ground truth has no categories")
    if not gt["annotations"]:
        raise ValueError("ground truth has no annotations (no objects in the evaluated images): COCO AP is "
                         "undefined without ground-truth objects")
    images = []
    for i, im in enumerate(gt["images"]):
        if not isinstance(im, Mapping) or "id" not in im:
            raise ValueError(f"ground truth images[{i}] has no 'id': {im!r}")
        images.append(dict(im))
    categories = []
    for i, c in enumerate(gt["categories"]):
        if not isinstance(c, Mapping) or "id" not in c:
            raise ValueError(f"ground truth categories[{i}] has no 'id': {c!r}")
        categories.append(dict(c))
    image_ids = {im["id"] for im in images}
    cat_ids = {c["id"] for c in categories}
    used_ids = {a.get("id") for a in gt["annotations"] if isinstance(a, Mapping)}
    next_id = max([i for i in used_ids if isinstance(i, int)] + [0]) + 1
    annotations = []
    for i, a in enumerate(gt["annotations"]):
        where = f"ground truth annotations[{i}]"
        if not isinstance(a, Mapping):
            raise ValueError(f"{where} is not a dict: {a!r}")
        for key in ("image_id", "category_id", "bbox"):
            if key not in a:
                raise ValueError(f"{where} has no {key!r}: {a!r}")
        bbox = a["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
        bbox = [float(v) for v in bbox]
        if not all(math.isfinite(v) for v in bbox) or bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"{where}: bbox must be finite with w, h >= 0, got {a['bbox']!r}")
        if a["image_id"] not in image_ids:
            raise ValueError(f"{where}: image_id {a['image_id']!r} is not among the ground-truth images")
        if a["category_id"] not in cat_ids:
            raise ValueError(f"{where}: category_id {a['category_id']!r} is not among the categories "
                             f"{sorted(cat_ids)}")
        ann = dict(a, bbox=bbox)
        ann.setdefault("area", bbox[2] * bbox[3])
        ann.setdefault("iscrowd", 0)
        if "id" not in ann:
            ann["id"] = next_id
            next_id += 1
        annotations.append(ann)
    out = {k: v for k, v in gt.items() if k not in ("images", "annotations", "categories")}
    out.update(images=images, annotations=annotations, categories=categories)
    return out


def _check_results(results: Any, image_ids: set) -> List[dict]:
    """Validated copies of COCO detection results (pycocotools' loadRes adds fields in place)."""
    if not isinstance(results, (list, tuple)):
        raise TypeError(f"results must be a list of COCO detection dicts, got {type(results).__name__}")
    out = []
    for i, r in enumerate(results):
        where = f"results[{i}]"
        if not isinstance(r, Mapping):
            raise ValueError(f"{where} is not a dict: {r!r}")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in r:
                raise ValueError(f"{where} has no {key!r} (a COCO result needs image_id, category_id, "
                                 f"bbox [x, y, w, h] and score): {r!r}")
        bbox = r["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
        bbox = [float(v) for v in bbox]
        score = float(r["score"])
        if not all(math.isfinite(v) for v in bbox) or not math.isfinite(score):
            raise ValueError(f"{where}: bbox and score must be finite, got bbox={r['bbox']!r}, score={r['score']!r}")
        if r["image_id"] not in image_ids:
            raise ValueError(f"{where}: image_id {r['image_id']!r} is not among the ground-truth images")
        out.append(dict(image_id=r["image_id"], category_id=r["category_id"], bbox=bbox, score=score))
    return out


def _backend_classes(backend: str):
    """``(COCO, COCOeval, name)`` of ``backend``; "faster" falls back to pycocotools (with a
    warning) when faster-coco-eval is not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; valid: {list(BACKENDS)}")
    if backend == "faster":
        try:
            from faster_coco_eval import COCO, COCOeval_faster

            return COCO, COCOeval_faster, "faster"
        except ImportError:
            warnings.warn("faster-coco-eval is not installed (pip install faster-coco-eval): using pycocotools",
                          RuntimeWarning, stacklevel=3)
    from .._optional import require

    COCO = require("pycocotools.coco", "COCO evaluation").COCO
    COCOeval = require("pycocotools.cocoeval", "COCO evaluation").COCOeval
    return COCO, COCOeval, "pycocotools"


def coco_evaluate(gt_dict: Mapping, results_list: Sequence[Mapping], backend: str = "pycocotools",
                  verbose: bool = False) -> Dict[str, Optional[float]]:
    """COCO box metrics of ``results_list`` against the ground truth ``gt_dict``.

    ``gt_dict``: COCO format (``images`` with ``id``; ``annotations`` with ``image_id``,
    ``category_id``, ``bbox`` [x, y, w, h] in pixels and optionally ``area``/``iscrowd``/``id``;
    ``categories`` with ``id``). ``results_list``: dicts with ``image_id``, ``category_id``,
    ``bbox`` [x, y, w, h] and ``score``; it may be empty (every AP is then 0). Results whose
    category is not in ``gt_dict`` count for nothing.

    Returns ``{name: value}`` for :data:`METRIC_NAMES` (AP, AP50, AP75, AP_small, AP_medium,
    AP_large, AR1, AR10, AR100, AR_small, AR_medium, AR_large) as fractions in ``[0, 1]``, ``None``
    where COCO leaves a metric undefined (no ground-truth object of that size). ``backend``:
    ``"pycocotools"`` or ``"faster"`` (faster-coco-eval, same numbers; falls back to pycocotools
    with a warning when not installed). The evaluators' printing is silenced unless ``verbose``.
    Raises ``ValueError`` for a malformed ground truth, one without annotations (AP undefined) or
    results naming unknown images.
    """
    gt = _check_gt(gt_dict)
    results = _check_results(results_list, {im["id"] for im in gt["images"]})
    COCO, COCOeval, _name = _backend_classes(backend)
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # pycocotools' loadRes([]) fails (it reads results[0]): an empty result set by hand
            coco_dt = COCO()
            coco_dt.dataset = dict(images=list(gt["images"]), categories=copy.deepcopy(gt["categories"]),
                                   annotations=[])
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if not verbose and hasattr(ev, "print_function"):  # faster-coco-eval logs through this
            ev.print_function = lambda *args, **kwargs: None
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(v) for v in list(ev.stats)[:len(METRIC_NAMES)]]
    return {k: (None if v < 0 else v) for k, v in zip(METRIC_NAMES, stats)}
