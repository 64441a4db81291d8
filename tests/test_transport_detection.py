"""CUDA-aware MPI detection honours the documented override (no MPI traffic needed)."""

from __future__ import annotations

import pytest
import torch

from mpisplit.transport import cuda_aware_mpi


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False)])
def test_override(value: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPISPLIT_CUDA_AWARE", value)
    assert cuda_aware_mpi() is expected


def test_mpich_from_pypi_is_not_cuda_aware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPISPLIT_CUDA_AWARE", raising=False)
    assert cuda_aware_mpi() is False or torch.cuda.is_available()
