"""Fused attention: ``anydepth_kernels.attention(q, k, v)`` and YOLOv12 area attention
``anydepth_kernels.area_attention(qkv, num_heads, area)``.

``attention`` is ``softmax(q k^T * scale) v`` over ``[B, H, N, D]`` tensors (the
``F.scaled_dot_product_attention`` convention; no mask, non-causal; ``scale`` defaults to
``1/sqrt(D)``; ``k``/``v`` may have another sequence length than ``q``). Registered as
``torch.ops.anydepth.attention`` (returns ``(out, lse)``), with a fake kernel for
``torch.compile``/export and autograd through ``torch.ops.anydepth.attention_backward``.

``area_attention`` takes the qkv 1x1-conv output ``[B, 3C, H, W]`` of YOLOv12's ``AAttn`` (heads
interleaved ``[q|k|v]`` per head: channel ``head*3*hd + {0, hd, 2hd} + d``; the map's positions
split into ``area`` contiguous runs, each attended separately) and returns ``(out, v_map)``, both
``[B, C, H, W]``. Registered as ``torch.ops.anydepth.area_attention`` (returns
``(out, v_map, lse)``), autograd through ``torch.ops.anydepth.area_attention_backward``.
The definition is :func:`anydepth_kernels.reference.area_attention`.

Backends (``backend=``):
  ``"triton"``    Triton FlashAttention-2 kernels (online softmax, fp32 accumulation, the
                  log-sum-exp saved for a backward that recomputes the probabilities); float32,
                  float16, bfloat16; head dims 1..128 (padded to a power-of-two tile >= 16).
                  Area attention reads q/k/v with strided indexing straight from the NCHW (or
                  channels-last) qkv map and writes ``out``, ``v_map`` and, in the backward,
                  ``d(qkv)`` straight in map layout: no reshape copies. CUDA; CPU tensors only
                  under ``TRITON_INTERPRET=1``.
  ``"sdpa"``      the library's fused attention (area attention: the contiguous token copy +
                  SDPA, as ``AAttn`` did). On the CPU it calls the flash kernel behind
                  ``F.scaled_dot_product_attention`` directly
                  (``aten::_scaled_dot_product_flash_attention_for_cpu``), which returns the
                  log-sum-exp too, and its backward kernel with it: no forward recomputation.
                  Elsewhere (or if those ops are missing) ``F.scaled_dot_product_attention``,
                  whose backward recomputes the forward inside the backward op.
  ``"reference"`` the explicit eager reference in float32 (backward: autograd through it).
  ``"auto"``      triton on CUDA when Triton is usable and the head dim is supported, else sdpa
                  (SDPA is the CPU fast path: nothing here beats the library's kernels there).

The backward runs on the forward's backend. ``lse`` (natural-log log-sum-exp of the scaled
scores, float32, ``[B, H, Nq]``; ``[B*area, heads, N/area]`` for area attention) is produced by
the triton backend and by sdpa on the CPU; the other backends return an empty tensor in its
place.

Input checks (clear Python errors): tensors of rank 4, one floating dtype and one device, no empty
dimension, ``q``/``k``/``v`` batch, heads and head dim equal and ``k``/``v`` lengths equal, a
finite ``scale``; for area attention ``3C`` divisible by ``3 * num_heads`` and ``H*W`` by
``area``. A named backend that cannot run here raises ``RuntimeError`` saying why (for triton:
which head dims and dtypes it supports).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import reference
from . import _backends
from ._backends import INPUT_PRECISIONS, TRITON_MAX_HEAD_DIM  # noqa: F401 (re-exported)

ATTENTION_BACKENDS = _backends.names("attention")
_FLOAT_DTYPES = _backends.FLOAT_DTYPES

_OP = "anydepth.attention"
_AREA_OP = "anydepth.area_attention"


# --------------------------------------------------------------------------------------------
# Checks and backend selection (trace-friendly: read no tensor data)
# --------------------------------------------------------------------------------------------

def _check_common(op: str, scale, backend: str, input_precision: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"{op}: unknown input_precision {input_precision!r}; expected one of "
                         f"{INPUT_PRECISIONS}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"{op}: scale must be finite, got {scale}")


def _check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected one of "
                        f"{', '.join(str(d) for d in _FLOAT_DTYPES)}")
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(t.shape)})")


def _check_qkv(q, k, v) -> None:
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(op, name, t)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"{op}: k must be [B={b}, H={h}, Nk, D={d}] like q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{op}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")


def _check_area(qkv, num_heads, area) -> Tuple[int, int, int, int, int]:
    """-> (B, C, H, W, head_dim)."""
    op = "area_attention"
    _check_tensor(op, "qkv", qkv)
    for name, val in (("num_heads", num_heads), ("area", area)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {val!r}")
    b, c3, h, w = qkv.shape
    if c3 % (3 * num_heads):
        raise ValueError(f"{op}: qkv has {c3} channels, not a multiple of 3 * num_heads = "
                         f"{3 * num_heads}")
    if (h * w) % area:
        raise ValueError(f"{op}: the {h}x{w} = {h * w} positions do not split into {area} areas")
    return b, c3 // 3, h, w, c3 // (3 * num_heads)


def resolve_backend(op: str, t: torch.Tensor, head_dim: int, backend: str) -> str:
    """The backend that runs ``op`` for tensor ``t``; raises if a named one cannot run."""
    key = "area_attention" if op == _AREA_OP else "attention"
    return _backends.resolve(key, t, backend, name=op, head_dim=head_dim).backend


_CPU_FLASH: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BWD: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward",
                         None)


def _sdpa_saves_lse(t: torch.Tensor) -> bool:
    """On the CPU the "sdpa" backend calls the library's flash kernel directly, which also
    returns the log-sum-exp, and its backward kernel with it (no forward recomputation)."""
    return t.device.type == "cpu" and _CPU_FLASH is not None and _CPU_FLASH_BWD is not None


def _has_lse(chosen: str, t: torch.Tensor) -> bool:
    return chosen == "triton" or (chosen == "sdpa" and _sdpa_saves_lse(t))


def _scale(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _no_lse(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((0,), dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# attention [B, H, N, D]
# --------------------------------------------------------------------------------------------

@torch.library.custom_op(_OP.replace(".", "::"), mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float],
                  backend: str, input_precision: str) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_common("attention", scale, backend, input_precision)
    _check_qkv(q, k, v)
    chosen = resolve_backend(_OP, q, q.shape[-1], backend)
    s = _scale(scale, q.shape[-1])
    if chosen == "triton":
        from ..triton_kernels import attention as tk

        return tk.attention_forward(q, k, v, s, input_precision)
    if chosen == "sdpa" and _sdpa_saves_lse(q):
        out, lse = _CPU_FLASH(q, k, v, 0.0, False, scale=s)
        return out.contiguous(), lse.contiguous()
    if chosen == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, scale=s)
    else:
        out = reference.attention(q, k, v, s)
    return out.contiguous(), _no_lse(q)


@_attention_op.register_fake
def _(q, k, v, scale, backend, input_precision):
    _check_common("attention", scale, backend, input_precision)
    _check_qkv(q, k, v)
    chosen = resolve_backend(_OP, q, q.shape[-1], backend)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32) if _has_lse(chosen, q) else _no_lse(q)
    return q.new_empty(q.shape), lse


def _vjp(fn, primals, cotangents):
    # torch.func.vjp: plain autograd is switched off inside a custom op's body.
    _, pullback = torch.func.vjp(fn, *primals)
    return pullback(cotangents)


@torch.library.custom_op("anydepth::attention_backward", mutates_args=())
def _attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, grad_out: torch.Tensor, scale: Optional[float],
                           backend: str, input_precision: str
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of ``attention``."""
    _check_qkv(q, k, v)
    if grad_out.shape != q.shape:
        raise ValueError(f"anydepth.attention_backward: grad_out must be {tuple(q.shape)}, got "
                         f"{tuple(grad_out.shape)}")
    chosen = resolve_backend(_OP, q, q.shape[-1], backend)
    s = _scale(scale, q.shape[-1])
    grad = grad_out.to(q.dtype)
    if chosen == "triton":
        from ..triton_kernels import attention as tk

        return tk.attention_backward(q, k, v, out, lse, grad, s, input_precision)
    if chosen == "sdpa" and _sdpa_saves_lse(q):
        return tuple(g.contiguous() for g in _CPU_FLASH_BWD(grad, q, k, v, out, lse, 0.0, False,
                                                             scale=s))
    if chosen == "sdpa":
        fn = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=s)  # noqa: E731
    else:
        fn = lambda a, b, c: reference.attention(a, b, c, s)  # noqa: E731
    return tuple(g.contiguous() for g in _vjp(fn, (q, k, v), grad))


