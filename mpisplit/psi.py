"""Private set intersection of the vertical parties' ids (commutative blinding over X25519).

Vertical parties must train on the ids they all hold, without telling each other which other
ids they hold. Each member hashes its ids onto Curve25519 (SHA-256 of a domain tag and the
id, read as an X25519 u-coordinate) and blinds them with a secret scalar: X25519 computes
``x([k]P)``, and scalar multiplication commutes, so a point blinded by every member's key is
the same whichever order the keys were applied in, while a point blinded by a key one does
not hold reveals nothing (decisional Diffie-Hellman). Protocol on a communicator whose
``comparator`` rank (the vertical server) may or may not hold ids itself:

1. ``Allgather`` of set sizes (the one thing about its set a member reveals).
2. Ring: each member shuffles its hashed ids with a private permutation, blinds them, and
   the sets travel round the members, each blinding what it receives, until every set holds
   every member's key; one more hop returns each set, in its owner's order, to its owner.
   The hop that returns the comparator's own set shuffles it first, so the comparator can
   never link a fully blinded value to one of its ids.
3. Every other member sends its fully blinded set to the comparator, which intersects them
   and broadcasts the blinded intersection; each member maps it back to its own ids.
4. A comparator that holds ids gets the (raw) intersection from the first other member.

What each side learns: the set sizes and the intersection. No member ever receives a value
blinded only by keys it holds, so nobody can test a guessed id against what it received. The
comparator also sees how many blinded values each combination of members shares (not which
ids). Semi-honest, non-colluding members: a member that deviates from the protocol or shares
its key with another is outside this model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from mpi4py import MPI

POINT_BYTES = 32
_DOMAIN = b"mpisplit-psi-v1:"
_TAG_RING, _TAG_SET, _TAG_RESULT = 7101, 7102, 7103

Observer = Callable[[str, np.ndarray], None]
"""Called with (what, array) for every buffer a rank receives; the leak tests use it."""


# --- the pure core ----------------------------------------------------------------------


def hash_ids(ids: np.ndarray) -> np.ndarray:
    """[N, 32] uint8: one Curve25519 u-coordinate per id (SHA-256 of tag + int64 LE id)."""
    ids = np.ascontiguousarray(ids, dtype="<i8")
    out = np.empty((len(ids), POINT_BYTES), np.uint8)
    for row, raw in enumerate(ids.view(np.uint8).reshape(-1, 8)):
        out[row] = np.frombuffer(hashlib.sha256(_DOMAIN + raw.tobytes()).digest(), np.uint8)
    return out


class BlindingKey:
    """One member's secret scalar; ``blind`` multiplies points by it."""

    def __init__(self, key: X25519PrivateKey | None = None) -> None:
        self._key = key or X25519PrivateKey.generate()

    def blind(self, points: np.ndarray) -> np.ndarray:
        """[N, 32] uint8 points, each multiplied by this key's scalar."""
        exchange, load = self._key.exchange, X25519PublicKey.from_public_bytes
        out = np.empty_like(points)
        for row, point in enumerate(points):
            out[row] = np.frombuffer(exchange(load(point.tobytes())), np.uint8)
        return out


def as_keys(points: np.ndarray) -> np.ndarray:
    """Points as one fixed-width bytes value each, which numpy can sort and compare."""
    return np.ascontiguousarray(points).view(f"V{POINT_BYTES}").reshape(-1)


def intersect_blinded(sets: list[np.ndarray]) -> np.ndarray:
    """[M, 32] sorted points present in every set (each set [N_i, 32])."""
    common = as_keys(sets[0])
    for points in sets[1:]:
        common = np.intersect1d(common, as_keys(points))
    return np.unique(common).view(np.uint8).reshape(-1, POINT_BYTES)


def select_ids(ids: np.ndarray, blinded: np.ndarray, common: np.ndarray) -> np.ndarray:
    """Sorted ``ids`` whose fully blinded point (``blinded``, same order) is in ``common``."""
    return np.sort(ids[np.isin(as_keys(blinded), as_keys(common))])


# --- the protocol over MPI --------------------------------------------------------------


