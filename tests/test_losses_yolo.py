"""YOLO losses: box IoU variants, DFL, task-aligned assignment, GT loss, self-distillation loss,
AnyDepthYOLOv12.forward_train, bad inputs. Hand-computed values are worked out in the comments."""
import math

import pytest
import torch

import anydepth
from anydepth.detection import batched_nms, greedy_nms
from anydepth.losses import (bbox_iou, box_cxcywh_to_xyxy, box_iou_pairwise, box_xyxy_to_cxcywh,
                             build_criterion, generalized_box_iou)
from anydepth.losses.yolo import (TaskAlignedAssigner, YOLOCriterion, bernoulli_kl, distribution_focal_loss,
                                  make_anchors)
from anydepth.train.step import detach_outputs

NC = 3


def _targets():
    return [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
            {"boxes": torch.tensor([[30.0, 20.0, 62.0, 58.0], [4.0, 4.0, 28.0, 30.0]]),
             "labels": torch.tensor([0, 2])}]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return anydepth.create_model("yolov12n-anydepth", num_classes=NC).train()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 64, 64, generator=g), _targets()


# -- boxes.py -------------------------------------------------------------------------------------
def test_box_conversions_roundtrip_any_leading_shape():
    xyxy = torch.tensor([[[0.0, 2.0, 4.0, 10.0]], [[1.0, 1.0, 2.0, 5.0]]])  # [2, 1, 4]
    c = box_xyxy_to_cxcywh(xyxy)
    assert torch.equal(c, torch.tensor([[[2.0, 6.0, 4.0, 8.0]], [[1.5, 3.0, 1.0, 4.0]]]))
    assert torch.equal(box_cxcywh_to_xyxy(c), xyxy)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        box_xyxy_to_cxcywh(torch.zeros(3, 5))


def test_bbox_iou_identical_and_disjoint():
    a = torch.tensor([[0.0, 0.0, 4.0, 2.0]])
    for kind in ("iou", "giou", "diou", "ciou"):
        torch.testing.assert_close(bbox_iou(a, a, kind=kind), torch.ones(1), rtol=0, atol=1e-6)
    # unit squares 1 apart: IoU 0; enclosing box [0,0,3,1] area 3, union 2 -> GIoU = -(3-2)/3;
    # centres (0.5,0.5) and (2.5,0.5): rho^2 = 4, enclosing diagonal^2 = 9 + 1 -> DIoU = -0.4
    p, q = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([2.0, 0.0, 3.0, 1.0])
    assert float(bbox_iou(p, q, kind="iou")) == 0.0
    assert float(box_iou_pairwise(p, q)) == 0.0
    assert float(bbox_iou(p, q, kind="giou")) == pytest.approx(-1 / 3, abs=1e-6)
    assert float(bbox_iou(p, q, kind="diou")) == pytest.approx(-0.4, abs=1e-6)


def test_bbox_iou_ciou_hand_case():
    # a = [0,0,4,2] (w 4, h 2), b = [2,0,4,4] (w 2, h 4): areas 8 and 8, intersection [2,4]x[0,2] = 4,
    # union 12 -> IoU = 1/3. Centres (2,1) and (3,2): rho^2 = 2; enclosing [0,0,4,4]: c^2 = 32.
    # v = 4/pi^2 (atan(2/4) - atan(4/2))^2 = 4/pi^2 atan(3/4)^2 = 0.1678255;
    # alpha = v / (v - IoU + 1) = 0.2011118; CIoU = 1/3 - 2/32 - alpha v = 0.2370810
    a = torch.tensor([0.0, 0.0, 4.0, 2.0])
    b = torch.tensor([2.0, 0.0, 4.0, 4.0])
    v = 4 / math.pi**2 * math.atan(0.75) ** 2
    alpha = v / (v - 1 / 3 + 1)
    expected = 1 / 3 - 2 / 32 - alpha * v
    assert expected == pytest.approx(0.2370810, abs=1e-6)
    assert float(bbox_iou(a, b, kind="ciou")) == pytest.approx(expected, abs=1e-6)
    assert float(bbox_iou(a, b, kind="iou")) == pytest.approx(1 / 3, abs=1e-6)
    assert float(bbox_iou(a, b, kind="diou")) == pytest.approx(1 / 3 - 1 / 16, abs=1e-6)
    # enclosing [0,0,4,4] area 16, union 12 -> GIoU = 1/3 - 4/16
    assert float(bbox_iou(a, b, kind="giou")) == pytest.approx(1 / 3 - 0.25, abs=1e-6)
    # broadcasting over leading dims, and the gradient flows (alpha is a constant)
    aa = a.repeat(2, 3, 1).requires_grad_()
    out = bbox_iou(aa, b, kind="ciou")
    assert out.shape == (2, 3)
    out.sum().backward()
    assert torch.isfinite(aa.grad).all() and aa.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown IoU kind"):
        bbox_iou(a, b, kind="eiou")


