"""CUDA nested CSR against the best dense and sparse baselines on the GPU, side by side in one run.

Layers (float16, density 0.1 at level 0 and 0.05 at level 1 of ONE nested buffer, batch 1-32): nestsparse
ncsr_linear against cuBLAS dense (x @ W.T) and torch.sparse CSR (cuSPARSE). The shapes are 4096x4096 and the DLMC
Transformer shapes (real patterns from --dlmc when the folder is there, random ones of the same density otherwise).
At batch 1 it also prints the level's bytes (values, indices, row arrays, x, y) over the time, as a share of the
measured device-to-device copy bandwidth.

Model: ResNet-50 (random weights, calibrated BatchNorm) converted at levels (0.1, 0.05), the 10% level through
nestsparse.fuse, against the dense model: the fastest of cuDNN NCHW, cuDNN channels-last and torch.compile, batch 1
and 32.

Timing: CUDA events around a CUDA graph of many calls (so launch overhead on the host is not measured), median of
--repeats replays. Every variant rotates over enough copies of its weights to exceed the L2 cache (a deployed model
does not sit in L2), and every output is checked against the dense float64 product first.

    python bench/gpu.py [--quick] [--dlmc DIR] [--csv PATH] [--no-resnet] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import nestsparse as ns

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DLMC, markdown_table, nested_from_pattern, nested_random, pattern_mask, read_smtx, write_csv  # noqa: E402

DENSITIES = (0.1, 0.05)
BATCHES = (1, 2, 4, 8, 16, 32)
TRANSFORMER = [
    (
        "transformer/magnitude_pruning/0.9/body_encoder_layer_0_self_attention_multihead_attention_q_fully_connected",
        512,
        512,
    ),
    ("transformer/magnitude_pruning/0.9/body_encoder_layer_0_ffn_conv1_fully_connected", 2048, 512),
    ("transformer/magnitude_pruning/0.9/body_encoder_layer_0_ffn_conv2_fully_connected", 512, 2048),
]


def l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))


def copies_for(nbytes: int) -> int:
    """Copies of a variant's weights whose total is at least 2x the L2 cache."""
    return max(1, -(-2 * l2_bytes() // max(nbytes, 1)))


def graph_time_ms(calls, repeats: int, per_graph: int) -> float:
    """Median time of one call: ``calls`` is a list of closures (one per weight copy), run round robin
    ``per_graph`` times inside a CUDA graph; each replay is timed with CUDA events."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in calls:  # warm up: plans, cuBLAS / cuSPARSE handles and workspaces
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            for i in range(per_graph):
                calls[i % len(calls)]()
        run = g.replay
    except Exception:  # a baseline that cannot be captured runs eagerly (its host overhead is then included)
        torch.cuda.synchronize()

        def run():
            for i in range(per_graph):
                calls[i % len(calls)]()

    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / per_graph)
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = graph_time_ms([lambda: dst.copy_(src)], 20, 4)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def level_bytes(w: ns.NestedCSR, level: int, n: int, K: int, M: int) -> int:
    nnz = int((w.row_end[level] - w.row_ptr[:-1]).sum())
    return nnz * (w.values.element_size() + w.col_idx.element_size()) + 8 * M + 2 * n * (K + M)


def layer_rows(name: str, w32: torch.Tensor, nw: ns.NestedCSR, n: int, args, bw: float) -> list[dict]:
    """Time one layer at batch n: dense cuBLAS, torch.sparse CSR of each level, nestsparse at each level."""
    M, K = w32.shape
    dense = w32.half().cuda()
    nw = nw.to("cuda", torch.float16)
    plan = nw.plan()
    x = torch.randn(n, K, device="cuda", dtype=torch.float16)
    ref = {lvl: x.double() @ nw.to_dense(lvl).double().T for lvl in range(2)}
    for lvl in range(2):
        out = nw.linear(x, lvl, None, "none", plan)
        err = (out.double() - ref[lvl]).abs().max().item() / (ref[lvl].abs().max().item() + 1)
        if err > 1e-2:
            raise SystemExit(f"{name} batch {n} level {lvl}: nestsparse differs from float64 by {err:.3g}")
    ns.check_errors()
    dn = [dense.clone() for _ in range(copies_for(dense.numel() * 2))]
    t_dense = graph_time_ms([lambda d=d: x @ d.T for d in dn], args.repeats, args.per_graph)
    rows = []
    for lvl in range(2):
        lb = level_bytes(nw, lvl, n, K, M)
        ws = [dataclasses.replace(nw, values=nw.values.clone()) for _ in range(copies_for(lb))]
        plans = [w.plan() for w in ws]
        t_ns = graph_time_ms(
            [lambda w=w, p=p: w.linear(x, lvl, None, "none", p) for w, p in zip(ws, plans)],
            args.repeats,
            args.per_graph,
        )
        csr = nw.to_dense(lvl).to_sparse_csr()
        cs = [csr.clone() for _ in range(copies_for(lb))]
        xt = x.T.contiguous()
        try:
            t_csr = graph_time_ms([lambda c=c: (c @ xt).T for c in cs], args.repeats, args.per_graph)
        except Exception as e:  # noqa: BLE001
            tqdm.write(f"torch.sparse CSR failed on {name}: {type(e).__name__}: {e}")
            t_csr = float("nan")
        row = {
            "layer": name,
            "M x K": f"{M}x{K}",
            "batch": n,
            "level": lvl,
            "density": round(int((nw.row_end[lvl] - nw.row_ptr[:-1]).sum()) / (M * K), 4),
            "cuBLAS ms": round(t_dense, 4),
            "CSR ms": round(t_csr, 4),
            "nestsparse ms": round(t_ns, 4),
            "x cuBLAS": round(t_dense / t_ns, 2),
            "x CSR": round(t_csr / t_ns, 2),
        }
        if n == 1:
            row["% copy BW"] = round(100 * lb / (t_ns * 1e-3) / 1e9 / bw, 1)
        rows.append(row)
    return rows


def layers(args, bw: float) -> list[dict]:
    shapes = [("square", 4096, 4096, None)]
    for path, M, K in TRANSFORMER[: 1 if args.quick else None]:
        shapes.append((path.split("/")[-1].replace("body_", "")[:40], M, K, Path(args.dlmc) / f"{path}.smtx"))
    rows = []
    batches = (1, 8, 32) if args.quick else BATCHES
    for name, M, K, smtx in tqdm(shapes, desc="layers", file=sys.stderr):
        if smtx is not None and smtx.exists():
            nr, nc, rp, ci = read_smtx(smtx)
            w32, nw = nested_from_pattern(pattern_mask(nr, nc, rp, ci), DENSITIES[1] / DENSITIES[0], 0)
            name += " (DLMC)"
        else:
            w32, nw = nested_random((M, K), DENSITIES, 0)
        for n in batches:
            rows += layer_rows(name, w32, nw, n, args, bw)
    return rows


def calibrated_resnet50():
    """ResNet-50 with random weights and non-trivial BatchNorm statistics (eval mode), and the layers it keeps dense."""
    from nestsparse.apps import models as zoo  # noqa: PLC0415

    torch.manual_seed(0)
    model = zoo.build("resnet50").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=g))
    return model, zoo.dense_layers(model)


def dense_model_times(dense: torch.nn.Module, x: torch.Tensor, args) -> dict[str, float]:
    """ms per call of the dense float16 model on CUDA: eager NCHW and channels-last (cuDNN), and torch.compile of the
    faster layout (unless --no-compile). Call under torch.inference_mode()."""
    dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    t = {
        "cuDNN NCHW": graph_time_ms([lambda: dense(x)], args.repeats, 2),
        "cuDNN channels-last": graph_time_ms([lambda: dense_cl(x_cl)], args.repeats, 2),
    }
    if not args.no_compile:
        m, xx = (dense_cl, x_cl) if t["cuDNN channels-last"] < t["cuDNN NCHW"] else (dense, x)
        compiled = torch.compile(m)
        t["torch.compile"] = graph_time_ms([lambda: compiled(xx)], args.repeats, 2)
    return t


def resnet(args) -> list[dict]:
    model, dense_layers = calibrated_resnet50()
    tags = ns.model_tags(model, DENSITIES, skip=dense_layers)
    sparse = ns.fuse(ns.convert(model, tags, densities=DENSITIES).eval()).eval().half().cuda()
    ns.set_level(sparse, 0)
    dense = copy.deepcopy(model).half().cuda()
    ref = ns.to_dense(ns.convert(model, tags, densities=DENSITIES).eval(), 0).eval().half().cuda()
    rows = []
    for n in (1, 32):
        x = torch.randn(n, 3, 224, 224, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            got, want = sparse(x).float(), ref(x).float()
            err = (got - want).abs().max().item() / (want.abs().max().item() + 1)
            if err > 5e-2:
                raise SystemExit(f"resnet50 batch {n}: the 10% level differs from its dense model by {err:.3g}")
            t = dense_model_times(dense, x, args)
            best = min(t.values())
            t["nestsparse 10%"] = graph_time_ms([lambda: sparse(x)], args.repeats, 2)
        ns.check_errors()
        rows.append(
            {
                "model": "resnet50",
                "batch": n,
                **{k: round(v, 3) for k, v in t.items()},
                "x best dense": round(best / t["nestsparse 10%"], 2),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and batches, fewer repeats")
    ap.add_argument("--dlmc", default=str(DEFAULT_DLMC), help="the DLMC folder (random stand-ins without it)")
    ap.add_argument("--csv", help="also write the layer rows here")
    ap.add_argument("--no-resnet", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the dense baselines")
    args = ap.parse_args()
    args.repeats = 10 if args.quick else 30
    args.per_graph = 20 if args.quick else 50
    if not torch.cuda.is_available() or not torch.ops.nestsparse.with_cuda():
        raise SystemExit("bench/gpu.py needs a GPU and a CUDA build of nestsparse")
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, nestsparse {ns.__version__}")
    ns.set_deferred_checks(True)  # graphs: no host synchronisation inside the ops; checked after each variant
    bw = copy_bandwidth_gbs()
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write); L2 {l2_bytes() >> 20} MiB")
    rows = layers(args, bw)
    cols = [
        "layer",
        "M x K",
        "batch",
        "level",
        "density",
        "cuBLAS ms",
        "CSR ms",
        "nestsparse ms",
        "x cuBLAS",
        "x CSR",
        "% copy BW",
    ]
    print("\n## Layers, float16 (targets: >= 3x cuBLAS, >= 2x CSR at density 0.1; batch 1 >= 70% of copy bandwidth)\n")
    print(markdown_table(rows, cols))
    write_csv(args.csv, rows, cols)
    lvl0 = [r for r in rows if r["level"] == 0]
    met = lambda key, bar: sum(r[key] >= bar for r in lvl0)  # noqa: E731
    print(
        f"\nlevel 0 (density 0.1): >= 3x cuBLAS in {met('x cuBLAS', 3)}/{len(lvl0)}, >= 2x CSR in "
        f"{met('x CSR', 2)}/{len(lvl0)}, batch-1 rows >= 70% copy bandwidth in "
        f"{sum(r.get('% copy BW', 0) >= 70 for r in lvl0 if r['batch'] == 1)}/{sum(r['batch'] == 1 for r in lvl0)}"
    )
    if not args.no_resnet:
        rrows = resnet(args)
        print("\n## ResNet-50 end to end, float16, ms (target: the 10% level faster than the best dense)\n")
        print(markdown_table(rrows, list(rrows[0])))


if __name__ == "__main__":
    main()
