"""``optimize(model)``: swap fused modules into a model you already have, in one call.

Recognised (by class, without importing the packages that define them):

* **Ultralytics** (YOLO12 and its relatives): ``Conv`` / ``DWConv`` (conv + BN + act -> one fused
  op), ``Bottleneck`` (residual add fused into the second conv), ``AAttn`` (area attention on
  ``scaled_dot_product_attention``'s fused kernels instead of explicit matmuls, positional conv
  and residuals fused) and ``ABlock``.
* **HuggingFace RT-DETR** (``RTDetrForObjectDetection``): ResNet conv layers and residual blocks
  (the residual add fused into the last conv), ``RTDetrConvNormLayer``, ``RTDetrRepVggBlock``
  (reparameterised into one 3x3 conv), ``RTDetrCSPRepLayer`` (its add fused) and the
  multi-scale deformable attention kernel (:func:`anydepth_kernels.ms_deform_attn`).

Other packages teach it their own module types with :func:`register_swap` (the any-depth models
register theirs when ``anydepth`` is imported: this package knows nothing about them). A rule
also applies to the model passed in itself: a whole-model rule (e.g. a model's own inference
form) replaces or converts the model, and the report lists the module types it added.

Everything else is left alone and listed in the returned report (``verbose=True`` prints it).
The model is put in eval mode: folding uses the BatchNorm running statistics, so the result is an
inference model.
"""
from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .modules import FusedConvNormAct, swap_modules

#: activation class names (torch's and HF's own classes) -> the fused epilogue's activation
_ACT_NAMES = {"SiLU": "silu", "SiLUActivation": "silu", "ReLU": "relu", "Identity": "identity"}


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


def _act_name(act: Any) -> Optional[str]:
    if not isinstance(act, nn.Module) or type(act).__module__.split(".")[0] not in ("torch", "transformers"):
        return None
    if getattr(act, "inplace", False) and type(act).__name__ != "ReLU":
        return None
    return _ACT_NAMES.get(type(act).__name__)


def _as_batchnorm(norm: Any) -> Optional[nn.BatchNorm2d]:
    """A BatchNorm2d, or an equivalent one for frozen-BN modules (HF's RTDetrFrozenBatchNorm2d)."""
    if isinstance(norm, nn.BatchNorm2d):
        return norm
    if all(isinstance(getattr(norm, n, None), torch.Tensor) for n in ("weight", "bias", "running_mean", "running_var")):
        bn = nn.BatchNorm2d(norm.weight.numel(), eps=float(getattr(norm, "eps", 1e-5)))
        bn = bn.to(norm.weight.device, norm.weight.dtype).eval()
        with torch.no_grad():
            for n in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, n).copy_(getattr(norm, n))
        return bn
    return None


def _fused_from_conv(m: Any, backend: str) -> Optional[FusedConvNormAct]:
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


class FusedPlainConv(nn.Module):
    """A third-party conv + norm + activation module replaced by one fused op (one epilogue, no
    skip-aware norm set: not :class:`anydepth.nn.FusedConv`); ``forward(x, residual=None)``."""

    def __init__(self, fused: FusedConvNormAct):
        super().__init__()
        self.fused = fused

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.fused(x, 0, residual)


class FusedBottleneck(nn.Module):
    """``x + cv2(cv1(x))`` with the add fused into ``cv2``'s epilogue."""

    def __init__(self, cv1: FusedPlainConv, cv2: FusedPlainConv, add: bool):
        super().__init__()
        self.cv1, self.cv2, self.add = cv1, cv2, add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(self.cv1(x), x if self.add else None)


