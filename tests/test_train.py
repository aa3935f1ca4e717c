"""Trainer: schedule, EMA, parameter groups, the two-pass step, logs and checkpoints, resume,
data parallel on 2 CPU processes (gloo), the CLI."""
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import anydepth
from anydepth.train import (ModelEMA, TrainConfig, Trainer, load_matching_weights, lr_factor,
                            parameter_groups, two_pass_step)

IMGSZ = 64


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from anydepth.data import synth

    root = tmp_path_factory.mktemp("synth")
    synth.generate(str(root), images=8, imgsz=IMGSZ, seed=0, split="train", progress=False)
    synth.generate(str(root), images=4, imgsz=IMGSZ, seed=1, split="val", progress=False)
    return root


def _config(synth_dir, out, **kw):
    base = dict(model="yolov12n-anydepth", data=str(synth_dir / "train"), out=str(out), epochs=2, batch_size=4,
                imgsz=IMGSZ, workers=0, progress=False, eval_interval=0, seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# -- pieces -------------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine():
    total, warm = 100, 10
    assert lr_factor(0, total, warm, 0.05) == pytest.approx(0.1)
    assert lr_factor(9, total, warm, 0.05) == pytest.approx(1.0)
    assert lr_factor(10, total, warm, 0.05) == pytest.approx(1.0)
    mid = 10 + 45  # half-way through the cosine
    assert lr_factor(mid, total, warm, 0.05) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(total, total, warm, 0.05) == pytest.approx(0.05)
    values = [lr_factor(s, total, warm, 0.0) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_schedule_and_kd_warmup():
    from anydepth.train.trainer import kd_warmup_factor

    assert lr_factor(10, 110, 10, 0.01, "linear") == pytest.approx(1.0)
    assert lr_factor(60, 110, 10, 0.01, "linear") == pytest.approx(1 - 0.99 * 0.5)
    assert lr_factor(110, 110, 10, 0.01, "linear") == pytest.approx(0.01)
    assert kd_warmup_factor(0.0, 2.0) == 0.0
    assert kd_warmup_factor(1.0, 2.0) == pytest.approx(0.5)
    assert kd_warmup_factor(0.5, 2.0) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert kd_warmup_factor(2.0, 2.0) == 1.0 and kd_warmup_factor(0.0, 0.0) == 1.0


def test_finetune_recipe_and_training_student():
    from anydepth.train.trainer import training_student

    cfg = TrainConfig(model="yolov12n-anydepth", data="d", weights="w.pt", recipe="finetune", lr=5e-3).with_recipe()
    # the authors' args.yaml: SGD, lr0 1e-3 -> lrf 0.01, momentum 0.9, nbs 256, alpha_base 0.2; an explicit lr stays
    assert (cfg.optimizer, cfg.lr, cfg.min_lr_ratio, cfg.schedule, cfg.nbs, cfg.alpha_base, cfg.momentum) == \
        ("sgd", 5e-3, 0.01, "linear", 256, 0.2, 0.9)
    assert TrainConfig(model="rtdetr-r18-anydepth", data="d", weights="w", recipe="finetune").with_recipe().alpha_base \
        == 0.0
    with pytest.warns(UserWarning, match="without weights"):
        TrainConfig(model="yolov12n-anydepth", data="d", recipe="finetune").with_recipe()
    rt = anydepth.create_model("rtdetr-r18-anydepth", num_classes=3)
    student = training_student(rt, "base")  # the authors train the student with the full decoder
    assert all(student.skip.values()) and student.knobs == rt.resolve_depth("full").knobs
    assert training_student(rt, "shallowest") == rt.resolve_depth("base")
    assert training_student(rt, "none") is None
    y = anydepth.create_model("yolov12n-anydepth", num_classes=3)
    two = training_student(y, "backbone.p4, backbone.p5")
    assert [k for k, v in two.skip.items() if v] == ["backbone.p4", "backbone.p5"]
    with pytest.raises(ValueError, match="unknown switch"):
        training_student(y, "backbone.p9")
    for bad in (dict(alpha_base=1.5), dict(kd_warmup_epochs=-1), dict(kd_style="x"), dict(recipe="x"),
                dict(optimizer="adam"), dict(schedule="step"), dict(nbs=0), dict(momentum=1.0)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            TrainConfig(model="yolov12n-anydepth", data="d", **bad).validate()


def test_static_then_finetune_with_alpha_and_kd_warmup(synth_dir, tmp_path):
    from anydepth import checkpoint

    static = Trainer(_config(synth_dir, tmp_path / "static", epochs=1, shallow="none"))
    assert static.shallow is None
    static.fit()
    sd = checkpoint.read(str(tmp_path / "static" / "final.pt"))["state_dict"]
    skip_keys = [k for k in sd if ".bn_skip." in k]
    assert skip_keys and all(torch.equal(sd[k], sd[k.replace(".bn_skip.", ".bn.")]) for k in skip_keys)
    ft = Trainer(_config(synth_dir, tmp_path / "ft", epochs=2, weights=str(tmp_path / "static" / "final.pt"),
                         recipe="finetune", nbs=8, warmup_epochs=0.0, alpha_base=0.5, kd_warmup_epochs=2.0,
                         kd_style="legacy"))
    assert isinstance(ft.optimizer, torch.optim.SGD) and ft.accumulate == 2 and ft.loss_scale == 4.0
    assert (ft.criterion.distill_gt, ft.criterion.distill_kd, ft.criterion.kd_style) == (0.5, 0.5, "legacy")
    assert ft.weight_decay == pytest.approx(5e-4 * 4 * 2 / 8)
    ft.fit()
    hist = ft.history
    # the KD weight ramps over the 2 epochs (steps 0, 1 then 2, 3 of 4): mean per epoch
    assert hist[0]["train/base/kd_scale"] == pytest.approx(0.5 * (kd_warm(0, 2) + kd_warm(0.5, 2)))
    assert hist[1]["train/base/kd_scale"] == pytest.approx(0.5 * (kd_warm(1, 2) + kd_warm(1.5, 2)))


def kd_warm(e, w):
    return 0.5 * (1 - math.cos(math.pi * e / w))


def test_ema_update_math():
    lin = torch.nn.Linear(2, 1)
    bn = torch.nn.BatchNorm1d(1)
    model = torch.nn.Sequential(lin, bn)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = ModelEMA(model, decay=0.9, tau=1.0)
    with torch.no_grad():
        lin.weight.fill_(3.0)
        bn.running_mean.fill_(2.0)
        bn.num_batches_tracked.fill_(7)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1.0))
    assert ema.module[0].weight[0, 0].item() == pytest.approx(d * 1.0 + (1 - d) * 3.0)
    assert ema.module[1].running_mean.item() == pytest.approx((1 - d) * 2.0)
    assert ema.module[1].num_batches_tracked.item() == 7          # integer buffers copied
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.0)


