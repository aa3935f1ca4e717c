"""Deeply shared filter bases: the layer, the orthogonality penalty, the SVD conversion, the exact
fold, deployment, and the fused factored op (C++ and Triton) against its eager reference."""
import random

import pytest
import torch
from torch import nn

import anydepth_kernels as ak
from anydepth_kernels import reference, triton_kernels
from anydepth_kernels import shared_basis as sb
from anydepth_kernels.flops import flop_mapping

from helpers import aot_compile, needs_cuda, rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKENDS = ["reference", "cpp", "triton"]


def _randomise_norms(module: nn.Module, seed: int) -> None:
    """Random affine parameters and running statistics in every BatchNorm (eval-mode folds)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _layer(rng: random.Random, seed: int, shared: bool = True, dtype=torch.float32):
    c, cout = rng.choice([3, 8, 16]), rng.choice([5, 16, 24])
    k = rng.choice([1, 3, 3])
    u = rng.choice([0, 1, 4]) if shared else rng.choice([1, 6])
    basis = sb.SharedBasis(c, rng.choice([2, 8, 17]), k) if shared else None
    layer = sb.SharedBasisConv2d(c, cout, u, basis, k, stride=rng.choice([1, 2]), dilation=rng.choice([1, 1, 2]),
                                 act=rng.choice([None, "relu", "silu"])).to(dtype)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5))
    _randomise_norms(layer, seed)
    return layer.eval()


# --------------------------------------------------------------------------------------------
# The layer and the penalty
# --------------------------------------------------------------------------------------------

def test_layer_shares_one_basis_and_trains():
    basis = sb.SharedBasis(8, 6)
    a = sb.SharedBasisConv2d(8, 8, 2, basis, act="relu")
    b = sb.SharedBasisConv2d(8, 8, 2, basis, act="relu")
    stage = nn.Sequential(a, b)
    n_params = sum(p.numel() for p in stage.parameters())
    own = 2 * (2 * 8 * 9 + 8 * 8 + 2 * 8 + 2 * 8)  # own filters, coefficients, two norms' affine
    assert n_params == own + 6 * 8 * 9  # the shared filters once
    assert a.basis_weight().shape == (8, 8, 3, 3) and a.rank == 8 and a.shared_rank == 6
    assert torch.equal(a.basis_weight()[2:], basis.weight)  # own filters first, as the authors
    x = torch.randn(2, 8, 6, 6)
    loss = stage(x).square().mean() + sb.orthogonality_penalty(stage)
    loss.backward()
    assert basis.weight.grad is not None and basis.weight.grad.abs().sum() > 0
    state = stage.state_dict()
    assert state["0.shared.weight"].data_ptr() == state["1.shared.weight"].data_ptr()
    clone = nn.Sequential(sb.SharedBasisConv2d(8, 8, 2, (s := sb.SharedBasis(8, 6)), act="relu"),
                          sb.SharedBasisConv2d(8, 8, 2, s, act="relu"))
    clone.load_state_dict(state)
    stage.eval(), clone.eval()
    assert torch.equal(clone(x), stage(x))


def test_layer_matches_the_authors_two_convolutions():
    """cat(conv(x, U), conv(x, S)) -> BN -> 1x1 -> BN, spelled out as in Net_RL2's blocks."""
    layer = _layer(random.Random(5), 5)
    x = torch.randn(2, layer.in_channels, 9, 9)
    own = nn.functional.conv2d(x, layer.unique, None, layer.stride, layer.padding, layer.dilation) \
        if layer.unique is not None else x.new_zeros(0)
    shared = nn.functional.conv2d(x, layer.shared.weight, None, layer.stride, layer.padding, layer.dilation)
    y = torch.cat([own, shared], 1) if layer.unique is not None else shared
    y = layer.norm(layer.coeff(layer.basis_norm(y)))
    y = reference.apply_activation(y, layer.act)
    with torch.no_grad():
        assert rel_err(layer(x), y) <= 1e-6


