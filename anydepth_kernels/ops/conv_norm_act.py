"""The switchable conv block op: ``act(conv2d(x, W) * scale + bias) + residual``.

Registered as ``torch.ops.anydepth.conv_norm_act`` and ``torch.ops.anydepth.scale_bias_act``
(schema, fake kernel for ``torch.compile``/export, autograd). The op body is the single dispatch
point: it picks a backend by device and availability, with the eager reference
(:mod:`anydepth_kernels.reference`) as the fallback.

Backends:
  ``"cpp"``       library convolution + fused C++ epilogue, in place over the conv output (CPU)
  ``"cuda"``      cuDNN convolution + fused CUDA epilogue kernel (CUDA)
  ``"triton"``    1x1 convolution as a Triton GEMM with the epilogue fused; kxk: library conv +
                  Triton epilogue (CUDA; CPU tensors only under ``TRITON_INTERPRET=1``)
  ``"reference"`` the eager reference
  ``"auto"``      cpp on CPU, cuda then triton on CUDA, the reference otherwise or when nothing
                  is compiled (with a one-time warning)
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from .. import reference
from . import _backends, _checks

BACKENDS = _backends.names("conv_norm_act")

_CONV_OP = "anydepth.conv_norm_act"
_EPI_OP = "anydepth.scale_bias_act"


def _output_format(x: torch.Tensor) -> torch.memory_format:
    """Outputs follow the input: channels-last in, channels-last out; NCHW otherwise."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def select_backend(op: str, t: torch.Tensor, backend: str) -> str:
    """Resolve ``backend`` for tensor ``t``; raise if an explicitly named one cannot run
    (the conv ops' row of :data:`._backends.OPS`; ``op`` names the op in messages)."""
    return _backends.resolve("conv_norm_act", t, backend, name=op).backend


# --------------------------------------------------------------------------------------------
# conv_norm_act
# --------------------------------------------------------------------------------------------

def _validate_conv(x, weight, scale, bias, stride, padding, dilation, groups, act, residual):
    stride = _checks.pair(stride, "stride", _CONV_OP, 1)
    padding = _checks.pair(padding, "padding", _CONV_OP, 0)
    dilation = _checks.pair(dilation, "dilation", _CONV_OP, 1)
    out_shape = _checks.conv_output_shape(x, weight, stride, padding, dilation, groups, _CONV_OP)
    _checks.check_epilogue(out_shape, x, scale, bias, residual, _CONV_OP)
    return stride, padding, dilation, _checks.check_act(act, _CONV_OP), out_shape


@torch.library.custom_op(_CONV_OP.replace(".", "::"), mutates_args=())
def _conv_norm_act_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    act: str,
    residual: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    stride, padding, dilation, act_code, out_shape = _validate_conv(
        x, weight, scale, bias, stride, padding, dilation, groups, act, residual
    )
    fmt = _output_format(x)
    if out_shape[0] == 0:
        return torch.empty(out_shape, dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)
    chosen = _backends.resolve("conv_norm_act", x, backend).backend
    scale32 = scale.detach().to(torch.float32).contiguous()
    bias32 = bias.detach().to(torch.float32).contiguous()
    if chosen in ("cpp", "cuda"):
        out = torch.ops.anydepth._ext_conv_norm_act(
            x, weight, scale32, bias32, stride, padding, dilation, groups, act_code, residual
        )
    elif chosen == "triton":
        from .. import triton_kernels

        out = triton_kernels.conv_norm_act(
            x, weight, scale32, bias32, stride, padding, dilation, groups, act, residual
        )
    else:
        out = reference.conv_norm_act(
            x, weight, scale32, bias32, stride, padding, dilation, groups, act, residual
        )
    return out.contiguous(memory_format=fmt)


@_conv_norm_act_op.register_fake
def _(x, weight, scale, bias, stride, padding, dilation, groups, act, residual, backend):
    *_, out_shape = _validate_conv(
        x, weight, scale, bias, stride, padding, dilation, groups, act, residual
    )
    return x.new_empty(out_shape).contiguous(memory_format=_output_format(x))


def _conv_setup_context(ctx, inputs, output):
    x, weight, scale, bias, stride, padding, dilation, groups, act, residual, _ = inputs
    ctx.save_for_backward(x, weight, scale, bias)
    ctx.conv_args = (stride, padding, dilation, groups, act)
    ctx.has_residual = residual is not None


