"""``anydepth predict``: run a model on an image, a folder of images or a video, save annotated
copies and a COCO-style JSON of the detections.

    from anydepth.predict import run_predict
    summary = run_predict(model, "photos/", "runs/predict", depth="base")           # a fixed depth
    summary = run_predict(model, "clip.mp4", "runs/predict", budget_ms=40, profile=profile)

* Sources: an image file, a directory (its image and video files, sorted by name; other files are
  ignored, subdirectories are not entered) or a video file. Images are read with Pillow
  (``data`` extra), turned upright by their EXIF orientation and converted to 8-bit RGB (grayscale,
  palette, RGBA with the alpha dropped, CMYK, 16-bit); videos are read and written with PyAV
  (``video`` extra), frames as ``HxWx3`` uint8 RGB. A file that cannot be read is reported by name
  (stderr and the JSON's ``errors``) and the run goes on.
* Depth: a fixed ``depth`` (anything ``model.predict`` takes), or ``budget_ms`` with a
  :class:`~anydepth.budget.DepthProfile`: a :class:`~anydepth.budget.DepthController` then picks
  the depth of every image / frame, in order, as one stream.
* Output in ``save``: every image annotated (boxes, labels, scores) under its own name (formats
  Pillow cannot write become ``.png``), every video as ``<stem>.mp4``, and ``predictions.json``:
  ``info``, ``categories`` (``id`` = the model's label), ``images`` (one per image or video frame,
  with ``file_name``, ``width``, ``height``, ``frame`` for video frames, the ``depth`` code used and
  the ``latency_ms`` of the ``predict`` call), ``annotations`` (COCO ``bbox`` = x, y, w, h in
  pixels, ``score``, ``category_id``) and ``errors`` (``file``, ``error``).
* Classifiers (``model.task == "classify"``): each image / frame gets its top-``topk`` classes
  instead of boxes: written on the annotated copy (a tag at the top-left corner, one ``name
  score`` line per class) and in the JSON as the image's ``classes`` (``category_id``, ``name``
  when names are known, ``score`` = softmax probability, by decreasing score); no
  ``annotations``. ``conf`` is not used.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from fractions import Fraction
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ._optional import require

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
WRITABLE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

#: box colours, one per label (cycled)
PALETTE = [(255, 56, 56), (255, 157, 151), (255, 112, 31), (255, 178, 29), (207, 210, 49), (72, 249, 10),
           (146, 204, 23), (61, 219, 134), (26, 147, 52), (0, 212, 187), (44, 153, 168), (0, 194, 255),
           (52, 69, 147), (100, 115, 255), (0, 24, 236), (132, 56, 255), (82, 0, 133), (203, 56, 255),
           (255, 149, 200), (255, 55, 199)]


# -- reading ------------------------------------------------------------------------------------
def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """An image array as ``HxWx3`` uint8 RGB: ``HxW`` / ``HxWx1`` grayscale repeated, ``HxWx4``
    RGBA with the alpha dropped; uint16 scaled from 0..65535, bool to 0/255, floats taken as
    0..1 when their maximum is at most 1, else 0..255 (clipped)."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"expected an image HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[..., :3]
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):  # Pillow's 32-bit "I" mode: 16-bit PNGs open as this
        return ((np.clip(a, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError("the image contains NaN or infinite values")
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {a.dtype}")


def read_image(path: str) -> np.ndarray:
    """Read an image file as ``HxWx3`` uint8 RGB, upright by its EXIF orientation (see
    :func:`to_rgb_uint8` for 16-bit and float files). A file Pillow cannot open raises ``OSError``
    naming it, whatever hook failed on the way (Ultralytics, once imported, patches ``Image.open`` to
    install a HEIF plugin on unidentified files, and that raises ModuleNotFoundError offline)."""
    Image = require("PIL.Image", "reading images")
    ImageOps = require("PIL.ImageOps", "reading images")
    try:
        opened = Image.open(path)
    except OSError:
        raise
    except Exception as e:
        raise OSError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    with opened as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            return to_rgb_uint8(np.asarray(im))
        if im.mode in ("LA", "La"):
            im = im.convert("L")
        return np.asarray(im.convert("RGB"))


def video_frames(path: str) -> Iterator[np.ndarray]:
    """Decode the first video stream of ``path``, frame by frame, as ``HxWx3`` uint8 RGB (PyAV)."""
    av = require("av", "reading videos")
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


def video_info(path: str) -> Tuple[Fraction, int]:
    """``(frame rate, frame count)`` of the first video stream (count 0 when the file does not say)."""
    av = require("av", "reading videos")
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        s = container.streams.video[0]
        rate = s.average_rate or s.guessed_rate or Fraction(25)
        return Fraction(rate), int(s.frames or 0)


class VideoWriter:
    """Write ``HxWx3`` uint8 RGB frames to a video file with PyAV (H.264 where the build has
    libx264, else MPEG-4 Part 2), ``yuv420p``; odd sizes are padded by one pixel row/column."""

    def __init__(self, path: str, fps: float = 25.0):
        self.av = require("av", "writing videos")
        self.path, self.fps = path, Fraction(fps).limit_denominator(1001)
        self.container = None
        self.stream = None
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"VideoWriter: frames must be HxWx3 uint8, got {frame.shape} {frame.dtype}")
        h, w = frame.shape[:2]
        if h % 2 or w % 2:
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)))
        if self.container is None:
            self.container = self.av.open(self.path, mode="w")
            codec = "libx264" if "libx264" in self.av.codecs_available else "mpeg4"
            self.stream = self.container.add_stream(codec, rate=self.fps)
            self.stream.width, self.stream.height = frame.shape[1], frame.shape[0]
            self.stream.pix_fmt = "yuv420p"
        elif (frame.shape[1], frame.shape[0]) != (self.stream.width, self.stream.height):
            raise ValueError(f"VideoWriter: frame size {frame.shape[1]}x{frame.shape[0]} differs from the "
                             f"first frame's {self.stream.width}x{self.stream.height}")
        for packet in self.stream.encode(self.av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
            self.container = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- drawing ------------------------------------------------------------------------------------
def draw_detections(image: np.ndarray, dets, names: Optional[Sequence[str]] = None) -> np.ndarray:
    """A copy of ``image`` (``HxWx3`` uint8) with every detection drawn: its box, and its label
    and score on a filled tag above it (inside the image)."""
    Image = require("PIL.Image", "drawing detections")
    ImageDraw = require("PIL.ImageDraw", "drawing detections")
    ImageFont = require("PIL.ImageFont", "drawing detections")
    im = Image.fromarray(to_rgb_uint8(image))
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    h, w = image.shape[:2]
    lw = max(1, round((h + w) / 2 * 0.003))
    boxes = dets.boxes.detach().cpu().tolist()
    scores = dets.scores.detach().cpu().tolist()
    labels = dets.labels.detach().cpu().tolist()
    for (x0, y0, x1, y1), s, l in zip(boxes, scores, labels):
        color = PALETTE[int(l) % len(PALETTE)]
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=color, width=lw)
        text = f"{_name(names, int(l))} {s:.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0 + 4, ty1 - ty0 + 4
        top = y0 - th if y0 - th >= 0 else y0
        left = min(max(0, x0), max(0, w - tw))
        draw.rectangle([left, top, left + tw, top + th], fill=color)
        draw.text((left + 2 - tx0, top + 2 - ty0), text, fill=(255, 255, 255), font=font)
    return np.asarray(im)


