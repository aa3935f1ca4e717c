"""Detection data sets for training and evaluation: COCO JSON and YOLO txt layouts.

``dataset[i]`` returns ``(image, target)``:

* ``image``: ``torch.uint8 [3, S, S]`` RGB, ``S = imgsz``. With ``mode="letterbox"`` the image is
  resized keeping its aspect ratio, centred and padded with 114, exactly as
  :func:`anydepth.detection.letterbox_batch` (what YOLO ``predict()`` does) places it; with
  ``mode="resize"`` it is stretched to ``S x S`` as :func:`anydepth.detection.resize_batch`
  (RT-DETR ``predict()``) does. Pixels equal those functions' output rounded to uint8.
* ``target``: ``dict(boxes=float32 [N, 4] xyxy in pixels of the returned image,
  labels=int64 [N] in 0..num_classes-1, image_id=int, orig_size=(h0, w0))``.

With ``augment=True`` (training) every sample is also randomly flipped left-right (``flip_prob``,
default 0.5) and scale-jittered: the content is scaled by a random factor in ``scale_range``
(default [0.5, 1.5]) relative to its
letterboxed (or resized) size and placed at a random offset on the 114-grey canvas (cropped
when larger than it). Boxes follow; a box cut by the canvas border is clipped, and dropped when
less than 2 pixels wide or high or when less than 20% of its area stays visible. The random
draws of sample ``i`` depend only on ``(seed, epoch, i)`` (call :meth:`set_epoch` every epoch),
so an epoch is reproducible whatever the number of ``DataLoader`` workers.

Evaluation uses :meth:`coco_ground_truth` (a COCO-format dict that ``pycocotools`` accepts as
``COCO().dataset``), :meth:`category_id` and :meth:`load_original`, all in original-image pixels.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._optional import require
from ..detection import letterbox_batch, resize_batch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PAD_VALUE = 114
MODES = ("letterbox", "resize")
SCALE_RANGE = (0.5, 1.5)
FLIP_PROB = 0.5
MIN_BOX_SIDE = 2.0
MIN_VISIBLE = 0.2

PathLike = Union[str, os.PathLike]


def read_image(path: PathLike) -> np.ndarray:
    """Decode an image file with PIL into an ``HxWx3`` uint8 RGB array (no EXIF rotation is
    applied: annotations refer to the stored pixels). Raises ``FileNotFoundError`` for a missing
    file and ``ValueError`` naming the file when it cannot be decoded."""
    Image = require("PIL.Image", "reading image files")

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, ImportError) as e:
        # ImportError: a plugin hook (Ultralytics patches PIL.Image.open to load a HEIF plugin on
        # unidentified files) that is not installed
        raise ValueError(f"cannot decode image {path}: {e}") from e
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"cannot decode image {path}: got an array of shape {arr.shape}")
    return arr


def _image_size(path: Path) -> Tuple[int, int]:
    """(height, width) of an image file from its header."""
    Image = require("PIL.Image", "reading image files")

    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, SyntaxError, ValueError, ImportError) as e:
        # ImportError: a plugin hook (Ultralytics patches PIL.Image.open to load a HEIF plugin on
        # unidentified files) that is not installed
        raise ValueError(f"cannot decode image {path}: {e}") from e
    return int(h), int(w)


class DetectionDataset(torch.utils.data.Dataset):
    """Common part of :class:`CocoDetection` and :class:`YoloDetection` (see the module docstring).

    Subclasses provide ``class_names``, ``_paths`` (one image path per sample), ``_ids``
    (image ids), ``_boxes(i, h0, w0)`` (float64 xyxy boxes in original pixels and int64 labels,
    training targets only), ``coco_ground_truth()`` and ``category_id()``.
    """

    class_names: List[str]

    def __init__(self, imgsz: int = 640, mode: str = "letterbox", augment: bool = False, seed: int = 0,
                 scale_range: Tuple[float, float] = SCALE_RANGE, flip_prob: float = FLIP_PROB):
        if isinstance(imgsz, bool) or not isinstance(imgsz, (int, np.integer)) or imgsz <= 0 or imgsz % 32:
            raise ValueError(f"imgsz must be a positive multiple of 32, got {imgsz!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi or not math.isfinite(hi):
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}")
        self.scale_range = (lo, hi)
        self.flip_prob = float(flip_prob)
        self.imgsz = int(imgsz)
        self.mode = mode
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0
        self._paths: List[Path] = []
        self._ids: List[int] = []

    # -- sizes and names ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._paths)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (with ``DataLoader`` workers, call it before
        the epoch's iterator is created and do not use ``persistent_workers``)."""
        self.epoch = int(epoch)

    def _index(self, i: int) -> int:
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"dataset index must be an integer, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"dataset index {i} out of range for {n} images")
        return int(i) % n

    def image_path(self, i: int) -> Path:
        return self._paths[self._index(i)]

    def load_original(self, i: int) -> Tuple[np.ndarray, int]:
        """The original image ``i`` (``HxWx3`` uint8 RGB numpy array) and its image id."""
        i = self._index(i)
        return read_image(self._paths[i]), self._ids[i]

    # -- samples ------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> Tuple[torch.Tensor, Dict[str, object]]:
        i = self._index(i)
        img, image_id = self.load_original(i)
        h0, w0 = img.shape[:2]
        boxes, labels = self._boxes(i, h0, w0)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            image, boxes, labels = self._augmented(img, boxes, labels, rng)
        else:
            fn = letterbox_batch if self.mode == "letterbox" else resize_batch
            batch, (lb,) = fn(img, self.imgsz)
            image = _to_uint8(batch[0])
            boxes = boxes * [lb.gain_x, lb.gain_y, lb.gain_x, lb.gain_y] + [lb.pad_x, lb.pad_y, lb.pad_x, lb.pad_y]
            boxes = np.clip(boxes, 0, self.imgsz)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels = boxes[keep], labels[keep]
        target = dict(boxes=torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      labels=torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
                      image_id=int(image_id), orig_size=(int(h0), int(w0)))
        return image, target

    def content_size(self, h0: int, w0: int) -> Tuple[int, int]:
        """(height, width) that an ``h0 x w0`` image takes on the canvas without augmentation."""
        s = self.imgsz
        if self.mode == "resize":
            return s, s
        r = min(s / h0, s / w0)
        return max(1, round(h0 * r)), max(1, round(w0 * r))

    def _augmented(self, img: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        s = self.imgsz
        h0, w0 = img.shape[:2]
        nh, nw = self.content_size(h0, w0)
        scale = rng.uniform(*self.scale_range)
        nh, nw = max(1, round(nh * scale)), max(1, round(nw * scale))
        top = int(rng.integers(min(0, s - nh), max(0, s - nh) + 1))
        left = int(rng.integers(min(0, s - nw), max(0, s - nw) + 1))
        flip = bool(rng.random() < self.flip_prob)
        content, _ = resize_batch(img, (nh, nw))  # same interpolation as letterbox_batch
        content = _to_uint8(content[0])
        image = torch.full((3, s, s), PAD_VALUE, dtype=torch.uint8)
        # paste the visible part of the content (top/left may be negative: the content is cropped)
        y0, x0 = max(0, top), max(0, left)
        y1, x1 = min(s, top + nh), min(s, left + nw)
        image[:, y0:y1, x0:x1] = content[:, y0 - top:y1 - top, x0 - left:x1 - left]
        boxes = boxes * [nw / w0, nh / h0, nw / w0, nh / h0] + [left, top, left, top]
        if flip:
            image = image.flip(-1)
            boxes = np.stack([s - boxes[:, 2], boxes[:, 1], s - boxes[:, 0], boxes[:, 3]], 1)
        full_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        boxes = np.clip(boxes, 0, s)
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = (bw >= MIN_BOX_SIDE) & (bh >= MIN_BOX_SIDE) & (bw * bh >= MIN_VISIBLE * full_area)
        return image.contiguous(), boxes[keep], labels[keep]

    def _boxes(self, i: int, h0: int, w0: int) -> Tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def coco_ground_truth(self) -> dict:  # pragma: no cover
        raise NotImplementedError

    def category_id(self, label: int) -> int:  # pragma: no cover
        raise NotImplementedError

    def _check_label(self, label: int) -> int:
        if isinstance(label, torch.Tensor):
            label = label.item()
        if not float(label).is_integer() or not 0 <= int(label) < self.num_classes:
            raise ValueError(f"label {label!r} out of range 0..{self.num_classes - 1}")
        return int(label)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, imgsz={self.imgsz}, "
                f"mode={self.mode!r}, augment={self.augment})")


