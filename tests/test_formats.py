"""The storage formats (nestsparse.formats), every format alike through the ``fmt`` fixture: exact round trips (tags,
to_dense, mask and nnz of every level), sizes, flops and density, serialisation and moves, validate() naming every
broken invariant, from_dense refusing bad input. Then what is one format's own: NCSR's column index width and row
layout; NBCR's structured tags, from_tags, block layout, block shapes and the odd features of random_bcr_tags."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nestsparse
from nestsparse.formats import DEFAULT_BLOCK_SHAPE, FormatError, NestedBCR, NestedCSR

from conftest import DEVICES, FormatCase, random_bcr_tags, random_tags

NCSR, NBCR = FormatCase("ncsr"), FormatCase("nbcr")
BLOCK_SHAPES = [(1, 1), (3, 5), (8, 8), (16, 16), (32, 32)]


def block_tags(shape, block_shape, num_levels, keep=0.6, empty_blocks=0.2, empty_level=None, generator=None):
    """conftest.random_bcr_tags without the level-0-only blocks (these tests count blocks exactly)."""
    return random_bcr_tags(
        shape,
        block_shape,
        num_levels,
        keep=keep,
        empty_blocks=empty_blocks,
        level0_only_blocks=0.0,
        empty_level=empty_level,
        generator=generator,
    )


def packed(fmt, weight, tags, block_shape=(8, 8), **kwargs):
    """``weight`` packed by ``tags`` in ``fmt`` (num_levels and densities as in kwargs, else inferred), validated."""
    return nestsparse.formats.from_dense(fmt.name, weight, tags, block_shape=block_shape, **kwargs).validate()


# ---- round trips ---------------------------------------------------------------------------------------------


def _ncsr_round_trip(w, weight, tags, num_levels, block_shape):
    # level slicing: each level is a prefix of the denser level's row
    for level in range(num_levels):
        assert (w.row_end[level] >= w.row_ptr[:-1]).all()
        if level:
            assert (w.row_end[level] <= w.row_end[level - 1]).all()


def _nbcr_round_trip(w, weight, tags, num_levels, block_shape):
    assert w.block_shape == tuple(block_shape)
    assert w.row_col_tags()[0].shape == (*w.grid, block_shape[0])
    for a, b in zip(w.row_col_tags(), NestedBCR.structured_tags(tags, block_shape)):
        assert torch.equal(a, b)
    # from_tags with the stored row/column tags gives the same tensors
    again = NestedBCR.from_tags(weight, *w.row_col_tags(), block_shape, num_levels=num_levels)
    for a, b in zip(w.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


OWN_ROUND_TRIP = {"ncsr": _ncsr_round_trip, "nbcr": _nbcr_round_trip}


def check_round_trip(fmt, weight, tags, num_levels, block_shape=(8, 8)):
    """Packs, validates, and checks that tags, to_dense, mask and nnz of every level give the input back exactly."""
    w = fmt.weight(weight, tags, num_levels, block_shape)
    assert w.num_levels == num_levels and w.weight_shape == tuple(weight.shape)
    assert torch.equal(w.tags(), tags)
    for level in range(num_levels):
        assert torch.equal(w.to_dense(level), weight * (tags >= level))
        assert torch.equal(w.mask(level), tags >= level)
        assert w.nnz(level) == int((tags >= level).sum())
    OWN_ROUND_TRIP[fmt.name](w, weight, tags, num_levels, block_shape)
    return w


# Each format's hypothesis round trip keeps its own settings and ranges: NCSR small matrices down to empty ones, any
# tags (density per level); NBCR matrices up to 70 x 70 in every block shape, block-structured tags (keep per row and
# column).
SEEDS = st.integers(0, 2**31 - 1)
ROUND_TRIP = {
    "ncsr": (
        settings(max_examples=40, deadline=None),
        dict(M=st.integers(0, 12), K=st.integers(0, 40), L=st.integers(1, 4), density=st.floats(0.0, 1.0), seed=SEEDS),
    ),
    "nbcr": (
        settings(max_examples=60, deadline=None),
        dict(
            M=st.integers(1, 70),
            K=st.integers(1, 70),
            block_shape=st.sampled_from(BLOCK_SHAPES),
            L=st.integers(1, 3),
            keep=st.floats(0.1, 1.0),
            seed=SEEDS,
        ),
    ),
}


def test_round_trip_is_exact(fmt):
    # @given is applied here, per format, so that each format keeps its own settings and draws.
    fmt_settings, draws = ROUND_TRIP[fmt.name]

    @fmt_settings
    @given(**draws)
    def round_trip(M, K, L, seed, **own):
        g = torch.Generator().manual_seed(seed)
        weight = torch.randn(M, K, generator=g)
        if fmt.name == "ncsr":
            tags, block_shape = random_tags((M, K), L, own["density"], generator=g), (8, 8)
        else:
            block_shape = own["block_shape"]
            tags = block_tags((M, K), block_shape, L, own["keep"], generator=g)
        check_round_trip(fmt, weight, tags, L, block_shape)

    round_trip()


@pytest.mark.parametrize("shape", [(1, 37), (37, 1), (1, 1), (8, 3, 3, 3), (20, 4, 1, 1), (5,), (0, 5), (5, 0)])
def test_odd_shapes(fmt, shape):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(shape, generator=g)
    w = check_round_trip(fmt, weight, fmt.tags(shape, 2, g, density=0.64), 2)
    assert w.to_dense(1).shape == weight.shape


def test_conv_weight_is_viewed_as_a_matrix(fmt):
    weight = torch.randn(8, 3, 3, 3)
    w = check_round_trip(fmt, weight, fmt.tags(weight.shape, 2, block_shape=(3, 5)), 2, (3, 5))
    assert w.shape == (8, 27) and w.weight_shape == (8, 3, 3, 3)
    assert w.to_dense(1).shape == weight.shape and w.tags().shape == weight.shape


def test_an_empty_level_keeps_nothing(fmt):
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(45, 70, generator=g)
    w = check_round_trip(fmt, weight, fmt.tags(weight.shape, 3, g, density=0.5, empty_level=2), 3)
    assert w.nnz(1) > 0 and w.nnz(2) == 0 and not w.to_dense(2).any() and not w.mask(2).any()
    assert w.density(2) == 0.0 and w.flops(2, 7) == 0
    assert w.nbytes(2) == LEVEL_BYTES[fmt.name](w, 2) < w.nbytes(1)


# An all-pruned (10, 12) weight with 2 levels, in (4, 4) blocks, stores no value: only its (empty) index tables.
ALL_PRUNED = {
    "ncsr": dict(
        nbytes=(11 + 2 * 10) * 4,
        level_nbytes=(11 + 10) * 4,  # row_ptr, row_end (one row of it per level)
        index={"col_idx": ((0,), []), "row_ptr": ((11,), [0] * 11), "row_end": ((2, 10), [[0] * 10] * 2)},
        attrs={},
    ),
    "nbcr": dict(
        nbytes=4 * 4,
        level_nbytes=4 * 4,  # block_ptr: MB + 1 = 4 entries; no block, so no counts
        index={
            "indices": ((0,), []),
            "block_ptr": ((4,), [0, 0, 0, 0]),
            "blocks": ((0, 3), []),
            "counts": ((2, 0, 2), [[], []]),
        },
        attrs={"num_blocks": 0},
    ),
}


def test_all_pruned_weight_stores_no_value(fmt):
    weight = torch.randn(10, 12)
    tags = torch.full((10, 12), -1, dtype=torch.int8)
    w = check_round_trip(fmt, weight, tags, 2, (4, 4))
    expect = ALL_PRUNED[fmt.name]
    assert w.values.numel() == 0
    for name, t in zip(w.index_names, w.index_tensors()):
        assert (tuple(t.shape), t.tolist()) == expect["index"][name], name
    for attr, value in expect["attrs"].items():
        assert getattr(w, attr) == value, attr
    assert w.nbytes() == expect["nbytes"] and w.nbytes(1) == expect["level_nbytes"] and w.density(0) == 0.0
    assert all(w.nbytes(level) == LEVEL_BYTES[fmt.name](w, level) for level in range(2))


# ---- sizes, flops and density --------------------------------------------------------------------------------

# Bytes a product at ``level`` reads, by the format's contract (float32 values, int16 indices, int32 tables).
LEVEL_BYTES = {
    # its values and column indices, row_ptr and its own row of row_end
    "ncsr": lambda w, level: w.nnz(level) * (4 + 2) + (w.shape[0] + 1) * 4 + w.shape[0] * 4,
    # its r_l x c_l values and r_l + c_l indices per block, block_ptr, blocks and its own level of counts
    "nbcr": lambda w, level: (
        w.nnz(level) * 4
        + int(w.counts[level].to(torch.int64).sum()) * 2
        + (w.grid[0] + 1) * 4
        + w.num_blocks * 3 * 4
        + w.num_blocks * 2 * 4
    ),
}

# What one more level adds to the stored bytes: one level of the level table (NCSR: a row of row_end, M int32;
# NBCR: a level of counts, B x 2 int32).
LEVEL_TABLE_BYTES = {"ncsr": lambda w: w.shape[0] * 4, "nbcr": lambda w: w.num_blocks * 2 * 4}


def test_storage_does_not_grow_with_levels(fmt):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(64, 100, generator=g)
    tags3 = fmt.tags(weight.shape, 3, g, block_shape=(16, 16))
    three = fmt.weight(weight, tags3, 3, (16, 16))
    one = fmt.weight(weight, (tags3 >= 0).to(torch.int8) - 1, 1, (16, 16))
    assert three.nnz(0) == one.nnz(0) and torch.equal(three.values.sort().values, one.values.sort().values)
    assert three.nbytes() == one.nbytes() + 2 * LEVEL_TABLE_BYTES[fmt.name](three)  # only the two extra levels
    # bytes read by a level: its own entries only
    assert three.nbytes(2) < three.nbytes(1) < three.nbytes(0)
    for level in range(3):
        assert three.nbytes(level) == LEVEL_BYTES[fmt.name](three, level), level
    assert three.nbytes(0) == one.nbytes()


def _column_tags():
    tags = torch.full((10, 10), -1, dtype=torch.int8)
    tags[:, :3] = 0
    tags[:, 0] = 1
    return tags


def _corner_tags():
    tags = torch.full((10, 10), -1, dtype=torch.int8)
    tags[:4, :3] = 0
    tags[:2, :1] = 1
    return tags


# Two tag patterns on a 10 x 10 weight (in (5, 5) blocks for NBCR): nnz of levels 0 and 1, density of level 0,
# and the blocks NBCR stores.
FLOPS_CASES = {
    "columns": (_column_tags, 30, 10, 0.3, 2),
    "corner": (_corner_tags, 12, 2, 0.12, 1),
}


@pytest.mark.parametrize("case", list(FLOPS_CASES))
def test_flops_and_density(fmt, case):
    make_tags, nnz0, nnz1, density0, nbcr_blocks = FLOPS_CASES[case]
    w = packed(fmt, torch.randn(10, 10), make_tags(), (5, 5))
    assert w.num_levels == 2
    assert w.nnz(0) == nnz0 and w.nnz(1) == nnz1
    assert w.flops(1, 7) == 2 * nnz1 * 7 and w.flops(0, 7) == 2 * nnz0 * 7 and w.density(0) == pytest.approx(density0)
    assert w.density(1) == pytest.approx(nnz1 / 100)
    if fmt.name == "nbcr":
        assert w.num_blocks == nbcr_blocks
    with pytest.raises(ValueError, match="level 2 is out of range"):
        w.to_dense(2)


# ---- serialisation and moves ---------------------------------------------------------------------------------


def test_state_dict_round_trip_and_dtype_move(fmt):
    weight = torch.randn(9, 14)
    tags = fmt.tags(weight.shape, 2, block_shape=(4, 4))
    w = packed(fmt, weight, tags, (4, 4), densities=(0.3, 0.15))
    back = fmt.cls.from_state_dict(w.state_dict())
    assert list(back.state_dict()) == list(w.state_dict())
    for a, b in zip(w.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    assert back.densities == (0.3, 0.15) and back.weight_shape == (9, 14) and back.options() == w.options()
    if fmt.name == "nbcr":
        assert back.block_shape == (4, 4)
    bf = w.to(dtype=torch.bfloat16).validate()
    assert bf.values.dtype == torch.bfloat16 and bf.index_tensors()[0].dtype == torch.int16  # col_idx / indices
    assert all(a.dtype == b.dtype for a, b in zip(bf.index_tensors(), w.index_tensors()))
    assert torch.equal(bf.to_dense(1), w.to_dense(1).bfloat16())
    for device in DEVICES:
        moved = w.to(device).validate()
        assert all(t.device.type == device for t in (moved.values, *moved.index_tensors()))
        assert torch.equal(moved.to_dense(1).cpu(), w.to_dense(1)) and torch.equal(moved.tags().cpu(), tags)


# A bad state dict entry and what the refusal names: every format's, then each format's own.
BAD_ENTRIES = {
    "weight_shape": (lambda t: t.float(), "weight_shape must be a 1-D non-empty non-negative int64 tensor"),
    "densities": (lambda t: torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64), "3 densities for 2 levels"),
}
OWN_BAD_ENTRIES = {
    "ncsr": {"values": (lambda t: t[:-1], "values and col_idx must be 1-D of equal length")},
    "nbcr": {
        "values": (lambda t: t[:-1], "values are stored"),
        "block_shape": (lambda t: torch.tensor([4, 4, 1]), "block_shape must be an int64 tensor of shape \\(2,\\)"),
    },
}


def test_state_dict_with_missing_key_or_bad_entry_is_refused(fmt):
    w = packed(fmt, torch.randn(9, 14), fmt.tags((9, 14), 2, block_shape=(4, 4)), (4, 4), num_levels=2)
    for key in w.state_dict():
        sd = w.state_dict()
        del sd[key]
        with pytest.raises(FormatError, match=f"{fmt.cls.__name__}: state dict lacks \\['{key}'\\]"):
            fmt.cls.from_state_dict(sd)
    for key, (bad, pattern) in {**BAD_ENTRIES, **OWN_BAD_ENTRIES[fmt.name]}.items():
        sd = w.state_dict()
        sd[key] = bad(sd[key])
        with pytest.raises(FormatError, match=pattern):
            fmt.cls.from_state_dict(sd)


# ---- validate() names every broken invariant -----------------------------------------------------------------


def _ncsr_base():
    """6 x 10, 2 levels: every other column at level 0, every fourth at level 1 (5 entries a row, 3 of level 1)."""
    weight = torch.randn(6, 10)
    tags = torch.full((6, 10), -1, dtype=torch.int8)
    tags[:, ::2] = 0
    tags[:, ::4] = 1
    return NCSR.weight(weight, tags, 2)


def _nbcr_base():
    """45 x 70 in (8, 8) blocks (a partial last block row and column), 3 levels."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(45, 70, generator=g)
    w = NestedBCR.from_dense(weight, block_tags(weight.shape, (8, 8), 3, keep=0.7, generator=g), (8, 8), 3)
    return w.validate()


