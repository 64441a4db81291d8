"""MPI start-up under a deadline (``mpisplit.startup``); the stalled start-up itself is
tested end to end in ``tests/test_failures.py``."""

from __future__ import annotations

import sys
import types

import pytest

from mpisplit.config import ConfigError
from mpisplit.startup import start_mpi, start_timeout_s


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan"])
def test_a_start_timeout_that_is_no_positive_number_is_a_config_error(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPISPLIT_START_TIMEOUT_S", value)
    with pytest.raises(ConfigError, match=rf"MPISPLIT_START_TIMEOUT_S: .* got '{value}'"):
        start_timeout_s()


def test_mpi_started_by_the_caller_is_taken_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """A script that imported mpi4py has started MPI: no deadline is read or set (a bad
    one does not matter then)."""
    started = types.ModuleType("mpi4py.MPI")
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", started)
    monkeypatch.setenv("MPISPLIT_START_TIMEOUT_S", "soon")
    assert start_mpi() is started
