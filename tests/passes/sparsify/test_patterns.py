"""Mask selection per pattern: exact structure, edge tiles/groups, density, ordering."""

import numpy as np
import pytest

from passes.core import OptionError
from passes.sparsify.patterns import (SparsityPattern, block_tile_nonzeros, nm_group_nonzeros,
                                      parse_pattern, select_mask)


def test_parse_pattern_forms():
    assert parse_pattern("block", block="4x1") == SparsityPattern("block", (4, 1))
    assert parse_pattern("nm", nm="2:4") == SparsityPattern("n:m", n=2, m=4)
    assert parse_pattern("nm", nm="4of8") == SparsityPattern("n:m", n=4, m=8)
    assert parse_pattern("nm", nm="2/4") == SparsityPattern("n:m", n=2, m=4)
    assert parse_pattern("16x1") == SparsityPattern("block", (16, 1))
    assert parse_pattern("unstructured").kind == "unstructured"
    for bad in (("block", "4x"), ("nm", "5:4"), ("diagonal", "4x1")):
        with pytest.raises(OptionError):
            parse_pattern(bad[0], block=bad[1], nm=bad[1])


def test_unstructured_prunes_the_smallest_exactly():
    scores = np.arange(20, dtype=float).reshape(4, 5)[::-1]  # distinct values
    keep = select_mask(scores, SparsityPattern("unstructured"), 0.3)
    assert keep.sum() == 14
    assert scores[~keep].max() < scores[keep].min()


def test_unstructured_per_row_prunes_each_row_equally():
    rng = np.random.default_rng(0)
    scores = rng.random((6, 10)) * np.arange(1, 7)[:, None]  # rows of very different scale
    keep = select_mask(scores, SparsityPattern("unstructured"), 0.5, per_row=True)
    assert (keep.sum(axis=1) == 5).all()


@pytest.mark.parametrize("block", [(4, 1), (1, 4), (8, 1), (16, 1), (3, 2)])
def test_block_tiles_are_whole_including_partial_edges(block):
    rng = np.random.default_rng(1)
    rows, cols = 37, 23  # not a multiple of any block: partial edge tiles on both axes
    scores = rng.random((rows, cols))
    keep = select_mask(scores, SparsityPattern("block", block), 0.8)
    tiles = block_tile_nonzeros(keep, block)
    r, c = block
    full = np.zeros_like(tiles)
    for i in range(tiles.shape[0]):
        for j in range(tiles.shape[1]):
            full[i, j] = len(range(i * r, min((i + 1) * r, rows))) * len(range(j * c, min((j + 1) * c, cols)))
    assert ((tiles == 0) | (tiles == full)).all()  # every tile kept or dropped whole
    # density as close to 20% as whole tiles allow: within one tile of the target
    assert abs((~keep).sum() - 0.8 * keep.size) <= r * c


def test_block_keeps_the_tiles_with_highest_mean_score():
    scores = np.ones((8, 2))
    scores[4:8, 1] = 10.0  # one strong 4x1 tile
    keep = select_mask(scores, SparsityPattern("block", (4, 1)), 0.75)
    expected = np.zeros((8, 2), dtype=bool)
    expected[4:8, 1] = True
    np.testing.assert_array_equal(keep, expected)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_groups_exact_with_partial_tail(n, m):
    rng = np.random.default_rng(2)
    cols = 3 * m + m // 2 + 1  # a trailing partial group
    scores = rng.random((5, cols))
    keep = select_mask(scores, SparsityPattern("n:m", n=n, m=m), 0.0)
    counts = nm_group_nonzeros(keep, m)
    assert (counts[:, :-1] == n).all()
    tail = cols % m
    assert (counts[:, -1] == min(n, tail)).all()
    # within each full group the kept ones are the largest
    for row in range(5):
        for g in range(cols // m):
            group = scores[row, g * m:(g + 1) * m]
            kept = keep[row, g * m:(g + 1) * m]
            assert group[~kept].max() <= group[kept].min()
