"""Optional dependencies, imported when first used, failing with the extra that installs them.

The core install needs torch and numpy only. Evaluation (``pycocotools``), plotting
(``matplotlib``), matching for the RT-DETR loss (``scipy``), image files (``pillow``) and progress
bars (``tqdm``) come with extras: ``pip install "anydepth[eval]"`` etc. (see ``pyproject.toml``).
"""
from __future__ import annotations

import importlib
from types import ModuleType

#: top-level module -> (distribution name, extra that installs it)
OPTIONAL = {
    "pycocotools": ("pycocotools", "eval"),
    "matplotlib": ("matplotlib", "plot"),
    "scipy": ("scipy", "train"),
    "PIL": ("pillow", "data"),
    "tqdm": ("tqdm", "data"),
    "torchvision": ("torchvision", "vision"),
    "yaml": ("PyYAML", "data"),
    "av": ("av", "video"),
    "ultralytics": ("ultralytics", "peers"),
    "transformers": ("transformers", "peers"),
    "timm": ("timm", "peers"),
    "onnx": ("onnx", "export"),
    "onnxscript": ("onnxscript", "export"),
    "onnx_ir": ("onnxscript", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "torchao": ("torchao", "quant"),
}


def require(module: str, what: str) -> ModuleType:
    """``import module`` (dotted names allowed), or an ImportError saying that ``what`` needs it
    and which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        dist, extra = OPTIONAL[module.split(".", 1)[0]]
        raise ImportError(f"{what} needs {dist}, which is not installed: pip install \"anydepth[{extra}]\" "
                          f"(or pip install {dist})") from e
