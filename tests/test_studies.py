"""Studies: per-client random streams, shard selection and pooling, sampled evaluation, and
the ``sweep`` / ``results`` commands (pure logic in-process; one small grid end to end)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mpisplit.config import Config, ConfigError, TrainConfig, config_from_dict, load_config
from mpisplit.data import PooledReader, ShardReader, shard_path
from mpisplit.engine import select_clients
from mpisplit.schemes.averaging import averaged_tensors
from mpisplit.schemes.splitfed import _average_copies
from mpisplit.schemes.turns import evaluating_clients
from mpisplit.seeds import Stream, derive
from mpisplit.segment import Segment
from mpisplit.sweep import SweepError, finished, load_sweep
from tests.conftest import ROOT, mpiexec, run_mpi

STUDY = ROOT / "studies" / "sites-digits.yaml"


def test_client_streams_are_independent_of_neighbouring_seeds() -> None:
    # client k + 1 under seed s used to read in client k's order under seed s + 1
    assert derive(0, Stream.DATA, 1) != derive(1, Stream.DATA, 0)
    seeds = {
        derive(seed, stream, client)
        for seed in range(4)
        for stream in Stream
        for client in range(8)
    }
    assert len(seeds) == 4 * len(Stream) * 8
    assert derive(3, Stream.NOISE, 2) == derive(3, Stream.NOISE, 2)


def _config(**sections: dict) -> Config:
    return config_from_dict(sections)


def test_shard_selection_sees_only_the_chosen_shards() -> None:
    meta = {"clients": 4, "partition": "iid", "train_samples": [10, 11, 12, 13]}
    cfg = _config(scheme={"name": "centralized", "clients": 2}, data={"clients": [3, 1]})
    assert select_clients(meta, cfg) == {
        **meta,
        "clients": 2,
        "shards": [3, 1],
        "train_samples": [13, 11],
    }
    assert select_clients(meta, _config(scheme={"clients": 4}))["shards"] == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="data.clients: .* has client shards 0..3"):
        select_clients(meta, _config(scheme={"clients": 1}, data={"clients": [4]}))
    with pytest.raises(ConfigError, match="scheme.clients: 3 clients, but"):
        select_clients(meta, _config(scheme={"clients": 3}))


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"scheme": {"clients": 2}, "data": {"clients": [0]}}, "data.clients: selects 1"),
        ({"scheme": {"clients": 1}, "data": {"clients": [0, 0]}}, "must be >= 0 and distinct"),
        ({"scheme": {"name": "vanilla"}, "data": {"pool": True}}, "data.pool: pools the shards"),
        (
            {"scheme": {"clients": 2, "client_order": "sequential"}, "train": {"eval_clients": 1}},
            "train.eval_clients: samples",
        ),
        ({"scheme": {"clients": 2}, "train": {"eval_clients": 3}}, "3 evaluating clients"),
    ],
)
def test_study_keys_are_validated(sections: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**sections)


def test_sampled_evaluators_are_fixed_by_the_seed() -> None:
    assert evaluating_clients(TrainConfig(), 5) == [0, 1, 2, 3, 4]
    chosen = evaluating_clients(TrainConfig(eval_clients=3, seed=7), 100)
    assert len(chosen) == 3 == len(set(chosen)) and chosen == sorted(chosen)
    assert chosen == evaluating_clients(TrainConfig(eval_clients=3, seed=7), 100)
    assert chosen != evaluating_clients(TrainConfig(eval_clients=3, seed=8), 100)


def test_pooled_reader_mixes_every_row_once_per_epoch(dataset) -> None:
    data = dataset("breast_cancer", clients=3)
    paths = [shard_path(data, "client", k) for k in range(3)]
    sizes = []
    for path in paths:
        with ShardReader(path, batch_size=8, prefetch=0) as reader:
            sizes.append(reader.num_samples)
    with (
        PooledReader(paths, batch_size=16, seed=5, prefetch=1) as pool,
        PooledReader(paths, batch_size=16, seed=5, prefetch=0) as same,
    ):
        assert pool.num_samples == sum(sizes) and len(pool) == -(-sum(sizes) // 16)
        stream = pool.epochs(0)
        epochs = [[next(stream) for _ in range(len(pool))] for _ in range(2)]
        again = same.epochs(1, skip=2)
        assert torch.equal(next(again).ids, epochs[1][2].ids)
    for batches in epochs:
        ids = torch.cat([b.ids for b in batches])
        assert sorted(ids.tolist()) == sorted(set(ids.tolist())) and len(ids) == sum(sizes)
    assert not torch.equal(epochs[0][0].ids, epochs[1][0].ids)
    # a batch mixes the shards (IID shards of one table: ids of all three in one batch)
    owners = [_owner(paths, int(i)) for i in epochs[0][0].ids]
    assert len(set(owners)) > 1


def _owner(paths: list[Path], row_id: int) -> int:
    import h5py

    return next(
        k
        for k, path in enumerate(paths)
        if row_id in set(h5py.File(path, "r")["ids"][...].tolist())
    )


def _bn_copies() -> list[Segment]:
    copies = []
    for k in range(2):
        torch.manual_seed(k)
        module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        module[1].running_mean.fill_(float(k + 1))
        module[1].num_batches_tracked.fill_(k + 5)
        copies.append(Segment.create(module, TrainConfig(), 1))
    return copies


def test_buffer_averaging_is_a_choice() -> None:
    module = _bn_copies()[0].module
    assert len(averaged_tensors(module, buffers=False)) == len(list(module.parameters()))
    with_buffers = averaged_tensors(module, buffers=True)
    assert any(t is module[1].running_mean for t in with_buffers)
    assert not any(t is module[1].num_batches_tracked for t in with_buffers)

    averaged = _bn_copies()
    _average_copies(averaged, [0.25, 0.75], buffers=True)
    local = _bn_copies()
    _average_copies(local, [0.25, 0.75], buffers=False)
    for copy in averaged:
        torch.testing.assert_close(copy.module[1].running_mean, torch.full((2,), 1.75))
    assert [c.module[1].running_mean[0].item() for c in local] == [1.0, 2.0]
    assert [c.module[1].num_batches_tracked.item() for c in averaged] == [5, 6]
    torch.testing.assert_close(local[0].module[0].weight, local[1].module[0].weight)
    torch.testing.assert_close(local[0].module[0].weight, averaged[0].module[0].weight)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


SMALL = """\
config: configs/vanilla-breast-cancer.yaml
out: {out}
prepare: {{dataset: breast_cancer, clients: "${{k}}", out: "{data}/bc-${{k}}c"}}
overrides:
  scheme.clients: ${{k}}
  train.max_steps: 6
  run.progress: none
  run.save_model: false
