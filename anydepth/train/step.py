"""The self-distillation training step (arXiv 2605.09407): one network, two passes, one update.

1. full depth, ground-truth loss, ``backward()``;
2. shallowest depth (``base``), distillation loss against the *detached* full-depth outputs,
   ``backward()`` (with ``distill=False``: the ground-truth loss instead — the ablation);
3. the caller clips, all-reduces (distributed) and steps the optimizer once.

Gradients of the shared (essential) parameters are the sum of both passes; the refinement
parameters only get gradients from the full pass.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..depth import DepthConfig


def detach_outputs(obj: Any) -> Any:
    """A copy of a (nested dict/list/tuple of) tensors with every tensor detached."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: detach_outputs(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(detach_outputs(v) for v in obj)
    return obj


def _check_finite(loss: torch.Tensor, what: str) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the {what} loss is {loss.item()} (not finite); lower the learning rate, "
                                 "enable gradient clipping, or check the targets for degenerate boxes")


def two_pass_step(model, criterion, images: torch.Tensor, targets: Sequence[Dict[str, torch.Tensor]],
                  full: DepthConfig, shallow: Optional[DepthConfig], distill: bool = True,
                  autocast: Optional[torch.dtype] = None, scaler=None, loss_scale: float = 1.0
                  ) -> Dict[str, float]:
    """Run both passes of one step and accumulate their gradients (no optimizer step here).

    ``model`` is the (unwrapped) any-depth model in training mode, ``criterion`` an
    ``anydepth.losses`` criterion, ``images`` float ``[B, 3, H, W]`` in [0, 1], ``targets`` the
    per-image dicts (``boxes`` xyxy input pixels, ``labels``). ``autocast``: a reduced dtype for
    mixed precision on CUDA (``None`` = full precision); ``scaler``: a ``torch.amp.GradScaler``
    for float16. ``shallow=None``: static training, the full pass only. ``loss_scale``
    multiplies both losses before ``backward()`` (the logs stay unscaled). Returns the logged loss
    terms, prefixed ``full/`` and ``base/``.
    """
    amp = (torch.autocast(images.device.type, dtype=autocast) if autocast is not None
           else contextlib.nullcontext())

    def backward(loss: torch.Tensor) -> None:
        if loss_scale != 1.0:
            loss = loss * loss_scale
        (scaler.scale(loss) if scaler is not None else loss).backward()

    with amp:
        out_full = model.forward_train(images, full, targets)
        loss_full, logs_full = criterion.gt_loss(out_full, targets)
    _check_finite(loss_full, "full-depth")
    backward(loss_full)
    if shallow is None:
        logs = {"loss": float(loss_full.detach()), "full/loss": float(loss_full.detach()), "base/loss": 0.0}
        logs.update({f"full/{k}": float(v) for k, v in logs_full.items()})
        return logs
    teacher = detach_outputs(out_full)
    del out_full

    with amp:
        out_shallow = model.forward_train(images, shallow, targets)
        if distill:
            loss_shallow, logs_shallow = criterion.distill_loss(out_shallow, teacher, targets)
        else:
            loss_shallow, logs_shallow = criterion.gt_loss(out_shallow, targets)
    _check_finite(loss_shallow, "shallow-depth")
    backward(loss_shallow)

    logs = {"loss": float(loss_full.detach()) + float(loss_shallow.detach()),
            "full/loss": float(loss_full.detach()), "base/loss": float(loss_shallow.detach())}
    logs.update({f"full/{k}": float(v) for k, v in logs_full.items()})
    logs.update({f"base/{k}": float(v) for k, v in logs_shallow.items()})
    return logs


def parameter_groups(model: torch.nn.Module, weight_decay: float,
                     lr_scales: Optional[Sequence[Tuple[str, float]]] = None) -> List[Dict[str, Any]]:
    """AdamW parameter groups: no weight decay on norms, biases and other 1-D parameters;
    ``lr_scales`` = ``[(name prefix, factor)]`` gives a learning-rate multiplier per prefix (the
    first match wins), e.g. ``[("backbone.", 0.1)]`` for RT-DETR. Each group carries
    ``lr_scale`` for the schedule."""
    lr_scales = list(lr_scales or [])
    groups: Dict[Tuple[float, bool], List[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((f for prefix, f in lr_scales if name.startswith(prefix)), 1.0)
        decay = p.ndim > 1 and not name.endswith(".bias")
        groups.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "lr_scale": scale, "weight_decay": weight_decay if decay else 0.0}
            for (scale, decay), ps in sorted(groups.items())]
