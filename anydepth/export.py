"""Export the any-depth models as deployable graphs: ONNX per depth, one multi-depth ONNX whose
depth is a graph input, and AOTInductor packages, per depth or multi-depth (``anydepth export``).

Every export starts from a copy of the model in its inference form (:meth:`to_inference`: folded
norms, fused epilogues) and traces it with :func:`torch.export.export`. Our fused ops
(``torch.ops.anydepth.*``) are then decomposed into standard operators by
:data:`DECOMPOSITIONS`: a conv with its (selected) norm folded into the weight, the activation and
the residual add; the area attention as reshapes, matmuls and a softmax. Deformable attention has
no dispatcher decomposition (its level shapes live in a tensor): the exporter reads the shapes in a
dry run and gives each deformable-attention module a traceable ``sampler`` with the shapes fixed,
either the ``grid_sample`` decomposition (``msda="decompose"``, runs in any ONNX runtime, opset
>= 16) or one custom-domain node with the signature of TensorRT's
``MultiscaleDeformableAttnPlugin_TRT`` (``msda="trt-plugin"``).

* **multi-depth ONNX** (one file, every depth): graph inputs ``images``, ``skip`` (bool ``[S]``,
  one per switch in :attr:`DepthSpace.switches` order, True = skip that refinement path) and one
  0-d int64 input per knob (RT-DETR: ``decoder_layers``). Each switchable module sits under
  ``torch.cond`` (an ONNX ``If`` whose two branches share the weights of the outer graph); each
  decoder layer past the first under ``If(decoder_layers > i)``. A runtime executes only the taken
  branches.
* **per-depth ONNX**: the multi-depth graph with the depth inputs made constants and the ``If``
  nodes folded to their taken branch (:func:`onnxscript.optimizer.optimize`), so the per-depth
  files are static graphs with the norms folded into the conv weights, from the same trace.
* **AOTInductor** (``.pt2``): one package per depth, and the multi-depth graph as one package
  (same inputs as the multi-depth ONNX; ``torch.cond`` compiled to C++ branches), loadable with
  ``torch._inductor.aoti_load_package`` alone (no anydepth code, no custom ops inside).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from anydepth_kernels import reference as _ref

from ._optional import require
from .depth import DepthConfig, DepthLike
from .model import AnyDepthModel

__all__ = ["export", "ExportResult", "ExportedFile", "FORMATS", "MSDA_MODES", "DEFAULT_OPSET",
           "TRT_PLUGIN", "TRT_DOMAIN", "onnx_depth_inputs", "aoti_depth_inputs", "exported_program", "DECOMPOSITIONS"]

FORMATS = ("onnx", "aoti")
MSDA_MODES = ("decompose", "trt-plugin")
DEFAULT_OPSET = 18
MIN_OPSET = 17  # LayerNormalization; GridSample needs 16
GRID_SAMPLE_OPSET = 16
#: the custom node of ``msda="trt-plugin"``: TensorRT's ONNX parser maps an unknown op to the
#: plugin of that name (version from the ``plugin_version`` attribute)
TRT_PLUGIN = "MultiscaleDeformableAttnPlugin_TRT"
TRT_DOMAIN = "trt"
TRT_PLUGIN_VERSION = "1"
#: constants folded into the multi-depth file up to this many elements (per-channel vectors); the
#: weights stay shared by the two branches of each ``If`` (a runtime folds the rest on load)
_MULTI_FOLD_LIMIT = 1 << 12
_FOLD_ALL = 1 << 62
#: Inductor options of the multi-depth AOTInductor package. With its layout optimisation (conv
#: outputs channels-last) a ``torch.cond`` branch, compiled for the strides of the traced
#: (contiguous) operands, reads a channels-last outer buffer as if contiguous and its output is
#: wrong (torch 2.14.1; ``tools/aoti_cond_view_repro.py`` shows it on a 3-op graph)
_MULTI_AOTI_CONFIG = {"layout_optimization": False}


# ------------------------------------------------------------------------------------------------
# decompositions of our ops into standard operators
# ------------------------------------------------------------------------------------------------
def _epilogue(y: torch.Tensor, act: str, residual: Optional[torch.Tensor]) -> torch.Tensor:
    y = _ref.apply_activation(y, act)
    return y if residual is None else y + residual


def _conv_norm_act(x, weight, scale, bias, stride, padding, dilation, groups, act, residual, backend):
    # the norm folded into the conv: one Conv node with bias, the activation, the add
    w = weight * scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))
    return _epilogue(F.conv2d(x, w, bias.to(x.dtype), stride, padding, dilation, groups), act, residual)


def _scale_bias_act(y, scale, bias, act, residual, backend):
    return _ref.scale_bias_act(y, scale, bias, act, residual)


def _concat_conv1x1(xs, weight, scale, bias, act, residual, backend):
    x = torch.cat(list(xs), 1)
    w = weight[:, : x.shape[1]] * scale.to(weight.dtype).view(-1, 1, 1, 1)
    return _epilogue(F.conv2d(x, w, bias.to(x.dtype)), act, residual)


def _attention(q, k, v, scale, backend, input_precision):
    return _ref.attention(q, k, v, scale), q.new_empty((0,), dtype=torch.float32)


def _area_attention(qkv, num_heads, area, scale, backend, input_precision):
    out, v = _ref.area_attention(qkv, num_heads, area, scale)
    return out, v, qkv.new_empty((0,), dtype=torch.float32)


def _decompositions() -> Dict[Any, Any]:
    ops = torch.ops.anydepth
    return {ops.conv_norm_act.default: _conv_norm_act, ops.scale_bias_act.default: _scale_bias_act,
            ops.concat_conv1x1.default: _concat_conv1x1, ops.attention.default: _attention,
            ops.area_attention.default: _area_attention}


#: op overload -> its decomposition into aten ops (``ExportedProgram.run_decompositions``)
DECOMPOSITIONS = _decompositions()


# ------------------------------------------------------------------------------------------------
# deformable attention with fixed level shapes
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("anydepth_export::msda_trt_plugin", mutates_args=())
def _msda_trt_plugin(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                     sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """TensorRT's ``MultiscaleDeformableAttnPlugin_TRT`` in PyTorch: value ``[N, S, M, D]``, int32
    level tables, locations ``[N, Q, M, L, P, 2]``, weights ``[N, Q, M, L, P]`` -> ``[N, Q, M, D]``.
    Only a placeholder for the trace (the ONNX node it becomes runs in TensorRT)."""
    n, _, m, d = value.shape
    out = _ref.ms_deform_attn(value, spatial_shapes.tolist(), level_start_index, sampling_locations,
                              attention_weights)
    return out.view(n, out.shape[1], m, d)


@_msda_trt_plugin.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return value.new_empty((value.shape[0], sampling_locations.shape[1], value.shape[2], value.shape[3]))


def _trt_plugin_op():
    """The onnxscript op of TensorRT's plugin node (a schema of our own: TensorRT's is in C++)."""
    from onnx.defs import OpSchema
    from onnxscript import values

    p = OpSchema.FormalParameter
    schema = OpSchema(
        TRT_PLUGIN, TRT_DOMAIN, 1, doc="TensorRT's multi-scale deformable attention plugin",
        inputs=[p("value", "T"), p("spatial_shapes", "I"), p("level_start_index", "I"),
                p("sampling_locations", "T"), p("attention_weights", "T")],
        outputs=[p("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("I", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, ""),
                    OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "")])
    return values.Op(values.Opset(TRT_DOMAIN, 1), TRT_PLUGIN, schema)


def _msda_trt_onnx(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """ONNX translation of the placeholder: one ``trt::MultiscaleDeformableAttnPlugin_TRT`` node."""
    return _trt_plugin_op()(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                            plugin_version=TRT_PLUGIN_VERSION, plugin_namespace="")


class _StaticSampler(nn.Module):
    """Deformable attention with the level shapes fixed (read in a dry run): traceable. Its
    tables are buffers, so a trace takes them as graph constants (int32, as TensorRT wants)."""

    def __init__(self, shapes: Sequence[Tuple[int, int]], mode: str):
        super().__init__()
        self.shapes = [(int(h), int(w)) for h, w in shapes]
        self.mode = mode
        starts, s = [], 0
        for h, w in self.shapes:
            starts.append(s)
            s += h * w
        self.register_buffer("spatial_shapes", torch.tensor(self.shapes, dtype=torch.int32), persistent=False)
        self.register_buffer("level_start_index", torch.tensor(starts, dtype=torch.int32), persistent=False)

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        if self.mode == "decompose":
            return _ref.ms_deform_attn(value, self.shapes, None, sampling_locations, attention_weights)
        out = torch.ops.anydepth_export.msda_trt_plugin(value, self.spatial_shapes, self.level_start_index,
                                                        sampling_locations, attention_weights)
        return out.flatten(2)


def _install_samplers(model: nn.Module, example: torch.Tensor, mode: str) -> int:
    """Give every module with a ``sampler`` slot (deformable attention) a :class:`_StaticSampler`
    with the level shapes it sees on ``example`` (argument 3 of its forward); returns how many."""
    slots = [m for m in model.modules() if hasattr(m, "sampler")]
    if not slots:
        return 0
    seen: Dict[int, List[Tuple[int, int]]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(id(mod), args[3].tolist()))
             for m in slots]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    for m in slots:
        if id(m) not in seen:
            raise RuntimeError(f"{type(m).__name__} did not run in the dry run; cannot fix its level shapes")
        m.sampler = _StaticSampler(seen[id(m)], mode)
    return len(slots)


# ------------------------------------------------------------------------------------------------
# the traced modules
# ------------------------------------------------------------------------------------------------
def _as_tuple(out) -> Tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, dict):
        return tuple(out.values())
    return tuple(out)


def _output_names(out) -> List[str]:
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, dict):
        return list(out)
    return [f"output{i}" for i in range(len(out))]


class _OneDepth(nn.Module):
    """``images -> outputs`` at one fixed depth."""

    def __init__(self, model: AnyDepthModel, config: DepthConfig):
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, images: torch.Tensor):
        return _as_tuple(self.model.forward_depth(images, self.config))


class _TensorDepth:
    """Stands in for a :class:`DepthConfig` with tensor values: ``is_skipped`` gives a 0-d bool
    tensor, ``knob`` a 0-d int64 tensor (what :class:`_Switch` and the gated decoder take)."""

    def __init__(self, switches: Sequence[str], skip: torch.Tensor, knobs: Dict[str, torch.Tensor]):
        self._index = {s: i for i, s in enumerate(switches)}
        self._skip = skip
        self._knobs = knobs

    def is_skipped(self, name: str) -> torch.Tensor:
        # a computed 0-d tensor, not the view skip[i]: AOTInductor's C++ wrapper (torch 2.14) reads
        # every cond predicate that is a view of one buffer as the same scalar (cached by buffer
        # name, offset ignored), so all switches would follow skip[0] (tools/aoti_cond_view_repro.py)
        return self._skip[self._index[name]].to(torch.int32) > 0

    def knob(self, name: str) -> torch.Tensor:
        return self._knobs[name]


class _Switch(nn.Module):
    """A switchable module whose ``skip`` may be a tensor: then ``torch.cond(skip, module(x, True),
    module(x, False))``, an ONNX ``If``. ``x`` may be a tensor or a list of tensors."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x, skip=False):
        if not isinstance(skip, torch.Tensor):
            return self.module(x, skip)
        listed = isinstance(x, (list, tuple))
        operands = tuple(x) if listed else (x,)

        def branch(flag: bool):
            def run(*args):
                out = self.module(list(args) if listed else args[0], flag)
                return tuple(out) if isinstance(out, (list, tuple)) else out
            return run

        out = torch.cond(skip, branch(True), branch(False), operands)
        if listed:
            return list(out)
        return out[0] if isinstance(out, (list, tuple)) else out


