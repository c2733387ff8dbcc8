"""nestsparse.io: safetensors checkpoints of converted models (exact round trip, size, refusals)."""

import copy
import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

import nestsparse
from nestsparse import io as nsio
from nestsparse.formats import FormatError
from nestsparse.nn import LevelBatchNorm, NestedSparseConv2d, NestedSparseLinear, NestedSparseModule, level_batchnorms

FORMATS = ["ncsr", "nbcr"]
DENSITIES = (0.3, 0.1)


def dense_model() -> nn.Module:
    """The dense skeleton: conv, BN, ReLU, conv, ReLU, flatten, linear, ReLU, linear; 1x8x8 inputs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def converted_model(fmt: str) -> nn.Module:
    """dense_model() with LevelBatchNorm converted to ``fmt``, BN statistics trained apart per level; at level 1."""
    model = dense_model()
    kw = {"structure": "bcr", "block_shape": (8, 8)} if fmt == "nbcr" else {}
    tags = nestsparse.model_tags(model, DENSITIES, **kw)
    level_batchnorms(model, len(DENSITIES))
    model = nestsparse.convert(model, tags, format=fmt, densities=DENSITIES, block_shape=(8, 8))
    model.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lvl in (0, 1, 1):
            nestsparse.set_level(model, lvl)
            model(torch.randn(8, 1, 8, 8, generator=g) * (lvl + 1))
    model.eval()
    nestsparse.set_level(model, 1)
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {fmt: converted_model(fmt) for fmt in FORMATS}


@pytest.fixture(params=FORMATS)
def saved(request, models, tmp_path):
    """(format, converted model, path of its checkpoint)."""
    path = tmp_path / f"model_{request.param}.safetensors"
    nsio.save(models[request.param], path)
    return request.param, models[request.param], path


@pytest.fixture
def no_pickle(monkeypatch):
    """Makes any unpickling during the test fail loudly."""
    import torch._dynamo  # noqa: F401, PLC0415 -- subclasses pickle.Unpickler on import: import it before the patch

    def refuse(*args, **kwargs):
        raise AssertionError("nestsparse.io must never unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def header(path) -> tuple[int, dict]:
    """The safetensors header length N and the parsed header."""
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n])


def read_all(path) -> tuple[dict, dict[str, str], dict[str, torch.Tensor]]:
    """The parsed nestsparse description, the other metadata and the tensors of a checkpoint."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return json.loads(meta.pop("nestsparse")), meta, tensors


