"""The per-depth evaluation run: :func:`evaluate` resolves the depths, runs ``predict`` over the data
set at each one (:func:`_predict_depth`), scores it (:func:`~anydepth.evaluation.coco.coco_evaluate`)
and collects one :class:`~anydepth.evaluation.report.EvalRow` per depth into the report."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..depth import DepthConfig
from .coco import BACKENDS, coco_evaluate
from .report import UNITS, EvalReport, EvalRow


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


def _given_profile(profile, model, imgsz: int, configs: List[DepthConfig]):
    """The :class:`~anydepth.budget.DepthProfile` given to :func:`evaluate` (or the path of its
    JSON), checked against the model and ``imgsz``; it must hold every configuration scored."""
    from ..budget import DepthProfile

    if isinstance(profile, (str, os.PathLike)):
        profile = DepthProfile.load(profile)
    if not isinstance(profile, DepthProfile):
        raise TypeError(f"evaluate: profile must be a DepthProfile or the path of its JSON, "
                        f"got {type(profile).__name__}")
    if getattr(model, "depth_space", None) is None:
        raise TypeError(f"evaluate: a depth profile needs an any-depth model; {type(model).__name__} has no "
                        "depth_space")
    profile.check(model, imgsz=imgsz)
    have = {e.config for e in profile.entries}
    missing = [c.code for c in configs if c not in have]
    if missing:
        raise ValueError(f"evaluate: the depth profile {profile.path or ''!s} lacks the configurations {missing}; it "
                         f"has {[e.code for e in profile.entries]} (profile them: model.profile_depths(configs=...))")
    return profile


def _can_time(model, is_module: bool) -> bool:
    return is_module and getattr(model, "depth_space", None) is not None and \
        callable(getattr(model, "depth_configs", None)) and callable(getattr(model, "resolve_depth", None))


def _measure_latency(model, configs: List[DepthConfig], imgsz: int, batch: int, dev, form: str, rounds: int,
                     reps: int, warmup: int):
    """Every configuration scored, timed as the benchmarks time (:func:`anydepth.budget.profile_depths`:
    warm-up, then ``rounds`` interleaved rounds of ``reps`` calls each)."""
    from ..budget import profile_depths

    return profile_depths(model, imgsz=imgsz, batch=batch, device=dev, form=form, rounds=rounds, reps=reps,
                          warmup=warmup, overhead=False, configs=configs)


def _fill_latency(rows: List[EvalRow], depths: List[Any], profile) -> None:
    for row, depth in zip(rows, depths):
        e = profile.entry(depth)
        row.latency_ms, row.latency_p10_ms, row.latency_p90_ms = e.median_ms, e.p10_ms, e.p90_ms


def _time_rows(rows: List[EvalRow], configs: List[DepthConfig], given, can_time: bool, model, imgsz: int,
               batch: int, dev, form: str, rounds: int, reps: int, warmup: int, bar):
    """After scoring: fill the rows' latency from ``given`` (a checked DepthProfile) or by timing
    ``configs`` (:func:`_measure_latency`). Returns (the report's latency info or None, the batch)."""
    if not can_time:
        return None, batch
    if bar is not None:
        bar.set_postfix_str(f"latency ({rounds} rounds)" if given is None else "latency: profile")
    timing = given if given is not None else _measure_latency(model, configs, imgsz, batch, dev, form, rounds, reps,
                                                               warmup)
    _fill_latency(rows, configs, timing)
    return _latency_info(timing, given is not None), timing.batch


def _latency_info(profile, given: bool) -> Dict[str, Any]:
    return {"source": "profile" if given else "measured", "profile": profile.path if given else None,
            "form": profile.form, "batch": profile.batch, "imgsz": profile.imgsz, "device": profile.device,
            "device_name": profile.device_name, "dtype": profile.dtype, "rounds": profile.rounds,
            "reps": profile.reps, "warmup": profile.warmup, "samples": min(e.samples for e in profile.entries),
            "torch": profile.torch, "created": profile.created}


def _check_args(model, dataset, imgsz, batch_size, conf, max_det, latency_batch, max_images, backend,
                latency_reps, latency_warmup, latency_rounds, latency_form) -> None:
    if not callable(getattr(model, "predict", None)):
        raise TypeError(f"evaluate: the model ({type(model).__name__}) has no predict(images, depth=, conf=, imgsz=, "
                        "max_det=) method")
    _check_dataset(dataset)
    for name, value in (("imgsz", imgsz), ("batch_size", batch_size), ("max_det", max_det),
                        ("latency_batch", latency_batch), ("latency_reps", latency_reps),
                        ("latency_rounds", latency_rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"evaluate: {name} must be a positive int, got {value!r}")
    if isinstance(latency_warmup, bool) or not isinstance(latency_warmup, int) or latency_warmup < 0:
        raise ValueError(f"evaluate: latency_warmup must be an int >= 0, got {latency_warmup!r}")
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0.0 <= conf <= 1.0:
        raise ValueError(f"evaluate: conf must be in [0, 1], got {conf!r}")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"evaluate: max_images must be a positive int or None, got {max_images!r}")
    from ..budget import FORMS

    if latency_form not in FORMS:
        raise ValueError(f"evaluate: latency_form must be one of {list(FORMS)}, got {latency_form!r}")
    if backend not in BACKENDS:
        raise ValueError(f"evaluate: unknown COCO evaluation backend {backend!r}; valid: {list(BACKENDS)}")


def _predict_depth(model, dataset, depth, batches: List[List[int]], known_ids: Optional[set], conf: float,
                   imgsz: int, max_det: int, category_of, bar) -> Tuple[List[dict], List, float]:
    """``model.predict`` over every batch at one depth: ``(COCO results, image ids in order,
    seconds)``. ``known_ids``: when given, every image id must be one of them (checked on the
    first depth run)."""
    results: List[dict] = []
    ids_seen: List = []
    t0 = time.perf_counter()
    for idx in batches:
        images, ids = [], []
        for i in idx:
            img, image_id = dataset.load_original(i)
            images.append(img)
            ids.append(image_id)
        if known_ids is not None:
            unknown = [i for i in ids if i not in known_ids]
            if unknown:
                raise ValueError(f"evaluate: image ids {unknown[:5]} from dataset.load_original are not in "
                                 "dataset.coco_ground_truth()['images']")
        with torch.no_grad():
            preds = model.predict(images, depth=depth, conf=conf, imgsz=imgsz, max_det=max_det)
        results.extend(_to_coco_results(preds, ids, category_of))
        ids_seen.extend(ids)
        if bar is not None:
            bar.update(1)
    return results, ids_seen, time.perf_counter() - t0


def _restrict_ground_truth(gt_all: Mapping, image_ids: List, n: int) -> dict:
    """The ground truth of the evaluated images only."""
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("evaluate: dataset.load_original returned the same image id for several images")
    keep = set(image_ids)
    gt = dict(gt_all, images=[im for im in gt_all["images"] if im.get("id") in keep],
              annotations=[a for a in gt_all["annotations"] if a.get("image_id") in keep])
    if not gt["annotations"]:
        raise ValueError(f"evaluate: the {n} evaluated images have no ground-truth objects: COCO AP is "
                         "undefined (evaluate more images: max_images)")
    return gt


def _depth_row(model, label: str, depth, metrics, num_detections: int, predict_s: float, shape) -> EvalRow:
    """One report row: the scored metrics plus the depth's GFLOPs (latency is filled in later, when
    every depth has been scored: :func:`_fill_latency`)."""
    gflops = None
    if callable(getattr(model, "flops", None)):
        gflops = model.flops(depth, shape) / 1e9
    if isinstance(depth, DepthConfig):
        code, skipped = depth.code, [k for k, v in depth.skip.items() if v]
        num_switches, knobs = len(depth.skip), dict(depth.knobs)
    else:
        code, skipped, num_switches, knobs = (str(depth) if depth is not None else "full"), [], None, {}
    return EvalRow(label, code, skipped, num_switches, knobs, gflops, None, metrics, num_detections, predict_s)


def _run_notes(model, measure_latency: bool, can_time: bool, imgsz: int, latency: Optional[Dict[str, Any]]
               ) -> List[str]:
    notes: List[str] = []
    if measure_latency and not can_time:
        notes.append("latency not measured: the model is not an AnyDepthModel module (model(x, depth=...))")
    if not callable(getattr(model, "flops", None)):
        notes.append("GFLOPs not counted: the model has no flops()")
    else:
        notes.append(f"GFLOPs: one forward of one {imgsz}x{imgsz} image (multiply-add = 2 FLOPs)")
    notes.append("AP columns in percent (0-100; the JSON keeps fractions in [0, 1]), COCO protocol: at most 100 "
                 "detections per image and class counted; '-' = undefined (no ground-truth object of that size)")
    if latency is not None:
        how = (f"{latency['rounds']} interleaved rounds (every depth {latency['reps']} call(s) per round, "
               f"{latency['samples']} timed calls each) after {latency['warmup']} warm-up call(s)")
        what = (f"network forward only (batch {latency['batch']}, {latency['imgsz']}x{latency['imgsz']}, "
                f"{latency['form']} form, {latency['dtype']}, no pre/post-processing)")
        if latency["source"] == "profile":
            notes.append(f"latency: from the depth profile {latency['profile']} measured on {latency['device']} "
                         f"({latency['device_name']}, torch {latency['torch']}, {latency['created']}): {what}; "
                         f"median and p10-p90 of {how}")
        else:
            notes.append(f"latency: {what} on {latency['device']} ({latency['device_name']}), measured after "
                         f"scoring: median and p10-p90 of {how}")
    return notes


def _progress_bar(total: int, progress: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional (the `data` extra): no progress bar
        return None
    return tqdm(total=total, desc="evaluate", unit="batch", file=sys.stderr, disable=not progress)


def _build_report(model, dataset, n: int, imgsz: int, batch_size: int, conf: float, max_det: int, dev,
                  latency_batch: Optional[int], backend: str, rows: List[EvalRow], notes: List[str],
                  latency: Optional[Dict[str, Any]]) -> EvalReport:
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
                      latency_batch, backend, rows, machine, notes, latency=latency or {}, units=dict(UNITS))


def evaluate(model, dataset, depths=None, imgsz: int = 640, batch_size: int = 8, conf: float = 0.001,
             max_det: int = 300, device=None, progress: bool = True, measure_latency: bool = True,
             latency_batch: int = 1, max_images: Optional[int] = None, backend: str = "pycocotools",
             latency_reps: int = 2, latency_warmup: int = 2, verbose: bool = False, latency_rounds: int = 10,
             latency_form: str = "eager", profile=None) -> EvalReport:
    """COCO metrics, GFLOPs and latency of ``model`` at each depth on ``dataset``. For a classifier
    (``model.task == "classify"``): top-1/top-5 accuracy instead, see
    :func:`anydepth.evaluation.classify.evaluate_classifier` (same latency options).

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
      has ``flops``.
    * Latency (``latency_ms`` = median, ``latency_p10_ms``/``latency_p90_ms``) of the network
      forward ``model(x, depth=...)`` on a random ``[latency_batch, 3, imgsz, imgsz]`` batch, no
      pre/post-processing, for :class:`~anydepth.model.AnyDepthModel`-like modules. Either read
      from ``profile`` (a :class:`~anydepth.budget.DepthProfile` or the path of its JSON, e.g. one
      measured on the deployment device: it must be this model's, at ``imgsz``, and hold every
      configuration scored; its batch replaces ``latency_batch``), or (``measure_latency``)
      measured after every depth has been scored, as the benchmarks measure
      (:func:`anydepth.budget.profile_depths` over the scored configurations, in ``latency_form``):
      ``latency_warmup`` calls per configuration, then ``latency_rounds`` rounds in which every
      configuration runs ``latency_reps`` times in turn, so that drift of the machine hits them
      alike (CUDA-event timed on GPU). The notes and ``report.latency`` say which.
    * ``device``: where to run (a module is moved there); default the model's device.
      A module is put in eval mode for the run and its train/eval mode restored afterwards.
    * ``progress``: a tqdm bar over depths x batches (stderr). ``verbose``: pycocotools' output.

    Raises ``TypeError`` for a model without ``predict`` or a dataset missing the contract's
    methods, ``ValueError`` for an empty dataset, a ground truth without annotations or image ids
    the ground truth lacks, bad sizes, a profile of another model / size or lacking a
    configuration (before anything runs); errors of ``predict`` itself propagate.
    """
    if getattr(model, "task", None) == "classify":   # an any-depth classifier: top-1/top-5 accuracy
        from .classify import evaluate_classifier

        return evaluate_classifier(model, dataset, depths=depths, imgsz=imgsz, batch_size=batch_size, device=device,
                                   progress=progress, measure_latency=measure_latency, latency_batch=latency_batch,
                                   max_images=max_images, latency_reps=latency_reps, latency_warmup=latency_warmup,
                                   latency_rounds=latency_rounds, latency_form=latency_form, profile=profile)
    _check_args(model, dataset, imgsz, batch_size, conf, max_det, latency_batch, max_images, backend,
                latency_reps, latency_warmup, latency_rounds, latency_form)
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
        configs = [d for _, d in entries if isinstance(d, DepthConfig)]
        given = _given_profile(profile, model, imgsz, configs) if profile is not None else None
        can_time = given is not None or (measure_latency and _can_time(model, is_module)
                                         and len(configs) == len(entries))
        stride = getattr(model, "stride", 1)
        off_stride = given is None and can_time and isinstance(stride, int) and stride > 1 and imgsz % stride != 0
        can_time = can_time and not off_stride  # profile_depths times stride multiples only: known now, not later
        batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        bar = _progress_bar(len(entries) * len(batches), progress)

        categories: Dict[int, Any] = {}

        def category_of(label: int):
            if label not in categories:
                try:
                    categories[label] = dataset.category_id(label)
                except (ValueError, IndexError, KeyError) as e:
                    raise ValueError(f"evaluate: the model predicted label {label}, for which the dataset has no "
                                     f"category ({e}); does the model's num_classes match the dataset's?") from e
            return categories[label]

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
            results, ids_seen, predict_s = _predict_depth(model, dataset, depth, batches,
                                                          gt_image_ids if gt is None else None, conf, imgsz,
                                                          max_det, category_of, bar)
            if gt is None:
                gt = _restrict_ground_truth(gt_all, ids_seen, n)
            metrics = coco_evaluate(gt, results, backend=backend, verbose=verbose)
            row = _depth_row(model, label, depth, metrics, len(results), predict_s, shape)
            done[key] = row
            rows.append(row)
        latency, latency_batch = _time_rows(rows, configs, given, can_time, model, imgsz, latency_batch, dev,
                                            latency_form, latency_rounds, latency_reps, latency_warmup, bar)
        if bar is not None:
            bar.close()
    finally:
        if is_module and was_training:
            model.train()
    notes = _run_notes(model, measure_latency or profile is not None, can_time or off_stride, imgsz, latency)
    if off_stride:
        notes.append(f"latency not measured: imgsz {imgsz} is not a multiple of the model's stride {stride}")
    return _build_report(model, dataset, n, imgsz, batch_size, conf, max_det, dev,
                         latency_batch if can_time else None, backend, rows, notes, latency)