axes:
  arm:
    split: {{}}
    alone: {{scheme.name: centralized, scheme.clients: 1, data.clients: [0]}}
  k: [2]
  train.seed: [0, 1]
"""


def test_sweep_file_expands_to_validated_points(tmp_path: Path) -> None:
    sweep = load_sweep(_write(tmp_path / "s.yaml", SMALL.format(out=tmp_path / "o", data=tmp_path)))
    assert [p.name for p in sweep.points] == [
        "arm-split_k-2_seed-0",
        "arm-split_k-2_seed-1",
        "arm-alone_k-2_seed-0",
        "arm-alone_k-2_seed-1",
    ]
    split, alone = sweep.points[0], sweep.points[2]
    assert (split.world_size, alone.world_size) == (3, 1)
    assert split.values == {"arm": "split", "k": 2, "train.seed": 0}
    assert split.prepare == {"dataset": "breast_cancer", "clients": 2, "out": f"{tmp_path}/bc-2c"}
    cfg = load_config(ROOT / sweep.config, alone.overrides)
    assert (cfg.scheme.name, cfg.scheme.clients, cfg.data.clients) == ("centralized", 1, (0,))
    assert cfg.data.path == f"{tmp_path}/bc-2c" and cfg.run.dir == str(alone.dir)
    assert alone.dir == tmp_path / "o" / "arm-alone_k-2_seed-0"
    assert split.config == alone.config == Path("configs/vanilla-breast-cancer.yaml")


def test_a_variant_may_choose_its_base_config(tmp_path: Path) -> None:
    text = (
        "config: configs/vanilla-breast-cancer.yaml\nout: o\naxes:\n  row:\n"
        "    split: {}\n    fedavg: {config: configs/fedavg-breast-cancer.yaml, "
        "scheme.clients: 2}\n"
    )
    split, fedavg = load_sweep(_write(tmp_path / "s.yaml", text)).points
    assert fedavg.config == Path("configs/fedavg-breast-cancer.yaml")
    assert (split.world_size, fedavg.world_size) == (4, 2)
    assert "scheme.clients=2" in fedavg.overrides and not any(
        o.startswith("config=") for o in fedavg.overrides
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("config: a.yaml\nout: o\naxes: {train.seed: [0]}\nextra: 1\n", "unknown key extra"),
        ("config: a.yaml\nout: o\n", "'axes' is required"),
        (
            "config: configs/vanilla-breast-cancer.yaml\nout: o\naxes: {train.seed: 3}\n",
            "axes: train.seed: expected a non-empty list",
        ),
        (
            "config: configs/vanilla-breast-cancer.yaml\nout: o\naxes: {train.seeds: [1]}\n",
            "point seeds-1: train.seeds: unknown key",
        ),
        (
            "config: configs/vanilla-breast-cancer.yaml\nout: o\naxes: {train.seed: [1]}\n"
            "overrides: {data.path: 'd-${n}'}\n",
            r"template \$\{n\}: no axis named n",
        ),
    ],
)
def test_bad_sweep_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SweepError, match=message):
        load_sweep(_write(tmp_path / "s.yaml", text))


def test_finished_means_a_summary_of_a_run_that_ended(tmp_path: Path) -> None:
    assert not finished(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"preempted": True}))
    assert not finished(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"test_accuracy": 0.5}))
    assert finished(tmp_path)


@pytest.mark.parametrize("study", sorted((ROOT / "studies").glob("*.yaml")), ids=str)
def test_shipped_studies_validate(study: Path) -> None:
    """Every point of every shipped sweep file loads and validates (the runs themselves
    take minutes to an hour: README, Studies)."""
    result = _cli("sweep", str(study.relative_to(ROOT)), "--list")
    assert result.returncode == 0, result.stderr
    if study == STUDY:
        assert len(result.stdout.splitlines()) == 3 * 4 * 3
        assert "arm-split_sites-16_seed-2  17 ranks" in result.stdout


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(mpiexec()).parent}{os.pathsep}{os.environ['PATH']}",
    }
    return subprocess.run(
        [sys.executable, "-m", "mpisplit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.timeout(600)  # five runs and three CLI start-ups: 267 s at load average 20-30
def test_sweep_runs_resumes_and_results_tabulate(tmp_path: Path) -> None:
    out = tmp_path / "o"
    sweep_file = _write(tmp_path / "s.yaml", SMALL.format(out=out, data=tmp_path))
    first = _cli("sweep", str(sweep_file), timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count("test accuracy") == 4 and "prepared" in first.stdout
    summaries = {
        p.name: json.loads((p / "summary.json").read_text()) for p in out.iterdir() if p.is_dir()
    }
    assert len(summaries) == 4

    again_dir = out / "arm-split_k-2_seed-1"
    (again_dir / "summary.json").unlink()  # as if the run had died before its summary
    again = _cli("sweep", str(sweep_file), timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("finished before, skipped") == 3
    assert again.stdout.count("test accuracy") == 1
    assert (out / "arm-split_k-2_seed-1.failed-1" / "metrics-rank0.jsonl").exists()

    table = _cli(
        "results",
        str(out),
        "--csv",
        str(tmp_path / "t.csv"),
        "--plot",
        str(tmp_path / "t.png"),
        "--x",
        "arm",
    )
    assert table.returncode == 0, table.stderr
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert [(r["arm"], r["k"], r["runs"]) for r in rows] == [
        ("alone", "2", "2"),
        ("split", "2", "2"),
    ]
    summaries["arm-split_k-2_seed-1"] = json.loads((again_dir / "summary.json").read_text())
    for row in rows:
        accuracies = [summaries[f"arm-{row['arm']}_k-2_seed-{s}"]["test_accuracy"] for s in (0, 1)]
        assert float(row["test_accuracy_mean"]) == pytest.approx(np.mean(accuracies))
        assert float(row["test_accuracy_min"]) == pytest.approx(min(accuracies))
        assert float(row["test_accuracy_max"]) == pytest.approx(max(accuracies))
    assert (tmp_path / "t.png").stat().st_size > 0
    assert "alone" in table.stdout and "test_accuracy mean" in table.stdout


def test_slurm_arrays_group_points_by_rank_count(tmp_path: Path) -> None:
    sweep_file = _write(tmp_path / "s.yaml", SMALL.format(out=tmp_path / "o", data=tmp_path))
    result = _cli("sweep", str(sweep_file), "--slurm")
    assert result.returncode == 0, result.stderr
    scripts = sorted((tmp_path / "o" / "slurm").glob("*.sbatch"))
    assert [s.name for s in scripts] == ["ntasks-1.sbatch", "ntasks-3.sbatch"]
    text = scripts[1].read_text()
    assert "#SBATCH --ntasks=3" in text and "#SBATCH --array=0-1" in text
    assert "arm-split_k-2_seed-1" in text and "arm-alone" not in text
    args = (tmp_path / "o" / "arm-split_k-2_seed-1" / "args").read_text().splitlines()
    assert args[0] == "configs/vanilla-breast-cancer.yaml" and "train.seed=1" in args
    assert subprocess.run(["bash", "-n", str(scripts[1])]).returncode == 0


def test_only_the_sampled_clients_evaluate(dataset, tmp_path: Path) -> None:
    data = dataset("breast_cancer", clients=3)
    result = run_mpi(
        4,
        "train",
        "configs/vanilla-breast-cancer.yaml",
        f"data.path={data}",
        f"run.dir={tmp_path}",
        "run.progress=none",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.eval_clients=2",
        "train.seed=3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = evaluating_clients(TrainConfig(eval_clients=2, seed=3), 3)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(e["client"] for e in summary["test_by_client"]) == chosen
    records = [json.loads(line) for line in (tmp_path / "metrics-rank0.jsonl").open()]
    evaluated = [(r["client"], r["step"]) for r in records if r.get("event") == "eval"]
    assert sorted(evaluated) == sorted((k, s) for k in chosen for s in (2, 4))


@pytest.mark.parametrize(
    ("override", "shards"),
    [
        ("'data.clients=[0]' run.dir=runs/site0-digits", [0]),
        ("data.pool=true run.dir=runs/pooled-digits", [0, 1]),
    ],
)
def test_readme_baseline_commands(
    dataset, tmp_path: Path, override: str, shards: list[int]
) -> None:
    """README, Studies: one site alone and the pooled run, as written (in a directory with
    the checkout's configs and data/digits-2c)."""
    data = dataset("digits", clients=2)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits-2c").symlink_to(data)
    command = (
        f"mpiexec -n 1 mpisplit train configs/centralized-digits.yaml "
        f"{'scheme.clients=1 ' if shards == [0] else ''}{override}"
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = override.rpartition("run.dir=")[2]
    summary = json.loads((tmp_path / run_dir / "summary.json").read_text())
    meta = json.loads((data / "meta.json").read_text())
    epochs = load_config(ROOT / "configs/centralized-digits.yaml").train.epochs
    assert summary["train_samples"] == epochs * sum(meta["train_samples"][k] for k in shards)


def test_results_group_plain_run_directories_by_the_config_keys_that_differ(tmp_path: Path) -> None:
    from mpisplit.results import find_runs, swept_keys, table

    for name, scheme, seed, accuracy in [
        ("a", "vanilla", 0, 0.5),
        ("b", "vanilla", 1, 0.7),
        ("c", "splitfed", 0, 0.9),
    ]:
        run = tmp_path / name
        run.mkdir()
        cfg = {"scheme": {"name": scheme}, "train": {"seed": seed}, "run": {"dir": str(run)}}
        (run / "config.yaml").write_text(json.dumps(cfg))
        (run / "summary.json").write_text(json.dumps({"test_accuracy": accuracy}))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "summary.json").write_text(json.dumps({"preempted": True}))
    runs, skipped = find_runs([tmp_path])
    assert skipped == 1
    keys, runs = swept_keys(runs)
    assert keys == ["scheme.name", "train.seed"]
    rows = table(runs, ["scheme.name"], ["test_accuracy"])
    assert [(r.key, r.runs) for r in rows] == [(("splitfed",), 1), (("vanilla",), 2)]
    assert rows[1].stats["test_accuracy"] == pytest.approx((0.6, 0.5, 0.7))


def test_bad_sweep_is_one_line_and_status_2(tmp_path: Path) -> None:
    sweep_file = _write(
        tmp_path / "s.yaml",
        "config: configs/vanilla-breast-cancer.yaml\nout: o\naxes: {scheme.clients: [0]}\n",
    )
    result = _cli("sweep", str(sweep_file))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mpisplit: point clients-0: scheme.clients: must be >= 1, got 0"
    ]
    assert not (ROOT / "o").exists()
