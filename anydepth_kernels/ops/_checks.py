"""Input validation shared by the ops: clear Python errors instead of crashes or wrong answers.

Checks of shapes, dtypes and devices read no tensor data. Checks that must read data on the host
(``tolist``, ``item``, ``bool(t)``) synchronise a CUDA device when the tensor lives there, and
fail during CUDA graph capture; :func:`host_read_syncs` tells the two cases apart and
:class:`CheckedOnce` lets such a check run once per tensor instead of on every call.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Hashable, Optional, Sequence, Tuple, Union

import torch

from ..reference import ACTIVATIONS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def pair(value: Union[int, Sequence[int]], name: str, op: str, minimum: int) -> Tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return value


def check_tensor(t, name: str, op: str, dim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; expected one of "
            f"{', '.join(str(d) for d in FLOAT_DTYPES)}"
        )
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")


def check_same(t: torch.Tensor, like: torch.Tensor, name: str, like_name: str, op: str,
               dtype: bool = True) -> None:
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {like_name} is on {like.device}")
    if dtype and t.dtype != like.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {like_name} has {like.dtype}")


def check_act(act: str, op: str) -> int:
    if act not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {act!r}; expected one of {ACTIVATIONS}")
    return ACTIVATIONS.index(act)


def check_epilogue(y_shape, y: torch.Tensor, scale, bias, residual, op: str) -> None:
    """scale/bias: 1-D, one value per output channel; residual: the output's shape."""
    channels = y_shape[1]
    for name, t in (("scale", scale), ("bias", bias)):
        check_tensor(t, name, op, dim=1)
        if t.numel() != channels:
            raise ValueError(
                f"{op}: {name} has {t.numel()} elements but the output has {channels} channels"
            )
        check_same(t, y, name, "the input", op, dtype=False)
    if residual is not None:
        check_tensor(residual, "residual", op)
        check_same(residual, y, "residual", "the input", op)
        if tuple(residual.shape) != tuple(y_shape):
            raise ValueError(
                f"{op}: residual has shape {tuple(residual.shape)} but the output has shape "
                f"{tuple(y_shape)}"
            )


def conv_output_shape(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups,
                      op: str) -> Tuple[int, int, int, int]:
    """Validate a conv's operands and return its output shape."""
    check_tensor(x, "x", op, dim=4)
    check_tensor(weight, "weight", op, dim=4)
    check_same(weight, x, "weight", "x", op)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    n, c, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    if c == 0 or cout == 0:
        raise ValueError(f"{op}: empty channel dimension (x has {c}, weight has {cout} outputs)")
    if cin_g * groups != c:
        raise ValueError(
            f"{op}: x has {c} channels but weight expects {cin_g} x {groups} groups = "
            f"{cin_g * groups}"
        )
    if cout % groups != 0:
        raise ValueError(f"{op}: {cout} output channels are not divisible by groups={groups}")
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(
            f"{op}: input spatial size {h}x{w} is too small for a {kh}x{kw} kernel with "
            f"padding {padding} and dilation {dilation}"
        )
    return (n, cout, oh, ow)


def host_read_syncs(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host (``tolist``, ``item``, ``bool(t)``) has to wait
    for a device (every device but the CPU; a CUDA read also fails during graph capture)."""
    return t.device.type != "cpu"


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # an inference tensor: it keeps no version counter
        return None


class CheckedOnce:
    """Remembers which tensors passed a check that reads their data on the host, so that the
    check (and its device synchronisation) runs once per tensor rather than on every call.

    An entry is keyed on the identity of the tensors (held through weak references: a tensor
    that is freed, or another one that reuses its ``id``, is never mistaken for it), an extra
    hashable (whatever else the check depended on, e.g. a size it was compared against) and the
    tensors' version counters: any in-place change through torch (``t[0] = 5``, ``t.copy_(...)``,
    also through a view) bumps the counter and invalidates the entry. Writes that bypass the
    counter (through ``t.data`` or raw pointers) and in-place changes of inference tensors (which
    have no counter) are not seen, so the guarded kernels must stay memory-safe on their own for
    data that would fail the check. At most ``maxsize`` entries are kept (least recently used
    are dropped). Thread-safe.
    """

    def __init__(self, maxsize: int = 256):
        self.maxsize = maxsize
        self._entries: "OrderedDict[Hashable, tuple]" = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(tensors: Sequence[torch.Tensor], extra: Hashable) -> Hashable:
        return tuple(id(t) for t in tensors), extra

    def seen(self, tensors: Sequence[torch.Tensor], extra: Hashable = None) -> bool:
        """Whether these very tensors, unchanged since, passed the check with this ``extra``."""
        key = self._key(tensors, extra)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            refs, versions = entry
            if any(r() is not t for r, t in zip(refs, tensors)) \
                    or versions != tuple(_version(t) for t in tensors):
                del self._entries[key]
                return False
            self._entries.move_to_end(key)
            return True

    def add(self, tensors: Sequence[torch.Tensor], extra: Hashable = None) -> None:
        """Record that ``tensors`` (as they are now) passed the check with this ``extra``."""
        entry = (tuple(weakref.ref(t) for t in tensors), tuple(_version(t) for t in tensors))
        key = self._key(tensors, extra)
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
