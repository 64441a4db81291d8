"""CUDA-aware MPI detection honours the documented override (no MPI traffic needed)."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from mpisplit.mpilib import cuda_aware_mpi, mpix_query_cuda_support


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False)])
def test_override(value: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPISPLIT_CUDA_AWARE", value)
    assert cuda_aware_mpi() is expected


def test_mpich_from_pypi_is_not_cuda_aware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPISPLIT_CUDA_AWARE", raising=False)
    assert cuda_aware_mpi() is False or torch.cuda.is_available()


@pytest.mark.skipif(
    not any(name in MPI.Get_library_version() for name in ("MPICH", "Open MPI")),
    reason="MPIX_Query_cuda_support is an MPICH / Open MPI extension",
)
def test_the_mpi_library_is_asked() -> None:
    """The query is found in the libmpi that mpi4py loaded (its symbols are not global)."""
    query = mpix_query_cuda_support()
    assert query is not None
    assert query() in (0, 1)
