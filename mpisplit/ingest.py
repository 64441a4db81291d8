"""``mpisplit data import`` (one site's files → its shard) and ``data assemble`` (shards →
a dataset directory in the layout of :mod:`mpisplit.data`).

Import runs at the site, on the site's own files only: it streams the source twice (first to
check every row and count them, and, with ``standardize``, to sum the site's own statistics;
then to write), through the shard writer ``mpisplit data prepare`` uses, to a temporary name
renamed at the end, once the written ids are checked for duplicates (in bounded buckets):
memory stays a few chunks, whatever the size of the source. The shard's attrs carry the
site's schema (feature names and shape, classes, how it was normalised) as JSON under
``site``, so assembly compares sites from metadata alone, never reading a row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mpisplit.data import (
    FIELD_DTYPES,
    SCHEMA_VERSION,
    DataError,
    ShardWriter,
    shard_attrs,
    shard_path,
)
from mpisplit.prepare import write_atomically
from mpisplit.sources import (
    ArraySource,
    Columns,
    CsvSource,
    DatasetSource,
    ImageFolderSource,
    ParquetSource,
    Source,
)

FORMATS = ("csv", "tsv", "parquet", "npy", "npz", "images", "dataset")
SITE_ATTR = "site"
OWN_STATISTICS = "standardized with the site's own rows' mean and std"


@dataclass(frozen=True, kw_only=True)
class ImportSpec:
    """One site's import: what to read, how its columns map, where the shard goes."""

    source: str
    out: Path
    format: str | None = None
    columns: Columns = Columns()
    site: str | None = None
    dataset: str = "imported"
    image_size: tuple[int, int] = (32, 32)
    grayscale: bool = False
    standardize: bool = False
    chunk_rows: int = 4096

    @property
    def kind(self) -> str:
        """The format, from ``format`` or the source's suffix (a folder: images)."""
        if self.format is not None:
            return self.format
        if Path(self.source).is_dir():
            return "images"
        suffix = Path(self.source).suffix.lower().lstrip(".")
        if suffix in FORMATS:
            return suffix
        if ":" in self.source:
            return "dataset"
        raise DataError(
            f"{self.source}: cannot tell the format from the name; give --format "
            f"({', '.join(FORMATS)})"
        )


def open_source(spec: ImportSpec) -> Source:
    """The reader of the spec's source, its schema already checked."""
    kind, path, cols = spec.kind, Path(spec.source), spec.columns
    if kind in ("csv", "tsv"):
        return CsvSource(path, cols, delimiter="\t" if kind == "tsv" else ",")
    if kind == "parquet":
        return ParquetSource(path, cols)
    if kind in ("npy", "npz"):
        names = cols.features or (None,)
        if len(names) != 1:
            raise DataError(f"{path}: arrays take one --features name, got {list(names)}")
        return ArraySource(
            path, features=names[0], labels=cols.label, ids=cols.id, classes=cols.classes
        )
    if kind == "images":
        return ImageFolderSource(
            path, size=spec.image_size, grayscale=spec.grayscale, classes=cols.classes
        )
    if kind == "dataset":
        return DatasetSource(spec.source, cols.classes)
    raise DataError(f"--format: unknown {kind!r}; choose from {', '.join(FORMATS)}")


