"""Spatio-temporal split learning under real ``mpiexec``: each site's layer is the same bit
for bit from its hand-over to the end of the run, nothing crosses to or from a site after
its hand-over but the end-of-run roster, the server's detached training equals an
independent single-process replay, a slow site does not hold up the others, and an absent
one is dropped while the run completes without it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mpisplit.config import ConfigError, ModelConfig, config_from_dict, load_config
from mpisplit.data import ShardReader
from mpisplit.engine import prepare
from mpisplit.schemes.spatiotemporal import detached_order
from mpisplit.transport import HEADER_BYTES
from tests.conftest import MPIEXEC_TIMEOUT_S, run_mpi, start_mpi
from tests.reference import initial_model
from tests.test_failures import _pid_once_training

CONFIG = "configs/spatiotemporal-breast-cancer.yaml"
DETACHED = 3
# Stateless optimizer (plain SGD, constant lr), so the replay can start from the saved weights.
COMMON = (
    "scheme.joint_epochs=1",
    "train.momentum=0",
    "train.lr=0.05",
    "train.eval_every=0",
    "run.progress=none",
)


def _train(ranks: int, data: Path, run_dir: Path, *overrides: str) -> dict:
    result = run_mpi(
        ranks, "train", CONFIG, f"data.path={data}", f"run.dir={run_dir}", *COMMON, *overrides
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def _part(run_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / f"model-rank{rank}.pt", weights_only=True)


def _records(run_dir: Path, rank: int) -> list[dict]:
    lines = (run_dir / f"metrics-rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _event(records: list[dict], name: str, **match: object) -> dict:
    return next(
        r
        for r in records
        if r.get("event") == name and all(r.get(k) == v for k, v in match.items())
    )


def _sha256(state: dict[str, torch.Tensor]) -> str:
    """The tensors' bytes in state-dict order, hashed here on their own."""
    return hashlib.sha256(
        b"".join(t.contiguous().numpy().tobytes() for t in state.values())
    ).hexdigest()


