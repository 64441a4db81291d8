"""U-shaped split learning under real ``mpiexec``: equals the single-process oracle, and no
label byte ever reaches the server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mpi4py import MPI

from mpisplit.config import ModelConfig
from mpisplit.schemes import ushaped
from mpisplit.tracing import Tracer
from mpisplit.transport import Kind, PolicyViolation, Transport
from tests.conftest import run_mpi
from tests.reference import merged_parts, train_reference

CONFIG = "configs/ushaped-breast-cancer.yaml"
MODEL = ModelConfig(cuts=("fc2", "head"))


def _train(ranks: int, data: Path, run_dir: Path, *overrides: str) -> dict:
    result = run_mpi(ranks, "train", CONFIG, f"data.path={data}", f"run.dir={run_dir}",
                     "run.progress=none", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def _assert_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=key)


def test_one_client_equals_single_process(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=1)
    summary = _train(2, data, tmp_path, "scheme.clients=1", "train.max_steps=25",
                     "train.optimizer=adam", "train.lr=0.01")
    assert summary["steps_per_rank"] == [25, 25]
    assert [e["client"] for e in summary["test_by_client"]] == [0]
    expected = train_reference(data, MODEL, [(0, 25)], optimizer="adam", lr=0.01,
                               batch_size=16, seed=0)
    _assert_equal(merged_parts(tmp_path, [0, 1]), expected)


def test_sequential_hand_over_and_no_labels_at_the_server(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=3)
    summary = _train(4, data, tmp_path, "scheme.client_order=sequential", "scheme.turn_steps=4",
                     "train.max_steps=8", "train.eval_every=6")
    turns = [(client, 4) for _ in range(2) for client in range(3)]
    expected = train_reference(data, MODEL, turns, optimizer="sgd", lr=0.05, momentum=0.9,
                               batch_size=16, seed=0)
    _assert_equal(merged_parts(tmp_path, [0, 3]), expected)  # client 2 ran the last turn
    assert summary["steps"] == 24 and [e["client"] for e in summary["test_by_client"]] == [2]
    records = [json.loads(line) for line in (tmp_path / "metrics-rank0.jsonl").open()]
    received = next(r for r in records if r.get("event") == "traffic_by_kind")["bytes_received"]
    assert received["LABELS"] == 0 and received["ACTIVATION"] > 0 and received["GRADIENT"] > 0


def test_policy_refuses_labels_towards_the_server() -> None:
    assert not any(kind == Kind.LABELS for _, _, kind in ushaped.ALLOWED)
    transport = Transport(MPI.COMM_SELF, roles=["client", "server"], timeout_s=1.0,
                          tracer=Tracer(0, "client0", enabled=False), allowed=ushaped.ALLOWED)
    try:
        with pytest.raises(PolicyViolation, match="may not send LABELS"):
            transport.send(torch.zeros(4, dtype=torch.int64), 1, Kind.LABELS)
        assert transport.traffic.total_sent == 0
    finally:
        transport.close()