class _AllDepths(nn.Module):
    """``(images, skip[S], *knobs) -> outputs``: every depth in one graph."""

    def __init__(self, model: AnyDepthModel):
        super().__init__()
        self.model = model
        self.switches = tuple(model.depth_space.switches)
        self.knobs = tuple(model.depth_space.knob_specs)
        names = {id(m): n for n, m in model.named_modules()}
        for switch, module in model.switchable_modules.items():
            path = names[id(module)]
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, _Switch(module))

    def forward(self, images: torch.Tensor, skip: torch.Tensor, *knobs: torch.Tensor):
        depth = _TensorDepth(self.switches, skip, dict(zip(self.knobs, knobs)))
        return _as_tuple(self.model.forward_depth(images, depth))


def onnx_depth_inputs(model_or_space, depth: DepthLike) -> Dict[str, Any]:
    """The depth inputs of a multi-depth ONNX file for ``depth``: ``{"skip": bool array [S],
    knob: int64 0-d array, ...}`` (numpy), to pass with ``images`` to an ONNX runtime."""
    import numpy as np

    space = getattr(model_or_space, "depth_space", model_or_space)
    config = depth if isinstance(depth, DepthConfig) else space.resolve(depth)
    feeds = {"skip": np.array([config.is_skipped(s) for s in space.switches], dtype=np.bool_)}
    for k in space.knob_specs:
        feeds[k] = np.array(config.knob(k), dtype=np.int64)
    return feeds