def test_generalized_box_iou_matrix():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [2.0, 2.0, 4.0, 4.0]])
    # (0,1): touching corners, union 8, enclosing 16 -> -0.5; (1,0) and (1,1): inter 1, union 7,
    # enclosing 9 -> 1/7 - 2/9 = -5/63
    expected = torch.tensor([[1.0, -0.5], [-5 / 63, -5 / 63]])
    g = generalized_box_iou(a, b)
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-6)
    # GIoU <= IoU, equal where the enclosing box is the union
    assert (g <= bbox_iou(a[:, None], b[None], kind="iou") + 1e-6).all()
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        generalized_box_iou(a[None], b)


def _random_xyxy(n, g, scale=10.0):
    xy = torch.rand(n, 2, generator=g) * scale
    wh = torch.rand(n, 2, generator=g) * scale / 2 + 0.01
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("n, m", [(1, 1), (7, 3), (40, 25)])
def test_box_math_matches_torchvision(n, m):
    """torchvision.ops is the oracle for our box math. We keep our own: the CIoU term must follow
    Ultralytics' formula (eps placement) bit for bit, every division is guarded by eps for degenerate
    boxes, and torchvision stays optional (the vision extra)."""
    tv = pytest.importorskip("torchvision.ops")
    g = torch.Generator().manual_seed(n * 100 + m)
    a, b = _random_xyxy(n, g), _random_xyxy(m, g)
    torch.testing.assert_close(bbox_iou(a[:, None], b[None], kind="iou", eps=0.0), tv.box_iou(a, b))
    torch.testing.assert_close(generalized_box_iou(a, b, eps=0.0), tv.generalized_box_iou(a, b))
    torch.testing.assert_close(box_xyxy_to_cxcywh(a), tv.box_convert(a, "xyxy", "cxcywh"))
    c = tv.box_convert(a, "xyxy", "cxcywh")
    torch.testing.assert_close(box_cxcywh_to_xyxy(c), tv.box_convert(c, "cxcywh", "xyxy"))
    k = min(n, m)
    ciou_loss = tv.complete_box_iou_loss(a[:k], b[:k], reduction="none", eps=1e-7)
    torch.testing.assert_close(1 - bbox_iou(a[:k], b[:k], kind="ciou"), ciou_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, iou", [(1, 0.5), (30, 0.5), (200, 0.3), (200, 0.7)])
def test_greedy_nms_matches_torchvision(n, iou):
    """The NMS used without torchvision keeps exactly what torchvision's kernel keeps."""
    tv = pytest.importorskip("torchvision.ops")
    g = torch.Generator().manual_seed(n)
    boxes = _random_xyxy(n, g, scale=20.0)
    scores = torch.rand(n, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    expected = tv.batched_nms(boxes, scores, labels, iou)
    assert torch.equal(greedy_nms(boxes, scores, labels, iou), expected)
    assert torch.equal(batched_nms(boxes, scores, labels, iou), expected)
    assert greedy_nms(boxes[:0], scores[:0], labels[:0], iou).shape == (0,)


# -- DFL / KL -------------------------------------------------------------------------------------
def test_dfl_hand_case():
    # probabilities: bin 3 -> 1/2, bin 4 -> 1/4, the 14 others share 1/4. Target 3.3 puts weight
    # 0.7 on bin 3 and 0.3 on bin 4: loss = 0.7 * log 2 + 0.3 * log 4 = 1.3 log 2
    p = torch.full((16,), 0.25 / 14)
    p[3], p[4] = 0.5, 0.25
    logits = p.log() + 7.0  # a constant shift changes nothing
    loss = distribution_focal_loss(logits, torch.tensor(3.3))
    assert float(loss) == pytest.approx(1.3 * math.log(2), abs=1e-5)
    # clamping: 20 -> 14.99 (bins 14/15 weights 0.01/0.99), -1 -> 0 (bin 0 weight 1)
    q = torch.arange(16.0)
    logp = q.log_softmax(0)
    out = distribution_focal_loss(q.expand(2, 16), torch.tensor([20.0, -1.0]))
    torch.testing.assert_close(out, torch.stack([-(0.01 * logp[14] + 0.99 * logp[15]), -logp[0]]),
                               rtol=0, atol=1e-4)


def test_bernoulli_kl_formula():
    t, s, T = torch.tensor([1.0]), torch.tensor([-1.0]), 2.0
    p, q = 1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.5))
    expected = T**2 * (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
    assert float(bernoulli_kl(t, s, T)) == pytest.approx(expected, rel=1e-5)
    x = torch.randn(5, 3) * 30
    assert torch.equal(bernoulli_kl(x, x, 2.0), torch.zeros(5, 3))


# -- assigner -------------------------------------------------------------------------------------
def _grid():
    """4x4 anchors at stride 8 on a 32x32 image; index = row * 4 + col; centres 4, 12, 20, 28."""
    pts, _ = make_anchors([(4, 4)], [8])
    return pts.T * 8  # [16, 2] pixels


def _assign(assigner, scores, pred_box, gt_boxes, gt_labels, gt_mask=None):
    a = 16
    pred = pred_box.expand(1, a, 4) if pred_box.ndim == 1 else pred_box
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float32)[None]
    gt_labels = torch.as_tensor(gt_labels)[None]
    mask = torch.ones(gt_labels.shape, dtype=torch.bool) if gt_mask is None else torch.as_tensor(gt_mask)[None]
    return assigner(scores, pred, _grid(), gt_labels, gt_boxes, mask)