BASES = {"ncsr": _ncsr_base, "nbcr": _nbcr_base}


def _block(w, cond):
    """The first stored block satisfying ``cond(r, c)`` on its (L, 2) counts, and its index offset."""
    for b in range(w.num_blocks):
        if cond(w.counts[:, b, 0], w.counts[:, b, 1]):
            return b, int(w.blocks[b, 2])
    raise AssertionError("the base object lacks a block for this corruption")


def _set(name, fn):
    def corrupt(w):
        setattr(w, name, fn(getattr(w, name)))

    return corrupt


def _edit(name, fn):
    def corrupt(w):
        t = getattr(w, name).clone()
        fn(w, t)
        setattr(w, name, t)

    return corrupt


def _on_meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _counts_at(level, b_cond, value):
    def fn(w, t):
        b, _ = _block(w, b_cond)
        t[level, b] = torch.tensor(value(t[:, b]))

    return _edit("counts", fn)


def _partial_edge_row(w, t):
    # the first block of the last block row (rows 40..44 of 45): local row 6 is global row 46, outside
    t[int(w.blocks[int(w.block_ptr[-2]), 2])] = 6


def _swap_same_tag(w, t):
    b, off = _block(w, lambda r, c: int(r[0]) - int(r[1]) >= 2)  # two level-0-only rows after the level-1 rows
    p = off + int(w.counts[1, b, 0])
    t[p], t[p + 1] = t[p + 1].clone(), t[p].clone()


