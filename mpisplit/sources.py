"""Readers of one site's own files for ``mpisplit data import``, each streaming in chunks.

A source knows its :class:`Schema` before reading any row (from a header, an array's shape,
the class folders, the first item) and yields :class:`Chunk` s of at most ``chunk_rows`` rows,
so files larger than memory stream. Every problem in a file (a missing column, a ragged or
unparsable row, NaN/inf, an unknown class or category, an unreadable image, a mismatched
shape, an empty file) is a :class:`~mpisplit.data.DataError` naming the file and the row or
column.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mpisplit.data import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True, kw_only=True)
class Columns:
    """Which columns of a table are what; categorical columns map to their vocabulary."""

    label: str | None = None
    id: str | None = None
    features: tuple[str, ...] | None = None
    categorical: dict[str, tuple[str, ...]] = field(default_factory=dict)
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Schema:
    """What a site's shard holds, known before any row is read; sites must agree on it."""

    feature_names: tuple[str, ...]
    feature_shape: tuple[int, ...]
    classes: tuple[str, ...] | None
    has_ids: bool


class Chunk(NamedTuple):
    ids: np.ndarray | None
    features: np.ndarray
    labels: np.ndarray | None


class Source:
    """One site's file(s); subclasses set ``schema`` and implement ``chunks``."""

    path: str
    schema: Schema

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        raise NotImplementedError


# --- tables: CSV / TSV / Parquet ----------------------------------------------------------


class _Encoder:
    """Turns a table's columns into (ids, features, labels), naming the row and column of
    any bad value; categorical columns become one-hot features ``column=value``."""

    def __init__(self, path: str, header: Sequence[str], columns: Columns) -> None:
        self.path, self.columns = path, columns
        _no_duplicates(path, header)
        used = {columns.label, columns.id} - {None}
        wanted = columns.features or tuple(name for name in header if name not in used)
        missing = [name for name in (*used, *wanted, *columns.categorical) if name not in header]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(header)})")
        unused = [name for name in columns.categorical if name not in wanted]
        if unused:
            raise DataError(f"{path}: categorical column {unused[0]!r} is not a feature column")
        if columns.label is not None and not columns.classes:
            raise DataError(
                f"{path}: label column {columns.label!r} needs its classes "
                "(--classes or the schema file's 'classes')"
            )
        self.features = wanted
        names = [
            f"{name}={value}" if name in columns.categorical else name
            for name in wanted
            for value in columns.categorical.get(name, (None,))
        ]
        self.schema = Schema(tuple(names), (len(names),), columns.classes, columns.id is not None)

    def encode(self, table: dict[str, Sequence[Any]], rows: Sequence[str]) -> Chunk:
        """``table``: column → values (text or numbers) of the rows named by ``rows``."""
        parts = []
        for name in self.features:
            vocabulary = self.columns.categorical.get(name)
            if vocabulary is None:
                parts.append(self._numbers(table[name], rows, name)[:, None])
            else:
                index = self._lookup(table[name], rows, name, vocabulary, "category")
                parts.append(np.eye(len(vocabulary), dtype=np.float32)[index])
        count = len(rows)
        features = (
            np.concatenate(parts, axis=1) if parts else np.zeros((count, 0), np.float32)
        ).astype(np.float32)
        labels = ids = None
        if self.columns.label is not None:
            labels = self._lookup(
                table[self.columns.label], rows, self.columns.label, self.columns.classes, "class"
            )
        if self.columns.id is not None:
            ids = self._integers(table[self.columns.id], rows, self.columns.id)
        return Chunk(ids, features, labels)

    def _numbers(self, values: Sequence[Any], rows: Sequence[str], name: str) -> np.ndarray:
        out = np.empty(len(values), np.float32)
        for i, value in enumerate(values):
            try:
                out[i] = float(value)
            except (TypeError, ValueError):
                raise DataError(
                    f"{self.path}: {rows[i]}, column {name!r}: cannot read {value!r} as a number"
                ) from None
            if not math.isfinite(out[i]):
                raise DataError(
                    f"{self.path}: {rows[i]}, column {name!r}: {value!r} is not finite (NaN or inf)"
                )
        return out

    def _integers(self, values: Sequence[Any], rows: Sequence[str], name: str) -> np.ndarray:
        out = np.empty(len(values), np.int64)
        for i, value in enumerate(values):
            try:
                out[i] = int(value)
            except (TypeError, ValueError, OverflowError):
                raise DataError(
                    f"{self.path}: {rows[i]}, column {name!r}: id {value!r} is not an integer"
                ) from None
        return out

    def _lookup(
        self,
        values: Sequence[Any],
        rows: Sequence[str],
        name: str,
        vocabulary: tuple[str, ...],
        what: str,
    ) -> np.ndarray:
        index = {value: i for i, value in enumerate(vocabulary)}
        out = np.empty(len(values), np.int64)
        for i, value in enumerate(values):
            found = index.get(str(value).strip())
            if found is None:
                raise DataError(
                    f"{self.path}: {rows[i]}, column {name!r}: unknown {what} "
                    f"{value!r} (known: {', '.join(vocabulary)})"
                )
            out[i] = found
        return out