def draw_classes(image: np.ndarray, cls, names: Optional[Sequence[str]] = None) -> np.ndarray:
    """A copy of ``image`` (``HxWx3`` uint8) with a classifier's top classes (a
    :class:`~anydepth.classify.Classification`) written in a filled tag at its top-left corner,
    one ``name score`` line per class, best first."""
    Image = require("PIL.Image", "drawing classes")
    ImageDraw = require("PIL.ImageDraw", "drawing classes")
    ImageFont = require("PIL.ImageFont", "drawing classes")
    im = Image.fromarray(to_rgb_uint8(image))
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    labels = cls.labels.detach().cpu().tolist()
    scores = cls.scores.detach().cpu().tolist()
    if labels:
        text = "\n".join(f"{_name(names, int(lab))} {s:.2f}" for lab, s in zip(labels, scores))
        x0, y0, x1, y1 = draw.multiline_textbbox((0, 0), text, font=font)
        draw.rectangle([0, 0, x1 - x0 + 4, y1 - y0 + 4], fill=PALETTE[int(labels[0]) % len(PALETTE)])
        draw.multiline_text((2 - x0, 2 - y0), text, fill=(255, 255, 255), font=font)
    return np.asarray(im)


def default_imgsz(model) -> int:
    """The input side a model is run at when none is given: its ``default_input_shape`` (640 for
    the detectors, 224 for the classifiers, a ViT/Swin its ``img_size``)."""
    return int(getattr(model, "default_input_shape", (1, 3, 640, 640))[-1])


