"""Make ``tests/fixtures/authors_*.npz`` by running the authors' any-depth code (run once, by hand).

Not part of the package and holds no line of the authors' code: it imports their modules from a
folder given on the command line and builds small random-weight models with them, then saves a
fixed input, their state dict and their outputs at every depth their code supports (plain tensors
and dicts, loadable with ``torch.load(weights_only=True)``).

YOLO (``--yolo DIR``): ``DIR/authors_blocks.py`` holds the authors' block classes
(``SwitchableC3k2``, ``SkippableC3k``, ``SkippableA2C2f``, ``ABlock``, ``AAttn``,
``SwitchableAAttn``, ``SwitchableSequential``, ``SkippableSequential``, ``Bottleneck``, ``C3``,
``C3k``, ``SkippableC3``) copied verbatim from ``anydepth-yolov12/ultralytics/nn/modules/block.py``
of ``HyungseopLee/Dynamic-Routing-AnyDepthYOLO`` into a scratch folder; the rest of Ultralytics
(``Conv``, ``Detect``) comes from the installed package. Two parts of their code cannot be read
publicly and are reconstructed here from how their code uses them (documented in
``anydepth/convert/_authors.py``):

* ``SwitchableConv`` (their ``nn/modules/conv.py``): a ``Conv`` with a second BatchNorm ``bn_skip``
  used when ``skip=True``; a call-time ``base_n_channels`` makes the shallow path read only the
  first input channels of the weight; built with ``base_n_channels`` it owns a separate shallow
  ``conv_skip`` (a ``Conv2d`` followed by ``bn_skip``).
* the released model YAML (``yolo-ad-v12{s,l}-orig.yaml``): the standard ``yolo12.yaml`` topology
  with their modules put where their ``yolo-ad-v12-mtl.yaml`` puts them (``SwitchableC3k2`` at
  layers 2, 4, 20; ``SkippableA2C2f`` at 6, 8, 11, 14, 17; ``SwitchableConv`` for the stride-2
  convs 3, 5, 7, 15, 18), built with their ``parse_model`` rules (``residual=True`` for every
  A2C2f, ``mlp_ratio=1.5`` for l/x, ``c3k=True`` for m/l/x) and run with their
  ``DetectionModelAnyDepth._predict_once`` rule (a standalone ``SwitchableConv`` takes the skip
  flag of the next switchable module).

RT-DETR (``--rtdetr DIR``): ``DIR`` is upstream's ``rtdetr_pytorch/`` (``lyuwenyu/RT-DETR``,
Apache-2.0) with the authors' any-depth files laid over it, copied verbatim: from
``anydepth-rt-detr/``: ``src/zoo/rtdetr/hybrid_encoder.py`` (``HybridEncoderADN``) and
``src/zoo/rtdetr/rtdetr.py``; from ``anydepth-detr/`` (``anydepth-rt-detr`` has neither):
``src/nn/backbone/resnet_adn.py`` (``ResNet_ADN``) and ``src/zoo/rtdetr/rtdetr_decoder.py`` (the
decoder with a ``depth`` argument). Glue only: ``src/__init__.py`` imports ``nn`` and ``zoo`` (not
upstream's data pipeline, which needs an older torchvision) and ``src/nn/backbone/__init__.py``
also imports ``resnet_adn``. The model is built as their ``rtdetr_r50vd_adn.yml`` builds it
(``ResNet_ADN`` depth 50, variant ``d``, frozen norms; ``HybridEncoderADN`` expansion 1.0;
``RTDETRTransformer`` 6 layers) with smaller transformer widths and query count, and run at
every depth their code supports: 4 backbone skips x encoder skip x decoder depth 1..6.

Usage::

    python tools/authors_fixtures.py --yolo /tmp/authors/y12 --rtdetr /work/scratch_i15/rtdetr_pytorch \
        --out tests/fixtures
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import sys
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------- YOLO
def make_switchable_conv(Conv, autopad):
    """Our reconstruction of the authors' ``SwitchableConv`` (see the module docstring)."""

    class SwitchableConv(nn.Module):
        default_act = nn.SiLU()

        def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True, base_n_channels=None):
            super().__init__()
            pad = autopad(k, p, d)
            self.conv = nn.Conv2d(c1, c2, k, s, pad, groups=g, dilation=d, bias=False)
            self.bn = nn.BatchNorm2d(c2)
            self.bn_skip = nn.BatchNorm2d(c2)
            self.conv_skip = (nn.Conv2d(base_n_channels, c2, k, s, pad, groups=g, dilation=d, bias=False)
                              if base_n_channels else None)
            self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

        def forward(self, x, skip=False, base_n_channels=None):
            if not skip:
                return self.act(self.bn(self.conv(x)))
            if self.conv_skip is not None:
                return self.act(self.bn_skip(self.conv_skip(x)))
            c = self.conv
            w = c.weight if base_n_channels is None else c.weight[:, :base_n_channels]
            return self.act(self.bn_skip(F.conv2d(x, w, None, c.stride, c.padding, c.dilation, c.groups)))

    return SwitchableConv


