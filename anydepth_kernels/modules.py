"""Drop-in modules over the fused ops."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .ops.conv_norm_act import conv_norm_act
from .ops._checks import pair
from .reference import ACTIVATIONS

ActLike = Union[str, nn.Module, None]


def swap_modules(module: nn.Module, replace: Callable[[nn.Module], Optional[nn.Module]],
                 visit: Optional[Callable[[nn.Module], None]] = None) -> int:
    """Replace modules below ``module`` in place: depth-first over the children, ``replace(child)``
    returns the module to put in its place (the walk does not descend into a replaced child) or
    ``None`` to keep it, in which case ``visit(child)`` (if given) is called and the walk goes into
    its children. Returns how many modules were replaced. The one tree walker of the library
    (:func:`anydepth_kernels.optimize`, the models' inference forms)."""
    count = 0
    for name, child in list(module.named_children()):
        new = replace(child)
        if new is not None:
            setattr(module, name, new)
            count += 1
            continue
        if visit is not None:
            visit(child)
        count += swap_modules(child, replace, visit)
    return count


def activation_name(act: ActLike) -> str:
    """Map an activation given as a name or module (``nn.SiLU``, ``nn.ReLU``, ``nn.Identity``,
    ``None``) to the name the fused kernels use."""
    if act is None or isinstance(act, nn.Identity):
        return "identity"
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
        return act
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.ReLU):
        return "relu"
    raise ValueError(
        f"activation {type(act).__name__} has no fused kernel; supported: nn.SiLU, nn.ReLU, "
        "nn.Identity or None"
    )


def fold_batchnorm(bn: nn.BatchNorm2d, conv_bias: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm (after a conv with optional bias) as a float32 ``(scale, bias)`` pair:
    ``bn(conv(x) + b) == conv(x) * scale + bias``."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{bn}: track_running_stats=False has no running statistics to fold; fold needs an "
            "eval-mode BatchNorm with running statistics"
        )
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    for name, t in (("running_mean", mean), ("running_var", var), ("weight", gamma), ("bias", beta)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{bn}: {name} contains NaN or inf; cannot fold")
    if (var < 0).any():
        raise ValueError(f"{bn}: running_var has negative entries; the statistics are corrupt")
    scale = gamma / torch.sqrt(var + bn.eps)
    shift = beta - mean * scale
    if conv_bias is not None:
        shift = shift + conv_bias.detach().double() * scale
    return scale.float(), shift.float()


class FusedConvNormAct(nn.Module):
    """Conv2d + (one of ``num_epilogues``) folded norms + activation + optional residual add.

    The inference form of a switchable conv block: one convolution weight shared by every depth,
    and one ``(scale, bias)`` epilogue per norm set (epilogue 0: the full-depth BatchNorm,
    epilogue 1: the shallow-path BatchNorm of a skip-aware norm).

    ``forward(x, epilogue=0, residual=None)`` computes ``act(conv(x) * scale[e] + bias[e]) +
    residual`` through :func:`anydepth_kernels.conv_norm_act`. ``backend`` picks the
    implementation (``"auto"`` by default; see :mod:`anydepth_kernels.ops.conv_norm_act`).

    Build one from existing modules with :meth:`from_modules`.
    """

    scale: torch.Tensor
    bias: torch.Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Sequence[int]],
        stride: Union[int, Sequence[int]] = 1,
        padding: Union[int, Sequence[int], None] = None,
        dilation: Union[int, Sequence[int]] = 1,
        groups: int = 1,
        act: ActLike = "silu",
        num_epilogues: int = 1,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = type(self).__name__
        k = pair(kernel_size, "kernel_size", name, 1)
        self.stride = pair(stride, "stride", name, 1)
        self.dilation = pair(dilation, "dilation", name, 1)
        if padding is None:
            padding = tuple(d * (kk - 1) // 2 for kk, d in zip(k, self.dilation))
        self.padding = pair(padding, "padding", name, 0)
        if in_channels < 1 or out_channels < 1 or groups < 1:
            raise ValueError(f"{name}: channels and groups must be positive")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{name}: channels ({in_channels}, {out_channels}) not divisible by groups={groups}")
        if num_epilogues < 1:
            raise ValueError(f"{name}: num_epilogues must be >= 1, got {num_epilogues}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.groups = groups
        self.act = activation_name(act)
        self.backend = backend
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *k, device=device, dtype=dtype)
        )
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.register_buffer("scale", torch.ones(num_epilogues, out_channels, device=device))
        self.register_buffer("bias", torch.zeros(num_epilogues, out_channels, device=device))

    @property
    def num_epilogues(self) -> int:
        return self.scale.shape[0]

    def set_epilogue(self, index: int, scale: torch.Tensor, bias: torch.Tensor) -> None:
        """Set epilogue ``index`` to ``(scale, bias)``, each of ``out_channels`` values."""
        self._check_index(index)
        with torch.no_grad():
            self.scale[index].copy_(scale.reshape(-1))
            self.bias[index].copy_(bias.reshape(-1))

    @classmethod
    def from_modules(
        cls,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        bn_skip: Optional[nn.BatchNorm2d] = None,
        act: ActLike = "silu",
        backend: str = "auto",
    ) -> "FusedConvNormAct":
        """Fold ``conv`` + ``bn`` (+ ``bn_skip``, the shallow-path norm) + ``act`` into one module.

        Epilogue 0 is ``bn`` folded, epilogue 1 is ``bn_skip`` folded; the conv's bias, if any,
        is folded into both. The result matches the eval-mode modules' output.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        if isinstance(conv.padding, str):  # "same" / "valid"
            if conv.padding == "same" and any(s != 1 for s in conv.stride):
                raise ValueError("padding='same' with stride > 1 is not supported")
            padding = (
                tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
                if conv.padding == "same" else (0, 0)
            )
            if conv.padding == "same" and any((d * (k - 1)) % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
                raise ValueError("padding='same' with an even effective kernel size is not supported")
        else:
            padding = conv.padding
        norms = [bn] if bn_skip is None else [bn, bn_skip]
        for n in norms:
            if n.num_features != conv.out_channels:
                raise ValueError(
                    f"{type(n).__name__} has {n.num_features} features but the conv has "
                    f"{conv.out_channels} output channels"
                )
        fused = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding,
            conv.dilation, conv.groups, act, num_epilogues=len(norms), backend=backend,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            fused.weight.copy_(conv.weight)
            for i, n in enumerate(norms):
                fused.set_epilogue(i, *fold_batchnorm(n, conv.bias))
        return fused

    def _check_index(self, index: int) -> None:
        if not isinstance(index, int) or not 0 <= index < self.num_epilogues:
            raise ValueError(
                f"{type(self).__name__}: epilogue must be an int in [0, {self.num_epilogues - 1}], "
                f"got {index!r}"
            )

    def forward(self, x: torch.Tensor, epilogue: int = 0,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_index(epilogue)
        return conv_norm_act(
            x, self.weight, self.scale[epilogue], self.bias[epilogue], self.stride, self.padding,
            self.dilation, self.groups, self.act, residual, self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, act={self.act!r}, num_epilogues={self.num_epilogues}, "
            f"backend={self.backend!r}"
        )
