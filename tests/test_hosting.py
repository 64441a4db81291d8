"""Many logical clients on one rank (``scheme.clients_per_rank``) under real ``mpiexec``,
checked against the single-process oracle and the audit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mpisplit.config import ModelConfig
from tests.conftest import run_mpi, run_readme_block
from tests.reference import train_parallel_reference, train_reference

CONFIG = "configs/vanilla-breast-cancer.yaml"


def _train(ranks: int, data: Path, run_dir: Path, *overrides: str, config: str = CONFIG) -> dict:
    result = run_mpi(
        ranks,
        "train",
        config,
        f"data.path={data}",
        f"run.dir={run_dir}",
        "run.progress=none",
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def _part(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _assert_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=key)


def test_parallel_clients_on_one_rank_equal_the_oracle(dataset, tmp_path: Path) -> None:
    """Three clients on one rank take one step each per round, in client order: the server
    serves them in that order, so each client's part and the server's equal a single
    process that trains per-client lower layers and one upper part in that order."""
    data = dataset("breast_cancer", clients=3)
    summary = _train(
        2,
        data,
        tmp_path,
        "scheme.clients=3",
        "scheme.clients_per_rank=3",
        "train.max_steps=15",
        "train.optimizer=adam",
        "train.lr=0.01",
        "train.eval_every=5",
        "run.trace=true",
    )
    assert summary["roles"] == ["server", "clients0-2"]
    assert summary["steps_per_rank"] == [45, 45]
    assert sorted(e["client"] for e in summary["test_by_client"]) == [0, 1, 2]
    upper, lowers = train_parallel_reference(
        data,
        ModelConfig(cuts=("fc2",)),
        ("fc1", "relu1"),
        [(k, 1) for _ in range(15) for k in range(3)],
        clients=3,
        optimizer="adam",
        lr=0.01,
        batch_size=16,
        seed=0,
    )
    _assert_equal(_part(tmp_path / "model-rank0.pt"), upper)
    for k, lower in enumerate(lowers):
        _assert_equal(_part(tmp_path / f"model-rank1-client{k}.pt"), lower)
    assert not torch.equal(lowers[0]["fc1.weight"], lowers[1]["fc1.weight"])
    records = [
        json.loads(line) for line in (tmp_path / "metrics-rank0.jsonl").read_text().splitlines()
    ]
    served = [r["client"] for r in records if "loss" in r and "event" not in r]
    assert served == [0, 1, 2] * 15
    spans = json.loads((tmp_path / "trace-rank0.json").read_text())["traceEvents"]
    received = {e["args"]["client"] for e in spans if e.get("name") == "recv activation"}
    assert received == {0, 1, 2}
    assert run_mpi(1, "audit", str(tmp_path)).returncode == 0


def test_sequential_turns_within_and_across_ranks_equal_the_oracle(dataset, tmp_path: Path) -> None:
    """Four clients, two per rank, in round-robin turns: the part passes inside a rank
    without a message and between ranks as with one client per rank."""
    data = dataset("breast_cancer", clients=4)
    summary = _train(
        3,
        data,
        tmp_path,
        "scheme.clients=4",
        "scheme.clients_per_rank=2",
        "scheme.client_order=sequential",
        "scheme.turn_steps=3",
        "train.max_steps=9",
        "train.optimizer=adam",
        "train.lr=0.01",
    )
    turns = [(k, 3) for _ in range(3) for k in range(4)]
    expected = train_reference(
        data, ModelConfig(cuts=("fc2",)), turns, optimizer="adam", lr=0.01, batch_size=16, seed=0
    )
    server = _part(tmp_path / "model-rank0.pt")
    for rank, k in [(1, 0), (1, 1), (2, 2), (2, 3)]:
        _assert_equal({**server, **_part(tmp_path / f"model-rank{rank}-client{k}.pt")}, expected)
    assert summary["steps"] == 36 and summary["steps_per_rank"] == [36, 18, 18]
    assert [e["client"] for e in summary["test_by_client"]] == [3]


def test_parallel_clients_on_two_ranks(dataset, tmp_path: Path) -> None:
    """Served in arrival order across ranks: every client's steps and evaluation arrive."""
    data = dataset("breast_cancer", clients=4)
    summary = _train(
        3, data, tmp_path, "scheme.clients=4", "scheme.clients_per_rank=2", "train.max_steps=6"
    )
    assert summary["steps_per_rank"] == [24, 12, 12]
    assert sorted(e["client"] for e in summary["test_by_client"]) == [0, 1, 2, 3]
    records = [
        json.loads(line) for line in (tmp_path / "metrics-rank2.jsonl").read_text().splitlines()
    ]
    assert sorted({r["client"] for r in records if "step" in r and "event" not in r}) == [2, 3]


def test_readme_many_clients_commands_run_as_written(tmp_path: Path) -> None:
    """README's "Many clients per rank" block (10 VGG clients on one rank), as written."""
    done = run_readme_block("### Many clients per rank", tmp_path)
    run = tmp_path / "runs" / "cifar-10"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["roles"] == ["server", "clients0-9"] and summary["steps"] == 20
    assert (run / "profile.json").exists() and "1 clients0-9" in done.stdout


