"""Any-depth ViT and Swin classifiers: structure (the authors' grouping and skip-aware norms),
import from timm and torchvision (exact at full depth), per-depth FLOPs against the paper's
figures, and the inference form (our fused attention) against the eager model."""
import itertools

import pytest
import torch

import anydepth
from anydepth.convert import from_timm, from_torchvision_transformer, from_vit_swin_state_dict
from anydepth.convert._timm import call_peer, randomize_transformer_
from anydepth.family import family_of, import_weights
from anydepth.models.swin import AnyDepthSwin
from anydepth.models.vit import AnyDepthViT
from anydepth.nn import SkipAwareLayerNorm
from anydepth_kernels import optimize
from helpers import needs_timm, needs_torchvision, rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# tiny configurations: 2 switchable stages each
VIT_TINY = dict(img_size=32, patch_size=16, embed_dim=32, depth=6, num_heads=2, num_classes=10)
SWIN_TINY = dict(img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2, 3), num_heads=(1, 2, 4),
                 num_classes=10)


def _all_depths(model):
    return list(model.depth_space.all_configs())


@pytest.fixture(scope="module")
def full_size():
    """The full-size ViT-B/16 and Swin-T (built once: FLOPs, parameter counts, structure)."""
    return {name: anydepth.create_model(name, num_classes=1000).eval()
            for name in ("vit-b16-anydepth", "swin-t-anydepth")}


@pytest.fixture(scope="module")
def timm_vit():
    timm = pytest.importorskip("timm")
    m = timm.models.VisionTransformer(**VIT_TINY)
    return randomize_transformer_(m, 1).eval()


@pytest.fixture(scope="module")
def timm_swin():
    timm = pytest.importorskip("timm")
    m = timm.models.SwinTransformer(**SWIN_TINY)
    return randomize_transformer_(m, 2).eval()


# -- structure ---------------------------------------------------------------------------------------
def test_vit_b16_grouping_and_skip_aware_norms(full_size):
    """The authors' grouping: 12 blocks = 4 stages of 3; the last block of each is the
    refinement path; both norms of the 8 essential blocks are skip-aware, nothing else is."""
    m = full_size["vit-b16-anydepth"]
    assert m.depth_space.switches == ("stage1", "stage2", "stage3", "stage4")
    assert [(len(s.essential.blocks), len(s.refinement.blocks)) for s in m.stages] == [(2, 1)] * 4
    for s in m.stages:
        assert all(isinstance(b.norm1, SkipAwareLayerNorm) and isinstance(b.norm2, SkipAwareLayerNorm)
                   for b in s.essential.blocks)
        assert not any(isinstance(n, SkipAwareLayerNorm) for n in s.refinement.modules())
    assert not isinstance(m.norm, SkipAwareLayerNorm)
    assert m.default_input_shape == (1, 3, 224, 224) and family_of(m).task == "classify"


def test_swin_t_split_and_skip_aware_merging(full_size):
    """Swin-T [2, 2, 6, 2] keeps [1, 1, 3, 1] (the authors' depths_base); the patch merging that
    feeds a stage has a skip-aware norm and belongs to that stage's essential path."""
    m = full_size["swin-t-anydepth"]
    assert [(len(s.essential.blocks), len(s.refinement.blocks)) for s in m.stages] == [(1, 1), (1, 1), (3, 3), (1, 1)]
    assert m.stages[0].essential.downsample is None
    assert all(isinstance(s.essential.downsample.norm, SkipAwareLayerNorm) for s in m.stages[1:])
    # shifted windows on every second block, none at the 7x7 last stage (window = side)
    shifts = [[b.attn.shift for b in blocks] for blocks in m.blocks()]
    assert shifts == [[0, 3], [0, 3], [0, 3, 0, 3, 0, 3], [0, 0]]
    assert not isinstance(m.patch_embed.norm, SkipAwareLayerNorm) and not isinstance(m.norm, SkipAwareLayerNorm)


@needs_timm
def test_full_size_parameter_counts_match_timm(full_size):
    """The full-size factories are timm's models plus the shallow-path LayerNorm sets."""
    import timm

    for ours_name, timm_name, extra in (
            ("vit-b16-anydepth", "vit_base_patch16_224", 8 * 2 * 2 * 768),
            # 6 essential blocks' norms + 3 patch-merging norms (4C wide)
            ("swin-t-anydepth", "swin_tiny_patch4_window7_224",
             2 * 2 * (96 + 192 + 3 * 384 + 768) + 2 * 4 * (96 + 192 + 384))):
        ours = full_size[ours_name]
        with torch.device("meta"):
            peer = timm.create_model(timm_name, pretrained=False)
        n_ours = sum(p.numel() for p in ours.parameters())
        n_peer = sum(p.numel() for p in peer.parameters())
        assert n_ours == n_peer + extra, (ours_name, n_ours, n_peer)


