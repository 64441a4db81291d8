"""Vertical split learning under real ``mpiexec``: equals the whole vertically-joined model
trained in one process on the same aligned batches, for every join and for parties of
different widths; labels can stay at a party, and then the server has no labels file at
all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from mpisplit.config import ConfigError, ModelConfig, config_from_dict, load_config
from mpisplit.data import ShardReader, align_rows, intersect_ids, read_ids
from mpisplit.engine import prepare
from mpisplit.models import build_layers, layer_plan
from mpisplit.schemes.vertical_parts import Layout, joined_shape
from tests.conftest import MPIEXEC_TIMEOUT_S, ROOT, mpi_launcher, run_mpi

CONFIG = "configs/vertical-breast-cancer.yaml"
MODEL = ModelConfig(cuts=("fc2",))
PARTIES, STEPS, LR, MOMENTUM, BATCH, SEED = 3, 30, 0.05, 0.9, 16, 0
CUT = 2  # fc1, relu1 at each party
ARGS = ("run.progress=none", f"train.max_steps={STEPS}", "train.eval_every=0")


@pytest.fixture(scope="module")
def data(dataset) -> Path:
    """Each party misses 5 % of the patients, so the intersection is smaller than any."""
    return dataset("breast_cancer", clients=PARTIES, partition="vertical", drop_fraction=0.05)


def _aligned_batches(data: Path) -> tuple[Iterator, int]:
    """(party features..., labels) per batch, on the ids common to every file."""
    paths = [data / f"party-{p}.h5" for p in range(PARTIES)] + [data / "labels.h5"]
    ids = [read_ids(path) for path in paths]
    common = intersect_ids(ids)
    readers = [
        ShardReader(
            path,
            batch_size=BATCH,
            fields=(field,),
            seed=SEED,
            prefetch=0,
            rows=align_rows(own, common),
        )
        for path, own, field in zip(paths, ids, ["features"] * PARTIES + ["labels"], strict=True)
    ]

    def endless() -> Iterator:
        epoch = 0
        while True:
            yield from zip(*(reader.epoch(epoch) for reader in readers), strict=True)
            epoch += 1

    return endless(), len(common)


def _seeded(index: int, layer: nn.Module | type, *args: int) -> nn.Module:
    torch.manual_seed(MODEL.seed * 1_000_003 + index)
    return layer(*args)


def _reference(data: Path, join: str, widths: tuple[int, ...]) -> tuple[list[dict], dict]:
    """The whole joined model in one process: party p's fc1 (``widths[p]`` wide, seed
    model.seed + p), the join, the server's fc2 (taking sum(widths) inputs under concat)
    and head."""
    parties = [
        build_layers(
            layer_plan(ModelConfig(options={"hidden": [w, 32]}), (10,), 2), 0, CUT, MODEL.seed + p
        )
        for p, w in enumerate(widths)
    ]
    width = sum(widths) if join == "concat" else widths[0]
    server = nn.Sequential(
        OrderedDict(
            fc2=_seeded(2, nn.Linear, width, 32), relu2=nn.ReLU(), head=_seeded(4, nn.Linear, 32, 2)
        )
    )
    params = [p for m in (*parties, server) for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    batches, _ = _aligned_batches(data)
    for _ in range(STEPS):
        *features, labels = next(batches)
        outputs = [party(batch.features) for party, batch in zip(parties, features, strict=True)]
        if join == "concat":
            joined = torch.cat(outputs, dim=1)
        else:
            joined = outputs[0] + outputs[1] + outputs[2]
            joined = joined / PARTIES if join == "mean" else joined
        opt.zero_grad()
        nn.functional.cross_entropy(server(joined), labels.labels).backward()
        opt.step()
    return [party.state_dict() for party in parties], server.state_dict()


def _assert_parts(
    run_dir: Path, data: Path, join: str, widths: tuple[int, ...] = (64,) * PARTIES
) -> None:
    parties, server = _reference(data, join, widths)
    _assert_user_parts(run_dir, parties, server)


def run_with_server_data(
    config: str, server_data: Path, data: Path, others: int, *overrides: str
) -> subprocess.CompletedProcess[str]:
    """MPMD under ``mpiexec``: rank 0 (the server) trains with ``data.path=server_data``,
    the ``others`` ranks after it with ``data``; same hard timeout as ``run_mpi``."""
    common = [sys.executable, "-m", "mpisplit", "train", config, *overrides]
    found = mpi_launcher()
    command = [
        found.program,
        "-n",
        "1",
        *common,
        f"data.path={server_data}",
        ":",
        "-n",
        str(others),
        *common,
        f"data.path={data}",
    ]
    env = found.environment({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=MPIEXEC_TIMEOUT_S
    )


def _records(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"metrics-rank{rank}.jsonl").open()]


@pytest.mark.parametrize("join", ["concat", "sum", "mean"])
def test_equals_the_joined_model_in_one_process(join: str, data: Path, tmp_path: Path) -> None:
    result = run_mpi(
        PARTIES + 1,
        "train",
        CONFIG,
        f"data.path={data}",
        f"run.dir={tmp_path}",
        f"scheme.join={join}",
        *ARGS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_parts(tmp_path, data, join)
    alignment = next(
        r for r in _records(tmp_path, 0) if r.get("event") == "alignment" and r["split"] == "train"
    )
    _, common = _aligned_batches(data)
    assert alignment["common"] == common
    assert all(alignment["dropped"][f"client{p}"] > 0 for p in range(PARTIES))
    assert "ids common to all parties" in result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_per_rank"] == [STEPS] * (PARTIES + 1)
    assert summary["bytes_received_per_rank"][0] > 0  # the Gatherv traffic is accounted


def test_labels_stay_at_party0(data: Path, tmp_path: Path) -> None:
    """MPMD: the server rank gets a copy of the dataset without any labels file, so opening
    one would fail; party 0 computes the loss and reports the test metrics."""
    blind = tmp_path / "server-data"
    blind.mkdir()
    for path in data.iterdir():
        if "labels" not in path.name:
            (blind / path.name).symlink_to(path)
    run_dir = tmp_path / "run"
    result = run_with_server_data(
        CONFIG,
        blind,
        data,
        PARTIES,
        f"run.dir={run_dir}",
        "scheme.join=mean",
        "scheme.label_holder=party0",
        *ARGS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_parts(run_dir, data, "mean")
    server, party0 = _records(run_dir, 0), _records(run_dir, 1)
    assert not any("loss" in r for r in server if "step" in r and "event" not in r)
    assert sum("loss" in r for r in party0) >= STEPS
    routes = next(r for r in server if r.get("event") == "end")["sent_routes"]
    assert set(routes["1"]) == {"ACTIVATION", "GRADIENT"}  # logits to party 0, cut gradients
    assert set(routes["2"]) == {"GRADIENT"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] is not None
    for rss in summary["rss_mb_per_rank"]:  # the server and parties build their parts
        assert 0 < rss["before_model"] <= rss["model_built_peak"] <= rss["run_peak"], rss


def test_parties_of_different_widths_with_labels_at_party1(data: Path, tmp_path: Path) -> None:
    """Party p's lower network is 64, 32 or 16 wide (scheme.party_options); the server's
    fc2 takes the 112 joined inputs; party 1 holds the labels. Equal to the joined model
    trained in one process."""
    widths = (64, 32, 16)
    options = ", ".join(f"{{hidden: [{w}, 32]}}" for w in widths)
    result = run_mpi(
        PARTIES + 1,
        "train",
        CONFIG,
        f"data.path={data}",
        f"run.dir={tmp_path}",
        f"scheme.party_options=[{options}]",
        "scheme.label_holder=party1",
        *ARGS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_parts(tmp_path, data, "concat", widths)
    routes = next(r for r in _records(tmp_path, 0) if r.get("event") == "end")["sent_routes"]
    assert set(routes["2"]) == {"ACTIVATION", "GRADIENT"}  # logits to party 1
    assert set(routes["1"]) == set(routes["3"]) == {"GRADIENT"}
    assert sum("loss" in r for r in _records(tmp_path, 2)) >= STEPS


def test_party_options_and_label_holder_are_checked(data: Path) -> None:
    base = {"scheme": {"name": "vertical", "clients": PARTIES}, "data": {"path": str(data)}}
    with pytest.raises(ConfigError, match=r"scheme\.party_options: one mapping per party: 3"):
        config_from_dict({**base, "scheme": {**base["scheme"], "party_options": [{}]}})
    with pytest.raises(ConfigError, match=r"scheme\.label_holder: must be server or party<k>"):
        config_from_dict({**base, "scheme": {**base["scheme"], "label_holder": "party3"}})
    bad = {**base["scheme"], "party_options": [{}, {"depth": 2}, {}]}
    with pytest.raises(ConfigError, match=r"scheme\.party_options\[1\]: model\.options\.depth"):
        Layout.of(prepare(config_from_dict({**base, "scheme": bad}), PARTIES + 1))
    shallow = {**base["scheme"], "party_options": [{}, {"hidden": [8]}, {}]}
    with pytest.raises(ConfigError, match=r"scheme\.party_options\[1\]: model\.cuts\[0\]"):
        Layout.of(prepare(config_from_dict({**base, "scheme": shallow}), PARTIES + 1))
    with pytest.raises(ConfigError, match=r"scheme\.party_models: one model name per party: 3"):
        config_from_dict({**base, "scheme": {**base["scheme"], "party_models": ["mlp"]}})
    missing = {**base["scheme"], "party_models": ["mlp", "nowhere.py:net", "mlp"]}
    with pytest.raises(ConfigError, match=r"scheme\.party_models\[1\]: model\.name: cannot"):
        Layout.of(prepare(config_from_dict({**base, "scheme": missing}), PARTIES + 1))


def test_smallest_run_two_digits_halves(dataset, tmp_path: Path) -> None:
    """The smallest vertical run, 3 ranks: the shipped digits config (left and right image
    halves, CNN cut before its pool) learns in 60 steps."""
    digits = dataset("digits", clients=2, partition="vertical")
    result = run_mpi(
        3,
        "train",
        "configs/vertical-digits.yaml",
        f"data.path={digits}",
        f"run.dir={tmp_path}",
        "run.progress=none",
        "train.max_steps=60",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["roles"] == ["server", "client0", "client1"]
    assert summary["steps_per_rank"] == [60, 60, 60]
    assert summary["test_accuracy"] > 0.5  # ten classes: chance is 0.1


def test_join_shapes_are_checked_before_any_traffic(dataset) -> None:
    """Digits left/right halves through the CNN cut before its pool: concat widens the
    server's fc to both parties' channels; sum and mean keep it; unequal shapes are errors."""
    digits = dataset("digits", clients=2, partition="vertical")
    widths = {}
    for join in ("concat", "sum"):
        cfg = config_from_dict(
            {
                "scheme": {"name": "vertical", "clients": 2, "join": join},
                "model": {"name": "cnn", "cuts": ["pool"]},
                "data": {"path": str(digits)},
            }
        )
        layout = Layout.of(prepare(cfg, 3))
        assert layout.cut_shapes == [(32, 8, 4), (32, 8, 4)]
        widths[join] = dict(layout.server_plan)["fc"]().in_features
    assert widths == {"concat": 2 * 32 * 16, "sum": 32 * 16}
    with pytest.raises(ConfigError, match="scheme.join: sum needs equal cut-output shapes"):
        joined_shape("sum", [(64,), (32,)])
    with pytest.raises(ConfigError, match="scheme.join: concat needs"):
        joined_shape("concat", [(32, 8, 4), (32, 8, 8)])


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_microbatches_in_either_schedule_equal_the_whole_batch(
    schedule: str, data: Path, tmp_path: Path
) -> None:
    """Four microbatches per step, in the order of ``transport.schedule`` (the server and
    the parties post their cut collectives in that one order); labels at party 1, so the
    logits' point-to-point exchange interleaves with the collectives. The update equals the
    whole batch's: the joined model trained in one process. The parties' leakage figure is
    in the summary."""
    result = run_mpi(
        PARTIES + 1,
        "train",
        CONFIG,
        f"data.path={data}",
        f"run.dir={tmp_path}",
        "transport.microbatches=4",
        f"transport.schedule={schedule}",
        "scheme.label_holder=party1",
        *ARGS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_parts(tmp_path, data, "concat")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < summary["leakage_distance_correlation"] <= 1


def test_cut_collectives_take_the_transport_compression(data: Path, tmp_path: Path) -> None:
    """The collective cut travels in the p2p cut's encoding: fp16 halves the bytes the
    server gathers; int8 quarters them, plus one float32 scale per party and exchange."""
    received = {}
    for compression in ("none", "fp16", "int8"):
        run_dir = tmp_path / compression
        result = run_mpi(
            PARTIES + 1,
            "train",
            CONFIG,
            f"data.path={data}",
            f"run.dir={run_dir}",
            f"transport.compression={compression}",
            "run.progress=none",
            "train.max_steps=5",
            "train.eval_every=0",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        received[compression] = summary["bytes_received_per_rank"][0]
        assert summary["test_accuracy"] is not None
    assert received["fp16"] * 2 == received["none"]
    exchanges = (received["int8"] - received["none"] / 4) / (4 * PARTIES)
    assert exchanges == int(exchanges) and 5 < exchanges < 5 + 200  # steps + test batches


def test_structural_problem_is_one_line_before_launch(data: Path, tmp_path: Path) -> None:
    """A party whose network is too shallow for the cut: found by the spec's check in
    ``engine.prepare`` on every rank, reported once, exit 2, no traceback, no training."""
    result = run_mpi(
        PARTIES + 1,
        "train",
        CONFIG,
        f"data.path={data}",
        f"run.dir={tmp_path}",
        "scheme.party_options=[{}, {hidden: [8]}, {}]",
        *ARGS,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("scheme.party_options[1]: model.cuts[0]") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "metrics-rank0.jsonl").exists()


FACTORY = '''"""A party's bottom and the server's top over the joined cut outputs."""
from collections import OrderedDict

from torch import nn


def bottom(input_shape, width=16):
    return nn.Sequential(nn.Linear(input_shape[0], width), nn.BatchNorm1d(width), nn.ReLU())


def bottom_and_top(input_shape, num_classes, width=16, joined=48, hidden=32):
    return nn.Sequential(OrderedDict(
        bottom=bottom(input_shape, width),
        top=nn.Sequential(nn.Linear(joined, hidden), nn.ReLU(),
                          nn.Linear(hidden, num_classes))))
'''
USER_WIDTHS = (16, 8, 24)


def _user_config(tmp_path: Path, data: Path, widths: tuple[int, ...] = USER_WIDTHS) -> Path:
    """A config in its own folder with the factory file next to it (``nets.py:...``)."""
    folder = tmp_path / "project"
    folder.mkdir(exist_ok=True)
    (folder / "nets.py").write_text(FACTORY)
    options = ", ".join(f"{{width: {w}}}" for w in widths)
    (folder / "vertical.yaml").write_text(
        f"scheme: {{name: vertical, clients: {PARTIES}, join: concat, "
        f"party_options: [{options}]}}\n"
        f"model: {{name: nets.py:bottom_and_top, cuts: [top], options: {{joined: 48}}, "
        f"seed: {SEED}}}\n"
        f"data: {{path: {data}, batch_size: {BATCH}}}\n"
        f"train: {{epochs: 20, optimizer: sgd, lr: {LR}, momentum: {MOMENTUM}, seed: {SEED}, "
        f"max_steps: {STEPS}, eval_every: 0}}\n"
        f"run: {{dir: {tmp_path / 'run'}, progress: none}}\n"
    )
    return folder / "vertical.yaml"


def _user_reference(
    folder: Path, data: Path, party_prefix: str = "bottom."
) -> tuple[list[dict], dict]:
    """The user's unmodified factory in one process: party p's bottom from
    ``bottom_and_top(width=w_p)`` under seed + p, the server's top from
    ``bottom_and_top(joined=48)`` (on the whole feature shape) under the seed; a party's
    weights are named as its part of that model, or with ``party_prefix=""`` as the module
    ``bottom(width=w_p)`` (the same weights: it is built first)."""
    namespace: dict = {}
    exec(compile((folder / "nets.py").read_text(), "nets.py", "exec"), namespace)
    factory = namespace["bottom_and_top"]
    parties = []
    for party, width in enumerate(USER_WIDTHS):
        torch.manual_seed(SEED + party)
        parties.append(factory(input_shape=(10,), num_classes=2, width=width, joined=48).bottom)
    torch.manual_seed(SEED)
    server = factory(input_shape=(30,), num_classes=2, joined=48).top
    params = [p for m in (*parties, server) for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    batches, _ = _aligned_batches(data)
    for _ in range(STEPS):
        *features, labels = next(batches)
        joined = torch.cat(
            [party(batch.features) for party, batch in zip(parties, features, strict=True)], dim=1
        )
        opt.zero_grad()
        nn.functional.cross_entropy(server(joined), labels.labels).backward()
        opt.step()
    return (
        [{f"{party_prefix}{k}": v for k, v in party.state_dict().items()} for party in parties],
        {f"top.{k}": v for k, v in server.state_dict().items()},
    )


def _assert_user_parts(run_dir: Path, parties: list[dict], server: dict) -> None:
    for rank, expected in enumerate([server, *parties]):
        actual = torch.load(run_dir / f"model-rank{rank}.pt", weights_only=True)
        assert actual.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(
                actual[key], value, rtol=0, atol=1e-5, msg=f"rank {rank} {key}"
            )


def test_user_factories_equal_the_joined_model_in_one_process(data: Path, tmp_path: Path) -> None:
    """Issue #13's vertical acceptance: each party's bottom (Linear, BatchNorm, ReLU; 16, 8
    and 24 wide) and the server's top come from the user's own factory file; trained under
    mpiexec, every part equals the joined model trained in one process, keeping the user's
    parameter names, and the parties' leakage figure is reported."""
    config = _user_config(tmp_path, data)
    result = run_mpi(PARTIES + 1, "train", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_user_parts(tmp_path / "run", *_user_reference(config.parent, data))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps_per_rank"] == [STEPS] * (PARTIES + 1)
    assert 0 < summary["leakage_distance_correlation"] <= 1


def test_user_factory_top_must_take_the_joined_width(data: Path, tmp_path: Path) -> None:
    """Parties 16 + 8 + 16 wide make 40 joined inputs; the user's top takes 48: a config
    error before any traffic, naming what to change."""
    cfg = load_config(_user_config(tmp_path, data, (16, 8, 16)), [])
    with pytest.raises(
        ConfigError,
        match=r"cannot take the joined cut outputs of shape "
        r"\(40,\) \(the server's part is built from "
        r"model.options",
    ):
        prepare(cfg, PARTIES + 1)


PARTY_SCRIPT = """
import sys
import mpisplit
sys.path.insert(0, sys.argv[2])
from nets import bottom, bottom_and_top


def party(width):
    def net(input_shape):
        return bottom(input_shape, width)
    return net


mpisplit.train(sys.argv[1], factory=bottom_and_top,
               party_factories=[party(16), party(8), party(24)],
               scheme={"party_options": []}, run={"dir": sys.argv[3]})
"""


def test_party_factories_from_python_and_the_cli_equal_the_joined_model(
    data: Path, tmp_path: Path
) -> None:
    """Each party its own factory (``scheme.party_models``): from a script as three Python
    closures (``mpisplit.train(party_factories=...)``, the server's ``factory`` a function),
    and from the CLI as ``nets.py:bottom`` per party with its width in ``party_options``;
    both runs equal the joined model trained in one process at 1e-5, each party's weights
    named as in its own module."""
    config = _user_config(tmp_path, data)
    (tmp_path / "script.py").write_text(PARTY_SCRIPT)
    found = mpi_launcher()
    script = [sys.executable, str(tmp_path / "script.py"), str(config), str(config.parent)]
    result = subprocess.run(
        found.command(PARTIES + 1, [*script, str(tmp_path / "api")]),
        capture_output=True,
        text=True,
        env=found.environment({**os.environ, "OMP_NUM_THREADS": "1"}),
        cwd=ROOT,
        timeout=MPIEXEC_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cli_config = config.with_name("parties.yaml")
    cli_config.write_text(
        config.read_text().replace(
            "party_options:",
            "party_models: [nets.py:bottom, nets.py:bottom, nets.py:bottom], party_options:",
        )
    )
    cli = run_mpi(PARTIES + 1, "train", str(cli_config), f"run.dir={tmp_path / 'cli'}")
    assert cli.returncode == 0, cli.stderr[-3000:]
    parties, server = _user_reference(config.parent, data, party_prefix="")
    _assert_user_parts(tmp_path / "api", parties, server)
    _assert_user_parts(tmp_path / "cli", parties, server)
