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


def test_a_rank_hosts_many_clients() -> None:
    topology = plan(config_from_dict({"scheme": {"clients": 6, "clients_per_rank": 3}}))
    assert topology.world_size == 3 and topology.clients_per_rank == 3
    assert topology.client_ranks() == [1, 1, 1, 2, 2, 2]
    assert [list(p.clients) for p in topology.placements[1:]] == [[0, 1, 2], [3, 4, 5]]
    assert "   2  clients3-5" in topology.table()
    expected = (
        r"1 server \+ 2 client ranks \(6 clients / 3 per rank\) = 3 MPI ranks, but the "
        r"job has 7; run with mpiexec -n 3 \(or change scheme.clients or "
        r"scheme.clients_per_rank\)"
    )
    with pytest.raises(ConfigError, match=expected):
        check_world_size(topology, 7)


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        (
            {"clients": 7, "clients_per_rank": 3},
            r"scheme\.clients_per_rank: 7 clients at 3 per rank "
            r"= 2 client rank\(s\) and 1 client\(s\) left over; "
            r"set scheme.clients to a multiple of 3",
        ),
        ({"clients": 4, "clients_per_rank": 0}, r"scheme\.clients_per_rank: must be >= 1, got 0"),
        (
            {"name": "multihop", "clients": 4, "clients_per_rank": 2},
            r"scheme\.clients_per_rank: scheme multihop runs one client per rank "
            r"\(clients_per_rank > 1: fedavg, multitask, splitfed, syncsgd, ushaped, vanilla\)",
        ),
    ],
)
def test_hosting_many_clients_is_checked_with_the_layout(scheme: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        config_from_dict({"scheme": scheme})


def test_an_unsupported_scheme_is_refused_before_launch() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpisplit",
            "train",
            "configs/multihop-breast-cancer.yaml",
            "scheme.clients_per_rank=3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mpisplit: scheme.clients_per_rank: scheme multihop runs one client per rank "
        "(clients_per_rank > 1: fedavg, multitask, splitfed, syncsgd, ushaped, vanilla)"
    ]
