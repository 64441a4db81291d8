"""Builds prepared datasets (``mpisplit data prepare``) in the layout of :mod:`mpisplit.data`.

A dataset is loaded (breast_cancer, digits) or generated (synthetic), a stratified test set is
held out, and the training rows are dealt to clients (iid, Dirichlet label skew) or their
feature groups to parties (vertical). Breast cancer's features are standardized file by file,
each with its own rows' mean and std (a client's shard by the client's rows, a party's file by
its rows of its columns, the test set by its own), as sites that never see each other's data
would do it. Rows are routed to shards by per-class quotas fixed up
front, so the synthetic dataset is generated and written chunk by chunk and never held in
memory as a whole.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from mpisplit.data import META_FILE, SCHEMA_VERSION, ShardWriter, shard_attrs, shard_path

DATASETS = ("breast_cancer", "digits", "synthetic")
PARTITIONS = ("iid", "dirichlet", "vertical")
# Named feature groups a vertical party can hold: an index into one row's features.
GROUPS: dict[str, dict[str, tuple[Any, ...]]] = {
    "breast_cancer": {
        "mean": (slice(0, 10),),
        "se": (slice(10, 20),),
        "worst": (slice(20, 30),),
    },
    "digits": {"left": (..., slice(0, 4)), "right": (..., slice(4, 8))},
}
# Columns along the last feature axis, which other numbers of parties split contiguously.
COLUMNS = {"breast_cancer": 30, "digits": 8}
_TEST = 0  # routing destination of test rows; destination k + 1 is train shard k
# Independent random streams, so that e.g. the test set does not depend on the partition.
_TEACHER, _FEATURES, _SPLIT, _DEAL, _ORDER = range(5)
_GENERATE_BYTES = 8 << 20  # synthetic features generated per step


@dataclass(frozen=True, kw_only=True)
class PrepareSpec:
    """What to prepare; invalid combinations raise ValueError naming the argument."""

    dataset: str
    out: Path
    clients: int = 1
    partition: str = "iid"
    alpha: float = 0.5
    vertical_groups: str | None = None
    test_fraction: float = 0.2
    seed: int = 0
    drop_fraction: float = 0.0
    samples: int = 1000
    shape: tuple[int, ...] = (32,)
    classes: int = 2

    def __post_init__(self) -> None:
        _require(self.dataset in DATASETS, "dataset", f"unknown {self.dataset!r}", DATASETS)
        _require(
            self.partition in PARTITIONS, "partition", f"unknown {self.partition!r}", PARTITIONS
        )
        _require(self.clients >= 1, "clients", f"must be >= 1, got {self.clients}")
        _require(
            math.isfinite(self.alpha) and self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}"
        )
        _require(
            0 < self.test_fraction < 1,
            "test_fraction",
            f"must be in (0, 1), got {self.test_fraction}",
        )
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _require(
            0 <= self.drop_fraction < 1,
            "drop_fraction",
            f"must be in [0, 1), got {self.drop_fraction}",
        )
        if self.dataset == "synthetic":
            self._check_synthetic()
        if self.partition == "vertical":
            self._check_vertical()
        else:
            _require(
                self.vertical_groups is None, "vertical_groups", "only used by vertical partitions"
            )
            _require(self.drop_fraction == 0, "drop_fraction", "only used by vertical partitions")

    @property
    def groups(self) -> dict[str, tuple[Any, ...]]:
        """Feature group of each vertical party in party order, name → index into one row's
        features: the named groups of ``vertical_groups``; else the dataset's named groups
        when ``clients`` is 1 or their number; else ``clients`` contiguous groups of columns
        (of the last feature axis; where they do not divide, the first groups are one wider)."""
        named = GROUPS[self.dataset]
        if self.vertical_groups is not None:
            return {name: named[name] for name in self._chosen_groups()}
        if self.clients in (1, len(named)):
            return dict(named)
        return column_groups(COLUMNS[self.dataset], self.clients)

    def _chosen_groups(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in (self.vertical_groups or "").split(","))

    def _check_synthetic(self) -> None:
        _require(self.samples >= 2, "samples", f"must be >= 2, got {self.samples}")
        _require(
            len(self.shape) > 0 and all(dim >= 1 for dim in self.shape),
            "shape",
            f"must be non-empty with dims >= 1, got {self.shape}",
        )
        _require(self.classes >= 2, "classes", f"must be >= 2, got {self.classes}")

    def _check_vertical(self) -> None:
        known = GROUPS.get(self.dataset)
        _require(
            known is not None,
            "partition",
            f"vertical needs named feature groups, which {self.dataset} has not",
        )
        if self.vertical_groups is None:
            columns = COLUMNS[self.dataset]
            _require(
                self.clients <= columns,
                "clients",
                f"{self.dataset} has {columns} columns to split among parties, got "
                f"clients={self.clients}",
            )
            return
        groups = self._chosen_groups()
        unknown = [name for name in groups if name not in known]
        _require(not unknown, "vertical_groups", f"unknown group(s) {unknown}", tuple(known))
        _require(len(set(groups)) == len(groups), "vertical_groups", f"repeated in {groups}")
        _require(
            self.clients in (1, len(groups)),
            "clients",
            f"vertical parties are set by the groups ({len(groups)}), got clients={self.clients}",
        )


def prepare_dataset(spec: PrepareSpec) -> Path:
    """Write the dataset to ``spec.out``, all or nothing: a failure leaves no directory."""
    return write_atomically(Path(spec.out), lambda root: _write_dataset(spec, root))


def write_arrays(
    out: str | Path,
    clients: Sequence[tuple[np.ndarray, np.ndarray]],
    test: tuple[np.ndarray, np.ndarray],
    *,
    dataset: str,
    num_classes: int,
) -> Path:
    """A horizontal dataset from in-memory ``(features, labels)`` arrays, one pair per client
    and one for the shared test set (e.g. token windows and their next tokens); all or
    nothing, like ``prepare_dataset``."""
    shape = tuple(np.asarray(test[0]).shape[1:])

    def write(root: Path) -> dict[str, Any]:
        attrs = shard_attrs(dataset, num_classes, shape)
        paths = _horizontal_paths(root, len(clients))
        start = 0
        for path, (features, labels) in zip(paths, [test, *clients], strict=True):
            ids = np.arange(start, start + len(labels), dtype=np.int64)
            _write_shard(
                path,
                attrs,
                features=np.asarray(features, np.float32),
                ids=ids,
                labels=np.asarray(labels, np.int64),
            )
            start += len(labels)
        return {
            "dataset": dataset,
            "num_classes": num_classes,
            "feature_shape": list(shape),
            "partition": "iid",
            "alpha": None,
            "seed": 0,
            "clients": len(clients),
            "schema_version": SCHEMA_VERSION,
            "train_samples": [len(labels) for _, labels in clients],
            "test_samples": len(test[1]),
        }

    return write_atomically(Path(out), write)


def write_atomically(out: Path, write: Callable[[Path], dict[str, Any]]) -> Path:
    """Runs ``write`` into a temporary directory that becomes ``out`` with its meta.json."""
    out = out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out: {out} already exists; remove it or choose another path")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed run that had our pid
    tmp.mkdir(parents=True)
    try:
        meta = write(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mpisplit data prepare``; defaults come from PrepareSpec."""
    default = {field.name: field.default for field in fields(PrepareSpec)}
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--out", required=True, type=Path, help="directory to create")
    parser.add_argument("--clients", type=int, default=default["clients"], help="horizontal shards")
    parser.add_argument("--partition", choices=PARTITIONS, default=default["partition"])
    parser.add_argument(
        "--alpha",
        type=float,
        default=default["alpha"],
        help="Dirichlet concentration; smaller = more label skew",
    )
    parser.add_argument(
        "--groups",
        dest="vertical_groups",
        default=None,
        help="vertical feature groups, one per party: mean,se,worst (breast_cancer) or "
        "left,right (digits); without it, --clients other than 1 or the number of named "
        "groups splits the columns into that many contiguous groups",
    )
    parser.add_argument("--test-fraction", type=float, default=default["test_fraction"])
    parser.add_argument("--seed", type=int, default=default["seed"])
    parser.add_argument(
        "--drop-fraction",
        type=float,
        default=default["drop_fraction"],
        help="vertical: fraction of ids each party misses",
    )
    parser.add_argument(
        "--samples", type=int, default=default["samples"], help="synthetic: rows in total"
    )
    parser.add_argument(
        "--shape",
        type=_parse_shape,
        default=default["shape"],
        help="synthetic: feature shape, e.g. 3,32,32",
    )
    parser.add_argument(
        "--classes", type=int, default=default["classes"], help="synthetic: label classes"
    )


