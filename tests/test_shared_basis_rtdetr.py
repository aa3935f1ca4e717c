"""Deeply shared filter bases in AnyDepth-RT-DETR's backbone (``shared_bases=``): parameters saved
against counts from the layer shapes, the inference form against eager at every depth, the SVD
conversion of an unshared detector (exact when the ranks cover the filters), checkpoints, the
criterion's orthogonality penalty and the trainer's ``--model-kwargs``."""
from __future__ import annotations

import argparse
import copy
import itertools

import pytest
import torch

import anydepth
from anydepth import checkpoint
from anydepth.convert._transformers import randomize_uniform_
from anydepth.losses.rtdetr import RTDETRCriterion
from anydepth.models.resnet import to_shared_bases
from anydepth.models.rtdetr import VARIANTS
from anydepth.nn import SharedBasisConvNormAct, split_blocks
from anydepth_kernels.shared_basis import SharedBasisConv2d, orthogonality_penalty, shared_bases

from helpers import rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-5
MIXED = {"backbone.stage1": True, "backbone.stage3": True, "decoder_layers": 1}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _expected_saving(variant: str, shared_rank: int, unique_rank: int, bases: int, blocks: str) -> int:
    """Parameters the shared model stores fewer than the unshared one, from the layer shapes
    alone: each shared 3x3 conv ``w -> w`` (every block of a stage past the first, or past the
    essential ones with ``blocks="refinement"``) drops its ``9 w^2`` weight and keeps its output
    BatchNorm, and gains its own ``u`` filters ``9 w u``, a BatchNorm over ``u + s`` and the
    ``(u + s) x w`` coefficients; an essential block's conv also swaps its shallow-path BN for a
    shallow-path pair (BN over ``u + s``, BN over ``w``: the filters and coefficients are tied);
    each stage stores its ``bases`` shared bases ``s x 9 w`` once. Ranks scale with the width."""
    v = VARIANTS[variant]
    saved = 0
    for i, (n, w) in enumerate(zip(v["depths"], v["hidden_sizes"])):
        mid = w if v["layer_type"] == "basic" else w // 4
        mult = mid // (v["hidden_sizes"][0] if v["layer_type"] == "basic" else v["hidden_sizes"][0] // 4)
        s, u = shared_rank * mult, unique_rank * mult
        ess, _ = split_blocks(n)
        first = 1 if blocks == "all" else ess
        convs_per_block = 2 if v["layer_type"] == "basic" else 1
        if n <= first:
            continue
        saved -= bases * s * 9 * mid
        for j in range(first, n):
            for _ in range(convs_per_block):
                saved += 9 * mid * mid - (9 * mid * u + 2 * (u + s) + (u + s) * mid)
                if j < ess:    # shallow-path BN (2 mid) -> BN(u + s) + BN(mid)
                    saved -= 2 * (u + s)
    return saved


@pytest.mark.parametrize("variant,spec", [
    ("r18", dict(shared_rank=8, unique_rank=1, blocks="refinement")),
    ("r34", dict(shared_rank=16, unique_rank=1, bases=2)),
    ("r50", dict(shared_rank=16, unique_rank=1, blocks="refinement")),
])
def test_parameters_saved_against_the_layer_shapes(variant, spec):
    name = f"rtdetr-{variant}-anydepth"
    plain = anydepth.create_model(name)
    shared = anydepth.create_model(name, shared_bases=spec)
    full = {**dict(bases=1, blocks="all"), **spec}
    assert _count(plain) - _count(shared) == _expected_saving(variant, full["shared_rank"], full["unique_rank"],
                                                              full["bases"], full["blocks"])
    # the decoder and encoder are untouched; the bases are stored once per stage
    assert _count(plain.encoder) == _count(shared.encoder) and _count(plain.decoder) == _count(shared.decoder)
    assert len(shared_bases(shared)) == 4 * full["bases"]
    assert shared.model_kwargs["shared_bases"] == spec


@torch.no_grad()
def _randomised(model, seed):
    """Random weights and distinct statistics in every norm (both sets of a skip-aware one, the
    shallow-path twins' norms included), the shared bases and own filters perturbed."""
    randomize_uniform_(model, seed)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, SharedBasisConv2d) and m.unique is not None:
            m.unique.mul_(1.0 + 0.1 * torch.rand(m.unique.shape, generator=g))
    for b in shared_bases(model):
        b.weight.add_(0.02 * torch.randn(b.weight.shape, generator=g))
    return model.eval()


