"""Building blocks of the any-depth models: skip-aware norms, the switchable conv block, and the
skippable stage container.

Depth reaches these modules as a ``skip`` argument of ``forward`` (True = this stage runs shallow:
its refinement path is skipped and its essential convs use their shallow-path norms), never as
module state.
"""
from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
from torch import nn

from anydepth_kernels.modules import activation_name

_ACTS = {"silu": nn.SiLU, "relu": nn.ReLU, "identity": nn.Identity}


def split_blocks(n: int) -> Tuple[int, int]:
    """The papers' split rule: a stage of ``n`` blocks keeps ``min(n - 1, (n + 1) // 2)`` essential
    blocks and the rest are refinement. Returns ``(essential, refinement)``; a single block has no
    refinement path. ResNet-50 [3, 4, 6, 3] -> refinement [1, 2, 3, 1]."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a stage needs at least one block, got {n!r}")
    if n == 1:
        return 1, 0
    essential = min(n - 1, (n + 1) // 2)
    return essential, n - essential


def _accepts_skip(module: nn.Module) -> bool:
    try:
        return "skip" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def inplace_ok(t: torch.Tensor) -> bool:
    """Whether a fresh intermediate ``t`` may be overwritten by the next pointwise op: eager
    inference (autograd does not need it) and not while ``torch.compile`` / ``torch.export``
    traces (their graphs stay the functional ones that Inductor and the quantizer match)."""
    return not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and t.requires_grad)


def act_(act: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``act(t)`` computed in place in ``t`` (same kernel, same values) for torch's ReLU, SiLU and
    Identity; any other activation module is called as it is."""
    kind = type(act)
    if kind is nn.ReLU:
        return torch.relu_(t)
    if kind is nn.SiLU:
        return nn.functional.silu(t, inplace=True)
    if kind is nn.Identity:
        return t
    return act(t)


