"""Fuzzing the real entry point with malformed configs and damaged HDF5 files.

Every case must end with a clear one-line error (exit status 2 for bad input, 3 for a failure
found while running) or run cleanly: never a hang, never a bare traceback. The runs use the
one-rank centralized scheme in-process (``mpisplit.cli.main``), so hundreds of cases fit in CI.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mpisplit.checkpoint import MANIFEST, agree_on_resume_point, find_resume_point, resume_settings
from mpisplit.cli import _resuming, main
from mpisplit.config import ConfigError, load_config
from mpisplit.topology import plan

CASES = 200
SECTIONS = {
    "scheme": ["name", "clients", "client_order", "turn_steps"],
    "model": ["name", "cuts", "options", "seed"],
    "data": ["path", "batch_size", "prefetch", "shuffle"],
    "train": [
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "schedule",
        "step_size",
        "gamma",
        "seed",
        "eval_every",
    ],
    "transport": ["timeout_s", "device"],
    "run": ["log_every", "progress", "trace", "save_model"],
}
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-3, 9), st.text(max_size=5)), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.sampled_from(
        [
            "vanilla",
            "centralized",
            "sgd",
            "adam",
            "mlp",
            "cnn",
            "fc2",
            "cpu",
            "cuda",
            "sequential",
            "auto",
            "bar",
            "fc1",
            "head",
            "relu1",
        ]
    ),
)
SETTINGS = settings(
    max_examples=CASES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _base(data: Path, run_dir: Path) -> dict:
    return {
        "scheme": {"name": "centralized", "clients": 3},
        "model": {"name": "mlp", "cuts": ["fc2"]},
        "data": {"path": str(data), "batch_size": 32, "prefetch": 1},
        "train": {"epochs": 1, "max_steps": 2},
        "run": {"dir": str(run_dir), "progress": "none"},
    }


def _run(config: dict | str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    try:
        status = main(["train", "--overwrite", str(path)])
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status in (0, 2, 3), err
    assert "Traceback" not in err, err
    if status:
        lines = [line for line in err.splitlines() if line.startswith("mpisplit:")]
        assert len(lines) == 1, err


@given(
    mutations=st.lists(
        st.tuples(
            st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=6)),
            st.text(max_size=8),
            VALUES,
            st.booleans(),
        ),
        min_size=1,
        max_size=3,
    )
)
@SETTINGS
def test_malformed_configs(mutations, dataset, tmp_path: Path, capsys) -> None:
    config = _base(dataset("breast_cancer", clients=3), tmp_path / "run")
    for section, key, value, known_key in mutations:
        if known_key and section in SECTIONS:
            key = SECTIONS[section][len(key) % len(SECTIONS[section])]
        assume(not (section == "train" and key in ("epochs", "max_steps")))
        if isinstance(config.get(section), dict):
            config[section][key] = value
        else:
            config[section] = value
    _run(config, tmp_path, capsys)


@given(text=st.text(max_size=200))
@SETTINGS
def test_garbage_yaml(text: str, tmp_path: Path, capsys) -> None:
    _run(text, tmp_path, capsys)


DAMAGES = [
    "truncate",
    "flip_bytes",
    "drop_dataset",
    "wrong_dtype",
    "wrong_shape",
    "nan",
    "inf",
    "empty_file",
    "meta_garbage",
    "meta_missing_key",
    "short_ids",
    "labels_out_of_range",
]


@given(
    damage=st.sampled_from(DAMAGES),
    target=st.sampled_from(["client-1.h5", "test.h5"]),
    where=st.floats(0.0, 1.0),
    field=st.sampled_from(["features", "labels", "ids"]),
)
@settings(
    max_examples=CASES // 2,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_damaged_data(damage, target, where, field, dataset, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(dataset("breast_cancer", clients=3), data)
    _damage(data, damage, data / target, where, field)
    _run(_base(data, tmp_path / "run"), tmp_path, capsys)


def _damage(root: Path, damage: str, path: Path, where: float, field: str) -> None:
    if damage == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * where)])
    elif damage == "flip_bytes":
        raw = bytearray(path.read_bytes())
        start = int((len(raw) - 64) * where)
        raw[start : start + 64] = bytes(255 - b for b in raw[start : start + 64])
        path.write_bytes(bytes(raw))
    elif damage == "empty_file":
        path.write_bytes(b"")
    elif damage == "meta_garbage":
        (root / "meta.json").write_text("{not json")
    elif damage == "meta_missing_key":
        meta = json.loads((root / "meta.json").read_text())
        del meta["num_classes"]
        (root / "meta.json").write_text(json.dumps(meta))
    else:
        with h5py.File(path, "r+") as shard:
            values = shard[field][()]
            rows = len(values)
            if damage == "drop_dataset":
                del shard[field]
            elif damage == "wrong_dtype":
                del shard[field]
                shard[field] = values.astype(np.int8 if field != "labels" else np.float32)
            elif damage == "wrong_shape":
                del shard[field]
                shard[field] = np.zeros((rows, 3), values.dtype)
            elif damage == "short_ids":
                del shard["ids"]
                shard["ids"] = np.arange(rows // 2, dtype=np.int64)
            elif damage == "labels_out_of_range":
                shard["labels"][int((rows - 1) * where)] = 7
            else:
                features = shard["features"]
                features[int((rows - 1) * where), 0] = np.nan if damage == "nan" else np.inf


# --- the hostile cases of issue 18, one by one: each failed (a traceback, a wrong success or
# a misleading message) before it was handled -------------------------------------------------


def _train(config: dict | str | bytes, tmp_path: Path, capsys, *flags: str) -> tuple[int, str]:
    """``mpisplit train`` in-process; returns (exit status, the one ``mpisplit:`` line)."""
    path = tmp_path / "case.yaml"
    if isinstance(config, bytes):
        path.write_bytes(config)
    else:
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    try:
        status = main(["train", *flags, str(path)])
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mpisplit:")]
    assert len(lines) == (1 if status else 0), err
    return status, lines[0] if lines else ""


BASE_YAML = """\
scheme: {{name: centralized, clients: 3}}
data: {{path: {data}, batch_size: 32, prefetch: 1}}
train: {{epochs: 1, max_steps: 2, lr: 0.05}}
run: {{dir: {run}, progress: none}}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {epochs: 1, max_steps: 2, lr: 0.05, lr: 500}", "key 'lr' appears twice"),
        ("train: {epochs: 2}\ntrain: {epochs: 1}", "key 'train' appears twice"),
        ("model:\n  options:\n    hidden: [8]\n    hidden: [16]", "key 'hidden' appears twice"),
    ],
)
def test_duplicate_yaml_keys_are_an_error(
    text: str, message: str, dataset, tmp_path: Path, capsys
) -> None:
    """PyYAML keeps the last of two equal keys: a second ``lr: 500`` or ``train:`` section
    would silently win."""
    config = BASE_YAML.format(data=dataset("breast_cancer", clients=3), run=tmp_path / "run")
    status, line = _train(
        config.replace("train: {epochs: 1, max_steps: 2, lr: 0.05}", text), tmp_path, capsys
    )
    assert status == 2 and message in line, line


