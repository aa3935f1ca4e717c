"""Any-depth classifiers (Adaptive Depth Networks): ResNet-18/34/50/101 and MobileNetV2 against
torchvision with the same random weights and BatchNorm statistics, the paper's per-depth FLOPs,
the split and skip-aware norms of the authors' code, the inference form, and the criterion."""
import pytest
import torch
import torch.nn.functional as F

from helpers import needs_torchvision, rel_err

import anydepth
from anydepth.classify import IMAGENET_MEAN, IMAGENET_STD
from anydepth.losses.classify import ClassificationCriterion, features_kl, topk_kl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TV = {"resnet18": "resnet18-anydepth", "resnet34": "resnet34-anydepth", "resnet50": "resnet50-anydepth",
      "resnet101": "resnet101-anydepth", "mobilenet_v2": "mobilenetv2-anydepth"}


def _normalize(x):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def peers():
    """(torchvision model, ours) per architecture, random weights and BN statistics, 10 classes."""
    from anydepth.convert._torchvision import build_peer

    cache = {}

    def get(arch):
        if arch not in cache:
            peer, ours = build_peer(TV[arch], num_classes=10, seed=3)
            cache[arch] = (peer.model, ours)
        return cache[arch]

    return get


@needs_torchvision
@pytest.mark.parametrize("arch", list(TV))
def test_from_torchvision_exact_at_full_depth(peers, arch):
    tv_model, ours = peers(arch)
    assert ours.model_name == TV[arch]
    # the BN statistics are drawn, not the defaults
    bn = next(m for m in tv_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ref = tv_model(_normalize(x))
        out = ours(x)
        base = ours(x, depth="base")
    assert out.shape == (2, 10)
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(base, ref) > 1e-3            # the base net skips blocks: a different function


@needs_torchvision
def test_state_dict_file_import(tmp_path, peers):
    tv_model, ours = peers("resnet18")
    path = tmp_path / "resnet18-random.pth"
    torch.save(tv_model.state_dict(), path)
    model = anydepth.family.import_weights(str(path))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), tv_model(_normalize(x))) <= 1e-5
    with pytest.raises(ValueError, match="not a torchvision ResNet or MobileNetV2"):
        anydepth.convert.from_torchvision_state_dict({"foo.weight": torch.zeros(1)})


@needs_torchvision
def test_from_torchvision_rejects_variants():
    import torchvision

    with pytest.raises(ValueError, match="ResNeXt"):
        anydepth.convert.from_torchvision(torchvision.models.resnext50_32x4d(weights=None))
    with pytest.raises(ValueError, match="ResNet or MobileNetV2"):
        anydepth.convert.from_torchvision(torch.nn.Linear(2, 2))


def test_split_and_skip_aware_norms():
    from anydepth.nn import ConvNormAct

    m = anydepth.create_model("resnet50-anydepth", num_classes=10)
    assert m.depth_space.switches == ("stage1", "stage2", "stage3", "stage4")
    ref = [len(getattr(m.backbone, f"stage{i}").refinement) for i in range(1, 5)]
    ess = [len(getattr(m.backbone, f"stage{i}").essential) for i in range(1, 5)]
    assert (ess, ref) == ([2, 2, 3, 2], [1, 2, 3, 1])
    # the authors' ResNet: essential blocks' convs switch norms, the stem and the shortcut do not
    assert not m.backbone.stem[0].skip_aware
    first = m.backbone.stage2.essential.blocks[0]
    assert first.conv1.skip_aware and first.conv3.skip_aware and not first.shortcut.conv.skip_aware
    assert not any(c.skip_aware for c in m.backbone.stage3.refinement.modules() if isinstance(c, ConvNormAct))
    mv2 = anydepth.create_model("mobilenetv2-anydepth", num_classes=10)
    assert [len(getattr(mv2, f"stage{i}").essential) for i in range(1, 6)] == [1, 2, 2, 2, 2]
    assert [len(getattr(mv2, f"stage{i}").refinement) for i in range(1, 6)] == [1, 1, 2, 1, 1]
    assert mv2.stem.cna.skip_aware and mv2.head_conv.cna.skip_aware and mv2.last_block.project.skip_aware
    assert mv2.depth_space.base().code == "TTTTT"


def test_resnet50_flops_match_the_paper():
    """Adaptive Depth Networks, ResNet-50 at 224x224: FFFF 4.11 G, TTTT 2.58 G multiply-adds (our
    counter counts convolutions and matmuls, 2 FLOPs per multiply-add; within 1%)."""
    m = anydepth.create_model("resnet50-anydepth")                 # 1000 classes (the factory's default)
    assert m.num_classes == 1000 and m.model_kwargs == {"num_classes": 1000}
    full, base = m.flops("full") / 2e9, m.flops("base") / 2e9
    assert abs(full - 4.11) / 4.11 < 0.01, full
    assert abs(base - 2.58) / 2.58 < 0.01, base
    ladder = m.depth_configs((1, 3, 64, 64))
    assert ladder[0].code == "TTTT" and ladder[-1].code == "FFFF" and len(ladder) == 5


