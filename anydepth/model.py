"""Base class of the any-depth model families."""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from anydepth_kernels.flops import flop_mapping

from .depth import DepthConfig, DepthLike, DepthSpace

Shape = Tuple[int, ...]

_WARNED = set()  # deprecated names already warned about (each warns once per process)


def warn_deprecated(old: str, new: str) -> None:
    """One ``DeprecationWarning`` per old name per process: ``old`` is deprecated, use ``new``."""
    if old in _WARNED:
        return
    _WARNED.add(old)
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}",
                  DeprecationWarning, stacklevel=3)


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` (non-empty) holds no NaN or infinity: its minimum and maximum (one reduction,
    NaN propagates) are finite. ``torch.isfinite(x).all()`` without the boolean tensor: ~10x
    faster on a 640x640 image here."""
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


class AnyDepthModel(nn.Module):
    """A model whose depth is chosen per call: ``model(x, depth=...)``.

    Subclasses set ``depth_space`` and implement ``forward_depth(x, depth: DepthConfig)``.
    ``depth`` may be ``None`` (full), ``"full"``/``"base"``, a float in [0, 1] (a position on the
    FLOP-ordered ladder of :meth:`depth_configs`), a :class:`DepthConfig` or a dict of switch/knob
    values. Nothing about depth is stored on the module between calls, so one instance can serve
    several depths from several threads at once.
    """

    depth_space: DepthSpace
    default_input_shape: Shape = (1, 3, 640, 640)

    def __init__(self):
        super().__init__()
        self._flops_cache: Dict[Tuple[DepthConfig, Shape, torch.dtype], int] = {}

    stride: int = 32  # input height and width must be multiples of this

    def check_input(self, x: torch.Tensor) -> None:
        """Clear errors for inputs the network cannot take: not ``[B, 3, H, W]`` floating point,
        empty, sides not multiples of :attr:`stride`, NaN or infinite values."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a tensor [B, 3, H, W], got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected input [B, 3, H, W] (3 RGB channels), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input in [0, 1], got {x.dtype} "
                            "(predict() takes uint8 images)")
        h, w = x.shape[2:]
        if x.shape[0] == 0 or h == 0 or w == 0 or h % self.stride or w % self.stride:
            raise ValueError(f"input height and width must be positive multiples of {self.stride}, got "
                             f"{h}x{w} (batch {x.shape[0]}); predict() takes images of any size")
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()  # no host sync in a CUDA graph
        if not torch.compiler.is_compiling() and not capturing and not all_finite(x):
            raise ValueError("input contains NaN or infinite values")

    def forward_depth(self, x: torch.Tensor, depth: DepthConfig):
        raise NotImplementedError

    @property
    def switchable_modules(self) -> Dict[str, nn.Module]:
        """Switch name -> the module that ``forward_depth`` calls as ``module(x, skip)`` with that
        switch's value (the export puts each one under an ``If``: :mod:`anydepth.export`)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its switchable modules")

    # -- inference form -------------------------------------------------------------------------
    @property
    def is_inference(self) -> bool:
        """True once :meth:`to_inference` has turned this model into its inference form."""
        return bool(self.__dict__.get("_is_inference", False))

    @torch.no_grad()
    def to_inference(self, backend: str = "auto", **options) -> "AnyDepthModel":
        """The family's inference form, in place (folded norms, fused conv epilogues, ...): outputs
        equal the eager model's at every depth; the model is in eval mode and can no longer train.
        ``backend`` picks the fused ops' backend (see :class:`~anydepth_kernels.FusedConvNormAct`);
        ``options`` are family-specific (YOLOv12: ``concat_free``). Idempotent; returns ``self``."""
        if self.is_inference:
            return self
        self.eval()
        self._to_inference(backend, **options)
        self.__dict__["_is_inference"] = True
        self._flops_cache.clear()
        return self

    def _to_inference(self, backend: str, **options) -> None:
        """Family hook of :meth:`to_inference`: rewrite the modules in place (the model is in eval
        mode already). The default has nothing to fold."""
        if options:
            raise TypeError(f"{type(self).__name__}.to_inference() takes no options {sorted(options)}")

    def quantize_int8(self, calibration, depths=None, max_batches: Optional[int] = None, compile: bool = True):
        """int8 graphs of this model, calibrated per depth on ``calibration`` (image batches):
        :func:`anydepth.quantize.quantize_int8` (what ``optimize(model, quantize="int8")`` calls).
        The model itself is left unchanged."""
        from .quantize import quantize_int8

        return quantize_int8(self, calibration, depths=depths, max_batches=max_batches, compile=compile)

    def train(self, mode: bool = True):
        if mode and self.is_inference:
            raise RuntimeError("this model was fused for inference (model.to_inference()); rebuild it "
                               "from its checkpoint to train")
        return super().train(mode)

    def forward(self, x: torch.Tensor, depth: DepthLike = None):
        return self.forward_depth(x, self.resolve_depth(depth, x.shape))

    def resolve_depth(self, depth: DepthLike, input_shape: Optional[Sequence[int]] = None) -> DepthConfig:
        if isinstance(depth, (int, float)) and not isinstance(depth, bool):
            ladder = self.depth_configs(tuple(input_shape) if input_shape is not None else None)
            return self.depth_space.resolve(depth, ladder=ladder)
        return self.depth_space.resolve(depth)

    def flops(self, depth: DepthLike = None, input_shape: Optional[Sequence[int]] = None,
              dtype: Optional[torch.dtype] = None) -> int:
        """FLOPs of one forward pass at ``depth`` (counted with torch.utils.flop_counter; a
        multiply-add counts as 2). ``dtype`` defaults to the model's parameter dtype."""
        config = self.depth_space.resolve(depth)
        shape = tuple(input_shape or self.default_input_shape)
        param = next(self.parameters(), None)
        if dtype is None:
            dtype = param.dtype if param is not None else torch.float32
        key = (config, shape, dtype)
        if key not in self._flops_cache:
            device = param.device if param is not None else torch.device("cpu")
            x = torch.zeros(shape, dtype=dtype, device=device)
            # our fused ops and the CPU flash-attention kernel are opaque to flop_counter: count
            # them with their formulas, so eager, fused and optimized models agree
            counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
            with torch.no_grad(), counter:
                self.forward_depth(x, config)
            self._flops_cache[key] = counter.get_total_flops()
        return self._flops_cache[key]

    def params_used(self, depth: DepthLike = None, input_shape: Optional[Sequence[int]] = None) -> int:
        """Parameters that one forward pass at ``depth`` reads: those of every module that runs
        (counted once), plus :meth:`_extra_params_used` for weights read partially (slices)."""
        config = self.depth_space.resolve(depth)
        shape = tuple(input_shape or self.default_input_shape)
        ran = set()
        handles = [m.register_forward_pre_hook(lambda mod, args, ran=ran: ran.add(id(mod)))
                   for m in self.modules()]
        param = next(self.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        try:
            with torch.no_grad():
                self.forward_depth(torch.zeros(shape, device=device,
                                               dtype=param.dtype if param is not None else torch.float32), config)
        finally:
            for h in handles:
                h.remove()
        seen = set()
        total = 0
        for m in self.modules():
            if id(m) in ran:
                for p in m.parameters(recurse=False):
                    if id(p) not in seen:
                        seen.add(id(p))
                        total += p.numel()
        return total + self._extra_params_used(config, ran)

    def _extra_params_used(self, config: DepthConfig, ran: set) -> int:
        return 0

    def depth_configs(self, input_shape: Optional[Sequence[int]] = None,
                      candidates: Optional[Sequence[DepthConfig]] = None) -> List[DepthConfig]:
        """The depth ladder from base to full, ordered by FLOPs (ties keep the candidates' order).

        ``candidates`` defaults to the space's default ladder; base and full are always included.
        """
        space = self.depth_space
        points = list(candidates) if candidates is not None else space.default_ladder()
        points = list(dict.fromkeys([space.base(), *(space.resolve(c) for c in points), space.full()]))
        flops = {c: self.flops(c, input_shape) for c in points}
        ordered = sorted(points, key=lambda c: flops[c])
        # base first and full last even where FLOPs tie (e.g. a knob that adds no FLOPs)
        ordered.remove(space.base())
        ordered.remove(space.full())
        return [space.base(), *ordered, space.full()]

    # -- depth under a latency budget (anydepth.budget) ----------------------------------------------
    def profile_depths(self, imgsz: int = 640, batch: int = 1, device=None, form: str = "eager", **options):
        """Measured latency (median, p90) of every ladder configuration on ``device`` in ``form``
        (``eager``, ``fused``, ``compiled``, ``cuda-graph``): a :class:`~anydepth.budget.DepthProfile`,
        saved beside ``weights=`` or at ``path=`` when given. Options: see
        :func:`anydepth.budget.profile_depths`."""
        from .budget import profile_depths

        return profile_depths(self, imgsz=imgsz, batch=batch, device=device, form=form, **options)

    def select_depth(self, budget_ms: float, profile, accuracy=None, **options) -> DepthConfig:
        """The most accurate configuration whose profiled latency fits ``budget_ms`` (accuracy from an
        evaluation report's AP per configuration when given, else FLOPs); see
        :func:`anydepth.budget.select_depth`. ``profile``: a DepthProfile or the path of its JSON."""
        from .budget import DepthProfile, select_depth

        if not isinstance(profile, DepthProfile):
            profile = DepthProfile.load(profile)
        return select_depth(self, budget_ms, profile, accuracy=accuracy, **options)