def test_duplicate_key_in_an_override_is_an_error(dataset, tmp_path: Path, capsys) -> None:
    config = BASE_YAML.format(data=dataset("breast_cancer", clients=3), run=tmp_path / "run")
    (tmp_path / "c.yaml").write_text(config)
    assert (
        main(["train", str(tmp_path / "c.yaml"), "model.options={hidden: [8], hidden: [4]}"]) == 2
    )
    assert "appears twice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"train: {lr: 0.05}\n# caf\xe9\n", "is not UTF-8 text"),
        (b"", "is empty"),
        (b"# only a comment\n", "is empty"),
    ],
)
def test_unreadable_or_empty_config_files(raw: bytes, message: str, tmp_path: Path, capsys) -> None:
    status, line = _train(raw, tmp_path, capsys)
    assert status == 2 and message in line, line


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.epochs=100000000000000000000",
            "train.epochs: 100000000000000000000 is out of range",
        ),
        ("data.batch_size=" + "9" * 400, "data.batch_size: 99999999999999999999...99999999 (400"),
        ("train.lr=" + "1" + "0" * 400, "train.lr: 1000"),
        ("train.lr=.inf", "train.lr: must be a finite number, got inf"),
        ("train.momentum=-.inf", "train.momentum: must be a finite number"),
        ("transport.timeout_s=.inf", "transport.timeout_s: must be a finite number"),
        ("train.lr=.nan", "train.lr: must be a finite number"),
        ("train.seed=-1", "train.seed: must be >= 0"),
        ("model.options={hidden: [0, 32]}", "mlp has a layer with no units (fc1.weight)"),
        ("model.options={hidden: [32, 0]}", "mlp has a layer with no units (fc2.weight)"),
        ("model.options={hidden: [-3, 32]}", "model.options: mlp rejected them"),
        ("model.options={hidden: [a]}", "model.options: mlp rejected them"),
    ],
)
def test_impossible_numbers_are_config_errors(
    override: str, message: str, dataset, tmp_path: Path, capsys
) -> None:
    """Huge integers (OverflowError), infinities (a NaN loss at step 2), negative widths (a
    torch error mid-run) and zero widths (trained to the majority class, exit 0)."""
    config = BASE_YAML.format(data=dataset("breast_cancer", clients=3), run=tmp_path / "run")
    (tmp_path / "c.yaml").write_text(config)
    try:
        status = main(["train", str(tmp_path / "c.yaml"), override])
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err, err
    assert err.count("mpisplit:") == 1, err
    assert not (tmp_path / "run" / "metrics-rank0.jsonl").exists()


