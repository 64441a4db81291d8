"""Microbatch pipelining: the accumulated update equals the unpipelined batch update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_mpi
from tests.reference import merged_parts

CASES = {  # scheme: (config, ranks with 2 clients)
    "vanilla": ("configs/vanilla-breast-cancer.yaml", 3),
    "ushaped": ("configs/ushaped-breast-cancer.yaml", 3),
    "multihop": ("configs/multihop-breast-cancer.yaml", 5),
}


def _train(
    config: str, ranks: int, data: Path, run_dir: Path, microbatches: int, schedule: str = "gpipe"
) -> dict:
    result = run_mpi(
        ranks,
        "train",
        config,
        "scheme.clients=2",
        f"data.path={data}",
        f"run.dir={run_dir}",
        "train.max_steps=20",
        "train.eval_every=0",
        "data.batch_size=24",
        "train.optimizer=adam",
        "train.lr=0.01",
        f"transport.microbatches={microbatches}",
        "run.progress=none",
        "scheme.client_order=sequential",
        f"transport.schedule={schedule}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return merged_parts(run_dir, [*range(ranks - 2), ranks - 1])  # client 1 ends last


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("scheme", sorted(CASES))
def test_microbatched_update_equals_whole_batch(
    scheme: str, schedule: str, dataset, tmp_path: Path
) -> None:
    config, ranks = CASES[scheme]
    data = dataset("breast_cancer", clients=2)
    whole = _train(config, ranks, data, tmp_path / "m1", 1)
    # 24 = 5+5+5+5+4: uneven split
    piped = _train(config, ranks, data, tmp_path / "m5", 5, schedule)
    assert whole.keys() == piped.keys()
    for key, value in whole.items():
        torch.testing.assert_close(piped[key], value, rtol=0, atol=1e-5, msg=key)


def test_1f1b_holds_two_microbatches_gpipe_all(dataset, tmp_path: Path) -> None:
    """The client's order, read from its trace: 1F1B backs up microbatch k right after
    forward k+1; GPipe runs every forward first."""
    data = dataset("breast_cancer", clients=1)
    orders = {}
    for schedule in ("gpipe", "1f1b"):
        run_dir = tmp_path / schedule
        result = run_mpi(
            2,
            "train",
            CASES["vanilla"][0],
            "scheme.clients=1",
            f"data.path={data}",
            f"run.dir={run_dir}",
            "train.max_steps=3",
            "train.eval_every=0",
            "data.batch_size=16",
            "run.progress=none",
            "transport.microbatches=4",
            f"transport.schedule={schedule}",
            "run.trace=true",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        events = json.loads((run_dir / "trace-rank1.json").read_text())["traceEvents"]
        spans = sorted(
            (
                e
                for e in events
                if e.get("ph") == "X"
                and e["args"].get("step") == 1
                and e["name"] in ("forward", "backward")
            ),
            key=lambda e: e["ts"],
        )
        orders[schedule] = "".join(e["name"][0].upper() for e in spans)
    assert orders == {"gpipe": "FFFFBBBB", "1f1b": "FFBFBFBB"}


@pytest.mark.parametrize("label_holder", ["server", "party0"])
def test_vertical_microbatched_update_equals_whole_batch(
    label_holder: str, dataset, tmp_path: Path
) -> None:
    """Vertical: every microbatch's Gatherv/Scatterv is posted in the same order on every
    rank; each rank's part after 20 steps equals the unpipelined run's."""
    data = dataset("breast_cancer", clients=3, partition="vertical")
    parts = {}
    for microbatches in (1, 5):
        run_dir = tmp_path / f"m{microbatches}"
        result = run_mpi(
            4,
            "train",
            "configs/vertical-breast-cancer.yaml",
            f"data.path={data}",
            f"run.dir={run_dir}",
            "train.max_steps=20",
            "train.eval_every=0",
            "data.batch_size=24",
            "train.optimizer=adam",
            "train.lr=0.01",
            f"scheme.label_holder={label_holder}",
            "run.progress=none",
            f"transport.microbatches={microbatches}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        parts[microbatches] = [torch.load(run_dir / f"model-rank{rank}.pt") for rank in range(4)]
    for rank, (whole, piped) in enumerate(zip(parts[1], parts[5], strict=True)):
        for key, value in whole.items():
            torch.testing.assert_close(
                piped[key], value, rtol=0, atol=1e-5, msg=f"rank {rank} {key}"
            )