def test_assigner_gt_covers_known_anchors():
    # GT [0,0,16,16] strictly contains centres (4,4), (12,4), (4,12), (12,12): anchors 0, 1, 4, 5.
    # Every prediction is the GT box (IoU 1) with p = 0.5: equal metrics, normalised score 1.
    scores = torch.full((1, 16, NC), 0.5)
    asg = _assign(TaskAlignedAssigner(topk=10), scores, torch.tensor([0.0, 0.0, 16.0, 16.0]),
                  [[0.0, 0.0, 16.0, 16.0]], [2])
    assert asg.fg[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert asg.labels[0, [0, 1, 4, 5]].tolist() == [2] * 4 and asg.labels[0, asg.fg[0].logical_not()].eq(0).all()
    assert torch.equal(asg.boxes[0, 5], torch.tensor([0.0, 0.0, 16.0, 16.0]))
    assert asg.boxes[0, ~asg.fg[0]].eq(0).all()
    expected = torch.zeros(16, NC)
    expected[[0, 1, 4, 5], 2] = 1.0
    torch.testing.assert_close(asg.scores[0], expected, rtol=0, atol=1e-6)
    # an anchor centre on the GT border is not inside: GT [4,4,12,12] has both centres on its edges
    asg = _assign(TaskAlignedAssigner(), scores, torch.tensor([4.0, 4.0, 12.0, 12.0]), [[4.0, 4.0, 12.0, 12.0]], [0])
    assert not asg.fg.any()


def test_assigner_topk_and_normalised_scores():
    # GT covers all 16 anchors, predictions all equal the GT (IoU 1); class prob of anchor i is
    # (i+1)/16 -> metric sqrt((i+1)/16): top-3 are anchors 13, 14, 15 with normalised scores
    # sqrt(14/16), sqrt(15/16), 1 (metric / max metric * max IoU 1)
    scores = torch.zeros(1, 16, NC)
    scores[0, :, 1] = (torch.arange(16.0) + 1) / 16
    asg = _assign(TaskAlignedAssigner(topk=3), scores, torch.tensor([0.0, 0.0, 32.0, 32.0]),
                  [[0.0, 0.0, 32.0, 32.0]], [1])
    assert asg.fg[0].nonzero().flatten().tolist() == [13, 14, 15]
    torch.testing.assert_close(asg.scores[0, 13:, 1], torch.tensor([math.sqrt(14 / 16), math.sqrt(15 / 16), 1.0]),
                               rtol=0, atol=1e-6)
    assert asg.scores[0, :13].eq(0).all() and asg.scores[0, :, [0, 2]].eq(0).all()
    # beta weighs IoU: anchor 0 predicts the GT exactly, the others a box of IoU 1/4 ([0,0,16,16]);
    # with alpha = 0 (scores ignored) and topk 1 anchor 0 wins despite the lowest class prob
    pred = torch.tensor([0.0, 0.0, 16.0, 16.0]).repeat(1, 16, 1)
    pred[0, 0] = torch.tensor([0.0, 0.0, 32.0, 32.0])
    asg = _assign(TaskAlignedAssigner(topk=1, alpha=0.0), scores, pred, [[0.0, 0.0, 32.0, 32.0]], [1])
    assert asg.fg[0].nonzero().flatten().tolist() == [0]


def test_assigner_overlapping_gts_highest_iou_wins():
    # GT A [0,0,16,16] (label 0) contains anchors 0, 1, 4, 5; GT B [8,0,24,16] (label 2) contains
    # 1, 2, 5, 6. Every anchor predicts [6,0,22,16]: IoU with A = 160/352 = 5/11, with B =
    # 224/288 = 7/9, so the contested anchors 1 and 5 go to B. Equal metrics within a GT, so the
    # normalised score is the GT's max IoU: 5/11 for A's anchors, 7/9 for B's.
    scores = torch.full((1, 16, NC), 0.5)
    asg = _assign(TaskAlignedAssigner(topk=10), scores, torch.tensor([6.0, 0.0, 22.0, 16.0]),
                  [[0.0, 0.0, 16.0, 16.0], [8.0, 0.0, 24.0, 16.0]], [0, 2])
    fg = asg.fg[0].nonzero().flatten().tolist()
    assert fg == [0, 1, 2, 4, 5, 6]
    assert asg.gt_index[0, fg].tolist() == [0, 1, 1, 0, 1, 1]
    assert asg.labels[0, fg].tolist() == [0, 2, 2, 0, 2, 2]
    torch.testing.assert_close(asg.scores[0, [0, 4], 0], torch.full((2,), 5 / 11), rtol=0, atol=1e-6)
    torch.testing.assert_close(asg.scores[0, [1, 2, 5, 6], 2], torch.full((4,), 7 / 9), rtol=0, atol=1e-6)
    assert float(asg.scores[0].sum()) == pytest.approx(2 * 5 / 11 + 4 * 7 / 9, abs=1e-5)


def test_assigner_empty_images():
    assigner = TaskAlignedAssigner()
    scores = torch.full((2, 16, NC), 0.5)
    pred = torch.tensor([0.0, 0.0, 16.0, 16.0]).repeat(2, 16, 1)
    # image 0 has one GT, image 1 only padding
    gt_boxes = torch.tensor([[[0.0, 0.0, 16.0, 16.0]], [[0.0, 0.0, 16.0, 16.0]]])
    asg = assigner(scores, pred, _grid(), torch.tensor([[1], [1]]), gt_boxes, torch.tensor([[True], [False]]))
    assert asg.fg[0].sum() == 4 and not asg.fg[1].any() and asg.scores[1].eq(0).all()
    # no GT anywhere in the batch (M = 0)
    asg = assigner(scores, pred, _grid(), torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 4),
                   torch.zeros(2, 0, dtype=torch.bool))
    assert asg.fg.shape == (2, 16) and not asg.fg.any() and asg.scores.eq(0).all()
    assert asg.boxes.shape == (2, 16, 4) and asg.labels.shape == (2, 16)