@pytest.mark.parametrize("name", ["resnet18-anydepth", "resnet50-anydepth", "mobilenetv2-anydepth"])
def test_inference_form_equals_eager_at_every_depth(name):
    """Every one of the 2^switches configurations (ResNet-50: its ladder)."""
    from anydepth_kernels import optimize

    torch.manual_seed(0)
    m = anydepth.create_model(name, num_classes=7)
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():   # distinct statistics per norm set
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    m.eval()
    x = torch.rand(2, 3, 64, 64)
    configs = m.depth_configs(x.shape) if name == "resnet50-anydepth" else list(m.depth_space.all_configs())
    with torch.no_grad():
        eager = {c: m(x, depth=c) for c in configs}
        fused = optimize(m)
        assert fused.is_inference
        for c in configs:
            assert rel_err(fused(x, depth=c), eager[c]) <= 1e-5, c.code


def test_classifier_input_checks_and_predict():
    m = anydepth.create_model("resnet18-anydepth", num_classes=5).eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        m(torch.rand(1, 3, 50, 64))
    with pytest.raises(ValueError, match="unknown switch"):
        m(torch.rand(1, 3, 64, 64), depth={"stage9": True})
    img = (torch.rand(3, 70, 90) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    out = m.predict([img, img], depth="base", imgsz=64, topk=3)
    assert len(out) == 2 and out[0].labels.shape == (3,) and torch.all(out[0].scores[:-1] >= out[0].scores[1:])
    # the same image as an HxWx3 uint8 tensor (as the detectors take it; what profile_depths passes)
    # and as a 3xHxW float tensor
    one = m.predict(img, depth="base", imgsz=64, topk=3)[0]
    hwc = torch.from_numpy(img.copy())
    for same in (hwc, hwc.permute(2, 0, 1).float() / 255):
        again = m.predict(same, depth="base", imgsz=64, topk=3)[0]
        assert torch.equal(again.labels, one.labels) and torch.equal(again.scores, one.scores)
    with pytest.raises(ValueError, match="HxWx3 uint8 or a 3xHxW tensor"):
        m.predict(torch.zeros(5, 8, 8), imgsz=64)


def test_criterion_terms():
    m = anydepth.create_model("resnet18-anydepth", num_classes=6)
    crit = ClassificationCriterion(m)
    torch.manual_seed(0)
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    labels = torch.tensor([0, 5, 2, 1])
    loss, logs = crit.gt_loss({"logits": s}, labels)
    assert torch.allclose(loss, 0.5 * F.cross_entropy(s, labels, label_smoothing=0.1))
    # top-k KL with k >= classes is the plain KL(teacher || student), batch-mean
    kl = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")
    assert torch.allclose(topk_kl(s, t, 500, 1.0), kl)
    # k < classes: both softmaxes over the teacher's top-k classes only
    idx = t.topk(3, 1).indices
    kl3 = F.kl_div(F.log_softmax(s.gather(1, idx), 1), F.softmax(t.gather(1, idx), 1), reduction="batchmean")
    assert torch.allclose(topk_kl(s, t, 3, 1.0), kl3)
    loss, logs = crit.distill_loss({"logits": s, "features": []}, {"logits": t, "features": []}, labels)
    assert torch.allclose(loss, 0.5 * kl) and "kd_features" not in logs
    fs, ft = [torch.randn(4, 8, 3, 3)], [torch.randn(4, 8, 3, 3)]
    crit_f = ClassificationCriterion(m, feature_kd=1.0)
    loss_f, logs_f = crit_f.distill_loss({"logits": s, "features": fs}, {"logits": t, "features": ft}, labels)
    feat = F.kl_div(F.log_softmax(fs[0], 1), F.softmax(ft[0], 1), reduction="sum") / 4
    assert torch.allclose(features_kl(fs, ft, 1.0), feat)
    assert torch.allclose(loss_f, 0.5 * (kl + feat))
    with pytest.raises(ValueError, match="class labels must be in"):
        crit.gt_loss({"logits": s}, torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="expected 4 class labels"):
        crit.gt_loss({"logits": s}, [0, 1])
    with pytest.raises(ValueError, match="non-empty list of features"):
        crit_f.distill_loss({"logits": s, "features": []}, {"logits": t, "features": []}, labels)


def test_forward_train_outputs():
    m = anydepth.create_model("resnet18-anydepth", num_classes=4).train()
    out = m.forward_train(torch.rand(2, 3, 64, 64), "base")
    assert out["logits"].shape == (2, 4) and [f.shape[1] for f in out["features"]] == [64, 128, 256]
    m.eval()
    with pytest.raises(RuntimeError, match="training mode"):
        m.forward_train(torch.rand(2, 3, 64, 64))


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    """A tiny synthetic classification set (ImageFolder, 32 px crops)."""
    from anydepth.data import classify

    root = tmp_path_factory.mktemp("cls")
    classify.synth(root, images=24, imgsz=32, split="train", progress=False)
    classify.synth(root, images=10, imgsz=32, seed=1, split="val", progress=False)
    return root


def test_synthetic_classification_set(cls_data):
    from anydepth.data import classify

    ds = classify.open_image_folder(cls_data / "train", imgsz=32, augment=True, seed=0)
    assert len(ds) == 24 and ds.classes == sorted(ds.classes) and ds.num_classes <= 5
    img, label = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and 0 <= label < ds.num_classes
    assert torch.equal(ds[3][0], ds[3][0])                       # augmentation: a function of (seed, epoch, i)
    x, y = classify.collate([ds[0], ds[1]])
    assert x.shape == (2, 3, 32, 32) and y.dtype == torch.long
    with pytest.raises(ValueError, match="not an image folder"):
        classify.open_image_folder(cls_data)


def test_train_and_eval_classifier(cls_data, tmp_path):
    """Two self-distillation steps, top-1 validation at full and base, then `anydepth eval`."""
    import json

    from anydepth.cli import main
    from anydepth.train import TrainConfig, Trainer

    cfg = TrainConfig(model="resnet18-anydepth", data=str(cls_data / "train"), val_data=str(cls_data / "val"),
                      out=str(tmp_path / "run"), epochs=1, batch_size=8, imgsz=32, workers=0,
                      max_steps_per_epoch=2, progress=False, device="cpu", ema=False)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    row = summary["history"][-1]
    assert row["train/base/kd_logits"] >= 0 and row["train/full/ce"] > 0
    assert 0 <= row["val/full/top1"] <= 1 and 0 <= row["val/base/top5"] <= 1
    assert main(["eval", "--weights", summary["final"], "--data", str(cls_data / "val"), "--imgsz", "32",
                 "--no-latency", "--quiet", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval-resnet18-anydepth-32.json").read_text())
    assert report["task"] == "classify" and [r["code"] for r in report["rows"]][::4] == ["TTTT", "FFFF"]
    assert all(0 <= r["metrics"]["top1"] <= r["metrics"]["top5"] <= 1 for r in report["rows"])
    # the checkpoints carry the class names (folder names, sorted), and `anydepth predict` shows them
    from anydepth.checkpoint import class_names

    classes = sorted(d.name for d in (cls_data / "train").iterdir() if d.is_dir())
    assert class_names(summary["final"]) == class_names(summary["last"]) == classes
    image = next(p for p in sorted((cls_data / "val").rglob("*")) if p.is_file())
    assert main(["predict", "--weights", summary["final"], "--source", str(image), "--save", str(tmp_path / "pred"),
                 "--imgsz", "32", "--topk", "1", "--quiet"]) == 0
    doc = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert doc["images"][0]["classes"][0]["name"] in classes and [c["name"] for c in doc["categories"]] == classes


@needs_torchvision
def test_finetune_from_torchvision_weights(cls_data, tmp_path, peers):
    """`anydepth train --weights resnet18.pth`: every tensor but the 10-class head is loaded, the
    shallow-path norms start as copies of torchvision's."""
    from anydepth.train import TrainConfig, Trainer

    tv_model, _ = peers("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(tv_model.state_dict(), path)
    trainer = Trainer(TrainConfig(model="resnet18-anydepth", data=str(cls_data / "train"), out=str(tmp_path / "r"),
                                  weights=str(path), imgsz=32, workers=0, progress=False, device="cpu",
                                  recipe="finetune"))
    m = trainer.model
    assert trainer.config.optimizer == "sgd" and trainer.lr == 1e-2
    assert torch.equal(m.backbone.stem[0].conv.weight, tv_model.conv1.weight)
    bn = m.backbone.stage2.essential.blocks[0].conv1.bn
    assert torch.equal(bn.bn_skip.running_var, tv_model.layer2[0].bn1.running_var)
    assert m.fc.out_features == trainer.train_set.num_classes


@needs_torchvision
def test_bench_classifier_against_torchvision():
    """`anydepth bench --model resnet18-anydepth`: every ladder depth, the fused form and the
    torchvision peer with the same weights in one run (smoke-sized; timing is not asserted)."""
    from anydepth import benchmark

    report = benchmark.run_model_benchmark("resnet18-anydepth", imgsz=64, rounds=1, warmup=1, progress=False)
    assert report.peer == "torchvision"
    assert [r.code for r in report.rows if r.name in ("base", "full")] == ["TTTT", "FFFF"]
    assert report.row("peer").params_m == pytest.approx(report.row("full").params_m, rel=0.01)
    summary = "\n".join(report.summary())
    assert "full/base: GFLOPs ratio" in summary and "vs torchvision eager, same weights" in summary