def test_orthogonality_penalty():
    torch.manual_seed(0)
    b1, b2 = sb.SharedBasis(4, 5), sb.SharedBasis(8, 12)
    model = nn.Sequential(sb.SharedBasisConv2d(4, 4, 1, b1), sb.SharedBasisConv2d(4, 4, 1, b1),
                          sb.SharedBasisConv2d(8, 8, 0, b2))
    # orthogonal init: rows orthonormal, penalty ~0
    assert sb.orthogonality_penalty(model).item() < 1e-10
    with torch.no_grad():
        for b in (b1, b2):
            b.weight.copy_(torch.randn_like(b.weight))

    def term(b):
        w = b.weight.reshape(b.rank, -1)
        return ((w @ w.t() - torch.eye(b.rank)) ** 2).sum()

    pooled = (term(b1) + term(b2)) / (5 ** 2 + 12 ** 2)  # the authors' train_*.py
    mean = (term(b1) / 25 + term(b2) / 144) / 2
    assert torch.allclose(sb.orthogonality_penalty(model), 10 * pooled)
    assert torch.allclose(sb.orthogonality_penalty(model, weight=1.0, reduction="mean"), mean)
    assert sb.shared_bases(model) == [b1, b2]  # b1 counted once though two layers hold it
    # only the shared filters are penalised
    sb.orthogonality_penalty(model).backward()
    assert all(m.unique is None or m.unique.grad is None for m in model)
    assert sb.orthogonality_penalty(nn.Conv2d(3, 3, 1)).item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        sb.orthogonality_penalty(model, reduction="sum")


def test_joint_penalty_of_groups_by_hand():
    """``SharedBasisGroup``: the group's bases stacked into one ``W`` (ranks may differ), a basis
    outside any group alone; pooled = sum of ``||W W^T - I||^2`` over sum of ``(sum r)^2``, mean =
    the mean of the per-unit ratios; ``joint=False`` ignores the groups."""
    torch.manual_seed(3)
    a, b, c = sb.SharedBasis(3, 4), sb.SharedBasis(3, 6), sb.SharedBasis(5, 2, 1)
    for basis in (a, b, c):
        with torch.no_grad():
            basis.weight.add_(0.1 * torch.randn_like(basis.weight))
    model = nn.ModuleDict({"g": sb.SharedBasisGroup([a, b]), "lone": nn.ModuleList([c])})
    assert [[id(x) for x in g] for g in sb.basis_groups(model)] == [[id(a), id(b)], [id(c)]]

    def gram(*bases):
        w = torch.cat([x.weight.detach().double().reshape(x.rank, -1) for x in bases])
        return float(((w @ w.t() - torch.eye(w.shape[0], dtype=torch.float64)) ** 2).sum())

    joint, lone = gram(a, b), gram(c)
    assert float(sb.orthogonality_penalty(model, weight=1.0).detach()) == pytest.approx(
        (joint + lone) / (10 ** 2 + 2 ** 2), rel=1e-6)
    assert float(sb.orthogonality_penalty(model, weight=2.0, reduction="mean").detach()) == pytest.approx(
        2 * (joint / 100 + lone / 4) / 2, rel=1e-6)
    assert float(sb.orthogonality_penalty(model, weight=1.0, joint=False).detach()) == pytest.approx(
        (gram(a) + gram(b) + lone) / (16 + 36 + 4), rel=1e-6)
    with pytest.raises(ValueError, match="cannot be stacked"):
        sb.orthogonality_penalty(sb.SharedBasisGroup([a, c]))
    with pytest.raises(TypeError, match="joint"):
        sb.orthogonality_penalty(model, joint="yes")


def test_layer_bad_arguments():
    basis = sb.SharedBasis(8, 4)
    with pytest.raises(ValueError, match="shared basis reads 8 channels"):
        sb.SharedBasisConv2d(6, 8, 1, basis)
    with pytest.raises(ValueError, match="no basis filters"):
        sb.SharedBasisConv2d(8, 8, 0, None)
    with pytest.raises(TypeError, match="SharedBasis"):
        sb.SharedBasisConv2d(8, 8, 1, nn.Conv2d(8, 4, 3))
    with pytest.raises(ValueError, match="activation"):
        sb.SharedBasisConv2d(8, 8, 1, basis, act="gelu")


# --------------------------------------------------------------------------------------------
# share_bases: plain convs -> shared-basis form by SVD
# --------------------------------------------------------------------------------------------

