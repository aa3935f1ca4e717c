"""The authors' released any-depth checkpoints load exactly (``anydepth.convert.from_authors_*``).

Fixtures (``tests/fixtures/authors_*.npz``: plain arrays + JSON metadata, made once by
``tools/authors_fixtures.py`` running the authors' code on small random-weight models): a fixed
input, their state dict and their outputs at every depth configuration their code supports. Conv
weights are stored as (key, shape) and redrawn here from a generator seeded by the key
(``conv_weight`` below, the tool's own rule); every other tensor is stored as it is. Outputs must
match to 1e-5 relative in fp32.
"""
from __future__ import annotations

import copy
import json
import math
import os
import zlib

import numpy as np
import pytest
import torch
from helpers import rel_err

import anydepth
from anydepth.convert import from_authors_yolo
from anydepth.convert._authors import infer_yolo_config
from anydepth.models.yolov12 import SWITCHES

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
YOLO_FIXTURES = {"authors_yolo_s.npz": ("n", [0.5, 0.25, 256]), "authors_yolo_l.npz": ("l", [1.0, 0.25, 256])}
TOL = 1e-5


def conv_weight(key, shape, seed):
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    fan_in = math.prod(shape[1:])
    return torch.randn(tuple(shape), generator=g) * (1.0 / fan_in) ** 0.5


def load_fixture(name):
    with np.load(os.path.join(FIXTURES, name), allow_pickle=False) as z:
        fx = json.loads(str(z["meta"]))
        fx.update({k: torch.from_numpy(z[k]) for k in ("input", "outputs", "outputs64")})
        fx["state_dict"] = {k.split("/", 1)[1]: torch.from_numpy(z[k]) for k in z.files
                            if k.startswith("state_dict/")}
    assert fx["format"] == "anydepth-authors-fixture"
    fx["outputs"] = dict(zip(fx["depths"], fx["outputs"]))  # skip list ("TFFFFFFF"...) -> output
    fx["outputs64"] = dict(zip(fx["depths64"], fx["outputs64"]))
    sd = dict(fx["state_dict"])
    for key, shape in fx["drawn"].items():
        sd[key] = conv_weight(key, shape, fx["weight_seed"])
    return fx, sd


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
