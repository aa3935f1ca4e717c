"""Detection data: COCO-JSON and YOLO-txt data sets, batching, and a synthetic shapes generator.

    from anydepth.data import open_dataset, collate, synth
    synth.generate("data/shapes", images=1000, imgsz=320, split="train")
    ds = open_dataset("data/shapes/train", imgsz=320, augment=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, collate_fn=collate)

See :mod:`anydepth.data.datasets` for the sample format and augmentation.
"""
from . import classify, synth
from .datasets import (CocoDetection, DetectionDataset, YoloDetection, collate, open_dataset,
                       read_image)

__all__ = ["classify", "CocoDetection", "DetectionDataset", "YoloDetection", "collate", "open_dataset",
           "read_image", "synth"]