def test_share_bases_full_rank_is_exact_and_orthogonal():
    torch.manual_seed(1)
    convs = [nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=True),
             nn.Conv2d(4, 7, 3, padding=2, dilation=2, bias=False)]
    norms = [nn.BatchNorm2d(6), None, nn.BatchNorm2d(7)]
    for n in norms:
        if n is not None:
            _randomise_norms(n, 2)
    basis, layers = sb.share_bases(convs, shared_rank=30, unique_rank=6, norms=norms, act="relu")
    assert basis is not None and basis.rank == 30
    assert sb.orthogonality_penalty(nn.ModuleList(layers)).item() < 1e-10
    x = torch.randn(2, 4, 9, 9)
    for conv, norm, layer in zip(convs, norms, layers):
        layer.eval()
        assert layer.shared is basis and layer.stride == conv.stride and layer.dilation == conv.dilation
        with torch.no_grad():
            want = conv(x)
            want = torch.relu(norm.eval()(want) if norm is not None else want)
            assert rel_err(layer(x), want) <= 1e-5
        rows = layer.basis_weight().detach().double().reshape(36, 36)
        assert torch.allclose(rows @ rows.t(), torch.eye(36, dtype=torch.float64), atol=1e-5)


def test_share_bases_low_rank_keeps_the_shared_energy():
    """Below full rank the conversion is a projection: the shared rows are the top singular
    directions of the stacked filters, each layer's own rows orthogonal to them."""
    torch.manual_seed(2)
    convs = [nn.Conv2d(3, 8, 3, padding=1, bias=False) for _ in range(3)]
    basis, layers = sb.share_bases(convs, shared_rank=6, unique_rank=2)
    stacked = torch.cat([c.weight.detach().reshape(8, 27) for c in convs]).double()
    s_rows = basis.weight.detach().double().reshape(6, 27)
    top = torch.linalg.svdvals(stacked)[:6].square().sum()
    assert torch.allclose((stacked @ s_rows.t()).square().sum(), top, rtol=1e-5)
    for layer in layers:
        own = layer.unique.detach().double().reshape(2, 27)
        assert (own @ s_rows.t()).abs().max() < 1e-5


def test_share_bases_errors():
    with pytest.raises(ValueError, match="one input width"):
        sb.share_bases([nn.Conv2d(4, 4, 3), nn.Conv2d(5, 4, 3)], 2, 1)
    with pytest.raises(ValueError, match="exceeds"):
        sb.share_bases([nn.Conv2d(2, 4, 3)], 18, 1)
    with pytest.raises(ValueError, match="groups=1"):
        sb.share_bases([nn.Conv2d(4, 4, 3, groups=2)], 2, 1)
    with pytest.raises(ValueError, match="norms"):
        sb.share_bases([nn.Conv2d(4, 4, 3)], 2, 1, norms=[])


# --------------------------------------------------------------------------------------------
# Fold and deployment
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_fold_and_factored_are_exact(seed):
    rng = random.Random(seed)
    layer = _layer(rng, seed, shared=seed % 4 != 3)
    x = torch.randn(rng.choice([1, 2]), layer.in_channels, rng.choice([5, 8]), 7)
    with torch.no_grad():
        want = layer(x)
        res = torch.randn_like(want)
        assert rel_err(layer.fold()(x), want) <= 1e-5
        assert rel_err(layer.fold()(x, residual=res), want + res) <= 1e-5
        for backend in ("reference", "cpp"):
            assert rel_err(layer.factored(backend)(x), want) <= 1e-5
            assert rel_err(layer.factored(backend)(x, residual=res), want + res) <= 1e-5


def _stage():
    torch.manual_seed(3)
    wide = sb.SharedBasis(32, 8)
    narrow = sb.SharedBasis(4, 30)
    model = nn.Sequential(
        sb.SharedBasisConv2d(4, 32, 1, None, stride=2),       # u=1 of 36: factored is cheaper
        sb.SharedBasisConv2d(32, 32, 1, wide, act="relu"),    # 9 of 288 -> 32 outputs: factored
        sb.SharedBasisConv2d(32, 32, 1, wide, act="relu"),
        sb.SharedBasisConv2d(32, 4, 0, sb.SharedBasis(32, 8)),  # 4 outputs: folded is cheaper
        sb.SharedBasisConv2d(4, 4, 2, narrow),                 # 32 of 36 filters: folded
    )
    _randomise_norms(model, 4)
    return model.eval()


