"""The real-data loaders on small files written here in the packages' formats (the real sets are optional and not
in CI): IDX parsing (gzipped or not, every dtype, big-endian), damaged files named, missing sets naming the install
command, the Rotten Tomatoes split, the similarity sets, the pretrained MNIST CNN's loading."""

import bz2
import gzip
import sys

import pytest
import torch

from nestsparse.apps import models, real_data


def idx_bytes(t: torch.Tensor) -> bytes:
    code = {torch.uint8: 0x08, torch.int8: 0x09, torch.int16: 0x0B, torch.int32: 0x0C}[t.dtype]
    header = bytes([0, 0, code, t.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in t.shape)
    body = t.contiguous().view(torch.uint8).view(-1, t.element_size()).flip(1).contiguous().numpy().tobytes()
    return header + body


def write_set(directory, n_train=12, n_test=5, gz=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    sets = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        y = torch.arange(n, dtype=torch.uint8) % 10
        for kind, t in (("images-idx3", x), ("labels-idx1", y)):
            raw = idx_bytes(t)
            name = f"{split}-{kind}-ubyte" + (".gz" if gz else "")
            (directory / name).write_bytes(gzip.compress(raw) if gz else raw)
        sets[split] = (x, y)
    return sets


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_read_idx_round_trips_every_dtype(tmp_path, dtype):
    t = torch.randint(-100 if dtype != torch.uint8 else 0, 100, (3, 5, 7)).to(dtype)
    (tmp_path / "a").write_bytes(idx_bytes(t))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(t)))
    assert torch.equal(real_data.read_idx(tmp_path / "a"), t)
    assert torch.equal(real_data.read_idx(tmp_path / "a.gz"), t)


def test_read_idx_names_damaged_files(tmp_path):
    raw = idx_bytes(torch.zeros(4, 3, dtype=torch.int32))
    for name, data, match in (
        ("truncated", raw[:-3], r"header says \[4, 3\] \(60 bytes\), the file has 57 bytes"),
        ("magic", b"\x01" + raw[1:], "not an IDX file"),
        ("header", raw[:6], "truncated IDX header"),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=match):
            real_data.read_idx(tmp_path / name)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_loader_reads_the_packaged_files(tmp_path, monkeypatch, gz):
    monkeypatch.setenv("NESTSPARSE_DATA", str(tmp_path))
    sets = write_set(tmp_path / "mnist", gz=gz)
    (xtr, ytr), (xte, yte) = real_data.mnist()
    assert xtr.shape == (12, 1, 28, 28) and xte.shape == (5, 1, 28, 28) and xtr.dtype == torch.float32
    assert torch.equal(ytr, sets["train"][1].long()) and torch.equal(yte, sets["t10k"][1].long())
    assert abs(float(xtr.mean())) < 1e-5 and abs(float(xtr.std()) - 1) < 1e-5  # standardised by the training set
    raw_train, _ = real_data.mnist_raw()
    assert torch.equal(raw_train[0], sets["train"][0])


def test_missing_sets_name_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTSPARSE_DATA", str(tmp_path))
    for load in (real_data.mnist, real_data.rotten_tomatoes, lambda: real_data.word_similarity("simlex999")):
        with pytest.raises(FileNotFoundError, match="make real-data"):
            load()
    with pytest.raises(FileNotFoundError, match=r"mnist_cnn\(pretrained=True\).*make real-data"):
        models.mnist_cnn(pretrained=True)


def test_rotten_tomatoes_split_drops_plot_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTSPARSE_DATA", str(tmp_path))
    rows = ["category,text,movie_name,has_plot_and_reviews"]
    rows += [f"{c},snippet {i},m,True" for i, c in enumerate(["fresh"] * 30 + ["rotten"] * 15 + ["plot"] * 5)]
    (tmp_path / "rotten-tomatoes").mkdir()
    corpus = tmp_path / "rotten-tomatoes" / "rotten_tomatoes_corpus_full.csv.bz2"
    corpus.write_bytes(bz2.compress("\n".join(rows).encode()))
    (train_x, train_y), (test_x, test_y) = real_data.rotten_tomatoes(seed=0, test_fraction=0.2)
    assert (len(train_x), len(test_x)) == (36, 9) and int(train_y.sum() + test_y.sum()) == 30
    assert not set(train_x) & set(test_x)
    assert real_data.rotten_tomatoes(seed=0, test_fraction=0.2)[1][0] == test_x  # seeded: the same split again


def test_word_similarity_and_pretrained_cnn_files(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTSPARSE_DATA", str(tmp_path))
    (tmp_path / "similarity").mkdir()
    (tmp_path / "similarity" / "simlex999.txt").write_text("# header\n# Word 1\tWord 2\tHuman\nold\tnew\t1.58\n")
    assert real_data.word_similarity("simlex999") == [("old", "new", 1.58)]
    with pytest.raises(ValueError, match="must be one of"):
        real_data.word_similarity("men")
    reference = models.mnist_cnn()
    (tmp_path / "mnist-cnn").mkdir()
    torch.save(reference.state_dict(), tmp_path / "mnist-cnn" / "handwriting_model.pth")
    loaded = models.mnist_cnn(pretrained=True)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), reference(x))


def test_accuracy_benchmark_real_mode_runs_on_packaged_files(tmp_path, monkeypatch, capsys):
    """bench/accuracy.py --real --quick end to end on small sets written in the packages' formats (the real ones
    are optional): both families train, convert, save and print their tables; without the data it names the
    install command and exits 2."""
    import importlib.util  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("accuracy_bench", Path(__file__).parents[1] / "bench" / "accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "accuracy_bench", bench)  # dataclasses look their module up there
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    spec.loader.exec_module(bench)
    monkeypatch.setenv("NESTSPARSE_DATA", str(tmp_path))
    assert bench.main(["--real", "--quick", "--plot", ""]) == 2
    assert "make real-data" in capsys.readouterr().err
    for name in ("mnist", "fashion-mnist"):
        write_set(tmp_path / name, n_train=256, n_test=64)
    (tmp_path / "mnist-cnn").mkdir()
    torch.save(models.mnist_cnn().state_dict(), tmp_path / "mnist-cnn" / "handwriting_model.pth")
    assert bench.main(["--real", "--quick", "--plot", str(tmp_path / "real.png")]) == 0
    out = capsys.readouterr().out
    assert "### fashion-mnist" in out and "### mnist-pretrained" in out and "round trip exact: True" in out
    assert (tmp_path / "real.png").is_file()
