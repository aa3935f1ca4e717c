"""Depth under a latency budget (anydepth.budget): profiles measured, saved and reloaded, selection
(with an evaluation report's AP, and when nothing fits), and the frame-time controller under a
simulated load change. Timings are injected (a simulated clock / frame times): no test depends on
how fast or loaded this machine is."""
import dataclasses
import json
import random
import statistics
import types

import numpy as np
import pytest
import torch

import anydepth
from anydepth.budget import (BudgetError, DepthController, DepthProfile, ProfileEntry, default_profile_path,
                             load_profile, parse_depth, select_depth)
from anydepth.detection import Detections
from anydepth.evaluation import EvalReport, EvalRow

IMGSZ = 64
#: simulated profile: latency (ms) of each of the 9 ladder configurations, base -> full
LATENCIES = [14, 18, 22, 26, 30, 34, 38, 42, 46]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return anydepth.create_model("yolov12n-anydepth", num_classes=3).eval()


@pytest.fixture(scope="module")
def measured(model, tmp_path_factory):
    """A real (tiny) profile: two interleaved rounds, saved beside a weights file."""
    weights = tmp_path_factory.mktemp("weights") / "tiny.pt"
    anydepth.save(model, weights)
    profile = model.profile_depths(imgsz=IMGSZ, batch=1, device="cpu", form="eager", rounds=2, reps=1, warmup=1,
                                   weights=weights)
    return profile, weights


def simulated(profile: DepthProfile, latencies=LATENCIES) -> DepthProfile:
    """The measured profile with chosen latencies (p90 = 1.1 x median)."""
    assert len(profile.entries) == len(latencies)
    entries = [dataclasses.replace(e, median_ms=float(ms), p90_ms=1.1 * ms)
               for e, ms in zip(profile.entries, latencies)]
    return dataclasses.replace(profile, entries=entries, overhead_ms=0.0)


# -- profiles ---------------------------------------------------------------------------------------
def test_profile_measures_every_ladder_configuration_and_saves_beside_the_weights(model, measured):
    profile, weights = measured
    ladder = model.depth_configs((1, 3, IMGSZ, IMGSZ))
    assert profile.configs == ladder
    assert [e.name for e in profile.entries][0] == "base" and profile.entries[-1].name == "full"
    for e in profile.entries:
        assert e.samples == 2 and 0 < e.median_ms <= e.p90_ms
        assert e.gflops == pytest.approx(model.flops(e.config, (1, 3, IMGSZ, IMGSZ)) / 1e9)
    gflops = [e.gflops for e in profile.entries]
    assert gflops == sorted(gflops)
    assert (profile.model, profile.imgsz, profile.batch, profile.form, profile.device) == \
        ("yolov12n-anydepth", IMGSZ, 1, "eager", "cpu")
    assert profile.torch == torch.__version__ and profile.model_kwargs == {"num_classes": 3}
    assert profile.overhead_ms >= 0 and profile.frame_ms("base") == profile.latency("base") + profile.overhead_ms
    assert profile.path == default_profile_path(weights, IMGSZ, 1, "cpu", "eager")
    assert profile.path.startswith(str(weights.parent)) and "profile-eager-64-b1" in profile.path
    assert not model.training  # the model's mode is restored


def test_profile_round_trip_and_checks(model, measured, tmp_path):
    profile, _ = measured
    again = load_profile(profile.path, model=model, imgsz=IMGSZ, device="cpu", form="eager")
    assert again.entries == profile.entries and again.to_json() == profile.to_json()
    with open(profile.path) as f:
        raw = json.load(f)
    assert raw["format"] == "anydepth-depth-profile" and raw["device_name"] and raw["machine"]["torch"]
    with pytest.raises(ValueError, match="measured at imgsz 64, not 96"):
        load_profile(profile.path, model=model, imgsz=96)
    with pytest.raises(ValueError, match="options"):
        load_profile(profile.path, model=anydepth.create_model("yolov12n-anydepth", num_classes=5))
    other = types.SimpleNamespace(model_name="yolov12s-anydepth", model_kwargs={"num_classes": 3},
                                  depth_space=model.depth_space)
    with pytest.raises(ValueError, match="measured for 'yolov12n-anydepth', not for this model"):
        profile.check(other)
    with pytest.raises(ValueError, match="'eager' form, not 'fused'"):
        profile.check(form="fused")
    # corrupt and foreign files: clear errors naming the file
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw)[:200])
    with pytest.raises(ValueError, match="not readable JSON"):
        load_profile(bad)
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not an anydepth depth profile"):
        load_profile(bad)
    broken = dict(raw)
    del broken["imgsz"]
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="malformed: missing field 'imgsz'"):
        load_profile(bad)
    broken = json.loads(json.dumps(raw))
    broken["entries"][0]["median_ms"] = "fast"
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="malformed"):
        load_profile(bad)
    with pytest.raises(FileNotFoundError, match="no depth profile"):
        load_profile(tmp_path / "absent.json")


