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
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .depth import DepthConfig

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
    from ._optional import require

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


# -------------------------------------------------------------------------------------------------
# the report


@dataclass
class EvalRow:
    """One depth configuration: its label (``base``/``ladder<i>``/``full`` on the model's ladder,
    the preset or number given otherwise, else the config code), config code, the switches it
    skips, knob values, GFLOPs of one ``imgsz`` x ``imgsz`` image (``None`` when the model cannot
    count them), network latency in ms at ``latency_batch`` (``None`` when not measured), the
    COCO metrics (fractions, ``None`` = undefined), the number of detections scored and the
    seconds spent in ``predict``."""

    name: str
    code: str
    skipped: List[str] = field(default_factory=list)
    num_switches: Optional[int] = None
    knobs: Dict[str, int] = field(default_factory=dict)
    gflops: Optional[float] = None
    latency_ms: Optional[float] = None
    metrics: Dict[str, Optional[float]] = field(default_factory=dict)
    num_detections: int = 0
    predict_s: float = 0.0

    @property
    def ap(self) -> Optional[float]:
        return self.metrics.get("AP")

    @property
    def ap50(self) -> Optional[float]:
        return self.metrics.get("AP50")


TABLE_METRICS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
_SHORT = {"AP_small": "AP_S", "AP_medium": "AP_M", "AP_large": "AP_L"}


