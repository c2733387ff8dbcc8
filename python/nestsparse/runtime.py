"""Rerouting under a deadline: stages, latency profiles, the rerouting executor and QoS measurement.

A model is split into *stages* at *checkpoints*. A stage is a module of the model (a residual block, a layer)
or a group of modules (a layer and the LevelBatchNorm after it); its checkpoint is a forward pre-hook on its
first module, so the model's own forward runs unchanged, residual connections included. Every level-aware
module (nested sparse layers, level masks, LevelBatchNorm) must belong to exactly one stage; that is what
"the stages cover the model" means, and what lets a checkpoint switch the rest of the inference to another
level: because levels are nested in one buffer, every switch is valid and copies nothing.

Timeline of one inference with S stages: segment 0 runs from the call to the first checkpoint (work that is
in no stage, e.g. a dense stem), segment k+1 from stage k's checkpoint to the next checkpoint (or to the
end of the forward). A ``LatencyProfile`` holds each segment's time at each level.

At each checkpoint the rerouting policy predicts the finish time: elapsed + the remaining segments at the
current level from the profile, scaled by how the segments so far compared with their profiled time. If that
misses the deadline (less a safety ``margin``), the remaining stages switch to the densest level that still
fits, the sparsest if none does. The decision reads elapsed time and the profile only, never the input.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .nn import LevelAware, LevelBatchNorm

__all__ = ["auto_stages", "LatencyProfile", "ProfileError", "ReroutingExecutor", "Inference", "POLICIES",
           "QosResult", "run_qos", "parse_deadline", "deadline_from", "qos_table", "plot_latency_cdf"]

POLICIES = ("static-densest", "static-sparsest", "choose-once", "reroute")
"""The policies QoS compares: every stage at level 0; every stage at the sparsest level; one level chosen
before the start (the densest whose profiled latency, scaled by the last inference's slowdown, fits); and
rerouting at checkpoints, starting from level 0."""

PROFILE_FORMAT = "nestsparse.latency_profile/1"


# ---------------------------------------------------------------------------------------------- stages

def _is_layer(m: nn.Module) -> bool:
    """A sparsifiable layer that is level-aware itself (nested sparse) or through a level mask."""
    if isinstance(m, LevelAware) and hasattr(m, "weight_shape"):
        return True
    params = getattr(m, "parametrizations", None)
    return params is not None and any(isinstance(p, LevelAware) for p in params.modules())


def _level_aware_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LevelAware)]


def auto_stages(model: nn.Module, granularity: str = "block") -> list[tuple[str, ...]]:
    """Stages that cover ``model``, in registration order (the executor learns the execution order).

    ``"block"``: from the root, descend through nn.Sequential / nn.ModuleList containers; every other module
    holding a level-aware module is a stage: a residual block, a layer, a LevelBatchNorm of the stem.
    ``"layer"``: every sparsifiable layer (nested sparse module or level-masked Linear/Conv2d) is a stage,
    grouped with the LevelBatchNorms registered after it up to the next layer (its own normalisation, so a
    switch never falls between a layer and its statistics); a LevelBatchNorm before any layer is its own stage.
    """
    if granularity not in ("block", "layer"):
        raise ValueError(f"auto_stages: granularity must be 'block' or 'layer', got {granularity!r}")
    aware = _level_aware_names(model)
    if not aware:
        raise ValueError("auto_stages: the model has no level-aware modules (convert it or apply level masks first)")
    if granularity == "layer":
        stages: list[list[str]] = []
        for name, m in model.named_modules():
            if _is_layer(m):
                stages.append([name])
            elif isinstance(m, LevelBatchNorm):
                if stages:
                    stages[-1].append(name)
                else:
                    stages.append([name])
        return [tuple(s) for s in stages]

    def holds_aware(name: str) -> bool:
        prefix = name + "." if name else ""
        return any(a == name or a.startswith(prefix) for a in aware)

    out: list[tuple[str, ...]] = []

    def visit(name: str, m: nn.Module) -> None:
        if name and not isinstance(m, (nn.Sequential, nn.ModuleList)):
            out.append((name,))
            return
        for child, sub in m.named_children():
            full = f"{name}.{child}" if name else child
            if holds_aware(full):
                visit(full, sub)

    if isinstance(model, LevelAware):
        raise ValueError("auto_stages: the model itself is one level-aware layer; there is nothing to split")
    visit("", model)
    return out


def _normalise_stages(model: nn.Module, stages) -> list[tuple[str, ...]]:
    if not _level_aware_names(model):
        raise ValueError("stages: the model has no level-aware modules (convert it or apply level masks first)")
    if isinstance(stages, str):
        stages = auto_stages(model, stages)
    stages = [tuple([s]) if isinstance(s, str) else tuple(s) for s in stages]
    if not stages or any(not s for s in stages):
        raise ValueError("stages: give at least one stage, each with at least one module name")
    modules = dict(model.named_modules())
    owner: dict[str, str] = {}
    for stage in stages:
        for name in stage:
            if not isinstance(name, str) or name not in modules or name == "":
                raise ValueError(f"stages: no module named {name!r} in the model (stage {stage[0]!r})")
            for sub, m in modules[name].named_modules(prefix=name):
                if isinstance(m, LevelAware):
                    if sub in owner and owner[sub] != stage[0]:
                        raise ValueError(f"stages: module {sub!r} is in stage {owner[sub]!r} and in stage {stage[0]!r}")
                    owner[sub] = stage[0]
    heads = [s[0] for s in stages]
    if len(set(heads)) != len(heads):
        raise ValueError("stages: two stages start at the same module")
    missing = [n for n in _level_aware_names(model) if n not in owner]
    if missing:
        raise ValueError(f"stages do not cover the model: level-aware module {missing[0]!r} "
                         f"({type(modules[missing[0]]).__name__}) is in no stage"
                         + (f" ({len(missing) - 1} more)" if len(missing) > 1 else "")
                         + "; add it to a stage, e.g. grouped with the layer before it")
    return stages


# ---------------------------------------------------------------------------------------------- profile

class ProfileError(ValueError):
    """A latency profile file or object that is malformed or does not fit the executor."""


@dataclass
class LatencyProfile:
    """Per segment and level, the measured time on one device.

    ``stages``: checkpoint names in execution order; ``times[s][l]``: median seconds of segment s (0 = before
    the first checkpoint, k+1 = stage k) at level l; ``spread[s][l]``: p90 - p10 of those samples;
    ``totals[l]``: the whole-inference samples at level l (sorted seconds), for percentiles of the unloaded
    latency. ``info``: device, threads, input shape... ``observe`` refreshes ``times`` online."""

    stages: list[str]
    times: list[list[float]]
    spread: list[list[float]]
    totals: list[list[float]]
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()
        self._suffix = self._suffix_sums()

    @property
    def num_levels(self) -> int:
        return len(self.totals)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def validate(self) -> None:
        S, L = len(self.stages), len(self.totals)
        if S < 1 or L < 1:
            raise ProfileError(f"latency profile: needs at least one stage and one level, got {S} stages, {L} levels")
        if len(set(self.stages)) != S or not all(isinstance(s, str) for s in self.stages):
            raise ProfileError("latency profile: stage names must be distinct strings")
        for key in ("times", "spread"):
            table = getattr(self, key)
            if len(table) != S + 1 or any(len(row) != L for row in table):
                raise ProfileError(f"latency profile: {key} must be {S + 1} segments x {L} levels")
            for row in table:
                for v in row:
                    if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                        raise ProfileError(f"latency profile: {key} holds {v!r}; times must be finite and >= 0")
        for lvl, samples in enumerate(self.totals):
            if not samples or any(not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in samples):
                raise ProfileError(f"latency profile: totals[{lvl}] must be a non-empty list of finite times >= 0")

    def _suffix_sums(self) -> list[list[float]]:
        # suffix[l][s] = time of segments s.. at level l; suffix[l][S+1] = 0.
        S = self.num_stages
        out = []
        for lvl in range(self.num_levels):
            acc, row = 0.0, [0.0] * (S + 2)
            for s in range(S, -1, -1):
                acc += self.times[s][lvl]
                row[s] = acc
            out.append(row)
        return out

    def total(self, level: int) -> float:
        """Sum of the segments' median times at ``level`` (seconds)."""
        return self._suffix[self._level(level)][0]

    def remaining(self, segment: int, level: int) -> float:
        """Profiled time of segments ``segment``.. at ``level`` (seconds)."""
        if isinstance(segment, bool) or not isinstance(segment, int) or not 0 <= segment <= self.num_stages + 1:
            raise ValueError(f"latency profile: segment {segment!r} is out of range [0, {self.num_stages + 1}]")
        return self._suffix[self._level(level)][segment]

    def percentile(self, level: int, q: float) -> float:
        """The q-th percentile (0-100) of the whole-inference samples at ``level`` (seconds)."""
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {q}")
        return float(np.percentile(self.totals[self._level(level)], q))

    def _level(self, level: int) -> int:
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < self.num_levels:
            raise ValueError(f"latency profile: level {level!r} is out of range for {self.num_levels} levels")
        return level

    def observe(self, segment_times: Sequence[float], segment_levels: Sequence[int], alpha: float) -> None:
        """Moves each segment's estimate at the level it ran toward the time just measured:
        ``t <- (1 - alpha) t + alpha measured`` (an exponential moving estimate; alpha in (0, 1])."""
        if not 0 < alpha <= 1:
            raise ValueError(f"observe: alpha must be in (0, 1], got {alpha}")
        if len(segment_times) != self.num_stages + 1 or len(segment_levels) != self.num_stages + 1:
            raise ValueError(f"observe: expected {self.num_stages + 1} segment times and levels")
        for s, (t, lvl) in enumerate(zip(segment_times, segment_levels)):
            self._level(lvl)
            if not math.isfinite(t) or t < 0:
                raise ValueError(f"observe: segment {s} time {t!r} must be finite and >= 0")
        for s, (t, lvl) in enumerate(zip(segment_times, segment_levels)):
            self.times[s][lvl] = (1 - alpha) * self.times[s][lvl] + alpha * float(t)
        self._suffix = self._suffix_sums()

    def to_json(self) -> dict:
        return {"format": PROFILE_FORMAT, "stages": self.stages, "times": self.times, "spread": self.spread,
                "totals": self.totals, "info": self.info}

    @classmethod
    def from_json(cls, data: dict) -> "LatencyProfile":
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"latency profile: not a {PROFILE_FORMAT} document")
        try:
            return cls([str(s) if isinstance(s, str) else s for s in data["stages"]],
                       [list(r) for r in data["times"]], [list(r) for r in data["spread"]],
                       [sorted(r) for r in data["totals"]], dict(data.get("info", {})))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ProfileError):
                raise
            raise ProfileError(f"latency profile: malformed document ({exc!r})") from exc

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyProfile":
        try:
            with open(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProfileError(f"latency profile {os.fspath(path)!r} is not valid JSON: {exc}") from exc
        return cls.from_json(data)

    def summary(self) -> str:
        """One line per level: median total, p95, and the sparsest/densest ratio."""
        lines = []
        for lvl in range(self.num_levels):
            lines.append(f"level {lvl}: median {1e3 * self.percentile(lvl, 50):.2f} ms, p95 "
                         f"{1e3 * self.percentile(lvl, 95):.2f} ms, sum of segment medians {1e3 * self.total(lvl):.2f} ms")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- executor

@dataclass
class Inference:
    """One executed inference: its output, latency (s), whether it met the deadline, the level each stage ran
    at, the switches made (stage index, new level), the time spent deciding at checkpoints (s) and each
    segment's time (s)."""

    output: object
    latency: float
    deadline: float | None
    met: bool
    levels: tuple[int, ...]
    switches: list[tuple[int, int]]
    overhead: float
    segment_times: list[float]

    @property
    def final_level(self) -> int:
        return self.levels[-1]


class _Run:
    __slots__ = ("policy", "start", "last", "k", "level", "levels", "budget", "expected", "switches", "overhead",
                 "segments", "deadline", "seen")


class ReroutingExecutor:
    """Runs ``model`` under a deadline with a policy from ``POLICIES`` (or ``"static:<level>"``).

    ``stages``: "block" (default), "layer" (see ``auto_stages``) or a list of stages, each a module name or a
    tuple of names whose first is the checkpoint. ``profile``: a LatencyProfile for these stages (or measure
    one with ``measure_profile``); rerouting and choose-once need it. ``margin``: the share of the deadline
    kept in reserve by the predictions. ``refresh``: weight of each finished inference in the profile's moving
    estimate (0 = off). ``clock``: seconds as a float (tests pass a fake one). ``interference``: called as
    ``interference(segment_start, segment_end)`` when each segment ends, before the clock is read again; the
    synthetic slowdown scenario stretches segments with it. On CUDA the executor synchronises at checkpoints.

    Use as a context manager, or call ``close()``, to remove the checkpoint hooks from the model. After an
    inference the modules keep the levels it ended with; ``nestsparse.set_level`` resets them."""

    def __init__(self, model: nn.Module, stages="block", profile: LatencyProfile | None = None, *,
                 margin: float = 0.0, refresh: float = 0.0, clock: Callable[[], float] = time.perf_counter,
                 interference: Callable[[float, float], None] | None = None, synchronize: bool | None = None):
        if not 0 <= margin < 1:
            raise ValueError(f"ReroutingExecutor: margin must be in [0, 1), got {margin}")
        if not 0 <= refresh <= 1:
            raise ValueError(f"ReroutingExecutor: refresh must be in [0, 1], got {refresh}")
        self.model = model
        self.stages = _normalise_stages(model, stages)
        aware = [m for m in model.modules() if isinstance(m, LevelAware)]
        counts = {m.num_levels for m in aware}
        if len(counts) > 1:
            raise ValueError(f"ReroutingExecutor: level-aware modules disagree on the number of levels: {sorted(counts)}")
        self.num_levels = counts.pop()
        self.margin, self.refresh, self.clock, self.interference = margin, refresh, clock, interference
        if synchronize is None:
            p = next(model.parameters(), None)
            synchronize = p is not None and p.device.type == "cuda"
        self._sync = torch.cuda.synchronize if synchronize else None
        modules = dict(model.named_modules())
        self._owned = {s[0]: [m for name in s for m in modules[name].modules() if isinstance(m, LevelAware)]
                       for s in self.stages}
        # The execution order of the stages is learnt from the first inference (or taken from a profile).
        self._order_known = False
        self._set_order([s[0] for s in self.stages])
        self._run: _Run | None = None
        self._last_ratio = 1.0
        self._hooks = [modules[s[0]].register_forward_pre_hook(self._hook(s[0])) for s in self.stages]
        self.profile: LatencyProfile | None = None
        if profile is not None:
            self.set_profile(profile)

    # -- lifecycle
    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> "ReroutingExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_profile(self, profile: LatencyProfile) -> None:
        """Uses ``profile`` (its stage order becomes the execution order the executor expects)."""
        if not isinstance(profile, LatencyProfile):
            raise TypeError(f"set_profile: expected a LatencyProfile, got {type(profile).__name__}")
        if sorted(profile.stages) != sorted(self._owned):
            raise ProfileError(f"latency profile is for stages {profile.stages[:4]}... ({profile.num_stages}); "
                               f"this executor has {self.order[:4]}... ({len(self.order)})")
        if profile.num_levels != self.num_levels:
            raise ProfileError(f"latency profile has {profile.num_levels} levels, the model {self.num_levels}")
        self.profile = profile
        self._set_order(list(profile.stages))
        self._order_known = True

    def _set_order(self, order: list[str]) -> None:
        self.order = order
        self._owned_list = [self._owned[n] for n in order]

    # -- the checkpoint
    def _hook(self, name: str):
        def pre_hook(_module, _args):
            run = self._run
            if run is not None:
                self._checkpoint(run, name)
        return pre_hook

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return self.clock()

    def _checkpoint(self, run: _Run, name: str) -> None:
        k = run.k
        if not self._order_known:  # static policies only: record the order
            if name in run.seen:
                raise RuntimeError(f"ReroutingExecutor: stage {name!r} ran twice in one forward; stages must each "
                                   "run once per forward")
            run.seen.append(name)
        elif k >= len(self.order) or self.order[k] != name:
            expected = self.order[k] if k < len(self.order) else "(none: all stages ran)"
            raise RuntimeError(f"ReroutingExecutor: stage {name!r} reached out of order (expected {expected!r}); "
                               "stages must each run once per forward, in the profile's order")
        now = self._now()
        if self.interference is not None:
            self.interference(run.last, now)
            now = self._now()
        run.segments.append(now - run.last)
        run.last = now
        run.k = k + 1
        if run.policy != "reroute":
            return
        profile = self.profile
        lvl = run.level
        run.expected += profile.times[k][run.levels[k - 1] if k else lvl]
        elapsed = now - run.start
        ratio = elapsed / run.expected if run.expected > 0 else 1.0
        suffix = profile._suffix  # remaining(k + 1, level) without its argument checks: this is the hot path
        if lvl < self.num_levels - 1 and elapsed + ratio * suffix[lvl][k + 1] > run.budget:
            new = self.num_levels - 1
            for cand in range(lvl + 1, self.num_levels - 1):
                if elapsed + ratio * suffix[cand][k + 1] <= run.budget:
                    new = cand
                    break
            for owned in self._owned_list[k:]:
                for m in owned:
                    m.level = new
            run.level = new
            run.switches.append((k, new))
        run.levels.append(run.level)
        run.overhead += self.clock() - now

    # -- running
    def _policy_level(self, policy: str, deadline: float | None) -> int:
        L = self.num_levels
        if policy == "static-densest":
            return 0
        if policy == "static-sparsest":
            return L - 1
        if policy.startswith("static:"):
            try:
                level = int(policy[7:])
            except ValueError:
                level = -1
            if not 0 <= level < L:
                raise ValueError(f"policy {policy!r}: level must be an integer in [0, {L - 1}]")
            return level
        if policy in ("reroute", "choose-once"):
            if self.profile is None:
                raise ValueError(f"policy {policy!r} needs a latency profile (measure_profile or set_profile)")
            if deadline is None:
                raise ValueError(f"policy {policy!r} needs a deadline")
            if policy == "reroute":
                return 0
            budget = deadline * (1 - self.margin)
            for lvl in range(L):
                if self._last_ratio * self.profile.total(lvl) <= budget:
                    return lvl
            return L - 1
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES} or 'static:<level>'")

    def __call__(self, *args, deadline: float | None = None, policy: str = "reroute", **kwargs) -> Inference:
        """Runs ``model(*args, **kwargs)`` once under ``policy``; ``deadline`` in seconds."""
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not deadline > 0
                                     or not math.isfinite(deadline)):
            raise ValueError(f"deadline must be a positive number of seconds, got {deadline!r}")
        if self._run is not None:
            raise RuntimeError("ReroutingExecutor: already running an inference (not re-entrant)")
        if not self._hooks:
            raise RuntimeError("ReroutingExecutor: closed")
        start_level = self._policy_level(policy, deadline)
        run = _Run()
        run.policy, run.k, run.level, run.levels = policy, 0, start_level, []
        run.budget = deadline * (1 - self.margin) if deadline is not None else math.inf
        run.deadline, run.expected, run.switches, run.overhead, run.segments = deadline, 0.0, [], 0.0, []
        run.seen = []
        for owned in self._owned_list:
            for m in owned:
                m.level = start_level
        self._run = run
        try:
            run.start = run.last = self._now()
            with torch.no_grad():
                out = self.model(*args, **kwargs)
            end = self._now()
            if self.interference is not None:
                self.interference(run.last, end)
                end = self._now()
        finally:
            self._run = None
        if run.k != len(self.order):
            missing = [n for n in self.order if n not in run.seen] if not self._order_known else self.order[run.k:]
            raise RuntimeError(f"ReroutingExecutor: stage {missing[0]!r} never ran; stages must be modules "
                               "called by the model's forward, each once")
        if not self._order_known:
            self._set_order(run.seen)
            self._order_known = True
        run.segments.append(end - run.last)
        latency = end - run.start
        if run.policy != "reroute":
            run.levels = [start_level] * len(self.order)
        seg_levels = [start_level] + list(run.levels)
        if self.profile is not None:
            expected = sum(self.profile.times[s][lvl] for s, lvl in enumerate(seg_levels))
            if expected > 0:
                self._last_ratio = latency / expected
            if self.refresh > 0:
                self.profile.observe(run.segments, seg_levels, self.refresh)
        return Inference(out, latency, deadline, deadline is None or latency <= deadline, tuple(run.levels),
                         run.switches, run.overhead, run.segments)

    def measure_profile(self, *args, warmup: int = 3, repeats: int = 30, gap: float = 0.0, progress: bool = True,
                        **kwargs) -> LatencyProfile:
        """Measures every segment at every level (levels interleaved run by run, so drift hits all alike),
        learns the execution order of the stages, and sets and returns the profile.

        ``gap``: seconds idle before each run. Measure as the model will be used: on the development machine an
        inference that follows even 1 ms of idleness (periodic arrivals) runs about 10% slower, with a fatter
        tail, than back-to-back ones."""
        if warmup < 0 or repeats < 1 or not gap >= 0:
            raise ValueError(f"measure_profile: warmup must be >= 0, repeats >= 1 and gap >= 0, got {warmup}, "
                             f"{repeats}, {gap}")
        saved = self.profile, self._order_known
        self.profile, self._order_known = None, False
        try:
            self(*args, policy="static:0", **kwargs)   # learns the execution order
        except Exception:
            self.profile, self._order_known = saved
            raise
        order = list(self.order)
        L = self.num_levels
        samples = [[[] for _ in range(L)] for _ in range(len(order) + 1)]
        totals: list[list[float]] = [[] for _ in range(L)]
        steps = tqdm(range(warmup + repeats), desc="latency profile", unit="round", disable=not progress)
        for i in steps:
            for lvl in range(L):
                if gap:
                    time.sleep(gap)
                inf = self(*args, policy=f"static:{lvl}", **kwargs)
                if i >= warmup:
                    totals[lvl].append(inf.latency)
                    for s, t in enumerate(inf.segment_times):
                        samples[s][lvl].append(t)
        times = [[statistics.median(c) for c in row] for row in samples]
        spread = [[float(np.percentile(c, 90) - np.percentile(c, 10)) for c in row] for row in samples]
        p = next(self.model.parameters(), None)
        info = {"device": str(p.device) if p is not None else "cpu", "threads": torch.get_num_threads(),
                "torch": torch.__version__, "machine": platform.machine(), "repeats": repeats, "gap": gap,
                "input_shapes": [list(a.shape) for a in args if isinstance(a, Tensor)]}
        profile = LatencyProfile(order, times, spread, [sorted(t) for t in totals], info)
        self.set_profile(profile)
        return profile