class AuthorsYOLO(nn.Module):
    """The authors' any-depth YOLO12 as their (reconstructed) YAML builds it; ``forward(x, skip)``
    follows their ``DetectionModelAnyDepth._predict_once``."""

    SWITCHABLE = ("SwitchableC3k2", "SkippableA2C2f")

    def __init__(self, blocks, scale, mult, nc):
        super().__init__()
        from ultralytics.nn.modules import Concat, Conv, Detect
        from ultralytics.utils.ops import make_divisible

        d, w, mc = mult
        W = lambda c: make_divisible(min(c, mc) * w, 8)  # noqa: E731
        R = lambda n: max(round(n * d), 1) if n > 1 else n  # noqa: E731
        c3k = scale in "mlx"
        extra = [True] + ([1.5] if scale in "lx" else [])
        SC, C3k2, A2 = blocks.SwitchableConv, blocks.SwitchableC3k2, blocks.SkippableA2C2f
        L = [Conv(3, W(64), 3, 2), Conv(W(64), W(128), 3, 2),
             C3k2(W(128), W(256), R(2), c3k, 0.25),
             SC(W(256), W(256), 3, 2),
             C3k2(W(256), W(512), R(2), c3k, 0.25),
             SC(W(512), W(512), 3, 2),
             A2(W(512), W(512), R(4), True, 4, *extra),
             SC(W(512), W(1024), 3, 2),
             A2(W(1024), W(1024), R(4), True, 1, *extra),
             nn.Upsample(None, 2, "nearest"), Concat(1),
             A2(W(1024) + W(512), W(512), R(2), False, -1, *extra),
             nn.Upsample(None, 2, "nearest"), Concat(1),
             A2(W(512) + W(512), W(256), R(2), False, -1, *extra),
             SC(W(256), W(256), 3, 2), Concat(1),
             A2(W(256) + W(512), W(512), R(2), False, -1, *extra),
             SC(W(512), W(512), 3, 2), Concat(1),
             C3k2(W(512) + W(1024), W(1024), R(2), True),
             Detect(nc, ch=(W(256), W(512), W(1024)))]
        frm = {10: (-1, 6), 13: (-1, 4), 16: (-1, 11), 19: (-1, 8), 21: (14, 17, 20)}
        for i, m in enumerate(L):
            m.i, m.f = i, frm.get(i, -1)
        self.model = nn.Sequential(*L)
        self.save = sorted({6, 4, 11, 8, 14, 17, 20})
        det = L[-1]
        det.stride = torch.tensor([8.0, 16.0, 32.0])
        for mod in self.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.eps, mod.momentum = 1e-3, 0.03
        self.blocks = blocks

    def forward(self, x, skip=(False,) * 8):
        y, i = [], 0
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if type(m).__name__ in self.SWITCHABLE:
                x = m(x, skip[i])
                i += 1
            elif isinstance(m, self.blocks.SwitchableConv):
                x = m(x, skip=skip[max(i, 0)])
            else:
                x = m(x)
            y.append(x if m.i in self.save else None)
        return x[0] if isinstance(x, tuple) else x


