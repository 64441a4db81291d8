"""In-process transport tests: run under ``mpiexec -n N python -m pytest --with-mpi tests/mpi``.

They work at any N >= 2 (ranks beyond the first two take part in the any-source test).
"""

from __future__ import annotations

import os

import pytest
import torch
from mpi4py import MPI

from mpisplit.codec import part_spans
from mpisplit.compression import make_compressor
from mpisplit.cut import recv_forward, send_forward
from mpisplit.transport import (
    ANY_SOURCE,
    HEADER_BYTES,
    INLINE_LIMIT,
    Kind,
    PeerTimeout,
    PolicyViolation,
    large_counts,
)
from tests.mpi.conftest import make_transport

pytestmark = pytest.mark.mpi(min_size=2)


_gen = torch.Generator().manual_seed(0)  # same tensors on every rank
TENSORS = [
    torch.arange(12, dtype=torch.float32).reshape(3, 4),
    torch.randn(2, 3, 5, dtype=torch.float64, generator=_gen),
    torch.randn(7, generator=_gen).to(torch.bfloat16),
    torch.randn(4, 4, generator=_gen).to(torch.float16),
    torch.tensor([True, False, True]),
    torch.arange(5, dtype=torch.int64),
    torch.empty(0, 30),
    torch.tensor(3.5),
    torch.randn(INLINE_LIMIT // 4 + 1, generator=_gen),  # just above the inline limit
    torch.randn(3, 1024, 1024, generator=_gen),  # 12 MiB, large path
    torch.randn(10, 6, generator=_gen).t(),  # non-contiguous
]


def test_round_trip_of_dtypes_and_shapes(comm: MPI.Comm) -> None:
    transport = make_transport(comm)
    if comm.rank == 0:
        for tensor in TENSORS:
            message = transport.recv(Kind.ACTIVATION, 1)
            assert message.tensor.dtype == tensor.dtype
            assert message.tensor.shape == tensor.shape
            assert torch.equal(message.tensor, tensor)
        expected = sum(HEADER_BYTES + t.numel() * t.element_size() for t in TENSORS)
        assert transport.traffic.recv_bytes[1, Kind.ACTIVATION] == expected
    elif comm.rank == 1:
        for tensor in TENSORS:
            transport.send(tensor, 0, Kind.ACTIVATION, step=3)
    transport.close()


def test_shapes_may_change_every_message(comm: MPI.Comm) -> None:
    transport = make_transport(comm)
    sizes = [1, 17, 5, 64 * 1024, 2, 300_000, 3]
    if comm.rank == 1:
        for step, n in enumerate(sizes):
            transport.send(torch.full((n, 2), float(step)), 0, Kind.ACTIVATION, step=step)
    elif comm.rank == 0:
        for step, n in enumerate(sizes):
            message = transport.recv(Kind.ACTIVATION, 1)
            assert message.step == step and message.tensor.shape == (n, 2)
            assert bool((message.tensor == step).all())
    transport.close()


def test_any_source_serves_every_sender(comm: MPI.Comm) -> None:
    transport = make_transport(comm)
    if comm.rank == 0:
        seen = sorted(
            int(transport.recv(Kind.ACTIVATION, ANY_SOURCE).tensor) for _ in range(comm.size - 1)
        )
        assert seen == list(range(1, comm.size))
    else:
        transport.send(torch.tensor(comm.rank), 0, Kind.ACTIVATION)
    transport.close()


def test_cut_exchange_matches_local_autograd(comm: MPI.Comm) -> None:
    """Gradients that cross the cut equal those of the same graph run in one process."""
    transport = make_transport(comm)
    torch.manual_seed(1)
    lower, upper = torch.nn.Linear(6, 4), torch.nn.Linear(4, 2)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 1, 0, 1])
    if comm.rank == 1:
        anchor = send_forward(lower(x), transport, 0)
        anchor.backward()
        reference = torch.nn.functional.cross_entropy(upper(lower(x)), y)
        expected = torch.autograd.grad(reference, lower.weight)[0]
        torch.testing.assert_close(lower.weight.grad, expected)
    elif comm.rank == 0:
        activation, message = recv_forward(transport, 1)
        assert activation.requires_grad and message.source == 1
        torch.nn.functional.cross_entropy(upper(activation), y).backward()
    transport.close()


