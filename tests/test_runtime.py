"""nestsparse.runtime (stages, latency profiles, the rerouting executor, QoS), nestsparse.apps.scenarios and the
``qos`` command.

Nothing here asserts on real time: the executor's decisions are checked against a fake clock driven by
level-aware "tick" modules (each advances the clock by its level's duration) or by a scripted interference
hook, so every elapsed time, ratio and prediction is an exact binary fraction and the expected levels,
switches and latencies are computed by hand or by an independent re-implementation of the documented rule.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from torch import nn

import nestsparse
from nestsparse.apps import cli, models, qos, scenarios
from nestsparse.apps.scenarios import CpuLoad, Scenario, Slowdown, Trace, make_scenario
from nestsparse.nn import LevelAware, LevelBatchNorm, NestedSparseConv2d
from nestsparse.pruning import apply_level_masks
from nestsparse.runtime import (
    POLICIES,
    PROFILE_FORMAT,
    LatencyProfile,
    ProfileError,
    QosResult,
    ReroutingExecutor,
    auto_stages,
    deadline_from,
    plot_latency_cdf,
    qos_table,
    run_qos,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LEVELS = (0.3, 0.13, 0.05)


# ============================================================================================ fake clock


class FakeClock:
    """Seconds that pass only when a module (or a hook) says so; ``log`` records (tick, level) as they run."""

    def __init__(self):
        self.t = 0.0
        self.log = []

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def input_factor(x) -> float:
    """The tick models' input is a one-element tensor holding a slowdown factor for the whole inference."""
    return float(x.reshape(-1)[0])


class Tick(LevelAware, nn.Module):
    """A level-aware module that takes ``durations[level]`` x ``factor`` x the input's factor on the clock."""

    def __init__(self, clock: FakeClock, durations):
        super().__init__()
        self.clock, self.durations, self.factor, self.tag = clock, tuple(durations), 1.0, "?"
        self.level = 0

    @property
    def num_levels(self) -> int:
        return len(self.durations)

    def forward(self, x):
        self.clock.advance(self.durations[self.level] * self.factor * input_factor(x))
        self.clock.log.append((self.tag, self.level))
        return x


class Stem(nn.Module):
    """Work in no stage (segment 0): 1 s x the input's factor at every level."""

    def __init__(self, clock: FakeClock):
        super().__init__()
        self.clock = clock

    def forward(self, x):
        self.clock.advance(1.0 * input_factor(x))
        return x


class Block(nn.Module):
    """The shape of a residual block: the shortcut ``down`` is registered after ``a`` and ``b`` but runs first."""

    def __init__(self, clock: FakeClock, stage=(4.0, 2.0, 1.0)):
        super().__init__()
        self.a = Tick(clock, [t / 4 for t in stage])
        self.b = Tick(clock, [t / 2 for t in stage])
        self.down = Tick(clock, [t / 4 for t in stage])

    def forward(self, x):
        identity = self.down(x)
        return (self.b(self.a(x)) + identity) / 2


def tick_model(clock: FakeClock, stage=(4.0, 2.0, 1.0)) -> nn.Sequential:
    """Stem (1 s), then four stages of ``stage[l]`` s at level l: ticks "1", "2", the block "3", tick "4".
    By default totals are 17 s at level 0, 9 s at level 1, 5 s at level 2."""
    model = nn.Sequential(Stem(clock), Tick(clock, stage), Tick(clock, stage), Block(clock, stage), Tick(clock, stage))
    for name, m in model.named_modules():
        if isinstance(m, Tick):
            m.tag = name
    return model


TICK_STAGES = ["1", "2", "3", "4"]


def tick_times(stage=(4.0, 2.0, 1.0)) -> list[list[float]]:
    """The exact profile of tick_model(clock, stage)."""
    return [[1.0] * len(stage)] + [list(stage) for _ in TICK_STAGES]


TICK_TIMES = tick_times()


def make_profile(stages, times, totals=None) -> LatencyProfile:
    """A hand-made profile: ``times[s][l]`` seconds, no spread, one total sample per level (the sum)."""
    times = [list(map(float, row)) for row in times]
    L = len(times[0])
    if totals is None:
        totals = [[sum(row[lvl] for row in times)] for lvl in range(L)]
    return LatencyProfile(list(stages), times, [[0.0] * L for _ in times], totals)


def one(factor: float = 1.0) -> torch.Tensor:
    return torch.tensor([float(factor)])


def slow_from(model: nn.Sequential, stage: int, factor: float) -> None:
    """Every tick of tick_model's stages ``stage``.. runs ``factor`` times slower than profiled."""
    for k, m in enumerate(list(model)[1:]):
        for t in m.modules():
            if isinstance(t, Tick):
                t.factor = factor if k >= stage else 1.0


@pytest.fixture
def ticks():
    """(clock, model, executor with the exact hand-made profile)."""
    clock = FakeClock()
    model = tick_model(clock)
    with ReroutingExecutor(model, "block", make_profile(TICK_STAGES, TICK_TIMES), clock=clock) as ex:
        yield clock, model, ex


def reference_decisions(prof, actual, deadline, margin):
    """The documented rule, re-implemented: at checkpoint k (segments 0..k done) predict elapsed + ratio x the
    profiled remaining segments at the current level, ratio = elapsed / profiled time of the segments so far
    at the levels they ran; if that exceeds deadline x (1 - margin), switch the remaining stages to the densest
    sparser level that fits, the sparsest if none does. ``actual[s][l]``: real time of segment s at level l.
    Returns (levels of the stages, switches, segment times)."""
    S, L = len(prof) - 1, len(prof[0])
    budget = deadline * (1 - margin)

    def rest(s, lvl):
        return sum(prof[i][lvl] for i in range(s, S + 1))

    t = expected = 0.0
    level = seg_level = 0
    levels, switches, segs = [], [], []
    for k in range(S):
        seg = actual[k][seg_level]
        t += seg
        expected += prof[k][seg_level]
        segs.append(seg)
        ratio = t / expected
        if level < L - 1 and t + ratio * rest(k + 1, level) > budget:
            fits = [c for c in range(level + 1, L) if t + ratio * rest(k + 1, c) <= budget]
            level = fits[0] if fits else L - 1
            switches.append((k, level))
        levels.append(level)
        seg_level = level
    segs.append(actual[S][seg_level])
    return levels, switches, segs


# ================================================================================ 1. decisions (fake clock)


def test_on_time_never_switches(ticks):
    clock, model, ex = ticks
    inf = ex(one(), deadline=20.0)
    assert inf.levels == (0, 0, 0, 0) and inf.switches == []
    assert inf.segment_times == [1.0, 4.0, 4.0, 4.0, 4.0]
    assert inf.latency == 17.0 and inf.met and inf.deadline == 20.0 and inf.final_level == 0
    assert inf.overhead == 0.0  # the fake clock does not move while deciding
    assert {lvl for _, lvl in clock.log} == {0}
    assert torch.equal(inf.output, one())


def test_deadline_exactly_met_does_not_switch(ticks):
    _, _, ex = ticks
    inf = ex(one(), deadline=17.0)  # prediction 17 <= budget 17
    assert inf.switches == [] and inf.latency == 17.0 and inf.met


def test_slow_stages_switch_at_the_first_late_checkpoint_then_again(ticks):
    """Stages 1.. run 2x slower than profiled, deadline 20 s. By hand:
    cp0: elapsed 1, ratio 1, 1 + 16 = 17 <= 20.  cp1: 5, ratio 1, 5 + 12 = 17.
    cp2: 13 (stage 1 took 8), ratio 13/9: 13 + 13/9 x 8 = 24.6 > 20; level 1: 13 + 13/9 x 4 = 18.8 fits -> 1.
    cp3: 17 (block: 2 x 2), ratio 17/11: 17 + 17/11 x 2 = 20.09 > 20; no level between -> 2.  End: 17 + 2 = 19."""
    clock, model, ex = ticks
    slow_from(model, 1, 2.0)
    inf = ex(one(), deadline=20.0)
    assert inf.switches == [(2, 1), (3, 2)]
    assert inf.levels == (0, 0, 1, 2)
    assert inf.segment_times == [1.0, 4.0, 8.0, 4.0, 2.0]
    assert inf.latency == 19.0 and inf.met
    # the modules really ran at those levels, the block's shortcut first
    assert clock.log == [("1", 0), ("2", 0), ("3.down", 1), ("3.a", 1), ("3.b", 1), ("4", 2)]


