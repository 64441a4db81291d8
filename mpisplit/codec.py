"""The wire layout of one tensor message, and payloads cut into parts an MPI library accepts.

A message starts with a 16-word int64 header (magic, kind, dtype, shape, step, flags, payload
size, inline or not, a scheme-defined integer, and one word holding the microbatch and the
logical client the message is from or for, 32 bits each: a rank may host several clients).
Payloads up to ``INLINE_LIMIT`` bytes travel inside the header message; larger ones follow
as raw bytes. The header is packed and unpacked here, with no MPI call: the transport moves
it, this module says what it means.
Flags are an opaque integer here (``mpisplit.protocol`` gives them their meaning).

An MPI library without large counts (MPI < 4: counts are C ints) carries less than 2 GiB per
message or collective call; ``part_spans`` cuts a payload into parts of at most ``PART_BYTES``,
``collective_rounds`` a collective into rounds that each move at most that much.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from mpi4py import MPI

from mpisplit.mpilib import large_counts

HEADER_WORDS = 16
HEADER_BYTES = HEADER_WORDS * 8
_META_WORDS = 10
MAX_DIMS = HEADER_WORDS - _META_WORDS
INLINE_LIMIT = 16 * 1024
"""Above it two messages (header, then the payload straight into the tensor) beat copying the
payload through the header buffer at each end: 64 KiB one-way 15.4 vs 20.8 us on 2 cores."""
MAGIC = 0x5EC7
PART_BYTES = 2**30
"""Largest payload one MPI call carries on a library without large counts (below 2**31 - 1)."""

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
)
"""Every dtype a message may carry; its index is the dtype's code on the wire."""
_DTYPE_CODE = {dtype: code for code, dtype in enumerate(DTYPES)}
_META = struct.Struct(f"={_META_WORDS}q")
_SHAPE = tuple(struct.Struct(f"={ndim}q") for ndim in range(MAX_DIMS + 1))
"""The header read in two unpacks, its meta words then the shape (no slicing of tuples)."""
_HEADER = tuple(struct.Struct(f"={_META_WORDS + ndim}q") for ndim in range(MAX_DIMS + 1))
"""The whole header (meta words, then the shape) per number of dimensions: one pack."""


class CodecError(ValueError):
    """A tensor the wire format cannot describe, or bytes that are not a header."""


class MessageBuffer:
    """A reusable header (+ inline payload) buffer and a memoryview of it, for copies."""

    __slots__ = ("array", "view")

    def __init__(self, size: int = HEADER_BYTES + INLINE_LIMIT) -> None:
        self.array = np.empty(size, np.uint8)
        self.view = memoryview(self.array)
        """Slices of it take or give an inline payload in one C-level copy."""


def pack_header(
    view: memoryview,
    tensor: torch.Tensor,
    kind: int,
    step: int,
    flags: int,
    aux: int,
    microbatch: int,
    client: int = 0,
) -> tuple[int, bool]:
    """Writes ``tensor``'s header into ``view``; returns its payload size and whether the
    payload goes inline (the caller copies it after the header)."""
    ndim = tensor.dim()
    if ndim > MAX_DIMS:
        raise CodecError(
            f"transport: tensors of at most {MAX_DIMS} dimensions, got shape {tuple(tensor.shape)}"
        )
    code = _DTYPE_CODE.get(tensor.dtype)
    if code is None:
        raise CodecError(
            f"transport: dtype {tensor.dtype} cannot travel (one of "
            f"{', '.join(str(d).removeprefix('torch.') for d in DTYPES)})"
        )
    nbytes = tensor.nbytes
    inline = nbytes <= INLINE_LIMIT
    _HEADER[ndim].pack_into(
        view,
        0,
        MAGIC,
        kind,
        code,
        ndim,
        flags,
        step,
        nbytes,
        inline,
        aux,
        microbatch | client << 32,
        *tensor.shape,
    )
    return nbytes, inline


def unpack_header(
    view: memoryview,
) -> tuple[int, torch.dtype, tuple[int, ...], int, int, int, int, int, int, int]:
    """The header at the start of ``view``: (kind, dtype, shape, flags, step, payload bytes,
    inline, aux, microbatch, client); ``CodecError`` if it is not one. A plain tuple: this
    runs for every message received, and a named tuple would cost a tenth of a small receive.
    The microbatch and the logical client share one word (client in the upper 32 bits)."""
    magic, kind, code, ndim, flags, step, nbytes, inline, aux, position = _META.unpack_from(view)
    if magic != MAGIC:
        raise CodecError("corrupt message header")
    return (
        kind,
        DTYPES[code],
        _SHAPE[ndim].unpack_from(view, _META.size),
        flags,
        step,
        nbytes,
        inline,
        aux,
        position & 0xFFFFFFFF,
        position >> 32,
    )


def default_part_bytes() -> int | None:
    """``PART_BYTES`` on an MPI library without large counts, else None (no limit)."""
    return None if large_counts() else PART_BYTES


def part_spans(nbytes: int, limit: int | None) -> list[tuple[int, int]]:
    """(offset, size) of the parts that carry ``nbytes``: one part, or parts of ``limit`` at
    most (the last one shorter); one empty part for an empty payload."""
    if not limit or nbytes <= limit:
        return [(0, nbytes)]
    return [(at, min(limit, nbytes - at)) for at in range(0, nbytes, limit)]


def buffer_parts(data: torch.Tensor, nbytes: int, limit: int | None) -> list[list]:
    """MPI buffer specifications covering the ``nbytes`` of contiguous ``data`` (host memory,
    or device memory for a CUDA-aware MPI), cut by ``part_spans``."""
    spans = part_spans(nbytes, limit)
    if data.is_cuda:  # read through the CUDA array interface
        flat = data.reshape(-1).view(torch.uint8)
        return [[flat[at : at + size], size, MPI.BYTE] for at, size in spans]
    address = data.data_ptr()
    return [[MPI.buffer.fromaddress(address + at, size), size, MPI.BYTE] for at, size in spans]


class Round(NamedTuple):
    """One call of a collective cut into rounds: a window of the root's buffer (the whole
    buffer, for an Allreduce) and every rank's piece of it."""

    start: int
    """Element offset of the window in the root's buffer."""
    size: int
    """Elements in the window."""
    pieces: list[tuple[int, int, int]]
    """Per rank: (element offset within its own part, element count, displacement within
    the window); (0, 0, 0) for a rank with nothing in this window."""


def collective_rounds(
    counts: Sequence[int], displs: Sequence[int], itemsize: int, limit: int | None
) -> list[Round]:
    """A collective over parts of ``counts`` elements at ``displs`` in the root's buffer,
    as rounds over windows of at most ``limit`` bytes (one round if there is no limit or it
    fits): no count or displacement of a round reaches ``limit``, and every rank knows its
    piece of every round from the layout alone, so every rank posts the same rounds."""
    extent = max((d + c for c, d in zip(counts, displs, strict=True)), default=0)
    if not limit or extent * itemsize <= limit:
        return [Round(0, extent, [(0, c, d) for c, d in zip(counts, displs, strict=True)])]
    window = max(1, limit // itemsize)
    rounds = []
    for start in range(0, extent, window):
        end = min(start + window, extent)
        pieces = []
        for count, displ in zip(counts, displs, strict=True):
            low, high = max(displ, start), min(displ + count, end)
            pieces.append((low - displ, high - low, low - start) if high > low else (0, 0, 0))
        if any(n for _, n, _ in pieces):
            rounds.append(Round(start, end - start, pieces))
    return rounds