def spec_from_args(args: argparse.Namespace) -> PrepareSpec:
    """The PrepareSpec for flags parsed with add_prepare_arguments."""
    return PrepareSpec(**{field.name: getattr(args, field.name) for field in fields(PrepareSpec)})


def _require(ok: bool, name: str, problem: str, choices: tuple[str, ...] = ()) -> None:
    if not ok:
        hint = f"; choose from {', '.join(choices)}" if choices else ""
        raise ValueError(f"{name}: {problem}{hint}")


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(dim) for dim in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


@dataclass(frozen=True)
class _Table:
    """A small dataset held in memory."""

    features: np.ndarray
    labels: np.ndarray
    num_classes: int
    standardize: bool


def _load_table(name: str) -> _Table:
    from sklearn.datasets import load_breast_cancer, load_digits  # slow import: only here

    if name == "breast_cancer":
        data = load_breast_cancer()
        return _Table(data.data, data.target.astype(np.int64), 2, standardize=True)
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    return _Table(images, data.target.astype(np.int64), 10, standardize=False)


def _write_dataset(spec: PrepareSpec, root: Path) -> dict[str, Any]:
    """Write the shard files into root; returns the meta.json content."""
    if spec.dataset == "synthetic":
        return _write_synthetic(spec, root)
    table = _load_table(spec.dataset)
    if spec.partition == "vertical":
        return _write_vertical(spec, table, root)
    return _write_horizontal(spec, table, root)


