"""Tests for dataset preparation (mpisplit.prepare) and the shard reader (mpisplit.data)."""

from __future__ import annotations

import argparse
import contextlib
import math
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import LogisticRegression

from mpisplit import prepare
from mpisplit.data import (
    Batch,
    DataError,
    ShardReader,
    align_rows,
    intersect_ids,
    read_ids,
    read_meta,
    shard_path,
)
from mpisplit.prepare import PrepareSpec, add_prepare_arguments, prepare_dataset, spec_from_args


def write_shard(
    path: Path,
    rows: int = 103,
    *,
    features_dtype: type = np.float32,
    labels: bool = True,
    feature_shape: tuple[int, ...] = (3,),
) -> Path:
    """A hand-made shard whose features equal its ids, so reordering mistakes show."""
    ids = np.arange(rows, dtype=np.int64) * 10
    with h5py.File(path, "w") as file:
        put(file, "features", np.repeat(ids[:, None], 3, axis=1).astype(features_dtype))
        put(file, "ids", ids)
        if labels:
            put(file, "labels", ids % 2)
        set_attrs(file, feature_shape)
    return path


def put(file: h5py.File, name: str, values: np.ndarray) -> None:
    """A dataset with the checksum readers require (as the shard writer makes them)."""
    file.create_dataset(name, data=values, fletcher32=True)


def set_attrs(file: h5py.File, feature_shape: tuple[int, ...]) -> None:
    file.attrs["dataset"] = "handmade"
    file.attrs["num_classes"] = 2
    file.attrs["feature_shape"] = np.asarray(feature_shape, dtype=np.int64)
    file.attrs["schema_version"] = 1


def collect(reader: ShardReader, epoch: int = 0) -> list[Batch]:
    return list(reader.epoch(epoch))


def load(path: Path, field: str) -> np.ndarray:
    with h5py.File(path, "r") as file:
        return file[field][...]


# --- prepare: horizontal ---------------------------------------------------------------------


def test_breast_cancer_iid_three_clients(tmp_path: Path) -> None:
    root = prepare_dataset(PrepareSpec(dataset="breast_cancer", out=tmp_path / "bc", clients=3))
    meta = read_meta(root)
    assert meta["feature_shape"] == [30] and meta["num_classes"] == 2
    assert meta["partition"] == "iid" and meta["alpha"] is None and meta["clients"] == 3
    sizes = meta["train_samples"]
    assert max(sizes) - min(sizes) <= 1
    assert meta["test_samples"] == math.ceil(0.2 * 569) and sum(sizes) == 569 - 114

    client_ids = [read_ids(shard_path(root, "client", k)) for k in range(3)]
    assert [len(ids) for ids in client_ids] == sizes
    train_ids = np.concatenate(client_ids)
    test_ids = read_ids(shard_path(root, "client", test=True))
    assert len(np.unique(train_ids)) == len(train_ids), "clients share ids"
    assert np.intersect1d(train_ids, test_ids).size == 0, "test set leaks into training"
    assert np.array_equal(np.sort(np.concatenate([train_ids, test_ids])), np.arange(569))
    assert not np.array_equal(client_ids[0], np.sort(client_ids[0])), "shard rows not shuffled"

    raw = load_breast_cancer()
    for k, ids in enumerate(client_ids):  # each site standardized by its own rows only
        own = (raw.data[ids] - raw.data[ids].mean(0)) / raw.data[ids].std(0)
        assert np.allclose(load(shard_path(root, "client", k), "features"), own, atol=1e-5)
    expected = (raw.data[test_ids] - raw.data[test_ids].mean(0)) / raw.data[test_ids].std(0)
    test_path = shard_path(root, "client", test=True)
    assert np.allclose(load(test_path, "features"), expected, atol=1e-5)
    assert np.array_equal(load(test_path, "labels"), raw.target[test_ids])
    assert abs(raw.target[test_ids].mean() - raw.target.mean()) < 0.01, "split not stratified"


def positive_fractions(root: Path, clients: int) -> np.ndarray:
    return np.array([load(shard_path(root, "client", k), "labels").mean() for k in range(clients)])


