"""Self-distillation training of any-depth detectors (FACTS.md A).

:class:`TrainConfig` + :class:`Trainer` (or :func:`train`) run the two-pass step of
:func:`two_pass_step` — full depth on ground truth, the shallowest depth distilled from the
detached full-depth outputs, one optimizer step — with AdamW, warm-up + cosine, EMA, clipping,
optional AMP, checkpoints with resume and data parallel under ``torchrun``.
"""
from .ema import ModelEMA
from .step import detach_outputs, parameter_groups, two_pass_step
from .trainer import FAMILY_DEFAULTS, TrainConfig, Trainer, load_matching_weights, lr_factor, train

__all__ = ["FAMILY_DEFAULTS", "ModelEMA", "TrainConfig", "Trainer", "detach_outputs", "load_matching_weights",
           "lr_factor", "parameter_groups", "train", "two_pass_step"]
