"""Shared detection utilities: image batching with letterbox/resize, the result type, NMS.

Images given to ``model.predict`` may be a single image or a list of images, each an
``HxWx3`` uint8 ``numpy`` array / tensor (RGB, as decoded by PIL or ``cv2`` + BGR->RGB), or a
``3xHxW`` float tensor in [0, 1]; grayscale (``HxW``) and RGBA (``HxWx4``, alpha dropped) images
and 16-bit (uint16) arrays are converted. Results are :class:`Detections`, one per image, in the pixel
coordinates of the original image.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Detections:
    """Detections of one image: ``boxes`` [N, 4] xyxy pixels, ``scores`` [N], ``labels`` [N]."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.numel())

    def to(self, device) -> "Detections":
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device))


@dataclass
class Letterbox:
    """How an image was placed on the network canvas: ``canvas = orig * gain + (pad_x, pad_y)``."""

    gain_x: float
    gain_y: float
    pad_x: float
    pad_y: float
    orig_h: int
    orig_w: int

    def unmap(self, boxes: torch.Tensor) -> torch.Tensor:
        """Canvas xyxy boxes back to original-image pixels, clipped to the image."""
        out = boxes.clone()
        out[:, [0, 2]] = ((out[:, [0, 2]] - self.pad_x) / self.gain_x).clamp(0, self.orig_w)
        out[:, [1, 3]] = ((out[:, [1, 3]] - self.pad_y) / self.gain_y).clamp(0, self.orig_h)
        return out


ImageLike = Union[np.ndarray, torch.Tensor]


def _to_chw_float(img: ImageLike, index: int) -> torch.Tensor:
    """One image as a 3xHxW float32 tensor in [0, 1]. Integer images are channels-last: HxW or HxWx1
    (grayscale, repeated to RGB), HxWx3 (RGB), HxWx4 (RGBA: the alpha channel is dropped, as PIL's
    ``convert("RGB")`` and OpenCV's ``imread`` do); uint8 is divided by 255, uint16 (16-bit files)
    by 65535. Float images are channels-first in [0, 1]: 3xHxW, 1xHxW or HxW, 4xHxW."""
    if isinstance(img, np.ndarray):
        if img.dtype == np.uint16:  # torch has no uint16 arithmetic on every build: widen first
            img = img.astype(np.int32)
            img = torch.from_numpy(np.ascontiguousarray(img)).float().div_(65535.0)
            if img.dim() == 3:
                if img.shape[-1] not in (1, 3, 4):
                    raise ValueError(f"image {index}: a uint16 image must be HxWx3 RGB (or HxW / HxWx1 "
                                     f"grayscale, HxWx4 RGBA), got shape {tuple(img.shape)}")
                img = img.permute(2, 0, 1)
        else:
            arr = np.ascontiguousarray(img)
            img = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # e.g. np.asarray(PIL image)
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"image {index}: expected a numpy array or a torch tensor, got {type(img).__name__}")
    if img.dim() == 2:  # grayscale HxW
        img = img[None] if img.is_floating_point() else img[..., None]
    if img.dim() != 3:
        raise ValueError(f"image {index}: expected HxWx3 (uint8) or 3xHxW (float), or a grayscale/RGBA variant, "
                         f"got shape {tuple(img.shape)}")
    if img.dtype == torch.uint8:
        if img.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image {index}: a uint8 image must be HxWx3 RGB (or HxW / HxWx1 grayscale, HxWx4 "
                             f"RGBA), got shape {tuple(img.shape)}")
        img = img.permute(2, 0, 1).float().div_(255.0)
    elif img.is_floating_point():
        if img.shape[0] not in (1, 3, 4):
            raise ValueError(f"image {index}: a float image must be 3xHxW in [0, 1] (or 1xHxW / HxW grayscale, "
                             f"4xHxW RGBA), got shape {tuple(img.shape)}")
        img = img.float()
    else:
        raise TypeError(f"image {index}: dtype {img.dtype} is neither uint8, uint16 nor floating point")
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    elif img.shape[0] == 4:
        img = img[:3]
    if img.shape[1] < 1 or img.shape[2] < 1:
        raise ValueError(f"image {index}: empty image of shape {tuple(img.shape)}")
    if not torch.isfinite(img).all():
        raise ValueError(f"image {index}: contains NaN or infinite values")
    return img