def test_dirichlet_skews_labels_deterministically(tmp_path: Path) -> None:
    def make(name: str, partition: str, seed: int = 0) -> Path:
        spec = PrepareSpec(
            dataset="breast_cancer",
            out=tmp_path / name,
            clients=5,
            partition=partition,
            alpha=0.1,
            seed=seed,
        )
        return prepare_dataset(spec)

    skewed, iid = make("dir", "dirichlet"), make("iid", "iid")
    assert np.ptp(positive_fractions(skewed, 5)) > 0.3
    assert np.ptp(positive_fractions(iid, 5)) < 0.25
    assert read_meta(skewed)["alpha"] == 0.1
    assert min(read_meta(skewed)["train_samples"]) >= 1

    again, other = make("dir-again", "dirichlet"), make("dir-seed", "dirichlet", seed=1)
    same = [
        np.array_equal(
            read_ids(shard_path(skewed, "client", k)), read_ids(shard_path(root, "client", k))
        )
        for root in (again, other)
        for k in range(5)
    ]
    assert all(same[:5]) and not all(same[5:])


def test_test_set_depends_only_on_the_seed(tmp_path: Path) -> None:
    def test_ids(name: str, **options: object) -> np.ndarray:
        spec = PrepareSpec(dataset="breast_cancer", out=tmp_path / name, **options)
        root = prepare_dataset(spec)
        kind = "labels" if spec.partition == "vertical" else "client"
        return np.sort(read_ids(shard_path(root, kind, test=True)))

    reference = test_ids("iid", clients=3)
    assert np.array_equal(test_ids("dir", clients=5, partition="dirichlet"), reference)
    assert np.array_equal(test_ids("vertical", partition="vertical"), reference)
    assert not np.array_equal(test_ids("seed", clients=3, seed=1), reference)


def test_digits_are_scaled_images(tmp_path: Path) -> None:
    root = prepare_dataset(PrepareSpec(dataset="digits", out=tmp_path / "digits", clients=2))
    meta = read_meta(root)
    assert meta["feature_shape"] == [1, 8, 8] and meta["num_classes"] == 10
    with ShardReader(shard_path(root, "client", 1), batch_size=50) as reader:
        assert reader.feature_shape == (1, 8, 8)
        batch = next(reader.epoch(0))
    assert batch.features.shape == (50, 1, 8, 8)
    assert batch.features.min() >= 0 and batch.features.max() <= 1
    assert set(load(shard_path(root, "client", 0), "labels")) == set(range(10))


def flat_rows(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """All features (flattened per row) and labels of some shards, for a scikit-learn model."""
    features = np.concatenate([load(path, "features") for path in paths])
    labels = np.concatenate([load(path, "labels") for path in paths])
    return features.reshape(len(features), -1), labels


def test_synthetic_is_generated_in_chunks_exactly_and_learnable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepare, "_GENERATE_BYTES", 4 * 32 * 50)  # 50 rows per chunk
    spec = PrepareSpec(
        dataset="synthetic",
        out=tmp_path / "syn",
        clients=3,
        samples=3001,
        shape=(2, 4, 4),
        classes=3,
    )
    root = prepare_dataset(spec)
    meta = read_meta(root)
    assert meta["feature_shape"] == [2, 4, 4] and meta["num_classes"] == 3
    assert max(meta["train_samples"]) - min(meta["train_samples"]) <= 1
    paths = [shard_path(root, "client", k) for k in range(3)]
    ids = np.concatenate(
        [read_ids(path) for path in [*paths, shard_path(root, "client", test=True)]]
    )
    assert np.array_equal(np.sort(ids), np.arange(3001))

    model = LogisticRegression(max_iter=500).fit(*flat_rows(paths))
    assert model.score(*flat_rows([shard_path(root, "client", test=True)])) > 0.85

    again = prepare_dataset(PrepareSpec(**{**vars(spec), "out": tmp_path / "again"}))
    assert np.array_equal(
        load(paths[2], "features"), load(shard_path(again, "client", 2), "features")
    )


# --- prepare: vertical -----------------------------------------------------------------------