def _repeat_across_tags(w, t):
    b, off = _block(w, lambda r, c: int(r[1]) >= 1 and int(r[0]) > int(r[1]))
    t[off + int(w.counts[0, b, 0]) - 1] = t[off]  # the last row (tag 0) repeats the first (tag >= 1)


def _unsort_block_columns(w, t):
    i = next(i for i in range(len(w.block_ptr) - 1) if int(w.block_ptr[i + 1]) - int(w.block_ptr[i]) >= 2)
    b = int(w.block_ptr[i])
    t[b, 0], t[b + 1, 0] = t[b + 1, 0].clone(), t[b, 0].clone()


def _shorten_values_and_col_idx(w):
    w.values, w.col_idx = w.values[:-1], w.col_idx[:-1]


# Per format: a corruption of the base object, and the pattern validate()'s FormatError must match. The NCSR row
# has 5 entries (col_idx 0, 4, 8 at level 1, then 2, 6), row_ptr = [0, 5, ..., 30].
CORRUPTIONS = {
    "ncsr": {
        "col_idx outside": (lambda w: w.col_idx.__setitem__(3, 10), "outside \\[0, K=10\\)"),
        "negative col": (lambda w: w.col_idx.__setitem__(0, -1), "outside"),
        "row_ptr order": (lambda w: w.row_ptr.__setitem__(2, 1), "row_ptr is not non-decreasing|row_end\\[0"),
        "row_ptr[0]": (lambda w: w.row_ptr.__setitem__(0, 1), "row_ptr\\[0\\]"),
        "nesting": (lambda w: w.row_end.__setitem__((1, 2), int(w.row_ptr[3]) + 1), "not nested"),
        "duplicate": (lambda w: w.col_idx.__setitem__(1, int(w.col_idx[0])), "sorted|twice"),
        "unsorted": (lambda w: w.col_idx.__setitem__(int(w.row_end[1, 0]), 9), "sorted"),
        # the invariants NBCR's table checks too
        "values dtype": (_set("values", lambda t: t.to(torch.int32)), "values dtype torch.int32"),
        "col_idx dtype": (_set("col_idx", lambda t: t.long()), "col_idx dtype torch.int64 must be int16 or int32"),
        "col_idx too narrow": (
            lambda w: setattr(w, "weight_shape", (6, 40000)),
            "col_idx is int16 but K = 40000 > 32767",
        ),
        "row_ptr dtype": (
            _set("row_ptr", lambda t: t.long()),
            "row_ptr and row_end must be int32, got torch.int64 and torch.int32",
        ),
        "row_end dtype": (
            _set("row_end", lambda t: t.long()),
            "row_ptr and row_end must be int32, got torch.int32 and torch.int64",
        ),
        "device": (_set("row_end", _on_meta), "row_end is on meta"),
        "row_ptr shape": (_set("row_ptr", lambda t: t[:-1]), "row_ptr must have shape \\(7,\\), got \\(6,\\)"),
        "row_end shape": (
            _set("row_end", lambda t: t[:, :-1].contiguous()),
            "row_end must have shape \\(L, 6\\) with L >= 1, got \\(2, 5\\)",
        ),
        "no level": (
            _set("row_end", lambda t: t[:0]),
            "row_end must have shape \\(L, 6\\) with L >= 1, got \\(0, 6\\)",
        ),
        "values not 1-D": (
            _set("values", lambda t: t[:, None]),
            "values and col_idx must be 1-D of equal length, got \\(30, 1\\) and \\(30,\\)",
        ),
        "densities": (lambda w: setattr(w, "densities", (0.5,)), "1 densities for 2 levels"),
        "contiguity": (_set("row_end", lambda t: t.t().contiguous().t()), "row_end is not contiguous"),
        "row_ptr end": (
            _edit("row_ptr", lambda w, t: t.__setitem__(-1, int(t[-1]) - 1)),
            "row_ptr\\[M\\] = 29 but 30 values are stored",
        ),
        "level 0 row": (
            _edit("row_end", lambda w, t: t.__setitem__((0, 2), int(t[0, 2]) - 1)),
            "row_end\\[0, 2\\] = 14 != row_ptr\\[3\\] = 15 \\(level 0 is the whole row\\)",
        ),
        "nesting below row start": (
            _edit("row_end", lambda w, t: t.__setitem__((1, 2), int(w.row_ptr[2]) - 1)),
            "levels are not nested in row 2: row_end\\[1, 2\\] = 9 < row_ptr\\[2\\] = 10",
        ),
        "value count": (
            _set("values", lambda t: t[:-1]),
            "values and col_idx must be 1-D of equal length, got \\(29,\\) and \\(30,\\)",
        ),
        "index count": (
            _set("col_idx", lambda t: torch.cat([t, t[:1]])),
            "values and col_idx must be 1-D of equal length, got \\(30,\\) and \\(31,\\)",
        ),
        "entry count": (_shorten_values_and_col_idx, "row_ptr\\[M\\] = 30 but 29 values are stored"),
    },
    "nbcr": {
        "values dtype": (_set("values", lambda t: t.to(torch.int32)), "values dtype torch.int32"),
        "indices dtype": (_set("indices", lambda t: t.to(torch.int32)), "indices dtype torch.int32 must be int16"),
        "block_ptr dtype": (_set("block_ptr", lambda t: t.long()), "block_ptr dtype torch.int64 must be int32"),
        "counts dtype": (_set("counts", lambda t: t.long()), "counts dtype torch.int64 must be int32"),
        "device": (_set("counts", _on_meta), "counts is on meta"),
        "block shape": (lambda w: setattr(w, "block_shape", (0, 8)), "block_shape must be two ints .* got \\(0, 8\\)"),
        "block shape too big": (lambda w: setattr(w, "block_shape", (8, 257)), "in \\[1, 256\\], got \\(8, 257\\)"),
        "block_ptr shape": (
            _set("block_ptr", lambda t: t[:-1]),
            "block_ptr must have shape \\(MB \\+ 1,\\) = \\(7,\\)",
        ),
        "blocks shape": (_set("blocks", lambda t: t[:, :2].contiguous()), "blocks must have shape \\(B, 3\\)"),
        "counts shape": (_set("counts", lambda t: t[:, :-1].contiguous()), "counts must have shape \\(L, B, 2\\)"),
        "densities": (lambda w: setattr(w, "densities", (0.5,)), "1 densities for 3 levels"),
        "contiguity": (_set("blocks", lambda t: t.t().contiguous().t()), "blocks is not contiguous"),
        "block_ptr[0]": (_edit("block_ptr", lambda w, t: t.__setitem__(0, 1)), "block_ptr\\[0\\] = 1"),
        "block_ptr order": (_edit("block_ptr", lambda w, t: t.__setitem__(1, int(t[2]) + 1)), "not non-decreasing"),
        "block_ptr end": (
            _edit("block_ptr", lambda w, t: t.__setitem__(-1, int(t[-1]) - 1)),
            "block_ptr\\[MB\\] = block_ptr\\[6\\] = .* blocks are stored",
        ),
        "block column range": (
            _edit("blocks", lambda w, t: t.__setitem__((0, 0), 9)),
            "block column 9, outside \\[0, KB=9\\)",
        ),
        "block column order": (_edit("blocks", _unsort_block_columns), "not sorted by block column"),
        "r above bm": (_counts_at(0, lambda r, c: True, lambda x: [9, int(x[0, 1])]), "r_0 is outside \\[0, bm=8\\]"),
        "c negative": (_counts_at(2, lambda r, c: True, lambda x: [int(x[2, 0]), -1]), "c_2 is outside \\[0, bk=8\\]"),
        "r0 zero": (_counts_at(slice(None), lambda r, c: True, lambda x: [[0, 0]] * 3), "keeps no row at level 0"),
        "nesting": (
            _counts_at(1, lambda r, c: int(r[0]) < 8 and int(r[1]) >= 1, lambda x: [int(x[0, 0]) + 1, int(x[1, 1])]),
            "not nested: level 1 keeps",
        ),
        "r without c": (
            _counts_at(2, lambda r, c: int(r[2]) >= 1, lambda x: [int(x[2, 0]), 0]),
            "r_l == 0 must hold exactly when c_l == 0",
        ),
        "value offset": (
            _edit("blocks", lambda w, t: t.__setitem__((1, 1), int(t[1, 1]) + 1)),
            "value offset of block 1",
        ),
        "index offset": (
            _edit("blocks", lambda w, t: t.__setitem__((2, 2), int(t[2, 2]) - 1)),
            "index offset of block 2",
        ),
        "value count": (_set("values", lambda t: t[:-1]), "values are stored but the blocks hold"),
        "index count": (_set("indices", lambda t: torch.cat([t, t[:1]])), "indices are stored but the blocks hold"),
        "index outside block": (
            _edit("indices", lambda w, t: t.__setitem__(0, 8)),
            "indices\\[0\\] = 8, row 0 .* outside the block",
        ),
        "negative index": (
            _edit("indices", lambda w, t: t.__setitem__(int(w.counts[0, 0, 0]), -1)),
            "column 0 .* outside the block",
        ),
        "index outside matrix": (_edit("indices", _partial_edge_row), "global row 46, outside the matrix \\(45 rows"),
        "index order": (_edit("indices", _swap_same_tag), "not ordered by descending tag, then number"),
        "index repeat": (_edit("indices", _repeat_across_tags), "holds row .* twice"),
        # the invariants NCSR's table checks too
        "no level": (
            _set("counts", lambda t: t[:0]),
            "counts must have shape \\(L, B, 2\\) = \\(L, \\d+, 2\\) with L >= 1, got \\(0, \\d+, 2\\)",
        ),
        "values not 1-D": (
            _set("values", lambda t: t[:, None]),
            "values and indices must be 1-D, got shapes \\(\\d+, 1\\)",
        ),
    },
}