def aoti_depth_inputs(model_or_space, depth: DepthLike) -> Tuple[torch.Tensor, ...]:
    """The depth inputs of a multi-depth AOTInductor package for ``depth``, to pass after the
    images: ``runner(images, *aoti_depth_inputs(model, "base"))`` (``skip`` bool ``[S]``, then one
    0-d int64 tensor per knob; the same values as :func:`onnx_depth_inputs`)."""
    space = getattr(model_or_space, "depth_space", model_or_space)
    config = depth if isinstance(depth, DepthConfig) else space.resolve(depth)
    return _depth_tensors(space, config)


def _depth_tensors(space, config: DepthConfig) -> Tuple[torch.Tensor, ...]:
    skip = torch.tensor([config.is_skipped(s) for s in space.switches], dtype=torch.bool)
    return (skip, *(torch.tensor(config.knob(k), dtype=torch.int64) for k in space.knob_specs))


# ------------------------------------------------------------------------------------------------
# tracing
# ------------------------------------------------------------------------------------------------
def _inference_copy(model: AnyDepthModel, example: torch.Tensor, msda: str) -> AnyDepthModel:
    m = copy.deepcopy(model).float().cpu().eval()
    m.to_inference()
    _install_samplers(m, example, msda)
    return m


def exported_program(model: AnyDepthModel, depth: Optional[DepthLike] = None, imgsz: Union[int, Sequence[int]] = 640,
                     batch: int = 1, dynamic_batch: bool = False, msda: str = "decompose",
                     decompose: bool = True) -> "torch.export.ExportedProgram":
    """The traced inference form: at one ``depth``, or every depth (``depth=None``: the depth
    inputs and ``torch.cond`` of the multi-depth graph). With ``decompose`` our fused ops are
    replaced by standard ops (:data:`DECOMPOSITIONS`). A dynamic batch is traced with batch >= 2
    (the tracer fixes a size-1 axis)."""
    example = _example(model, imgsz, max(batch, 2) if dynamic_batch else batch)
    m = _inference_copy(model, example, msda)
    if depth is None:
        wrapper: nn.Module = _AllDepths(m)
        args = (example, *_depth_tensors(m.depth_space, m.depth_space.full()))
    else:
        wrapper = _OneDepth(m, model.resolve_depth(depth, example.shape))
        args = (example,)
    dynamic = None
    if dynamic_batch:
        b = torch.export.Dim("batch", min=1, max=4096)
        # the signature is (images,) or (images, skip, *knobs): dynamic_shapes follows its structure
        dynamic = ({0: b},)
        if depth is None:
            dynamic += (None,) + (((None,) * (len(args) - 2),) if len(args) > 2 else ())
    with torch.no_grad():
        ep = torch.export.export(wrapper, args, dynamic_shapes=dynamic, strict=False)
    return ep.run_decompositions(DECOMPOSITIONS) if decompose else ep


