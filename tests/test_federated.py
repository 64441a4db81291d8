"""Federated baselines (fedavg, syncsgd) under real ``mpiexec``, each against an explicit
single-process reference."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mpisplit.config import ModelConfig
from tests.conftest import run_mpi
from tests.reference import client_batches, initial_model

MODEL = ModelConfig(cuts=("fc2",))
CLIENTS, STEPS, LR, MOMENTUM = 3, 21, 0.05, 0.9


def _train(scheme: str, data: Path, run_dir: Path, *overrides: str) -> dict:
    result = run_mpi(
        CLIENTS,
        "train",
        f"configs/{scheme}-breast-cancer.yaml",
        f"data.path={data}",
        f"run.dir={run_dir}",
        "run.progress=none",
        f"train.max_steps={STEPS}",
        "train.eval_every=0",
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def _assert_every_rank_holds(run_dir: Path, expected: dict) -> None:
    for rank in range(CLIENTS):
        actual = torch.load(run_dir / f"model-rank{rank}.pt", weights_only=True)
        assert actual.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=f"{rank} {key}")


def _fedavg_reference(data: Path, every: int, *, reset: bool = False) -> dict:
    """Every client's own model and optimizer, the average loaded into each; ``reset``: a
    fresh optimizer after each average (scheme.local_optimizer: reset)."""
    streams = [client_batches(data, k, batch_size=16, seed=0) for k in range(CLIENTS)]
    weights = [n / sum(n for _, n in streams) for _, n in streams]
    nets = [initial_model(data, MODEL) for _ in range(CLIENTS)]

    def optimizers() -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM) for net in nets]

    opts = optimizers()
    for step in range(1, STEPS + 1):
        for net, opt, (batches, _) in zip(nets, opts, streams, strict=True):
            batch = next(batches)
            opt.zero_grad()
            nn.functional.cross_entropy(net(batch.features), batch.labels).backward()
            opt.step()
        if step % every == 0 or step == STEPS:
            states = [net.state_dict() for net in nets]
            average = {
                key: sum(w * state[key] for w, state in zip(weights, states, strict=True))
                for key in states[0]
            }
            for net in nets:
                net.load_state_dict(copy.deepcopy(average))
            opts = optimizers() if reset else opts
    return nets[0].state_dict()


@pytest.mark.parametrize("local_optimizer", ["keep", "reset"])
def test_fedavg_equals_single_process(dataset, tmp_path: Path, local_optimizer: str) -> None:
    data = dataset("breast_cancer", clients=CLIENTS)
    summary = _train(
        "fedavg",
        data,
        tmp_path,
        "scheme.fedavg_every=5",
        f"scheme.local_optimizer={local_optimizer}",
    )
    assert summary["roles"] == ["client0", "client1", "client2"]
    assert summary["steps_per_rank"] == [STEPS] * CLIENTS
    assert [e["client"] for e in summary["test_by_client"]] == [0]
    expected = _fedavg_reference(data, every=5, reset=local_optimizer == "reset")
    _assert_every_rank_holds(tmp_path, expected)
    if local_optimizer == "reset":  # momentum matters: the two runs' weights differ
        other = _fedavg_reference(data, every=5)
        assert any(not torch.allclose(expected[k], other[k], atol=1e-4) for k in expected)


def test_syncsgd_equals_one_large_batch(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=CLIENTS)
    summary = _train("syncsgd", data, tmp_path)
    streams = [client_batches(data, k, batch_size=16, seed=0)[0] for k in range(CLIENTS)]
    net = initial_model(data, MODEL)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    samples = 0
    for _ in range(STEPS):
        batches = [next(stream) for stream in streams]
        features = torch.cat([b.features for b in batches])
        labels = torch.cat([b.labels for b in batches])
        samples += len(labels)
        opt.zero_grad()
        nn.functional.cross_entropy(net(features), labels).backward()
        opt.step()
    _assert_every_rank_holds(tmp_path, net.state_dict())
    assert summary["train_samples"] == samples


def test_fedavg_averages_batchnorm_statistics_unless_told_to_keep_them(
    dataset, tmp_path: Path
) -> None:
    """A model with BatchNorm (resnet): by default the running statistics are averaged with
    the weights, so every client ends with the same ones; ``average_buffers=false`` (FedBN)
    keeps each client's own, while the weights are still averaged."""
    data = dataset("digits", clients=2)
    models = {}
    for average in (True, False):
        run_dir = tmp_path / str(average)
        result = run_mpi(
            2,
            "train",
            "configs/fedavg-digits.yaml",
            f"data.path={data}",
            f"run.dir={run_dir}",
            "run.progress=none",
            "train.max_steps=3",
            "model.name=resnet",
            "model.options={widths: [4, 8]}",
            f"scheme.average_buffers={str(average).lower()}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        models[average] = [
            torch.load(run_dir / f"model-rank{r}.pt", weights_only=True) for r in range(2)
        ]
    for average, (first, second) in models.items():
        torch.testing.assert_close(first["stem.weight"], second["stem.weight"])
        same = torch.equal(first["stem_bn.running_mean"], second["stem_bn.running_mean"])
        assert same == average, f"average_buffers={average}"
        assert first["stem_bn.num_batches_tracked"] == 3
