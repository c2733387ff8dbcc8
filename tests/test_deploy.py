"""Deployment outside Python: nestsparse.export makes the level an input of the exported program; a plain export or
trace, which would bake the level in, is refused; the ONNX path is to_dense. The program checks itself (level range,
the digests of its constants): saved programs with edited constants are refused, in Python and in the C++ program
of examples/cpp. The README's Deploy section (run by test_readme.py) covers the fresh process with only the op
library loaded and the C++ program."""

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import nestsparse

ROOT = Path(__file__).resolve().parents[1]
REFUSED = "is not what nestsparse.export recorded"


def small_cnn(fmt_name: str = "ncsr"):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 5 * 7, 10)
    ).eval()
    model[1].running_mean.uniform_(-0.5, 0.5)
    block = {"block_shape": (4, 4)} if fmt_name == "nbcr" else {}
    structure = "bcr" if fmt_name == "nbcr" else "unstructured"
    tags = nestsparse.model_tags(model, (0.3, 0.1, 0.02), structure=structure, **block)
    return nestsparse.convert(model, tags, format=fmt_name, **block).eval()


@pytest.mark.parametrize("fmt_name", ["ncsr", "nbcr"])
@pytest.mark.parametrize("fused", [False, True])
def test_one_exported_program_serves_every_level(fmt_name, fused):
    sparse = small_cnn(fmt_name)
    model = nestsparse.fuse(sparse) if fused else sparse
    nestsparse.set_level(model, 2)
    program = nestsparse.export(model, (torch.randn(2, 3, 5, 7),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert {m.level for m in nestsparse.level_aware_modules(model).values()} == {2}  # the caller's model untouched
    run = program.module()
    x = torch.randn(3, 3, 5, 7)  # another batch than the example's
    outs = []
    for level in range(3):
        nestsparse.set_level(model, level)
        with torch.no_grad():
            want = model(x)
            got = run(torch.tensor(level), x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        outs.append(got)
    assert not torch.allclose(outs[0], outs[2])  # the levels differ: the level really is an input
    with pytest.raises(RuntimeError):
        run(torch.tensor(3), x)


def test_exported_program_runs_after_a_save_and_load(tmp_path):
    sparse = small_cnn()
    x = torch.randn(2, 3, 5, 7)
    torch.export.save(nestsparse.export(sparse, (x,)), tmp_path / "m.pt2")
    run = torch.export.load(tmp_path / "m.pt2").module()
    for level in (0, 2):
        nestsparse.set_level(sparse, level)
        torch.testing.assert_close(run(torch.tensor(level), x), sparse(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "how",
    [
        lambda m, x: torch.jit.trace(m, (x,)),
        lambda m, x: torch.export.export(m, (x,)),
        lambda m, x: torch.onnx.export(m, (x,), dynamo=False),
        lambda m, x: torch.onnx.export(m, (x,), dynamo=True),
    ],
    ids=["jit.trace", "torch.export", "onnx-torchscript", "onnx"],
)
def test_export_that_would_bake_the_level_in_is_refused(how, request):
    if request.node.callspec.id == "onnx":
        pytest.importorskip("onnxscript", reason="torch.onnx.export's default exporter needs onnxscript")
    sparse = small_cnn()
    # torch.onnx wraps the error of its torch.export step in its own exception type, with the message kept
    with pytest.raises(Exception, match=r"bake level 0 .*nestsparse\.export\(model, args\).*to_dense"):
        how(sparse, torch.randn(2, 3, 5, 7))


def test_export_argument_errors():
    sparse = small_cnn()
    x = torch.randn(2, 3, 5, 7)
    with pytest.raises(TypeError, match="args is a tuple"):
        nestsparse.export(sparse, x)
    with pytest.raises(ValueError, match="no nested layers"):
        nestsparse.export(nn.Linear(3, 4), (torch.randn(2, 3),))
    with pytest.raises(ValueError, match="one entry per element of args"):
        nestsparse.export(sparse, (x,), dynamic_shapes={"x": {0: torch.export.Dim("b")}})
    with pytest.raises(ValueError, match="one-element integer tensor"):
        nestsparse.LevelInput(sparse)(torch.tensor([0.5]), x)


def test_onnx_path_is_to_dense_with_the_same_outputs(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX path is checked with ONNX Runtime (nestsparse[test])")
    pytest.importorskip("onnxscript", reason="torch.onnx.export's default exporter needs onnxscript")
    sparse = small_cnn()
    x = torch.randn(2, 3, 5, 7)
    for level in (0, 2):
        path = tmp_path / f"level{level}.onnx"
        torch.onnx.export(nestsparse.to_dense(sparse, level), (x,), path, input_names=["x"])
        got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
        nestsparse.set_level(sparse, level)
        torch.testing.assert_close(torch.from_numpy(got), sparse(x).detach(), rtol=1e-5, atol=1e-5)


def test_op_library_has_no_python_symbols():
    """The op library loads in a process without libpython (the C++ program of the README's Deploy section does
    so); here: it names no Python C-API symbol at all."""
    nm = subprocess.run(["nm", "-D", "--undefined-only", nestsparse.library_path()], capture_output=True, text=True)
    if nm.returncode != 0:
        pytest.skip(f"nm failed: {nm.stderr.strip()}")
    python_symbols = [line for line in nm.stdout.splitlines() if line.split()[-1].startswith(("Py", "_Py"))]
    assert not python_symbols, python_symbols[:5]
    assert sys.modules["nestsparse"].native.torch_version() == nestsparse.build_info()["torch_built"]


# ---- the program's check: level range, digests of its constants -------------------------------------------------


def test_level_out_of_range_is_named_after_a_save_and_load(tmp_path):
    x = torch.randn(2, 3, 5, 7)
    torch.export.save(nestsparse.export(small_cnn(), (x,)), tmp_path / "m.pt2")
    run = torch.export.load(tmp_path / "m.pt2").module()
    for level in (3, 5, -1):
        with pytest.raises(
            RuntimeError, match=rf"level {level} is out of range for this program \(0 = densest \.\. 2\)"
        ):
            run(torch.tensor(level), x)


def test_views_do_not_grow_the_saved_program(tmp_path):
    """An example input, or a buffer, that is a view of a larger tensor is saved as the view's own elements."""

    class Shifted(nn.Module):
        def __init__(self, model, base):
            super().__init__()
            self.model = model
            self.register_buffer("shift", base.flatten()[:10])

        def forward(self, x):
            return self.model(x) + self.shift

    sparse = small_cnn()
    sizes = []
    for rows in (2, 4000):  # 4000 rows of 3x5x7 float32: 1.7 MB more in the file for each base saved
        base = torch.randn(rows, 3, 5, 7)
        path = tmp_path / f"{rows}.pt2"
        torch.export.save(nestsparse.export(Shifted(sparse, base), (base[:2],)), path)
        sizes.append(path.stat().st_size)
    assert abs(sizes[1] - sizes[0]) < 1024, sizes
    run = torch.export.load(path).module()
    nestsparse.set_level(sparse, 1)
    want = sparse(base[:2]) + base.flatten()[:10]
    torch.testing.assert_close(run(torch.tensor(1), base[:2]), want, rtol=1e-5, atol=1e-5)


def test_lifted_constants_are_checked_too(tmp_path):
    """A tensor that is no parameter or buffer (a plain attribute) is saved with the program as a constant: it is
    checked like the others."""

    class Scaled(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.scale = model, torch.linspace(0.5, 1.5, 10)

        def forward(self, x):
            return self.model(x) * self.scale

    x = torch.randn(2, 3, 5, 7)
    torch.export.save(nestsparse.export(Scaled(small_cnn()), (x,)), tmp_path / "m.pt2")
    program = torch.export.load(tmp_path / "m.pt2")
    assert "model.scale" in program.constants
    program.constants["model.scale"][3] = 2.0
    with pytest.raises(RuntimeError, match=rf"constant 'model.scale' .*{REFUSED}"):
        program.module()(torch.tensor(0), x)


def archive_tensors(path: Path) -> dict[str, tuple[int, int]]:
    """Where each saved weight's bytes are in a torch.export.save archive: name -> (file offset, bytes). The
    entries are stored uncompressed, so an edit of those bytes is an edit of the tensor."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        config_name = next(n for n in z.namelist() if n.endswith("data/weights/model_weights_config.json"))
        folder = config_name.rsplit("/", 1)[0]
        for name, entry in json.loads(z.read(config_name))["config"].items():
            info = z.getinfo(f"{folder}/{entry['path_name']}")
            assert info.compress_type == zipfile.ZIP_STORED
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            out[name] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def in_bounds_edit(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """``t`` with one element changed, staying in bounds: an integer (an index) becomes the value of another
    element of the same array, or its neighbour inside the array's range; a float is negated or shifted."""
    flat = t.detach().flatten().clone()
    i = rng.randrange(flat.numel())
    if flat.dtype.is_floating_point:
        flat[i] = -flat[i] if flat[i] != 0 else 0.5
        if rng.random() < 0.5:
            flat[i] = flat[i] * 1.5 + 0.25
    else:
        others = [int(v) for v in flat[torch.randint(0, flat.numel(), (8,))] if int(v) != int(flat[i])]
        lo, hi = int(flat.min()), int(flat.max())
        step = int(flat[i]) + rng.choice((-1, 1))
        flat[i] = others[0] if others and rng.random() < 0.5 else min(max(step, lo), hi)
        if int(flat[i]) == int(t.flatten()[i]):
            flat[i] = int(flat[i]) + (1 if int(flat[i]) < hi else -1)
    return flat.view(t.shape)


def unchecked(program: torch.export.ExportedProgram) -> nn.Module:
    """The program's module with its check told the constants it now holds are right: what an edit does to the
    outputs when nothing refuses it (a program without the check, as exported before, is returned as it is)."""
    check = next((n for n in program.graph.nodes if n.target is torch.ops.nestsparse.verified_level.default), None)
    if check is not None:
        targets = {s.arg.name: s.target for s in program.graph_signature.input_specs}
        held = {**program.state_dict, **program.constants}
        constants = [held[targets[c.name]] for c in check.args[2]]
        digests = "".join(torch.ops.nestsparse.constant_digests(constants))
        check.args = (*check.args[:4], digests)
        program.graph_module.recompile()
    return program.module()


def outputs(run, x, levels) -> list[torch.Tensor]:
    with torch.no_grad():
        return [run(torch.tensor(level), x) for level in levels]


@pytest.mark.parametrize("fmt_name", ["ncsr", "nbcr"])
def test_fuzzed_saved_programs_are_refused(fmt_name, tmp_path):
    """120 random in-bounds edits of the nested constants (values, index arrays, bias, epilogue tensors) of a saved
    program, one at a time, in the archive's bytes: every edit that changes an output (when nothing refuses it) is
    refused when the program runs, naming the constant; the unedited program gives bit-identical outputs."""
    model = nestsparse.fuse(small_cnn(fmt_name))  # a folded BatchNorm: the conv layer has epilogue tensors
    x = torch.randn(2, 3, 5, 7)
    program = nestsparse.export(model, (x,))
    path = tmp_path / "m.pt2"
    torch.export.save(program, path)
    levels = range(3)
    want = outputs(program.module(), x, levels)
    loaded = outputs(torch.export.load(path).module(), x, levels)
    assert all(torch.equal(a, b) for a, b in zip(loaded, want))
    for level, got in zip(levels, loaded):
        nestsparse.set_level(model, level)
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)

    nested = [f"model.{name}." for name in nestsparse.level_aware_modules(model)]
    where = archive_tensors(path)
    targets = sorted(n for n in where if n.startswith(tuple(nested)))
    assert {n.rsplit(".", 1)[1] for n in targets} >= {"values", "bias", "epilogue_scale", "epilogue_shift"}
    original = path.read_bytes()
    rng = random.Random(f"fuzz-{fmt_name}")
    tried, changed, refused, raised_by_ops, silent = 0, 0, 0, 0, []
    for _ in range(120):
        name = rng.choice(targets)
        offset, nbytes = where[name]
        t = program.state_dict[name]
        edited = in_bounds_edit(t, rng).contiguous().numpy().tobytes()
        assert len(edited) == nbytes and edited != original[offset : offset + nbytes]
        damaged = tmp_path / "damaged.pt2"
        damaged.write_bytes(original[:offset] + edited + original[offset + nbytes :])
        tried += 1
        edit = torch.export.load(damaged)
        try:
            outputs(edit.module(), x, levels)
            was_refused = False
        except RuntimeError as e:
            was_refused = REFUSED in str(e) and f"'{name}'" in str(e)
        refused += was_refused
        try:
            differs = any(not torch.equal(a, b) for a, b in zip(outputs(unchecked(edit), x, levels), want))
        except RuntimeError:  # the ops' own checks (an index out of range) refuse it anyway
            raised_by_ops += 1
            continue
        changed += differs
        if differs and not was_refused:
            silent.append(name)
    print(
        f"\n{fmt_name}: {tried} edits, {changed} change outputs when unchecked, {raised_by_ops} raise in the ops, "
        f"{refused} refused by the program's check"
    )
    assert not silent, f"{len(silent)} of {tried} edits ran with different outputs and no error: {silent[:5]}"
    assert refused == tried
    assert changed > tried // 4  # the edits reach what the outputs depend on


# ---- outputs a process loads without the model's library --------------------------------------------------------


def test_hf_program_loads_without_transformers(tmp_path):
    """A program exported from a transformers model returns a dict of its ModelOutput's fields, so a process that
    has loaded only the op library (and never imports transformers) loads and runs it."""
    transformers = pytest.importorskip("transformers", reason="the Hugging Face path needs transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48
    )
    dense = transformers.BertModel(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embeddings are reported as left dense
        model = nestsparse.convert(dense, nestsparse.model_tags(dense, (0.3, 0.1))).eval()
    ids = torch.randint(0, 97, (2, 9))
    torch.export.save(nestsparse.export(model, (ids,)), tmp_path / "bert.pt2")
    nestsparse.set_level(model, 1)
    with torch.no_grad():
        want = model(ids)
    torch.save({"ids": ids, "want": dict(want)}, tmp_path / "want.pt")
    script = """
import sys, torch
torch.ops.load_library(sys.argv[1])
saved = torch.load(sys.argv[3])
out = torch.export.load(sys.argv[2]).module()(torch.tensor(1), saved["ids"])
assert type(out) is dict and list(out) == list(saved["want"]), out
for key, value in saved["want"].items():
    torch.testing.assert_close(out[key], value, rtol=1e-5, atol=1e-5)
assert "transformers" not in sys.modules and "nestsparse" not in sys.modules
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of nestsparse but the library
    done = subprocess.run(
        [sys.executable, "-c", script, nestsparse.library_path(), tmp_path / "bert.pt2", tmp_path / "want.pt"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]


# ---- the C++ program (examples/cpp) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_levels_program(tmp_path_factory) -> Path:
    """examples/cpp built once for this module (about 20 s)."""
    if shutil.which("cmake") is None:
        pytest.skip("the C++ example is built with CMake")
    build = tmp_path_factory.mktemp("cpp")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    generator = ["-G", "Ninja"] if shutil.which("ninja", path=env["PATH"]) else []
    for cmd in (
        [
            "cmake",
            "-S",
            ROOT / "examples/cpp",
            "-B",
            build,
            *generator,
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        ],
        ["cmake", "--build", build],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return build / "run_levels"


def test_cpp_program_refuses_a_damaged_package_and_a_level_out_of_range(run_levels_program, tmp_path):
    sparse = small_cnn()
    x = torch.randn(2, 3, 5, 7)
    program = nestsparse.export(sparse, (x,))
    package = Path(torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "m.pt2")))
    x.numpy().tofile(tmp_path / "x.f32")

    def run(path: Path, *levels: int) -> subprocess.CompletedProcess:
        args = [nestsparse.library_path(), path, tmp_path / "x.f32", "2,3,5,7", tmp_path / "y", *map(str, levels)]
        return subprocess.run([run_levels_program, *args], capture_output=True, text=True)

    done = run(package, 0, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    for level in (0, 2):
        nestsparse.set_level(sparse, level)
        got = np.fromfile(tmp_path / f"y{level}.f32", np.float32)
        np.testing.assert_allclose(got, sparse(x).detach().numpy().ravel(), atol=1e-5)

    done = run(package, 3)
    assert done.returncode == 1
    assert "run_levels: level 3 is out of range for this program (0 = densest .. 2)\n" in done.stderr

    # One value of the linear layer changed in the package (its constants are stored, uncompressed, in the
    # compiled library inside the archive).
    data = bytearray(package.read_bytes())
    values = program.state_dict["model.4.values"].detach().numpy().tobytes()
    at = data.find(values)
    assert at >= 0 and data.find(values, at + 1) < 0
    data[at + 4 * 7 + 1] ^= 0x04
    damaged = tmp_path / "damaged.pt2"
    damaged.write_bytes(data)
    for old in tmp_path.glob("y*.f32"):
        old.unlink()
    done = run(damaged, 0, 2)
    assert done.returncode == 1, done.stdout
    assert f"run_levels: this program's constant 'model.4.values' (Float of shape [{len(values) // 4}]) {REFUSED}" in (
        done.stderr
    )
    assert not list(tmp_path.glob("y*.f32"))  # refused before any output was written


class Spaced(nn.Module):
    """A layer registered under a name with a space (add_module allows it)."""

    def __init__(self):
        super().__init__()
        self.add_module("my layer", nn.Linear(6, 4))

    def forward(self, x):
        return getattr(self, "my layer")(x)


def test_names_with_spaces_are_exported_and_checked():
    """verified_level split the constants' names on whitespace: a module named with a space failed every call."""
    torch.manual_seed(5)
    model = Spaced()
    sparse = nestsparse.convert(model, nestsparse.model_tags(model, (0.5, 0.2))).eval()
    x = torch.randn(2, 6)
    run = nestsparse.export(sparse, (x,)).module()
    nestsparse.set_level(sparse, 1)
    torch.testing.assert_close(run(torch.tensor(1), x), sparse(x))
