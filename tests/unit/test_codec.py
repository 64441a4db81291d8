"""The wire codec without processes: headers of every dtype, payload parts below 2 GiB."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from mpisplit.codec import (
    DTYPES,
    HEADER_BYTES,
    INLINE_LIMIT,
    MAX_DIMS,
    PART_BYTES,
    CodecError,
    MessageBuffer,
    buffer_parts,
    collective_rounds,
    pack_header,
    part_spans,
    unpack_header,
)

INT_LIMIT = 2**31 - 1


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    values = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 50
    return values > 0 if dtype is torch.bool else values.to(dtype)


def _through_the_wire(tensor: torch.Tensor, limit: int | None) -> torch.Tensor:
    """``tensor`` packed as a message (header, then its payload inline or in parts) and
    decoded from those bytes alone."""
    message = MessageBuffer()
    nbytes, inline = pack_header(message.view, tensor, 3, 7, 5, 11, 2, 499)
    payload = b"".join(bytes(part[0]) for part in buffer_parts(tensor.contiguous(), nbytes, limit))
    if inline:
        message.view[HEADER_BYTES : HEADER_BYTES + nbytes] = payload
    kind, dtype, shape, flags, step, size, inline, aux, microbatch, client = unpack_header(
        message.view
    )
    assert (kind, step, flags, aux, microbatch, client) == (3, 7, 5, 11, 2, 499)
    assert (size, bool(inline)) == (tensor.nbytes, nbytes <= INLINE_LIMIT)
    data = bytes(message.view[HEADER_BYTES : HEADER_BYTES + nbytes]) if inline else payload
    out = torch.empty(shape, dtype=dtype)
    if nbytes:
        MPI.buffer.fromaddress(out.data_ptr(), nbytes, False)[:] = data
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(), (0, 3), (5,), (3, 4, 2), (1,) * MAX_DIMS, (INLINE_LIMIT // 2 + 3,)], ids=str
)
def test_round_trip_of_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = _sample(dtype, shape)
    for limit in (None, 1000):
        out = _through_the_wire(tensor, limit)
        assert out.dtype is dtype and out.shape == tensor.shape
        assert torch.equal(out, tensor)


def test_what_cannot_travel_is_a_codec_error() -> None:
    buffer = MessageBuffer()
    with pytest.raises(CodecError, match="at most 6 dimensions"):
        pack_header(buffer.view, torch.zeros((1,) * (MAX_DIMS + 1)), 1, 0, 0, 0, 0)
    with pytest.raises(CodecError, match="complex64 cannot travel"):
        pack_header(buffer.view, torch.zeros(2, dtype=torch.complex64), 1, 0, 0, 0, 0)
    with pytest.raises(CodecError, match="corrupt"):
        unpack_header(memoryview(bytes(HEADER_BYTES)))


@pytest.mark.parametrize(
    "nbytes", [0, 1, PART_BYTES, PART_BYTES + 1, (2 << 30) + 4096, 5 * PART_BYTES - 3, 17 << 30]
)
def test_parts_cover_payloads_over_two_gib_below_the_int_limit(nbytes: int) -> None:
    spans = part_spans(nbytes, PART_BYTES)
    assert len(spans) == max(1, -(-nbytes // PART_BYTES))
    assert all(0 <= size <= PART_BYTES < INT_LIMIT for _, size in spans)
    assert [at for at, _ in spans] == [
        sum(size for _, size in spans[:i]) for i in range(len(spans))
    ]
    assert sum(size for _, size in spans) == nbytes
    assert part_spans(nbytes, None) == [(0, nbytes)]  # large counts: one message


@pytest.mark.parametrize(
    ("counts", "itemsize", "limit"),
    [
        ([3 << 30], 4, PART_BYTES),  # an Allreduce of 12 GiB of float32
        ([0, 600 << 20, 1 << 20, 900 << 20], 4, PART_BYTES),  # a Gatherv of 2**31 + 2**20 floats
        ([10, 0, 7], 4, 12),  # the small limit the MPI tests force
        ([5, 5, 5], 8, 3),  # a limit below one element
        ([100], 1, None),
    ],
)
def test_collective_rounds_cover_every_part_within_the_limit(
    counts: list[int], itemsize: int, limit: int | None
) -> None:
    displs = [sum(counts[:rank]) for rank in range(len(counts))]
    rounds = collective_rounds(counts, displs, itemsize, limit)
    covered = [0] * len(counts)
    for r in rounds:
        assert len(r.pieces) == len(counts) and 0 < r.size * itemsize < INT_LIMIT
        assert limit is None or r.size <= max(1, limit // itemsize)
        for rank, (offset, count, displ) in enumerate(r.pieces):
            assert 0 <= displ and displ + count <= r.size
            if count:  # the piece sits where the rank's part sits in the root's buffer
                assert offset == covered[rank]
                assert r.start + displ == displs[rank] + offset
            covered[rank] += count
    assert covered == counts
    if limit is None or sum(counts) * itemsize <= limit:
        assert len(rounds) == 1
    else:
        assert len(rounds) == -(-sum(counts) // max(1, limit // itemsize))