def conv_weight(key, shape, seed):
    """A conv weight drawn from a generator seeded by its state-dict key: the fixtures store the
    key and shape only (``tests/test_convert_authors.py`` redraws it the same way)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    fan_in = math.prod(shape[1:])
    return torch.randn(tuple(shape), generator=g) * (1.0 / fan_in) ** 0.5


@torch.no_grad()
def randomize(model, forward_full, forward_base, seed, imgsz=64, batch=32, bn_gain=(0.5, 0.8),
              residual_gain=0.05, var_floor=0.3):
    """Non-trivial random weights; running statistics calibrated on a random batch at full depth
    (main norms) and at base depth (shallow-path norms), then perturbed.

    Norm gains below 1, small residual-branch gains and a floor on the running variances (at 0.3
    of the layer's median) keep the random network well conditioned, as trained networks are:
    with gains around 1 the fp32 rounding of the authors' own model (against its fp64 run)
    reaches ~1e-4 of the class scores, above the 1e-5 being tested."""
    g = torch.Generator().manual_seed(seed)
    names = {m: n for n, m in model.named_modules()}
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d,))]
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            lo, hi = bn_gain
            mod.weight.copy_(torch.rand(mod.num_features, generator=g) * (hi - lo) + lo)
            mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
        elif isinstance(mod, nn.Conv2d) and mod.weight.requires_grad:
            mod.weight.copy_(conv_weight(names[mod] + ".weight", mod.weight.shape, seed))
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        elif isinstance(mod, nn.LayerNorm):
            mod.weight.copy_(torch.rand(mod.normalized_shape, generator=g) * 0.5 + 0.75)
            mod.bias.copy_(torch.randn(mod.normalized_shape, generator=g) * 0.1)
    for mod in model.modules():  # residual branches ending without activation: small norm weights
        if isinstance(getattr(mod, "act", None), nn.Identity):
            for name in ("bn", "bn_skip"):
                bn = getattr(mod, name, None)
                if isinstance(bn, nn.BatchNorm2d):
                    bn.weight.mul_(residual_gain)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.copy_((torch.rand(p.shape, generator=g) * 0.5 + 0.25) * residual_gain / 0.25)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0
    model.train()
    x = torch.rand(batch, 3, imgsz, imgsz, generator=g)
    forward_base(x)
    forward_full(x)
    model.eval()
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    for m in bns:
        if var_floor:  # near-constant channels would divide by ~sqrt(eps): an fp32 noise amplifier
            m.running_var.clamp_(min=var_floor * m.running_var.median().item())
        m.running_mean.add_(torch.randn(m.num_features, generator=g) * 0.05 * m.running_var.sqrt())
        m.running_var.mul_(torch.rand(m.num_features, generator=g) * 0.2 + 0.9)


def compact_state_dict(model, seed, min_dim=4):
    """(tensors stored as they are, {key: shape} of the weights that ``conv_weight`` redraws:
    conv weights, or every weight of ``min_dim`` dimensions or more); checks that every redrawn
    weight is bit-identical to the model's."""
    sd, drawn = {}, {}
    for k, v in model.state_dict().items():
        if v.dim() >= min_dim and torch.equal(v, conv_weight(k, v.shape, seed)):
            drawn[k] = list(v.shape)
        else:
            sd[k] = v.detach().clone()
    return sd, drawn


def yolo_fixture(folder, scale, mult, nc, seed, imgsz):
    sys.path.insert(0, folder)
    blocks = importlib.import_module("authors_blocks")
    from ultralytics.nn.modules.conv import Conv, autopad

    blocks.SwitchableConv = make_switchable_conv(Conv, autopad)
    torch.manual_seed(seed)
    model = AuthorsYOLO(blocks, scale, mult, nc)
    randomize(model, lambda x: model(x, (False,) * 8), lambda x: model(x, (True,) * 8), seed)
    model.eval()
    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(seed + 1))
    outputs = {}
    with torch.no_grad():
        for skip in itertools.product((False, True), repeat=8):
            key = "".join("T" if s else "F" for s in skip)
            outputs[key] = model(x, list(skip)).clone()
    # a few depths also in float64 (their model, weights and input upcast): the same arithmetic
    # agrees to rounding there, which tells an exact port from a close one
    model64 = AuthorsYOLO(blocks, scale, mult, nc)
    model64.load_state_dict(model.state_dict())
    model64.eval().double()
    outputs64 = {}
    with torch.no_grad():
        for key in ("F" * 8, "T" * 8, "TFTFTFTF", "FTFTFTFT"):
            outputs64[key] = model64(x.double(), [c == "T" for c in key]).clone()
    sd, drawn = compact_state_dict(model, seed)
    return {"format": "anydepth-authors-fixture", "family": "yolo", "scale": scale,
            "multipliers": list(mult), "num_classes": nc, "input": x, "state_dict": sd,
            "drawn": drawn, "weight_seed": seed, "depths": list(outputs),
            "outputs": torch.stack(list(outputs.values())),
            "depths64": list(outputs64), "outputs64": torch.stack(list(outputs64.values())),
            "switch_order": ["layer 2", "layer 4", "layer 6", "layer 8", "layer 11", "layer 14",
                             "layer 17", "layer 20"]}


