"""Optional peer comparison (not run in CI): nestsparse against DeepSparse 1.8 on the same sparse ResNet-50 weights.

DeepSparse (Neural Magic's CPU sparse inference runtime, deprecated in 2025; 1.8.0 is its last release) runs the
dense-with-zeros ONNX export of each level (nestsparse.to_dense(model, level)), the form it takes pruned models
in. It lives in its own virtual environment (it pins its own onnx and numpy), set up once:

    python3 -m venv .venv-deepsparse && .venv-deepsparse/bin/pip install deepsparse==1.8.0

This script runs in the project's environment (it needs `onnx` to export: `make bench-extras`) and drives a
DeepSparse worker process in the other one, so both are timed side by side in one run: each round times every
nestsparse variant, then asks the worker to time every DeepSparse engine, the order alternating between rounds.
NM_DISABLE_ANALYTICS=1 is set for the worker. Threads: both use --threads (default: all cores).

    python bench/deepsparse_peer.py [--batches 1,16] [--rounds 15] [--deepsparse-python .venv-deepsparse/bin/python]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import nestsparse as ns
from models import calibrate_batchnorm
from nestsparse.apps import models as zoo

from common import REPO_ROOT, check_close

WORKER = r"""
import json, os, sys, time
import numpy as np
from deepsparse import Engine
engines = {}
for line in sys.stdin:
    req = json.loads(line)
    if req["cmd"] == "load":
        eng = Engine(model=req["path"], batch_size=req["batch"], num_cores=req["threads"])
        x = np.load(req["input"])
        engines[req["key"]] = (eng, [x])
        out = eng.run([x])[0]
        np.save(req["output"], out)
        print(json.dumps({"ok": True}), flush=True)
    elif req["cmd"] == "time":
        eng, inp = engines[req["key"]]
        ts = []
        for _ in range(req["n"]):
            t = time.perf_counter(); eng.run(inp); ts.append(time.perf_counter() - t)
        print(json.dumps({"times": ts}), flush=True)
"""


class Worker:
    def __init__(self, python: str):
        env = {**os.environ, "NM_DISABLE_ANALYTICS": "1"}
        self.proc = subprocess.Popen(
            [python, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the DeepSparse worker stopped (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--deepsparse-python", default=str(REPO_ROOT / ".venv-deepsparse" / "bin" / "python"))
    args = ap.parse_args()
    if not Path(args.deepsparse_python).exists():
        raise SystemExit(
            f"no DeepSparse environment at {args.deepsparse_python}; create it with: python3 -m venv .venv-deepsparse "
            "&& .venv-deepsparse/bin/pip install deepsparse==1.8.0"
        )
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = zoo.resnet50()
    calibrate_batchnorm(model, lambda: torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(2)))
    model.eval()
    tags = ns.model_tags(model, (0.10, 0.05), scope="layer", skip=zoo.dense_layers(model))
    sparse = ns.convert(model, tags).eval()
    fused = ns.fuse(sparse)
    worker = Worker(args.deepsparse_python)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
            np_in = Path(tmp) / f"x{batch}.npy"
            np.save(np_in, x.numpy())
            variants = {}
            for level in range(2):
                dense = ns.to_dense(sparse, level)
                ref = dense(x)
                path = Path(tmp) / f"l{level}-b{batch}.onnx"
                with torch.no_grad():
                    torch.onnx.export(dense, (x,), str(path), dynamo=False, opset_version=13)  # DeepSparse: <= 19
                out_path = Path(tmp) / f"out-l{level}-b{batch}.npy"
                key = f"l{level}-b{batch}"
                worker.ask(
                    cmd="load",
                    path=str(path),
                    batch=batch,
                    threads=args.threads,
                    key=key,
                    input=str(np_in),
                    output=str(out_path),
                )
                check_close(torch.from_numpy(np.load(out_path)), ref, f"DeepSparse L{level} batch {batch}", 1e-2, 1e-3)
                f = copy.deepcopy(fused)
                ns.set_level(f, level)
                check_close(f(x), ref, f"nestsparse L{level} batch {batch}", 1e-2, 1e-3)
                compiled = torch.compile(f)
                compiled(x)
                variants[level] = {"fused": lambda f=f: f(x), "fused+compile": lambda c=compiled: c(x), "ds": key}
            times: dict[tuple, list[float]] = {}
            n = 3 if batch == 1 else 1
            for r in range(args.rounds):
                order = [0, 1] if r % 2 == 0 else [1, 0]
                for level in order:
                    for name in ("fused", "fused+compile"):
                        times.setdefault((level, name), []).extend(timed(variants[level][name], n))
                    ts = worker.ask(cmd="time", key=variants[level]["ds"], n=n)["times"]
                    times.setdefault((level, "DeepSparse 1.8"), []).extend(ts)
            for level in range(2):
                ds = statistics.median(times[(level, "DeepSparse 1.8")]) * 1e3
                for name in ("fused", "fused+compile", "DeepSparse 1.8"):
                    ms = statistics.median(times[(level, name)]) * 1e3
                    rows.append((batch, f"L{level} ({(10, 5)[level]}%)", name, ms, ds / ms))
    worker.close()
    print(f"\nResNet-50, 224x224, {args.threads} threads, per-layer 10% / 5% levels, median of {args.rounds} rounds")
    print("| batch | level | runtime | ms | DeepSparse ms / ms |")
    print("|---|---|---|---:|---:|")
    for b, lvl, name, ms, ratio in rows:
        print(f"| {b} | {lvl} | {name} | {ms:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
