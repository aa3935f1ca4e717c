"""The authors' released any-depth checkpoints load exactly (``anydepth.convert.from_authors_*``).

Fixtures (``tests/fixtures/authors_*.npz``: plain arrays + JSON metadata, made once by
``tools/authors_fixtures.py`` running the authors' code on small random-weight models): a fixed
input, their state dict and their outputs at every depth configuration their code supports. Conv
weights (and, for RT-DETR, every weight of 2+ dimensions) are stored as (key, shape) and redrawn
from a generator seeded by the key (``helpers.authors_weight``, the tool's own rule); every other
tensor is stored as it is. Outputs must match to 1e-5 relative in fp32.
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import load_authors_fixture, rel_err

import anydepth
from anydepth.convert import from_authors_rtdetr, from_authors_yolo
from anydepth.convert._authors import infer_rtdetr_config, infer_yolo_config
from anydepth.depth import DepthConfig
from anydepth.models import rtdetr as rtdetr_mod
from anydepth.models.yolov12 import SWITCHES

YOLO_FIXTURES = {"authors_yolo_s.npz": ("n", [0.5, 0.25, 256]), "authors_yolo_l.npz": ("l", [1.0, 0.25, 256])}
TOL = 1e-5


def load_fixture(name):
    return load_authors_fixture(name)


def max_rel(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


_CONVERTED = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=sorted(YOLO_FIXTURES))
def yolo_case(request):
    fx, sd = load_fixture(request.param)
    return request.param, fx, sd


def converted(name, sd):
    """from_authors_yolo(sd), once per fixture (the tests that alter the checkpoint convert their own)."""
    if name not in _CONVERTED:
        _CONVERTED[name] = from_authors_yolo(sd)
    return _CONVERTED[name]


def test_yolo_every_depth_matches_authors(yolo_case):
    name, fx, sd = yolo_case
    model = converted(name, sd)
    scale, mult = YOLO_FIXTURES[name]
    assert (model.scale, list(model.multipliers), model.split) == (scale, mult, "official")
    assert model.num_classes == fx["num_classes"]
    names = [n for n, _ in SWITCHES]
    assert len(fx["outputs"]) == 2 ** len(names)  # every one of their skip lists
    x = fx["input"]
    worst = {"norm": 0.0, "max": 0.0, "boxes": 0.0, "classes": 0.0}
    with torch.no_grad():
        for key, ref in fx["outputs"].items():
            out = model(x, depth={n: c == "T" for n, c in zip(names, key)})
            assert out.shape == ref.shape
            errs = {"norm": rel_err(out, ref), "max": max_rel(out, ref),  # the project's measures
                    "boxes": rel_err(out[:, :4], ref[:, :4]), "classes": rel_err(out[:, 4:], ref[:, 4:])}
            for what, err in errs.items():
                assert err <= TOL, f"{name} depth {key}: {what} relative error {err:.2e}"
                worst[what] = max(worst[what], err)
    print(f"{name}: worst relative errors over {len(fx['outputs'])} depths: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def test_yolo_float64_is_the_same_arithmetic(yolo_case):
    """In float64 (weights and input upcast) ours and theirs agree to rounding: same computation,
    not merely a close one."""
    name, fx, sd = yolo_case
    model = copy.deepcopy(converted(name, sd)).double()
    names = [n for n, _ in SWITCHES]
    assert len(fx["outputs64"]) == 4  # full, base and two alternating skip lists
    with torch.no_grad():
        for key, ref in fx["outputs64"].items():
            out = model(fx["input"].double(), depth={n: c == "T" for n, c in zip(names, key)})
            assert rel_err(out, ref) <= 1e-10, (name, key)


def test_yolo_split_differs_where_their_code_differs(yolo_case):
    """Their split is not ours: the test would pass for the wrong reason if the depths were equal."""
    name, fx, sd = yolo_case
    outs = fx["outputs"]
    assert not torch.equal(outs["F" * 8], outs["T" * 8])
    model = converted(name, sd)
    if name == "authors_yolo_s.npz":  # one-block neck A2C2f: skipping switches norms only
        csp = model.layers[14]
        assert len(csp.m) == 1 and csp.n_essential == 1 and csp.conv_skip is None
        assert not torch.equal(outs["F" * 5 + "T" + "F" * 2], outs["F" * 8])  # ... which changes the output
    else:  # four-block backbone A2C2f: 2 essential blocks and a separate shallow output conv
        csp = model.layers[6]
        assert len(csp.m) == 4 and csp.n_essential == 2 and csp.conv_skip is not None
        c3k = model.layers[20].m[0]  # C3k2 keeps its blocks; a C3k skips bottleneck 2 of its chain
        assert model.layers[20].n_essential == 2 and c3k.inner_essential == 1


def test_yolo_converted_model_saves_and_reloads(tmp_path, yolo_case):
    name, fx, sd = yolo_case
    model = converted(name, sd)
    path = tmp_path / "m.pt"
    anydepth.save(model, path)
    again = anydepth.load(path)
    assert (again.split, again.multipliers, again.scale) == (model.split, model.multipliers, model.scale)
    ref = model.state_dict()
    assert again.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in again.state_dict().items())


def test_yolo_accepts_weights_only_file_and_wrapped_dict(tmp_path, yolo_case):
    name, fx, sd = yolo_case
    path = tmp_path / "sd.pt"
    torch.save({"model": sd}, path)
    model = from_authors_yolo(str(path))
    ref = converted(name, sd).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    # the CLI / trainer import path recognises the file as the authors' (it has bn_skip norms)
    from anydepth.family import import_weights
    imported = import_weights(str(path))
    assert imported.split == "official" and all(torch.equal(v, ref[k]) for k, v in imported.state_dict().items())


def test_yolo_bad_checkpoints_name_the_problem(tmp_path, yolo_case):
    _, _, sd = yolo_case
    with pytest.raises(ValueError, match="bn_skip"):  # a plain (not any-depth) YOLO12
        from_authors_yolo({k: v for k, v in sd.items() if ".bn_skip." not in k})
    with pytest.raises(ValueError, match="stem conv"):
        from_authors_yolo({"foo": torch.zeros(1)})
    missing = dict(sd)
    del missing["model.11.cv2.conv.weight"]
    with pytest.raises(ValueError, match=r"model\.11\.cv2\.conv\.weight"):
        from_authors_yolo(missing)
    extra = dict(sd, **{"model.30.conv.weight": torch.zeros(1, 1, 1, 1)})
    with pytest.raises(ValueError, match=r"no place.*model\.30\.conv\.weight"):
        from_authors_yolo(extra)
    bad = dict(sd)
    bad["model.3.conv.weight"] = bad["model.3.conv.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"shape mismatch.*layers\.3\.conv\.weight"):
        from_authors_yolo(bad)
    qkv = {k.replace("attn.qk.", "attn.qkv."): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="'qkv' form"):
        from_authors_yolo(qkv)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="weights_only=True"):
        from_authors_yolo(str(corrupt))
    with pytest.raises(FileNotFoundError):
        from_authors_yolo(str(tmp_path / "absent.pt"))


class Node(torch.nn.Module):
    """Stands for their fork's module classes in a pickled checkpoint (the reader never imports it)."""


