"""Concat-free output conv: ``anydepth_kernels.concat_conv1x1(xs, weight, scale, bias, ...)``.

``act(conv1x1(cat(xs), weight[:, :C]) * scale + bias) + residual`` without materialising the
concat: each branch multiplies its own column slice of the weight and the results accumulate in
the output (C++: strided GEMM views, then the fused epilogue in place). ``C`` is the branches'
total channel count, which may be less than the weight's input channels: a CSP module whose
refinement blocks are skipped passes only the branches present and the conv reads the weight's
first input channels, so a skipped block costs nothing here. Registered as
``torch.ops.anydepth.concat_conv1x1`` (schema, fake kernel, autograd).

Backends: ``"cpp"`` (CPU), ``"triton"`` (CUDA tensors; CPU tensors only under
``TRITON_INTERPRET=1``; fp32/fp16/bf16; fp32 with exact ``"ieee"`` dots; up to four branches read
in place, more are partly concatenated, see :mod:`anydepth_kernels.triton_kernels.concat_conv`),
``"reference"`` (cat + conv2d + epilogue), ``"auto"`` (``cpp`` on CPU, ``triton`` on CUDA when
Triton is usable for the dtype, else the reference).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import reference
from . import _backends, _checks

_OP = "anydepth.concat_conv1x1"
CONCAT_BACKENDS = _backends.names("concat_conv1x1")


def _validate(xs, weight, scale, bias, act, residual):
    if not isinstance(xs, (list, tuple)) or len(xs) == 0:
        raise ValueError(f"{_OP}: xs must be a non-empty list of [N, C_i, H, W] tensors")
    for i, x in enumerate(xs):
        _checks.check_tensor(x, f"xs[{i}]", _OP, dim=4)
        _checks.check_same(x, xs[0], f"xs[{i}]", "xs[0]", _OP)
        if x.shape[0] != xs[0].shape[0] or x.shape[2:] != xs[0].shape[2:]:
            raise ValueError(f"{_OP}: xs[{i}] has shape {tuple(x.shape)}, but xs[0] has "
                             f"{tuple(xs[0].shape)}: batch and spatial size must match")
    _checks.check_tensor(weight, "weight", _OP, dim=4)
    _checks.check_same(weight, xs[0], "weight", "xs[0]", _OP)
    if tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"{_OP}: weight must be [C_out, C_in, 1, 1], got {tuple(weight.shape)}")
    total = sum(int(x.shape[1]) for x in xs)
    if total > weight.shape[1] or total == 0:
        raise ValueError(f"{_OP}: the inputs have {total} channels in all; the weight reads 1.."
                         f"{weight.shape[1]}")
    out_shape = (xs[0].shape[0], weight.shape[0], xs[0].shape[2], xs[0].shape[3])
    _checks.check_epilogue(out_shape, xs[0], scale, bias, residual, _OP)
    return _checks.check_act(act, _OP), out_shape


def _select(x: torch.Tensor, backend: str) -> str:
    return _backends.resolve("concat_conv1x1", x, backend).backend


@torch.library.custom_op(_OP.replace(".", "::"), mutates_args=())
def _concat_conv_op(xs: List[torch.Tensor], weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                    act: str, residual: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    act_code, out_shape = _validate(xs, weight, scale, bias, act, residual)
    if 0 in out_shape:
        return xs[0].new_empty(out_shape)
    chosen = _select(xs[0], backend)
    scale32 = scale.detach().to(torch.float32).contiguous()
    bias32 = bias.detach().to(torch.float32).contiguous()
    if chosen == "cpp":
        return torch.ops.anydepth._ext_concat_conv1x1(list(xs), weight, scale32, bias32, act_code, residual)
    if chosen == "triton":
        from ..triton_kernels.concat_conv import concat_conv1x1 as triton_concat_conv1x1

        return triton_concat_conv1x1(xs, weight, scale32, bias32, act, residual)
    return reference.concat_conv1x1(xs, weight, scale32, bias32, act, residual).contiguous()


@_concat_conv_op.register_fake
def _(xs, weight, scale, bias, act, residual, backend):
    _, out_shape = _validate(xs, weight, scale, bias, act, residual)
    return xs[0].new_empty(out_shape)


def _setup(ctx, inputs, output):
    xs, weight, scale, bias, act, residual, _ = inputs
    ctx.save_for_backward(weight, scale, bias, *xs)
    ctx.act = act
    ctx.n = len(xs)
    ctx.has_residual = residual is not None


def _backward(ctx, grad):
    weight, scale, bias, *xs = ctx.saved_tensors
    need_xs = ctx.needs_input_grad[0]
    need_w, need_s, need_b = ctx.needs_input_grad[1:4]
    with torch.enable_grad():
        leaves_x = [x.detach().requires_grad_(bool(need_xs)) for x in xs]
        w, s, b = (t.detach().requires_grad_(bool(n)) for t, n in zip((weight, scale, bias), (need_w, need_s, need_b)))
        out = reference.concat_conv1x1(leaves_x, w, s, b, ctx.act)
        inputs = [t for t in (*leaves_x, w, s, b) if t.requires_grad]
        grads = iter(torch.autograd.grad(out, inputs, grad) if inputs else ())
    gx = [next(grads) for _ in leaves_x] if need_xs else None
    gw, gs, gb = (next(grads) if n else None for n in (need_w, need_s, need_b))
    gr = grad if ctx.has_residual and ctx.needs_input_grad[5] else None
    return gx, gw, gs, gb, None, gr, None


_concat_conv_op.register_autograd(_backward, setup_context=_setup)


def concat_conv1x1(xs: Sequence[torch.Tensor], weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                   act: str = "silu", residual: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Fused output conv over branch tensors, no concat (see module docstring).

    Args:
        xs: branch tensors ``[N, C_i, H, W]`` (same batch, size, dtype, device), in the order
            their channels appear in the conv's input.
        weight: ``[C_out, C_in, 1, 1]`` with ``C_in >= sum(C_i)``.
        scale, bias: per-output-channel epilogue (float32 compute).
        act: ``"silu"``, ``"relu"`` or ``"identity"``; residual: added after the activation.
    """
    return torch.ops.anydepth.concat_conv1x1(list(xs), weight, scale, bias, act, residual, backend)