USHAPED = ModelConfig(cuts=("fc2", "head"))


def test_ushaped_parallel_clients_on_one_rank_equal_the_oracle(dataset, tmp_path: Path) -> None:
    """Each hosted client keeps its own head and tail; the server's middle is shared, and its
    step records name the client each step served (the same round order as the oracle's)."""
    data = dataset("breast_cancer", clients=3)
    summary = _train(
        2,
        data,
        tmp_path,
        "scheme.name=ushaped",
        "model.cuts=[fc2, head]",
        "scheme.clients=3",
        "scheme.clients_per_rank=3",
        "train.max_steps=10",
        "train.optimizer=adam",
        "train.lr=0.01",
    )
    assert sorted(e["client"] for e in summary["test_by_client"]) == [0, 1, 2]
    middle, own = train_parallel_reference(
        data,
        USHAPED,
        ("fc1", "relu1", "head"),
        [(k, 1) for _ in range(10) for k in range(3)],
        clients=3,
        optimizer="adam",
        lr=0.01,
        batch_size=16,
        seed=0,
    )
    _assert_equal(_part(tmp_path / "model-rank0.pt"), middle)
    for k, layers in enumerate(own):
        _assert_equal(_part(tmp_path / f"model-rank1-client{k}.pt"), layers)
    records = map(json.loads, (tmp_path / "metrics-rank0.jsonl").read_text().splitlines())
    served = [r["client"] for r in records if "step" in r and "event" not in r]
    assert served == [k for _ in range(10) for k in range(3)]


def test_ushaped_sequential_turns_equal_the_oracle(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=4)
    summary = _train(
        3,
        data,
        tmp_path,
        "scheme.name=ushaped",
        "model.cuts=[fc2, head]",
        "scheme.clients=4",
        "scheme.clients_per_rank=2",
        "scheme.client_order=sequential",
        "scheme.turn_steps=2",
        "train.max_steps=4",
        "train.optimizer=sgd",
        "train.lr=0.05",
    )
    turns = [(k, 2) for _ in range(2) for k in range(4)]
    expected = train_reference(
        data, USHAPED, turns, optimizer="sgd", lr=0.05, momentum=0.9, batch_size=16, seed=0
    )
    middle = _part(tmp_path / "model-rank0.pt")
    for rank, k in [(1, 0), (1, 1), (2, 2), (2, 3)]:
        _assert_equal({**middle, **_part(tmp_path / f"model-rank{rank}-client{k}.pt")}, expected)
    assert [e["client"] for e in summary["test_by_client"]] == [3]


def _per_client_parts(run_dir: Path, summary: dict) -> list[dict[str, torch.Tensor]]:
    """Every logical client's saved part, in client order, whether its rank hosts one
    (``model-rank<R>.pt``) or several (``model-rank<R>-client<k>.pt``)."""
    parts = []
    for rank, role in enumerate(summary["roles"]):
        if role.startswith("clients"):
            first, last = map(int, role.removeprefix("clients").split("-"))
            parts += [
                _part(run_dir / f"model-rank{rank}-client{k}.pt") for k in range(first, last + 1)
            ]
        elif role.startswith("client"):
            parts.append(_part(run_dir / f"model-rank{rank}.pt"))
    return parts


def _assert_same_run(
    hosted: Path, alone: Path, summaries: tuple[dict, dict], *, steps_shared: bool = False
) -> None:
    """Every client's part and the server's (rank 0, if the scheme has one) equal, and so
    do the steps, samples and final evaluations. A rank's steps are the optimizer steps it
    takes: a hosting rank counts its clients' (``steps_shared``: its clients share one step,
    sync SGD's, so every rank counts the run's steps)."""
    parts = [_per_client_parts(d, s) for d, s in zip((hosted, alone), summaries, strict=True)]
    assert len(parts[0]) == len(parts[1]) == 4
    for mine, theirs in zip(*parts, strict=True):
        _assert_equal(mine, theirs)
    if summaries[1]["roles"][0] == "server":
        _assert_equal(_part(hosted / "model-rank0.pt"), _part(alone / "model-rank0.pt"))
    steps = [s["steps_per_rank"] for s in summaries]
    if steps_shared:
        assert set(steps[0]) == set(steps[1]) == {summaries[1]["steps"]}
    else:
        assert sum(steps[0]) == sum(steps[1])
    assert summaries[0]["train_samples"] == summaries[1]["train_samples"]
    evals = [sorted((e["client"], e["accuracy"]) for e in s["test_by_client"]) for s in summaries]
    assert evals[0] == evals[1]


