"""Spatio-temporal split learning under real ``mpiexec``: the sites' layers are frozen by the
detached phase, no site is contacted in it, and the server's detached training equals an
independent single-process replay on the same cut outputs in the same order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mpisplit.config import ConfigError, ModelConfig, load_config
from mpisplit.data import ShardReader
from mpisplit.engine import prepare
from mpisplit.schemes.spatiotemporal import check_site_segment, detached_order
from tests.conftest import run_mpi
from tests.reference import initial_model

CONFIG = "configs/spatiotemporal-breast-cancer.yaml"
DETACHED = 3
# Stateless optimizer (plain SGD, constant lr), so the replay can start from the saved weights.
COMMON = ("scheme.joint_epochs=1", "train.momentum=0", "train.lr=0.05", "train.eval_every=0",
          "run.progress=none")


def _train(ranks: int, data: Path, run_dir: Path, *overrides: str) -> dict:
    result = run_mpi(ranks, "train", CONFIG, f"data.path={data}", f"run.dir={run_dir}",
                     *COMMON, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def _part(run_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / f"model-rank{rank}.pt", weights_only=True)


def _records(run_dir: Path, rank: int) -> list[dict]:
    lines = (run_dir / f"metrics-rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def one_site(dataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One site (so the joint phase is deterministic): runs without and with a detached
    phase."""
    data = dataset("breast_cancer", clients=1)
    root = tmp_path_factory.mktemp("spatiotemporal")
    _train(2, data, root / "joint", "scheme.clients=1", "scheme.detached_epochs=0")
    _train(2, data, root / "detached", "scheme.clients=1", f"scheme.detached_epochs={DETACHED}")
    return data, root / "joint", root / "detached"


def test_site_layers_bit_identical_after_detached_phase(one_site) -> None:
    data, joint, detached = one_site
    before, after = _part(joint, 1), _part(detached, 1)
    assert before.keys() == after.keys() == {"fc1.weight", "fc1.bias"}
    for key in before:
        assert torch.equal(before[key], after[key]), key
    initial = initial_model(data, ModelConfig(cuts=("fc2",))).state_dict()
    assert not torch.equal(before["fc1.weight"], initial["fc1.weight"]), "joint phase trained"


def test_detached_phase_equals_single_process_replay(one_site) -> None:
    data, joint, detached = one_site
    net = initial_model(data, ModelConfig(cuts=("fc2",)))
    net.load_state_dict({**_part(joint, 1), **_part(joint, 0)})  # state at the joint end
    site, server = net[:2], net[2:]
    reader = ShardReader(data / "client-0.h5", batch_size=16, shuffle=False, prefetch=0)
    with reader, torch.no_grad():
        batches = list(reader.epoch(0))
        cached = torch.cat([site(b.features) for b in batches])
    labels = torch.cat([b.labels for b in batches])
    optimizer = torch.optim.SGD(server.parameters(), lr=0.05)
    for epoch in range(DETACHED):
        for index in detached_order(len(labels), 16, 0, epoch):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(server(cached[index]), labels[index]).backward()
            optimizer.step()
    actual, start = _part(detached, 0), _part(joint, 0)
    for key, value in server.state_dict().items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5, msg=key)
    assert not torch.equal(actual["head.weight"], start["head.weight"]), "detached trained"
    steps = [r for r in _records(detached, 0) if r.get("phase") == "detached"]
    assert len(steps) == DETACHED * -(-len(labels) // 16)


def test_server_sends_the_same_with_and_without_detached_phase(one_site) -> None:
    """The server's bytes to the site (all GRADIENT, joint phase) do not depend on the
    detached phase: it contacts no site then."""
    _, joint, detached = one_site
    routes = [_records(run, 0)[-1]["sent_routes"] for run in (joint, detached)]
    assert routes[0] == routes[1]
    assert set(routes[1]) == {"1"} and set(routes[1]["1"]) == {"GRADIENT"}


def test_three_sites_server_silent_in_detached_phase(dataset, tmp_path: Path) -> None:
    """Three sites: the server's byte counter does not move after its last joint step, it
    only ever sent GRADIENT, and it reports every site's test accuracy."""
    data = dataset("breast_cancer", clients=3)
    summary = _train(4, data, tmp_path, "scheme.detached_epochs=2")
    records = _records(tmp_path, 0)
    routes = records[-1]["sent_routes"]
    assert set(routes) == {"1", "2", "3"}
    assert all(set(kinds) == {"GRADIENT"} for kinds in routes.values())
    detached = [r for r in records if r.get("phase") == "detached"]
    joint = [r for r in records if "step" in r and "event" not in r and "phase" not in r]
    assert detached and {r["bytes_sent"] for r in detached} == {joint[-1]["bytes_sent"]}
    assert records[-1]["bytes_sent"] == joint[-1]["bytes_sent"]
    assert summary["steps"] == len(joint) + len(detached)
    assert sorted(e["client"] for e in summary["test_by_client"]) == [0, 1, 2]
    assert summary["test_accuracy"] > 0.8


@pytest.mark.parametrize("cut", ["relu1", "relu2", "head"])
def test_site_must_be_one_weighted_layer_and_activation(cut: str, dataset) -> None:
    data = dataset("breast_cancer", clients=3)
    cfg = load_config(CONFIG, [f"model.cuts=[{cut}]", f"data.path={data}"])
    with pytest.raises(ConfigError, match="one weighted layer plus its activation"):
        check_site_segment(prepare(cfg, 4))
