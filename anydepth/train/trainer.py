"""Self-distillation trainer: AdamW or SGD, warm-up + cosine or linear decay, gradient accumulation,
EMA, clipping, AMP, checkpoints with resume, progress bars, per-epoch CSV/JSON logs, data parallel
under ``torchrun``; static training (``shallow="none"``) and the authors' any-depth fine-tuning
recipe (``weights=...``, ``recipe="finetune"``: ``alpha_base``, ``kd_warmup_epochs``).

    from anydepth.train import TrainConfig, Trainer
    Trainer(TrainConfig(model="yolov12n-anydepth", data="synth/train", val_data="synth/val",
                        epochs=30, imgsz=320)).fit()

or ``anydepth train --model yolov12n-anydepth --data synth/train --val-data synth/val``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from .ema import ModelEMA
from .step import parameter_groups, two_pass_step

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: the model trained when neither ``TrainConfig.model`` nor ``weights`` names one
DEFAULT_MODEL = "yolov12n-anydepth"

def model_family(name: str):
    """The :class:`~anydepth.family.ModelFamily` of model ``name``, if it has a training recipe."""
    from ..family import families, family_of

    fam = family_of(name, default=None)
    if fam is None or fam.train is None:
        raise ValueError(f"no training recipe for model {name!r}; trainable families: "
                         f"{sorted(f.name for f in families() if f.train is not None)}")
    return fam


def __getattr__(name: str):
    if name == "FAMILY_DEFAULTS":  # deprecated: the recipes live on the family specs now
        from ..family import families
        from ..model import warn_deprecated

        warn_deprecated("anydepth.train.FAMILY_DEFAULTS", "anydepth.family.family_of(name).train")
        return {f.name: {"lr": f.train.lr, "weight_decay": f.train.weight_decay,
                         "clip_grad": f.train.clip_grad, "mode": f.preprocess,
                         "lr_scales": list(f.train.lr_scales)}
                for f in families() if f.train is not None}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class TrainConfig:
    """Everything a training run needs; every field has a command-line flag of the same name."""

    model: Optional[str] = None         # registered name; None = the model of `weights`, else DEFAULT_MODEL
    data: str = ""                      # training set: COCO-JSON or YOLO-txt directory (classifiers: ImageFolder)
    val_data: Optional[str] = None      # validation set (evaluated at full and base depth)
    out: str = "runs/train"
    epochs: int = 100
    batch_size: int = 16
    imgsz: int = 640
    lr: Optional[float] = None          # family default (family_of(model).train)
    weight_decay: Optional[float] = None
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.05          # cosine ends at lr * min_lr_ratio
    clip_grad: Optional[float] = None   # max gradient norm; 0 = off; None = family default
    ema: bool = True
    ema_decay: float = 0.9999
    ema_tau: Optional[float] = None     # ramp (steps); None = min(2000, total steps / 5)
    amp: str = "off"                    # "off" | "bf16" | "fp16" (CUDA only)
    distill: bool = True                # False: the ablation, both depths on ground truth only
    shallow: str = "base"               # the student: "base" (every refinement path skipped; knobs such as
                                        # RT-DETR's decoder depth stay at full, as the authors train),
                                        # "shallowest" (depth="base" literally), "none" (static: full only)
                                        # or the switches to skip, comma-separated ("backbone.p4,backbone.p5")
    alpha_base: Optional[float] = None  # shallow pass = alpha_base * GT + (1 - alpha_base) * KD
    kd_warmup_epochs: float = 0.0       # KD weight ramps 0 -> 1 (half cosine) over these epochs
    kd_style: Optional[str] = None      # "authors" (default) | "legacy": the distillation-loss variant
    recipe: Optional[str] = None        # "finetune": the family's fine-tuning recipe for fields left at default
    optimizer: str = "adamw"            # "adamw" | "sgd"
    momentum: float = 0.9               # SGD momentum (AdamW beta1 stays 0.9)
    warmup_momentum: float = 0.8        # SGD momentum at the start of the warm-up
    schedule: str = "cosine"            # "cosine" | "linear" (after the warm-up, down to lr * min_lr_ratio)
    nbs: Optional[int] = None           # nominal batch: gradients accumulate over nbs / batch_size batches
    lr_scales: Optional[Dict[str, float]] = None  # {parameter-name prefix: lr factor}; None = the family's
    mode: Optional[str] = None          # "letterbox" | "resize"; None = the family's preprocessing
    augment: bool = True
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    weights: Optional[str] = None       # initial weights: anydepth checkpoint, Ultralytics .pt, HF dir,
                                        # torchvision ResNet/MobileNetV2 .pth
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    loss: Dict[str, float] = field(default_factory=dict)   # loss weight overrides (criterion kwargs)
    eval_interval: int = 1              # validate every N epochs (and after the last); 0 = last only
    val_max_images: Optional[int] = None
    max_steps_per_epoch: Optional[int] = None
    time_limit: Optional[float] = None  # minutes; stops after the step that crosses it, checkpointed
    progress: bool = True

    def validate(self) -> None:
        if not self.data:
            raise ValueError("TrainConfig.data: give the training dataset directory")
        for name in ("epochs", "batch_size", "imgsz"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        if self.imgsz % 32:
            raise ValueError(f"TrainConfig.imgsz must be a multiple of 32, got {self.imgsz}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"TrainConfig.amp must be one of {list(AMP_DTYPES)}, got {self.amp!r}")
        if self.mode not in (None, "letterbox", "resize"):
            raise ValueError(f"TrainConfig.mode must be 'letterbox' or 'resize', got {self.mode!r}")
        for name in ("lr", "weight_decay", "clip_grad", "time_limit", "ema_tau"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v)):
                raise ValueError(f"TrainConfig.{name} must be a non-negative number, got {v!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.shallow in ("", None):
            raise ValueError("TrainConfig.shallow: give 'base', 'shallowest', 'none' or a depth")
        if self.alpha_base is not None and not (isinstance(self.alpha_base, (int, float))
                                                and 0.0 <= self.alpha_base <= 1.0):
            raise ValueError(f"TrainConfig.alpha_base must be in [0, 1], got {self.alpha_base!r}")
        if not (isinstance(self.kd_warmup_epochs, (int, float)) and self.kd_warmup_epochs >= 0):
            raise ValueError(f"TrainConfig.kd_warmup_epochs must be >= 0, got {self.kd_warmup_epochs!r}")
        if self.kd_style not in (None, "authors", "legacy"):
            raise ValueError(f"TrainConfig.kd_style must be 'authors' or 'legacy', got {self.kd_style!r}")
        if self.recipe not in (None, "finetune"):
            raise ValueError(f"TrainConfig.recipe must be 'finetune' or None, got {self.recipe!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"TrainConfig.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"TrainConfig.schedule must be 'cosine' or 'linear', got {self.schedule!r}")
        for name in ("momentum", "warmup_momentum"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {v!r}")
        if self.lr_scales is not None and (not isinstance(self.lr_scales, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in self.lr_scales.items())):
            raise ValueError(f"TrainConfig.lr_scales must map parameter-name prefixes to factors >= 0, "
                             f"got {self.lr_scales!r}")
        if self.nbs is not None and (isinstance(self.nbs, bool) or not isinstance(self.nbs, int) or self.nbs < 1):
            raise ValueError(f"TrainConfig.nbs must be a positive int, got {self.nbs!r}")
        model_family(self.model or DEFAULT_MODEL)

    def with_recipe(self) -> "TrainConfig":
        """This config with ``recipe`` applied: every field of the family's fine-tuning recipe
        (``family_of(model).train.finetune``) that is still at its default takes the recipe's value."""
        if self.recipe is None:
            return self
        if self.recipe == "finetune" and not self.weights:
            warnings.warn("recipe='finetune' without weights: the recipe fine-tunes a trained model "
                          "(give weights=...); training from the initial weights instead", stacklevel=2)
        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in dataclasses.fields(self)}
        changes = {k: v for k, v in model_family(self.model or DEFAULT_MODEL).train.finetune
                   if getattr(self, k) == defaults[k]}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}")
        return cls(**d)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float, schedule: str = "cosine") -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine (or linear) from 1 to ``min_ratio``
    at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * t
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def kd_warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """The KD weight during a KD warm-up: ``0.5 * (1 - cos(pi * epoch / warmup_epochs))`` before
    ``warmup_epochs`` (epoch counted fractionally, per step), 1 after."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * max(0.0, epoch) / warmup_epochs))


def training_student(model, shallow: str):
    """The depth of the shallow pass (see ``TrainConfig.shallow``); ``None`` for ``"none"``."""
    from ..depth import DepthConfig

    if shallow == "none":
        return None
    if shallow == "base":
        base, full = model.resolve_depth("base"), model.resolve_depth("full")
        return DepthConfig(base.skip, full.knobs)
    if shallow == "shallowest":
        return model.resolve_depth("base")
    names = [t.strip() for t in shallow.split(",") if t.strip()]
    full = model.resolve_depth("full")
    unknown = sorted(set(names) - set(full.skip))
    if unknown:
        raise ValueError(f"shallow: unknown switch(es) {unknown}; valid: 'base', 'shallowest', 'none' or a "
                         f"comma-separated list of {list(full.skip)}")
    return DepthConfig({k: k in names for k in full.skip}, full.knobs)


def load_matching_weights(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor]) -> Tuple[int, List[str]]:
    """Copy every tensor of ``state_dict`` whose name and shape match ``model``'s (e.g. all but
    the class heads when fine-tuning to another number of classes). Returns (copied, skipped)."""
    own = model.state_dict()
    copied, skipped = 0, []
    with torch.no_grad():
        for k, v in state_dict.items():
            if k in own and own[k].shape == v.shape:
                own[k].copy_(v)
                copied += 1
            else:
                skipped.append(k)
    return copied, skipped


def initial_weights(path: str) -> Tuple[str, Dict[str, Any], Dict[str, torch.Tensor]]:
    """``(model name, model options, state dict)`` of the weights to start from: an anydepth
    checkpoint (the name and options it records), or a peer's weights that a model family imports
    (:func:`anydepth.family.import_weights`: an Ultralytics YOLO12 ``.pt``, a HuggingFace RT-DETR
    directory, the authors' any-depth files, converted with :mod:`anydepth.convert`; the options
    of the model they convert to, e.g. ``split="official"``)."""
    from .. import checkpoint
    from ..family import import_weights

    if not os.path.exists(path):
        raise FileNotFoundError(f"initial weights {path!r} not found")
    if os.path.isfile(path):
        try:
            payload = checkpoint.read(path)
            return payload["model"], dict(payload.get("kwargs", {})), payload["state_dict"]
        except ValueError:
            pass
    try:
        model = import_weights(path)
    except ImportError as e:
        raise ValueError(str(e)) from e
    except ValueError as e:
        raise ValueError(f"{path!r} is not an anydepth checkpoint, and {e}") from e
    name = getattr(model, "model_name", None)
    if not isinstance(name, str):
        raise ValueError(f"{path!r}: the imported model has no registered name")
    return name, dict(getattr(model, "model_kwargs", {})), model.state_dict()


def initial_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of :func:`initial_weights`."""
    return initial_weights(path)[2]