def test_parameter_groups_no_decay_on_norms_and_biases():
    model = anydepth.create_model("yolov12n-anydepth", num_classes=3)
    groups = parameter_groups(model, 0.05, [("layers.0.", 0.1)])
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.layers[0].conv.weight)]["lr_scale"] == 0.1
    assert by_id[id(model.layers[0].conv.weight)]["weight_decay"] == 0.05
    assert by_id[id(model.layers[1].conv.weight)]["lr_scale"] == 1.0
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert by_id[id(p)]["weight_decay"] == 0.0, name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_load_matching_weights_skips_class_heads():
    src = anydepth.create_model("yolov12n-anydepth", num_classes=80)
    dst = anydepth.create_model("yolov12n-anydepth", num_classes=3)
    copied, skipped = load_matching_weights(dst, src.state_dict())
    assert skipped and all(".cv3." in k for k in skipped)      # only the class branch differs
    assert copied == len(src.state_dict()) - len(skipped)
    torch.testing.assert_close(dst.layers[0].conv.weight, src.layers[0].conv.weight)


@pytest.mark.parametrize("name", ["yolov12n-anydepth", "rtdetr-r18-anydepth"])
def test_two_pass_step_grads_shared_and_refinement(name):
    from anydepth.losses import build_criterion

    torch.manual_seed(0)
    kw = {"num_queries": 20} if name.startswith("rtdetr") else {}
    model = anydepth.create_model(name, num_classes=3, **kw).train()
    crit = build_criterion(model)
    x = torch.rand(2, 3, 96, 96)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 20.0, 90.0, 70.0], [5.0, 5.0, 25.0, 30.0]]),
                "labels": torch.tensor([0, 2])}]
    full, base = model.resolve_depth("full"), model.resolve_depth("base")

    def grads_after(distill):
        model.zero_grad(set_to_none=True)
        logs = two_pass_step(model, crit, x, targets, full, base, distill=distill)
        return logs, {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}

    logs, g = grads_after(True)
    assert math.isfinite(logs["full/loss"]) and math.isfinite(logs["base/loss"])
    # which parameters run only at full depth: those a base pass leaves without gradient
    model.zero_grad(set_to_none=True)
    out = model.forward_train(x, base, targets)
    crit.gt_loss(out, targets)[0].backward()
    base_used = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    refinement = [n for n, v in g.items() if v is not None and v.abs().sum() > 0 and n not in base_used]
    assert refinement, "no refinement-only parameter received a gradient from the full pass"
    shared = sorted(base_used & {n for n, v in g.items() if v is not None and v.abs().sum() > 0})
    assert shared, "the shared parameters received no gradient"
    # the shared gradient is the sum of both passes: differs from the full pass alone
    model.zero_grad(set_to_none=True)
    out = model.forward_train(x, full, targets)
    crit.gt_loss(out, targets)[0].backward()
    params = dict(model.named_parameters())
    # parameters both passes use (skip-aware norm sets used only at base depth are excluded)
    both = [n for n in shared if params[n].grad is not None and params[n].grad.abs().sum() > 0]
    assert both, "no parameter received a gradient from both passes"
    stem = both[0]
    assert not torch.allclose(params[stem].grad, g[stem])


