"""The engine's trace and the PMPI library see exactly the same bytes per peer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpisplit.pmpi import library_path, read_reports
from mpisplit.transport import HEADER_BYTES
from tests.conftest import run_mpi


def test_trace_and_pmpi_agree_on_every_link(dataset, tmp_path: Path) -> None:
    if library_path() is None:
        pytest.fail("PMPI library not built: tools/install.sh builds it")
    data = dataset("breast_cancer", clients=2)
    result = run_mpi(3, "train", "--pmpi", "configs/vanilla-breast-cancer.yaml",
                     "scheme.clients=2", f"data.path={data}", f"run.dir={tmp_path}",
                     "train.max_steps=12", "train.eval_every=5", "run.trace=true",
                     "run.progress=none")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    reports = {r["rank"]: r for r in read_reports(tmp_path)}
    assert sorted(reports) == [0, 1, 2]
    for rank in range(3):
        trace = json.loads((tmp_path / f"trace-rank{rank}.json").read_text())["traceEvents"]
        names = {e["name"] for e in trace if e["ph"] == "X"}
        sends = [e for e in trace if e["ph"] == "X" and e["name"].startswith("send ")]
        expected: dict[int, int] = {}
        for event in sends:
            peer = event["args"]["peer"]
            expected[peer] = expected.get(peer, 0) + event["args"]["bytes"] + HEADER_BYTES
        measured = {int(p): v["sent_bytes"] for p, v in reports[rank]["peers"].items()
                    if v["sent_bytes"]}
        assert measured == expected, f"rank {rank}"
        assert sum(expected.values()) == summary["bytes_sent_per_rank"][rank]
        if rank == 0:
            assert {"wait activation", "recv activation", "recv labels", "send gradient",
                    "forward", "backward", "optimizer"} <= names
            assert len([e for e in sends if e["name"] == "send gradient"]) == 24
        else:
            assert {"send activation", "send labels", "recv gradient", "forward",
                    "eval"} <= names
            assert trace[0]["args"]["name"] == f"rank {rank} client{rank - 1}"
