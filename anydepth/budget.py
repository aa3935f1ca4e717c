"""Depth chosen by a latency budget: device profiles, budget selection and a frame-time controller.

    profile = model.profile_depths(imgsz=640, batch=1, device="cpu", form="fused", weights="m.pt")
    config = model.select_depth(40.0, profile)                # most accurate configuration within 40 ms
    controller = DepthController(model, target_ms=40.0, profile=profile)
    dets, config = controller(frame)                          # per frame: detections and the depth used

* :func:`profile_depths` measures the network latency (median and p90) of every configuration of
  the model's FLOP-ordered ladder on one device, in one form (``eager``, ``fused`` = the inference
  form, ``compiled`` = ``anydepth_kernels.optimize(compile=True)``, ``cuda-graph`` = the fused form
  replayed from :class:`~anydepth_kernels.CUDAGraphRunner`), timed as the benchmarks are: warm-up
  calls, then interleaved rounds (every configuration once per round, ``reps`` calls each), so that
  drift of the machine hits every configuration alike. A :class:`DepthProfile` is JSON (saved
  beside the weights by default, :func:`default_profile_path`) and records what it was measured for:
  model, depth space, imgsz, batch, device, torch version, form and dtype. Loading checks the
  model and imgsz it is used with (:meth:`DepthProfile.check`).
* :func:`select_depth` picks the most accurate configuration whose profiled latency fits a budget:
  accuracy from an evaluation report's AP per configuration when given, else the FLOP order.
* :class:`DepthController` picks the depth of every frame of a stream from the frame times it
  measures: a PI controller on the frame-time error drives a latency allowance, with hysteresis
  and a dwell time on the way up (see its docstring).

Profiles time the network forward alone (``model(x, depth=...)`` on a ``[batch, 3, imgsz, imgsz]``
batch); ``predict`` adds letterboxing and NMS, which the profile measures once as ``overhead_ms``
(``predict`` of one ``imgsz`` image at base depth minus the forward, same rounds). The controller
counts a frame as ``latency + overhead`` and measures whole frames, so it also corrects for load
that the profile did not see.
"""
from __future__ import annotations

import collections
import copy
import datetime
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .depth import DepthConfig

FORMAT = "anydepth-depth-profile"
VERSION = 1
FORMS = ("eager", "fused", "compiled", "cuda-graph")
STATS = ("median", "p90")

PathLike = Union[str, "os.PathLike[str]"]


class BudgetError(ValueError):
    """No configuration fits the latency budget (the message names the fastest one)."""


# -- the profile ------------------------------------------------------------------------------
@dataclass
class ProfileEntry:
    """One ladder configuration: label (``base``/``ladder<i>``/``full``), config code, the
    configuration, GFLOPs of one forward at the profile's shape, median and p90 latency (ms), the
    number of timed calls and the p10 latency (``None`` in profiles written before it was kept)."""

    name: str
    code: str
    config: DepthConfig
    gflops: Optional[float]
    median_ms: float
    p90_ms: float
    samples: int
    p10_ms: Optional[float] = None

    def latency(self, stat: str = "median") -> float:
        _check_stat(stat)
        return self.median_ms if stat == "median" else self.p90_ms

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "code": self.code, "config": self.config.to_dict(), "gflops": self.gflops,
                "median_ms": self.median_ms, "p90_ms": self.p90_ms, "samples": self.samples, "p10_ms": self.p10_ms}


