"""Depth configurations: which refinement paths to skip, and the integer depth knobs.

A model declares its :class:`DepthSpace` (ordered switch names, e.g. ``"backbone.stage2"``, and
knobs such as ``"decoder_layers"``). A :class:`DepthConfig` is one point of that space: one boolean
per switch (True = skip that stage's refinement path) and one value per knob. Configs are
immutable and hashable, so they can key caches (per-depth CUDA graphs, FLOP counts).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union


@dataclass(frozen=True)
class KnobSpec:
    """An integer depth knob: values ``low..high``; ``high`` at full depth, ``base`` at base."""

    low: int
    high: int
    base: int

    def __post_init__(self):
        if not (isinstance(self.low, int) and isinstance(self.high, int) and isinstance(self.base, int)):
            raise ValueError(f"KnobSpec values must be ints, got {self}")
        if not self.low <= self.base <= self.high:
            raise ValueError(f"KnobSpec needs low <= base <= high, got {self}")


class DepthConfig:
    """One depth: ``skip[name]`` per switch (True = refinement path skipped), ``knobs[name]``."""

    __slots__ = ("_skip", "_knobs", "_hash")

    def __init__(self, skip: Mapping[str, bool], knobs: Optional[Mapping[str, int]] = None):
        self._skip: Tuple[Tuple[str, bool], ...] = tuple((k, bool(v)) for k, v in skip.items())
        self._knobs: Tuple[Tuple[str, int], ...] = tuple((k, int(v)) for k, v in (knobs or {}).items())
        self._hash = hash((self._skip, self._knobs))

    @property
    def skip(self) -> Mapping[str, bool]:
        return MappingProxyType(dict(self._skip))

    @property
    def knobs(self) -> Mapping[str, int]:
        return MappingProxyType(dict(self._knobs))

    def is_skipped(self, name: str) -> bool:
        for k, v in self._skip:
            if k == name:
                return v
        raise ValueError(f"unknown switch {name!r}; valid switches: {[k for k, _ in self._skip]}")

    def knob(self, name: str) -> int:
        for k, v in self._knobs:
            if k == name:
                return v
        raise ValueError(f"unknown knob {name!r}; valid knobs: {[k for k, _ in self._knobs]}")

    @property
    def code(self) -> str:
        """Compact code as in the papers: one letter per switch (T = skipped), then knobs,
        e.g. ``"TTFF-decoder_layers4"``."""
        s = "".join("T" if v else "F" for _, v in self._skip)
        return "-".join([s] + [f"{k}{v}" for k, v in self._knobs]) if self._knobs else s

    def to_dict(self) -> Dict[str, Any]:
        return {"skip": dict(self._skip), "knobs": dict(self._knobs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DepthConfig":
        if not isinstance(d, Mapping) or "skip" not in d:
            raise ValueError(f"not a serialised DepthConfig (needs a 'skip' mapping): {d!r}")
        return cls(d["skip"], d.get("knobs", {}))

    def __eq__(self, other) -> bool:
        return isinstance(other, DepthConfig) and (self._skip, self._knobs) == (other._skip, other._knobs)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        parts = [f"{k}={'skip' if v else 'run'}" for k, v in self._skip]
        parts += [f"{k}={v}" for k, v in self._knobs]
        return f"DepthConfig({', '.join(parts)})"


DepthLike = Union[None, str, float, int, DepthConfig, Mapping[str, Any]]


class DepthSpace:
    """The switches and knobs of a model, and the conversion of user depth arguments."""

    PRESETS = ("full", "base")

    def __init__(self, switches: Sequence[str], knobs: Optional[Mapping[str, KnobSpec]] = None):
        self.switches: Tuple[str, ...] = tuple(switches)
        self._knob_specs: Dict[str, KnobSpec] = dict(knobs or {})
        if len(set(self.switches)) != len(self.switches):
            raise ValueError(f"duplicate switch names in {self.switches}")
        clash = set(self.switches) & set(self.knob_specs)
        if clash:
            raise ValueError(f"names used both as switch and knob: {sorted(clash)}")

    @property
    def knob_specs(self) -> Mapping[str, KnobSpec]:
        """Knob name -> :class:`KnobSpec` (read-only view)."""
        return MappingProxyType(self._knob_specs)

    # -- construction -------------------------------------------------------------------------
    def make(self, skip: Optional[Mapping[str, bool]] = None, knobs: Optional[Mapping[str, int]] = None,
             default_skip: bool = False) -> DepthConfig:
        """A config from explicit values; unnamed switches take ``default_skip``, unnamed knobs
        their full value (or base value when ``default_skip``)."""
        skip = dict(skip or {})
        knobs = dict(knobs or {})
        for name, value in skip.items():
            if name not in self.switches:
                raise ValueError(f"unknown switch {name!r}; valid switches: {list(self.switches)}")
            if not isinstance(value, bool):
                raise ValueError(f"switch {name!r} must be True (skip) or False (run), got {value!r}")
        for name, value in knobs.items():
            spec = self.knob_specs.get(name)
            if spec is None:
                raise ValueError(f"unknown knob {name!r}; valid knobs: {list(self.knob_specs)}")
            if isinstance(value, bool) or not isinstance(value, int) or not spec.low <= value <= spec.high:
                raise ValueError(f"knob {name!r} must be an int in [{spec.low}, {spec.high}], got {value!r}")
        return DepthConfig(
            {s: skip.get(s, default_skip) for s in self.switches},
            {k: knobs.get(k, spec.base if default_skip else spec.high) for k, spec in self.knob_specs.items()},
        )

    def full(self) -> DepthConfig:
        return self.make()

    def base(self) -> DepthConfig:
        return self.make(default_skip=True)

    def default_ladder(self) -> List[DepthConfig]:
        """Base, then switches turned back on one at a time from the last to the first, then the
        knobs raised step by step to full. Monotone in depth; models re-sort it by FLOPs."""
        ladder = [self.base()]
        skip = {s: True for s in self.switches}
        knobs = {k: spec.base for k, spec in self.knob_specs.items()}
        for s in reversed(self.switches):
            skip[s] = False
            ladder.append(self.make(skip, knobs))
        for k, spec in self.knob_specs.items():
            for v in range(spec.base + 1, spec.high + 1):
                knobs[k] = v
                ladder.append(self.make(skip, knobs))
        return list(dict.fromkeys(ladder))

    def all_configs(self) -> Iterator[DepthConfig]:
        """Every combination of switches and knob values (2^switches x knob ranges)."""
        ranges = [range(spec.low, spec.high + 1) for spec in self.knob_specs.values()]
        for bits in itertools.product((False, True), repeat=len(self.switches)):
            for values in itertools.product(*ranges):
                yield self.make(dict(zip(self.switches, bits)), dict(zip(self.knob_specs, values)))

    # -- user input ---------------------------------------------------------------------------
    def resolve(self, depth: DepthLike, ladder: Optional[Sequence[DepthConfig]] = None) -> DepthConfig:
        """Turn a user's depth argument into a :class:`DepthConfig` of this space.

        Accepts ``None`` (full), ``"full"``/``"base"``, a float in [0, 1] (0 = base, 1 = full:
        the ladder point at position ``round(depth * (len(ladder) - 1))``; ``ladder`` defaults to
        :meth:`default_ladder`), a :class:`DepthConfig` of this space, or a mapping of switch and
        knob names to values (others full).
        """
        if depth is None:
            return self.full()
        if isinstance(depth, DepthConfig):
            if tuple(depth.skip) != self.switches or tuple(depth.knobs) != tuple(self.knob_specs):
                raise ValueError(
                    f"{depth!r} does not belong to this model; valid switches: {list(self.switches)}, "
                    f"knobs: {list(self.knob_specs)}"
                )
            return self.make(dict(depth.skip), dict(depth.knobs))
        if isinstance(depth, str):
            name = depth.strip().lower()
            if name == "full":
                return self.full()
            if name == "base":
                return self.base()
            raise ValueError(f"unknown depth preset {depth!r}; valid presets: {list(self.PRESETS)}")
        if isinstance(depth, bool):
            raise ValueError(f"depth must be a preset, a float in [0, 1], a DepthConfig or a dict; got {depth!r}")
        if isinstance(depth, (int, float)):
            f = float(depth)
            if math.isnan(f) or not 0.0 <= f <= 1.0:
                raise ValueError(f"a numeric depth must be in [0, 1] (0 = base, 1 = full), got {depth!r}")
            points = list(ladder) if ladder is not None else self.default_ladder()
            return points[round(f * (len(points) - 1))]
        if isinstance(depth, Mapping):
            skip = {k: v for k, v in depth.items() if k not in self.knob_specs}
            knobs = {k: v for k, v in depth.items() if k in self.knob_specs}
            return self.make(skip, knobs)
        raise ValueError(
            f"depth must be None, {list(self.PRESETS)}, a float in [0, 1], a DepthConfig or a dict "
            f"of {list(self.switches) + list(self.knob_specs)}; got {type(depth).__name__}"
        )

    def from_code(self, code: str) -> DepthConfig:
        """The config whose :attr:`DepthConfig.code` is ``code`` (``"TTFF-decoder_layers4"``: one
        ``T``/``F`` per switch, then ``-knobVALUE`` per knob; knobs left out take their full value)."""
        if not isinstance(code, str):
            raise ValueError(f"a depth code must be a string, got {code!r}")
        head, *knob_parts = code.strip().split("-")
        if len(head) != len(self.switches) or set(head) - {"T", "F"}:
            raise ValueError(f"depth code {code!r}: expected {len(self.switches)} letters T (skip) / F (run), one per "
                             f"switch {list(self.switches)}, then -knobVALUE per knob {list(self.knob_specs)}")
        knobs = {}
        for part in knob_parts:
            name = next((k for k in self.knob_specs if part.startswith(k) and part[len(k):].isdigit()), None)
            if name is None:
                raise ValueError(f"depth code {code!r}: {part!r} is not a knob and value; "
                                 f"knobs: {list(self.knob_specs)}")
            knobs[name] = int(part[len(name):])
        return self.make(dict(zip(self.switches, (c == "T" for c in head))), knobs)

    def __repr__(self) -> str:
        return f"DepthSpace(switches={list(self.switches)}, knobs={dict(self.knob_specs)})"
