"""The capacity model's arithmetic (``mpisplit prof capacity``), without processes."""

from __future__ import annotations

import dataclasses

import pytest

from mpisplit.prof.capacity import Costs, predict

COSTS = Costs(
    scheme="vanilla",
    order="parallel",
    batch_size=32,
    samples=64_000,
    epochs=2,
    client_compute_s=0.010,
    server_compute_s=0.002,
    server_turnaround_s=0.0015,
    messages_per_step=4,
    bytes_per_step=1e6,
    latency_s=1e-5,
    bandwidth_bytes_per_s=1e9,
    startup_s=3.0,
)
CYCLE = 0.010 + 0.0015 + 4 * 1e-5 + 1e6 / 1e9


def test_one_client_is_its_own_chain() -> None:
    p = predict(COSTS, clients=1, nodes=1, cores_per_node=8)
    assert (p.bound, p.round_s) == ("client chain", pytest.approx(CYCLE))
    assert p.steps_per_client == 2 * 2000 and p.ranks == 2
    assert p.wall_s == pytest.approx(3.0 + 4000 * CYCLE)
    assert p.samples_per_s == pytest.approx(32 / CYCLE)


@pytest.mark.parametrize(
    ("clients", "nodes", "cores", "bound", "round_s"),
    [
        (100, 50, 64, "server compute", 100 * 0.002),  # cores to spare: the server serialises
        (7, 1, 2, "server compute", 4 * 7 * 0.002),  # 8 ranks on 2 cores: a quarter each
        (4, 1, 64, "client chain", CYCLE),  # few clients, many cores
    ],
)
def test_parallel_bounds(clients: int, nodes: int, cores: int, bound: str, round_s: float) -> None:
    p = predict(COSTS, clients, nodes, cores)
    assert (p.bound, p.round_s) == (bound, pytest.approx(round_s))
    assert p.steps_per_client == 2 * -(-64_000 // (clients * 32))


def test_a_slow_link_binds_at_the_server() -> None:
    p = predict(COSTS, 100, 50, 64, latency_s=1e-4, bandwidth=1e8)
    assert (p.bound, p.round_s) == ("server link", pytest.approx(100 * 1e6 / 1e8))


def test_sequential_clients_take_turns() -> None:
    sequential = dataclasses.replace(COSTS, order="sequential")
    p = predict(sequential, 10, 4, 64)
    assert (p.bound, p.round_s) == ("sequential turns", pytest.approx(10 * CYCLE))


def test_a_hosting_rank_runs_its_clients_in_turn() -> None:
    """500 clients at 250 per client rank: 3 ranks, and a rank's 250 chains one after
    another bind (the server's compute alone would take 500 · s, less than 250 cycles)."""
    p = predict(COSTS, 500, 1, 64, clients_per_rank=250)
    assert p.ranks == 3 and p.clients_per_rank == 250
    assert (p.bound, p.round_s) == ("client rank (250 clients in turn)", pytest.approx(250 * CYCLE))
    few = predict(COSTS, 4, 1, 64, clients_per_rank=250)  # fewer clients than a rank holds
    assert (few.ranks, few.clients_per_rank, few.round_s) == (2, 4, pytest.approx(4 * CYCLE))
