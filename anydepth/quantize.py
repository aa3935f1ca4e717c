"""int8 post-training static quantization per depth: ``optimize(model, quantize="int8", ...)``.

Each depth configuration is its own graph: the two norm sets of a switchable module (and the
modules a shallow depth skips) see different activation ranges, so every depth is traced,
observed and calibrated separately. Per depth:

1. the eager model (a copy; deformable attention with its level shapes fixed, as in
   :mod:`anydepth.export`) traced at that depth with :func:`torch.export.export` (the
   pre-dispatch graph: ``aten.conv2d`` followed by ``aten.batch_norm`` of the depth's norm set,
   the patterns the quantizer matches; ``prepare_pt2e`` folds each norm into its convolution);
2. PT2E (``torchao.quantization.pt2e``): ``prepare_pt2e`` with ``X86InductorQuantizer``'s default
   static config (int8 activations per tensor, int8 weights per output channel), the calibration
   batches run through the observers, ``convert_pt2e``;
3. ``torch.compile`` (Inductor with freezing), which lowers quantize / dequantize around the
   convolutions and linears to oneDNN's int8 kernels (VNNI where the CPU has it). Compiled on
   first call.

The result, :class:`PerDepthInt8`, runs each calibrated depth at the calibrated input shape and
refuses any other depth or shape with an error that says what was calibrated.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ._optional import require
from .depth import DepthConfig, DepthLike

__all__ = ["PerDepthInt8", "quantize_int8"]


def _batches(calibration: Iterable[Any], max_batches: Optional[int]) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []
    for item in calibration:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            what = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError("calibration must yield float image batches [B, 3, H, W] (or tuples/lists whose first "
                            f"item is one), got {what}")
        if out and x.shape != out[0].shape:
            raise ValueError(f"calibration batches must share one shape (the quantized graphs are static), got "
                             f"{tuple(out[0].shape)} and {tuple(x.shape)}")
        out.append(x.detach().float().cpu())
        if max_batches is not None and len(out) >= max_batches:
            break
    if not out:
        raise ValueError("calibration yielded no batches")
    return out


def _quantizer(x86: Any) -> Any:
    """``X86InductorQuantizer`` without its conv + add (residual) patterns: Inductor lowers those
    to an in-place int8 conv that writes into the residual, and refuses (an assertion in its
    quantization pass, torch 2.14) when the residual is a view, as the chunks of a C2f/R-ELAN block
    are. The residual adds stay float32 adds of dequantized tensors; every conv is still int8."""

    class Quantizer(x86.X86InductorQuantizer):
        def _annotate_conv2d_binary_unary(self, *args: Any, **kwargs: Any) -> None:
            return None

        def _annotate_conv2d_binary(self, *args: Any, **kwargs: Any) -> None:
            return None

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            super().annotate(model)
            _drop_non_float_annotations(model)
            return model

    return Quantizer()


def _is_float(node: Any) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return not isinstance(val, torch.Tensor) or val.is_floating_point()


def _drop_non_float_annotations(model: torch.fx.GraphModule) -> int:
    """Unannotate every op the quantizer annotated (a ``mul``, an ``add``) whose inputs are not
    all floating point: RT-DETR's anchor mask multiplies two boolean masks, and an observer on a
    boolean tensor fails (its histogram). Those ops stay as they are. Returns how many."""
    dropped = 0
    for node in model.graph.nodes:
        ann = node.meta.get("quantization_annotation")
        if ann is None or not ann.input_qspec_map:
            continue
        if all(_is_float(n) for n in ann.input_qspec_map) and _is_float(node):
            continue
        ann.input_qspec_map = {}
        ann.output_qspec = None
        dropped += 1
    return dropped


def _constant(gm: torch.fx.GraphModule, node: Any, seen: Dict[Any, Any]) -> Any:
    """The value of ``node`` if it depends on attributes (weights) only, else ``None``."""
    if not isinstance(node, torch.fx.Node):
        return node
    if node in seen:
        return seen[node]
    value: Any = None
    if node.op == "get_attr":
        value = operator.attrgetter(str(node.target))(gm)
    elif node.op == "call_function":
        args = [_constant(gm, a, seen) for a in node.args]
        if all(v is not None or a is None for v, a in zip(args, node.args)):
            kwargs = {k: _constant(gm, v, seen) for k, v in node.kwargs.items()}
            value = node.target(*args, **kwargs)
    seen[node] = value
    return value


def _fold_computed_weights(gm: torch.fx.GraphModule) -> int:
    """Give every convolution whose weight is computed from weights alone (a shallow path reading
    a slice of the full conv's weight) that weight as a constant attribute: the quantizer (and
    its norm folding) needs a conv weight it can read. Returns how many were folded."""
    seen: Dict[Any, Any] = {}
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.conv2d.default:
            continue
        w = node.args[1]
        if not isinstance(w, torch.fx.Node) or w.op == "get_attr":
            continue
        value = _constant(gm, w, seen)
        if not isinstance(value, torch.Tensor):
            continue
        name = f"_anydepth_folded_weight_{folded}"
        while hasattr(gm, name):
            name += "_"
        # a parameter, as the weights it stands for (the norm folding reassigns it as one)
        gm.register_parameter(name, nn.Parameter(value.detach().clone().contiguous(), requires_grad=False))
        with gm.graph.inserting_before(node):
            node.replace_input_with(w, gm.graph.get_attr(name))
        folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return folded


def _compiled(graph: torch.fx.GraphModule) -> Any:
    """``torch.compile`` with weight freezing, set globally while the call compiles (Inductor
    constant-folds the int8 weight prepacking only under the global setting; passed as a
    ``torch.compile`` option the prepack op reaches fake-tensor propagation and fails)."""
    compiled = torch.compile(graph)

    def call(x: torch.Tensor) -> Any:
        with torch._inductor.config.patch(freezing=True):
            return compiled(x)

    return call


class PerDepthInt8(nn.Module):
    """int8 graphs of an any-depth model, one per calibrated depth configuration.

    ``forward(x, depth=None)`` runs the graph of ``depth`` (resolved as the model resolves it:
    ``None`` = full, a :class:`DepthConfig`, a ladder fraction, ...) on ``x`` of the calibrated
    shape; outputs are float32 with the model's own structure. ``graphs`` maps each calibrated
    :class:`DepthConfig` to its (lazily compiled) graph, ``max_abs_diff`` to the largest absolute
    output difference from the float32 model on the first calibration batch (measured before
    compilation, on the quantized reference graph)."""

    def __init__(self, model: nn.Module, input_shape: Tuple[int, ...]):
        super().__init__()
        self.__dict__["_model"] = model  # the float32 model: not a submodule (its weights are not the int8 ones)
        self.input_shape = tuple(input_shape)
        self.graphs: Dict[DepthConfig, Any] = {}
        self.max_abs_diff: Dict[DepthConfig, float] = {}
        self._specs: Dict[DepthConfig, TreeSpec] = {}
        #: submodules left in float32 (registered for the model's family, e.g. RT-DETR's decoder)
        self.float32_modules: Tuple[str, ...] = ()

    def resolve_depth(self, depth: DepthLike, input_shape: Optional[Sequence[int]] = None) -> DepthConfig:
        return self._model.resolve_depth(depth, input_shape)

    @property
    def depths(self) -> List[DepthConfig]:
        return list(self.graphs)

    def forward(self, x: torch.Tensor, depth: DepthLike = None):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != self.input_shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"the int8 graphs were calibrated for inputs of shape {self.input_shape}, got {got}; "
                             "quantize again with calibration batches of this shape")
        config = self.resolve_depth(depth, x.shape)
        graph = self.graphs.get(config)
        if graph is None:
            have = ", ".join(c.code for c in self.graphs)
            raise KeyError(f"depth {config.code} was not calibrated (calibrated: {have}); pass it in "
                           "optimize(model, quantize='int8', calibration=..., depths=[...])")
        with torch.no_grad():  # frozen weights: an inference graph
            out = graph(x.float())
        return tree_unflatten(list(out), self._specs[config])


def quantize_int8(model: nn.Module, calibration: Iterable[Any], depths: Optional[Sequence[DepthLike]] = None,
                  max_batches: Optional[int] = None, compile: bool = True) -> PerDepthInt8:
    """Quantize ``model`` (an any-depth model; left unchanged) to int8 per depth: see the module
    docstring. ``calibration``: image batches (float, [0, 1], one shape), or tuples / lists whose
    first item is the batch (a data loader); ``max_batches`` caps how many are read. ``depths``:
    the configurations to calibrate (default full and base of the ladder at the batches' shape).
    ``compile=False`` keeps the quantized reference graphs (quantize / dequantize ops around float
    convolutions: the int8 numerics, not its speed)."""
    import copy

    from .export import _install_samplers, _OneDepth

    pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "int8 quantization (PT2E)")
    x86 = require("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", "int8 quantization (PT2E)")
    batches = _batches(calibration, max_batches)
    shape = tuple(batches[0].shape)
    if depths is None:
        ladder = model.depth_configs(shape)
        configs = [ladder[-1], ladder[0]]
    else:
        if isinstance(depths, (str, DepthConfig)) or not isinstance(depths, Sequence) or not depths:
            raise TypeError(f"depths must be a non-empty list of depths, got {depths!r}")
        configs = [model.resolve_depth(d, shape) for d in depths]
    from anydepth_kernels import float32_modules

    kept = float32_modules(model)
    was_training = model.training
    model.eval()
    result = PerDepthInt8(model, shape)
    result.float32_modules = kept
    traced = copy.deepcopy(model).float().cpu().eval()
    _install_samplers(traced, batches[0], "decompose")
    try:
        for config in dict.fromkeys(configs):
            with torch.no_grad():
                ref = model(batches[0].to(next(model.parameters()).device), depth=config)
            leaves, spec = tree_flatten(ref)
            with torch.no_grad():
                ep = torch.export.export(_OneDepth(traced, config), (batches[0],), strict=False)
            quantizer = _quantizer(x86)
            quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
            for name in kept:  # _OneDepth holds the model as .model
                quantizer.set_module_name_qconfig(f"model.{name}", None)
            graph = copy.deepcopy(ep.module())  # norm folding rewrites weights: not the traced copy's
            _fold_computed_weights(graph)
            prepared = pt2e.prepare_pt2e(graph, quantizer)
            with torch.no_grad():
                for b in batches:
                    prepared(b)
            converted = pt2e.convert_pt2e(prepared)
            with torch.no_grad():
                out = list(converted(batches[0]))
            if len(out) != len(leaves):
                raise RuntimeError(f"the traced graph returns {len(out)} outputs, the model {len(leaves)}")
            result.max_abs_diff[config] = max(float((o.float() - r.float().cpu()).abs().max())
                                              for o, r in zip(out, leaves))
            result._specs[config] = spec
            result.graphs[config] = _compiled(converted) if compile else converted
    finally:
        model.train(was_training)
    return result
