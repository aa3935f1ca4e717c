"""``anydepth_kernels.optimize(model)`` rules for our own models, registered through the public
:func:`anydepth_kernels.register_swap` API (the kernel package knows nothing about ``anydepth``).

``optimize`` on an any-depth model turns it into its own inference form, in place: folded norms
for every depth, fused conv epilogues, reparameterised blocks. Imported by ``anydepth/__init__``;
the classes are matched by (package, class name), so nothing here imports the model modules.
"""
from __future__ import annotations

from torch import nn

from anydepth_kernels import register_swap

#: the model classes whose inference form ``optimize`` builds (``model.to_inference()``)
_OWN_MODELS = ("AnyDepthYOLOv12", "AnyDepthRTDETR")


def to_inference(model: nn.Module, backend: str = "auto") -> nn.Module:
    """The model's inference form, in place."""
    return model.to_inference(backend=backend)


def _swap_own_model(model: nn.Module, backend: str) -> nn.Module:
    out = to_inference(model, backend)
    return out if isinstance(out, nn.Module) else model


def register() -> None:
    """Register the rules (idempotent)."""
    for cls in _OWN_MODELS:
        register_swap("anydepth", cls, _swap_own_model, note="its own inference form (to_inference())")


register()
