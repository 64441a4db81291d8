"""Rank → role assignment is a pure function: tested without any MPI process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mpisplit.config import ConfigError, config_from_dict
from mpisplit.topology import Role, check_world_size, plan
from tests.conftest import ROOT


@pytest.mark.parametrize("clients", [1, 3, 7])
def test_vanilla_is_one_server_then_clients(clients: int) -> None:
    topology = plan(config_from_dict({"scheme": {"clients": clients}}))
    assert topology.world_size == clients + 1
    assert topology.ranks(Role.SERVER) == [0]
    assert topology.ranks(Role.CLIENT) == list(range(1, clients + 1))
    assert [p.index for p in topology.placements if p.role == Role.CLIENT] == list(range(clients))
    assert "   3  client2" in plan(config_from_dict({"scheme": {"clients": 3}})).table()


def test_world_size_mismatch_names_every_factor() -> None:
    topology = plan(config_from_dict({"scheme": {"clients": 2}}))
    check_world_size(topology, 3)
    expected = r"1 server \+ 2 clients = 3 MPI ranks, but the job has 5"
    with pytest.raises(ConfigError, match=expected):
        check_world_size(topology, 5)


def test_centralized_runs_on_one_rank() -> None:
    assert plan(config_from_dict({"scheme": {"name": "centralized", "clients": 3}})).world_size == 1


def test_topology_command_does_not_load_torch() -> None:
    """Job scripts call it before every launch; torch's import alone takes over a second."""
    code = (
        "import sys; from mpisplit.cli import main; "
        "main(['topology', '--ntasks', 'configs/vanilla-breast-cancer.yaml']); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "4"
