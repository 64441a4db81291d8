"""``mpisplit audit``: each scheme's run passes; evidence of a forbidden route fails it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpisplit.cli import main
from tests.conftest import run_mpi


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    data = dataset("breast_cancer", clients=2)
    made = {}
    for scheme in ("vanilla", "ushaped"):
        run_dir = tmp_path_factory.mktemp(scheme)
        result = run_mpi(
            3,
            "train",
            f"configs/{scheme}-breast-cancer.yaml",
            "scheme.clients=2",
            f"data.path={data}",
            f"run.dir={run_dir}",
            "train.max_steps=4",
            "run.progress=none",
        )
        assert result.returncode == 0, result.stderr[-2000:]
        made[scheme] = run_dir
    return made


@pytest.mark.parametrize("scheme", ["vanilla", "ushaped"])
def test_runs_pass_the_audit(scheme: str, runs, capsys) -> None:
    assert main(["audit", str(runs[scheme])]) == 0
    out = capsys.readouterr().out
    assert "audit passed" in out
    labels_to_server = [
        line for line in out.splitlines() if "client" in line.split()[1:2] and "LABELS" in line
    ]
    assert bool(labels_to_server) == (scheme == "vanilla")


def test_forbidden_route_fails_the_audit(runs, tmp_path: Path, capsys) -> None:
    """Forge the evidence: a U-shaped client that sent labels to the server."""
    forged = tmp_path / "forged"
    forged.mkdir()
    for path in runs["ushaped"].iterdir():
        (forged / path.name).write_bytes(path.read_bytes())
    metrics = forged / "metrics-rank1.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records[-1]["sent_routes"]["0"]["LABELS"] = 128
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["audit", str(forged)]) == 1
    out = capsys.readouterr().out
    assert "LABELS" in out and "FORBIDDEN" in out and "audit FAILED: 1 route" in out


def test_unfinished_run_cannot_be_audited(runs, tmp_path: Path, capsys) -> None:
    (tmp_path / "config.yaml").write_bytes((runs["vanilla"] / "config.yaml").read_bytes())
    assert main(["audit", str(tmp_path)]) == 2
    assert "cannot be audited" in capsys.readouterr().err