def _name(names: Optional[Sequence[str]], label: int) -> str:
    return str(names[label]) if names is not None and 0 <= label < len(names) else str(label)


# -- the run ------------------------------------------------------------------------------------
def list_sources(source: str) -> Tuple[List[Tuple[str, str]], List[str]]:
    """``([(path, "image" | "video")], ignored file names)`` for a file or a directory."""
    source = os.fspath(source)
    if os.path.isdir(source):
        items, ignored = [], []
        for name in sorted(os.listdir(source)):
            path = os.path.join(source, name)
            if not os.path.isfile(path):
                continue
            ext = os.path.splitext(name)[1].lower()
            if ext in VIDEO_EXTS:
                items.append((path, "video"))
            elif ext in IMAGE_EXTS:
                items.append((path, "image"))
            else:
                ignored.append(name)
        if not items:
            raise ValueError(f"no image or video files in {source!r} (images: {', '.join(IMAGE_EXTS)}; videos: "
                             f"{', '.join(VIDEO_EXTS)})")
        return items, ignored
    if os.path.isfile(source):
        return [(source, "video" if os.path.splitext(source)[1].lower() in VIDEO_EXTS else "image")], []
    raise FileNotFoundError(f"no such file or directory: {source!r}")


class _Recorder:
    """Collects the COCO-style JSON."""

    def __init__(self):
        self.images: List[Dict[str, Any]] = []
        self.annotations: List[Dict[str, Any]] = []
        self.errors: List[Dict[str, str]] = []

    def add(self, file_name: str, image: np.ndarray, dets, depth_code: str, latency_ms: float,
            frame: Optional[int] = None) -> None:
        image_id = len(self.images) + 1
        entry = {"id": image_id, "file_name": file_name, "width": int(image.shape[1]),
                 "height": int(image.shape[0])}
        if frame is not None:
            entry["frame"] = frame
        entry.update(depth=depth_code, latency_ms=round(latency_ms, 3))
        self.images.append(entry)
        for (x0, y0, x1, y1), s, l in zip(dets.boxes.detach().cpu().tolist(), dets.scores.detach().cpu().tolist(),
                                          dets.labels.detach().cpu().tolist()):
            bw, bh = max(0.0, x1 - x0), max(0.0, y1 - y0)
            self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category_id": int(l),
                                     "bbox": [round(x0, 2), round(y0, 2), round(bw, 2), round(bh, 2)],
                                     "area": round(bw * bh, 2), "score": round(float(s), 5), "iscrowd": 0})

    def add_classes(self, file_name: str, image: np.ndarray, cls, depth_code: str, latency_ms: float,
                    names: Optional[Sequence[str]], frame: Optional[int] = None) -> Dict[str, Any]:
        entry = {"id": len(self.images) + 1, "file_name": file_name, "width": int(image.shape[1]),
                 "height": int(image.shape[0])}
        if frame is not None:
            entry["frame"] = frame
        entry.update(depth=depth_code, latency_ms=round(latency_ms, 3))
        entry["classes"] = [dict(category_id=int(lab), **({"name": _name(names, int(lab))} if names else {}),
                                 score=round(float(sc), 5))
                            for lab, sc in zip(cls.labels.detach().cpu().tolist(), cls.scores.detach().cpu().tolist())]
        self.images.append(entry)
        return entry


