"""On-disk layout of prepared datasets, and a streaming, prefetching reader for one shard.

Layout (``schema_version`` 1)
-----------------------------
A prepared dataset is a directory written by ``mpisplit data prepare`` holding ``meta.json``::

    {"dataset": name, "num_classes": int, "feature_shape": [...],
     "partition": "iid" | "dirichlet" | "vertical", "alpha": float | null, "seed": int,
     "clients": K, "parties": [group names] (vertical only),
     "party_feature_shapes": [[...], ...] (vertical only), "schema_version": 1,
     "train_samples": [rows per train shard], "test_samples": n}

``mpisplit data assemble`` writes partition "sites" (or "vertical") with ``seed`` and
``alpha`` null, and adds "classes" (label names) and "sites" (each site's schema, also in its
shard's ``site`` attr as JSON: feature names, classes, normalization, id column).

Horizontal partitions (``iid``, ``dirichlet``) over K clients::

    client-<k>.h5   k = 0..K-1, the training rows of client k
    test.h5         the held-out test set, shared by all clients

Vertical partition: P parties hold different feature groups of the same patients::

    party-<p>.h5, test-party-<p>.h5   features of group p (meta "parties"[p]: a named group
                                       such as "se", or contiguous "columns a-b") + ids, no labels
    labels.h5, test-labels.h5          ids + labels only, opened only by the label holder

Every ``.h5`` file stores rows along axis 0, chunked in blocks of at most a few hundred rows:

    features  float32 [N, *feature_shape]   (absent from labels files)
    ids       int64   [N]  row number in the source dataset: a globally unique patient id
    labels    int64   [N]  (absent from party files)

and the attrs ``dataset``, ``num_classes``, ``feature_shape`` (empty for labels files) and
``schema_version``. Every dataset carries HDF5's Fletcher-32 checksum per chunk (written by
the one writer of shards, :class:`ShardWriter`): a reader refuses a file
without it, and a chunk whose bytes changed fails its read with a ``DataError``. Before a
run, each rank compares the schema, feature shape and row count of the shards it will read
with ``meta.json`` (:func:`check_dataset`).

Vertical files each store their rows in a different shuffled order and parties may each
miss a few ids, so parties intersect their ids (:func:`intersect_ids`) and
read in that common order (:func:`align_rows` and ``ShardReader(rows=...)``).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import h5py
import numpy as np

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
META_FILE = "meta.json"
FIELD_DTYPES: dict[str, type[np.generic]] = {
    "features": np.float32,
    "ids": np.int64,
    "labels": np.int64,
}
_CHUNK_BYTES = 1 << 20  # HDF5 chunk: fits h5py's default 1 MiB chunk cache
_MAX_CHUNK_ROWS = 512
_READABLE_FIELDS = ("features", "labels")
_META_KEYS = (
    "dataset",
    "num_classes",
    "feature_shape",
    "partition",
    "alpha",
    "seed",
    "clients",
    "schema_version",
    "train_samples",
    "test_samples",
)
_PREPARE_HINT = "create it with `mpisplit data prepare --dataset NAME --out DIR`"
_DAMAGED = "checksum mismatch or damaged file"


@dataclass(frozen=True)
class Batch:
    """One mini-batch; ``features`` is an empty [b, 0] tensor when features were not read."""

    features: torch.Tensor
    labels: torch.Tensor | None
    ids: torch.Tensor


class DataError(ValueError):
    """A prepared dataset is missing, corrupt or inconsistent; the message names the file."""


def shard_path(root: Path, kind: str, index: int | None = None, *, test: bool = False) -> Path:
    """Path of one shard file: the only place that knows the file names.

    ``kind`` is "client" (the shared ``test.h5`` when ``test``, so ``index`` is then ignored),
    "party" (``index`` = party number) or "labels" (no ``index``).
    """
    root = Path(root)
    if kind == "labels":
        if index is not None:
            raise ValueError(f"shard_path: 'labels' files take no index, got {index}")
        return root / ("test-labels.h5" if test else "labels.h5")
    if kind == "client" and test:
        return root / "test.h5"
    if kind not in ("client", "party"):
        raise ValueError(f"shard_path: unknown kind {kind!r}; expected client, party or labels")
    if index is None or index < 0:
        raise ValueError(f"shard_path: {kind} files need an index >= 0, got {index}")
    return root / f"{'test-' if test else ''}{kind}-{index}.h5"


def read_meta(root: Path) -> dict[str, Any]:
    """Load and check ``meta.json`` so callers can trust its keys."""
    path = Path(root) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path}: not found, so {root} is no prepared dataset; {_PREPARE_HINT}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable or invalid JSON ({exc}); {_PREPARE_HINT}") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object; {_PREPARE_HINT}")
    missing = [key for key in _META_KEYS if key not in meta]
    if meta.get("partition") == "vertical" and "parties" not in meta:
        missing.append("parties")
    if missing:
        raise DataError(f"{path}: missing keys {missing}; {_PREPARE_HINT}")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise DataError(
            f"{path}: schema_version {meta['schema_version']}, this mpisplit reads "
            f"{SCHEMA_VERSION}; re-create it with `mpisplit data prepare`"
        )
    return meta


def check_partition(meta: dict[str, Any], root: Path, scheme: str, *, wants_vertical: bool) -> None:
    """Vertical schemes need a vertical partition and every other scheme a horizontal one:
    said before launch, in words, rather than as a missing file on every rank."""
    vertical = meta["partition"] == "vertical"
    if wants_vertical and not vertical:
        raise DataError(
            f"data.path: {root} is a horizontal partition ({meta['partition']}: every client "
            f"holds whole rows); scheme {scheme} needs parties holding feature groups "
            f"(`mpisplit data prepare --partition vertical`)"
        )
    if not wants_vertical and vertical:
        raise DataError(
            f"data.path: {root}: this dataset is a vertical partition (each party holds a "
            f"feature group of the same patients); scheme {scheme} needs a horizontal one "
            f"(`mpisplit data prepare --partition iid`), or use scheme.name=vertical"
        )


def check_dataset(
    root: Path,
    meta: dict[str, Any],
    *,
    shards: Sequence[int] = (),
    test: bool = False,
    labels: bool = False,
) -> None:
    """Opens the shards one rank will read (headers only: no rows are read) and checks each
    one's schema, checksums, feature shape and row count against ``meta``: the training
    shards of clients (or parties) ``shards``, their test set with ``test``, the label files
    with ``labels``. Run before launch, so a shard that disagrees with ``meta.json`` is one
    error, not a shape error mid-run or a client that silently trains on nothing. Only a
    rank's own files: in a real deployment a rank's data directory holds nothing else."""
    root = Path(root)
    clients, train, test_rows = meta["clients"], meta["train_samples"], meta["test_samples"]
    counts = [*train, test_rows] if isinstance(train, list) else []
    if len(counts) != clients + 1 or not all(isinstance(n, int) and n >= 0 for n in counts):
        raise DataError(
            f"{root / META_FILE}: train_samples must list {clients} row counts "
            f"and test_samples be a count; {_PREPARE_HINT}"
        )
    if test_rows < 1:
        raise DataError(
            f"{root / META_FILE}: the test set is empty (test_samples 0), but "
            f"every run ends with a test evaluation; {_PREPARE_HINT}"
        )
    if meta["partition"] != "vertical":
        files = meta.get("shards") or range(clients)  # client k of the run reads files[k]
        for client in shards:
            _check_shard(
                shard_path(root, "client", files[client]),
                _READABLE_FIELDS,
                meta["feature_shape"],
                train[client],
            )
        if test:
            _check_shard(
                shard_path(root, "client", test=True),
                _READABLE_FIELDS,
                meta["feature_shape"],
                test_rows,
            )
        return
    shapes = meta.get("party_feature_shapes")
    if not isinstance(shapes, list) or len(shapes) != clients:
        raise DataError(
            f"{root / META_FILE}: party_feature_shapes must list {clients} shapes; {_PREPARE_HINT}"
        )
    for party in shards:
        _check_shard(shard_path(root, "party", party), ("features",), shapes[party], train[party])
        if test:
            _check_shard(
                shard_path(root, "party", party, test=True), ("features",), shapes[party], None
            )
    if labels:
        _check_shard(shard_path(root, "labels"), ("labels",), None, None)
        _check_shard(shard_path(root, "labels", test=True), ("labels",), None, test_rows)


def _check_shard(
    path: Path, fields: tuple[str, ...], shape: Sequence[int] | None, rows: int | None
) -> None:
    """One shard's header against what ``meta.json`` promises (None: not promised)."""
    with _open_h5(path) as file:
        _, size, feature_shape = _validate_shard(file, path, fields)
    if shape is not None and list(feature_shape) != list(shape):
        raise DataError(
            f"{path}: features have shape {list(feature_shape)} per row, but "
            f"meta.json says {list(shape)}; {_PREPARE_HINT}"
        )
    if rows is not None and size != rows:
        raise DataError(
            f"{path}: {size} rows, but meta.json promises {rows} (a damaged or "
            f"replaced shard?); {_PREPARE_HINT}"
        )
    if size == 0:
        raise DataError(f"{path}: no rows; {_PREPARE_HINT}")


