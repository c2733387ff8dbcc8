"""Resource-fluctuation scenarios for QoS runs, reproducible from a seed.

Every scenario follows an on/off *trace*: alternating quiet and loaded periods whose lengths are drawn from
exponential distributions (means ``mean_off`` and ``mean_on`` seconds) and whose intensity is drawn from
``levels``, all from ``random.Random(seed)``. ``start(executor)`` replays the trace from its beginning, so
every policy meets the same load at the same moments of its run; ``stop()`` ends it.

- ``"none"``: nothing.
- ``"fluctuating"`` (the built-in scenario for the QoS target): background CPU load. Spinner processes
  (each a Python busy loop, one core's worth of work) are started stopped (SIGSTOP); during a loaded period
  ``level x cores`` of them (default: one per core) are resumed (SIGCONT) and compete with the inference for
  the cores. Loaded periods last 0.4 s on average, quiet ones 4 s. The spinners die with this process
  (PR_SET_PDEATHSIG) and on ``stop()``. Linux only.
  What it does depends on the inference's threads. With one thread, the scheduler shares the cores fairly
  and the inference slows about (spinners + 1) / cores: 1.5x on 2 cores, a slowdown a level twice as fast
  absorbs. With as many threads as cores, every parallel region waits at its barrier for the thread that
  lost its core: on the 2-core development machine one spinner slows a 2-thread ResNet-50 about 3.5x, more
  than any level can make up for.
- ``"slowdown"``: a synthetic slowdown trace, deterministic and independent of the machine: during a loaded
  period every segment of the inference is stretched by the trace's factor (the executor's ``interference``
  hook busy-waits (factor - 1) x the segment's time when the segment ends). It emulates clock throttling or
  a noisy neighbour of known strength.
- ``"gpu-stream"``: on CUDA, a background thread launches large matrix products on its own stream during
  loaded periods, competing with the inference for the GPU's SMs and memory bandwidth.
"""

from __future__ import annotations

import bisect
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

__all__ = ["Trace", "Scenario", "CpuLoad", "Slowdown", "GpuStream", "SCENARIOS", "make_scenario"]


class Trace:
    """A seeded on/off trace: ``value(t)`` is 0 in quiet periods and one of ``levels`` in loaded ones."""

    def __init__(self, seed: int, mean_on: float, mean_off: float, levels: Sequence[float]):
        if not mean_on > 0 or not mean_off > 0:
            raise ValueError(f"Trace: mean_on and mean_off must be positive, got {mean_on}, {mean_off}")
        if not levels:
            raise ValueError("Trace: levels must not be empty")
        self.seed, self.mean_on, self.mean_off, self.levels = seed, mean_on, mean_off, tuple(levels)
        self._rng = random.Random(seed)
        self._times = [0.0]  # change points
        self._values = [0.0]  # value from each change point on; starts quiet

    def _extend(self, until: float) -> None:
        while self._times[-1] <= until:
            quiet = self._values[-1] == 0
            length = self._rng.expovariate(1 / (self.mean_off if quiet else self.mean_on))
            self._times.append(self._times[-1] + length)
            self._values.append(self._rng.choice(self.levels) if quiet else 0.0)

    def change(self, i: int) -> tuple[float, float]:
        """The i-th change point (time, value); change 0 is (0, 0)."""
        while len(self._times) <= i:
            self._extend(self._times[-1])
        return self._times[i], self._values[i]

    def value(self, t: float) -> float:
        if not t >= 0:
            raise ValueError(f"Trace.value: t must be >= 0 seconds, got {t}")
        self._extend(t)
        return self._values[bisect.bisect_right(self._times, t) - 1]

    def changes(self, until: float) -> list[tuple[float, float]]:
        """(time, value) change points up to ``until`` seconds."""
        self._extend(until)
        return [(t, v) for t, v in zip(self._times, self._values) if t <= until]

    def loaded_share(self, until: float) -> float:
        """Share of [0, until) spent loaded."""
        if not until > 0:
            raise ValueError(f"Trace.loaded_share: until must be positive, got {until}")
        pts = self.changes(until) + [(until, 0.0)]
        return sum(b[0] - a[0] for a, b in zip(pts, pts[1:]) if a[1] > 0) / until


class Scenario:
    """No interference; the base of the others."""

    name = "none"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.trace: Trace | None = None

    def start(self, executor=None) -> None:
        pass

    def stop(self) -> None:
        pass

    def describe(self) -> str:
        return "no background load"

    def __enter__(self) -> Scenario:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _TraceFollower(Scenario):
    """Runs ``apply(value)`` at every change of a fresh copy of the trace, in a background thread."""

    def __init__(self, seed: int, mean_on: float, mean_off: float, levels: Sequence[float]):
        super().__init__(seed)
        self._params = (mean_on, mean_off, tuple(levels))
        self.trace = Trace(seed, *self._params)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def apply(self, value: float) -> None:
        raise NotImplementedError

    def start(self, executor=None) -> None:
        self._stop_thread()  # only the follower: a subclass's stop() would also undo what its start() set up
        self.trace = Trace(self.seed, *self._params)
        self._stop.clear()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._follow, name=f"nestsparse-{self.name}", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        # Sleeps until each change point: this thread shares the interpreter with the inference, so it must
        # never poll.
        i = 0
        while True:
            t, v = self.trace.change(i)
            if self._stop.wait(max(0.0, self._t0 + t - time.perf_counter())):
                break
            self.apply(v)
            i += 1
        self.apply(0.0)

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def stop(self) -> None:
        self._stop_thread()

    def describe(self) -> str:
        on, off, levels = self._params
        return (
            f"seed {self.seed}: loaded periods of mean {on * 1e3:.0f} ms at {'/'.join(f'{v:g}' for v in levels)}, "
            f"quiet periods of mean {off * 1e3:.0f} ms"
        )