def test_switches_to_the_sparsest_when_no_level_fits(ticks):
    """4x slower from stage 1: at cp2 elapsed is 21 > 20 already, so nothing fits -> level 2; no later
    decision (already sparsest); latency 1 + 4 + 16 + 4 + 4 = 29, missed."""
    clock, model, ex = ticks
    slow_from(model, 1, 4.0)
    inf = ex(one(), deadline=20.0)
    assert inf.switches == [(2, 2)] and inf.levels == (0, 0, 2, 2)
    assert inf.segment_times == [1.0, 4.0, 16.0, 4.0, 4.0]
    assert inf.latency == 29.0 and not inf.met


def test_switch_at_the_first_checkpoint(ticks):
    """Deadline 16.5 < 17: at cp0 (elapsed 1, ratio 1) 1 + 16 > 16.5, level 1: 1 + 8 fits."""
    _, _, ex = ticks
    inf = ex(one(), deadline=16.5)
    assert inf.switches == [(0, 1)] and inf.levels == (1, 1, 1, 1)
    assert inf.latency == 9.0 and inf.met


def test_margin_keeps_a_share_of_the_deadline(ticks):
    clock, model, _ = ticks
    with ReroutingExecutor(model, "block", make_profile(TICK_STAGES, TICK_TIMES), clock=clock, margin=0.25) as ex:
        inf = ex(one(), deadline=20.0)  # budget 15: 17 does not fit, 9 does
        assert inf.switches == [(0, 1)] and inf.latency == 9.0
        inf = ex(one(), deadline=24.0)  # budget 18
        assert inf.switches == [] and inf.latency == 17.0


def test_switches_to_the_densest_of_several_levels_that_fit():
    """Five levels, stages of 8 / 6 / 4 / 2 / 1 s, 2x slower from stage 1, deadline 38 s. cp2: elapsed 25, ratio
    25/17; level 0: 25 + 25/17 x 16 = 48.5, level 1: 42.6 (too late), level 2: 36.8 and level 3: 30.9 fit -> 2.
    Block at level 2: 8 s. cp3: elapsed 33, ratio 33/21: level 2: 33 + 33/21 x 4 = 39.3 > 38; level 3: 36.1 -> 3."""
    clock = FakeClock()
    stage = (8.0, 6.0, 4.0, 2.0, 1.0)
    model = tick_model(clock, stage)
    with ReroutingExecutor(model, "block", make_profile(TICK_STAGES, tick_times(stage)), clock=clock) as ex:
        slow_from(model, 1, 2.0)
        inf = ex(one(), deadline=38.0)
    assert inf.switches == [(2, 2), (3, 3)] and inf.levels == (0, 0, 2, 3)
    assert inf.segment_times == [1.0, 8.0, 16.0, 8.0, 4.0] and inf.latency == 37.0 and inf.met


@pytest.mark.parametrize("stage", [(4.0, 2.0, 1.0), (8.0, 6.0, 4.0, 2.0, 1.0)], ids=["3-levels", "5-levels"])
@pytest.mark.parametrize("factor", [1.0, 1.5, 2.0, 3.0, 4.0], ids=lambda f: f"x{f:g}")
@pytest.mark.parametrize("from_stage", [0, 1, 2, 3], ids=lambda j: f"from-stage{j}")
def test_decisions_match_the_documented_rule(factor, from_stage, stage):
    clock = FakeClock()
    model = tick_model(clock, stage)
    prof = tick_times(stage)
    ex = ReroutingExecutor(model, "block", make_profile(TICK_STAGES, prof), clock=clock)
    slow_from(model, from_stage, factor)
    actual = [[t * (factor if s >= from_stage + 1 else 1.0) for t in row] for s, row in enumerate(prof)]
    for margin in (0.0, 0.1):
        ex.margin = margin
        for deadline in (6.0, 10.0, 12.0, 16.5, 17.0, 18.5, 20.0, 26.0, 33.0, 38.0, 40.0, 50.0, 80.0):
            clock.t, clock.log = 0.0, []
            levels, switches, segs = reference_decisions(prof, actual, deadline, margin)
            inf = ex(one(), deadline=deadline)
            case = f"deadline {deadline}, margin {margin}"
            assert list(inf.levels) == levels, case
            assert inf.switches == switches, case
            assert inf.segment_times == segs, case
            assert inf.latency == sum(segs) and inf.met == (sum(segs) <= deadline), case
            assert all(a <= b for a, b in zip(inf.levels, inf.levels[1:])), f"{case}: a switch to a denser level"
            assert all(new > old for (_, new), old in zip(switches, [0] + [n for _, n in switches])), case
            ran = dict(clock.log)
            assert [ran[n] for n in ("1", "2", "3.a", "4")] == list(inf.levels), case
    ex.close()


@pytest.mark.parametrize("policy, level", [("static-densest", 0), ("static:1", 1), ("static-sparsest", 2)])
def test_static_policies_never_switch(ticks, policy, level):
    clock, model, ex = ticks
    slow_from(model, 0, 8.0)
    inf = ex(one(), deadline=2.0, policy=policy)
    assert inf.switches == [] and inf.levels == (level,) * 4
    assert {lvl for _, lvl in clock.log} == {level}
    assert inf.latency == 1.0 + 8.0 * 4 * TICK_TIMES[1][level] and not inf.met


def test_static_policy_needs_no_profile_and_no_deadline():
    clock = FakeClock()
    with ReroutingExecutor(tick_model(clock), clock=clock) as ex:
        assert ex.profile is None
        inf = ex(one(), policy="static:2")
        assert inf.levels == (2, 2, 2, 2) and inf.latency == 5.0 and inf.met and inf.deadline is None


def test_choose_once_picks_the_densest_level_whose_scaled_total_fits(ticks):
    clock, model, ex = ticks
    # no history: ratio 1; totals 17 / 9 / 5
    assert ex(one(), deadline=20.0, policy="choose-once").levels == (0,) * 4
    assert ex(one(), deadline=10.0, policy="choose-once").levels == (1,) * 4
    assert ex(one(), deadline=4.0, policy="choose-once").levels == (2,) * 4  # none fits: sparsest
    # an inference 2x slower than profiled (33 s for 17): the next choice scales the totals by 33/17
    slow_from(model, 0, 2.0)
    prev = ex(one(), deadline=100.0, policy="static-densest")
    assert prev.latency == 33.0
    slow_from(model, 0, 1.0)
    inf = ex(one(), deadline=20.0, policy="choose-once")  # 33 > 20, 33/17 x 9 = 17.5 fits
    assert inf.levels == (1,) * 4 and inf.switches == [] and inf.latency == 9.0
    # that one ran as profiled: ratio back to 1
    assert ex(one(), deadline=17.0, policy="choose-once").levels == (0,) * 4


def test_choose_once_with_margin(ticks):
    clock, model, _ = ticks
    with ReroutingExecutor(model, "block", make_profile(TICK_STAGES, TICK_TIMES), clock=clock, margin=0.5) as ex:
        assert ex(one(), deadline=20.0, policy="choose-once").levels == (1,) * 4  # budget 10
        assert ex(one(), deadline=34.0, policy="choose-once").levels == (0,) * 4  # budget 17


def test_refresh_moves_the_profile_toward_what_ran(ticks):
    clock, model, _ = ticks
    prof = make_profile(TICK_STAGES, TICK_TIMES)
    with ReroutingExecutor(model, "block", prof, clock=clock, refresh=0.25) as ex:
        slow_from(model, 2, 2.0)  # stages 2, 3: 8 s instead of 4
        ex(one(), policy="static-densest")
    assert [row[0] for row in prof.times] == [1.0, 4.0, 4.0, 5.0, 5.0]  # 0.75 x 4 + 0.25 x 8
    assert [row[1:] for row in prof.times] == [row[1:] for row in TICK_TIMES]
    assert prof.total(0) == 19.0


