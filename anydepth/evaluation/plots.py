"""Pictures of an evaluation: accuracy/cost trade-off plots and detections per depth.

    from anydepth.evaluation.plots import plot_tradeoff, plot_comparison, depth_picture
    plot_tradeoff(report, "eval.png")                     # AP, AP50 vs GFLOPs and vs latency
    plot_comparison({"distillation on": on, "distillation off": off}, "compare.png")
    depth_picture(model, dataset, "depths.png", report=report)   # base | middle | full, same images

* :func:`plot_tradeoff`: AP and AP50 (percent) of one report against GFLOPs and, when the report
  has latency, against the median latency with its p10-p90 spread as a horizontal bar. Every point
  is labelled by its ladder label (``base``, ``ladder3``, ``full``), a key under the plot gives
  the config code of each label, and the Pareto front (no other configuration is at most as costly
  and more accurate) is drawn as a line through filled markers; dominated configurations are
  hollow. :meth:`EvalReport.plot <anydepth.evaluation.EvalReport.plot>` calls it.
* :func:`plot_comparison`: several reports of the same model (e.g. distillation on / off, the
  static model) on shared axes: AP and AP50 against GFLOPs and latency, one colour per report,
  each with its own Pareto front.
* :func:`depth_picture`: the same few images with the detections of a few depths side by side
  (boxes, class names, scores), the ground truth in the first column.

Matplotlib is an optional dependency (``pip install "anydepth[plot]"``): every function raises an
``ImportError`` naming that extra without it. Figures are drawn with the Agg backend (no display).
"""
from __future__ import annotations

import io
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .report import EvalReport, EvalRow

PathLike = Union[str, "os.PathLike[str]"]

#: metric -> (marker, colour) of :func:`plot_tradeoff`
_STYLE = {"AP": ("o", "tab:blue"), "AP50": ("s", "tab:orange"), "top1": ("o", "tab:blue"),
          "top5": ("s", "tab:orange")}


def _metrics(report: EvalReport):
    """The two plotted metrics and the y-axis name: COCO AP/AP50, or top-1/top-5 of a classifier."""
    if getattr(report, "task", "detect") == "classify":
        return ("top1", "top5"), "top-1, top-5 accuracy (%)"
    return ("AP", "AP50"), "COCO AP, AP50 (%)"
_LEGEND_TITLE = "line + filled: Pareto front; hollow: dominated"
_SERIES_COLOURS = ("tab:blue", "tab:red", "tab:gray", "tab:green", "tab:purple", "tab:brown")


def _pyplot(what: str):
    from .._optional import require

    require("matplotlib", what).use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(costs: Sequence[float], values: Sequence[float]) -> List[int]:
    """Indices of the points on the Pareto front of (cost, value) pairs, by increasing cost: a
    point is on it when no other point costs at most as much and is at least as good with one of
    the two strictly better. Ties (same cost and value) keep the first."""
    if len(costs) != len(values):
        raise ValueError(f"pareto_front: {len(costs)} costs but {len(values)} values")
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -values[i], i))
    front: List[int] = []
    best = -float("inf")
    for i in order:
        if values[i] > best:
            front.append(i)
            best = values[i]
    return front


def _axes_of(reports: Sequence[EvalReport]) -> List[Tuple[str, str]]:
    """The x axes every report can give: ``("gflops", label)`` and ``("latency", label)``."""
    axes = []
    if all(r.rows and all(row.gflops is not None for row in r.rows) for r in reports):
        axes.append(("gflops", "GFLOPs per image (multiply-add = 2)"))
    if all(r.rows and all(row.latency_ms is not None for row in r.rows) for r in reports):
        lat = reports[0].latency or {}
        where = lat.get("device_name") or reports[0].device
        axes.append(("latency", f"latency, ms (median, p10-p90 bars; batch {reports[0].latency_batch}, "
                                f"{lat.get('form', 'eager')}, {where})"))
    if not axes:
        axes.append(("order", "depth configuration (no GFLOPs or latency in the report)"))
    return axes


def _x(row: EvalRow, kind: str, index: int) -> float:
    if kind == "gflops":
        return float(row.gflops)  # type: ignore[arg-type]
    if kind == "latency":
        return float(row.latency_ms)  # type: ignore[arg-type]
    return float(index)


def _points(report: EvalReport, kind: str, metric: str) -> List[Tuple[float, float, EvalRow]]:
    return [(_x(r, kind, i), 100 * r.metrics[metric], r) for i, r in enumerate(report.rows)
            if r.metrics.get(metric) is not None]


