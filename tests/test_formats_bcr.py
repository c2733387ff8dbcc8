import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_bcr_tags
from nestsparse.formats import DEFAULT_BLOCK_SHAPE, FormatError, NestedBCR

BLOCK_SHAPES = [(1, 1), (3, 5), (8, 8), (16, 16), (32, 32)]


def block_tags(shape, block_shape, num_levels, keep=0.6, empty_blocks=0.2, empty_level=None, generator=None):
    """conftest.random_bcr_tags without the level-0-only blocks (these tests count blocks exactly)."""
    return random_bcr_tags(shape, block_shape, num_levels, keep=keep, empty_blocks=empty_blocks, level0_only_blocks=0.0,
                           empty_level=empty_level, generator=generator)


def check_round_trip(weight, tags, block_shape, num_levels):
    w = NestedBCR.from_dense(weight, tags, block_shape, num_levels=num_levels).validate()
    assert w.num_levels == num_levels and w.block_shape == tuple(block_shape)
    assert torch.equal(w.tags(), tags)
    assert w.row_col_tags()[0].shape == (*w.grid, block_shape[0])
    for a, b in zip(w.row_col_tags(), NestedBCR.structured_tags(tags, block_shape)):
        assert torch.equal(a, b)
    for level in range(num_levels):
        assert torch.equal(w.to_dense(level), weight * (tags >= level))
        assert torch.equal(w.mask(level), tags >= level)
        assert w.nnz(level) == int((tags >= level).sum())
    # from_tags with the stored row/column tags gives the same tensors
    again = NestedBCR.from_tags(weight, *w.row_col_tags(), block_shape, num_levels=num_levels)
    for a, b in zip(w.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    return w


@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 70), K=st.integers(1, 70), block_shape=st.sampled_from(BLOCK_SHAPES),
       L=st.integers(1, 3), keep=st.floats(0.1, 1.0), seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_exact(M, K, block_shape, L, keep, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(M, K, generator=g)
    check_round_trip(weight, block_tags((M, K), block_shape, L, keep, generator=g), block_shape, L)


@pytest.mark.parametrize("shape", [(1, 37), (37, 1), (1, 1), (8, 3, 3, 3), (20, 4, 1, 1), (5,)])
@pytest.mark.parametrize("block_shape", [(3, 5), (16, 16)])
def test_odd_shapes(shape, block_shape):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(shape, generator=g)
    w = check_round_trip(weight, block_tags(shape, block_shape, 2, 0.8, generator=g), block_shape, 2)
    assert w.to_dense(1).shape == weight.shape


def test_conv_weight_is_viewed_as_a_matrix():
    weight = torch.randn(8, 3, 3, 3)
    w = NestedBCR.from_dense(weight, block_tags(weight.shape, (3, 5), 2), (3, 5))
    assert w.shape == (8, 27) and w.grid == (3, 6) and w.weight_shape == (8, 3, 3, 3)


def test_three_levels_with_empty_blocks_and_an_empty_level():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(45, 70, generator=g)
    tags = block_tags(weight.shape, (8, 8), 3, keep=0.5, empty_blocks=0.4, empty_level=2, generator=g)
    w = check_round_trip(weight, tags, (8, 8), 3)
    assert w.num_blocks < 6 * 9  # some blocks are not stored
    assert (w.counts[1] == 0).any()  # some blocks keep nothing at level 1
    assert w.nnz(2) == 0 and (w.counts[2] == 0).all() and not w.to_dense(2).any()


def test_all_pruned_weight_stores_no_block():
    weight = torch.randn(10, 12)
    tags = torch.full((10, 12), -1, dtype=torch.int8)
    w = check_round_trip(weight, tags, (4, 4), 2)
    assert w.num_blocks == 0 and w.values.numel() == 0 and w.indices.numel() == 0
    assert w.blocks.shape == (0, 3) and w.counts.shape == (2, 0, 2) and w.block_ptr.tolist() == [0, 0, 0, 0]
    assert w.nbytes() == 4 * 4 and w.nbytes(1) == 4 * 4 and w.density(0) == 0.0


def test_layout_follows_the_contract():
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


def test_from_tags_makes_tags_canonical():
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


def test_storage_does_not_grow_with_levels():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(64, 100, generator=g)
    tags3 = block_tags(weight.shape, (16, 16), 3, generator=g)
    three = NestedBCR.from_dense(weight, tags3, (16, 16), num_levels=3)
    one = NestedBCR.from_dense(weight, (tags3 >= 0).to(torch.int8) - 1, (16, 16), num_levels=1)
    B = three.num_blocks
    assert three.nnz(0) == one.nnz(0) and torch.equal(three.values.sort().values, one.values.sort().values)
    assert three.nbytes() == one.nbytes() + 2 * B * 2 * 4  # only the two extra levels of counts
    assert three.nbytes(2) < three.nbytes(1) < three.nbytes(0)
    rc = three.counts[2].to(torch.int64)
    tables = (4 + 1) * 4 + B * 3 * 4 + B * 2 * 4
    assert three.nbytes(2) == three.nnz(2) * 4 + int(rc.sum()) * 2 + tables
    assert three.nbytes(0) == one.nbytes()


def test_flops_and_density():
    weight = torch.randn(10, 10)
    tags = torch.full((10, 10), -1, dtype=torch.int8)
    tags[:4, :3] = 0
    tags[:2, :1] = 1
    w = NestedBCR.from_dense(weight, tags, (5, 5)).validate()
    assert w.nnz(0) == 12 and w.nnz(1) == 2 and w.num_blocks == 1
    assert w.flops(1, 7) == 2 * 2 * 7 and w.density(0) == pytest.approx(0.12)
    with pytest.raises(ValueError, match="level 2 is out of range"):
        w.to_dense(2)


def test_default_block_shape():
    weight = torch.randn(40, 70)
    w = NestedBCR.from_dense(weight, block_tags(weight.shape, DEFAULT_BLOCK_SHAPE, 2), num_levels=2)
    assert w.block_shape == DEFAULT_BLOCK_SHAPE and w.grid == (2, 3)


def test_state_dict_round_trip_and_dtype_move():
    weight = torch.randn(9, 14)
    w = NestedBCR.from_dense(weight, block_tags(weight.shape, (4, 4), 2), (4, 4), densities=(0.3, 0.15))
    back = NestedBCR.from_state_dict(w.state_dict())
    for a, b in zip(w.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    assert back.densities == (0.3, 0.15) and back.weight_shape == (9, 14) and back.block_shape == (4, 4)
    bf = w.to(dtype=torch.bfloat16).validate()
    assert bf.values.dtype == torch.bfloat16 and bf.indices.dtype == torch.int16
    assert torch.equal(bf.to_dense(1), w.to_dense(1).bfloat16())


def test_state_dict_with_missing_key_or_bad_entry_is_refused():
    w = NestedBCR.from_dense(torch.randn(9, 14), block_tags((9, 14), (4, 4), 2), (4, 4))
    for key in ("counts", "block_shape"):
        sd = w.state_dict()
        del sd[key]
        with pytest.raises(FormatError, match=f"lacks \\['{key}'\\]"):
            NestedBCR.from_state_dict(sd)
    sd = w.state_dict()
    sd["block_shape"] = torch.tensor([4, 4, 1])
    with pytest.raises(FormatError, match="block_shape"):
        NestedBCR.from_state_dict(sd)
    sd = w.state_dict()
    sd["values"] = sd["values"][:-1]
    with pytest.raises(FormatError, match="values are stored"):
        NestedBCR.from_state_dict(sd)


# ---- validate() names every broken invariant ------------------------------------------------------------

def _base():
    """45 x 70 in (8, 8) blocks (a partial last block row and column), 3 levels."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(45, 70, generator=g)
    w = NestedBCR.from_dense(weight, block_tags(weight.shape, (8, 8), 3, keep=0.7, generator=g), (8, 8), 3)
    return w.validate()


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


CORRUPTIONS = {
    "values dtype": (_set("values", lambda t: t.to(torch.int32)), "values dtype torch.int32"),
    "indices dtype": (_set("indices", lambda t: t.to(torch.int32)), "indices dtype torch.int32 must be int16"),
    "block_ptr dtype": (_set("block_ptr", lambda t: t.long()), "block_ptr dtype torch.int64 must be int32"),
    "counts dtype": (_set("counts", lambda t: t.long()), "counts dtype torch.int64 must be int32"),
    "device": (_set("counts", lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")), "counts is on meta"),
    "block shape": (lambda w: setattr(w, "block_shape", (0, 8)), "block_shape must be two ints .* got \\(0, 8\\)"),
    "block shape too big": (lambda w: setattr(w, "block_shape", (8, 257)), "in \\[1, 256\\], got \\(8, 257\\)"),
    "block_ptr shape": (_set("block_ptr", lambda t: t[:-1]), "block_ptr must have shape \\(MB \\+ 1,\\) = \\(7,\\)"),
    "blocks shape": (_set("blocks", lambda t: t[:, :2].contiguous()), "blocks must have shape \\(B, 3\\)"),
    "counts shape": (_set("counts", lambda t: t[:, :-1].contiguous()), "counts must have shape \\(L, B, 2\\)"),
    "densities": (lambda w: setattr(w, "densities", (0.5,)), "1 densities for 3 levels"),
    "contiguity": (_set("blocks", lambda t: t.t().contiguous().t()), "blocks is not contiguous"),
    "block_ptr[0]": (_edit("block_ptr", lambda w, t: t.__setitem__(0, 1)), "block_ptr\\[0\\] = 1"),
    "block_ptr order": (_edit("block_ptr", lambda w, t: t.__setitem__(1, int(t[2]) + 1)), "not non-decreasing"),
    "block_ptr end": (_edit("block_ptr", lambda w, t: t.__setitem__(-1, int(t[-1]) - 1)),
                      "block_ptr\\[MB\\] = block_ptr\\[6\\] = .* blocks are stored"),
    "block column range": (_edit("blocks", lambda w, t: t.__setitem__((0, 0), 9)),
                           "block column 9, outside \\[0, KB=9\\)"),
    "block column order": (_edit("blocks", _unsort_block_columns), "not sorted by block column"),
    "r above bm": (_counts_at(0, lambda r, c: True, lambda x: [9, int(x[0, 1])]), "r_0 is outside \\[0, bm=8\\]"),
    "c negative": (_counts_at(2, lambda r, c: True, lambda x: [int(x[2, 0]), -1]), "c_2 is outside \\[0, bk=8\\]"),
    "r0 zero": (_counts_at(slice(None), lambda r, c: True, lambda x: [[0, 0]] * 3), "keeps no row at level 0"),
    "nesting": (_counts_at(1, lambda r, c: int(r[0]) < 8 and int(r[1]) >= 1,
                           lambda x: [int(x[0, 0]) + 1, int(x[1, 1])]), "not nested: level 1 keeps"),
    "r without c": (_counts_at(2, lambda r, c: int(r[2]) >= 1, lambda x: [int(x[2, 0]), 0]),
                    "r_l == 0 must hold exactly when c_l == 0"),
    "value offset": (_edit("blocks", lambda w, t: t.__setitem__((1, 1), int(t[1, 1]) + 1)), "value offset of block 1"),
    "index offset": (_edit("blocks", lambda w, t: t.__setitem__((2, 2), int(t[2, 2]) - 1)), "index offset of block 2"),
    "value count": (_set("values", lambda t: t[:-1]), "values are stored but the blocks hold"),
    "index count": (_set("indices", lambda t: torch.cat([t, t[:1]])), "indices are stored but the blocks hold"),
    "index outside block": (_edit("indices", lambda w, t: t.__setitem__(0, 8)),
                            "indices\\[0\\] = 8, row 0 .* outside the block"),
    "negative index": (_edit("indices", lambda w, t: t.__setitem__(int(w.counts[0, 0, 0]), -1)),
                       "column 0 .* outside the block"),
    "index outside matrix": (_edit("indices", _partial_edge_row), "global row 46, outside the matrix \\(45 rows"),
    "index order": (_edit("indices", _swap_same_tag), "not ordered by descending tag, then number"),
    "index repeat": (_edit("indices", _repeat_across_tags), "holds row .* twice"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_validate_names_the_broken_invariant(name):
    w = _base()
    corrupt, pattern = CORRUPTIONS[name]
    corrupt(w)
    with pytest.raises(FormatError, match=pattern):
        w.validate()


# ---- refusing bad input ----------------------------------------------------------------------------------

def test_from_dense_refuses_unstructured_tags():
    tags = torch.full((40, 64), -1, dtype=torch.int8)
    tags[3, 40], tags[3, 41], tags[5, 40] = 0, 1, 2
    msg = ("tags are not block row/column structured (block shape (32, 32)): element (3, 40) in block (0, 1) has "
           "tag 0, but its row and column are kept up to levels 1 and 2, so it would have tag 1")
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


def test_from_dense_refuses_bad_arguments():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="shape"):
        NestedBCR.from_dense(w, torch.zeros(4, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="\\[-1, 1\\], got \\[2, 2\\]"):
        NestedBCR.from_dense(w, torch.full((3, 4), 2, dtype=torch.int8), num_levels=2)
    with pytest.raises(ValueError, match="integer"):
        NestedBCR.from_dense(w, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="weight dtype torch.int64"):
        NestedBCR.from_dense(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int8))
    for bad in [(0, 4), (4, 257), (4,), (2.0, 2), 4]:
        with pytest.raises(ValueError, match=f"block_shape must be two ints .* got {bad!r}".replace("(", "\\(")
                           .replace(")", "\\)")):
            NestedBCR.from_dense(w, torch.zeros(3, 4, dtype=torch.int8), bad)
    with pytest.raises(ValueError, match="2 densities for 1 levels"):
        NestedBCR.from_dense(w, torch.zeros(3, 4, dtype=torch.int8), (2, 2), 1, (0.5, 0.2))


def test_from_tags_refuses_bad_tags():
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