class CsvSource(Source):
    """A CSV (or, with ``delimiter='\\t'``, TSV) file with a header row."""

    def __init__(self, path: Path, columns: Columns, delimiter: str = ",") -> None:
        self.path, self._delimiter = str(path), delimiter
        with _open_text(path) as file:
            try:
                header = next(csv.reader(file, delimiter=delimiter), None)
            except (UnicodeDecodeError, csv.Error) as exc:
                raise DataError(f"{path}: not a readable UTF-8 text table ({exc})") from None
        if not header or header == [""]:
            raise DataError(f"{path}: empty file (expected a header row naming the columns)")
        self._header = [name.strip() for name in header]
        self._encoder = _Encoder(self.path, self._header, columns)
        self.schema = self._encoder.schema

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        try:
            yield from self._chunks(chunk_rows)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{self.path}: not a readable UTF-8 text table ({exc})") from None

    def _chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        with _open_text(Path(self.path)) as file:
            reader = csv.reader(file, delimiter=self._delimiter)
            next(reader)
            rows: list[list[str]] = []
            lines: list[str] = []
            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) != len(self._header):
                    raise DataError(
                        f"{self.path}: line {reader.line_num}: {len(row)} fields, "
                        f"the header has {len(self._header)}"
                    )
                rows.append(row)
                lines.append(f"line {reader.line_num}")
                if len(rows) == chunk_rows:
                    yield self._encode(rows, lines)
                    rows, lines = [], []
            if rows:
                yield self._encode(rows, lines)

    def _encode(self, rows: list[list[str]], lines: list[str]) -> Chunk:
        table = dict(zip(self._header, zip(*rows, strict=True), strict=True))
        return self._encoder.encode(table, lines)


class ParquetSource(Source):
    """A Parquet file, read a row group batch at a time (needs the ``parquet`` extra)."""

    def __init__(self, path: Path, columns: Columns) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                f"{path}: reading Parquet needs pyarrow: pip install 'mpisplit[parquet]'"
            ) from None
        self.path = str(path)
        try:
            self._file = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        self._encoder = _Encoder(self.path, self._file.schema_arrow.names, columns)
        self.schema = self._encoder.schema

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        start = 0
        for batch in self._file.iter_batches(batch_size=chunk_rows):
            table = batch.to_pydict()
            rows = [f"row {start + i + 1}" for i in range(batch.num_rows)]
            start += batch.num_rows
            yield self._encoder.encode(table, rows)


# --- arrays, images, torch datasets ---------------------------------------------------------