# ---------------------------------------------------------------------------------------------- QoS

@dataclass
class QosResult:
    """N inferences of one policy: latencies (s), deadline met, the level of every stage, and each inference's
    score (share of correct predictions; None when there are no labels)."""

    policy: str
    deadline: float
    latencies: np.ndarray
    met: np.ndarray
    levels: np.ndarray
    scores: np.ndarray | None
    overhead: np.ndarray
    num_levels: int

    @property
    def n(self) -> int:
        return len(self.latencies)

    @property
    def met_rate(self) -> float:
        return float(self.met.mean())

    @property
    def nines(self) -> float:
        """-log10 of the miss rate (99% met = 2 nines); with no miss, the resolution log10(N) as a bound."""
        miss = 1.0 - self.met_rate
        return -math.log10(miss) if miss > 0 else math.log10(self.n)

    def latency_percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))

    @property
    def accuracy(self) -> float | None:
        return None if self.scores is None else float(self.scores.mean())

    @property
    def effective_accuracy(self) -> float | None:
        """Accuracy with every inference that missed its deadline counted as wrong."""
        return None if self.scores is None else float((self.scores * self.met).mean())

    def level_histogram(self) -> list[float]:
        """Share of stage executions at each level."""
        return [float((self.levels == lvl).mean()) for lvl in range(self.num_levels)]

    def final_level_histogram(self) -> list[float]:
        """Share of inferences whose last stage ran at each level."""
        return [float((self.levels[:, -1] == lvl).mean()) for lvl in range(self.num_levels)]


