"""anydepth.data: the synthetic generator, the COCO / YOLO loaders, geometry, augmentation, errors."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anydepth.data import (CocoDetection, YoloDetection, collate, open_dataset, read_image,
                           synth)
from anydepth.detection import letterbox_batch, resize_batch
from anydepth.data.datasets import read_data_yaml_names

N_SYNTH = 24
SYNTH_SZ = 256


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = synth.generate(root, images=N_SYNTH, imgsz=SYNTH_SZ, seed=3, ext="png", progress=False)
    return root, summary


def _coco(root: Path):
    return json.loads((root / "annotations.json").read_text())


def _write_coco(root: Path, images, annotations, categories):
    """A COCO set from in-memory images: images = [(file_name, HxWx3 uint8)]."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    ims = []
    for k, (name, arr) in enumerate(images, 1):
        Image.fromarray(arr).save(root / "images" / name)
        ims.append(dict(id=k, file_name=name, height=arr.shape[0], width=arr.shape[1]))
    (root / "annotations.json").write_text(json.dumps(dict(images=ims, annotations=annotations,
                                                           categories=categories)))
    return root


def _write_yolo_copy(src: Path, dst: Path, names_file="data.yaml"):
    """A YOLO-txt copy of a COCO set: same image files, one label file per image."""
    coco = _coco(src)
    (dst / "images").mkdir(parents=True)
    (dst / "labels").mkdir()
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for im in coco["images"]:
        shutil.copy(src / "images" / im["file_name"], dst / "images" / im["file_name"])
        lines = []
        for a in by_image.get(im["id"], []):
            x, y, w, h = a["bbox"]
            lines.append(f"{a['category_id'] - 1} {(x + w / 2) / im['width']:.8f} {(y + h / 2) / im['height']:.8f} "
                         f"{w / im['width']:.8f} {h / im['height']:.8f}")
        if lines:  # images without objects get no label file at all
            (dst / "labels" / (Path(im["file_name"]).stem + ".txt")).write_text("\n".join(lines) + "\n")
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    if names_file == "data.yaml":
        (dst / "data.yaml").write_text("path: .\ntrain: images\nnames:\n" +
                                       "".join(f"  {k}: {n}\n" for k, n in enumerate(names)))
    elif names_file == "classes.txt":
        (dst / "classes.txt").write_text("\n".join(names) + "\n")
    return dst


# ---------------------------------------------------------------------------------------------
# synthetic generator
# ---------------------------------------------------------------------------------------------
def test_synth_deterministic_and_seed_and_split_dependent(tmp_path, synth_dir):
    root, _ = synth_dir
    again = synth.generate(tmp_path / "again", images=N_SYNTH, imgsz=SYNTH_SZ, seed=3, ext="png", progress=False)
    assert _coco(root) == _coco(Path(again["path"]))
    for name in ("000000.png", "000007.png", f"{N_SYNTH - 1:06d}.png"):
        a = np.asarray(Image.open(root / "images" / name))
        b = np.asarray(Image.open(tmp_path / "again" / "images" / name))
        assert np.array_equal(a, b)
    other, _ = synth.render(0, SYNTH_SZ, seed=4)
    first, _ = synth.render(0, SYNTH_SZ, seed=3)
    assert np.array_equal(first, np.asarray(Image.open(root / "images" / "000000.png")))
    assert other.shape != first.shape or not np.array_equal(other, first)
    # splits made with the same seed differ and go to out_dir/<split>
    tr = synth.generate(tmp_path / "s", images=2, imgsz=128, seed=3, split="train", progress=False)
    va = synth.generate(tmp_path / "s", images=2, imgsz=128, seed=3, split="val", progress=False)
    assert tr["path"] == str(tmp_path / "s" / "train") and va["path"] == str(tmp_path / "s" / "val")
    assert (tmp_path / "s" / "train" / "annotations.json").is_file()
    assert sorted(p.name for p in (tmp_path / "s" / "val" / "images").iterdir()) == ["000000.jpg", "000001.jpg"]
    assert not np.array_equal(read_image(tmp_path / "s" / "train" / "images" / "000000.jpg"),
                              read_image(tmp_path / "s" / "val" / "images" / "000000.jpg"))


