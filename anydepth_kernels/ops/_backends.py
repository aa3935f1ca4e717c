"""The backend table of every fused op, and the one resolver that reads it.

Each op (:data:`OPS`) declares its backends in order, and for each backend the device types it
runs on, the dtypes it takes and the ordered checks that say whether it can run here; the checks
return ``None`` or a :class:`Reason` (a ``code`` a program can test and the ``message`` users read).
``auto`` is declared per device type: the candidates tried in order, then the op's fallback.

* :func:`resolve` picks the backend for a tensor: the :class:`Choice`, or for a named backend
  that cannot run a :class:`BackendUnavailable` (a ``RuntimeError``: ``"<op>: backend 'x' is not
  available: <reason>"``, the reason also on ``.reason``). ``auto`` never raises; where the op's
  table says so it warns once when it falls back to the eager reference.
* :func:`availability` answers the same question for a device and dtype without a tensor, never
  raises and never warns: the benchmarks and :func:`anydepth_kernels.extension_info` read it.

Everything here reads no tensor data; the checks read the extension state and ``TRITON_INTERPRET``
when they run (not at import), so what is loaded or set later is seen.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch

from .. import _ext
from ._checks import FLOAT_DTYPES  # the dtypes the ops accept (a backend with dtypes=None takes them all)

#: ``input_precision`` values of the Triton fp32 dots (every op that has the argument).
INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")
#: Head dims the Triton attention kernels take.
TRITON_MAX_HEAD_DIM = 128
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Why ``auto`` fell back to the reference when no candidate had a kernel for the device.
NO_KERNEL = "no compiled kernel for this device"
STALE_EXTENSION = "the loaded compiled extension predates this op; rebuild it"


def triton_interpreter_on() -> bool:
    """``TRITON_INTERPRET=1`` now: Triton backends then also take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Reason:
    """Why a backend cannot run. ``code``: ``"device"``, ``"dtype"``, ``"head_dim"``,
    ``"rank"`` (a basis rank the Triton kernel does not take),
    ``"not_compiled"`` (the C++/CUDA extension is not loaded), ``"stale_extension"`` (loaded, but
    built before this op), ``"triton_missing"`` or ``"no_device"`` (no such device visible)."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


class BackendUnavailable(RuntimeError):
    """A named backend cannot run the call; ``reason`` is the :class:`Reason`."""

    def __init__(self, op: str, backend: str, reason: Reason):
        super().__init__(f"{op}: backend {backend!r} is not available: {reason}")
        self.op, self.backend, self.reason = op, backend, reason


@dataclass(frozen=True)
class Choice:
    """The result of :func:`resolve`: ``backend`` runs the call; ``rejected`` holds the ``auto``
    candidates passed over, with why."""

    op: str
    backend: str
    requested: str
    rejected: Mapping[str, Reason] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Checks: (backend, device, dtype, ctx) -> None | Reason
# --------------------------------------------------------------------------------------------

Check = Callable[["Backend", torch.device, torch.dtype, Mapping[str, Any]], Optional[Reason]]


def _on_device(b: "Backend", device, dtype, ctx) -> Optional[Reason]:
    """The backend's declared device types (Triton: any device under the interpreter)."""
    if b.devices is None or device.type in b.devices:
        return None
    if b.interpreter and triton_interpreter_on():
        return None
    return Reason("device", b.device_message.format(device=device))


def _takes_dtype(b: "Backend", device, dtype, ctx) -> Optional[Reason]:
    if b.dtypes is None or dtype in b.dtypes:
        return None
    return Reason("dtype", b.dtype_message.format(dtype=dtype, dtype_name=str(dtype).replace("torch.", "")))


def _cpu_extension(b, device, dtype, ctx) -> Optional[Reason]:
    return None if _ext.CPU_AVAILABLE else Reason("not_compiled", str(_ext._CPU_ERROR))


def _cuda_extension(b, device, dtype, ctx) -> Optional[Reason]:
    return None if _ext.CUDA_COMPILED else Reason("not_compiled", str(_ext._CUDA_ERROR))


def _triton_installed(b, device, dtype, ctx) -> Optional[Reason]:
    from .. import triton_kernels

    return None if triton_kernels.AVAILABLE else Reason("triton_missing", str(triton_kernels.UNAVAILABLE_REASON))


def _head_dim(b, device, dtype, ctx) -> Optional[Reason]:
    """Not checked when the caller does not know the head dim (``head_dim`` absent or None)."""
    hd = ctx.get("head_dim")
    if hd is None or 1 <= hd <= TRITON_MAX_HEAD_DIM:
        return None
    return Reason("head_dim", f"head dim {hd} is not supported; the Triton kernels support head dims 1 "
                              f"to {TRITON_MAX_HEAD_DIM} (tiles 16, 32, 64, 128)")


#: Largest basis rank (filters) the Triton basis-conv kernel keeps in registers.
TRITON_MAX_BASIS_RANK = 512