def _corruption_params():
    for fmt_name, table in CORRUPTIONS.items():
        for name, entry in table.items():
            if not hasattr(entry, "marks"):  # a plain (corrupt, pattern), not a pytest.param with marks
                entry = pytest.param(*entry)
            yield pytest.param(fmt_name, name, *entry.values, marks=entry.marks, id=f"{fmt_name}-{name}")


@pytest.mark.parametrize("fmt,name,corrupt,pattern", list(_corruption_params()), indirect=["fmt"])
def test_validate_names_the_broken_invariant(fmt, name, corrupt, pattern):
    w = BASES[fmt.name]()
    corrupt(w)
    with pytest.raises(FormatError, match=pattern):
        w.validate()


# ---- from_dense refuses bad input ----------------------------------------------------------------------------


def test_from_dense_refuses_bad_tags_and_arguments(fmt):
    where = f"{fmt.cls.__name__}.from_dense: "
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match=where + "tags shape \\(4, 3\\) != weight shape \\(3, 4\\)"):
        fmt.cls.from_dense(w, torch.zeros(4, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match=where + "tags must lie in \\[-1, 1\\], got \\[2, 2\\]"):
        fmt.cls.from_dense(w, torch.full((3, 4), 2, dtype=torch.int8), num_levels=2)
    with pytest.raises(ValueError, match=where + "tags must lie in \\[-1, 1\\], got \\[-2, -2\\]"):
        fmt.cls.from_dense(w, torch.full((3, 4), -2, dtype=torch.int8), num_levels=2)
    with pytest.raises(ValueError, match=where + "tags must be an integer tensor, got torch.float32"):
        fmt.cls.from_dense(w, torch.zeros(3, 4))
    with pytest.raises(ValueError, match=where + "weight dtype torch.int64"):
        fmt.cls.from_dense(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match=where + "2 densities for 1 levels"):
        fmt.cls.from_dense(w, torch.zeros(3, 4, dtype=torch.int8), num_levels=1, densities=(0.5, 0.2))
    with pytest.raises(ValueError, match=where + "num_levels must be >= 1, got 0"):
        fmt.cls.from_dense(w, torch.zeros(3, 4, dtype=torch.int8), num_levels=0)


# ---- NCSR's own ------------------------------------------------------------------------------------------------


def test_ncsr_column_index_width():
    # col_idx is int16 up to K = 32767 columns, int32 beyond (a conv weight has Cin/g*kh*kw columns)
    weight = torch.randn(8, 3, 3, 3)
    w = NCSR.weight(weight, random_tags(weight.shape, 2), 2)
    assert w.shape == (8, 27) and w.col_idx.dtype == torch.int16
    assert w.to_dense(1).shape == weight.shape
    wide = NestedCSR.from_dense(torch.randn(2, 40000), random_tags((2, 40000), 1, 0.01), num_levels=1)
    assert wide.col_idx.dtype == torch.int32
    wide.validate()
    for K, dtype in ((32767, torch.int16), (32768, torch.int32)):
        assert NestedCSR.from_dense(torch.randn(1, K), torch.zeros(1, K, dtype=torch.int8)).col_idx.dtype == dtype


def test_ncsr_layout_follows_the_contract():
    # Row 0 keeps columns 1 and 3 (tag 1) and 0 (tag 0): sparsest level first, then by column. Row 1 is empty.
    weight = torch.arange(8.0).reshape(2, 4)
    tags = torch.tensor([[0, 1, -1, 1], [-1, -1, -1, -1]], dtype=torch.int8)
    w = NestedCSR.from_dense(weight, tags, num_levels=2).validate()
    assert w.values.tolist() == [1.0, 3.0, 0.0] and w.col_idx.tolist() == [1, 3, 0]
    assert w.row_ptr.tolist() == [0, 3, 3] and w.row_end.tolist() == [[3, 3], [2, 3]]


# ---- NBCR's own ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 37), (37, 1), (1, 1), (8, 3, 3, 3), (20, 4, 1, 1), (5,)])
@pytest.mark.parametrize("block_shape", [(3, 5), (16, 16)])
def test_nbcr_odd_shapes_per_block_shape(shape, block_shape):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(shape, generator=g)
    w = check_round_trip(NBCR, weight, block_tags(shape, block_shape, 2, 0.8, generator=g), 2, block_shape)
    assert w.to_dense(1).shape == weight.shape


def test_nbcr_conv_weight_is_tiled_as_a_matrix():
    weight = torch.randn(8, 3, 3, 3)
    w = NestedBCR.from_dense(weight, block_tags(weight.shape, (3, 5), 2), (3, 5))
    assert w.shape == (8, 27) and w.grid == (3, 6) and w.weight_shape == (8, 3, 3, 3)


def test_nbcr_three_levels_with_empty_blocks_and_an_empty_level():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(45, 70, generator=g)
    tags = block_tags(weight.shape, (8, 8), 3, keep=0.5, empty_blocks=0.4, empty_level=2, generator=g)
    w = check_round_trip(NBCR, weight, tags, 3, (8, 8))
    assert w.num_blocks < 6 * 9  # some blocks are not stored
    assert (w.counts[1] == 0).any()  # some blocks keep nothing at level 1
    assert w.nnz(2) == 0 and (w.counts[2] == 0).all() and not w.to_dense(2).any()


def test_nbcr_level0_only_blocks():
    # random_bcr_tags' blocks that keep rows at level 0 only: stored, with nothing beyond level 0
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 64, generator=g)
    tags = random_bcr_tags(weight.shape, (8, 8), 3, keep=0.9, empty_blocks=0.0, level0_only_blocks=0.5, generator=g)
    w = check_round_trip(NBCR, weight, tags, 3, (8, 8))
    only0 = (w.counts[0, :, 0] > 0) & (w.counts[1:, :, 0] == 0).all(0)
    assert w.num_blocks == 64 and only0.any() and not only0.all()