def test_profile_forms_and_bad_arguments(model):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        model.profile_depths(imgsz=IMGSZ, device="cpu", form="cuda-graph")
    with pytest.raises(ValueError, match="form must be one of"):
        model.profile_depths(imgsz=IMGSZ, form="onnx")
    with pytest.raises(ValueError, match="multiple of 32"):
        model.profile_depths(imgsz=70)
    with pytest.raises(ValueError, match="rounds must be an int"):
        model.profile_depths(imgsz=IMGSZ, rounds=0)
    lines = []
    fused = model.profile_depths(imgsz=IMGSZ, form="fused", rounds=1, reps=1, warmup=0, progress=lines.append)
    assert fused.form == "fused" and len(fused.entries) == 9 and fused.path is None
    assert any("round 1/1" in line for line in lines)
    assert not model.is_inference  # a copy was fused


# -- selection --------------------------------------------------------------------------------------
def test_select_depth_by_flops_and_nothing_fits(model, measured):
    profile = simulated(measured[0])
    codes = [e.code for e in profile.entries]
    assert select_depth(model, 40, profile).code == codes[6]       # 38 ms fits, 42 does not
    assert select_depth(model, 38, profile).code == codes[6]       # equal fits
    assert select_depth(model, 100, profile) == model.depth_space.full()
    assert select_depth(model, 14, profile) == model.depth_space.base()
    assert select_depth(model, 40, profile, stat="p90").code == codes[5]   # p90 = 1.1 x: 37.4 fits, 41.8 not
    assert model.select_depth(30, profile).code == codes[4]
    with_overhead = dataclasses.replace(profile, overhead_ms=5.0)              # predict() adds 5 ms a frame
    assert select_depth(model, 40, with_overhead, overhead=True).code == codes[5]   # 34 + 5 fits, 38 + 5 not
    with pytest.raises(BudgetError, match=r"5.00 ms predict overhead.* at 19.00 ms"):
        select_depth(model, 15, with_overhead, overhead=True)
    with pytest.raises(BudgetError, match=r"no configuration fits 10 ms .* fastest is base \(TTTTTTTT\) at 14.00 ms"):
        model.select_depth(10, profile)
    with pytest.raises(ValueError, match="budget_ms must be a positive number"):
        model.select_depth(0, profile)
    with pytest.raises(ValueError, match="stat must be one of"):
        model.select_depth(40, profile, stat="mean")


def test_select_depth_by_evaluation_report_ap(model, measured, tmp_path):
    profile = simulated(measured[0])
    codes = [e.code for e in profile.entries]
    # an evaluation where ladder4 (30 ms) beats everything deeper, and ladder6 lacks AP
    ap = [0.10, 0.20, 0.25, 0.30, 0.50, 0.40, None, 0.45, 0.48]
    rows = [EvalRow(name=e.name, code=e.code, metrics={"AP": a}) for e, a in zip(profile.entries, ap)]
    report = EvalReport(model="yolov12n-anydepth", dataset="d", num_images=1, imgsz=IMGSZ, batch_size=1, conf=0.001,
                        max_det=100, device="cpu", latency_batch=None, backend="pycocotools", rows=rows)
    path = tmp_path / "eval.json"
    report.to_json(path)
    for accuracy in (report, str(path), {c: a for c, a in zip(codes, ap)}):
        assert select_depth(model, 100, profile, accuracy=accuracy).code == codes[4]
        assert select_depth(model, 28, profile, accuracy=accuracy).code == codes[3]
    with pytest.raises(BudgetError, match="fastest is base"):
        select_depth(model, 5, profile, accuracy=report)
    with pytest.raises(ValueError, match="covers none of the profiled configurations"):
        select_depth(model, 40, profile, accuracy={"FFFF": 0.5})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not readable"):
        select_depth(model, 40, profile, accuracy=str(path))