def test_synth_annotations_valid_and_objects_drawn(synth_dir):
    root, summary = synth_dir
    coco = _coco(root)
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5]
    assert [c["name"] for c in coco["categories"]] == list(synth.DEFAULT_CLASSES)
    assert [im["id"] for im in coco["images"]] == list(range(1, N_SYNTH + 1))
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    assert summary["images"] == N_SYNTH and summary["objects"] == len(coco["annotations"])
    per_class = {n: 0 for n in synth.DEFAULT_CLASSES}
    sizes = {"small": 0, "medium": 0, "large": 0}
    images = {im["id"]: im for im in coco["images"]}
    arrays = {}
    for im in coco["images"]:
        arr = read_image(root / "images" / im["file_name"])
        assert arr.shape == (im["height"], im["width"], 3)
        assert max(arr.shape[:2]) == SYNTH_SZ and 0.74 <= arr.shape[1] / arr.shape[0] <= 1.34
        assert arr.reshape(-1, 3).std(0).max() > 10  # a textured, not flat, background
        arrays[im["id"]] = arr.astype(np.int32)
    aspects = {im["width"] / im["height"] for im in coco["images"]}
    assert min(aspects) < 0.95 and max(aspects) > 1.05  # both portrait and landscape images
    for a in coco["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert a["iscrowd"] == 0 and a["area"] == w * h
        assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"] and w >= 2 and h >= 2
        name = synth.DEFAULT_CLASSES[a["category_id"] - 1]
        per_class[name] += 1
        sizes[synth.size_category(w * h)] += 1
        arr, colour = arrays[a["image_id"]], np.array(a["color"])
        patch = arr[y:y + h, x:x + w]
        close = (np.abs(patch - colour).max(-1) <= 24)
        # at least 15% of the box shows the object's colour (rings and rotated triangles included)
        assert close.mean() >= 0.15, (a, close.mean())
        # tight box: the colour reaches each edge of the box, unless a later-drawn object covers that edge
        later = np.zeros((h, w), bool)
        for o in coco["annotations"]:
            if o["image_id"] == a["image_id"] and o["id"] > a["id"]:
                ox, oy, ow, oh = o["bbox"]
                later[max(oy - y, 0):max(oy + oh - y, 0), max(ox - x, 0):max(ox + ow - x, 0)] = True
        for edge, cover in ((close[0], later[0]), (close[-1], later[-1]), (close[:, 0], later[:, 0]),
                            (close[:, -1], later[:, -1])):
            assert edge.any() or cover.any(), a
        if name != "ring":  # filled shapes show their colour at the box centre
            cy, cx = y + h // 2, x + w // 2
            centre = arr[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            assert np.abs(centre - colour).max() <= 12, (a, centre)
    assert per_class == summary["per_class"] and sizes == summary["per_size"]
    assert min(per_class.values()) > 0
    assert all(v > 0 for v in sizes.values()), sizes  # small, medium and large all occur
    per_image = [sum(a["image_id"] == i for a in coco["annotations"]) for i in images]
    assert min(per_image) >= 1 and max(per_image) <= 6


def test_synth_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown shape"):
        synth.generate(tmp_path, images=1, classes=["circle", "blob"], progress=False)
    with pytest.raises(ValueError, match="max_objects"):
        synth.generate(tmp_path, images=1, min_objects=3, max_objects=2, progress=False)
    with pytest.raises(ValueError, match="images"):
        synth.generate(tmp_path, images=0, progress=False)
    with pytest.raises(ValueError, match="ext"):
        synth.generate(tmp_path, images=1, ext="gif", progress=False)
    s = synth.generate(tmp_path / "c", images=3, imgsz=128, classes=["hexagon", "cross"], min_objects=2,
                       max_objects=2, progress=False)
    coco = _coco(tmp_path / "c")
    assert [c["name"] for c in coco["categories"]] == ["hexagon", "cross"]
    assert {a["category_id"] for a in coco["annotations"]} <= {1, 2}
    assert s["objects"] == len(coco["annotations"]) and 4 <= s["objects"] <= 6  # rarely one is not placed


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------
def test_coco_and_yolo_loaders_agree(tmp_path, synth_dir):
    root, _ = synth_dir
    coco = open_dataset(root, imgsz=320)
    yolo = open_dataset(_write_yolo_copy(root, tmp_path / "yolo"), imgsz=320)
    assert isinstance(coco, CocoDetection) and isinstance(yolo, YoloDetection)
    assert coco.class_names == yolo.class_names == list(synth.DEFAULT_CLASSES)
    assert coco.num_classes == yolo.num_classes == 5 and len(coco) == len(yolo) == N_SYNTH
    ann = _coco(root)
    for i in range(N_SYNTH):
        (ic, tc), (iy, ty) = coco[i], yolo[i]
        assert torch.equal(ic, iy)
        assert ic.shape == (3, 320, 320) and ic.dtype == torch.uint8
        assert tc["boxes"].dtype == torch.float32 and tc["labels"].dtype == torch.int64
        assert torch.equal(tc["labels"], ty["labels"])
        torch.testing.assert_close(tc["boxes"], ty["boxes"], atol=1e-3, rtol=0)
        assert tc["orig_size"] == ty["orig_size"] == (ann["images"][i]["height"], ann["images"][i]["width"])
        assert tc["image_id"] == ann["images"][i]["id"] == ty["image_id"]
        assert np.array_equal(coco.load_original(i)[0], yolo.load_original(i)[0])
        # the targets are the annotation boxes mapped by the letterbox
        h0, w0 = tc["orig_size"]
        r = min(320 / h0, 320 / w0)
        nh, nw = round(h0 * r), round(w0 * r)
        objs = [a for a in ann["annotations"] if a["image_id"] == tc["image_id"]]
        exp = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                            for a in objs], dtype=torch.float64)
        exp = exp * torch.tensor([nw / w0, nh / h0] * 2, dtype=torch.float64) + \
            torch.tensor([(320 - nw) // 2, (320 - nh) // 2] * 2, dtype=torch.float64)
        torch.testing.assert_close(tc["boxes"].double(), exp, atol=1e-4, rtol=0)
        assert tc["labels"].tolist() == [a["category_id"] - 1 for a in objs]
    gc, gy = coco.coco_ground_truth(), yolo.coco_ground_truth()
    assert [(im["id"], im["height"], im["width"]) for im in gc["images"]] == \
        [(im["id"], im["height"], im["width"]) for im in gy["images"]]
    assert len(gc["annotations"]) == len(gy["annotations"]) == len(ann["annotations"])
    for a, b in zip(gc["annotations"], gy["annotations"]):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-4)
        assert abs(a["area"] - b["area"]) < 1e-2
    assert [coco.category_id(k) for k in range(5)] == [yolo.category_id(k) for k in range(5)] == [1, 2, 3, 4, 5]


def test_yolo_class_names_sources(tmp_path, synth_dir):
    root, _ = synth_dir
    d = _write_yolo_copy(root, tmp_path / "ct", names_file="classes.txt")
    assert YoloDetection(d / "images").class_names == list(synth.DEFAULT_CLASSES)  # labels dir inferred
    named = YoloDetection(d / "images", d / "labels", names={0: "a", 1: "b", 2: "c", 3: "d", 4: "e"})
    assert named.class_names == ["a", "b", "c", "d", "e"]
    bare = _write_yolo_copy(root, tmp_path / "bare", names_file=None)
    top = max(a["category_id"] for a in _coco(root)["annotations"]) - 1
    assert YoloDetection(bare / "images").class_names == [str(k) for k in range(top + 1)]
    with pytest.raises(ValueError, match="names mapping keys must be 0..1"):
        YoloDetection(d / "images", names={0: "a", 2: "b"})


@pytest.mark.parametrize("text, expected", [
    ("path: x\nnames: [cat, 'dog, big', \"bird\"]  # three\n", ["cat", "dog, big", "bird"]),
    ("names:\n  - cat\n  - dog # comment\n\nnc: 2\n", ["cat", "dog"]),
    ("train: a\nnames:\n  0: person\n  1: 'traffic light'\nval: b\n", ["person", "traffic light"]),
    ("names: {1: b, 0: a}", ["a", "b"]),
    ("names: [a,\n  b, c]", ["a", "b", "c"]),
])
def test_data_yaml_names(tmp_path, text, expected):
    (tmp_path / "data.yaml").write_text(text)
    assert read_data_yaml_names(tmp_path / "data.yaml") == expected


@pytest.mark.parametrize("text, match", [
    ("nc: 3\n", "has no 'names' entry"),
    ("names: [a, b\n", "is not valid YAML"),
    ("names: {0: a, 2: b}", "names mapping keys must be 0..1"),
    ("names: []", "empty list of class names"),
])
def test_data_yaml_names_errors(tmp_path, text, match):
    (tmp_path / "data.yaml").write_text(text)
    with pytest.raises(ValueError, match=match):
        read_data_yaml_names(tmp_path / "data.yaml")


def test_data_yaml_without_pyyaml(tmp_path, monkeypatch, synth_dir):
    import sys

    root, _ = synth_dir
    d = _write_yolo_copy(root, tmp_path / "y")
    (d / "data.yaml").write_text("path: .\nnames: [c0, c1, c2, c3, c4]  # five\nnc: 5\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now fails
    with pytest.raises(ImportError, match=r"reading a YOLO data.yaml needs PyYAML.*anydepth\[data\]"):
        YoloDetection(d / "images")


def test_yolo_split_layout(tmp_path, synth_dir):
    root, _ = synth_dir
    d = _write_yolo_copy(root, tmp_path / "y")
    (d / "images" / "val").mkdir()
    (d / "labels" / "val").mkdir()
    for p in sorted((d / "images").glob("*.png"))[:3]:
        p.rename(d / "images" / "val" / p.name)
        lab = d / "labels" / (p.stem + ".txt")
        if lab.exists():
            lab.rename(d / "labels" / "val" / lab.name)
    for p in (d / "images").glob("*.png"):
        p.unlink()
    ds = open_dataset(d, split="val", imgsz=64)
    assert isinstance(ds, YoloDetection) and len(ds) == 3 and ds.class_names == list(synth.DEFAULT_CLASSES)
    assert ds[2][1]["labels"].tolist() == open_dataset(root, imgsz=64)[2][1]["labels"].tolist()
    with pytest.raises(ValueError, match=r"sub-directories \['val'\]: pass split="):
        open_dataset(d)


def test_images_without_annotations_and_crowd_and_category_mapping(tmp_path):
    img = np.full((40, 60, 3), 50, np.uint8)
    anns = [dict(id=10, image_id=1, category_id=7, bbox=[6, 4, 30, 20], area=600, iscrowd=0),
            dict(id=11, image_id=1, category_id=3, bbox=[0, 0, 10, 10], area=100, iscrowd=1),   # crowd
            dict(id=12, image_id=1, category_id=3, bbox=[5, 5, 0, 10], area=0, iscrowd=0),      # zero width
            dict(id=13, image_id=1, category_id=3, bbox=[50, 30, 20, 20], area=400, iscrowd=0)]  # crosses border
    root = _write_coco(tmp_path, [("a.png", img), ("b.png", img)], anns,
                       [dict(id=7, name="seven"), dict(id=3, name="three")])
    ds = CocoDetection(root / "images", root / "annotations.json", imgsz=64)
    assert ds.class_names == ["three", "seven"]  # sorted category ids -> labels 0, 1
    assert ds.category_id(0) == 3 and ds.category_id(1) == 7
    with pytest.raises(ValueError, match="out of range"):
        ds.category_id(2)
    _, t = ds[0]
    # gain 64/60 = 16/15 (nh = round(40 * 16/15) = 43), pad top (64 - 43) // 2 = 10
    g, gy = 16 / 15, 43 / 40
    exp = torch.tensor([[6 * g, 4 * gy + 10, 36 * g, 24 * gy + 10], [50 * g, 30 * gy + 10, 60 * g, 40 * gy + 10]])
    torch.testing.assert_close(t["boxes"], exp, atol=1e-4, rtol=0)
    assert t["labels"].tolist() == [1, 0] and t["image_id"] == 1 and t["orig_size"] == (40, 60)
    _, t2 = ds[1]
    assert t2["boxes"].shape == (0, 4) and t2["labels"].shape == (0,) and t2["image_id"] == 2
    gt = ds.coco_ground_truth()
    assert [a["id"] for a in gt["annotations"]] == [10, 11, 13]  # the zero-area box is dropped
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 1, 0]
    assert [c["id"] for c in gt["categories"]] == [3, 7]


def test_letterbox_matches_letterbox_batch_on_odd_images(tmp_path):
    rng = np.random.default_rng(0)
    shapes = [(75, 101), (101, 75), (33, 47), (500, 301)]  # shrink and enlarge, both orientations
    images = [(f"{k}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for k, (h, w) in enumerate(shapes)]
    anns = [dict(id=k + 1, image_id=k + 1, category_id=1, bbox=[3.5, 2.25, w / 2, h / 3], iscrowd=0)
            for k, (h, w) in enumerate(shapes)]
    root = _write_coco(tmp_path, images, anns, [dict(id=1, name="x")])
    for mode, fn in (("letterbox", letterbox_batch), ("resize", resize_batch)):
        ds = open_dataset(root, imgsz=64, mode=mode)
        for i, (_, arr) in enumerate(images):
            img, t = ds[i]
            ref, (lb,) = fn(arr, 64)
            diff = (img.float() - ref[0] * 255).abs().max().item()
            assert diff <= 0.5 + 1e-4, (mode, shapes[i], diff)
            h, w = shapes[i]
            x, y, bw, bh = anns[i]["bbox"]
            box = torch.tensor([[x, y, x + bw, y + bh]])
            torch.testing.assert_close(lb.unmap(t["boxes"]), box, atol=1e-4, rtol=0)
            if mode == "letterbox":
                r = min(64 / h, 64 / w)
                nh, nw = round(h * r), round(w * r)
                top, left = (64 - nh) // 2, (64 - nw) // 2
                exp = [x * nw / w + left, y * nh / h + top, (x + bw) * nw / w + left, (y + bh) * nh / h + top]
                # the pad is exactly 114 outside the content
                assert (img[:, :top] == 114).all() and (img[:, top + nh:] == 114).all()
                assert (img[:, :, :left] == 114).all() and (img[:, :, left + nw:] == 114).all()
            else:
                exp = [x * 64 / w, y * 64 / h, (x + bw) * 64 / w, (y + bh) * 64 / h]
            torch.testing.assert_close(t["boxes"], torch.tensor([exp]), atol=1e-4, rtol=0)


def test_letterbox_hand_computed(tmp_path):
    # 75 x 101 (h x w) on a 64 canvas: r = 64/101, content 48 x 64, 8 rows of padding above and below
    root = _write_coco(tmp_path, [("a.png", np.full((75, 101, 3), 200, np.uint8))],
                       [dict(id=1, image_id=1, category_id=1, bbox=[0, 0, 101, 75], iscrowd=0)],
                       [dict(id=1, name="x")])
    img, t = open_dataset(root, imgsz=64)[0]
    assert (img[:, :8] == 114).all() and (img[:, 8:56] == 200).all() and (img[:, 56:] == 114).all()
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 8.0, 64.0, 56.0]]))
    img, t = open_dataset(root, imgsz=64, mode="resize")[0]
    assert (img == 200).all()
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 0.0, 64.0, 64.0]]))