def pickled_tree(sd):
    root = Node()
    for key, v in sd.items():
        *path, leaf = key.split(".")
        m = root
        for p in path:
            if p not in m._modules:
                m.add_module(p, Node())
            m = m._modules[p]
        if leaf in ("running_mean", "running_var", "num_batches_tracked"):
            m.register_buffer(leaf, v.clone())
        else:
            m.register_parameter(leaf, torch.nn.Parameter(v.clone(), requires_grad=False))
    return root


def test_yolo_reads_their_pickled_pt_without_running_its_code(tmp_path, yolo_case):
    """Their released .pt pickles the model object (Ultralytics' layout: half EMA weights under
    'model' after training ends); the restricted unpickler recovers the weights."""
    name, _, sd = yolo_case
    tree = pickled_tree({k[len("model."):]: v for k, v in sd.items()})
    holder = Node()
    holder.add_module("model", tree)
    path = tmp_path / "yolo-ad.pt"
    torch.save({"date": "2026", "model": holder.half(), "ema": None, "train_args": {"imgsz": 640}}, path)
    model = from_authors_yolo(str(path))
    rounded = {k: v.half().float() if v.is_floating_point() else v for k, v in sd.items()}
    ref = from_authors_yolo(rounded).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="extract the weights once"):  # opt out: the one-liner
        from_authors_yolo(str(path), restricted_unpickle=False)
    from anydepth.family import import_weights  # `anydepth eval --weights yolo-ad.pt`
    imported = import_weights(str(path))
    assert imported.split == "official" and all(torch.equal(v, ref[k]) for k, v in imported.state_dict().items())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_restricted_unpickler_runs_no_code_from_the_file(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload(str(marker)), "other": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="no pickled model"):
        from_authors_yolo(str(path))
    assert not marker.exists()
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a pickled model, but not theirs
    with pytest.raises(ValueError, match="stem conv"):
        from_authors_yolo(str(path))


