"""ModelFamily specs: completeness, lookup, a toy family plugging in, and the one inference verb."""
import copy
import warnings

import pytest
import torch

import anydepth
from anydepth import model as model_mod
from anydepth.depth import DepthSpace
from anydepth.family import (ModelFamily, TrainDefaults, families, family_of, register_family,
                             unregister_family)
from anydepth.losses import build_criterion
from anydepth.testing import randomize_
from anydepth.train.trainer import model_family
from helpers import rel_err
from anydepth_kernels.optimize import SWAPS


def test_registered_families_are_complete():
    fams = {f.name: f for f in families()}
    assert {"yolov12", "rtdetr"} <= set(fams)
    for f in fams.values():
        assert issubclass(f.model_class, anydepth.AnyDepthModel)
        assert f.task in ("detect", "classify") and f.preprocess in ("letterbox", "resize")
        assert f.model_names and set(f.model_names) <= set(anydepth.list_models())
        assert callable(f.criterion)
        assert f.train is not None and f.train.lr > 0 and f.train.clip_grad > 0
        assert f.converters and all(callable(c) for c in f.converters.values())
        # a detector imports peer checkpoints from a path; the ViT/Swin classifiers convert model objects
        assert f.task == "classify" or (f.weight_import is not None and callable(f.weight_import.load))
        assert f.peer is not None and f.benchmark_peer in f.converters
        assert callable(f.peer.build) and callable(f.peer.call)
    assert fams["yolov12"].preprocess == "letterbox" and fams["rtdetr"].preprocess == "resize"
    assert sorted(n for f in fams.values() for n in f.model_names) == anydepth.list_models()


def test_lookup_by_name_class_and_model():
    for f in families():
        name = f.model_names[0]
        assert family_of(name) is f and family_of(f.name) is f and family_of(f.model_class) is f
    m = anydepth.create_model("yolov12n-anydepth", num_classes=3)
    assert family_of(m).name == "yolov12"
    with pytest.raises(ValueError, match="no model family"):
        family_of("resnet50")
    assert family_of(torch.nn.Conv2d(1, 1, 1), default=None) is None
    with pytest.raises(TypeError, match="no criterion"):
        build_criterion(torch.nn.Conv2d(1, 1, 1))


# -- a toy third family: registered here, found by every consumer without editing them ----------
class _ToyModel(anydepth.AnyDepthModel):
    depth_space = DepthSpace(("body",))

    def __init__(self, num_classes=2):
        super().__init__()
        self.num_classes = num_classes
        self.conv = torch.nn.Conv2d(3, num_classes, 1)

    def forward_depth(self, x, depth):
        return self.conv(x)


class _ToyCriterion:
    def __init__(self, model, **weights):
        self.model, self.weights = model, weights


@pytest.fixture
def toy_family():
    fam = register_family(ModelFamily(
        name="toy", model_class=_ToyModel, factories={"toy-anydepth": lambda num_classes=80: _ToyModel(num_classes)},
        preprocess="resize", criterion=_ToyCriterion,
        train=TrainDefaults(lr=0.5, weight_decay=0.0, clip_grad=1.0)))
    yield fam
    unregister_family("toy")
    assert "toy-anydepth" not in anydepth.list_models()
    assert (_ToyModel.__module__.split(".", 1)[0], "_ToyModel") not in SWAPS


def test_toy_family_plugs_in(toy_family):
    from anydepth.cli import main

    assert "toy-anydepth" in anydepth.list_models()
    m = anydepth.create_model("toy-anydepth", num_classes=2)
    assert family_of(m) is toy_family and family_of("toy-anydepth") is toy_family
    crit = build_criterion(m, box=2.0)
    assert isinstance(crit, _ToyCriterion) and crit.weights == {"box": 2.0}
    assert model_family("toy-anydepth").train.lr == 0.5            # the trainer's recipe lookup
    assert main(["models", "toy-*"]) == 0                          # the CLI lists it
    assert not m.is_inference and m.to_inference() is m and m.is_inference  # default: nothing to fold
    with pytest.raises(RuntimeError, match="fused for inference"):
        m.train()
    with pytest.raises(ValueError, match="registered twice"):
        register_family(toy_family.replace(factories={"toy2-anydepth": _ToyModel}))
    with pytest.raises(ValueError, match="re-registers"):
        register_family(toy_family.replace(name="toy2"))


def test_spec_validation():
    with pytest.raises(ValueError, match="preprocess"):
        ModelFamily(name="x", model_class=_ToyModel, factories={"x": _ToyModel}, preprocess="crop",
                    criterion=_ToyCriterion)
    with pytest.raises(ValueError, match="no factories"):
        ModelFamily(name="x", model_class=_ToyModel, factories={}, preprocess="resize", criterion=_ToyCriterion)


# -- one inference verb; the old names are deprecated aliases -------------------------------------
def _fresh_warnings():
    model_mod._WARNED.clear()


@pytest.mark.parametrize("name,old,flag,kwargs", [
    ("yolov12n-anydepth", "fuse", "is_fused", {"num_classes": 3}),
    ("rtdetr-r18-anydepth", "deploy", "deployed", {"num_classes": 3, "num_queries": 20}),
])
def test_to_inference_equals_old_verb_and_old_names_warn(name, old, flag, kwargs):
    torch.manual_seed(0)
    eager = randomize_(anydepth.create_model(name, **kwargs), seed=1, calibrate_shape=(1, 3, 64, 64)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new verb never warns
        new = copy.deepcopy(eager).to_inference()
        assert new.is_inference and new.to_inference() is new and not eager.is_inference
    _fresh_warnings()
    legacy = copy.deepcopy(eager)
    with pytest.warns(DeprecationWarning, match="to_inference"):
        assert getattr(legacy, old)() is legacy
    with pytest.warns(DeprecationWarning, match="is_inference"):
        assert getattr(legacy, flag) is True
    with warnings.catch_warnings():  # once per process
        warnings.simplefilter("error", DeprecationWarning)
        getattr(legacy, old)()
        assert getattr(legacy, flag)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for depth in ("full", "base"):
            a, b = new(x, depth=depth), legacy(x, depth=depth)
            a, b = (a, b) if isinstance(a, torch.Tensor) else (a["logits"], b["logits"])
            assert torch.equal(a, b)
            e = eager(x, depth=depth)
            assert rel_err(a, e if isinstance(e, torch.Tensor) else e["logits"]) <= 1e-4
