"""Latency profiles: per segment of an inference and per level, the time measured on one device.

Timeline of one inference with S stages: segment 0 runs from the call to the first checkpoint (work that is in no
stage, e.g. a dense stem), segment k+1 from stage k's checkpoint to the next checkpoint (or to the end of the
forward).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["LatencyProfile", "ProfileError", "PROFILE_FORMAT"]

PROFILE_FORMAT = "nestsparse.latency_profile/1"


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
        self.suffix = self._suffix_sums()

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
        return self.suffix[self._level(level)][0]

    def remaining(self, segment: int, level: int) -> float:
        """Profiled time of segments ``segment``.. at ``level`` (seconds)."""
        if isinstance(segment, bool) or not isinstance(segment, int) or not 0 <= segment <= self.num_stages + 1:
            raise ValueError(f"latency profile: segment {segment!r} is out of range [0, {self.num_stages + 1}]")
        return self.suffix[self._level(level)][segment]

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
        self.suffix = self._suffix_sums()

    def to_json(self) -> dict:
        return {
            "format": PROFILE_FORMAT,
            "stages": self.stages,
            "times": self.times,
            "spread": self.spread,
            "totals": self.totals,
            "info": self.info,
        }

    @classmethod
    def from_json(cls, data: dict) -> LatencyProfile:
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"latency profile: not a {PROFILE_FORMAT} document")
        try:
            return cls(
                [str(s) if isinstance(s, str) else s for s in data["stages"]],
                [list(r) for r in data["times"]],
                [list(r) for r in data["spread"]],
                [sorted(r) for r in data["totals"]],
                dict(data.get("info", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ProfileError):
                raise
            raise ProfileError(f"latency profile: malformed document ({exc!r})") from exc

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyProfile:
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
            lines.append(
                f"level {lvl}: median {1e3 * self.percentile(lvl, 50):.2f} ms, p95 "
                f"{1e3 * self.percentile(lvl, 95):.2f} ms, sum of segment medians {1e3 * self.total(lvl):.2f} ms"
            )
        return "\n".join(lines)