@dataclass
class DepthProfile:
    """Measured latency of every ladder configuration of one model on one device (see the module
    docstring). ``entries`` are in ladder (FLOP) order, base first."""

    model: str
    model_kwargs: Dict[str, Any]
    switches: List[str]
    knobs: Dict[str, List[int]]
    imgsz: int
    batch: int
    device: str
    device_name: str
    torch: str
    form: str
    dtype: str
    rounds: int
    reps: int
    warmup: int
    entries: List[ProfileEntry]
    overhead_ms: float = 0.0  # predict()'s pre/post-processing of one image (letterbox, NMS)
    machine: Dict[str, str] = field(default_factory=dict)
    created: str = ""
    path: Optional[str] = None  # where it was saved / loaded from (not serialised)

    # -- look-ups ------------------------------------------------------------------------------
    def entry(self, depth: Union[DepthConfig, str]) -> ProfileEntry:
        """The entry of a configuration (a :class:`DepthConfig`, its code or its label)."""
        for e in self.entries:
            if e.config == depth or e.code == depth or e.name == depth:
                return e
        raise KeyError(f"configuration {getattr(depth, 'code', depth)!r} is not in this profile; it has "
                       f"{[e.code for e in self.entries]}")

    def latency(self, depth: Union[DepthConfig, str], stat: str = "median") -> float:
        return self.entry(depth).latency(stat)

    @property
    def configs(self) -> List[DepthConfig]:
        return [e.config for e in self.entries]

    def fastest(self, stat: str = "median") -> ProfileEntry:
        return min(self.entries, key=lambda e: e.latency(stat))

    def table(self) -> str:
        """A Markdown table: label, code, GFLOPs, median and p90 ms."""
        lines = ["| depth | code | GFLOPs | median ms | p90 ms |", "|---|---|---:|---:|---:|"]
        for e in self.entries:
            g = f"{e.gflops:.3f}" if e.gflops is not None else "-"
            lines.append(f"| {e.name} | {e.code} | {g} | {e.median_ms:.2f} | {e.p90_ms:.2f} |")
        return "\n".join(lines)

    def frame_ms(self, depth: Union[DepthConfig, str], stat: str = "median") -> float:
        """Expected time of one ``predict`` frame: the configuration's latency + ``overhead_ms``."""
        return self.latency(depth, stat) + self.overhead_ms

    def describe(self) -> str:
        return (f"{self.model} at {self.imgsz}x{self.imgsz}, batch {self.batch}, {self.form} form, {self.dtype}, "
                f"on {self.device} ({self.device_name}), torch {self.torch}")

    # -- checks --------------------------------------------------------------------------------
    def check(self, model=None, imgsz: Optional[int] = None, device: Optional[Union[str, torch.device]] = None,
              form: Optional[str] = None) -> "DepthProfile":
        """Raise ``ValueError`` naming the difference when this profile was measured for another
        model (name, options or depth space), another ``imgsz``, another device type or another
        form than given; returns ``self``."""
        where = f"depth profile {self.path!r}" if self.path else "depth profile"
        if model is not None:
            name = getattr(model, "model_name", None)
            if name is not None and name != self.model:
                raise ValueError(f"{where} was measured for {self.model!r}, not for this model ({name!r})")
            kwargs = dict(getattr(model, "model_kwargs", {}) or {})
            if name is not None and _jsonable(kwargs) != self.model_kwargs:
                raise ValueError(f"{where} was measured for {self.model} with options {self.model_kwargs}, "
                                 f"this model has {_jsonable(kwargs)}")
            space = getattr(model, "depth_space", None)
            if space is None:
                raise TypeError(f"{type(model).__name__} is not an any-depth model (no depth_space)")
            if list(space.switches) != self.switches or _knob_table(space) != self.knobs:
                raise ValueError(f"{where} was measured for a model with switches {self.switches} and knobs "
                                 f"{self.knobs}; this model has {list(space.switches)}, {_knob_table(space)}")
        if imgsz is not None and int(imgsz) != self.imgsz:
            raise ValueError(f"{where} was measured at imgsz {self.imgsz}, not {imgsz}: profile the model at "
                             f"{imgsz} (model.profile_depths(imgsz={imgsz}) or `anydepth profile --imgsz {imgsz}`)")
        if device is not None and torch.device(device).type != torch.device(self.device).type:
            raise ValueError(f"{where} was measured on {self.device}, not on {torch.device(device)}")
        if form is not None and form != self.form:
            raise ValueError(f"{where} was measured in the {self.form!r} form, not {form!r}")
        return self

    # -- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> Dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("entries", "path")}
        d = {"format": FORMAT, "version": VERSION, **d, "entries": [e.to_json() for e in self.entries]}
        return d

    def save(self, path: PathLike) -> str:
        """Write the profile as JSON to ``path`` (directories created); returns the path."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)  # never a half-written profile under the real name
        self.path = path
        return path

    @classmethod
    def from_json(cls, d: Any, where: str = "depth profile") -> "DepthProfile":
        """Rebuild a profile from its JSON dict; ``ValueError`` naming the problem if malformed."""
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ValueError(f"{where} is not an anydepth depth profile (no format={FORMAT!r} field)")
        if d.get("version") != VERSION:
            raise ValueError(f"{where} has profile version {d.get('version')!r}; this anydepth reads {VERSION}")
        try:
            entries = []
            for e in d["entries"]:
                med, p90 = float(e["median_ms"]), float(e["p90_ms"])
                if not (math.isfinite(med) and math.isfinite(p90) and 0 <= med and 0 <= p90):
                    raise ValueError(f"latency of {e.get('code')!r} is not a finite non-negative number")
                config = DepthConfig.from_dict(e["config"])
                if config.code != e["code"]:
                    raise ValueError(f"entry code {e['code']!r} does not match its configuration {config.code!r}")
                p10 = None if e.get("p10_ms") is None else float(e["p10_ms"])
                if p10 is not None and not (math.isfinite(p10) and 0 <= p10 <= med):
                    raise ValueError(f"p10 latency of {e.get('code')!r} is not a finite number in [0, median]")
                entries.append(ProfileEntry(str(e["name"]), str(e["code"]), config,
                                            None if e.get("gflops") is None else float(e["gflops"]),
                                            med, p90, int(e["samples"]), p10))
            if not entries:
                raise ValueError("no entries")
            prof = cls(
                model=str(d["model"]), model_kwargs=dict(d["model_kwargs"]), switches=[str(s) for s in d["switches"]],
                knobs={str(k): [int(x) for x in v] for k, v in dict(d["knobs"]).items()}, imgsz=int(d["imgsz"]),
                batch=int(d["batch"]), device=str(d["device"]), device_name=str(d["device_name"]),
                torch=str(d["torch"]), form=str(d["form"]), dtype=str(d["dtype"]), rounds=int(d["rounds"]),
                reps=int(d["reps"]), warmup=int(d["warmup"]), entries=entries,
                overhead_ms=float(d.get("overhead_ms", 0.0)),
                machine={str(k): str(v) for k, v in dict(d.get("machine", {})).items()},
                created=str(d.get("created", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{where} is malformed: {what}") from e
        if not math.isfinite(prof.overhead_ms) or prof.overhead_ms < 0:
            raise ValueError(f"{where} is malformed: overhead_ms {prof.overhead_ms!r}")
        if prof.form not in FORMS:
            raise ValueError(f"{where} is malformed: unknown form {prof.form!r}")
        return prof

    @classmethod
    def load(cls, path: PathLike, model=None, imgsz: Optional[int] = None,
             device: Optional[Union[str, torch.device]] = None, form: Optional[str] = None) -> "DepthProfile":
        """Read a profile written by :meth:`save`; with ``model``/``imgsz``/``device``/``form``
        given, :meth:`check` it against them. ``FileNotFoundError`` if absent, ``ValueError`` if
        the file is not a readable profile (corrupt JSON, missing fields) or does not match."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no depth profile at {path!r}")
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"depth profile {path!r} is not readable JSON ({type(e).__name__}: {e})") from e
        prof = cls.from_json(d, where=f"depth profile {path!r}")
        prof.path = path
        return prof.check(model, imgsz, device, form)