def _draw_series(ax, pts: List[Tuple[float, float, EvalRow]], kind: str, marker: str, colour: str, label: str,
                 spread: bool) -> None:
    """Points of one metric of one report: the Pareto front as a line through filled markers,
    dominated points hollow, p10-p90 bars on the latency axis."""
    if not pts:
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    front = pareto_front(xs, ys)
    on = set(front)
    if spread and kind == "latency":
        lo = [max(0.0, x - (r.latency_p10_ms if r.latency_p10_ms is not None else x)) for x, _, r in pts]
        hi = [max(0.0, (r.latency_p90_ms if r.latency_p90_ms is not None else x) - x) for x, _, r in pts]
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="none", ecolor=colour, alpha=0.45, elinewidth=1, capsize=2)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], marker + "-", color=colour, lw=1.6, ms=6, label=label)
    off = [i for i in range(len(pts)) if i not in on]
    if off:
        ax.plot([xs[i] for i in off], [ys[i] for i in off], marker, ls="none", ms=6, mfc="white", mec=colour)


def short_label(name: str) -> str:
    """The point label of a ladder label: ``ladder3`` -> ``L3``; others as they are."""
    m = re.fullmatch(r"ladder(\d+)", name)
    return f"L{m.group(1)}" if m else name


def _label_points(ax, pts: List[Tuple[float, float, EvalRow]]) -> None:
    for k, (x, y, r) in enumerate(sorted(pts, key=lambda p: p[0])):
        dy = 6 if k % 2 == 0 else -11
        ax.annotate(short_label(r.name), (x, y), textcoords="offset points", xytext=(3, dy), fontsize=7)


_KEY_COLUMNS = 3


