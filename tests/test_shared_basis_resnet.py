"""Deeply shared filter bases in the any-depth ResNet classifiers (``shared_bases=``): the paper's
parameter counts, the blocks that share, depth switching, inference forms and the training penalty."""
import copy

import pytest
import torch

import anydepth
from anydepth.losses.classify import ClassificationCriterion
from anydepth.nn import ConvNormAct, SharedBasisConvNormAct
from anydepth.train.step import two_pass_step
from anydepth_kernels.shared_basis import SharedBasis, orthogonality_penalty, shared_bases

from helpers import rel_err


def _count(model, shallow_norms: bool = True) -> int:
    """Parameters stored once (tied ones once); ``shallow_norms=False`` leaves out the shallow-path
    copies of the essential blocks' norms (which the authors' static networks do not have)."""
    return sum(p.numel() for n, p in model.named_parameters()
               if shallow_norms or not (".layer_skip." in n or ".bn_skip." in n))


def _authors_count(blocks, widths, shared_rank, unique_rank, bases, stem_k, classes, bottleneck=False,
                   coefficients=True):
    """The parameters of the authors' ``ssregibility/Net_RL2`` networks, layer by layer as their
    ``models/ilsvrc/resnet.py`` / ``models/cifar100/resnet.py`` build them (``ResNet_SingleShared``,
    ``ResNet_DoubleShared``, ``ResNet_BottleneckSharedSingle``): conv weights, BN weight + bias,
    the fc with bias. An independent count to compare ours against."""
    bn = 2
    n = 3 * 64 * stem_k * stem_k + bn * 64
    cin = 64
    for i, (nb, w) in enumerate(zip(blocks, widths)):
        mult = w // widths[0]
        out = w * 4 if bottleneck else w
        if coefficients:
            s, u = shared_rank * mult, unique_rank * mult
            n += bases * s * w * 9                                 # the stage's shared bases
        else:
            n += w * w * 9                                         # one shared 3x3 conv per stage
        for j in range(nb):
            if cin != out or (j == 0 and i > 0):
                n += cin * out + bn * out                          # projection shortcut
            if bottleneck:
                n += cin * w + bn * w + w * out + bn * out         # the 1x1 convs
                n += (w * w * 9 if j == 0 else 0) + bn * w         # 3x3: own, or the shared one
            elif j == 0:
                n += cin * w * 9 + bn * w + w * w * 9 + bn * w     # the stage's first block: plain
            else:
                for _ in range(2):                                 # basis own u + BN(u+s) + coeff + BN
                    n += w * u * 9 + bn * (u + s) + (u + s) * w + bn * w
            cin = out
    return n + cin * classes + classes


PAPER = [  # (name, options, paper's parameters in M, authors' code layout)
    ("ResNet34-S48U1 (ImageNet)",
     ("resnet34-anydepth", dict(shared_bases=dict(shared_rank=48, unique_rank=1, bases=2))),
     11.8, dict(shared_rank=48, unique_rank=1, bases=2, stem_k=7, classes=1000)),
    ("ResNet50-Shared (ImageNet)", ("resnet50-anydepth", dict(shared_bases=dict(shared_rank=64, coefficients=False))),
     20.5, dict(shared_rank=0, unique_rank=0, bases=1, stem_k=7, classes=1000, bottleneck=True,
                coefficients=False)),
    ("ResNet34-S16U1 (CIFAR-100)", ("resnet34-anydepth", dict(num_classes=100, stem="3x3",
                                                              shared_bases=dict(shared_rank=16, unique_rank=1))),
     6.5, dict(shared_rank=16, unique_rank=1, bases=1, stem_k=3, classes=100)),
]