def forge(out, desc: dict, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """Writes a checkpoint as an attacker who knows the format would: with a correct, recomputed checksum."""
    desc = {**desc, "checksum": "sha256:" + "0" * 64}
    text = json.dumps(desc, separators=(",", ":"))
    text = text.replace("0" * 64, nsio._checksum(text, meta, tensors), 1)
    save_file(tensors, str(out), metadata={**meta, "nestsparse": text})


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k


def assert_same_outputs(a: nn.Module, b: nn.Module, levels: int = len(DENSITIES)) -> None:
    """Equal outputs at every level; ``a`` gets its levels back afterwards."""
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    aware = [m for m in a.modules() if isinstance(m, nestsparse.nn.LevelAware)]
    before = [m.level for m in aware]
    with torch.no_grad():
        for lvl in range(levels):
            nestsparse.set_level(a, lvl)
            nestsparse.set_level(b, lvl)
            assert torch.equal(a(x), b(x)), f"outputs differ at level {lvl}"
    for m, lvl in zip(aware, before):
        m.level = lvl


# ---- round trip -----------------------------------------------------------------------------------------


def test_round_trip_is_exact(saved, no_pickle):
    fmt, model, path = saved
    loaded = nsio.load(path, dense_model())
    assert_same_state(model, loaded)
    nested = [m for m in loaded.modules() if isinstance(m, NestedSparseModule)]
    assert [type(m) for m in nested] == [NestedSparseConv2d, NestedSparseConv2d, NestedSparseLinear, NestedSparseLinear]
    assert all(m.format == fmt for m in nested)
    assert all(m.options == ({"block_shape": (8, 8)} if fmt == "nbcr" else {}) for m in nested)
    assert [m.activation for m in nested] == ["none", "relu", "relu", "none"]
    assert isinstance(loaded[1], LevelBatchNorm) and isinstance(loaded[4], nn.Identity)
    assert isinstance(loaded[7], nn.Identity) and isinstance(loaded[2], nn.ReLU)
    assert nested[0].densities == DENSITIES
    # the per-level statistics really differ, and both survive
    assert not torch.equal(loaded[1].running_mean[0], loaded[1].running_mean[1])
    assert all(m.level == 1 for m in loaded.modules() if isinstance(m, nestsparse.nn.LevelAware))
    loaded.eval()
    assert_same_outputs(model, loaded)


def test_load_into_converted_model_and_save_again(saved, tmp_path):
    _, model, path = saved
    once = nsio.load(path, dense_model())
    twice = nsio.load(path, once)  # an already converted model of the same architecture is a valid skeleton
    assert_same_state(model, twice)
    again = tmp_path / "again.safetensors"
    nsio.save(twice, again)
    assert open(again, "rb").read() == open(path, "rb").read()


def test_mixed_levels_are_restored(tmp_path):
    model = converted_model("ncsr")
    model[0].set_level(0)  # a rerouted state: the first layer denser than the rest
    path = tmp_path / "mixed.safetensors"
    nsio.save(model, path)
    loaded = nsio.load(path, dense_model())
    assert [m.level for m in loaded.modules() if isinstance(m, nestsparse.nn.LevelAware)] == [0, 1, 1, 1, 1]


def test_dtype_is_kept(tmp_path):
    model = converted_model("ncsr").to(torch.float16)
    path = tmp_path / "half.safetensors"
    nsio.save(model, path)
    loaded = nsio.load(path, dense_model())  # a float32 skeleton
    assert_same_state(model, loaded)
    assert loaded[6].values.dtype == torch.float16 and loaded[1].running_var.dtype == torch.float16


def test_tied_tensors_are_stored_once(tmp_path):
    lin = nn.Linear(16, 16)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    path = tmp_path / "tied.safetensors"
    size = nsio.save(model, path)
    n, head = header(path)
    assert sorted(k for k in head if k != "__metadata__") == ["0.bias", "0.weight"]
    assert size == 8 + n + (16 * 16 + 16) * 4
    lin2 = nn.Linear(16, 16)
    loaded = nsio.load(path, nn.Sequential(lin2, nn.ReLU(), lin2))
    assert_same_state(model, loaded)
    assert loaded[0] is loaded[2]


# ---- the file --------------------------------------------------------------------------------------------


def test_file_is_the_densest_storage_plus_dense_rest_plus_header(saved):
    fmt, model, path = saved
    size = os.path.getsize(path)
    assert nsio.save(model, path) == size
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]  # safetensors: 8-byte length, JSON header, raw bytes; no pickle
    head = json.loads(data[8 : 8 + n])
    assert not data.startswith(b"\x80") and not data.startswith(b"PK")
    assert n < 4096, f"header of {n} bytes"
    state = model.state_dict()
    assert set(head) - {"__metadata__"} == set(state)
    assert size == 8 + n + sum(t.numel() * t.element_size() for t in state.values())
    nested = {name: m for name, m in model.named_modules() if isinstance(m, NestedSparseModule)}
    stored = sum(m.nested().nbytes() for m in nested.values())  # level=None: every stored byte, all levels
    nested_keys = {f"{name}.{k}" for name, m in nested.items() for k in m.state_dict() if k != "bias"}
    rest = sum(t.numel() * t.element_size() for k, t in state.items() if k not in nested_keys)
    assert size == stored + rest + 8 + n
    assert all(m.values.numel() == m.nnz(0) for m in nested.values())  # one buffer: the densest level's


