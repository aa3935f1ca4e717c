"""Multi-scale deformable attention: ``anydepth_kernels.ms_deform_attn(...)``.

Same signature as Deformable-DETR's ``MSDeformAttnFunction`` / HF's
``multi_scale_deformable_attention``; see :func:`anydepth_kernels.reference.ms_deform_attn` for
the semantics. Registered as ``torch.ops.anydepth.ms_deform_attn`` (schema, fake kernel for
``torch.compile``/export, autograd through ``torch.ops.anydepth.ms_deform_attn_backward``); the op
body is the single dispatch point.

Backends (``backend=``):
  ``"cpp"``       fused C++ kernels, float32/float64 (float16/bfloat16 computed in float32) (CPU)
  ``"cuda"``      CUDA kernels, float32/float16/bfloat16/float64, fp32 accumulation (CUDA)
  ``"triton"``    Triton kernels, float32/float16/bfloat16 (CUDA; CPU tensors only under
                  ``TRITON_INTERPRET=1``)
  ``"reference"`` the eager ``grid_sample`` reference (backward: autograd through it); float16
                  and bfloat16 computed in float32
  ``"auto"``      cpp on CPU, cuda then triton on CUDA, else the reference with a one-time warning

The backward runs on the same backend as the forward (``"auto"`` resolves the same way), so every
backend above has its own forward and backward.

Input handling:
  * ``value``, ``sampling_locations`` and ``attention_weights`` share one floating dtype and one
    device; any strides are accepted (non-contiguous inputs are copied to contiguous ones).
  * ``spatial_shapes`` ``[L, 2]`` and ``level_start_index`` ``[L]`` are integer tensors on any
    device (used on ``value``'s device as int64); every level must be non-empty, their sizes
    must sum to ``S`` and ``level_start_index`` must be their running offsets. Checking that
    reads the tables on the host, and no call synchronises a device for it on the hot path:

    - tables on the CPU are checked on every call (reading them costs no device sync); for a
      CUDA ``value`` their device copy is cached by content, so there is no host-to-device copy
      per call either (and a CUDA graph can be captured once the call has run eagerly);
    - tables on a device are checked once per table (:class:`~._checks.CheckedOnce`: the same
      tensor objects, not modified in place since): the first call with them synchronises once,
      later calls do not;
    - while a CUDA graph is being captured nothing is read or copied (the eager warm-up calls
      before a capture have checked the tables).

    The CUDA and Triton kernels bound the table themselves, so a table that escaped the check (a
    first use inside a capture, a write through ``.data``) cannot make them read outside
    ``value``: the points of a level that does not fit give NaN.
  * Empty ``N``, ``Q``, ``M`` or ``D`` give an empty ``[N, Q, M*D]`` result (and zero gradients);
    ``P = 0`` gives zeros.
  * NaN/inf policy, identical in every backend and in the reference: a non-finite sampling
    location samples NaN (its output row becomes NaN); an attention weight multiplies the sampled
    value, so a non-finite weight gives NaN (``inf * 0``) or inf; a NaN in ``value`` reaches every
    output whose bilinear corners read it, even with a zero bilinear weight. Finite locations
    far outside ``[0, 1]`` sample zeros. The gradients of a point at a non-finite location are NaN.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import List, Tuple

import torch

from .. import reference
from . import _backends, _checks
from ._checks import FLOAT_DTYPES

MS_DEFORM_BACKENDS = _backends.names("ms_deform_attn")

_OP = "anydepth.ms_deform_attn"
_BWD_OP = "anydepth.ms_deform_attn_backward"


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    """Types, shapes, dtypes and devices (trace-friendly: reads no tensor data)."""
    op = "ms_deform_attn"
    for name, t in (("value", value), ("spatial_shapes", spatial_shapes),
                    ("level_start_index", level_start_index),
                    ("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise ValueError(f"{op}: value must be [N, S, M, D], got shape {tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: value has dtype {value.dtype}; expected one of "
                        f"{', '.join(str(d) for d in FLOAT_DTYPES)}")
    n, s, m, d = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.is_floating_point() \
            or spatial_shapes.is_complex() or spatial_shapes.dtype == torch.bool:
        raise ValueError(f"{op}: spatial_shapes must be an integer [L, 2] tensor, got "
                         f"{tuple(spatial_shapes.shape)} {spatial_shapes.dtype}")
    levels = spatial_shapes.shape[0]
    if levels == 0:
        raise ValueError(f"{op}: spatial_shapes is empty: at least one level is needed")
    if level_start_index.shape != (levels,) or level_start_index.is_floating_point() \
            or level_start_index.is_complex() or level_start_index.dtype == torch.bool:
        raise ValueError(f"{op}: level_start_index must be an integer [L={levels}] tensor, got "
                         f"{tuple(level_start_index.shape)} {level_start_index.dtype}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[0] != n or sampling_locations.shape[2] != m \
            or sampling_locations.shape[3] != levels or sampling_locations.shape[5] != 2:
        raise ValueError(f"{op}: sampling_locations must be [N={n}, Q, M={m}, L={levels}, P, 2], got "
                         f"{tuple(sampling_locations.shape)}")
    q, p = sampling_locations.shape[1], sampling_locations.shape[4]
    if tuple(attention_weights.shape) != (n, q, m, levels, p):
        raise ValueError(f"{op}: attention_weights must be [N, Q, M, L, P] = {(n, q, m, levels, p)}, "
                         f"got {tuple(attention_weights.shape)}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.dtype != value.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but value has {value.dtype}")
        if t.device != value.device:
            raise ValueError(f"{op}: {name} is on {t.device} but value is on {value.device}")


def _validate_levels(s: int, shapes: List[List[int]], starts: List[int]) -> None:
    """The level table (read as Python lists) against ``S``: a ``ValueError`` naming the fault."""
    op = "ms_deform_attn"
    offset = 0
    expected = []
    for lvl, (h, w) in enumerate(shapes):
        if h <= 0 or w <= 0:
            raise ValueError(f"{op}: level {lvl} has an empty feature map {h}x{w} (spatial_shapes "
                             f"{shapes})")
        expected.append(offset)
        offset += h * w
    if offset != s:
        raise ValueError(f"{op}: value has S={s} positions but spatial_shapes {shapes} sum to {offset}")
    if starts != expected:
        raise ValueError(f"{op}: level_start_index {starts} does not match spatial_shapes "
                         f"(expected {expected})")


def _read_tables(spatial_shapes: torch.Tensor,
                 level_start_index: torch.Tensor) -> Tuple[List[List[int]], List[int]]:
    """Both tables as Python lists, with one device synchronisation when they share a device."""
    if spatial_shapes.device == level_start_index.device and _checks.host_read_syncs(spatial_shapes):
        flat = torch.cat([spatial_shapes.reshape(-1).to(torch.int64),
                          level_start_index.to(torch.int64)]).tolist()
        n = 2 * spatial_shapes.shape[0]
        return [flat[i:i + 2] for i in range(0, n, 2)], flat[n:]
    return spatial_shapes.tolist(), level_start_index.tolist()


class _DeviceTables:
    """Device copies of host level tables, keyed by their content (no host-to-device copy, which
    synchronises, per call). Copies handed out while a CUDA graph is captured are never dropped
    (the graph reads them on every replay) and are reported to
    :func:`anydepth_kernels.cuda_graphs.keep_alive`; others are dropped least recently used
    first beyond ``maxsize``."""

    def __init__(self, maxsize: int = 64):
        self.maxsize = maxsize
        self._entries: "OrderedDict[tuple, list]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, device: torch.device, shapes: List[List[int]], starts: List[int],
            capturing: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (device, tuple(map(tuple, shapes)), tuple(starts))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is None:
            if capturing:
                raise RuntimeError(
                    "ms_deform_attn: spatial_shapes and level_start_index are CPU tensors this "
                    f"process has not used on {device} before, and a CUDA graph is being captured "
                    "(the host-to-device copy of the tables cannot be captured). Call the op once "
                    "before the capture (a warm-up call) or pass the tables on the device.")
            levels = len(shapes)
            flat = torch.tensor([v for hw in shapes for v in hw] + list(starts), dtype=torch.int64,
                                device=device)
            entry = [flat[:2 * levels].view(levels, 2), flat[2 * levels:], False]
            with self._lock:
                entry = self._entries.setdefault(key, entry)  # another thread may have stored it
                self._entries.move_to_end(key)
                droppable = [k for k, e in self._entries.items() if not e[2]]
                for k in droppable[:max(0, len(self._entries) - self.maxsize)]:
                    del self._entries[k]
        if capturing:
            entry[2] = True
            try:
                from ..cuda_graphs import keep_alive
            except ImportError:  # pragma: no cover - older cuda_graphs without keep_alive
                pass
            else:
                keep_alive(entry[0], entry[1])
        return entry[0], entry[1]


#: Device level tables that passed the check (keyed on the tensors and value's S).
_CHECKED_TABLES = _checks.CheckedOnce()
#: Device copies of host level tables (keyed by content).
_DEVICE_TABLES = _DeviceTables()


def _check_levels(value: torch.Tensor, spatial_shapes: torch.Tensor,
                  level_start_index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Check the level tables against ``S`` and return them as contiguous int64 tensors on
    ``value``'s device, with no device synchronisation on the hot path (see the module
    docstring): host tables are read (no sync) and checked on every call, device tables once
    per table, and nothing is read while a CUDA graph is being captured."""
    dev = value.device
    s = value.shape[1]
    # torch.cuda.is_initialized() first: no CUDA initialisation for CPU-only work.
    capturing = torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
    on_host = not (_checks.host_read_syncs(spatial_shapes)
                   or _checks.host_read_syncs(level_start_index))
    if on_host:
        shapes, starts = _read_tables(spatial_shapes, level_start_index)
        _validate_levels(s, shapes, starts)
        if _checks.host_read_syncs(value):
            return _DEVICE_TABLES.get(dev, shapes, starts, capturing)
    elif not capturing:
        tables = (spatial_shapes, level_start_index)
        if not _CHECKED_TABLES.seen(tables, s):
            shapes, starts = _read_tables(spatial_shapes, level_start_index)  # one sync
            _validate_levels(s, shapes, starts)
            _CHECKED_TABLES.add(tables, s)
    return (spatial_shapes.to(device=dev, dtype=torch.int64).contiguous(),
            level_start_index.to(device=dev, dtype=torch.int64).contiguous())