def shard_attrs(dataset: str, num_classes: int, feature_shape: tuple[int, ...]) -> dict[str, Any]:
    """The attrs every shard file carries (see the layout above)."""
    return {
        "dataset": dataset,
        "num_classes": num_classes,
        "feature_shape": np.asarray(feature_shape, dtype=np.int64),
        "schema_version": SCHEMA_VERSION,
    }


class ShardWriter:
    """A pre-sized shard file filled in row order, so shards of any size stream to disk: the
    one writer of shards (``data prepare``, ``data import``), with a Fletcher-32 checksum on
    every chunk."""

    def __init__(
        self,
        path: Path,
        rows: int,
        attrs: dict[str, Any],
        *,
        features: tuple[int, ...] | None,
        labels: bool = True,
    ) -> None:
        shapes = {"features": features, "ids": (), "labels": () if labels else None}
        shapes = {name: shape for name, shape in shapes.items() if shape is not None}
        row_bytes = sum(
            np.dtype(FIELD_DTYPES[name]).itemsize * math.prod(shape)
            for name, shape in shapes.items()
        )
        chunk = max(1, min(_MAX_CHUNK_ROWS, _CHUNK_BYTES // row_bytes, rows))
        self._rows = rows
        self._filled = 0
        self._file = h5py.File(path, "w")
        self._file.attrs.update(attrs)
        for name, shape in shapes.items():
            self._file.create_dataset(
                name,
                shape=(rows, *shape),
                dtype=FIELD_DTYPES[name],
                chunks=(chunk, *shape),
                fletcher32=True,  # readers refuse a chunk whose bytes changed
            )

    def append(self, **columns: np.ndarray) -> None:
        count = len(columns["ids"])
        if count == 0:
            return
        for name, values in columns.items():
            self._file[name][self._filled : self._filled + count] = values
        self._filled += count

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._file.close()
        if exc_type is None and self._filled != self._rows:
            raise RuntimeError(f"shard writer filled {self._filled} of {self._rows} rows")


def read_ids(path: Path) -> np.ndarray:
    """All ids of one shard file, e.g. to intersect them with the other vertical parties."""
    path = Path(path)
    with _open_h5(path) as file:
        ids = _dataset(file, path, "ids")
        try:
            return ids[...]
        except OSError as exc:
            raise DataError(f"{path}: cannot read 'ids' ({_DAMAGED}): {exc}") from exc


def intersect_ids(id_sets: Sequence[np.ndarray]) -> np.ndarray:
    """Sorted ids present in every set: the rows all vertical parties can train on."""
    if not id_sets:
        raise ValueError("intersect_ids: need at least one id set")
    return functools.reduce(np.intersect1d, id_sets)


def align_rows(
    ids: np.ndarray, common_ids: np.ndarray, *, source: str | Path = "ids"
) -> np.ndarray:
    """Row indices into a file whose ids are ``ids``, such that ``ids[rows] == common_ids``.

    ``source`` (usually the file) is named in the DataError raised for a missing or
    duplicated id.
    """
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    duplicated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if len(duplicated):
        raise DataError(f"{source}: id {duplicated[0]} occurs more than once")
    positions = np.searchsorted(sorted_ids, common_ids)
    found = np.zeros(len(common_ids), dtype=bool)
    if len(ids):
        found = sorted_ids[np.minimum(positions, len(ids) - 1)] == common_ids
    if not found.all():
        missing = common_ids[~found]
        raise DataError(
            f"{source}: {len(missing)} of the common ids are missing, e.g. {missing[0]}"
        )
    return order[positions]


def check_finite(batch: Batch, source: str | Path = "batch") -> None:
    """Fail fast on NaN/inf features, naming the file and row id, before they poison training.

    Expects a CPU batch, as the reader yields; numpy is used because it is far cheaper than
    torch's thread pool for this per-batch check.
    """
    finite = np.isfinite(batch.features.numpy())
    if not finite.all():
        row = int(np.argmin(finite.reshape(len(finite), -1).all(axis=1)))
        raise DataError(f"{source}: features of id {int(batch.ids[row])} contain NaN or inf")


def check_labels(batch: Batch, num_classes: int, source: str | Path = "batch") -> None:
    """Fail fast on labels outside ``0..num_classes-1``, which the loss would reject later."""
    labels = batch.labels.numpy()
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(
            f"{source}: label {int(labels[row])} of id {int(batch.ids[row])} is "
            f"outside 0..{num_classes - 1}"
        )


class ShardReader:
    """Streams the batches of one shard file with bounded memory.

    Batches are contiguous blocks of ``batch_size`` rows (or of ``rows``, when given), so reads
    are slices. Shuffling permutes the block order and the rows within each block, as a pure
    function of (seed, epoch, number of rows, batch_size): vertical parties reading aligned
    ``rows`` with the same seed therefore get the same ids in every batch. The last, partial
    block always comes last and is kept unless ``drop_last``.
    """

    def __init__(
        self,
        path: Path,
        *,
        batch_size: int,
        fields: Sequence[str] = ("features", "labels"),
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        prefetch: int = 2,
        rows: np.ndarray | None = None,
    ) -> None:
        _check_reader_args(batch_size, fields, seed, prefetch)
        self.path = Path(path)
        self.batch_size = batch_size
        self._fields = tuple(fields)
        self._shuffle = shuffle
        self._seed = seed
        self._drop_last = drop_last
        self._prefetch = prefetch
        self._prefetcher: _Prefetcher | None = None
        self._file = _open_h5(self.path)
        try:
            self._columns, size, self.feature_shape = _validate_shard(
                self._file, self.path, self._fields
            )
            self._rows = None if rows is None else _checked_rows(rows, size, self.path)
        except BaseException:
            self._file.close()
            raise
        self.num_samples = size if rows is None else len(self._rows)
        self._num_classes = int(self._file.attrs.get("num_classes", 0))

    def __len__(self) -> int:
        """Batches per epoch."""
        full, partial = divmod(self.num_samples, self.batch_size)
        return full + int(partial > 0 and not self._drop_last)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """The batches of one epoch after the first ``skip`` (not read; a resumed run
        continues mid-epoch); starting an epoch abandons the previous epoch's iterator."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return self._stream(self._batches(epoch, skip))

    def epochs(self, first: int, skip: int = 0) -> Iterator[Batch]:
        """The batches of epoch ``first`` after the first ``skip``, then of every later
        epoch, endlessly, read ahead as one stream: the next epoch's first batches are read
        while this one ends, so a training client does not wait at an epoch boundary."""
        if first < 0:
            raise ValueError(f"epoch must be >= 0, got {first}")
        return self._stream(
            itertools.chain.from_iterable(
                self._batches(epoch, skip if epoch == first else 0)
                for epoch in itertools.count(first)
            )
        )

    def _stream(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """``batches``, read ahead on a background thread (unless prefetch is 0); abandons
        the iterator returned before."""
        self._check_open()
        self._stop_prefetch()
        if self._prefetch == 0:
            return batches
        self._prefetcher = _Prefetcher(batches, self._prefetch, f"prefetch-{self.path.name}")
        return iter(self._prefetcher)

    def close(self) -> None:
        """Stop prefetching and close the file; safe to call twice."""
        self._stop_prefetch()
        self._file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        for start, stop, permutation in itertools.islice(self._plan(epoch), skip, None):
            yield self._checked(self._read(start, stop, permutation))

    def read_rows(self, rows: np.ndarray) -> Batch:
        """The given rows of the file (distinct, in any order), checked like a batch."""
        index = np.sort(rows)
        return self._checked(self._read_index(index, np.searchsorted(index, rows)))

    def _checked(self, batch: Batch) -> Batch:
        if "features" in self._fields:
            check_finite(batch, self.path)
        if "labels" in self._fields:
            check_labels(batch, self._num_classes, self.path)
        return batch

    def _plan(self, epoch: int) -> Iterator[tuple[int, int, np.ndarray | None]]:
        """(start, stop, within-block permutation) of each batch, in epoch order."""
        full = self.num_samples // self.batch_size
        rng = np.random.default_rng([self._seed, epoch]) if self._shuffle else None
        blocks = rng.permutation(full) if rng is not None else np.arange(full)
        if len(self) > full:
            blocks = np.append(blocks, full)
        for block in blocks:
            start = int(block) * self.batch_size
            stop = min(start + self.batch_size, self.num_samples)
            yield start, stop, rng.permutation(stop - start) if rng is not None else None

    def _read(self, start: int, stop: int, permutation: np.ndarray | None) -> Batch:
        """Read one block; h5py needs increasing indices, so ``rows`` are sorted, then reordered."""
        index: slice | np.ndarray = slice(start, stop)
        order = permutation
        if self._rows is not None:
            wanted = self._rows[start:stop]
            if permutation is not None:
                wanted = wanted[permutation]
            index = np.sort(wanted)
            order = np.searchsorted(index, wanted)
        return self._read_index(index, order)

    def _read_index(self, index: slice | np.ndarray, order: np.ndarray | None) -> Batch:
        """Rows ``index`` (a slice or increasing indices), then reordered by ``order``."""
        self._check_open()
        try:
            arrays = {name: column[index] for name, column in self._columns.items()}
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read rows ({_DAMAGED}): {exc}") from exc
        if order is not None:
            arrays = {name: array[order] for name, array in arrays.items()}
        return _to_batch(arrays)

    def _check_open(self) -> None:
        if not self._file:
            raise RuntimeError(f"{self.path}: the reader is closed")

    def _stop_prefetch(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None


class PooledReader:
    """Several shard files read as one pool, shuffled row by row each epoch (by ``seed``
    and the epoch): the pooled, shuffled centralized baseline. A batch mixes rows of every
    file, read by index, so it reads slower than ``ShardReader``'s contiguous blocks; memory
    stays one batch (plus ``prefetch`` read ahead on a background thread)."""

    def __init__(
        self, paths: Sequence[Path], *, batch_size: int, seed: int = 0, prefetch: int = 2
    ) -> None:
        _check_reader_args(batch_size, _READABLE_FIELDS, seed, prefetch)
        self._readers: list[ShardReader] = []
        try:
            for path in paths:
                self._readers.append(
                    ShardReader(path, batch_size=batch_size, shuffle=False, prefetch=0)
                )
        except BaseException:
            self.close()
            raise
        self._starts = np.cumsum([0] + [r.num_samples for r in self._readers])
        self.num_samples = int(self._starts[-1])
        self.batch_size, self._seed, self._prefetch = batch_size, seed, prefetch
        self._prefetcher: _Prefetcher | None = None

    def __len__(self) -> int:
        """Batches per epoch (the last one partial)."""
        return -(-self.num_samples // self.batch_size)

    def epochs(self, first: int, skip: int = 0) -> Iterator[Batch]:
        """As ``ShardReader.epochs``: epoch ``first`` after ``skip`` batches, then every
        later epoch, as one stream."""
        self.close_stream()
        batches = itertools.chain.from_iterable(
            self._batches(epoch, skip if epoch == first else 0) for epoch in itertools.count(first)
        )
        if self._prefetch == 0:
            return batches
        self._prefetcher = _Prefetcher(batches, self._prefetch, "prefetch-pool")
        return iter(self._prefetcher)

    def _batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        import torch

        order = np.random.default_rng([self._seed, epoch]).permutation(self.num_samples)
        for start in range(skip * self.batch_size, self.num_samples, self.batch_size):
            rows = order[start : start + self.batch_size]
            owner = np.searchsorted(self._starts, rows, side="right") - 1
            parts = [
                self._readers[f].read_rows(rows[owner == f] - self._starts[f])
                for f in np.unique(owner)
            ]
            yield Batch(
                torch.cat([p.features for p in parts]),
                torch.cat([p.labels for p in parts]),
                torch.cat([p.ids for p in parts]),
            )

    def close_stream(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def close(self) -> None:
        self.close_stream()
        for reader in self._readers:
            reader.close()

    def __enter__(self) -> PooledReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Failure(NamedTuple):
    error: BaseException


_DONE = object()
_CLOSED = object()


class _Prefetcher:
    """Runs a batch iterator on its own thread, at most ``depth`` batches ahead of the consumer.

    All reads of the file happen on this thread while it runs; ``close`` stops it and drains
    the queue, so closing mid-epoch never leaves the thread blocked on a full queue.
    """

    def __init__(self, batches: Iterator[Batch], depth: int, name: str) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(batches,), name=name, daemon=True
        )
        self._thread.start()

    def _produce(self, batches: Iterator[Batch]) -> None:
        try:
            for batch in batches:
                if self._stop.is_set():
                    return
                self._queue.put(batch)
        except BaseException as error:  # handed over to the consumer, which re-raises it
            self._queue.put(_Failure(error))
        else:
            self._queue.put(_DONE)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if item is _CLOSED:
                raise RuntimeError("epoch iterator used after a newer epoch started or close()")
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            self._drain()
            self._thread.join(timeout=0.01)
        self._drain()
        self._queue.put(_CLOSED)

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass


def _check_reader_args(batch_size: int, fields: Sequence[str], seed: int, prefetch: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    unknown = [field for field in fields if field not in _READABLE_FIELDS]
    if unknown or len(set(fields)) != len(fields):
        raise ValueError(f"fields must be distinct names from {_READABLE_FIELDS}, got {fields}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")


def _open_h5(path: Path) -> h5py.File:
    """Open read-only, turning h5py's low-level errors into a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: shard file not found; {_PREPARE_HINT}")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(
            f"{path}: not a readable HDF5 file (truncated or corrupted?): {exc}"
        ) from exc


def _dataset(file: h5py.File, path: Path, name: str) -> h5py.Dataset:
    """The named dataset, checked for presence, dtype and rank."""
    try:
        column = file.get(name)
    except (OSError, KeyError) as exc:
        raise DataError(f"{path}: cannot read dataset '{name}' (corrupted file?): {exc}") from exc
    if not isinstance(column, h5py.Dataset):
        raise DataError(f"{path}: missing dataset '{name}'")
    expected = np.dtype(FIELD_DTYPES[name])
    if column.dtype != expected:
        raise DataError(f"{path}: dataset '{name}' has dtype {column.dtype}, expected {expected}")
    bad_rank = column.ndim == 0 if name == "features" else column.ndim != 1
    if bad_rank:
        raise DataError(f"{path}: dataset '{name}' has bad shape {column.shape}")
    if not column.fletcher32:
        raise DataError(
            f"{path}: dataset '{name}' has no checksum (HDF5 fletcher32), so "
            f"damage could not be detected; {_PREPARE_HINT}"
        )
    return column


def _validate_shard(
    file: h5py.File, path: Path, fields: tuple[str, ...]
) -> tuple[dict[str, h5py.Dataset], int, tuple[int, ...]]:
    """Check the schema for the requested fields; returns (datasets, rows, feature_shape)."""
    try:
        columns = {name: _dataset(file, path, name) for name in ("ids", *fields)}
        version = file.attrs.get("schema_version")
        feature_shape = file.attrs.get("feature_shape")
    except OSError as exc:
        raise DataError(f"{path}: cannot read metadata (corrupted file?): {exc}") from exc
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{path}: datasets differ in length: {lengths}")
    if version != SCHEMA_VERSION:
        raise DataError(
            f"{path}: schema_version {version}, expected {SCHEMA_VERSION}; "
            "re-create the dataset with `mpisplit data prepare`"
        )
    if feature_shape is None:
        raise DataError(f"{path}: missing attr 'feature_shape'")
    feature_shape = tuple(int(dim) for dim in feature_shape)
    if "features" in columns and columns["features"].shape[1:] != feature_shape:
        raise DataError(
            f"{path}: features have shape {columns['features'].shape[1:]} per row, "
            f"but attr feature_shape is {feature_shape}"
        )
    return columns, lengths["ids"], feature_shape


def _checked_rows(rows: np.ndarray, size: int, path: Path) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"{path}: rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
    if len(rows) and (rows.min() < 0 or rows.max() >= size):
        raise ValueError(f"{path}: rows must lie in [0, {size}), got {rows.min()}..{rows.max()}")
    if len(np.unique(rows)) != len(rows):
        raise ValueError(f"{path}: rows must not repeat")
    return rows.astype(np.int64)


def _to_batch(arrays: dict[str, np.ndarray]) -> Batch:
    # torch is imported here, not at the top: the CLI's topology and prepare commands load
    # this module and should not pay torch's import time (over a second).
    import torch

    ids = torch.from_numpy(arrays["ids"])
    features = arrays.get("features")
    labels = arrays.get("labels")
    return Batch(
        features=torch.from_numpy(features) if features is not None else torch.empty(len(ids), 0),
        labels=torch.from_numpy(labels) if labels is not None else None,
        ids=ids,
    )