def test_yolo_plain_stride2_convs_get_one_norm_for_both_depths(yolo_case):
    """A checkpoint whose stride-2 convs are plain Convs (no bn_skip) loads; those convs then use
    their one norm at every depth."""
    _, fx, sd = yolo_case
    plain = {k: v for k, v in sd.items() if not any(k.startswith(f"model.{i}.bn_skip.") for i in (3, 5, 7, 15, 18))}
    model = from_authors_yolo(plain)
    for i in (3, 5, 7, 15, 18):
        bn = model.layers[i].bn
        assert torch.equal(bn.bn_skip.weight, bn.bn.weight) and torch.equal(bn.bn_skip.running_var, bn.bn.running_var)
    with torch.no_grad():  # full depth never reads bn_skip: unchanged
        assert max_rel(model(fx["input"]), fx["outputs"]["F" * 8]) <= TOL


def test_infer_yolo_config_reads_scale_from_shapes(yolo_case):
    name, _, sd = yolo_case
    scale, mult, nc = infer_yolo_config(sd)
    assert (scale, list(mult), nc) == (*YOLO_FIXTURES[name], 3)


def test_yolo_official_inference_form_matches_eager(yolo_case):
    """to_inference() (fused convs; concat-free output convs) keeps the official split's outputs."""
    name, fx, sd = yolo_case
    eager = converted(name, sd)
    names = [n for n, _ in SWITCHES]
    for concat_free in (True, False):
        fused = copy.deepcopy(eager).to_inference(concat_free=concat_free)
        with torch.no_grad():
            for key in ("F" * 8, "T" * 8, "TFTFTFTF"):
                depth = {n: c == "T" for n, c in zip(names, key)}
                assert rel_err(fused(fx["input"], depth=depth), eager(fx["input"], depth=depth)) <= TOL


# ------------------------------------------------------------------------------------------ RT-DETR
RTDETR_FIXTURE = "authors_rtdetr_r50.npz"


@pytest.fixture(scope="module")
def rtdetr_case():
    fx, sd = load_fixture(RTDETR_FIXTURE)
    return fx, sd


def rtdetr_converted(fx, sd):
    """from_authors_rtdetr(sd) once (the fixture's 30 queries: a state dict does not hold the count)."""
    if RTDETR_FIXTURE not in _CONVERTED:
        _CONVERTED[RTDETR_FIXTURE] = from_authors_rtdetr(sd, num_queries=fx["num_queries"])
    return _CONVERTED[RTDETR_FIXTURE]


def rtdetr_depth(key):
    """Fixture key ("FTFF" backbone skips + "T" encoder skip + "4" decoder depth) -> our DepthConfig."""
    return DepthConfig({n: c == "T" for n, c in zip(rtdetr_mod.SWITCHES, key[:5])}, {"decoder_layers": int(key[5:])})