@pytest.mark.parametrize("label,build,paper,authors", PAPER, ids=[p[0] for p in PAPER])
def test_parameter_counts_match_the_paper(label, build, paper, authors):
    """Deeply Shared Filter Bases (NeurIPS 2021), Table: ImageNet ResNet34-S48U1 11.8M (two shared
    bases per stage: the authors' ``ResNet34_DoubleShared``), ResNet50-Shared 20.5M (one shared
    3x3 conv per stage: ``ResNet50_SharedSingle``), CIFAR-100 ResNet34-S16U1 6.5M (3x3 stem, no
    max-pool, one basis per stage: ``ResNet34_SingleShared``). Ours equals the authors' layout
    exactly once the shallow-path norm copies of the essential blocks are left out, and matches
    the paper's rounded figure within 0.05M with them."""
    name, kw = build
    torch.manual_seed(0)
    m = anydepth.create_model(name, **kw)
    widths = (64, 128, 256, 512)
    blocks = (3, 4, 6, 3)
    assert _count(m, shallow_norms=False) == _authors_count(blocks, widths, **authors), label
    assert abs(_count(m) / 1e6 - paper) < 0.05, (label, _count(m))
    # the any-depth extra: shallow-path norms only (well under 0.1M)
    assert 0 < _count(m) - _count(m, shallow_norms=False) < 30_000


def test_readme_table_single_shared_counts():
    """The authors' README: ImageNet ResNet34-S48U1 (one basis per stage) 9.44M, S32U1 8.20M."""
    for s, expected in ((48, 9.44), (32, 8.20)):
        m = anydepth.create_model("resnet34-anydepth", shared_bases=dict(shared_rank=s, unique_rank=1))
        assert round(_count(m, shallow_norms=False) / 1e6, 2) == expected


def test_which_convs_share_and_skip_aware_copies():
    m = anydepth.create_model("resnet34-anydepth", num_classes=10, stem="3x3",
                              shared_bases=dict(shared_rank=4, unique_rank=1, bases=2))
    st = m.backbone.stage3                         # 6 blocks: 3 essential, 3 refinement
    first, second = st.essential.blocks[0], st.essential.blocks[1]
    assert isinstance(first.conv1, ConvNormAct) and isinstance(first.conv2, ConvNormAct)
    b1, b2 = st.shared_bases
    assert (b1.rank, b1.in_channels, b2.rank) == (16, 256, 16)          # 4 x (256 / 64), x4 the unique rank
    blocks = list(st.essential.blocks)[1:] + list(st.refinement.blocks)
    assert all(b.conv1.layer.shared is b1 and b.conv2.layer.shared is b2 for b in blocks)
    assert all(b.conv1.layer.unique_rank == 4 for b in blocks)
    assert len(shared_bases(m)) == 8
    # an essential block's shared conv has a shallow-path copy: same filters and coefficients, own norms
    c = second.conv1
    assert c.layer_skip.coeff is c.layer.coeff and c.layer_skip.unique is c.layer.unique
    assert c.layer_skip.shared is b1 and c.layer_skip.norm is not c.layer.norm
    assert all(b.conv1.layer_skip is None for b in st.refinement.blocks)
    # refinement-only sharing: the essential path keeps plain convs
    r = anydepth.create_model("resnet34-anydepth", num_classes=10,
                              shared_bases=dict(shared_rank=4, unique_rank=1, blocks="refinement"))
    st = r.backbone.stage3
    assert all(isinstance(b.conv1, ConvNormAct) for b in st.essential.blocks)
    assert all(isinstance(b.conv1, SharedBasisConvNormAct) for b in st.refinement.blocks)
    assert r.backbone.stage1.refinement.blocks[0].conv2.layer.shared is r.backbone.stage1.shared_bases[0]


def test_bad_options():
    for bad, msg in ((dict(unique_rank=1), "shared_rank"), (dict(shared_rank=4, bases=3), "bases"),
                     (dict(shared_rank=4, blocks="some"), "blocks"), (dict(shared_rank=4, rank=2), "unknown keys"),
                     (dict(shared_rank=4, unique_rank=1, coefficients=False), "unique_rank must be 0")):
        with pytest.raises(ValueError, match=msg):
            anydepth.create_model("resnet18-anydepth", num_classes=3, shared_bases=bad)
    with pytest.raises(ValueError, match="coefficients=False needs"):
        anydepth.create_model("resnet18-anydepth", num_classes=3, shared_bases=dict(shared_rank=8, coefficients=False))
    with pytest.raises(ValueError, match="a bottleneck has one 3x3 conv"):
        anydepth.create_model("resnet50-anydepth", num_classes=3, shared_bases=dict(shared_rank=4, bases=2))
    with pytest.raises(TypeError, match="shared_bases must be a dict"):
        anydepth.create_model("resnet18-anydepth", num_classes=3, shared_bases=16)
    with pytest.raises(ValueError, match="stem must be"):
        anydepth.create_model("resnet18-anydepth", num_classes=3, stem="5x5")