def _code_key(fig, rows: Sequence[EvalRow]) -> None:
    """The config code of every point label, under the axes (monospace, in columns)."""
    items = []
    for r in rows:
        short = short_label(r.name)
        name = f"{short} ({r.name})" if short != r.name else r.name
        if r.code != r.name:
            items.append(f"{name:<13} {r.code}")
    if not items:
        return
    per_col = -(-len(items) // _KEY_COLUMNS)
    cols = [items[i:i + per_col] for i in range(0, len(items), per_col)]
    for c, col in enumerate(cols):
        fig.text(0.03 + c / _KEY_COLUMNS, 0.015, "\n".join(col), fontsize=7, family="monospace", va="bottom",
                 ha="left")


def _key_height(rows: Sequence[EvalRow]) -> float:
    """Inches under the axes that :func:`_code_key` needs."""
    n = sum(1 for r in rows if r.code != r.name)
    return 0.0 if n == 0 else 0.125 * (-(-n // _KEY_COLUMNS)) + 0.12


def _save(fig, path: PathLike, compact: bool = False) -> str:
    """Write ``fig`` as a PNG; ``compact``: a 256-colour palette PNG when Pillow is installed (photos
    with boxes: a quarter of the size, no visible loss), else a plain one."""
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        image = None
        if compact:
            try:
                from PIL import Image
            except ImportError:  # optional (the data/eval extras): a plain PNG
                compact = False
        if compact:
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            buf.seek(0)
            image = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                             dither=Image.Dither.NONE)
            image.save(path, format="PNG", optimize=True)
        else:
            fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def _subtitle(report: EvalReport) -> str:
    lat = report.latency or {}
    if not lat:
        return "latency not measured"
    src = f"from profile {os.path.basename(str(lat.get('profile')))}" if lat.get("source") == "profile" else \
        "measured"
    return (f"latency {src}: {lat.get('form')} form, batch {lat.get('batch')}, {lat.get('device')} "
            f"({lat.get('device_name')}), {lat.get('rounds')} interleaved rounds x {lat.get('reps')}")


def plot_tradeoff(report: EvalReport, path: PathLike, title: Optional[str] = None) -> str:
    """AP and AP50 (percent) of ``report`` against GFLOPs and latency (one panel each; see the
    module docstring), written as a PNG to ``path``; returns the path."""
    plt = _pyplot("plot_tradeoff")
    axes_kinds = _axes_of([report])
    key_h = _key_height(report.rows)
    fig_h = 4.0 + key_h
    fig, axs = plt.subplots(1, len(axes_kinds), figsize=(5.4 * len(axes_kinds), fig_h), dpi=100, squeeze=False)
    for ax, (kind, xlabel) in zip(axs[0], axes_kinds):
        (main, second), ylabel = _metrics(report)
        for metric in (main, second):
            marker, colour = _STYLE[metric]
            pts = _points(report, kind, metric)
            _draw_series(ax, pts, kind, marker, colour, metric, spread=metric == main)
            if metric == main:
                _label_points(ax, pts)
        if kind == "order":
            ax.set_xticks(range(len(report.rows)), [r.name for r in report.rows], fontsize=7, rotation=30)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="best", title=_LEGEND_TITLE, title_fontsize=6.5)
    fig.suptitle(title or f"{report.model} @ {report.imgsz} px on {report.dataset} ({report.num_images} images): "
                 "one set of weights, every depth", fontsize=9, y=1 - 0.08 / fig_h, va="top")
    fig.text(0.5, 1 - 0.42 / fig_h, _subtitle(report), fontsize=7, ha="center", color="dimgray")
    _code_key(fig, report.rows)
    fig.tight_layout(rect=(0, key_h / fig_h, 1, 1 - 0.45 / fig_h))
    return _save(fig, path)


def plot_comparison(reports: Mapping[str, EvalReport], path: PathLike, title: Optional[str] = None) -> str:
    """Several reports of one model (e.g. ``{"distillation on": a, "distillation off": b,
    "stage 1 (static)": c}``) on shared axes: rows AP and AP50 (percent), columns GFLOPs and
    latency (when every report has it), one colour per report with its Pareto front. Written as a
    PNG to ``path``; returns the path. Latency is comparable across reports only when it was
    measured alike: give them the same depth profile (``evaluate(..., profile=)``)."""
    if not reports:
        raise ValueError("plot_comparison: no reports")
    bad = [k for k, r in reports.items() if not isinstance(r, EvalReport)]
    if bad:
        raise TypeError(f"plot_comparison: {bad} are not EvalReports")
    plt = _pyplot("plot_comparison")
    items = list(reports.items())
    axes_kinds = _axes_of([r for _, r in items])
    first = items[0][1]
    key_h = _key_height(first.rows)
    fig_h = 6.8 + key_h
    fig, axs = plt.subplots(2, len(axes_kinds), figsize=(5.4 * len(axes_kinds), fig_h), dpi=100, squeeze=False)
    markers = ("o", "s", "^", "D", "v", "P")
    metrics, _ = _metrics(first)
    for row_i, metric in enumerate(metrics):
        for ax, (kind, xlabel) in zip(axs[row_i], axes_kinds):
            for k, (label, rep) in enumerate(items):
                pts = _points(rep, kind, metric)
                # latency bars once when the reports share their latency (one depth profile)
                shared = k > 0 and [r.latency_ms for r in rep.rows] == [r.latency_ms for r in first.rows]
                _draw_series(ax, pts, kind, markers[k % len(markers)], _SERIES_COLOURS[k % len(_SERIES_COLOURS)],
                             label, spread=not shared)
                if k == 0:
                    _label_points(ax, pts)
            if kind == "order":
                ax.set_xticks(range(len(first.rows)), [r.name for r in first.rows], fontsize=7, rotation=30)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(f"{'' if metric.startswith('top') else 'COCO '}{metric} (%)", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6.5, loc="best", title=_LEGEND_TITLE, title_fontsize=6.5)
    fig.suptitle(title or f"{first.model} @ {first.imgsz} px on {first.dataset} ({first.num_images} images)",
                 fontsize=9, y=1 - 0.08 / fig_h, va="top")
    fig.text(0.5, 1 - 0.42 / fig_h, _subtitle(first), fontsize=7, ha="center", color="dimgray")
    _code_key(fig, first.rows)
    fig.tight_layout(rect=(0, key_h / fig_h, 1, 1 - 0.45 / fig_h))
    return _save(fig, path)


# -- detections per depth ------------------------------------------------------------------------
def picture_depths(model, imgsz: int) -> List[Tuple[str, Any]]:
    """``[(label, config)]`` of base, the middle of the ladder and full depth (fewer when the ladder
    is shorter); ``[("full", None)]`` for a model without a ladder."""
    if not callable(getattr(model, "depth_configs", None)):
        return [("full", None)]
    ladder = model.depth_configs((1, 3, imgsz, imgsz))
    picks = sorted({0, len(ladder) // 2, len(ladder) - 1})
    return [("base" if i == 0 else "full" if i == len(ladder) - 1 else f"ladder{i}", ladder[i]) for i in picks]


def _class_names(gt: Mapping) -> Dict[int, str]:
    """COCO category id -> name."""
    return {c["id"]: str(c.get("name", c["id"])) for c in gt.get("categories", [])}


def _draw_boxes(ax, boxes, labels: Sequence[str], colours: Sequence, scores: Optional[Sequence[float]]) -> None:
    import matplotlib.patches as patches

    for k, (x0, y0, x1, y1) in enumerate(boxes):
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.3, ec=colours[k]))
        text = labels[k] if scores is None else f"{labels[k]} {scores[k]:.2f}"
        ax.text(x0 + 1, y0 + 1, text, fontsize=5.5, color="white", va="top", ha="left",
                bbox=dict(facecolor=colours[k], alpha=0.75, pad=0.6, lw=0))


def depth_picture(model, dataset, path: PathLike, depths: Optional[Sequence[Any]] = None,
                  images: Union[int, Sequence[int]] = 3, imgsz: int = 640, conf: float = 0.25, max_boxes: int = 12,
                  report: Optional[EvalReport] = None, ground_truth: bool = True, title: Optional[str] = None) -> str:
    """The same few images of ``dataset`` (``images``: how many, spread evenly over the data set, or
    their indices) with the detections of ``model`` at each of ``depths`` side by side: the ground
    truth first (``ground_truth``), then one column per depth (default :func:`picture_depths`:
    base, the middle of the ladder, full), each box with its class name and score (the
    ``max_boxes`` best with score >= ``conf``). Column titles give the config code, GFLOPs and,
    with ``report`` (the evaluation of the same model), the depth's AP. ``dataset`` follows the
    evaluation contract (``load_original``, ``coco_ground_truth``, ``category_id``). Written as a
    PNG to ``path``; returns the path."""
    plt = _pyplot("depth_picture")
    n = len(dataset)
    if n == 0:
        raise ValueError("depth_picture: the dataset is empty")
    if isinstance(images, int):
        if images < 1:
            raise ValueError(f"depth_picture: images must be >= 1, got {images}")
        idx = sorted({int(round(v)) for v in np.linspace(0, n - 1, min(images, n))})
    else:
        idx = [int(i) for i in images]
        bad = [i for i in idx if not 0 <= i < n]
        if bad or not idx:
            raise ValueError(f"depth_picture: image indices {bad or idx} are not in 0..{n - 1}")
    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"depth_picture: conf must be in [0, 1], got {conf}")
    if depths is None:
        chosen = picture_depths(model, imgsz)
    else:
        shape = (1, 3, imgsz, imgsz)
        resolve = getattr(model, "resolve_depth", None)
        chosen = [(d if isinstance(d, str) else getattr(d, "code", str(d)),
                   resolve(d, shape) if callable(resolve) else d) for d in depths]
    gt = dataset.coco_ground_truth()
    names = _class_names(gt)
    by_image: Dict[Any, list] = {}
    for a in gt.get("annotations", []):
        by_image.setdefault(a.get("image_id"), []).append(a)
    pics = [dataset.load_original(i) for i in idx]
    cmap = plt.get_cmap("tab10")
    cat_ids = sorted(names)
    colour_of = {c: cmap(k % 10) for k, c in enumerate(cat_ids)}
    dets = []
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        import torch

        with torch.inference_mode():
            for _, d in chosen:
                dets.append(model.predict([p[0] for p in pics], depth=d, conf=conf, imgsz=imgsz, max_det=max_boxes))
    finally:
        if was_training:
            model.train()
    rows_by_code = {r.code: r for r in report.rows} if report is not None else {}
    cols = (1 if ground_truth else 0) + len(chosen)
    h0, w0 = pics[0][0].shape[:2]
    cell = 2.3
    fig, axs = plt.subplots(len(pics), cols, figsize=(cell * cols, cell * len(pics) * h0 / w0 + 0.7), dpi=100,
                            squeeze=False)
    for r, (img, image_id) in enumerate(pics):
        c0 = 0
        if ground_truth:
            anns = by_image.get(image_id, [])
            boxes = [(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
                     for a in anns]
            axs[r][0].imshow(img)
            _draw_boxes(axs[r][0], boxes, [names.get(a["category_id"], str(a["category_id"])) for a in anns],
                        [colour_of.get(a["category_id"], "k") for a in anns], None)
            c0 = 1
        for c, ((label, d), det_list) in enumerate(zip(chosen, dets)):
            det = det_list[r]
            cats = [dataset.category_id(int(l)) for l in det.labels.tolist()]
            ax = axs[r][c0 + c]
            ax.imshow(img)
            _draw_boxes(ax, det.boxes.tolist(), [names.get(k, str(k)) for k in cats],
                        [colour_of.get(k, "k") for k in cats], det.scores.tolist())
    titles = ["ground truth"] if ground_truth else []
    for label, d in chosen:
        code = getattr(d, "code", None)
        t = label if code is None or code == label else f"{label} ({code})"
        extra = []
        if callable(getattr(model, "flops", None)):
            extra.append(f"{model.flops(d, (1, 3, imgsz, imgsz)) / 1e9:.2f} GFLOPs")
        row = rows_by_code.get(code) if code is not None else None
        if row is not None and row.metrics.get("AP") is not None:
            extra.append(f"AP {100 * row.metrics['AP']:.1f}")
        titles.append(t + ("\n" + ", ".join(extra) if extra else ""))
    for c, t in enumerate(titles):
        axs[0][c].set_title(t, fontsize=7)
    for ax in axs.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    name = getattr(model, "model_name", type(model).__name__)
    fig.suptitle(title or f"{name} @ {imgsz} px: detections with score >= {conf:g} (at most {max_boxes})",
                 fontsize=8)
    fig.tight_layout(pad=0.4, h_pad=0.3, w_pad=0.3)
    return _save(fig, path, compact=True)
