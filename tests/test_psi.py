"""The private set intersection's pure core, in process (the protocol over MPI: tests/mpi)."""

from __future__ import annotations

import numpy as np

from mpisplit.psi import BlindingKey, hash_ids, intersect_blinded, select_ids


def test_blinding_commutes_and_hides_the_hash() -> None:
    points = hash_ids(np.arange(50))
    a, b = BlindingKey(), BlindingKey()
    ab, ba = b.blind(a.blind(points)), a.blind(b.blind(points))
    assert np.array_equal(ab, ba)
    assert not np.any(np.all(a.blind(points) == points, axis=1))
    assert len({row.tobytes() for row in ab}) == 50


def test_blinded_intersection_maps_back_to_the_plain_one() -> None:
    rng = np.random.default_rng(0)
    sets = [rng.choice(400, size, replace=False) for size in (300, 250, 280)]
    keys = [BlindingKey() for _ in sets]

    def fully_blinded(ids: np.ndarray) -> np.ndarray:
        points = hash_ids(ids)
        for key in keys:
            points = key.blind(points)
        return points

    blinded = [fully_blinded(ids) for ids in sets]
    common = intersect_blinded(blinded)
    plain = np.intersect1d(np.intersect1d(sets[0], sets[1]), sets[2])
    for ids, points in zip(sets, blinded, strict=True):
        assert np.array_equal(select_ids(ids, points, common), plain)
