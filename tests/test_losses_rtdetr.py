"""RT-DETR training path and losses: Hungarian matcher, varifocal / L1 / GIoU terms, contrastive
denoising queries and their attention mask, forward_train outputs, self-distillation loss and the
two-pass gradient flow."""
from __future__ import annotations

import math

import pytest
import torch

from anydepth.losses import build_criterion
from anydepth.losses.rtdetr import (HungarianMatcher, RTDETRCriterion, bernoulli_kl, normalize_targets,
                                    varifocal_loss)
from anydepth.models.rtdetr import SelfAttention, build_denoising_queries
from anydepth.registry import create_model
from anydepth.train.step import detach_outputs, two_pass_step

NC, Q, SIZE = 3, 30, 128


@pytest.fixture(scope="module")
def r18_state():
    torch.manual_seed(0)
    return create_model("rtdetr-r18-anydepth", num_classes=NC, num_queries=Q).state_dict()


@pytest.fixture
def r18(r18_state):
    m = create_model("rtdetr-r18-anydepth", num_classes=NC, num_queries=Q)
    m.load_state_dict(r18_state)
    return m.train()


def _batch():
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    targets = [dict(boxes=torch.tensor([[10.0, 20, 60, 90], [70, 70, 120, 110]]), labels=torch.tensor([0, 2])),
               dict(boxes=torch.tensor([[5.0, 5, 50, 40]]), labels=torch.tensor([1]))]
    return x, targets


def _cxcywh(*b):
    return torch.tensor(b, dtype=torch.float32)


# -- matcher ----------------------------------------------------------------------------------------
def test_matcher_cost_of_one_pair_by_hand():
    # p = sigmoid(0) = 0.5: class cost = 0.25 * 0.5^2 * ln 2 - 0.75 * 0.5^2 * ln 2 = -0.125 ln 2
    # L1 = |0.5-0.4| + |0.5-0.5| + |0.2-0.2| + |0.2-0.4| = 0.3
    # boxes xyxy [0.4, 0.4, 0.6, 0.6] and [0.3, 0.3, 0.5, 0.7]: I = 0.1 * 0.2 = 0.02,
    # U = 0.04 + 0.08 - 0.02 = 0.1, IoU = 0.2, enclosing C = 0.3 * 0.4 = 0.12, GIoU = 0.2 - 0.02 / 0.12
    m = HungarianMatcher()
    cost = m.cost_matrix(torch.zeros(1, 2), _cxcywh([0.5, 0.5, 0.2, 0.2]), torch.tensor([1]),
                         _cxcywh([0.4, 0.5, 0.2, 0.4]))
    expected = 2 * (-0.125 * math.log(2)) + 5 * 0.3 - 2 * (0.2 - 0.02 / 0.12)
    assert cost.shape == (1, 1)
    assert cost.item() == pytest.approx(expected, abs=1e-5)


