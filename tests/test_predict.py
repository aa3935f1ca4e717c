"""``anydepth predict`` (anydepth.predict and the CLI): a folder of images as users have them
(RGB, grayscale, RGBA, 16-bit, EXIF-rotated, broken), a short generated video read and written with
PyAV, fixed depths and a latency budget, the COCO-style JSON, and predict() on grayscale / RGBA
arrays."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import anydepth
from anydepth.cli import main
from anydepth.predict import VideoWriter, read_image, run_predict, to_rgb_uint8, video_frames

IMGSZ = 64
W, H = 80, 48


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return anydepth.create_model("yolov12n-anydepth", num_classes=3).eval()


def scene(seed: int, w: int = W, h: int = H) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    x, y = 5 + 6 * seed % (w - 25), 8
    img[y:y + 20, x:x + 20] = (230, 200, 40)
    return img


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rgb = scene(0)
    Image.fromarray(rgb).save(d / "a_rgb.jpg", quality=95)
    Image.fromarray(rgb[..., 0]).save(d / "b_gray.png")                         # mode L
    Image.fromarray(np.dstack([rgb, np.full((H, W), 128, np.uint8)])).save(d / "c_rgba.png")
    deep = (np.arange(W * H, dtype=np.uint32).reshape(H, W) * 65535 // (W * H - 1)).astype(np.uint16)
    Image.fromarray(deep).save(d / "d_16bit.png")                              # 16-bit grayscale
    exif = Image.Exif()
    exif[0x0112] = 6                                                           # rotate 90 degrees on display
    Image.fromarray(rgb).save(d / "e_rotated.jpg", exif=exif, quality=95)
    (d / "f_broken.jpg").write_bytes(b"this is not a JPEG file")
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    d = tmp_path_factory.mktemp("video")
    with VideoWriter(str(d / "clip.mp4"), fps=10) as w:
        for k in range(8):
            w.write(scene(k))
    (d / "broken.mp4").write_bytes(b"\x00" * 64)
    return d


def simulated_profile(model, ms=(14, 18, 22, 26, 30, 34, 38, 42, 46)):
    profile = model.profile_depths(imgsz=IMGSZ, rounds=1, reps=1, warmup=0)
    return dataclasses.replace(profile, overhead_ms=0.0, entries=[
        dataclasses.replace(e, median_ms=float(m), p90_ms=float(m)) for e, m in zip(profile.entries, ms)])


def test_images_as_users_have_them(folder, monkeypatch):
    rgb = read_image(str(folder / "a_rgb.jpg"))
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    gray = read_image(str(folder / "b_gray.png"))
    assert gray.shape == (H, W, 3) and (gray[..., 0] == gray[..., 2]).all()
    assert read_image(str(folder / "c_rgba.png")).shape == (H, W, 3)
    deep = read_image(str(folder / "d_16bit.png"))
    assert deep.shape == (H, W, 3) and deep[0, 0, 0] == 0 and deep[-1, -1, 0] == 255  # scaled, not clipped
    assert abs(int(deep[H // 2, 0, 0]) - 128) <= 2
    assert read_image(str(folder / "e_rotated.jpg")).shape == (W, H, 3)         # upright: EXIF applied
    with pytest.raises(OSError):
        read_image(str(folder / "f_broken.jpg"))
    # a hook on Image.open failing some other way (as Ultralytics' HEIF patch does offline) still
    # gives an OSError naming the file
    import PIL.Image

    def failing_open(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'pi_heif'")

    monkeypatch.setattr(PIL.Image, "open", failing_open)
    with pytest.raises(OSError, match="f_broken.jpg.*pi_heif"):
        read_image(str(folder / "f_broken.jpg"))
    monkeypatch.undo()
    assert to_rgb_uint8(np.ones((2, 3), bool)).max() == 255
    assert to_rgb_uint8(np.full((2, 3, 1), 0.5, np.float32))[0, 0, 0] == 128
    with pytest.raises(ValueError, match="HxWx4"):
        to_rgb_uint8(np.zeros((4, 4, 2), np.uint8))


def test_predict_converts_grayscale_rgba_and_16bit_arrays(model):
    rgb = scene(1)
    gray = rgb[..., 1]
    ref = model.predict(np.repeat(gray[..., None], 3, 2), imgsz=IMGSZ, conf=0.0)[0]
    for variant in (gray, gray[..., None], torch.from_numpy(gray)):
        out = model.predict(variant, imgsz=IMGSZ, conf=0.0)[0]
        assert torch.equal(out.boxes, ref.boxes) and torch.equal(out.scores, ref.scores)
    ref = model.predict(rgb, imgsz=IMGSZ, conf=0.0)[0]
    rgba = np.dstack([rgb, np.zeros((H, W), np.uint8)])
    out = model.predict(rgba, imgsz=IMGSZ, conf=0.0)[0]
    assert torch.equal(out.boxes, ref.boxes)
    out16 = model.predict(rgb.astype(np.uint16) * 257, imgsz=IMGSZ, conf=0.0)[0]
    assert torch.allclose(out16.boxes, ref.boxes, atol=1e-3)
    with pytest.raises(ValueError, match="uint16 image must be HxWx3"):
        model.predict(np.zeros((4, 4, 2), np.uint16))


def test_predict_folder_fixed_depth(model, folder, tmp_path):
    out = tmp_path / "out"
    logs = []
    summary = run_predict(model, str(folder), str(out), depth="base", imgsz=IMGSZ, conf=0.0,
                          names=["square", "circle", "cross"], log=logs.append)
    assert summary["images"] == 5 and summary["frames"] == 0 and summary["detections"] > 0
    assert [e["file"] for e in summary["errors"]] == [str(folder / "f_broken.jpg")]
    assert any("f_broken.jpg" in line for line in logs) and any("notes.txt" in line for line in logs)
    for name in ("a_rgb.jpg", "b_gray.png", "c_rgba.png", "d_16bit.png", "e_rotated.jpg"):
        assert (out / name).is_file()
    annotated = np.asarray(Image.open(out / "a_rgb.jpg"))
    assert annotated.shape == (H, W, 3)
    assert np.abs(annotated.astype(int) - read_image(str(folder / "a_rgb.jpg")).astype(int)).mean() > 5  # drawn
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["info"]["depth"] == model.depth_space.base().code
    assert doc["categories"] == [{"id": 0, "name": "square"}, {"id": 1, "name": "circle"}, {"id": 2, "name": "cross"}]
    images = {im["file_name"]: im for im in doc["images"]}
    assert sorted(images) == ["a_rgb.jpg", "b_gray.png", "c_rgba.png", "d_16bit.png", "e_rotated.jpg"]
    assert (images["e_rotated.jpg"]["width"], images["e_rotated.jpg"]["height"]) == (H, W)
    assert all(im["depth"] == doc["info"]["depth"] and im["latency_ms"] > 0 for im in doc["images"])
    assert doc["errors"][0]["file"].endswith("f_broken.jpg")
    by_id = {im["id"]: im for im in doc["images"]}
    for a in doc["annotations"]:
        im = by_id[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= im["width"] + 0.01 and y + h <= im["height"] + 0.01
        assert 0 <= a["score"] <= 1 and a["category_id"] in (0, 1, 2)
    # the detections are predict()'s, in COCO xywh
    first = [a for a in doc["annotations"] if a["image_id"] == images["a_rgb.jpg"]["id"]]
    ref = model.predict(read_image(str(folder / "a_rgb.jpg")), depth="base", imgsz=IMGSZ, conf=0.0)[0]
    assert len(first) == len(ref)
    x0, y0, x1, y1 = ref.boxes[0].tolist()
    assert first[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.01)


def test_predict_any_imgsz(model, folder, tmp_path):
    """An imgsz that is not a multiple of 32 runs (padded to the next multiple; fractional depths
    resolved on that canvas) and gives predict()'s boxes; a senseless one is an error."""
    image = folder / "a_rgb.jpg"
    doc_path = run_predict(model, str(image), str(tmp_path / "odd"), depth=0.5, imgsz=50, conf=0.0)["json"]
    doc = json.loads(open(doc_path).read())
    config = model.resolve_depth(0.5, (1, 3, 64, 64))
    assert doc["info"]["imgsz"] == 50 and doc["images"][0]["depth"] == config.code
    ref = model.predict(read_image(str(image)), depth=config, imgsz=50, conf=0.0)[0]
    assert len(doc["annotations"]) == len(ref) > 0
    x0, y0, x1, y1 = ref.boxes[0].tolist()
    assert doc["annotations"][0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.01)
    with pytest.raises(ValueError, match="imgsz must be a positive int"):
        run_predict(model, str(image), str(tmp_path / "bad"), imgsz=0)


