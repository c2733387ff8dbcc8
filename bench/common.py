"""Shared helpers for the benchmark scripts: timing, memory bandwidth, nested weights from random or DLMC
patterns, .smtx reading, correctness checks and table output."""

from __future__ import annotations

import csv
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import nestsparse as ns
from nestsparse.runtime import median_time

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DLMC = REPO_ROOT.parent / "shared" / "dlmc"


def time_ms(fn, min_run_time: float, warmup: int = 3) -> float:
    """Median milliseconds per call of ``fn()`` at torch's thread count (nestsparse.runtime.median_time)."""
    return median_time(fn, min_run_time=min_run_time, warmup=warmup) * 1e3


def read_bandwidth_gbs(mib: int = 512, min_run_time: float = 0.5) -> float:
    """Memory read bandwidth in GB/s: torch.sum over an fp32 tensor far larger than any cache."""
    x = torch.rand(mib * 2**20 // 4)
    ms = time_ms(lambda: x.sum(), min_run_time)
    return x.numel() * 4 / (ms * 1e-3) / 1e9


def read_smtx(path: Path) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(nrows, ncols, row_ptr, col_idx) of a DLMC .smtx pattern file."""
    with open(path) as f:
        nrows, ncols, nnz = (int(v) for v in f.readline().replace(",", " ").split())
        row_ptr = torch.tensor([int(v) for v in f.readline().split()], dtype=torch.int64)
        col_idx = torch.tensor([int(v) for v in f.readline().split()], dtype=torch.int64)
    if row_ptr.numel() != nrows + 1 or col_idx.numel() != nnz or int(row_ptr[-1]) != nnz:
        raise SystemExit(
            f"{path}: malformed .smtx (header {nrows}x{ncols}, nnz {nnz}; read "
            f"{row_ptr.numel()} offsets, {col_idx.numel()} indices)"
        )
    return nrows, ncols, row_ptr, col_idx


def pattern_mask(nrows: int, ncols: int, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> torch.Tensor:
    """Dense boolean (nrows, ncols) mask of a CSR pattern."""
    rows = torch.repeat_interleave(torch.arange(nrows), row_ptr[1:] - row_ptr[:-1])
    mask = torch.zeros(nrows, ncols, dtype=torch.bool)
    mask[rows, col_idx] = True
    return mask


def nested_random(shape: tuple[int, ...], densities: tuple[float, ...], seed: int) -> tuple[torch.Tensor, ns.NestedCSR]:
    """A random fp32 weight and its nested CSR from one-shot magnitude tags at ``densities``."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return w, ns.NestedCSR.from_dense(w, ns.magnitude_tags(w, densities), densities=densities)


def nested_from_pattern(mask: torch.Tensor, keep: float, seed: int) -> tuple[torch.Tensor, ns.NestedCSR]:
    """A weight with random values on ``mask`` (the level-0 pattern) and a nested level 1 that keeps the
    ``keep`` fraction of them with the largest magnitude."""
    w = torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed)) * mask
    d0 = int(mask.sum()) / mask.numel()
    # Zeros outside the pattern rank last, so level 0 at density d0 is exactly the pattern.
    densities = (d0, keep * d0)
    tags = ns.magnitude_tags(w, densities)
    assert int((tags >= 0).sum()) == int(mask.sum()), "level 0 must be the DLMC pattern"
    return w, ns.NestedCSR.from_dense(w, tags, densities=densities)


def check_close(out: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = 1e-3, atol_scale: float = 1e-4) -> None:
    """Aborts the run if a kernel's result is wrong: a timing of a wrong result is worthless. The absolute
    tolerance is ``atol_scale`` times the reference's largest magnitude (at least 1)."""
    tol = atol_scale * max(float(ref.abs().max()), 1.0)
    if out.shape != ref.shape or not torch.allclose(out, ref, rtol=rtol, atol=tol):
        err = float((out - ref).abs().max()) if out.shape == ref.shape else float("nan")
        raise SystemExit(
            f"WRONG RESULT in {what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}, "
            f"max |err| = {err:.3g} (atol {tol:.3g}, rtol {rtol:g}); not timing it"
        )


def geomean(xs) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def fmt(v, digits: int = 4) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: str | None, rows: list[dict], columns: list[str]) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"\nCSV written to {path}", file=sys.stderr)


def cpu_snapshot() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process, wall seconds), for other_cpu_share."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user .. steal (guest is inside user)
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except OSError:  # not Linux: other processes cannot be seen, so none are assumed
        return 0.0, 0.0, time.monotonic()
    return busy, sum(os.times()[:2]), time.monotonic()


def other_cpu_share(since: tuple[float, float, float]) -> float:
    """Share of all CPUs that OTHER processes used since ``since``: timings taken while another build or
    test run held a core are not trustworthy, and the tables must say so."""
    busy, mine, wall = (b - a for a, b in zip(since, cpu_snapshot()))
    return max(0.0, (busy - mine) / (max(wall, 1e-6) * (os.cpu_count() or 1)))


def wait_for_quiet(max_share: float = 0.05, window: float = 0.5, timeout: float = 120.0) -> None:
    """Blocks until other processes leave the CPUs almost idle for one window (or ``timeout`` passes)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        snap = cpu_snapshot()
        time.sleep(window)
        if other_cpu_share(snap) <= max_share:
            return


def run_quietly(fn, patience: float, max_share: float = 0.10):
    """(fn(), share of the CPUs other processes took while it ran). On a shared machine a build or test run
    that starts mid-measurement makes every parallel kernel wait for a descheduled thread, so with some
    ``patience`` (seconds) such a measurement is thrown away and redone after a quiet spell, up to 3 times.
    Without patience (CI smoke runs) it is kept and only reported."""
    for _ in range(3 if patience else 1):
        wait_for_quiet(timeout=patience)
        snap = cpu_snapshot()
        out = fn()
        share = other_cpu_share(snap)
        if share <= max_share:
            break
    return out, share


def load_warning(shares: list[float], max_share: float = 0.10) -> str:
    """What the other_cpu column means, and a warning if some measurements could not be taken quietly."""
    bad = sum(s > max_share for s in shares)
    note = (
        f"other_cpu: % of the {os.cpu_count()} CPUs that other processes used while a row was measured "
        f"(in full runs, rows above {100 * max_share:.0f}% are redone after a quiet spell, up to 3 times)"
    )
    return note + (
        f". WARNING: {bad} of {len(shares)} measurements stayed above it; those timings are NOT trustworthy."
        if bad
        else "; every measurement ran on otherwise idle CPUs."
    )


def kernel_build() -> str:
    """Which kernels ran: the commit, whether csrc/ differed from it, and when the loaded library was built
    (csrc/ may be rebuilt between runs; a run keeps the library it loaded)."""

    def git(*a):
        try:
            return subprocess.run(["git", "-C", str(REPO_ROOT), *a], capture_output=True, text=True)
        except OSError:
            return subprocess.CompletedProcess(a, 2, "", "")

    head = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown commit"
    dirty = " + uncommitted csrc/ changes" if git("diff", "--quiet", "HEAD", "--", "csrc").returncode == 1 else ""
    lib = Path(ns.library_path())
    return f"{head}{dirty}, {lib.name} built {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(lib.stat().st_mtime))}"


def environment() -> str:
    """What the numbers were measured on, to print above every table."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, nestsparse {ns.__version__} "
        f"(cpu isa {ns.cpu_isa()}; {kernel_build()}), CPU: {cpu}, load average {load}"
    )