# -- the loop -----------------------------------------------------------------------------------
def test_fit_writes_logs_and_checkpoints(synth_dir, tmp_path):
    cfg = _config(synth_dir, tmp_path / "run", val_data=str(synth_dir / "val"), eval_interval=1)
    summary = Trainer(cfg).fit()
    assert summary["epochs"] == 2 and summary["steps"] == 4 and not summary["stopped_early"]
    for f in ("final.pt", "last.pt", "log.csv", "log.json"):
        assert (tmp_path / "run" / f).is_file(), f
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2]
    row = log["epochs"][-1]
    assert row["train/full/loss"] > 0 and row["train/base/loss"] > 0
    assert 0.0 <= row["val/full/AP"] <= 100.0 and 0.0 <= row["val/base/AP"] <= 100.0
    csv_lines = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and "train/full/loss" in csv_lines[0]
    model = anydepth.load(str(tmp_path / "run" / "final.pt"))       # weights_only, rebuilds the model
    assert model.num_classes == 3 or model.num_classes == Trainer(cfg).train_set.num_classes
    out = model(torch.rand(1, 3, IMGSZ, IMGSZ), depth="base")
    assert torch.isfinite(out).all()


def test_resume_reproduces_the_uninterrupted_run(synth_dir, tmp_path):
    straight = Trainer(_config(synth_dir, tmp_path / "a", epochs=2))
    straight.fit()
    first = Trainer(_config(synth_dir, tmp_path / "b", epochs=2))
    first.fit(until_epoch=1)                       # interrupted after epoch 1
    assert not (tmp_path / "b" / "final.pt").exists()
    resumed = Trainer(_config(synth_dir, tmp_path / "b", epochs=2), resume=str(tmp_path / "b" / "last.pt"))
    assert resumed.epoch == 1 and resumed.step == 2
    resumed.fit()
    a = straight.model.state_dict()
    b = resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ea, eb = straight.ema.module.state_dict(), resumed.ema.module.state_dict()
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=0, msg=k)
    assert straight.history[-1]["train/loss"] == resumed.history[-1]["train/loss"]


def test_time_limit_stops_with_a_resumable_checkpoint(synth_dir, tmp_path):
    summary = Trainer(_config(synth_dir, tmp_path / "t", epochs=50, time_limit=1e-6)).fit()
    assert summary["stopped_early"] and summary["steps"] == 1
    assert (tmp_path / "t" / "last.pt").is_file()


