"""End-to-end vanilla split learning under real ``mpiexec``, checked against the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mpisplit.config import ModelConfig
from tests.conftest import run_mpi
from tests.reference import merged_parts, train_reference

CONFIG = "configs/vanilla-breast-cancer.yaml"


def _train(ranks: int, data: Path, run_dir: Path, *overrides: str) -> dict:
    result = run_mpi(
        ranks,
        "train",
        CONFIG,
        f"data.path={data}",
        f"run.dir={run_dir}",
        "run.progress=none",
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.05), ("adam", 0.01)])
def test_one_client_equals_single_process(
    optimizer: str, lr: float, dataset, tmp_path: Path
) -> None:
    data = dataset("breast_cancer", clients=1)
    summary = _train(
        2,
        data,
        tmp_path,
        "scheme.clients=1",
        "train.max_steps=50",
        "train.epochs=5",
        f"train.optimizer={optimizer}",
        f"train.lr={lr}",
        "train.momentum=0.9",
        "train.eval_every=0",
    )
    assert summary["steps_per_rank"] == [50, 50]
    expected = train_reference(
        data,
        ModelConfig(cuts=("fc2",)),
        [(0, 50)],
        optimizer=optimizer,
        lr=lr,
        momentum=0.9,
        batch_size=16,
        seed=0,
    )
    actual = merged_parts(tmp_path, [0, 1])
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=key)
    assert not torch.equal(
        actual["fc1.weight"],
        train_reference(
            data, ModelConfig(cuts=("fc2",)), [], optimizer=optimizer, lr=lr, batch_size=16, seed=0
        )["fc1.weight"],
    ), "training changed nothing"


def test_sequential_round_robin_equals_single_process(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=3)
    summary = _train(
        4,
        data,
        tmp_path,
        "scheme.client_order=sequential",
        "scheme.turn_steps=4",
        "train.max_steps=20",
        "train.optimizer=adam",
        "train.lr=0.01",
    )
    turns = [(client, 4) for _ in range(5) for client in range(3)]
    expected = train_reference(
        data, ModelConfig(cuts=("fc2",)), turns, optimizer="adam", lr=0.01, batch_size=16, seed=0
    )
    for client_rank in (1, 2, 3):  # client 2 ran the final turn and handed its part out
        actual = merged_parts(tmp_path, [0, client_rank])
        for key, value in expected.items():
            torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=key)
    assert summary["steps"] == 60 and summary["steps_per_rank"][1:] == [20, 20, 20]
    assert [e["client"] for e in summary["test_by_client"]] == [2]


def test_parallel_three_clients_on_four_ranks(dataset, tmp_path: Path) -> None:
    """Oversubscribed on a 2-core machine; writes the whole run directory."""
    data = dataset("breast_cancer", clients=3)
    summary = _train(4, data, tmp_path, "train.epochs=2", "train.eval_every=10")
    assert summary["world_size"] == 4 and summary["roles"] == [
        "server",
        "client0",
        "client1",
        "client2",
    ]
    assert summary["steps"] == sum(summary["steps_per_rank"][1:])
    assert sorted(e["client"] for e in summary["test_by_client"]) == [0, 1, 2]
    assert 0.5 < summary["test_accuracy"] <= 1.0
    assert {"config.yaml", "summary.json"} <= {p.name for p in tmp_path.iterdir()}
    for rank in range(4):
        lines = (tmp_path / f"metrics-rank{rank}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert records[0]["event"] == "start" and records[-1]["event"] == "end"
        steps = [r for r in records if "step" in r and "event" not in r]
        assert all({"time", "bytes_sent", "bytes_received"} <= r.keys() for r in steps)
        assert records[-1]["bytes_sent"] == summary["bytes_sent_per_rank"][rank] > 0
    server_lines = (tmp_path / "metrics-rank0.jsonl").read_text().splitlines()
    server_steps = [json.loads(line) for line in server_lines]
    assert all("loss" in r for r in server_steps if "step" in r and "event" not in r)
    evals = [r for r in server_steps if r.get("event") == "eval"]
    assert len(evals) >= 3  # intermediate evaluations plus one final per client


def test_accuracy_matches_centralized(dataset, tmp_path: Path) -> None:
    """The shipped recipe: ≥ 0.95 test accuracy, within 1 point of centralized training."""
    data = dataset("breast_cancer", clients=3)
    split = _train(4, data, tmp_path / "split", "scheme.client_order=sequential")
    central = _train(1, data, tmp_path / "central", "scheme.name=centralized")
    assert split["test_accuracy"] >= 0.95
    assert abs(split["test_accuracy"] - central["test_accuracy"]) <= 0.01


def test_evaluation_batches_above_the_eager_limit(dataset, tmp_path: Path) -> None:
    """An evaluation batch's labels (1200 int64 = 9.6 KB) exceed MPI's eager limit, so their
    send completes only once the server takes them, which it does after the activation:
    the client must not wait for the labels before posting the activation."""
    data = dataset("synthetic", clients=1, samples=3000, shape=(8,), test_fraction=0.5)
    summary = _train(
        2,
        data,
        tmp_path,
        "scheme.clients=1",
        "data.batch_size=1200",
        "train.max_steps=2",
        "train.eval_every=1",
        "transport.timeout_s=20",
    )
    assert summary["steps"] == 2
    assert summary["test_by_client"][0]["samples"] == 1500