def test_shallow_norm_sets_are_used_only_when_skipped():
    torch.manual_seed(0)
    for m in (AnyDepthViT(**VIT_TINY), AnyDepthSwin(**SWIN_TINY)):
        m.eval()
        x = torch.rand(2, 3, VIT_TINY["img_size"] if isinstance(m, AnyDepthViT) else SWIN_TINY["img_size"],
                       VIT_TINY["img_size"] if isinstance(m, AnyDepthViT) else SWIN_TINY["img_size"])
        with torch.no_grad():
            full, base = m(x, "full"), m(x, "base")
            for n in m.modules():
                if isinstance(n, SkipAwareLayerNorm):
                    n.ln_skip.bias.add_(0.3)
            assert torch.equal(m(x, "full"), full)
            assert rel_err(m(x, "base"), base) > 1e-3


def test_input_checks():
    m = AnyDepthViT(**VIT_TINY).eval()
    with pytest.raises(ValueError, match="takes 32x32 inputs"):
        m(torch.rand(1, 3, 48, 48))
    with pytest.raises(ValueError, match="stage_blocks"):
        AnyDepthViT(**{**VIT_TINY, "stage_blocks": (3, 2)})
    with pytest.raises(ValueError, match="not divisible"):
        AnyDepthViT(**{**VIT_TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="multiple of"):
        AnyDepthSwin(**{**SWIN_TINY, "img_size": 40})
    with pytest.raises(ValueError, match="windows"):  # 20x20 first stage, window 8
        AnyDepthSwin(**{**SWIN_TINY, "img_size": 80, "window_size": 8})
    s = AnyDepthSwin(**SWIN_TINY).eval()
    with pytest.raises(ValueError, match="takes 64x64 inputs"):
        s(torch.rand(1, 3, 128, 128))


# -- import: exact at full depth -----------------------------------------------------------------------
@needs_timm
@pytest.mark.parametrize("stage_blocks", [None, (2, 4)])
def test_vit_from_timm_exact(timm_vit, stage_blocks):
    ours = from_timm(timm_vit, stage_blocks=stage_blocks)
    assert isinstance(ours, AnyDepthViT) and ours.stage_blocks == (stage_blocks or (3, 3))
    assert ours.mean == (0.485, 0.456, 0.406)  # a bare timm model has no pretrained_cfg: ImageNet's
    # a full-depth pass reads every weight but the shallow norm sets (class token, position embedding too)
    assert ours.params_used("full") == sum(p.numel() for p in timm_vit.parameters())
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref = call_peer(timm_vit, x)
        assert rel_err(ours(x), ref) <= 1e-5
        # every shallower depth runs and differs (the refinement blocks are skipped)
        for d in _all_depths(ours)[1:]:
            assert rel_err(ours(x, d), ref) > 1e-3
        # the registry rebuilds the same model from the recorded name and options
        again = anydepth.create_model(ours.model_name, **ours.model_kwargs).eval()
        again.load_state_dict(ours.state_dict())
        assert torch.equal(again(x, "base"), ours(x, "base"))


@needs_timm
def test_swin_from_timm_exact(timm_swin):
    ours = from_timm(timm_swin)
    assert isinstance(ours, AnyDepthSwin) and ours.depth_space.switches == ("stage1", "stage2", "stage3")
    assert ours.params_used("full") == sum(p.numel() for p in timm_swin.parameters())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = call_peer(timm_swin, x)
        assert rel_err(ours(x), ref) <= 1e-5
        assert rel_err(ours(x, "base"), ref) > 1e-3
        again = anydepth.create_model(ours.model_name, **ours.model_kwargs).eval()
        again.load_state_dict(ours.state_dict())
        assert torch.equal(again(x), ours(x))


@needs_timm
def test_checkpoint_round_trip(tmp_path, timm_vit, timm_swin):
    for src in (timm_vit, timm_swin):
        ours = from_timm(src)
        anydepth.save(ours, str(tmp_path / "m.pt"))
        back = anydepth.load(str(tmp_path / "m.pt")).eval()
        assert type(back) is type(ours) and back.mean == ours.mean
        size = ours.img_size
        x = torch.rand(1, 3, size, size)
        with torch.no_grad():
            assert torch.equal(back(x, "base"), ours(x, "base"))


@needs_timm
def test_timm_vit_b16_peer_exact_at_224():
    """The benchmark peer path at a real size (ViT-Ti/16 at 224: 197 tokens, 12 blocks)."""
    from anydepth.convert._timm import build_peer

    peer, ours = build_peer("vit-ti16-anydepth", num_classes=1000, seed=0)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(ours(x), call_peer(peer, x)) <= 1e-5


@needs_timm
def test_from_timm_refuses_what_it_cannot_build():
    import timm

    with pytest.raises(ValueError, match="global_pool"):
        from_timm(timm.models.VisionTransformer(**VIT_TINY, global_pool="avg"))
    with pytest.raises(ValueError, match="class token"):
        from_timm(timm.models.VisionTransformer(**VIT_TINY, reg_tokens=2))
    with pytest.raises(ValueError, match="no place for"):  # layer scale gammas
        from_timm(timm.models.VisionTransformer(**VIT_TINY, init_values=0.1))
    with pytest.raises(ValueError, match="not supported"):
        from_timm(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="timm model"):
        from_timm({"a": torch.zeros(1)})


@needs_torchvision
def test_from_torchvision_exact():
    import torchvision

    torch.manual_seed(0)
    tv_vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=6, num_heads=2,
                                                  hidden_dim=32, mlp_dim=64, num_classes=10)
    tv_swin = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2, 3],
                                                 num_heads=[1, 2, 4], window_size=[4, 4], num_classes=10)
    for tv, size, family in ((tv_vit, 32, "vit"), (tv_swin, 64, "swin")):
        randomize_transformer_(tv, 3).eval()
        ours = from_torchvision_transformer(tv, img_size=size)
        x = torch.rand(2, 3, size, size)
        with torch.no_grad():
            assert rel_err(ours(x), tv(ours.normalize(x))) <= 1e-5
        # the family's "torchvision" converter is the public dispatcher (as for ResNet/MobileNetV2),
        # and it builds the same model
        converter = family_of(family).converters["torchvision"]
        assert converter.target == "anydepth.convert:from_torchvision"
        assert family_of("resnet18-anydepth").converters["torchvision"].target == converter.target
        via = converter(tv, img_size=size)
        assert type(via) is type(ours) and via.model_kwargs == ours.model_kwargs
        sd = ours.state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in via.state_dict().items()) and via.state_dict().keys() == sd.keys()
    with pytest.raises(ValueError, match="multiple of the 4x4 window"):
        from_torchvision_transformer(tv_swin, img_size=96)