@dataclass
class EvalReport:
    """Result of :func:`evaluate`: one :class:`EvalRow` per requested depth, in order, plus the
    settings it was run with. Metrics are fractions in [0, 1]; the table and plot show percent."""

    model: str
    dataset: str
    num_images: int
    imgsz: int
    batch_size: int
    conf: float
    max_det: int
    device: str
    latency_batch: Optional[int]
    backend: str
    rows: List[EvalRow]
    machine: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    def row(self, name: str) -> EvalRow:
        """The row labelled ``name`` (``"full"``, ``"base"``, ...)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}")

    def table(self) -> str:
        """A Markdown table (readable as plain text): depth, code, switches skipped, GFLOPs,
        latency and the COCO AP metrics in percent ('-' = not available / undefined)."""
        head = ["depth", "code", "skipped", "GFLOPs", f"latency ms (b{self.latency_batch or '-'})"]
        head += [f"{_SHORT.get(m, m)} %" for m in TABLE_METRICS]
        body = []
        for r in self.rows:
            skipped = f"{len(r.skipped)}/{r.num_switches}" if r.num_switches is not None else "-"
            cells = [r.name, r.code, skipped,
                     f"{r.gflops:.2f}" if r.gflops is not None else "-",
                     f"{r.latency_ms:.1f}" if r.latency_ms is not None else "-"]
            cells += [f"{100 * r.metrics[m]:.1f}" if r.metrics.get(m) is not None else "-" for m in TABLE_METRICS]
            body.append(cells)
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

        def line(cells):
            return "| " + " | ".join(c.rjust(w) if i >= 3 else c.ljust(w)
                                     for i, (c, w) in enumerate(zip(cells, widths))) + " |"

        sep = "|" + "|".join("-" * (w + 1) + (":" if i >= 3 else "-") for i, w in enumerate(widths)) + "|"
        return "\n".join([line(head), sep, *(line(b) for b in body)])

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None) -> dict:
        """The report as a JSON-ready dict; also written to ``path`` when given."""
        d = self.to_dict()
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump(d, f, indent=1)
        return d

    @classmethod
    def from_json(cls, source: Union[str, os.PathLike, Mapping]) -> "EvalReport":
        """Read a report written by :meth:`to_json` (a path or the dict)."""
        if isinstance(source, Mapping):
            d = dict(source)
        else:
            with open(source) as f:
                d = json.load(f)
        names = {f.name for f in fields(cls)}
        missing = {f.name for f in fields(cls) if f.name not in d and f.name not in ("machine", "notes")}
        if missing:
            raise ValueError(f"not an evaluation report: missing {sorted(missing)}")
        row_names = {f.name for f in fields(EvalRow)}
        rows = [EvalRow(**{k: v for k, v in r.items() if k in row_names}) for r in d["rows"]]
        return cls(**{k: v for k, v in d.items() if k in names and k != "rows"}, rows=rows)

    def plot_axis(self) -> Tuple[str, List[float]]:
        """The x axis of :meth:`plot`: ``("latency", ms)`` when every row has a latency, else
        ``("gflops", GFLOPs)`` when every row has GFLOPs, else ``("depth", [0, 1, ...])``."""
        if self.rows and all(r.latency_ms is not None for r in self.rows):
            return "latency", [r.latency_ms for r in self.rows]
        if self.rows and all(r.gflops is not None for r in self.rows):
            return "gflops", [r.gflops for r in self.rows]
        return "depth", list(range(len(self.rows)))

    def plot(self, path: Union[str, os.PathLike]) -> str:
        """PNG of AP (and AP50) in percent against latency, or against GFLOPs when latency was not
        measured (or against the depth order when neither is known). Returns ``path``."""
        from ._optional import require

        require("matplotlib", "EvalReport.plot").use("Agg")
        import matplotlib.pyplot as plt

        kind, xs = self.plot_axis()
        xlabel = {"latency": f"latency (ms, batch {self.latency_batch}, {self.device})",
                  "gflops": "GFLOPs (multiply-add = 2)", "depth": "depth configuration"}[kind]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for key, style in (("AP", "o-"), ("AP50", "s--")):
            pts = [(x, 100 * r.metrics[key]) for x, r in zip(xs, self.rows) if r.metrics.get(key) is not None]
            if pts:
                order = sorted(pts)
                ax.plot([p[0] for p in order], [p[1] for p in order], style, label=f"{key} (one set of weights)")
        for x, r in zip(xs, self.rows):
            if r.metrics.get("AP") is not None:
                ax.annotate(r.name, (x, 100 * r.metrics["AP"]), textcoords="offset points", xytext=(4, -10),
                            fontsize=7)
        if kind == "depth":
            ax.set_xticks(xs, [r.name for r in self.rows], fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("COCO AP, AP50 (%)")
        ax.set_title(f"{self.model} @ {self.imgsz} on {self.dataset} ({self.num_images} images)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path

    def save(self, out_dir: Union[str, os.PathLike], stem: str = "eval") -> Dict[str, Optional[str]]:
        """Write ``<stem>.json``, ``<stem>.md`` (the table) and ``<stem>.png`` (the plot) in
        ``out_dir``; returns their paths (``png`` is ``None`` without matplotlib)."""
        if not stem or os.sep in stem:
            raise ValueError(f"stem must be a file name without directories, got {stem!r}")
        os.makedirs(out_dir, exist_ok=True)
        base = os.path.join(os.fspath(out_dir), stem)
        self.to_json(base + ".json")
        with open(base + ".md", "w") as f:
            f.write(f"{self.model} @ {self.imgsz} on {self.dataset}, {self.num_images} images, {self.device}\n\n")
            f.write(self.table() + "\n")
            for n in self.notes:
                f.write(f"\n- {n}")
            f.write("\n")
        try:
            png = self.plot(base + ".png")
        except ImportError:
            png = None
        return {"json": base + ".json", "md": base + ".md", "png": png}


# -------------------------------------------------------------------------------------------------
# evaluation loop


def _check_dataset(dataset) -> None:
    missing = [m for m in ("load_original", "coco_ground_truth", "category_id")
               if not callable(getattr(dataset, m, None))]
    if missing or not hasattr(dataset, "__len__"):
        raise TypeError(f"evaluate: the dataset ({type(dataset).__name__}) lacks {missing or ['__len__']}; it needs "
                        "len(), load_original(i), coco_ground_truth() and category_id(label) (see anydepth.data)")


def _resolve_depths(model, depths, shape) -> List[Tuple[str, Any]]:
    """``[(label, depth to pass to predict)]``; depth names are resolved by the model itself, so
    its error (naming the valid presets/switches) propagates for an unknown one."""
    if depths is None:
        if callable(getattr(model, "depth_configs", None)):
            ladder = model.depth_configs(shape)
            return [("base" if i == 0 else "full" if i == len(ladder) - 1 else f"ladder{i}", c)
                    for i, c in enumerate(ladder)]
        return [("full", None)]
    if isinstance(depths, (str, int, float, DepthConfig, Mapping)):
        depths = [depths]
    depths = list(depths)
    if not depths:
        raise ValueError("evaluate: depths is an empty list; pass None for the model's depth ladder")
    resolve = getattr(model, "resolve_depth", None)
    space = getattr(model, "depth_space", None)
    out = []
    for d in depths:
        config = resolve(d, shape) if callable(resolve) else d
        if isinstance(d, str):
            label = d.strip().lower()
        elif space is not None and isinstance(config, DepthConfig) and config == space.full():
            label = "full"
        elif space is not None and isinstance(config, DepthConfig) and config == space.base():
            label = "base"
        elif isinstance(d, (int, float)) and not isinstance(d, bool):
            label = f"{d:g}"
        elif isinstance(config, DepthConfig):
            label = config.code
        else:
            label = "full" if d is None else str(d)
        out.append((label, config))
    return out


def _model_device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


def _to_coco_results(preds, image_ids: Sequence, category_of) -> List[dict]:
    if not isinstance(preds, (list, tuple)) or len(preds) != len(image_ids):
        n = len(preds) if isinstance(preds, (list, tuple)) else type(preds).__name__
        raise RuntimeError(f"evaluate: model.predict returned {n} results for a batch of {len(image_ids)} images; "
                           "it must return one result per image")
    out = []
    for det, image_id in zip(preds, image_ids):
        if not all(hasattr(det, a) for a in ("boxes", "scores", "labels")):
            raise TypeError(f"evaluate: model.predict must return objects with boxes/scores/labels "
                            f"(anydepth.detection.Detections), got {type(det).__name__}")
        boxes = torch.as_tensor(det.boxes).detach().double().cpu().reshape(-1, 4)
        scores = torch.as_tensor(det.scores).detach().double().cpu().reshape(-1)
        labels = torch.as_tensor(det.labels).detach().cpu().reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise RuntimeError(f"evaluate: image {image_id!r}: {len(boxes)} boxes, {len(scores)} scores and "
                               f"{len(labels)} labels from model.predict")
        wh = boxes[:, 2:] - boxes[:, :2]
        for (x0, y0), (w, h), s, l in zip(boxes[:, :2].tolist(), wh.tolist(), scores.tolist(), labels.tolist()):
            out.append(dict(image_id=image_id, category_id=category_of(int(l)), bbox=[x0, y0, w, h], score=s))
    return out


def _latency_ms(model, depth, shape, device, reps: int, warmup: int) -> float:
    from anydepth_kernels.benchmark import _timer

    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    timed = _timer(device)
    with torch.inference_mode():
        for _ in range(warmup):
            model(x, depth=depth)
        samples = [timed(lambda: model(x, depth=depth)) for _ in range(reps)]
    return statistics.median(samples)


def evaluate(model, dataset, depths=None, imgsz: int = 640, batch_size: int = 8, conf: float = 0.001,
             max_det: int = 300, device=None, progress: bool = True, measure_latency: bool = True,
             latency_batch: int = 1, max_images: Optional[int] = None, backend: str = "pycocotools",
             latency_reps: int = 5, latency_warmup: int = 1, verbose: bool = False) -> EvalReport:
    """COCO metrics, GFLOPs and latency of ``model`` at each depth on ``dataset``.

    * ``depths``: ``None`` = the model's ladder ``model.depth_configs`` (base .. full; just full
      for a model without one), or a list of depth-likes (``"full"``, ``"base"``, a float in
      [0, 1], a :class:`~anydepth.depth.DepthConfig`, a dict), resolved by the model (an unknown
      name raises the model's own ``ValueError`` before anything runs). One row per entry, in order.
    * For each depth, ``model.predict(images, depth=, conf=, imgsz=, max_det=)`` runs on the
      original images (``dataset.load_original``) in batches of ``batch_size``; the first
      ``max_images`` images only when given (the ground truth is restricted to them). ``conf``
      is low by default, as mAP needs the whole precision/recall curve.
    * Detections become COCO results (xywh, score, ``dataset.category_id(label)``) scored by
      :func:`coco_evaluate` (``backend``) against ``dataset.coco_ground_truth()``.
    * ``gflops``: ``model.flops(depth, (1, 3, imgsz, imgsz)) / 1e9`` (one image) when the model
      has ``flops``. ``latency_ms`` (``measure_latency``): median of ``latency_reps`` timed network
      forwards ``model(x, depth=...)`` of a random ``[latency_batch, 3, imgsz, imgsz]`` batch after
      ``latency_warmup`` (pre/post-processing excluded; CUDA-event timed on GPU), for
      :class:`~anydepth.model.AnyDepthModel`-like modules only.
    * ``device``: where to run (a module is moved there); default the model's device.
      A module is put in eval mode for the run and its train/eval mode restored afterwards.
    * ``progress``: a tqdm bar over depths x batches (stderr). ``verbose``: pycocotools' output.

    Raises ``TypeError`` for a model without ``predict`` or a dataset missing the contract's
    methods, ``ValueError`` for an empty dataset, a ground truth without annotations or image ids
    the ground truth lacks, bad sizes; errors of ``predict`` itself propagate.
    """
    if not callable(getattr(model, "predict", None)):
        raise TypeError(f"evaluate: the model ({type(model).__name__}) has no predict(images, depth=, conf=, imgsz=, "
                        "max_det=) method")
    _check_dataset(dataset)
    for name, value in (("imgsz", imgsz), ("batch_size", batch_size), ("max_det", max_det),
                        ("latency_batch", latency_batch), ("latency_reps", latency_reps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"evaluate: {name} must be a positive int, got {value!r}")
    if isinstance(latency_warmup, bool) or not isinstance(latency_warmup, int) or latency_warmup < 0:
        raise ValueError(f"evaluate: latency_warmup must be an int >= 0, got {latency_warmup!r}")
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0.0 <= conf <= 1.0:
        raise ValueError(f"evaluate: conf must be in [0, 1], got {conf!r}")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"evaluate: max_images must be a positive int or None, got {max_images!r}")
    if backend not in BACKENDS:
        raise ValueError(f"evaluate: unknown COCO evaluation backend {backend!r}; valid: {list(BACKENDS)}")
    n_total = len(dataset)
    if n_total == 0:
        raise ValueError("evaluate: the dataset is empty (0 images)")
    n = n_total if max_images is None else min(n_total, max_images)

    is_module = isinstance(model, torch.nn.Module)
    if is_module:
        if any(p.is_meta for p in model.parameters()):
            raise ValueError("evaluate: the model's weights are on the meta device (not materialised); load "
                             "weights first")
        if device is not None:
            model.to(device)
    dev = torch.device(device) if device is not None else _model_device(model)
    shape = (1, 3, imgsz, imgsz)
    notes: List[str] = []

    gt_all = dataset.coco_ground_truth()
    if not isinstance(gt_all, Mapping) or not gt_all.get("annotations"):
        raise ValueError(f"evaluate: the dataset ({type(dataset).__name__}) has no ground-truth annotations "
                         "(coco_ground_truth() lists no objects): COCO AP cannot be computed")
    gt_image_ids = {im.get("id") for im in gt_all.get("images", []) if isinstance(im, Mapping)}

    was_training = model.training if is_module else None
    if is_module:
        model.eval()
    try:
        entries = _resolve_depths(model, depths, shape)
        can_time = measure_latency and is_module and callable(getattr(model, "resolve_depth", None))
        if measure_latency and not can_time:
            notes.append("latency not measured: the model is not an AnyDepthModel module (model(x, depth=...))")
        if not callable(getattr(model, "flops", None)):
            notes.append("GFLOPs not counted: the model has no flops()")
        notes.append("metrics are fractions in [0, 1] (COCO protocol, at most 100 detections per image and class "
                     "counted); None = undefined (no ground-truth object of that size)")
        if can_time:
            notes.append(f"latency: median of {latency_reps} network forwards (batch {latency_batch}, "
                         f"{imgsz}x{imgsz}, no pre/post-processing) after {latency_warmup} warm-up")

        batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        try:
            from tqdm.auto import tqdm
        except ImportError:  # optional (the `data` extra): no progress bar
            tqdm = None
        bar = tqdm(total=len(entries) * len(batches), desc="evaluate", unit="batch", file=sys.stderr,
                   disable=not progress) if tqdm is not None else None

        categories: Dict[int, Any] = {}

        def category_of(label: int):
            if label not in categories:
                try:
                    categories[label] = dataset.category_id(label)
                except (ValueError, IndexError, KeyError) as e:
                    raise ValueError(f"evaluate: the model predicted label {label}, for which the dataset has no "
                                     f"category ({e}); does the model's num_classes match the dataset's?") from e
            return categories[label]

        image_ids: Optional[List] = None
        gt = None
        done: Dict[Any, EvalRow] = {}
        rows: List[EvalRow] = []
        for label, depth in entries:
            key = depth if isinstance(depth, DepthConfig) else repr(depth)
            if key in done:  # the same configuration twice: one evaluation, two rows
                rows.append(EvalRow(**dict(asdict(done[key]), name=label)))
                if bar is not None:
                    bar.update(len(batches))
                continue
            if bar is not None:
                bar.set_postfix_str(f"depth {label}")
            results: List[dict] = []
            ids_seen: List = []
            t0 = time.perf_counter()
            for idx in batches:
                images, ids = [], []
                for i in idx:
                    img, image_id = dataset.load_original(i)
                    images.append(img)
                    ids.append(image_id)
                if image_ids is None:
                    unknown = [i for i in ids if i not in gt_image_ids]
                    if unknown:
                        raise ValueError(f"evaluate: image ids {unknown[:5]} from dataset.load_original are not in "
                                         "dataset.coco_ground_truth()['images']")
                with torch.no_grad():
                    preds = model.predict(images, depth=depth, conf=conf, imgsz=imgsz, max_det=max_det)
                results.extend(_to_coco_results(preds, ids, category_of))
                ids_seen.extend(ids)
                if bar is not None:
                    bar.update(1)
            predict_s = time.perf_counter() - t0
            if image_ids is None:
                image_ids = ids_seen
                if len(set(image_ids)) != len(image_ids):
                    raise ValueError("evaluate: dataset.load_original returned the same image id for several images")
                keep = set(image_ids)
                gt = dict(gt_all, images=[im for im in gt_all["images"] if im.get("id") in keep],
                          annotations=[a for a in gt_all["annotations"] if a.get("image_id") in keep])
                if not gt["annotations"]:
                    raise ValueError(f"evaluate: the {n} evaluated images have no ground-truth objects: COCO AP is "
                                     "undefined (evaluate more images: max_images)")
            metrics = coco_evaluate(gt, results, backend=backend, verbose=verbose)
            gflops = None
            if callable(getattr(model, "flops", None)):
                gflops = model.flops(depth, shape) / 1e9
            latency = None
            if can_time:
                latency = _latency_ms(model, depth, (latency_batch, 3, imgsz, imgsz), dev, latency_reps,
                                      latency_warmup)
            if isinstance(depth, DepthConfig):
                code, skipped = depth.code, [k for k, v in depth.skip.items() if v]
                num_switches, knobs = len(depth.skip), dict(depth.knobs)
            else:
                code, skipped, num_switches, knobs = (str(depth) if depth is not None else "full"), [], None, {}
            row = EvalRow(label, code, skipped, num_switches, knobs, gflops, latency, metrics, len(results),
                          predict_s)
            done[key] = row
            rows.append(row)
        if bar is not None:
            bar.close()
    finally:
        if is_module and was_training:
            model.train()

    if backend == "faster":
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError:
            backend = "pycocotools"
            notes.append("faster-coco-eval not installed: pycocotools used")
    machine: Dict[str, str] = {}
    try:
        from anydepth_kernels.benchmark import machine_info

        machine = machine_info(dev)
    except ImportError:  # pragma: no cover - the kernels package ships with anydepth
        pass
    name = getattr(model, "model_name", None) or type(model).__name__
    dname = getattr(dataset, "name", None) or type(dataset).__name__
    if getattr(dataset, "images_dir", None) is not None and not getattr(dataset, "name", None):
        dname = f"{dname}({os.fspath(dataset.images_dir)})"
    return EvalReport(str(name), str(dname), n, imgsz, batch_size, float(conf), max_det, str(dev),
                      latency_batch if can_time else None, backend, rows, machine, notes)