def test_deploy_table_and_deploy():
    model = _stage()
    x = torch.randn(2, 4, 16, 16)
    rows = sb.deploy_table(model, x)
    assert [r.choice for r in rows] == ["factored", "factored", "factored", "fold", "fold"]
    r = rows[1]
    assert (r.out_hw, r.params_plain) == ("8x8", 32 * 32 * 9)
    assert r.params_factored == 1 * 288 + 32 * 9 + 8 * 288  # own, coefficients, shared (first holder)
    assert rows[2].params_factored == 1 * 288 + 32 * 9      # shared already counted
    assert r.flops_folded == 2 * 2 * 64 * 32 * 288 and r.flops_factored == 2 * 2 * 64 * (9 * 288 + 32 * 9)
    text = sb.format_deploy_table(rows)
    assert "total" in text and text.count("\n") == len(rows) + 3
    with torch.no_grad():
        want = model(x)
        for mode, kinds in (("auto", {ak.FusedConvNormAct, sb.FactoredConvNormAct}),
                            ("fold", {ak.FusedConvNormAct}), ("factored", {sb.FactoredConvNormAct})):
            deployed = _stage()
            assert sb.deploy(deployed, mode) == 5
            assert {type(m) for m in deployed} == kinds
            assert rel_err(deployed(x), want) <= 1e-5
        optimized = ak.optimize(_stage())
        assert [type(m).__name__ for m in optimized] == [
            "FactoredConvNormAct", "FactoredConvNormAct", "FactoredConvNormAct", "FusedConvNormAct",
            "FusedConvNormAct"]
        assert rel_err(optimized(x), want) <= 1e-5
    with pytest.raises(ValueError, match="mode"):
        sb.deploy(model, "plain")


def test_benchmark_rows():
    """The benchmark's rows (no timing asserted): eager factored, fused factored per backend that
    runs here, folded plain conv, each output checked against the eager layer."""
    from anydepth_kernels.benchmark_shared_basis import EAGER, BasisCase, run_basis_benchmarks

    report = run_basis_benchmarks(cases=[BasisCase("tiny", 8, 6, 1, 4)], rounds=1, reps=1, warmup=0,
                                  progress=False, clock="thread")
    assert [r.backend for r in report.results] == [EAGER, "fused factored [cpp]", "folded plain conv"]
    assert all(r.max_rel_err <= 1e-5 for r in report.results)
    assert "fused factored [triton]" in report.skipped


def test_fold_needs_running_statistics():
    layer = sb.SharedBasisConv2d(4, 4, 2, None)
    layer.norm = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        layer.fold()


# --------------------------------------------------------------------------------------------
# The fused op against its eager reference
# --------------------------------------------------------------------------------------------

