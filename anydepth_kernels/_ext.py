"""Loading of the compiled extensions and the report of what is available.

The C++ CPU ops live in ``anydepth_kernels._C`` and the CUDA ops in ``anydepth_kernels._C_cuda``;
importing them registers ``torch.ops.anydepth._ext_*`` with the dispatcher. When one is missing the
package still works: the dispatcher falls back to the eager reference and warns once.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Dict, Optional

import torch

_CPU_ERROR: Optional[str] = None
_CUDA_ERROR: Optional[str] = None


def _build_info() -> Dict[str, Any]:
    try:
        from . import _build_info as info  # written by setup.py
    except ImportError:
        return {}
    return {k.lower(): v for k, v in vars(info).items() if k.isupper()}


def _load() -> None:
    global _CPU_ERROR, _CUDA_ERROR
    info = _build_info()
    try:
        importlib.import_module("anydepth_kernels._C")
    except ImportError as e:
        _CPU_ERROR = (
            f"not compiled ({e}); reinstall with `pip install --no-build-isolation .`"
            if not info
            else f"failed to load: {e}"
        )
    if _CPU_ERROR is not None:
        _CUDA_ERROR = "needs the CPU extension, which is not loaded"
        return
    try:
        importlib.import_module("anydepth_kernels._C_cuda")
    except ImportError as e:
        reason = info.get("cuda_skip_reason")
        _CUDA_ERROR = f"not compiled: {reason}" if reason else f"failed to load: {e}"


_load()

CPU_AVAILABLE: bool = _CPU_ERROR is None
CUDA_COMPILED: bool = _CUDA_ERROR is None

_warned: set = set()


def warn_fallback(op: str, device: torch.device, reason: str) -> None:
    """Warn once per (op, device type) that an op runs on its eager reference."""
    key = (op, device.type)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"anydepth_kernels: {op} on {device.type} runs the eager reference ({reason}). "
        "See anydepth_kernels.extension_info().",
        RuntimeWarning,
        stacklevel=3,
    )


def extension_info() -> Dict[str, Any]:
    """What was compiled and what can run here, and why not where not.

    Returns a dict with one entry per backend (``cpu``, ``cuda``, ``triton``), each holding
    ``available`` (bool) and ``reason`` (``None`` when available), plus build details; and
    ``ops``: the backend table (:mod:`anydepth_kernels.ops._backends`) per op: each backend's
    devices and dtypes, the order ``auto`` tries them, and per device type (``cpu``, ``cuda``) what
    ``auto`` runs and each backend's availability for float32 (``None`` or the reason).
    """
    from . import triton_kernels
    from .ops import _backends

    info = _build_info()
    return {
        "torch": torch.__version__,
        "cpu": {"available": CPU_AVAILABLE, "reason": _CPU_ERROR},
        "cuda": {
            "available": CUDA_COMPILED and torch.cuda.is_available(),
            "compiled": CUDA_COMPILED,
            "arch_list": info.get("cuda_arch_list"),
            "reason": _CUDA_ERROR
            if not CUDA_COMPILED
            else (None if torch.cuda.is_available() else "compiled, but no CUDA device is visible"),
        },
        "triton": {
            "available": triton_kernels.AVAILABLE,
            "reason": triton_kernels.UNAVAILABLE_REASON,
        },
        "ops": _backends.describe(),
    }