# -------------------------------------------------------------------------------------- RT-DETR
#: the small configuration of the RT-DETR fixture (their r50 backbone in full; narrower transformer)
RTDETR_OPTIONS = dict(depth=50, hidden_dim=64, dim_feedforward=128, d_model=64, decoder_ffn=128,
                      num_queries=30, num_classes=3, decoder_layers=6, nhead=8, imgsz=64)


def import_authors_rtdetr(folder):
    """Their modules, imported from the scratch folder (``rtdetr_pytorch/`` with their files)."""
    sys.path.insert(0, folder)
    importlib.import_module("src")
    backbone = importlib.import_module("src.nn.backbone.resnet_adn")
    common = importlib.import_module("src.nn.backbone.common")
    encoder = importlib.import_module("src.zoo.rtdetr.hybrid_encoder")
    decoder = importlib.import_module("src.zoo.rtdetr.rtdetr_decoder")
    rtdetr = importlib.import_module("src.zoo.rtdetr.rtdetr")
    return dict(ResNet_ADN=backbone.ResNet_ADN, FrozenBatchNorm2d=common.FrozenBatchNorm2d,
                HybridEncoderADN=encoder.HybridEncoderADN, RTDETRTransformer=decoder.RTDETRTransformer,
                RTDETR=rtdetr.RTDETR, Bottleneck=backbone.Bottleneck)


def build_authors_rtdetr(mods, o):
    """Their any-depth RT-DETR as ``rtdetr_r50vd_adn.yml`` builds it (widths from ``o``)."""
    size = [o["imgsz"], o["imgsz"]]
    backbone = mods["ResNet_ADN"](o["depth"], variant="d", return_idx=[1, 2, 3], freeze_at=0, freeze_norm=True,
                                  pretrained=False)
    encoder = mods["HybridEncoderADN"](in_channels=backbone.out_channels, feat_strides=[8, 16, 32],
                                       hidden_dim=o["hidden_dim"], nhead=o["nhead"],
                                       dim_feedforward=o["dim_feedforward"], expansion=1.0, eval_spatial_size=size)
    decoder = mods["RTDETRTransformer"](num_classes=o["num_classes"], hidden_dim=o["d_model"],
                                        num_queries=o["num_queries"], feat_channels=[o["hidden_dim"]] * 3,
                                        feat_strides=[8, 16, 32], num_levels=3, nhead=o["nhead"],
                                        num_decoder_layers=o["decoder_layers"], dim_feedforward=o["decoder_ffn"],
                                        eval_spatial_size=size)
    return mods["RTDETR"](backbone, encoder, decoder)


def what_their_code_cannot_build(mods, o):
    """The configurations their code refuses (recorded in the fixture): a ResNet-18 backbone and
    the encoder of r18/r34 (expansion 0.5)."""
    fails = {}
    try:
        mods["ResNet_ADN"](18, variant="d", return_idx=[1, 2, 3], pretrained=False)
        fails["ResNet_ADN(18)"] = "builds"
    except Exception as e:  # noqa: BLE001 - recorded
        fails["ResNet_ADN(18)"] = f"{type(e).__name__}: {e}"
    try:
        mods["HybridEncoderADN"](in_channels=[128, 256, 512], hidden_dim=o["hidden_dim"], expansion=0.5)
        fails["HybridEncoderADN(expansion=0.5)"] = "builds"
    except Exception as e:  # noqa: BLE001 - recorded
        fails["HybridEncoderADN(expansion=0.5)"] = f"{type(e).__name__}: {e}"
    return fails


def _norms(model):
    return [m for m in model.modules() if isinstance(getattr(m, "running_var", None), torch.Tensor)]