def test_policy_refuses_undeclared_routes(comm: MPI.Comm) -> None:
    transport = make_transport(comm, allowed=frozenset({("client", "server", Kind.ACTIVATION)}))
    if comm.rank == 1:
        with pytest.raises(PolicyViolation, match=r"rank 1 \(client\) may not send LABELS"):
            transport.send(torch.zeros(2), 0, Kind.LABELS)
    if comm.rank == 0:
        with pytest.raises(PolicyViolation, match="may not send ACTIVATION"):
            transport.send(torch.zeros(2), 1, Kind.ACTIVATION)
    transport.close()


def test_silent_peer_times_out_naming_it(comm: MPI.Comm) -> None:
    transport = make_transport(comm, timeout_s=0.5)
    if comm.rank == 0:
        expected = r"rank 0 \(server\) waited 0.5 s .* rank 1 \(client\)"
        with pytest.raises(PeerTimeout, match=expected):
            transport.recv(Kind.GRADIENT, 1)
    transport.close()


def test_nothing_is_pickled(comm: MPI.Comm) -> None:
    """The per-step path moves raw buffers only: count every pickle mpi4py would make."""
    import pickle

    calls = []

    def counting_dumps(obj, *args):
        calls.append(type(obj).__name__)
        return pickle.dumps(obj, *args)

    MPI.pickle.__init__(counting_dumps, pickle.loads)
    try:
        test_cut_exchange_matches_local_autograd(comm)
        test_shapes_may_change_every_message(comm)
        assert calls == []
        comm.bcast("probe: proves the counter sees pickles", root=0)
    finally:
        MPI.pickle.__init__(pickle.dumps, pickle.loads)
    assert "str" in calls or comm.rank != 0


def test_detached_sends_complete_in_the_background(comm: MPI.Comm) -> None:
    """Detached sends need no wait: they stay in flight while the sender goes on (above the
    eager limit they cannot finish before the receiver takes them), and ``flush`` ends them."""
    transport = make_transport(comm)
    payload = torch.arange(100_000, dtype=torch.float32)
    if comm.rank == 0:
        for step in range(3):
            transport.detach([transport.isend(payload + step, 1, Kind.GRADIENT, step=step)])
        assert len(transport.sends.detached) == 3  # rank 1 receives only after the barrier
        transport.barrier()
        transport.flush()
        assert transport.sends.detached == []
    elif comm.rank == 1:
        transport.barrier()
        for step in range(3):
            message = transport.recv(Kind.GRADIENT, 0)
            assert message.step == step and torch.equal(message.tensor, payload + step)
    else:
        transport.barrier()
    transport.close()


def test_sends_to_an_abandoned_peer_are_not_waited_for(comm: MPI.Comm) -> None:
    """A rank that left the run (a dropped site) is not waited for at ``flush``; its send
    stays in flight with its memory, so a late receive still reads valid bytes."""
    transport = make_transport(comm)
    payload = torch.arange(100_000, dtype=torch.float32)
    if comm.rank == 0:
        transport.detach([transport.isend(payload, 1, Kind.GRADIENT)])
        transport.abandon(1)
        transport.flush()  # at once: rank 1 receives only after the barrier
        assert transport.sends.detached == [] and len(transport.sends.orphans) == 1
    transport.barrier()
    if comm.rank == 1:
        assert torch.equal(transport.recv(Kind.GRADIENT, 0).tensor, payload)
    transport.barrier()  # rank 0 keeps the memory until rank 1 has read it
    transport.close()