def _basis_rank(b, device, dtype, ctx) -> Optional[Reason]:
    """Not checked when the caller does not know the rank (``rank`` absent or None)."""
    r = ctx.get("rank")
    if r is None or 1 <= r <= TRITON_MAX_BASIS_RANK:
        return None
    return Reason("rank", f"basis rank {r} is not supported; the Triton kernel supports 1 to "
                          f"{TRITON_MAX_BASIS_RANK} basis filters")


def _ext_registered(schema: str, device_type: str) -> bool:
    key = "CPU" if device_type == "cpu" else "CUDA"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(schema, key)
    except RuntimeError:  # the schema itself is missing: an extension built before this op
        return False


def _registered(schema: str) -> Check:
    """The loaded extension has a kernel for ``schema`` on the device (ops added after a build)."""
    def check(b, device, dtype, ctx) -> Optional[Reason]:
        return None if _ext_registered(schema, device.type) else Reason("stale_extension", STALE_EXTENSION)
    check.__name__ = f"_registered[{schema}]"
    return check


#: Placeholders in a backend's ``checks``: where its declared devices / dtypes are checked.
DEVICE: Check = _on_device
DTYPE: Check = _takes_dtype


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backend:
    """One backend of an op. ``devices``/``dtypes``: what it runs on (``None``: anything the op
    accepts); ``interpreter``: also any device under ``TRITON_INTERPRET=1``; ``checks``: run in
    order, the first :class:`Reason` wins (:data:`DEVICE` and :data:`DTYPE` mark where the declared
    devices and dtypes are checked)."""

    name: str
    devices: Optional[Tuple[str, ...]] = None
    dtypes: Optional[Tuple[torch.dtype, ...]] = None
    checks: Tuple[Check, ...] = ()
    interpreter: bool = False
    device_message: str = ""
    dtype_message: str = ""

    def why_not(self, device: torch.device, dtype: torch.dtype, ctx: Mapping[str, Any]) -> Optional[Reason]:
        for check in self.checks:
            why = check(self, device, dtype, ctx)
            if why is not None:
                return why
        return None


@dataclass(frozen=True)
class OpSpec:
    """An op's backends in order (``"auto"`` first in :attr:`names`), what ``auto`` tries per
    device type, what it falls back to, and on which device types that fallback warns."""

    name: str
    backends: Tuple[Backend, ...]
    auto: Mapping[str, Tuple[str, ...]]
    fallback: str = "reference"
    warn_fallback_on: Tuple[str, ...] = ()

    @property
    def names(self) -> Tuple[str, ...]:
        return ("auto",) + tuple(b.name for b in self.backends)

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)


def _reference() -> Backend:
    return Backend("reference")


def _cpp(*extra: Check) -> Backend:
    return Backend("cpp", devices=("cpu",), checks=(DEVICE, _cpu_extension, *extra),
                   device_message="it runs on CPU tensors, got {device}")


def _cuda(*extra: Check) -> Backend:
    return Backend("cuda", devices=("cuda",), checks=(DEVICE, _cuda_extension, *extra),
                   device_message="it runs on CUDA tensors, got {device}")


_TRITON_DEVICE = "Triton runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"


def _triton(dtype_message: str = "the Triton kernels support float32, float16 and bfloat16, not {dtype_name}",
            *extra: Check) -> Backend:
    return Backend("triton", devices=("cuda",), dtypes=TRITON_DTYPES, interpreter=True,
                   checks=(_triton_installed, DTYPE, DEVICE, *extra),
                   device_message=_TRITON_DEVICE, dtype_message=dtype_message)


def _conv_spec(name: str) -> OpSpec:
    return OpSpec(name, (_reference(), _cpp(), _cuda(), _triton()),
                  auto={"cpu": ("cpp",), "cuda": ("cuda", "triton")},
                  warn_fallback_on=("cpu", "cuda"))


def _attention_spec(name: str) -> OpSpec:
    # SDPA is the CPU fast path (nothing here beats the library's kernels there) and the fallback.
    return OpSpec(name, (_reference(), Backend("sdpa"),
                         _triton("it supports float32, float16 and bfloat16, not {dtype}", _head_dim)),
                  auto={"cuda": ("triton",)}, fallback="sdpa")


_MSDA_EXT = "anydepth::_ext_ms_deform_attn_forward"
_BASIS_EXT = "anydepth::_ext_basis_conv_norm_act"

#: Op name (the ``torch.ops.anydepth`` name) -> its backends.
OPS: Dict[str, OpSpec] = {
    "conv_norm_act": _conv_spec("anydepth.conv_norm_act"),
    "scale_bias_act": _conv_spec("anydepth.scale_bias_act"),
    "concat_conv1x1": OpSpec("anydepth.concat_conv1x1", (_reference(), _cpp(), _triton()),
                             auto={"cpu": ("cpp",), "cuda": ("triton",)}, warn_fallback_on=("cpu",)),
    "ms_deform_attn": OpSpec("anydepth.ms_deform_attn",
                             (_reference(), _cpp(_registered(_MSDA_EXT)), _cuda(_registered(_MSDA_EXT)),
                              _triton()),
                             auto={"cpu": ("cpp",), "cuda": ("cuda", "triton")},
                             warn_fallback_on=("cpu", "cuda")),
    "basis_conv_norm_act": OpSpec("anydepth.basis_conv_norm_act",
                                  (_reference(), _cpp(_registered(_BASIS_EXT)),
                                   _triton("the Triton kernels support float32, float16 and bfloat16, not "
                                           "{dtype_name}", _basis_rank)),
                                  auto={"cpu": ("cpp",), "cuda": ("triton",)}, warn_fallback_on=("cpu",)),
    "attention": _attention_spec("anydepth.attention"),
    "area_attention": _attention_spec("anydepth.area_attention"),
}


