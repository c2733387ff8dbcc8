"""The rerouting executor: runs a model under a deadline, switching to a sparser level at checkpoints.

At each checkpoint the rerouting policy predicts the finish time: elapsed + the remaining segments at the
current level from the profile, scaled by how the segments so far compared with their profiled time. If that
misses the deadline (less a safety ``margin``), the remaining stages switch to the densest level that still
fits, the sparsest if none does. The decision reads elapsed time and the profile only, never the input.
"""

from __future__ import annotations

import math
import platform
import statistics
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..nn import LevelAware, level_aware_modules
from .profile import LatencyProfile, ProfileError
from .stages import check_stages

__all__ = ["ReroutingExecutor", "Inference", "POLICIES"]

POLICIES = ("static-densest", "static-sparsest", "choose-once", "reroute")
"""The policies QoS compares: every stage at level 0; every stage at the sparsest level; one level chosen
before the start (the densest whose profiled latency, scaled by the last inference's slowdown, fits); and
rerouting at checkpoints, starting from level 0."""


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
    __slots__ = (
        "policy",
        "start",
        "last",
        "k",
        "level",
        "levels",
        "budget",
        "expected",
        "switches",
        "overhead",
        "segments",
        "deadline",
        "seen",
    )


class _ModelGuard:
    """One per model, shared by every executor on it: the levels are the model's modules' state, so inferences
    on one model run one at a time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.owner: int | None = None  # the thread running an inference now


_GUARDS: weakref.WeakKeyDictionary[nn.Module, _ModelGuard] = weakref.WeakKeyDictionary()
_GUARDS_LOCK = threading.Lock()


def _guard(model: nn.Module) -> _ModelGuard:
    with _GUARDS_LOCK:
        g = _GUARDS.get(model)
        if g is None:
            g = _GUARDS[model] = _ModelGuard()
        return g


class ReroutingExecutor:
    """Runs ``model`` under a deadline with a policy from ``POLICIES`` (or ``"static:<level>"``).

    ``stages``: "block" (default), "layer" (see ``auto_stages``) or a list of stages, each a module name or a
    tuple of names whose first is the checkpoint. ``profile``: a LatencyProfile for these stages (or measure
    one with ``measure_profile``); rerouting and choose-once need it. ``margin``: the share of the deadline
    kept in reserve by the predictions. ``refresh``: weight of each finished inference in the profile's moving
    estimate (0 = off). ``clock``: seconds as a float (tests pass a fake one). ``interference``: called as
    ``interference(segment_start, segment_end)`` when each segment ends, before the clock is read again; the
    synthetic slowdown scenario stretches segments with it. On CUDA the executor synchronises at checkpoints.

    ``slowdown``: the last inference's latency over its profiled time (choose-once scales the profile by it).

    Use as a context manager, or call ``close()``, to remove the checkpoint hooks from the model. After an
    inference the modules keep the levels it ended with; ``nestsparse.set_level`` resets them.

    Threads: an executor may be shared, and several executors may wrap one model. The levels are the model's
    state, so inferences on one model run one at a time: a call from a second thread waits for the running one to
    end (its latency is counted from when it starts), and a call from inside a running inference (the same
    thread) raises RuntimeError. The guard belongs to the module object given as ``model``: executors on a model and
    on one of its submodules do not exclude each other. ``measure_profile``, ``set_profile`` and ``close`` are not
    to be called while another thread runs an inference. Calling the model directly while an executor runs it sees
    the executor's levels: serve concurrent levels from copies that share the weights (nestsparse.shared_copy,
    whose copies carry no checkpoint hooks)."""

    def __init__(
        self,
        model: nn.Module,
        stages="block",
        profile: LatencyProfile | None = None,
        *,
        margin: float = 0.0,
        refresh: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
        interference: Callable[[float, float], None] | None = None,
        synchronize: bool | None = None,
    ):
        if not 0 <= margin < 1:
            raise ValueError(f"ReroutingExecutor: margin must be in [0, 1), got {margin}")
        if not 0 <= refresh <= 1:
            raise ValueError(f"ReroutingExecutor: refresh must be in [0, 1], got {refresh}")
        self.model = model
        self.stages = check_stages(model, stages)
        counts = {m.num_levels for m in level_aware_modules(model).values()}
        if len(counts) > 1:
            raise ValueError(
                f"ReroutingExecutor: level-aware modules disagree on the number of levels: {sorted(counts)}"
            )
        self.num_levels = counts.pop()
        self.margin, self.refresh, self.clock, self.interference = margin, refresh, clock, interference
        if synchronize is None:
            p = next(model.parameters(), None)
            synchronize = p is not None and p.device.type == "cuda"
        self._sync = torch.cuda.synchronize if synchronize else None
        modules = dict(model.named_modules())
        self._owned = {
            s[0]: [m for name in s for m in modules[name].modules() if isinstance(m, LevelAware)] for s in self.stages
        }
        # The execution order of the stages is learnt from the first inference (or taken from a profile).
        self._order_known = False
        self._set_order([s[0] for s in self.stages])
        self._run: _Run | None = None
        self._guard = _guard(model)
        self.slowdown = 1.0
        self._hooks = [modules[s[0]].register_forward_pre_hook(self._hook(s[0])) for s in self.stages]
        self.profile: LatencyProfile | None = None
        if profile is not None:
            self.set_profile(profile)

    # -- lifecycle
    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> ReroutingExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_profile(self, profile: LatencyProfile) -> None:
        """Uses ``profile`` (its stage order becomes the execution order the executor expects)."""
        if not isinstance(profile, LatencyProfile):
            raise TypeError(f"set_profile: expected a LatencyProfile, got {type(profile).__name__}")
        if sorted(profile.stages) != sorted(self._owned):
            raise ProfileError(
                f"latency profile is for stages {profile.stages[:4]}... ({profile.num_stages}); "
                f"this executor has {self.order[:4]}... ({len(self.order)})"
            )
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

        pre_hook.rerouting_checkpoint = True  # nestsparse.shared_copy leaves these out of its copies
        return pre_hook

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return self.clock()

    def _checkpoint(self, run: _Run, name: str) -> None:
        k = run.k
        if not self._order_known:  # static policies only: record the order
            if name in run.seen:
                raise RuntimeError(
                    f"ReroutingExecutor: stage {name!r} ran twice in one forward; stages must each run once per forward"
                )
            run.seen.append(name)
        elif k >= len(self.order) or self.order[k] != name:
            expected = self.order[k] if k < len(self.order) else "(none: all stages ran)"
            raise RuntimeError(
                f"ReroutingExecutor: stage {name!r} reached out of order (expected {expected!r}); "
                "stages must each run once per forward, in the profile's order"
            )
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
        suffix = profile.suffix  # remaining(k + 1, level) without its argument checks: this is the hot path
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
    def start_level(self, policy: str, deadline: float | None) -> int:
        """The level an inference under ``policy`` starts at (ValueError for an unknown policy or missing input)."""
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
                if self.slowdown * self.profile.total(lvl) <= budget:
                    return lvl
            return L - 1
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES} or 'static:<level>'")

    def __call__(self, *args, deadline: float | None = None, policy: str = "reroute", **kwargs) -> Inference:
        """Runs ``model(*args, **kwargs)`` once under ``policy``; ``deadline`` in seconds."""
        if deadline is not None and (
            isinstance(deadline, bool)
            or not isinstance(deadline, (int, float))
            or not deadline > 0
            or not math.isfinite(deadline)
        ):
            raise ValueError(f"deadline must be a positive number of seconds, got {deadline!r}")
        if deadline is not None and deadline >= 10:
            warnings.warn(
                f"ReroutingExecutor: deadline={deadline!r} is in seconds; for {deadline:g} ms pass {deadline / 1000:g}",
                stacklevel=2,
            )
        guard = self._guard
        if guard.owner == threading.get_ident():
            raise RuntimeError("ReroutingExecutor: already running an inference on this model (not re-entrant)")
        with guard.lock:
            guard.owner = threading.get_ident()
            try:
                return self._infer(args, kwargs, deadline, policy)
            finally:
                guard.owner = None

    def _infer(self, args: tuple, kwargs: dict, deadline: float | None, policy: str) -> Inference:
        if not self._hooks:
            raise RuntimeError("ReroutingExecutor: closed")
        start_level = self.start_level(policy, deadline)
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
            missing = [n for n in self.order if n not in run.seen] if not self._order_known else self.order[run.k :]
            raise RuntimeError(
                f"ReroutingExecutor: stage {missing[0]!r} never ran; stages must be modules "
                "called by the model's forward, each once"
            )
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
                self.slowdown = latency / expected
            if self.refresh > 0:
                self.profile.observe(run.segments, seg_levels, self.refresh)
        return Inference(
            out,
            latency,
            deadline,
            deadline is None or latency <= deadline,
            tuple(run.levels),
            run.switches,
            run.overhead,
            run.segments,
        )

    def measure_profile(
        self, *args, warmup: int = 3, repeats: int = 30, gap: float = 0.0, progress: bool = True, **kwargs
    ) -> LatencyProfile:
        """Measures every segment at every level (levels interleaved run by run, so drift hits all alike),
        learns the execution order of the stages, and sets and returns the profile.

        ``gap``: seconds idle before each run. Measure as the model will be used: on the development machine an
        inference that follows even 1 ms of idleness (periodic arrivals) runs about 10% slower, with a fatter
        tail, than back-to-back ones."""
        if warmup < 0 or repeats < 1 or not gap >= 0:
            raise ValueError(
                f"measure_profile: warmup must be >= 0, repeats >= 1 and gap >= 0, got {warmup}, {repeats}, {gap}"
            )
        saved = self.profile, self._order_known
        self.profile, self._order_known = None, False
        try:
            self(*args, policy="static:0", **kwargs)  # learns the execution order
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
        info = {
            "device": str(p.device) if p is not None else "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "repeats": repeats,
            "gap": gap,
            "input_shapes": [list(a.shape) for a in args if isinstance(a, Tensor)],
        }
        profile = LatencyProfile(order, times, spread, [sorted(t) for t in totals], info)
        self.set_profile(profile)
        return profile