class SkipAwareBatchNorm2d(nn.Module):
    """Two BatchNorm2d sets: ``bn`` for full depth, ``bn_skip`` for when the stage runs shallow,
    so each depth keeps its own statistics. ``forward(x, skip)`` applies the matching one."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)
        self.bn_skip = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "SkipAwareBatchNorm2d":
        """Both sets initialised from ``bn`` (weights and running statistics copied)."""
        new = cls(bn.num_features, bn.eps, bn.momentum if bn.momentum is not None else 0.1)
        new.bn.load_state_dict(bn.state_dict())
        new.bn_skip.load_state_dict(bn.state_dict())
        return new.to(bn.weight.device if bn.weight is not None else "cpu")

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        return self.bn_skip(x) if skip else self.bn(x)


class SkipAwareLayerNorm(nn.Module):
    """Two LayerNorm sets for transformer parts: ``ln`` at full depth, ``ln_skip`` when shallow."""

    def __init__(self, normalized_shape, eps: float = 1e-5):
        super().__init__()
        self.ln = nn.LayerNorm(normalized_shape, eps=eps)
        self.ln_skip = nn.LayerNorm(normalized_shape, eps=eps)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        return self.ln_skip(x) if skip else self.ln(x)


@torch.no_grad()
def copy_norms_to_shallow(model: nn.Module) -> int:
    """Copy every skip-aware norm's full-depth set into its shallow-path set (``bn`` -> ``bn_skip``,
    ``ln`` -> ``ln_skip``: weights and running statistics). Returns the number of norms copied."""
    n = 0
    for m in model.modules():
        if isinstance(m, SkipAwareBatchNorm2d):
            m.bn_skip.load_state_dict(m.bn.state_dict())
            n += 1
        elif isinstance(m, SkipAwareLayerNorm):
            m.ln_skip.load_state_dict(m.ln.state_dict())
            n += 1
    return n


class ConvNormAct(nn.Module):
    """Conv2d (no bias) + BatchNorm (skip-aware if ``skip_aware``) + activation: the trainable,
    eager form of a switchable conv block. :meth:`fuse` returns the inference form, a
    :class:`anydepth_kernels.FusedConvNormAct` with one epilogue per norm set."""

    def __init__(self, in_ch: int, out_ch: int, k: int = 1, s: int = 1, p: Optional[int] = None,
                 d: int = 1, g: int = 1, act: str = "silu", skip_aware: bool = False,
                 bn_eps: float = 1e-3, bn_momentum: float = 0.03):
        super().__init__()
        act = activation_name(act)
        p = d * (k - 1) // 2 if p is None else p
        self.conv = nn.Conv2d(in_ch, out_ch, k, s, p, dilation=d, groups=g, bias=False)
        self.skip_aware = skip_aware
        self.bn = (SkipAwareBatchNorm2d(out_ch, bn_eps, bn_momentum) if skip_aware
                   else nn.BatchNorm2d(out_ch, eps=bn_eps, momentum=bn_momentum))
        self.act = _ACTS[act]()

    def forward(self, x: torch.Tensor, skip: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.conv(x)
        y = self.bn(y, skip) if self.skip_aware else self.bn(y)
        if inplace_ok(y):  # inference: the norm's output is ours; same values, two tensors fewer
            y = act_(self.act, y)
            return y if residual is None else y.add_(residual)
        y = self.act(y)
        return y if residual is None else y + residual

    def fuse(self):
        """The inference form (eval-mode statistics folded); epilogue index = ``int(skip)``."""
        from anydepth_kernels import FusedConvNormAct

        if self.skip_aware:
            return FusedConvNormAct.from_modules(self.conv, self.bn.bn, self.bn.bn_skip, self.act)
        return FusedConvNormAct.from_modules(self.conv, self.bn, None, self.act)


class FusedConv(nn.Module):
    """Inference form of a :class:`ConvNormAct` with the ``forward(x, skip, residual)`` signature of
    the model code: one conv weight, one folded (scale, bias) epilogue per norm set (skip-aware:
    epilogue ``int(skip)``), activation and optional residual add fused
    (``torch.ops.anydepth.conv_norm_act``)."""

    def __init__(self, fused, skip_aware: bool):
        super().__init__()
        self.fused = fused
        self.skip_aware = skip_aware

    @classmethod
    def from_conv_norm_act(cls, m: "ConvNormAct", in_channels: Optional[int] = None,
                           norm_set: Optional[str] = None, backend: str = "auto") -> "FusedConv":
        """Fold ``m`` (eval statistics). ``in_channels``: keep only the first input channels of
        the weight (a shallow path reading a slice); ``norm_set``: ``"main"``/``"skip"`` folds
        just that set of a skip-aware norm into a plain (single-epilogue) conv."""
        from anydepth_kernels import FusedConvNormAct

        conv = m.conv
        if in_channels is not None and in_channels != conv.in_channels:
            if conv.groups != 1:
                raise ValueError("an input-channel slice needs an ungrouped conv")
            sliced = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                               conv.dilation, 1, conv.bias is not None).to(conv.weight.device, conv.weight.dtype)
            with torch.no_grad():
                sliced.weight.copy_(conv.weight[:, :in_channels])
                if conv.bias is not None:
                    sliced.bias.copy_(conv.bias)
            conv = sliced
        if m.skip_aware and norm_set is None:
            return cls(FusedConvNormAct.from_modules(conv, m.bn.bn, m.bn.bn_skip, m.act, backend), True)
        bn = m.bn if not m.skip_aware else (m.bn.bn_skip if norm_set == "skip" else m.bn.bn)
        return cls(FusedConvNormAct.from_modules(conv, bn, None, m.act, backend), False)

    @property
    def out_channels(self) -> int:
        return self.fused.out_channels

    def forward(self, x: torch.Tensor, skip: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.fused(x, 1 if (self.skip_aware and skip) else 0, residual)  # skip may be a traced flag


def fuse_conv_norm_acts(module: nn.Module, backend: str = "auto") -> int:
    """Replace every :class:`ConvNormAct` below ``module`` by its :class:`FusedConv`, in place.
    Returns how many were replaced."""
    from anydepth_kernels.modules import swap_modules

    return swap_modules(module, lambda child: FusedConv.from_conv_norm_act(child, backend=backend)
                        if isinstance(child, ConvNormAct) else None)


class SkippableStage(nn.Module):
    """A stage = essential path (always runs) + refinement path (skippable).

    ``forward(x, skip)``: the essential path runs with ``skip`` (so its skip-aware norms pick their
    set); when ``skip`` is True the refinement path is not called and the essential output tensor
    itself is returned (no copy, no add, nothing allocated). Otherwise ``refinement(e)`` is
    returned: a residual refinement block adds its own residual.
    """

    def __init__(self, essential: nn.Module, refinement: Optional[nn.Module] = None):
        super().__init__()
        self.essential = essential
        self.refinement = refinement
        self._essential_skip = _accepts_skip(essential)
        self._refinement_skip = refinement is not None and _accepts_skip(refinement)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        e = self.essential(x, skip=skip) if self._essential_skip else self.essential(x)
        if skip or self.refinement is None:
            return e
        return self.refinement(e, skip=False) if self._refinement_skip else self.refinement(e)


class SharedBasisConvNormAct(nn.Module):
    """A 3x3 conv of an any-depth block in deeply-shared-filter-basis form (Kang & Kim, NeurIPS
    2021), with the ``forward(x, skip, residual)`` signature of :class:`ConvNormAct`.

    ``coefficients=True`` (the paper's ``SxUy`` layers): an
    :class:`anydepth_kernels.SharedBasisConv2d` ``layer`` ([own ``unique_rank`` filters ++ the
    stage's ``shared`` basis] -> BN -> 1x1 coefficients -> BN -> act). ``skip_aware`` (a block of
    a stage's essential path): a second ``layer_skip`` holding the same filters and coefficients
    (the parameters are tied, stored once) with its own two BatchNorms, used when the stage runs
    shallow, as a skip-aware :class:`ConvNormAct` keeps one BN set per depth.
    :func:`anydepth_kernels.shared_basis.deploy` turns both into plain or factored inference forms.

    ``coefficients=False`` (the paper's ResNet-50 "Shared"): the shared basis *is* the conv
    weight (``shared.rank == out_ch``, ``unique_rank == 0``), followed by this block's own
    (skip-aware) BN and act. Its inference form (:meth:`fuse`) is a :class:`FusedConv` on the
    shared weight with this block's norm set(s) folded.

    :func:`deploy_shared_basis_convs` gives every such conv of a model its inference form.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, unique_rank: int, shared, act: str = "relu",
                 skip_aware: bool = False, coefficients: bool = True, bn_eps: float = 1e-5,
                 bn_momentum: float = 0.1):
        super().__init__()
        from anydepth_kernels.shared_basis import SharedBasisConv2d

        self.skip_aware = skip_aware
        self.coefficients = coefficients
        act = activation_name(act)
        if coefficients:
            kw = dict(kernel_size=shared.kernel_size, stride=stride, act=act, eps=bn_eps, momentum=bn_momentum)
            self.layer = SharedBasisConv2d(in_ch, out_ch, unique_rank, shared, **kw)
            if skip_aware:
                skip = SharedBasisConv2d(in_ch, out_ch, unique_rank, shared, **kw)
                if self.layer.unique is not None:
                    skip.unique = self.layer.unique   # tied: one parameter
                skip.coeff = self.layer.coeff
                self.layer_skip: Optional[nn.Module] = skip
            else:
                self.layer_skip = None
        else:
            if unique_rank != 0 or shared.rank != out_ch or shared.in_channels != in_ch:
                raise ValueError(f"a shared conv without coefficients needs unique_rank 0 and a {in_ch} -> {out_ch} "
                                 f"basis, got unique_rank {unique_rank} and a basis of rank {shared.rank} over "
                                 f"{shared.in_channels} channels")
            self.shared = shared
            self.stride = stride
            self.bn = (SkipAwareBatchNorm2d(out_ch, bn_eps, bn_momentum) if skip_aware
                       else nn.BatchNorm2d(out_ch, eps=bn_eps, momentum=bn_momentum))
            self.act = _ACTS[act]()

    def forward(self, x: torch.Tensor, skip: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.coefficients:
            layer = self.layer_skip if (skip and self.layer_skip is not None) else self.layer
            return layer(x, residual=residual)
        w = self.shared.weight
        y = nn.functional.conv2d(x, w, None, self.stride, (w.shape[-2] // 2, w.shape[-1] // 2))
        y = self.act(self.bn(y, skip) if self.skip_aware else self.bn(y))
        return y if residual is None else y + residual

    def fuse(self, backend: str = "auto") -> "FusedConv":
        """Inference form of a ``coefficients=False`` conv: a :class:`FusedConv` on a copy of the
        shared weight with this block's norm(s) folded (eval-mode statistics; one epilogue per
        norm set), the activation and residual add fused. Exact up to float32 rounding. (A
        ``coefficients=True`` conv is deployed through its ``layer`` / ``layer_skip``:
        :func:`anydepth_kernels.shared_basis.deploy`.)"""
        from anydepth_kernels import FusedConvNormAct

        if self.coefficients:
            raise TypeError("fuse() folds a shared conv without coefficients; a conv with coefficients is "
                            "deployed by anydepth_kernels.shared_basis.deploy (folded or factored)")
        w = self.shared.weight
        conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[-2:]), self.stride,
                         (w.shape[-2] // 2, w.shape[-1] // 2), bias=False).to(w.device, w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
        if self.skip_aware:
            return FusedConv(FusedConvNormAct.from_modules(conv, self.bn.bn, self.bn.bn_skip, self.act, backend), True)
        return FusedConv(FusedConvNormAct.from_modules(conv, self.bn, None, self.act, backend), False)


def deploy_shared_basis_convs(module: nn.Module, backend: str = "auto", mode: str = "auto") -> int:
    """The inference form of every deeply-shared-filter-basis conv below ``module``, in place
    (eval-mode statistics): each :class:`SharedBasisConvNormAct` without coefficients becomes a
    :class:`FusedConv` (:meth:`SharedBasisConvNormAct.fuse`), and every
    :class:`anydepth_kernels.SharedBasisConv2d` (those with coefficients, shallow-path twins
    included) is folded or kept factored by :func:`anydepth_kernels.shared_basis.deploy`
    (``mode="auto"``: whichever costs fewer FLOPs). Returns how many modules were replaced."""
    from anydepth_kernels.modules import swap_modules
    from anydepth_kernels.shared_basis import deploy

    n = swap_modules(module, lambda child: child.fuse(backend)
                     if isinstance(child, SharedBasisConvNormAct) and not child.coefficients else None)
    return n + deploy(module, mode, backend)