def as_image_list(images) -> List[ImageLike]:
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:  # a batch
            return list(images)
        return [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("predict: got an empty list of images")
        return list(images)
    raise TypeError("predict: images must be an image, a batch tensor or a list of images, got "
                    f"{type(images).__name__}")


def canvas_side(imgsz, stride: int = 32) -> int:
    """The network input side for a ``predict(imgsz=...)`` request: ``imgsz`` (any positive int,
    the size the image is resized to) rounded up to a multiple of ``stride``; the difference is
    padding. ``ValueError`` for anything but a positive int."""
    if isinstance(imgsz, bool) or not isinstance(imgsz, numbers.Integral) or imgsz <= 0:
        raise ValueError(f"imgsz must be a positive int (pixels), got {imgsz!r}")
    return -(-int(imgsz) // stride) * stride


def _pair(size, what: str) -> Tuple[int, int]:
    h, w = (size, size) if isinstance(size, numbers.Integral) else size
    if isinstance(h, bool) or isinstance(w, bool) or h <= 0 or w <= 0:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return int(h), int(w)


def letterbox_batch(images, size: Union[int, Tuple[int, int]], stride: int = 32, fill: float = 114 / 255,
                    device=None, dtype=torch.float32,
                    fit: Optional[Union[int, Tuple[int, int]]] = None) -> Tuple[torch.Tensor, List[Letterbox]]:
    """Resize each image keeping its aspect ratio to fit ``fit`` (h, w; default the canvas),
    place it centred on the canvas ``size`` (h, w; multiples of ``stride``) and pad the rest with
    ``fill`` (as Ultralytics does). Returns the batch ``[B, 3, H, W]`` and one :class:`Letterbox`
    per image."""
    h, w = _pair(size, "letterbox: canvas size")
    if h % stride or w % stride:
        raise ValueError(f"letterbox: canvas size {(h, w)} must be positive multiples of {stride}")
    fh, fw = (h, w) if fit is None else _pair(fit, "letterbox: fit size")
    if fh > h or fw > w:
        raise ValueError(f"letterbox: fit size {(fh, fw)} is larger than the canvas {(h, w)}")
    imgs = [_to_chw_float(im, i) for i, im in enumerate(as_image_list(images))]
    batch = torch.full((len(imgs), 3, h, w), fill, dtype=torch.float32)
    boxes = []
    for i, im in enumerate(imgs):
        ih, iw = im.shape[1:]
        r = min(fh / ih, fw / iw)
        nh, nw = max(1, round(ih * r)), max(1, round(iw * r))
        if (nh, nw) != (ih, iw):
            im = F.interpolate(im[None], size=(nh, nw), mode="bilinear", align_corners=False,
                               antialias=r < 1)[0]
        top, left = (h - nh) // 2, (w - nw) // 2
        batch[i, :, top:top + nh, left:left + nw] = im
        boxes.append(Letterbox(nw / iw, nh / ih, left, top, ih, iw))
    return batch.to(device=device, dtype=dtype), boxes


def resize_batch(images, size: Union[int, Tuple[int, int]], device=None, dtype=torch.float32,
                 canvas: Optional[Union[int, Tuple[int, int]]] = None,
                 fill: float = 0.0) -> Tuple[torch.Tensor, List[Letterbox]]:
    """Plain resize to ``size`` (no aspect preservation), as RT-DETR's preprocessing does. With a
    ``canvas`` (h, w) larger than ``size``, the resized image sits at its top-left corner and the
    rest is ``fill`` (zeros: HF's RT-DETR processor pads bottom/right with zeros)."""
    h, w = _pair(size, "resize size")
    ch, cw = (h, w) if canvas is None else _pair(canvas, "resize canvas")
    if ch < h or cw < w:
        raise ValueError(f"resize: canvas {(ch, cw)} is smaller than the size {(h, w)}")
    imgs = [_to_chw_float(im, i) for i, im in enumerate(as_image_list(images))]
    batch = torch.full((len(imgs), 3, ch, cw), fill, dtype=torch.float32)
    boxes = []
    for i, im in enumerate(imgs):
        ih, iw = im.shape[1:]
        batch[i, :, :h, :w] = F.interpolate(im[None], size=(h, w), mode="bilinear", align_corners=False,
                                            antialias=(ih > h or iw > w))[0]
        boxes.append(Letterbox(w / iw, h / ih, 0.0, 0.0, ih, iw))
    return batch.to(device=device, dtype=dtype), boxes


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """Class-aware greedy NMS; indices kept, by decreasing score. Uses torchvision's kernel when
    installed (the ``vision`` extra), else :func:`greedy_nms` (same result; tested against it)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    try:
        from torchvision.ops import batched_nms as tv_nms
    except ImportError:
        return greedy_nms(boxes, scores, labels, iou)
    return tv_nms(boxes.float(), scores.float(), labels, iou)


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """Class-aware greedy NMS in plain PyTorch (an all-pairs IoU matrix, then one pass in score
    order): what :func:`batched_nms` runs without torchvision, e.g. on a machine with torch only."""
    from .losses.boxes import bbox_iou

    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offset = labels.to(boxes.dtype)[:, None] * (boxes.max() + 1)
    b = boxes + offset
    order = scores.argsort(descending=True)
    b = b[order]
    ious = bbox_iou(b[:, None, :].float(), b[None, :, :].float(), kind="iou", eps=0.0).nan_to_num_(0.0)
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1:] &= ious[i, i + 1:] <= iou
    return order[keep]
