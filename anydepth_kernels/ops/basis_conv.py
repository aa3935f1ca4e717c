"""The factored conv block of a shared filter basis as one op:
``anydepth_kernels.basis_conv_norm_act(x, basis, coeff, scale, bias, ...)``.

``act((coeff @ conv2d(x, basis)) * scale + bias) + residual``: the basis convolution (``R``
filters, a layer's own ++ the stage's shared ones), then the 1x1 coefficient GEMM with the folded
output norm, activation and residual as its epilogue; the ``[N, R, H, W]`` intermediate is never
written to memory as a whole (Triton: registers per tile of output pixels; C++: a cache-sized
buffer per band of output rows). The basis norm is folded into
``coeff`` and ``bias`` by the caller (:meth:`anydepth_kernels.SharedBasisConv2d.factored`).
Registered as ``torch.ops.anydepth.basis_conv_norm_act`` (schema, fake kernel, autograd through
the reference).

Backends: ``"cpp"`` (CPU: per band of output rows the library convolution into a band-sized buffer, the
coefficient GEMM into the output, the epilogue in place; ``csrc/cpu/basis_conv.cpp``),
``"triton"`` (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``; fp32/fp16/bf16, rank
up to :data:`~anydepth_kernels.triton_kernels.basis_conv.MAX_RANK`; see
:mod:`anydepth_kernels.triton_kernels.basis_conv`), ``"reference"`` (two ``conv2d`` and the
epilogue), ``"auto"`` (``cpp`` on CPU, ``triton`` on CUDA, else the reference). There is no
CUDA C++ kernel: on CUDA tensors ``auto`` takes Triton.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import reference
from . import _backends, _checks

_OP = "anydepth.basis_conv_norm_act"
BASIS_BACKENDS = _backends.names("basis_conv_norm_act")


def _validate(x, basis, coeff, scale, bias, stride, padding, dilation, act, residual):
    stride = _checks.pair(stride, "stride", _OP, 1)
    padding = _checks.pair(padding, "padding", _OP, 0)
    dilation = _checks.pair(dilation, "dilation", _OP, 1)
    out_shape = _checks.conv_output_shape(x, basis, stride, padding, dilation, 1, _OP)
    _checks.check_tensor(coeff, "coeff", _OP)
    _checks.check_same(coeff, x, "coeff", "x", _OP)
    rank = basis.shape[0]
    if coeff.dim() not in (2, 4) or coeff.shape[1] != rank or coeff.shape[0] == 0 \
            or (coeff.dim() == 4 and tuple(coeff.shape[2:]) != (1, 1)):
        raise ValueError(f"{_OP}: coeff must be [C_out, R] or [C_out, R, 1, 1] with R = {rank} (the basis "
                         f"filters) and C_out >= 1, got {tuple(coeff.shape)}")
    out_shape = (out_shape[0], coeff.shape[0], out_shape[2], out_shape[3])
    _checks.check_epilogue(out_shape, x, scale, bias, residual, _OP)
    return stride, padding, dilation, _checks.check_act(act, _OP), out_shape


@torch.library.custom_op(_OP.replace(".", "::"), mutates_args=())
def _basis_conv_op(x: torch.Tensor, basis: torch.Tensor, coeff: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor, stride: List[int], padding: List[int], dilation: List[int],
                   act: str, residual: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    stride, padding, dilation, code, out_shape = _validate(
        x, basis, coeff, scale, bias, stride, padding, dilation, act, residual)
    if out_shape[0] == 0:
        return x.new_empty(out_shape)
    chosen = _backends.resolve("basis_conv_norm_act", x, backend, rank=basis.shape[0]).backend
    scale32 = scale.detach().to(torch.float32).contiguous()
    bias32 = bias.detach().to(torch.float32).contiguous()
    coeff2 = coeff.reshape(coeff.shape[0], basis.shape[0])
    if chosen == "cpp":
        return torch.ops.anydepth._ext_basis_conv_norm_act(
            x, basis, coeff2, scale32, bias32, list(stride), list(padding), list(dilation), code, residual)
    if chosen == "triton":
        from ..triton_kernels.basis_conv import basis_conv_norm_act as triton_basis_conv

        return triton_basis_conv(x, basis, coeff2, scale32, bias32, stride, padding, dilation, act, residual)
    return reference.basis_conv_norm_act(x, basis, coeff2, scale32, bias32, stride, padding, dilation,
                                         act, residual).contiguous()


@_basis_conv_op.register_fake
def _(x, basis, coeff, scale, bias, stride, padding, dilation, act, residual, backend):
    *_, out_shape = _validate(x, basis, coeff, scale, bias, stride, padding, dilation, act, residual)
    return x.new_empty(out_shape)


def _setup(ctx, inputs, output):
    x, basis, coeff, scale, bias, stride, padding, dilation, act, residual, _ = inputs
    ctx.save_for_backward(x, basis, coeff, scale, bias)
    ctx.conv = (stride, padding, dilation)
    ctx.act = act
    ctx.has_residual = residual is not None


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    needs = ctx.needs_input_grad[:5]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(n)) for t, n in zip(saved, needs)]
        out = reference.basis_conv_norm_act(*leaves, *ctx.conv, ctx.act)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    gx, gbasis, gcoeff, gs, gb = (next(grads) if n else None for n in needs)
    gr = grad if ctx.has_residual and ctx.needs_input_grad[9] else None
    return gx, gbasis, gcoeff, gs, gb, None, None, None, None, gr, None


_basis_conv_op.register_autograd(_backward, setup_context=_setup)


def basis_conv_norm_act(x: torch.Tensor, basis: torch.Tensor, coeff: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor, stride=1, padding=0, dilation=1, act: str = "identity",
                        residual: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Fused factored conv block (see module docstring).

    Args:
        x: ``[N, C, H, W]``.
        basis: ``[R, C, kh, kw]``, the basis filters (same dtype and device as ``x``).
        coeff: ``[C_out, R]`` or ``[C_out, R, 1, 1]``, the coefficients (basis norm folded in).
        scale, bias: per-output-channel epilogue (float32 compute): the folded output norm.
        stride, padding, dilation: of the basis convolution (an int or a pair).
        act: ``"identity"``, ``"relu"`` or ``"silu"``; residual: ``[N, C_out, OH, OW]``, added
            after the activation.
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"reference"``.
    """
    def as_list(v):
        return [v, v] if isinstance(v, int) else list(v)

    return torch.ops.anydepth.basis_conv_norm_act(x, basis, coeff, scale, bias, as_list(stride),
                                                  as_list(padding), as_list(dilation), act, residual,
                                                  backend)
