"""Ahead-of-time compilation of the Triton kernels for NVIDIA GPUs, without a GPU.

:func:`compile_all_for` drives ``triton.compile`` through the full pipeline (TTIR, TTGIR, LLVM
IR, PTX, then ``ptxas``, which Triton ships, to a cubin) for one compute capability, over the
constexpr variants the launchers in :mod:`.conv_norm_act` actually use. It catches what the
interpreter cannot: non-power-of-two blocks, ``tl.dot`` shapes the MMA lowering rejects, type
errors in code paths the interpreter evaluates differently.

The variants form a covering set rather than the full product (which takes minutes):

* the axes that change the generated code structurally are fully crossed: the layout
  (``CHANNELS_LAST``) or the stride path (``UNIT_STRIDE``), every block configuration, and the
  main dtypes (fp32 with exact ``"ieee"`` dots, bf16);
* the remaining dtype/precision variants (fp16, fp32 with ``"tf32"`` and ``"tf32x3"``, 16-bit
  scale and bias) are compiled once each;
* ``(ACT, HAS_RESIDUAL)`` cycles through all six pairs across those compiles, so every pair is
  compiled for every kernel and every main dtype, and every activation with every layout or
  stride path.

``UPCAST_DOT`` is always False here: only the interpreter sets it.

The multi-scale deformable attention kernels (family ``"ms_deform_attn"``, compiled when asked
for: ``compile_all_for(arch, ["ms_deform_attn"])``) are compiled forward and backward for the
head-dim blocks 16 and 256 in fp32 and at 32 in fp16 and bf16.

The fused attention kernels (family ``"attention"``: ``compile_all_for(arch, ["attention"])``)
are compiled forward, backward dk/dv, backward dq and the backward preprocess for every head-dim
tile (16, 32, 64, 128) in fp32 with ``"ieee"`` dots, at tile 32 in fp16 and bf16 (the forward
writing the value map, as area attention does), and once in fp32 with ``"tf32"`` dots.

The concat-free output conv (family ``"concat_conv"``: ``compile_all_for(arch, ["concat_conv"])``)
is compiled for every GEMM tile in fp32 with ``"ieee"`` dots, and once each in bf16, fp16 and
fp32 with ``"tf32"`` dots; the six compiles take the six ``(ACT, HAS_RESIDUAL)`` pairs.

The fused factored conv of a shared filter basis (family ``"basis_conv"``) is compiled six times:
every padded rank (16 to 512, each with its tile) once, in fp32 with ``"ieee"`` dots (16, 128,
512), bf16 (32), fp16 with a 1x1 kernel (64) and fp32 with ``"tf32"`` dots (256).

Must run in a process where ``TRITON_INTERPRET`` is not set (the interpreter replaces the
compiled kernels); no CUDA device or driver is needed.
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..reference import ACTIVATIONS
from .conv_norm_act import (
    CONV1X1_CONFIGS,
    EPILOGUE_BLOCK_LS,
    EPILOGUE_TILE,
    _INTERPRETED,
    _conv1x1_kernel,
    _scale_bias_act_kernel,
)
from .ms_deform_attn import MSDA_BLOCK_DS, _msda_bwd_kernel, _msda_fwd_kernel, msda_config


class Variant(NamedTuple):
    """One compilation: kernel, a readable name, the argument types and the constexprs."""

    kernel: Any  # a @triton.jit function
    name: str
    types: Dict[str, str]
    constexprs: Mapping[str, object]
    num_warps: int


#: Every (ACT, HAS_RESIDUAL) pair.
_ACT_RESIDUAL = list(itertools.product(range(len(ACTIVATIONS)), (False, True)))


def _pair_act_residual(combos: list, shift: int) -> list:
    """Give ``combos[j]`` the ``(ACT, HAS_RESIDUAL)`` pair ``j + shift`` (cyclically)."""
    return [(c, _ACT_RESIDUAL[(j + shift) % len(_ACT_RESIDUAL)]) for j, c in enumerate(combos)]


def _epilogue_variants() -> List[Variant]:
    # (dtype of y / residual / out, dtype of scale and bias). The dtype is the outer loop and
    # its pairs are shifted by half a cycle, so each dtype sees all six (ACT, HAS_RESIDUAL)
    # pairs and each layout sees every activation, with and without residual.
    main = [("fp32", "fp32"), ("bf16", "fp32")]
    combos = []
    for d, dt in enumerate(main):
        structural = [(cl, block_l, dt) for cl in (False, True) for block_l in EPILOGUE_BLOCK_LS]
        combos += _pair_act_residual(structural, 3 * d)
    combos += _pair_act_residual([(False, EPILOGUE_BLOCK_LS[1], ("fp16", "fp16"))], 5)
    out = []
    for (cl, block_l, (dt, sdt)), (act, res) in combos:
        types = {
            "y_ptr": f"*{dt}", "scale_ptr": f"*{sdt}", "bias_ptr": f"*{sdt}",
            "res_ptr": f"*{dt}", "out_ptr": f"*{dt}", "R": "i32", "L": "i32", "C": "i32",
        }
        constexprs = dict(
            ACT=act, HAS_RESIDUAL=res, CHANNELS_LAST=cl,
            BLOCK_R=EPILOGUE_TILE // block_l, BLOCK_L=block_l,
        )
        name = (
            f"scale_bias_act[{dt},scale={sdt},{ACTIVATIONS[act]},residual={int(res)},"
            f"channels_last={int(cl)},block={constexprs['BLOCK_R']}x{block_l}]"
        )
        out.append(Variant(_scale_bias_act_kernel, name, types, constexprs, 4))
    return out


def _conv1x1_variants() -> List[Variant]:
    # Same scheme as the epilogue: dtype outer, pairs shifted by half a cycle per dtype.
    main = [("fp32", "ieee"), ("bf16", "ieee")]
    combos = []
    for d, dt in enumerate(main):
        structural = [(unit, cfg, dt) for unit in (True, False) for cfg in CONV1X1_CONFIGS]
        combos += _pair_act_residual(structural, 3 * d)
    extras = [
        (True, CONV1X1_CONFIGS[1], extra)
        for extra in (("fp32", "tf32"), ("fp32", "tf32x3"), ("fp16", "ieee"))
    ]
    combos += _pair_act_residual(extras, 2)
    out = []
    for (unit, cfg, (dt, prec)), (act, res) in combos:
        types = {name: "i32" for name in _conv1x1_kernel.arg_names}
        types.update({p: f"*{dt}" for p in ("x_ptr", "w_ptr", "res_ptr", "out_ptr")})
        types.update(scale_ptr="*fp32", bias_ptr="*fp32")
        constexprs = dict(
            ACT=act, HAS_RESIDUAL=res, UNIT_STRIDE=unit,
            INPUT_PRECISION=prec, UPCAST_DOT=False,
            BLOCK_CO=cfg.block_co, BLOCK_P=cfg.block_p, BLOCK_K=cfg.block_k,
        )
        name = (
            f"conv1x1[{dt},{prec},{ACTIVATIONS[act]},residual={int(res)},unit_stride={int(unit)},"
            f"block={cfg.block_co}x{cfg.block_p}x{cfg.block_k},warps={cfg.num_warps}]"
        )
        out.append(Variant(_conv1x1_kernel, name, types, constexprs, cfg.num_warps))
    return out


def _concat_conv_variants() -> List[Variant]:
    # Every tile in fp32 ("ieee"), then bf16, fp16 and fp32 "tf32" once each: six compiles that
    # take the six (ACT, HAS_RESIDUAL) pairs in turn.
    from .concat_conv import _concat_conv1x1_kernel

    structural = [(cfg, ("fp32", "ieee")) for cfg in CONV1X1_CONFIGS]
    structural += [(CONV1X1_CONFIGS[1], ("bf16", "ieee")), (CONV1X1_CONFIGS[0], ("fp16", "ieee")),
                   (CONV1X1_CONFIGS[1], ("fp32", "tf32"))]
    combos = _pair_act_residual(structural, 0)
    out = []
    for (cfg, (dt, prec)), (act, res) in combos:
        kernel = _concat_conv1x1_kernel
        types = {name: "i32" for name in kernel.arg_names}
        types.update({name: f"*{dt}" for name in kernel.arg_names if name.endswith("_ptr")})
        types.update(scale_ptr="*fp32", bias_ptr="*fp32")
        constexprs = dict(
            ACT=act, HAS_RESIDUAL=res, INPUT_PRECISION=prec, UPCAST_DOT=False,
            BLOCK_CO=cfg.block_co, BLOCK_P=cfg.block_p, BLOCK_K=cfg.block_k,
        )
        name = (
            f"concat_conv1x1[{dt},{prec},{ACTIVATIONS[act]},residual={int(res)},"
            f"block={cfg.block_co}x{cfg.block_p}x{cfg.block_k},warps={cfg.num_warps}]"
        )
        out.append(Variant(kernel, name, types, constexprs, cfg.num_warps))
    return out


def _basis_conv_variants() -> List[Variant]:
    # Six compiles: every padded rank (BLOCK_R 16 .. 512, each with its tile) once, fp32 "ieee"
    # at 16, 128 and 512 (3x3), bf16 at 32 (3x3), fp16 at 64 (1x1), fp32 "tf32" at 256 (3x3);
    # they take the six (ACT, HAS_RESIDUAL) pairs in turn.
    from .basis_conv import _basis_conv_kernel, basis_conv_config

    structural = [(basis_conv_config(16), ("fp32", "ieee"), 3), (basis_conv_config(128), ("fp32", "ieee"), 3),
                  (basis_conv_config(512), ("fp32", "ieee"), 3), (basis_conv_config(32), ("bf16", "ieee"), 3),
                  (basis_conv_config(64), ("fp16", "ieee"), 1), (basis_conv_config(256), ("fp32", "tf32"), 3)]
    out = []
    for (cfg, (dt, prec), k), (act, res) in _pair_act_residual(structural, 0):
        kernel = _basis_conv_kernel
        types = {name: "i32" for name in kernel.arg_names}
        types.update({name: f"*{dt}" for name in kernel.arg_names if name.endswith("_ptr")})
        types.update(scale_ptr="*fp32", bias_ptr="*fp32")
        constexprs = dict(
            KH=k, KW=k, ACT=act, HAS_RESIDUAL=res, INPUT_PRECISION=prec, UPCAST_DOT=False,
            BLOCK_P=cfg.block_p, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, BLOCK_CO=cfg.block_co,
        )
        name = (
            f"basis_conv[{dt},{prec},{ACTIVATIONS[act]},residual={int(res)},k={k},"
            f"block={cfg.block_p}x{cfg.block_r}x{cfg.block_k}x{cfg.block_co},warps={cfg.num_warps}]"
        )
        out.append(Variant(kernel, name, types, constexprs, cfg.num_warps))
    return out


def _ms_deform_variants() -> List[Variant]:
    # Forward and backward in fp32 at the two extreme tiles (64 x 16 and 8 x 256: the other
    # tiles differ only in these two sizes); fp16 and bf16 (loads converted to fp32, stores
    # converted back) once each at the RT-DETR head dim 32 (tile 64 x 32).
    combos = [("fp32", block_d) for block_d in MSDA_BLOCK_DS if block_d in (16, 256)]
    combos += [("fp16", 32), ("bf16", 32)]
    out = []
    for dt, block_d in combos:
        cfg = msda_config(block_d)
        assert cfg.block_d == block_d
        for kernel, direction in ((_msda_fwd_kernel, "fwd"), (_msda_bwd_kernel, "bwd")):
            types = {name: "i32" for name in ("S", "M", "D", "L", "Q", "P")}
            types.update({p: f"*{dt}" for p in ("value_ptr", "loc_ptr", "attn_ptr", "out_ptr",
                                                "grad_out_ptr", "grad_loc_ptr", "grad_attn_ptr")})
            types.update(shapes_ptr="*i64", starts_ptr="*i64", grad_value_ptr="*fp32")
            constexprs = dict(BLOCK_Q=cfg.block_q, BLOCK_D=cfg.block_d)
            name = f"ms_deform_attn_{direction}[{dt},block={cfg.block_q}x{cfg.block_d}]"
            out.append(Variant(kernel, name, types, constexprs, cfg.num_warps))
    return out


def _attention_variants() -> List[Variant]:
    # Every head-dim tile (16, 32, 64, 128) in fp32 with exact "ieee" dots, forward and the three
    # backward kernels; fp16 and bf16 at the models' head dim 32 (forward also writing the value
    # map, as area attention does); fp32 with "tf32" dots once.
    from .attention import (
        ATTN_BLOCK_DS,
        _attn_bwd_dkdv_kernel,
        _attn_bwd_dq_kernel,
        _attn_bwd_preprocess_kernel,
        _attn_fwd_kernel,
        attn_config,
    )

    combos = [("fp32", "ieee", block_d, False) for block_d in ATTN_BLOCK_DS]
    combos += [("fp16", "ieee", 32, True), ("bf16", "ieee", 32, True), ("fp32", "tf32", 32, False)]
    out = []
    for dt, prec, block_d, write_v in combos:
        cfg = attn_config(block_d)
        dots = dict(INPUT_PRECISION=prec, UPCAST_DOT=False)
        kernels = [
            (_attn_fwd_kernel, "fwd", dict(WRITE_V=write_v, **dots, BLOCK_M=cfg.fwd_m,
                                           BLOCK_N=cfg.fwd_n, BLOCK_D=block_d), cfg.num_warps),
            (_attn_bwd_dkdv_kernel, "bwd_dkdv", dict(**dots, BLOCK_N=cfg.bwd_kv_n,
                                                     BLOCK_M=cfg.bwd_kv_m, BLOCK_D=block_d),
             cfg.num_warps),
            (_attn_bwd_dq_kernel, "bwd_dq", dict(**dots, BLOCK_M=cfg.bwd_q_m, BLOCK_N=cfg.bwd_q_n,
                                                 BLOCK_D=block_d), cfg.num_warps),
        ]
        if prec == "ieee":
            kernels.append((_attn_bwd_preprocess_kernel, "bwd_preprocess",
                            dict(BLOCK_M=64, BLOCK_D=block_d), 4))
        for kernel, direction, constexprs, warps in kernels:
            types = {name: "i32" for name in kernel.arg_names}
            types.update({name: f"*{dt}" for name in kernel.arg_names if name.endswith("_ptr")})
            types.update({name: "*fp32" for name in ("lse_ptr", "delta_ptr")})
            types.update(scale="fp32", qk_scale="fp32")
            name = f"attention_{direction}[{dt},{prec},block_d={block_d},write_v={int(write_v)}]"
            out.append(Variant(kernel, name, types, constexprs, warps))
    return out


#: Kernel families by op. ``compile_all_for`` compiles ``DEFAULT_FAMILIES`` unless told
#: otherwise (the conv family alone, as before the deformable-attention kernels existed).
FAMILIES = {
    "conv_norm_act": lambda: _epilogue_variants() + _conv1x1_variants(),
    "ms_deform_attn": _ms_deform_variants,
    "attention": _attention_variants,
    "concat_conv": _concat_conv_variants,
    "basis_conv": _basis_conv_variants,
}
DEFAULT_FAMILIES = ("conv_norm_act",)


def variants(families: Optional[Sequence[str]] = None) -> List[Variant]:
    """Every variant :func:`compile_all_for` compiles (same list for every architecture)."""
    families = DEFAULT_FAMILIES if families is None else tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown kernel families {unknown}; expected some of {sorted(FAMILIES)}")
    return [v for f in families for v in FAMILIES[f]()]


def _source(v: Variant) -> ASTSource:
    fn = v.kernel
    signature = {}
    for name in fn.arg_names:
        if name in v.constexprs:
            signature[name] = "constexpr"
        elif name in v.types:
            signature[name] = v.types[name]
        else:
            raise RuntimeError(f"{v.name}: no type given for kernel argument {name!r}")
    # Pointers from the PyTorch allocator are 16-byte aligned; the JIT specialises on that, so
    # compile what a real launch compiles.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*")
    }
    return ASTSource(fn, signature=signature, constexprs=dict(v.constexprs), attrs=attrs)


def compile_all_for(arch: int, families: Optional[Sequence[str]] = None,
                    shard: Tuple[int, int] = (0, 1)) -> List[str]:
    """Compile every variant for CUDA compute capability ``arch`` (80 = sm_80, 90 = sm_90).

    ``families``: names from ``FAMILIES`` (default ``DEFAULT_FAMILIES``).
    ``shard``: ``(index, count)`` compiles only every ``count``-th variant starting at ``index``,
    so ``count`` processes can share one architecture's compiles (the default compiles them all).

    Returns the names of the variants compiled, each having produced non-empty PTX and cubin.
    Raises ``RuntimeError`` naming every variant that failed, with the compiler's message.
    """
    if _INTERPRETED:
        raise RuntimeError(
            "compile_all_for needs compiled Triton kernels: run it in a process where "
            "TRITON_INTERPRET was not set when they were imported (the interpreter replaces "
            "@triton.jit functions)"
        )
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {shard}: expected (index, count) with 0 <= index < count")
    target = GPUTarget("cuda", arch, 32)
    done: List[str] = []
    failures: List[str] = []
    for v in variants(families)[index::count]:
        try:
            compiled = triton.compile(_source(v), target=target, options={"num_warps": v.num_warps})
            missing = [key for key in ("ptx", "cubin") if not compiled.asm.get(key)]
            if missing:
                raise RuntimeError(f"produced no {' or '.join(missing)}")
        except Exception as exc:  # noqa: BLE001 - collect every failure, report them together
            message = str(exc).strip().replace("\n", "\n    ")
            failures.append(f"  {v.name}: {type(exc).__name__}: {message}")
        else:
            done.append(v.name)
    if failures:
        raise RuntimeError(
            f"Triton AOT compilation for sm_{arch} failed for {len(failures)} of "
            f"{len(failures) + len(done)} variants:\n" + "\n".join(failures)
        )
    return done