def private_intersection(
    comm: MPI.Comm,
    mine: np.ndarray | None,
    *,
    comparator: int = 0,
    key: BlindingKey | None = None,
    observe: Observer | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray | None, int, np.ndarray]:
    """(sorted common ids, or None on a comparator without ids; their number; every rank's
    set size, -1 for a rank without ids). Collective over ``comm``; ``mine`` is None on a
    rank that holds no ids (only the comparator may); ``key`` defaults to a fresh one."""
    observe = observe or (lambda what, array: None)
    rng = rng or np.random.default_rng()
    sizes = np.zeros(comm.Get_size(), np.int64)
    comm.Allgather(np.array([-1 if mine is None else len(mine)], np.int64), sizes)
    members = [rank for rank in range(comm.Get_size()) if sizes[rank] >= 0]
    if comm.Get_rank() != comparator and mine is None:
        raise ValueError("private_intersection: only the comparator may hold no ids")
    blinded = ids = None
    if mine is not None:
        ids = rng.permutation(np.asarray(mine, np.int64))
        blinded = _ring(comm, members, sizes, ids, key or BlindingKey(), comparator, observe, rng)
    common = _compare(comm, members, sizes, blinded, comparator, observe)
    if ids is None:
        return None, len(common), sizes
    if comm.Get_rank() != comparator:
        result = select_ids(ids, blinded, common)
        if comm.Get_rank() == _first_other(members, comparator):
            comm.Send(result, dest=comparator, tag=_TAG_RESULT)
        return result, len(result), sizes
    result = np.empty(len(common), np.int64)
    if len(members) > 1:
        comm.Recv(result, source=_first_other(members, comparator), tag=_TAG_RESULT)
        observe("result", result)
    else:
        result = np.sort(ids)  # the only member: its set is the intersection
    return result, len(result), sizes


def _ring(
    comm: MPI.Comm,
    members: list[int],
    sizes: np.ndarray,
    ids: np.ndarray,
    key: BlindingKey,
    comparator: int,
    observe: Observer,
    rng: np.random.Generator,
) -> np.ndarray:
    """This member's own ids (in the order of ``ids``), blinded by every member's key."""
    me, count = members.index(comm.Get_rank()), len(members)
    nxt, prev = members[(me + 1) % count], members[(me - 1) % count]
    held = key.blind(hash_ids(ids))
    for hop in range(1, count + 1):
        owner = members[(me - hop + 1) % count]  # whose set ``held`` is
        if hop == count and owner == comparator:
            held = held[rng.permutation(len(held))]  # the comparator must not link its own
        incoming = np.empty((sizes[members[(me - hop) % count]], POINT_BYTES), np.uint8)
        comm.Sendrecv(
            held, dest=nxt, sendtag=_TAG_RING, recvbuf=incoming, source=prev, recvtag=_TAG_RING
        )
        observe("ring", incoming)
        held = key.blind(incoming) if hop < count else incoming
    return held


def _compare(
    comm: MPI.Comm,
    members: list[int],
    sizes: np.ndarray,
    blinded: np.ndarray | None,
    comparator: int,
    observe: Observer,
) -> np.ndarray:
    """The blinded intersection, computed by the comparator and broadcast to all."""
    if comm.Get_rank() == comparator:
        sets = [] if blinded is None else [blinded]
        for rank in members:
            if rank != comparator:
                points = np.empty((sizes[rank], POINT_BYTES), np.uint8)
                comm.Recv(points, source=rank, tag=_TAG_SET)
                observe("set", points)
                sets.append(points)
        common = intersect_blinded(sets)
        count = np.array([len(common)], np.int64)
    else:
        comm.Send(blinded, dest=comparator, tag=_TAG_SET)
        count = np.zeros(1, np.int64)
    comm.Bcast(count, root=comparator)
    if comm.Get_rank() != comparator:
        common = np.empty((int(count[0]), POINT_BYTES), np.uint8)
    comm.Bcast(common, root=comparator)
    if comm.Get_rank() != comparator:
        observe("common", common)
    return common


def _first_other(members: list[int], comparator: int) -> int:
    return next(rank for rank in members if rank != comparator)