_SPINNER = """
import ctypes, os, signal, sys
os.nice(int(sys.argv[1]))
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
except Exception:
    pass
parent = os.getppid()
while os.getppid() == parent:
    for _ in range(100000):
        pass
"""


class CpuLoad(_TraceFollower):
    """Background CPU load: during a loaded period, ``value`` spinner processes run (see the module doc)."""

    name = "fluctuating"

    def __init__(
        self,
        seed: int = 0,
        mean_on: float = 0.4,
        mean_off: float = 4.0,
        levels: Sequence[float] = (1.0,),
        nice: int = 0,
    ):
        if not hasattr(signal, "SIGSTOP"):
            raise RuntimeError("the 'fluctuating' CPU-load scenario needs POSIX signals (Linux)")
        if any(not v > 0 for v in levels):
            raise ValueError(f"CpuLoad: levels are spinner processes per core (> 0), got {levels}")
        levels = tuple(max(1, round(v * (os.cpu_count() or 1))) for v in levels)
        if not 0 <= nice <= 19:
            raise ValueError(f"CpuLoad: nice must be in [0, 19], got {nice}")
        super().__init__(seed, mean_on, mean_off, levels)
        self.nice = nice
        self._procs: list[subprocess.Popen] = []

    def start(self, executor=None) -> None:
        if not self._procs:
            for _ in range(int(max(self._params[2]))):
                p = subprocess.Popen([sys.executable, "-c", _SPINNER, str(self.nice)], stdin=subprocess.DEVNULL)
                os.kill(p.pid, signal.SIGSTOP)
                self._procs.append(p)
        super().start(executor)

    def apply(self, value: float) -> None:
        for i, p in enumerate(self._procs):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT if i < value else signal.SIGSTOP)

    def stop(self) -> None:
        super().stop()
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self._procs = []

    def describe(self) -> str:
        return (
            f"background CPU load by spinner processes at nice {self.nice} on {os.cpu_count()} cores, "
            + super().describe()
        )


class Slowdown(_TraceFollower):
    """Synthetic slowdown trace: segments run during a loaded period are stretched by its factor."""

    name = "slowdown"

    def __init__(
        self, seed: int = 0, mean_on: float = 0.25, mean_off: float = 3.0, levels: Sequence[float] = (1.5, 2.5)
    ):
        if any(not v >= 1 for v in levels):
            raise ValueError(f"Slowdown: factors must be >= 1, got {levels}")
        super().__init__(seed, mean_on, mean_off, levels)
        self.factor = 1.0
        self._executor = None

    def apply(self, value: float) -> None:
        self.factor = value if value > 0 else 1.0

    def stretch(self, start: float, end: float) -> None:
        """Busy-waits (factor - 1) x (end - start): the segment [start, end) took ``factor`` times as long."""
        extra = (self.factor - 1.0) * (end - start)
        if extra > 0:
            until = time.perf_counter() + extra
            while time.perf_counter() < until:
                pass

    def start(self, executor=None) -> None:
        if executor is None:
            raise ValueError("the slowdown scenario acts through the executor: call start(executor)")
        self._executor = executor
        executor.interference = self.stretch
        super().start(executor)

    def stop(self) -> None:
        super().stop()
        if self._executor is not None:
            self._executor.interference = None
            self._executor = None


class GpuStream(_TraceFollower):
    """On CUDA: matrix products on a competing stream during loaded periods (value = how many at once)."""

    name = "gpu-stream"

    def __init__(
        self,
        seed: int = 0,
        mean_on: float = 0.25,
        mean_off: float = 3.0,
        levels: Sequence[int] = (1, 4),
        size: int = 4096,
        device: str = "cuda",
    ):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("the 'gpu-stream' scenario needs a CUDA device")
        super().__init__(seed, mean_on, mean_off, levels)
        self._size, self._device = size, device
        self._value = 0.0
        self._worker: threading.Thread | None = None
        self._quit = threading.Event()

    def apply(self, value: float) -> None:
        self._value = value

    def _work(self) -> None:
        import torch

        stream = torch.cuda.Stream(device=self._device)
        a = torch.randn(self._size, self._size, device=self._device, dtype=torch.float16)
        with torch.cuda.stream(stream):
            while not self._quit.is_set():
                if self._value > 0:
                    for _ in range(int(self._value)):
                        a = (a @ a).clamp_(-1, 1)
                    stream.synchronize()
                else:
                    time.sleep(0.0005)

    def start(self, executor=None) -> None:
        if self._worker is None:
            self._quit.clear()
            self._worker = threading.Thread(target=self._work, name="nestsparse-gpu-stream", daemon=True)
            self._worker.start()
        super().start(executor)

    def stop(self) -> None:
        super().stop()
        if self._worker is not None:
            self._quit.set()
            self._worker.join()
            self._worker = None


SCENARIOS = {"none": Scenario, "fluctuating": CpuLoad, "slowdown": Slowdown, "gpu-stream": GpuStream}


def make_scenario(name: str, seed: int = 0, **kwargs) -> Scenario:
    """The scenario ``name`` of ``SCENARIOS`` (keyword arguments override its trace parameters)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return SCENARIOS[name](seed=seed, **kwargs)