def run_predict(model, source: str, save: str, depth=None, budget_ms: Optional[float] = None, profile=None,
                imgsz: Optional[int] = None, conf: float = 0.25, names: Optional[Sequence[str]] = None,
                progress: bool = False, controller_options: Optional[Dict[str, Any]] = None,
                info: Optional[Dict[str, Any]] = None, log=None, topk: int = 5) -> Dict[str, Any]:
    """Run ``model`` on ``source`` (see the module docstring) and write the results to ``save``.
    Returns a summary: counts of images, video frames and detections, the errors (file, message),
    the written files and the JSON's path; for a classifier also ``classes``, ``(file name,
    [JSON class entries])`` of every still image. ``imgsz`` defaults to the profile's with a
    budget, else the model's (:func:`default_imgsz`). ``conf``: detectors' score threshold;
    ``topk``: classifiers' number of classes per image. ``log``: a callable for messages
    (default: stderr)."""
    from .budget import DepthController, DepthProfile
    from .depth import DepthConfig
    from .detection import canvas_side

    classify = getattr(model, "task", "detect") == "classify"
    if budget_ms is not None and depth is not None:
        raise ValueError("give either a fixed depth or budget_ms, not both")
    if budget_ms is not None and not isinstance(profile, DepthProfile):
        raise ValueError("budget_ms needs a DepthProfile of this model (model.profile_depths / load_profile)")
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0.0 <= conf <= 1.0:
        raise ValueError(f"conf must be in [0, 1], got {conf!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    log_is_default = log is None
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    items, ignored = list_sources(source)
    if imgsz is None:
        imgsz = profile.imgsz if budget_ms is not None else default_imgsz(model)
    stride = int(getattr(model, "stride", 32))
    side = canvas_side(imgsz, stride)  # the network input side: imgsz, padded up to the stride (detectors)
    if classify and side != imgsz:
        raise ValueError(f"imgsz must be a positive multiple of {stride} for a classifier (it centre-crops "
                         f"imgsz pixels), got {imgsz}")
    predict_kwargs: Dict[str, Any] = {"topk": topk} if classify else {"conf": conf}
    controller = None
    if budget_ms is not None:
        profile.check(model, imgsz=imgsz)
        controller = DepthController(model, budget_ms, profile, **predict_kwargs, **(controller_options or {}))
        fixed = None
    else:
        fixed = model.resolve_depth(depth, (1, 3, side, side))
    os.makedirs(save, exist_ok=True)
    model.eval()
    rec = _Recorder()
    written: List[str] = []
    n_frames = 0
    if ignored:
        log(f"predict: ignored {len(ignored)} file(s) that are not images or videos: {', '.join(ignored[:5])}"
            + (" ..." if len(ignored) > 5 else ""))

    total = 0
    for path, kind in items:
        if kind == "image":
            total += 1
        else:
            try:
                total += video_info(path)[1]
            except Exception:  # reported when it is read
                pass
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total or None, unit="img", desc="predict", file=sys.stderr)
        except ImportError:
            bar = None

    def detect(image: np.ndarray) -> Tuple[Any, DepthConfig, float]:
        if controller is not None:
            dets, used = controller(image)
            return dets, used, controller.history[-1].frame_ms
        t0 = time.perf_counter()
        dets = model.predict(image, depth=fixed, imgsz=imgsz, **predict_kwargs)[0]
        return dets, fixed, (time.perf_counter() - t0) * 1e3

    still_classes: List[Tuple[str, List[Dict[str, Any]]]] = []

    def record(rel: str, image: np.ndarray, result, used: DepthConfig, ms: float,
               frame: Optional[int] = None) -> np.ndarray:
        """Record one image's / frame's result; returns its annotated copy."""
        if classify:
            entry = rec.add_classes(rel, image, result, used.code, ms, names, frame=frame)
            if frame is None:
                still_classes.append((rel, entry["classes"]))
            return draw_classes(image, result, names)
        rec.add(rel, image, result, used.code, ms, frame=frame)
        return draw_detections(image, result, names)

    def fail(path: str, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        rec.errors.append({"file": path, "error": msg})
        if bar is not None and log_is_default:
            bar.write(f"predict: skipped {path}: {msg}", file=sys.stderr)  # above the progress bar
        else:
            log(f"predict: skipped {path}: {msg}")

    used_names = set()

    def out_name(path: str, ext: str) -> str:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, k = stem + ext, 1
        while name in used_names:  # a.jpg and a.png both -> a.png
            name, k = f"{stem}_{k}{ext}", k + 1
        used_names.add(name)
        return os.path.join(save, name)

    for path, kind in items:
        rel = os.path.relpath(path, source) if os.path.isdir(source) else os.path.basename(path)
        if kind == "image":
            try:
                image = read_image(path)
            except Exception as e:  # unreadable or not an image: report it, go on
                fail(path, e)
                if bar is not None:
                    bar.update(1)
                continue
            dets, used, ms = detect(image)
            drawn = record(rel, image, dets, used, ms)
            ext = os.path.splitext(path)[1].lower()
            target = out_name(path, ext if ext in WRITABLE_EXTS else ".png")
            Image = require("PIL.Image", "writing images")
            Image.fromarray(drawn).save(target)
            written.append(target)
            if bar is not None:
                bar.update(1)
            continue
        target = out_name(path, ".mp4")
        writer = None
        frame_index = 0
        try:
            fps, _count = video_info(path)
            writer = VideoWriter(target, float(fps))
            for frame in video_frames(path):
                dets, used, ms = detect(frame)
                writer.write(record(rel, frame, dets, used, ms, frame=frame_index))
                frame_index += 1
                if bar is not None:
                    bar.update(1)
        except Exception as e:  # unreadable video, or one that breaks off: report it, go on
            fail(path, e if frame_index == 0 else type(e)(f"after {frame_index} frames: {e}"))
        finally:
            if writer is not None:
                try:
                    writer.close()
                except Exception as e:  # pragma: no cover - an encoder failing at the flush
                    fail(path, e)
        n_frames += frame_index
        if writer is not None and writer.frames:
            written.append(target)
        elif os.path.exists(target):
            os.remove(target)
    if bar is not None:
        bar.close()

    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if names is not None and num_classes and len(names) != num_classes:
        log(f"predict: note: {len(names)} names for a model with {num_classes} classes")
    n_cat = max(num_classes, len(names or []))
    run_info = {"model": getattr(model, "model_name", type(model).__name__),
                "task": "classify" if classify else "detect", "source": os.fspath(source), "imgsz": imgsz,
                **predict_kwargs,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if controller is not None:
        lat = [im["latency_ms"] for im in rec.images]
        run_info.update(budget_ms=budget_ms, profile=profile.path, switches=controller.switches,
                        depths_used=sorted({im["depth"] for im in rec.images}))
        if lat:
            run_info.update(median_latency_ms=round(float(np.median(lat)), 3),
                            p95_latency_ms=round(float(np.percentile(lat, 95)), 3))
    else:
        run_info["depth"] = fixed.code
    run_info.update(info or {})
    doc = {"info": run_info,
           "categories": [{"id": i, "name": _name(names, i)} for i in range(n_cat)],
           "images": rec.images, **({} if classify else {"annotations": rec.annotations}), "errors": rec.errors}
    json_path = os.path.join(save, "predictions.json")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False, default=_json_default)
    n_images = sum(1 for im in rec.images if "frame" not in im)
    summary = {"images": n_images, "frames": n_frames, "detections": len(rec.annotations), "errors": rec.errors,
               "written": written, "json": json_path, "switches": controller.switches if controller else 0}
    if classify:
        summary["classes"] = still_classes
    return summary


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):  # pragma: no cover
        return None
    return str(o)


def read_names(text: Optional[str]) -> Optional[List[str]]:
    """Class names from ``--names``: a file (one name a line, or a JSON list) or a comma list."""
    if text is None:
        return None
    if os.path.isfile(text):
        with open(text) as f:
            content = f.read()
        try:
            data = json.loads(content)
        except json.JSONDecodeError:
            return [line.strip() for line in content.splitlines() if line.strip()]
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            return data
        raise ValueError(f"{text}: expected a JSON list of names or one name per line")
    return [t.strip() for t in text.split(",")]