class ArraySource(Source):
    """Features in a ``.npy`` (read a chunk of rows at a time, so it streams) with labels and
    ids in sibling ``.npy`` files, or named arrays of one ``.npz`` (loaded whole)."""

    def __init__(
        self,
        path: Path,
        *,
        features: str | None,
        labels: str | None,
        ids: str | None,
        classes: tuple[str, ...] | None,
    ) -> None:
        self.path = str(path)
        arrays = self._load(path, features, labels, ids)
        self._features, self._labels, self._ids = arrays
        if self._features.ndim < 2:
            raise DataError(
                f"{self.path}: features need shape [rows, ...], got {self._features.shape}"
            )
        for name, array in (("labels", self._labels), ("ids", self._ids)):
            if array is not None and array.shape != (len(self._features),):
                raise DataError(
                    f"{self.path}: {name} have shape {array.shape}, expected "
                    f"({len(self._features)},) like the features' rows"
                )
        if self._labels is not None and not classes:
            raise DataError(f"{self.path}: labels need their classes (--classes)")
        if not len(self._features):
            raise DataError(f"{self.path}: empty (no rows)")
        self.schema = Schema(
            (),
            tuple(self._features.shape[1:]),
            classes if self._labels is not None else None,
            ids is not None,
        )

    def _load(self, path: Path, features: str | None, labels: str | None, ids: str | None):
        if path.suffix == ".npz":
            try:
                archive = np.load(path)
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: not a readable .npz file ({exc})") from None

            def get(key: str | None) -> np.ndarray | None:
                if key is not None and key not in archive.files:
                    raise DataError(
                        f"{path}: no array {key!r} (arrays: {', '.join(archive.files)})"
                    )
                return None if key is None else archive[key]

            return get(features or "features"), get(labels), get(ids)
        sibling = [None if name is None else NpyRows(path.parent / name) for name in (labels, ids)]
        return NpyRows(path), *sibling

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        for start in range(0, len(self._features), chunk_rows):
            stop = min(start + chunk_rows, len(self._features))
            features = _finite(self.path, np.asarray(self._features[start:stop], np.float32), start)
            labels = (
                None
                if self._labels is None
                else _class_index(
                    self.path, np.asarray(self._labels[start:stop]), len(self.schema.classes), start
                )
            )
            ids = None if self._ids is None else np.asarray(self._ids[start:stop], np.int64)
            yield Chunk(ids, features, labels)


class ImageFolderSource(Source):
    """``root/<class>/<image>``: PNG or JPEG, resized to ``size`` (H, W), values in [0, 1]."""

    def __init__(
        self, root: Path, *, size: tuple[int, int], grayscale: bool, classes: tuple[str, ...] | None
    ) -> None:
        try:
            from PIL import Image  # noqa: F401
        except ImportError:
            raise DataError(
                f"{root}: image folders need Pillow: pip install 'mpisplit[images]'"
            ) from None
        self.path, self._size, self._mode = str(root), size, "L" if grayscale else "RGB"
        if not root.is_dir():
            raise DataError(f"{root}: not a folder (expected one subfolder per class)")
        found = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        chosen = classes or tuple(found)
        unknown = [name for name in found if name not in chosen]
        if unknown:
            raise DataError(f"{root}/{unknown[0]}: unknown class (known: {', '.join(chosen)})")
        self._files = [
            (path, label)
            for label, name in enumerate(chosen)
            for path in sorted((root / name).glob("[!.]*"))
            if (root / name).is_dir()
        ]
        if not self._files:
            raise DataError(f"{root}: no images (expected <class>/<image>.png or .jpg)")
        channels = 1 if grayscale else 3
        self.schema = Schema((), (channels, *size), tuple(chosen), False)

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        for start in range(0, len(self._files), chunk_rows):
            part = self._files[start : start + chunk_rows]
            features = np.stack([self._image(path) for path, _ in part])
            yield Chunk(None, features, np.array([label for _, label in part], np.int64))

    def _image(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{path}: not a PNG or JPEG image")
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert(self._mode).resize(self._size[::-1]))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"{path}: unreadable image ({exc})") from None
        pixels = pixels.astype(np.float32) / 255.0
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