def test_ratio_after_a_switch_at_the_first_checkpoint():
    """Segment 0 ran at the start level even when the first checkpoint switches: the slowdown ratio of the
    next choose-once (and the refresh) must read that profile cell, not the new level's."""
    clock = FakeClock()
    times = [[1.0, 2.0, 2.0]] + TICK_TIMES[1:]  # segment 0 profiled a little slower at levels 1, 2
    with ReroutingExecutor(tick_model(clock), profile=make_profile(TICK_STAGES, times), clock=clock) as ex:
        inf = ex(one(), deadline=16.5)  # cp0: 1 + 16 > 16.5 -> level 1; every segment as profiled
        assert inf.switches == [(0, 1)] and inf.segment_times == [1.0, 2.0, 2.0, 2.0, 2.0]
        # everything ran exactly as profiled (segment 0 at the start level 0): the ratio is 1, and 17 > 16
        assert ex(one(), deadline=16.0, policy="choose-once").levels == (1,) * 4
    prof = make_profile(TICK_STAGES, times)
    with ReroutingExecutor(tick_model(clock), profile=prof, clock=clock, refresh=0.5) as ex:
        ex(one(), deadline=16.5)
    assert prof.times[0] == [1.0, 2.0, 2.0]  # measured 1 s at level 0: unchanged
    assert [row[1] for row in prof.times[1:]] == [2.0] * 4


def test_interference_is_called_once_per_segment_before_the_clock_is_read_again(ticks):
    clock, model, ex = ticks
    calls = []

    def interference(start, end):
        calls.append((start, end))
        clock.advance(0.5)  # each segment is stretched by 0.5 s

    ex.interference = interference
    inf = ex(one(), policy="static-densest")
    assert calls == [(0.0, 1.0), (1.5, 5.5), (6.0, 10.0), (10.5, 14.5), (15.0, 19.0)]
    assert inf.segment_times == [1.5, 4.5, 4.5, 4.5, 4.5] and inf.latency == 19.5


# ---- the slowdown scenario's stretch, on a fake time

STEP = 1 / 64


@pytest.fixture
def fake_scenario_time(monkeypatch):
    """scenarios' time.perf_counter becomes a fake clock that moves by STEP at every read (so a busy-wait ends)."""
    clock = FakeClock()

    def perf_counter():
        clock.advance(STEP)
        return clock.t

    monkeypatch.setattr(scenarios, "time", types.SimpleNamespace(perf_counter=perf_counter, sleep=time.sleep))
    return clock


def test_slowdown_stretch_waits_factor_minus_one_times_the_segment(fake_scenario_time):
    sc = Slowdown(seed=0)
    assert sc.factor == 1.0
    sc.stretch(0.0, 2.0)
    assert fake_scenario_time.t == 0.0  # factor 1: no wait, not even a clock read
    sc.apply(2.5)
    assert sc.factor == 2.5
    sc.stretch(3.0, 5.0)  # 1.5 x 2 s, plus the first read's step
    assert fake_scenario_time.t == 3.0 + STEP
    sc.apply(0.0)  # a quiet period
    assert sc.factor == 1.0


def test_slowdown_stretch_through_the_executor(fake_scenario_time):
    """The executor's interference hook stretches every segment of a loaded period by the trace's factor."""
    clock = fake_scenario_time
    model = tick_model(clock)
    sc = Slowdown(seed=0)
    with ReroutingExecutor(
        model, "block", make_profile(TICK_STAGES, TICK_TIMES), clock=clock, interference=sc.stretch
    ) as ex:
        inf = ex(one(), deadline=20.0)
        assert inf.segment_times == [1.0, 4.0, 4.0, 4.0, 4.0] and inf.switches == []
        sc.apply(2.0)
        inf = ex(one(), deadline=40.0, policy="static-densest")
        assert inf.segment_times == [2.0 + STEP, 8.0 + STEP, 8.0 + STEP, 8.0 + STEP, 8.0 + STEP]
        inf = ex(one(), deadline=20.0)  # cp0: 2 + 2 x 16 > 20, level 1: 2 + 2 x 8 = 18 fits
        assert inf.switches[0] == (0, 1)


def test_slowdown_start_installs_the_stretch_until_stop():
    clock = FakeClock()
    ex = ReroutingExecutor(tick_model(clock), clock=clock)
    sc = Slowdown(seed=0, mean_off=100.0)
    sc.start(ex)
    try:
        assert ex.interference == sc.stretch
    finally:
        sc.stop()
        ex.close()
    assert ex.interference is None


def test_slowdown_start_needs_the_executor_and_stop_restores_it():
    sc = Slowdown(seed=0, mean_off=100.0)
    with pytest.raises(ValueError, match="acts through the executor"):
        sc.start(None)
    clock = FakeClock()
    with ReroutingExecutor(tick_model(clock), clock=clock) as ex:
        sc.start(ex)
        sc.stop()
        assert ex.interference is None and sc._thread is None


# ---- traces


def test_trace_is_reproducible_from_its_seed():
    a, b, c = Trace(7, 0.2, 0.5, (1.5, 2.5)), Trace(7, 0.2, 0.5, (1.5, 2.5)), Trace(8, 0.2, 0.5, (1.5, 2.5))
    assert a.changes(20.0) == b.changes(20.0)
    assert a.changes(20.0) != c.changes(20.0)
    # asking in a different order gives the same trace
    d = Trace(7, 0.2, 0.5, (1.5, 2.5))
    d.value(3.0)
    assert d.changes(20.0) == a.changes(20.0)


def test_trace_values_alternate_and_match_changes():
    tr = Trace(3, 0.2, 0.5, (1.5, 2.5))
    ch = tr.changes(30.0)
    assert len(ch) > 10 and ch[0] == (0.0, 0.0)
    times = [t for t, _ in ch]
    assert times == sorted(times) and len(set(times)) == len(times)
    for i, (t, v) in enumerate(ch):
        assert (v == 0.0) == (i % 2 == 0) and (v == 0.0 or v in (1.5, 2.5))
        assert tr.value(t) == v  # a change holds from its time on
        nxt = ch[i + 1][0] if i + 1 < len(ch) else 30.0
        assert tr.value((t + nxt) / 2) == v
    share = tr.loaded_share(30.0)
    manual = sum(min(b[0], 30.0) - a[0] for a, b in zip(ch, ch[1:] + [(30.0, 0.0)]) if a[1] > 0) / 30.0
    assert 0.0 < share < 1.0 and share == pytest.approx(manual)
    assert 0.0 <= Trace(1, 0.01, 10.0, (2,)).loaded_share(5.0) < 0.1 <= Trace(1, 10.0, 0.01, (2,)).loaded_share(5.0)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 0.0, 1.0, (1,)), "positive"),
        ((0, 1.0, -1.0, (1,)), "positive"),
        ((0, 1.0, 1.0, ()), "levels must not be empty"),
    ],
    ids=["mean_on-0", "mean_off-negative", "no-levels"],
)
def test_trace_refuses_bad_parameters(args, match):
    with pytest.raises(ValueError, match=match):
        Trace(*args)


def test_make_scenario():
    assert type(make_scenario("none")) is Scenario and make_scenario("none").name == "none"
    sc = make_scenario("slowdown", seed=5, levels=(3.0,))
    assert isinstance(sc, Slowdown) and sc.seed == 5 and sc.trace.levels == (3.0,)
    assert "seed 5" in sc.describe()
    with pytest.raises(ValueError, match=r"unknown scenario 'storm'.*fluctuating"):
        make_scenario("storm")
    with pytest.raises(ValueError, match="factors must be >= 1"):
        Slowdown(levels=(0.5,))
    with make_scenario("none") as quiet:  # start / stop do nothing
        assert quiet.trace is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_gpu_stream_needs_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        make_scenario("gpu-stream")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rerouting_and_gpu_stream():
    model = resnet("converted-plain-bn").cuda()
    x = torch.randn(2, 1, 8, 8, device="cuda")
    sc = make_scenario("gpu-stream", seed=1, mean_on=0.05, mean_off=0.05)
    with ReroutingExecutor(model, "block") as ex:
        profile = ex.measure_profile(x, warmup=1, repeats=3, progress=False)
        for lvl in range(3):
            nestsparse.set_level(model, lvl)
            with torch.no_grad():
                ref = model(x)
            torch.testing.assert_close(ex(x, policy=f"static:{lvl}").output, ref, rtol=0, atol=0)
        results = run_qos(ex, lambda i: (x,), 20, 2 * profile.percentile(0, 50), scenario=sc, progress=False)
    assert set(results) == set(POLICIES) and all(r.n == 20 for r in results.values())
    assert sc._worker is None and sc._thread is None  # stopped


# ======================================================= 2. a rerouted run = the same per-stage levels, static


