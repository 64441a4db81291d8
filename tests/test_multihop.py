"""Multi-hop split learning (client → relays → server) under real ``mpiexec``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mpisplit.config import ConfigError, ModelConfig, config_from_dict
from mpisplit.topology import Role, plan
from tests.conftest import run_mpi
from tests.reference import merged_parts, train_reference

CONFIG = "configs/multihop-breast-cancer.yaml"


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


def test_two_relays_equal_single_process(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=1)
    summary = _train(
        4,
        data,
        tmp_path,
        "scheme.clients=1",
        "train.max_steps=25",
        "train.optimizer=adam",
        "train.lr=0.01",
    )
    assert summary["roles"] == ["server", "relay0", "relay1", "client0"]
    assert summary["steps_per_rank"] == [25, 25, 25, 25]
    expected = train_reference(
        data,
        ModelConfig(cuts=("fc2", "fc3", "head"), options={"hidden": [64, 32, 16]}),
        [(0, 25)],
        optimizer="adam",
        lr=0.01,
        batch_size=16,
        seed=0,
    )
    actual = merged_parts(tmp_path, [0, 1, 2, 3])
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=key)


def test_smallest_chain_client_relay_server(dataset, tmp_path: Path) -> None:
    """The smallest multi-hop run, 3 ranks: one client, one relay, the server."""
    data = dataset("breast_cancer", clients=1)
    summary = _train(
        3,
        data,
        tmp_path,
        "scheme.clients=1",
        "model.cuts=[fc2,head]",
        "train.max_steps=20",
        "train.optimizer=adam",
        "train.lr=0.01",
    )
    assert summary["roles"] == ["server", "relay0", "client0"]
    assert summary["steps_per_rank"] == [20, 20, 20]
    expected = train_reference(
        data,
        ModelConfig(cuts=("fc2", "head"), options={"hidden": [64, 32, 16]}),
        [(0, 20)],
        optimizer="adam",
        lr=0.01,
        batch_size=16,
        seed=0,
    )
    actual = merged_parts(tmp_path, [0, 1, 2])
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=key)


def test_parallel_clients_through_one_relay(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=3)
    summary = _train(
        5, data, tmp_path, "model.cuts=[fc2,head]", "train.epochs=1", "train.eval_every=4"
    )
    assert summary["roles"] == ["server", "relay0", "client0", "client1", "client2"]
    assert summary["steps"] == summary["steps_per_rank"][1] == sum(summary["steps_per_rank"][2:])
    assert sorted(e["client"] for e in summary["test_by_client"]) == [0, 1, 2]
    assert all(
        e["samples"] == summary["test_by_client"][0]["samples"] for e in summary["test_by_client"]
    )


def test_relays_follow_the_cuts() -> None:
    cfg = config_from_dict(
        {"scheme": {"name": "multihop", "clients": 2}, "model": {"cuts": ["fc2", "fc3", "head"]}}
    )
    topology = plan(cfg)
    assert topology.ranks(Role.RELAY) == [1, 2] and topology.ranks(Role.CLIENT) == [3, 4]
    with pytest.raises(ConfigError, match="multihop needs at least 2 cuts"):
        plan(config_from_dict({"scheme": {"name": "multihop"}}))
