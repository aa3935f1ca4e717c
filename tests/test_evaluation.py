"""COCO evaluation: metric values on hand-built cases, evaluate() end to end, the report."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch

import anydepth
from anydepth.detection import Detections
from anydepth.evaluation import METRIC_NAMES, EvalReport, coco_evaluate, evaluate


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -------------------------------------------------------------------------------------------------
# coco_evaluate on hand-built cases

def one_object_gt():
    # one 100x100 object (area 10000 > 96^2: "large"), two categories
    return dict(images=[dict(id=1, width=200, height=200)],
                annotations=[dict(id=1, image_id=1, category_id=1, bbox=[10, 10, 100, 100], area=10000, iscrowd=0)],
                categories=[dict(id=1, name="a"), dict(id=2, name="b")])


def test_perfect_predictions_give_ap_1():
    m = coco_evaluate(one_object_gt(), [dict(image_id=1, category_id=1, bbox=[10, 10, 100, 100], score=1.0)])
    assert set(m) == set(METRIC_NAMES)
    # pycocotools averages 101 recall points x 10 IoU thresholds in float64: 1 up to rounding
    for k in ("AP", "AP50", "AP75", "AP_large", "AR100", "AR1"):
        assert m[k] == pytest.approx(1.0, abs=1e-12), k
    # no small or medium object: COCO leaves those undefined (pycocotools' -1) -> None
    assert m["AP_small"] is None and m["AP_medium"] is None
    assert m["AR_small"] is None and m["AR_medium"] is None


def test_shifted_box_ap_at_iou_thresholds():
    # shifted right by 24 px: IoU = 76*100 / (2*10000 - 76*100) = 76/124 = 0.6129, matched at the
    # thresholds 0.50, 0.55, 0.60 and missed at 0.65 .. 0.95 -> AP = 3/10, AP50 = 1, AP75 = 0
    m = coco_evaluate(one_object_gt(), [dict(image_id=1, category_id=1, bbox=[34, 10, 100, 100], score=1.0)])
    assert m["AP"] == pytest.approx(0.3, abs=1e-12)
    assert m["AP50"] == pytest.approx(1.0, abs=1e-12)
    assert m["AP75"] == 0.0
    assert m["AR100"] == pytest.approx(0.3, abs=1e-12)


def test_wrong_class_gives_0():
    m = coco_evaluate(one_object_gt(), [dict(image_id=1, category_id=2, bbox=[10, 10, 100, 100], score=1.0)])
    assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["AP75"] == 0.0 and m["AR100"] == 0.0


def test_empty_results_give_0():
    m = coco_evaluate(one_object_gt(), [])
    assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["AP_large"] == 0.0 and m["AR100"] == 0.0
    assert m["AP_small"] is None  # still undefined: no small object


def test_precision_interpolation_and_area_ranges():
    # A small (20x20), B large (120x100); detections by score: A exact (TP), a small false positive,
    # B exact (TP). Precision [1, 1/2, 2/3] at recall [1/2, 1/2, 1]; interpolated: 1 for the 51
    # recall points 0..0.50, 2/3 for the 50 points 0.51..1 -> AP = (51 + 50 * 2/3) / 101 at every
    # IoU threshold. Per size: small has A (TP) then the FP -> 1; large has B alone -> 1.
    gt = dict(images=[dict(id=7, width=400, height=400)],
              annotations=[dict(id=1, image_id=7, category_id=3, bbox=[10, 10, 20, 20]),  # area/iscrowd filled
                           dict(id=2, image_id=7, category_id=3, bbox=[100, 100, 120, 100])],
              categories=[dict(id=3, name="c")])
    res = [dict(image_id=7, category_id=3, bbox=[10, 10, 20, 20], score=0.9),
           dict(image_id=7, category_id=3, bbox=[300, 300, 20, 20], score=0.8),
           dict(image_id=7, category_id=3, bbox=[100, 100, 120, 100], score=0.7)]
    m = coco_evaluate(gt, res)
    expected = (51 + 50 * 2 / 3) / 101
    for k in ("AP", "AP50", "AP75"):
        assert m[k] == pytest.approx(expected, abs=1e-12)
    assert m["AP_small"] == pytest.approx(1.0, abs=1e-12)
    assert m["AP_large"] == pytest.approx(1.0, abs=1e-12)
    assert m["AP_medium"] is None
    assert m["AR1"] == 0.5  # one detection per image: only A
    assert m["AR10"] == 1.0
    # the input dicts are not modified (pycocotools' loadRes adds fields in place)
    assert set(res[0]) == {"image_id", "category_id", "bbox", "score"}


def test_faster_backend_same_numbers():
    res = [dict(image_id=1, category_id=1, bbox=[34, 10, 100, 100], score=1.0)]
    try:
        import faster_coco_eval  # noqa: F401
        m = coco_evaluate(one_object_gt(), res, backend="faster")
    except ImportError:
        with pytest.warns(RuntimeWarning, match="faster-coco-eval is not installed"):
            m = coco_evaluate(one_object_gt(), res, backend="faster")
    assert m["AP"] == pytest.approx(0.3, abs=1e-12) and m["AP75"] == 0.0
    assert m["AP50"] == pytest.approx(1.0, abs=1e-12)


def test_faster_backend_matches_pycocotools_on_random_detections():
    pytest.importorskip("faster_coco_eval", reason="optional backend (the faster-eval extra; in the test extra)")
    rng = np.random.default_rng(0)
    images = [dict(id=i, width=320, height=240) for i in range(1, 21)]
    anns, res = [], []
    for img in images:
        for _ in range(int(rng.integers(0, 6))):
            w, h = rng.uniform(4, 150, 2)
            x, y = rng.uniform(0, 320 - w), rng.uniform(0, 240 - h)
            c = int(rng.integers(1, 4))
            anns.append(dict(id=len(anns) + 1, image_id=img["id"], category_id=c, bbox=[x, y, w, h],
                             area=w * h, iscrowd=0))
            for _ in range(int(rng.integers(0, 3))):  # jittered, sometimes mislabelled detections
                dx, dy, s = rng.normal(0, 0.15 * w), rng.normal(0, 0.15 * h), rng.uniform(0.7, 1.3)
                res.append(dict(image_id=img["id"], category_id=c if rng.random() < 0.8 else int(rng.integers(1, 4)),
                                bbox=[x + dx, y + dy, w * s, h * s], score=float(rng.random())))
        for _ in range(int(rng.integers(0, 3))):  # false positives
            res.append(dict(image_id=img["id"], category_id=int(rng.integers(1, 4)),
                            bbox=[*rng.uniform(0, 200, 2), *rng.uniform(5, 100, 2)], score=float(rng.random())))
    gt = dict(images=images, annotations=anns, categories=[dict(id=c, name=f"c{c}") for c in (1, 2, 3)])
    ref = coco_evaluate(gt, res, backend="pycocotools")
    fast = coco_evaluate(gt, res, backend="faster")
    assert 0.05 < ref["AP"] < 0.95  # a non-trivial case
    for k in ref:
        if ref[k] is None:
            assert fast[k] is None, k
        else:
            assert fast[k] == pytest.approx(ref[k], abs=1e-6), k


def test_coco_evaluate_is_silent(capsys):
    coco_evaluate(one_object_gt(), [dict(image_id=1, category_id=1, bbox=[10, 10, 100, 100], score=1.0)])
    assert capsys.readouterr().out == ""
    coco_evaluate(one_object_gt(), [dict(image_id=1, category_id=1, bbox=[10, 10, 100, 100], score=1.0)],
                  verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_coco_evaluate_bad_inputs():
    gt = one_object_gt()
    ok = [dict(image_id=1, category_id=1, bbox=[10, 10, 100, 100], score=1.0)]
    with pytest.raises(ValueError, match="missing the 'annotations' list"):
        coco_evaluate({k: v for k, v in gt.items() if k != "annotations"}, ok)
    with pytest.raises(ValueError, match="no annotations"):
        coco_evaluate(dict(gt, annotations=[]), ok)
    with pytest.raises(ValueError, match="image_id 5 is not among the ground-truth images"):
        coco_evaluate(gt, [dict(ok[0], image_id=5)])
    with pytest.raises(ValueError, match="has no 'score'"):
        coco_evaluate(gt, [dict(image_id=1, category_id=1, bbox=[10, 10, 100, 100])])
    with pytest.raises(ValueError, match=r"bbox must be \[x, y, w, h\]"):
        coco_evaluate(gt, [dict(ok[0], bbox=[1, 2, 3])])
    with pytest.raises(ValueError, match="finite"):
        coco_evaluate(gt, [dict(ok[0], score=float("nan"))])
    with pytest.raises(ValueError, match="unknown COCO evaluation backend 'fast'"):
        coco_evaluate(gt, ok, backend="fast")
    with pytest.raises(TypeError, match="COCO-format dict"):
        coco_evaluate([gt], ok)


# -------------------------------------------------------------------------------------------------
# a tiny data set satisfying the evaluation contract

class TinyDataset:
    """Images of several sizes; image ``k`` is filled with the value ``k`` (so stubs can tell
    which image they got); sparse image ids and sparse category ids (10, 20, 30)."""

    CATS = (10, 20, 30)

    def __init__(self, n=4, with_annotations=True):
        self.sizes = [(60, 90), (80, 50), (64, 64), (100, 70), (48, 96)][:n]
        self.ids = [1000 + 7 * k for k in range(n)]
        self.objects = {}  # image id -> (xyxy float array [N, 4], labels [N])
        for k, (h, w) in enumerate(self.sizes):
            boxes = np.array([[5, 6, 5 + w // 2, 6 + h // 3], [w // 3, h // 2, w - 2, h - 1]], dtype=np.float64)
            labels = np.array([k % 3, (k + 1) % 3])
            self.objects[self.ids[k]] = (boxes[: 1 + k % 2], labels[: 1 + k % 2]) if with_annotations else \
                (np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
        self.num_classes = 3
        self.load_calls = 0

    def __len__(self):
        return len(self.sizes)

    def load_original(self, i):
        self.load_calls += 1
        h, w = self.sizes[i]
        return np.full((h, w, 3), i, dtype=np.uint8), self.ids[i]

    def category_id(self, label):
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} out of range 0..{self.num_classes - 1}")
        return self.CATS[label]

    def coco_ground_truth(self):
        anns = []
        for image_id, (boxes, labels) in self.objects.items():
            for b, l in zip(boxes.tolist(), labels.tolist()):
                anns.append(dict(id=len(anns) + 1, image_id=image_id, category_id=self.CATS[l],
                                 bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                 area=(b[2] - b[0]) * (b[3] - b[1]), iscrowd=0))
        return dict(images=[dict(id=i, width=w, height=h) for i, (h, w) in zip(self.ids, self.sizes)],
                    annotations=anns, categories=[dict(id=c, name=f"c{c}") for c in self.CATS])


class OracleModel:
    """Not a module: ``predict`` returns the ground truth (score 1); at depth "base" every box is
    shifted right by 24% of its width (IoU 76/124 with its object: AP = 0.3, AP50 = 1, AP75 = 0)."""

    def __init__(self, dataset):
        self.ds = dataset
        self.calls = []

    def predict(self, images, depth=None, conf=0.25, imgsz=640, max_det=300):
        self.calls.append(dict(depth=depth, conf=conf, imgsz=imgsz, max_det=max_det, n=len(images)))
        out = []
        for img in images:
            boxes, labels = self.ds.objects[self.ds.ids[int(img[0, 0, 0])]]
            boxes = torch.tensor(boxes, dtype=torch.float32)
            if depth == "base":
                dx = 0.24 * (boxes[:, 2] - boxes[:, 0])
                boxes = boxes + torch.stack([dx, torch.zeros_like(dx), dx, torch.zeros_like(dx)], 1)
            out.append(Detections(boxes, torch.ones(len(boxes)), torch.tensor(labels, dtype=torch.long)))
        return out


def test_evaluate_oracle_stub_ap_1_and_shifted_depth():
    ds = TinyDataset()
    model = OracleModel(ds)
    report = evaluate(model, ds, depths=["full", "base"], imgsz=64, batch_size=3, progress=False)
    assert [r.name for r in report.rows] == ["full", "base"]
    full, base = report.rows
    assert full.metrics["AP"] == pytest.approx(1.0, abs=1e-12)
    assert full.metrics["AP50"] == pytest.approx(1.0, abs=1e-12)
    assert full.metrics["AP75"] == pytest.approx(1.0, abs=1e-12)
    assert base.metrics["AP"] == pytest.approx(0.3, abs=1e-12)
    assert base.metrics["AP50"] == pytest.approx(1.0, abs=1e-12)
    assert base.metrics["AP75"] == 0.0
    n_objects = sum(len(v[1]) for v in ds.objects.values())
    assert full.num_detections == base.num_detections == n_objects == 6
    # no flops() / not an AnyDepthModel: those columns are None, with notes saying why
    assert full.gflops is None and full.latency_ms is None and report.latency_batch is None
    assert any("latency not measured" in n for n in report.notes)
    assert any("GFLOPs not counted" in n for n in report.notes)
    # predict got every image once per depth, in batches of 3 (3 + 1), with the given settings
    assert [c["n"] for c in model.calls] == [3, 1, 3, 1]
    assert [c["depth"] for c in model.calls] == ["full", "full", "base", "base"]
    assert all(c["conf"] == 0.001 and c["imgsz"] == 64 and c["max_det"] == 300 for c in model.calls)
    assert report.num_images == 4 and report.model == "OracleModel"


def test_evaluate_default_depth_and_max_images_restricts_ground_truth():
    ds = TinyDataset()
    model = OracleModel(ds)
    # only the first 2 images: the objects of the other images must not count as missed
    report = evaluate(model, ds, max_images=2, batch_size=8, progress=False)
    assert [r.name for r in report.rows] == ["full"] and report.num_images == 2
    assert report.rows[0].metrics["AP"] == pytest.approx(1.0, abs=1e-12)
    assert report.rows[0].metrics["AR100"] == pytest.approx(1.0, abs=1e-12)
    assert ds.load_calls == 2


def yolo_tiny():
    torch.manual_seed(0)
    return anydepth.create_model("yolov12n-anydepth", num_classes=3)


def manual_metrics(model, ds, depth, imgsz, n):
    """The pipeline written out by hand: predict each image alone, map labels, coco_evaluate."""
    results, keep = [], set()
    for i in range(n):
        img, image_id = ds.load_original(i)
        keep.add(image_id)
        (det,) = model.predict([img], depth=depth, conf=0.001, imgsz=imgsz, max_det=300)
        for b, s, l in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
            results.append(dict(image_id=image_id, category_id=ds.CATS[l], bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                score=s))
    gt = ds.coco_ground_truth()
    gt = dict(gt, images=[im for im in gt["images"] if im["id"] in keep],
              annotations=[a for a in gt["annotations"] if a["image_id"] in keep])
    return coco_evaluate(gt, results), len(results)


def test_evaluate_yolov12_two_depths_matches_manual_pipeline():
    ds = TinyDataset()
    model = yolo_tiny()
    model.train()  # evaluate puts it in eval mode and gives the mode back
    report = evaluate(model, ds, depths=["full", "base"], imgsz=64, batch_size=2, max_images=3, progress=False,
                      latency_batch=2, latency_reps=2, latency_rounds=2)
    assert model.training
    model.eval()
    assert [r.name for r in report.rows] == ["full", "base"]
    full, base = report.rows
    space = model.depth_space
    assert full.code == space.full().code and base.code == space.base().code
    assert full.skipped == [] and base.skipped == list(space.switches) and base.num_switches == len(space.switches)
    assert full.gflops == pytest.approx(model.flops("full", (1, 3, 64, 64)) / 1e9)
    assert 0 < base.gflops < full.gflops
    assert full.latency_ms > 0 and base.latency_ms > 0 and report.latency_batch == 2
    assert report.model == "yolov12n-anydepth" and report.num_images == 3
    for row, depth in ((full, "full"), (base, "base")):
        metrics, count = manual_metrics(model, ds, depth, 64, 3)
        assert row.num_detections == count > 0
        for k in METRIC_NAMES:  # batching (2 + 1) gives the same detections as one image at a time
            if metrics[k] is None:
                assert row.metrics[k] is None
            else:
                assert row.metrics[k] == pytest.approx(metrics[k], abs=1e-9)
                assert 0.0 <= row.metrics[k] <= 1.0


def test_evaluate_rtdetr_two_depths():
    torch.manual_seed(0)
    model = anydepth.create_model("rtdetr-r18-anydepth", num_classes=3, num_queries=10).eval()
    ds = TinyDataset()
    base_cfg = model.depth_space.base()
    report = evaluate(model, ds, depths=[base_cfg, 1.0], imgsz=64, batch_size=2, max_images=2, progress=False,
                      latency_reps=1, latency_warmup=0, latency_rounds=2)
    assert [r.name for r in report.rows] == ["base", "full"]
    base, full = report.rows
    assert base.knobs["decoder_layers"] < full.knobs["decoder_layers"] == model.num_decoder_layers
    assert 0 < base.gflops < full.gflops
    assert base.latency_ms > 0 and full.latency_ms > 0
    for row, depth in ((base, "base"), (full, "full")):
        metrics, count = manual_metrics(model, ds, depth, 64, 2)
        # all 10 x 3 (query, class) pairs of each image (max_det 300 > 30), all above conf 0.001
        # for a random model's sigmoid scores
        assert row.num_detections == count == 2 * 10 * 3
        assert row.metrics["AP"] == pytest.approx(metrics["AP"], abs=1e-9)
        assert row.metrics["AP50"] == pytest.approx(metrics["AP50"], abs=1e-9)


def test_evaluate_default_ladder_rows():
    ds = TinyDataset()
    model = yolo_tiny().eval()
    report = evaluate(model, ds, imgsz=64, max_images=1, progress=False, measure_latency=False)
    ladder = model.depth_configs((1, 3, 64, 64))
    assert len(report.rows) == len(ladder)
    assert [r.name for r in report.rows] == ["base"] + [f"ladder{i}" for i in range(1, len(ladder) - 1)] + ["full"]
    assert [r.code for r in report.rows] == [c.code for c in ladder]
    gf = [r.gflops for r in report.rows]
    assert gf == sorted(gf) and gf[0] < gf[-1]
    assert all(r.latency_ms is None for r in report.rows) and report.latency_batch is None


# -------------------------------------------------------------------------------------------------
# bad inputs

def test_evaluate_bad_inputs():
    ds = TinyDataset()
    model = yolo_tiny().eval()
    with pytest.raises(ValueError, match="unknown depth preset 'deepest'"):
        evaluate(model, ds, depths=["full", "deepest"], imgsz=64, progress=False)
    assert ds.load_calls == 0  # failed before running anything
    with pytest.raises(ValueError, match="empty"):
        evaluate(OracleModel(ds), TinyDataset(n=0), progress=False)
    with pytest.raises(ValueError, match="no ground-truth annotations"):
        evaluate(OracleModel(ds), TinyDataset(with_annotations=False), progress=False)
    with pytest.raises(TypeError, match="has no predict"):
        evaluate(object(), ds, progress=False)
    with pytest.raises(TypeError, match="lacks"):
        evaluate(OracleModel(ds), [1, 2, 3], progress=False)
    with pytest.raises(ValueError, match="depths is an empty list"):
        evaluate(OracleModel(ds), ds, depths=[], progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluate(OracleModel(ds), ds, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="max_images"):
        evaluate(OracleModel(ds), ds, max_images=0, progress=False)

    class WrongCount(OracleModel):
        def predict(self, images, **kw):
            return super().predict(images, **kw)[:-1]

    with pytest.raises(RuntimeError, match="returned 1 results for a batch of 2 images"):
        evaluate(WrongCount(ds), ds, batch_size=2, progress=False)

    class BadLabel(OracleModel):
        def predict(self, images, **kw):
            return [Detections(d.boxes, d.scores, d.labels + 5) for d in super().predict(images, **kw)]

    with pytest.raises(ValueError, match="predicted label [5-7], for which the dataset has no category"):
        evaluate(BadLabel(ds), ds, progress=False)

    with pytest.raises(ValueError, match="meta device"):
        with torch.device("meta"):
            meta_model = anydepth.create_model("yolov12n-anydepth", num_classes=3)
        evaluate(meta_model, ds, progress=False)


def test_evaluate_empty_predictions_give_0():
    ds = TinyDataset()

    class Blind(OracleModel):
        def predict(self, images, **kw):
            return [Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)) for _ in images]

    report = evaluate(Blind(ds), ds, progress=False)
    row = report.rows[0]
    assert row.num_detections == 0 and row.metrics["AP"] == 0.0 and row.metrics["AP50"] == 0.0


# -------------------------------------------------------------------------------------------------
# the report

def oracle_report():
    ds = TinyDataset()
    return evaluate(OracleModel(ds), ds, depths=["full", "base"], imgsz=64, progress=False)


def test_report_table():
    report = oracle_report()
    lines = report.table().splitlines()
    assert len(lines) == 4
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:4] == ["depth", "code", "skipped", "GFLOPs"] and head[5] == "p10-p90 ms"
    assert head[6:] == ["AP %", "AP50 %", "AP75 %", "AP_S %", "AP_M %", "AP_L %"]
    assert set(lines[1]) <= set("|-:")
    full = [c.strip() for c in lines[2].strip("|").split("|")]
    base = [c.strip() for c in lines[3].strip("|").split("|")]
    assert full[0] == "full" and full[3:6] == ["-", "-", "-"] and full[6:9] == ["100.0", "100.0", "100.0"]
    assert base[0] == "base" and base[6:9] == ["30.0", "100.0", "0.0"]


def test_report_json_round_trip_plot_and_save(tmp_path):
    report = oracle_report()
    d = report.to_json(tmp_path / "r.json")
    with open(tmp_path / "r.json") as f:
        on_disk = json.load(f)
    assert on_disk == d
    back = EvalReport.from_json(tmp_path / "r.json")
    assert back == report
    assert back.row("base").metrics["AP"] == pytest.approx(0.3, abs=1e-12)
    assert back.row("full").metrics["AP_small"] == report.row("full").metrics["AP_small"]
    with pytest.raises(KeyError, match="no row 'ladder3'"):
        back.row("ladder3")
    with pytest.raises(ValueError, match="not an evaluation report"):
        EvalReport.from_json({"rows": []})

    png = report.plot(tmp_path / "p.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    paths = report.save(tmp_path / "out", "oracle")
    assert [paths[k].endswith(f"oracle.{k}") for k in ("json", "md", "png")] == [True] * 3
    with open(paths["md"]) as f:
        assert report.table() in f.read()
    with open(paths["png"], "rb") as f:
        assert f.read(4) == b"\x89PNG"
    assert EvalReport.from_json(paths["json"]) == report


def test_report_with_latency_plots_against_latency(tmp_path):
    ds = TinyDataset()
    model = yolo_tiny().eval()
    report = evaluate(model, ds, depths=["base", "full"], imgsz=64, max_images=1, progress=False,
                      latency_reps=1, latency_warmup=0, latency_rounds=3)
    assert all(r.latency_ms is not None and math.isfinite(r.latency_ms) for r in report.rows)
    assert all(r.latency_p10_ms <= r.latency_ms <= r.latency_p90_ms for r in report.rows)
    assert report.latency["source"] == "measured" and report.latency["rounds"] == 3
    assert report.latency["samples"] == 3 and report.latency["form"] == "eager"
    kind, xs = report.plot_axis()
    assert kind == "latency" and xs == [r.latency_ms for r in report.rows]
    png = report.plot(tmp_path / "lat.png")
    with open(png, "rb") as f:
        assert f.read(4) == b"\x89PNG"
    assert "latency ms (b1)" in report.table()
    assert EvalReport.from_json(report.to_json()) == report
    # without latency the plot is against GFLOPs, without either against the depth order
    d = report.to_json()
    no_lat = EvalReport.from_json(dict(d, rows=[dict(r, latency_ms=None) for r in d["rows"]]))
    assert no_lat.plot_axis() == ("gflops", [r.gflops for r in report.rows])
    assert oracle_report().plot_axis() == ("depth", [0, 1])


# -------------------------------------------------------------------------------------------------
# latency as the benchmarks measure it, the report files and their units

@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory):
    """yolov12n's whole ladder on 2 tiny images, latency measured (2 interleaved rounds), the report
    saved with its per-depth picture."""
    from anydepth.evaluation.plots import depth_picture

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds = TinyDataset()
        model = yolo_tiny().eval()
        report = evaluate(model, ds, imgsz=64, max_images=2, progress=False, latency_rounds=2, latency_reps=1,
                          latency_warmup=0)
        out = tmp_path_factory.mktemp("report")
        pic = depth_picture(model, ds, out / "y-depths.png", imgsz=64, report=report)
        paths = report.save(out, "y", pictures={"detections per depth": pic})
    finally:
        torch.set_num_threads(threads)
    return model, ds, report, paths, pic


def _check_png(path, max_bytes=300_000):
    from PIL import Image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        size = im.size
    assert 0 < os.path.getsize(path) <= max_bytes
    return size


def _md_table(md):
    lines = [line for line in md.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return head, [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_report_files_exist_and_are_valid(ladder_run):
    model, ds, report, paths, pic = ladder_run
    with open(paths["json"]) as f:
        d = json.load(f)
    assert EvalReport.from_json(d) == report
    assert d["latency"]["source"] == "measured" and d["latency"]["rounds"] == 2
    assert [r["name"] for r in d["rows"]][0] == "base" and d["rows"][-1]["name"] == "full"
    w, h = _check_png(paths["png"])
    assert w >= 2 * h  # two panels side by side: against GFLOPs and against latency
    pw, ph = _check_png(pic)
    assert pw > ph  # 2 images x (ground truth + base, middle, full)
    with open(paths["md"]) as f:
        md = f.read()
    assert report.table() in md
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert links == ["y.png", "y-depths.png"]
    assert all(os.path.isfile(os.path.join(os.path.dirname(paths["md"]), p)) for p in links)


def test_report_units_consistent(ladder_run):
    """Table = percent of the JSON's fractions, GFLOPs and latency as in the JSON; the notes and
    the JSON's units say which is which, no note calls the table's numbers fractions."""
    _, _, report, paths, _ = ladder_run
    with open(paths["json"]) as f:
        d = json.load(f)
    with open(paths["md"]) as f:
        md = f.read()
    head, cells = _md_table(md)
    assert [c["depth"] for c in cells] == [r["name"] for r in d["rows"]]
    for c, r in zip(cells, d["rows"]):
        for m in ("AP", "AP50", "AP75"):
            assert 0.0 <= r["metrics"][m] <= 1.0
            assert c[f"{m} %"] == f"{100 * r['metrics'][m]:.1f}"
        assert c["GFLOPs"] == f"{r['gflops']:.2f}"
        assert c["latency ms (b1)"] == f"{r['latency_ms']:.1f}"
        assert c["p10-p90 ms"] == f"{r['latency_p10_ms']:.1f}-{r['latency_p90_ms']:.1f}"
        assert r["latency_p10_ms"] <= r["latency_ms"] <= r["latency_p90_ms"]
    assert "fractions in [0, 1]" in d["units"]["metrics"] and "percent" in d["units"]["metrics"]
    ap_notes = [n for n in d["notes"] if "AP" in n]
    assert ap_notes and all("percent" in n for n in ap_notes)
    assert "metrics are fractions" not in md
    assert any(n.startswith("latency:") and "interleaved rounds" in n and "p10-p90" in n for n in d["notes"])
    assert any(n.startswith("GFLOPs: one forward of one 64x64 image") for n in d["notes"])


def test_latency_order_base_below_full_measured_like_the_benchmark():
    """rtdetr-r18 at 128 px: full depth costs 1.75x base's FLOPs (every backbone stage and two
    decoder layers), a gap no load on a shared machine hides from a median of interleaved rounds.
    An ordering, not a time."""
    torch.manual_seed(0)
    model = anydepth.create_model("rtdetr-r18-anydepth", num_classes=3, num_queries=10).eval()
    ds = TinyDataset()
    report = evaluate(model, ds, depths=["base", "full"], imgsz=128, max_images=1, progress=False,
                      latency_rounds=7, latency_reps=1, latency_warmup=1)
    base, full = report.rows
    assert full.gflops > 1.6 * base.gflops
    assert base.latency_ms < full.latency_ms
    assert report.latency["samples"] == 7


def test_evaluate_reads_latency_from_a_profile(tmp_path):
    from anydepth.budget import DepthProfile

    model = yolo_tiny().eval()
    ds = TinyDataset()
    prof = model.profile_depths(imgsz=64, rounds=2, reps=1, warmup=0, overhead=False, configs=["full", "base", "full"])
    assert [e.name for e in prof.entries] == ["base", "full"]  # FLOP order, ladder labels, once each
    assert all(e.p10_ms <= e.median_ms <= e.p90_ms for e in prof.entries)
    path = prof.save(tmp_path / "p.json")
    report = evaluate(model, ds, depths=["full", "base"], imgsz=64, max_images=1, progress=False, profile=path,
                      measure_latency=False)
    for r in report.rows:
        e = prof.entry(r.code)
        assert (r.latency_ms, r.latency_p10_ms, r.latency_p90_ms) == (e.median_ms, e.p10_ms, e.p90_ms)
    assert report.latency["source"] == "profile" and report.latency["profile"] == path
    assert report.latency_batch == 1 and any("from the depth profile" in n for n in report.notes)
    # checked before anything runs: configurations the profile lacks, another imgsz, not a profile
    ds2 = TinyDataset()
    with pytest.raises(ValueError, match="lacks the configurations"):
        evaluate(model, ds2, imgsz=64, profile=prof, progress=False)
    with pytest.raises(ValueError, match="imgsz 64, not 96"):
        evaluate(model, ds2, depths=["full"], imgsz=96, profile=prof, progress=False)
    with pytest.raises(TypeError, match="profile must be a DepthProfile"):
        evaluate(model, ds2, imgsz=64, profile=3, progress=False)
    with pytest.raises(ValueError, match="latency_form"):
        evaluate(model, ds2, imgsz=64, latency_form="onnx", progress=False)
    assert ds2.load_calls == 0
    # p10 is kept in the JSON; a profile written before it existed still loads
    with open(path) as f:
        d = json.load(f)
    assert DepthProfile.from_json(d).entries[0].p10_ms == prof.entries[0].p10_ms
    for e in d["entries"]:
        del e["p10_ms"]
    assert DepthProfile.from_json(d).entries[0].p10_ms is None


def test_pareto_front():
    from anydepth.evaluation.plots import pareto_front

    assert pareto_front([1, 2, 3, 4], [1, 3, 2, 4]) == [0, 1, 3]
    assert pareto_front([3, 1, 2], [5, 5, 6]) == [1, 2]
    assert pareto_front([1, 1, 2], [2, 2, 2]) == [0]  # ties: the first; as good but costlier: dominated
    assert pareto_front([], []) == []
    with pytest.raises(ValueError, match="1 costs but 0 values"):
        pareto_front([1], [])


def test_comparison_plot_picture_depths_and_missing_matplotlib(ladder_run, tmp_path, monkeypatch):
    import sys

    from anydepth.evaluation.plots import depth_picture, picture_depths, plot_comparison

    model, ds, report, _, _ = ladder_run
    d = report.to_json()
    worse = EvalReport.from_json(dict(d, rows=[dict(r, metrics={k: v and v / 2 for k, v in r["metrics"].items()})
                                               for r in d["rows"]]))
    w, h = _check_png(plot_comparison({"distillation on": report, "distillation off": worse}, tmp_path / "c.png"))
    assert w > h  # AP and AP50 rows, GFLOPs and latency columns
    ladder = model.depth_configs((1, 3, 64, 64))
    assert picture_depths(model, 64) == [("base", ladder[0]), ("ladder4", ladder[4]), ("full", ladder[-1])]
    with pytest.raises(ValueError, match="image indices"):
        depth_picture(model, ds, tmp_path / "x.png", images=[9], imgsz=64)
    with pytest.raises(TypeError, match="are not EvalReports"):
        plot_comparison({"a": d}, tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"anydepth\[plot\]"):
        report.plot(tmp_path / "x.png")
    with pytest.raises(ImportError, match=r"anydepth\[plot\]"):
        depth_picture(model, ds, tmp_path / "x.png", imgsz=64)
    paths = report.save(tmp_path / "nompl", "r")
    assert paths["png"] is None
    with open(paths["md"]) as f:
        assert 'matplotlib is not installed, pip install "anydepth[plot]"' in f.read()


def test_cli_eval_reads_latency_from_profile(tmp_path, capsys):
    """`anydepth eval --profile FILE`: the latency columns are the profile's, the picture is written
    beside the report; a profile of another size is refused with exit code 2."""
    from anydepth import checkpoint
    from anydepth.cli import main
    from anydepth.data import synth

    synth.generate(str(tmp_path / "data"), images=2, imgsz=64, seed=1, split="val", progress=False)
    torch.manual_seed(0)
    model = anydepth.create_model("yolov12n-anydepth", num_classes=5).eval()
    checkpoint.save(model, tmp_path / "m.pt")
    prof = model.profile_depths(imgsz=64, rounds=1, reps=1, warmup=0, overhead=False, configs=["base", "full"])
    prof.save(tmp_path / "p64.json")
    args = ["eval", "--weights", str(tmp_path / "m.pt"), "--data", str(tmp_path / "data" / "val"), "--imgsz", "64",
            "--depths", "full,base", "--device", "cpu", "--quiet", "--pictures", "1", "--out", str(tmp_path / "ev")]
    assert main(args + ["--profile", str(tmp_path / "p64.json")]) == 0
    report = EvalReport.from_json(tmp_path / "ev" / "eval-yolov12n-anydepth-64.json")
    assert [r.latency_ms for r in report.rows] == [prof.entry("full").median_ms, prof.entry("base").median_ms]
    assert report.latency["source"] == "profile"
    assert (tmp_path / "ev" / "eval-yolov12n-anydepth-64-depths.png").is_file()
    assert "latency: from the depth profile" in capsys.readouterr().out
    prof.imgsz = 96
    prof.save(tmp_path / "p96.json")
    assert main(args + ["--profile", str(tmp_path / "p96.json")]) == 2
    assert "was measured at imgsz 96, not 64" in capsys.readouterr().err