def resnet(kind: str) -> nn.Module:
    """resnet_small (width 8, 2 blocks per stage, downsampling shortcuts in stages 2 and 3), eval mode:
    "converted" (nested sparse + LevelBatchNorm), "converted-plain-bn" (nested sparse, ordinary BatchNorm)
    or "masked" (dense with level masks + LevelBatchNorm)."""
    torch.manual_seed(0)
    model = models.resnet_small(width=8)
    if kind != "converted-plain-bn":
        nestsparse.level_batchnorms(model, len(LEVELS))
    with torch.no_grad():  # non-trivial statistics, different per level
        for m in model.modules():
            if isinstance(m, (LevelBatchNorm, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    tags = nestsparse.model_tags(model, LEVELS, skip=models.dense_layers(model))
    if kind == "masked":
        return apply_level_masks(model, tags, len(LEVELS)).eval()
    return nestsparse.convert(model, tags, densities=LEVELS).eval()


class Script:
    """Interference hook that makes segment i last ``queue[i]`` s on the fake clock (1 s once it runs out)."""

    def __init__(self, clock: FakeClock):
        self.clock, self.queue = clock, []

    def __call__(self, start, end):
        self.clock.advance(self.queue.pop(0) if self.queue else 1.0)


def run_with_stage_levels(model, heads, levels, x):
    """model(x) with every level-aware module that runs after stage ``heads[k]`` starts (and before the next
    head) at ``levels[k]``, those before the first head at levels[0]: the per-stage levels, without an executor."""
    state = {"k": 0}
    handles = [
        model.get_submodule(h).register_forward_pre_hook(lambda m, a, k=k: state.update(k=k))
        for k, h in enumerate(heads)
    ]
    handles += [
        m.register_forward_pre_hook(lambda m, a: setattr(m, "level", levels[state["k"]]))
        for m in model.modules()
        if isinstance(m, LevelAware)
    ]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    "kind, granularity",
    [
        ("converted", "block"),
        ("converted-plain-bn", "block"),
        ("converted-plain-bn", "layer"),
        ("masked", "block"),
        pytest.param("converted", "layer"),
        pytest.param("masked", "layer"),
    ],
)
def test_rerouted_output_equals_the_same_levels_run_statically(kind, granularity):
    model = resnet(kind)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    clock = FakeClock()
    script = Script(clock)
    ex = ReroutingExecutor(model, granularity, clock=clock, interference=script)
    ex.measure_profile(x, warmup=0, repeats=1, progress=False)  # learns the execution order
    S = len(ex.order)
    ex.set_profile(make_profile(ex.order, [[1.0, 0.5, 0.25]] * (S + 1)))
    # segments 0..j-1 on time, segment j (stage j-1) 1 s late, later ones as profiled at level 1; deadline
    # S + 1.5: checkpoints before j predict S + 1 (fits), checkpoint j predicts > S + 1.5 at level 0 and fits
    # at level 1
    j = S // 2
    script.queue = [1.0] * j + [2.0] + [0.5] * (S - j)
    inf = ex(x, deadline=S + 1.5)
    ex.close()
    assert inf.switches == [(j, 1)] and inf.levels == (0,) * j + (1,) * (S - j) and inf.met
    expected = run_with_stage_levels(model, ex.order, inf.levels, x)
    assert torch.equal(inf.output, expected)
    # and the mix is neither level alone (the comparison can fail)
    for lvl in (0, 1):
        nestsparse.set_level(model, lvl)
        with torch.no_grad():
            assert not torch.equal(inf.output, model(x)), f"mixed output equals level {lvl}'s"


@pytest.mark.parametrize("kind", ["converted", "masked"])
def test_static_level_equals_set_level(kind):
    model = resnet(kind)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with ReroutingExecutor(model, "block") as ex:
        for lvl in range(len(LEVELS)):
            out = ex(x, policy=f"static:{lvl}").output
            nestsparse.set_level(model, lvl)
            with torch.no_grad():
                assert torch.equal(out, model(x)), f"level {lvl}"
            nestsparse.set_level(model, 0)


def test_static_level_equals_set_level_with_layer_stages():
    model = resnet("converted")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with ReroutingExecutor(model, "layer") as ex:
        ex.measure_profile(x, warmup=0, repeats=1, progress=False)
        out = ex(x, policy="static-sparsest").output
    nestsparse.set_level(model, 2)
    with torch.no_grad():
        assert torch.equal(out, model(x))


# ====================================================================================== 3. profiles


def small_profile() -> LatencyProfile:
    return LatencyProfile(
        ["a", "b"],
        [[1.0, 1.0], [2.0, 4.0], [3.0, 6.0]],
        [[0.0, 0.0], [0.5, 0.5], [0.25, 1.0]],
        [[6.0, 6.5, 7.0, 8.0], [11.0, 12.0]],
        {"device": "cpu", "threads": 1},
    )


def test_profile_tables():
    p = small_profile()
    assert p.num_stages == 2 and p.num_levels == 2
    assert p.total(0) == 6.0 and p.total(1) == 11.0
    assert [p.remaining(s, 0) for s in range(4)] == [6.0, 5.0, 3.0, 0.0]
    assert [p.remaining(s, 1) for s in range(4)] == [11.0, 10.0, 6.0, 0.0]
    assert p.percentile(0, 50) == 6.75 and p.percentile(0, 0) == 6.0 and p.percentile(0, 100) == 8.0
    assert p.percentile(1, 25) == 11.25
    for bad in (-1, 2, True, 1.0):
        with pytest.raises(ValueError, match="out of range for 2 levels"):
            p.total(bad)
    with pytest.raises(ValueError, match=r"percentile must be in \[0, 100\]"):
        p.percentile(0, 101)
    assert p.summary().count("\n") == 1 and p.summary().startswith("level 0: median 6750.00 ms")


def test_profile_observe_is_a_moving_estimate():
    p = small_profile()
    p.observe([2.0, 4.0, 3.0], [0, 1, 1], alpha=0.25)
    assert p.times == [[1.25, 1.0], [2.0, 4.0], [3.0, 5.25]]  # (1 - a) t + a x measured, at the level run
    assert p.total(1) == 10.25 and p.remaining(2, 1) == 5.25 and p.total(0) == 6.25
    p.observe([0.0, 0.0, 0.0], [0, 0, 0], alpha=1.0)  # alpha 1: the last measurement
    assert p.total(0) == 0.0
    for alpha in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
            p.observe([1.0] * 3, [0] * 3, alpha)
    with pytest.raises(ValueError, match="expected 3 segment times"):
        p.observe([1.0, 1.0], [0, 0], 0.5)


def test_profile_save_load_round_trip(tmp_path):
    p = small_profile()
    path = tmp_path / "profile.json"
    p.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == PROFILE_FORMAT and data["stages"] == ["a", "b"]
    q = LatencyProfile.load(path)
    assert q == p and q.info == {"device": "cpu", "threads": 1}
    assert q.remaining(1, 1) == p.remaining(1, 1)
    # totals come back sorted, whatever order the file holds
    data["totals"][1] = [12.0, 11.0]
    path.write_text(json.dumps(data))
    assert LatencyProfile.load(path).totals[1] == [11.0, 12.0]


def _doc(**changes):
    d = {
        "format": PROFILE_FORMAT,
        "stages": ["a", "b"],
        "times": [[1, 1], [2, 4], [3, 6]],
        "spread": [[0, 0], [0, 0], [0, 0]],
        "totals": [[6], [11]],
        "info": {},
    }
    d.update(changes)
    return json.dumps(d)


MALFORMED = {
    "not-json": ("{format: oops", "not valid JSON"),
    "a-list": ("[1, 2, 3]", "not a nestsparse.latency_profile/1 document"),
    "wrong-format-tag": (_doc(format="nestsparse.latency_profile/0"), "not a nestsparse.latency_profile/1"),
    "no-format-tag": (_doc(format=None), "not a nestsparse.latency_profile/1"),
    "missing-times": (
        json.dumps({"format": PROFILE_FORMAT, "stages": ["a"], "spread": [[0]], "totals": [[1]]}),
        "malformed document",
    ),
    "times-not-rows": (_doc(times=[1, 2, 3]), "malformed document"),
    "too-few-segments": (_doc(times=[[1, 1], [2, 4]]), r"times must be 3 segments x 2 levels"),
    "too-few-levels": (_doc(times=[[1, 1], [2], [3, 6]]), r"times must be 3 segments x 2 levels"),
    "spread-size": (_doc(spread=[[0, 0, 0]] * 3), r"spread must be 3 segments x 2 levels"),
    "negative-time": (_doc(times=[[1, 1], [2, -4], [3, 6]]), "finite and >= 0"),
    "nan-time": (_doc(times=[[1, 1], [2, 4], [3, 6]]).replace("[3, 6]", "[NaN, 6]"), "finite and >= 0"),
    "infinite-time": (_doc(times=[[1, 1], [2, 4], [3, 6]]).replace("[3, 6]", "[Infinity, 6]"), "finite"),
    "string-time": (_doc(times=[[1, 1], [2, "4"], [3, 6]]), "finite and >= 0"),
    "empty-totals": (_doc(totals=[[6], []]), r"totals\[1\] must be a non-empty list"),
    "no-levels": (_doc(times=[[], [], []], spread=[[], [], []], totals=[]), "at least one stage and one level"),
    "negative-total": (_doc(totals=[[6], [-1]]), r"totals\[1\]"),
    "no-stages": (_doc(stages=[], times=[[1, 1]], spread=[[0, 0]]), "at least one stage"),
    "duplicate-stages": (_doc(stages=["a", "a"]), "distinct strings"),
    "stage-not-a-string": (_doc(stages=["a", 5]), "distinct strings"),
}


@pytest.mark.parametrize("text, match", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_profile_files_are_refused(tmp_path, text, match):
    path = tmp_path / "profile.json"
    path.write_text(text)
    with pytest.raises(ProfileError, match=match):
        LatencyProfile.load(path)
    assert issubclass(ProfileError, ValueError)


def test_binary_profile_file_is_a_profile_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(ProfileError, match="model.safetensors"):
        LatencyProfile.load(path)


def test_profile_with_string_info_is_a_profile_error():
    with pytest.raises(ProfileError):
        LatencyProfile.from_json(json.loads(_doc(info="ab")))


def test_set_profile_refuses_a_profile_for_another_model(ticks):
    clock, model, ex = ticks
    with pytest.raises(ProfileError, match=r"latency profile is for stages \['1', '2', '3'\]"):
        ex.set_profile(make_profile(["1", "2", "3"], TICK_TIMES[:4]))
    with pytest.raises(ProfileError, match="is for stages"):
        ex.set_profile(make_profile(["1", "2", "3", "5"], TICK_TIMES))
    with pytest.raises(ProfileError, match="has 2 levels, the model 3"):
        ex.set_profile(make_profile(TICK_STAGES, [row[:2] for row in TICK_TIMES]))
    with pytest.raises(TypeError, match="expected a LatencyProfile, got dict"):
        ex.set_profile(make_profile(TICK_STAGES, TICK_TIMES).to_json())
    assert ex.profile.times == TICK_TIMES  # the old profile is still in use


def test_measure_profile_on_the_fake_clock_is_exact():
    clock = FakeClock()
    model = tick_model(clock)
    stages = [("1",), ("2",), ("3.a",), ("3.b",), ("3.down",), ("4",)]  # the shortcut is listed last
    with ReroutingExecutor(model, stages, clock=clock) as ex:
        prof = ex.measure_profile(one(), warmup=1, repeats=3, progress=False)
        assert ex.profile is prof
        assert prof.stages == ex.order == ["1", "2", "3.down", "3.a", "3.b", "4"]  # as executed
        assert prof.times == [
            [1.0, 1.0, 1.0],
            [4.0, 2.0, 1.0],
            [4.0, 2.0, 1.0],
            [1.0, 0.5, 0.25],
            [1.0, 0.5, 0.25],
            [2.0, 1.0, 0.5],
            [4.0, 2.0, 1.0],
        ]
        assert prof.spread == [[0.0] * 3] * 7
        assert prof.totals == [[17.0] * 3, [9.0] * 3, [5.0] * 3]
        assert prof.info["repeats"] == 3 and prof.info["input_shapes"] == [[1]] and prof.info["device"] == "cpu"
        assert prof.percentile(0, 95) == 17.0
        with pytest.raises(ValueError, match="warmup must be >= 0, repeats >= 1 and gap >= 0"):
            ex.measure_profile(one(), repeats=0, progress=False)
        with pytest.raises(ValueError, match="warmup must be >= 0"):
            ex.measure_profile(one(), warmup=-1, progress=False)


# ================================================================================= 4. bad arguments


class NoAware(nn.Sequential):
    pass


class Partial(nn.Module):
    """``unused`` is level-aware and a stage, but the forward never calls it."""

    def __init__(self, clock):
        super().__init__()
        self.used = Tick(clock, (1.0, 0.5))
        self.unused = Tick(clock, (1.0, 0.5))

    def forward(self, x):
        return self.used(x)


class Twice(nn.Module):
    def __init__(self, clock):
        super().__init__()
        self.a = Tick(clock, (1.0, 0.5))
        self.b = Tick(clock, (1.0, 0.5))

    def forward(self, x):
        return self.b(self.a(self.a(x)))


@pytest.mark.parametrize("deadline", [-1.0, 0.0, 0, math.nan, math.inf, "20"], ids=repr)
def test_bad_deadline(ticks, deadline):
    _, _, ex = ticks
    with pytest.raises(ValueError, match="deadline must be a positive number of seconds"):
        ex(one(), deadline=deadline)


@pytest.mark.parametrize(
    "policy, match",
    [
        ("fastest", r"unknown policy 'fastest'; expected one of \('static-densest'"),
        ("static:3", r"policy 'static:3': level must be an integer in \[0, 2\]"),
        ("static:-1", r"level must be an integer in \[0, 2\]"),
        ("static:x", r"level must be an integer in \[0, 2\]"),
        ("static:", r"level must be an integer"),
    ],
    ids=["unknown", "static-out-of-range", "static-negative", "static-not-a-number", "static-empty"],
)
def test_bad_policy(ticks, policy, match):
    clock, _, ex = ticks
    with pytest.raises(ValueError, match=match):
        ex(one(), deadline=20.0, policy=policy)
    assert clock.log == []  # refused before running anything


@pytest.mark.parametrize("policy", ["reroute", "choose-once"])
def test_profile_and_deadline_needed(policy):
    clock = FakeClock()
    with ReroutingExecutor(tick_model(clock), clock=clock) as ex:
        with pytest.raises(ValueError, match=f"policy '{policy}' needs a latency profile"):
            ex(one(), deadline=20.0, policy=policy)
        ex.set_profile(make_profile(TICK_STAGES, TICK_TIMES))
        with pytest.raises(ValueError, match=f"policy '{policy}' needs a deadline"):
            ex(one(), policy=policy)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"margin": 1.0}, r"margin must be in \[0, 1\), got 1.0"),
        ({"margin": -0.1}, r"margin must be in \[0, 1\)"),
        ({"margin": math.nan}, r"margin must be in \[0, 1\)"),
        ({"refresh": 1.5}, r"refresh must be in \[0, 1\]"),
        ({"refresh": -0.5}, r"refresh must be in \[0, 1\]"),
    ],
    ids=["margin-1", "margin-negative", "margin-nan", "refresh-1.5", "refresh-negative"],
)
def test_bad_executor_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReroutingExecutor(tick_model(FakeClock()), **kwargs)


