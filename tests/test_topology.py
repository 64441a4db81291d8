"""Rank → role assignment is a pure function: tested without any MPI process."""

from __future__ import annotations

import pytest

from mpisplit.config import ConfigError, config_from_dict
from mpisplit.topology import Role, check_world_size, plan


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