# -- GT loss --------------------------------------------------------------------------------------
def test_anchor_grid_matches_detect(model, batch):
    out = model.forward_train(batch[0], "full")
    crit = build_criterion(model)
    pts, strides = model.layers[21].anchors(out["feats"])
    mine = crit.anchors(out, out["boxes"].shape[-1])
    assert torch.equal(mine[0], pts.T) and torch.equal(mine[1], strides.T)
    # the same grid from image_size alone
    crit2 = YOLOCriterion((NC, 16, (8, 16, 32)))
    mine2 = crit2.anchors({"boxes": out["boxes"], "image_size": (64, 64)}, 84)
    assert torch.equal(mine2[0], pts.T)


def test_gt_loss_random_model_finite_positive(model, batch):
    x, targets = batch
    out = model.forward_train(x, "full")
    loss, logs = build_criterion(model).gt_loss(out, targets)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert set(logs) == {"box", "cls", "dfl", "fg", "loss"} and all(isinstance(v, float) for v in logs.values())
    assert 0 < logs["fg"] <= 3 * 10  # 3 GTs, at most topk anchors each
    assert logs["loss"] == pytest.approx(7.5 * logs["box"] + 0.5 * logs["cls"] + 1.5 * logs["dfl"], rel=1e-5)
    # weights are constructor keywords
    loss2, _ = build_criterion(model, box=0.0, cls=1.0, dfl=0.0).gt_loss(out, targets)
    assert float(loss2.detach()) == pytest.approx(logs["cls"], rel=1e-5)
    # an all-background batch: only the class term, normalised by 1
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    loss3, logs3 = build_criterion(model).gt_loss(out, empty)
    assert logs3["fg"] == 0 and logs3["box"] == 0 and logs3["dfl"] == 0
    scores = out["scores"].detach()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(scores, torch.zeros_like(scores), reduction="sum")
    assert float(loss3.detach()) == pytest.approx(0.5 * float(expected), rel=1e-5)