class DatasetSource(Source):
    """Any map-style ``torch.utils.data.Dataset`` named by an import path
    (``package.module:name`` or ``file.py:name``: the dataset, or a factory called without
    arguments) whose items are (features, label)."""

    def __init__(self, spec: str, classes: tuple[str, ...] | None) -> None:
        self.path = spec
        made = load_object(spec)
        try:
            self._dataset = made() if callable(made) else made
        except Exception as exc:  # the user's code: say where, in one line
            raise DataError(f"{spec}: building the dataset failed: {exc!r}") from None
        try:
            self._count = len(self._dataset)
        except TypeError:
            raise DataError(f"{spec}: the dataset has no len(); map-style datasets only") from None
        if not self._count:
            raise DataError(f"{spec}: empty dataset")
        classes = classes or tuple(str(name) for name in getattr(self._dataset, "classes", ()))
        if not classes:
            raise DataError(
                f"{spec}: name the classes (--classes) or give the dataset a 'classes' attribute"
            )
        shape = tuple(np.asarray(self._dataset[0][0]).shape)
        self.schema = Schema((), shape, classes, False)

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        shape = self.schema.feature_shape
        for start in range(0, self._count, chunk_rows):
            stop = min(start + chunk_rows, self._count)
            features = np.empty((stop - start, *shape), np.float32)
            labels = np.empty(stop - start, np.int64)
            for i in range(start, stop):
                x, y = self._dataset[i][:2]
                x = np.asarray(x, np.float32)
                if x.shape != shape:
                    raise DataError(
                        f"{self.path}: item {i} has features of shape {x.shape}, item 0 {shape}"
                    )
                features[i - start], labels[i - start] = x, int(y)
            yield Chunk(
                None,
                _finite(self.path, features, start),
                _class_index(self.path, labels, len(self.schema.classes), start),
            )


def load_object(spec: str) -> Any:
    """``package.module:name`` or ``path/to/file.py:name`` → that object."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise DataError(f"{spec}: expected package.module:name or file.py:name")
    try:
        if module_name.endswith(".py"):
            location = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if location is None or not Path(module_name).is_file():
                raise DataError(f"{module_name}: no such file")
            module = importlib.util.module_from_spec(location)
            location.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, name)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"{spec}: cannot import ({exc})") from None


# --- shared checks -----------------------------------------------------------------------


def _finite(path: str, features: np.ndarray, start: int) -> np.ndarray:
    finite = np.isfinite(features.reshape(len(features), -1)).all(axis=1)
    if not finite.all():
        raise DataError(
            f"{path}: row {start + int(np.argmin(finite)) + 1}: features contain NaN or inf"
        )
    return features


def _class_index(path: str, labels: np.ndarray, classes: int, start: int) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels have dtype {labels.dtype}; expected class numbers")
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(
            f"{path}: row {start + row + 1}: unknown class {int(labels[row])} "
            f"(expected 0..{classes - 1})"
        )
    return labels.astype(np.int64)


class NpyRows:
    """The rows of a ``.npy`` file, read from the file on demand. Not ``np.load(mmap_mode)``:
    pages of a memory map stay resident in the process once read, so its memory would grow
    to the whole file."""

    _HEADERS = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as file:
                version = np.lib.format.read_magic(file)
                if version not in self._HEADERS:
                    raise ValueError(f".npy format version {version} is not supported")
                self.shape, fortran, self.dtype = self._HEADERS[version](file)
                self._offset = file.tell()
        except FileNotFoundError:
            raise DataError(f"{path}: no such file") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable .npy file ({exc})") from None
        if fortran or self.dtype.hasobject or not self.shape:
            raise DataError(
                f"{path}: expected a C-ordered numeric array with rows along "
                f"axis 0 (np.save of np.ascontiguousarray(...))"
            )
        self.ndim = len(self.shape)
        self._row_items = math.prod(self.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self))
        count = max(stop - start, 0) * self._row_items
        with open(self.path, "rb") as file:
            file.seek(self._offset + start * self._row_items * self.dtype.itemsize)
            data = np.fromfile(file, self.dtype, count)
        if data.size != count:
            raise DataError(f"{self.path}: truncated (rows {start + 1}..{stop} are missing)")
        return data.reshape(-1, *self.shape[1:])


def _open_text(path: Path):
    try:
        return open(path, newline="", encoding="utf-8")  # noqa: SIM115 (a context manager)
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror})") from None


def _no_duplicates(path: str, header: Sequence[str]) -> None:
    seen = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}: column {name!r} appears twice in the header")
        seen.add(name)
