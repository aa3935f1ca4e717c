"""A synthetic detection data set: coloured shapes on textured backgrounds, in COCO format.

    from anydepth.data import synth
    synth.generate("data/shapes", images=1000, imgsz=320, seed=0, split="train")
    synth.generate("data/shapes", images=200, imgsz=320, seed=0, split="val")

writes ``data/shapes/train/images/000000.jpg ...`` and ``data/shapes/train/annotations.json``
(and the same under ``val/``), readable with :func:`anydepth.data.open_dataset`.

What is drawn:

* images of random aspect ratio (between 3:4 and 4:3), the long side ``imgsz`` pixels, so that
  letterboxing matters;
* backgrounds that are not flat: colour gradients, stripes, rotated checkerboards, blotchy noise,
  blends of two of these, a few thin distractor lines, and pixel noise over everything;
* ``min_objects``..``max_objects`` shapes per image (default classes ``circle, square, triangle,
  star, ring``; also available: ``diamond, hexagon, cross``), randomly rotated and slightly
  stretched, in colours that stand out from the background under them, with box sizes spread
  over the three COCO size ranges (small: area < 32², medium: < 96², large: the rest — "large"
  needs ``imgsz`` of about 160 or more);
* each box is the tight box of the drawn shape, fully inside the image. Objects may overlap a
  little, but every object keeps at least 75% of its box unoccluded and no box covers the
  centre of another object's box, so every object stays visible (and filled shapes show their
  colour at their box centre).

Annotations: COCO JSON with ``images`` (id from 1, file_name, width, height), ``annotations``
(id from 1, image_id, category_id, bbox ``[x, y, w, h]`` in pixels, area = ``w * h``,
iscrowd 0, and ``color``: the RGB fill colour, a non-standard extra field) and ``categories``
(ids from 1, in the order of ``classes``).

Generation is deterministic: image ``i`` of a split depends only on ``(seed, split, i)``, so
the same call writes the same files, and ``train``/``val`` splits made with the same seed differ.
"""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._optional import require


def _pil():
    """PIL's ``Image`` and ``ImageDraw`` (pillow: the ``data`` extra), imported on first use."""
    return require("PIL.Image", "the synthetic data set"), require("PIL.ImageDraw", "the synthetic data set")

DEFAULT_CLASSES = ("circle", "square", "triangle", "star", "ring")
SHAPES = DEFAULT_CLASSES + ("diamond", "hexagon", "cross")

# COCO area ranges (pixels of box area): small < 32², medium < 96², large >= 96².
SMALL_AREA = 32 ** 2
LARGE_AREA = 96 ** 2
SIZE_NAMES = ("small", "medium", "large")
_SIZE_WEIGHTS = (0.3, 0.4, 0.3)
_MIN_SIDE = 10          # smallest box side drawn (pixels)
_MAX_FRACTION = 0.8     # largest box side, as a fraction of the image's short side
_MAX_OCCLUSION = 0.25   # most of a box that another box may cover
_MIN_CONTRAST = 90.0    # smallest RGB distance between an object and the mean background under it


def size_category(area: float) -> str:
    """The COCO size range of a box area: ``"small"``, ``"medium"`` or ``"large"``."""
    if area < SMALL_AREA:
        return "small"
    if area < LARGE_AREA:
        return "medium"
    return "large"


