"""``mpisplit resources``: FLOPs by hand, bytes and FLOPs against real traced runs, the
literature's claim."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mpisplit.data import ShardReader, read_meta
from mpisplit.models import ZOO, build_layers
from mpisplit.prof.commands import add_resources_arguments
from mpisplit.resources import Workload, model_costs, per_client, train_flops
from mpisplit.transport import HEADER_BYTES
from tests.conftest import MPIEXEC_TIMEOUT_S, ROOT, run_mpi

EPOCHS, BATCH = 2, 16


def test_linear_flops_by_hand() -> None:
    # forward 2·30·64 per sample; backward only the weight gradient (the input needs none)
    assert train_flops(nn.Linear(30, 64), (30,), 8) == 8 * (2 * 30 * 64) * 2
    two = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 32))
    # second layer: forward, weight and input gradient; first: forward, weight gradient
    assert train_flops(two, (30,), 4) == 4 * (3 * 2 * 64 * 32 + 2 * 2 * 30 * 64)


def breast_cancer_workload(data: Path) -> Workload:
    meta = read_meta(data)
    return Workload(
        "mlp",
        "fc2",
        tuple(meta["feature_shape"]),
        meta["num_classes"],
        sum(meta["train_samples"]),
        meta["clients"],
        EPOCHS,
        BATCH,
    )


def test_client_flops_match_an_independent_count(dataset) -> None:
    """Per-client FLOPs = FlopCounterMode over the real client segment and real batches."""
    data = dataset("breast_cancer", clients=2)
    work = breast_cancer_workload(data)
    plan = ZOO["mlp"](input_shape=work.input_shape, num_classes=work.classes)
    segment = build_layers(plan, 0, [name for name, _ in plan].index("fc2"), 0)
    counted = []
    for client in range(work.clients):
        with (
            ShardReader(
                data / f"client-{client}.h5", batch_size=BATCH, shuffle=False, prefetch=0
            ) as reader,
            FlopCounterMode(display=False) as counter,
        ):
            for epoch in range(EPOCHS):
                for batch in reader.epoch(epoch):
                    out = segment(batch.features)
                    out.backward(torch.ones_like(out))
        counted.append(counter.get_total_flops())
    split = {c.scheme: c for c in per_client(work, model_costs(work))}["split"]
    assert split.flops == pytest.approx(sum(counted) / len(counted), rel=1e-9)


RUNS = {  # scheme: (config, ranks)
    "split": ("configs/vanilla-sequential-breast-cancer.yaml", 3),
    "splitfed": ("configs/splitfed-breast-cancer.yaml", 3),
    "fedavg": ("configs/fedavg-breast-cancer.yaml", 2),
    "syncsgd": ("configs/syncsgd-breast-cancer.yaml", 2),
}
AVERAGE_EVERY, MOMENTUM = 10, 0.9


def traced_client_costs(trace: list[dict]) -> tuple[int, int, float]:
    """(bytes sent, bytes received, FLOPs) of one client's training, from its trace: every
    message outside an evaluation pass (payload + header) and every collective (bytes
    contributed and got back); the FLOPs its forward and backward spans recorded."""
    spans = [e for e in trace if e["ph"] == "X"]
    evals = [(e["ts"], e["ts"] + e["dur"]) for e in spans if e["name"] == "eval"]
    sent = received = 0
    for e in spans:
        if e["cat"] == "collective":
            sent += e["args"]["bytes_sent"]
            received += e["args"]["bytes_received"]
        elif e["cat"] == "comm" and not any(lo <= e["ts"] <= hi for lo, hi in evals):
            if e["name"].startswith("send "):
                sent += e["args"]["bytes"] + HEADER_BYTES
            else:
                received += e["args"]["bytes"] + HEADER_BYTES
    flops = sum(e["args"]["flops"] for e in spans if e["name"] in ("forward", "backward"))
    return sent, received, flops


@pytest.mark.parametrize("scheme", RUNS)
def test_prediction_matches_a_traced_run(scheme: str, dataset, tmp_path: Path) -> None:
    """Per-client bytes and FLOPs of `resources` agree within 5 % with a real 2-client run's
    traces (run.count_flops: the clients' passes under FlopCounterMode), averaged over the
    clients; sequential split learning hands the part over 2·2 - 1 = 3 times, then the
    final part once more to the client that did not train last."""
    data = dataset("breast_cancer", clients=2)
    config, ranks = RUNS[scheme]
    averaging = (
        [f"scheme.fedavg_every={AVERAGE_EVERY}"] if scheme in ("splitfed", "fedavg") else []
    )  # an option of the averaging schemes only
    result = run_mpi(
        ranks,
        "train",
        config,
        "scheme.clients=2",
        f"data.path={data}",
        f"run.dir={tmp_path}",
        f"train.epochs={EPOCHS}",
        f"data.batch_size={BATCH}",
        *averaging,
        f"train.momentum={MOMENTUM}",
        "train.eval_every=0",
        "run.trace=true",
        "run.count_flops=true",
        "run.progress=none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    clients = range(ranks - 2, ranks)
    costs = np.array(
        [
            traced_client_costs(
                json.loads((tmp_path / f"trace-rank{rank}.json").read_text())["traceEvents"]
            )
            for rank in clients
        ]
    )
    work = replace(breast_cancer_workload(data), average_every=AVERAGE_EVERY, momentum=MOMENTUM)
    predicted = {c.scheme: c for c in per_client(work, model_costs(work))}[scheme]
    sent, received, flops = costs.mean(axis=0)
    assert sent == pytest.approx(predicted.bytes_sent, rel=0.05)
    assert received == pytest.approx(predicted.bytes_received, rel=0.05)
    assert flops == pytest.approx(predicted.flops, rel=0.05)


@pytest.fixture(scope="module")
def literature() -> dict[tuple[str, int], dict[str, object]]:
    """The comparison of split learning with federated learning on CIFAR-sized inputs:
    VGG-16 (10 classes) and ResNet-50 (100 classes), 50 000 samples, 100 and 500 clients."""
    out = {}
    for model, cut, classes in (("vgg", "block2", 10), ("resnet50", "block1_1", 100)):
        base = Workload(model, cut, (3, 32, 32), classes, 50_000, 100, 1, 64)
        costs = model_costs(base)
        for clients in (100, 500):
            work = Workload(**{**vars(base), "clients": clients})
            out[(model, clients)] = {c.scheme: c for c in per_client(work, costs)}
    return out


@pytest.mark.parametrize(
    ("case", "bytes_ratio"),
    [
        (("vgg", 100), 1.0),
        (("vgg", 500), 0.2),
        (("resnet50", 500), 0.3),
    ],
)
def test_split_learning_is_far_cheaper_per_client(literature, case, bytes_ratio) -> None:
    """With many clients and a large model, a split-learning client computes and sends far
    less than a federated-averaging one (with 100 clients VGG still less, ResNet-50 not:
    its 64×32×32 cut activation outweighs the model); synchronous SGD sends the most."""
    costs = literature[case]
    assert costs["split"].bytes < bytes_ratio * costs["fedavg"].bytes
    assert costs["split"].flops < 0.2 * costs["fedavg"].flops
    assert costs["syncsgd"].bytes > costs["fedavg"].bytes
    assert costs["fedavg"].flops == costs["syncsgd"].flops


def test_more_clients_shrink_split_traffic_not_fedavg(literature) -> None:
    few, many = literature[("resnet50", 100)], literature[("resnet50", 500)]
    assert few["split"].bytes > few["fedavg"].bytes
    assert many["split"].bytes < few["split"].bytes / 4
    assert many["fedavg"].bytes == few["fedavg"].bytes


def test_model_sizes() -> None:
    resnet = model_costs(Workload("resnet50", "block2_1", (3, 32, 32), 100, 1000, 10, 1, 64))
    assert 23.5e6 < resnet.params < 23.9e6
    assert resnet.cut_shapes == ((256, 32, 32),)
    vgg = model_costs(Workload("vgg", "block3", (3, 32, 32), 10, 1000, 10, 1, 64))
    assert vgg.cut_shapes == ((128, 8, 8),)
    assert vgg.model_param_bytes == 4 * vgg.params


def test_cli_writes_json(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_resources_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(
        [
            "--model",
            "mlp",
            "--cut",
            "fc2",
            "--input-shape",
            "30",
            "--classes",
            "2",
            "--samples",
            "455",
            "--clients",
            "2",
            "--clients",
            "5",
            "--batch-size",
            "16",
            "--json",
            str(out),
        ]
    )
    assert args.handler(args) == 0
    results = json.loads(out.read_text())
    assert [r["workload"]["clients"] for r in results] == [2, 5]
    assert "split" in capsys.readouterr().out


def test_scale_tool_measures_what_resources_predicts(tmp_path: Path) -> None:
    """``tools/bench_scale.py measured`` on a small VGG (client = its first convolution),
    4 clients on 2 ranks: the per-client FLOPs and bytes it measures agree with `resources`
    within 5 %, for the run and scaled to a full epoch; the FLOPs equal a count by hand."""
    rows = _scale_tool(tmp_path, "vanilla")
    compared = [r for r in rows if "predicted" in r]
    assert {r["scope"] for r in compared} == {"this run", "1 epoch(s) of 50000"}
    quantities = {"flops", "bytes", "bytes_activation", "bytes_labels", "bytes_gradient"}
    assert {r["quantity"] for r in compared} == quantities
    for row in compared:
        assert abs(row["relative_difference"]) < 0.05, row
    # one step of 2 samples: the 3->8 3x3 convolution at 32x32, forward + weight gradient
    flops = next(r for r in compared if r["scope"] == "this run" and r["quantity"] == "flops")
    assert flops["measured"] == 2 * 2 * (2 * 27 * 8 * 32 * 32)
    evaluation, counts, memory = [r for r in rows if "predicted" not in r]
    assert evaluation["measured"] > 0  # one client evaluated: left out of the comparison
    assert counts["measured"] == counts["counted"] > 0  # trace spans = transport counters
    assert memory["quantity"] == "peak RSS MB per rank, largest" and memory["measured"] > 100


@pytest.mark.parametrize("scheme", ["splitfed", "fedavg", "syncsgd"])
def test_scale_tool_measures_averaging_schemes_hosting_two_clients_a_rank(
    tmp_path: Path, scheme: str
) -> None:
    """The same for the schemes with Allreduces: a rank hosting two clients joins each one
    once for both (a client's share is half of the one-client-per-rank figure), and a full
    epoch has as many as ``resources`` counts (SplitFed, FedAvg: one per average; sync SGD:
    one per step)."""
    compared = [r for r in _scale_tool(tmp_path, scheme) if "predicted" in r]
    assert {r["quantity"] for r in compared} >= {"flops", "bytes"}
    for row in compared:
        assert abs(row["relative_difference"]) < 0.05, row


def _scale_tool(work: Path, scheme: str) -> list[dict]:
    """``tools/bench_scale.py measured`` for ``scheme`` on a small VGG, 4 clients on 2 ranks."""
    out = work / "measured.json"
    result = subprocess.run(
        [
            *(sys.executable, "tools/bench_scale.py", "measured", "--models", "vgg"),
            *("--scheme", scheme, "--clients", "4", "--client-ranks", "2", "--batch", "2"),
            *("--options", '{"blocks": [[8, 8], [16]]}'),
            *("--work", str(work), "--json", str(out)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=MPIEXEC_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())["results"]
