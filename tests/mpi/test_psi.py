"""Private set intersection over real MPI (``mpiexec -n N python -m pytest --with-mpi
tests/mpi``, any N >= 2): the result equals the plain intersection, and nothing a rank
receives is a raw id, a plain hash or a hash blinded only by its own key, of an id outside
the intersection."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpisplit.psi import POINT_BYTES, BlindingKey, as_keys, hash_ids, private_intersection

pytestmark = pytest.mark.mpi(min_size=2)
UNIVERSE = 300


@pytest.fixture
def comm() -> MPI.Comm:
    comm = MPI.COMM_WORLD.Dup()
    yield comm
    comm.Barrier()
    comm.Free()


def _ids(rank: int) -> np.ndarray:
    return np.random.default_rng(rank).choice(UNIVERSE, 200 - 10 * rank, replace=False)


@pytest.mark.parametrize("comparator_holds_ids", [True, False])
def test_intersection_is_plain_and_leaks_no_outside_id(
    comm: MPI.Comm, comparator_holds_ids: bool
) -> None:
    rank = comm.Get_rank()
    holders = [r for r in range(comm.Get_size()) if r or comparator_holds_ids]
    mine = _ids(rank) if rank in holders else None
    plain = np.sort(_ids(holders[0]))
    for other in holders[1:]:
        plain = np.intersect1d(plain, _ids(other))
    key, received = BlindingKey(), []
    common, size, sizes = private_intersection(
        comm,
        mine,
        comparator=0,
        key=key,
        observe=lambda what, array: received.append((what, array.copy())),
    )
    assert size == len(plain)
    assert sizes.tolist() == [len(_ids(r)) if r in holders else -1 for r in range(len(sizes))]
    if mine is None:
        assert common is None
    else:
        assert np.array_equal(common, plain)

    outside = np.setdiff1d(np.arange(UNIVERSE), plain)
    hashed = hash_ids(outside)
    forbidden = np.concatenate([as_keys(hashed), as_keys(key.blind(hashed))])
    for what, array in received:
        if array.dtype == np.int64:
            assert not np.isin(array, outside).any(), what
            continue
        assert array.shape[1:] == (POINT_BYTES,), what
        assert not np.isin(as_keys(array), forbidden).any(), what
        raw = outside.astype("<i8").view(np.uint8).reshape(-1, 8)
        assert not any(row.tobytes() in array.tobytes() for row in raw), what
    assert received, "every rank receives something"