def test_distill_off_trains_base_on_ground_truth(synth_dir, tmp_path):
    t = Trainer(_config(synth_dir, tmp_path / "off", epochs=1, distill=False))
    t.fit()
    keys = t.history[-1].keys()
    assert not any(k.startswith("train/base/kd") for k in keys)


def test_config_errors(synth_dir, tmp_path):
    with pytest.raises(ValueError, match="data"):
        Trainer(TrainConfig(model="yolov12n-anydepth"))
    with pytest.raises(ValueError, match="imgsz"):
        Trainer(_config(synth_dir, tmp_path, imgsz=70))
    with pytest.raises(ValueError, match="amp"):
        Trainer(_config(synth_dir, tmp_path, amp="bf16"))
    with pytest.raises(ValueError, match="amp"):
        Trainer(_config(synth_dir, tmp_path, amp="int4"))
    with pytest.raises(ValueError, match="no training recipe"):
        Trainer(_config(synth_dir, tmp_path, model="resnet50"))
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"modle": "x"})
    plain = tmp_path / "plain.pt"
    anydepth.save(anydepth.create_model("yolov12n-anydepth", num_classes=3), str(plain))
    with pytest.raises(ValueError, match="without training state"):
        Trainer(resume=str(plain))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        Trainer(resume=str(bad))


def test_fine_tune_from_checkpoint_with_other_classes(synth_dir, tmp_path):
    src = anydepth.create_model("yolov12n-anydepth", num_classes=80)
    path = tmp_path / "src.pt"
    anydepth.save(src, str(path))
    t = Trainer(_config(synth_dir, tmp_path / "ft", epochs=1, weights=str(path)))
    torch.testing.assert_close(t.model.layers[0].conv.weight, src.layers[0].conv.weight)


def _finite_losses_and_changed(trainer, before):
    row = trainer.history[-1]
    losses = {k: v for k, v in row.items() if k.startswith("train/") and k.endswith("loss")}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    after = trainer.model.state_dict()
    changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert changed, "no weight changed"
    return changed


def test_fine_tune_from_authors_yolo_builds_their_model(synth_dir, tmp_path):
    """`anydepth train --weights <the authors' file>` (no --model) builds the model the weights
    belong to: split="official" and their multipliers, every tensor loaded; one step trains it and
    the checkpoints record those options. Another --model is refused, naming the weights' model."""
    from helpers import load_authors_fixture

    from anydepth.convert import from_authors_yolo

    fx, sd = load_authors_fixture("authors_yolo_s.npz")
    path = tmp_path / "yolo-ad_sd.pt"
    torch.save({"model": sd}, path)   # what their one-line extraction writes (weights_only)
    cfg = _config(synth_dir, tmp_path / "ft", model=None, weights=str(path), epochs=1, batch_size=2,
                  max_steps_per_epoch=1, warmup_epochs=0.0, ema=False, augment=False, recipe="finetune")
    t = Trainer(cfg)
    assert t.config.model == "yolov12n-anydepth"  # the scale letter their widths read as (infer_yolo_config)
    assert t.config.model_kwargs == {"split": "official", "multipliers": [0.5, 0.25, 256]}
    assert t.model.split == "official" and t.model.multipliers == (0.5, 0.25, 256)
    ref = from_authors_yolo(sd).state_dict()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert before.keys() == ref.keys()
    differ = [k for k, v in before.items() if not torch.equal(v, ref[k])]
    assert differ and all(k.startswith("layers.21.cv3.") for k in differ)  # only the class heads (other classes)
    t.fit()
    changed = _finite_losses_and_changed(t, before)
    assert any(".bn_skip." in k for k in changed)  # the shallow pass trains its own norms
    again = anydepth.load(str(tmp_path / "ft" / "final.pt"))
    assert again.split == "official" and again.multipliers == (0.5, 0.25, 256)
    with pytest.raises(ValueError, match="leave the model unset"):
        Trainer(_config(synth_dir, tmp_path / "other", model="yolov12s-anydepth", weights=str(path)))