def test_vertical_parties_align_by_id(tmp_path: Path) -> None:
    spec = PrepareSpec(
        dataset="breast_cancer", out=tmp_path / "v", partition="vertical", drop_fraction=0.05
    )
    root = prepare_dataset(spec)
    meta = read_meta(root)
    assert meta["parties"] == ["mean", "se", "worst"] and meta["clients"] == 3
    assert meta["party_feature_shapes"] == [[10], [10], [10]]
    parties = [shard_path(root, "party", p) for p in range(3)]
    labels_path = shard_path(root, "labels")
    party_ids = [read_ids(path) for path in parties]
    label_ids = read_ids(labels_path)
    assert len(label_ids) == 569 - meta["test_samples"]
    assert all(len(ids) == round(0.95 * len(label_ids)) for ids in party_ids), "drop not applied"
    assert not np.array_equal(party_ids[0], party_ids[1]), "same row order"
    with h5py.File(parties[0], "r") as file:
        assert "labels" not in file

    common = intersect_ids([*party_ids, label_ids])
    assert 0 < len(common) < len(party_ids[0])
    files = [(path, ids, ("features",)) for path, ids in zip(parties, party_ids, strict=True)]
    files.append((labels_path, label_ids, ("labels",)))
    with contextlib.ExitStack() as stack:
        readers = [
            stack.enter_context(
                ShardReader(
                    path, batch_size=32, seed=7, fields=fields, rows=align_rows(ids, common)
                )
            )
            for path, ids, fields in files
        ]
        for epoch in (0, 1):
            for batches in zip(*(reader.epoch(epoch) for reader in readers), strict=True):
                for batch in batches[1:]:
                    assert np.array_equal(batch.ids, batches[0].ids)

    raw = load_breast_cancer().data
    own = raw[party_ids[1]]  # the party's own rows of its own columns
    expected = (raw[common] - own.mean(0)) / own.std(0)
    se_rows = align_rows(party_ids[1], common)
    assert np.allclose(load(parties[1], "features")[se_rows], expected[:, 10:20], atol=1e-5)
    test_ids = read_ids(shard_path(root, "labels", test=True))
    assert np.intersect1d(test_ids, label_ids).size == 0
    assert np.isin(read_ids(shard_path(root, "party", 2, test=True)), test_ids).all()


def test_vertical_digits_halves(tmp_path: Path) -> None:
    spec = PrepareSpec(
        dataset="digits", out=tmp_path / "v", partition="vertical", vertical_groups="right"
    )
    root = prepare_dataset(spec)
    assert read_meta(root)["parties"] == ["right"]
    with ShardReader(shard_path(root, "party", 0), batch_size=8, fields=("features",)) as reader:
        batch = next(reader.epoch(0))
    assert reader.feature_shape == (1, 8, 4) and batch.labels is None
    images = load_digits().images[:, None] / 16.0
    assert np.allclose(batch.features.numpy(), images[batch.ids.numpy()][..., 4:])
    with ShardReader(shard_path(root, "labels"), batch_size=8, fields=("labels",)) as reader:
        batch = next(reader.epoch(0))
    assert batch.features.shape == (8, 0) and batch.labels.shape == (8,)


def test_vertical_parties_beyond_the_named_groups_get_contiguous_columns(tmp_path: Path) -> None:
    """Seven breast-cancer parties (8 ranks with the server): 30 columns as 5, 5, 4, ..., 4,
    each party file holding exactly its columns; four digits parties get 2 columns each."""
    root = prepare_dataset(
        PrepareSpec(dataset="breast_cancer", out=tmp_path / "bc", partition="vertical", clients=7)
    )
    meta = read_meta(root)
    assert meta["clients"] == 7 and meta["parties"][:3] == [
        "columns 0-4",
        "columns 5-9",
        "columns 10-13",
    ]
    assert meta["party_feature_shapes"] == [[5], [5], [4], [4], [4], [4], [4]]
    raw = load_breast_cancer().data
    last = shard_path(root, "party", 6)
    own = raw[read_ids(last)][:, 26:30]
    standardized = (own - own.mean(0)) / own.std(0)
    assert np.allclose(load(last, "features"), standardized, atol=1e-5)
    digits = read_meta(
        prepare_dataset(
            PrepareSpec(dataset="digits", out=tmp_path / "d", partition="vertical", clients=4)
        )
    )
    assert digits["party_feature_shapes"] == [[1, 8, 2]] * 4


