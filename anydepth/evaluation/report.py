"""The evaluation report: one :class:`EvalRow` per depth, :class:`EvalReport` with its table,
JSON round trip and AP-vs-latency plot."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Mapping, Optional, Tuple, Union


@dataclass
class EvalRow:
    """One depth configuration: its label (``base``/``ladder<i>``/``full`` on the model's ladder,
    the preset or number given otherwise, else the config code), config code, the switches it
    skips, knob values, GFLOPs of one ``imgsz`` x ``imgsz`` image (``None`` when the model cannot
    count them), network latency in ms at ``latency_batch`` (median; ``None`` when not measured),
    the COCO metrics (fractions, ``None`` = undefined), the number of detections scored, the
    seconds spent in ``predict`` and the 10th/90th percentiles of the latency."""

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
    latency_p10_ms: Optional[float] = None
    latency_p90_ms: Optional[float] = None

    @property
    def ap(self) -> Optional[float]:
        return self.metrics.get("AP")

    @property
    def ap50(self) -> Optional[float]:
        return self.metrics.get("AP50")


#: What the numbers of a report are (written into its JSON as ``units``; the notes say the same).
UNITS = {
    "metrics": "fractions in [0, 1] in the JSON and the API (rows[].metrics); percent (0-100) in the tables and "
               "plots; None = undefined (no ground-truth object of that size)",
    "gflops": "GFLOPs (1e9 FLOPs, a multiply-add = 2) of one forward of one imgsz x imgsz image",
    "latency_ms": "milliseconds of one network forward model(x, depth=...) of a batch of latency_batch images, "
                  "no pre/post-processing: median, latency_p10_ms-latency_p90_ms its 10th-90th percentile",
}


TABLE_METRICS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
#: the metrics of a classifier's report (``task="classify"``): top-1 / top-5 accuracy
CLASSIFY_METRICS = ("top1", "top5")
_SHORT = {"AP_small": "AP_S", "AP_medium": "AP_M", "AP_large": "AP_L"}


@dataclass
class EvalReport:
    """Result of :func:`evaluate`: one :class:`EvalRow` per requested depth, in order, plus the
    settings it was run with. Metrics are fractions in [0, 1]; the table and plots show percent
    (``units`` says so in the JSON). ``latency``: how the latency was obtained (``source``
    ``"measured"`` or ``"profile"``, form, batch, device, rounds, reps, warm-up); empty when not."""

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
    latency: Dict[str, object] = field(default_factory=dict)
    units: Dict[str, str] = field(default_factory=lambda: dict(UNITS))
    task: str = "detect"      # "classify": top-1/top-5 accuracy instead of COCO AP

    @property
    def metric_names(self) -> Tuple[str, ...]:
        """The table's metric columns: COCO AP metrics, or ``top1``/``top5`` for a classifier."""
        return CLASSIFY_METRICS if self.task == "classify" else TABLE_METRICS

    @property
    def main_metric(self) -> str:
        """``"AP"``, or ``"top1"`` for a classifier (the plot's and the trainer's metric)."""
        return "top1" if self.task == "classify" else "AP"

    def row(self, name: str) -> EvalRow:
        """The row labelled ``name`` (``"full"``, ``"base"``, ...)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}")

    def table(self) -> str:
        """A Markdown table (readable as plain text): depth, code, switches skipped, GFLOPs,
        latency (median and p10-p90) and the metrics in percent (COCO AP; top-1/top-5 for a
        classifier; '-' = not available / undefined)."""
        head = ["depth", "code", "skipped", "GFLOPs", f"latency ms (b{self.latency_batch or '-'})", "p10-p90 ms"]
        head += [f"{_SHORT.get(m, m)} %" for m in self.metric_names]
        body = []
        for r in self.rows:
            skipped = f"{len(r.skipped)}/{r.num_switches}" if r.num_switches is not None else "-"
            cells = [r.name, r.code, skipped,
                     f"{r.gflops:.2f}" if r.gflops is not None else "-",
                     f"{r.latency_ms:.1f}" if r.latency_ms is not None else "-", _spread(r)]
            cells += [f"{100 * r.metrics[m]:.1f}" if r.metrics.get(m) is not None else "-" for m in self.metric_names]
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
        optional = ("machine", "notes", "latency", "units", "task")  # reports written before they existed
        missing = {f.name for f in fields(cls) if f.name not in d and f.name not in optional}
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
        """PNG of AP and AP50 (percent) against GFLOPs and, when measured, against latency (p10-p90
        bars), points labelled by their ladder label with a key of the config codes, the Pareto
        front marked (:func:`anydepth.evaluation.plots.plot_tradeoff`). Returns ``path``; an
        ``ImportError`` naming the ``plot`` extra without matplotlib."""
        from .plots import plot_tradeoff

        return plot_tradeoff(self, path)

    def save(self, out_dir: Union[str, os.PathLike], stem: str = "eval",
             pictures: Optional[Mapping[str, str]] = None) -> Dict[str, Optional[str]]:
        """Write ``<stem>.json``, ``<stem>.png`` (the trade-off plot, :meth:`plot`) and
        ``<stem>.md`` (the table, its notes and the plot embedded) in ``out_dir``; ``pictures``:
        more images to embed in the Markdown (caption -> path, e.g. the per-depth detections of
        :func:`~anydepth.evaluation.plots.depth_picture`). Returns the paths (``png`` is ``None``
        without matplotlib, and the Markdown says so)."""
        if not stem or os.sep in stem:
            raise ValueError(f"stem must be a file name without directories, got {stem!r}")
        os.makedirs(out_dir, exist_ok=True)
        base = os.path.join(os.fspath(out_dir), stem)
        self.to_json(base + ".json")
        try:
            png: Optional[str] = self.plot(base + ".png")
        except ImportError:
            png = None
        with open(base + ".md", "w") as f:
            f.write(f"{self.model} @ {self.imgsz} on {self.dataset}, {self.num_images} images, {self.device}\n\n")
            f.write(self.table() + "\n")
            for n in self.notes:
                f.write(f"\n- {n}")
            f.write("\n")
            if png is None:
                f.write("\n(no plot: matplotlib is not installed, pip install \"anydepth[plot]\")\n")
            images = ({"AP against GFLOPs and latency": png} if png else {}) | dict(pictures or {})
            for caption, path in images.items():
                rel = os.path.relpath(os.fspath(path), os.fspath(out_dir))
                f.write(f"\n![{caption}]({rel})\n")
        return {"json": base + ".json", "md": base + ".md", "png": png}


def _spread(r: EvalRow) -> str:
    """``p10-p90`` of a row's latency, ``-`` when not measured (``?`` for a bound a profile lacks)."""
    if r.latency_p10_ms is None and r.latency_p90_ms is None:
        return "-"
    lo = "?" if r.latency_p10_ms is None else f"{r.latency_p10_ms:.1f}"
    hi = "?" if r.latency_p90_ms is None else f"{r.latency_p90_ms:.1f}"
    return f"{lo}-{hi}"