def _copy(dataset, tmp_path: Path, **options: object) -> Path:
    data = tmp_path / "data"
    shutil.copytree(dataset("breast_cancer", clients=3, **options), data)
    return data


def _rewrite(path: Path, rows: int | None = None, columns: int | None = None) -> None:
    """Replaces a shard by a consistent one (checksums and all) with other rows or columns:
    only ``meta.json`` can tell it is wrong."""
    with h5py.File(path) as shard:
        columns_ = {name: shard[name][()] for name in shard}
        attrs = dict(shard.attrs)
    keep = slice(None if rows is None else rows)
    columns_ = {name: values[keep] for name, values in columns_.items()}
    if columns is not None:
        columns_["features"] = columns_["features"][:, :columns]
        attrs["feature_shape"] = np.array([columns])
    with h5py.File(path, "w") as shard:
        shard.attrs.update(attrs)
        for name, values in columns_.items():
            shard.create_dataset(
                name,
                data=values,
                fletcher32=True,
                chunks=(64, *values.shape[1:]),
                maxshape=(None, *values.shape[1:]),
            )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("fewer_columns", "client-1.h5: features have shape [29] per row, but meta.json says [30]"),
        ("empty_shard", "client-1.h5: 0 rows, but meta.json promises"),
        ("empty_test", "test.h5: 0 rows, but meta.json promises"),
        ("missing_test", "test.h5: shard file not found"),
        ("no_checksum", "client-2.h5: dataset 'features' has no checksum"),
        ("vertical_data", "this dataset is a vertical partition"),
    ],
)
def test_data_disagreeing_with_meta_is_found_before_training(
    damage: str, message: str, dataset, tmp_path: Path, capsys
) -> None:
    """Before: a matmul shape error mid-run; a client that trains on nothing (exit 0); a
    failure in the leakage measure after all training; the missing test set reported by
    every client; a vertical dataset reported as a missing file by every rank."""
    data = _copy(
        dataset, tmp_path, **({"partition": "vertical"} if damage == "vertical_data" else {})
    )
    if damage == "fewer_columns":
        _rewrite(data / "client-1.h5", columns=29)
    elif damage in ("empty_shard", "empty_test"):
        _rewrite(data / ("client-1.h5" if damage == "empty_shard" else "test.h5"), rows=0)
    elif damage == "missing_test":
        (data / "test.h5").unlink()
    elif damage == "no_checksum":
        with h5py.File(data / "client-2.h5", "r+") as shard:
            features = shard["features"][()]
            del shard["features"]
            shard["features"] = features
    status, line = _train(BASE_YAML.format(data=data, run=tmp_path / "run"), tmp_path, capsys)
    assert status == 2 and message in line, line
    assert not (tmp_path / "run" / "metrics-rank0.jsonl").exists()


def test_flipped_feature_bytes_fail_their_checksum(dataset, tmp_path: Path, capsys) -> None:
    """Before: the values silently changed (0.3446 -> -22.05) and the run succeeded."""
    data = _copy(dataset, tmp_path)
    path = data / "client-0.h5"
    with h5py.File(path) as shard:
        offset = shard["features"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 200 : offset + 204] = bytes(255 - b for b in raw[offset + 200 : offset + 204])
    path.write_bytes(bytes(raw))
    status, line = _train(BASE_YAML.format(data=data, run=tmp_path / "run"), tmp_path, capsys)
    assert status == 3 and "client-0.h5: cannot read rows" in line, line
    assert "checksum mismatch" in line
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "client-0.h5" in status["failure"]["error"]
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("where", ["file", "proc", "sys", "read_only"])
def test_unwritable_run_dirs_are_bad_input(where: str, dataset, tmp_path: Path, capsys) -> None:
    """Before: a traceback from mkdir or the first write (four cases)."""
    run_dir = {
        "file": tmp_path / "a-file",
        "proc": Path("/proc/mpisplit-run"),
        "sys": Path("/sys/mpisplit-run"),
        "read_only": tmp_path / "ro" / "run",
    }[where]
    if where == "file":
        run_dir.write_text("not a directory")
    if where == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        run_dir.parent.mkdir()
        run_dir.parent.chmod(0o555)
    if where == "sys" and not Path("/sys").is_dir():
        pytest.skip("no /sys")
    status, line = _train(
        BASE_YAML.format(data=dataset("breast_cancer", clients=3), run=run_dir), tmp_path, capsys
    )
    assert status == 2 and line.startswith("mpisplit: run.dir: ") and str(run_dir) in line, line


