import dataclasses

import pytest
import torch

import nestsparse
from nestsparse import NestedCSR
from nestsparse.activations import ACTIVATIONS
from nestsparse.formats import FORMATS, NestedBCR

ISAS = nestsparse.native.cpu_isas()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every op fills its output with NaN before its kernel runs, so an element it never writes fails."""
    nestsparse.native.set_poison_outputs(True)
    yield
    nestsparse.native.set_poison_outputs(False)


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs a test once per CPU instruction set this processor supports."""
    before = nestsparse.native.cpu_isa()
    nestsparse.native.set_cpu_isa(request.param)
    yield request.param
    nestsparse.native.set_cpu_isa(before)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train faster on one thread: on a shared machine several threads only spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_tags(shape, num_levels, density=0.3, empty_rows=0, empty_level=None, generator=None):
    """Nested tags with odd features: level l keeps about density/(l+1); `empty_rows` leading rows are
    pruned at every level; `empty_level` (an index) keeps nothing at that level and beyond."""
    g = generator or torch.Generator().manual_seed(0)
    u = torch.rand(shape, generator=g)
    tags = torch.full(shape, -1, dtype=torch.int8)
    for lvl in range(num_levels):
        if empty_level is not None and lvl >= empty_level:
            break
        tags[u < density / (lvl + 1)] = lvl
    if empty_rows:
        tags[:empty_rows] = -1
    return tags


def nested(weight, tags, num_levels, index_dtype=None):
    w = NestedCSR.from_dense(weight, tags, num_levels=num_levels)
    if index_dtype is not None:
        w.col_idx = w.col_idx.to(index_dtype)
    return w.validate()