def _conv_backward(ctx, grad):
    # Recompute the convolution (the fused forward keeps no pre-activation) and let autograd
    # differentiate the reference: exact gradients, one extra conv, no activation memory.
    x, weight, scale, bias = ctx.saved_tensors
    stride, padding, dilation, groups, act = ctx.conv_args
    wanted = ctx.needs_input_grad[:4]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip((x, weight, scale, bias), wanted)]
        out = reference.conv_norm_act(*leaves, stride, padding, dilation, groups, act)
        needed = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, needed, grad) if needed else ())
    result = [next(grads) if need else None for need in wanted]
    grad_residual = grad if ctx.has_residual and ctx.needs_input_grad[9] else None
    return (*result, None, None, None, None, None, grad_residual, None)


_conv_norm_act_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def conv_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    act: str = "silu",
    residual: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused ``act(conv2d(x, weight) * scale + bias) + residual``.

    Args:
        x: input ``[N, C_in, H, W]`` (float32, float16, bfloat16 or float64; NCHW or
            channels-last; any strides).
        weight: ``[C_out, C_in / groups, kH, kW]``, same dtype and device as ``x``. The conv has
            no bias of its own: fold it into ``bias``.
        scale, bias: per-output-channel epilogue ``[C_out]`` (a folded BatchNorm: computed in
            float32 whatever the input dtype).
        stride, padding, dilation, groups: as in :func:`torch.nn.functional.conv2d`.
        act: ``"silu"``, ``"relu"`` or ``"identity"``.
        residual: optional tensor of the output's shape, added after the activation.
        backend: ``"auto"`` or one of ``"cpp"``, ``"cuda"``, ``"triton"``, ``"reference"``.

    Returns:
        ``[N, C_out, H_out, W_out]`` in ``x``'s dtype, channels-last if ``x`` is.
    """
    return torch.ops.anydepth.conv_norm_act(
        x, weight, scale, bias, _list2(stride), _list2(padding), _list2(dilation), groups, act,
        residual, backend,
    )


# --------------------------------------------------------------------------------------------
# scale_bias_act (the epilogue alone, after any producer)
# --------------------------------------------------------------------------------------------

def _validate_epilogue(y, scale, bias, act, residual):
    _checks.check_tensor(y, "y", _EPI_OP, dim=4)
    if y.shape[1] == 0:
        raise ValueError(f"{_EPI_OP}: y has an empty channel dimension")
    _checks.check_epilogue(tuple(y.shape), y, scale, bias, residual, _EPI_OP)
    return _checks.check_act(act, _EPI_OP)


@torch.library.custom_op(_EPI_OP.replace(".", "::"), mutates_args=())
def _scale_bias_act_op(
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    act: str,
    residual: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    act_code = _validate_epilogue(y, scale, bias, act, residual)
    fmt = _output_format(y)
    if y.numel() == 0:
        return torch.empty_like(y, memory_format=fmt)
    chosen = _backends.resolve("scale_bias_act", y, backend).backend
    scale32 = scale.detach().to(torch.float32).contiguous()
    bias32 = bias.detach().to(torch.float32).contiguous()
    if chosen in ("cpp", "cuda"):
        out = torch.ops.anydepth._ext_scale_bias_act(y, scale32, bias32, act_code, residual)
    elif chosen == "triton":
        from .. import triton_kernels

        out = triton_kernels.scale_bias_act(y, scale32, bias32, act, residual)
    else:
        out = reference.scale_bias_act(y, scale32, bias32, act, residual)
    return out.contiguous(memory_format=fmt)


@_scale_bias_act_op.register_fake
def _(y, scale, bias, act, residual, backend):
    _validate_epilogue(y, scale, bias, act, residual)
    return torch.empty_like(y, memory_format=_output_format(y))


def _epi_setup_context(ctx, inputs, output):
    y, scale, bias, act, residual, _ = inputs
    ctx.save_for_backward(y, scale, bias)
    ctx.act = act
    ctx.has_residual = residual is not None


def _epi_backward(ctx, grad):
    y, scale, bias = ctx.saved_tensors
    wanted = ctx.needs_input_grad[:3]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip((y, scale, bias), wanted)]
        out = reference.scale_bias_act(*leaves, ctx.act)
        needed = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, needed, grad) if needed else ())
    result = [next(grads) if need else None for need in wanted]
    grad_residual = grad if ctx.has_residual and ctx.needs_input_grad[4] else None
    return (*result, None, grad_residual, None)


_scale_bias_act_op.register_autograd(_epi_backward, setup_context=_epi_setup_context)


def scale_bias_act(
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    act: str = "silu",
    residual: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused ``act(y * scale[c] + bias[c]) + residual`` over ``y`` of shape ``[N, C, H, W]``.

    The epilogue of :func:`conv_norm_act` alone, for outputs of other producers. Same argument
    conventions; returns a new tensor in ``y``'s dtype and memory format.
    """
    return torch.ops.anydepth.scale_bias_act(y, scale, bias, act, residual, backend)


def _list2(v) -> List[int]:
    return [v, v] if isinstance(v, int) else list(v)