def _unit_polygon(kind: str, n_ellipse: int = 48) -> List[np.ndarray]:
    """Polygons of a shape in unit coordinates ([-1, 1]²); the first is filled, the rest cut holes."""
    def circle(r=1.0):
        t = np.linspace(0, 2 * np.pi, n_ellipse, endpoint=False)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)

    def regular(n, r=1.0, start=-np.pi / 2):
        t = start + np.arange(n) * 2 * np.pi / n
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)

    if kind == "circle":
        return [circle()]
    if kind == "ring":
        return [circle(), circle(0.55)]
    if kind == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)]
    if kind == "triangle":
        return [regular(3)]
    if kind == "diamond":
        return [np.array([[0, -1], [0.65, 0], [0, 1], [-0.65, 0]], dtype=np.float64)]
    if kind == "hexagon":
        return [regular(6, start=0.0)]
    if kind == "star":
        outer, inner = regular(5), regular(5, 0.45, -np.pi / 2 + np.pi / 5)
        return [np.stack([outer, inner], 1).reshape(10, 2)]
    if kind == "cross":
        a = 0.33
        return [np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a],
                          [-1, a], [-1, -a], [-a, -a]], dtype=np.float64)]
    raise ValueError(f"unknown shape {kind!r}; available: {', '.join(SHAPES)}")


_FILLED = {k: k != "ring" for k in SHAPES}