def test_matcher_finds_exact_predictions_under_any_query_order():
    gt = _cxcywh([0.2, 0.3, 0.1, 0.2], [0.7, 0.6, 0.3, 0.3], [0.5, 0.8, 0.2, 0.1])
    labels = torch.tensor([2, 0, 2])
    g = torch.Generator().manual_seed(0)
    for perm in ([4, 0, 2], [1, 5, 3], [5, 4, 3]):
        boxes = torch.rand(2, 6, 4, generator=g) * 0.3 + 0.35  # distractors in the middle
        logits = torch.randn(2, 6, NC, generator=g)
        boxes[0, perm] = gt
        targets = [{"boxes": gt, "labels": labels},
                   {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
        (q0, g0), (q1, g1) = HungarianMatcher()(logits, boxes, targets)
        assert sorted(zip(q0.tolist(), g0.tolist())) == sorted(zip(perm, range(3)))
        assert q0.tolist() == sorted(q0.tolist())  # sorted by query
        assert q1.numel() == 0 and g1.numel() == 0 and q1.dtype == torch.long


def test_matcher_more_objects_than_queries_and_nan():
    gt = _cxcywh([0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1])
    boxes = _cxcywh([[0.5, 0.5, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]])
    (q, g), = HungarianMatcher()(torch.zeros(1, 2, NC), boxes, [{"boxes": gt, "labels": torch.tensor([0, 1, 2])}])
    assert q.tolist() == [0, 1] and g.tolist() == [1, 2]
    with pytest.raises(FloatingPointError, match="not finite"):
        HungarianMatcher()(torch.full((1, 2, NC), float("nan")), boxes,
                           [{"boxes": gt, "labels": torch.tensor([0, 1, 2])}])


# -- GT loss terms on constructed cases -------------------------------------------------------------
def _outputs(logits, boxes, size=(100, 100)):
    return {"logits": torch.tensor(logits, dtype=torch.float32), "pred_boxes": torch.tensor(boxes),
            "aux_outputs": [], "enc_outputs": None, "dn_outputs": None, "dn_meta": None, "image_size": size}


def test_varifocal_l1_giou_one_query_two_classes_by_hand():
    # prediction cxcywh (0.5, 0.5, 0.4, 0.4) = xyxy [0.3, 0.3, 0.7, 0.7]; GT class 1, xyxy pixels
    # [40, 30, 60, 70] of a 100x100 image = (0.5, 0.5, 0.2, 0.4): IoU = 0.08 / 0.16 = 0.5 and the
    # enclosing box is the prediction, so GIoU = IoU.
    crit = RTDETRCriterion(2)
    out = _outputs([[[0.5, -1.0]]], [[[0.5, 0.5, 0.4, 0.4]]])
    targets = [{"boxes": torch.tensor([[40.0, 30, 60, 70]]), "labels": torch.tensor([1])}]
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # class 1 (positive): target 0.5, weight 0.5, BCE(-1, 0.5)
    pos = 0.5 * -(0.5 * math.log(sig(-1.0)) + 0.5 * math.log(1 - sig(-1.0)))
    # class 0 (negative): target 0, weight 0.75 * sigmoid(0.5)^2, BCE(0.5, 0) = -log(1 - sigmoid(0.5))
    neg = 0.75 * sig(0.5) ** 2 * -math.log(1 - sig(0.5))
    loss, logs = crit.gt_loss(out, targets)
    assert logs["vfl"] == pytest.approx(pos + neg, abs=1e-5)
    assert pos + neg == pytest.approx(0.6896895, abs=1e-6)
    assert logs["l1"] == pytest.approx(0.2, abs=1e-6)
    assert logs["giou"] == pytest.approx(0.5, abs=1e-5)
    assert loss.item() == pytest.approx(1 * (pos + neg) + 5 * 0.2 + 2 * 0.5, abs=1e-4)
    assert logs["aux"] == logs["enc"] == logs["dn"] == 0.0
    # the elementwise function agrees
    v = varifocal_loss(torch.tensor([0.5, -1.0]), torch.tensor([0.0, 0.5]), torch.tensor([False, True]))
    assert v.tolist() == pytest.approx([neg, pos], abs=1e-6)


def test_l1_giou_on_two_matched_pairs_normalised_by_gt_count():
    # pair A: exact (L1 0, GIoU 1). pair B: prediction xyxy [0, 0, 0.2, 0.2] vs GT [0.1, 0.1, 0.3, 0.3]:
    # I = 0.01, U = 0.07, C = 0.09, GIoU = 1/7 - 0.02/0.09; L1 (cxcywh) = 0.1 + 0.1 = 0.2
    crit = RTDETRCriterion(NC)
    out = _outputs([[[5.0, -5, -5], [-5, 5.0, -5]]], [[[0.6, 0.6, 0.2, 0.2], [0.1, 0.1, 0.2, 0.2]]])
    targets = [{"boxes": torch.tensor([[50.0, 50, 70, 70], [10, 10, 30, 30]]), "labels": torch.tensor([0, 1])}]
    tg = normalize_targets(targets, (100, 100), NC)
    indices = crit.matcher(out["logits"], out["pred_boxes"], tg)
    assert indices[0][0].tolist() == [0, 1] and indices[0][1].tolist() == [0, 1]
    terms = crit.set_terms(out, tg, indices, num_boxes=2.0)
    assert terms["l1"].item() == pytest.approx(0.2 / 2, abs=1e-6)
    assert terms["giou"].item() == pytest.approx((0.0 + 1 - (1 / 7 - 0.02 / 0.09)) / 2, abs=1e-5)


def test_normalize_targets_converts_and_clips():
    tg = normalize_targets([{"boxes": torch.tensor([[-10.0, 20, 60, 300]]), "labels": torch.tensor([2])}],
                           (200, 100), NC)
    # clipped to [0, 20, 60, 200] in a 100 wide x 200 high image -> cx 0.3, cy 0.55, w 0.6, h 0.9
    assert tg[0]["boxes"].tolist() == [pytest.approx([0.3, 0.55, 0.6, 0.9], abs=1e-6)]
    assert tg[0]["labels"].dtype == torch.long


def test_empty_targets_give_background_only_loss():
    crit = RTDETRCriterion(NC)
    out = _outputs([[[0.0, 1.0, -1.0]]], [[[0.5, 0.5, 0.2, 0.2]]])
    loss, logs = crit.gt_loss(out, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = sum(0.75 * sig(v) ** 2 * -math.log(1 - sig(v)) for v in (0.0, 1.0, -1.0))  # / max(0, 1)
    assert logs["vfl"] == pytest.approx(expected, abs=1e-5)
    assert logs["l1"] == 0.0 and logs["giou"] == 0.0 and torch.isfinite(loss)


# -- denoising queries ------------------------------------------------------------------------------
def _dn_targets():
    return [{"boxes": _cxcywh([0.3, 0.3, 0.1, 0.2], [0.6, 0.5, 0.2, 0.1], [0.5, 0.7, 0.1, 0.1]),
             "labels": torch.tensor([0, 1, 2])},
            {"boxes": _cxcywh([0.4, 0.5, 0.2, 0.2]), "labels": torch.tensor([1])}]


def test_denoising_group_layout_noise_bounds_and_mask():
    tg = _dn_targets()
    dn = build_denoising_queries(tg, NC, num_queries=Q, num_denoising=10, label_noise_ratio=0.0,
                                 box_noise_scale=1.0, generator=torch.Generator().manual_seed(0))
    m, g = 3, 3  # max objects 3, 10 // 3 groups
    nd = 2 * m * g
    meta = dn["meta"]
    assert (meta["num_groups"], meta["max_gt"], meta["num_denoising"], meta["num_queries"]) == (g, m, nd, Q)
    assert dn["labels"].shape == (2, nd) and dn["boxes"].shape == (2, nd, 4)
    assert dn["attn_mask"].shape == (nd + Q, nd + Q) and dn["attn_mask"].dtype == torch.bool
    assert meta["positive_idx"][0].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert meta["gt_idx"][0].tolist() == [0, 1, 2] * 3
    assert meta["positive_idx"][1].tolist() == [0, 6, 12] and meta["gt_idx"][1].tolist() == [0, 0, 0]

    def corners(b):
        cx, cy, w, h = b.unbind(-1)
        return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1)

    for i, t in enumerate(tg):
        n = len(t["labels"])
        gt_c, half = corners(t["boxes"]), t["boxes"][:, 2:].repeat(1, 2) / 2
        for grp in range(g):
            pos = slice(2 * m * grp, 2 * m * grp + n)
            neg = slice(2 * m * grp + m, 2 * m * grp + m + n)
            assert dn["labels"][i, pos].tolist() == t["labels"].tolist()  # no label noise asked
            assert dn["labels"][i, neg].tolist() == t["labels"].tolist()
            shift_pos = (corners(dn["boxes"][i, pos]) - gt_c).abs()
            shift_neg = (corners(dn["boxes"][i, neg]) - gt_c).abs()
            # positives: every corner within half the box size; negatives: between 1x and 2x of it
            assert (shift_pos <= half + 1e-6).all()
            assert (shift_neg >= half - 1e-6).all() and (shift_neg <= 2 * half + 1e-6).all()
            pad = slice(2 * m * grp + n, 2 * m * grp + m)
            assert (dn["labels"][i, pad] == NC).all() and (dn["boxes"][i, pad] == 0).all()

    mask = dn["attn_mask"]
    # hand-picked entries (True = may not attend): matching query -> dn query blocked, dn -> matching open
    assert mask[nd, 0] and mask[nd + Q - 1, nd - 1]
    assert not mask[nd, nd + 5] and not mask[3, nd + 2]
    assert not mask[0, 5] and mask[0, 6] and mask[7, 0] and not mask[7, 11] and mask[7, 12] and mask[17, 11]
    assert not mask.diagonal().any()
    # the whole matrix: dn queries see their own group and every matching query
    group = torch.arange(nd) // (2 * m)
    expected = torch.zeros(nd + Q, nd + Q, dtype=torch.bool)
    expected[:nd, :nd] = group[:, None] != group[None, :]
    expected[nd:, :nd] = True
    assert torch.equal(mask, expected)


def test_denoising_label_noise_and_empty_batches():
    tg = _dn_targets()
    dn = build_denoising_queries(tg, NC, Q, 100, label_noise_ratio=1.0, box_noise_scale=0.0,
                                 generator=torch.Generator().manual_seed(1))
    real = torch.zeros(2, 3, dtype=torch.bool)
    real[0, :3], real[1, :1] = True, True
    real = real.repeat(1, 2 * dn["meta"]["num_groups"])
    gt_labels = torch.full((2, 3), NC)
    gt_labels[0], gt_labels[1, 0] = torch.tensor([0, 1, 2]), 1
    gt_labels = gt_labels.repeat(1, 2 * dn["meta"]["num_groups"])
    assert (dn["labels"][~real] == NC).all()
    assert ((dn["labels"][real] >= 0) & (dn["labels"][real] < NC)).all()
    changed = (dn["labels"][real] != gt_labels[real]).float().mean().item()
    # flipped with probability 1/2 to a uniform class (2/3 of them differ): about 1/3 change
    assert 0.2 < changed < 0.47
    assert torch.equal(dn["boxes"][real.nonzero(as_tuple=True)][:3], tg[0]["boxes"])  # no box noise
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    assert build_denoising_queries(empty, NC, Q) is None
    assert build_denoising_queries(tg, NC, Q, num_denoising=0) is None


def test_self_attention_mask_blocks_keys_and_none_is_unchanged():
    torch.manual_seed(0)
    attn = SelfAttention(16, 2)
    x, pos = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[:3, 3:] = True  # queries 0..2 must not see keys 3, 4
    out = attn(x, pos, mask)
    x2 = x.clone()
    x2[:, 3:] += 5.0
    out2 = attn(x2, pos, mask)
    assert torch.allclose(out[:, :3], out2[:, :3], atol=1e-6)
    assert not torch.allclose(out[:, 3:], out2[:, 3:], atol=1e-3)
    additive = torch.zeros(5, 5).masked_fill(mask, float("-inf"))
    assert torch.allclose(attn(x, pos, additive), out, atol=1e-6)
    assert torch.equal(attn(x, pos, None), attn(x, pos))
    assert torch.allclose(attn(x, pos, torch.zeros(5, 5)), attn(x, pos), atol=1e-6)


# -- forward_train ----------------------------------------------------------------------------------
@pytest.mark.parametrize("depth,layers", [("full", 3), ("base", 1)])
def test_forward_train_shapes(r18, depth, layers):
    x, targets = _batch()
    out = r18.forward_train(x, depth, targets, generator=torch.Generator().manual_seed(0))
    assert out["logits"].shape == (2, Q, NC) and out["pred_boxes"].shape == (2, Q, 4)
    assert len(out["aux_outputs"]) == layers - 1
    for aux in out["aux_outputs"]:
        assert aux["logits"].shape == (2, Q, NC) and aux["pred_boxes"].shape == (2, Q, 4)
    enc = out["enc_outputs"]
    assert enc["logits"].shape == (2, Q, NC) and enc["pred_boxes"].shape == (2, Q, 4)
    assert ((enc["pred_boxes"] >= 0) & (enc["pred_boxes"] <= 1)).all()
    meta = out["dn_meta"]
    assert (meta["max_gt"], meta["num_groups"], meta["num_denoising"]) == (2, 50, 200)
    assert len(out["dn_outputs"]) == layers
    assert all(d["logits"].shape == (2, 200, NC) and d["pred_boxes"].shape == (2, 200, 4)
               for d in out["dn_outputs"])
    bb, en = out["distill_feats"]["backbone"], out["distill_feats"]["encoder"]
    assert [tuple(f.shape) for f in bb] == [(2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4)]
    assert [tuple(f.shape) for f in en] == [(2, 256, 16, 16), (2, 256, 8, 8), (2, 256, 4, 4)]
    assert out["image_size"] == (SIZE, SIZE)
    assert out["logits"].requires_grad and out["pred_boxes"].requires_grad


def test_forward_train_final_output_is_forward_and_ignores_denoising_queries(r18):
    """The matching queries cannot see the denoising queries: the main outputs are those of
    ``forward`` (same mode, same batch) whether or not denoising queries run alongside."""
    x, targets = _batch()
    with torch.no_grad():
        plain = r18(x, "full")
        no_dn = r18.forward_train(x, "full")
        with_dn = r18.forward_train(x, "full", targets)
    assert no_dn["dn_outputs"] is None and no_dn["dn_meta"] is None
    assert torch.equal(no_dn["logits"], plain["logits"]) and torch.equal(no_dn["pred_boxes"], plain["pred_boxes"])
    for k in ("logits", "pred_boxes"):
        assert torch.allclose(with_dn[k], plain[k], atol=1e-5)
        for a, b in zip(with_dn["aux_outputs"], no_dn["aux_outputs"]):
            assert torch.allclose(a[k], b[k], atol=1e-5)


def test_forward_train_without_denoising_embedding(r18_state):
    m = create_model("rtdetr-r18-anydepth", num_classes=NC, num_queries=Q, denoising=False).train()
    x, targets = _batch()
    out = m.forward_train(x, "base", targets)
    assert out["dn_outputs"] is None and out["dn_meta"] is None
    m2 = create_model("rtdetr-r18-anydepth", num_classes=NC, num_queries=Q, num_denoising=0).train()
    assert m2.forward_train(x, "base", targets)["dn_outputs"] is None


# -- losses on the model ----------------------------------------------------------------------------
def test_gt_loss_finite_and_decreasing(r18):
    x, targets = _batch()
    crit = build_criterion(r18)
    assert isinstance(crit, RTDETRCriterion) and crit.num_classes == NC
    opt = torch.optim.AdamW(r18.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        out = r18.forward_train(x, "full", targets, generator=torch.Generator().manual_seed(0))
        loss, logs = crit.gt_loss(out, targets)
        assert torch.isfinite(loss) and all(math.isfinite(v) for v in logs.values())
        assert logs["aux"] > 0 and logs["enc"] > 0 and logs["dn"] > 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


def test_gt_loss_sums_every_output_set(r18):
    x, targets = _batch()
    out = r18.forward_train(x, "full", targets, generator=torch.Generator().manual_seed(0))
    full, logs = RTDETRCriterion(NC).gt_loss(out, targets)
    main = 1 * logs["vfl"] + 5 * logs["l1"] + 2 * logs["giou"]
    assert full.item() == pytest.approx(main + logs["aux"] + logs["enc"] + logs["dn"], rel=1e-5)
    only_main, logs2 = RTDETRCriterion(NC, aux=False, denoising=False).gt_loss(out, targets)
    assert only_main.item() == pytest.approx(main, rel=1e-5) and logs2["aux"] == logs2["dn"] == 0.0


def test_distill_loss_zero_kd_for_identical_outputs(r18):
    x, targets = _batch()
    out = r18.forward_train(x, "full", targets, generator=torch.Generator().manual_seed(0))
    crit = RTDETRCriterion(r18)
    loss, logs = crit.distill_loss(out, detach_outputs(out), targets)
    assert logs["pairs"] == 3.0
    for k in ("kd_cls", "kd_l1", "kd_backbone", "kd_encoder"):
        assert logs[k] == 0.0, k
    # 1 - GIoU(b, b) = 1 - a / (a + eps) <= eps / a with the IoU eps 1e-7 of anydepth.losses.boxes
    area = out["pred_boxes"][..., 2] * out["pred_boxes"][..., 3]
    assert 0.0 <= logs["kd_giou"] <= 1e-7 / area.min().item() * 1.01
    # what remains is the student's aux + encoder + denoising GT losses
    _, gt_logs = crit.gt_loss(out, targets)
    assert loss.item() == pytest.approx(gt_logs["aux"] + gt_logs["enc"] + gt_logs["dn"] + 2 * logs["kd_giou"],
                                        rel=1e-5)


def test_distill_loss_pairs_queries_through_their_gt_by_hand():
    # one GT (class 0) = cxcywh (0.5, 0.5, 0.2, 0.2). The teacher matches it with query 1 (exact box),
    # the student with query 0 (box shifted by 0.02 in x): the pair is (student 0, teacher 1).
    gt = [{"boxes": torch.tensor([[40.0, 40, 60, 60]]), "labels": torch.tensor([0])}]
    s_logits, t_logits = [[[1.0, -2.0], [-3.0, -3.0]]], [[[-3.0, -3.0], [2.0, -1.0]]]
    student = _outputs(s_logits, [[[0.52, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]])
    teacher = _outputs(t_logits, [[[0.9, 0.9, 0.05, 0.05], [0.5, 0.5, 0.2, 0.2]]])
    # feature maps: teacher pooled [0, ln 3] -> softmax [1/4, 3/4]; student pooled [0, 0] -> [1/2, 1/2]
    t_map = torch.tensor([0.0, math.log(3)]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    s_map = torch.zeros(1, 2, 2, 2)
    student["distill_feats"] = {"backbone": [s_map] * 3, "encoder": [t_map] * 3}
    teacher["distill_feats"] = {"backbone": [t_map] * 3, "encoder": [t_map] * 3}
    loss, logs = RTDETRCriterion(2, kd_style="legacy").distill_loss(student, teacher, gt)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731

    def bkl(t, s):
        p, q = sig(t), sig(s)
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    assert logs["pairs"] == 1.0
    assert logs["kd_cls"] == pytest.approx(bkl(2.0, 1.0) + bkl(-1.0, -2.0), abs=1e-5)
    assert logs["kd_l1"] == pytest.approx(0.02, abs=1e-6)
    # boxes [0.42, 0.4, 0.62, 0.6] vs [0.4, 0.4, 0.6, 0.6]: I = 0.036, U = 0.044, C = 0.22 * 0.2
    assert logs["kd_giou"] == pytest.approx(1 - (0.036 / 0.044 - (0.044 - 0.044) / 0.044), abs=1e-5)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert logs["kd_backbone"] == pytest.approx(kl, abs=1e-6) and logs["kd_encoder"] == 0.0
    expected = logs["kd_cls"] + 5 * logs["kd_l1"] + 2 * logs["kd_giou"] + kl
    assert loss.item() == pytest.approx(expected, abs=1e-5) and logs["kd"] == pytest.approx(expected, abs=1e-5)
    assert bernoulli_kl(torch.tensor(2.0), torch.tensor(1.0), 2.0).item() == pytest.approx(
        4 * bkl(1.0, 0.5), abs=1e-6)


def test_distill_loss_authors_style_by_hand():
    # the same pair as above, the authors' terms: softmax KL over the 2 classes, averaged over the
    # classes, x 2 queries / 1 GT; features: pooled maps concatenated before the channel softmax
    gt = [{"boxes": torch.tensor([[40.0, 40, 60, 60]]), "labels": torch.tensor([0])}]
    student = _outputs([[[1.0, -2.0], [-3.0, -3.0]]], [[[0.52, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]])
    teacher = _outputs([[[-3.0, -3.0], [2.0, -1.0]]], [[[0.9, 0.9, 0.05, 0.05], [0.5, 0.5, 0.2, 0.2]]])
    # backbone: teacher pooled [0, ln 3] and [0, 0] -> concat softmax [1, 3, 1, 1] / 6; student all 0 -> 1/4
    t_a = torch.tensor([0.0, math.log(3)]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    zero = torch.zeros(1, 2, 2, 2)
    student["distill_feats"] = {"backbone": [zero, zero], "encoder": [t_a, zero]}
    teacher["distill_feats"] = {"backbone": [t_a, zero], "encoder": [t_a, zero]}
    crit = RTDETRCriterion(2, distill_gt=0.5)
    crit.kd_scale = 0.25
    loss, logs = crit.distill_loss(student, teacher, gt)
    p = [math.exp(2) / (math.exp(2) + math.exp(-1)), math.exp(-1) / (math.exp(2) + math.exp(-1))]
    q = [math.exp(1) / (math.exp(1) + math.exp(-2)), math.exp(-2) / (math.exp(1) + math.exp(-2))]
    kl_cls = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert logs["kd_cls"] == pytest.approx(kl_cls / 2 * 2 / 1, abs=1e-6)
    pt = [1 / 6, 3 / 6, 1 / 6, 1 / 6]
    assert logs["kd_backbone"] == pytest.approx(sum(a * math.log(a / 0.25) for a in pt), abs=1e-6)
    assert logs["kd_encoder"] == 0.0
    assert logs["kd_l1"] == pytest.approx(0.02, abs=1e-6)
    kd = logs["kd_cls"] + 5 * logs["kd_l1"] + 2 * logs["kd_giou"] + logs["kd_backbone"]
    assert logs["kd"] == pytest.approx(kd, abs=1e-5)
    # the student's own GT term (distill_gt) enters with its weight, the KD with kd_scale
    gt_loss, _ = RTDETRCriterion(2).gt_loss(student, gt)
    side = logs["aux"] + logs["enc"] + logs["dn"]
    assert logs["gt"] == pytest.approx(gt_loss.item() - side, abs=1e-5)
    assert loss.item() == pytest.approx(0.25 * kd + 0.5 * logs["gt"] + side, abs=1e-5)
    with pytest.raises(ValueError, match="kd_style"):
        RTDETRCriterion(2, kd_style="mine")


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_two_pass_step_gradients_reach_shared_and_refinement_params(r18):
    x, targets = _batch()
    crit = build_criterion(r18)
    full, base = r18.resolve_depth("full"), r18.resolve_depth("base")
    torch.manual_seed(7)  # same denoising noise in both runs
    loss, _ = crit.gt_loss(r18.forward_train(x, full, targets), targets)
    loss.backward()
    g_full = _grads(r18)
    r18.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    logs = two_pass_step(r18, crit, x, targets, full, base)
    g_two = _grads(r18)
    assert math.isfinite(logs["base/loss"]) and logs["base/kd"] > 0

    refinement = "backbone.stage3.refinement.blocks.0.conv1.conv.weight"
    enc_refinement = "encoder.pan_blocks.1.bottlenecks.refinement.blocks.1.conv1.conv.weight"
    shared = ["backbone.stage3.essential.blocks.0.conv1.conv.weight", "backbone.stem.0.conv.weight",
              "encoder.aifi.0.self_attn.q_proj.weight", "decoder.layers.0.self_attn.q_proj.weight",
              "decoder.enc_score_head.weight", "decoder.denoising_class_embed.weight"]
    skip_only = "backbone.stage3.essential.blocks.0.conv1.bn.bn_skip.weight"
    for name in (refinement, enc_refinement):  # only the full pass reaches them
        assert g_full[name].abs().sum() > 0
        assert torch.allclose(g_two[name], g_full[name], rtol=1e-5, atol=1e-8), name
    for name in shared:  # both passes
        assert g_full[name].abs().sum() > 0 and not torch.allclose(g_two[name], g_full[name]), name
    assert g_full[skip_only].abs().sum() == 0 and g_two[skip_only].abs().sum() > 0
    # layers past the base decoder depth only learn from the full pass
    assert torch.allclose(g_two["decoder.class_embed.2.weight"], g_full["decoder.class_embed.2.weight"],
                          rtol=1e-5, atol=1e-8)


# -- errors -----------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(r18):
    x, targets = _batch()
    crit = RTDETRCriterion(NC)
    with pytest.raises(RuntimeError, match="training mode"):
        r18.eval().forward_train(x)
    r18.train()
    with pytest.raises(ValueError, match="2 target dicts for a batch of 1"):
        r18.forward_train(x[:1], "base", targets)
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        r18.forward_train(x, "base", [targets[0], dict(boxes=torch.tensor([[0.0, 0, 5, 5]]), labels=torch.tensor([3]))])
    with pytest.raises(ValueError, match="x2 < x1"):
        normalize_targets([dict(boxes=torch.tensor([[9.0, 0, 5, 5]]), labels=torch.tensor([0]))], (32, 32), NC)
    with pytest.raises(ValueError, match="NaN"):
        normalize_targets([dict(boxes=torch.tensor([[float("nan"), 0, 5, 5]]), labels=torch.tensor([0]))],
                          (32, 32), NC)
    with pytest.raises(TypeError, match="integer"):
        normalize_targets([dict(boxes=torch.tensor([[0.0, 0, 5, 5]]), labels=torch.tensor([0.0]))], (32, 32), NC)
    with pytest.raises(TypeError, match="'boxes' and 'labels'"):
        normalize_targets([dict(boxes=torch.zeros(0, 4))], (32, 32), NC)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        normalize_targets([dict(boxes=torch.zeros(2, 5), labels=torch.zeros(2, dtype=torch.long))], (32, 32), NC)
    with pytest.raises(ValueError, match="num_classes=3"):
        crit.gt_loss(_outputs([[[0.0, 0.0]]], [[[0.5, 0.5, 0.1, 0.1]]]), [targets[0]])
    with pytest.raises(ValueError, match="image_size"):
        crit.gt_loss({"logits": torch.zeros(1, 2, NC), "pred_boxes": torch.zeros(1, 2, 4)}, [targets[0]])
    with pytest.raises(ValueError, match="distill_feats"):
        out = _outputs([[[0.0, 0.0, 0.0]]], [[[0.5, 0.5, 0.1, 0.1]]])
        crit.distill_loss(out, out, [targets[1]])
    with pytest.raises(TypeError, match="num_classes"):
        RTDETRCriterion("rtdetr")
    with pytest.raises(ValueError, match="kd_l1"):
        RTDETRCriterion(NC, kd_l1=-1.0)
    with pytest.raises(ValueError, match="kd_temperature"):
        RTDETRCriterion(NC, kd_temperature=0)
    with pytest.raises(ValueError, match="num_denoising"):
        create_model("rtdetr-r18-anydepth", num_classes=NC, num_denoising=-1)
    with pytest.raises(ValueError, match="label_noise_ratio"):
        create_model("rtdetr-r18-anydepth", num_classes=NC, label_noise_ratio=1.5)