@_attention_backward_op.register_fake
def _(q, k, v, out, lse, grad_out, scale, backend, input_precision):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale, backend, input_precision = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (scale, backend, input_precision)
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    wanted = ctx.needs_input_grad[:3]
    if not any(wanted):
        return None, None, None, None, None, None
    grads = torch.ops.anydepth.attention_backward(q, k, v, out, lse, grad_out, *ctx.args)
    return (*(g if need else None for g, need in zip(grads, wanted)), None, None, None)


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
              backend: str = "auto", *, input_precision: str = "ieee") -> torch.Tensor:
    """``softmax(q k^T * scale) v`` (no mask, non-causal); see the module docstring.

    Args:
        q: ``[B, H, Nq, D]``; k, v: ``[B, H, Nk, D]``; one floating dtype and device, any
            strides.
        scale: the score scale, default ``1/sqrt(D)``.
        backend: ``"auto"``, ``"triton"``, ``"sdpa"`` or ``"reference"``.
        input_precision: float32 dots of the triton backend: ``"ieee"`` (exact, default),
            ``"tf32"`` or ``"tf32x3"`` (tensor cores on GPUs). Ignored by the other backends.

    Returns:
        ``[B, H, Nq, D]`` in ``q``'s dtype.
    """
    _check_common("attention", scale, backend, input_precision)
    _check_qkv(q, k, v)
    out, _ = torch.ops.anydepth.attention(q, k, v, scale, backend, input_precision)
    return out