def _shape_mask(kind: str, diameter: float, aspect: float, angle: float) -> np.ndarray:
    """Boolean mask of a rotated, stretched shape, cropped to its tight box."""
    rx, ry = diameter / 2 * math.sqrt(aspect), diameter / 2 / math.sqrt(aspect)
    n = int(math.ceil(2 * math.sqrt(2) * max(rx, ry))) + 4  # unit polygons lie within radius sqrt(2)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    Image, ImageDraw = _pil()
    canvas = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(canvas)
    for j, poly in enumerate(_unit_polygon(kind)):
        pts = (poly * [rx, ry]) @ rot.T + n / 2
        draw.polygon([tuple(p) for p in pts.tolist()], fill=0 if j else 255)
    mask = np.asarray(canvas) > 0
    if mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():  # pragma: no cover - a bug guard
        raise AssertionError(f"shape {kind!r} does not fit its drawing canvas")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return np.zeros((0, 0), dtype=bool)
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _image_size(rng: np.random.Generator, imgsz: int) -> Tuple[int, int]:
    aspect = math.exp(rng.uniform(math.log(0.75), math.log(4 / 3)))  # w / h
    if aspect >= 1:
        return max(1, round(imgsz / aspect)), imgsz
    return imgsz, max(1, round(imgsz * aspect))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A float32 HxWx3 textured background in [0, 255]."""
    Image, _ = _pil()

    def layer(kind: int) -> np.ndarray:
        c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if kind == 3:  # blotchy noise: a coarse random grid, upsampled bilinearly
            cell = int(rng.integers(6, 40))
            gh, gw = h // cell + 2, w // cell + 2
            grid = rng.uniform(0, 255, (gh, gw, 3)).astype(np.uint8)
            return np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR), dtype=np.float32)
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        u = xx * math.cos(theta) + yy * math.sin(theta)
        if kind == 0:  # linear gradient
            t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        elif kind == 1:  # stripes
            t = 0.5 + 0.5 * np.sin(2 * np.pi * u / rng.uniform(6, 48))
        else:  # rotated checkerboard
            v = -xx * math.sin(theta) + yy * math.cos(theta)
            cell = rng.uniform(8, 48)
            t = (np.floor(u / cell) + np.floor(v / cell)) % 2
        return (c1 + t[..., None] * (c2 - c1)).astype(np.float32)

    img = layer(int(rng.integers(4)))
    if rng.random() < 0.5:
        alpha = rng.uniform(0.2, 0.5)
        img = (1 - alpha) * img + alpha * layer(int(rng.integers(4)))
    return img


def _draw_lines(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A few thin random distractor lines (not annotated)."""
    n = int(rng.integers(0, 4))
    if n == 0:
        return img
    h, w = img.shape[:2]
    Image, ImageDraw = _pil()
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(n):
        x0, x1 = rng.uniform(0, w, 2)
        y0, y1 = rng.uniform(0, h, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line([(float(x0), float(y0)), (float(x1), float(y1))], fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(pil, dtype=np.float32)


def _side_ranges(short_side: int) -> Dict[str, Tuple[float, float]]:
    """Feasible box-side ranges (sqrt of box area) per size category, with margins from the thresholds."""
    top = _MAX_FRACTION * short_side
    ranges = {"small": (_MIN_SIDE, 30.0), "medium": (34.0, 90.0), "large": (100.0, top)}
    return {k: (lo, min(hi, top)) for k, (lo, hi) in ranges.items() if min(hi, top) >= lo}


def _place_objects(rng: np.random.Generator, img: np.ndarray, class_names: Sequence[str],
                   n_objects: int) -> List[dict]:
    h, w = img.shape[:2]
    ranges = _side_ranges(min(h, w))
    cats = [c for c in SIZE_NAMES if c in ranges]
    weights = np.array([_SIZE_WEIGHTS[SIZE_NAMES.index(c)] for c in cats])
    weights /= weights.sum()
    placed: List[dict] = []
    for _ in range(n_objects):
        cls = int(rng.integers(len(class_names)))
        kind = class_names[cls]
        cat = cats[int(rng.choice(len(cats), p=weights))]
        lo, hi = ranges[cat]
        side = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        aspect = rng.uniform(0.8, 1.25)
        angle = rng.uniform(0, 2 * np.pi)
        # The box of a rotated shape is not its nominal diameter: measure, rescale once, check.
        mask = _shape_mask(kind, side, aspect, angle)
        if mask.size == 0:
            continue
        mask = _shape_mask(kind, side * side / math.sqrt(mask.shape[0] * mask.shape[1]), aspect, angle)
        bh, bw = mask.shape
        if bh < 2 or bw < 2 or bh > h or bw > w or size_category(bh * bw) != cat:
            continue
        if _FILLED[kind] and not mask[bh // 2 - 1:bh // 2 + 2, bw // 2 - 1:bw // 2 + 2].all():
            continue
        for _try in range(30):
            y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            box = (x0, y0, x0 + bw, y0 + bh)
            if all(_compatible(box, p["box"]) for p in placed):
                break
        else:
            continue
        under = img[y0:y0 + bh, x0:x0 + bw][mask].mean(0)
        for _c in range(20):
            colour = rng.integers(0, 256, 3)
            if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
                break
        else:  # fall back to the colour farthest from the background
            colour = np.where(under < 128, 255, 0)
        patch = img[y0:y0 + bh, x0:x0 + bw]
        patch[mask] = colour.astype(np.float32)
        placed.append(dict(box=box, category=cls, color=[int(c) for c in colour]))
    return placed


def _compatible(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int]) -> bool:
    """True when boxes ``a`` and ``b`` may both be drawn: neither covers more than
    ``_MAX_OCCLUSION`` of the other, and neither contains the centre of the other."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return True
    inter = iw * ih
    for p, q in ((a, b), (b, a)):
        if inter > _MAX_OCCLUSION * (p[2] - p[0]) * (p[3] - p[1]):
            return False
        cx, cy = (p[0] + p[2]) / 2, (p[1] + p[3]) / 2
        if q[0] - 2 <= cx <= q[2] + 2 and q[1] - 2 <= cy <= q[3] + 2:
            return False
    return True


def render(index: int, imgsz: int = 320, seed: int = 0, classes: Optional[Sequence[str]] = None,
           min_objects: int = 1, max_objects: int = 6, split: Optional[str] = None) -> Tuple[np.ndarray, List[dict]]:
    """Draw image ``index`` of a synthetic set without writing it: returns the ``HxWx3`` uint8 RGB
    image and its objects, each ``dict(box=(x0, y0, x1, y1), category=class index, color=[r, g, b])``."""
    names = _check_classes(classes)
    rng = np.random.default_rng([int(seed), zlib.crc32((split or "").encode()), int(index)])
    h, w = _image_size(rng, imgsz)
    img = _draw_lines(rng, _background(rng, h, w))
    objects = _place_objects(rng, img, names, int(rng.integers(min_objects, max_objects + 1)))
    img += rng.normal(0.0, rng.uniform(2.0, 6.0), img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def _check_classes(classes: Optional[Sequence[str]]) -> Tuple[str, ...]:
    if classes is None:
        return DEFAULT_CLASSES
    if isinstance(classes, str) or not len(classes):
        raise ValueError(f"classes must be a non-empty list of shape names from {list(SHAPES)}, got {classes!r}")
    names = tuple(classes)
    bad = [c for c in names if c not in SHAPES]
    if bad:
        raise ValueError(f"unknown shape class(es) {bad}; available: {', '.join(SHAPES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"classes contains duplicates: {list(names)}")
    return names


def generate(out_dir, images: int = 1000, imgsz: int = 320, seed: int = 0, classes: Optional[Sequence[str]] = None,
             min_objects: int = 1, max_objects: int = 6, split: Optional[str] = None, progress: bool = True,
             ext: str = "jpg", quality: int = 92) -> dict:
    """Write a synthetic shapes data set (see the module docstring) and return a summary.

    Args:
        out_dir: output directory; with ``split`` the set goes to ``out_dir/<split>/``.
        images: number of images.
        imgsz: long side of every image in pixels (the short side is 75%..100% of it).
        seed: random seed; the output depends only on ``(seed, split)`` and the other arguments.
        classes: shape names (one class each, in this order); default ``DEFAULT_CLASSES``.
        min_objects, max_objects: objects per image, drawn uniformly in this range (an object is
            dropped, rarely, when no free place is found for it).
        split: optional split name (``"train"``, ``"val"``...).
        progress: show a tqdm progress bar.
        ext: ``"jpg"`` or ``"png"``.
        quality: JPEG quality.

    Returns:
        ``dict(path, annotations, images, objects, classes, per_class={name: count},
        per_size={"small"|"medium"|"large": count})``.
    """
    names = _check_classes(classes)
    for name, value, lo in (("images", images, 1), ("imgsz", imgsz, 32), ("min_objects", min_objects, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if not isinstance(max_objects, (int, np.integer)) or max_objects < min_objects:
        raise ValueError(f"max_objects must be an integer >= min_objects ({min_objects}), got {max_objects!r}")
    ext = ext.lower().lstrip(".")
    if ext not in ("jpg", "png"):
        raise ValueError(f"ext must be 'jpg' or 'png', got {ext!r}")
    root = Path(out_dir) / split if split else Path(out_dir)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)

    tqdm = require("tqdm", "synth.generate").tqdm
    Image, _ = _pil()

    coco_images, annotations = [], []
    per_class = {n: 0 for n in names}
    per_size = {n: 0 for n in SIZE_NAMES}
    desc = f"synth {split}" if split else "synth"
    for i in tqdm(range(images), desc=desc, disable=not progress, unit="img"):
        img, objects = render(i, imgsz, seed, names, min_objects, max_objects, split)
        file_name = f"{i:06d}.{ext}"
        pil = Image.fromarray(img)
        if ext == "jpg":
            pil.save(img_dir / file_name, quality=quality)
        else:
            pil.save(img_dir / file_name, compress_level=1)
        coco_images.append(dict(id=i + 1, file_name=file_name, height=int(img.shape[0]), width=int(img.shape[1])))
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            area = (x1 - x0) * (y1 - y0)
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=obj["category"] + 1,
                                    bbox=[x0, y0, x1 - x0, y1 - y0], area=area, iscrowd=0, color=obj["color"]))
            per_class[names[obj["category"]]] += 1
            per_size[size_category(area)] += 1
    coco = dict(info=dict(description="anydepth synthetic shapes", seed=int(seed), split=split, imgsz=int(imgsz)),
                images=coco_images, annotations=annotations,
                categories=[dict(id=k + 1, name=n, supercategory="shape") for k, n in enumerate(names)])
    ann_file = root / "annotations.json"
    tmp = ann_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(coco))
    tmp.replace(ann_file)
    return dict(path=str(root), annotations=str(ann_file), images=images, objects=len(annotations),
                classes=list(names), per_class=per_class, per_size=per_size)