@pytest.mark.parametrize("shared", [dict(shared_rank=4, unique_rank=1, bases=2),
                                    dict(shared_rank=64, coefficients=False)])
def test_inference_form_equals_eager_at_every_depth(shared):
    """``to_inference()`` (fused convs, shared-basis convs folded or factored) against eager at
    full, base and a mixed depth, with distinct statistics in every norm (the shallow-path
    copies included)."""
    torch.manual_seed(0)
    m = anydepth.create_model("resnet34-anydepth", num_classes=5, stem="3x3", shared_bases=shared)
    assert any(getattr(q, "layer_skip", None) is not None or getattr(q, "skip_aware", False)
               for q in m.modules() if isinstance(q, SharedBasisConvNormAct))
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    m.eval()
    x = torch.rand(2, 3, 8, 8)
    configs = [c for c in m.depth_space.all_configs() if c.code in ("FFFF", "TTTT", "TFTF")]
    assert len(configs) == 3
    with torch.no_grad():
        eager = {c: m(x, depth=c) for c in configs}
        assert not torch.allclose(eager[configs[0]], eager[configs[-1]])
        fused = copy.deepcopy(m).to_inference()
        assert not any(type(q).__name__ == "SharedBasisConv2d" for q in fused.modules())
        if not shared.get("coefficients", True):   # the whole shared conv folded too: no eager conv left
            assert not any(isinstance(q, (SharedBasisConvNormAct, torch.nn.BatchNorm2d)) for q in fused.modules())
        for c in configs:
            out = fused(x, depth=c)
            assert (out - eager[c]).abs().max() <= 1e-5 * eager[c].abs().max(), c.code


def test_training_step_adds_the_orthogonality_penalty():
    """One two-pass step: the full-depth loss carries ``orth x penalty`` (10 by default), and its
    gradient reaches the shared bases (the difference of the basis gradients with and without it
    is the penalty's own gradient)."""
    torch.manual_seed(0)
    m = anydepth.create_model("resnet18-anydepth", num_classes=4, stem="3x3",
                              shared_bases=dict(shared_rank=4, unique_rank=1)).train()
    with torch.no_grad():
        for b in shared_bases(m):   # off orthogonality, so the penalty is not ~0
            b.weight.add_(0.05 * torch.randn_like(b.weight))
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    full, base = m.resolve_depth("full"), m.resolve_depth("base")

    def step(weights):
        model = copy.deepcopy(m)
        crit = anydepth.losses.build_criterion(model, **weights)
        logs = two_pass_step(model, crit, x, y, full, base)
        return model, logs

    with_pen, logs = step({})
    without, logs0 = step({"orth": 0.0})
    pen = orthogonality_penalty(m, weight=1.0).detach()
    assert float(pen) > 1e-4
    assert logs["full/orth"] == pytest.approx(float(pen), rel=1e-5) and "full/orth" not in logs0
    assert logs["full/loss"] - logs0["full/loss"] == pytest.approx(10 * float(pen), rel=1e-4)
    ref = copy.deepcopy(m)
    (10 * orthogonality_penalty(ref, weight=1.0)).backward()
    for b, b0, br in zip(shared_bases(with_pen), shared_bases(without), shared_bases(ref)):
        assert b.weight.grad is not None and b0.weight.grad is not None
        torch.testing.assert_close(b.weight.grad - b0.weight.grad, br.weight.grad, rtol=1e-4, atol=1e-6)
    crit = ClassificationCriterion(m, orth=5.0)     # `--loss orth=5` reaches the criterion this way
    assert crit.orth == 5.0 and len(crit.bases) == 4 and all(isinstance(b, SharedBasis) for b in crit.bases)
    with pytest.raises(ValueError, match="orth must be"):
        ClassificationCriterion(m, orth=-1.0)