def test_parse_depth_codes(model):
    full = model.depth_space.full()
    assert parse_depth(model, "base") == "base" and parse_depth(model, "0.5") == 0.5
    assert parse_depth(model, full.code) == full
    assert parse_depth(model, "ttttffff").code == "TTTTFFFF"
    with pytest.raises(ValueError, match="8 letters"):
        parse_depth(model, "TTF")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        parse_depth(model, "1.5")


# -- the controller -------------------------------------------------------------------------------
def simulate(controller, profile, frames=300, loaded=range(100, 200), load=1.5, jitter=0.04, spikes=()):
    """Feed ``frames`` simulated frame times: profiled latency x load x (1 +- jitter), seeded."""
    rng = random.Random(0)
    times, used = [], []
    for k in range(frames):
        config = controller.config
        ms = profile.latency(config) * (load if k in loaded else 1.0) * (1 + jitter * rng.uniform(-1, 1))
        if k in spikes:
            ms *= 3
        times.append(ms)
        used.append(config)
        controller.update(ms)
    return times, used


def p95(values):
    return float(np.percentile(values, 95))


def test_controller_holds_the_target_under_a_load_change(model, measured):
    profile = simulated(measured[0])
    target = 40.0
    ctl = DepthController(model, target, profile)
    codes = [e.code for e in profile.entries]
    assert ctl.config.code == codes[6]  # starts at the deepest configuration that fits by the profile
    times, used = simulate(ctl, profile)
    settle = 15
    for lo, hi in ((settle, 100), (100 + settle, 200), (200 + settle, 300)):
        assert abs(p95(times[lo:hi]) - target) <= 0.15 * target, (lo, hi, p95(times[lo:hi]))
    # under 1.5x load the deepest configuration that fits is ladder3 (26 ms x 1.5 = 39 ms)
    assert {c.code for c in used[100 + settle:200]} == {codes[3]}
    # when the load goes away the deepest configuration that fits comes back, and stays
    assert {c.code for c in used[200 + settle:]} == {codes[6]}
    assert used[-1] == select_depth(model, target, profile)
    # no oscillation: a handful of switches for two load changes, never back within the dwell time
    switches = [k for k in range(1, len(used)) if used[k] != used[k - 1]]
    assert ctl.switches == len(switches) <= 6, switches
    index = {c: i for i, c in enumerate(profile.configs)}
    for a, b in zip(switches, switches[1:]):
        up_a = index[used[a]] > index[used[a - 1]]
        up_b = index[used[b]] > index[used[b - 1]]
        assert up_a == up_b or b - a >= ctl.dwell, (a, b)


def test_controller_on_a_dense_noisy_ladder_does_not_chatter(model, measured):
    """A ladder whose neighbours differ by less than the frame-time noise (as yolov12n's on a busy
    CPU: 83 .. 115 ms, +-15% per frame): switches stay rare and never reverse on the next frame."""
    profile = simulated(measured[0], [83.0, 89.0, 90.4, 91.3, 95.9, 101.0, 105.0, 111.5, 115.3])
    ctl = DepthController(model, 115.0, profile)
    times, used = simulate(ctl, profile, load=1.3, jitter=0.15)
    switches = [k for k in range(1, len(used)) if used[k] != used[k - 1]]
    assert len(switches) <= 20, switches
    assert all(b - a >= 2 for a, b in zip(switches, switches[1:]))
    assert all(used[k + 1] != used[k - 1] for k in switches if k + 1 < len(used))
    for lo, hi in ((15, 100), (115, 200), (215, 300)):
        assert p95(times[lo:hi]) <= 1.2 * 115.0  # the noise alone is +-15%


def test_controller_counts_the_predict_overhead(model, measured):
    """Frames cost latency + overhead (10 ms here, the profile knows it): the load ratio is taken over
    that sum, so after a 1.5x load the deepest configuration whose whole frame fits comes back."""
    profile = dataclasses.replace(simulated(measured[0]), overhead_ms=10.0)
    ctl = DepthController(model, 50.0, profile)
    codes = [e.code for e in profile.entries]
    rng = random.Random(1)
    used, times = [], []
    for k in range(300):
        config = ctl.config
        ms = profile.frame_ms(config) * (1.5 if 100 <= k < 200 else 1.0) * (1 + 0.04 * rng.uniform(-1, 1))
        used.append(config.code)
        times.append(ms)
        ctl.update(ms)
    assert set(used[15:100]) == set(used[230:]) == {codes[6]}   # 38 + 10 = 48 fits 50, 42 + 10 does not
    assert set(used[115:200]) == {codes[2]}                      # 1.5 x (22 + 10) = 48
    assert abs(p95(times[115:200]) - 50.0) <= 0.15 * 50.0 and ctl.switches <= 6