def test_gt_loss_oracle_prediction_is_near_zero():
    # one level, stride 8, 64x64 image -> 8x8 anchors at centres 4 + 8 i. GT [4,4,36,36] contains
    # the 3x3 anchors with centres 12, 20, 28 (9 <= topk), with integer distances 1..4 in grid units.
    # The oracle puts logit +30 on the exact distance bin and on the GT class at those anchors,
    # -30 elsewhere: CIoU 1, DFL ~0, BCE ~0.
    crit = YOLOCriterion((2, 16, (8,)))
    pts, _ = make_anchors([(8, 8)], [8])
    gt = torch.tensor([4.0, 4.0, 36.0, 36.0]) / 8
    box_logits = torch.full((1, 4, 16, 64), -30.0)
    scores = torch.full((1, 2, 64), -30.0)
    inside = ((pts[0] > gt[0]) & (pts[0] < gt[2]) & (pts[1] > gt[1]) & (pts[1] < gt[3])).nonzero().flatten()
    assert inside.numel() == 9
    for a in inside.tolist():
        x, y = pts[:, a].tolist()
        for side, d in enumerate((x - gt[0], y - gt[1], gt[2] - x, gt[3] - y)):
            assert float(d) == int(d)
            box_logits[0, side, int(d), a] = 30.0
        scores[0, 1, a] = 30.0
    outputs = {"boxes": box_logits.view(1, 64, 64), "scores": scores, "image_size": (64, 64)}
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 36.0, 36.0]]), "labels": torch.tensor([1])}]
    loss, logs = crit.gt_loss(outputs, targets)
    assert logs["fg"] == 9
    assert 0 <= float(loss) < 1e-5
    # the same oracle with the wrong class is heavily penalised
    _, logs_bad = crit.gt_loss(outputs, [{"boxes": targets[0]["boxes"], "labels": torch.tensor([0])}])
    assert logs_bad["cls"] > 1.0


def test_optimizer_steps_decrease_gt_loss():
    # fixed batch, fixed seed, AdamW: the first step lowers the loss, and five steps lower it by
    # more than 15 % (the assignment changes as the boxes move, so the curve is not monotonic)
    torch.manual_seed(0)
    m = anydepth.create_model("yolov12n-anydepth", num_classes=NC).train()
    crit = build_criterion(m)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    targets = _targets()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(5):
        loss, _ = crit.gt_loss(m.forward_train(x, "full"), targets)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses.append(float(crit.gt_loss(m.forward_train(x, "full"), targets)[0].detach()))
    assert losses[1] < 0.99 * losses[0], losses
    assert losses[-1] < 0.85 * losses[0], losses


# -- distillation ---------------------------------------------------------------------------------
def test_distill_identical_outputs_is_gt_fraction(model, batch):
    x, targets = batch
    crit = build_criterion(model)
    out = model.forward_train(x, "full")
    gt, gt_logs = crit.gt_loss(out, targets)
    loss, logs = crit.distill_loss(out, detach_outputs(out), targets)
    assert logs["kd_cls"] == 0.0 and logs["kd_dfl"] == 0.0 and logs["kd_feat"] == 0.0
    assert 0.0 <= logs["kd_box"] < 1e-6
    assert logs["kd_fg"] > 0  # the KD terms were evaluated on teacher-foreground anchors
    assert float(loss.detach()) == pytest.approx(0.2 * float(gt.detach()), rel=1e-5)
    assert logs["gt"] == pytest.approx(gt_logs["loss"], rel=1e-6)


