"""Minimal repros of two AOTInductor bugs with ``torch.cond`` (torch 2.14.1, CPU), found exporting
the multi-depth graph, and the workarounds ``anydepth.export`` uses. Each case compiles a tiny
module with ``torch.export`` + ``aoti_compile_and_package``, loads it with ``aoti_load_package``
and compares it with the eager module at every predicate value.

1. **Predicates that are views of one tensor.** Three blocks each ``torch.cond(skip[i], ...)``
   on the elements of one bool input ``skip [3]``: the package follows ``skip[0]`` everywhere, so
   it is right only when all flags are equal. Cause: ``codegen_switch`` in
   ``torch/_inductor/codegen/cpp_wrapper_cpu.py`` names and caches the C++ scalar of a predicate by
   ``node.selector.get_name()``, which for the view ``skip[i]`` (a ``ReinterpretView`` with
   storage offset ``i``) is the name of the input, so the first predicate's value is reused.
   Workaround: a computed predicate, ``skip[i].to(torch.int32) > 0`` (``clone()`` is elided).
2. **A branch operand made channels-last by the layout optimisation.** ``conv -> cond(x * 2 |
   conv) -> cat``: Inductor makes the outer conv's output channels-last, the branches are compiled
   for the traced (contiguous) strides and copy it flat, so the result is transposed. Workaround:
   ``inductor_configs={"layout_optimization": False}`` for the graph with ``torch.cond``.

Run ``python tools/aoti_cond_view_repro.py`` (four small compilations: a minute or two on an idle
2-core machine). It prints the worst relative error of each case with and without its workaround
and exits 1 if a workaround does not hold any more.
"""
from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F


class Block(torch.nn.Module):
    def __init__(self, c: int, computed: bool):
        super().__init__()
        self.computed = computed
        self.w = torch.nn.Parameter(torch.randn(c, c, 3, 3) * 0.1)
        self.b = torch.nn.Parameter(torch.randn(c))

    def forward(self, x, skip):
        pred = skip.to(torch.int32) > 0 if self.computed else skip
        return torch.cond(pred, lambda x: x * 2.0, lambda x: F.silu(F.conv2d(x, self.w, self.b, padding=1)), (x,))


class Chain(torch.nn.Module):
    """Case 1: three conds on ``skip[0]``, ``skip[1]``, ``skip[2]``."""

    def __init__(self, computed: bool):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(8, computed) for _ in range(3))

    def forward(self, x, skip):
        for i, block in enumerate(self.blocks):
            x = block(x, skip[i])
        return x


class ConvCondCat(torch.nn.Module):
    """Case 2: a cond between a conv (channels-last under the layout optimisation) and a cat."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(8, 8, 1, 1) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
        self.w3 = torch.nn.Parameter(torch.randn(8, 16, 1, 1) * 0.1)

    def forward(self, x, skip):
        x = F.silu(F.conv2d(x, self.w1))
        y = torch.cond(skip.to(torch.int32) > 0, lambda x: x * 2.0, lambda x: F.silu(F.conv2d(x, self.w2, padding=1)),
                       (x,))
        return F.conv2d(torch.cat((y, x), 1), self.w3)


def worst_error(model: torch.nn.Module, skips, configs=None) -> float:
    model = model.eval()
    x = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ep = torch.export.export(model, (x, skips[0]), strict=False)
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "m.pt2")
        torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs=configs)
        runner = torch._inductor.aoti_load_package(path)
        worst = 0.0
        for skip in skips:
            with torch.no_grad():
                ref = model(x, skip)
                got = runner(x, skip)[0]
            worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    return worst


def main() -> int:
    print(f"torch {torch.__version__}")
    torch.manual_seed(0)
    flags = [torch.tensor(bits) for bits in itertools.product([False, True], repeat=3)]
    flag = [torch.tensor(False), torch.tensor(True)]
    no_layout_opt = {"layout_optimization": False}
    cases = [("1. predicate = view skip[i]", lambda: worst_error(Chain(False), flags, no_layout_opt), False),
             ("1. predicate = skip[i].to(int32) > 0", lambda: worst_error(Chain(True), flags, no_layout_opt), True),
             ("2. layout optimisation on (default)", lambda: worst_error(ConvCondCat(), flag), False),
             ("2. layout_optimization=False", lambda: worst_error(ConvCondCat(), flag, no_layout_opt), True)]
    ok = True
    for label, run, workaround in cases:
        err = run()
        print(f"{label:<40} worst rel err {err:.2e} ({'ok' if err <= 1e-4 else 'WRONG'})")
        ok &= err <= 1e-4 or not workaround
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