def parse_deadline(spec: str | float) -> tuple[str, float]:
    """("ms", milliseconds) from "12.5" / "12.5ms", or ("percentile", q) from "p95"; ValueError otherwise."""
    text = str(spec).strip().lower()
    try:
        if text.startswith("p"):
            value = float(text[1:])
            if not 0 < value <= 100:
                raise ValueError
            return "percentile", value
        value = float(text[:-2] if text.endswith("ms") else text)
    except ValueError:
        raise ValueError(f"deadline {spec!r}: give milliseconds (e.g. 40 or 40ms) or a percentile in (0, 100] of "
                         "the densest level's unloaded latency (e.g. p95)") from None
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"deadline must be positive, got {spec!r}")
    return "ms", value


def deadline_from(spec: str | float, profile: LatencyProfile) -> float:
    """A deadline in seconds from "12.5" / "12.5ms" (milliseconds) or "p95" (that percentile of the densest
    level's unloaded latency in ``profile``)."""
    kind, value = parse_deadline(spec)
    return profile.percentile(0, value) if kind == "percentile" else value / 1e3


def _wait_until(t: float) -> None:
    while True:
        left = t - time.perf_counter()
        if left <= 0:
            return
        time.sleep(min(left, 0.002) if left > 0.003 else 0)


def run_qos(executor: ReroutingExecutor, inputs: Callable[[int], tuple], n: int, deadline: float, *,
            policies: Iterable[str] = POLICIES, scenario=None, period: float | None = None,
            score: Callable[[int, object], float] | None = None, warmup: int = 3,
            progress: bool = True) -> dict[str, QosResult]:
    """Runs ``n`` inferences per policy; inference i gets ``inputs(i)`` (a tuple of arguments) and is scored
    by ``score(i, output)`` (share correct, in [0, 1]) if given.

    Inferences arrive periodically: inference i starts at i x ``period`` (default 1.25 x deadline) after the
    policy's start, or when the previous one ends if that is later. ``scenario`` (nestsparse.scenarios) is
    restarted for every policy, so each policy meets the same load at the same moments of its schedule."""
    if n < 1:
        raise ValueError(f"run_qos: n must be >= 1, got {n}")
    if not deadline > 0:
        raise ValueError(f"run_qos: deadline must be positive, got {deadline}")
    period = 1.25 * deadline if period is None else period
    if not period > 0:
        raise ValueError(f"run_qos: period must be positive, got {period}")
    policies = list(policies)
    if not policies:
        raise ValueError("run_qos: no policies given")
    for policy in policies:
        executor._policy_level(policy, deadline)  # refuses an unknown policy before any work
    results = {}
    for policy in policies:
        for i in range(warmup):
            executor(*inputs(i), deadline=deadline, policy=policy)
        executor._last_ratio = 1.0
        lat, met, lev, sc, ovh = [], [], [], [], []
        if scenario is not None:
            scenario.start(executor)
        try:
            t0 = time.perf_counter()
            for i in tqdm(range(n), desc=f"{policy} ({getattr(scenario, 'name', 'no load')})", unit="inf",
                          disable=not progress):
                _wait_until(t0 + i * period)
                inf = executor(*inputs(i), deadline=deadline, policy=policy)
                lat.append(inf.latency)
                met.append(inf.met)
                lev.append(inf.levels)
                ovh.append(inf.overhead)
                if score is not None:
                    sc.append(float(score(i, inf.output)))
        finally:
            if scenario is not None:
                scenario.stop()
        results[policy] = QosResult(policy, deadline, np.array(lat), np.array(met, dtype=bool), np.array(lev),
                                    np.array(sc) if score is not None else None, np.array(ovh),
                                    executor.num_levels)
    return results