def test_a_run_dir_holds_one_run(dataset, tmp_path: Path, capsys) -> None:
    """Before: a rerun with bad data exited 3 but left the old summary.json (a success) and
    old model parts beside the new config and metrics."""
    run_dir = tmp_path / "run"
    config = BASE_YAML.format(data=dataset("breast_cancer", clients=3), run=run_dir)
    assert _train(config, tmp_path, capsys)[0] == 0
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    (run_dir / "model-rank7.pt").write_bytes(b"from a bigger run")  # an older run's part
    (run_dir / "notes.txt").write_text("the user's own file")
    finished = (run_dir / "summary.json").read_text()

    status, line = _train(config, tmp_path, capsys)
    assert status == 2 and "holds another run (finished; " in line and "--overwrite" in line
    assert (run_dir / "summary.json").read_text() == finished  # untouched

    data = _copy(dataset, tmp_path)
    (data / "test.h5").unlink()
    status, line = _train(
        config.replace(str(dataset("breast_cancer", clients=3)), str(data)),
        tmp_path,
        capsys,
        "--overwrite",
    )
    assert status == 2 and "test.h5" in line  # bad input: the old run stays as it was
    assert (run_dir / "summary.json").read_text() == finished

    assert _train(config.replace("lr: 0.05", "lr: 0.1"), tmp_path, capsys, "--overwrite")[0] == 0
    assert not (run_dir / "model-rank7.pt").exists()
    assert (run_dir / "notes.txt").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 0.1
    assert len((run_dir / "metrics-rank0.jsonl").read_text().splitlines()) > 2


def _committed(directory: Path, step: int, settings: dict) -> Path:
    """A committed checkpoint of a vanilla server + 3 clients run, with rank 0's file."""
    path = directory / f"step-{step:08d}"
    path.mkdir(parents=True)
    torch.save({"step": step, "metrics_bytes": 0}, path / "rank-00000.pt")
    (path / MANIFEST).write_text(
        json.dumps(
            {
                "step": step,
                "scheme": "vanilla",
                "roles": ["server", "client0", "client1", "client2"],
                "settings": settings,
            }
        )
    )
    return path


@pytest.mark.parametrize(
    "damage",
    ["manifest_garbage", "manifest_not_an_object", "manifest_missing_key", "rank_file_truncated"],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(
    damage: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Before: four tracebacks from a corrupted COMMITTED manifest (resume, a requeued job,
    a fresh run over it). Now the newest whole checkpoint is used, with one warning line."""
    from mpi4py import MPI

    config = Path(__file__).parent.parent / "configs/vanilla-sequential-breast-cancer.yaml"
    cfg = load_config(config, [f"run.dir={tmp_path}", "checkpoint.every_steps=5"])
    directory = tmp_path / "checkpoints"
    _committed(directory, 5, resume_settings(cfg))
    newest = _committed(directory, 10, resume_settings(cfg))
    if damage == "rank_file_truncated":
        raw = (newest / "rank-00000.pt").read_bytes()
        (newest / "rank-00000.pt").write_bytes(raw[: len(raw) // 2])
    else:
        (newest / MANIFEST).write_text(
            {
                "manifest_garbage": '{"step": 10, "sch',
                "manifest_not_an_object": "[10]",
                "manifest_missing_key": '{"step": 10}',
            }[damage]
        )
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued job looks for a checkpoint
    assert _resuming(SimpleNamespace(resume=False), cfg)
    found = find_resume_point(cfg, plan(cfg), resume=True)
    chosen = agree_on_resume_point(MPI.COMM_WORLD, found)
    assert chosen is not None and chosen.step == 5
    err = capsys.readouterr().err
    assert err.count("mpisplit: warning: step-00000010: ") == 1, err
    assert err.strip().endswith("resuming from step 5"), err
    with pytest.raises(ConfigError, match="already holds a committed checkpoint"):
        find_resume_point(cfg, plan(cfg), resume=False)  # a fresh run over it: an error

    (directory / "step-00000005" / MANIFEST).write_text("")
    with pytest.raises(ConfigError, match="no whole checkpoint|no committed checkpoint"):
        agree_on_resume_point(MPI.COMM_WORLD, find_resume_point(cfg, plan(cfg), resume=True))