def test_distill_terms_and_weights(model, batch):
    x, targets = batch
    crit = build_criterion(model)
    teacher = detach_outputs(model.forward_train(x, "full"))
    student = model.forward_train(x, "base")
    loss, logs = crit.distill_loss(student, teacher, targets)
    for k in ("kd_cls", "kd_box", "kd_dfl", "kd_feat"):
        assert logs[k] > 0, k
    kd = 0.5 * logs["kd_cls"] + 7.5 * logs["kd_box"] + 1.5 * logs["kd_dfl"] + 0.1 * logs["kd_feat"]
    assert logs["kd"] == pytest.approx(kd, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(0.2 * logs["gt"] + 0.8 * kd, rel=1e-5)
    # the feature term by hand: mean over the 5 maps of |n(gap(s)) - n(gap(t))|^2, batch mean
    f = torch.nn.functional
    terms = [(f.normalize(s.mean((2, 3)), dim=1) - f.normalize(t.mean((2, 3)), dim=1)).pow(2).sum(1).mean()
             for s, t in zip(student["distill_feats"], teacher["distill_feats"])]
    assert logs["kd_feat"] == pytest.approx(float(sum(terms).detach() / 5), rel=1e-5)
    # every weight is a keyword: only the feature term left
    only_feat = build_criterion(model, distill_gt=0.0, distill_kd=1.0, kd_cls=0.0, kd_box=0.0, kd_dfl=0.0,
                                kd_feat=1.0)
    feat_only = float(only_feat.distill_loss(student, teacher, targets)[0].detach())
    assert feat_only == pytest.approx(logs["kd_feat"], rel=1e-5)


def test_distill_gradients_shared_and_refinement():
    torch.manual_seed(0)
    m = anydepth.create_model("yolov12n-anydepth", num_classes=NC).train()
    crit = build_criterion(m)
    x, targets = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)), _targets()
    stem = m.layers[0].conv.weight
    csp = m.layers[6]  # backbone.p4: 2 inner blocks, 1 essential + 1 refinement
    assert csp.n_essential == 1 and len(csp.m) == 2
    refine = next(csp.m[1].parameters())
    # full pass with the GT loss + shallow pass with the distillation loss, as the trainer does
    out_full = m.forward_train(x, "full")
    crit.gt_loss(out_full, targets)[0].backward()
    g_stem_full, g_refine_full = stem.grad.clone(), refine.grad.clone()
    assert g_refine_full.abs().sum() > 0
    crit.distill_loss(m.forward_train(x, "base"), detach_outputs(out_full), targets)[0].backward()
    assert refine.grad.abs().sum() > 0 and stem.grad.abs().sum() > 0
    assert not torch.allclose(stem.grad, g_stem_full)       # the shared stem also got the distill gradient
    torch.testing.assert_close(refine.grad, g_refine_full)   # refinement: only from the full pass
    # the distillation pass alone reaches the stem and leaves the refinement block untouched
    m.zero_grad(set_to_none=True)
    teacher = detach_outputs(m.forward_train(x, "full"))
    crit.distill_loss(m.forward_train(x, "base"), teacher, targets)[0].backward()
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    assert refine.grad is None


# -- forward_train --------------------------------------------------------------------------------
def test_forward_train_outputs(model, batch):
    x, _ = batch
    out = model.forward_train(x, "base")
    assert set(out) == {"boxes", "scores", "feats", "distill_feats", "image_size"}
    assert out["boxes"].shape == (2, 64, 84) and out["scores"].shape == (2, NC, 84)
    assert out["image_size"] == (64, 64)
    df = out["distill_feats"]
    assert len(df) == 5 and all(a is b for a, b in zip(df[2:], out["feats"]))
    assert [tuple(t.shape[1:]) for t in df[:2]] == [(128, 4, 4), (256, 2, 2)]
    # the same as model(x) in training mode, the hooks are gone afterwards
    plain = model(x, depth="base")
    torch.testing.assert_close(out["boxes"], plain["boxes"])
    assert all(not model.layers[i]._forward_hooks for i in (6, 8))
    # distill_feats[0] is backbone.p4's output: recompute it by hand at base depth
    with torch.no_grad():
        L = model.layers
        h = L[4](L[3](L[2](L[1](L[0](x)), True)), True)
        torch.testing.assert_close(df[0], L[6](L[5](h), True))
    # depth None = full, and full differs from base
    full = model.forward_train(x)
    assert not torch.allclose(full["distill_feats"][0], df[0])


