"""What the loaded MPI library can do: messages of 2 GiB or more, CUDA device memory.

Asked once per transport; the answers decide whether payloads and collectives go in parts
(``mpisplit.codec``) and whether device payloads are staged through host memory
(``mpisplit.staging``).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

from mpi4py import MPI


def large_counts() -> bool:
    """Whether one MPI message may carry 2 GiB or more (MPI 4's large-count calls, which
    mpi4py uses where the library has them; Open MPI 5.0 reports MPI 3.1)."""
    return MPI.Get_version() >= (4, 0)


def cuda_aware_mpi() -> bool:
    """Whether the MPI library can read and write CUDA device memory.

    ``MPISPLIT_CUDA_AWARE=1`` or ``0`` decides where the library cannot be asked; otherwise
    the library's ``MPIX_Query_cuda_support`` (Open MPI, MPICH) is asked, and a library
    without it stages through host memory (always correct, slower)."""
    forced = os.environ.get("MPISPLIT_CUDA_AWARE")
    if forced in ("0", "1"):
        return forced == "1"
    query = mpix_query_cuda_support()
    return query is not None and bool(query())


def mpix_query_cuda_support() -> Callable[[], int] | None:
    """The loaded MPI library's ``MPIX_Query_cuda_support``, if it has one.

    mpi4py loads libmpi without making its symbols global, so the process-wide lookup
    (``CDLL(None)``) never finds it: the library is opened again by the path it was loaded
    from (the same handle; found in ``/proc/self/maps`` on Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted(
                {line.split()[-1] for line in maps if "/libmpi" in line and ".so" in line}
            )
    except OSError:
        paths = []
    for library in [*(ctypes.CDLL(path) for path in paths), ctypes.CDLL(None)]:
        query = getattr(library, "MPIX_Query_cuda_support", None)
        if query is not None:
            query.restype = ctypes.c_int
            return query
    return None