def _write_horizontal(spec: PrepareSpec, table: _Table, root: Path) -> dict[str, Any]:
    """Each shard's rows in random order, so the reader's block shuffling mixes classes."""
    router = _Router(_class_counts(table.labels, table.num_classes), spec, spec.clients)
    destination = router.route(table.labels)
    shape = table.features.shape[1:]
    attrs = shard_attrs(spec.dataset, table.num_classes, shape)
    rng = _rng(spec, _ORDER)
    for index, path in enumerate(_horizontal_paths(root, spec.clients)):
        rows = rng.permutation(np.flatnonzero(destination == index))
        features = _prepared_features(table, rows)
        _write_shard(path, attrs, features=features, ids=rows, labels=table.labels[rows])
    return {
        **_meta(spec, table.num_classes, shape, router.sizes[1:], router.sizes[_TEST]),
        **_normalization(table),
    }


def _write_vertical(spec: PrepareSpec, table: _Table, root: Path) -> dict[str, Any]:
    """Label files hold every row; each party misses a few ids and has its own row order."""
    router = _Router(_class_counts(table.labels, table.num_classes), spec, shards=1)
    destination = router.route(table.labels)
    rng = _rng(spec, _ORDER)
    train_rows = np.flatnonzero(destination != _TEST)
    test_rows = np.flatnonzero(destination == _TEST)
    train_samples = _write_vertical_split(spec, table, train_rows, root, rng, test=False)
    _write_vertical_split(spec, table, test_rows, root, rng, test=True)
    groups = spec.groups
    party_shapes = [
        list(_group_features(table.features[:1], index).shape[1:]) for index in groups.values()
    ]
    return {
        **_meta(spec, table.num_classes, table.features.shape[1:], train_samples, len(test_rows)),
        **_normalization(table),
        "clients": len(groups),
        "parties": list(groups),
        "party_feature_shapes": party_shapes,
    }


def _write_vertical_split(
    spec: PrepareSpec,
    table: _Table,
    rows: np.ndarray,
    root: Path,
    rng: np.random.Generator,
    *,
    test: bool,
) -> list[int]:
    """The labels file and the party files of one split; returns the party sizes."""
    ordered = rng.permutation(rows)
    labels_attrs = shard_attrs(spec.dataset, table.num_classes, ())
    labels_path = shard_path(root, "labels", test=test)
    _write_shard(labels_path, labels_attrs, ids=ordered, labels=table.labels[ordered])
    sizes = []
    for party, index in enumerate(spec.groups.values()):
        kept = _party_rows(rows, spec.drop_fraction, rng)
        party_features = _group_features(_prepared_features(table, kept), index)
        attrs = shard_attrs(spec.dataset, table.num_classes, party_features.shape[1:])
        path = shard_path(root, "party", party, test=test)
        _write_shard(path, attrs, features=party_features, ids=kept)
        sizes.append(len(kept))
    return sizes


