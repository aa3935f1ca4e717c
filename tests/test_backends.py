"""The backend table (anydepth_kernels.ops._backends): auto per device for every op, structured
reasons, availability() agreeing with resolve(), and the benchmarks / extension_info reading it."""
import importlib
import inspect
import itertools
import warnings

import pytest
import torch

import anydepth_kernels as ak
from anydepth_kernels import _ext, benchmark, benchmark_attention, benchmark_ms_deform, triton_kernels
from anydepth_kernels.ops import _backends as B

# The modules themselves (the packages re-export functions of the same names).
attn_ops = importlib.import_module("anydepth_kernels.ops.attention")
concat_conv = importlib.import_module("anydepth_kernels.ops.concat_conv")
basis_conv = importlib.import_module("anydepth_kernels.ops.basis_conv")
conv_norm_act = importlib.import_module("anydepth_kernels.ops.conv_norm_act")
ms_deform_attn = importlib.import_module("anydepth_kernels.ops.ms_deform_attn")

OPS = list(B.OPS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture
def state(monkeypatch):
    """Set what is compiled / installed / registered, as the checks read it at call time."""
    monkeypatch.setattr(_ext, "_warned", set())

    def set_state(cpu=True, cuda=True, triton=True, registered=True, interpret=False):
        monkeypatch.setattr(_ext, "CPU_AVAILABLE", cpu)
        monkeypatch.setattr(_ext, "_CPU_ERROR", None if cpu else "not compiled (test)")
        monkeypatch.setattr(_ext, "CUDA_COMPILED", cuda)
        monkeypatch.setattr(_ext, "_CUDA_ERROR", None if cuda else "not compiled: no nvcc (test)")
        monkeypatch.setattr(triton_kernels, "AVAILABLE", triton)
        monkeypatch.setattr(triton_kernels, "UNAVAILABLE_REASON", None if triton else "Triton is not usable (test)")
        monkeypatch.setattr(B, "_ext_registered", lambda schema, dev: registered)
        monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    return set_state


def test_names_are_the_public_tuples():
    assert conv_norm_act.BACKENDS == ak.BACKENDS == B.names("conv_norm_act") == B.names("scale_bias_act") \
        == ("auto", "reference", "cpp", "cuda", "triton")
    assert concat_conv.CONCAT_BACKENDS == B.names("concat_conv1x1") == ("auto", "reference", "cpp", "triton")
    assert basis_conv.BASIS_BACKENDS == B.names("basis_conv_norm_act") == ("auto", "reference", "cpp", "triton")
    assert (ms_deform_attn.MS_DEFORM_BACKENDS == B.names("ms_deform_attn")
            == ("auto", "reference", "cpp", "cuda", "triton"))
    assert attn_ops.ATTENTION_BACKENDS == B.names("attention") == B.names("area_attention") \
        == ("auto", "reference", "sdpa", "triton")


def test_input_precisions_and_interpreter_flag_defined_once():
    assert attn_ops.INPUT_PRECISIONS is B.INPUT_PRECISIONS == ("ieee", "tf32", "tf32x3")
    if not triton_kernels.AVAILABLE:
        pytest.skip(triton_kernels.UNAVAILABLE_REASON)
    ta, tc, tm = (importlib.import_module(f"anydepth_kernels.triton_kernels.{m}")
                  for m in ("attention", "conv_norm_act", "ms_deform_attn"))

    assert tc.INPUT_PRECISIONS is ta.INPUT_PRECISIONS is B.INPUT_PRECISIONS
    assert ta._INTERPRETED is tc._INTERPRETED and not hasattr(tm, "_INTERPRETED")
    assert ta.MAX_HEAD_DIM == B.TRITON_MAX_HEAD_DIM


def _expected_auto(op, dev, dtype, cpu, cuda, triton, registered, head_dim=32):
    """The selection rules as they were written in each op before the table."""
    triton_ok = triton and dtype != torch.float64
    if op in ("attention", "area_attention"):
        return "triton" if dev == "cuda" and triton_ok and 1 <= head_dim <= 128 else "sdpa"
    reg = registered if op in ("ms_deform_attn", "basis_conv_norm_act") else True
    if dev == "cpu":
        return "cpp" if cpu and reg else "reference"
    if op in ("concat_conv1x1", "basis_conv_norm_act"):
        return "triton" if triton_ok else "reference"
    if cuda and reg:
        return "cuda"
    return "triton" if triton_ok else "reference"


@pytest.mark.parametrize("op", OPS)
def test_auto_choice_per_device(op, state):
    for cpu, cuda, triton, registered, dtype, dev in itertools.product(
            (True, False), (True, False), (True, False), (True, False), DTYPES, ("cpu", "cuda")):
        state(cpu=cpu, cuda=cuda, triton=triton, registered=registered)
        want = _expected_auto(op, dev, dtype, cpu, cuda, triton, registered)
        assert B.auto_choice(op, dev, dtype, head_dim=32) == want, (op, dev, dtype, cpu, cuda, triton, registered)
        if dev == "cpu":  # resolve() on a real tensor agrees (auto never raises)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = B.resolve(op, torch.empty(1, dtype=dtype), "auto", head_dim=32)
            assert got.backend == want and got.requested == "auto"


@pytest.mark.parametrize("op", ["attention", "area_attention"])
def test_attention_auto_respects_head_dim(op, state):
    state()
    assert B.auto_choice(op, "cuda", torch.float16, head_dim=128) == "triton"
    assert B.auto_choice(op, "cuda", torch.float16, head_dim=160) == "sdpa"
    state(interpret=True)
    why = B.availability(op, "cpu", torch.float32, head_dim=160)["triton"]
    assert why.code == "head_dim" and "support head dims 1 to 128" in why.message


def test_unavailable_reasons_are_structured(state):
    state(cpu=False, cuda=False, triton=True)
    x = torch.randn(2)
    cases = [
        ("conv_norm_act", "cuda", x, {}, "device", "it runs on CUDA tensors, got cpu"),
        ("conv_norm_act", "cpp", x, {}, "not_compiled", "not compiled (test)"),
        ("conv_norm_act", "triton", x, {}, "device", "Triton runs on CUDA tensors (CPU tensors only under "
                                                     "TRITON_INTERPRET=1)"),
        ("conv_norm_act", "triton", x.double(), {}, "dtype",
         "the Triton kernels support float32, float16 and bfloat16, not float64"),
        ("attention", "triton", x.double(), {"head_dim": 8}, "dtype",
         "it supports float32, float16 and bfloat16, not torch.float64"),
        ("basis_conv_norm_act", "triton", x, {"rank": 513}, "device", "Triton runs on CUDA tensors (CPU tensors "
                                                                       "only under TRITON_INTERPRET=1)"),
    ]
    for op, backend, t, ctx, code, message in cases:
        with pytest.raises(B.BackendUnavailable) as info:
            B.resolve(op, t, backend, **ctx)
        err = info.value
        assert isinstance(err, RuntimeError)
        assert (err.reason.code, err.reason.message, err.backend) == (code, message, backend)
        assert str(err) == f"{B.OPS[op].name}: backend {backend!r} is not available: {message}"
        assert B.availability(op, "cpu", t.dtype, **ctx)[backend] == err.reason
    state(triton=False)
    why = B.availability("concat_conv1x1", "cpu", torch.float32)["triton"]
    assert why.code == "triton_missing" and why.message == "Triton is not usable (test)"
    state(registered=False)
    why = B.availability("ms_deform_attn", "cpu", torch.float32)["cpp"]
    assert why.code == "stale_extension" and why.message == B.STALE_EXTENSION
    state(interpret=True)
    why = B.availability("basis_conv_norm_act", "cpu", torch.float32, rank=513)["triton"]
    assert why.code == "rank" and "supports 1 to 512 basis filters" in why.message
    assert B.availability("basis_conv_norm_act", "cpu", torch.float32, rank=512)["triton"] is None


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"anydepth.concat_conv1x1: unknown backend 'cuda'; expected one of "
                                         r"\('auto', 'reference', 'cpp', 'triton'\)"):
        B.resolve("concat_conv1x1", torch.empty(1), "cuda")