def test_metadata_describes_the_model(models, tmp_path):
    path = tmp_path / "m.safetensors"
    nsio.save(models["nbcr"], path, metadata={"dataset": "toy", "note": "ü"})
    meta = nsio.read_metadata(path)
    # version 1: version 2 only when a convolution pads otherwise than symmetric zeros (test_padding_needs_version_2)
    assert meta["format_version"] == 1 and meta["nestsparse_version"] == nestsparse.__version__
    assert meta["arch"] is None and meta["level"] == 1 and meta["user"] == {"dataset": "toy", "note": "ü"}
    assert meta["identities"] == ["4", "7"]
    assert meta["level_batchnorms"] == {
        "1": {
            "num_features": 8,
            "num_levels": 2,
            "eps": 1e-5,
            "momentum": 0.1,
            "affine": True,
            "per_level_affine": False,
        }
    }
    assert meta["nested"]["3"] == {
        "kind": "conv2d",
        "format": "nbcr",
        "weight_shape": [16, 8, 3, 3],
        "block_shape": [8, 8],
        "densities": list(DENSITIES),
        "activation": "relu",
        "bias": True,
        "dtype": "float32",
        "stride": [1, 1],
        "padding": [1, 1],
        "dilation": [1, 1],
        "groups": 1,
    }
    assert meta["nested"]["8"]["kind"] == "linear" and "stride" not in meta["nested"]["8"]
    assert meta["checksum"].startswith("sha256:")
    with pytest.raises(ValueError, match="reserved"):
        nsio.save(models["nbcr"], path, metadata={"nestsparse": "x"})
    with pytest.raises(ValueError, match="str to str"):
        nsio.save(models["nbcr"], path, metadata={"epochs": 3})


def test_model_with_arch_loads_without_skeleton(tmp_path, no_pickle):
    models = pytest.importorskip("nestsparse.apps.models")
    dense = models.build("resnet_small", num_classes=10, in_channels=1, width=8, blocks=(1, 1, 1))
    tags = nestsparse.model_tags(dense, DENSITIES)
    level_batchnorms(dense, len(DENSITIES))
    model = nestsparse.convert(dense, tags, densities=DENSITIES).eval()
    nestsparse.set_level(model, 1)
    path = tmp_path / "resnet.safetensors"
    nsio.save(model, path)
    assert nsio.read_metadata(path)["arch"]["name"] == "resnet_small"
    loaded = nsio.load(path)
    assert not loaded.training, "a model load builds itself is returned for inference"
    assert loaded.arch == nsio.read_metadata(path)["arch"]
    assert_same_state(model, loaded)
    assert all(m.level == 1 for m in loaded.modules() if isinstance(m, nestsparse.nn.LevelAware))
    assert_same_outputs(model, loaded)
    # In a fresh process that never imported the zoo: load finds it through the installed entry point.
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x).flatten().tolist()
    script = (
        "import sys, torch, nestsparse\n"
        "assert 'nestsparse.apps.models' not in sys.modules\n"
        f"m = nestsparse.load({str(path)!r}).eval()\n"
        "x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))\n"
        "with torch.no_grad():\n"
        f"    assert m(x).flatten().tolist() == {expected!r}\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


# ---- refusals ----------------------------------------------------------------------------------------------


def test_save_refuses_parametrized_model(tmp_path):
    class Mask(nn.Module):
        def forward(self, w):
            return w * (w.abs() > 0.1)

    model = dense_model()
    parametrize.register_parametrization(model[3], "weight", Mask())
    with pytest.raises(ValueError, match=r"'3'.*unmask.*convert"):
        nsio.save(model, tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


def test_no_arch_needs_a_model(saved):
    with pytest.raises(nsio.CheckpointError, match=r"records no architecture.*model="):
        nsio.load(saved[2])


def test_unknown_arch(tmp_path):
    pytest.importorskip("nestsparse.apps.models")
    model = converted_model("ncsr")
    model.arch = {"name": "no_such_net", "kwargs": {}}
    path = tmp_path / "arch.safetensors"
    nsio.save(model, path)
    with pytest.raises(nsio.CheckpointError, match=r"arch\.safetensors.*unknown arch 'no_such_net'"):
        nsio.load(path)


@pytest.mark.parametrize("where", ["prefix", "header", "data", "last byte"])
def test_truncated_file(saved, tmp_path, where, no_pickle):
    data = open(saved[2], "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    cut = {"prefix": 5, "header": 8 + n // 2, "data": 8 + n + (len(data) - 8 - n) // 2, "last byte": len(data) - 1}
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: cut[where]])
    with pytest.raises(nsio.CheckpointError, match=r"cut\.safetensors: not a safetensors file, or truncated"):
        nsio.load(path, dense_model())


def test_not_a_safetensors_file(tmp_path, no_pickle):
    path = tmp_path / "pickled.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": [1.0, 2.0]}, f)  # written before no_pickle matters: dump is allowed
    with pytest.raises(nsio.CheckpointError, match="pickled.pt: not a safetensors file"):
        nsio.load(path, dense_model())
    with pytest.raises(FileNotFoundError, match="no such file"):
        nsio.load(tmp_path / "missing.safetensors", dense_model())


