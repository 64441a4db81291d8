"""The in-process MPI tier's shared pieces: a fresh communicator per test, a transport."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mpi4py import MPI

from mpisplit.tracing import Tracer
from mpisplit.transport import Transport


def make_transport(comm: MPI.Comm, **kwargs) -> Transport:
    """A transport over ``comm``: rank 0 the server, the others clients; 30 s deadline."""
    roles = ["server"] + ["client"] * (comm.Get_size() - 1)
    return Transport(
        comm,
        roles=roles,
        timeout_s=kwargs.pop("timeout_s", 30.0),
        tracer=Tracer(comm.Get_rank(), "t", enabled=False),
        **kwargs,
    )


@pytest.fixture
def comm() -> Iterator[MPI.Comm]:
    comm = MPI.COMM_WORLD.Dup()
    yield comm
    comm.Barrier()
    comm.Free()