def test_fine_tune_from_authors_rtdetr_builds_their_model(synth_dir, tmp_path):
    """The same for the authors' RT-DETR (their training checkpoint): rtdetr-r50, split="official",
    their weights loaded (the class heads excepted: other classes); an option the state dict cannot
    hold (the query count) is set with model_kwargs. (Building only: an R50 step with its
    checkpoints costs more than this suite affords; the YOLO test above trains.)"""
    from helpers import load_authors_fixture

    fx, sd = load_authors_fixture("authors_rtdetr_r50.npz")
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}  # a smaller file
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "ema": {"module": sd, "updates": 1}}, path)
    cfg = _config(synth_dir, tmp_path / "rt", model=None, weights=str(path), epochs=1, batch_size=2,
                  ema=False, model_kwargs={"num_queries": fx["num_queries"]})
    t = Trainer(cfg)
    assert t.config.model == "rtdetr-r50-anydepth" and t.model.split == "official"
    assert t.config.model_kwargs == {"split": "official", "encoder_hidden_dim": 64, "encoder_ffn_dim": 128,
                                     "d_model": 64, "decoder_ffn_dim": 128, "num_queries": fx["num_queries"]}
    own = t.model.state_dict()
    for ours, theirs in (("backbone.stem.0.conv.weight", "backbone.conv1.weight"),
                         ("backbone.stage3.essential.blocks.2.conv2.bn.bn_skip.running_var",
                          "backbone.layer3.2.bn2_skip.running_var"),
                         ("encoder.pan_blocks.1.bottlenecks.refinement.blocks.1.conv1.conv.weight",
                          "encoder.pan_blocks.1.bottlenecks.2.conv1.conv.weight"),
                         ("decoder.layers.5.encoder_attn.sampling_offsets.weight",
                          "decoder.decoder.layers.5.cross_attn.sampling_offsets.weight")):
        assert torch.equal(own[ours], sd[theirs].float()), ours
    assert own["decoder.class_embed.0.weight"].shape[0] != sd["decoder.dec_score_head.0.weight"].shape[0]