def test_forward_train_requires_training_mode(model):
    model.eval()
    try:
        with pytest.raises(RuntimeError, match="training mode"):
            model.forward_train(torch.rand(1, 3, 64, 64))
    finally:
        model.train()


# -- bad inputs -----------------------------------------------------------------------------------
def test_bad_targets_and_outputs(model, batch):
    x, targets = batch
    crit = build_criterion(model)
    out = model.forward_train(x, "full")
    ok_labels = torch.tensor([0])

    def one(boxes, labels):
        return [{"boxes": boxes, "labels": labels}, targets[1]]

    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        crit.gt_loss(out, one(torch.zeros(1, 5), ok_labels))
    with pytest.raises(ValueError, match=r"labels'\] must have shape \[N\]"):
        crit.gt_loss(out, one(torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.tensor([0, 1])))
    with pytest.raises(ValueError, match=r"outside 0\.\.2: \[3\]"):
        crit.gt_loss(out, one(torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.tensor([3])))
    with pytest.raises(ValueError, match=r"outside 0\.\.2: \[-1\]"):
        crit.gt_loss(out, one(torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.tensor([-1])))
    with pytest.raises(ValueError, match="NaN"):
        crit.gt_loss(out, one(torch.tensor([[1.0, float("nan"), 9.0, 9.0]]), ok_labels))
    with pytest.raises(ValueError, match="x2 < x1"):
        crit.gt_loss(out, one(torch.tensor([[9.0, 1.0, 1.0, 9.0]]), ok_labels))
    with pytest.raises(TypeError, match="integer"):
        crit.gt_loss(out, one(torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.tensor([0.0])))
    with pytest.raises(ValueError, match="1 target dicts for a batch of 2"):
        crit.gt_loss(out, targets[:1])
    with pytest.raises(TypeError, match="'boxes' and 'labels'"):
        crit.gt_loss(out, [{"boxes": torch.zeros(0, 4)}, targets[1]])
    with pytest.raises(ValueError, match="num_classes=3"):
        crit.gt_loss({**out, "scores": out["scores"][:, :2]}, targets)
    with pytest.raises(TypeError, match="forward_train"):
        crit.gt_loss(out["boxes"], targets)
    with pytest.raises(ValueError, match="distill_feats"):
        crit.distill_loss({k: v for k, v in out.items() if k != "distill_feats"}, detach_outputs(out), targets)
    with pytest.raises(TypeError, match=r"'list'; supported: .*AnyDepthYOLOv12"):  # every family, from the specs
        build_criterion([1, 2])
    with pytest.raises(ValueError, match="must be >= 0"):
        build_criterion(model, box=-1.0)


