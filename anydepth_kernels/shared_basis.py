"""Deeply shared filter bases (Kang & Kim, NeurIPS 2021): convolutions that share basis filters
across the blocks of a stage, their training penalty, and their two inference forms.

A ``k x k`` convolution ``C -> C_out`` becomes (the authors' ``ssregibility/Net_RL2`` layout)::

    cat(conv(x, U), conv(x, S)) -> BatchNorm(u + s) -> 1x1 conv (coefficients) -> BatchNorm(C_out) [-> act]

``U`` (``u`` filters) belongs to the layer, ``S`` (``s`` filters, a :class:`SharedBasis`) to the
stage: created once and referenced by every block of the stage but the first (the stage's first
block changes the channel count or stride). The layer's own filters come first in the
concatenation, as in the authors' code; no activation between the basis norm and the
coefficients. With ``u + s`` much smaller than ``C_out`` the layer stores and computes less than
the plain convolution, and the shared filters are stored once per stage.

* :class:`SharedBasis`, :class:`SharedBasisConv2d`: the training form.
* :func:`orthogonality_penalty` ``(model)``: the authors' regulariser over every shared basis of
  the model (weight 10 by default, ``--lambdaR``), for the trainer to add to the loss; the bases
  of a :class:`SharedBasisGroup` (a stage's two bases) are penalised jointly.
* :func:`share_bases` ``(convs, shared_rank, unique_rank)``: plain convolutions of a stage turned
  into shared-basis form, initialised by an SVD of their stacked filters.
* Inference: :meth:`SharedBasisConv2d.fold` gives one plain convolution (a
  :class:`~anydepth_kernels.FusedConvNormAct`: basis, both norms and coefficients folded exactly);
  :meth:`SharedBasisConv2d.factored` keeps the factored form as :class:`FactoredConvNormAct`, one
  fused op (:func:`anydepth_kernels.basis_conv_norm_act`: basis conv, then the coefficient GEMM
  with the folded norm and activation as its epilogue). :func:`deploy` picks per layer whichever
  costs fewer FLOPs; :func:`deploy_table` reports both per layer. :func:`anydepth_kernels.optimize`
  does the same as ``deploy(mode="auto")`` (a registered swap rule).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .modules import ActLike, FusedConvNormAct, activation_name, fold_batchnorm, swap_modules
from .ops._checks import pair
from .ops.basis_conv import basis_conv_norm_act
from .reference import apply_activation

IntOr2 = Union[int, Sequence[int]]

#: The authors' default weight of the orthogonality penalty (``--lambdaR``).
DEFAULT_PENALTY_WEIGHT = 10.0
#: ``deploy`` modes.
DEPLOY_MODES = ("auto", "fold", "factored")


class SharedBasis(nn.Module):
    """``rank`` basis filters ``[rank, in_channels, k, k]`` shared by the layers of a stage.

    Create one per stage and pass it to every :class:`SharedBasisConv2d` that shares it: the
    parameter is stored once (``model.parameters()`` lists it once; ``state_dict`` names it under
    every layer that holds it, one tensor). Initialised orthogonal (the rows of the flattened
    weight orthonormal where ``rank <= in_channels * k * k``), as in the authors' code.
    """

    def __init__(self, in_channels: int, rank: int, kernel_size: IntOr2 = 3, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        if in_channels < 1 or rank < 1:
            raise ValueError(f"{name}: in_channels and rank must be positive, got {in_channels}, {rank}")
        self.kernel_size = pair(kernel_size, "kernel_size", name, 1)
        self.in_channels, self.rank = in_channels, rank
        self.weight = nn.Parameter(torch.empty(rank, in_channels, *self.kernel_size, device=device, dtype=dtype))
        nn.init.orthogonal_(self.weight)

    def penalty(self) -> torch.Tensor:
        """``||W W^T - I||_F^2`` with ``W`` the ``[rank, in_channels * k * k]`` flattened filters
        (the sum, not yet divided by ``rank^2``)."""
        w = self.weight.reshape(self.rank, -1)
        gram = w @ w.t()
        eye = torch.eye(self.rank, device=w.device, dtype=w.dtype)
        return ((gram - eye) ** 2).sum()

    def extra_repr(self) -> str:
        return f"{self.in_channels}, rank={self.rank}, kernel_size={self.kernel_size}"


def _padding(padding: Optional[IntOr2], k: Tuple[int, int], dilation: Tuple[int, int], name: str) -> Tuple[int, int]:
    if padding is None:
        padding = tuple(d * (kk - 1) // 2 for kk, d in zip(k, dilation))
    return pair(padding, "padding", name, 0)


class SharedBasisConv2d(nn.Module):
    """A ``k x k`` convolution as [own basis (``unique_rank`` filters) ++ shared basis] -> norm ->
    1x1 coefficients -> norm (-> activation).

    Args:
        in_channels, out_channels: of the convolution it replaces.
        unique_rank: the layer's own basis filters (0: only the shared ones).
        shared: the stage's :class:`SharedBasis` (``None``: only the layer's own filters; then
            ``unique_rank`` must be positive). Its ``in_channels`` and kernel size must match.
        kernel_size, stride, padding (default: "same" for odd kernels), dilation: of the basis
            convolution (the shared basis runs at this layer's stride).
        act: activation after the output norm (``None``/``"identity"``, ``"relu"``, ``"silu"`` or
            the module); the authors' blocks apply it outside, after the residual, where it
            belongs to the block.
        eps, momentum: of both BatchNorms.

    ``forward(x, residual=None)`` is the training form (``act(norm(...)) + residual``). For
    inference see :meth:`fold`, :meth:`factored` and :func:`deploy`.
    """

    def __init__(self, in_channels: int, out_channels: int, unique_rank: int, shared: Optional[SharedBasis] = None,
                 kernel_size: IntOr2 = 3, stride: IntOr2 = 1, padding: Optional[IntOr2] = None,
                 dilation: IntOr2 = 1, act: ActLike = None, eps: float = 1e-5, momentum: float = 0.1,
                 device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        self.kernel_size = pair(kernel_size, "kernel_size", name, 1)
        self.stride = pair(stride, "stride", name, 1)
        self.dilation = pair(dilation, "dilation", name, 1)
        self.padding = _padding(padding, self.kernel_size, self.dilation, name)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"{name}: channels must be positive, got {in_channels}, {out_channels}")
        if unique_rank < 0:
            raise ValueError(f"{name}: unique_rank must be >= 0, got {unique_rank}")
        if shared is not None:
            if not isinstance(shared, SharedBasis):
                raise TypeError(f"{name}: shared must be a SharedBasis, got {type(shared).__name__}")
            if shared.in_channels != in_channels or shared.kernel_size != self.kernel_size:
                raise ValueError(f"{name}: the shared basis reads {shared.in_channels} channels with a "
                                 f"{shared.kernel_size} kernel; this layer has {in_channels} and {self.kernel_size}")
        shared_rank = 0 if shared is None else shared.rank
        if unique_rank + shared_rank == 0:
            raise ValueError(f"{name}: no basis filters (unique_rank=0 and no shared basis)")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.unique_rank = unique_rank
        self.act = activation_name(act)
        factory = dict(device=device, dtype=dtype)
        if unique_rank > 0:
            self.unique: Optional[nn.Parameter] = nn.Parameter(
                torch.empty(unique_rank, in_channels, *self.kernel_size, **factory))
            nn.init.kaiming_normal_(self.unique, mode="fan_out", nonlinearity="relu")
        else:
            self.register_parameter("unique", None)
        self.shared = shared
        rank = unique_rank + shared_rank
        self.basis_norm = nn.BatchNorm2d(rank, eps=eps, momentum=momentum, **factory)
        self.coeff = nn.Conv2d(rank, out_channels, 1, bias=False, **factory)
        self.norm = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **factory)

    @property
    def shared_rank(self) -> int:
        return 0 if self.shared is None else self.shared.rank

    @property
    def rank(self) -> int:
        """Basis filters in all: ``unique_rank + shared_rank``."""
        return self.unique_rank + self.shared_rank

    def basis_weight(self) -> torch.Tensor:
        """The ``[rank, in_channels, kh, kw]`` basis: the layer's own filters, then the shared ones."""
        parts: List[torch.Tensor] = [t for t in (self.unique, None if self.shared is None else self.shared.weight)
                                     if t is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = nn.functional.conv2d(x, self.basis_weight(), None, self.stride, self.padding, self.dilation)
        y = self.norm(self.coeff(self.basis_norm(y)))
        y = apply_activation(y, self.act)
        return y if residual is None else y + residual

    # ---------------------------------------------------------------------------------- inference

    def _folded_parts(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(basis, coeff, scale, bias)`` of the eval-mode layer with both norms folded (float64):
        ``norm(coeff(basis_norm(conv(x, B))))`` = ``(coeff * s1) @ conv(x, B) * s2 + (s2 * (coeff @ b1) + b2)``."""
        s1, b1 = (t.double() for t in _fold_exact(self.basis_norm))
        s2, b2 = (t.double() for t in _fold_exact(self.norm))
        coeff = self.coeff.weight.detach().double().reshape(self.out_channels, self.rank)
        return (self.basis_weight().detach().double(), coeff * s1[None, :], s2, s2 * (coeff @ b1) + b2)

    def fold(self, backend: str = "auto") -> FusedConvNormAct:
        """One plain convolution with the output norm as its epilogue (eval-mode norms, running
        statistics): ``W[o] = sum_r coeff[o, r] * s1[r] * basis[r]``, computed in float64. Runs
        at the speed of a plain ``k x k`` conv of ``in_channels -> out_channels``."""
        basis, coeff, scale, bias = self._folded_parts()
        weight = torch.einsum("or,rckl->ockl", coeff, basis)
        ref = self.coeff.weight
        fused = FusedConvNormAct(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                 self.padding, self.dilation, 1, self.act, backend=backend,
                                 device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            fused.weight.copy_(weight)
            fused.set_epilogue(0, scale.float(), bias.float())
        return fused

    def factored(self, backend: str = "auto") -> "FactoredConvNormAct":
        """The factored form with both norms folded, running as one fused op
        (:func:`anydepth_kernels.basis_conv_norm_act`). The shared filters are copied into the
        layer's basis (inference keeps no tie between layers)."""
        basis, coeff, scale, bias = self._folded_parts()
        ref = self.coeff.weight
        return FactoredConvNormAct(basis.to(ref.dtype), coeff.to(ref.dtype), scale.float(), bias.float(),
                                   self.stride, self.padding, self.dilation, self.act, backend)

    def flops_per_pixel(self) -> Dict[str, int]:
        """Multiply-adds x 2 per output pixel (``anydepth_kernels.flops`` convention) of the
        ``folded`` plain conv and of the ``factored`` form (basis conv + coefficient GEMM)."""
        kk = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        return {"folded": 2 * self.out_channels * kk,
                "factored": 2 * (self.rank * kk + self.out_channels * self.rank)}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, unique_rank={self.unique_rank}, "
                f"shared_rank={self.shared_rank}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, act={self.act!r}")


def _fold_exact(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`fold_batchnorm` in float64 (its float32 rounding would cost the fold its 1e-7)."""
    fold_batchnorm(bn)  # validates: running statistics present, finite, variance >= 0
    mean, var = bn.running_mean.detach().double(), bn.running_var.detach().double()  # type: ignore[union-attr]
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - mean * s


class FactoredConvNormAct(nn.Module):
    """Inference form of a :class:`SharedBasisConv2d` kept factored: ``act((coeff @ conv(x,
    basis)) * scale + bias) + residual`` through the fused op
    :func:`anydepth_kernels.basis_conv_norm_act` (the intermediate never written to memory)."""

    scale: torch.Tensor
    bias: torch.Tensor

    def __init__(self, basis: torch.Tensor, coeff: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 stride: IntOr2 = 1, padding: IntOr2 = 0, dilation: IntOr2 = 1, act: ActLike = None,
                 backend: str = "auto"):
        super().__init__()
        name = type(self).__name__
        self.stride = pair(stride, "stride", name, 1)
        self.padding = pair(padding, "padding", name, 0)
        self.dilation = pair(dilation, "dilation", name, 1)
        self.act = activation_name(act)
        self.backend = backend
        self.basis = nn.Parameter(basis.detach().clone())
        self.coeff = nn.Parameter(coeff.detach().reshape(coeff.shape[0], -1).clone())
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return basis_conv_norm_act(x, self.basis, self.coeff, self.scale, self.bias, self.stride, self.padding,
                                   self.dilation, self.act, residual, self.backend)

    def extra_repr(self) -> str:
        r, c, kh, kw = self.basis.shape
        return (f"{c}, {self.coeff.shape[0]}, rank={r}, kernel_size={(kh, kw)}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, act={self.act!r}, backend={self.backend!r}")


# ------------------------------------------------------------------------------------- training

class SharedBasisGroup(nn.ModuleList):
    """The shared bases of one stage that :func:`orthogonality_penalty` penalises *jointly*
    (``joint=True``, the default): their flattened filters are stacked into one ``W`` (so the
    bases are pushed orthogonal to each other too, not only within themselves), as the authors'
    ``train_basis_double`` does for the two bases per stage of their ``ResNet34_DoubleShared``.
    A plain :class:`torch.nn.ModuleList` otherwise (same ``state_dict`` keys). The bases of a group
    must read the same input width with the same kernel size."""


def shared_bases(model: nn.Module) -> List[SharedBasis]:
    """Every distinct :class:`SharedBasis` below ``model`` (each once, in module order)."""
    return [m for m in model.modules() if isinstance(m, SharedBasis)]


def basis_groups(model: nn.Module) -> List[List[SharedBasis]]:
    """The units :func:`orthogonality_penalty` penalises with ``joint=True``: the members of each
    :class:`SharedBasisGroup` below ``model`` (a basis counted once, in the first group that holds
    it), then every other shared basis on its own; in module order."""
    groups: List[List[SharedBasis]] = []
    seen = set()
    for m in model.modules():
        if isinstance(m, SharedBasisGroup):
            g = []
            for b in m.modules():
                if isinstance(b, SharedBasis) and id(b) not in seen:
                    seen.add(id(b))
                    g.append(b)
            if g:
                groups.append(g)
    groups += [[b] for b in shared_bases(model) if id(b) not in seen]
    return groups


def _joint_penalty(group: Sequence[SharedBasis]) -> torch.Tensor:
    """``||W W^T - I||_F^2`` with ``W`` the group's flattened filters stacked ``[sum r, C k k]``."""
    first = group[0]
    for b in group[1:]:
        if b.in_channels != first.in_channels or b.kernel_size != first.kernel_size:
            raise ValueError(f"orthogonality_penalty(joint=True): a SharedBasisGroup mixes bases over "
                             f"{first.in_channels} channels with a {first.kernel_size} kernel and over "
                             f"{b.in_channels} with {b.kernel_size}; their filters cannot be stacked (use joint=False)")
    if len(group) == 1:
        return first.penalty()
    w = torch.cat([b.weight.reshape(b.rank, -1) for b in group], 0)
    eye = torch.eye(w.shape[0], device=w.device, dtype=w.dtype)
    return ((w @ w.t() - eye) ** 2).sum()


def orthogonality_penalty(model: nn.Module, weight: float = DEFAULT_PENALTY_WEIGHT,
                          reduction: str = "pooled", joint: bool = True) -> torch.Tensor:
    """The shared-basis regulariser, to add to the training loss: ``weight`` times the mean
    squared entry of ``W W^T - I`` over the model's shared bases (``W`` a basis's filters
    flattened to ``[r, in_channels * k * k]``; the layers' own filters are not penalised).

    ``joint=True`` (default): the bases of a :class:`SharedBasisGroup` (a stage's two bases in
    the any-depth ResNets' ``bases=2``) form one ``W`` (their filters stacked, rank ``sum r``), so
    the cross terms between them are penalised too: the authors' ``train_basis_double``
    (``train_ilsvrc.py``, what their script runs for ``ResNet34_DoubleShared``, the paper's
    ResNet34-S48U1). A basis outside any group, or alone in its group, is penalised on its own
    either way. ``joint=False``: every basis on its own (no cross terms).

    ``reduction="pooled"`` (default, the authors' ``train_*.py``): ``sum_u ||W_u W_u^T - I||_F^2 /
    sum_u r_u^2`` over the units ``u`` (groups or bases); ``"mean"``: ``mean_u(||W_u W_u^T -
    I||_F^2 / r_u^2)``. The two agree when every unit has the same rank. A model without shared
    bases gives a zero tensor (no gradient).
    """
    if reduction not in ("pooled", "mean"):
        raise ValueError(f"orthogonality_penalty: reduction must be 'pooled' or 'mean', got {reduction!r}")
    if not isinstance(joint, bool):
        raise TypeError(f"orthogonality_penalty: joint must be True or False, got {joint!r}")
    units = basis_groups(model) if joint else [[b] for b in shared_bases(model)]
    if not units:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    terms = [_joint_penalty(u) for u in units]
    ranks = [sum(b.rank for b in u) for u in units]
    if reduction == "pooled":
        value = torch.stack(terms).sum() / sum(r ** 2 for r in ranks)
    else:
        value = torch.stack([t / r ** 2 for t, r in zip(terms, ranks)]).mean()
    return weight * value


def share_bases(convs: Sequence[nn.Conv2d], shared_rank: int, unique_rank: int,
                norms: Optional[Sequence[Optional[nn.BatchNorm2d]]] = None,
                act: ActLike = None) -> Tuple[Optional[SharedBasis], List[SharedBasisConv2d]]:
    """Turn plain convolutions of a stage (same input channels and kernel size; any output
    channels, stride, padding, dilation) into shared-basis form, initialised from their weights.

    With ``F_l`` the ``[C_out_l, C k k]`` flattened filters of conv ``l``:

    * the shared basis is the top ``shared_rank`` right singular vectors of all filters stacked
      (``cat_l F_l``): orthonormal rows, so the orthogonality penalty starts at 0;
    * layer ``l``'s own basis is the top ``unique_rank`` right singular vectors of what the
      shared basis leaves of ``F_l`` (``F_l - F_l S^T S``), orthogonal to the shared one;
    * its coefficients are ``F_l B_l^T`` (``B_l`` = own ++ shared rows, orthonormal): the
      least-squares fit, exact when ``unique_rank + shared_rank`` reaches ``C k k``.

    The basis norm starts as the identity in eval mode (running variance ``1 - eps``). ``norms``
    (the BatchNorm after each conv, or ``None``) are copied into the output norms (a conv bias is
    folded into its running mean); without one the output norm is the identity plus the conv's
    bias. Returns ``(shared basis or None when shared_rank == 0, new layers)``: store the basis
    once on the stage (e.g. ``stage.shared_basis = basis``), the layers replace the convs.
    """
    name = "share_bases"
    convs = list(convs)
    if not convs:
        raise ValueError(f"{name}: no convolutions given")
    first = convs[0]
    for i, c in enumerate(convs):
        if not isinstance(c, nn.Conv2d):
            raise TypeError(f"{name}: convs[{i}] is {type(c).__name__}, expected nn.Conv2d")
        if c.groups != 1 or c.padding_mode != "zeros" or isinstance(c.padding, str):
            raise ValueError(f"{name}: convs[{i}] must have groups=1, zero padding given as numbers")
        if c.in_channels != first.in_channels or c.kernel_size != first.kernel_size:
            raise ValueError(f"{name}: convs[{i}] reads {c.in_channels} channels with a {c.kernel_size} kernel; "
                             f"convs[0] has {first.in_channels} and {first.kernel_size}: a basis is shared by "
                             "convolutions of one input width and kernel size")
    if norms is not None and len(norms) != len(convs):
        raise ValueError(f"{name}: {len(norms)} norms for {len(convs)} convolutions")
    kk = first.in_channels * first.kernel_size[0] * first.kernel_size[1]
    if shared_rank < 0 or unique_rank < 0 or shared_rank + unique_rank == 0:
        raise ValueError(f"{name}: ranks must be >= 0 and not both 0, got shared {shared_rank}, unique {unique_rank}")
    if shared_rank + unique_rank > kk:
        raise ValueError(f"{name}: shared_rank + unique_rank = {shared_rank + unique_rank} exceeds the "
                         f"{kk} values of a flattened filter ({first.in_channels} x {first.kernel_size})")
    flat = [c.weight.detach().double().reshape(c.out_channels, kk) for c in convs]
    stacked = torch.cat(flat, 0)
    # the reduced SVD has min(rows, kk) right singular vectors: enough unless the shared rank
    # exceeds the stacked filters' count (then the rest is completed from the full V)
    _, _, vh = torch.linalg.svd(stacked, full_matrices=shared_rank > min(stacked.shape))
    s_rows = vh[:shared_rank]
    dev, dt = first.weight.device, first.weight.dtype
    basis = None
    if shared_rank > 0:
        basis = SharedBasis(first.in_channels, shared_rank, first.kernel_size, device=dev, dtype=dt)
        with torch.no_grad():
            basis.weight.copy_(s_rows.reshape(basis.weight.shape))
    layers = []
    for i, (c, f) in enumerate(zip(convs, flat)):
        rest = f - (f @ s_rows.t()) @ s_rows
        u_rows = _top_right_singular(rest, s_rows, unique_rank, kk, float(torch.linalg.matrix_norm(f)))
        rows = torch.cat([u_rows, s_rows], 0)
        padding = c.padding
        assert not isinstance(padding, str)  # checked above
        layer = SharedBasisConv2d(c.in_channels, c.out_channels, unique_rank, basis, c.kernel_size, c.stride,
                                  padding, c.dilation, act, device=dev, dtype=dt)
        norm = None if norms is None else norms[i]
        with torch.no_grad():
            if layer.unique is not None:
                layer.unique.copy_(u_rows.reshape(layer.unique.shape))
            layer.coeff.weight.copy_((f @ rows.t()).reshape(layer.coeff.weight.shape))
            _identity_norm(layer.basis_norm)
            if norm is not None:
                layer.norm.load_state_dict(norm.state_dict())
                layer.norm.eps, layer.norm.momentum = norm.eps, norm.momentum
                if c.bias is not None:
                    layer.norm.running_mean.sub_(c.bias.detach())  # type: ignore[union-attr]
            else:
                _identity_norm(layer.norm)
                if c.bias is not None:
                    layer.norm.bias.copy_(c.bias.detach())
        layers.append(layer)
    return basis, layers


def _top_right_singular(m: torch.Tensor, exclude: torch.Tensor, count: int, kk: int,
                        scale: float = 1.0) -> torch.Tensor:
    """``count`` orthonormal rows spanning the top right singular space of ``m``, orthogonal to
    the rows of ``exclude``: where ``m`` has fewer non-zero singular values (a layer fully
    explained by the shared basis), the rest is completed from the complement of ``exclude``.
    ``m`` at rounding level (``||m|| <= 1e-12 scale``: nothing left to explain) has no top
    directions: the rows are all completion (no SVD of rounding noise)."""
    if count == 0:
        return m.new_zeros(0, kk)
    if float(torch.linalg.matrix_norm(m)) <= 1e-12 * scale:
        vh = torch.eye(kk, dtype=m.dtype, device=m.device)
    else:
        _, _, vh = torch.linalg.svd(m, full_matrices=count > min(m.shape))
    # Directions past m's rank are arbitrary (possibly inside the shared span): a Householder QR
    # of [exclude; top rows] keeps the span of the top non-zero directions and returns columns
    # orthonormal to each other and to the shared rows whatever the input.
    e = exclude.shape[0]
    q, _ = torch.linalg.qr(torch.cat([exclude, vh[:count]], 0).t())
    return q.t()[e:e + count]


def _identity_norm(bn: nn.BatchNorm2d) -> None:
    """Eval-mode identity: weight 1, bias 0, running mean 0, running variance ``1 - eps``."""
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.fill_(1.0)
            bn.bias.fill_(0.0)
        if bn.running_mean is not None and bn.running_var is not None:
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)


# ------------------------------------------------------------------------------------ deployment

def _choose(layer: SharedBasisConv2d, mode: str) -> str:
    if mode == "auto":
        f = layer.flops_per_pixel()
        return "factored" if f["factored"] < f["folded"] else "fold"
    return mode


def deploy(model: nn.Module, mode: str = "auto", backend: str = "auto") -> int:
    """Replace every :class:`SharedBasisConv2d` below ``model`` (in place; eval-mode norms are
    folded, so call it on a trained model) by its inference form: ``"fold"`` (one plain conv,
    :meth:`SharedBasisConv2d.fold`), ``"factored"`` (the fused factored op,
    :meth:`SharedBasisConv2d.factored`) or ``"auto"`` (per layer, whichever costs fewer FLOPs;
    a tie folds). Returns how many layers were replaced."""
    if mode not in DEPLOY_MODES:
        raise ValueError(f"deploy: mode must be one of {DEPLOY_MODES}, got {mode!r}")

    def replace(m: nn.Module) -> Optional[nn.Module]:
        if not isinstance(m, SharedBasisConv2d):
            return None
        return m.fold(backend) if _choose(m, mode) == "fold" else m.factored(backend)

    return swap_modules(model, replace)


@dataclass
class DeployRow:
    """One :class:`SharedBasisConv2d` of :func:`deploy_table`."""

    name: str
    in_channels: int
    out_channels: int
    kernel: str
    stride: int
    unique_rank: int
    shared_rank: int
    out_hw: str
    params_plain: int
    params_factored: int
    flops_folded: int
    flops_factored: int
    choice: str


def deploy_table(model: nn.Module, example_input: torch.Tensor) -> List[DeployRow]:
    """Per :class:`SharedBasisConv2d` of ``model``: parameters of the plain conv vs the factored
    layer (its own filters + coefficients + the shared filters counted at the layer that holds
    them first), FLOPs of both forms for ``example_input`` (one forward with hooks to read the
    output sizes; 2 FLOPs per multiply-add over the whole batch, as in
    :mod:`anydepth_kernels.flops`; norms and activation not counted), and what ``deploy(mode="auto")``
    picks."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SharedBasisConv2d)]
    shapes: Dict[str, Tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: shapes.__setitem__(n, tuple(out.shape)))
             for n, m in layers]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    rows, seen = [], set()
    for n, m in layers:
        out = shapes.get(n)
        if out is None:
            continue  # not run by this input
        kh, kw = m.kernel_size
        kk = m.in_channels * kh * kw
        shared = 0
        if m.shared is not None and id(m.shared) not in seen:
            seen.add(id(m.shared))
            shared = m.shared.rank * kk
        pixels = out[0] * out[2] * out[3]
        f = m.flops_per_pixel()
        rows.append(DeployRow(n, m.in_channels, m.out_channels, f"{kh}x{kw}", m.stride[0], m.unique_rank,
                              m.shared_rank, f"{out[2]}x{out[3]}", m.out_channels * kk,
                              m.unique_rank * kk + m.out_channels * m.rank + shared,
                              pixels * f["folded"], pixels * f["factored"], _choose(m, "auto")))
    return rows


def format_deploy_table(rows: Sequence[DeployRow]) -> str:
    """:func:`deploy_table` rows as a text table with totals (MFLOPs, k parameters)."""
    head = f"{'layer':<28} {'in->out':>10} {'k':>4} {'s':>2} {'u+s':>7} {'out':>8} " \
           f"{'params plain':>12} {'factored':>9} {'MFLOPs folded':>13} {'factored':>9}  choice"
    lines = [head, "-" * len(head)]
    tot = [0, 0, 0, 0]
    for r in rows:
        lines.append(f"{r.name[-28:]:<28} {f'{r.in_channels}->{r.out_channels}':>10} {r.kernel:>4} {r.stride:>2} "
                     f"{f'{r.unique_rank}+{r.shared_rank}':>7} {r.out_hw:>8} {r.params_plain / 1e3:>11.1f}k "
                     f"{r.params_factored / 1e3:>8.1f}k {r.flops_folded / 1e6:>13.2f} {r.flops_factored / 1e6:>9.2f}"
                     f"  {r.choice}")
        tot = [a + b for a, b in zip(tot, (r.params_plain, r.params_factored, r.flops_folded, r.flops_factored))]
    lines.append("-" * len(head))
    lines.append(f"{'total':<28} {'':>10} {'':>4} {'':>2} {'':>7} {'':>8} {tot[0] / 1e3:>11.1f}k "
                 f"{tot[1] / 1e3:>8.1f}k {tot[2] / 1e6:>13.2f} {tot[3] / 1e6:>9.2f}")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_PENALTY_WEIGHT", "DeployRow", "FactoredConvNormAct", "SharedBasis", "SharedBasisConv2d",
    "SharedBasisGroup", "basis_groups", "deploy", "deploy_table", "format_deploy_table", "orthogonality_penalty",
    "share_bases", "shared_bases",
]


def _swap_rule(m: nn.Module, backend: str) -> Optional[nn.Module]:
    if not isinstance(m, SharedBasisConv2d):
        return None
    return m.fold(backend) if _choose(m, "auto") == "fold" else m.factored(backend)


def _register() -> None:
    from .optimize import register_swap

    register_swap("anydepth_kernels", "SharedBasisConv2d", _swap_rule)


_register()