@needs_timm
@needs_torchvision
def test_weights_files_import_through_the_family(tmp_path, timm_vit, timm_swin):
    """A timm or torchvision state-dict file (the architecture read from keys and shapes) imports
    through anydepth.import_weights and equals the source model at full depth."""
    import torchvision

    tv_vit = randomize_transformer_(torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=6, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10), 6).eval()
    tv_swin = randomize_transformer_(torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2, 3], num_heads=[1, 2, 4], window_size=[4, 4],
        num_classes=10), 7).eval()
    cases = [(timm_vit, "vit", {"num_heads": 2}), (timm_swin, "swin", {"img_size": 64}),
             (tv_vit, "vit", {"num_heads": 2}), (tv_swin, "swin", {"img_size": 64})]
    for i, (src, family, kw) in enumerate(cases):
        path = str(tmp_path / f"w{i}.pth")
        torch.save({"model": src.state_dict()}, path)
        ours = from_vit_swin_state_dict(path, **kw)
        assert family_of(ours).name == family
        size = ours.img_size
        x = torch.rand(2, 3, size, size)
        with torch.no_grad():
            assert rel_err(ours(x), src(ours.normalize(x))) <= 1e-5
    # the family route (defaults: heads = width / 64, 224 px): the full-width check is the timm
    # ViT-Ti/16 layout (192 wide, 3 heads)
    path = str(tmp_path / "ti.pth")
    timm = pytest.importorskip("timm")
    ti = randomize_transformer_(timm.models.VisionTransformer(embed_dim=192, depth=2, num_heads=3, num_classes=5), 8)
    torch.save(ti.state_dict(), path)
    ours = import_weights(path)
    assert isinstance(ours, AnyDepthViT) and ours.blocks()[0].attn.num_heads == 3
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(ours(x), ti.eval()(ours.normalize(x))) <= 1e-5
    torch.save({"a.weight": torch.zeros(2)}, str(tmp_path / "junk.pth"))
    with pytest.raises(ValueError, match="not"):
        from_vit_swin_state_dict(str(tmp_path / "junk.pth"))


