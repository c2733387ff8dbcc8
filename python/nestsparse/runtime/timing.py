"""The one way the library times a call: torch's benchmark Timer, after a warm-up, median of its blocks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.benchmark import Timer

__all__ = ["median_time"]


def median_time(
    fn: Callable[[], object], *, min_run_time: float = 0.2, warmup: int = 2, threads: int | None = None
) -> float:
    """Median seconds per call of ``fn()``: ``warmup`` calls, then ``Timer.blocked_autorange`` for at least
    ``min_run_time`` seconds. ``threads``: torch threads during the measurement (default: the current count;
    Timer's own default is one thread, which would hide every multi-threaded kernel)."""
    if warmup < 0 or not min_run_time > 0:
        raise ValueError(f"median_time: need warmup >= 0 and min_run_time > 0, got {warmup}, {min_run_time}")
    for _ in range(warmup):
        fn()
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads() if threads is None else threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median