def test_predict_video_under_a_budget(model, video, tmp_path):
    profile = simulated_profile(model)
    out = tmp_path / "out"
    summary = run_predict(model, str(video), str(out), budget_ms=1e4, profile=profile, conf=0.0)
    assert summary["frames"] == 8 and summary["images"] == 0
    assert [os.path.basename(e["file"]) for e in summary["errors"]] == ["broken.mp4"]
    frames = list(video_frames(str(out / "clip.mp4")))
    assert len(frames) == 8 and frames[0].shape == (H, W, 3) and frames[0].dtype == np.uint8
    assert not (out / "broken.mp4").exists()
    doc = json.loads((out / "predictions.json").read_text())
    assert [im["frame"] for im in doc["images"]] == list(range(8))
    assert doc["info"]["budget_ms"] == 1e4 and doc["info"]["switches"] == 0
    full = model.depth_space.full().code
    assert all(im["depth"] == full and im["latency_ms"] > 0 for im in doc["images"])  # a loose budget: full depth
    # a budget that only base meets (by the profile): the controller starts there and stays
    summary = run_predict(model, str(video / "clip.mp4"), str(tmp_path / "tight"), budget_ms=15, profile=profile)
    doc = json.loads((tmp_path / "tight" / "predictions.json").read_text())
    assert {im["depth"] for im in doc["images"]} == {model.depth_space.base().code}
    assert (tmp_path / "tight" / "clip.mp4").is_file()
    with pytest.raises(ValueError, match="needs a DepthProfile"):
        run_predict(model, str(video), str(out), budget_ms=40)
    with pytest.raises(ValueError, match="imgsz 64, not 96"):
        run_predict(model, str(video), str(out), budget_ms=40, profile=profile, imgsz=96)