@pytest.fixture(scope="module")
def one_site(dataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One site (so the joint phase is deterministic): runs without and with a detached
    phase."""
    data = dataset("breast_cancer", clients=1)
    root = tmp_path_factory.mktemp("spatiotemporal")
    _train(2, data, root / "joint", "scheme.clients=1", "scheme.detached_epochs=0")
    _train(2, data, root / "detached", "scheme.clients=1", f"scheme.detached_epochs={DETACHED}")
    return data, root / "joint", root / "detached"


def test_site_layer_bit_identical_from_hand_over_to_end_of_run(one_site) -> None:
    """Same run: the digest the site recorded when it handed over equals that of the layer
    it saved at the end, after the server's detached phase; and the joint phase trained it."""
    data, _, detached = one_site
    saved = _part(detached, 1)
    assert saved.keys() == {"fc1.weight", "fc1.bias"}
    assert _event(_records(detached, 1), "handover")["layer_sha256"] == _sha256(saved)
    assert [r for r in _records(detached, 0) if r.get("phase") == "detached"]
    initial = initial_model(data, ModelConfig(cuts=("fc2",))).state_dict()
    assert not torch.equal(saved["fc1.weight"], initial["fc1.weight"]), "joint phase trained"


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


def test_no_site_contacted_after_its_hand_over(dataset, tmp_path: Path) -> None:
    """Three sites. Each site's counters at its hand-over equal its final ones but for the
    empty roster message; the server's bytes to and from each site at that site's hand-over
    equal those after the detached phase; its total stays flat through the detached phase;
    and it only ever sent gradients and the roster."""
    data = dataset("breast_cancer", clients=3)
    summary = _train(4, data, tmp_path, "scheme.detached_epochs=2")
    server = _records(tmp_path, 0)
    for site in range(3):
        records = _records(tmp_path, site + 1)
        handover, end = _event(records, "handover"), _event(records, "end")
        assert end["bytes_sent"] == handover["bytes_sent"]
        assert end["bytes_received"] - handover["bytes_received"] == HEADER_BYTES
        at_handover = _event(server, "handover", client=site)
        after = _event(server, "site_traffic", client=site)
        for key in ("sent_to_site", "received_from_site"):
            assert at_handover[key] == after[key] > 0, (site, key)
    detached = [r for r in server if r.get("phase") == "detached"]
    last_handover = max(server.index(_event(server, "handover", client=k)) for k in range(3))
    assert detached and server.index(detached[0]) > last_handover
    assert len({(r["bytes_sent"], r["bytes_received"]) for r in detached}) == 1
    routes = _event(server, "end")["sent_routes"]
    assert set(routes) == {"1", "2", "3"}
    assert all(
        set(kinds) == {"GRADIENT", "CONTROL"} and kinds["CONTROL"] == HEADER_BYTES
        for kinds in routes.values()
    )
    joint = [r for r in server if "client" in r and "event" not in r]
    assert summary["steps"] == len(joint) + len(detached) and summary["dropped"] == []
    assert sorted(e["client"] for e in summary["test_by_client"]) == [0, 1, 2]
    assert summary["test_accuracy"] > 0.8


def _start(data: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    """Three sites with a long joint phase, every metric record flushed at once."""
    return start_mpi(
        4,
        "train",
        CONFIG,
        f"data.path={data}",
        f"run.dir={run_dir}",
        "run.progress=none",
        "run.log_every=1",
        "scheme.detached_epochs=1",
        "train.eval_every=0",
        *overrides,
    )


@contextlib.contextmanager
def _stopped_then_released(process: subprocess.Popen, pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the body; whatever happens, it is continued and the job ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    except BaseException:
        process.kill()
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_slow_site_does_not_hold_up_the_others(dataset, tmp_path: Path) -> None:
    """Site 1 is stopped (SIGSTOP) for 3 s mid-run: the server goes on serving sites 0 and
    2 meanwhile, and the run ends normally with all three."""
    data = dataset("breast_cancer", clients=3)
    process = _start(data, tmp_path, "scheme.joint_epochs=60")
    with _stopped_then_released(process, _pid_once_training(tmp_path, 2, process)):
        time.sleep(3)
    _, stderr = process.communicate(timeout=MPIEXEC_TIMEOUT_S)
    assert process.returncode == 0, stderr[-3000:]
    steps = [r for r in _records(tmp_path, 0) if "client" in r and "event" not in r]
    slow = [r["time"] for r in steps if r["client"] == 1]
    gap, before = max((b - a, a) for a, b in zip(slow, slow[1:], strict=False))
    assert gap > 2.5
    served = [r for r in steps if r["client"] != 1 and before < r["time"] < before + gap]
    assert {r["client"] for r in served} == {0, 2} and len(served) > 20
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dropped"] == [] and len(summary["test_by_client"]) == 3


def test_absent_site_is_dropped_and_the_run_completes(dataset, tmp_path: Path) -> None:
    """Site 1 is stopped for the whole run: after scheme.site_timeout_s the server drops it
    with one warning line, trains and evaluates without it, and writes the summary. Resumed
    afterwards, the site finds the notice when its own wait times out and leaves, so the job
    ends cleanly."""
    data = dataset("breast_cancer", clients=3)
    process = _start(
        data,
        tmp_path,
        "scheme.joint_epochs=100",
        "scheme.site_timeout_s=3",
        "transport.timeout_s=20",
    )
    summary_path, deadline = tmp_path / "summary.json", time.monotonic() + 120
    with _stopped_then_released(process, _pid_once_training(tmp_path, 2, process)):
        while not summary_path.exists() and process.poll() is None:
            assert time.monotonic() < deadline, "the server never finished without site 1"
            time.sleep(0.5)
    _, stderr = process.communicate(timeout=MPIEXEC_TIMEOUT_S)
    assert process.returncode == 0, stderr[-3000:]
    dropped = [line for line in stderr.splitlines() if "dropped, the run goes on" in line]
    assert len(dropped) == 1 and "[rank 0 server] site 1 (rank 2)" in dropped[0], stderr[-3000:]
    assert "[rank 2 client1] the server dropped this site" in stderr
    summary = json.loads(summary_path.read_text())
    assert summary["dropped"] == ["client1"]
    assert summary["roles"] == ["server", "client0", "client2"]
    assert sorted(e["client"] for e in summary["test_by_client"]) == [0, 2]
    server = _records(tmp_path, 0)
    assert _event(server, "dropped")["client"] == 1
    assert {r["client"] for r in server if r.get("event") == "handover"} == {0, 2}


def test_hand_over_labels_above_the_eager_limit(dataset, tmp_path: Path) -> None:
    """A site's hand-over labels (3000 int64 = 24 KB) exceed MPI's eager limit: their send
    completes only once the server takes them, after the outputs, so the site must post the
    outputs before it waits for the labels."""
    data = dataset("synthetic", clients=1, samples=3000, shape=(8,))
    summary = _train(
        2,
        data,
        tmp_path,
        "scheme.clients=1",
        "scheme.detached_epochs=1",
        "data.batch_size=200",
        "transport.timeout_s=20",
        "scheme.site_timeout_s=10",
    )
    assert summary["dropped"] == []
    assert summary["test_by_client"][0]["samples"] == 600


def test_site_timeout_must_be_below_the_transport_deadline() -> None:
    with pytest.raises(ConfigError, match=r"scheme\.site_timeout_s: 120 s must be below"):
        config_from_dict(
            {
                "scheme": {"name": "spatiotemporal", "site_timeout_s": 120},
                "transport": {"timeout_s": 120},
            }
        )


@pytest.mark.parametrize("cut", ["relu1", "relu2", "head"])
def test_site_must_be_one_weighted_layer_and_activation(cut: str, dataset) -> None:
    data = dataset("breast_cancer", clients=3)
    cfg = load_config(CONFIG, [f"model.cuts=[{cut}]", f"data.path={data}"])
    with pytest.raises(ConfigError, match="one weighted layer plus its activation"):
        prepare(cfg, 4)
