"""Nested mask training under DistributedDataParallel: two CPU processes (gloo) must end with the same tags on
every rank, and the same tags and weights as one process that trains on the whole batches."""

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import nestsparse
from nestsparse.pruning import SupervisedTask, core_first, joint, prepare

WORLD = 2
DENSITIES = (0.3, 0.1)
# 64 samples, batches of 16 (8 per rank): 4 steps an epoch. joint: 16 steps, the schedule prunes over steps 1-8,
# grow-and-prune runs at steps 10, 12, 14. core_first: the core prunes over 8 steps, trains 4 more, then level 0
# trains 8 steps (with "core_gap", grow-and-prune every 3 steps of each level after its pruning).
RUNS = {
    "joint": dict(fn="joint", epochs=4),
    "joint_gap": dict(fn="joint", epochs=4, grow_prune_every=2, grow_prune_fraction=0.2),
    "core": dict(fn="core_first", prune_epochs=2, core_epochs=1, level_epochs=2),
    "core_gap": dict(
        fn="core_first", prune_epochs=2, core_epochs=1, level_epochs=2, grow_prune_every=3, grow_prune_fraction=0.2
    ),
}


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def make_task() -> SupervisedTask:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 10, generator=g)
    y = (x @ torch.randn(10, 3, generator=g)).argmax(1)
    return SupervisedTask((x[:64], y[:64]), (x[64:], y[64:]), batch_size=16, seed=2)


def train(model: nn.Module, name: str) -> dict:
    kw = dict(RUNS[name])
    fn = kw.pop("fn")
    if fn == "joint":
        return joint(model, make_task(), DENSITIES, kw.pop("epochs"), progress=False, **kw)
    return core_first(model, make_task(), DENSITIES, progress=False, **kw)


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    """One rank: every run of RUNS on a DistributedDataParallel model; saves tags and weights per rank."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name in RUNS:
            model = build_model()
            prepare(model, len(DENSITIES))
            ddp = nn.parallel.DistributedDataParallel(model)
            tags = train(ddp, name)
            gathered = [None] * world
            dist.all_gather_object(gathered, {n: t.clone() for n, t in tags.items()})
            results[name] = {
                "tags": tags,
                "gathered": gathered,
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            }
        # a converted model: DDP leaves its index buffers alone (gloo and NCCL cannot broadcast int16), one SGD step
        # on this rank's half of the batch averages the value gradients like one process on the whole batch
        model = converted_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = converted_batch()
        half = x.shape[0] // world
        converted_step(ddp, x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half])
        results["converted"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # a model wrapped before prepare() is refused, on every rank
        try:
            joint(nn.parallel.DistributedDataParallel(build_model()), make_task(), DENSITIES, 1, progress=False)
            results["unprepared"] = "no error"
        except ValueError as e:
            results["unprepared"] = str(e)
        torch.save(results, Path(outdir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def converted_model() -> nn.Module:
    model = build_model()
    return nestsparse.convert(model, nestsparse.model_tags(model, DENSITIES))


def converted_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)


def converted_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("ddp")
    # spawned children start a fresh interpreter: they must find nestsparse (and this module) on their own
    package_dir = str(Path(nestsparse.__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([package_dir] + ([old] if old else []))
    try:
        ctx = mp.start_processes(
            worker, args=(WORLD, free_port(), str(outdir)), nprocs=WORLD, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + 240
        # join() raises ProcessRaisedException / ProcessExitedException when a worker fails
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join(5)
                pytest.fail("the DistributedDataParallel workers did not finish in time")
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    ranks = [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {}
        for name in RUNS:
            model = build_model()
            tags = train(model, name)
            single[name] = {"tags": tags, "state": model.state_dict()}
        model = converted_model()
        converted_step(model, *converted_batch())
        single["converted"] = model.state_dict()
    finally:
        torch.set_num_threads(threads)
    return ranks, single


def assert_same_tags(a, b, what):
    assert set(a) == set(b), what
    for n in a:
        assert a[n].dtype == torch.int8 and torch.equal(a[n], b[n]), (
            f"{what}: layer {n}: {int((a[n] != b[n]).sum())} tags differ"
        )


@pytest.mark.parametrize("name", list(RUNS))
def test_ranks_hold_the_same_tags(ddp_results, name):
    ranks, _ = ddp_results
    for r in range(WORLD):
        for other in range(WORLD):
            assert_same_tags(ranks[r][name]["gathered"][other], ranks[r][name]["tags"], f"rank {r} vs {other}")
    assert_same_tags(ranks[0][name]["tags"], ranks[1][name]["tags"], "rank 0 vs rank 1")
    for k, v in ranks[0][name]["state"].items():
        assert torch.equal(v, ranks[1][name]["state"][k]), k
    for t in ranks[0][name]["tags"].values():
        for lvl, d in enumerate(DENSITIES):
            assert int((t >= lvl).sum()) == round(d * t.numel())


@pytest.mark.parametrize("name", list(RUNS))
def test_ddp_matches_one_process(ddp_results, name):
    ranks, single = ddp_results
    assert_same_tags(ranks[0][name]["tags"], single[name]["tags"], "DDP vs one process")
    state = ranks[0][name]["state"]
    assert set(state) == set(single[name]["state"])
    for k, v in single[name]["state"].items():
        if v.is_floating_point():
            torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=k)
        else:
            assert torch.equal(state[k], v), k


def test_grow_and_prune_ran(ddp_results):
    _, single = ddp_results
    # grow-and-prune moved level-0 positions: the runs with and without it differ there but not at level 1
    a, b = single["joint"]["tags"], single["joint_gap"]["tags"]
    assert any(not torch.equal(a[n] >= 0, b[n] >= 0) for n in a)
    assert all(torch.equal(a[n] >= 1, b[n] >= 1) for n in a)


def test_unprepared_ddp_model_is_refused(ddp_results):
    ranks, _ = ddp_results
    for r in range(WORLD):
        assert "prepare" in ranks[r]["unprepared"], ranks[r]["unprepared"]


def test_a_converted_model_trains_under_ddp(ddp_results):
    # DistributedDataParallel of a converted model failed at construction ("Invalid scalar type": its int16 index
    # buffers were broadcast). Now both ranks end equal, and equal to one process on the whole batch.
    ranks, single = ddp_results
    a, b, one = ranks[0]["converted"], ranks[1]["converted"], single["converted"]
    assert set(a) == set(b) == set(one)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between ranks"
        torch.testing.assert_close(a[k], one[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs from one process")
    moved = [k for k in a if k.endswith("values") and not torch.equal(a[k], converted_model().state_dict()[k])]
    assert moved, "the step changed no values"
