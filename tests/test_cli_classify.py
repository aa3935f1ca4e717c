"""The budget/deployment subcommands on a classifier (task "classify"): ``anydepth predict`` prints
and saves the top-k classes per image (names from the checkpoint), ``profile`` times the
classifier's depths, ``predict --budget-ms`` and ``budget-demo`` run the depth controller on it,
``export`` writes per-depth and multi-depth ONNX files that equal the eager model in onnxruntime;
and the subcommands share one model-loading preamble with the same messages. One tiny ResNet-18
(4 classes) at 32-64 px, one checkpoint for the module."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import anydepth
from anydepth import checkpoint
from anydepth.cli import main
from anydepth.predict import VideoWriter, read_image
from anydepth.testing import randomize_

NAMES = ["circle", "square", "triangle", "star"]
IMGSZ = 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    m = anydepth.create_model("resnet18-anydepth", num_classes=len(NAMES))
    return randomize_(m, seed=1, calibrate_shape=(2, 3, 32, 32)).eval()


@pytest.fixture(scope="module")
def ckpt(classifier, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "cls.pt"
    checkpoint.save(classifier, path, extra={"class_names": NAMES})
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls_images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 255, (90, 60), dtype=np.uint8)).save(d / "b_gray.png")
    with VideoWriter(str(d / "clip.mp4"), fps=5) as w:
        for _ in range(3):
            w.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return d


def test_predict_prints_and_saves_topk_classes(classifier, ckpt, source, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["predict", "--weights", str(ckpt), "--source", str(source), "--save", str(out), "--topk", "3",
                 "--imgsz", str(IMGSZ), "--depth", "base", "--device", "cpu", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["info"]["task"] == "classify" and doc["info"]["topk"] == 3 and doc["info"]["depth"] == "TTTT"
    assert "annotations" not in doc and [c["name"] for c in doc["categories"]] == NAMES
    stills = [im for im in doc["images"] if "frame" not in im]
    frames = [im for im in doc["images"] if "frame" in im]
    assert [im["file_name"] for im in stills] == ["a.png", "b_gray.png"] and len(frames) == 3
    for im in stills:  # the JSON holds what model.predict gives, named from the checkpoint
        want = classifier.predict(read_image(str(source / im["file_name"])), depth="base", imgsz=IMGSZ, topk=3)[0]
        assert [c["category_id"] for c in im["classes"]] == want.labels.tolist()
        assert [c["name"] for c in im["classes"]] == [NAMES[k] for k in want.labels.tolist()]
        assert np.allclose([c["score"] for c in im["classes"]], want.scores.numpy(), atol=1e-5)
        shown = ", ".join(f"{c['name']} {c['score']:.3f}" for c in im["classes"])
        assert f"{im['file_name']}: {shown}" in lines
    assert all(len(im["classes"]) == 3 for im in frames)
    assert json.loads(lines[-1]) == {"images": 2, "frames": 3, "json": str(out / "predictions.json"), "errors": 0}
    assert (out / "a.png").is_file() and (out / "clip.mp4").is_file()
    drawn = np.asarray(Image.open(out / "a.png"))
    assert drawn.shape == (50, 70, 3) and not np.array_equal(drawn, read_image(str(source / "a.png")))


def test_predict_refuses_the_other_tasks_options(ckpt, source, tmp_path, capsys):
    args = ["predict", "--source", str(source / "a.png"), "--save", str(tmp_path / "p"), "--quiet", "--device", "cpu"]
    assert main(args + ["--weights", str(ckpt), "--conf", "0.3"]) == 2
    assert "--conf is a detection score threshold; resnet18-anydepth is a classifier" in capsys.readouterr().err
    assert main(args + ["--weights", str(ckpt), "--imgsz", "50"]) == 2
    assert "multiple of 32 for a classifier" in capsys.readouterr().err
    assert main(args + ["--weights", str(ckpt), "--topk", "0"]) == 2
    assert "anydepth predict: topk must be a positive int, got 0" in capsys.readouterr().err
    assert main(args + ["--model", "yolov12n-anydepth", "--num-classes", "2", "--topk", "2"]) == 2
    assert "--topk is for classifiers; yolov12n-anydepth is a detector" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["profile", "predict", "budget-demo", "export"])
def test_subcommands_share_the_loading_messages(command, tmp_path, capsys):
    extra = ["--source", str(tmp_path), "--save", str(tmp_path / "p")] if command == "predict" else []
    assert main([command, "--model", "no-such-model", *extra]) == 2
    assert f"anydepth {command}: unknown model 'no-such-model'" in capsys.readouterr().err
    if command != "budget-demo":   # budget-demo runs yolov12n-anydepth when given neither
        assert main([command, *extra]) == 2
        assert f"anydepth {command}: give --weights (a checkpoint) or --model" in capsys.readouterr().err


def test_profile_budget_predict_and_budget_demo(ckpt, source, tmp_path, capsys):
    assert main(["profile", "--weights", str(ckpt), "--imgsz", str(IMGSZ), "--rounds", "1", "--reps", "1",
                 "--warmup", "0", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| base | TTTT |" in out and "| full | FFFF |" in out
    assert f"predict() overhead (resize + centre crop + softmax/top-k of one {IMGSZ}x{IMGSZ} image)" in out
    profiles = [p for p in ckpt.parent.iterdir() if p.name.startswith(f"cls.profile-eager-{IMGSZ}-b1-float32-cpu")]
    assert len(profiles) == 1

    out_dir = tmp_path / "budget"
    assert main(["predict", "--weights", str(ckpt), "--source", str(source), "--save", str(out_dir),
                 "--budget-ms", "10000", "--imgsz", str(IMGSZ), "--device", "cpu", "--quiet"]) == 0
    assert f"depth profile {profiles[0]}" in capsys.readouterr().err
    doc = json.loads((out_dir / "predictions.json").read_text())
    assert doc["info"]["budget_ms"] == 10000.0 and len(doc["images"]) == 5
    assert all(len(im["classes"]) == 4 and im["depth"] in ("TTTT", "TTTF", "TTFF", "TFFF", "FFFF")
               for im in doc["images"])      # topk 5 of a 4-class model: all of them

    result = tmp_path / "demo.json"
    assert main(["budget-demo", "--weights", str(ckpt), "--profile", str(profiles[0]), "--imgsz", str(IMGSZ),
                 "--frames", "30", "--burners", "0", "--no-fixed", "--quiet", "--out", str(result)]) == 0
    demo = json.loads(result.read_text())
    assert demo["imgsz"] == IMGSZ and sum(sum(p["depths"].values()) for p in demo["controller"]) > 0


@pytest.mark.slow
def test_export_classifier_onnx_equals_eager(classifier, ckpt, tmp_path, capsys):
    """Per-depth (base) and multi-depth ONNX of the classifier, run in onnxruntime at every ladder
    depth against the eager logits."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from anydepth.export import onnx_depth_inputs, ort_session

    size = 32
    assert main(["export", "--weights", str(ckpt), "--depth", "base,multi", "--imgsz", str(size),
                 "--out", str(tmp_path), "--no-check", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "export.json").read_text())["resnet18-anydepth:onnx:decompose"]
    assert manifest["imgsz"] == [size, size] and manifest["switches"] == ["stage1", "stage2", "stage3", "stage4"]
    files = {f["depth"]: tmp_path / Path(f["path"]).name for f in manifest["files"]}
    assert set(files) == {"TTTT", "multi"}
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    base = ort_session(files["TTTT"], threads=1)
    multi = ort_session(files["multi"], threads=1)
    for config in classifier.depth_configs((1, 3, size, size)):
        with torch.no_grad():
            ref = classifier(x, depth=config).numpy()
        got = multi.run(None, {"images": x.numpy(), **onnx_depth_inputs(classifier, config)})[0]
        assert got.shape == ref.shape == (1, len(NAMES))
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), config.code
        if config.code == "TTTT":
            only = base.run(None, {"images": x.numpy()})[0]
            assert np.abs(only - ref).max() <= 1e-4 * np.abs(ref).max()
    assert "resnet18-anydepth: 2 file(s)" in capsys.readouterr().out


def test_export_says_what_a_classifier_cannot_have(tmp_path, capsys):
    """MobileNetV2 switches its stem's and head's norms with stage1 / stage5, outside the
    switchable modules: no multi-depth graph (per-depth files instead), said by name; sizes that
    are not multiples of the stride are refused as for the detectors."""
    pytest.importorskip("onnxscript")
    args = ["export", "--model", "mobilenetv2-anydepth", "--num-classes", "3", "--out", str(tmp_path), "--quiet"]
    assert main(args + ["--depth", "multi", "--imgsz", "32"]) == 2
    err = capsys.readouterr().err
    assert "anydepth export: the multi-depth graph of mobilenetv2-anydepth is not supported" in err
    assert "stem.cna.bn" in err and "export per-depth files" in err
    assert main(args + ["--depth", "base", "--imgsz", "40"]) == 2
    assert "anydepth export: imgsz must be positive multiples of 32" in capsys.readouterr().err