# --------------------------------------------------------------------------------------------
# area attention on the qkv map [B, 3C, H, W]
# --------------------------------------------------------------------------------------------

def _map_format(t: torch.Tensor) -> torch.memory_format:
    """Outputs follow the input: channels-last in, channels-last out; NCHW otherwise."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _triton_map(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its strides are NCHW or channels-last (the kernels address either), else
    a contiguous copy."""
    return t if _map_format(t) == torch.channels_last else t.contiguous()


def _to_tokens(t: torch.Tensor, num_heads: int, area: int, copy: bool) -> torch.Tensor:
    """A ``[B, K, H, W]`` map as ``[B*area, heads, N/area, K/heads]`` (``copy``: through one
    contiguous token copy, which gives SDPA a unit-stride head dim; else a strided view)."""
    b, ch, h, w = t.shape
    tokens = t.flatten(2).transpose(1, 2)  # [B, N, K]
    if copy:
        tokens = tokens.contiguous()
    return tokens.reshape(b * area, h * w // area, num_heads, ch // num_heads).transpose(1, 2)


def _to_map(t: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """``[B*area, heads, N/area, hd]`` back to a ``[B, heads*hd, H, W]`` map (channels-last
    strides: ``.contiguous(memory_format=...)`` picks the final layout)."""
    return t.transpose(1, 2).reshape(b, h, w, -1).permute(0, 3, 1, 2)


def _area_sdpa(qkv: torch.Tensor, num_heads: int, area: int, scale: float):
    """The CPU fast path: one contiguous token copy, then the library's SDPA (as AAttn did)."""
    b, _, h, w = qkv.shape
    q, k, v = _to_tokens(qkv, num_heads, area, copy=True).chunk(3, dim=-1)
    if _sdpa_saves_lse(qkv):
        out, lse = _CPU_FLASH(q, k, v, 0.0, False, scale=scale)
    else:
        out, lse = F.scaled_dot_product_attention(q, k, v, scale=scale), _no_lse(qkv)
    return _to_map(out, b, h, w), _to_map(v, b, h, w), lse


def _area_sdpa_backward(qkv, out, lse, grad_out, grad_v_map, num_heads, area, scale):
    """d(qkv) through the library's CPU flash backward (with the saved lse), the three
    gradients concatenated back into the head-interleaved map."""
    b, _, h, w = qkv.shape
    q, k, v = _to_tokens(qkv, num_heads, area, copy=True).chunk(3, dim=-1)
    o = _to_tokens(out, num_heads, area, copy=True)
    go = _to_tokens(grad_out, num_heads, area, copy=True)
    dq, dk, dv = _CPU_FLASH_BWD(go, q, k, v, o, lse, 0.0, False, scale=scale)
    dv = dv + _to_tokens(grad_v_map, num_heads, area, copy=False)
    return _to_map(torch.cat([dq, dk, dv], dim=-1), b, h, w)


def _area_fn(chosen: str, num_heads: int, area: int, scale: float):
    if chosen == "sdpa":
        return lambda t: _area_sdpa(t, num_heads, area, scale)[:2]
    return lambda t: reference.area_attention(t, num_heads, area, scale)


@torch.library.custom_op(_AREA_OP.replace(".", "::"), mutates_args=())
def _area_attention_op(qkv: torch.Tensor, num_heads: int, area: int, scale: Optional[float],
                       backend: str, input_precision: str
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_common("area_attention", scale, backend, input_precision)
    *_, hd = _check_area(qkv, num_heads, area)
    chosen = resolve_backend(_AREA_OP, qkv, hd, backend)
    s = _scale(scale, hd)
    if chosen == "triton":
        from ..triton_kernels import attention as tk

        return tk.area_attention_forward(_triton_map(qkv), num_heads, area, s, input_precision)
    fmt = _map_format(qkv)
    if chosen == "sdpa":
        out, v_map, lse = _area_sdpa(qkv, num_heads, area, s)
    else:
        out, v_map = reference.area_attention(qkv, num_heads, area, s)
        lse = _no_lse(qkv)
    v_map = v_map.contiguous(memory_format=fmt)
    if v_map.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr():
        v_map = v_map.clone()  # one head, one area: the value map is a view of qkv
    return out.contiguous(memory_format=fmt), v_map, lse.contiguous()


@_area_attention_op.register_fake
def _(qkv, num_heads, area, scale, backend, input_precision):
    _check_common("area_attention", scale, backend, input_precision)
    b, c, h, w, hd = _check_area(qkv, num_heads, area)
    chosen = resolve_backend(_AREA_OP, qkv, hd, backend)
    fmt = _map_format(qkv)
    out = qkv.new_empty((b, c, h, w)).contiguous(memory_format=fmt)
    v_map = qkv.new_empty((b, c, h, w)).contiguous(memory_format=fmt)
    if _has_lse(chosen, qkv):
        lse = qkv.new_empty((b * area, num_heads, h * w // area), dtype=torch.float32)
    else:
        lse = _no_lse(qkv)
    return out, v_map, lse


@torch.library.custom_op("anydepth::area_attention_backward", mutates_args=())
def _area_attention_backward_op(qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                grad_out: torch.Tensor, grad_v_map: torch.Tensor, num_heads: int,
                                area: int, scale: Optional[float], backend: str,
                                input_precision: str) -> torch.Tensor:
    """``d(qkv)`` of ``area_attention`` given the gradients of ``out`` and ``v_map``.

    The triton backend writes dq, dk and dv (the ``[B, H, N, D]`` backward kernels, addressing
    the interleaved map layout through strides) straight into ``d(qkv)``, then adds
    ``grad_v_map`` to its value channels.
    """
    b, c, h, w, hd = _check_area(qkv, num_heads, area)
    for name, t in (("grad_out", grad_out), ("grad_v_map", grad_v_map)):
        if tuple(t.shape) != (b, c, h, w):
            raise ValueError(f"anydepth.area_attention_backward: {name} must be "
                             f"{(b, c, h, w)}, got {tuple(t.shape)}")
    chosen = resolve_backend(_AREA_OP, qkv, hd, backend)
    s = _scale(scale, hd)
    fmt = _map_format(qkv)
    if chosen == "triton":
        from ..triton_kernels import attention as tk

        qkv_t = _triton_map(qkv)
        dqkv = tk.area_attention_backward(qkv_t, _triton_map(out), lse,
                                          _triton_map(grad_out.to(qkv.dtype)), num_heads, area, s,
                                          input_precision)
        dqkv.view(b, num_heads, 3, hd, h, w)[:, :, 2] += grad_v_map.to(qkv.dtype).view(
            b, num_heads, hd, h, w)
        return dqkv.contiguous(memory_format=fmt)
    if chosen == "sdpa" and _sdpa_saves_lse(qkv):
        dqkv = _area_sdpa_backward(qkv, out, lse, grad_out.to(qkv.dtype),
                                   grad_v_map.to(qkv.dtype), num_heads, area, s)
        return dqkv.contiguous(memory_format=fmt)
    (dqkv,) = _vjp(_area_fn(chosen, num_heads, area, s), (qkv,),
                   (grad_out.to(qkv.dtype), grad_v_map.to(qkv.dtype)))
    return dqkv.contiguous(memory_format=fmt)


@_area_attention_backward_op.register_fake
def _(qkv, out, lse, grad_out, grad_v_map, num_heads, area, scale, backend, input_precision):
    return torch.empty_like(qkv, memory_format=_map_format(qkv))


def _area_setup_context(ctx, inputs, output):
    qkv, num_heads, area, scale, backend, input_precision = inputs
    out, _, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.args = (num_heads, area, scale, backend, input_precision)
    ctx.mark_non_differentiable(lse)


def _area_backward(ctx, grad_out, grad_v_map, _grad_lse):
    qkv, out, lse = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    dqkv = torch.ops.anydepth.area_attention_backward(qkv, out, lse, grad_out, grad_v_map,
                                                      *ctx.args)
    return dqkv, None, None, None, None, None


_area_attention_op.register_autograd(_area_backward, setup_context=_area_setup_context)


def area_attention(qkv: torch.Tensor, num_heads: int, area: int = 1, scale: Optional[float] = None,
                   backend: str = "auto", *, input_precision: str = "ieee"
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """YOLOv12 area attention on the qkv 1x1-conv output; see the module docstring.

    Args:
        qkv: ``[B, 3C, H, W]`` (NCHW or channels-last), heads interleaved ``[q|k|v]`` per head.
        num_heads: heads; the head dim is ``C / num_heads``.
        area: the number of contiguous position runs (YOLOv12: 4 at P4, 1 at P5); must divide
            ``H * W``.
        scale: default ``1/sqrt(head_dim)``.
        backend: ``"auto"``, ``"triton"``, ``"sdpa"`` or ``"reference"``.
        input_precision: as in :func:`attention`.

    Returns:
        ``(out, v_map)``, both ``[B, C, H, W]`` in ``qkv``'s dtype and memory format: the
        attention output and the values in map layout (what AAttn's positional conv reads).
    """
    _check_common("area_attention", scale, backend, input_precision)
    _check_area(qkv, num_heads, area)
    out, v_map, _ = torch.ops.anydepth.area_attention(qkv, num_heads, area, scale, backend,
                                                      input_precision)
    return out, v_map
