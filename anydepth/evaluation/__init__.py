"""COCO evaluation of an any-depth detector at every depth: ``anydepth eval``.

    from anydepth.evaluation import evaluate
    report = evaluate(model, dataset, imgsz=640)          # every depth of the model's ladder
    print(report.table())
    report.save("runs/eval", "yolov12s-coco")            # .json + .md table + trade-off .png
    report = evaluate(model, dataset, profile="m.profile-fused-640-b1-float32-cpu.json")  # latency read from it

For each depth configuration, :func:`evaluate` runs ``model.predict`` on the data set's original
images (any size; ``predict`` letterboxes or resizes them itself and returns boxes in original
pixels), converts the detections to COCO results and scores them with the COCO protocol
(:func:`coco_evaluate`, pycocotools or faster-coco-eval). Next to the metrics each row carries
the configuration's GFLOPs and its latency, so that the report shows the accuracy/cost trade-off
of one set of weights.

**Latency** is timed as the benchmarks time it, after every depth has been scored:
:func:`anydepth.budget.profile_depths` over the scored configurations (warm-up calls, then
interleaved rounds in which every configuration runs in turn, so that drift of the machine hits
them alike; median and p10-p90 of ``latency_rounds x latency_reps`` calls), or it is read from a
saved :class:`~anydepth.budget.DepthProfile` (``profile=``, ``anydepth eval --profile``), e.g. one
measured on the deployment device. ``report.latency`` and the notes say which.

**Units.** Metrics are fractions in ``[0, 1]`` as pycocotools computes them (``AP = 0.372``) in
the API and the JSON; :meth:`EvalReport.table`, the Markdown and the plots show them in percent
(the JSON's ``units`` and the notes say so). A metric that COCO leaves undefined
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
:mod:`.report` holds the report (:class:`EvalRow`, :class:`EvalReport`: table, JSON, plot),
:mod:`.run` the per-depth run (:func:`evaluate`) and :mod:`.plots` the pictures (trade-off plots
with the Pareto front, comparisons of several runs, detections per depth); the names of the first
three are re-exported here.
"""
from __future__ import annotations

from .coco import BACKENDS, METRIC_NAMES, coco_evaluate
from .coco import _backend_classes, _check_gt, _check_results  # noqa: F401  (the former module's helpers)
from .report import CLASSIFY_METRICS, TABLE_METRICS, UNITS, EvalReport, EvalRow
from .report import _SHORT  # noqa: F401
from .run import evaluate
from .classify import evaluate_classifier
from .run import _check_dataset, _model_device, _resolve_depths, _to_coco_results  # noqa: F401

__all__ = ["BACKENDS", "CLASSIFY_METRICS", "METRIC_NAMES", "TABLE_METRICS", "UNITS", "EvalReport", "EvalRow",
           "coco_evaluate", "evaluate", "evaluate_classifier"]