@pytest.mark.parametrize(
    "stages, match",
    [
        (["1", "2", "3"], r"stages do not cover the model: level-aware module '4' \(Tick\) is in no stage"),
        (["1", "2", "3", "4", "nope"], r"no module named 'nope' in the model \(stage 'nope'\)"),
        (["1", "2", "3", ("4", "")], r"no module named ''"),
        (["1", "2", "3", "3.a", "4"], r"module '3.a' is in stage '3' and in stage '3.a'"),
        (["1", "2", ("3", "1"), "4"], r"module '1' is in stage '1' and in stage '3'"),
        (["1", "1", "2", "3", "4"], "two stages start at the same module"),
        ([], "give at least one stage"),
        (["1", (), "2"], "each with at least one module name"),
        (["1", ["2", 5], "3", "4"], "no module named 5"),
    ],
    ids=[
        "not-covering",
        "unknown-name",
        "root",
        "overlap",
        "overlap-in-group",
        "same-head",
        "no-stages",
        "empty-stage",
        "not-a-name",
    ],
)
def test_bad_stages(stages, match):
    with pytest.raises(ValueError, match=match):
        ReroutingExecutor(tick_model(FakeClock()), stages)


def test_good_explicit_stages():
    """Names or tuples of names (the first is the checkpoint); a group may repeat a module of its own subtree."""
    model = tick_model(FakeClock())
    with ReroutingExecutor(model, ["1", ("2",), ("3", "3.a"), ["4"]]) as ex:
        assert ex.stages == [("1",), ("2",), ("3", "3.a"), ("4",)] and ex.order == TICK_STAGES
        assert ex.num_levels == 3 and ex.profile is None