def _to_uint8(chw: torch.Tensor) -> torch.Tensor:
    return chw.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------
def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotation file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {path}: expected a JSON object with 'images' and 'categories', "
                         f"got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"annotation file {path}: missing or invalid '{key}' list (not a COCO file?)")
    if not isinstance(data.get("annotations", []), list):
        raise ValueError(f"annotation file {path}: 'annotations' must be a list")
    return data


class CocoDetection(DetectionDataset):
    """A COCO-JSON detection data set: ``images_dir`` holds the files named by ``file_name``.

    Labels are contiguous, ``0..num_classes-1``, in the order of the sorted category ids
    (:meth:`category_id` maps back). Training targets skip ``iscrowd`` annotations; boxes are
    clipped to the image and zero-area boxes dropped (also from :meth:`coco_ground_truth`, which
    keeps the crowd annotations, flagged, as COCO evaluation expects). Images without
    annotations are kept (empty targets).
    """

    def __init__(self, images_dir: PathLike, ann_file: PathLike, imgsz: int = 640, mode: str = "letterbox",
                 augment: bool = False, seed: int = 0, scale_range: Tuple[float, float] = SCALE_RANGE,
                 flip_prob: float = FLIP_PROB):
        super().__init__(imgsz, mode, augment, seed, scale_range, flip_prob)
        self.images_dir, self.ann_file = Path(images_dir), Path(ann_file)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"images directory not found: {self.images_dir}")
        data = _load_json(self.ann_file)
        where = f"annotation file {self.ann_file}"
        cats = {}
        for c in data["categories"]:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int) or isinstance(c.get("id"), bool):
                raise ValueError(f"{where}: category without an integer 'id': {c!r}")
            if c["id"] in cats:
                raise ValueError(f"{where}: duplicate category id {c['id']}")
            cats[c["id"]] = c
        if not cats:
            raise ValueError(f"{where}: no categories")
        self._cat_ids = sorted(cats)
        self._label_of = {cid: k for k, cid in enumerate(self._cat_ids)}
        self.class_names = [str(cats[cid].get("name", cid)) for cid in self._cat_ids]
        self._categories = [dict(id=cid, name=self.class_names[k], supercategory=cats[cid].get("supercategory", ""))
                            for k, cid in enumerate(self._cat_ids)]

        self._images = []
        row_of = {}
        for im in data["images"]:
            if (not isinstance(im, dict) or not isinstance(im.get("id"), int)
                    or not isinstance(im.get("file_name"), str)):
                raise ValueError(f"{where}: image entry without an integer 'id' and a 'file_name': {im!r}")
            if im["id"] in row_of:
                raise ValueError(f"{where}: duplicate image id {im['id']}")
            row_of[im["id"]] = len(self._images)
            self._images.append(dict(id=im["id"], file_name=im["file_name"], height=im.get("height"),
                                     width=im.get("width")))
        self._paths = [self.images_dir / im["file_name"] for im in self._images]
        self._ids = [im["id"] for im in self._images]

        self._gt_anns = []  # the annotations coco_ground_truth() reports
        per_image: List[List[Tuple[List[float], int]]] = [[] for _ in self._images]
        for k, a in enumerate(data.get("annotations", [])):
            if not isinstance(a, dict):
                raise ValueError(f"{where}: annotation {k} is not an object: {a!r}")
            if a.get("image_id") not in row_of:
                raise ValueError(f"{where}: annotation {a.get('id', k)} refers to unknown image id "
                                 f"{a.get('image_id')!r}")
            if a.get("category_id") not in self._label_of:
                raise ValueError(f"{where}: annotation {a.get('id', k)} has unknown category id "
                                 f"{a.get('category_id')!r}")
            bbox = a.get("bbox")
            if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
                raise ValueError(f"{where}: annotation {a.get('id', k)} has an invalid bbox {bbox!r} "
                                 "(expected [x, y, width, height])")
            if bbox[2] <= 0 or bbox[3] <= 0:
                continue  # zero-area box
            crowd = int(bool(a.get("iscrowd", 0)))
            self._gt_anns.append(dict(id=a.get("id", k + 1), image_id=a["image_id"], category_id=a["category_id"],
                                      bbox=[float(v) for v in bbox],
                                      area=float(a.get("area", bbox[2] * bbox[3])), iscrowd=crowd))
            if not crowd:
                per_image[row_of[a["image_id"]]].append((bbox, self._label_of[a["category_id"]]))
        ids = [a["id"] for a in self._gt_anns]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: duplicate annotation ids")
        self._targets = []
        for objs in per_image:
            xywh = np.array([o[0] for o in objs], dtype=np.float64).reshape(-1, 4)
            self._targets.append((np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                                  np.array([o[1] for o in objs], dtype=np.int64)))

    def _boxes(self, i: int, h0: int, w0: int) -> Tuple[np.ndarray, np.ndarray]:
        im = self._images[i]
        if (im["height"] is not None and im["height"] != h0) or (im["width"] is not None and im["width"] != w0):
            raise ValueError(f"image {self._paths[i]} is {w0}x{h0} (WxH) but {self.ann_file} says "
                             f"{im['width']}x{im['height']}")
        boxes, labels = self._targets[i]
        boxes = np.clip(boxes, 0, [w0, h0, w0, h0])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes[keep], labels[keep]

    def category_id(self, label: int) -> int:
        """The COCO category id of contiguous label ``label``."""
        return self._cat_ids[self._check_label(label)]

    def coco_ground_truth(self) -> dict:
        """A fresh COCO-format dict (images, annotations, categories) for evaluation. Image sizes
        missing from the annotation file are read from the image headers."""
        images = []
        for im, path in zip(self._images, self._paths):
            h, w = im["height"], im["width"]
            if h is None or w is None:
                h, w = _image_size(path)
            images.append(dict(id=im["id"], file_name=im["file_name"], height=h, width=w))
        return dict(images=images, annotations=[dict(a, bbox=list(a["bbox"])) for a in self._gt_anns],
                    categories=[dict(c) for c in self._categories])