def import_shard(spec: ImportSpec) -> Path:
    """Write the site's shard to ``spec.out``: all or nothing (temporary name, rename)."""
    out = Path(spec.out)
    if out.exists():
        raise DataError(f"{out}: already exists; remove it or choose another --out")
    source = open_source(spec)
    rows, stats = _survey(source, spec)
    schema = source.schema
    site = {
        "site": spec.site or out.stem,
        "feature_names": list(schema.feature_names),
        "classes": None if schema.classes is None else list(schema.classes),
        "normalization": OWN_STATISTICS if spec.standardize else None,
        "id_column": spec.columns.id,
    }
    attrs = {
        **shard_attrs(spec.dataset, len(schema.classes or ()), schema.feature_shape),
        SITE_ATTR: json.dumps(site),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with ShardWriter(
            tmp, rows, attrs, features=schema.feature_shape, labels=schema.classes is not None
        ) as writer:
            start = 0
            for chunk in source.chunks(spec.chunk_rows):
                count = len(chunk.features)
                ids = chunk.ids if chunk.ids is not None else np.arange(start, start + count)
                features = (
                    chunk.features
                    if stats is None
                    else ((chunk.features - stats[0]) / stats[1]).astype(np.float32)
                )
                columns = {"features": features, "ids": ids}
                if chunk.labels is not None:
                    columns["labels"] = chunk.labels
                writer.append(**columns)
                start += count
        if spec.columns.id is not None:
            _check_unique_ids(tmp, source.path)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _survey(source: Source, spec: ImportSpec) -> tuple[int, tuple[np.ndarray, np.ndarray] | None]:
    """First pass: every row checked, rows counted; the site's own mean and std (float64
    sums) when standardizing."""
    rows = 0
    total = squares = None
    for chunk in source.chunks(spec.chunk_rows):
        rows += len(chunk.features)
        if spec.standardize:
            values = chunk.features.astype(np.float64)
            total = values.sum(axis=0) + (0 if total is None else total)
            squares = (values**2).sum(axis=0) + (0 if squares is None else squares)
    if not rows:
        raise DataError(f"{source.path}: no data rows")
    if total is None:
        return rows, None
    mean = total / rows
    std = np.sqrt(np.maximum(squares / rows - mean**2, 0))
    std[std == 0] = 1.0
    return rows, (mean.astype(np.float32), std.astype(np.float32))


_IDS_AT_ONCE = 1 << 18
"""Ids compared at a time by the duplicate check (2 MiB of int64), whatever the rows."""


def _check_unique_ids(shard: Path, source: str, at_once: int = _IDS_AT_ONCE) -> None:
    """No id twice, from the shard just written: its ids in hash buckets of about
    ``at_once``, one bucket per pass, so memory stays bounded however many rows there are."""
    with h5py.File(shard, "r") as file:
        ids = file["ids"]
        buckets = max(1, -(-len(ids) // at_once))
        for bucket in range(buckets):
            kept = [
                part[_bucket(part, buckets) == bucket]
                for part in (ids[start : start + at_once] for start in range(0, len(ids), at_once))
            ]
            unique, counts = np.unique(np.concatenate(kept), return_counts=True)
            if (counts > 1).any():
                raise DataError(
                    f"{source}: id {unique[np.argmax(counts > 1)]} occurs more than once"
                )


def _bucket(ids: np.ndarray, buckets: int) -> np.ndarray:
    """Fibonacci hashing: ids with a common stride (every 7th) still spread evenly."""
    mixed = ids.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return (mixed >> np.uint64(32)) % np.uint64(buckets)


# --- assembly ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    """What assembly knows of one site's shard: its attrs and dataset shapes, no rows."""

    path: Path
    role: str
    site: dict[str, Any]
    dataset: str
    rows: int
    feature_shape: tuple[int, ...] | None
    has_labels: bool
    has_ids: bool


def read_shard_meta(path: Path, role: str) -> _Shard:
    """The metadata of an imported shard (``role`` names it in errors: "client 1", ...)."""
    where = f"{path} ({role})"
    try:
        with h5py.File(path, "r") as file:
            if SITE_ATTR not in file.attrs:
                raise DataError(f"{where}: no site schema; make it with `mpisplit data import`")
            site = json.loads(file.attrs[SITE_ATTR])
            for name, column in file.items():
                expected = FIELD_DTYPES.get(name)
                if expected is not None and column.dtype != np.dtype(expected):
                    raise DataError(
                        f"{where}: dataset {name!r} has dtype {column.dtype}, "
                        f"expected {np.dtype(expected)}"
                    )
            features = file.get("features")
            return _Shard(
                path,
                role,
                site,
                str(file.attrs.get("dataset")),
                len(file["ids"]),
                None if features is None else tuple(features.shape[1:]),
                "labels" in file,
                "ids" in file,
            )
    except FileNotFoundError:
        raise DataError(f"{where}: no such file") from None
    except OSError as exc:
        raise DataError(f"{where}: not a readable HDF5 file ({exc})") from None


def _agree(first: _Shard, other: _Shard, field: str, a: Any, b: Any) -> None:
    if a != b:
        raise DataError(
            f"{other.path} ({other.role}, site {other.site['site']!r}): {field} "
            f"{b} differs from {first.role}'s ({first.site['site']!r}) {a}"
        )


def _check_horizontal(shards: Sequence[_Shard]) -> None:
    first = shards[0]
    for shard in shards:
        if shard.feature_shape is None or not shard.has_labels:
            raise DataError(f"{shard.path} ({shard.role}): needs features and labels")
        _agree(
            first, shard, "feature_names", first.site["feature_names"], shard.site["feature_names"]
        )
        _agree(first, shard, "feature shape", first.feature_shape, shard.feature_shape)
        _agree(first, shard, "classes", first.site["classes"], shard.site["classes"])
        _agree(
            first, shard, "normalization", first.site["normalization"], shard.site["normalization"]
        )
        _agree(first, shard, "dataset", first.dataset, shard.dataset)


def assemble(
    out: Path,
    *,
    clients: Sequence[Path] = (),
    test: Path | None = None,
    parties: Sequence[Path] = (),
    labels: Path | None = None,
    test_parties: Sequence[Path] = (),
    test_labels: Path | None = None,
) -> Path:
    """Check the sites' schemas agree and copy their shards into a new dataset directory."""
    if bool(clients) == bool(parties):
        raise DataError(
            "assemble: give either --client shards (horizontal) or --party shards (vertical)"
        )
    if clients:
        files, meta = _horizontal(clients, test)
    else:
        files, meta = _vertical(parties, labels, test_parties, test_labels)

    def copy(root: Path) -> dict[str, Any]:
        for source, target in files:
            shutil.copyfile(source, root / target.name)
        return meta

    return write_atomically(Path(out), copy)


def _horizontal(clients: Sequence[Path], test: Path | None) -> tuple[list, dict[str, Any]]:
    if test is None:
        raise DataError("assemble: --test SHARD is required with --client shards")
    shards = [read_shard_meta(path, f"client {k}") for k, path in enumerate(clients)]
    test_shard = read_shard_meta(test, "test")
    _check_horizontal([*shards, test_shard])
    first = shards[0]
    files = [(s.path, shard_path(Path("."), "client", k)) for k, s in enumerate(shards)]
    files.append((test_shard.path, shard_path(Path("."), "client", test=True)))
    return files, _meta(first, shards, test_shard.rows, first.feature_shape, "sites")


def _vertical(
    parties: Sequence[Path],
    labels: Path | None,
    test_parties: Sequence[Path],
    test_labels: Path | None,
) -> tuple[list, dict[str, Any]]:
    if labels is None or test_labels is None or len(test_parties) != len(parties):
        raise DataError(
            "assemble: vertical needs --labels, --test-labels and one --test-party per --party"
        )
    train = [read_shard_meta(path, f"party {p}") for p, path in enumerate(parties)]
    test = [read_shard_meta(path, f"test party {p}") for p, path in enumerate(test_parties)]
    label_shards = [read_shard_meta(labels, "labels"), read_shard_meta(test_labels, "test labels")]
    for shard in train + test:
        if shard.feature_shape is None:
            raise DataError(f"{shard.path} ({shard.role}): has no features")
    for shard in train + test + label_shards:
        if not shard.site.get("id_column"):
            raise DataError(
                f"{shard.path} ({shard.role}): vertical shards need the ids of an "
                "id column (data import --id COLUMN) to be aligned by"
            )
    for own, held_out in zip(train, test, strict=True):
        _agree(
            own,
            held_out,
            "feature_names",
            own.site["feature_names"],
            held_out.site["feature_names"],
        )
        _agree(own, held_out, "feature shape", own.feature_shape, held_out.feature_shape)
    for shard in label_shards:
        if not shard.has_labels:
            raise DataError(f"{shard.path} ({shard.role}): has no labels")
        _agree(
            label_shards[0],
            shard,
            "classes",
            label_shards[0].site["classes"],
            shard.site["classes"],
        )
    shapes = [shard.feature_shape for shard in train]
    if len({shape[:-1] for shape in shapes}) > 1:
        raise DataError(
            f"assemble: party feature shapes {shapes} must agree except in their last axis"
        )
    joined = (*shapes[0][:-1], sum(shape[-1] for shape in shapes))
    root = Path(".")
    files = [(s.path, shard_path(root, "party", p)) for p, s in enumerate(train)]
    files += [(s.path, shard_path(root, "party", p, test=True)) for p, s in enumerate(test)]
    files += [
        (label_shards[0].path, shard_path(root, "labels")),
        (label_shards[1].path, shard_path(root, "labels", test=True)),
    ]
    meta = _meta(label_shards[0], train, label_shards[1].rows, joined, "vertical")
    meta["parties"] = [shard.site["site"] for shard in train]
    meta["party_feature_shapes"] = [list(shape) for shape in shapes]
    return files, meta


def _meta(
    first: _Shard,
    train: Sequence[_Shard],
    test_rows: int,
    feature_shape: tuple[int, ...],
    partition: str,
) -> dict[str, Any]:
    return {
        "dataset": first.dataset,
        "num_classes": len(first.site["classes"]),
        "classes": first.site["classes"],
        "feature_shape": list(feature_shape),
        "partition": partition,
        "alpha": None,
        "seed": None,
        "clients": len(train),
        "schema_version": SCHEMA_VERSION,
        "train_samples": [shard.rows for shard in train],
        "test_samples": test_rows,
        "sites": [{"file": str(shard.path), **shard.site} for shard in train],
    }


# --- command line ------------------------------------------------------------------------

_SCHEMA_KEYS = ("label", "id", "features", "categorical", "classes")


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mpisplit data import``."""
    parser.add_argument(
        "source",
        help="CSV/TSV/Parquet/.npy/.npz file, image folder, or "
        "package.module:factory / file.py:factory returning a torch Dataset",
    )
    parser.add_argument("--out", required=True, type=Path, help="the site's shard file (.h5)")
    parser.add_argument("--format", choices=FORMATS, help="default: from the source's name")
    parser.add_argument("--label", help="label column (arrays: labels array or .npy file)")
    parser.add_argument(
        "--id", help="id column (arrays: ids array or .npy file); vertical parties align rows by it"
    )
    parser.add_argument(
        "--features",
        type=_names,
        help="feature columns, comma-separated "
        "(default: every other column; arrays: the features array's name)",
    )
    parser.add_argument(
        "--categorical",
        action="append",
        default=[],
        metavar="COL=V1,V2",
        help="a categorical feature column and its vocabulary (one-hot)",
    )
    parser.add_argument("--classes", type=_names, help="the label's classes, in order")
    parser.add_argument(
        "--schema",
        type=Path,
        help="JSON with any of label, id, features, "
        "categorical ({column: [values]}), classes; flags take precedence",
    )
    parser.add_argument("--site", help="the site's name in the dataset (default: file stem)")
    parser.add_argument("--dataset", default="imported", help="dataset name, same at all sites")
    parser.add_argument("--image-size", type=_size, default=(32, 32), metavar="H,W")
    parser.add_argument("--grayscale", action="store_true", help="images: one channel")
    parser.add_argument(
        "--standardize",
        action="store_true",
        help="scale each feature by this site's own mean and std",
    )
    parser.add_argument("--chunk-rows", type=int, default=4096, help="rows read at a time")


def spec_from_args(args: argparse.Namespace) -> ImportSpec:
    """The ImportSpec for flags parsed with add_import_arguments."""
    given = _schema_file(args.schema) if args.schema else {}
    categorical = dict(given.get("categorical", {}))
    for item in args.categorical:
        name, sep, values = item.partition("=")
        if not sep or not name or not values:
            raise DataError(f"--categorical: expected COLUMN=V1,V2,..., got {item!r}")
        categorical[name] = tuple(_names(values))
    if args.chunk_rows < 1:
        raise DataError(f"--chunk-rows: must be >= 1, got {args.chunk_rows}")

    def pick(name: str) -> Any:
        flag = getattr(args, name)
        value = flag if flag is not None else given.get(name)
        return tuple(value) if isinstance(value, list) else value

    columns = Columns(
        label=pick("label"),
        id=pick("id"),
        features=pick("features"),
        classes=pick("classes"),
        categorical={name: tuple(str(v) for v in values) for name, values in categorical.items()},
    )
    return ImportSpec(
        source=args.source,
        out=args.out,
        format=args.format,
        columns=columns,
        site=args.site,
        dataset=args.dataset,
        image_size=args.image_size,
        grayscale=args.grayscale,
        standardize=args.standardize,
        chunk_rows=args.chunk_rows,
    )


def add_assemble_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mpisplit data assemble``."""
    parser.add_argument("--out", required=True, type=Path, help="dataset directory to create")
    parser.add_argument(
        "--client",
        dest="clients",
        action="append",
        type=Path,
        default=[],
        help="horizontal: a client's shard (repeat, in client order)",
    )
    parser.add_argument("--test", type=Path, help="horizontal: the test shard")
    parser.add_argument(
        "--party",
        dest="parties",
        action="append",
        type=Path,
        default=[],
        help="vertical: a party's shard (repeat, in party order)",
    )
    parser.add_argument("--labels", type=Path, help="vertical: the label holder's shard")
    parser.add_argument(
        "--test-party",
        dest="test_parties",
        action="append",
        type=Path,
        default=[],
        help="vertical: a party's test shard (same order)",
    )
    parser.add_argument("--test-labels", type=Path, help="vertical: the test labels shard")


def _schema_file(path: Path) -> dict[str, Any]:
    try:
        given = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable schema file ({exc})") from None
    unknown = sorted(set(given) - set(_SCHEMA_KEYS)) if isinstance(given, dict) else ["?"]
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown}; known: {', '.join(_SCHEMA_KEYS)}")
    return given


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(dim) for dim in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W, got {text!r}") from None
    return height, width