@torch.no_grad()
def randomize_rtdetr(model, mods, seed, imgsz, batch=8, bn_gain=(0.5, 0.8), residual_gain=0.05, box_gain=0.1,
                     mean_fraction=0.5, var_floor=1.0):
    """Non-trivial random weights for their model, well conditioned as trained networks are: every
    weight of 2+ dimensions redrawn by ``conv_weight`` (so the fixture stores its key and shape
    only), norms with gains below 1, a small gain on each bottleneck's last norm (residual branch)
    and on the last layer of every box head (trained box heads make small refinements), biases
    N(0, 0.1); norm statistics calibrated on a random batch (their backbone norms are frozen: set
    by a hook from the batch), base depth first, then full depth (norms used at both keep the
    full-depth statistics), then perturbed.

    The calibration centres by half the batch mean (``mean_fraction``, the variance taking the
    rest: ``var + (1 - f)^2 mean^2``) and floors every variance at the layer's median
    (``var_floor``): deep features of random-noise images vary little around a large mean, and
    full centring divides that cancellation by a small standard deviation, which made the fp32
    rounding of their own model (against its fp64 run) reach ~1e-5 of the outputs; with these
    settings it stays near 1e-6 (measured on our port in fp32 and fp64)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(conv_weight(name, p.shape, seed))
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm):
            mod.weight.copy_(torch.rand(mod.normalized_shape, generator=g) * 0.5 + 0.75)
            mod.bias.copy_(torch.randn(mod.normalized_shape, generator=g) * 0.1)
        elif isinstance(getattr(mod, "running_var", None), torch.Tensor):
            lo, hi = bn_gain
            mod.weight.copy_(torch.rand(mod.num_features, generator=g) * (hi - lo) + lo)
            mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
        elif isinstance(mod, nn.Linear) and mod.bias is not None:
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        elif isinstance(mod, nn.MultiheadAttention):
            mod.in_proj_bias.copy_(torch.randn(mod.in_proj_bias.shape, generator=g) * 0.1)
    for mod in model.modules():
        if isinstance(mod, mods["Bottleneck"]):
            for name in ("bn3", "bn3_skip"):
                if hasattr(mod, name):
                    getattr(mod, name).weight.mul_(residual_gain)
    dec = model.decoder
    for head in [dec.enc_bbox_head, *dec.dec_bbox_head]:
        head.layers[-1].bias.mul_(box_gain)
    box_weights = {f"decoder.enc_bbox_head.layers.{len(dec.enc_bbox_head.layers) - 1}.weight"} | {
        f"decoder.dec_bbox_head.{i}.layers.{len(h.layers) - 1}.weight" for i, h in enumerate(dec.dec_bbox_head)}
    for name, p in model.named_parameters():
        if name in box_weights:  # scaled after the draw: stored in the fixture, not redrawn
            p.mul_(box_gain)

    def calibrate(mod, args):
        x = args[0]
        mean = x.mean((0, 2, 3))
        mod.running_mean.copy_(mean_fraction * mean)
        mod.running_var.copy_(x.var((0, 2, 3)) + (1.0 - mean_fraction) ** 2 * mean ** 2)

    norms = _norms(model)
    hooks = [m.register_forward_pre_hook(calibrate) for m in norms]
    model.eval()
    x = torch.rand(batch, 3, imgsz, imgsz, generator=g)
    model(x, backbone_skip=[True] * 4, encoder_skip=[True], decoder_depth=1)
    model(x, backbone_skip=[False] * 4, encoder_skip=[False], decoder_depth=1)
    for h in hooks:
        h.remove()
    for m in norms:
        m.running_var.clamp_(min=var_floor * m.running_var.median().item())
        m.running_mean.add_(torch.randn(m.num_features, generator=g) * 0.05 * m.running_var.sqrt())
        m.running_var.mul_(torch.rand(m.num_features, generator=g) * 0.2 + 0.9)


def rtdetr_depths(decoder_layers):
    """Every depth their code runs: (backbone skip list, encoder skip, decoder depth), and its key
    (``"TFTF" + "T" + "4"``: the four backbone skips, the encoder skip, the decoder depth)."""
    for bs in itertools.product((False, True), repeat=4):
        for es in (False, True):
            for d in range(1, decoder_layers + 1):
                key = "".join("T" if s else "F" for s in bs) + ("T" if es else "F") + str(d)
                yield key, list(bs), es, d


def rtdetr_fixture(folder, seed=0, options=None):
    o = dict(RTDETR_OPTIONS, **(options or {}))
    mods = import_authors_rtdetr(folder)
    fails = what_their_code_cannot_build(mods, o)
    torch.manual_seed(seed)
    model = build_authors_rtdetr(mods, o)
    randomize_rtdetr(model, mods, seed, o["imgsz"])
    model.eval()
    x = torch.rand(1, 3, o["imgsz"], o["imgsz"], generator=torch.Generator().manual_seed(seed + 1))
    scores = []
    hook = model.decoder.enc_score_head.register_forward_hook(lambda m, a, out: scores.append(out.detach()))
    outputs, gaps = {}, {}
    with torch.no_grad():
        for key, bs, es, d in rtdetr_depths(o["decoder_layers"]):
            out = model(x, backbone_skip=bs, encoder_skip=[es], decoder_depth=d)
            outputs[key] = torch.cat([out["pred_logits"], out["pred_boxes"]], -1)[0].clone()
            # the query selection's margin: the smallest gap between consecutive sorted scores of
            # the top num_queries + 1 (a near tie could reorder the queries under rounding)
            top = scores[-1].max(-1).values[0].sort(descending=True).values[:o["num_queries"] + 1]
            gaps[key[:5]] = float((top[:-1] - top[1:]).min())
    hook.remove()
    sd, drawn = compact_state_dict(model, seed, min_dim=2)
    return {"format": "anydepth-authors-fixture", "family": "rtdetr", "options": o, "variant": "d",
            "num_classes": o["num_classes"], "num_queries": o["num_queries"], "input": x, "state_dict": sd,
            "drawn": drawn, "weight_seed": seed, "depths": list(outputs),
            "outputs": torch.stack(list(outputs.values())), "output_layout": "logits (num_classes) | boxes cxcywh",
            "min_topk_gap": min(gaps.values()), "their_code_cannot_build": fails,
            "source": {"anydepth-rt-detr": ["src/zoo/rtdetr/hybrid_encoder.py", "src/zoo/rtdetr/rtdetr.py"],
                       "anydepth-detr": ["src/nn/backbone/resnet_adn.py", "src/zoo/rtdetr/rtdetr_decoder.py"],
                       "upstream": "lyuwenyu/RT-DETR rtdetr_pytorch/ (the rest)"}}


#: array entries of a fixture (those it has); everything else is JSON metadata
ARRAYS = ("input", "outputs", "outputs64")


def save_npz(fx, path):
    """A fixture as plain arrays (``state_dict/<key>``, input, outputs) and one JSON string of the
    rest: test data, read back with ``np.load(allow_pickle=False)``."""
    meta = {k: v for k, v in fx.items() if k not in ARRAYS and k != "state_dict"}
    arrays = {k: fx[k].numpy() for k in ARRAYS if k in fx}
    arrays.update({f"state_dict/{k}": v.numpy() for k, v in fx["state_dict"].items()})
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--yolo", help="folder holding authors_blocks.py (their block classes)")
    ap.add_argument("--rtdetr", help="upstream rtdetr_pytorch/ folder with the authors' files laid over it")
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.yolo:
        # two configurations that cover every code path of their split: one-block modules that
        # are not skippable, two-block modules sharing the output conv, four-block modules with
        # their own shallow output conv, C3k2 with plain bottlenecks and with skippable C3k
        for name, scale, mult in (("authors_yolo_s.npz", "s", (0.5, 0.25, 256)),
                                  ("authors_yolo_l.npz", "l", (1.0, 0.25, 256))):
            fx = yolo_fixture(args.yolo, scale, mult, nc=3, seed=0, imgsz=64)
            path = os.path.join(args.out, name)
            save_npz(fx, path)
            n = sum(v.numel() for v in fx["state_dict"].values())
            print(f"{path}: {n} stored + {len(fx['drawn'])} redrawn tensors, {len(fx['outputs'])} depths, "
                  f"{os.path.getsize(path) / 1e6:.2f} MB")
    if args.rtdetr:
        fx = rtdetr_fixture(args.rtdetr, seed=0)
        path = os.path.join(args.out, "authors_rtdetr_r50.npz")
        save_npz(fx, path)
        n = sum(v.numel() for v in fx["state_dict"].values())
        print(f"{path}: {n} stored + {len(fx['drawn'])} redrawn tensors, {len(fx['outputs'])} depths, "
              f"smallest top-k score gap {fx['min_topk_gap']:.2e}, {os.path.getsize(path) / 1e6:.2f} MB")
        for what, why in fx["their_code_cannot_build"].items():
            print(f"their code, {what}: {why}")


if __name__ == "__main__":
    main()