# -- FLOPs: the paper's ladder ---------------------------------------------------------------------------
# multiply-adds (G) at 224x224: Adaptive Depth Networks, wchkang/depth README. ViT FLOPs are linear in
# the skipped blocks (checked exactly below), so three rows pin the ladder (its FFFT row, 16.20,
# disagrees with the other rows' arithmetic, 16.13; ours 16.11)
PAPER_GMACS = {
    "vit-b16-anydepth": {"FFFF": 17.58, "TTFF": 14.67, "TTTT": 11.76},  # FFFT 16.20, TTFT 13.21: linear
    "swin-t-anydepth": {"FFFF": 4.49, "TFFF": 4.11, "TTFF": 3.75, "TTTT": 2.34},
}


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_flops_match_the_paper(name, full_size):
    m = full_size[name]
    for code, gmacs in PAPER_GMACS[name].items():
        ours = m.flops(m.depth_space.from_code(code)) / 2e9
        assert abs(ours - gmacs) / gmacs < 0.01, (code, ours, gmacs)
    if name == "vit-b16-anydepth":  # the attention matmuls are counted: 2 x 197^2 x 768 MACs per block
        per_block = 197 * (4 * 768 ** 2 + 2 * 768 * 3072) + 2 * 197 ** 2 * 768
        full, base = m.flops("full") / 2, m.flops("base") / 2
        assert full - base == 4 * per_block


# -- inference form ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_optimized_vit_matches_eager(backend):
    torch.manual_seed(0)
    m = randomize_transformer_(AnyDepthViT(**VIT_TINY), 4).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = {d: m(x, d) for d in _all_depths(m)}
        flops = m.flops("full")
    opt, report = optimize(m, backend=backend, return_report=True)
    assert opt.is_inference and all(a.use_kernel for a in (b.attn for b in opt.blocks()))
    assert "AnyDepthViT" in " ".join(report.notes)
    with torch.no_grad():
        for d, r in ref.items():
            assert rel_err(opt(x, d), r) <= 1e-5
    assert opt.flops("full") == flops  # the fused op is counted like the eager attention
    with pytest.raises(RuntimeError, match="inference"):
        opt.train()


def test_optimized_swin_is_the_eager_model():
    """Window attention (position bias + shift mask) stays eager: the inference form equals it."""
    torch.manual_seed(0)
    m = randomize_transformer_(AnyDepthSwin(**SWIN_TINY), 5).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = {d: m(x, d) for d in _all_depths(m)}
    opt = optimize(m)
    assert opt.is_inference
    with torch.no_grad():
        for d, r in ref.items():
            assert torch.equal(opt(x, d), r)


# -- training pass ----------------------------------------------------------------------------------------
def test_forward_train_features_and_gradients():
    torch.manual_seed(0)
    for m, size in ((AnyDepthViT(**VIT_TINY), 32), (AnyDepthSwin(**SWIN_TINY), 64)):
        m.train()
        x = torch.rand(2, 3, size, size)
        full = m.forward_train(x, "full")
        base = m.forward_train(x, "base")
        assert full["logits"].shape == (2, 10)
        assert [f.shape for f in full["features"]] == [f.shape for f in base["features"]]
        # the family's criterion (the paper's two passes), with the feature term on
        crit = family_of(m).build_criterion(m, feature_kd=1.0)
        labels = torch.tensor([1, 7])
        gt, _ = crit.gt_loss(full, labels)
        kd, logs = crit.distill_loss(base, full, labels)
        assert torch.isfinite(gt) and torch.isfinite(kd) and logs["kd_features"] > 0
        m.zero_grad()
        kd.backward()
        for n in m.modules():  # the shallow pass trains the shallow norm sets, not the full ones
            if isinstance(n, SkipAwareLayerNorm):
                assert n.ln_skip.weight.grad is not None and n.ln.weight.grad is None
        for stage in m.stages:  # and never reaches the skipped refinement blocks
            assert all(p.grad is None for p in stage.refinement.parameters())


def test_all_depths_are_distinct_and_ordered_by_flops():
    m = AnyDepthViT(**VIT_TINY).eval()
    configs = list(itertools.islice(m.depth_configs(), 10))
    assert configs[0] == m.depth_space.base() and configs[-1] == m.depth_space.full()
    f = [m.flops(c) for c in configs]
    assert f == sorted(f) and f[0] < f[-1]


def test_stochastic_depth_only_in_training_and_never_on_the_shallow_path():
    torch.manual_seed(0)
    for cls, cfg, size in ((AnyDepthViT, VIT_TINY, 32), (AnyDepthSwin, SWIN_TINY, 64)):
        m = cls(**cfg, drop_path=0.5)
        plain = cls(**cfg)
        plain.load_state_dict(m.state_dict())
        x = torch.rand(4, 3, size, size)
        with torch.no_grad():
            m.eval(), plain.eval()
            assert torch.equal(m(x), plain(x))  # eval: identity
            m.train()
            base = [m.forward_train(x, "base")["logits"] for _ in range(2)]
            full = [m.forward_train(x, "full")["logits"] for _ in range(3)]
        assert torch.equal(base[0], base[1])  # shallow path: no stochastic depth (the authors' base-net)
        assert not (torch.equal(full[0], full[1]) and torch.equal(full[1], full[2]))
    with pytest.raises(ValueError, match="drop_path"):
        AnyDepthViT(**VIT_TINY, drop_path=1.0)
