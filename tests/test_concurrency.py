"""Threads: index buffers rewritten during a forward (never a crash), threads at their own levels on one model's
weights (nestsparse.shared_copy), and a rerouting executor shared between threads."""

import subprocess
import sys
import threading

import pytest
import torch

import nestsparse as ns
from nestsparse.apps.models import dense_layers, resnet_small
from nestsparse.runtime import ReroutingExecutor

LEVELS = (0.3, 0.1)

# A writer thread keeps rewriting one index buffer of a live layer (garbage of every sign and size, then the good
# arrays back) while the main thread runs forwards through every kernel path: each forward must return or raise a
# RuntimeError, and the process must not crash. Run in a subprocess, so a crash fails the test instead of the
# suite. (Before the kernels read the checked row slices from a snapshot, NBCR segfaulted here.)
WRITER_SCRIPT = """
import sys, threading, torch, nestsparse as ns
torch.manual_seed(0)
fmt = sys.argv[1]
dense = [torch.nn.Linear(67, 45), torch.nn.Conv2d(6, 10, 3, padding=1, stride=2)]
layers = []
for d, cls in zip(dense, [ns.NestedSparseLinear, ns.NestedSparseConv2d]):
    w = d.weight.reshape(d.weight.shape[0], -1)
    tags = ns.magnitude_tags(w, (0.4, 0.1)) if fmt == "ncsr" else ns.bcr_tags(w, (0.4, 0.1), (4, 4))
    layers.append(cls.from_dense(d, tags.reshape(d.weight.shape), format=fmt, block_shape=(4, 4)))
inputs = [[torch.randn(1, 67), torch.randn(64, 67)], [torch.randn(2, 6, 9, 9)]]
stop = threading.Event()
def writer(layer):
    bufs = [b for b in layer.index_tensors()]
    good = [b.clone() for b in bufs]
    g = torch.Generator().manual_seed(1)
    while not stop.is_set():
        for b, ok in zip(bufs, good):
            junk = torch.randint(-2**15, 2**15 - 1, b.shape, generator=g).to(b.dtype)
            if b.dtype == torch.int32:
                junk = junk * torch.randint(1, 2**16, b.shape, generator=g, dtype=torch.int32)
            b.copy_(junk)
            b.copy_(ok)
calls = errors = 0
# The format object shares the layer's tensors; a plan fixed from the good arrays sends every call to the kernels
# (a module would rebuild its plan from the changed buffers and often stop at the plan's checks).
lin, conv = (m.nested() for m in layers)
plans = [m.plan() for m in layers]
runs = [
    lambda x, level: lin.linear(x, level, None, "none", plans[0]),
    lambda x, level: conv.conv2d(x, level, [3, 3], None, 2, 1, 1, 1, "none", plans[1]),
]
for layer, xs, run in zip(layers, inputs, runs):
    t = threading.Thread(target=writer, args=(layer,))
    t.start()
    try:
        for _ in range(int(sys.argv[2])):
            for x in xs:
                for level in (0, 1):
                    calls += 1
                    try:
                        run(x, level)
                    except RuntimeError:
                        errors += 1
    finally:
        stop.set()
        t.join()
        stop.clear()
assert errors < calls, "no call got through the kernels"
print("ok", calls, errors)
"""


@pytest.mark.parametrize("fmt", ["ncsr", "nbcr"])
def test_index_buffers_rewritten_during_forwards_never_crash(fmt):
    run = subprocess.run([sys.executable, "-c", WRITER_SCRIPT, fmt, "150"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"the process died ({run.returncode}): {run.stderr[-2000:]}"
    assert run.stdout.startswith("ok"), run.stdout + run.stderr[-2000:]


def converted_resnet(fmt):
    torch.manual_seed(0)
    dense = resnet_small().eval()
    kw = {"structure": "bcr", "block_shape": (4, 4)} if fmt.name == "nbcr" else {}
    tags = ns.model_tags(dense, LEVELS, skip=dense_layers(dense), **kw)
    return ns.convert(dense, tags, format=fmt.name, block_shape=(4, 4)).eval()


def test_threads_at_their_own_levels_on_one_models_weights(fmt):
    model = converted_resnet(fmt)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = [ns.set_level(model, lvl)(x) for lvl in range(len(LEVELS))]
    ns.set_level(model, 0)
    copies = [ns.shared_copy(model) for _ in range(4)]
    for i, c in enumerate(copies):
        ns.set_level(c, i % len(LEVELS))
    assert all(p is q for p, q in zip(model.parameters(), copies[1].parameters())), "weights must be shared"
    failures = []

    def serve(m, level, n=40):
        with torch.inference_mode():
            for _ in range(n):
                if not torch.equal(m(x), expected[level]):
                    failures.append(level)

    threads = [threading.Thread(target=serve, args=(c, i % len(LEVELS))) for i, c in enumerate(copies)]
    threads.append(threading.Thread(target=serve, args=(model, 0)))  # the original keeps its own level
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert {m.level for m in ns.level_aware_modules(model).values()} == {0}


def test_an_executor_shared_by_threads_and_two_executors_on_one_model(fmt):
    model = converted_resnet(fmt)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = [ns.set_level(model, lvl)(x) for lvl in range(len(LEVELS))]
    shared = ReroutingExecutor(model, "layer")
    other = ReroutingExecutor(model, "layer")
    results, errors = [], []

    def serve(ex, level, n=25):
        try:
            for _ in range(n):
                r = ex(x, policy=f"static:{level}")
                results.append((level, r.levels, torch.equal(r.output, expected[level])))
        except Exception as e:  # noqa: BLE001 -- any failure is what the test reports
            errors.append(repr(e))

    threads = [threading.Thread(target=serve, args=(ex, lvl)) for ex in (shared, shared, other) for lvl in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared.close(), other.close()
    assert not errors
    assert len(results) == 6 * 25
    assert all(set(levels) == {level} and same for level, levels, same in results), "mixed-level outputs"


def test_an_executor_called_from_inside_its_own_inference_is_refused():
    class Calls(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.executor = None

        def forward(self, x):
            if self.executor is not None:
                self.executor(x, policy="static:0")
            return self.inner(x)

    dense = torch.nn.Sequential(torch.nn.Linear(8, 8))
    layer = ns.convert(dense, {"0": ns.magnitude_tags(dense[0].weight, LEVELS)})
    outer = Calls(layer)
    ex = ReroutingExecutor(outer, ["inner"])
    outer.executor = ReroutingExecutor(outer, ["inner"])
    with pytest.raises(RuntimeError, match="not re-entrant"):
        ex(torch.randn(2, 8), policy="static:0")
    outer.executor = None
    assert ex(torch.randn(2, 8), policy="static:1").levels == (1,)  # the guard was released


def test_shared_copy_copies_no_tensor_and_keeps_its_own_levels():
    model = converted_resnet(ns.FORMATS["ncsr"])
    before = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    c = ns.shared_copy(model)
    assert {id(t) for t in list(c.parameters()) + list(c.buffers())} == before
    assert all(a is not b for a, b in zip(model.modules(), c.modules()))
    ns.set_level(c, 1)
    assert {m.level for m in ns.level_aware_modules(model).values()} == {0}
    with ReroutingExecutor(model, "layer") as ex:  # its checkpoints stay on the original
        twin = ns.shared_copy(model)
        hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
        assert hooks > 0 and sum(len(m._forward_pre_hooks) for m in twin.modules()) == 0
        with torch.no_grad():
            twin(torch.randn(2, 1, 8, 8))
        assert ex(torch.randn(2, 1, 8, 8), policy="static:1").levels == (1,) * len(ex.order)