def model_of_weights(config: "TrainConfig", name: str, options: Dict[str, Any]) -> Tuple["TrainConfig", List[str]]:
    """``config`` building the model that weights of model ``name`` with ``options`` belong to:
    ``model`` = ``name`` (``config.model`` must be ``None`` or ``name``) and ``model_kwargs`` = the
    weights' options (``num_classes`` excepted: the data set's) updated with ``config.model_kwargs``.
    Returns the new config and the options the config overrides (``"split: official -> paper"``).
    ``ValueError`` when ``config.model`` names another model."""
    if config.model is not None and config.model != name:
        shown = {k: v for k, v in options.items() if k != "num_classes"}
        raise ValueError(f"the initial weights are a {name}{f' {shown}' if shown else ''} model, but model="
                         f"{config.model!r}: leave the model unset (--model) to fine-tune the weights' own model, "
                         f"or give {name!r}")
    own = {k: v for k, v in options.items() if k != "num_classes"}
    overridden = [f"{k}: {own[k]!r} -> {v!r}" for k, v in config.model_kwargs.items() if k in own and own[k] != v]
    return dataclasses.replace(config, model=name, model_kwargs={**own, **config.model_kwargs}), overridden


def collate_batch(samples):
    from ..data import collate

    return collate(samples)


class _Dist:
    """Process-group bookkeeping for ``torchrun`` (WORLD_SIZE/RANK/LOCAL_RANK in the environment)."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if device == "cuda" and self.world > 1:
            torch.cuda.set_device(self.local_rank)
            device = f"cuda:{self.local_rank}"
        self.device = torch.device(device)
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def allreduce_mean(self, params: List[torch.nn.Parameter], bucket_bytes: int = 32 << 20) -> None:
        """Average gradients over the processes (data parallel). Parameters without a gradient on
        this rank take zeros, so that every rank reduces the same list."""
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        bucket: List[torch.Tensor] = []
        size = 0
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= bucket_bytes):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                flat.div_(self.world)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0

    def broadcast_params(self, model: torch.nn.Module) -> None:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)


class Trainer:
    """Builds data, model, criterion, optimizer, EMA from a :class:`TrainConfig` (or resumes a
    run from its ``last.pt``) and trains with the two-pass self-distillation step."""

    def __init__(self, config: Optional[TrainConfig] = None, resume: Optional[str] = None):
        from .. import checkpoint
        from ..data import open_dataset
        from ..losses import build_criterion
        from ..registry import create_model

        state = None
        self._resume_payload_weights = None
        if resume is not None:
            payload = checkpoint.read(resume)
            self._resume_payload_weights = payload["state_dict"]
            state = payload.get("extra", {}).get("train_state")
            if not isinstance(state, dict):
                raise ValueError(f"{resume!r} is an anydepth checkpoint without training state "
                                 "(resume needs the last.pt a training run writes)")
            saved = TrainConfig.from_dict(state["config"])
            if config is not None:   # allow extending a run / moving its outputs
                saved.epochs, saved.out = config.epochs, config.out
            config = saved
        if config is None:
            raise ValueError("Trainer needs a TrainConfig or resume=path")
        config.validate()
        init = None
        if config.weights and state is None:  # the model the weights belong to (their split, widths...)
            name, options, init_sd = initial_weights(config.weights)
            config, overridden = model_of_weights(config, name, options)
            init = (name, overridden, init_sd)
        elif config.model is None:
            config = dataclasses.replace(config, model=DEFAULT_MODEL)
        config = config.with_recipe()
        self.config = cfg = config
        self.family = model_family(cfg.model)  # the ModelFamily spec
        fam = self.family.train
        self.lr = fam.lr if cfg.lr is None else cfg.lr
        self.weight_decay = fam.weight_decay if cfg.weight_decay is None else cfg.weight_decay
        self.clip_grad = fam.clip_grad if cfg.clip_grad is None else cfg.clip_grad
        self.mode = self.family.preprocess if cfg.mode is None else cfg.mode

        self.dist = _Dist(cfg.device)
        self.device = self.dist.device
        if self.device.type != "cuda" and cfg.amp != "off":
            raise ValueError(f"amp={cfg.amp!r} needs a CUDA device (training on {self.device})")
        if cfg.amp != "off" and fam.amp_warning:
            warnings.warn(fam.amp_warning, stacklevel=2)
        torch.manual_seed(cfg.seed + self.dist.rank)
        random.seed(cfg.seed + self.dist.rank)

        self.task = self.family.task
        collate_fn = collate_batch
        if self.task == "classify":   # ImageFolder directories, labels as int64 [N]
            from ..data import classify as cls_data

            collate_fn = cls_data.collate
            self.train_set = cls_data.open_image_folder(cfg.data, imgsz=cfg.imgsz, augment=cfg.augment, seed=cfg.seed)
            self.val_set = (cls_data.open_image_folder(cfg.val_data, imgsz=cfg.imgsz, augment=False,
                                                       classes=self.train_set.classes) if cfg.val_data else None)
        else:
            self.train_set = open_dataset(cfg.data, imgsz=cfg.imgsz, mode=self.mode, augment=cfg.augment,
                                          seed=cfg.seed)
            self.val_set = (open_dataset(cfg.val_data, imgsz=cfg.imgsz, mode=self.mode, augment=False)
                            if cfg.val_data else None)
        if len(self.train_set) == 0:
            raise ValueError(f"the training set {cfg.data!r} has no images")
        nc = self.train_set.num_classes
        if self.val_set is not None and self.val_set.num_classes != nc:
            raise ValueError(f"training set has {nc} classes, validation set {self.val_set.num_classes}")

        self.sampler = DistributedSampler(self.train_set, num_replicas=self.dist.world, rank=self.dist.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=self.dist.world > 1)
        per_rank = max(1, cfg.batch_size // self.dist.world)
        self.loader = DataLoader(self.train_set, batch_size=per_rank, sampler=self.sampler,
                                 num_workers=cfg.workers, collate_fn=collate_fn,
                                 drop_last=len(self.train_set) // self.dist.world > per_rank,
                                 pin_memory=self.device.type == "cuda", persistent_workers=False)
        steps = len(self.loader)
        if cfg.max_steps_per_epoch:
            steps = min(steps, cfg.max_steps_per_epoch)
        self.steps_per_epoch = steps
        self.total_steps = steps * cfg.epochs
        self.warmup_steps = min(int(round(cfg.warmup_epochs * steps)), self.total_steps // 2)
        # nominal batch (Ultralytics' nbs): accumulate gradients over nbs / batch batches; with SGD
        # the loss is also multiplied by the batch size, as Ultralytics' losses are (our losses are
        # means over the batch), and the weight decay scaled by batch * accumulate / nbs, so that
        # an SGD learning rate means what it means in an Ultralytics args.yaml
        self.accumulate = max(1, int(round(cfg.nbs / cfg.batch_size))) if cfg.nbs else 1
        # (classifiers: the authors' torchvision-style script averages over the batch with SGD too)
        self.loss_scale = float(per_rank * self.dist.world) if cfg.optimizer == "sgd" and self.task == "detect" else 1.0
        if cfg.optimizer == "sgd" and cfg.nbs:
            self.weight_decay *= cfg.batch_size * self.accumulate / cfg.nbs

        self.model = create_model(cfg.model, num_classes=nc, **cfg.model_kwargs)
        if init is not None:
            name, overridden, init_sd = init
            copied, skipped = load_matching_weights(self.model, init_sd)
            del init, init_sd
            self._print(f"initial weights {cfg.weights}: {name} {cfg.model_kwargs or ''}; {copied} tensors loaded, "
                        f"{len(skipped)} skipped (name or shape differs"
                        f"{', e.g. ' + ', '.join(skipped[:3]) if skipped else ''})"
                        + (f"; options set here, not the weights': {', '.join(overridden)}" if overridden else ""))
        self.model.to(self.device).train()
        loss_kw = dict(cfg.loss)
        if cfg.alpha_base is not None:
            loss_kw.setdefault("distill_gt", float(cfg.alpha_base))
            loss_kw.setdefault("distill_kd", 1.0 - float(cfg.alpha_base))
        if cfg.kd_style is not None:
            loss_kw.setdefault("kd_style", cfg.kd_style)
        self.criterion = build_criterion(self.model, **loss_kw)
        self.full = self.model.resolve_depth("full")
        self.shallow = training_student(self.model, cfg.shallow)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        lr_scales = list(fam.lr_scales) if cfg.lr_scales is None else list(cfg.lr_scales.items())
        groups = parameter_groups(self.model, self.weight_decay, lr_scales)
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=cfg.momentum, nesterov=True)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999))
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        tau = cfg.ema_tau if cfg.ema_tau is not None else min(2000.0, max(1.0, self.total_steps / 5))
        self.ema = ModelEMA(self.model, cfg.ema_decay, tau) if cfg.ema else None

        self.epoch = 0
        self.step = 0
        self.best: Optional[float] = None
        self.history: List[Dict[str, Any]] = []
        if state is not None:
            self._load_state(state)
        elif self.dist.world > 1:
            self.dist.broadcast_params(self.model)
            if self.ema is not None:
                self.ema = ModelEMA(self.model, cfg.ema_decay, tau)
        if self.dist.main:
            os.makedirs(cfg.out, exist_ok=True)

    # -- helpers ------------------------------------------------------------------------------
    def _print(self, msg: str) -> None:
        if self.dist.main:
            print(msg, file=sys.stderr if self.config.progress else sys.stdout, flush=True)

    def _set_lr(self) -> float:
        cfg = self.config
        f = lr_factor(self.step, self.total_steps, self.warmup_steps, cfg.min_lr_ratio, cfg.schedule)
        momentum = None
        if cfg.optimizer == "sgd":
            t = min(1.0, (self.step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
            momentum = cfg.warmup_momentum + (cfg.momentum - cfg.warmup_momentum) * t
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr * f * g.get("lr_scale", 1.0)
            if momentum is not None:
                g["momentum"] = momentum
        if hasattr(self.criterion, "kd_scale"):
            self.criterion.kd_scale = kd_warmup_factor(self.step / max(1, self.steps_per_epoch),
                                                       cfg.kd_warmup_epochs)
        return self.lr * f

    def eval_model(self) -> torch.nn.Module:
        """The weights that are evaluated and shipped: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.model

    # -- checkpoints ------------------------------------------------------------------------
    def _train_state(self) -> Dict[str, Any]:
        ema = None
        if self.ema is not None:
            ema = {k: v for k, v in self.ema.state_dict().items() if k != "weights"}
        return {
            "config": self.config.to_dict(),
            "epoch": self.epoch, "step": self.step, "best": self.best, "history": self.history,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": ema,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
        }

    def _load_state(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError("the checkpoint was trained without EMA but this config enables it")
            self.ema.module.load_state_dict(self._resume_payload_weights)
            self.ema.updates = int(state["ema"]["updates"])
            self.ema.decay = float(state["ema"]["decay"])
            self.ema.tau = float(state["ema"]["tau"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best, self.history = state.get("best"), list(state.get("history", []))
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])

    def save(self, path: str) -> None:
        """An anydepth checkpoint of the shipped (EMA) weights — ``anydepth.load(path)`` rebuilds
        the model — carrying the full training state for ``resume``."""
        from .. import checkpoint

        self._sync_static_norms()
        checkpoint.save(self.eval_model(), path, extra={"train_state": self._train_state(),
                                                        "class_names": self._class_names()})

    def _class_names(self) -> List[str]:
        """The training set's class names (in label order), saved in the checkpoints for
        ``anydepth predict``."""
        ds = self.train_set
        names = getattr(ds, "class_names", None) or getattr(ds, "classes", None) or []   # detection / ImageFolder
        return [str(n) for n in names]

    def _sync_static_norms(self) -> None:
        """Static training (``shallow="none"``) never runs the shallow-path norms: ship them as
        copies of the full-depth norms (what the Ultralytics/HF importers give), so that a
        static checkpoint fine-tunes like an imported one."""
        if self.shallow is None:
            from ..nn import copy_norms_to_shallow

            copy_norms_to_shallow(self.eval_model())

    # -- loop ---------------------------------------------------------------------------------
    def validate(self) -> Dict[str, float]:
        """COCO AP (a classifier: top-1/top-5 accuracy) of the evaluated weights at full and shallow
        depth on the validation set."""
        from ..evaluation import evaluate

        if self.val_set is None:
            return {}
        depths = [self.full] if self.shallow is None else [self.full, self.shallow]
        report = evaluate(self.eval_model(), self.val_set, depths=depths,
                          imgsz=self.config.imgsz, batch_size=max(1, self.config.batch_size),
                          device=self.device, progress=False, measure_latency=False,
                          max_images=self.config.val_max_images)
        out = {}
        for tag, row in zip(("full", "base"), report.rows):
            for k in (("top1", "top5") if self.task == "classify" else ("AP", "AP50")):
                out[f"val/{tag}/{k}"] = row.metrics.get(k)
        return out

    def fit(self, until_epoch: Optional[int] = None) -> Dict[str, Any]:
        """Train to ``config.epochs`` (or only up to epoch ``until_epoch``: the run can then be
        continued by another ``fit()`` or resumed from ``last.pt``, on the same schedule).
        Writes ``final.pt`` (the evaluated weights) when the last epoch is done."""
        cfg = self.config
        start = time.time()
        stopped_early = False
        stop_at = cfg.epochs if until_epoch is None else min(cfg.epochs, until_epoch)
        try:
            while self.epoch < stop_at and not stopped_early:
                stopped_early = self._train_epoch(start)
        finally:
            if self.epoch >= cfg.epochs or stopped_early:
                self.dist.close()
        final = os.path.join(cfg.out, "final.pt")
        if self.dist.main and (self.epoch >= cfg.epochs or stopped_early):
            from .. import checkpoint

            self._sync_static_norms()
            checkpoint.save(self.eval_model(), final, extra={"config": cfg.to_dict(), "history": self.history,
                                                             "class_names": self._class_names()})
            self._print(f"training done: {self.epoch} epochs, {self.step} steps, "
                        f"{(time.time() - start) / 60:.1f} min; weights: {final}")
        return {"final": final, "last": os.path.join(cfg.out, "last.pt"), "history": self.history,
                "stopped_early": stopped_early, "epochs": self.epoch, "steps": self.step}

    def _train_epoch(self, start: float) -> bool:
        from .._optional import require

        tqdm = require("tqdm", "Trainer").tqdm

        cfg = self.config
        self.sampler.set_epoch(self.epoch)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(self.epoch)
        self.model.train()
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        n = 0
        stopped = False
        t0 = time.time()
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and self.dist.main), dynamic_ncols=True, leave=True)
        for images, targets in self.loader:
            if n >= self.steps_per_epoch:
                break
            lr = self._set_lr()
            images = images.to(self.device, non_blocking=True).float().div_(255.0)
            if self.task == "classify":
                targets = targets.to(self.device)
            else:
                targets = [{"boxes": t["boxes"].to(self.device).float(), "labels": t["labels"].to(self.device)}
                           for t in targets]
            if n % self.accumulate == 0:
                self.optimizer.zero_grad(set_to_none=True)
            logs = two_pass_step(self.model, self.criterion, images, targets, self.full, self.shallow,
                                 distill=cfg.distill, autocast=AMP_DTYPES[cfg.amp], scaler=self.scaler,
                                 loss_scale=self.loss_scale)
            if (n + 1) % self.accumulate == 0 or n + 1 >= self.steps_per_epoch:
                if self.dist.world > 1:
                    self.dist.allreduce_mean(self.params)
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                if self.clip_grad:
                    logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad))
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.model)
            self.step += 1
            n += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1  # grad_norm: only at optimizer steps
            bar.set_postfix(loss=f"{logs['loss']:.3f}", full=f"{logs['full/loss']:.3f}",
                            base=f"{logs['base/loss']:.3f}", lr=f"{lr:.2e}")
            bar.update(1)
            if cfg.time_limit is not None and (time.time() - start) / 60 >= cfg.time_limit:
                stopped = True
                break
        bar.close()
        self.epoch += 1
        row: Dict[str, Any] = {"epoch": self.epoch, "step": self.step, "lr": self._set_lr() if n else 0.0,
                               "epoch_time_s": round(time.time() - t0, 2)}
        row.update({f"train/{k}": v / max(1, counts[k]) for k, v in sums.items()})
        last_epoch = self.epoch >= cfg.epochs or stopped
        due = cfg.eval_interval > 0 and self.epoch % cfg.eval_interval == 0
        if self.dist.main and self.val_set is not None and (due or last_epoch):
            row.update(self.validate())
        self.history.append(row)
        if self.dist.main:
            self._write_logs()
            self.save(os.path.join(cfg.out, "last.pt"))
            ap = row.get("val/full/top1" if self.task == "classify" else "val/full/AP")
            if ap is not None and (self.best is None or ap > self.best):
                self.best = ap
                self.save(os.path.join(cfg.out, "best.pt"))
            msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                           if k in ("epoch", "train/full/loss", "train/base/loss", "val/full/AP", "val/base/AP",
                                    "val/full/top1", "val/base/top1")
                           and v is not None)
            self._print(msg)
        if stopped:
            self._print(f"time limit of {cfg.time_limit} min reached after step {self.step}; "
                        f"checkpoint {os.path.join(cfg.out, 'last.pt')} resumes the run")
        return stopped

    def _write_logs(self) -> None:
        out = self.config.out
        with open(os.path.join(out, "log.json"), "w") as f:
            json.dump({"config": self.config.to_dict(), "epochs": self.history}, f, indent=1)
        keys: List[str] = []
        for r in self.history:
            keys.extend(k for k in r if k not in keys)
        with open(os.path.join(out, "log.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in self.history:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})


def train(config: Optional[TrainConfig] = None, resume: Optional[str] = None, **overrides) -> Dict[str, Any]:
    """Train and return the run summary (paths of ``final.pt``/``last.pt``, per-epoch history).
    ``train(model=..., data=..., epochs=...)`` builds the config from keywords."""
    if config is None and resume is None:
        config = TrainConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides) if config is not None else TrainConfig(**overrides)
    return Trainer(config, resume=resume).fit()