def test_rtdetr_every_depth_matches_authors(rtdetr_case):
    """All 192 depths their code runs (4 backbone skips x encoder skip x decoder depth 1..6). The
    features are computed once per switch setting and the decoder run at each depth (the forward
    is that composition: checked bit-exact at a few depths)."""
    fx, sd = rtdetr_case
    model = rtdetr_converted(fx, sd)
    assert (model.variant, model.split, model.num_decoder_layers) == ("r50", "official", 6)
    assert len(fx["outputs"]) == 2 ** 5 * 6
    x, nc = fx["input"], fx["num_classes"]
    worst = {"norm": 0.0, "max": 0.0, "boxes": 0.0, "classes": 0.0}
    feats = {}
    with torch.no_grad():
        for key, ref in fx["outputs"].items():
            depth = rtdetr_depth(key)
            if key[:5] not in feats:
                feats[key[:5]] = model.features(x, depth)
            o = model.decoder(feats[key[:5]], depth.knob("decoder_layers"))
            out = torch.cat([o["logits"], o["pred_boxes"]], -1)[0]
            assert out.shape == ref.shape
            errs = {"norm": rel_err(out, ref), "max": max_rel(out, ref),
                    "boxes": rel_err(out[:, nc:], ref[:, nc:]), "classes": rel_err(out[:, :nc], ref[:, :nc])}
            for what, err in errs.items():
                assert err <= TOL, f"depth {key}: {what} relative error {err:.2e}"
                worst[what] = max(worst[what], err)
        for key in ("FFFFF6", "TTTTT1", "TFTFT4"):
            full = model(x, depth=rtdetr_depth(key))
            o = model.decoder(feats[key[:5]], int(key[5:]))
            assert torch.equal(full["logits"], o["logits"]) and torch.equal(full["pred_boxes"], o["pred_boxes"])
    print(f"{RTDETR_FIXTURE}: worst relative errors over {len(fx['outputs'])} depths: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def test_rtdetr_official_split_is_theirs(rtdetr_case):
    """What split='official' changes: their 7x7 stem, one norm on the projection shortcut, their
    backbone split min(n - 1, (n + 1) // 2) and encoder split (n + 1) // 2 - 1 = 1 of 3; and every
    switch and the decoder knob change the output, as in their code."""
    fx, sd = rtdetr_case
    model = rtdetr_converted(fx, sd)
    stem = model.backbone.stem
    assert len(stem) == 1 and stem[0].conv.kernel_size == (7, 7) and stem[0].conv.stride == (2, 2)
    assert [len(getattr(model.backbone, f"stage{i}").essential) for i in range(1, 5)] == [2, 2, 3, 2]
    first = model.backbone.stage2.essential.blocks[0]
    assert not first.shortcut.conv.skip_aware and first.conv1.skip_aware
    assert first.shortcut.pool is not None  # their variant 'd': avg-pool + 1x1 conv
    assert len(model.encoder.fpn_blocks[0].bottlenecks.essential) == 1
    outs = fx["outputs"]
    for i in range(5):  # one switch at a time, then the decoder depth
        key = "F" * i + "T" + "F" * (4 - i) + "6"
        assert not torch.equal(outs[key], outs["FFFFF6"]), key
    assert not torch.equal(outs["FFFFF5"], outs["FFFFF6"])
    assert fx["their_code_cannot_build"]["ResNet_ADN(18)"].startswith("AssertionError")
    assert "skip" in fx["their_code_cannot_build"]["HybridEncoderADN(expansion=0.5)"]
    with pytest.raises(ValueError, match="ResNet-50/101 only"):
        anydepth.create_model("rtdetr-r18-anydepth", split="official")
    with pytest.raises(ValueError, match="hidden_expansion=1.0"):
        anydepth.create_model("rtdetr-r50-anydepth", split="official", hidden_expansion=0.5)
    with pytest.raises(ValueError, match="split must be one of"):
        anydepth.create_model("rtdetr-r50-anydepth", split="authors")


def test_rtdetr_infer_config_and_reload(tmp_path, rtdetr_case):
    fx, sd = rtdetr_case
    variant, opts = infer_rtdetr_config(sd)
    o = fx["options"]
    assert variant == "r50" and opts == {"num_classes": 3, "split": "official", "encoder_hidden_dim": o["hidden_dim"],
                                         "encoder_ffn_dim": o["dim_feedforward"], "d_model": o["d_model"],
                                         "decoder_ffn_dim": o["decoder_ffn"]}
    model = rtdetr_converted(fx, sd)
    assert model.model_kwargs == {**opts, "num_queries": fx["num_queries"]}
    path = tmp_path / "m.pt"
    anydepth.save(model, path)
    again = anydepth.load(path)
    assert again.split == "official" and again.num_queries == fx["num_queries"]
    ref = model.state_dict()
    assert again.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in again.state_dict().items())


