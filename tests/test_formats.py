import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import nested, random_tags
from nestsparse import FormatError, NestedCSR


@settings(max_examples=40, deadline=None)
@given(M=st.integers(0, 12), K=st.integers(0, 40), L=st.integers(1, 4), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_exact(M, K, L, density, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(M, K, generator=g)
    tags = random_tags((M, K), L, density, generator=g)
    w = NestedCSR.from_dense(weight, tags, num_levels=L).validate()
    assert torch.equal(w.tags(), tags)
    for level in range(L):
        assert torch.equal(w.to_dense(level), weight * (tags >= level))
        # level slicing: each level is a prefix of the denser level's row
        assert (w.row_end[level] >= w.row_ptr[:-1]).all()
        if level:
            assert (w.row_end[level] <= w.row_end[level - 1]).all()


def test_conv_weight_view_and_index_width():
    weight = torch.randn(8, 3, 3, 3)
    w = nested(weight, random_tags(weight.shape, 2), 2)
    assert w.shape == (8, 27) and w.col_idx.dtype == torch.int16
    assert w.to_dense(1).shape == weight.shape
    wide = NestedCSR.from_dense(torch.randn(2, 40000), random_tags((2, 40000), 1, 0.01), num_levels=1)
    assert wide.col_idx.dtype == torch.int32


def test_storage_does_not_grow_with_levels():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 100, generator=g)
    tags3 = random_tags(weight.shape, 3, 0.4, generator=g)
    three = NestedCSR.from_dense(weight, tags3, num_levels=3)
    one = NestedCSR.from_dense(weight, (tags3 >= 0).to(torch.int8) - 1, num_levels=1)
    assert three.nnz(0) == one.nnz(0)
    assert three.nbytes() == one.nbytes() + 2 * 64 * 4  # only the extra row_end rows
    # bytes read by a level: its own entries only
    assert three.nbytes(2) < three.nbytes(1) < three.nbytes(0)
    assert three.nbytes(2) == three.nnz(2) * (4 + 2) + 65 * 4 + 64 * 4


def test_flops_and_density():
    weight = torch.randn(10, 10)
    tags = torch.full((10, 10), -1, dtype=torch.int8)
    tags[:, :3] = 0
    tags[:, 0] = 1
    w = nested(weight, tags, 2)
    assert w.nnz(0) == 30 and w.nnz(1) == 10
    assert w.flops(1, 7) == 2 * 10 * 7 and w.density(0) == pytest.approx(0.3)


def test_state_dict_round_trip_and_dtype_move():
    weight = torch.randn(9, 14)
    w = NestedCSR.from_dense(weight, random_tags(weight.shape, 2), densities=(0.3, 0.15))
    back = NestedCSR.from_state_dict(w.state_dict())
    for a, b in zip(w.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    assert back.densities == (0.3, 0.15) and back.weight_shape == (9, 14)
    bf = w.to(dtype=torch.bfloat16)
    assert bf.values.dtype == torch.bfloat16 and bf.col_idx.dtype == w.col_idx.dtype


def _base():
    weight = torch.randn(6, 10)
    tags = torch.full((6, 10), -1, dtype=torch.int8)
    tags[:, ::2] = 0
    tags[:, ::4] = 1
    return nested(weight, tags, 2)


CORRUPTIONS = {
    "col_idx outside": (lambda w: w.col_idx.__setitem__(3, 10), "outside \\[0, K=10\\)"),
    "negative col": (lambda w: w.col_idx.__setitem__(0, -1), "outside"),
    "row_ptr order": (lambda w: w.row_ptr.__setitem__(2, 1), "row_ptr is not non-decreasing|row_end\\[0"),
    "row_ptr[0]": (lambda w: w.row_ptr.__setitem__(0, 1), "row_ptr\\[0\\]"),
    "nesting": (lambda w: w.row_end.__setitem__((1, 2), int(w.row_ptr[3]) + 1), "not nested"),
    "duplicate": (lambda w: w.col_idx.__setitem__(1, int(w.col_idx[0])), "sorted|twice"),
    "unsorted": (lambda w: w.col_idx.__setitem__(int(w.row_end[1, 0]), 9), "sorted"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_validate_names_the_broken_invariant(name):
    w = _base()
    corrupt, pattern = CORRUPTIONS[name]
    corrupt(w)
    with pytest.raises(FormatError, match=pattern):
        w.validate()


def test_state_dict_with_missing_key_or_bad_shape_is_refused():
    sd = _base().state_dict()
    del sd["row_end"]
    with pytest.raises(FormatError, match="lacks"):
        NestedCSR.from_state_dict(sd)
    sd = _base().state_dict()
    sd["values"] = sd["values"][:-1]
    with pytest.raises(FormatError):
        NestedCSR.from_state_dict(sd)


def test_from_dense_refuses_bad_tags():
    with pytest.raises(ValueError, match="shape"):
        NestedCSR.from_dense(torch.randn(3, 4), torch.zeros(4, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        NestedCSR.from_dense(torch.randn(3, 4), torch.full((3, 4), 2, dtype=torch.int8), num_levels=2)
    with pytest.raises(ValueError, match="integer"):
        NestedCSR.from_dense(torch.randn(3, 4), torch.zeros(3, 4))