class FusedAreaAttention(nn.Module):
    """Ultralytics ``AAttn`` on :func:`anydepth_kernels.area_attention` (Triton on CUDA, reading
    q/k/v from the qkv map by strides; the library's flash kernel on the CPU) instead of explicit
    matmuls, with ``o + pe(v)`` and the caller's residual fused into conv epilogues."""

    def __init__(self, qkv: FusedPlainConv, proj: FusedPlainConv, pe: FusedPlainConv, num_heads: int, head_dim: int,
                 area: int):
        super().__init__()
        self.qkv, self.proj, self.pe = qkv, proj, pe
        self.num_heads, self.head_dim, self.area = num_heads, head_dim, max(area, 1)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        from .ops.attention import area_attention

        o, v = area_attention(self.qkv(x), self.num_heads, self.area)
        return self.proj(self.pe(v, o), residual)


class FusedABlock(nn.Module):
    """Ultralytics ``ABlock``: ``x + attn(x)``, ``x + mlp(x)``, both adds fused."""

    def __init__(self, attn: nn.Module, mlp0: FusedPlainConv, mlp1: FusedPlainConv):
        super().__init__()
        self.attn, self.mlp0, self.mlp1 = attn, mlp0, mlp1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x, x) if isinstance(self.attn, FusedAreaAttention) else x + self.attn(x)
        return self.mlp1(self.mlp0(x), x)


# --------------------------------------------------------------------------- swap rules
Swap = Callable[[nn.Module, str], Optional[nn.Module]]


def _swap_ultra_conv(m: Any, backend: str) -> Optional[FusedPlainConv]:
    f = _fused_from_conv(m, backend)
    return FusedPlainConv(f) if f is not None else None


def _as_fused(m: Any, backend: str) -> Optional[FusedPlainConv]:
    if isinstance(m, FusedPlainConv):
        return m
    return _swap_ultra_conv(m, backend) if type(m).__name__ in ("Conv", "DWConv") else None


def _swap_ultra_bottleneck(m: Any, backend: str) -> Optional[nn.Module]:
    cv1, cv2 = _as_fused(m.cv1, backend), _as_fused(m.cv2, backend)
    if cv1 is None or cv2 is None:
        return None
    return FusedBottleneck(cv1, cv2, bool(getattr(m, "add", False)))


def _swap_ultra_aattn(m: Any, backend: str) -> Optional[nn.Module]:
    qkv, proj, pe = (_as_fused(getattr(m, n, None), backend) for n in ("qkv", "proj", "pe"))
    if qkv is None or proj is None or pe is None or not hasattr(m, "num_heads"):
        return None
    return FusedAreaAttention(qkv, proj, pe, m.num_heads, m.head_dim, int(getattr(m, "area", 1)))


def _swap_ultra_ablock(m: Any, backend: str) -> Optional[nn.Module]:
    mlp = getattr(m, "mlp", None)
    if not isinstance(mlp, nn.Sequential) or len(mlp) != 2:
        return None
    attn = _swap_ultra_aattn(m.attn, backend) if type(m.attn).__name__ == "AAttn" else None
    mlp0, mlp1 = _as_fused(mlp[0], backend), _as_fused(mlp[1], backend)
    if attn is None or mlp0 is None or mlp1 is None:
        return None
    return FusedABlock(attn, mlp0, mlp1)


def _fused(conv, norm, act, backend: str) -> Optional[FusedPlainConv]:
    if not isinstance(conv, nn.Conv2d):
        return None
    bn = _as_batchnorm(norm)
    name = _act_name(act) if act is not None else "identity"
    if bn is None or name is None:
        return None
    return FusedPlainConv(FusedConvNormAct.from_modules(conv, bn, None, name, backend))


def _swap_hf_resnet_conv(m: Any, backend: str) -> Optional[FusedPlainConv]:
    return _fused(m.convolution, m.normalization, m.activation, backend)


def _swap_hf_conv_norm(m: Any, backend: str) -> Optional[FusedPlainConv]:
    return _fused(m.conv, m.norm, m.activation, backend)