def test_nbcr_layout_follows_the_contract():
    # One (4, 4) block: rows 2 (tag 1) and 0 (tag 0), columns 3 (tag 1), 1 and 2 (tag 0).
    weight = torch.arange(16.0).reshape(4, 4)
    rt = torch.tensor([[[0, -1, 1, -1]]], dtype=torch.int8)
    ct = torch.tensor([[[-1, 0, 0, 1]]], dtype=torch.int8)
    w = NestedBCR.from_tags(weight, rt, ct, (4, 4)).validate()
    assert w.indices.tolist() == [2, 0, 3, 1, 2]
    assert w.counts.tolist() == [[[2, 3]], [[1, 1]]]
    assert w.values.tolist() == [11.0, 9.0, 10.0, 3.0, 1.0, 2.0]  # row-major, leading dimension c0
    assert w.blocks.tolist() == [[0, 0, 0]] and w.block_ptr.tolist() == [0, 1]
    assert w.to_dense(1).nonzero().tolist() == [[2, 3]]


def test_nbcr_from_tags_makes_tags_canonical():
    # Row 0 says level 2 but no column of its block goes beyond level 0: it is stored as level 0, and so is
    # column 1 (level 1) of a block with no row beyond level 0.
    weight = torch.randn(2, 2)
    rt = torch.tensor([[[2, 0]]], dtype=torch.int8)
    ct = torch.tensor([[[0, -1]]], dtype=torch.int8)
    w = NestedBCR.from_tags(weight, rt, ct, (2, 2), num_levels=3).validate()
    assert w.counts[:, 0].tolist() == [[2, 1], [0, 0], [0, 0]]
    assert w.row_col_tags()[0].tolist() == [[[0, 0]]]
    rt2, ct2 = torch.tensor([[[0, 0]]], dtype=torch.int8), torch.tensor([[[1, 0]]], dtype=torch.int8)
    w2 = NestedBCR.from_tags(weight, rt2, ct2, (2, 2), num_levels=2).validate()
    assert w2.row_col_tags()[1].tolist() == [[[0, 0]]] and w2.nnz(1) == 0