def test_cli_profile_and_predict(model, folder, video, tmp_path, capsys):
    ckpt = tmp_path / "tiny.pt"
    anydepth.save(model, ckpt)
    out = tmp_path / "fixed"
    assert main(["predict", "--weights", str(ckpt), "--source", str(folder), "--save", str(out), "--depth", "TTTTFFFF",
                 "--imgsz", str(IMGSZ), "--conf", "0", "--device", "cpu", "--quiet"]) == 0
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["info"]["depth"] == "TTTTFFFF" and len(doc["images"]) == 5 and len(doc["errors"]) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["errors"] == 1

    assert main(["profile", "--weights", str(ckpt), "--imgsz", str(IMGSZ), "--rounds", "1", "--reps", "1",
                 "--warmup", "0", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "round 1/1" in captured.err and "| base | TTTTTTTT |" in captured.out
    written = [f for f in os.listdir(tmp_path) if f.startswith("tiny.profile-eager-64-b1-float32-cpu")]
    assert len(written) == 1
    assert main(["predict", "--weights", str(ckpt), "--source", str(video / "clip.mp4"), "--save", str(tmp_path / "v"),
                 "--budget-ms", "1000", "--imgsz", str(IMGSZ), "--device", "cpu", "--quiet"]) == 0
    assert f"depth profile {tmp_path / written[0]}" in capsys.readouterr().err  # the one beside the weights
    doc = json.loads((tmp_path / "v" / "predictions.json").read_text())
    assert len(doc["images"]) == 8 and doc["info"]["budget_ms"] == 1000.0

    assert main(["predict", "--weights", str(ckpt), "--source", str(folder), "--save", str(out), "--depth", "base",
                 "--budget-ms", "40"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["predict", "--weights", str(ckpt), "--source", str(tmp_path / "nothing"), "--save", str(out),
                 "--quiet"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["predict", "--weights", str(ckpt), "--source", str(folder), "--save", str(out), "--depth", "TTX"]) == 2
    assert "config code" in capsys.readouterr().err


def test_video_without_pyav_names_its_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r'pip install "anydepth\[video\]"'):
        VideoWriter(str(tmp_path / "x.mp4")).write(scene(0))