# --- prepare: validation and CLI -------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"dataset": "mnist"}, "dataset"),
        ({"clients": 0}, "clients"),
        ({"partition": "random"}, "partition"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"seed": -1}, "seed"),
        ({"vertical_groups": "mean"}, "vertical_groups"),
        ({"drop_fraction": 0.1}, "drop_fraction"),
        ({"partition": "vertical", "drop_fraction": 1.0}, "drop_fraction"),
        ({"partition": "vertical", "vertical_groups": "mean,left"}, "vertical_groups"),
        ({"partition": "vertical", "vertical_groups": "se,se"}, "vertical_groups"),
        ({"partition": "vertical", "clients": 31}, "clients"),
        ({"partition": "vertical", "vertical_groups": "mean,se", "clients": 3}, "clients"),
        ({"dataset": "synthetic", "partition": "vertical"}, "partition"),
        ({"dataset": "synthetic", "samples": 1}, "samples"),
        ({"dataset": "synthetic", "shape": (3, 0)}, "shape"),
        ({"dataset": "synthetic", "classes": 1}, "classes"),
    ],
)
def test_bad_spec_names_the_argument(tmp_path: Path, arguments: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}: "):
        PrepareSpec(**{"dataset": "breast_cancer", "out": tmp_path / "x", **arguments})


def test_failed_prepare_leaves_no_directory(tmp_path: Path) -> None:
    spec = PrepareSpec(dataset="breast_cancer", out=tmp_path / "bc", clients=1000)
    with pytest.raises(ValueError, match="^clients: 1000 clients but only 455 training"):
        prepare_dataset(spec)
    assert list(tmp_path.iterdir()) == []


def test_prepare_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "bc").mkdir()
    (tmp_path / "bc" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="^out: "):
        prepare_dataset(PrepareSpec(dataset="breast_cancer", out=tmp_path / "bc"))
    assert (tmp_path / "bc" / "keep.txt").read_text() == "mine"