def _assert_same_detections(model, x, depths, outs):
    """``model``'s logits and boxes at each of ``depths`` equal ``outs`` (<= TOL)."""
    with torch.no_grad():
        for d, want in zip(depths, outs):
            got = model(x, depth=d)
            assert rel_err(got["logits"], want["logits"]) <= TOL, d
            assert rel_err(got["pred_boxes"], want["pred_boxes"]) <= TOL, d


def _well_separated(model, depths, size=96):
    """An input whose decoder query selection (top-k of the encoder scores) has a margin above
    float rounding at every one of ``depths`` (the eager model as the oracle)."""
    seen = []
    h = model.decoder.enc_score_head.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        for seed in range(40):
            x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
            outs, ok = [], True
            for d in depths:
                seen.clear()
                with torch.no_grad():
                    outs.append(model(x, depth=d))
                top = seen[0].max(-1).values.sort(dim=1, descending=True).values[:, :model.num_queries + 1]
                ok = ok and (top[:, :-1] - top[:, 1:]).min().item() > 2e-6
            if ok:
                return x, outs
    finally:
        h.remove()
    raise AssertionError("no input with a well-separated query selection")


def _all_switch_depths(model):
    """Every combination of the five switches (backbone stages, encoder), the decoder at full."""
    switches = model.depth_space.switches
    return [dict(zip(switches, bits)) for bits in itertools.product((False, True), repeat=len(switches))]


@pytest.fixture(scope="module")
def r34_shared():
    """RT-DETR-R34 with two bases per stage shared by every block but the first: essential blocks
    hold shared convs with shallow-path twins."""
    torch.manual_seed(0)
    return _randomised(anydepth.create_model("rtdetr-r34-anydepth", num_queries=50,
                                             shared_bases=dict(shared_rank=4, unique_rank=1, bases=2)), 3)


def test_inference_form_equals_eager_at_every_depth(r34_shared):
    eager = r34_shared
    assert any(m.layer_skip is not None for m in eager.modules() if isinstance(m, SharedBasisConvNormAct))
    fused = copy.deepcopy(eager).to_inference()
    assert not any(isinstance(m, SharedBasisConv2d) for m in fused.modules())
    kinds = {type(m.layer).__name__ for m in fused.modules() if isinstance(m, SharedBasisConvNormAct)}
    assert kinds == {"FactoredConvNormAct"}     # ranks 4..32 + 1..8: the factored form costs fewer FLOPs
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = {}
        for d in _all_switch_depths(eager):     # the backbone and encoder outputs at all 32 depths
            want = eager.features(x, eager.resolve_depth(d))
            got = fused.features(x, fused.resolve_depth(d))
            for a, b in zip(got, want):
                assert rel_err(a, b) <= TOL, d
            feats[tuple(d.values())] = want[-1]
        assert not torch.allclose(feats[(False,) * 5], feats[(True, True, False, False, False)])
    depths = ("full", "base", MIXED)
    x, outs = _well_separated(eager, depths)
    _assert_same_detections(fused, x, depths, outs)


