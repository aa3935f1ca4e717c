"""Self-distillation training of any-depth detectors (arXiv 2605.09407).

:class:`TrainConfig` + :class:`Trainer` (or :func:`train`) run the two-pass step of
:func:`two_pass_step` — full depth on ground truth, the shallowest depth distilled from the
detached full-depth outputs, one optimizer step — with AdamW, warm-up + cosine, EMA, clipping,
optional AMP, checkpoints with resume and data parallel under ``torchrun``.
"""
from .ema import ModelEMA
from .step import detach_outputs, parameter_groups, two_pass_step
from .trainer import TrainConfig, Trainer, load_matching_weights, lr_factor, train

__all__ = ["ModelEMA", "TrainConfig", "Trainer", "detach_outputs", "load_matching_weights",
           "lr_factor", "parameter_groups", "train", "two_pass_step"]


def __getattr__(name: str):
    if name == "FAMILY_DEFAULTS":  # deprecated alias (warns once): see anydepth.family
        from . import trainer

        return trainer.FAMILY_DEFAULTS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