def _group_features(features: np.ndarray, index: tuple[Any, ...]) -> np.ndarray:
    """The columns of one vertical feature group, e.g. breast cancer's 'se' features."""
    return np.ascontiguousarray(features[(slice(None), *index)])


def column_groups(columns: int, parties: int) -> dict[str, tuple[Any, ...]]:
    """``parties`` contiguous groups of the last axis's ``columns`` ("columns 0-4", ...)."""
    sizes = [columns // parties + (party < columns % parties) for party in range(parties)]
    edges = np.cumsum([0, *sizes]).tolist()
    return {
        f"columns {a}-{b - 1}": (..., slice(a, b)) for a, b in zip(edges, edges[1:], strict=False)
    }


def _write_synthetic(spec: PrepareSpec, root: Path) -> dict[str, Any]:
    """Two streaming passes: count the classes, then route and write chunk by chunk."""
    counts = sum(_class_counts(labels, spec.classes) for _, _, labels in _synthetic_chunks(spec))
    router = _Router(counts, spec, spec.clients)
    sizes = router.sizes
    attrs = shard_attrs(spec.dataset, spec.classes, spec.shape)
    paths = _horizontal_paths(root, spec.clients)
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(ShardWriter(path, size, attrs, features=tuple(spec.shape)))
            for path, size in zip(paths, sizes, strict=True)
        ]
        for ids, features, labels in _synthetic_chunks(spec):
            destination = router.route(labels)
            for index, writer in enumerate(writers):
                rows = destination == index
                writer.append(features=features[rows], ids=ids[rows], labels=labels[rows])
    return _meta(spec, spec.classes, spec.shape, sizes[1:], sizes[_TEST])


def _synthetic_chunks(spec: PrepareSpec) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, features, labels) in row order; labels come from a fixed random linear teacher."""
    width = math.prod(spec.shape)
    teacher = _rng(spec, _TEACHER).standard_normal((width, spec.classes), dtype=np.float32)
    step = max(1, _GENERATE_BYTES // (4 * width))
    for start in range(0, spec.samples, step):
        count = min(step, spec.samples - start)
        rng = _rng(spec, _FEATURES, start)
        features = rng.standard_normal((count, *spec.shape), dtype=np.float32)
        labels = np.argmax(features.reshape(count, width) @ teacher, axis=1).astype(np.int64)
        yield np.arange(start, start + count, dtype=np.int64), features, labels


def _class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=num_classes).astype(np.int64)


class _Router:
    """Sends each row to the test set or a train shard, meeting per-class quotas exactly.

    Quotas are fixed up front from the class counts and consumed chunk by chunk. Splitting
    off the test set and dealing to shards draw from separate random streams, so a seed gives
    the same test set whatever the partition and number of shards.
    """

    def __init__(self, class_counts: np.ndarray, spec: PrepareSpec, shards: int) -> None:
        test = _stratified_test_counts(class_counts, spec.test_fraction)
        train = class_counts - test
        _require(
            shards <= train.sum(),
            "clients",
            f"{shards} clients but only {train.sum()} training samples",
        )
        self._split_rng = _rng(spec, _SPLIT)
        self._deal_rng = _rng(spec, _DEAL)
        self._split = np.column_stack([test, train])
        if spec.partition == "dirichlet":
            self._deal = _dirichlet_counts(train, shards, spec.alpha, self._deal_rng)
        else:
            self._deal = _iid_counts(train, shards, self._deal_rng)
        # Rows per destination: the test set first, then each train shard.
        self.sizes: list[int] = [int(test.sum()), *self._deal.sum(axis=0).tolist()]

    def route(self, labels: np.ndarray) -> np.ndarray:
        """Destination of each row of the next chunk: _TEST, or 1 + its train shard."""
        destination = _draw(labels, self._split, self._split_rng)  # 0 = test, 1 = train
        train = destination == 1
        destination[train] += _draw(labels[train], self._deal, self._deal_rng)
        return destination


def _stratified_test_counts(class_counts: np.ndarray, fraction: float) -> np.ndarray:
    """Per-class test rows: the test fraction of every class, largest remainders rounded up."""
    total = int(class_counts.sum())
    test_total = min(max(math.ceil(fraction * total), 1), total - 1)
    counts, remainders = np.divmod(test_total * class_counts, total)
    counts[np.argsort(-remainders, kind="stable")[: test_total - counts.sum()]] += 1
    return counts


def _iid_counts(train: np.ndarray, shards: int, rng: np.random.Generator) -> np.ndarray:
    """Deal shuffled rows evenly: shard sizes differ by at most one, classes fall at random."""
    sizes = train.sum() // shards + (np.arange(shards) < train.sum() % shards)
    remaining = train.copy()
    counts = np.zeros((len(train), shards), dtype=np.int64)
    for shard, size in enumerate(sizes):
        counts[:, shard] = rng.multivariate_hypergeometric(remaining, size)
        remaining -= counts[:, shard]
    return counts


def _dirichlet_counts(
    train: np.ndarray, shards: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """Each class spread over shards by proportions ~ Dir(alpha); every shard gets a row."""
    counts = np.stack([rng.multinomial(n, rng.dirichlet(np.full(shards, alpha))) for n in train])
    while (totals := counts.sum(axis=0)).min() == 0:
        empty, donor = int(np.argmin(totals)), int(np.argmax(totals))
        label = int(np.argmax(counts[:, donor]))
        counts[label, donor] -= 1
        counts[label, empty] += 1
    return counts


def _draw(labels: np.ndarray, quotas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Column of ``quotas`` for each row, drawn without replacement from its class's quotas.

    Consumes ``quotas`` in place, so drawing for all chunks in turn meets them exactly.
    """
    drawn = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        counts = rng.multivariate_hypergeometric(quotas[label], len(rows))
        quotas[label] -= counts
        drawn[rows] = rng.permutation(np.repeat(np.arange(quotas.shape[1]), counts))
    return drawn


