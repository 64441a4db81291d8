"""Multi-task split learning under real ``mpiexec``: shared lower layers, one head per task
server, checked against a single-process loop that sums the tasks' losses."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mpisplit.config import ModelConfig
from mpisplit.data import read_meta
from mpisplit.models import build_layers, cut_indices, layer_plan
from tests.conftest import run_mpi
from tests.reference import client_batches

CONFIG = "configs/multitask-digits.yaml"
LR = 0.002  # the reference and the run agree on it, whatever the shipped recipe says
MODEL = ModelConfig(name="cnn", cuts=("pool",), options={"channels": [16, 32], "hidden": 64})
STEPS = 25


def _train(ranks: int, data: Path, run_dir: Path, *overrides: str) -> dict:
    result = run_mpi(
        ranks,
        "train",
        CONFIG,
        f"data.path={data}",
        f"run.dir={run_dir}",
        "run.progress=none",
        f"train.lr={LR}",
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def _reference(
    data: Path, heads: dict[str, int], clients: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Each client's lower part and one head per task, trained in one process: per batch,
    the tasks' cross-entropies are summed before a single backward (labels mapped here, on
    their own); several clients take one step each per round, in client order, each on its
    own lower part (and its own optimizer), the heads shared."""
    meta = read_meta(data)
    cut = cut_indices(layer_plan(MODEL, meta["feature_shape"], 10), MODEL.cuts)[0]
    lowers = [
        build_layers(layer_plan(MODEL, meta["feature_shape"], 10), 0, cut, MODEL.seed)
        for _ in range(clients)
    ]
    uppers = []
    for classes in heads.values():
        plan = layer_plan(MODEL, meta["feature_shape"], classes)
        uppers.append(build_layers(plan, cut, len(plan), MODEL.seed))
    opts = [torch.optim.Adam(net.parameters(), lr=LR) for net in (*lowers, *uppers)]
    targets = {"class": lambda y: y, "parity": lambda y: y % 2}
    streams = [client_batches(data, k, batch_size=32, seed=0)[0] for k in range(clients)]
    for _ in range(STEPS):
        for k, (lower, batches) in enumerate(zip(lowers, streams, strict=True)):
            batch = next(batches)
            mine = [opts[k], *opts[clients:]]
            for opt in mine:
                opt.zero_grad()
            cut_output = lower(batch.features)
            loss = sum(
                torch.nn.functional.cross_entropy(upper(cut_output), targets[task](batch.labels))
                for task, upper in zip(heads, uppers, strict=True)
            )
            loss.backward()
            for opt in mine:
                opt.step()
    return [net.state_dict() for net in (*lowers, *uppers)]


def test_two_heads_equal_single_process_sum_of_losses(dataset, tmp_path: Path) -> None:
    data = dataset("digits", clients=1)
    summary = _train(3, data, tmp_path, "scheme.clients=1", f"train.max_steps={STEPS}")
    assert summary["roles"] == ["server", "server1", "client0"]
    assert summary["steps_per_rank"] == [STEPS, STEPS, STEPS]
    expected = _reference(data, {"class": 10, "parity": 2})
    head_of = {0: 10, 1: 2}  # server rank → its head's outputs
    for rank, want in zip([2, 0, 1], expected, strict=True):
        actual = torch.load(tmp_path / f"model-rank{rank}.pt", weights_only=True)
        assert actual.keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(
                actual[key], value, rtol=0, atol=1e-5, msg=f"rank {rank} {key}"
            )
        if rank in head_of:
            assert actual["head.weight"].shape[0] == head_of[rank]


def test_summary_reports_each_task(dataset, tmp_path: Path) -> None:
    data = dataset("digits", clients=2)
    summary = _train(4, data, tmp_path, "scheme.tasks=[class,binary]", "train.max_steps=40")
    by_task = {entry["task"]: entry for entry in summary["test_by_task"]}
    assert list(by_task) == ["class", "binary"]
    test_samples = summary["test_by_client"][0]["samples"]
    for entry in by_task.values():
        assert entry["samples"] == 2 * test_samples  # both clients evaluated on each head
        assert 0.0 <= entry["accuracy"] <= 1.0 and entry["loss"] > 0
    assert by_task["binary"]["accuracy"] > 0.6  # two balanced classes: above chance
    assert sorted((e["task"], e["client"]) for e in summary["test_by_client"]) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    accuracies = [e["accuracy"] for e in summary["test_by_task"]]
    assert min(accuracies) <= summary["test_accuracy"] <= max(accuracies)
    for rss in summary["rss_mb_per_rank"]:  # the task servers build their heads themselves
        assert 0 < rss["before_model"] <= rss["model_built_peak"] <= rss["run_peak"], rss


def test_clients_on_one_rank_equal_the_oracle(dataset, tmp_path: Path) -> None:
    """Two clients hosted on one rank (``scheme.clients_per_rank: 2``): each keeps its own
    lower part, and both task servers serve them in client order, round by round."""
    data = dataset("digits", clients=2)
    summary = _train(
        3,
        data,
        tmp_path,
        "scheme.clients=2",
        "scheme.clients_per_rank=2",
        f"train.max_steps={STEPS}",
    )
    assert summary["roles"] == ["server", "server1", "clients0-1"]
    assert sorted((e["task"], e["client"]) for e in summary["test_by_client"]) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    *lowers, upper0, upper1 = _reference(data, {"class": 10, "parity": 2}, clients=2)
    saved = [f"model-rank2-client{k}.pt" for k in range(2)] + ["model-rank0.pt", "model-rank1.pt"]
    for name, want in zip(saved, [*lowers, upper0, upper1], strict=True):
        actual = torch.load(tmp_path / name, weights_only=True)
        assert actual.keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=f"{name} {key}")
    assert not torch.equal(lowers[0]["conv1.weight"], lowers[1]["conv1.weight"])