def _evaluations(run_dir: Path) -> list[tuple[int, float, float]]:
    """Rank 0's evaluation records: (step, loss, accuracy), periodic and final."""
    lines = (run_dir / "metrics-rank0.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["step"], r["loss"], r["accuracy"]) for r in records if r.get("event") == "eval"]


UNEQUAL = {"partition": "dirichlet"}
"""Four breast-cancer shards of 323, 38, 80 and 14 samples: 21, 3, 5 and 1 batches an epoch."""


@pytest.mark.parametrize(
    ("partition", "variant"),
    [
        (UNEQUAL, ("scheme.splitfed_variant=v1", "train.epochs=2", "scheme.fedavg_every=1")),
        ({}, ("scheme.splitfed_variant=v2", "scheme.server_order=random", "train.max_steps=7")),
    ],
    ids=["v1", "v2-random"],
)
def test_splitfed_clients_on_two_ranks_equal_one_rank_per_client(
    dataset, tmp_path: Path, partition: dict, variant: tuple[str, ...]
) -> None:
    """Four SplitFed clients, two per rank, against the same run with one rank per client:
    each keeps its own lower part and optimizer, every average covers all four (v1: shards
    of unequal length, so the periodic averages stop at the shortest client's last step
    and the last one comes after the longest's), and v2's server order (random, drawn from
    train.seed) is the order the hosted clients step in."""
    data = dataset("breast_cancer", clients=4, **partition)
    common = ("scheme.name=splitfed", "scheme.clients=4", "train.optimizer=adam", *variant)
    common += ("scheme.fedavg_every=3",) if not partition else ()
    summaries = (
        _train(3, data, tmp_path / "hosted", *common, "scheme.clients_per_rank=2"),
        _train(5, data, tmp_path / "alone", *common),
    )
    assert summaries[0]["roles"] == ["server", "clients0-1", "clients2-3"]
    _assert_same_run(tmp_path / "hosted", tmp_path / "alone", summaries)


@pytest.mark.parametrize(
    ("scheme", "options"),
    [
        ("fedavg", ("scheme.fedavg_every=2", "train.schedule=cosine")),
        ("fedavg", ("scheme.fedavg_every=2", "scheme.local_optimizer=reset")),
        ("syncsgd", ()),
    ],
    ids=["fedavg", "fedavg-reset", "syncsgd"],
)
def test_baselines_clients_on_two_ranks_equal_one_rank_per_client(
    dataset, tmp_path: Path, scheme: str, options: tuple[str, ...]
) -> None:
    """FedAvg and sync SGD, four clients at two per rank, two epochs of unequal shards
    (FedAvg's last average after the longest; sync SGD's short clients step without data)
    against one rank per client: a rank keeps one model for its clients and adds their
    weighted parts or gradients up before the Allreduce (FedAvg: each client's optimizer
    state and learning-rate schedule its own, or the state fresh each period). Client 0
    evaluates after the averages of its step, as on a rank of its own."""
    data = dataset("breast_cancer", clients=4, **UNEQUAL)
    config = f"configs/{scheme}-breast-cancer.yaml"
    common = (f"scheme.name={scheme}", "scheme.clients=4", "train.epochs=2", "train.eval_every=2")
    common += options
    summaries = (
        _train(2, data, tmp_path / "hosted", *common, "scheme.clients_per_rank=2", config=config),
        _train(4, data, tmp_path / "alone", *common, config=config),
    )
    assert summaries[0]["roles"] == ["clients0-1", "clients2-3"]
    _assert_same_run(
        tmp_path / "hosted", tmp_path / "alone", summaries, steps_shared=scheme == "syncsgd"
    )
    evaluations = [_evaluations(tmp_path / run) for run in ("hosted", "alone")]
    assert len(evaluations[1]) > 2
    for mine, theirs in zip(*evaluations, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-6)


@pytest.mark.parametrize("scheme", ["fedavg", "syncsgd"])
def test_baselines_with_batchnorm_keep_each_hosted_clients_statistics(
    dataset, tmp_path: Path, scheme: str
) -> None:
    """A model with BatchNorm (resnet), four clients at two per rank on one shared model:
    each client's running statistics are its own (FedAvg with ``average_buffers=false``,
    FedBN; sync SGD, which averages gradients only), so its saved part equals the one a
    rank of its own saves, and client 0 evaluates with its own statistics."""
    data = dataset("digits", clients=4)
    common = (
        f"scheme.name={scheme}",
        "scheme.clients=4",
        "train.max_steps=4",
        "train.eval_every=2",
        "model.name=resnet",
        "model.options={widths: [4, 8]}",
    )
    common += (
        ("scheme.average_buffers=false", "scheme.fedavg_every=3") if scheme == "fedavg" else ()
    )
    config = f"configs/{scheme}-digits.yaml"
    summaries = (
        _train(2, data, tmp_path / "hosted", *common, "scheme.clients_per_rank=2", config=config),
        _train(4, data, tmp_path / "alone", *common, config=config),
    )
    _assert_same_run(
        tmp_path / "hosted", tmp_path / "alone", summaries, steps_shared=scheme == "syncsgd"
    )
    parts = _per_client_parts(tmp_path / "hosted", summaries[0])
    assert not torch.equal(parts[0]["stem_bn.running_mean"], parts[1]["stem_bn.running_mean"])
    evaluations = [_evaluations(tmp_path / run) for run in ("hosted", "alone")]
    assert [e[0] for e in evaluations[0]] == [2, 4]
    for mine, theirs in zip(*evaluations, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-6)