@pytest.mark.parametrize("seed", range(6))
def test_whole_shared_conv_fuses_exactly(seed):
    """``coefficients=False`` (a stage's one shared 3x3 conv): :meth:`SharedBasisConvNormAct.fuse`
    folds the block's norm set(s) into a plain fused conv on the shared weight; equal to eager at
    both norm sets, with and without a residual, over random shapes, strides and activations."""
    g = torch.Generator().manual_seed(seed)
    cin, cout = [int(v) for v in torch.randint(2, 12, (2,), generator=g)]
    stride, aware, act = 1 + seed % 2, seed % 3 != 0, ("relu", "identity")[seed % 2]
    basis = SharedBasis(cin, cout, 3)
    conv = SharedBasisConvNormAct(cin, cout, stride, 0, basis, act, aware, coefficients=False)
    with torch.no_grad():
        basis.weight.normal_(generator=g)
        for bn in [q for q in conv.modules() if isinstance(q, torch.nn.BatchNorm2d)]:
            bn.running_mean.copy_(torch.randn(cout, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(cout, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(cout, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(cout, generator=g) * 0.2)
    conv.eval()
    fused = conv.fuse("cpp")
    x = torch.randn(2, cin, 5 + seed, 7, generator=g)
    with torch.no_grad():
        for skip in ((False, True) if aware else (False,)):
            want = conv(x, skip)
            res = torch.randn(want.shape, generator=g)
            assert rel_err(fused(x, skip), want) <= 1e-5
            assert rel_err(fused(x, skip, residual=res), conv(x, skip, residual=res)) <= 1e-5
        if aware:
            assert not torch.allclose(fused(x, True), fused(x, False))
    basis2 = SharedBasis(4, 4)
    with pytest.raises(TypeError, match="without coefficients"):
        SharedBasisConvNormAct(4, 4, 1, 1, basis2).fuse()


def test_double_shared_penalty_is_the_authors_joint_one():
    """``bases=2`` (the authors' ``ResNet34_DoubleShared``): their ImageNet script
    (``train_ilsvrc.py``, ``train_basis_double``) stacks a stage's two bases into one
    ``B = cat(S_1, S_2)`` ``[2r, C 9]`` and penalises ``sum((B B^T - I)^2)``, summed over the
    four stages and divided by ``sum (2r)^2``, times ``--lambdaR``. Computed here directly and
    compared with ``orthogonality_penalty`` (default ``joint=True``) and with what the trainer's
    criterion logs; ``joint=False`` (each basis alone) differs by the cross terms."""
    torch.manual_seed(0)
    m = anydepth.create_model("resnet34-anydepth", num_classes=4, stem="3x3",
                              shared_bases=dict(shared_rank=4, unique_rank=1, bases=2)).train()
    with torch.no_grad():
        for b in shared_bases(m):
            b.weight.add_(0.05 * torch.randn_like(b.weight))
    sim, cnt, alone, alone_cnt = 0.0, 0, 0.0, 0
    for i in range(1, 5):
        b1, b2 = getattr(m.backbone, f"stage{i}").shared_bases
        w = torch.cat([b.weight.detach().double().reshape(b.rank, -1) for b in (b1, b2)])
        sim += float(((w @ w.t() - torch.eye(w.shape[0], dtype=torch.float64)) ** 2).sum())
        cnt += w.shape[0] ** 2
        for b in (b1, b2):
            v = b.weight.detach().double().reshape(b.rank, -1)
            alone += float(((v @ v.t() - torch.eye(b.rank, dtype=torch.float64)) ** 2).sum())
            alone_cnt += b.rank ** 2
    assert float(orthogonality_penalty(m).detach()) == pytest.approx(10 * sim / cnt, rel=1e-5)
    separate = float(orthogonality_penalty(m, weight=1.0, joint=False).detach())
    assert separate == pytest.approx(alone / alone_cnt, rel=1e-5)
    assert sim / cnt != pytest.approx(alone / alone_cnt, rel=1e-3)
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 3])
    crit = anydepth.losses.build_criterion(m)
    logs = two_pass_step(m, crit, x, y, m.resolve_depth("full"), m.resolve_depth("base"))
    assert logs["full/orth"] == pytest.approx(sim / cnt, rel=1e-5)