def test_nbcr_default_block_shape():
    weight = torch.randn(40, 70)
    w = NestedBCR.from_dense(weight, block_tags(weight.shape, DEFAULT_BLOCK_SHAPE, 2), num_levels=2)
    assert w.block_shape == DEFAULT_BLOCK_SHAPE and w.grid == (2, 3)


def test_nbcr_from_dense_refuses_unstructured_tags():
    tags = torch.full((40, 64), -1, dtype=torch.int8)
    tags[3, 40], tags[3, 41], tags[5, 40] = 0, 1, 2
    msg = (
        "tags are not block row/column structured (block shape (32, 32)): element (3, 40) in block (0, 1) has "
        "tag 0, but its row and column are kept up to levels 1 and 2, so it would have tag 1"
    )
    with pytest.raises(FormatError) as err:
        NestedBCR.from_dense(torch.randn(40, 64), tags)
    assert msg in str(err.value)
    # an element pruned inside a kept row and a kept column
    tags = torch.zeros(4, 4, dtype=torch.int8)
    tags[1, 2] = -1
    with pytest.raises(FormatError, match="element \\(1, 2\\) in block \\(0, 0\\) has tag -1, .* would have tag 0"):
        NestedBCR.structured_tags(tags, (4, 4))
    # the same pattern is fine when rows 1 and column 2 lie in different blocks
    tags = torch.zeros(4, 4, dtype=torch.int8)
    tags[:2, 2:] = -1
    NestedBCR.structured_tags(tags, (2, 2))


