"""Deployment outside Python: nestsparse.export makes the level an input of the exported program; a plain export or
trace, which would bake the level in, is refused; the ONNX path is to_dense. The README's Deploy section (run by
test_readme.py) covers the fresh process with only the op library loaded and the C++ program."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import nestsparse


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