def names(op: str) -> Tuple[str, ...]:
    """The ``backend=`` values ``op`` accepts: ``"auto"``, then its backends in table order."""
    return OPS[op].names


# --------------------------------------------------------------------------------------------
# Resolver
# --------------------------------------------------------------------------------------------

def _pick_auto(spec: OpSpec, device: torch.device, dtype: torch.dtype, ctx) -> Tuple[str, Dict[str, Reason]]:
    rejected: Dict[str, Reason] = {}
    for name in spec.auto.get(device.type, ()):
        why = spec.backend(name).why_not(device, dtype, ctx)
        if why is None:
            return name, rejected
        rejected[name] = why
    return spec.fallback, rejected


def _fallback_reason(rejected: Mapping[str, Reason]) -> str:
    stale = [r for r in rejected.values() if r.code == "stale_extension"]
    return stale[0].message if stale else NO_KERNEL


def resolve(op: str, t: torch.Tensor, requested: str = "auto", *, name: Optional[str] = None,
            **ctx: Any) -> Choice:
    """The backend that runs ``op`` on tensor ``t`` (its device and dtype) for ``backend=requested``.

    ``name`` is the op name in messages (default the table's ``anydepth.<op>``); ``ctx`` holds
    op-specific facts the checks read (attention: ``head_dim``). Raises ``ValueError`` for a name
    the op does not have and :class:`BackendUnavailable` for a named backend that cannot run;
    ``auto`` always resolves (warning once per op and device type where the table says so).
    """
    spec = OPS[op]
    label = name or spec.name
    if requested not in spec.names:
        raise ValueError(f"{label}: unknown backend {requested!r}; expected one of {spec.names}")
    if requested == "auto":
        chosen, rejected = _pick_auto(spec, t.device, t.dtype, ctx)
        if chosen == spec.fallback and t.device.type in spec.warn_fallback_on:
            _ext.warn_fallback(label, t.device, _fallback_reason(rejected))
        return Choice(op, chosen, requested, rejected)
    why = spec.backend(requested).why_not(t.device, t.dtype, ctx)
    if why is not None:
        raise BackendUnavailable(label, requested, why)
    return Choice(op, requested, requested)


def _device(device: Union[str, torch.device]) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _no_device(device: torch.device) -> Optional[Reason]:
    if device.type == "cuda" and not torch.cuda.is_available():
        return Reason("no_device", "no CUDA device is visible")
    return None


def availability(op: str, device: Union[str, torch.device], dtype: torch.dtype = torch.float32,
                 **ctx: Any) -> Dict[str, Optional[Reason]]:
    """Backend -> ``None`` if :func:`resolve` would run it for a tensor of this device and dtype,
    else the :class:`Reason` it would give. Never raises, never warns. A CUDA device with none
    visible gives every backend the ``"no_device"`` reason."""
    spec, dev = OPS[op], _device(device)
    absent = _no_device(dev)
    return {b.name: absent or b.why_not(dev, dtype, ctx) for b in spec.backends}


def auto_choice(op: str, device: Union[str, torch.device], dtype: torch.dtype = torch.float32,
                **ctx: Any) -> str:
    """What ``backend="auto"`` runs for this device and dtype (no warning)."""
    return _pick_auto(OPS[op], _device(device), dtype, ctx)[0]


def describe(dtype: torch.dtype = torch.float32) -> Dict[str, Any]:
    """The table as JSON-ready data for :func:`anydepth_kernels.extension_info`: per op, each
    backend's devices and dtypes, and per device type (``cpu``, ``cuda``) what ``auto`` runs and
    each backend's availability (``None`` or the reason) for ``dtype``."""
    def dtypes(b: Backend):
        return [str(d).replace("torch.", "") for d in (b.dtypes or FLOAT_DTYPES)]

    out: Dict[str, Any] = {}
    for op, spec in OPS.items():
        per_device = {}
        for dev in ("cpu", "cuda"):
            avail = availability(op, dev, dtype)
            per_device[dev] = {
                "auto": None if _no_device(torch.device(dev)) else auto_choice(op, dev, dtype),
                "available": {k: (None if v is None else v.message) for k, v in avail.items()},
            }
        out[op] = {
            "backends": {b.name: {"devices": list(b.devices) if b.devices else "any",
                                  "interpreter": b.interpreter, "dtypes": dtypes(b)}
                         for b in spec.backends},
            "auto_order": {dev: list(c) + [spec.fallback] for dev, c in spec.auto.items()},
            **per_device,
        }
    return out
