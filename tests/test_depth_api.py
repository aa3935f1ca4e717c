"""Depth-control API: configs, resolution, skip-aware norms, skippable stages, the base model."""
import json
import threading

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import anydepth_kernels as ak
from anydepth import (AnyDepthModel, ConvNormAct, DepthConfig, DepthSpace, KnobSpec,
                      SkipAwareBatchNorm2d, SkipAwareLayerNorm, SkippableStage, split_blocks)
from helpers import rel_err

SPACE = DepthSpace(["backbone.s1", "backbone.s2", "neck"], {"decoder_layers": KnobSpec(1, 6, 4)})


def test_presets():
    assert SPACE.full().skip == {"backbone.s1": False, "backbone.s2": False, "neck": False}
    assert SPACE.full().knob("decoder_layers") == 6
    assert all(SPACE.base().skip.values()) and SPACE.base().knob("decoder_layers") == 4
    assert SPACE.base().code == "TTT-decoder_layers4"


def test_resolve_forms():
    assert SPACE.resolve(None) == SPACE.full() == SPACE.resolve("FULL") == SPACE.resolve(1.0)
    assert SPACE.resolve("base") == SPACE.resolve(0) == SPACE.resolve(0.0)
    c = SPACE.resolve({"neck": True, "decoder_layers": 2})
    assert c.skip == {"backbone.s1": False, "backbone.s2": False, "neck": True} and c.knob("decoder_layers") == 2
    assert SPACE.resolve(c) == c
    ladder = SPACE.default_ladder()
    assert ladder[0] == SPACE.base() and ladder[-1] == SPACE.full()
    assert SPACE.resolve(0.5, ladder=ladder) == ladder[round(0.5 * (len(ladder) - 1))]
    assert len(list(SPACE.all_configs())) == 8 * 6


@pytest.mark.parametrize("bad, match", [
    ("medium", r"unknown depth preset 'medium'; valid presets: \['full', 'base'\]"),
    (1.5, r"must be in \[0, 1\]"),
    (float("nan"), r"must be in \[0, 1\]"),
    ({"backbone.s3": True}, r"unknown switch 'backbone.s3'; valid switches: \['backbone.s1', 'backbone.s2', 'neck'\]"),
    ({"neck": 1}, r"switch 'neck' must be True \(skip\) or False \(run\)"),
    ({"decoder_layers": 7}, r"knob 'decoder_layers' must be an int in \[1, 6\], got 7"),
    (DepthSpace(["x"]).full(), r"does not belong to this model; valid switches"),
    (True, r"depth must be"),
    ([1, 2], r"depth must be None"),
])
def test_resolve_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        SPACE.resolve(bad)


def test_config_value_semantics():
    a, b = SPACE.make({"neck": True}), SPACE.make({"neck": True})
    assert a == b and hash(a) == hash(b) and len({a, b, SPACE.full()}) == 2
    assert DepthConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert "neck=skip" in repr(a) and "backbone.s1=run" in repr(a)
    with pytest.raises(TypeError):
        a.skip["neck"] = False  # read-only
    with pytest.raises(ValueError, match="valid switches"):
        a.is_skipped("nope")
    with pytest.raises(ValueError, match="not a serialised DepthConfig"):
        DepthConfig.from_dict({"nope": 1})


def test_split_rule():
    assert [split_blocks(n)[1] for n in [3, 4, 6, 3]] == [1, 2, 3, 1]  # ResNet-50
    assert [split_blocks(n) for n in [2, 2, 2, 2]] == [(1, 1)] * 4      # ResNet-18
    assert [split_blocks(n)[1] for n in [3, 4, 23, 3]] == [1, 2, 11, 1]  # ResNet-101
    assert split_blocks(1) == (1, 0) and split_blocks(4) == (2, 2)
    with pytest.raises(ValueError):
        split_blocks(0)


def _randomise_bn(bn, seed):
    g = torch.Generator().manual_seed(seed)
    bn.weight.data = torch.rand(bn.num_features, generator=g) + 0.5
    bn.bias.data = torch.randn(bn.num_features, generator=g)
    bn.running_mean = torch.randn(bn.num_features, generator=g)
    bn.running_var = torch.rand(bn.num_features, generator=g) + 0.1