@pytest.mark.parametrize("missing", ["bn1", "layer3.1.conv2"])
def test_stages_must_cover_the_real_model(missing):
    model = resnet("converted")
    stages = [s for s in auto_stages(model, "block") if s[0] != missing]
    if missing == "layer3.1.conv2":  # per-layer stages, but leave one nested layer out
        stages = [
            (n,)
            for n, m in model.named_modules()
            if isinstance(m, (NestedSparseConv2d, LevelBatchNorm)) and n != missing
        ]
    kind = "LevelBatchNorm" if missing == "bn1" else "NestedSparseConv2d"
    with pytest.raises(ValueError, match=rf"level-aware module '{missing}' \({kind}\) is in no stage"):
        ReroutingExecutor(model, stages)


def test_model_without_level_aware_modules():
    model = NoAware(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match="the model has no level-aware modules"):
        ReroutingExecutor(model)
    with pytest.raises(ValueError, match="no level-aware modules"):
        auto_stages(model, "layer")
    with pytest.raises(ValueError, match="model itself is one level-aware layer"):
        auto_stages(Tick(FakeClock(), (1.0, 0.5)))


def test_explicit_stages_on_a_model_without_level_aware_modules():
    with pytest.raises(ValueError, match="no level-aware modules"):
        ReroutingExecutor(NoAware(nn.Linear(2, 2), nn.ReLU()), ["0"])


def test_level_counts_must_agree():
    clock = FakeClock()
    model = nn.Sequential(Tick(clock, (1.0, 0.5, 0.25)), Tick(clock, (1.0, 0.5)))
    with pytest.raises(ValueError, match=r"disagree on the number of levels: \[2, 3\]"):
        ReroutingExecutor(model)


def test_auto_stages_bad_granularity():
    with pytest.raises(ValueError, match="granularity must be 'block' or 'layer', got 'stage'"):
        auto_stages(tick_model(FakeClock()), "stage")
    with pytest.raises(ValueError, match="granularity must be 'block' or 'layer'"):
        ReroutingExecutor(tick_model(FakeClock()), "blocks")


def test_a_stage_that_never_runs():
    clock = FakeClock()
    model = Partial(clock)
    with ReroutingExecutor(model, clock=clock) as ex:
        assert ex.stages == [("used",), ("unused",)]
        with pytest.raises(RuntimeError, match="stage 'unused' never ran"):
            ex(one(), policy="static-densest")
        with pytest.raises(RuntimeError, match="stage 'unused' never ran"):
            ex.measure_profile(one(), warmup=0, repeats=1, progress=False)
        assert ex.profile is None
        ex.set_profile(make_profile(["used", "unused"], [[0.0, 0.0], [1.0, 0.5], [1.0, 0.5]]))
        with pytest.raises(RuntimeError, match="stage 'unused' never ran"):
            ex(one(), deadline=10.0)
        # the executor is usable again afterwards (no run left half-open)
        with pytest.raises(RuntimeError, match="never ran"):
            ex(one(), policy="static-densest")


def test_a_stage_that_runs_twice():
    clock = FakeClock()
    with ReroutingExecutor(Twice(clock), clock=clock) as ex:
        with pytest.raises(RuntimeError, match="stage 'a' ran twice in one forward"):
            ex(one(), policy="static-densest")
        # Once a profile fixes the order, a repeated stage is out of order.
        ex.set_profile(make_profile(["a", "b"], [[0.0, 0.0], [1.0, 0.5], [1.0, 0.5]]))
        with pytest.raises(RuntimeError, match="stage 'a' reached out of order \\(expected 'b'\\)"):
            ex(one(), policy="static-densest")


def test_closed_executor():
    clock = FakeClock()
    model = tick_model(clock)
    ex = ReroutingExecutor(model, clock=clock)
    assert all(len(model[i]._forward_pre_hooks) == 1 for i in range(1, 5))
    ex.close()
    assert all(len(model[i]._forward_pre_hooks) == 0 for i in range(1, 5))
    with pytest.raises(RuntimeError, match="ReroutingExecutor: closed"):
        ex(one(), policy="static-densest")
    with ReroutingExecutor(model, clock=clock) as ex2:
        ex2(one(), policy="static-densest")
    with pytest.raises(RuntimeError, match="closed"):
        ex2(one(), policy="static-densest")
    assert not model[3]._forward_pre_hooks


BAD_DEADLINES = [
    ("abc", "give milliseconds"),
    ("p0", "give milliseconds"),
    ("p101", "give milliseconds"),
    ("p-5", "give milliseconds"),
    ("", "give milliseconds"),
    ("ms", "give milliseconds"),
    ("40 seconds", "give milliseconds"),
    ("-5", "deadline must be positive, got '-5'"),
    ("0", "must be positive"),
    ("0ms", "must be positive"),
    ("nan", "must be positive"),
    ("inf", "must be positive"),
    (-5, "must be positive"),
]


@pytest.mark.parametrize("spec, match", BAD_DEADLINES, ids=[repr(spec) for spec, _ in BAD_DEADLINES])
def test_deadline_from_refuses(spec, match):
    with pytest.raises(ValueError, match=match):
        deadline_from(spec, small_profile())


GOOD_DEADLINES = [
    ("40", 0.04),
    ("40ms", 0.04),
    (" 12.5 MS ", 0.0125),
    (40, 0.04),
    ("p50", 6.75),
    ("P100", 8.0),
    ("p95", 7.85),
]  # percentiles of small_profile's level-0 totals 6, 6.5, 7, 8 s


@pytest.mark.parametrize("spec, seconds", GOOD_DEADLINES, ids=[repr(spec) for spec, _ in GOOD_DEADLINES])
def test_deadline_from(spec, seconds):
    assert deadline_from(spec, small_profile()) == pytest.approx(seconds, rel=1e-12)


def test_run_qos_bad_arguments(ticks):
    clock, _, ex = ticks
    inputs = lambda i: (one(),)  # noqa: E731
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        run_qos(ex, inputs, 0, 20.0)
    with pytest.raises(ValueError, match="deadline must be positive"):
        run_qos(ex, inputs, 3, 0.0)
    with pytest.raises(ValueError, match="deadline must be positive"):
        run_qos(ex, inputs, 3, math.nan)
    with pytest.raises(ValueError, match="period must be positive"):
        run_qos(ex, inputs, 3, 20.0, period=0.0)
    with pytest.raises(ValueError, match="unknown policy 'fast'"):
        run_qos(ex, inputs, 3, 20.0, policies=["static-densest", "fast"], period=1e-6, progress=False)
    assert clock.log == []  # every policy is checked before any inference runs
    with pytest.raises(ValueError, match="unknown policy 'fast'"):
        run_qos(ex, inputs, 3, 20.0, policies=["fast"], period=1e-6, progress=False)
    assert clock.log == []


# ============================================================================ 5. auto stages, execution order


def test_auto_stages_block_on_the_zoo_resnet():
    model = resnet("converted")
    blocks = [("bn1",)] + [(f"layer{i}.{j}",) for i in (1, 2, 3) for j in (0, 1)]
    assert auto_stages(model) == auto_stages(model, "block") == blocks
    assert auto_stages(resnet("converted-plain-bn"), "block") == blocks[1:]  # an nn.BatchNorm2d is no stage
    assert auto_stages(resnet("masked"), "block") == blocks


def test_auto_stages_layer_without_level_batchnorm():
    model = resnet("converted-plain-bn")
    expected = []
    for i in (1, 2, 3):
        for j in (0, 1):
            expected += [(f"layer{i}.{j}.conv1",), (f"layer{i}.{j}.conv2",)]
            if i > 1 and j == 0:
                expected.append((f"layer{i}.{j}.downsample.0",))
    assert auto_stages(model, "layer") == expected  # registration order