def test_cli_arguments_build_the_spec(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    argv = ["--dataset", "synthetic", "--out", str(tmp_path), "--shape", "3,32,32", "--seed", "4"]
    spec = spec_from_args(parser.parse_args([*argv, "--test-fraction", "0.5", "--classes", "10"]))
    assert spec == PrepareSpec(
        dataset="synthetic", out=tmp_path, shape=(3, 32, 32), seed=4, test_fraction=0.5, classes=10
    )
    vertical = ["--dataset", "digits", "--out", "d", "--partition", "vertical", "--groups", "left"]
    spec = spec_from_args(parser.parse_args([*vertical, "--drop-fraction", "0.1"]))
    assert (spec.vertical_groups, spec.drop_fraction, tuple(spec.groups)) == (
        "left",
        0.1,
        ("left",),
    )


# --- reader ----------------------------------------------------------------------------------


def test_epoch_reads_every_row_once_in_contiguous_blocks(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "s.h5", rows=103)
    with ShardReader(path, batch_size=10) as reader:
        assert (len(reader), reader.num_samples, reader.feature_shape) == (11, 103, (3,))
        batches = collect(reader)
    assert [len(batch.ids) for batch in batches] == [10] * 10 + [3]
    assert set(batches[-1].ids.tolist()) == {1000, 1010, 1020}, "partial block must come last"
    for batch in batches:
        block = np.sort(batch.ids.numpy()) // 10
        assert np.array_equal(block, np.arange(block[0], block[0] + len(block)))
        assert np.array_equal(batch.features[:, 0].numpy(), batch.ids.numpy())
        assert np.array_equal(batch.labels.numpy(), batch.ids.numpy() % 2)
        assert batch.features.dtype.is_floating_point and batch.labels.dtype == batch.ids.dtype
    all_ids = np.concatenate([batch.ids for batch in batches])
    assert np.array_equal(np.sort(all_ids), np.arange(103) * 10)
    assert not np.array_equal(all_ids, np.arange(103) * 10), "not shuffled"


def test_drop_last_and_no_shuffle(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "s.h5", rows=103)
    with ShardReader(path, batch_size=10, drop_last=True, shuffle=False) as reader:
        assert len(reader) == 10
        ids = np.concatenate([batch.ids for batch in collect(reader)])
    assert np.array_equal(ids, np.arange(100) * 10)


def batch_ids(reader: ShardReader, epoch: int) -> list[list[int]]:
    return [batch.ids.tolist() for batch in reader.epoch(epoch)]


def test_shuffle_is_deterministic_by_seed_and_epoch(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "s.h5", rows=103)
    with (
        ShardReader(path, batch_size=8, seed=3) as first,
        ShardReader(path, batch_size=8, seed=3) as second,
        ShardReader(path, batch_size=8, seed=4) as other,
    ):
        assert batch_ids(first, 0) == batch_ids(second, 0)
        assert batch_ids(first, 1) == batch_ids(second, 1)
        assert batch_ids(first, 0) != batch_ids(first, 1)
        assert batch_ids(first, 0) != batch_ids(other, 0)
        assert batch_ids(first, 5) == batch_ids(first, 5), "epochs must be replayable"


def test_prefetch_yields_the_same_batches_as_inline(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "s.h5", rows=103)
    with (
        ShardReader(path, batch_size=7, prefetch=0) as inline,
        ShardReader(path, batch_size=7, prefetch=3) as prefetched,
    ):
        for epoch in (0, 1):
            pairs = zip(collect(inline, epoch), collect(prefetched, epoch), strict=True)
            for a, b in pairs:
                assert all(
                    np.array_equal(x, y)
                    for x, y in ((a.ids, b.ids), (a.features, b.features), (a.labels, b.labels))
                )


def test_epochs_stream_reads_across_the_epoch_boundary(tmp_path: Path) -> None:
    """``epochs`` gives what ``epoch`` gives, epoch after epoch (after ``skip``), and has the
    next epoch's first batch read while this epoch's last one is used: no wait between."""
    path = write_shard(tmp_path / "s.h5", rows=103)
    with ShardReader(path, batch_size=10, seed=2, prefetch=2) as reader:
        expected = batch_ids(reader, 1)[4:] + batch_ids(reader, 2) + batch_ids(reader, 3)[:1]
        stream = reader.epochs(1, skip=4)
        taken = [next(stream).ids.tolist() for _ in range(len(expected) - 1)]
        deadline = time.monotonic() + 10
        while reader._prefetcher._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        ahead = reader._prefetcher._queue.queue[0]
        assert ahead.ids.tolist() == expected[-1], "epoch 3's first batch was not read ahead"
        assert taken + [next(stream).ids.tolist()] == expected


def test_rows_select_and_order_the_batches(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "s.h5", rows=50)
    rows = np.array([7, 3, 49, 0, 12, 5, 6])
    with ShardReader(path, batch_size=3, shuffle=False, rows=rows) as reader:
        ids = np.concatenate([batch.ids for batch in collect(reader)])
        assert np.array_equal(ids, rows * 10)
    with ShardReader(path, batch_size=3, seed=1, rows=rows, prefetch=0) as reader:
        for batch in collect(reader):
            assert np.array_equal(batch.features[:, 2].numpy(), batch.ids.numpy())
    with pytest.raises(ValueError, match="rows must lie in"):
        ShardReader(path, batch_size=3, rows=np.array([50]))


def test_closing_mid_epoch_does_not_hang(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "s.h5", rows=1000)
    reader = ShardReader(path, batch_size=2, prefetch=1)
    stale = reader.epoch(0)
    next(stale)
    current = reader.epoch(1)  # abandons epoch 0
    next(current)
    with pytest.raises(RuntimeError, match="newer epoch"):
        list(stale)
    start = time.monotonic()
    reader.close()
    reader.close()
    assert time.monotonic() - start < 2
    assert not [t for t in threading.enumerate() if t.name.startswith("prefetch-s.h5")]
    with pytest.raises(RuntimeError):
        reader.epoch(0)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_nan_features_raise_naming_file_and_id(tmp_path: Path, prefetch: int) -> None:
    path = write_shard(tmp_path / "nan.h5", rows=20)
    with h5py.File(path, "r+") as file:
        file["features"][13, 1] = np.nan
    with ShardReader(path, batch_size=4, prefetch=prefetch) as reader:
        with pytest.raises(DataError, match=r"nan\.h5: features of id 130 contain NaN"):
            collect(reader)


def traced_peak(action: Callable[[], object]) -> int:
    """Peak bytes numpy/Python allocated while running action."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def write_big_shard(path: Path, rows: int, feature_shape: tuple[int, ...]) -> Path:
    """A shard written block by block, without the RNG cost of a synthetic dataset."""
    with h5py.File(path, "w") as file:
        set_attrs(file, feature_shape)
        features = file.create_dataset(
            "features",
            (rows, *feature_shape),
            np.float32,
            chunks=(64, *feature_shape),
            fletcher32=True,
        )
        for start in range(0, rows, 1024):
            stop = min(start + 1024, rows)
            features[start:stop] = np.full((stop - start, *feature_shape), start, np.float32)
        put(file, "ids", np.arange(rows, dtype=np.int64))
        put(file, "labels", np.zeros(rows, dtype=np.int64))
    return path


def test_reader_memory_stays_bounded_on_a_200_mb_shard(tmp_path: Path) -> None:
    path = write_big_shard(tmp_path / "big.h5", rows=16384, feature_shape=(3, 32, 32))
    size = path.stat().st_size
    assert size > 200e6
    with ShardReader(path, batch_size=64, prefetch=2) as reader:
        peak = traced_peak(lambda: sum(len(batch.ids) for batch in reader.epoch(0)))
    assert peak < 0.05 * size, f"read peak {peak / 1e6:.1f} MB"


def test_synthetic_prepare_memory_is_bounded_by_its_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepare, "_GENERATE_BYTES", 1 << 20)
    spec = PrepareSpec(dataset="synthetic", out=tmp_path / "syn", samples=5000, shape=(3, 32, 32))
    peak = traced_peak(lambda: prepare_dataset(spec))
    written = sum(path.stat().st_size for path in spec.out.iterdir())
    assert written > 60e6
    assert peak < 0.1 * written, f"prepare peak {peak / 1e6:.1f} MB"


# --- reader: data errors ---------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent.h5: shard file not found.*mpisplit data prepare"):
        ShardReader(tmp_path / "absent.h5", batch_size=4)


def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "cut.h5", rows=2000)
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size // 2)
    with pytest.raises(DataError, match="cut.h5: not a readable HDF5 file"):
        ShardReader(path, batch_size=4)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(DataError, match="garbage.h5"):
        read_ids(garbage)


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ({"labels": False}, "missing dataset 'labels'"),
        ({"features_dtype": np.float64}, "'features' has dtype float64, expected float32"),
        ({"feature_shape": (4,)}, r"attr feature_shape is \(4,\)"),
    ],
)
def test_schema_problems(tmp_path: Path, shard: dict, message: str) -> None:
    path = write_shard(tmp_path / "bad.h5", **shard)
    with pytest.raises(DataError, match=f"bad.h5: .*{message}"):
        ShardReader(path, batch_size=4)


def test_unequal_lengths_and_missing_schema_version(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "bad.h5", rows=10)
    with h5py.File(path, "r+") as file:
        del file["labels"]
        put(file, "labels", np.zeros(9, dtype=np.int64))
    with pytest.raises(DataError, match="differ in length"):
        ShardReader(path, batch_size=4)
    with h5py.File(path, "r+") as file:
        del file.attrs["schema_version"]
    with pytest.raises(DataError, match="schema_version None"):
        ShardReader(path, batch_size=4, fields=("features",))


def test_read_meta_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="meta.json: not found.*mpisplit data prepare"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"dataset": "digits"}')
    with pytest.raises(DataError, match="missing keys"):
        read_meta(tmp_path)


def test_align_rows(tmp_path: Path) -> None:
    ids = np.array([40, 10, 30, 20])
    assert np.array_equal(ids[align_rows(ids, np.array([10, 20, 40]))], [10, 20, 40])
    with pytest.raises(DataError, match="p.h5: 1 of the common ids are missing, e.g. 50"):
        align_rows(ids, np.array([10, 50]), source=tmp_path / "p.h5")
    with pytest.raises(DataError, match="id 10 occurs more than once"):
        align_rows(np.array([10, 20, 10]), np.array([20]))


def test_shard_paths() -> None:
    root = Path("d")
    assert shard_path(root, "client", 2) == root / "client-2.h5"
    assert shard_path(root, "client", 2, test=True) == root / "test.h5"
    assert shard_path(root, "party", 1, test=True) == root / "test-party-1.h5"
    assert shard_path(root, "labels") == root / "labels.h5"
    with pytest.raises(ValueError):
        shard_path(root, "party")