def _prepared_features(table: _Table, rows: np.ndarray) -> np.ndarray:
    """float32 features of one shard file's ``rows``, standardized (where the data needs it)
    with those rows' own mean and std: a site never sees another site's statistics."""
    features = table.features[rows]
    if not table.standardize:
        return features.astype(np.float32)
    return standardize(features)


def _normalization(table: _Table) -> dict[str, str]:
    """The meta.json statement of how features were scaled, where they were."""
    return (
        {"normalization": "standardized per file, with its own rows' mean and std"}
        if table.standardize
        else {}
    )


def standardize(features: np.ndarray) -> np.ndarray:
    """float32 ``(x - mean) / std`` per feature over the rows (a constant feature: std 1)."""
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    std[std == 0] = 1.0
    return ((features - mean) / std).astype(np.float32)


def _party_rows(rows: np.ndarray, drop_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """This party's rows, in its own shuffled order, less a random drop_fraction (keeps one)."""
    dropped = min(round(drop_fraction * len(rows)), len(rows) - 1)
    return rng.permutation(rows)[dropped:]


def _rng(spec: PrepareSpec, stream: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, stream, *key])


def _horizontal_paths(root: Path, clients: int) -> list[Path]:
    """Files by routing destination: the test set, then each client's shard."""
    return [shard_path(root, "client", test=True)] + [
        shard_path(root, "client", k) for k in range(clients)
    ]


def _meta(
    spec: PrepareSpec,
    num_classes: int,
    feature_shape: tuple[int, ...],
    train_samples: list[int],
    test_samples: int,
) -> dict[str, Any]:
    return {
        "dataset": spec.dataset,
        "num_classes": num_classes,
        "feature_shape": list(feature_shape),
        "partition": spec.partition,
        "alpha": spec.alpha if spec.partition == "dirichlet" else None,
        "seed": spec.seed,
        "clients": spec.clients,
        "schema_version": SCHEMA_VERSION,
        "train_samples": train_samples,
        "test_samples": test_samples,
    }


def _write_shard(path: Path, attrs: dict[str, Any], **columns: np.ndarray) -> None:
    """Write a whole in-memory shard at once."""
    features = columns.get("features")
    shape = features.shape[1:] if features is not None else None
    with ShardWriter(
        path, len(columns["ids"]), attrs, features=shape, labels="labels" in columns
    ) as writer:
        writer.append(**columns)