class FusedResidualBlock(nn.Module):
    """ResNet block ``relu(layers(x) + shortcut(x))`` with the add fused into the last conv."""

    def __init__(self, layers: List[FusedPlainConv], shortcut: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.shortcut(x)
        h = x
        for layer in self.layers[:-1]:
            h = layer(h)
        return torch.relu_(self.layers[-1](h, r))


def _swap_hf_resnet_block(m: Any, backend: str) -> Optional[nn.Module]:
    if type(getattr(m, "activation", None)).__name__ != "ReLU":
        return None
    maybe = [_swap_hf_resnet_conv(c, backend) if type(c).__name__ == "RTDetrResNetConvLayer" else None
             for c in m.layer]
    layers = [c for c in maybe if c is not None]
    if not layers or len(layers) != len(maybe) or layers[-1].fused.act != "identity":
        return None
    shortcut = m.shortcut
    rule = _rule_for(shortcut)
    new = rule(shortcut, backend) if rule is not None else None
    if new is not None:
        shortcut = new
    else:
        _walk(shortcut, backend, OptimizeReport())
    return FusedResidualBlock(layers, shortcut)


def _swap_hf_shortcut(m: Any, backend: str) -> Optional[FusedPlainConv]:
    return _fused(m.convolution, m.normalization, None, backend)


def _swap_hf_repvgg(m: Any, backend: str) -> Optional[FusedPlainConv]:
    """conv3x3+BN + conv1x1+BN -> one 3x3 conv with bias (RepVGG reparameterisation), + act."""
    from .modules import fold_batchnorm

    c3, c1 = m.conv1, m.conv2
    bn3, bn1 = _as_batchnorm(c3.norm), _as_batchnorm(c1.norm)
    act = _act_name(m.activation)
    if bn3 is None or bn1 is None or act is None or c3.conv.kernel_size != (3, 3) or c1.conv.kernel_size != (1, 1):
        return None
    if type(c3.activation).__name__ != "Identity" or type(c1.activation).__name__ != "Identity":
        return None
    s3, b3 = fold_batchnorm(bn3, c3.conv.bias)
    s1, b1 = fold_batchnorm(bn1, c1.conv.bias)
    w = c3.conv.weight.detach().float() * s3.view(-1, 1, 1, 1)
    w = w + F.pad(c1.conv.weight.detach().float() * s1.view(-1, 1, 1, 1), [1, 1, 1, 1])
    conv = nn.Conv2d(c3.conv.in_channels, c3.conv.out_channels, 3, c3.conv.stride, 1, bias=False)
    conv = conv.to(c3.conv.weight.device, c3.conv.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(w)
    fused = FusedConvNormAct(conv.in_channels, conv.out_channels, 3, conv.stride, 1, act=act, backend=backend,
                             device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(conv.weight)
        fused.set_epilogue(0, torch.ones_like(b3), b3 + b1)
    return FusedPlainConv(fused)


class FusedCSPRepLayer(nn.Module):
    """``conv3(bottlenecks(conv1(x)) + conv2(x))`` with the add fused into ``conv2``."""

    def __init__(self, conv1: FusedPlainConv, conv2: FusedPlainConv, bottlenecks: nn.Module, conv3: nn.Module):
        super().__init__()
        self.conv1, self.conv2, self.bottlenecks, self.conv3 = conv1, conv2, bottlenecks, conv3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(x, self.bottlenecks(self.conv1(x))))


def _swap_hf_csp(m: Any, backend: str) -> Optional[nn.Module]:
    conv1, conv2 = _swap_hf_conv_norm(m.conv1, backend), _swap_hf_conv_norm(m.conv2, backend)
    maybe = [_swap_hf_repvgg(b, backend) if type(b).__name__ == "RTDetrRepVggBlock" else None for b in m.bottlenecks]
    blocks = [b for b in maybe if b is not None]
    conv3 = m.conv3 if isinstance(m.conv3, nn.Identity) else _swap_hf_conv_norm(m.conv3, backend)
    if conv1 is None or conv2 is None or conv3 is None or len(blocks) != len(maybe):
        return None
    return FusedCSPRepLayer(conv1, conv2, nn.Sequential(*blocks), conv3)


class MSDeformAttnKernel(nn.Module):
    """Drop-in for HF's ``MultiScaleDeformableAttention`` kernel module: :func:`ms_deform_attn`."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, value, value_spatial_shapes, value_spatial_shapes_list, level_start_index,
                sampling_locations, attention_weights, im2col_step=None):
        from .ops.ms_deform_attn import ms_deform_attn

        return ms_deform_attn(value, value_spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, backend=self.backend)


def _swap_hf_msda(m: Any, backend: str) -> Optional[nn.Module]:
    return MSDeformAttnKernel(backend)


#: (package prefix of the class's module, class name) -> swap rule. Parents before children:
#: a parent rule consumes its children.
SWAPS: Dict[tuple, Swap] = {
    ("ultralytics", "ABlock"): _swap_ultra_ablock,
    ("ultralytics", "AAttn"): _swap_ultra_aattn,
    ("ultralytics", "Bottleneck"): _swap_ultra_bottleneck,
    ("ultralytics", "Conv"): _swap_ultra_conv,
    ("ultralytics", "DWConv"): _swap_ultra_conv,
    ("transformers", "RTDetrResNetBasicLayer"): _swap_hf_resnet_block,
    ("transformers", "RTDetrResNetBottleNeckLayer"): _swap_hf_resnet_block,
    ("transformers", "RTDetrResNetConvLayer"): _swap_hf_resnet_conv,
    ("transformers", "RTDetrResNetShortCut"): _swap_hf_shortcut,
    ("transformers", "RTDetrCSPRepLayer"): _swap_hf_csp,
    ("transformers", "RTDetrRepVggBlock"): _swap_hf_repvgg,
    ("transformers", "RTDetrConvNormLayer"): _swap_hf_conv_norm,
    ("transformers", "MultiScaleDeformableAttention"): _swap_hf_msda,
}


#: (package, class name) -> the note a rule adds to the report when it converts the whole model
_NOTES: Dict[tuple, str] = {}


def register_swap(package: str, class_name: str, rule: Swap, note: Optional[str] = None) -> None:
    """Teach :func:`optimize` a new module type: ``rule(module, backend)`` returns the replacement
    (same call signature and outputs in eval mode; it may be ``module`` itself, converted in
    place) or ``None`` to leave it alone.

    ``package`` is the top-level package of the class's module (``type(m).__module__`` up to the
    first dot) and ``class_name`` the class's ``__name__``; nothing is imported to match them.
    Rules apply to submodules and to the model passed to :func:`optimize` itself; in the latter
    case the report counts the module types the rule added and ``note`` (if given; e.g. "its own
    inference form (to_inference())") is added to its notes. Registering the same key again replaces the
    rule."""
    if not callable(rule):
        raise TypeError(f"register_swap: rule must be callable, got {type(rule).__name__}")
    SWAPS[(package, class_name)] = rule
    if note is None:
        _NOTES.pop((package, class_name), None)
    else:
        _NOTES[(package, class_name)] = str(note)


def unregister_swap(package: str, class_name: str) -> None:
    """Forget the rule of ``(package, class_name)`` (a no-op when there is none)."""
    SWAPS.pop((package, class_name), None)
    _NOTES.pop((package, class_name), None)


#: (package, class name) -> names of submodules that stay float32 under ``dtype=torch.bfloat16``
#: (and that an int8 quantizer should leave float: :func:`float32_modules`)
_FLOAT32: Dict[tuple, Tuple[str, ...]] = {}


def register_float32_modules(package: str, class_name: str, names: Sequence[str]) -> None:
    """Keep the submodules ``names`` (dotted paths, e.g. ``"decoder"``) of models of this class in
    float32 when :func:`optimize` runs them in bfloat16: their parameters stay float32 and their
    floating inputs are cast to float32 on the way in (e.g. RT-DETR's decoder, whose deformable
    attention samples at box coordinates that bf16's 8 significant bits would round to steps of
    2^-8 of the image, 2.5 px at 640). An empty ``names`` forgets the entry."""
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"register_float32_modules: names must be a list of submodule names, got {names!r}")
    if names:
        _FLOAT32[(package, class_name)] = tuple(names)
    else:
        _FLOAT32.pop((package, class_name), None)


def float32_modules(model: nn.Module) -> Tuple[str, ...]:
    """The submodule names registered for ``model``'s class with :func:`register_float32_modules`."""
    return _FLOAT32.get(_key(model), ())


def _key(m: nn.Module) -> tuple:
    return type(m).__module__.split(".", 1)[0], type(m).__name__


def _rule_for(m: Any) -> Optional[Swap]:
    return SWAPS.get(_key(m))


_NEUTRAL = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.SiLU, nn.ReLU, nn.Upsample,
            nn.MaxPool2d, nn.Dropout)


#: plain attributes a replacement inherits from the module it replaces (Ultralytics' layer index,
#: inputs, type name and parameter count drive its forward loop)
_CARRIED_ATTRS = ("f", "i", "type", "np")


def _walk(module: Any, backend: str, report: OptimizeReport) -> None:
    def replace(child: nn.Module) -> Optional[nn.Module]:
        rule = _rule_for(child)
        new = rule(child, backend) if rule is not None else None
        if new is None:
            return None
        for attr in _CARRIED_ATTRS:  # e.g. Ultralytics' graph wiring on top-level layers
            if attr in child.__dict__:
                setattr(new, attr, child.__dict__[attr])
        key = f"{type(child).__module__.split('.', 1)[0]}.{type(child).__name__}"
        report.swapped[key] = report.swapped.get(key, 0) + 1
        return new

    def visit(child: nn.Module) -> None:
        if not isinstance(child, _NEUTRAL) and any(True for _ in child.parameters(recurse=False)):
            key = type(child).__name__
            report.left_alone[key] = report.left_alone.get(key, 0) + 1

    swap_modules(module, replace, visit)


#: Dynamo's recompile limit while an ``optimize(compile=True)`` model runs: one graph per (depth
#: configuration, input shape), so a whole ladder (up to 2^5 + 1 configurations) stays compiled.
RECOMPILE_LIMIT = 64


def _with_recompile_limit(fn: Callable, limit: int) -> Callable:
    """``fn`` called with Dynamo's recompile limit at least ``limit`` and Inductor's weight freezing
    on (both are read when a call compiles, so a patch around the call is enough; other compiled
    code keeps the process-wide settings).

    Freezing is set here rather than as ``torch.compile(options={"freezing": True})``: passed as an
    option it does not reach the decision to freeze (torch 2.14: the graph then keeps every batch
    norm as a pointwise kernel after a plain ``aten::mkldnn_convolution``, nothing folded or
    pre-packed); patched around the call, norms fold into pre-packed oneDNN convolutions."""
    import torch._dynamo
    import torch._inductor.config

    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with torch._inductor.config.patch(freezing=True):
            if getattr(torch._dynamo.config, name) >= limit:
                return fn(*args, **kwargs)
            with torch._dynamo.config.patch(**{name: limit}):
                return fn(*args, **kwargs)

    return call


def compile_frozen_(module: nn.Module) -> nn.Module:
    """``module.compile()`` in place, every call under Inductor weight freezing and Dynamo's
    recompile limit raised to :data:`RECOMPILE_LIMIT` (see :func:`_with_recompile_limit`): what
    ``optimize(compile=True)`` does, and what the benchmark applies to the peers."""
    module.compile()
    compiled_call = module._compiled_call_impl  # what Module.__call__ runs once compiled
    assert compiled_call is not None
    module._compiled_call_impl = _with_recompile_limit(compiled_call, RECOMPILE_LIMIT)
    return module


def bf16_supported(device: Any = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 matrix multiplies and convolutions natively: on the CPU
    oneDNN's check (AVX-512 BF16 / AMX, or AVX-512 with the emulation oneDNN accepts:
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``), on CUDA ``torch.cuda.is_bf16_supported()``."""
    device = torch.device(device)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return False


def _to_dtype(dtype: torch.dtype) -> Callable[[Any], Any]:
    def cast(t: Any) -> Any:
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t
    return cast


def _bf16_hooks(model: nn.Module) -> List[str]:
    """Inputs cast to bfloat16 on the way in, floating-point outputs back to float32 on the way out
    (callers keep passing and receiving float32; inside ``model.compile`` the casts are graph ops).
    The submodules of :func:`float32_modules` go back to float32, their inputs cast to float32;
    returns their names."""
    from torch.utils._pytree import tree_map

    to_bf16, to_f32 = _to_dtype(torch.bfloat16), _to_dtype(torch.float32)
    model.register_forward_pre_hook(lambda m, args, kwargs: (tree_map(to_bf16, args), tree_map(to_bf16, kwargs)),
                                    with_kwargs=True)
    model.register_forward_hook(lambda m, args, out: tree_map(to_f32, out))
    names = list(float32_modules(model))
    for name in names:
        try:
            sub = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"optimize: {type(model).__name__} registers {name!r} to stay float32, but has no such "
                             "submodule") from e
        sub.float()
        sub.register_forward_pre_hook(lambda m, args, kwargs: (tree_map(to_f32, args), tree_map(to_f32, kwargs)),
                                      with_kwargs=True)
    return names


def optimize(model: nn.Module, backend: str = "auto", verbose: bool = False, return_report: bool = False,
             compile: Optional[bool] = None, dtype: Optional[torch.dtype] = None, quantize: Optional[str] = None,
             calibration: Any = None, depths: Any = None):
    """Return ``model`` with fused modules in place (modified in place; eval mode).

    ``backend``: ``"auto"`` (the best compiled kernels for the model's device, reference
    fallback), or ``"cpp"``, ``"cuda"``, ``"triton"``, ``"reference"`` for every swapped op.
    ``compile=True``: instead of swapping modules, compile the model in place with
    ``torch.compile`` (Inductor with weight freezing: norms folded into the convolutions,
    pre-packed oneDNN weights and fused pointwise tails on the CPU). It compiles once per
    (depth configuration, input shape) on first use (tens of seconds each on a small CPU) and
    needs ``torch.no_grad()`` / ``torch.inference_mode()`` for the frozen graph; its calls run
    with Dynamo's recompile limit raised to ``RECOMPILE_LIMIT`` (64) so that a whole depth ladder
    stays compiled (the process-wide setting is left as it is). The swapped
    kernels are opaque to Inductor, so the two are alternatives: on this project's 2-core CPU
    compiling measured the faster of the two (see the README), on CUDA the swaps plus CUDA
    graphs are the path we ship.
    ``dtype=torch.bfloat16``: bfloat16 weights and activations through the compiled path
    (``compile`` defaults to True; Inductor lowers the convolutions and matrix multiplies to
    oneDNN's bf16 kernels): the model's parameters become bfloat16, float inputs are cast to
    bfloat16 on the way in and floating outputs back to float32 on the way out. Where the device
    has no native bf16 (:func:`bf16_supported`) it warns and stays float32. The swapped fused
    modules are not a bf16 path (their CPU epilogue has a scalar bf16 loop only and the CPU
    deformable-attention kernel is float32/float64), so ``compile=False`` with bf16 is an error.
    Submodules registered with :func:`register_float32_modules` (RT-DETR: its decoder) stay
    float32.
    ``quantize="int8"``: post-training static int8 quantization (PT2E, ``X86InductorQuantizer``,
    needs ``torchao``: ``pip install "anydepth[quant]"``), calibrated on ``calibration`` (an
    iterable of image batches, or of tuples / lists whose first item is the batch) separately for
    every depth in ``depths`` (default: full and base), compiled lazily by Inductor; returns the
    per-depth runner of ``model.quantize_int8`` (an any-depth model is required).
    ``verbose=True`` prints what was done and what was left alone; ``return_report=True``
    returns ``(model, OptimizeReport)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: expected an nn.Module, got {type(model).__name__}")
    if compile is not None and not isinstance(compile, bool):
        raise TypeError(f"optimize: compile must be True or False, got {compile!r}")
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"optimize: dtype must be torch.float32 or torch.bfloat16, got {dtype!r}")
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"optimize: quantize must be 'int8' or None, got {quantize!r}")
        if dtype not in (None, torch.float32) or compile is False:
            raise ValueError("optimize: quantize='int8' is its own compiled path; pass neither dtype nor compile=False")
        runner = getattr(model, "quantize_int8", None)
        if runner is None:
            raise TypeError(f"optimize: quantize='int8' needs an any-depth model (with quantize_int8), got "
                            f"{type(model).__name__}")
        if calibration is None:
            raise ValueError("optimize: quantize='int8' needs calibration= (an iterable of image batches)")
        q = runner(calibration, depths=depths)
        report = OptimizeReport(swapped={"int8 PT2E graphs (one per depth)": len(q.graphs)},
                                notes=["compiled lazily: the first call per depth compiles"])
        if verbose:
            print(report)
        return (q, report) if return_report else q
    if calibration is not None or depths is not None:
        raise ValueError("optimize: calibration= and depths= go with quantize='int8'")
    report = OptimizeReport()
    if dtype == torch.bfloat16:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        if not bf16_supported(device):
            import warnings

            warnings.warn(f"optimize: {device} has no native bfloat16 support; the model stays float32",
                          stacklevel=2)
            report.notes.append(f"bfloat16 requested, {device} has no native support: float32 kept")
        else:
            if compile is False:
                raise ValueError("optimize: dtype=torch.bfloat16 runs through the compiled path (the fused "
                                 "modules have no fast bf16 CPU kernels); leave compile at its default")
            compile = True
            model.to(torch.bfloat16)
            # batch norms keep float32 statistics and affine parameters: Inductor's freezing folds
            # them into the bf16 conv weights in float32 (folded in bf16, the bias's
            # beta - mean * scale loses digits to cancellation); eagerly they take bf16 inputs
            norms = [m.float() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            kept = _bf16_hooks(model)
            report.notes.append("bfloat16 weights and activations (inputs cast in, outputs cast to float32); "
                                f"{len(norms)} batch norms keep float32 parameters (folded into the convs)")
            if kept:
                report.notes.append(f"kept in float32 (registered for {type(model).__name__}): {', '.join(kept)}")
    compile = bool(compile)
    if model.training:
        report.notes.append("model switched to eval mode (norms are folded with their running statistics)")
    model.eval()
    if compile:
        if any(isinstance(m, FusedConvNormAct) for m in model.modules()):
            report.notes.append("the model is already in its fused form: Inductor compiles around the "
                                "opaque fused ops and gains less than from the eager form")
        compile_frozen_(model)
        report.swapped["torch.compile(inductor, freezing)"] = 1
        report.notes.append("compiled lazily: the first call per (depth, input shape) compiles")
    else:
        key, rule = _key(model), _rule_for(model)
        before = collections.Counter(type(m).__name__ for m in model.modules())
        new = rule(model, backend) if rule is not None else None
        if new is not None:  # a rule for the model itself (e.g. its own inference form)
            model = new
            after = collections.Counter(type(m).__name__ for m in model.modules())
            for k in after:
                if after[k] > before.get(k, 0):
                    report.swapped[k] = after[k] - before.get(k, 0)
            note = _NOTES.get(key) or f"converted by {getattr(rule, '__name__', 'its registered rule')}"
            report.notes.append(f"{key[1]}: {note}")
        else:
            _walk(model, backend, report)
    if verbose:
        print(report)
    return (model, report) if return_report else model