@pytest.mark.parametrize("source", [1, ANY_SOURCE])
def test_timed_out_receive_takes_nothing_later(comm: MPI.Comm, source: int) -> None:
    """A receive that timed out leaves no receive posted behind: the next messages go to
    the next receives, in order (a server that drops a silent client goes on receiving)."""
    transport = make_transport(comm, timeout_s=0.2)
    if comm.rank == 0:
        with pytest.raises(PeerTimeout):
            transport.recv(Kind.ACTIVATION, source)
        comm.Barrier()
        assert [transport.recv(Kind.ACTIVATION, 1).step for _ in range(2)] == [1, 2]
    else:
        comm.Barrier()
        if comm.rank == 1:
            for step in (1, 2):
                transport.send(torch.ones(4), 0, Kind.ACTIVATION, step=step)
    comm.Barrier()
    transport.close()


def test_message_over_two_gib(comm: MPI.Comm) -> None:
    """Counts beyond 2**31 bytes travel: in one message with MPI-4 large counts (mpi4py uses
    them), in parts below the limit on a library without them (Open MPI 5.0: MPI 3.1)."""
    transport = make_transport(comm, timeout_s=120.0)
    assert (transport.part_bytes is None) == large_counts()
    size = (2 << 30) + 4096
    if comm.rank == 1:
        payload = torch.zeros(size, dtype=torch.uint8)
        payload[-1] = 7
        transport.send(payload, 0, Kind.ACTIVATION)
    elif comm.rank == 0:
        received = transport.recv(Kind.ACTIVATION, 1).tensor
        assert received.numel() == size and int(received[-1]) == 7 and int(received[0]) == 0
    transport.close()