def test_rtdetr_reads_their_training_checkpoint(tmp_path, rtdetr_case):
    """Their solver's checkpoint ({"model": sd, "ema": {"module": sd, ...}, ...}): the EMA weights,
    from a weights_only file; `anydepth eval --weights` recognises it (family import)."""
    fx, sd = rtdetr_case
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}  # a smaller file
    ema = dict(half)  # sharing storage with "model" (saved once) except two tensors
    for k in ("backbone.conv1.weight", "decoder.dec_score_head.5.bias"):
        ema[k] = half[k] + 1
    path = tmp_path / "checkpoint0071.pth"
    torch.save({"model": half, "ema": {"module": ema, "updates": 7, "warmups": 2000}, "last_epoch": 71,
                "date": "2025-05-21"}, path)
    model = from_authors_rtdetr(str(path), num_queries=fx["num_queries"])
    ref = model.state_dict()
    assert torch.equal(ref["backbone.stem.0.conv.weight"], ema["backbone.conv1.weight"].float())  # the EMA's
    assert torch.equal(ref["decoder.class_embed.5.bias"], ema["decoder.dec_score_head.5.bias"].float())
    from anydepth.family import import_weights

    imported = import_weights(str(path))  # their configs' 300 queries
    assert imported.model_name == "rtdetr-r50-anydepth" and imported.split == "official"
    assert imported.num_queries == 300
    assert all(torch.equal(v, ref[k]) for k, v in imported.state_dict().items())


def test_rtdetr_bad_checkpoints_name_the_problem(rtdetr_case):
    fx, sd = rtdetr_case
    q = fx["num_queries"]
    with pytest.raises(ValueError, match="bn1_skip"):  # not any-depth
        from_authors_rtdetr({k: v for k, v in sd.items() if "_skip." not in k}, num_queries=q)
    presnet = {k.replace("backbone.conv1.", "backbone.conv1.conv1_1.conv."): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="PResNet"):
        from_authors_rtdetr(presnet, num_queries=q)
    missing = dict(sd)
    del missing["backbone.layer3.1.bn2_skip.running_var"]
    with pytest.raises(ValueError, match=r"backbone\.layer3\.1\.bn2_skip\.running_var"):
        from_authors_rtdetr(missing, num_queries=q)
    extra = dict(sd, **{"decoder.extra_head.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"no place.*decoder\.extra_head\.weight"):
        from_authors_rtdetr(extra, num_queries=q)
    bad = dict(sd)
    bad["encoder.lateral_convs.0.norm_skippable.bias"] = bad["encoder.lateral_convs.0.norm_skippable.bias"][:-1]
    with pytest.raises(ValueError, match=r"shape mismatch.*encoder\.lateral_convs\.0\.bn\.bn_skip\.bias"):
        from_authors_rtdetr(bad, num_queries=q)
    variant_a = {k.replace("downsample.1.", "downsample.0.") if ".0.downsample.1." in k and "layer1" not in k
                 else k: v for k, v in sd.items()}
    with pytest.raises(ValueError, match="variant 'a'"):
        from_authors_rtdetr(variant_a, num_queries=q)
    with pytest.raises(ValueError, match="num_heads"):
        from_authors_rtdetr(sd, num_queries=q, num_heads=5)
    with pytest.raises(ValueError, match="num_queries"):
        from_authors_rtdetr(sd, num_queries=0)


def test_rtdetr_official_inference_form_matches_eager(rtdetr_case):
    """to_inference() (folded convs: the 7x7 stem, the one-norm shortcuts) keeps their outputs."""
    fx, sd = rtdetr_case
    eager = rtdetr_converted(fx, sd)
    fused = copy.deepcopy(eager).to_inference()
    with torch.no_grad():
        for key in ("FFFFF6", "TTTTT4"):
            ref = fx["outputs"][key]
            o = fused(fx["input"], depth=rtdetr_depth(key))
            assert rel_err(torch.cat([o["logits"], o["pred_boxes"]], -1)[0], ref) <= TOL, key
