"""Classification data: ImageFolder data sets, the ImageNet transforms, batching, and a synthetic
classification set (the synthetic shapes, one object per image, cropped).

    from anydepth.data import classify
    classify.synth("data/shapes-cls", images=500, imgsz=64, split="train")
    ds = classify.ImageFolder("data/shapes-cls/train", imgsz=64, augment=True)
    loader = DataLoader(ds, batch_size=32, shuffle=True, collate_fn=classify.collate)

An ImageFolder directory holds one sub-directory per class (class index = sorted name order) with
image files in it (``.jpg .jpeg .png .bmp .webp``), as torchvision's ``ImageFolder`` reads it. A
sample is ``(uint8 [3, imgsz, imgsz] tensor, int label)``:

* evaluation (``augment=False``): resize the short side to ``round(imgsz / 0.875)`` and crop the
  centre ``imgsz`` x ``imgsz`` (the ImageNet evaluation transform, 256 -> 224);
* training (``augment=True``): a random-resized crop (area ``scale`` of the image, default
  0.08..1, aspect 3/4..4/3) to ``imgsz`` and a horizontal flip with probability 0.5.

Images stay uint8 in [0, 255]; the model divides by 255 and normalises with its mean/std.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .._optional import require

PathLike = Union[str, os.PathLike]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CROP_PCT = 0.875

__all__ = ["ImageFolder", "collate", "eval_transform", "is_image_folder", "open_image_folder", "synth",
           "train_transform"]


def _resize(chw: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking) of a uint8 ``[3, H, W]`` tensor."""
    if tuple(chw.shape[1:]) == (h, w):
        return chw
    out = F.interpolate(chw[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def eval_transform(image: np.ndarray, imgsz: int, crop_pct: float = CROP_PCT) -> torch.Tensor:
    """HxWx3 uint8 -> uint8 ``[3, imgsz, imgsz]``: short side to ``round(imgsz / crop_pct)``,
    centre crop."""
    x = _chw(image)
    h, w = x.shape[1:]
    short = int(round(imgsz / crop_pct))
    if h <= w:
        nh, nw = short, max(short, int(round(w * short / h)))
    else:
        nh, nw = max(short, int(round(h * short / w))), short
    x = _resize(x, nh, nw)
    top, left = (nh - imgsz) // 2, (nw - imgsz) // 2
    return x[:, top:top + imgsz, left:left + imgsz].contiguous()


def train_transform(image: np.ndarray, imgsz: int, rng: np.random.Generator,
                    scale: Tuple[float, float] = (0.08, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                    flip: float = 0.5) -> torch.Tensor:
    """HxWx3 uint8 -> uint8 ``[3, imgsz, imgsz]``: random-resized crop (torchvision's sampling: 10
    tries, then the centre crop of the clamped ratio) and a horizontal flip."""
    x = _chw(image)
    h, w = x.shape[1:]
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:
        r = w / h
        if r < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif r > ratio[1]:
            ch, cw = h, int(round(h * ratio[1]))
        else:
            cw, ch = w, h
        top, left = (h - ch) // 2, (w - cw) // 2
    x = _resize(x[:, top:top + ch, left:left + cw], imgsz, imgsz)
    if rng.random() < flip:
        x = x.flip(-1)
    return x.contiguous()


def is_image_folder(path: PathLike) -> bool:
    """True when ``path`` is a directory whose sub-directories hold image files (and it has no
    image files or annotation files of its own)."""
    p = Path(path)
    if not p.is_dir() or (p / "annotations.json").exists() or (p / "images").is_dir():
        return False
    subdirs = [d for d in p.iterdir() if d.is_dir()]
    return bool(subdirs) and any(f.suffix.lower() in IMAGE_EXTENSIONS for d in subdirs for f in d.iterdir())


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/<image>`` (see the module docstring). ``classes`` fixes the class order (a
    validation set must use the training set's); default: the sorted sub-directory names."""

    def __init__(self, root: PathLike, imgsz: int = 224, augment: bool = False, seed: int = 0,
                 classes: Optional[Sequence[str]] = None, scale: Tuple[float, float] = (0.08, 1.0)):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz < 1:
            raise ValueError(f"imgsz must be a positive int, got {imgsz!r}")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if classes is None:
            classes = found
        missing = sorted(set(found) - set(classes))
        if missing:
            raise ValueError(f"{self.root}: class folders {missing} are not among the classes {list(classes)}")
        self.classes: List[str] = list(classes)
        self.samples: List[Tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            d = self.root / name
            if d.is_dir():
                self.samples += [(f, label) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise ValueError(f"{self.root}: no images in class sub-directories ({', '.join(IMAGE_EXTENSIONS)})")
        self.imgsz, self.augment, self.seed, self.scale = imgsz, bool(augment), int(seed), tuple(scale)
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> List[str]:
        return list(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation of sample ``i`` depends on ``(seed, epoch, i)`` only (any worker count)."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        from .datasets import read_image

        path, label = self.samples[i]
        img = read_image(path)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, int(i)])
            return train_transform(img, self.imgsz, rng, scale=self.scale), label
        return eval_transform(img, self.imgsz), label

    def __repr__(self) -> str:
        return (f"ImageFolder({str(self.root)!r}, {len(self)} images, {self.num_classes} classes, "
                f"imgsz={self.imgsz}, augment={self.augment})")


def collate(samples: Sequence[Tuple[torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 [N, 3, H, W], int64 [N])``."""
    return torch.stack([s[0] for s in samples]), torch.tensor([int(s[1]) for s in samples], dtype=torch.long)


def open_image_folder(path: PathLike, split: Optional[str] = None, **kw) -> ImageFolder:
    """An :class:`ImageFolder` at ``path`` (or ``path/split``)."""
    p = Path(path) / split if split else Path(path)
    if not is_image_folder(p):
        raise ValueError(f"{p} is not an image folder (one sub-directory of images per class)")
    return ImageFolder(p, **kw)


def synth(out_dir: PathLike, images: int = 500, imgsz: int = 64, seed: int = 0,
          classes: Optional[Sequence[str]] = None, split: Optional[str] = None, margin: float = 0.3,
          progress: bool = True) -> dict:
    """Write a synthetic classification set in ImageFolder layout: scenes of the synthetic shapes
    (:func:`anydepth.data.synth.render`, one object each, drawn at ``max(128, 2 * imgsz)`` pixels),
    each cropped to a square around its object (``margin`` x the object's size on every side,
    clipped to the scene) and resized to ``imgsz`` x ``imgsz``: ``out_dir[/split]/<shape>/i.png``.
    Deterministic in ``(seed, split)``. Returns ``dict(path, images, classes, per_class)``."""
    from . import synth as shapes

    names = shapes._check_classes(classes)
    for name, value, lo in (("images", images, 1), ("imgsz", imgsz, 8)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if not 0 <= margin <= 2:
        raise ValueError(f"margin must be in [0, 2], got {margin!r}")
    Image = require("PIL.Image", "the synthetic classification set")
    tqdm = require("tqdm", "the synthetic classification set").tqdm
    root = Path(out_dir) / split if split else Path(out_dir)
    for n in names:
        (root / n).mkdir(parents=True, exist_ok=True)
    scene = max(128, 2 * int(imgsz))
    per_class = {n: 0 for n in names}
    written, index = 0, 0
    bar = tqdm(total=images, desc=f"synth-cls {split or ''}".strip(), disable=not progress, unit="img")
    while written < images:
        img, objects = shapes.render(index, scene, seed, names, 1, 1, split)
        index += 1
        if not objects:   # no free place found for the object: rare, skipped deterministically
            continue
        x0, y0, x1, y1 = objects[0]["box"]
        side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        h, w = img.shape[:2]
        side = min(side, h, w)
        left = int(round(min(max(cx - side / 2, 0), w - side)))
        top = int(round(min(max(cy - side / 2, 0), h - side)))
        s = int(round(side))
        crop = _resize(_chw(img[top:top + s, left:left + s]), imgsz, imgsz).permute(1, 2, 0).numpy()
        name = names[objects[0]["category"]]
        Image.fromarray(crop).save(root / name / f"{written:06d}.png", compress_level=1)
        per_class[name] += 1
        written += 1
        bar.update(1)
    bar.close()
    return dict(path=str(root), images=written, classes=list(names), per_class=per_class)