@pytest.mark.parametrize("kind", ["converted", "masked"])
def test_auto_stages_layer_groups_each_layer_with_its_level_batchnorm(kind):
    model = resnet(kind)
    expected = [("bn1",)]
    for i in (1, 2, 3):
        for j in (0, 1):
            p = f"layer{i}.{j}"
            expected += [(f"{p}.conv1", f"{p}.bn1"), (f"{p}.conv2", f"{p}.bn2")]
            if i > 1 and j == 0:
                expected.append((f"{p}.downsample.0", f"{p}.downsample.1"))
    assert auto_stages(model, "layer") == expected


@pytest.mark.parametrize("kind", ["converted", "converted-plain-bn", "masked"])
def test_executor_learns_the_execution_order(kind):
    model = resnet(kind)
    x = torch.randn(1, 1, 8, 8)
    clock = FakeClock()
    with ReroutingExecutor(model, "layer", clock=clock, interference=Script(clock)) as ex:
        registered = [s[0] for s in ex.stages]
        assert registered.index("layer2.0.downsample.0") > registered.index("layer2.0.conv2")
        prof = ex.measure_profile(x, warmup=0, repeats=2, progress=False)
        assert sorted(ex.order) == sorted(registered) and prof.stages == ex.order
        for i in (2, 3):  # the shortcut runs before the block's first convolution
            assert ex.order.index(f"layer{i}.0.downsample.0") + 1 == ex.order.index(f"layer{i}.0.conv1")
        assert prof.times == [[1.0] * 3] * (len(ex.order) + 1)  # one scripted second per segment
        for lvl in range(3):
            assert ex(x, policy=f"static:{lvl}").levels == (lvl,) * len(ex.order)


def test_static_policy_without_profile_on_layer_stages():
    model = resnet("converted-plain-bn")
    with ReroutingExecutor(model, "layer") as ex:
        assert ex(torch.randn(1, 1, 8, 8), policy="static-densest").levels == (0,) * len(ex.stages)


# ================================================================================================ 6. QoS

FACTORS = [1.0, 1.0, 1.0, 2.0]  # inference i runs FACTORS[i % 4] x slower (input-driven, all segments)


def qos_inputs(i):
    return (one(FACTORS[i % 4]),)


def qos_score(i, out):
    assert torch.equal(out, qos_inputs(i)[0])
    return 1.0 if i % 2 == 0 else 0.5


@pytest.fixture
def qos_results(ticks):
    _, _, ex = ticks
    return run_qos(ex, qos_inputs, 8, 20.0, period=1e-6, score=qos_score, progress=False)


def test_run_qos_results(qos_results):
    """Deadline 20 s, inferences 3 and 7 twice as slow. By hand: static-densest 17 / 34 (missed); static-sparsest
    5 / 10; reroute switches to level 1 at cp0 of the slow ones (2 + 2 x 16 > 20, 2 + 2 x 8 = 18) -> 18;
    choose-once misses 3 (level 0 -> 34), then (ratio 2) picks level 1 for 4 (9 s), level 0 again after."""
    r = qos_results
    assert list(r) == list(POLICIES)
    exp = {
        "static-densest": [17, 17, 17, 34] * 2,
        "static-sparsest": [5, 5, 5, 10] * 2,
        "reroute": [17, 17, 17, 18] * 2,
        "choose-once": [17, 17, 17, 34, 9, 17, 17, 34],
    }
    for policy, lat in exp.items():
        res = r[policy]
        assert isinstance(res, QosResult) and res.n == 8 and res.deadline == 20.0 and res.num_levels == 3
        assert res.latencies.tolist() == lat, policy
        assert res.met.tolist() == [v <= 20 for v in lat], policy
        assert res.levels.shape == (8, 4) and res.overhead.tolist() == [0.0] * 8
        assert sum(res.level_histogram()) == pytest.approx(1.0)
        assert sum(res.final_level_histogram()) == pytest.approx(1.0)
        assert res.accuracy == 0.75
        assert res.effective_accuracy == pytest.approx(float(np.mean(res.scores * res.met)))
    d, s, ro, co = (r[p] for p in ("static-densest", "static-sparsest", "reroute", "choose-once"))
    assert d.met_rate == 0.75 and d.nines == pytest.approx(-math.log10(0.25))
    assert s.met_rate == 1.0 and s.nines == pytest.approx(math.log10(8))  # no miss: the resolution bound
    assert ro.met_rate == 1.0 and co.met_rate == 0.75
    assert d.effective_accuracy == 0.625 and co.effective_accuracy == 0.625 and ro.effective_accuracy == 0.75
    assert d.latency_percentile(50) == 17.0 and d.latency_percentile(100) == 34.0
    assert s.latency_percentile(0) == 5.0
    assert d.level_histogram() == [1.0, 0.0, 0.0] and s.level_histogram() == [0.0, 0.0, 1.0]
    assert ro.level_histogram() == [0.75, 0.25, 0.0] and ro.final_level_histogram() == [0.75, 0.25, 0.0]
    assert co.level_histogram() == [0.875, 0.125, 0.0]
    assert ro.levels[3].tolist() == [1, 1, 1, 1] and ro.levels[0].tolist() == [0, 0, 0, 0]


def test_qos_result_without_scores(ticks):
    _, _, ex = ticks
    r = run_qos(ex, qos_inputs, 4, 20.0, policies=["static:1"], period=1e-6, warmup=0, progress=False)
    assert list(r) == ["static:1"]
    assert r["static:1"].accuracy is None and r["static:1"].effective_accuracy is None
    assert r["static:1"].scores is None and r["static:1"].latencies.tolist() == [9.0, 9.0, 9.0, 18.0]


def test_qos_table(qos_results):
    table = qos_table(qos_results)
    lines = table.splitlines()
    assert lines[0] == "deadline 20000.00 ms, 8 inferences per policy"
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| policy")]
    assert [row.split(" | ")[0][2:] for row in rows] == list(POLICIES)
    densest = rows[0].split(" | ")
    assert densest[1:4] == ["75.00%", "0.60", "17000.00"] and densest[6:8] == ["75.00%", "62.50%"]
    assert "L0 100.0% / L1 0.0% / L2 0.0%" in rows[0]
    assert "| >= 0.90 |" in rows[1]  # no miss: a lower bound
    assert "L0 75.0% / L1 25.0% / L2 0.0%" in rows[3]


def test_qos_table_without_scores(ticks):
    _, _, ex = ticks
    r = run_qos(ex, qos_inputs, 2, 20.0, policies=["reroute"], period=1e-6, warmup=0, progress=False)
    assert "| n/a | n/a |" in qos_table(r)


def test_plot_latency_cdf(qos_results, tmp_path):
    path = tmp_path / "cdf.png"
    plot_latency_cdf(qos_results, path, title="fake clock")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_run_qos_restarts_the_scenario_for_every_policy(ticks):
    _, _, ex = ticks
    events = []

    class Recorder(Scenario):
        name = "recorder"

        def start(self, executor=None):
            events.append(("start", executor))

        def stop(self):
            events.append(("stop", None))

    run_qos(
        ex,
        qos_inputs,
        2,
        20.0,
        policies=["static-densest", "reroute"],
        scenario=Recorder(),
        period=1e-6,
        warmup=0,
        progress=False,
    )
    assert events == [("start", ex), ("stop", None)] * 2


# ================================================================================================ 7. the CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = models.resnet_small(width=4, blocks=(1, 1))
    nestsparse.level_batchnorms(model, len(LEVELS))
    tags = nestsparse.model_tags(model, LEVELS, skip=models.dense_layers(model))
    path = tmp_path_factory.mktemp("qos") / "tiny.safetensors"
    nestsparse.save(nestsparse.convert(model, tags, densities=LEVELS).eval(), path)
    return str(path)


