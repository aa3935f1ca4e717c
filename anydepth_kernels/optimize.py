"""``optimize(model)``: swap fused modules into a model you already have, in one call.

Recognised (by class, without importing the packages that define them):

* **anydepth models** (``anydepth.models.*``): their own inference form (``model.fuse()`` /
  ``model.deploy()``): folded norms for every depth, fused conv epilogues, reparameterised blocks.
* **Ultralytics** (YOLO12 and its relatives): ``Conv`` / ``DWConv`` (conv + BN + act -> one fused
  op), ``Bottleneck`` (residual add fused into the second conv), ``AAttn`` (area attention on
  ``scaled_dot_product_attention``'s fused kernels instead of explicit matmuls, positional conv
  and residuals fused) and ``ABlock``.

Everything else is left alone and listed in the returned report (``verbose=True`` prints it).
The model is put in eval mode: folding uses the BatchNorm running statistics, so the result is an
inference model.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .modules import FusedConvNormAct

_ACT_NAMES = {nn.SiLU: "silu", nn.ReLU: "relu", nn.Identity: "identity"}


@dataclass
class OptimizeReport:
    """What :func:`optimize` did: swapped module types (counts) and what it left alone."""

    swapped: Dict[str, int] = field(default_factory=dict)
    left_alone: Dict[str, int] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = ["anydepth_kernels.optimize:"]
        if self.swapped:
            lines.append("  swapped: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.swapped.items())))
        else:
            lines.append("  swapped: nothing")
        if self.left_alone:
            lines.append("  left alone (not recognised, run as before): "
                         + ", ".join(f"{k} x{v}" for k, v in sorted(self.left_alone.items())))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _act_name(act: nn.Module) -> Optional[str]:
    for cls, name in _ACT_NAMES.items():
        if type(act) is cls:
            return name
    return None


def _fused_from_conv(m: nn.Module, backend: str) -> Optional[FusedConvNormAct]:
    """An Ultralytics-style ``Conv`` (``.conv``, ``.bn`` or none after their own fuse, ``.act``)."""
    conv, act = getattr(m, "conv", None), getattr(m, "act", None)
    if not isinstance(conv, nn.Conv2d) or act is None:
        return None
    name = _act_name(act)
    if name is None:
        return None
    bn = getattr(m, "bn", None)
    if bn is None:  # already folded by Ultralytics' fuse(): conv has the bias
        bn = nn.BatchNorm2d(conv.out_channels, eps=0.0).to(conv.weight.device)
        bn.eval()
    if not isinstance(bn, nn.BatchNorm2d):
        return None
    return FusedConvNormAct.from_modules(conv, bn, None, name, backend)


class FusedConv(nn.Module):
    """A conv + norm + activation module replaced by one fused op; ``forward(x, residual=None)``."""

    def __init__(self, fused: FusedConvNormAct):
        super().__init__()
        self.fused = fused

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.fused(x, 0, residual)


class FusedBottleneck(nn.Module):
    """``x + cv2(cv1(x))`` with the add fused into ``cv2``'s epilogue."""

    def __init__(self, cv1: FusedConv, cv2: FusedConv, add: bool):
        super().__init__()
        self.cv1, self.cv2, self.add = cv1, cv2, add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(self.cv1(x), x if self.add else None)


class FusedAreaAttention(nn.Module):
    """Ultralytics ``AAttn`` on ``F.scaled_dot_product_attention`` (flash kernels on CPU and GPU),
    with ``o + pe(v)`` and the caller's residual fused into conv epilogues. The reshape into areas
    is a view: each area is a contiguous run of ``H*W/area`` positions."""

    def __init__(self, qkv: FusedConv, proj: FusedConv, pe: FusedConv, num_heads: int, head_dim: int, area: int):
        super().__init__()
        self.qkv, self.proj, self.pe = qkv, proj, pe
        self.num_heads, self.head_dim, self.area = num_heads, head_dim, max(area, 1)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, _, h, w = x.shape
        n = h * w
        qkv = self.qkv(x).flatten(2).transpose(1, 2).contiguous()
        c = qkv.shape[-1] // 3
        qkv = qkv.reshape(b * self.area, n // self.area, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
        v = v.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return self.proj(self.pe(v, o), residual)


class FusedABlock(nn.Module):
    """Ultralytics ``ABlock``: ``x + attn(x)``, ``x + mlp(x)``, both adds fused."""

    def __init__(self, attn: nn.Module, mlp0: FusedConv, mlp1: FusedConv):
        super().__init__()
        self.attn, self.mlp0, self.mlp1 = attn, mlp0, mlp1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x, x) if isinstance(self.attn, FusedAreaAttention) else x + self.attn(x)
        return self.mlp1(self.mlp0(x), x)


# --------------------------------------------------------------------------- swap rules
Swap = Callable[[nn.Module, str], Optional[nn.Module]]


def _swap_ultra_conv(m: nn.Module, backend: str) -> Optional[nn.Module]:
    f = _fused_from_conv(m, backend)
    return FusedConv(f) if f is not None else None