@pytest.mark.parametrize("part_bytes", [1000, 4096])
def test_payloads_split_into_parts_arrive_whole(comm: MPI.Comm, part_bytes: int) -> None:
    """A payload larger than ``part_bytes`` goes as several messages (the limit a library
    without large counts sets at 1 GiB, forced small here): blocking, nonblocking and into
    a given buffer, sizes that are and are not multiples of the part, in order."""
    transport = make_transport(comm, part_bytes=part_bytes)
    tensors = [
        torch.randn(n, generator=torch.Generator().manual_seed(n))
        for n in (INLINE_LIMIT // 4 + 1, 25_000, 1024 * part_bytes // 4)
    ]
    assert len(part_spans(tensors[1].nbytes, transport.part_bytes)) == -(-100_000 // part_bytes)
    if comm.rank == 1:
        for tensor in tensors:
            transport.send(tensor, 0, Kind.ACTIVATION)
        transport.isend(tensors[1], 0, Kind.GRADIENT).wait()
    elif comm.rank == 0:
        for tensor in tensors:
            assert torch.equal(transport.recv(Kind.ACTIVATION, 1).tensor, tensor)
        out = torch.empty_like(tensors[1])
        assert transport.recv(Kind.GRADIENT, 1, out=out).tensor is out
        assert torch.equal(out, tensors[1])
        expected = sum(HEADER_BYTES + t.nbytes for t in tensors)
        assert transport.traffic.recv_bytes[1, Kind.ACTIVATION] == expected
    transport.close()


def test_persistent_send_cache_starts_afresh(
    comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inline sends of more sizes than the persistent-request cache holds still arrive
    whole and in order (the cache is freed and rebuilt)."""
    monkeypatch.setattr("mpisplit.transport._MAX_PERSISTENT", 2)
    transport = make_transport(comm)
    sizes = [3, 1, 4, 1, 5, 9, 2, 6, 3, 5]
    if comm.rank == 1:
        for step, n in enumerate(sizes):
            transport.send(
                torch.arange(n, dtype=torch.float32) + step, 0, Kind.ACTIVATION, step=step
            )
        assert len(transport._inline_sends) <= 2
    elif comm.rank == 0:
        for step, n in enumerate(sizes):
            message = transport.recv(Kind.ACTIVATION, 1)
            assert message.step == step
            assert torch.equal(message.tensor, torch.arange(n, dtype=torch.float32) + step)
    transport.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_aware", [False, True])
def test_device_tensors_round_trip(
    comm: MPI.Comm, cuda_aware: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Device buffers go straight to a CUDA-aware MPI, or are staged through pinned host
    memory; either way a large payload arrives on the device."""
    monkeypatch.setenv("MPISPLIT_CUDA_AWARE", "1" if cuda_aware else "0")
    transport = make_transport(comm, device=torch.device("cuda"))
    assert transport.cuda_aware is cuda_aware
    tensor = torch.arange(3 << 20, dtype=torch.float32, device="cuda")
    if comm.rank == 1:
        transport.send(tensor, 0, Kind.ACTIVATION)
    elif comm.rank == 0:
        received = transport.recv(Kind.ACTIVATION, 1).tensor
        assert received.device.type == "cuda"
        assert torch.equal(received, tensor)
    transport.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_staged_sends_keep_their_order(comm: MPI.Comm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Staged device sends are posted after their copies end, yet messages to one rank
    arrive in the order they were sent, a small (inline) one after large staged ones; the
    pinned buffers are reused once the sends complete."""
    monkeypatch.setenv("MPISPLIT_CUDA_AWARE", "0")
    transport = make_transport(comm, device=torch.device("cuda"))
    sizes = [1 << 20, 3 << 18, 1 << 20, 5, 1 << 20]
    if comm.rank == 1:
        for _ in range(2):
            pending = [
                transport.isend(
                    torch.full((n,), float(i), device="cuda"), 0, Kind.ACTIVATION, step=i
                )
                for i, n in enumerate(sizes)
            ]
            for send in pending:
                send.wait()
        assert not transport.sends.staged
    elif comm.rank == 0:
        for _ in range(2):
            for i, n in enumerate(sizes):
                message = transport.recv(Kind.ACTIVATION, 1)
                assert message.step == i and message.tensor.shape == (n,)
                assert torch.equal(message.tensor.cpu(), torch.full((n,), float(i)))
    transport.close()


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_tuple_cut_exchange_matches_local_autograd(comm: MPI.Comm, compression: str) -> None:
    """A cut of two float tensors, a bool mask and int64 lengths: the mask and lengths arrive
    exactly (never compressed), the float gradients come back, one float unused above the
    cut gets a zero gradient (and the sender does not wait forever for it)."""
    transport = make_transport(comm, compressor=make_compressor(compression))
    torch.manual_seed(2)
    lower, upper = torch.nn.Linear(6, 4), torch.nn.Linear(4, 2)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 1, 0, 1])
    mask, lengths = x[:, 0] > 0, torch.arange(5)

    def head(hidden, unused, mask, lengths):
        return upper(hidden * mask.unsqueeze(1)) + 0 * lengths.unsqueeze(1)

    if comm.rank == 1:
        hidden, unused = lower(x), lower(x) * 2
        anchor = send_forward((hidden, unused, mask, lengths), transport, 0)
        anchor.backward()
        if compression == "none":
            reference = torch.nn.functional.cross_entropy(head(lower(x), None, mask, lengths), y)
            expected = torch.autograd.grad(reference, lower.weight)[0]
            torch.testing.assert_close(lower.weight.grad, expected)
        assert lower.weight.grad is not None
    elif comm.rank == 0:
        value, message = recv_forward(transport, 1)
        hidden, unused, got_mask, got_lengths = value
        assert hidden.requires_grad and unused.requires_grad
        assert got_mask.dtype is torch.bool and torch.equal(got_mask, mask)
        assert got_lengths.dtype is torch.int64 and torch.equal(got_lengths, lengths)
        assert not got_mask.requires_grad and message.flags == 0
        torch.nn.functional.cross_entropy(head(hidden, unused, got_mask, got_lengths), y).backward()
    transport.flush()
    transport.close()


def test_waits_share_cores_only_when_ranks_outnumber_them(comm: MPI.Comm) -> None:
    """Every rank of this tier runs on one node, started unbound: they share its cores when
    there are more of them than cores (3 ranks on CI's 2 cores), and only then."""
    transport = make_transport(comm)
    assert transport.deadlines.shared_cores == (comm.Get_size() > len(os.sched_getaffinity(0)))
    transport.close()
