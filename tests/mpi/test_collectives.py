"""Collectives on tensor buffers past a part limit: run under ``mpiexec -n N python -m pytest
--with-mpi tests/mpi`` at any N >= 2.

The chunked path (rounds below ``part_bytes``, what an MPI without large counts needs past
2 GiB) is forced with a small limit; one real Allreduce past 2 GiB runs where memory allows.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpisplit.codec import PART_BYTES
from tests.mpi.conftest import make_transport

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.mark.parametrize("part_bytes", [None, 12, 4096])
def test_allreduce_in_rounds_sums_every_element(comm: MPI.Comm, part_bytes: int | None) -> None:
    transport = make_transport(comm, part_bytes=part_bytes)
    n = 10_007
    buffer = np.arange(n, dtype=np.float32) * (comm.rank + 1)
    requests = transport.iallreduce(comm, buffer)
    assert len(requests) == (1 if part_bytes is None else -(-n * 4 // part_bytes))
    transport.complete(requests, "test sum")
    expected = np.arange(n, dtype=np.float32) * sum(range(1, comm.size + 1))
    np.testing.assert_array_equal(buffer, expected)
    transport.close()


def _layout(size: int) -> tuple[list[int], list[int]]:
    """Vertical's shape: the root (the server) contributes nothing, the parties unevenly."""
    counts = [0] + [1000 * rank + 37 for rank in range(1, size)]
    return counts, [sum(counts[:rank]) for rank in range(size)]


@pytest.mark.parametrize("part_bytes", [None, 40, 4000])
def test_gatherv_and_scatterv_in_rounds(comm: MPI.Comm, part_bytes: int | None) -> None:
    transport = make_transport(comm, part_bytes=part_bytes)
    counts, displs = _layout(comm.size)
    total, root = sum(counts), 0
    mine = np.arange(counts[comm.rank], dtype=np.float32) + 1e6 * comm.rank
    whole = np.concatenate([np.arange(c, dtype=np.float32) + 1e6 * r for r, c in enumerate(counts)])
    out = np.full(total, -1, np.float32) if comm.rank == root else None
    transport.complete(transport.igatherv(comm, mine, out, counts, displs, root), "gather")
    if comm.rank == root:
        np.testing.assert_array_equal(out, whole)
    part = np.full(counts[comm.rank], -1, np.float32)
    sent = whole * 2 if comm.rank == root else None
    transport.complete(transport.iscatterv(comm, sent, part, counts, displs, root), "scatter")
    np.testing.assert_array_equal(part, mine * 2)
    transport.close()


def _available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def test_allreduce_over_two_gib(comm: MPI.Comm) -> None:
    """A real 2 GiB + 4 KiB Allreduce (uint8: more elements than a C int counts) between
    ranks 0 and 1, in the 1 GiB rounds an MPI without large counts gets (about 20 s; the
    single large-count call took 66 s on MPICH 5.0 here, so it is left to the library).
    About 3 GiB per rank at the peak: skipped where fewer than 8 GiB are free (every rank
    decides alike)."""
    enough = np.array([_available_bytes() > 8 << 30], np.int8)
    comm.Allreduce(MPI.IN_PLACE, enough, MPI.MIN)
    if not enough[0]:
        pytest.skip("needs 8 GiB of free memory")
    pair = comm.Split(0 if comm.rank < 2 else MPI.UNDEFINED, comm.rank)
    if pair != MPI.COMM_NULL:
        transport = make_transport(pair, part_bytes=PART_BYTES, timeout_s=300.0)
        size = (2 << 30) + 4096
        buffer = np.zeros(size, np.uint8)
        buffer[[0, PART_BYTES, -1]] = [1, 2, 3 + pair.rank]
        transport.complete(transport.iallreduce(pair, buffer), "big sum")
        assert buffer[[0, PART_BYTES, -1]].tolist() == [2, 4, 7]
        assert int(buffer[1:4096].max()) == 0 and int(buffer[-4096:-1].max()) == 0
        del buffer
        transport.close()
        pair.Free()