def test_share_bases_init_from_an_unshared_detector_is_exact():
    """``to_shared_bases``: the SVD conversion of a randomised unshared RT-DETR-R18 whose ranks
    cover the filters (one conv of width ``w`` per basis and stage: ``shared_rank`` 64 x the width
    multiple = ``w``) gives the same backbone outputs at every depth (the encoder and decoder
    are copied unchanged) and the same detections at full and a mixed depth; its bases start
    orthonormal."""
    torch.manual_seed(0)
    plain = randomize_uniform_(anydepth.create_model("rtdetr-r18-anydepth", num_queries=50), 4).eval()
    shared = to_shared_bases(plain, dict(shared_rank=64, unique_rank=1, bases=2)).eval()
    assert shared.model_kwargs["shared_bases"] == dict(shared_rank=64, unique_rank=1, bases=2)
    assert sum(isinstance(m, SharedBasisConvNormAct) for m in shared.modules()) == 8
    assert orthogonality_penalty(shared, weight=1.0, joint=False).item() < 1e-10
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():   # the backbone's outputs at all 16 settings of its switches
        for skips in itertools.product((False, True), repeat=4):
            for a, b in zip(shared.backbone(x, list(skips)), plain.backbone(x, list(skips))):
                assert rel_err(a, b) <= TOL, skips
    depths = ("full", MIXED)
    x, outs = _well_separated(plain, depths)
    _assert_same_detections(shared, x, depths, outs)
    with pytest.raises(ValueError, match="already has shared bases"):
        to_shared_bases(shared, dict(shared_rank=8))
    with pytest.raises(ValueError, match="coefficients=False"):
        to_shared_bases(plain, dict(shared_rank=64, coefficients=False))
    with pytest.raises(TypeError, match="any-depth ResNet or RT-DETR"):
        to_shared_bases(torch.nn.Conv2d(3, 3, 1), dict(shared_rank=8))


def test_checkpoint_rebuilds_the_shared_bases(r34_shared, tmp_path):
    path = tmp_path / "r34-shared.pt"
    checkpoint.save(r34_shared, path)
    loaded = checkpoint.load(path).eval()
    assert loaded.model_kwargs["shared_bases"] == dict(shared_rank=4, unique_rank=1, bases=2)
    conv = loaded.backbone.stage2.essential.blocks[1].conv1
    assert conv.layer_skip.coeff is conv.layer.coeff and conv.layer.shared is loaded.backbone.stage2.shared_bases[0]
    assert _count(loaded) == _count(r34_shared)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for d in ("full", "base", MIXED):
            assert torch.equal(loaded(x, depth=d)["pred_boxes"], r34_shared(x, depth=d)["pred_boxes"])


def test_criterion_adds_the_joint_orthogonality_penalty(r34_shared):
    """``RTDETRCriterion(model)`` adds ``orth x`` the penalty (a stage's two bases jointly) to the
    ground-truth loss; ``orth=0`` or a model without shared bases adds nothing."""
    model = copy.deepcopy(r34_shared).train()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([3])},
               {"boxes": torch.tensor([[10.0, 10.0, 30.0, 60.0]]), "labels": torch.tensor([7])}]
    with torch.no_grad():
        out = model.forward_train(x, targets=None)
    loss, logs = RTDETRCriterion(model).gt_loss(out, targets)
    loss0, logs0 = RTDETRCriterion(model, orth=0.0).gt_loss(out, targets)
    pen = float(orthogonality_penalty(model, weight=1.0).detach())
    assert pen > 1e-5 and "orth" not in logs0
    assert logs["orth"] == pytest.approx(pen, rel=1e-5)
    assert float((loss - loss0).detach()) == pytest.approx(10 * pen, rel=1e-4)
    assert pen != pytest.approx(float(orthogonality_penalty(model, weight=1.0, joint=False).detach()), rel=1e-3)
    assert len(RTDETRCriterion(anydepth.create_model("rtdetr-r18-anydepth")).basis_groups) == 0
    with pytest.raises(ValueError, match="orth"):
        RTDETRCriterion(model, orth=-1.0)


def test_trainer_model_kwargs_carry_the_option():
    """``anydepth train --model-kwargs 'shared_bases={...}'``: a JSON value reaches the model."""
    from anydepth.cli import _parse_mapping
    from anydepth.train import TrainConfig

    kw = _parse_mapping('num_queries=50,shared_bases={"shared_rank": 8, "unique_rank": 1, "blocks": "refinement"}',
                        "model_kwargs")
    assert kw == {"num_queries": 50, "shared_bases": {"shared_rank": 8, "unique_rank": 1, "blocks": "refinement"}}
    cfg = TrainConfig(model="rtdetr-r18-anydepth", data="unused", model_kwargs=kw)
    m = anydepth.create_model(cfg.model, **cfg.model_kwargs)
    assert len(shared_bases(m)) == 4 and m.model_kwargs["shared_bases"]["blocks"] == "refinement"
    with pytest.raises(argparse.ArgumentTypeError, match="not valid JSON"):
        _parse_mapping("shared_bases={shared_rank: 8}", "model_kwargs")