def qos_table(results: dict[str, QosResult]) -> str:
    """A markdown table: one row per policy."""
    any_r = next(iter(results.values()))
    lines = [f"deadline {1e3 * any_r.deadline:.2f} ms, {any_r.n} inferences per policy", "",
             "| policy | deadline met | nines | p50 ms | p99 ms | p99.9 ms | accuracy | effective accuracy | "
             "levels used (share of stages) |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results.values():
        nines = f"{r.nines:.2f}" if r.met_rate < 1 else f">= {r.nines:.2f}"
        acc = "n/a" if r.accuracy is None else f"{100 * r.accuracy:.2f}%"
        eff = "n/a" if r.effective_accuracy is None else f"{100 * r.effective_accuracy:.2f}%"
        hist = " / ".join(f"L{lvl} {100 * h:.1f}%" for lvl, h in enumerate(r.level_histogram()))
        lines.append(f"| {r.policy} | {100 * r.met_rate:.2f}% | {nines} | {1e3 * r.latency_percentile(50):.2f} | "
                     f"{1e3 * r.latency_percentile(99):.2f} | {1e3 * r.latency_percentile(99.9):.2f} | {acc} | {eff} | "
                     f"{hist} |")
    return "\n".join(lines)


def plot_latency_cdf(results: dict[str, QosResult], path: str | os.PathLike, title: str = "") -> None:
    """Latency CDF per policy (left) and its tail, 1 - CDF on a log scale (right), with the deadline."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(f"plotting needs matplotlib: pip install matplotlib ({exc})") from exc
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in results.values():
        x = np.sort(r.latencies) * 1e3
        cdf = np.arange(1, len(x) + 1) / len(x)
        label = f"{r.policy} ({100 * r.met_rate:.2f}% met)"
        ax[0].plot(x, cdf, label=label)
        ax[1].step(x, np.maximum(1 - cdf + 1 / len(x), 1 / len(x)), where="post", label=label)
    deadline = next(iter(results.values())).deadline * 1e3
    for a in ax:
        a.axvline(deadline, color="k", ls="--", lw=1)
        a.set_xlabel("latency (ms)")
    ax[0].set_xlim(0, min(2.5 * deadline, max(1e3 * r.latencies.max() for r in results.values())))
    ax[0].set(ylabel="share of inferences done", title="latency CDF (dashed: deadline)")
    ax[1].set(yscale="log", ylabel="share slower than x", title="tail: 1 - CDF")
    ax[0].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