def test_nbcr_from_dense_refuses_bad_block_shape():
    w = torch.randn(3, 4)
    for bad in [(0, 4), (4, 257), (4,), (2.0, 2), 4]:
        with pytest.raises(
            ValueError, match=f"block_shape must be two ints .* got {bad!r}".replace("(", "\\(").replace(")", "\\)")
        ):
            NestedBCR.from_dense(w, torch.zeros(3, 4, dtype=torch.int8), bad)
    with pytest.raises(ValueError, match="2 densities for 1 levels"):
        NestedBCR.from_dense(w, torch.zeros(3, 4, dtype=torch.int8), (2, 2), 1, (0.5, 0.2))


def test_nbcr_from_tags_refuses_bad_tags():
    w = torch.randn(5, 7)
    rt, ct = torch.zeros(2, 3, 4, dtype=torch.int8), torch.zeros(2, 3, 3, dtype=torch.int8)
    with pytest.raises(ValueError, match="row_tags must have shape \\(2, 3, 3\\) .* got \\(2, 3, 4\\)"):
        NestedBCR.from_tags(w, rt, ct, (3, 3))
    rt = torch.zeros(2, 3, 3, dtype=torch.int8)
    with pytest.raises(ValueError, match="row_tags\\[1, 0, 2\\] = 0, but local row 2 of block \\(1, 0\\) lies outside"):
        NestedBCR.from_tags(w, rt, ct, (3, 3))
    rt[1, :, 2] = -1
    with pytest.raises(ValueError, match="col_tags\\[0, 2, 1\\] = 0, but local column 1 of block \\(0, 2\\)"):
        NestedBCR.from_tags(w, rt, ct, (3, 3))
    ct[:, 2, 1:] = -1
    NestedBCR.from_tags(w, rt, ct, (3, 3)).validate()
    with pytest.raises(ValueError, match="must lie in \\[-1, 0\\], got \\[-1, 1\\]"):
        NestedBCR.from_tags(w, rt, ct + (ct >= 0).to(torch.int8), (3, 3), num_levels=1)


