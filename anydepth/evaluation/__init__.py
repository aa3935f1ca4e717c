"""COCO evaluation of an any-depth detector at every depth: ``anydepth eval``.

    from anydepth.evaluation import evaluate
    report = evaluate(model, dataset, imgsz=640)          # every depth of the model's ladder
    print(report.table())
    report.save("runs/eval", "yolov12s-coco")            # .json + .md table + AP-vs-latency .png

For each depth configuration, :func:`evaluate` runs ``model.predict`` on the data set's original
images (any size; ``predict`` letterboxes or resizes them itself and returns boxes in original
pixels), converts the detections to COCO results and scores them with the COCO protocol
(:func:`coco_evaluate`, pycocotools or faster-coco-eval). Next to the metrics each row carries
the configuration's GFLOPs and its latency, so that the report shows the accuracy/cost trade-off
of one set of weights.

**Units.** Metrics are fractions in ``[0, 1]`` as pycocotools computes them (``AP = 0.372``);
:meth:`EvalReport.table` and the plot show them in percent. A metric that COCO leaves undefined
(pycocotools' ``-1``: no ground-truth object of that size, e.g. ``AP_small`` on a data set without
small objects) is ``None``. Metrics follow the standard COCO protocol: IoU thresholds
0.50:0.05:0.95, area ranges small < 32² <= medium < 96² <= large, at most 100 detections per image
and class counted (``max_det`` only bounds what ``predict`` returns).

**Data set contract** (as :mod:`anydepth.data` provides): ``len(dataset)``,
``dataset.load_original(i) -> (HxWx3 uint8 RGB array, image_id)``,
``dataset.coco_ground_truth() -> COCO dict`` (images, annotations with xywh ``bbox``,
categories) and ``dataset.category_id(label) -> COCO category id`` of contiguous label ``label``.

**Model contract**: any object with ``predict(images, depth=..., conf=..., imgsz=..., max_det=...)``
returning one result per image with ``boxes`` (xyxy, original pixels), ``scores`` and ``labels``
(:class:`~anydepth.detection.Detections`). ``depth_configs``/``resolve_depth`` (the depth ladder
and depth names), ``flops`` (GFLOPs) and ``model(x, depth=...)`` (latency) are used when the model
has them (every :class:`~anydepth.model.AnyDepthModel` does); otherwise those columns are ``None``.

**Layout.** :mod:`.coco` scores results with the COCO protocol (:func:`coco_evaluate`),
:mod:`.report` holds the report (:class:`EvalRow`, :class:`EvalReport`: table, JSON, plot) and
:mod:`.run` the per-depth run (:func:`evaluate`); the names are re-exported here.
"""
from __future__ import annotations

from .coco import BACKENDS, METRIC_NAMES, coco_evaluate
from .coco import _backend_classes, _check_gt, _check_results  # noqa: F401  (the former module's helpers)
from .report import CLASSIFY_METRICS, TABLE_METRICS, EvalReport, EvalRow
from .report import _SHORT  # noqa: F401
from .run import evaluate
from .classify import evaluate_classifier
from .run import _check_dataset, _latency_ms, _model_device, _resolve_depths, _to_coco_results  # noqa: F401

__all__ = ["BACKENDS", "CLASSIFY_METRICS", "METRIC_NAMES", "TABLE_METRICS", "EvalReport", "EvalRow", "coco_evaluate",
           "evaluate", "evaluate_classifier"]
