"""``mpisplit data import`` and ``data assemble``, in process (real files, real HDF5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from mpisplit.cli import main
from mpisplit.data import DataError, ShardReader, ShardWriter, read_meta, shard_attrs, shard_path
from mpisplit.ingest import _check_unique_ids

CSV = """pid,age,weight,scanner,diagnosis
7,50,70.5,ge,benign
3,61,80,siemens,malignant
9,45,65,ge,benign
"""


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """``mpisplit ARGS`` in process: (exit status, stderr)."""
    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().err


def import_csv(
    capsys, tmp_path: Path, text: str | bytes, name: str = "site.csv", *extra: object
) -> tuple[int, str, Path]:
    source = tmp_path / name
    source.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "out" / f"{Path(name).stem}.h5"
    code, err = run(
        capsys,
        "data",
        "import",
        source,
        "--out",
        out,
        "--id",
        "pid",
        "--label",
        "diagnosis",
        "--classes",
        "benign,malignant",
        "--features",
        "age,weight,scanner",
        "--categorical",
        "scanner=siemens,ge",
        *extra,
    )
    return code, err, out


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as file:
        return {name: file[name][...] for name in file}


def test_csv_columns_one_hot_and_own_statistics(capsys, tmp_path: Path) -> None:
    code, err, out = import_csv(capsys, tmp_path, CSV)
    assert code == 0, err
    data = read(out)
    assert data["ids"].tolist() == [7, 3, 9]
    assert data["labels"].tolist() == [0, 1, 0]
    assert data["features"].tolist() == [[50, 70.5, 0, 1], [61, 80, 1, 0], [45, 65, 0, 1]]
    with h5py.File(out, "r") as file:
        site = json.loads(file.attrs["site"])
    assert site["feature_names"] == ["age", "weight", "scanner=siemens", "scanner=ge"]

    code, err, scaled = import_csv(
        capsys, tmp_path, CSV, "scaled.csv", "--standardize", "--chunk-rows", "2"
    )
    assert code == 0, err
    raw = data["features"].astype(np.float64)
    expected = (raw - raw.mean(0)) / raw.std(0)
    assert np.allclose(read(scaled)["features"], expected, atol=1e-5)


BAD_CSV = {
    "missing column": ("pid,age,scanner,diagnosis\n1,2,ge,benign\n", "no column 'weight'"),
    "ragged row": (CSV + "4,50,ge,benign\n", "line 5: 4 fields, the header has 5"),
    "unparsable": (
        CSV.replace("80,", "eighty,"),
        "line 3, column 'weight': cannot read 'eighty' as a number",
    ),
    "nan": (CSV.replace("65,", "nan,"), "line 4, column 'weight': 'nan' is not finite"),
    "inf": (CSV.replace("50,", "inf,"), "line 2, column 'age': 'inf' is not finite"),
    "unknown class": (
        CSV.replace("malignant", "unsure"),
        "line 3, column 'diagnosis': unknown class 'unsure'",
    ),
    "unknown category": (
        CSV.replace("siemens", "philips"),
        "line 3, column 'scanner': unknown category 'philips'",
    ),
    "empty": ("", "empty file"),
    "not text": (CSV.encode() + b"\xff\xfe,1,2,ge,benign\n", "not a readable UTF-8"),
    "header only": (CSV.splitlines()[0] + "\n", "no data rows"),
    "duplicate id": (CSV.replace("9,", "7,"), "id 7 occurs more than once"),
    "bad id": (CSV.replace("9,", "x9,"), "line 4, column 'pid': id 'x9' is not an integer"),
}


@pytest.mark.parametrize("case", BAD_CSV)
def test_bad_csv_is_one_line_naming_file_row_and_column(capsys, tmp_path: Path, case: str) -> None:
    text, expected = BAD_CSV[case]
    code, err, out = import_csv(capsys, tmp_path, text, "bad.csv")
    assert code == 2
    assert err.startswith(f"mpisplit: {tmp_path / 'bad.csv'}: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.parent.exists() or not list(out.parent.iterdir()), "something left behind"


class FailsWhileWriting:
    """A torch-style dataset that breaks on its second pass (the write), after the checks."""

    classes = ("a", "b")
    reads = 0

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        FailsWhileWriting.reads += 1
        if FailsWhileWriting.reads > 12:
            raise OSError("disk went away")
        return np.full(3, index, np.float32), index % 2


def make_failing() -> FailsWhileWriting:
    return FailsWhileWriting()


def test_nothing_half_written_is_left(tmp_path: Path) -> None:
    out = tmp_path / "out" / "site.h5"
    with pytest.raises(OSError, match="disk went away"):
        main(["data", "import", f"{__name__}:make_failing", "--out", str(out)])
    assert list(out.parent.iterdir()) == []


def test_arrays_images_and_datasets(capsys, tmp_path: Path) -> None:
    features = np.arange(24, dtype=np.float64).reshape(6, 2, 2)
    np.save(tmp_path / "x.npy", features)
    np.save(tmp_path / "y.npy", np.array([0, 1, 2, 0, 1, 2]))
    code, err = run(
        capsys,
        "data",
        "import",
        tmp_path / "x.npy",
        "--label",
        "y.npy",
        "--classes",
        "a,b,c",
        "--out",
        tmp_path / "npy.h5",
        "--chunk-rows",
        "4",
    )
    assert code == 0, err
    assert np.array_equal(read(tmp_path / "npy.h5")["features"], features)

    np.savez(tmp_path / "d.npz", x=features, y=np.array([0, 1, 2, 0, 1, 3]))
    code, err = run(
        capsys,
        "data",
        "import",
        tmp_path / "d.npz",
        "--features",
        "x",
        "--label",
        "y",
        "--classes",
        "a,b,c",
        "--out",
        tmp_path / "npz.h5",
    )
    assert code == 2 and "d.npz: row 6: unknown class 3" in err, err
    np.savez(tmp_path / "e.npz", x=features, y=np.array([0, 1]))
    code, err = run(
        capsys,
        "data",
        "import",
        tmp_path / "e.npz",
        "--features",
        "x",
        "--label",
        "y",
        "--classes",
        "a,b,c",
        "--out",
        tmp_path / "npz.h5",
    )
    assert code == 2 and "labels have shape (2,), expected (6,)" in err, err

    for label, shade in (("cat", 0), ("dog", 255)):
        (tmp_path / "img" / label).mkdir(parents=True)
        Image.new("RGB", (10, 6), (shade, 0, 0)).save(tmp_path / "img" / label / "1.png")
    code, err = run(
        capsys,
        "data",
        "import",
        tmp_path / "img",
        "--image-size",
        "4,5",
        "--out",
        tmp_path / "img.h5",
    )
    assert code == 0, err
    images = read(tmp_path / "img.h5")
    assert images["features"].shape == (2, 3, 4, 5) and images["labels"].tolist() == [0, 1]
    assert images["features"][1, 0].min() == 1.0 and images["features"][0].max() == 0.0
    (tmp_path / "img" / "dog" / "2.png").write_bytes(b"not a png")
    code, err = run(capsys, "data", "import", tmp_path / "img", "--out", tmp_path / "i2.h5")
    assert code == 2 and f"{tmp_path / 'img' / 'dog' / '2.png'}: unreadable image" in err, err

    FailsWhileWriting.reads = -1000  # never fails in this run
    code, err = run(
        capsys, "data", "import", f"{__name__}:make_failing", "--out", tmp_path / "ds.h5"
    )
    assert code == 0, err
    assert read(tmp_path / "ds.h5")["labels"].tolist() == [0, 1] * 5


PEAK_RSS = """
import resource, sys
import mpisplit.ingest
from mpisplit.cli import main
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = main(sys.argv[1:])
print(code, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_a_large_source_imports_in_bounded_memory(tmp_path: Path) -> None:
    """A 324 MiB source (.npy features, labels and ids, the ids with a stride) imported by a
    fresh process whose peak RSS grows by less than a quarter of it: rows are read a chunk at
    a time (not memory-mapped: a map's pages stay resident once read), ids are checked for
    duplicates in bounded buckets."""
    rows, width, step = 1_250_000, 64, 65_536
    features = np.lib.format.open_memmap(
        tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(rows, width)
    )
    rng = np.random.default_rng(0)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        features[start:stop] = rng.standard_normal((stop - start, width), dtype=np.float32)
    features.flush()
    np.save(tmp_path / "y.npy", np.arange(rows) % 3)
    np.save(tmp_path / "ids.npy", np.arange(rows) * 7)
    source = sum((tmp_path / name).stat().st_size for name in ("x.npy", "y.npy", "ids.npy"))
    assert source > 320 * 2**20
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK_RSS,
            "data",
            "import",
            str(tmp_path / "x.npy"),
            "--label",
            "y.npy",
            "--id",
            "ids.npy",
            "--classes",
            "a,b,c",
            "--out",
            str(tmp_path / "x.h5"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    code, before_kib, peak_kib = map(int, result.stdout.split()[-3:])
    assert code == 0, result.stderr
    assert (peak_kib - before_kib) * 1024 < source / 4, (before_kib, peak_kib, source)
    with h5py.File(tmp_path / "x.h5", "r") as file:
        assert file["ids"][-1] == 7 * (rows - 1) and file["labels"][-1] == (rows - 1) % 3
        assert np.array_equal(file["features"][-1000:], features[-1000:])


def test_duplicate_ids_are_found_in_any_bucket(tmp_path: Path) -> None:
    ids = np.arange(0, 700, 7)
    ids[-1] = ids[3]
    with ShardWriter(
        tmp_path / "s.h5", len(ids), shard_attrs("x", 0, (1,)), features=(1,), labels=False
    ) as writer:
        writer.append(ids=ids, features=np.zeros((len(ids), 1), np.float32))
    with pytest.raises(DataError, match="src: id 21 occurs more than once"):
        _check_unique_ids(tmp_path / "s.h5", "src", at_once=8)
    np.save(tmp_path / "x.npy", np.zeros((10, 3), np.float32))
    truncated = tmp_path / "cut.npy"
    truncated.write_bytes((tmp_path / "x.npy").read_bytes()[:-13])
    code = main(["data", "import", str(truncated), "--out", str(tmp_path / "cut.h5")])
    assert code == 2 and not (tmp_path / "cut.h5").exists()


def test_parquet(capsys, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"pid": [1, 2, 3], "age": [50.0, 61.0, None], "diagnosis": ["a", "b", "a"]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    code, err = run(
        capsys,
        "data",
        "import",
        tmp_path / "t.parquet",
        "--id",
        "pid",
        "--label",
        "diagnosis",
        "--classes",
        "a,b",
        "--out",
        tmp_path / "p.h5",
    )
    assert code == 2 and "row 3, column 'age': cannot read None as a number" in err, err
    pq.write_table(table.slice(0, 2), tmp_path / "t.parquet")
    code, err = run(
        capsys,
        "data",
        "import",
        tmp_path / "t.parquet",
        "--id",
        "pid",
        "--label",
        "diagnosis",
        "--classes",
        "a,b",
        "--out",
        tmp_path / "p.h5",
    )
    assert code == 0, err
    assert read(tmp_path / "p.h5")["features"].tolist() == [[50.0], [61.0]]


def test_assemble_checks_schemas_from_metadata(capsys, tmp_path: Path) -> None:
    sites = {}
    for name, text in (
        ("a", CSV),
        ("b", CSV),
        ("t", CSV),
        ("renamed", CSV.replace("weight", "mass")),
        ("other_classes", CSV),
    ):
        classes = "benign,malignant,unknown" if name == "other_classes" else "benign,malignant"
        source = tmp_path / f"{name}.csv"
        source.write_text(text)
        sites[name] = tmp_path / f"{name}.h5"
        code, err = run(
            capsys,
            "data",
            "import",
            source,
            "--out",
            sites[name],
            "--id",
            "pid",
            "--label",
            "diagnosis",
            "--classes",
            classes,
            "--categorical",
            "scanner=siemens,ge",
        )
        assert code == 0, err
    code, err = run(
        capsys,
        "data",
        "assemble",
        "--client",
        sites["a"],
        "--client",
        sites["b"],
        "--test",
        sites["t"],
        "--out",
        tmp_path / "ok",
    )
    assert code == 0, err
    meta = read_meta(tmp_path / "ok")
    assert meta["clients"] == 2 and meta["feature_shape"] == [4] and meta["num_classes"] == 2
    with ShardReader(shard_path(tmp_path / "ok", "client", 1), batch_size=2) as reader:
        assert sum(len(batch.ids) for batch in reader.epoch(0)) == 3

    for bad, field in (("renamed", "feature_names"), ("other_classes", "classes")):
        code, err = run(
            capsys,
            "data",
            "assemble",
            "--client",
            sites["a"],
            "--client",
            sites[bad],
            "--test",
            sites["t"],
            "--out",
            tmp_path / bad,
        )
        assert code == 2, err
        assert f"{sites[bad]} (client 1, site '{bad}'): {field}" in err, err
        assert not (tmp_path / bad).exists()


def test_vertical_assembly_needs_id_columns(capsys, tmp_path: Path) -> None:
    source = tmp_path / "party.csv"
    source.write_text(CSV)
    shards = {}
    for name, extra in (("with_ids", ["--id", "pid"]), ("no_ids", [])):
        shards[name] = tmp_path / f"{name}.h5"
        code, err = run(
            capsys,
            "data",
            "import",
            source,
            "--out",
            shards[name],
            "--label",
            "diagnosis",
            "--classes",
            "benign,malignant",
            "--features",
            "age",
            *extra,
        )
        assert code == 0, err
    good, bad = shards["with_ids"], shards["no_ids"]
    code, err = run(
        capsys,
        "data",
        "assemble",
        "--party",
        good,
        "--party",
        good,
        "--labels",
        good,
        "--test-party",
        good,
        "--test-party",
        good,
        "--test-labels",
        good,
        "--out",
        tmp_path / "v",
    )
    assert code == 0, err
    meta = read_meta(tmp_path / "v")
    assert meta["partition"] == "vertical" and meta["party_feature_shapes"] == [[1], [1]]
    assert meta["feature_shape"] == [2]
    code, err = run(
        capsys,
        "data",
        "assemble",
        "--party",
        good,
        "--party",
        bad,
        "--labels",
        good,
        "--test-party",
        good,
        "--test-party",
        good,
        "--test-labels",
        good,
        "--out",
        tmp_path / "w",
    )
    assert code == 2 and f"{bad} (party 1): vertical shards need the ids of an id column" in err