# ---------------------------------------------------------------------------------------------
# augmentation
# ---------------------------------------------------------------------------------------------
def _red_box_set(tmp_path, h=96, w=96, box=(10, 20, 30, 40)):
    img = np.full((h, w, 3), 90, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = (255, 0, 0)
    return _write_coco(tmp_path, [("a.png", img)],
                       [dict(id=1, image_id=1, category_id=1, bbox=[x0, y0, x1 - x0, y1 - y0], iscrowd=0)],
                       [dict(id=1, name="red")])


def test_flip_exact(tmp_path):
    root = _red_box_set(tmp_path, 96, 96, (10, 20, 30, 40))
    plain_img, plain = open_dataset(root, imgsz=64)[0]
    torch.testing.assert_close(plain["boxes"], torch.tensor([[10, 20, 30, 40]]) * (64 / 96))
    flipped_img, flipped = open_dataset(root, imgsz=64, augment=True, scale_range=(1, 1), flip_prob=1.0)[0]
    assert torch.equal(flipped_img, plain_img.flip(-1))
    # x -> 64 - x on the canvas: [64 - 20, 40/3, 64 - 20/3, 80/3]
    torch.testing.assert_close(flipped["boxes"], torch.tensor([[44.0, 40 / 3, 64 - 20 / 3, 80 / 3]]))
    same_img, same = open_dataset(root, imgsz=64, augment=True, scale_range=(1, 1), flip_prob=0.0)[0]
    assert torch.equal(same_img, plain_img) and torch.equal(same["boxes"], plain["boxes"])


def test_augmentation_keeps_boxes_on_objects(tmp_path):
    # background: dark left half, light right half, so that a flip can be seen; a red square on the left
    img = np.full((90, 130, 3), 160, np.uint8)
    img[:, :65] = 40
    img[30:70, 10:50] = (255, 0, 0)
    root = _write_coco(tmp_path, [("a.png", img)], [dict(id=1, image_id=1, category_id=1, bbox=[10, 30, 40, 40])],
                       [dict(id=1, name="red")])
    ds = open_dataset(root, imgsz=64, augment=True, seed=1)
    flips = kept = 0
    scales = set()
    for epoch in range(40):
        ds.set_epoch(epoch)
        out, t = ds[0]
        red = (out[0] > 200) & (out[1] < 60) & (out[2] < 60)
        dark = ((out - 40).abs() <= 2).all(0)
        light = ((out - 160).abs() <= 2).all(0)
        ys, xs = torch.nonzero(red, as_tuple=True)
        if dark.any() and light.any():  # both halves visible: which side is the dark one?
            flipped = dark.nonzero()[:, 1].float().mean() > light.nonzero()[:, 1].float().mean()
            flips += int(flipped)
            if len(xs):  # the object is on the dark side
                assert (xs.float().mean() > 32) == bool(flipped) or red.sum() < 20
        scales.add(round(float(dark.sum() + light.sum() + red.sum()), -2))
        if len(t["boxes"]) == 0:
            # dropped only when (nearly) all of it is outside the canvas
            assert red.sum() < 0.2 * (40 * 40) * (64 / 130 * 1.5) ** 2
            continue
        kept += 1
        assert t["labels"].tolist() == [0]
        x0, y0, x1, y1 = t["boxes"][0].tolist()
        assert abs(xs.min().item() - x0) <= 1.0 and abs(xs.max().item() + 1 - x1) <= 1.0, (t, xs.min(), xs.max())
        assert abs(ys.min().item() - y0) <= 1.0 and abs(ys.max().item() + 1 - y1) <= 1.0, (t, ys.min(), ys.max())
    assert kept >= 30 and 8 <= flips <= 32 and len(scales) >= 10  # flips and scales do vary
    # reproducible: same (seed, epoch, index) -> same sample, in another instance too; other epoch -> other sample
    ds.set_epoch(3)
    a_img, a = ds[0]
    b_img, b = ds[0]
    assert torch.equal(a_img, b_img) and torch.equal(a["boxes"], b["boxes"])
    other = open_dataset(root, imgsz=64, augment=True, seed=1)
    other.set_epoch(3)
    assert torch.equal(other[0][0], a_img)
    other.set_epoch(4)
    assert not torch.equal(other[0][0], a_img)
    assert not torch.equal(open_dataset(root, imgsz=64, augment=True, seed=2)[0][0],
                           open_dataset(root, imgsz=64, augment=True, seed=1)[0][0])


def test_augmented_boxes_clipped_or_dropped(tmp_path):
    """With scale 1.5 the content is larger than the canvas: boxes are clipped, tiny remnants dropped."""
    img = np.full((64, 64, 3), 90, np.uint8)
    anns = [dict(id=1, image_id=1, category_id=1, bbox=[0, 0, 64, 64]),     # always visible, clipped
            dict(id=2, image_id=1, category_id=1, bbox=[0, 28, 4, 8]),      # at the left edge: often cut away
            dict(id=3, image_id=1, category_id=1, bbox=[28, 28, 8, 8])]     # the centre: always kept
    root = _write_coco(tmp_path, [("a.png", img)], anns, [dict(id=1, name="x")])
    ds = open_dataset(root, imgsz=64, augment=True, scale_range=(1.5, 1.5), flip_prob=0.0)
    seen = set()
    for e in range(30):
        ds.set_epoch(e)
        _, t = ds[0]
        b = t["boxes"]
        assert (b >= 0).all() and (b <= 64).all()
        torch.testing.assert_close(b[0], torch.tensor([0.0, 0.0, 64.0, 64.0]))
        # content 96 x 96 at offset (left, top) in [-32, 0]; the centre box maps to 1.5 * 28 + offset
        centre = b[-1]
        assert abs((centre[2] - centre[0]).item() - 12) < 1e-4 and abs((centre[3] - centre[1]).item() - 12) < 1e-4
        left = centre[0].item() - 42
        assert -32 <= left <= 0 and left == int(left)
        edge_visible = 6 + left  # the edge box spans x in [left, left + 6]
        if len(b) == 3:
            assert edge_visible >= 2 and edge_visible >= 0.2 * 6
            torch.testing.assert_close(b[1], torch.tensor([0.0, 42 + centre[1].item() - 42, edge_visible,
                                                           centre[1].item() + 12]))
        else:
            assert edge_visible < 2
        seen.add(len(b))
    assert seen == {2, 3}


# ---------------------------------------------------------------------------------------------
# batching, ground truth, errors
# ---------------------------------------------------------------------------------------------
def test_collate_and_dataloader(synth_dir):
    root, _ = synth_dir
    ds = open_dataset(root, imgsz=128, augment=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=False, collate_fn=collate)
    images, targets = next(iter(loader))
    assert images.shape == (5, 3, 128, 128) and images.dtype == torch.uint8
    assert len(targets) == 5 and [t["image_id"] for t in targets] == [1, 2, 3, 4, 5]
    for k, t in enumerate(targets):
        assert t["boxes"].shape == (len(t["labels"]), 4)
        assert torch.equal(images[k], ds[k][0])
    # worker processes draw the same augmentations (per-index random streams)
    par = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=False, collate_fn=collate, num_workers=2)
    par_images, par_targets = next(iter(par))
    assert torch.equal(par_images, images)
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, par_targets))
    with pytest.raises(ValueError, match="different shapes"):
        collate([(torch.zeros(3, 64, 64, dtype=torch.uint8), {}), (torch.zeros(3, 32, 32, dtype=torch.uint8), {})])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_coco_ground_truth_loads_in_pycocotools(tmp_path, synth_dir):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root, _ = synth_dir
    for ds in (open_dataset(root), open_dataset(_write_yolo_copy(root, tmp_path / "y"))):
        gt = COCO()
        gt.dataset = ds.coco_ground_truth()
        gt.createIndex()
        ann = _coco(root)
        assert sorted(gt.getImgIds()) == list(range(1, N_SYNTH + 1))
        assert len(gt.getAnnIds()) == len(ann["annotations"])
        assert sorted(gt.getCatIds()) == [1, 2, 3, 4, 5]
        # evaluating the ground truth against itself gives AP 1
        dets = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=1.0)
                for a in gt.dataset["annotations"]]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert abs(ev.stats[0] - 1.0) < 1e-9