def tolerance(dtype):
    return {torch.float32: 2e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


def assert_close_to_reference(out, ref, dtype):
    """`ref` is float64; the error is measured relative to the reference's scale."""
    assert not torch.isnan(out).any(), "an output element was never written (NaN poison survived)"
    scale = ref.abs().max().item() + 1.0
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    assert err <= tolerance(dtype) * scale, f"max error {err:.3g} > {tolerance(dtype)} x scale {scale:.3g}"


def random_bcr_tags(
    shape,
    block_shape,
    num_levels,
    keep=0.6,
    empty_blocks=0.2,
    level0_only_blocks=0.2,
    empty_level=None,
    all_pruned=False,
    generator=None,
):
    """Random block row/column structured nested element tags of a weight of ``shape`` (a conv weight is seen
    as (Cout, Cin/g*kh*kw)), for NestedBCR.from_dense. Every local row and column of every block gets a tag
    (kept at level l with probability keep**(l+1)), with odd features: ``empty_blocks`` of the blocks keep
    nothing; ``level0_only_blocks`` of them keep rows at level 0 only (no row at any higher level);
    ``empty_level`` (an index) keeps nothing at that level and beyond; ``all_pruned`` keeps nothing at all."""
    g = generator or torch.Generator().manual_seed(0)
    M = shape[0]
    K = torch.Size(shape[1:]).numel() if len(shape) > 1 else 1
    bm, bk = block_shape
    MB, KB = -(-M // bm), -(-K // bk)
    levels = num_levels if empty_level is None else empty_level

    def side(n):
        u = torch.rand(MB, KB, n, generator=g)
        t = torch.full(u.shape, -1, dtype=torch.int8)
        for lvl in range(levels):
            t[u < keep ** (lvl + 1)] = lvl
        return t

    rt, ct = side(bm), side(bk)
    rt[torch.rand(MB, KB, generator=g) < empty_blocks] = -1
    capped = torch.rand(MB, KB, generator=g) < level0_only_blocks
    rt[capped] = rt[capped].clamp(max=0)
    full = torch.minimum(rt[:, :, :, None], ct[:, :, None, :]).permute(0, 2, 1, 3).reshape(MB * bm, KB * bk)
    tags = full[:M, :K].reshape(shape).contiguous()
    if all_pruned:
        tags.fill_(-1)
    return tags


def nested_bcr(weight, tags, block_shape, num_levels):
    """A validated NestedBCR of ``weight`` with element ``tags``."""
    return NestedBCR.from_dense(weight, tags, block_shape, num_levels=num_levels).validate()


# ---- every format alike -------------------------------------------------------------------------------------


class FormatCase:
    """How the tests build and call weights of one format, so that one test serves every format."""

    def __init__(self, name: str):
        self.name = name
        self.cls = FORMATS[name]

    def __repr__(self) -> str:
        return self.name

    @property
    def structure(self) -> str:
        """The tag structure the format stores (for nestsparse.model_tags)."""
        return "bcr" if self.name == "nbcr" else "unstructured"

    def tags(
        self,
        shape,
        num_levels,
        generator=None,
        density=0.4,
        block_shape=(8, 8),
        odd=True,
        empty_level=None,
        all_pruned=False,
    ):
        """Random nested tags this format can store, keeping about ``density`` of the weight at level 0 and less at
        every sparser level. With ``odd``: NCSR leaves the first rows empty, NBCR leaves blocks empty and blocks
        with nothing above level 0. ``empty_level`` keeps nothing from that level on; ``all_pruned`` nothing."""
        if self.name == "ncsr":
            tags = random_tags(
                shape,
                num_levels,
                density,
                empty_rows=min(2, shape[0] - 1) if odd else 0,
                empty_level=empty_level,
                generator=generator,
            )
            return tags.fill_(-1) if all_pruned else tags
        return random_bcr_tags(
            shape,
            block_shape,
            num_levels,
            keep=density**0.5,
            empty_blocks=0.2 if odd else 0,
            level0_only_blocks=0.2 if odd else 0,
            empty_level=empty_level,
            all_pruned=all_pruned,
            generator=generator,
        )

    def weight(self, weight, tags, num_levels, block_shape=(8, 8)):
        """``weight`` packed by ``tags`` in this format, validated."""
        w = nestsparse.formats.from_dense(self.name, weight, tags, num_levels=num_levels, block_shape=block_shape)
        return w.validate()

    def random(self, shape, num_levels, generator=None, dtype=torch.float32, block_shape=(8, 8), **tag_options):
        """A random weight of ``shape`` and random tags (see ``tags``), packed."""
        g = generator or torch.Generator().manual_seed(0)
        weight = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        return self.weight(
            weight, self.tags(shape, num_levels, g, block_shape=block_shape, **tag_options), num_levels, block_shape
        )

    def rows_per_unit(self, w) -> int:
        """The rows one entry of the plan spans (NBCR plans block rows)."""
        return w.block_shape[0] if self.name == "nbcr" else 1

    def units(self, w) -> int:
        """Rows (NCSR) or block rows (NBCR): what the plan partitions."""
        return -(-w.shape[0] // self.rows_per_unit(w))


@pytest.fixture(params=list(FORMATS), ids=list(FORMATS))
def fmt(request) -> FormatCase:
    """Runs a test once per storage format."""
    return FormatCase(request.param)


def has_kernel(op: str, device: str) -> bool:
    """Whether torch.ops.nestsparse.<op> has a kernel for ``device`` ("cpu" or "cuda")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"nestsparse::{op}", device.upper())


def activation_reference(name):
    """The torch module an activation name stands for (identity for "none"): the float64 reference."""
    a = ACTIVATIONS[name]
    return (lambda z: z) if a is None else a.module()


def linear_reference(x, w, level, bias=None, activation="none", scale=None, residual=None):
    """act(scale * x W_level^T + bias + residual) in float64 on the CPU, for a nested weight on any device."""
    z = x.double().cpu() @ w.to("cpu").to_dense(level).double().T
    if scale is not None:
        z = z * scale.double().cpu()
    if bias is not None:
        z = z + bias.double().cpu()
    if residual is not None:
        z = z + residual.double().cpu()
    return activation_reference(activation)(z)


def value_mask(w, level):
    """Boolean over w.values: whether each stored value belongs to level ``level``, in any format (each value is
    numbered, the level densified, and the numbers that appear are the level's)."""
    numbered = dataclasses.replace(w, values=torch.arange(1, w.values.numel() + 1, dtype=torch.float64))
    seen = numbered.to_dense(level).flatten().long()
    mask = torch.zeros(w.values.numel() + 1, dtype=torch.bool)
    mask[seen] = True
    return mask[1:]


def value_positions(w, level):
    """For every entry of w's level: (index into values, row, column) in the matrix (M, K)."""
    numbered = dataclasses.replace(w, values=torch.arange(1, w.values.numel() + 1, dtype=torch.float64))
    pos = numbered.to_dense(level).reshape(w.shape).long()
    rows, cols = pos.nonzero(as_tuple=True)
    return pos[rows, cols] - 1, rows, cols


TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "a", "very", "dull", "fun"]


@pytest.fixture
def tiny_minilm(tmp_path, monkeypatch):
    """A 2-layer, hidden-16 BERT with its tokenizer saved as the all-MiniLM-L6-v2 package's model directory is, and
    nestsparse.apps.models.minilm pointed at it (the real 84 MB model is optional and not in CI)."""
    transformers = pytest.importorskip("transformers", reason="the MiniLM tests need transformers (nestsparse[test])")
    from nestsparse.apps import models  # noqa: PLC0415
    from nestsparse.apps.models import minilm  # noqa: PLC0415

    d = tmp_path / "minilm"
    config = transformers.BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformers.BertModel(config, add_pooling_layer=False).save_pretrained(d)
    (d / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    transformers.BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
    monkeypatch.setattr(minilm, "minilm_path", lambda: d)  # what minilm_classifier / minilm_tokenizer call
    monkeypatch.setattr(models, "minilm_path", lambda: d)  # the package's re-export, what callers see
    return d