def test_skip_aware_batchnorm():
    sbn = SkipAwareBatchNorm2d(6)
    _randomise_bn(sbn.bn, 1)
    _randomise_bn(sbn.bn_skip, 2)
    x = torch.randn(2, 6, 4, 4)
    sbn.eval()
    for skip, bn in ((False, sbn.bn), (True, sbn.bn_skip)):
        manual = (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
        manual = manual * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        assert rel_err(sbn(x, skip), manual) <= 1e-6
    sbn.train()
    before_full, before_skip = sbn.bn.running_mean.clone(), sbn.bn_skip.running_mean.clone()
    sbn(x + 3.0, skip=True)
    assert torch.equal(sbn.bn.running_mean, before_full)
    assert not torch.equal(sbn.bn_skip.running_mean, before_skip)
    copy = SkipAwareBatchNorm2d.from_batchnorm(sbn.bn)
    assert torch.equal(copy.bn_skip.running_var, sbn.bn.running_var)


def test_skip_aware_layernorm():
    ln = SkipAwareLayerNorm(8)
    ln.ln_skip.weight.data.fill_(2.0)
    x = torch.randn(3, 8)
    assert rel_err(ln(x, True), 2 * ln(x, False)) <= 1e-6


@pytest.mark.parametrize("skip_aware", [False, True])
def test_conv_norm_act_fuse(skip_aware):
    m = ConvNormAct(6, 10, k=3, s=2, skip_aware=skip_aware)
    for i, bn in enumerate([m.bn.bn, m.bn.bn_skip] if skip_aware else [m.bn]):
        _randomise_bn(bn, i)
    m.eval()
    fused = m.fuse()
    assert isinstance(fused, ak.FusedConvNormAct) and fused.num_epilogues == (2 if skip_aware else 1)
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        for skip in ([False, True] if skip_aware else [False]):
            assert rel_err(fused(x, int(skip)), m(x, skip)) <= 1e-5


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _stage():
    essential = ConvNormAct(4, 4, 3, skip_aware=True)
    refinement = nn.Sequential(ConvNormAct(4, 4, 3), ConvNormAct(4, 4, 3))
    return SkippableStage(essential, refinement).eval()


def test_skipped_refinement_costs_nothing():
    stage = _stage()
    calls, captured = [], []
    stage.refinement.register_forward_hook(lambda *a: calls.append(1))
    stage.essential.register_forward_hook(lambda m, i, o: captured.append(o))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        out = stage(x, skip=True)
        assert out is captured[-1]  # the essential output tensor itself
        assert out.untyped_storage().data_ptr() == captured[-1].untyped_storage().data_ptr()
        assert calls == []
        with _OpRecorder() as rec_stage:
            stage(x, skip=True)
        with _OpRecorder() as rec_essential:
            stage.essential(x, skip=True)
        assert rec_stage.ops == rec_essential.ops  # no op (no allocation) after the essential path
        full = stage(x, skip=False)
        assert calls == [1] and full.shape == out.shape and not torch.equal(full, out)


class TinyAnyDepth(AnyDepthModel):
    depth_space = DepthSpace(["stage1", "stage2"], {"head_layers": KnobSpec(1, 2, 1)})

    def __init__(self):
        super().__init__()
        self.stage1 = _stage()
        self.stage2 = _stage()
        self.head = nn.ModuleList([nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)])

    def forward_depth(self, x, depth):
        x = self.stage1(x, depth.is_skipped("stage1"))
        x = self.stage2(x, depth.is_skipped("stage2"))
        for layer in self.head[: depth.knob("head_layers")]:
            x = layer(x)
        return x


def test_model_depth_argument_and_threads():
    torch.manual_seed(0)
    model = TinyAnyDepth().eval()
    x = torch.randn(1, 4, 8, 8)
    configs = list(model.depth_space.all_configs())
    with torch.no_grad():
        expected = {c: model(x, c) for c in configs}
        assert not torch.equal(expected[model.depth_space.full()], expected[model.depth_space.base()])
        results, errors = {}, []

        def worker(i):
            try:
                for _ in range(5):
                    for c in configs[i::4]:
                        results[(i, c)] = model(x, depth=c)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    for (i, c), out in results.items():
        assert torch.equal(out, expected[c])


def test_depth_configs_ordered_by_flops():
    model = TinyAnyDepth().eval()
    shape = (1, 4, 16, 16)
    ladder = model.depth_configs(shape)
    space = model.depth_space
    assert ladder[0] == space.base() and ladder[-1] == space.full() and len(set(ladder)) == len(ladder)
    flops = [model.flops(c, shape) for c in ladder]
    assert flops == sorted(flops) and flops[0] < flops[-1]
    x = torch.randn(shape)
    assert model.resolve_depth(0.0, shape) == space.base()
    assert model.resolve_depth(1.0, shape) == space.full()
    assert model.resolve_depth(0.5, shape) == ladder[round(0.5 * (len(ladder) - 1))]
    with torch.no_grad():
        assert torch.equal(model(x, depth=0.0), model(x, depth="base"))
    with pytest.raises(ValueError, match="valid switches"):
        model(x, depth={"stage9": True})