def test_load_original(synth_dir):
    root, _ = synth_dir
    ds = open_dataset(root, imgsz=64)
    arr, image_id = ds.load_original(4)
    assert image_id == 5 and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert np.array_equal(arr, np.asarray(Image.open(root / "images" / "000004.png").convert("RGB")))
    assert np.array_equal(ds.load_original(-1)[0], ds.load_original(N_SYNTH - 1)[0])
    with pytest.raises(IndexError):
        ds.load_original(N_SYNTH)


def test_errors_missing_paths(tmp_path, synth_dir):
    root, _ = synth_dir
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="images directory not found"):
        CocoDetection(tmp_path / "noimg", root / "annotations.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoDetection(root / "images", tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="labels directory not found"):
        YoloDetection(root / "images", tmp_path / "nolabels")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="unrecognised data set layout"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="split 'test' not found"):
        open_dataset(root, split="test")
    with pytest.raises(ValueError, match="imgsz"):
        open_dataset(root, imgsz=100)
    with pytest.raises(ValueError, match="mode"):
        open_dataset(root, mode="crop")
    with pytest.raises(ValueError, match="scale_range"):
        open_dataset(root, scale_range=(0, 1))
    # an image listed in the annotations but absent
    d = tmp_path / "gone"
    shutil.copytree(root, d)
    (d / "images" / "000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="000002.png"):
        open_dataset(d)[2]


def test_errors_corrupt_annotations(tmp_path):
    img = np.full((20, 30, 3), 7, np.uint8)
    root = _write_coco(tmp_path, [("a.png", img)], [], [dict(id=1, name="x")])
    ann = root / "annotations.json"
    ann.write_text('{"images": [1, 2')
    with pytest.raises(ValueError, match=r"annotations\.json is not valid JSON"):
        open_dataset(root)
    ann.write_text(json.dumps(dict(annotations=[])))
    with pytest.raises(ValueError, match="missing or invalid 'images'"):
        open_dataset(root)
    good = dict(images=[dict(id=1, file_name="a.png", height=20, width=30)], categories=[dict(id=1, name="x")])
    ann.write_text(json.dumps(dict(good, annotations=[dict(id=1, image_id=9, category_id=1, bbox=[0, 0, 1, 1])])))
    with pytest.raises(ValueError, match="unknown image id 9"):
        open_dataset(root)
    ann.write_text(json.dumps(dict(good, annotations=[dict(id=1, image_id=1, category_id=4, bbox=[0, 0, 1, 1])])))
    with pytest.raises(ValueError, match="unknown category id 4"):
        open_dataset(root)
    ann.write_text(json.dumps(dict(good, annotations=[dict(id=1, image_id=1, category_id=1, bbox=[0, 0, 1])])))
    with pytest.raises(ValueError, match="invalid bbox"):
        open_dataset(root)
    ann.write_text(json.dumps(dict(good, images=[dict(id=1, file_name="a.png", height=21, width=30)])))
    with pytest.raises(ValueError, match="a.png is 30x20"):
        open_dataset(root)[0]


def test_errors_yolo_labels(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "classes.txt").write_text("a\nb\n")
    lab = tmp_path / "labels" / "a.txt"
    lab.write_text("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n")
    with pytest.raises(ValueError, match=r"a\.txt, line 2: expected 5 fields"):
        open_dataset(tmp_path)
    lab.write_text("0 0.5 0.5 0.2 0.2\n\n2 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ValueError, match=r"a\.txt, line 3: class 2 out of range \(0\.\.1\)"):
        open_dataset(tmp_path)
    lab.write_text("1.5 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ValueError, match=r"a\.txt, line 1: class 1\.5 out of range"):
        open_dataset(tmp_path)
    lab.write_text("0 0.5 x 0.2 0.2\n")
    with pytest.raises(ValueError, match=r"a\.txt, line 1: non-numeric"):
        open_dataset(tmp_path)
    lab.write_text("0 0.5 0.5 0.2 0.2\n")
    ds = open_dataset(tmp_path, imgsz=32)
    assert ds.class_names == ["a", "b"]
    torch.testing.assert_close(ds[0][1]["boxes"], torch.tensor([[12.8, 12.8, 19.2, 19.2]]))


def test_errors_undecodable_images(tmp_path):
    src = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    root = _write_coco(tmp_path, [("ok.jpg", src), ("junk.jpg", src), ("cut.jpg", src)], [],
                       [dict(id=1, name="x")])
    (root / "images" / "junk.jpg").write_bytes(b"this is not an image")
    full = (root / "images" / "cut.jpg").read_bytes()
    (root / "images" / "cut.jpg").write_bytes(full[:len(full) // 2])
    ds = open_dataset(root, imgsz=32)
    assert ds[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"cannot decode image .*junk\.jpg"):
        ds[1]
    with pytest.raises(ValueError, match=r"cannot decode image .*cut\.jpg"):
        ds[2]
    with pytest.raises(ValueError, match=r"cannot decode image .*junk\.jpg"):
        ds.load_original(1)