def test_ncsr_refuses_more_non_zeros_than_int32_row_pointers_hold_before_allocating_them():
    # 65536 x 32769 entries, all kept: 2^31 + 65536 non-zeros. The tensors are broadcast views (no memory); the
    # refusal comes from counting them, before the 16 GB int64 copy of the tags and the index lists.
    M, K = 65536, 32769
    weight = torch.zeros(1).expand(M, K)
    tags = torch.zeros(1, dtype=torch.int8).expand(M, K)
    with pytest.raises(ValueError, match=r"more than 2147483647 non-zeros"):
        NestedCSR.from_dense(weight, tags, num_levels=1)


# ---- large weights: packed and checked a slab at a time ------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1000), (17, 3), (33, 70), (5, 4, 3, 3)])
def test_packing_and_checks_by_slabs_give_what_one_slab_gives(fmt, shape, monkeypatch):
    """from_dense and validate walk a large weight a slab of rows (or blocks) at a time; a slab of a few elements
    must give the same arrays, and validate must still find a broken row in a later slab."""
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(shape, generator=g)
    tags = fmt.tags(shape, 3, g, density=0.5, block_shape=(3, 5))
    whole = packed(fmt, weight, tags, block_shape=(3, 5), num_levels=3)
    monkeypatch.setattr(nestsparse.formats.base, "SLAB_ELEMENTS", 7)
    slabs = packed(fmt, weight, tags, block_shape=(3, 5), num_levels=3)
    for a, b in zip(whole.index_tensors(), slabs.index_tensors()):
        assert torch.equal(a, b)
    assert torch.equal(whole.values, slabs.values)
    if fmt.name == "ncsr" and slabs.nnz(0) > 2:
        last = int(slabs.row_ptr.to(torch.int64).diff().nonzero()[-1])  # the last row holding entries
        lo, hi = int(slabs.row_ptr[last]), int(slabs.row_ptr[last + 1])
        if hi - lo > 1:
            slabs.col_idx[hi - 1] = slabs.col_idx[lo]  # the row holds a column twice (or out of order)
            with pytest.raises(FormatError, match=f"row {last} "):
                slabs.validate()


@pytest.mark.parametrize("fmt_name", ["ncsr", "nbcr"])
def test_converting_a_large_layer_peaks_under_three_times_its_weight(fmt_name):
    """Converting one 16384 x 16384 Linear peaked at 12.6x its weight's bytes (int64 copies of every tag and index
    at once, a copy of the model, checks and copies of the packed arrays); bench/convert.py prints the figures. The
    peak counted: the dense weight the caller holds plus what convert adds above what the process held before it
    (what making the tags left behind in the allocator is not convert's)."""
    script = """
import sys, torch, nestsparse
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4096, 4096))
structure = "bcr" if sys.argv[1] == "nbcr" else "unstructured"
tags = nestsparse.model_tags(model, (0.5, 0.2), structure=structure)
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
nestsparse.convert(model, tags, format=sys.argv[1])
print((status("VmHWM") - before) / model[0].weight.nbytes + 1)
"""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    done = subprocess.run([sys.executable, "-c", script, fmt_name], capture_output=True, text=True, check=True)
    ratio = float(done.stdout.strip().splitlines()[-1])
    assert ratio < 3, f"converting peaked at {ratio:.2f}x the dense weight's bytes (the weight itself included)"