@pytest.fixture
def cheap_cost(monkeypatch):
    """The checkpoint-cost estimate times empty calls for 0.2 s each way; 10 ms are enough here."""
    original = qos.checkpoint_cost
    monkeypatch.setattr(qos, "checkpoint_cost", lambda ex, results: original(ex, results, min_run_time=0.01))


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--scenario", "storm"], "unknown scenario 'storm'"),
        (["--model", "vgg16"], "unknown model 'vgg16'"),
        (["--model", "weights.pt"], "unknown model 'weights.pt'"),
        (["-n", "0"], "n must be >= 1, got 0"),
        (["--threads", "-1"], "--threads must be >= 0, got -1"),
        (["--stages", "blocks"], "argument --stages: invalid choice: 'blocks'"),
        (["-n", "many"], "argument -n/--inferences: invalid int value: 'many'"),
    ],
    ids=["scenario", "model", "model-extension", "n", "threads", "stages", "n-not-int"],
)
def test_cli_errors_before_building_anything(argv, message, capsys, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    if argv[0] != "--model":
        monkeypatch.setattr(qos, "workload", no_build)
    err = cli_error(["qos", *argv], capsys)
    assert message in err and "error:" in err and "usage: python -m nestsparse" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--deadline", "-5"], "deadline must be positive, got '-5'"),
        (["--deadline", "0ms"], "deadline must be positive"),
        (["--deadline", "p101"], "give milliseconds (e.g. 40 or 40ms)"),
        (["--deadline", "soon"], "give milliseconds"),
        (["--margin", "1"], "margin must be in [0, 1)"),
        (["--policies", "static-densest", "fastest"], "unknown policy 'fastest'"),
        (["--repeats", "0"], "repeats >= 1"),
    ],
    ids=["deadline-negative", "deadline-zero", "deadline-p101", "deadline-word", "margin", "policy", "repeats"],
)
def test_cli_argument_errors_on_a_checkpoint(checkpoint, capsys, cheap_cost, argv, message):
    err = cli_error(
        [
            "qos",
            "--model",
            checkpoint,
            "--input-shape",
            "1,1,8,8",
            "--scenario",
            "none",
            "--repeats",
            "1",
            "-n",
            "1",
            *argv,
        ],
        capsys,
    )
    assert message in err


def test_cli_checkpoint_needs_an_input_shape(checkpoint, capsys):
    assert "a checkpoint model needs input_shape" in cli_error(["qos", "--model", checkpoint], capsys)


def test_cli_checks_the_deadline_before_building_the_model(capsys, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the deadline was checked")

    monkeypatch.setattr(qos, "workload", no_build)
    assert "deadline must be positive" in cli_error(["qos", "--deadline", "-5", "--scenario", "none"], capsys)


def test_cli_qos_end_to_end(checkpoint, tmp_path, capsys, cheap_cost):
    prof_path, png = tmp_path / "profile.json", tmp_path / "cdf.png"
    assert (
        cli.main(
            [
                "qos",
                "--model",
                checkpoint,
                "--input-shape",
                "1,1,8,8",
                "-n",
                "3",
                "--repeats",
                "2",
                "--scenario",
                "none",
                "--deadline",
                "20ms",
                "--save-profile",
                str(prof_path),
                "--plot",
                str(png),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "random inputs (1, 1, 8, 8)" in out
    assert "3 stages (block); unloaded latency per level:" in out  # bn1, layer1.0, layer2.0
    assert "deadline 20.00 ms (20ms); scenario none: no background load; rerouting margin 10%" in out
    assert "deadline 20.00 ms, 3 inferences per policy" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| policy")]
    assert [r.split(" | ")[0][2:] for r in rows] == list(POLICIES)
    assert all(r.count("|") == 10 and "| n/a | n/a |" in r for r in rows)
    assert "checkpoint cost:" in out and f"latency CDF written to {png}" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    prof = LatencyProfile.load(prof_path)
    assert prof.stages == ["bn1", "layer1.0", "layer2.0"] and prof.num_levels == 3
    assert all(len(t) == 2 for t in prof.totals) and prof.info["input_shapes"] == [[1, 1, 8, 8]]
    # the saved profile is reused; a subset of the policies
    assert (
        cli.main(
            [
                "qos",
                "--model",
                checkpoint,
                "--input-shape",
                "1,1,8,8",
                "-n",
                "2",
                "--scenario",
                "none",
                "--deadline",
                "p95",
                "--profile",
                str(prof_path),
                "--policies",
                "static-densest",
                "reroute",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"latency profile loaded from {prof_path}" in out
    assert f"deadline {1e3 * prof.percentile(0, 95):.2f} ms (p95)" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| policy")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["static-densest", "reroute"]


def test_cli_refuses_a_profile_for_another_model(checkpoint, tmp_path, capsys):
    path = tmp_path / "profile.json"
    make_profile(TICK_STAGES, TICK_TIMES).save(path)
    err = cli_error(
        ["qos", "--model", checkpoint, "--input-shape", "1,1,8,8", "--scenario", "none", "--profile", str(path)], capsys
    )
    assert "latency profile is for stages ['1', '2', '3', '4']" in err


# ============================================================================================ 8. CPU load


def _spawned(monkeypatch):
    """Every process the scenarios module starts."""
    procs = []
    real = subprocess.Popen

    def popen(*args, **kwargs):
        p = real(*args, **kwargs)
        procs.append(p)
        return p

    monkeypatch.setattr(scenarios.subprocess, "Popen", popen)
    return procs


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(signal, "SIGSTOP"), reason="the CPU-load scenario is Linux only"
)


@linux_only
def test_cpu_load_start_stop_leaves_no_child(monkeypatch):
    procs = _spawned(monkeypatch)
    per_core = 1 / (os.cpu_count() or 1)  # levels count spinners per core: these are 1 and 2 spinners
    sc = CpuLoad(seed=0, mean_off=100.0, levels=(per_core, 2 * per_core))
    sc.start()
    sc.start()  # started twice
    sc.stop()
    assert procs and all(p.poll() is not None for p in procs), "a spinner outlived stop()"
    assert sc._procs == [] and sc._thread is None
    sc.stop()  # stopping twice is harmless
    with CpuLoad(seed=0, mean_off=100.0, levels=(1,)) as again:
        assert again._thread is not None and again._thread.is_alive()
    assert all(p.poll() is not None for p in procs) and again._thread is None


@linux_only
def test_cpu_load_spinners_wait_stopped_and_follow_the_trace(monkeypatch):
    procs = _spawned(monkeypatch)
    per_core = 1 / (os.cpu_count() or 1)  # levels count spinners per core: these are 1 and 2 spinners
    sc = CpuLoad(seed=0, mean_off=100.0, levels=(per_core, 2 * per_core))
    sc.start()
    try:
        assert len(sc._procs) == 2 and all(p.poll() is None for p in sc._procs)
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline and {_state(p.pid) for p in sc._procs} != {"T"}:
            time.sleep(0.01)
        assert {_state(p.pid) for p in sc._procs} == {"T"}  # quiet period: stopped
    finally:
        sc.stop()
        assert all(p.poll() is not None for p in procs)


@linux_only
def test_cpu_load_parameters():
    with pytest.raises(ValueError, match=r"spinner processes per core \(> 0\), got \(0,\)"):
        CpuLoad(levels=(0,))
    with pytest.raises(ValueError, match=r"per core \(> 0\)"):
        CpuLoad(levels=(-1.5,))
    assert CpuLoad(levels=(1.0,)).trace.levels == (os.cpu_count(),)  # one spinner per core by default
    assert CpuLoad(levels=(1e-6,)).trace.levels == (1,)  # at least one
    with pytest.raises(ValueError, match=r"nice must be in \[0, 19\]"):
        CpuLoad(nice=20)
    sc = make_scenario("fluctuating", seed=3)
    assert isinstance(sc, CpuLoad) and sc.name == "fluctuating" and f"{os.cpu_count()} cores" in sc.describe()


def test_block_stages_of_a_fused_model_are_the_modules_its_graph_calls():
    """fuse flattens a model's blocks into one graph that calls the layers, never the blocks: "block" stages named
    the blocks, and ReroutingExecutor(fused, stages="block") failed at its first inference without naming what
    works."""
    model = models.resnet_small().eval()
    fused = nestsparse.fuse(nestsparse.convert(model, nestsparse.model_tags(model, (0.3, 0.1))).eval())
    stages = auto_stages(fused, "block")
    called = {n.target for n in fused.graph.nodes if n.op == "call_module"}
    assert all(s[0] in called for s in stages) and [s[0] for s in stages] == [s[0] for s in auto_stages(fused, "layer")]
    x = torch.randn(1, 1, 28, 28)
    with ReroutingExecutor(fused, stages="block") as ex:
        ex.measure_profile(x, repeats=2, warmup=1, progress=False)
        out = ex(x, deadline=10.0)
    with torch.no_grad():
        torch.testing.assert_close(out.output, fused(x))
