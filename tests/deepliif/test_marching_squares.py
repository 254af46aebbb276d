"""The vectorised marching squares gives scikit-image's `find_contours` lines (8-connected foreground)."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import find_contours

from deepliif.marching_squares import iso_rings


def vertex_sets(rings: list[np.ndarray]) -> set[frozenset]:
    return {frozenset(map(tuple, np.round(ring * 2).astype(int).tolist())) for ring in rings}


@pytest.mark.parametrize("seed", range(6))
def test_rings_equal_scikit_images_on_random_masks_with_saddles_and_holes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(60):
        mask = rng.random((rng.integers(1, 20), rng.integers(1, 20))) < rng.uniform(0.1, 0.8)
        ours = iso_rings(mask)
        theirs = find_contours(np.pad(mask, 1).astype(np.uint8), 0.5, fully_connected="high")
        assert vertex_sets(ours) == vertex_sets(theirs)
        for ring in ours:
            assert np.array_equal(ring[0], ring[-1]) and len(ring) >= 5
            steps = {tuple(step) for step in np.abs(np.diff(ring, axis=0)).tolist()}
            assert steps <= {(0.5, 0.5), (0.0, 1.0), (1.0, 0.0)}  # midpoints of one quad's edges


def test_a_diagonal_pair_is_one_ring_and_an_empty_mask_none() -> None:
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = mask[2, 2] = True
    (ring,) = iso_rings(mask)
    assert len(ring) - 1 == 8 and iso_rings(np.zeros((3, 3), bool)) == []
    assert tuple(ring[0]) == (2.0, 1.5)  # the top-most, left-most vertex between two pixels of one row (padded)


def test_a_large_mask_gives_scikit_images_rings_each_from_its_first_vertex_in_order() -> None:
    mask = np.random.default_rng(5).random((300, 300)) < 0.45  # about a hundred thousand vertices
    ours = iso_rings(mask)
    theirs = find_contours(np.pad(mask, 1).astype(np.uint8), 0.5, fully_connected="high")
    assert vertex_sets(ours) == vertex_sets(theirs) and len(ours) > 1000
    firsts = [(ring[0, 0], ring[0, 1]) for ring in ours]
    assert all(first[1] % 1 == 0.5 for first in firsts)  # on a horizontal edge: between two pixels of a row
    assert firsts == sorted(firsts)  # rings in order of their top-most, then left-most, vertex
    assert all(min((r, c) for r, c in ring.tolist() if c % 1 == 0.5) == first for ring, first in zip(ours, firsts))