def _resolve(t: torch.Tensor, backend: str) -> str:
    """The backend for ``t`` (:data:`._backends.OPS`: cpp/cuda also need the loaded extension to
    have this op)."""
    return _backends.resolve("ms_deform_attn", t, backend).backend


def _prepare(value: torch.Tensor, tables: Tuple[torch.Tensor, torch.Tensor], sampling_locations: torch.Tensor,
             attention_weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor]:
    """Contiguous operands for the kernels; ``tables`` from :func:`_check_levels`."""
    return (value.contiguous(), tables[0], tables[1], sampling_locations.contiguous(),
            attention_weights.contiguous())


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32 by the C++ CPU kernels and by the reference
    backend (the CUDA and Triton kernels load them and accumulate in float32 too)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reference_tables(spatial_shapes: torch.Tensor,
                      tables: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference reads ``spatial_shapes`` on the host: give it the host table when there is
    one (reading the device copy would synchronise)."""
    return (spatial_shapes if not _checks.host_read_syncs(spatial_shapes) else tables[0]), tables[1]


@torch.library.custom_op(_OP.replace(".", "::"), mutates_args=())
def _ms_deform_attn_op(value: torch.Tensor, spatial_shapes: torch.Tensor,
                       level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                       attention_weights: torch.Tensor, backend: str) -> torch.Tensor:
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    q, p = sampling_locations.shape[1], sampling_locations.shape[4]
    chosen = _resolve(value, backend)
    tables = _check_levels(value, spatial_shapes, level_start_index)
    if n * q * m * d == 0 or p == 0:
        return value.new_zeros((n, q, m * d))
    args = _prepare(value, tables, sampling_locations, attention_weights)
    if chosen == "cpp":
        ct = _compute_dtype(value.dtype)
        v, ss, lsi, loc, attn = args
        out = torch.ops.anydepth._ext_ms_deform_attn_forward(v.to(ct), ss, lsi, loc.to(ct), attn.to(ct))
        return out.to(value.dtype)
    if chosen == "cuda":
        return torch.ops.anydepth._ext_ms_deform_attn_forward(*args)
    if chosen == "triton":
        from ..triton_kernels import ms_deform_attn as tk

        return tk.ms_deform_attn_forward(*args)
    # The reference in float32 for float16/bfloat16 inputs, like every kernel: in half precision
    # grid_sample would round the sampling grid (2 * loc - 1) and its own sums to 8 or 11 bits.
    ct = _compute_dtype(value.dtype)
    v, _, _, loc, attn = args
    out = reference.ms_deform_attn(v.to(ct), *_reference_tables(spatial_shapes, tables),
                                   loc.to(ct), attn.to(ct))
    return out.to(value.dtype)


@_ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend):
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


def _reference_backward(value, spatial_shapes, level_start_index, loc, attn, grad):
    """Gradients of the reference, computed in float32 for float16/bfloat16 (as the forward)."""
    ct = _compute_dtype(value.dtype)

    # torch.func.vjp: plain autograd is switched off inside a custom op's body.
    def fn(v, sl, aw):
        return reference.ms_deform_attn(v, spatial_shapes, level_start_index, sl, aw)

    _, vjp = torch.func.vjp(fn, value.to(ct), loc.to(ct), attn.to(ct))
    return tuple(g.to(value.dtype) for g in vjp(grad.to(ct)))


@torch.library.custom_op(_BWD_OP.replace(".", "::"), mutates_args=())
def _ms_deform_attn_backward_op(value: torch.Tensor, spatial_shapes: torch.Tensor,
                                level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                                attention_weights: torch.Tensor, grad_output: torch.Tensor,
                                backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_value, grad_sampling_locations, grad_attention_weights)`` of ``ms_deform_attn``."""
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    q, p = sampling_locations.shape[1], sampling_locations.shape[4]
    if tuple(grad_output.shape) != (n, q, m * d):
        raise ValueError(f"{_BWD_OP}: grad_output must be [N, Q, M*D] = {(n, q, m * d)}, got "
                         f"{tuple(grad_output.shape)}")
    chosen = _resolve(value, backend)
    tables = _check_levels(value, spatial_shapes, level_start_index)
    if n * q * m * d == 0 or p == 0:
        return (torch.zeros_like(value), torch.zeros_like(sampling_locations),
                torch.zeros_like(attention_weights))
    args = _prepare(value, tables, sampling_locations, attention_weights)
    grad = grad_output.to(value.dtype).contiguous()
    if chosen == "cpp":
        ct = _compute_dtype(value.dtype)
        v, ss, lsi, loc, attn = args
        grads = torch.ops.anydepth._ext_ms_deform_attn_backward(
            v.to(ct), ss, lsi, loc.to(ct), attn.to(ct), grad.to(ct))
        return tuple(g.to(value.dtype) for g in grads)
    if chosen == "cuda":
        return tuple(torch.ops.anydepth._ext_ms_deform_attn_backward(*args, grad))
    if chosen == "triton":
        from ..triton_kernels import ms_deform_attn as tk

        return tk.ms_deform_attn_backward(*args, grad)
    v, _, _, loc, attn = args
    return _reference_backward(v, *_reference_tables(spatial_shapes, tables), loc, attn, grad)


@_ms_deform_attn_backward_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output,
      backend):
    return (torch.empty_like(value), torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights))


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, loc, attn, backend = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, loc, attn)
    ctx.backend = backend