def test_controller_ignores_single_slow_frames_and_recovers_from_overload(model, measured):
    profile = simulated(measured[0])
    ctl = DepthController(model, 40.0, profile)
    times, used = simulate(ctl, profile, frames=120, loaded=range(0), spikes=(30, 60, 61 + 20))
    assert ctl.switches == 0 and len(set(used)) == 1  # one 3x frame never moves the depth
    # a load that no configuration can meet: the fastest one, then back
    ctl = DepthController(model, 40.0, profile)
    times, used = simulate(ctl, profile, frames=150, loaded=range(20, 80), load=4.0)
    assert {c.code for c in used[40:80]} == {profile.entries[0].code}
    assert used[-1] == select_depth(model, 40.0, profile)


def test_controller_runs_the_model_with_an_injected_clock(model, measured):
    profile = simulated(measured[0])
    codes = [e.code for e in profile.entries]

    class SimClock:
        """Advances, at the end of each frame, by the simulated time of the configuration in use."""

        def __init__(self):
            self.t, self.calls, self.frame = 0.0, 0, 0

        def __call__(self):
            self.calls += 1
            if self.calls % 2 == 0:  # the end of a frame: 2x load from frame 10 on
                self.t += profile.latency(ctl.config) * (2.0 if self.frame >= 10 else 1.0) / 1e3
                self.frame += 1
            return self.t

    ctl = DepthController(model, 40.0, profile, clock=SimClock(), conf=0.0)
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    seen = []
    for _ in range(30):
        dets, config = ctl(image)
        assert isinstance(dets, Detections) and len(dets) > 0
        assert (dets.boxes[:, 2] <= 80).all() and (dets.boxes[:, 3] <= 48).all()
        assert ctl.history[-1].config == config
        seen.append(config.code)
    assert seen[0] == codes[6] and seen[-1] == codes[1]  # 2x: 18 ms x 2 = 36 ms fits, 22 x 2 = 44 does not
    assert ctl.history[0].frame_ms == pytest.approx(38.0)
    with pytest.raises(ValueError, match="frame_ms must be"):
        ctl.update(float("nan"))


def test_controller_checks_its_arguments(model, measured):
    profile = simulated(measured[0])
    with pytest.raises(ValueError, match="target_ms must be a positive number"):
        DepthController(model, -1, profile)
    with pytest.raises(ValueError, match="hysteresis"):
        DepthController(model, 40, profile, hysteresis=0.9)
    with pytest.raises(ValueError, match="options"):
        DepthController(anydepth.create_model("yolov12n-anydepth", num_classes=5), 40, profile)
    with pytest.raises(TypeError, match="DepthProfile"):
        DepthController(model, 40, {"entries": []})
    # accuracy from an evaluation: only configurations more accurate than every faster one
    ap = {e.code: a for e, a in zip(profile.entries, [0.1, 0.2, 0.3, 0.2, 0.4, 0.5, 0.45, 0.6, 0.7])}
    ctl = DepthController(model, 40, profile, accuracy=ap)
    assert [e.name for e in ctl.candidates] == ["base", "ladder1", "ladder2", "ladder4", "ladder5", "ladder7", "full"]
    assert ctl.config.code == profile.entries[5].code  # 34 ms: ladder6 (38 ms) is less accurate
    assert isinstance(ctl.candidates[0], ProfileEntry) and statistics.mean(ctl.latencies) > 0


def test_budget_demo_runs_and_reports_every_phase(model, measured):
    """The real-load demonstration's plumbing (phases, burner processes, both runs, the table);
    its numbers are measured wall-clock times and are not asserted."""
    from anydepth.budget import demo_under_load

    profile = measured[0]
    result = demo_under_load(model, profile, frames=30, burners=1, duty=0.2, settle=5)
    assert result["target_ms"] == round(1.1 * profile.frame_ms("full"), 1)
    for run in ("controller", "fixed"):
        assert [s["frames"] for s in result[run]] == [10, 10, 10]
        assert result[run][1]["phase"] == "1 burner process(es) at 20%"
        labels = {e.name for e in profile.entries}
        assert all(set(s["depths"]) <= labels and s["p95_ms"] >= s["median_ms"] > 0 for s in result[run])
    assert result["text"].count("\n| controller |") == 3 and result["text"].count("\n| fixed ") == 3
    with pytest.raises(ValueError, match="duty"):
        demo_under_load(model, profile, frames=30, duty=0)
