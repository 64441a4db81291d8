"""The engine's trace: what each span records, checked against the model and the run's
settings, and against the PMPI library, which sees the same bytes per peer and per
collective call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mpisplit.config import ConfigError, load_config
from mpisplit.data import read_meta
from mpisplit.models import build_layers, cut_indices, layer_plan
from mpisplit.pmpi import library_path, merged_calls, read_reports
from mpisplit.transport import HEADER_BYTES, Kind
from tests.conftest import run_mpi

STEPS, EVAL_EVERY, AVERAGE_EVERY = 12, 5, 5
VANILLA = "configs/vanilla-breast-cancer.yaml"


def spans(run_dir: Path, rank: int) -> list[dict]:
    trace = json.loads((run_dir / f"trace-rank{rank}.json").read_text())["traceEvents"]
    return [e for e in trace if e["ph"] == "X"]


def outside_eval(events: list[dict]) -> list[dict]:
    """The spans that are not part of an evaluation pass (training traffic)."""
    evals = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["name"] == "eval"]
    return [e for e in events if not any(lo <= e["ts"] <= hi for lo, hi in evals)]


def model_of(config: str, data: Path) -> tuple[nn.Sequential, nn.Sequential, list[int]]:
    """(client part, whole model, sample shape) the config describes, on the meta device."""
    cfg, meta = load_config(config), read_meta(data)
    plan = layer_plan(cfg.model, meta["feature_shape"], meta["num_classes"])
    (cut,) = cut_indices(plan, cfg.model.cuts)
    with torch.device("meta"):
        return (
            build_layers(plan, 0, cut, 0),
            build_layers(plan, 0, len(plan), 0),
            meta["feature_shape"],
        )


def cut_width(data: Path) -> int:
    """Features per sample at the cut."""
    client, _, shape = model_of(VANILLA, data)
    return client(torch.empty(1, *shape, device="meta")).numel()


def require_pmpi() -> None:
    if library_path() is None:
        pytest.fail("PMPI library not built: tools/install.sh builds it")


@pytest.fixture(scope="module")
def vanilla(dataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A traced, PMPI-recorded vanilla job: 1 server, 2 parallel clients, STEPS each."""
    require_pmpi()
    data = dataset("breast_cancer", clients=2)
    run_dir = tmp_path_factory.mktemp("vanilla")
    result = run_mpi(
        3,
        "train",
        "--pmpi",
        VANILLA,
        "scheme.clients=2",
        f"data.path={data}",
        f"run.dir={run_dir}",
        f"train.max_steps={STEPS}",
        f"train.eval_every={EVAL_EVERY}",
        "run.trace=true",
        "run.progress=none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, data


def test_trace_and_pmpi_agree_on_every_link(vanilla) -> None:
    run_dir, _ = vanilla
    summary = json.loads((run_dir / "summary.json").read_text())
    reports = {r["rank"]: r for r in read_reports(run_dir)}
    assert sorted(reports) == [0, 1, 2]
    for rank in range(3):
        expected: dict[int, int] = {}
        for event in spans(run_dir, rank):
            if event["name"].startswith("send "):
                peer = event["args"]["peer"]
                expected[peer] = expected.get(peer, 0) + event["args"]["bytes"] + HEADER_BYTES
        measured = {
            int(p): v["sent_bytes"] for p, v in reports[rank]["peers"].items() if v["sent_bytes"]
        }
        assert measured == expected, f"rank {rank}"
        assert sum(expected.values()) == summary["bytes_sent_per_rank"][rank]


def test_message_spans_record_what_travelled(vanilla) -> None:
    """Every cut message of training carries peer, tag, kind, bytes, dtype, shape, step,
    microbatch and the client it belongs to, equal to what the cut width, batch size and
    step count imply."""
    run_dir, data = vanilla
    batch = load_config(VANILLA).data.batch_size
    shape, nbytes = [batch, cut_width(data)], batch * cut_width(data) * 4
    cut = {"dtype": "float32", "shape": shape, "bytes": nbytes, "microbatch": 0}

    def messages(events: list[dict], name: str) -> list[dict]:
        return [e for e in events if e["name"] == name]

    for client in (1, 2):
        trace = json.loads((run_dir / f"trace-rank{client}.json").read_text())["traceEvents"]
        assert trace[0]["args"]["name"] == f"rank {client} client{client - 1}"
        events = outside_eval(spans(run_dir, client))
        for event in events:
            if event["cat"] in ("comm", "wait"):
                args = event["args"]
                assert args["tag"] == Kind[args["kind"]].value
                assert event["name"].endswith(args["kind"].lower())
        activations = [
            e["args"] for e in messages(events, "send activation") if e["args"]["shape"] != [1]
        ]  # [1]: the end-of-evaluation markers
        assert activations == [
            {
                **cut,
                "peer": 0,
                "step": step,
                "kind": "ACTIVATION",
                "tag": Kind.ACTIVATION.value,
                "client": client - 1,
            }
            for step in range(STEPS)
        ]
        gradients = [e["args"] for e in messages(events, "recv gradient")]
        assert gradients == [
            {
                **cut,
                "peer": 0,
                "step": step,
                "kind": "GRADIENT",
                "tag": Kind.GRADIENT.value,
                "client": client - 1,
            }
            for step in range(STEPS)
        ]
        labels = [e["args"] for e in messages(events, "send labels")]
        assert [(a["shape"], a["dtype"], a["bytes"]) for a in labels] == [
            ([batch], "int64", batch * 8)
        ] * STEPS
        waits = messages(events, "wait gradient")
        assert len(waits) == STEPS and {e["cat"] for e in waits} == {"wait"}
        assert [e["args"] for e in waits] == gradients  # it learns what it waited for
    server = spans(run_dir, 0)
    for client in (1, 2):
        sent = [e["args"] for e in messages(server, "send gradient") if e["args"]["peer"] == client]
        assert sum(a["bytes"] for a in sent) == STEPS * nbytes
        assert [a["step"] for a in sent] == list(range(STEPS))
        assert {a["client"] for a in sent} == {client - 1}  # the gradient names its client
    waits = messages(server, "wait activation")
    assert {e["cat"] for e in waits} == {"wait"}
    assert {e["args"]["peer"] for e in waits} == {1, 2}  # the actual source, not "any"
    assert {"forward", "backward", "optimizer"} <= {e["name"] for e in server}
    assert {"data", "forward", "backward", "optimizer", "eval"} <= {
        e["name"] for e in spans(run_dir, 1)
    }


def test_flop_counting_needs_the_trace() -> None:
    with pytest.raises(ConfigError, match="run.count_flops"):
        load_config(VANILLA, ["run.count_flops=true"])


def test_fedavg_collectives_are_traced_and_agree_with_pmpi(dataset, tmp_path: Path) -> None:
    """Weight averages are collective spans (kind WEIGHTS, one model's bytes in and out,
    the step they follow), and their bytes are exactly what the PMPI library counted for
    ``MPI_Iallreduce`` (the data each rank hands in)."""
    require_pmpi()
    data = dataset("breast_cancer", clients=2)
    result = run_mpi(
        2,
        "train",
        "--pmpi",
        "configs/fedavg-breast-cancer.yaml",
        "scheme.clients=2",
        f"data.path={data}",
        f"run.dir={tmp_path}",
        f"train.max_steps={STEPS}",
        f"scheme.fedavg_every={AVERAGE_EVERY}",
        "run.trace=true",
        "run.progress=none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, model, _ = model_of("configs/fedavg-breast-cancer.yaml", data)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    reports = {r["rank"]: r for r in read_reports(tmp_path)}
    for rank in (0, 1):
        events = spans(tmp_path, rank)
        averages = [e for e in events if e["name"] == "collective weight average"]
        assert {e["cat"] for e in averages} == {"collective"}
        assert [
            (
                a["args"]["step"],
                a["args"]["bytes_sent"],
                a["args"]["bytes_received"],
                a["args"]["kind"],
            )
            for a in averages
        ] == [(step - 1, model_bytes, model_bytes, "WEIGHTS") for step in (5, 10, 12)]
        allreduces = [
            e
            for e in events
            if e["name"] in ("collective weight average", "collective sample count sum")
        ]
        pmpi = merged_calls(reports[rank])["MPI_Iallreduce"]
        assert pmpi["count"] == len(allreduces) == 4
        assert pmpi["bytes"] == sum(e["args"]["bytes_sent"] for e in allreduces)
        assert {"data", "forward", "backward", "optimizer"} <= {e["name"] for e in events}