# -- distributed: 2 CPU processes, gloo ---------------------------------------------------------
DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from anydepth.train import TrainConfig, Trainer
    cfg = TrainConfig(model="yolov12n-anydepth", data=sys.argv[1], out=sys.argv[2], epochs=1, batch_size=4,
                      imgsz=64, workers=0, progress=False, eval_interval=0, device="cpu", augment=False)
    t = Trainer(cfg)
    seen = [int(i) for i in t.sampler]
    t.fit()
    flat = torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])
    torch.save({"params": flat, "seen": seen, "world": t.dist.world, "steps": t.step},
               os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
""")


def test_data_parallel_two_processes_gloo(synth_dir, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(synth_dir / "train"), str(out)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 2
    assert not set(r0["seen"]) & set(r1["seen"])               # each rank trains on its own shard
    assert torch.equal(r0["params"], r1["params"])              # gradients were averaged: same weights
    start = anydepth.create_model("yolov12n-anydepth", num_classes=3)
    assert (out / "final.pt").is_file()
    assert not torch.equal(r0["params"], torch.cat([p.reshape(-1) for p in start.parameters()]))


# -- command line -------------------------------------------------------------------------------
def test_cli_synth_train_eval(tmp_path):
    from anydepth.cli import main

    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--images", "6", "--val-images", "3", "--imgsz", "64",
                 "--quiet"]) == 0
    assert (data / "train" / "annotations.json").is_file() and (data / "val" / "annotations.json").is_file()
    run = tmp_path / "run"
    assert main(["train", "--model", "yolov12n-anydepth", "--data", str(data / "train"), "--epochs", "1",
                 "--batch-size", "3", "--imgsz", "64", "--workers", "0", "--progress", "off", "--device", "cpu",
                 "--distill", "off", "--loss", "box=5.0", "--out", str(run)]) == 0
    assert main(["eval", "--weights", str(run / "final.pt"), "--data", str(data / "val"), "--imgsz", "64",
                 "--depths", "full,base", "--no-latency", "--device", "cpu", "--quiet", "--out",
                 str(tmp_path / "eval")]) == 0
    files = os.listdir(tmp_path / "eval")
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".png") for f in files)
    assert "eval-yolov12n-anydepth-64-depths.png" in files  # the per-depth detections picture
    assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "2", "--out", str(run),
                 "--progress", "off"]) == 0
    assert json.loads((run / "log.json").read_text())["epochs"][-1]["epoch"] == 2


def test_demo_end_to_end_tiny(tmp_path, monkeypatch):
    import anydepth.demo_report
    from anydepth.demo import DemoRun, run_demo

    monkeypatch.setattr(anydepth.demo_report, "PROFILE_ROUNDS", 2)  # the shared latency profile: 2 rounds

    ft = {"recipe": "finetune", "nbs": 3}
    runs = [DemoRun("yolov12n-static", "yolov12n-anydepth", False, 1, 3, IMGSZ, 5.0, shallow="none", stage="static"),
            DemoRun("yolov12n-distill", "yolov12n-anydepth", True, 1, 3, IMGSZ, 5.0, init_from="yolov12n-static",
                    options=ft, stage="distill"),
            DemoRun("yolov12n-no-distill", "yolov12n-anydepth", False, 1, 3, IMGSZ, 5.0,
                    init_from="yolov12n-static", options=ft, stage="no-distill")]
    results = run_demo(str(tmp_path / "demo"), images=6, val_images=3, imgsz=IMGSZ, runs=runs, workers=0,
                       progress=False)
    md = (tmp_path / "demo" / "RESULTS.md").read_text()
    assert "| full |" in md and "| base |" in md and "stage 1 (static) full AP" in md
    rows = results["runs"]["yolov12n-distill"]["rows"]
    assert [r["name"] for r in rows][0] == "base" and rows[-1]["name"] == "full" and len(rows) == 9
    assert all(0.0 <= r["AP"] <= 1.0 for r in rows)
    on = results["runs"]["yolov12n-distill"]
    assert (on["optimizer"], on["alpha_base"], on["init_from"]) == ("sgd", 0.2, "yolov12n-static")
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["runs"].keys() == results["runs"].keys()
    # the report side: one latency profile shared by the runs, per-run plots and pictures, the
    # comparison plot, all embedded in RESULTS.md
    demo = tmp_path / "demo"
    assert results["comparisons"] == {"yolov12n-anydepth": "compare-yolov12n-anydepth.png"}
    for tag in ("yolov12n-static", "yolov12n-distill", "yolov12n-no-distill"):
        plots = results["runs"][tag]["plots"]
        assert plots == {"tradeoff": f"{tag}/eval-{tag}.png", "depths": f"{tag}/eval-{tag}-depths.png"}
        assert results["runs"][tag]["latency"]["source"] == "profile"
    lat = [[r["latency_ms"] for r in results["runs"][t]["rows"]] for t in ("yolov12n-distill", "yolov12n-no-distill")]
    assert lat[0] == lat[1] and all(x > 0 for x in lat[0])
    embedded = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert "compare-yolov12n-anydepth.png" in embedded
    assert "yolov12n-distill/eval-yolov12n-distill-depths.png" in embedded
    for rel in embedded:
        with open(demo / rel, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "AP, AP50, AP75 in percent (results.json and the eval-*.json reports keep fractions" in md
    # --eval-only: the finished runs evaluated again from their final.pt, training fields kept
    from anydepth.demo import main as demo_main

    before = json.loads((demo / "results.json").read_text())
    assert demo_main(["--out", str(demo), "--eval-only", "--only", "yolov12n-distill", "--no-latency", "--quiet",
                      "--imgsz", str(IMGSZ), "--yolo-imgsz", str(IMGSZ), "--images", "6", "--val-images", "3"]) == 0
    after = json.loads((demo / "results.json").read_text())
    run_after, run_before = after["runs"]["yolov12n-distill"], before["runs"]["yolov12n-distill"]
    assert run_after["steps"] == run_before["steps"] and run_after["train_minutes"] == run_before["train_minutes"]
    assert [r["AP"] for r in run_after["rows"]] == [r["AP"] for r in run_before["rows"]]
    assert all(r["latency_ms"] is None for r in run_after["rows"])



def test_demo_run_on_its_own_synthetic_size(tmp_path):
    """A run with ``data_imgsz`` (RT-DETR's 64-px set in ``make demo``) trains and is evaluated on a
    set drawn at that size, next to the main set, and says so in results.json."""
    from anydepth.demo import DemoRun, default_runs, run_demo

    runs = [DemoRun("yolov12n-static", "yolov12n-anydepth", False, 1, 3, IMGSZ, 5.0, shallow="none",
                    stage="static", data_imgsz=IMGSZ)]
    results = run_demo(str(tmp_path / "demo"), images=6, val_images=3, imgsz=96, runs=runs, workers=0,
                       progress=False, latency=False)
    for size, folder in ((96, "data"), (IMGSZ, f"data-{IMGSZ}")):
        for split, n in (("train", 6), ("val", 3)):
            ann = json.loads((tmp_path / "demo" / folder / split / "annotations.json").read_text())
            assert len(ann["images"]) == n
            assert max(max(im["width"], im["height"]) for im in ann["images"]) == size
    run = results["runs"]["yolov12n-static"]
    assert run["data_imgsz"] == IMGSZ and run["imgsz"] == IMGSZ
    rt = {r.tag: r for r in default_runs() if r.model.startswith("rtdetr")}
    assert {r.data_imgsz for r in rt.values()} == {64} and {r.imgsz for r in rt.values()} == {64}
    assert rt["rtdetr-r18-distill"].init_from == rt["rtdetr-r18-no-distill"].init_from == "rtdetr-r18-static"

def _coco_results(model, x, depth):
    """The model's raw queries as COCO detections (score = best class probability)."""
    with torch.no_grad():
        out = model(x, depth=depth)
    size = x.shape[-1]
    res = []
    for i in range(x.shape[0]):
        score, cls = out["logits"][i].sigmoid().max(-1)
        cx, cy, w, h = (out["pred_boxes"][i] * size).unbind(-1)
        for q in range(score.shape[0]):
            res.append(dict(image_id=i + 1, category_id=int(cls[q]) + 1, score=float(score[q]),
                            bbox=[float(cx[q] - w[q] / 2), float(cy[q] - h[q] / 2), float(w[q]), float(h[q])]))
    return res


@pytest.mark.slow
def test_rtdetr_self_distillation_overfits_two_images_at_both_depths():
    """End to end through denoising queries, Hungarian matching, the two-pass step and AdamW: two
    images with three objects are learnt at full depth (ground truth) and at base depth (the
    distillation loss), measured by COCO AP of the raw queries (~1 min on 2 cores)."""
    from anydepth.evaluation import coco_evaluate
    from anydepth.losses import build_criterion

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 96, 96, generator=g) * 0.3
    boxes = [torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 90.0, 50.0]]),
             torch.tensor([[20.0, 30.0, 80.0, 85.0]])]
    labels = [torch.tensor([0, 1]), torch.tensor([1])]
    anns = []
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        for (x1, y1, x2, y2), c in zip(b.tolist(), lab.tolist()):
            x[i, c, int(y1):int(y2), int(x1):int(x2)] = 1.0  # class 0 red, class 1 green
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=c + 1, iscrowd=0,
                             bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1)))
    gt = dict(images=[dict(id=i, width=96, height=96) for i in (1, 2)], annotations=anns,
              categories=[dict(id=1, name="red"), dict(id=2, name="green")])
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
    model = anydepth.create_model("rtdetr-r18-anydepth", num_classes=2, num_queries=20).train()
    crit = build_criterion(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4)
    full, base = model.resolve_depth("full"), model.resolve_depth("base")
    model.eval()
    before = {d: coco_evaluate(gt, _coco_results(model, x, d))["AP50"] for d in (full, base)}
    model.train()
    first = last = None
    for _ in range(120):
        opt.zero_grad(set_to_none=True)
        logs = two_pass_step(model, crit, x, targets, full, base, distill=True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        first = first or logs
        last = logs
    assert last["full/loss"] < 0.3 * first["full/loss"] and last["base/loss"] < 0.3 * first["base/loss"]
    model.eval()
    for depth in (full, base):
        m = coco_evaluate(gt, _coco_results(model, x, depth))
        assert before[depth] < 0.5, before  # not solved by chance at initialisation
        assert m["AP50"] >= 0.9 and m["AP"] >= 0.6, (depth.code, m)