def _op_case(rng: random.Random, dtype=torch.float32):
    n = rng.choice([1, 2, 3])
    c = rng.choice([1, 3, 8, 19])
    rank = rng.choice([1, 2, 9, 17, 33])  # u + s, ragged
    cout = rng.choice([1, 5, 16, 40, 70])
    k = rng.choice([1, 3, 3, 5])
    stride, dilation = rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2])
    padding = rng.choice([0, dilation * (k // 2)])
    h, w = rng.choice([(k * dilation + 2, 7), (9, 9), (12, 5), (16, 17)])
    x = torch.randn(n, c, h, w).to(dtype)
    basis = (torch.randn(rank, c, k, k) / (c * k * k) ** 0.5).to(dtype)
    coeff = (torch.randn(cout, rank) / rank ** 0.5).to(dtype)
    scale, bias = torch.rand(cout) + 0.5, torch.randn(cout) * 0.1
    return x, basis, coeff, scale, bias, stride, padding, dilation


def _run_case(backend, seed, dtype, tol):
    rng = random.Random(seed)
    x, basis, coeff, scale, bias, stride, padding, dilation = _op_case(rng, dtype)
    act = rng.choice(["identity", "relu", "silu"])
    ref = reference.basis_conv_norm_act(x.double(), basis.double(), coeff.double(), scale.double(),
                                        bias.double(), stride, padding, dilation, act)
    residual = torch.randn(ref.shape).to(dtype) if seed % 3 == 0 else None
    if residual is not None:
        ref = ref + residual.double()
    out = ak.basis_conv_norm_act(x, basis, coeff, scale, bias, stride, padding, dilation, act, residual,
                                 backend=backend)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= tol, (seed, rel_err(out, ref))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(12))
def test_op_matches_reference(backend, seed):
    _run_case(backend, seed, torch.float32, 1e-5)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("seed", [20, 21])
def test_op_bf16(backend, seed):
    _run_case(backend, seed, torch.bfloat16, 1e-2)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_op_big_rank_and_many_tiles(backend):
    """Rank past one register tile of Triton's small configs (200 -> BLOCK_R 256), more output
    rows than one C++ band, non-contiguous operands (read through copies, not misread)."""
    torch.manual_seed(6)
    x = torch.randn(1, 12, 40, 46)[:, :, :, ::2]
    basis = torch.randn(12, 200, 3, 3).transpose(0, 1) / 6
    coeff = torch.randn(200, 20).t() / 14
    scale, bias = torch.rand(20) + 0.5, torch.randn(20)
    ref = reference.basis_conv_norm_act(x, basis, coeff, scale, bias, 1, 1, 1, "silu")
    out = ak.basis_conv_norm_act(x, basis, coeff, scale, bias, 1, 1, 1, "silu", backend=backend)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_op_padding_only_rows(backend):
    """Padding wider than the kernel reach: output rows that read only zero rows. For the C++
    kernel the input rows are wide enough (1100 x 50) that its bands are one row tall, so the
    first band is made of padding alone; Triton takes a narrow input (the interpreter is slow)."""
    torch.manual_seed(10)
    c = 1100 if backend == "cpp" else 16
    x = torch.randn(1, c, 3, 50)
    basis, coeff = torch.randn(5, c, 3, 3) / (9 * c) ** 0.5, torch.randn(7, 5)
    scale, bias = torch.rand(7) + 0.5, torch.randn(7)
    ref = reference.basis_conv_norm_act(x, basis, coeff, scale, bias, (2, 1), (3, 1), 1, "relu")
    out = ak.basis_conv_norm_act(x, basis, coeff, scale, bias, (2, 1), (3, 1), 1, "relu", backend=backend)
    assert out.shape == (1, 7, 4, 50) and rel_err(out, ref) <= 1e-5


def test_cpp_worker_threads_with_parameters():
    """The C++ tiles run on at::parallel_for's worker threads, which do not share the caller's
    no-grad state: parameters that require grad (a module's) must still work, under no_grad and
    with grad (the op's backward then runs through the reference)."""
    layer = _layer(random.Random(9), 9)
    factored = layer.factored("cpp")
    x = torch.randn(2, layer.in_channels, 24, 24)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            assert rel_err(factored(x), layer(x)) <= 1e-5
        out = factored(x.requires_grad_())
        out.sum().backward()
        assert factored.basis.grad is not None and x.grad is not None
    finally:
        torch.set_num_threads(threads)


def test_op_gradients_float64():
    rng = random.Random(7)
    x, basis, coeff, scale, bias, stride, padding, dilation = _op_case(rng, torch.float64)
    x, basis, coeff = x[:1, :, :6, :6], basis, coeff
    for t in (x, basis, coeff):
        t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c: ak.basis_conv_norm_act(a, b, c, scale, bias, stride, padding, dilation, "silu",
                                               backend="cpp"), (x, basis, coeff), eps=1e-6, atol=1e-6)


def test_opcheck_and_compile():
    rng = random.Random(8)
    x, basis, coeff, scale, bias, stride, padding, dilation = _op_case(rng)
    args = (x.requires_grad_(), basis, coeff.requires_grad_(), scale, bias, [stride] * 2, [padding] * 2,
            [dilation] * 2, "relu", None, "cpp")
    result = torch.library.opcheck(torch.ops.anydepth.basis_conv_norm_act.default, args)
    assert set(result.values()) == {"SUCCESS"}, result
    fn = torch.compile(lambda a: ak.basis_conv_norm_act(a, basis, coeff, scale, bias, stride, padding, dilation),
                       backend="eager", fullgraph=True)
    with torch.no_grad():
        want = reference.basis_conv_norm_act(x, basis, coeff, scale, bias, stride, padding, dilation)
        assert rel_err(fn(x.detach()), want) <= 1e-5


def test_op_flops():
    from torch.utils.flop_counter import FlopCounterMode

    x, basis, coeff = torch.randn(2, 8, 10, 10), torch.randn(5, 8, 3, 3), torch.randn(16, 5)
    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        ak.basis_conv_norm_act(x, basis, coeff, torch.ones(16), torch.zeros(16), 2, 1)
    assert counter.get_total_flops() == 2 * 2 * 25 * (5 * 72 + 16 * 5)


def test_op_bad_inputs():
    x, basis, coeff = torch.randn(1, 4, 6, 6), torch.randn(3, 4, 3, 3), torch.randn(8, 3)
    s, b = torch.ones(8), torch.zeros(8)
    op = ak.basis_conv_norm_act
    with pytest.raises(TypeError, match="dtype"):
        op(x.int(), basis, coeff, s, b)
    with pytest.raises(TypeError, match="coeff has dtype"):
        op(x, basis, coeff.double(), s, b)
    with pytest.raises(ValueError, match="is on meta"):
        op(x, basis, coeff.to("meta"), s, b)
    with pytest.raises(ValueError, match="x has 4 channels but weight expects 5"):
        op(x, torch.randn(3, 5, 3, 3), coeff, s, b)
    with pytest.raises(ValueError, match=r"coeff must be \[C_out, R\]"):
        op(x, basis, torch.randn(8, 4), s, b)
    with pytest.raises(ValueError, match=r"coeff must be \[C_out, R\]"):
        op(x, basis, torch.randn(8, 3, 3, 3), s, b)
    with pytest.raises(ValueError, match="must be 4-D"):
        op(x[0], basis, coeff, s, b)
    with pytest.raises(ValueError, match="too small"):
        op(x[:, :, :2], basis, coeff, s, b)
    with pytest.raises(ValueError, match="scale has 7 elements but the output has 8 channels"):
        op(x, basis, coeff, torch.ones(7), b)
    with pytest.raises(ValueError, match="residual has shape"):
        op(x, basis, coeff, s, b, padding=1, residual=torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="empty channel"):
        op(x, basis[:0], coeff[:, :0], s, b)
    with pytest.raises(ValueError, match="C_out >= 1"):
        op(x, basis, coeff[:0], s[:0], b[:0])
    with pytest.raises(ValueError, match="stride must be >= 1"):
        op(x, basis, coeff, s, b, stride=0)
    with pytest.raises(ValueError, match="unknown backend"):
        op(x, basis, coeff, s, b, backend="cuda")
    with pytest.raises(ValueError, match="activation"):
        op(x, basis, coeff, s, b, act="gelu")
    # empty batch: an empty result, not an error
    assert op(x[:0], basis, coeff, s, b, padding=1).shape == (0, 8, 6, 6)


@pytest.mark.triton_cpu
def test_op_triton_errors(monkeypatch):
    x, basis, coeff = torch.randn(1, 4, 6, 6), torch.randn(3, 4, 3, 3), torch.randn(8, 3)
    s, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match="backend 'triton' is not available: the Triton kernels support"):
        ak.basis_conv_norm_act(x.double(), basis.double(), coeff.double(), s, b, backend="triton")
    with pytest.raises(RuntimeError, match="basis rank 600 is not supported"):
        ak.basis_conv_norm_act(x, torch.randn(600, 4, 1, 1), torch.randn(8, 600), s, b, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        ak.basis_conv_norm_act(x, basis, coeff, s, b, backend="triton")


def test_triton_aot_compile(tmp_path, aot_triton):
    """Compile the fused factored-conv variants for sm_80 and sm_90 (PTX and cubin), with the venv's
    Triton and with Triton 3.6 (sm_90 only)."""
    if not triton_kernels.AVAILABLE:
        pytest.skip(triton_kernels.UNAVAILABLE_REASON)
    for arch, names in aot_compile(tmp_path, ["basis_conv"], triton=aot_triton).items():
        assert all(name.startswith("basis_conv[") for name in names)
        for act in ("identity", "relu", "silu"):
            for res in (0, 1):
                assert any(f",{act},residual={res}," in name for name in names), (arch, act, res)
        for block_r in (16, 32, 64, 128, 256, 512):
            assert any(f"x{block_r}x32x" in name for name in names), (arch, block_r)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(4))
def test_triton_cuda(dtype, seed):
    rng = random.Random(seed)
    x, basis, coeff, scale, bias, stride, padding, dilation = _op_case(rng, dtype)
    ref = reference.basis_conv_norm_act(x.double(), basis.double(), coeff.double(), scale.double(),
                                        bias.double(), stride, padding, dilation, "silu")
    out = ak.basis_conv_norm_act(*(t.cuda() for t in (x, basis, coeff, scale, bias)), stride, padding, dilation,
                                 "silu", backend="triton")
    assert rel_err(out, ref) <= (1e-5 if dtype == torch.float32 else 1e-2)