def load_profile(path: PathLike, model=None, imgsz: Optional[int] = None,
                 device: Optional[Union[str, torch.device]] = None, form: Optional[str] = None) -> DepthProfile:
    """:meth:`DepthProfile.load`."""
    return DepthProfile.load(path, model=model, imgsz=imgsz, device=device, form=form)


def _jsonable(d: Mapping[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(dict(d), default=str))


def _knob_table(space) -> Dict[str, List[int]]:
    return {k: [s.low, s.high, s.base] for k, s in space.knob_specs.items()}


def _check_stat(stat: str) -> None:
    if stat not in STATS:
        raise ValueError(f"stat must be one of {list(STATS)}, got {stat!r}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:48] or "device"


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU model (from /proc/cpuinfo where readable)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from anydepth_kernels.benchmark import machine_info

    return machine_info(device)["cpu"]


def default_profile_path(weights: PathLike, imgsz: int, batch: int = 1, device: Union[str, torch.device] = "cpu",
                         form: str = "eager", dtype: torch.dtype = torch.float32) -> str:
    """Where a profile of the weights file ``weights`` is kept: beside it, named after what it
    was measured for, e.g. ``m.profile-fused-640-b1-float32-cpu-amd-epyc-9b14.json``."""
    dev = torch.device(device)
    weights = os.fspath(weights)
    stem = os.path.splitext(weights)[0] if os.path.splitext(weights)[1] else weights.rstrip(os.sep)
    tag = _slug(f"{dev.type}-{device_name(dev)}")
    return f"{stem}.profile-{form}-{imgsz}-b{batch}-{str(dtype).replace('torch.', '')}-{tag}.json"


# -- measuring ------------------------------------------------------------------------------------
def _percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _form_callable(model, form: str, dev: torch.device, dtype: torch.dtype):
    """``(call(x, config), note)`` running ``model`` in ``form`` on ``dev``; the user's model is
    left as it is (a copy is converted or moved when needed)."""
    param = next(model.parameters(), None)
    same_place = param is None or (param.device == dev and param.dtype == dtype)
    if form == "eager":
        m = model if same_place else copy.deepcopy(model).to(dev, dtype)
        return (lambda x, c: m(x, depth=c)), m
    if form in ("fused", "cuda-graph"):
        m = model if model.is_inference and same_place else copy.deepcopy(model).to(dev, dtype).to_inference()
        if form == "fused":
            return (lambda x, c: m(x, depth=c)), m
        from anydepth_kernels import CUDAGraphRunner

        runner = CUDAGraphRunner(m, max_graphs=64)
        return (lambda x, c: runner(x, depth=c)), m
    if form == "compiled":
        from anydepth_kernels import optimize

        m = optimize(copy.deepcopy(model).to(dev, dtype), compile=True)
        return (lambda x, c: m(x, depth=c)), m
    raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")


def _unique_configs(model, configs: Sequence[Any], shape) -> List[DepthConfig]:
    """``configs`` resolved by the model (``DepthConfig`` as given), duplicates dropped, in order."""
    if isinstance(configs, (str, DepthConfig, Mapping)) or not isinstance(configs, Sequence):
        raise TypeError(f"profile_depths: configs must be a list of depths, got {type(configs).__name__}")
    out: List[DepthConfig] = []
    for d in configs:
        c = d if isinstance(d, DepthConfig) else model.resolve_depth(d, shape)
        if c not in out:
            out.append(c)
    if not out:
        raise ValueError("profile_depths: configs is an empty list (None times the whole ladder)")
    return out


def profile_depths(model, imgsz: int = 640, batch: int = 1, device: Union[str, torch.device, None] = None,
                   form: str = "eager", rounds: int = 10, reps: int = 2, warmup: int = 2,
                   dtype: Optional[torch.dtype] = None, weights: Optional[PathLike] = None,
                   path: Optional[PathLike] = None, progress: Union[bool, Callable[[str], None]] = False,
                   seed: int = 0, overhead: bool = True, configs: Optional[Sequence[Any]] = None) -> DepthProfile:
    """Measure every configuration of ``model``'s ladder (see the module docstring); returns the
    :class:`DepthProfile`, also written to ``path``, or beside ``weights``
    (:func:`default_profile_path`) when given. ``device``: default the model's; ``dtype``: default
    its parameters'. ``progress``: True prints one line per step to stderr (or pass a callable
    taking the line). ``overhead``: also measure ``predict``'s pre/post-processing
    (``overhead_ms``; one extra ``predict`` and forward at base depth per round). The model's own
    train/eval mode, device and weights are left unchanged. ``configs``: time these configurations
    (depth-likes the model resolves; duplicates once) instead of the whole ladder; an entry is
    labelled by its ladder label when it is on the ladder, else by its code, entries in FLOP order.
    This is also how :func:`~anydepth.evaluation.evaluate` times the depths it scores."""
    space = getattr(model, "depth_space", None)
    if space is None or not callable(getattr(model, "depth_configs", None)):
        raise TypeError(f"profile_depths needs an any-depth model, got {type(model).__name__}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
    stride = getattr(model, "stride", 32)
    for name, value, low in (("imgsz", imgsz, stride), ("batch", batch, 1), ("rounds", rounds, 1),
                             ("reps", reps, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"profile_depths: {name} must be an int >= {low}, got {value!r}")
    if imgsz % stride:
        raise ValueError(f"profile_depths: imgsz must be a multiple of {stride}, got {imgsz}")
    param = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    if form == "cuda-graph" and dev.type != "cuda":
        raise ValueError("profile_depths: form='cuda-graph' needs a CUDA device (on the CPU the graph runner "
                         "is a plain call: profile form='fused' instead)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"profile_depths: device {dev} requested but CUDA is not available")
    dtype = dtype or (param.dtype if param is not None else torch.float32)
    log = progress if callable(progress) else (
        (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None))
    name = getattr(model, "model_name", type(model).__name__)
    shape = (batch, 3, imgsz, imgsz)

    from anydepth_kernels.benchmark import machine_info, timer

    was_training = model.training
    model.eval()
    try:
        log(f"profile: {name} at {imgsz}x{imgsz}, batch {batch}, {form} form, on {dev}: counting FLOPs of the ladder")
        ladder = model.depth_configs(shape)
        on_ladder = {c: "base" if i == 0 else "full" if i == len(ladder) - 1 else f"ladder{i}"
                     for i, c in enumerate(ladder)}
        if configs is not None:
            ladder = _unique_configs(model, configs, shape)
        try:
            gflops: Dict[DepthConfig, Optional[float]] = {c: model.flops(c, (1, 3, imgsz, imgsz)) / 1e9
                                                          for c in ladder}
        except Exception:  # a model whose forward flop_counter cannot trace: latency still counts
            gflops = {c: None for c in ladder}
        if configs is not None and all(g is not None for g in gflops.values()):
            ladder = sorted(ladder, key=lambda c: gflops[c])  # stable: equal FLOPs keep the given order
        labels = [on_ladder.get(c, c.code) for c in ladder]
        call, module = _form_callable(model, form, dev, dtype)
        x = torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(dev, dtype)
        timed = timer(dev)
        times: Dict[DepthConfig, List[float]] = {c: [] for c in ladder}
        # predict()'s own cost: one imgsz image at base depth, against the same module's forward
        image = (torch.rand(imgsz, imgsz, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)
        can_predict = overhead and callable(getattr(module, "predict", None))
        x1 = x[:1]
        pre_post: List[float] = []
        with torch.inference_mode():
            for i, c in enumerate(ladder):
                t0 = time.perf_counter()
                for _ in range(warmup if form != "compiled" else max(warmup, 1)):
                    call(x, c)
                log(f"profile: warm-up {labels[i]} ({c.code}) {(time.perf_counter() - t0):.1f} s "
                    f"[{i + 1}/{len(ladder)}]")
            if can_predict:
                module.predict(image, depth=ladder[0], imgsz=imgsz)
            for r in range(rounds):
                for c in ladder:
                    for _ in range(reps):
                        times[c].append(timed(lambda: call(x, c)))
                if can_predict:
                    pre_post.append(timed(lambda: module.predict(image, depth=ladder[0], imgsz=imgsz))
                                    - timed(lambda: module(x1, depth=ladder[0])))
                log(f"profile: round {r + 1}/{rounds}: " + ", ".join(
                    f"{lab} {statistics.median(times[c][-reps:]):.1f}" for lab, c in zip(labels, ladder)) + " ms")
    finally:
        model.train(was_training)
    entries = [ProfileEntry(lab, c.code, c, gflops[c], statistics.median(times[c]), _percentile(times[c], 0.9),
                            len(times[c]), _percentile(times[c], 0.1)) for lab, c in zip(labels, ladder)]
    profile = DepthProfile(
        model=name, model_kwargs=_jsonable(getattr(model, "model_kwargs", {}) or {}),
        switches=list(space.switches), knobs=_knob_table(space), imgsz=imgsz, batch=batch, device=str(dev),
        device_name=device_name(dev), torch=torch.__version__, form=form, dtype=str(dtype).replace("torch.", ""),
        rounds=rounds, reps=reps, warmup=warmup, entries=entries, machine=machine_info(dev),
        overhead_ms=max(0.0, statistics.median(pre_post)) if pre_post else 0.0,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if path is None and weights is not None:
        path = default_profile_path(weights, imgsz, batch, dev, form, dtype)
    if path is not None:
        profile.save(path)
        log(f"profile: written {profile.path}")
    return profile


# -- selection -------------------------------------------------------------------------------------
AccuracyLike = Union[None, PathLike, Mapping[Any, Optional[float]], Any]


def accuracy_table(accuracy: AccuracyLike, metric: str = "AP") -> Dict[str, float]:
    """Config code -> accuracy from an :class:`~anydepth.evaluation.EvalReport` (its rows' code and
    ``metric``), the path of its JSON, or a mapping of codes / :class:`DepthConfig` to values.
    Rows without the metric (undefined AP) are left out."""
    if accuracy is None:
        return {}
    if isinstance(accuracy, (str, os.PathLike)):
        from .evaluation.report import EvalReport

        path = os.fspath(accuracy)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no evaluation report at {path!r}")
        try:
            accuracy = EvalReport.from_json(path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as e:
            raise ValueError(f"evaluation report {path!r} is not readable ({type(e).__name__}: {e})") from e
    rows = getattr(accuracy, "rows", None)
    if rows is not None:
        out = {}
        for r in rows:
            value = (getattr(r, "metrics", None) or {}).get(metric)
            if value is not None:
                out[str(r.code)] = float(value)
        return out
    if isinstance(accuracy, Mapping):
        out = {}
        for k, v in accuracy.items():
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"accuracy of {getattr(k, 'code', k)!r} must be a number, got {v!r}")
            out[k.code if isinstance(k, DepthConfig) else str(k)] = float(v)
        return out
    raise TypeError("accuracy must be None, an EvalReport, the path of its JSON or a mapping config code -> AP; "
                    f"got {type(accuracy).__name__}")


def ranked_entries(profile: DepthProfile, accuracy: AccuracyLike = None, metric: str = "AP") -> List[ProfileEntry]:
    """Profile entries from least to most accurate: by the accuracy table when given (ties and
    equal values by FLOPs, i.e. ladder order), else the ladder's FLOP order. With an accuracy
    table, configurations it does not cover are left out (``ValueError`` if none is covered)."""
    table = accuracy_table(accuracy, metric)
    if accuracy is None:
        return list(profile.entries)
    order = {e.code: i for i, e in enumerate(profile.entries)}
    covered = [e for e in profile.entries if e.code in table]
    if not covered:
        raise ValueError(f"the accuracy table covers none of the profiled configurations {list(order)}; it has "
                         f"{sorted(table)[:8]}: was it evaluated for this model at the ladder's depths?")
    return sorted(covered, key=lambda e: (table[e.code], order[e.code]))


def select_depth(model, budget_ms: float, profile: DepthProfile, accuracy: AccuracyLike = None,
                 stat: str = "median", metric: str = "AP", overhead: bool = False) -> DepthConfig:
    """The most accurate configuration whose profiled latency (``stat``: ``median`` or ``p90``)
    is at most ``budget_ms``. Accuracy: ``accuracy`` (an evaluation report, its JSON path or a
    mapping code -> AP; configurations it lacks are not candidates), else FLOPs (more = more
    accurate). ``overhead``: count ``predict``'s pre/post-processing too (the profile's
    ``overhead_ms``: a budget for whole ``predict`` calls of one image). ``model`` may be None
    (no check); otherwise the profile must be this model's.
    Raises :class:`BudgetError` (a ``ValueError``) naming the fastest configuration and its
    latency when none fits."""
    if not isinstance(profile, DepthProfile):
        raise TypeError(f"profile must be a DepthProfile (model.profile_depths / load_profile), "
                        f"got {type(profile).__name__}")
    if isinstance(budget_ms, bool) or not isinstance(budget_ms, (int, float)) or not budget_ms > 0 \
            or not math.isfinite(budget_ms):
        raise ValueError(f"budget_ms must be a positive number of milliseconds, got {budget_ms!r}")
    _check_stat(stat)
    if model is not None:
        profile.check(model)
    extra = profile.overhead_ms if overhead else 0.0
    fits = [e for e in ranked_entries(profile, accuracy, metric) if e.latency(stat) + extra <= budget_ms]
    if not fits:
        fastest = profile.fastest(stat)
        what = f"{stat} latency + {extra:.2f} ms predict overhead" if overhead else f"{stat} latency"
        raise BudgetError(f"no configuration fits {budget_ms:g} ms ({what}, {profile.describe()}): the "
                          f"fastest is {fastest.name} ({fastest.code}) at {fastest.latency(stat) + extra:.2f} ms")
    return fits[-1].config


# -- the controller -----------------------------------------------------------------------------
@dataclass
class ControllerStep:
    """What the controller did for one frame: the configuration it ran, the frame time measured,
    the allowance after the update and the configuration chosen for the next frame."""

    frame: int
    config: DepthConfig
    frame_ms: float
    allowance_ms: float
    next_config: DepthConfig


class DepthController:
    """Per-frame depth for a stream under a frame-time target: ``dets, config = controller(frame)``.

    ``controller(frame)`` runs ``model.predict(frame, depth=<current>, imgsz=profile.imgsz, ...)``,
    measures the whole call with ``clock`` and feeds the time to :meth:`update`, which picks the
    configuration of the next frame. :meth:`update` can also be fed frame times measured elsewhere
    (e.g. a pipeline's), and is what the tests drive with simulated times.

    The candidates are the profile's configurations that are more accurate than every faster one
    (``accuracy`` as in :func:`select_depth`, else FLOPs), ordered by their profiled frame cost
    ``L_i`` = latency + the profile's ``overhead_ms`` (``predict``'s letterbox and NMS). The
    controller keeps an *allowance* ``a`` in profile milliseconds and runs the most accurate
    candidate with ``L_i <= a``. Per frame, with ``y`` the measured time of candidate ``i``:

    * load ratio ``r = median of the last `window` values of y / L_i`` (a median, so single
      slow frames do not move it); filtered frame time ``y_f = r * L_i``;
    * PI update in velocity form on the relative error ``e = (target - y_f) / target`` (clipped
      to [-1, 1]): ``a *= exp(kp * (e - e_prev) + ki * e)``;
    * anti-windup: ``a`` stays within ``[L_0 / (1 + h), (target / r) * (1 + h)]`` (``target / r``
      is the allowance at which the current load would exactly fill the target, so the integral
      cannot climb to a candidate predicted not to fit: no limit cycle between neighbours), and
      within ``L_last * (1 + h)``;
    * switching, with hysteresis ``h``: down as soon as ``a < L_i / (1 + h/2)`` (to the most
      accurate candidate with ``L_j <= min(a, target / r)``, at least one step); up only when ``a >= L_j * (1 + h)``
      for a deeper ``j`` **and** ``dwell`` frames have passed since the last switch (the band and
      the dwell time keep it from toggling between neighbours on noise).

    ``clock``: seconds, monotonic (default ``time.perf_counter``); inject a simulated clock to
    test deterministically. ``history`` keeps the last ``keep`` :class:`ControllerStep` records;
    :attr:`switches` counts changes of configuration.
    """

    def __init__(self, model, target_ms: float, profile: DepthProfile, *, accuracy: AccuracyLike = None,
                 kp: float = 0.5, ki: float = 0.1, hysteresis: float = 0.1, dwell: int = 10, window: int = 5,
                 stat: str = "median", clock: Callable[[], float] = time.perf_counter, keep: int = 10000,
                 **predict_kwargs):
        if not isinstance(profile, DepthProfile):
            raise TypeError(f"profile must be a DepthProfile, got {type(profile).__name__}")
        if isinstance(target_ms, bool) or not isinstance(target_ms, (int, float)) or not target_ms > 0 \
                or not math.isfinite(target_ms):
            raise ValueError(f"target_ms must be a positive number of milliseconds, got {target_ms!r}")
        for name, value in (("kp", kp), ("ki", ki)):
            if not isinstance(value, (int, float)) or not 0 <= value <= 5:
                raise ValueError(f"{name} must be a number in [0, 5], got {value!r}")
        if not isinstance(hysteresis, (int, float)) or not 0 <= hysteresis <= 0.5:
            raise ValueError(f"hysteresis must be in [0, 0.5], got {hysteresis!r}")
        for name, value in (("dwell", dwell), ("window", window), ("keep", keep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        _check_stat(stat)
        if model is not None:
            profile.check(model)
        self.model, self.profile, self.target_ms = model, profile, float(target_ms)
        self.kp, self.ki, self.h, self.dwell, self.window = float(kp), float(ki), float(hysteresis), dwell, window
        self.down_band = 1.0 + self.h / 2  # down when the allowance is below L_i / (1 + h/2)
        self.clock, self.keep, self.predict_kwargs = clock, keep, predict_kwargs
        # Pareto candidates: by latency, each more accurate than every faster one
        ranked = ranked_entries(profile, accuracy)
        rank = {e.code: i for i, e in enumerate(ranked)}
        by_latency = sorted(ranked, key=lambda e: (e.latency(stat), rank[e.code]))
        self.candidates: List[ProfileEntry] = []
        for e in by_latency:
            if not self.candidates or rank[e.code] > rank[self.candidates[-1].code]:
                if self.candidates and e.latency(stat) == self.candidates[-1].latency(stat):
                    self.candidates[-1] = e  # as fast and more accurate
                else:
                    self.candidates.append(e)
        # what a frame of each candidate costs by the profile: network latency + predict()'s overhead
        self.latencies = [max(e.latency(stat) + profile.overhead_ms, 1e-6) for e in self.candidates]
        self.reset()

    def reset(self) -> None:
        """Back to the start: no load seen, the most accurate candidate that fits the target by the
        profile (the fastest if none does)."""
        self.allowance = self._clamp(self.target_ms, 1.0)
        self.index = self._fitting(self.allowance)
        self._ratios: List[float] = []
        self._e_prev = 0.0
        self._since_switch = 0
        self.frames = 0
        self.switches = 0
        self.history: Deque[ControllerStep] = collections.deque(maxlen=self.keep)

    @property
    def config(self) -> DepthConfig:
        """The configuration the next frame runs at."""
        return self.candidates[self.index].config

    @property
    def load_ratio(self) -> float:
        """Measured frame time over profiled latency (median of the window); 1.0 before any frame."""
        return statistics.median(self._ratios) if self._ratios else 1.0

    def _fitting(self, allowance: float) -> int:
        fit = [i for i, lat in enumerate(self.latencies) if lat <= allowance]
        return fit[-1] if fit else 0

    def _clamp(self, a: float, ratio: float) -> float:
        lo = self.latencies[0] / (1 + self.h)
        hi = min(self.latencies[-1], self.target_ms / ratio) * (1 + self.h)
        return min(max(a, lo), max(hi, lo))

    def update(self, frame_ms: float) -> DepthConfig:
        """Feed the measured time of one frame run at :attr:`config`; returns the configuration
        for the next frame."""
        if isinstance(frame_ms, bool) or not isinstance(frame_ms, (int, float)) or not math.isfinite(frame_ms) \
                or frame_ms < 0:
            raise ValueError(f"frame_ms must be a finite non-negative number, got {frame_ms!r}")
        ran = self.index
        self._ratios.append(frame_ms / self.latencies[ran])
        del self._ratios[:-self.window]
        ratio = max(self.load_ratio, 1e-6)
        e = min(1.0, max(-1.0, (self.target_ms - ratio * self.latencies[ran]) / self.target_ms))
        self.allowance = self._clamp(self.allowance * math.exp(self.kp * (e - self._e_prev) + self.ki * e), ratio)
        self._e_prev = e
        self._since_switch += 1
        target = self._fitting(self.allowance)
        if self.allowance * self.down_band < self.latencies[ran]:  # over budget: down at once, to what fits
            new = min(self._fitting(min(self.allowance, self.target_ms / ratio)), ran - 1) if ran > 0 else 0
        elif target > ran and self._since_switch >= self.dwell:
            up = [j for j in range(ran + 1, len(self.latencies)) if self.latencies[j] * (1 + self.h) <= self.allowance]
            new = up[-1] if up else ran
        else:
            new = ran
        if new != ran:
            self.index = new
            self.switches += 1
            self._since_switch = 0
            self._ratios = [ratio]  # the load carries over; the new candidate's own times refine it
        self.frames += 1
        self.history.append(ControllerStep(self.frames - 1, self.candidates[ran].config, float(frame_ms),
                                           self.allowance, self.config))
        return self.config

    def __call__(self, frame) -> Tuple[Any, DepthConfig]:
        """Detect in one frame at the current depth; returns ``(detections, config used)``."""
        if self.model is None:
            raise TypeError("this DepthController has no model: feed frame times to update() instead")
        config = self.config
        t0 = self.clock()
        dets = self.model.predict(frame, depth=config, imgsz=self.profile.imgsz, **self.predict_kwargs)
        self.update((self.clock() - t0) * 1e3)
        single = not isinstance(frame, (list, tuple)) and getattr(frame, "ndim", 3) != 4
        return (dets[0] if single and len(dets) == 1 else dets), config


# -- depth arguments from the command line ---------------------------------------------------------
def parse_depth(model, text: str) -> Union[str, float, DepthConfig]:
    """A depth given as text: ``base``/``full``, a number in [0, 1] (ladder position) or a config
    code (``TTFF...``, knobs as ``-decoder_layers4``, as :attr:`DepthConfig.code` writes them)."""
    t = text.strip()
    if t.lower() in ("base", "full"):
        return t.lower()
    try:
        value = float(t)
    except ValueError:
        pass
    else:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"a numeric depth must be in [0, 1] (0 = base, 1 = full), got {text!r}")
        return value
    space = model.depth_space
    parts = t.split("-")
    letters = parts[0].upper()
    if len(letters) != len(space.switches) or set(letters) - {"T", "F"}:
        raise ValueError(f"depth {text!r} is not base, full, a number in [0, 1] or a config code of "
                         f"{len(space.switches)} letters T (skip) / F (run) for {list(space.switches)}")
    knobs = {}
    for part in parts[1:]:
        for k in space.knob_specs:
            if part.startswith(k) and part[len(k):].isdigit():
                knobs[k] = int(part[len(k):])
                break
        else:
            raise ValueError(f"depth {text!r}: {part!r} is not a knob value (knobs: {list(space.knob_specs)}, "
                             f"written as e.g. -{next(iter(space.knob_specs), 'knob')}4)")
    return space.make({s: c == "T" for s, c in zip(space.switches, letters)}, knobs)


# -- a real-load demonstration (`anydepth budget-demo`) --------------------------------------------
def _burn(stop, duty: float = 1.0) -> None:
    """A busy loop in a child process: ``duty`` of one core (busy ``duty`` of every 20 ms)."""
    while not stop.is_set():
        end = time.perf_counter() + 0.02 * duty
        while time.perf_counter() < end:
            pass
        if duty < 1.0:
            time.sleep(0.02 * (1.0 - duty))


def _phase_stats(times: Sequence[float], labels: Sequence[str], target_ms: float, settle: int) -> Dict[str, Any]:
    settled = list(times[settle:]) or list(times)
    counts: Dict[str, int] = {}
    for lab in labels[settle:] or labels:
        counts[lab] = counts.get(lab, 0) + 1
    switches = sum(1 for a, b in zip(labels, labels[1:]) if a != b)
    return {"frames": len(times), "settled_from": settle, "median_ms": statistics.median(settled),
            "p95_ms": _percentile(settled, 0.95), "over_target": sum(t > target_ms for t in settled) / len(settled),
            "depths": counts, "switches": switches}


def demo_under_load(model, profile: DepthProfile, target_ms: Optional[float] = None, frames: int = 240,
                    burners: int = 2, compare_fixed: bool = True, progress: bool = False, settle: int = 15,
                    seed: int = 0, duty: float = 1.0, **controller_options) -> Dict[str, Any]:
    """Stream one synthetic ``imgsz`` frame through a :class:`DepthController` for ``frames``
    frames: the first third without load, the middle third with ``burners`` busy-looping
    processes competing for the CPU (each busy ``duty`` of the time), the last third without
    them again; with ``compare_fixed``, the same again at the fixed depth :func:`select_depth`
    picks for ``target_ms`` from the profile. Returns per-phase statistics (median and p95 frame
    time after ``settle`` frames, share of frames over the target, depths used, switches) and a
    printable ``text``. Measured wall-clock times: the numbers depend on the machine and on what
    else runs on it."""
    import multiprocessing

    if frames < 30:
        raise ValueError(f"demo_under_load: frames must be >= 30, got {frames}")
    if not 0.0 < duty <= 1.0:
        raise ValueError(f"demo_under_load: duty must be in (0, 1], got {duty}")
    profile.check(model)
    if target_ms is None:
        target_ms = round(1.1 * profile.frame_ms(profile.entries[-1].config), 1)  # full fits without load
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    rng = torch.Generator().manual_seed(seed)
    frame = (torch.rand(profile.imgsz, profile.imgsz, 3, generator=rng) * 255).to(torch.uint8).numpy()
    label = {e.config: e.name for e in profile.entries}
    third = frames // 3
    burn = f"{burners} burner process(es)" + (f" at {duty:.0%}" if duty < 1 else "")
    phases = [("no load", third), (burn, third), ("no load again", frames - 2 * third)]
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    model.eval()

    def run(step: Callable[[], Tuple[float, DepthConfig]], what: str) -> List[Dict[str, Any]]:
        out = []
        for name, n in phases:
            procs, stop = [], None
            if "burner" in name:
                stop = ctx.Event()
                procs = [ctx.Process(target=_burn, args=(stop, duty), daemon=True) for _ in range(burners)]
                for p in procs:
                    p.start()
            times, labels = [], []
            try:
                for _ in range(n):
                    ms, config = step()
                    times.append(ms)
                    labels.append(label.get(config, config.code))
            finally:
                if stop is not None:
                    stop.set()
                    for p in procs:
                        p.join(5)
            stats = _phase_stats(times, labels, target_ms, min(settle, n // 2))
            stats["phase"] = name
            out.append(stats)
            log(f"budget-demo: {what}, {name}: median {stats['median_ms']:.1f} ms, p95 {stats['p95_ms']:.1f} ms, "
                f"depths {stats['depths']}")
        return out

    controller = DepthController(model, target_ms, profile, **controller_options)
    with torch.inference_mode():
        model.predict(frame, depth="base", imgsz=profile.imgsz)  # first-call costs out of the stream

        def controlled():
            _, config = controller(frame)
            return controller.history[-1].frame_ms, config

        result: Dict[str, Any] = {"target_ms": target_ms, "imgsz": profile.imgsz, "frames": frames,
                                  "profile": profile.to_json(), "duty": duty,
                                  "burners": burners, "threads": torch.get_num_threads(),
                                  "machine": profile.machine.get("cpu", profile.device_name),
                                  "controller": run(controlled, "controller"),
                                  "controller_switches": controller.switches}
        fixed = None
        if compare_fixed:
            try:
                fixed = select_depth(model, target_ms, profile)
            except BudgetError:
                fixed = profile.fastest().config

            def at_fixed():
                t0 = time.perf_counter()
                model.predict(frame, depth=fixed, imgsz=profile.imgsz)
                return (time.perf_counter() - t0) * 1e3, fixed

            result["fixed_depth"] = label.get(fixed, fixed.code)
            result["fixed"] = run(at_fixed, f"fixed depth {result['fixed_depth']}")
    lines = [f"{profile.model} at {profile.imgsz}x{profile.imgsz} on {result['machine']}, {result['threads']} "
             f"torch threads; target {target_ms:g} ms per frame (profiled predict() overhead "
             f"{profile.overhead_ms:.1f} ms); phases of {third} frames; statistics after the first {settle} frames "
             "of each phase",
             "| run | phase | median ms | p95 ms | frames over target | depths used | switches |",
             "|---|---|---:|---:|---:|---|---:|"]
    runs = [("controller", result["controller"])] + ([(f"fixed {result['fixed_depth']}", result["fixed"])]
                                                     if fixed is not None else [])
    for what, stats in runs:
        for s in stats:
            depths = ", ".join(f"{k} {v}" for k, v in sorted(s["depths"].items(), key=lambda kv: -kv[1]))
            lines.append(f"| {what} | {s['phase']} | {s['median_ms']:.1f} | {s['p95_ms']:.1f} | "
                         f"{100 * s['over_target']:.0f}% | {depths} | {s['switches']} |")
    result["text"] = "\n".join(lines)
    return result