def _example(model: AnyDepthModel, imgsz, batch: int) -> torch.Tensor:
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    stride = getattr(model, "stride", 32)
    for side in (h, w):
        if isinstance(side, bool) or not isinstance(side, int) or side <= 0 or side % stride:
            raise ValueError(f"imgsz must be positive multiples of {stride}, got {imgsz!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    g = torch.Generator().manual_seed(0)
    return torch.rand((batch, 3, h, w), generator=g)


# ------------------------------------------------------------------------------------------------
# ONNX
# ------------------------------------------------------------------------------------------------
def _check_opset(opset: int, has_msda: bool, msda: str) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ValueError(f"opset must be an int, got {opset!r}")
    if has_msda and msda == "decompose" and opset < GRID_SAMPLE_OPSET:
        raise ValueError(f"opset {opset} is too old: deformable attention is exported as GridSample, which needs "
                         f"opset >= {GRID_SAMPLE_OPSET} (the exporter writes opset >= {MIN_OPSET}; default "
                         f"{DEFAULT_OPSET}); or use msda='trt-plugin'")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: the exporter writes opset >= {MIN_OPSET} (LayerNormalization "
                         f"needs 17; default {DEFAULT_OPSET})")


def _onnx_model(ep, args, input_names, output_names, opset: int, msda: str):
    """ExportedProgram -> onnx_ir Model (not optimised yet)."""
    require("onnxscript", "ONNX export")
    require("onnx", "ONNX export")
    table = {torch.ops.anydepth_export.msda_trt_plugin.default: _msda_trt_onnx} if msda == "trt-plugin" else None
    program = torch.onnx.export(ep, args, dynamo=True, opset_version=opset, input_names=input_names,
                                output_names=output_names, custom_translation_table=table, optimize=False,
                                verbose=False)
    model = program.model
    import onnx_ir as ir

    for v in (*model.graph.inputs, *model.graph.outputs):  # the dynamic batch axis by name
        if v.shape is not None and len(v.shape) and not isinstance(v.shape[0], int):
            v.shape = ir.Shape(["batch", *v.shape[1:]])
    return model


def _optimize(model, limit: int):
    """Constant folding (constants up to ``limit`` elements), If folding, dead code; then drop the
    initializers left unused and the tracer's per-node provenance (stack traces: half the bytes
    of a multi-depth file otherwise)."""
    from onnxscript import optimizer

    optimizer.optimize(model, input_size_limit=limit, output_size_limit=limit)
    graph = model.graph
    used = {id(v) for node in graph.all_nodes() for v in node.inputs if v is not None}
    used |= {id(v) for v in (*graph.outputs, *graph.inputs)}
    for key, value in list(graph.initializers.items()):
        if id(value) not in used:
            del graph.initializers[key]
    for node in graph.all_nodes():
        node.metadata_props.clear()
        node.doc_string = None
    return model


def _localise_initializers(model, limit: int = _MULTI_FOLD_LIMIT) -> int:
    """Give each ``If`` branch its own copy of the constants it reads from the outer graph:
    onnxruntime turns a conv into its blocked NCHWc form (most of its CPU conv speed) only when
    the weight and the bias are initializers of the graph the conv sits in, so a branch reading
    the outer graph's bias runs its convs unblocked. An initializer used by one branch only moves
    into it (no size cost); one used by several gets a copy in each when it has at most ``limit``
    elements (biases, scales); larger shared ones stay (a branch scales them with its own norm
    set, and the runtime folds that product into the branch). Returns how many were placed."""
    import onnx_ir as ir

    outer = model.graph
    users: Dict[str, List[Any]] = {}

    def walk(graph) -> None:
        for node in graph:
            for value in node.inputs:
                if (graph is not outer and value is not None and value.name in outer.initializers
                        and outer.initializers[value.name] is value):
                    users.setdefault(value.name, [])
                    if not any(g is graph for g in users[value.name]):
                        users[value.name].append(graph)
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    walk(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for sub in attr.value:
                        walk(sub)

    walk(outer)
    outer_uses = {id(v) for node in outer for v in node.inputs if v is not None} | {id(v) for v in outer.outputs}
    placed = 0
    for name, graphs in users.items():
        value = outer.initializers[name]
        if len(graphs) == 1 and id(value) not in outer_uses:
            del outer.initializers[name]
            graphs[0].register_initializer(value)
            placed += 1
            continue
        if value.const_value is None or value.const_value.size > limit:
            continue
        for k, graph in enumerate(graphs):
            copy_ = ir.Value(name=f"{name}__{k}", shape=value.shape, type=value.type, const_value=value.const_value)
            graph.register_initializer(copy_)
            for node in graph:
                for i, v in enumerate(node.inputs):
                    if v is value:
                        node.replace_input_with(i, copy_)
            placed += 1
        if id(value) not in outer_uses:
            del outer.initializers[name]
    return placed


def _specialise(multi, space, config: DepthConfig):
    """A per-depth static graph from the multi-depth one: the depth inputs become constants and
    every ``If`` folds to its taken branch."""
    import numpy as np
    import onnx_ir as ir

    m = ir.from_proto(ir.to_proto(multi))
    feeds = onnx_depth_inputs(space, config)
    keep = []
    for value in list(m.graph.inputs):
        if value.name in feeds:
            const = ir.Value(name=f"depth_{value.name}", shape=value.shape, type=value.type,
                             const_value=ir.tensor(np.asarray(feeds[value.name]), name=f"depth_{value.name}"))
            value.replace_all_uses_with(const)
            m.graph.register_initializer(const)
        else:
            keep.append(value)
    m.graph.inputs.clear()
    m.graph.inputs.extend(keep)
    _optimize(m, _FOLD_ALL)
    left = [n.op_type for n in m.graph.all_nodes() if n.op_type == "If"]
    if left:
        raise RuntimeError(f"{len(left)} If nodes left after fixing the depth {config.code}")
    return m


def _set_metadata(model, meta: Dict[str, Any]) -> None:
    for k, v in meta.items():
        model.metadata_props[f"anydepth.{k}"] = v if isinstance(v, str) else json.dumps(v)


def _save_onnx(model, path: Path) -> None:
    import onnx_ir as ir

    ir.save(model, str(path))


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
@dataclass
class ExportedFile:
    """One written file: ``depth`` is a ladder code, or ``"multi"`` for the multi-depth file."""

    path: str
    format: str
    depth: str
    size_bytes: int
    #: depth code -> max |out - eager| / max |eager| over the outputs (when checked)
    max_rel_err: Dict[str, float] = field(default_factory=dict)


@dataclass
class ExportResult:
    model: str
    imgsz: Tuple[int, int]
    batch: int
    dynamic_batch: bool
    opset: Optional[int]
    msda: str
    input_names: List[str]
    output_names: List[str]
    switches: List[str]
    knobs: Dict[str, List[int]]
    ladder: List[str]
    files: List[ExportedFile] = field(default_factory=list)
    manifest: Optional[str] = None
    seconds: float = 0.0

    def file(self, depth: str, format: Optional[str] = None) -> ExportedFile:
        for f in self.files:
            if f.depth == depth and (format is None or f.format == format):
                return f
        raise KeyError(f"no exported file for depth {depth!r}; have {[f.depth for f in self.files]}")

    def table(self) -> str:
        rows = [f"{'file':<48} {'depth':<24} {'MB':>8} {'max rel err':>12}"]
        for f in self.files:
            err = max(f.max_rel_err.values()) if f.max_rel_err else float("nan")
            rows.append(f"{Path(f.path).name:<48} {f.depth:<24} {f.size_bytes / 2**20:8.2f} {err:12.2e}")
        return "\n".join(rows)


def _rel_err(out: Sequence, ref: Sequence) -> float:
    import numpy as np

    worst = 0.0
    for o, r in zip(out, ref):
        r = np.asarray(r, dtype=np.float64)
        o = np.asarray(o, dtype=np.float64)
        if o.shape != r.shape:
            raise AssertionError(f"output shape {o.shape} != eager {r.shape}")
        worst = max(worst, float(np.abs(o - r).max() / max(np.abs(r).max(), 1e-30)))
    return worst


def ort_session(path: Union[str, Path], threads: Optional[int] = None):
    """An onnxruntime CPU session for ``path`` (``threads``: intra-op threads, default torch's)."""
    ort = require("onnxruntime", "running the exported ONNX files")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def aoti_load(path: Union[str, Path]):
    """Load a ``.pt2`` package written by :func:`export` (torch only: no anydepth code is needed)."""
    return torch._inductor.aoti_load_package(str(path))


# ------------------------------------------------------------------------------------------------
# the entry point
# ------------------------------------------------------------------------------------------------
def _skip_aware_outside_switches(model: AnyDepthModel) -> List[str]:
    """Names of the skip-aware norms that lie outside every switchable module (their norm set
    follows a switch, but the multi-depth graph has no ``If`` around them)."""
    from .nn import SkipAwareBatchNorm2d, SkipAwareLayerNorm

    inside = {id(m) for module in model.switchable_modules.values() for m in module.modules()}
    return [n for n, m in model.named_modules()
            if isinstance(m, (SkipAwareBatchNorm2d, SkipAwareLayerNorm)) and id(m) not in inside]


def _resolve_depths(model: AnyDepthModel, depth, example_shape) -> Tuple[List[DepthConfig], bool]:
    """(per-depth configs, whether the multi-depth graph is asked for). The FLOP-ordered ladder is
    computed only when ``all`` or a float asks for it."""
    space = model.depth_space
    items = list(depth) if isinstance(depth, (list, tuple)) else [depth]
    configs: List[DepthConfig] = []
    multi = False
    for d in items:
        word = d.strip().lower() if isinstance(d, str) else None
        if word == "all":
            configs.extend(model.depth_configs(example_shape))
            multi = True
        elif word == "multi":
            multi = True
        elif word is not None and word not in space.PRESETS:
            try:
                configs.append(space.from_code(d))
            except ValueError as e:
                codes = ", ".join(c.code for c in space.default_ladder())
                raise ValueError(f"unknown depth {d!r}: give base, full, all, multi, a float in [0, 1] or a "
                                 f"ladder code ({codes}); {e}") from None
        else:
            configs.append(model.resolve_depth(d, example_shape))
    return list(dict.fromkeys(configs)), multi


def export(model: Union[AnyDepthModel, str], out: Union[str, Path], format: str = "onnx",
           depth: Union[DepthLike, Sequence[DepthLike]] = "all", imgsz: Union[int, Sequence[int]] = 640,
           batch: int = 1, dynamic_batch: bool = False, opset: int = DEFAULT_OPSET, msda: str = "decompose",
           check: bool = True, name: Optional[str] = None, progress: bool = False,
           traces: Optional[Dict[Any, Any]] = None) -> ExportResult:
    """Export ``model`` (an :class:`AnyDepthModel` or a registered name) to ``out``.

    ``format``: ``"onnx"`` or ``"aoti"`` (AOTInductor ``.pt2`` packages, CPU). ``depth``:
    ``"all"`` (every ladder configuration, plus the multi-depth file), ``"multi"`` (the
    multi-depth file alone), ``"base"``/``"full"``, a float in [0, 1], a ladder code (``"TTFFFFFF"``,
    ``"TTTTT-decoder_layers2"``), a :class:`DepthConfig`, or a list of these. Files are named
    ``{name}-{code}.onnx`` / ``.pt2`` and ``{name}-multidepth.onnx`` / ``.pt2`` (inputs ``images``,
    ``skip`` and the knobs, as :func:`onnx_depth_inputs` gives them); ``export.json`` lists them.

    ``imgsz``: an int or ``(H, W)``, multiples of the model's stride (the graphs are static in
    space); ``batch`` the traced batch size, ``dynamic_batch`` makes it a dynamic axis. ``msda``
    (RT-DETR): ``"decompose"`` (GridSample, any runtime) or ``"trt-plugin"`` (TensorRT's
    ``MultiscaleDeformableAttnPlugin_TRT`` node; such files do not run in onnxruntime, so they
    are not checked). With ``check`` every file runs (onnxruntime / AOTInductor) at each of its
    depths and is compared with the eager model: an error above 1e-4 relative raises.

    ``traces``: a dict to keep the ``torch.export`` traces in; pass the same dict to export one
    model in several formats (ONNX, then AOTInductor) without tracing it again. It holds the model
    object (a trace is reused only for the same model, shape, batch mode and ``msda``).
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid formats: {list(FORMATS)}")
    if msda not in MSDA_MODES:
        raise ValueError(f"unknown msda mode {msda!r}; valid: {list(MSDA_MODES)}")
    if isinstance(model, str):
        import anydepth

        name = name or model
        model = anydepth.create_model(model)
    if not isinstance(model, AnyDepthModel):
        raise TypeError(f"export() takes an AnyDepthModel or a model name, got {type(model).__name__}")
    name = name or getattr(model, "model_name", None) or type(model).__name__
    param = next(model.parameters(), None)
    if param is not None and (param.device.type != "cpu" or param.dtype != torch.float32):
        model = copy.deepcopy(model).cpu().float()  # exported and checked in float32 on the CPU
    model = model.eval()
    example = _example(model, imgsz, max(batch, 2) if dynamic_batch else batch)
    has_msda = any(hasattr(m, "sampler") for m in model.modules())
    if format == "onnx":
        _check_opset(opset, has_msda, msda)
    words = [d.strip().lower() for d in (depth if isinstance(depth, (list, tuple)) else [depth]) if isinstance(d, str)]
    configs, multi = _resolve_depths(model, depth, tuple(example.shape))
    outside = _skip_aware_outside_switches(model)
    official = getattr(model, "split", None) == "official"
    if multi and (official or outside):
        # norm sets switched outside the switchable modules (a split='official' model's stride-2
        # convs, MobileNetV2's stem and head), where the multi-depth graph has no If to hold them:
        # such a model is exported depth by depth
        if "multi" in words:
            what = ("a split='official' model is not supported (its skip-aware stride-2 convs lie outside the "
                    "switchable modules)" if official else
                    f"{name} is not supported (skip-aware norms outside its switchable modules: {outside[:3]}"
                    f"{' ...' if len(outside) > 3 else ''})")
            raise NotImplementedError(f"the multi-depth graph of {what}; export per-depth files: depth='all', "
                                      "'base', 'full' or ladder codes")
        multi = False
    if format == "onnx":
        _check_opset(opset, has_msda, msda)
        for mod in ("onnx", "onnxscript"):
            require(mod, "ONNX export")
        if check and msda == "decompose":
            require("onnxruntime", "checking the exported ONNX files")
    if format == "aoti" and msda != "decompose":
        raise ValueError("msda='trt-plugin' is an ONNX node for TensorRT; AOTInductor packages use the decomposition")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    space = model.depth_space
    ladder = model.depth_configs(tuple(example.shape))
    with torch.no_grad():
        probe = model(example, depth="full")
    output_names = _output_names(probe)
    result = ExportResult(
        model=name, imgsz=tuple(example.shape[2:]), batch=batch, dynamic_batch=dynamic_batch,
        opset=opset if format == "onnx" else None, msda=msda, input_names=["images"], output_names=output_names,
        switches=list(space.switches), knobs={k: [s.low, s.high] for k, s in space.knob_specs.items()},
        ladder=[c.code for c in ladder])
    refs: Dict[DepthConfig, Tuple] = {}

    def trace(config: Optional[DepthConfig]):
        if traces is None:
            return exported_program(model, config, imgsz, batch, dynamic_batch, msda)
        key = (id(model), config, tuple(example.shape[2:]), batch, dynamic_batch, msda)
        if key not in traces or traces[key][0] is not model:
            traces[key] = (model, exported_program(model, config, imgsz, batch, dynamic_batch, msda))
        return traces[key][1]

    def reference(config: DepthConfig):
        if config not in refs:
            with torch.no_grad():
                refs[config] = tuple(t.numpy() for t in _as_tuple(model.forward_depth(example, config)))
        return refs[config]

    def say(msg: str) -> None:
        if progress:
            print(f"[export {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    check_onnx = check and msda == "decompose"
    if format == "onnx":
        depth_names = ["skip", *space.knob_specs]
        meta = {"model": name, "switches": list(space.switches),
                "knobs": {k: [s.low, s.high] for k, s in space.knob_specs.items()},
                "ladder": [c.code for c in ladder], "output_names": output_names, "msda": msda,
                "imgsz": list(example.shape[2:]), "dynamic_batch": dynamic_batch}
        multi_model = None
        if multi:  # one trace of every depth; the per-depth graphs are its specialisations
            say(f"tracing {name}: every depth in one graph")
            ep = trace(None)
            say("translating to ONNX")
            args = (example, *_depth_tensors(space, space.full()))
            multi_model = _onnx_model(ep, args, ["images", *depth_names], output_names, opset, msda)
        for config in configs:
            if multi_model is not None:
                say(f"per-depth graph {config.code} (specialised)")
                single = _specialise(multi_model, space, config)
            else:
                say(f"tracing {name} at {config.code}")
                ep = trace(config)
                single = _optimize(_onnx_model(ep, (example,), ["images"], output_names, opset, msda), _FOLD_ALL)
            _set_metadata(single, {**meta, "depth": config.code})
            path = out / f"{name}-{config.code}.onnx"
            _save_onnx(single, path)
            f = ExportedFile(str(path), "onnx", config.code, path.stat().st_size)
            if check_onnx:
                sess = ort_session(path)
                f.max_rel_err[config.code] = _rel_err(sess.run(None, {"images": example.numpy()}), reference(config))
            result.files.append(f)
        if multi_model is not None:
            say("multi-depth graph")
            _optimize(multi_model, _MULTI_FOLD_LIMIT)
            _localise_initializers(multi_model)
            _set_metadata(multi_model, {**meta, "depth": "multi", "depth_inputs": depth_names})
            path = out / f"{name}-multidepth.onnx"
            _save_onnx(multi_model, path)
            f = ExportedFile(str(path), "onnx", "multi", path.stat().st_size)
            if check_onnx:
                sess = ort_session(path)
                for config in ladder:
                    feeds = {"images": example.numpy(), **onnx_depth_inputs(space, config)}
                    f.max_rel_err[config.code] = _rel_err(sess.run(None, feeds), reference(config))
            result.files.append(f)
    else:
        for config in [*configs, *([None] if multi else [])]:
            code = "multidepth" if config is None else config.code
            say(f"AOTInductor package {code}" + (" (every depth in one graph)" if config is None else ""))
            ep = trace(config)
            path = out / f"{name}-{code}.pt2"
            if path.exists():
                path.unlink()
            options = dict(_MULTI_AOTI_CONFIG) if config is None else None  # (torch adds keys to it)
            torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=options)
            f = ExportedFile(str(path), "aoti", "multi" if config is None else code, path.stat().st_size)
            if check:
                runner = aoti_load(path)
                for c in (ladder if config is None else [config]):
                    depth_args = () if config is not None else _depth_tensors(space, c)
                    with torch.no_grad():
                        got = [t.numpy() for t in _as_tuple(runner(example, *depth_args))]
                    f.max_rel_err[c.code] = _rel_err(got, reference(c))
            result.files.append(f)
    result.seconds = time.perf_counter() - t0
    if check:
        bad = {(Path(f.path).name, c): e for f in result.files for c, e in f.max_rel_err.items() if not e <= 1e-4}
        if bad:
            raise RuntimeError(f"exported files differ from the eager model by more than 1e-4 (relative): {bad}")
    manifest = out / "export.json"
    previous = json.loads(manifest.read_text()) if manifest.exists() else {}
    entry = asdict(result)
    entry["imgsz"] = list(result.imgsz)
    previous[f"{name}:{format}:{msda}"] = entry
    manifest.write_text(json.dumps(previous, indent=1))
    result.manifest = str(manifest)
    return result