def _backward(ctx, grad):
    value, spatial_shapes, level_start_index, loc, attn = ctx.saved_tensors
    need_value, _, _, need_loc, need_attn, _ = ctx.needs_input_grad
    if not (need_value or need_loc or need_attn):
        return None, None, None, None, None, None
    grad_value, grad_loc, grad_attn = torch.ops.anydepth.ms_deform_attn_backward(
        value, spatial_shapes, level_start_index, loc, attn, grad, ctx.backend)
    return (grad_value if need_value else None, None, None, grad_loc if need_loc else None,
            grad_attn if need_attn else None, None)


_ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                   backend: str = "auto") -> torch.Tensor:
    """Multi-scale deformable attention ``-> [N, Q, M*D]`` (see the module docstring).

    Args:
        value: ``[N, S, M, D]`` flattened feature maps of all levels, ``M`` heads of ``D``
            channels (float32, float16, bfloat16 or float64).
        spatial_shapes: ``[L, 2]`` integer ``(H_l, W_l)`` per level, ``sum(H_l * W_l) == S``.
        level_start_index: ``[L]`` integer offset of each level in ``S``.
        sampling_locations: ``[N, Q, M, L, P, 2]`` ``(x, y)`` normalised to ``[0, 1]`` (points
            outside sample zeros, as ``grid_sample(align_corners=False, padding_mode="zeros")``).
        attention_weights: ``[N, Q, M, L, P]``.
        backend: ``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"reference"``; a named
            backend that cannot run here raises ``RuntimeError`` saying why.

    Returns:
        ``[N, Q, M * D]`` in ``value``'s dtype.
    """
    if backend not in MS_DEFORM_BACKENDS:
        raise ValueError(f"ms_deform_attn: unknown backend {backend!r}; expected one of {MS_DEFORM_BACKENDS}")
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return torch.ops.anydepth.ms_deform_attn(value, spatial_shapes, level_start_index,
                                             sampling_locations, attention_weights, backend)