@pytest.mark.parametrize("op", OPS)
def test_availability_matches_resolve(op, state):
    for cpu, triton, registered, interpret, dtype, hd in itertools.product(
            (True, False), (True, False), (True, False), (True, False), DTYPES, (32, 160)):
        state(cpu=cpu, triton=triton, registered=registered, interpret=interpret)
        avail = B.availability(op, "cpu", dtype, head_dim=hd)
        assert list(avail) == list(B.names(op)[1:])
        t = torch.empty(1, dtype=dtype)
        for backend, why in avail.items():
            if why is None:
                assert B.resolve(op, t, backend, head_dim=hd).backend == backend
            else:
                with pytest.raises(B.BackendUnavailable) as info:
                    B.resolve(op, t, backend, head_dim=hd)
                assert info.value.reason == why


def test_fallback_warning_says_why(state):
    x = torch.randn(1)
    state(cpu=False)
    with pytest.warns(RuntimeWarning, match="conv_norm_act on cpu runs the eager reference "
                                            r"\(no compiled kernel for this device\)"):
        assert B.resolve("conv_norm_act", x, "auto").backend == "reference"
    state(registered=False)
    with pytest.warns(RuntimeWarning, match="ms_deform_attn on cpu runs the eager reference "
                                            r"\(the loaded compiled extension predates this op"):
        choice = B.resolve("ms_deform_attn", x, "auto")
    assert choice.backend == "reference" and choice.rejected["cpp"].code == "stale_extension"
    state(cpu=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # attention falls back to SDPA silently
        assert B.resolve("attention", x, "auto", head_dim=4).backend == "sdpa"


def test_wrappers_keep_their_signatures(state):
    state()
    x = torch.randn(1)
    assert conv_norm_act.select_backend("t", x, "auto") == "cpp"
    assert concat_conv._select(x, "reference") == "reference"
    assert ms_deform_attn._resolve(x, "auto") == "cpp"
    assert attn_ops.resolve_backend("t", x, 32, "auto") == "sdpa"
    with pytest.raises(RuntimeError, match=r"^t: backend 'cuda' is not available: it runs on CUDA tensors, got cpu$"):
        conv_norm_act.select_backend("t", x, "cuda")
    with pytest.raises(RuntimeError, match=r"^anydepth.area_attention: backend 'triton'"):
        attn_ops.resolve_backend(attn_ops._AREA_OP, x, 32, "triton")


def test_benchmarks_read_the_table_not_exception_text(state, monkeypatch):
    for fn in (benchmark.available_backends, benchmark.concat_backends, benchmark.bench_backends,
               benchmark_attention.attention_backends, benchmark_ms_deform.ms_deform_backends):
        src = inspect.getsource(fn)
        assert "not available" not in src and "except" not in src, fn.__name__

    def no_resolve(*a, **k):
        raise AssertionError("benchmarks must not call resolve()")

    monkeypatch.setattr(B, "resolve", no_resolve)
    cpu = torch.device("cpu")
    for cpu_ext in (True, False):
        state(cpu=cpu_ext, interpret=True)
        for fn, op, ctx in ((benchmark.available_backends, "conv_norm_act", {}),
                            (benchmark.concat_backends, "concat_conv1x1", {}),
                            (benchmark_attention.attention_backends, "attention", {"head_dim": 32}),
                            (benchmark_ms_deform.ms_deform_backends, "ms_deform_attn", {})):
            got = fn(cpu, torch.float32)
            avail = B.availability(op, cpu, torch.float32, **ctx)
            assert list(got) == list(avail)
            for name, why in got.items():
                if name == "triton":  # timed on GPUs only, whatever the interpreter allows
                    assert why == benchmark.TRITON_NEEDS_GPU
                else:
                    assert why == (None if avail[name] is None else avail[name].message)
                    assert why is None or isinstance(why, str)


def test_extension_info_reads_the_table():
    info = ak.extension_info()["ops"]
    assert set(info) == set(B.OPS)
    for op, entry in info.items():
        assert list(entry["backends"]) == list(B.names(op)[1:])
        avail = B.availability(op, "cpu", torch.float32)
        assert entry["cpu"]["available"] == {k: (None if v is None else v.message) for k, v in avail.items()}
        assert entry["cpu"]["auto"] == B.auto_choice(op, "cpu", torch.float32)
        if not torch.cuda.is_available():
            assert entry["cuda"]["auto"] is None
            assert set(entry["cuda"]["available"].values()) == {"no CUDA device is visible"}
    assert info["attention"]["backends"]["triton"] == {"devices": ["cuda"], "interpreter": True,
                                                       "dtypes": ["float32", "float16", "bfloat16"]}
