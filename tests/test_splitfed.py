"""SplitFed under real ``mpiexec``, each variant against an explicit single-process reference.

v2 (one shared server model, fixed order) is deterministic: per round, each client in index
order runs its own lower copy and the shared upper model. v1 keeps one server copy per
client, so client k's lower copy and server copy k only ever see client k's batches: with both
averaged at the same points it is FedAvg of the whole model, whatever the arrival order.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mpisplit.config import ModelConfig
from tests.conftest import run_mpi
from tests.reference import client_batches, initial_model

CONFIG = "configs/splitfed-breast-cancer.yaml"
MODEL = ModelConfig(cuts=("fc2",))
CUT = 2  # fc1, relu1 below the cut
CLIENTS, STEPS, EVERY, LR, MOMENTUM = 3, 21, 5, 0.05, 0.9


def _train(data: Path, run_dir: Path, *overrides: str) -> dict:
    result = run_mpi(
        CLIENTS + 1,
        "train",
        CONFIG,
        f"data.path={data}",
        f"run.dir={run_dir}",
        "run.progress=none",
        f"train.max_steps={STEPS}",
        "train.eval_every=0",
        f"scheme.fedavg_every={EVERY}",
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def _sgd(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM)


def _average(modules: Sequence[nn.Module], weights: Sequence[float]) -> None:
    """Sample-weighted FedAvg of the parameters, in place (optimizer state untouched)."""
    states = [m.state_dict() for m in modules]
    average = {
        key: sum(w * s[key] for w, s in zip(weights, states, strict=True)) for key in states[0]
    }
    for module in modules:
        module.load_state_dict(copy.deepcopy(average))


def _averages_after(step: int, every: int = EVERY) -> bool:
    return step % every == 0 or step == STEPS


ROUNDS = [k for _ in range(STEPS) for k in range(CLIENTS)]
"""The fixed v2 order: round after round, each client in index order."""


def _v2_reference(
    data: Path, order: list[int] = ROUNDS, every: int = EVERY
) -> tuple[list[dict], dict]:
    """For each client in ``order``: its lower copy → the shared upper model, backward,
    server step, client step; FedAvg of the lower copies once every client has reached an
    averaging point."""
    streams = [client_batches(data, k, batch_size=16, seed=0) for k in range(CLIENTS)]
    weights = [n / sum(n for _, n in streams) for _, n in streams]
    whole = initial_model(data, MODEL)
    server = whole[CUT:]
    lowers = [copy.deepcopy(whole[:CUT]) for _ in range(CLIENTS)]
    server_opt, lower_opts = _sgd(server), [_sgd(lower) for lower in lowers]
    done = [0] * CLIENTS
    for k in order:
        batch = next(streams[k][0])
        server_opt.zero_grad()
        lower_opts[k].zero_grad()
        activation = lowers[k](batch.features)
        cut = activation.detach().requires_grad_(True)
        nn.functional.cross_entropy(server(cut), batch.labels).backward()
        server_opt.step()
        activation.backward(cut.grad)
        lower_opts[k].step()
        done[k] += 1
        if len(set(done)) == 1 and _averages_after(done[0], every):
            _average(lowers, weights)
    return [lower.state_dict() for lower in lowers], server.state_dict()


def _fedavg_reference(data: Path) -> dict:
    """Every client trains the whole model on its own batches; all of it is averaged."""
    streams = [client_batches(data, k, batch_size=16, seed=0) for k in range(CLIENTS)]
    weights = [n / sum(n for _, n in streams) for _, n in streams]
    nets = [initial_model(data, MODEL) for _ in range(CLIENTS)]
    opts = [_sgd(net) for net in nets]
    for step in range(1, STEPS + 1):
        for net, opt, (batches, _) in zip(nets, opts, streams, strict=True):
            batch = next(batches)
            opt.zero_grad()
            nn.functional.cross_entropy(net(batch.features), batch.labels).backward()
            opt.step()
        if _averages_after(step):
            _average(nets, weights)
    return nets[0].state_dict()


def _part(run_dir: Path, rank: int) -> dict:
    return torch.load(run_dir / f"model-rank{rank}.pt", weights_only=True)


def _assert_equal(actual: dict, expected: dict, who: str) -> None:
    assert actual.keys() == expected.keys(), who
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=f"{who} {key}")


def _assert_v2(run_dir: Path, expected: tuple[list[dict], dict]) -> None:
    lowers, server = expected
    _assert_equal(_part(run_dir, 0), server, "server")
    for k, lower in enumerate(lowers):
        _assert_equal(_part(run_dir, k + 1), lower, f"client {k}")


def _served(run_dir: Path) -> list[int]:
    """The client of each step the server took, from its metrics."""
    records = [json.loads(line) for line in (run_dir / "metrics-rank0.jsonl").open()]
    return [r["client"] for r in records if "client" in r and "event" not in r]


def test_v2_fixed_order_equals_single_process(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=CLIENTS)
    summary = _train(data, tmp_path, "scheme.splitfed_variant=v2", "scheme.server_order=fixed")
    assert summary["steps_per_rank"] == [CLIENTS * STEPS] + [STEPS] * CLIENTS
    assert sorted(e["client"] for e in summary["test_by_client"]) == list(range(CLIENTS))
    assert _served(tmp_path) == ROUNDS
    _assert_v2(tmp_path, _v2_reference(data))


def test_v2_averaging_every_epoch(dataset, tmp_path: Path) -> None:
    """scheme.fedavg_every_epochs=1: the shards (152, 152, 151 rows) are 10 batches of 16
    each, so the clients average after steps 10 and 20 (and after the last, 21)."""
    data = dataset("breast_cancer", clients=CLIENTS)
    _train(
        data,
        tmp_path,
        "scheme.splitfed_variant=v2",
        "scheme.fedavg_every=1",
        "scheme.fedavg_every_epochs=1",
    )
    _assert_v2(tmp_path, _v2_reference(data, every=10))


def test_v2_random_order_per_batch_is_reproducible(dataset, tmp_path: Path) -> None:
    """server_order: random draws the client of each batch, not a shuffle of each round:
    some client is served twice before another is served once in that round; within each
    averaging period every client gets its EVERY batches; the same seed gives the same order
    and weights, and the run equals the single-process replay of that order."""
    data = dataset("breast_cancer", clients=CLIENTS)
    orders = []
    for run in ("a", "b"):
        _train(data, tmp_path / run, "scheme.splitfed_variant=v2", "scheme.server_order=random")
        orders.append(_served(tmp_path / run))
    order = orders[0]
    assert orders[1] == order != ROUNDS
    rounds = [sorted(order[i : i + CLIENTS]) for i in range(0, len(order), CLIENTS)]
    assert any(r != list(range(CLIENTS)) for r in rounds), "shuffled per round, not per batch"
    for start in range(0, len(order), EVERY * CLIENTS):
        period = order[start : start + EVERY * CLIENTS]
        assert all(period.count(k) == len(period) // CLIENTS for k in range(CLIENTS))
    expected = _v2_reference(data, order)
    for run in ("a", "b"):
        _assert_v2(tmp_path / run, expected)


def test_v1_server_copies_are_averaged_with_the_clients(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=CLIENTS)
    summary = _train(data, tmp_path, "scheme.splitfed_variant=v1")
    averaged = _fedavg_reference(data)
    parts = [_part(tmp_path, rank) for rank in range(CLIENTS + 1)]
    lower_keys = set(parts[1])
    _assert_equal(parts[0], {k: v for k, v in averaged.items() if k not in lower_keys}, "server")
    for k in range(CLIENTS):
        _assert_equal(parts[k + 1], {key: averaged[key] for key in lower_keys}, f"client {k}")
    accuracies = {round(e["accuracy"], 6) for e in summary["test_by_client"]}
    assert len(accuracies) == 1, "after the final average every client's model is the same"