def test_losses_run_in_float32_under_autocast(model, batch):
    # the trainer calls the criterion inside torch.autocast: the losses stay float32 and equal
    x, targets = batch
    crit = build_criterion(model)
    out = detach_outputs(model.forward_train(x, "full"))
    student = detach_outputs(model.forward_train(x, "base"))
    ref, _ = crit.gt_loss(out, targets)
    ref_d, _ = crit.distill_loss(student, out, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = crit.gt_loss(out, targets)
        loss_d, _ = crit.distill_loss(student, out, targets)
    assert loss.dtype == torch.float32 and loss_d.dtype == torch.float32
    assert float(loss) == float(ref) and float(loss_d) == float(ref_d)


def test_authors_kd_terms_by_hand():
    # 3 anchors, 2 classes, reg_max 4. Teacher: foreground at all 3 (GT 0, 1, 0; target scores 0.5,
    # 0.8, 0.3); student: foreground at anchors 0 and 1, both GT 0 -> anchor 1 is a conflict.
    # Class KD on teacher-fg non-conflict anchors {0, 2}; box/DFL KD on those also fg for the student {0}.
    from anydepth.losses.yolo import Assignment

    crit = YOLOCriterion((2, 4, (8,)))

    def asg(fg, gt_index, score):
        fg = torch.tensor([fg])
        scores = torch.zeros(1, 3, 2)
        scores[0, :, 0] = torch.tensor(score)
        return Assignment(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, 4), scores, fg,
                          torch.tensor([gt_index]))

    asg_t = asg([True, True, True], [0, 1, 0], [0.5, 0.8, 0.3])
    asg_s = asg([True, True, False], [0, 0, 0], [0.4, 0.4, 0.0])
    assert crit.conflicts(asg_s, asg_t).tolist() == [[False, True, False]]
    t_cls = torch.tensor([[[1.0, -1.0], [0.0, 0.0], [2.0, 0.0]]])
    s_cls = torch.tensor([[[0.0, 0.0], [5.0, -5.0], [0.0, 2.0]]])
    # boxes: student [1, 1, 3, 3] inside teacher [0, 0, 4, 4] at anchor 0 (same centre, both square:
    # CIoU = IoU = 4 / 16); anchors 1, 2 far apart (they must not count)
    t_xyxy = torch.tensor([[[0.0, 0, 4, 4], [0, 0, 1, 1], [0, 0, 1, 1]]])
    s_xyxy = torch.tensor([[[1.0, 1, 3, 3], [5, 5, 6, 6], [5, 5, 6, 6]]])
    t_dist = torch.zeros(1, 3, 4, 4)
    s_dist = torch.zeros(1, 3, 4, 4)
    t_dist[0, 0, :, 0] = 10.0  # teacher at anchor 0: logits (10, 0, 0, 0) on every side
    s_dist[0, 1:] = 7.0        # anchors 1, 2 differ but are excluded (uniform softmax -> no effect anyway)
    s_dist[0, 1:, :, 0] = -30.0
    ps = dict(cls=s_cls, xyxy=s_xyxy, dist_logits=s_dist)
    pt = dict(cls=t_cls, xyxy=t_xyxy, dist_logits=t_dist)
    kd_cls, kd_box, kd_dfl, n_cls, n_conflict = crit._kd_authors(ps, pt, asg_s, asg_t)

    def sm(v, T):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    def kl(t, s, T):
        p, q = sm(t, T), sm(s, T)
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    # weights 0.5 + 0.3 = 0.8 < 1: the normaliser is clamped to 1
    expected_cls = 4 * (0.5 * kl([1, -1], [0, 0], 2) + 0.3 * kl([2, 0], [0, 2], 2)) / 1.0
    assert float(kd_cls) == pytest.approx(expected_cls, rel=1e-5)
    assert float(kd_box) == pytest.approx((1 - 0.25) * 0.5, abs=1e-6)
    expected_dfl = kl([10, 0, 0, 0], [0, 0, 0, 0], 10) * 0.5  # same on the 4 sides, no T^2
    assert float(kd_dfl) == pytest.approx(expected_dfl, rel=1e-5)
    assert (n_cls, n_conflict) == (2, 1)
    # the legacy variant on the same inputs: Bernoulli KL over the 3 teacher-fg anchors, no conflict mask
    legacy = YOLOCriterion((2, 4, (8,)), kd_style="legacy")
    l_cls, _, _, l_fg = legacy._kd_legacy(ps, pt, asg_t)
    assert l_fg == 3
    assert float(l_cls) == pytest.approx(float(bernoulli_kl(t_cls[0], s_cls[0], 2.0).sum() / 3), rel=1e-6)
    with pytest.raises(ValueError, match="kd_style"):
        YOLOCriterion((2, 4, (8,)), kd_style="other")


def test_distill_alpha_and_kd_scale(model, batch):
    # shallow total = distill_gt * GT + distill_kd * kd_scale * KD (alpha_base = distill_gt)
    x, targets = batch
    crit = build_criterion(model, distill_gt=0.3, distill_kd=0.7)
    teacher = detach_outputs(model.forward_train(x, "full"))
    student = model.forward_train(x, "base")
    for scale in (1.0, 0.5, 0.0):
        crit.kd_scale = scale
        loss, logs = crit.distill_loss(student, teacher, targets)
        assert logs["kd_scale"] == scale
        assert loss.item() == pytest.approx(0.3 * logs["gt"] + 0.7 * scale * logs["kd"], rel=1e-5)