def test_no_nestsparse_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(dense_model().state_dict(), str(path))
    with pytest.raises(nsio.CheckpointError, match="no 'nestsparse' metadata"):
        nsio.load(path, dense_model())


@pytest.mark.parametrize("where", ["first data byte", "last data byte", "description", "user metadata"])
def test_any_altered_byte_is_detected(saved, tmp_path, where):
    data = bytearray(open(saved[2], "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    if where == "first data byte":
        data[8 + n] ^= 0x01
    elif where == "last data byte":
        data[-1] ^= 0x80
    else:
        path = tmp_path / "user.safetensors"
        nsio.save(saved[1], path, metadata={"owner": "alice"})
        data = bytearray(path.read_bytes())
        old, new = (
            (b'\\"activation\\":\\"relu\\"', b'\\"activation\\":\\"gelu\\"')
            if where == "description"
            else (b'"owner":"alice"', b'"owner":"mally"')
        )
        assert data.count(old) >= 1
        data = data.replace(old, new, 1)
    path = tmp_path / "altered.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(nsio.CheckpointError, match=r"altered\.safetensors: checksum mismatch.*altered or damaged"):
        nsio.load(path, dense_model())


def corrupt(fmt: str, tensors: dict[str, torch.Tensor]) -> None:
    """Breaks one index array of layer '3' (in place)."""
    if fmt == "ncsr":
        tensors["3.col_idx"] = tensors["3.col_idx"].clone()
        tensors["3.col_idx"][0] = 5000  # K = 72
    else:
        tensors["3.counts"] = tensors["3.counts"].clone()
        tensors["3.counts"][1, 0, 0] = tensors["3.counts"][0, 0, 0] + 1  # level 1 keeps more rows than level 0


def test_corrupted_index_arrays_with_valid_checksum(saved, tmp_path):
    fmt, _, path = saved
    desc, meta, tensors = read_all(path)
    corrupt(fmt, tensors)
    out = tmp_path / "forged.safetensors"
    forge(out, desc, meta, tensors)
    skeleton = dense_model()
    with pytest.raises(nsio.CheckpointError, match=r"forged\.safetensors: corrupted index arrays in layer '3'") as e:
        nsio.load(out, skeleton)
    assert isinstance(e.value.__cause__, FormatError)
    assert isinstance(skeleton[3], nn.Conv2d), "a failed load must leave the skeleton as it was"


def test_corrupted_index_arrays_of_a_layer_the_description_leaves_out(saved, tmp_path):
    # Loaded into a skeleton that is already nested, a layer missing from the description gets its arrays
    # through load_state_dict: they must still be validated before a kernel can see them.
    fmt, model, path = saved
    desc, meta, tensors = read_all(path)
    corrupt(fmt, tensors)
    desc = {**desc, "nested": {k: v for k, v in desc["nested"].items() if k != "3"}}
    out = tmp_path / "forged.safetensors"
    forge(out, desc, meta, tensors)
    with pytest.raises(nsio.CheckpointError, match=r"forged\.safetensors: layer '3' has corrupted index arrays"):
        nsio.load(out, converted_model(fmt))


def test_missing_and_unexpected_tensors(saved, tmp_path):
    desc, meta, tensors = read_all(saved[2])
    out = tmp_path / "forged.safetensors"
    forge(out, desc, meta, {k: v for k, v in tensors.items() if k != "1.running_var"})
    with pytest.raises(nsio.CheckpointError, match=r"missing tensors \['1.running_var'\]"):
        nsio.load(out, dense_model())
    forge(out, desc, meta, {**tensors, "extra": torch.zeros(3)})
    with pytest.raises(nsio.CheckpointError, match=r"unexpected tensors \['extra'\]"):
        nsio.load(out, dense_model())
    forge(out, desc, meta, {k: v for k, v in tensors.items() if k != "6.row_ptr" and k != "6.block_ptr"})
    with pytest.raises(nsio.CheckpointError, match=r"missing tensors \['6\.(row|block)_ptr'\] of nested layer '6'"):
        nsio.load(out, dense_model())


@pytest.mark.parametrize(("padding", "mode"), [("same", "zeros"), (1, "reflect")])
def test_padding_needs_version_2_which_a_version_1_reader_refuses(tmp_path, monkeypatch, padding, mode):
    """A reader of version 1 would ignore padding_mode and compute another function: it must refuse the file."""
    model = nn.Sequential(nn.Conv2d(3, 4, 4, padding=padding, padding_mode=mode))
    sparse = nestsparse.convert(model, nestsparse.model_tags(model, (0.5,)))
    nsio.save(sparse, tmp_path / "m.safetensors")
    assert nsio.read_metadata(tmp_path / "m.safetensors")["format_version"] == 2
    x = torch.randn(1, 3, 7, 6)
    assert torch.equal(nsio.load(tmp_path / "m.safetensors", copy.deepcopy(model))(x), sparse(x))
    monkeypatch.setattr(nsio, "FORMAT_VERSION", 1)
    with pytest.raises(nsio.CheckpointError, match="format version 2 is not supported"):
        nsio.load(tmp_path / "m.safetensors", copy.deepcopy(model))


def test_newer_format_version(saved, tmp_path):
    desc, meta, tensors = read_all(saved[2])
    out = tmp_path / "future.safetensors"
    forge(out, {**desc, "format_version": nsio.FORMAT_VERSION + 1}, meta, tensors)
    with pytest.raises(nsio.CheckpointError, match=f"format version {nsio.FORMAT_VERSION + 1} is not supported"):
        nsio.load(out, dense_model())


def test_skeleton_mismatch(saved):
    path = saved[2]
    wrong_shape = dense_model()
    wrong_shape[6] = nn.Linear(16 * 8 * 8, 64)
    with pytest.raises(nsio.CheckpointError, match=r"skeleton mismatch at layer '6'.*\(32, 1024\).*\(64, 1024\)"):
        nsio.load(path, wrong_shape)
    wrong_geometry = dense_model()
    wrong_geometry[3] = nn.Conv2d(8, 16, 3, padding=1, stride=2)
    with pytest.raises(nsio.CheckpointError, match=r"skeleton mismatch at layer '3': conv geometry"):
        nsio.load(path, wrong_geometry)
    wrong_kind = dense_model()
    wrong_kind[8] = nn.Conv2d(32, 10, 1)
    with pytest.raises(nsio.CheckpointError, match=r"skeleton mismatch at layer '8'.*Conv2d.*nn.Linear"):
        nsio.load(path, wrong_kind)
    with pytest.raises(nsio.CheckpointError, match=r"the model has no module of that name"):
        nsio.load(path, nn.Sequential(*list(dense_model())[:4]))
    extra = nn.Sequential(*dense_model(), nn.Linear(10, 10))
    with pytest.raises(nsio.CheckpointError, match=r"missing tensors \['9.bias', '9.weight'\]"):
        nsio.load(path, extra)
    assert isinstance(extra[0], nn.Conv2d) and isinstance(extra[1], nn.BatchNorm2d) and isinstance(extra[4], nn.ReLU)


def test_single_layer_model(tmp_path):
    torch.manual_seed(3)
    dense = nn.Linear(40, 24)
    layer = NestedSparseLinear.from_dense(dense, nestsparse.magnitude_tags(dense.weight, DENSITIES), activation="gelu")
    layer.set_level(1)
    path = tmp_path / "layer.safetensors"
    nsio.save(layer, path)
    loaded = nsio.load(path, nn.Linear(40, 24))
    assert isinstance(loaded, NestedSparseLinear) and loaded.level == 1 and loaded.activation == "gelu"
    assert_same_state(layer, loaded)
    x = torch.randn(5, 40)
    assert torch.equal(layer(x, level=0), loaded(x, level=0)) and torch.equal(layer(x), loaded(x))


def test_level_batchnorm_levels_must_match_its_statistics(saved, tmp_path):
    desc, meta, tensors = read_all(saved[2])
    desc["level_batchnorms"]["1"]["num_levels"] = 1000
    out = tmp_path / "forged.safetensors"
    forge(out, desc, meta, tensors)
    with pytest.raises(nsio.CheckpointError, match=r"'1' records 1000 levels of 8 features but its running_mean"):
        nsio.load(out, dense_model())


# ---- hostile files (found by a probe of the loader) ---------------------------------------------------------


def test_a_refused_file_leaves_a_nested_model_unchanged(saved, tmp_path):
    # The arrays of a layer already nested in the model come through load_state_dict: they are validated from the
    # file before anything is copied, so the model keeps its own arrays, dtypes and outputs.
    fmt, model, path = saved
    target = converted_model(fmt)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    desc, meta, tensors = read_all(path)
    corrupt(fmt, tensors)
    tensors = {k: (v.double() if k == "1.running_mean" else v) for k, v in tensors.items()}  # a dtype change too
    desc = {**desc, "nested": {k: v for k, v in desc["nested"].items() if k != "3"}}
    out = tmp_path / "forged.safetensors"
    forge(out, desc, meta, tensors)
    with pytest.raises(nsio.CheckpointError, match=r"layer '3' has corrupted index arrays"):
        nsio.load(out, target)
    after = target.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    assert_same_outputs(model, target)


@pytest.mark.parametrize("how", ["length", "2-d", "float64", "int32"])
def test_a_nested_bias_of_the_wrong_shape_or_dtype_is_refused(saved, tmp_path, how):
    fmt, _, path = saved
    desc, meta, tensors = read_all(path)
    b = tensors["6.bias"]
    tensors["6.bias"] = {
        "length": torch.zeros(b.numel() + 1),
        "2-d": b.reshape(1, -1),
        "float64": b.double(),
        "int32": b.to(torch.int32),
    }[how]
    out = tmp_path / "forged.safetensors"
    forge(out, desc, meta, tensors)
    with pytest.raises(nsio.CheckpointError, match=r"layer '6' has a bias of shape"):
        nsio.load(out, dense_model())
    # into a model that is nested already, the same
    with pytest.raises(nsio.CheckpointError, match=r"layer '6' has a bias of shape|skeleton mismatch"):
        nsio.load(out, converted_model(fmt))


@pytest.mark.parametrize(
    "field, value",
    [("eps", -1.0), ("eps", "1e-5"), ("momentum", 2.0), ("affine", 1), ("num_features", 0), ("num_levels", True)],
)
def test_level_batchnorm_arguments_are_checked(saved, tmp_path, field, value):
    desc, meta, tensors = read_all(saved[2])
    desc["level_batchnorms"]["1"][field] = value
    out = tmp_path / "forged.safetensors"
    forge(out, desc, meta, tensors)
    with pytest.raises(nsio.CheckpointError, match=r"LevelBatchNorm '1' has invalid arguments"):
        nsio.load(out, dense_model())


def test_deeply_nested_metadata_is_a_checkpoint_error(saved, tmp_path):
    desc, meta, tensors = read_all(saved[2])
    text = json.dumps({**desc, "checksum": "sha256:" + "0" * 64}, separators=(",", ":"))
    text = text[:-1] + ',"deep":' + "[" * 100_000 + "]" * 100_000 + "}"
    save_file(tensors, str(tmp_path / "deep.safetensors"), metadata={**meta, "nestsparse": text})
    with pytest.raises(nsio.CheckpointError, match="nests too deeply|checksum"):
        nsio.load(tmp_path / "deep.safetensors", dense_model())


def test_load_without_a_model_checks_the_file_before_building_the_architecture(tmp_path, monkeypatch):
    # A tiny file whose arguments ask for a huge model is refused after a skeleton on the meta device, without
    # ever building the real one (a probe measured 28 s and 4.8 GB before the refusal).
    models = pytest.importorskip("nestsparse.apps.models")
    dense = models.build("resnet_small", num_classes=10, in_channels=1, width=8, blocks=(1, 1, 1))
    model = nestsparse.convert(dense, nestsparse.model_tags(dense, DENSITIES), densities=DENSITIES).eval()
    path = tmp_path / "resnet.safetensors"
    nsio.save(model, path)
    desc, meta, tensors = read_all(path)
    desc["arch"]["kwargs"]["width"] = 4096  # about 4 G parameters if it were built
    out = tmp_path / "huge.safetensors"
    forge(out, desc, meta, tensors)
    devices = []
    real = nsio._skeleton_from_arch

    def spy(path, arch, device=None):
        devices.append(device)
        return real(path, arch, device)

    monkeypatch.setattr(nsio, "_skeleton_from_arch", spy)
    with pytest.raises(nsio.CheckpointError, match="skeleton mismatch"):
        nsio.load(out)
    assert devices == ["meta"], "the real architecture must not be built for a file that does not fit it"
    devices.clear()
    assert_same_outputs(model, nsio.load(path).eval())
    assert devices == ["meta", None]


def test_header_edits_and_huge_declared_sizes_are_refused(saved, tmp_path, no_pickle):
    # The safetensors header is parsed by safetensors before any tensor is read: a declared shape or offsets past
    # the file, a header length past the file and a header that is not JSON all end in CheckpointError.
    data = bytearray(saved[2].read_bytes())
    n, head = header(saved[2])
    name = next(k for k in head if k != "__metadata__")

    def write(h: dict | bytes, length: int | None = None) -> os.PathLike:
        body = h if isinstance(h, bytes) else json.dumps(h).encode()
        out = tmp_path / "edited.safetensors"
        out.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + bytes(data[8 + n :]))
        return out

    edits = [
        write({**head, name: {**head[name], "shape": [2**40]}}),
        write({**head, name: {**head[name], "data_offsets": [0, 2**62]}}),
        write(json.dumps(head).encode(), length=2**60),
        write(b"{" * 1000),
        write({**head, name: {**head[name], "dtype": "F128"}}),
    ]
    for path in edits:
        with pytest.raises(nsio.CheckpointError, match="not a safetensors file, or truncated or damaged"):
            nsio.load(path, dense_model())