def _as_fused(m: nn.Module, backend: str) -> Optional[FusedConv]:
    if isinstance(m, FusedConv):
        return m
    return _swap_ultra_conv(m, backend) if type(m).__name__ in ("Conv", "DWConv") else None


def _swap_ultra_bottleneck(m: nn.Module, backend: str) -> Optional[nn.Module]:
    cv1, cv2 = _as_fused(m.cv1, backend), _as_fused(m.cv2, backend)
    if cv1 is None or cv2 is None:
        return None
    return FusedBottleneck(cv1, cv2, bool(getattr(m, "add", False)))


def _swap_ultra_aattn(m: nn.Module, backend: str) -> Optional[nn.Module]:
    parts = [_as_fused(getattr(m, n, None), backend) for n in ("qkv", "proj", "pe")]
    if any(p is None for p in parts) or not hasattr(m, "num_heads"):
        return None
    return FusedAreaAttention(*parts, m.num_heads, m.head_dim, int(getattr(m, "area", 1)))


def _swap_ultra_ablock(m: nn.Module, backend: str) -> Optional[nn.Module]:
    mlp = getattr(m, "mlp", None)
    if not isinstance(mlp, nn.Sequential) or len(mlp) != 2:
        return None
    attn = _swap_ultra_aattn(m.attn, backend) if type(m.attn).__name__ == "AAttn" else None
    mlp0, mlp1 = _as_fused(mlp[0], backend), _as_fused(mlp[1], backend)
    if attn is None or mlp0 is None or mlp1 is None:
        return None
    return FusedABlock(attn, mlp0, mlp1)


#: (package prefix of the class's module, class name) -> swap rule. Parents before children:
#: a parent rule consumes its children.
SWAPS: Dict[tuple, Swap] = {
    ("ultralytics", "ABlock"): _swap_ultra_ablock,
    ("ultralytics", "AAttn"): _swap_ultra_aattn,
    ("ultralytics", "Bottleneck"): _swap_ultra_bottleneck,
    ("ultralytics", "Conv"): _swap_ultra_conv,
    ("ultralytics", "DWConv"): _swap_ultra_conv,
}


def register_swap(package: str, class_name: str, rule: Swap) -> None:
    """Teach :func:`optimize` a new module type: ``rule(module, backend)`` returns the replacement
    (same call signature and outputs in eval mode) or ``None`` to leave it alone."""
    SWAPS[(package, class_name)] = rule


def _rule_for(m: nn.Module) -> Optional[Swap]:
    pkg = type(m).__module__.split(".", 1)[0]
    return SWAPS.get((pkg, type(m).__name__))


_NEUTRAL = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.SiLU, nn.ReLU, nn.Upsample,
            nn.MaxPool2d, nn.Dropout)


#: plain attributes a replacement inherits from the module it replaces (Ultralytics' layer index,
#: inputs, type name and parameter count drive its forward loop)
_CARRIED_ATTRS = ("f", "i", "type", "np")


def _walk(module: nn.Module, backend: str, report: OptimizeReport) -> None:
    for name, child in list(module.named_children()):
        rule = _rule_for(child)
        new = rule(child, backend) if rule is not None else None
        if new is not None:
            for attr in _CARRIED_ATTRS:  # e.g. Ultralytics' graph wiring on top-level layers
                if attr in child.__dict__:
                    setattr(new, attr, child.__dict__[attr])
            setattr(module, name, new)
            key = f"{type(child).__module__.split('.', 1)[0]}.{type(child).__name__}"
            report.swapped[key] = report.swapped.get(key, 0) + 1
            continue
        if not isinstance(child, _NEUTRAL) and any(True for _ in child.parameters(recurse=False)):
            key = type(child).__name__
            report.left_alone[key] = report.left_alone.get(key, 0) + 1
        _walk(child, backend, report)


def optimize(model: nn.Module, backend: str = "auto", verbose: bool = False, return_report: bool = False):
    """Return ``model`` with fused modules in place (modified in place; eval mode).

    ``backend``: ``"auto"`` (the best compiled kernels for the model's device, reference
    fallback), or ``"cpp"``, ``"cuda"``, ``"triton"``, ``"reference"`` for every swapped op.
    ``verbose=True`` prints what was swapped and what was left alone; ``return_report=True``
    returns ``(model, OptimizeReport)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: expected an nn.Module, got {type(model).__name__}")
    report = OptimizeReport()
    if model.training:
        report.notes.append("model switched to eval mode (norms are folded with their running statistics)")
    model.eval()
    own = type(model).__module__.startswith("anydepth.")
    make = (getattr(model, "fuse", None) or getattr(model, "deploy", None)) if own else None
    if own and callable(make):
        before = collections.Counter(type(m).__name__ for m in model.modules())
        out = make(backend=backend) if "backend" in make.__code__.co_varnames else make()
        model = out if isinstance(out, nn.Module) else model
        after = collections.Counter(type(m).__name__ for m in model.modules())
        for k in after:
            if after[k] > before.get(k, 0):
                report.swapped[k] = after[k] - before.get(k, 0)
        report.notes.append(f"{type(model).__name__}: its own inference form ({make.__name__}())")
    else:
        _walk(model, backend, report)
    if verbose:
        print(report)
    return (model, report) if return_report else model
