"""Exponential moving average of a model's weights (the weights that are evaluated and shipped)."""
from __future__ import annotations

import copy
import math
from typing import Any, Dict

import torch
from torch import nn


class ModelEMA:
    """``ema = decay * ema + (1 - decay) * model`` after every optimizer step.

    The decay ramps up as ``decay * (1 - exp(-updates / tau))`` so that the average follows the
    fast-changing weights of early training instead of the random initialisation. Floating-point
    buffers (BatchNorm running statistics, both norm sets of a skip-aware norm) are averaged the
    same way; integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if tau <= 0:
            raise ValueError(f"EMA tau must be positive, got {tau}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.tau = tau
        self.updates = updates

    def current_decay(self) -> float:
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        src = model.state_dict()
        for name, value in self.module.state_dict().items():
            new = src[name].detach()
            if value.is_floating_point():
                value.mul_(d).add_(new.to(value.dtype), alpha=1.0 - d)
            else:
                value.copy_(new)

    def state_dict(self) -> Dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay, "tau": self.tau,
                "weights": {k: v.detach().cpu() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
        self.tau = float(state["tau"])
        self.module.load_state_dict(state["weights"])