# ----------------------------------------------------------------------------------------------
# YOLO
# ----------------------------------------------------------------------------------------------
def _names_from(names, where: str) -> List[str]:
    """Class names from a list, or from a mapping ``{0: name, 1: name, ...}`` (keys must be 0..n-1)."""
    if isinstance(names, dict):
        try:
            keyed = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: names mapping keys must be class indices, got {list(names)}") from e
        if sorted(keyed) != list(range(len(keyed))):
            raise ValueError(f"{where}: names mapping keys must be 0..{len(keyed) - 1}, got {sorted(keyed)}")
        names = [keyed[k] for k in range(len(keyed))]
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ValueError(f"{where}: names must be a list or a mapping of class names, got {type(names).__name__}")
    if not names:
        raise ValueError(f"{where}: empty list of class names")
    return [str(n) for n in names]


def read_data_yaml_names(path: PathLike) -> List[str]:
    """Class names from the ``names`` entry of a YOLO ``data.yaml``."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    yaml = require("yaml", "reading a YOLO data.yaml")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    names = data.get("names") if isinstance(data, dict) else None
    if names is None:
        raise ValueError(f"{path} has no 'names' entry")
    return _names_from(names, str(path))


def _default_labels_dir(images_dir: Path) -> Path:
    parts = list(images_dir.parts)
    for k in range(len(parts) - 1, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            return Path(*parts)
    raise ValueError(f"cannot infer the labels directory of {images_dir} (no 'images' path component); "
                     "pass labels_dir")


class YoloDetection(DetectionDataset):
    """A YOLO-txt detection data set: ``images_dir`` holds the images and ``labels_dir`` (default:
    the path with its last ``images`` component replaced by ``labels``) one ``<stem>.txt`` per
    image with lines ``class cx cy w h`` (box centre and size normalised by the image size). An
    image without a label file has no objects.

    Class names: the ``names`` argument (a list, or a mapping ``{index: name}``), else the
    ``names`` of a ``data.yaml`` / ``dataset.yaml`` or the lines of a ``classes.txt`` found next
    to ``images_dir`` or at the data set root (the parent of the ``images`` component), else
    ``"0".."K"`` for the largest class index ``K`` in the labels.

    Label files are all read (and checked) on construction. ``image_id`` is ``index + 1``;
    :meth:`category_id` is ``label + 1``. Boxes are clipped to the image; zero-area boxes dropped.
    """

    def __init__(self, images_dir: PathLike, labels_dir: Optional[PathLike] = None, names=None, imgsz: int = 640,
                 mode: str = "letterbox", augment: bool = False, seed: int = 0,
                 scale_range: Tuple[float, float] = SCALE_RANGE, flip_prob: float = FLIP_PROB):
        super().__init__(imgsz, mode, augment, seed, scale_range, flip_prob)
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"images directory not found: {self.images_dir}")
        self.labels_dir = Path(labels_dir) if labels_dir is not None else _default_labels_dir(self.images_dir)
        if not self.labels_dir.is_dir():
            raise FileNotFoundError(f"labels directory not found: {self.labels_dir}")
        self._paths = sorted(p for p in self.images_dir.iterdir()
                             if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self._paths:
            subdirs = sorted(p.name for p in self.images_dir.iterdir() if p.is_dir())
            hint = f" (it has sub-directories {subdirs}: pass split=, or the sub-directory)" if subdirs else ""
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.images_dir}{hint}")
        self._ids = list(range(1, len(self._paths) + 1))

        if names is not None:
            self.class_names = _names_from(names, "names argument")
        else:
            self.class_names = self._find_names()
        nc = len(self.class_names) if self.class_names is not None else None
        self._labels = [self._read_labels(self.labels_dir / (p.stem + ".txt"), nc) for p in self._paths]
        if self.class_names is None:
            top = max((int(l[:, 0].max()) for l in self._labels if len(l)), default=-1)
            if top < 0:
                raise ValueError(f"no class names given and no objects in {self.labels_dir}: pass names=")
            self.class_names = [str(k) for k in range(top + 1)]
        self._sizes: List[Optional[Tuple[int, int]]] = [None] * len(self._paths)

    def _find_names(self) -> Optional[List[str]]:
        dirs = [self.images_dir.parent]
        parts = self.images_dir.parts
        if "images" in parts:
            k = len(parts) - 1 - parts[::-1].index("images")
            root = Path(*parts[:k]) if k else Path(".")
            if root not in dirs:
                dirs.append(root)
        for d in dirs:
            for fname in ("data.yaml", "dataset.yaml"):
                if (d / fname).is_file():
                    return read_data_yaml_names(d / fname)
            if (d / "classes.txt").is_file():
                lines = [l.strip() for l in (d / "classes.txt").read_text(encoding="utf-8").splitlines()]
                return _names_from([l for l in lines if l], str(d / "classes.txt"))
        return None

    @staticmethod
    def _read_labels(path: Path, nc: Optional[int]) -> np.ndarray:
        """[N, 5] float64 rows ``class cx cy w h``; raises ValueError naming the file and line."""
        if not path.is_file():
            return np.zeros((0, 5))
        rows = []
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"label file {path} is not UTF-8 text: {e}") from e
        for ln, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 5:
                raise ValueError(f"{path}, line {ln}: expected 5 fields 'class cx cy w h', got {len(fields)}: "
                                 f"{line.strip()!r}")
            try:
                vals = [float(v) for v in fields]
            except ValueError as e:
                raise ValueError(f"{path}, line {ln}: non-numeric field in {line.strip()!r}") from e
            if not all(math.isfinite(v) for v in vals):
                raise ValueError(f"{path}, line {ln}: non-finite value in {line.strip()!r}")
            cls = vals[0]
            if not cls.is_integer() or cls < 0 or (nc is not None and cls >= nc):
                rng = f"0..{nc - 1}" if nc is not None else "a non-negative integer"
                raise ValueError(f"{path}, line {ln}: class {fields[0]} out of range ({rng})")
            if vals[3] < 0 or vals[4] < 0:
                raise ValueError(f"{path}, line {ln}: negative box size in {line.strip()!r}")
            rows.append(vals)
        return np.array(rows, dtype=np.float64).reshape(-1, 5)

    def _size(self, i: int) -> Tuple[int, int]:
        if self._sizes[i] is None:
            self._sizes[i] = _image_size(self._paths[i])
        return self._sizes[i]

    def _pixel_boxes(self, i: int, h0: int, w0: int) -> Tuple[np.ndarray, np.ndarray]:
        lab = self._labels[i]
        cx, cy, bw, bh = lab[:, 1] * w0, lab[:, 2] * h0, lab[:, 3] * w0, lab[:, 4] * h0
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).reshape(-1, 4)
        boxes = np.clip(boxes, 0, [w0, h0, w0, h0])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes[keep], lab[keep, 0].astype(np.int64)

    def _boxes(self, i: int, h0: int, w0: int) -> Tuple[np.ndarray, np.ndarray]:
        self._sizes[i] = (h0, w0)
        return self._pixel_boxes(i, h0, w0)

    def category_id(self, label: int) -> int:
        """The category id used by :meth:`coco_ground_truth` for ``label``: ``label + 1``."""
        return self._check_label(label) + 1

    def coco_ground_truth(self) -> dict:
        """A fresh COCO-format dict (images, annotations with pixel xywh boxes, area = w * h,
        iscrowd 0, categories with ids ``label + 1``). Reads the image headers for their sizes."""
        images, anns = [], []
        for i, path in enumerate(self._paths):
            h, w = self._size(i)
            images.append(dict(id=self._ids[i], file_name=path.name, height=h, width=w))
            boxes, labels = self._pixel_boxes(i, h, w)
            for b, l in zip(boxes.tolist(), labels.tolist()):
                bw, bh = b[2] - b[0], b[3] - b[1]
                anns.append(dict(id=len(anns) + 1, image_id=self._ids[i], category_id=l + 1,
                                 bbox=[b[0], b[1], bw, bh], area=bw * bh, iscrowd=0))
        return dict(images=images, annotations=anns,
                    categories=[dict(id=k + 1, name=n, supercategory="") for k, n in enumerate(self.class_names)])


# ----------------------------------------------------------------------------------------------
def collate(samples: Sequence[Tuple[torch.Tensor, dict]]) -> Tuple[torch.Tensor, List[dict]]:
    """``[(image, target), ...]`` -> ``(uint8 [B, 3, S, S], [target, ...])`` (for ``DataLoader``)."""
    if not samples:
        raise ValueError("collate: empty batch")
    images = [s[0] for s in samples]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"collate: images of different shapes {sorted(shapes)}; use one imgsz per data set")
    return torch.stack(images), [s[1] for s in samples]


def open_dataset(path: PathLike, split: Optional[str] = None, **kw) -> DetectionDataset:
    """Open a data set directory, detecting its layout.

    * ``path/annotations.json`` (as written by :mod:`anydepth.data.synth`), or a single ``*.json``
      in ``path``, with the images in ``path/images/`` (else ``path``): :class:`CocoDetection`.
      ``path`` may also be the JSON file itself.
    * ``path/images/`` + ``path/labels/``: :class:`YoloDetection` (class names from
      ``names=``, ``path/data.yaml`` or ``path/classes.txt``).

    With ``split``, ``path/<split>/`` is opened when it exists, else the YOLO layout
    ``path/images/<split>`` + ``path/labels/<split>``. Other keywords go to the data set class
    (``imgsz``, ``mode``, ``augment``, ``seed``; ``names`` for YOLO).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data set path not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ValueError(f"{path}: expected a data set directory or a COCO annotation .json file")
        img_dir = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
        return CocoDetection(img_dir, path, **kw)
    if split is not None:
        if (path / split).is_dir():
            return open_dataset(path / split, **kw)
        if (path / "images" / split).is_dir() and (path / "labels" / split).is_dir():
            return YoloDetection(path / "images" / split, path / "labels" / split, **kw)
        raise FileNotFoundError(f"split {split!r} not found in {path} (looked for {path / split} and "
                                f"{path / 'images' / split} + {path / 'labels' / split})")
    ann = path / "annotations.json"
    if not ann.is_file():
        jsons = sorted(path.glob("*.json"))
        ann = jsons[0] if len(jsons) == 1 else None
    if ann is not None:
        img_dir = path / "images" if (path / "images").is_dir() else path
        return CocoDetection(img_dir, ann, **kw)
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return YoloDetection(path / "images", path / "labels", **kw)
    raise ValueError(f"{path}: unrecognised data set layout; expected annotations.json (+ images/) for COCO, "
                     "or images/ + labels/ (+ data.yaml or classes.txt) for YOLO")
