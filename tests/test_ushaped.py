"""U-shaped split learning under real ``mpiexec``: equals the single-process oracle, the
server never opens labels (its data directory has none), and no label byte reaches it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch
from mpi4py import MPI

from mpisplit.config import ModelConfig
from mpisplit.specs.ushaped import SPEC as USHAPED
from mpisplit.tracing import Tracer
from mpisplit.transport import Kind, PolicyViolation, Transport
from tests.conftest import run_mpi
from tests.reference import merged_parts, train_reference
from tests.test_vertical import run_with_server_data

CONFIG = "configs/ushaped-breast-cancer.yaml"
MODEL = ModelConfig(cuts=("fc2", "head"))


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


def _received_by_kind(run_dir: Path) -> dict[str, int]:
    """What reached the server, per message kind."""
    records = [json.loads(line) for line in (run_dir / "metrics-rank0.jsonl").open()]
    return next(r for r in records if r.get("event") == "traffic_by_kind")["bytes_received"]


def _assert_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=key)


def _without_labels(data: Path, blind: Path) -> Path:
    """A copy of the dataset in which no file has a labels array (features and ids only)."""
    blind.mkdir()
    shutil.copy(data / "meta.json", blind / "meta.json")
    for path in data.glob("*.h5"):
        with h5py.File(path) as source, h5py.File(blind / path.name, "w") as copy:
            copy.attrs.update(source.attrs)
            for name in source:
                if name != "labels":
                    source.copy(name, copy)
    return blind


def test_server_without_any_labels_equals_single_process(dataset, tmp_path: Path) -> None:
    """MPMD: the server rank's data directory holds no label array at all, so opening one
    would fail the run; the split model still equals the single-process oracle, and the
    server received no LABELS byte."""
    data = dataset("breast_cancer", clients=1)
    blind = _without_labels(data, tmp_path / "server-data")
    run_dir = tmp_path / "run"
    result = run_with_server_data(
        CONFIG,
        blind,
        data,
        1,
        f"run.dir={run_dir}",
        "run.progress=none",
        "scheme.clients=1",
        "train.max_steps=25",
        "train.optimizer=adam",
        "train.lr=0.01",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_per_rank"] == [25, 25]
    assert [e["client"] for e in summary["test_by_client"]] == [0]
    expected = train_reference(
        data, MODEL, [(0, 25)], optimizer="adam", lr=0.01, batch_size=16, seed=0
    )
    _assert_equal(merged_parts(run_dir, [0, 1]), expected)
    assert _received_by_kind(run_dir)["LABELS"] == 0


def test_sequential_hand_over_and_no_labels_at_the_server(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=3)
    summary = _train(
        4,
        data,
        tmp_path,
        "scheme.client_order=sequential",
        "scheme.turn_steps=4",
        "train.max_steps=8",
        "train.eval_every=6",
    )
    turns = [(client, 4) for _ in range(2) for client in range(3)]
    expected = train_reference(
        data, MODEL, turns, optimizer="sgd", lr=0.05, momentum=0.9, batch_size=16, seed=0
    )
    _assert_equal(merged_parts(tmp_path, [0, 3]), expected)  # client 2 ran the last turn
    assert summary["steps"] == 24 and [e["client"] for e in summary["test_by_client"]] == [2]
    received = _received_by_kind(tmp_path)
    assert received["LABELS"] == 0 and received["ACTIVATION"] > 0 and received["GRADIENT"] > 0


def test_policy_refuses_labels_towards_the_server() -> None:
    assert not any(kind == Kind.LABELS for _, _, kind in USHAPED.routes)
    transport = Transport(
        MPI.COMM_SELF,
        roles=["client", "server"],
        timeout_s=1.0,
        tracer=Tracer(0, "client0", enabled=False),
        allowed=USHAPED.routes,
    )
    try:
        with pytest.raises(PolicyViolation, match="may not send LABELS"):
            transport.send(torch.zeros(4, dtype=torch.int64), 1, Kind.LABELS)
        assert transport.traffic.total_sent == 0
    finally:
        transport.close()
