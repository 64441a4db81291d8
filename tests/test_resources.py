"""``mpisplit resources``: FLOPs by hand, bytes against a real run, the literature's claim."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mpisplit.data import ShardReader, read_meta
from mpisplit.models import ZOO, build_layers
from mpisplit.prof.commands import add_resources_arguments
from mpisplit.resources import Workload, model_costs, per_client, train_flops
from tests.conftest import run_mpi

EPOCHS, BATCH = 2, 16


def test_linear_flops_by_hand() -> None:
    # forward 2·30·64 per sample; backward only the weight gradient (the input needs none)
    assert train_flops(nn.Linear(30, 64), (30,), 8) == 8 * (2 * 30 * 64) * 2
    two = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 32))
    # second layer: forward, weight and input gradient; first: forward, weight gradient
    assert train_flops(two, (30,), 4) == 4 * (3 * 2 * 64 * 32 + 2 * 2 * 30 * 64)


def breast_cancer_workload(data: Path) -> Workload:
    meta = read_meta(data)
    return Workload("mlp", "fc2", tuple(meta["feature_shape"]), meta["num_classes"],
                    sum(meta["train_samples"]), meta["clients"], EPOCHS, BATCH)


def test_client_flops_match_an_independent_count(dataset) -> None:
    """Per-client FLOPs = FlopCounterMode over the real client segment and real batches."""
    data = dataset("breast_cancer", clients=2)
    work = breast_cancer_workload(data)
    plan = ZOO["mlp"](input_shape=work.input_shape, num_classes=work.classes)
    segment = build_layers(plan, 0, [name for name, _ in plan].index("fc2"), 0)
    counted = []
    for client in range(work.clients):
        with ShardReader(data / f"client-{client}.h5", batch_size=BATCH, shuffle=False,
                         prefetch=0) as reader, FlopCounterMode(display=False) as counter:
            for epoch in range(EPOCHS):
                for batch in reader.epoch(epoch):
                    out = segment(batch.features)
                    out.backward(torch.ones_like(out))
        counted.append(counter.get_total_flops())
    split = {c.scheme: c for c in per_client(work, model_costs(work))}["split"]
    assert split.flops == pytest.approx(sum(counted) / len(counted), rel=1e-9)


def test_split_bytes_match_a_real_run(dataset, tmp_path: Path) -> None:
    """The cut traffic `resources` predicts equals what the clients' transports counted
    during training (the last step's counters: the final evaluation pass comes after)."""
    data = dataset("breast_cancer", clients=2)
    result = run_mpi(3, "train", "configs/vanilla-breast-cancer.yaml", "scheme.clients=2",
                     f"data.path={data}", f"run.dir={tmp_path}", f"train.epochs={EPOCHS}",
                     f"data.batch_size={BATCH}", "train.eval_every=0", "run.progress=none")
    assert result.returncode == 0, result.stderr[-3000:]
    sent, received = [], []
    for rank in (1, 2):
        lines = (tmp_path / f"metrics-rank{rank}.jsonl").read_text().splitlines()
        last = [r for r in map(json.loads, lines) if "step" in r][-1]
        sent.append(last["bytes_sent"])
        received.append(last["bytes_received"])
    work = breast_cancer_workload(data)
    detail = {c.scheme: c for c in per_client(work, model_costs(work))}["split"].detail
    predicted_sent = detail["activations"] + detail["labels"]
    assert sum(sent) / 2 == pytest.approx(predicted_sent, rel=0.05)
    assert sum(received) / 2 == pytest.approx(detail["gradients"], rel=0.05)


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


@pytest.mark.parametrize(("case", "bytes_ratio"), [
    (("vgg", 100), 1.0), (("vgg", 500), 0.2), (("resnet50", 500), 0.3),
])
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
    assert resnet.cut_shape == (256, 32, 32)
    vgg = model_costs(Workload("vgg", "block3", (3, 32, 32), 10, 1000, 10, 1, 64))
    assert vgg.cut_shape == (128, 8, 8)
    assert vgg.model_param_bytes == 4 * vgg.params


def test_cli_writes_json(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_resources_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(["--model", "mlp", "--cut", "fc2", "--input-shape", "30",
                              "--classes", "2", "--samples", "455", "--clients", "2",
                              "--clients", "5", "--batch-size", "16", "--json", str(out)])
    assert args.handler(args) == 0
    results = json.loads(out.read_text())
    assert [r["workload"]["clients"] for r in results] == [2, 5]
    assert "split" in capsys.readouterr().out
