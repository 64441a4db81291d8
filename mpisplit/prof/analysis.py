"""The metrics of ``profile.json``, each a pure function of an aligned ``Timeline``.

Definitions (all on the common clock, over the run window ``wall`` = start of the first
training step of any rank to last span end of any rank, the same window for every rank; the
start-up before it, from the first span, is ``setup_s``):

* **breakdown**: every instant of a rank is in exactly one state, the innermost wins:
  ``wait`` (a ``wait`` span: blocked until a message arrives), else ``comm`` (inside a
  send/recv: moving bytes, or inside a collective: weight averages, gradient allreduce,
  the vertical cut's gather/scatter, barriers), else ``compute`` (inside a compute span,
  data reads included), else ``idle`` (no span: Python between phases, evaluation
  bookkeeping, before start/after finish). The four fractions sum to 1.
* **bytes**: ``bytes[a][b]`` = Σ over a's sends to b of payload + ``HEADER_BYTES``, what MPI
  moves (the transport counts the same, and so does the PMPI library). Point-to-point only.
* **collective bytes**: per rank and kind, the bytes the rank contributed to collectives and
  got back from them (its buffers, not the MPI library's wire traffic, which depends on the
  algorithm), and how many it completed.
* **bandwidth** of link a→b: its bytes over the time the link was busy, the union of a's
  send spans to b and b's recv spans from a.
* **overlap** of rank r: the fraction of r's ``comm`` time during which at least one other
  rank is in ``compute``; 0 means communication stalls the whole job, 1 that it is hidden.
* **bubble** of the server (the rank labelled ``server``, else the one receiving the most
  bytes): the fraction of its steady-state window spent in ``wait`` or ``idle``. The steady
  window runs from the start of its second training step to the start of its last one,
  which leaves out start-up and the final evaluation.
* **steps**: a rank's step starts are the first compute span carrying each ``step`` arg;
  step time is the time between consecutive starts (so it includes waiting and comm).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from mpisplit.codec import HEADER_BYTES
from mpisplit.prof import intervals as iv
from mpisplit.prof.trace import RankTrace, Timeline

STATES = ("compute", "comm", "wait", "idle")


@dataclass(frozen=True)
class States:
    """One rank's time split into disjoint states (see the module docstring)."""

    compute: iv.Intervals
    comm: iv.Intervals
    wait: iv.Intervals

    def busy(self) -> iv.Intervals:
        return iv.join(self.compute, self.comm, self.wait)


def states(rank: RankTrace, window: tuple[float, float]) -> States:
    """The rank's states inside the run window."""

    def of(cat: str) -> iv.Intervals:
        return iv.clip(iv.union([(s.start, s.end) for s in rank.spans if s.cat == cat]), *window)

    wait = of("wait")
    comm = iv.subtract(iv.join(of("comm"), of("collective")), wait)
    compute = iv.subtract(of("compute"), iv.join(comm, wait))
    return States(compute, comm, wait)


PHASES = ("forward", "backward")


def phases(rank: RankTrace, st: States) -> dict[str, iv.Intervals]:
    """The rank's compute time inside ``forward`` and inside ``backward`` spans (the rest
    of its compute is data reads, optimizer steps and evaluation)."""
    return {
        name: iv.intersect(
            iv.union(
                [(s.start, s.end) for s in rank.spans if s.cat == "compute" and s.name == name]
            ),
            st.compute,
        )
        for name in PHASES
    }


def star_centre(sent: np.ndarray, min_ranks: int = 7) -> int | None:
    """The hub of a star topology of at least ``min_ranks`` ranks: the rank through which
    at least 95 % of the bytes go (None for smaller jobs or other shapes)."""
    total = sent.sum()
    if len(sent) < min_ranks or not total:
        return None
    hub = int(np.argmax(sent.sum(axis=0) + sent.sum(axis=1)))
    through = sent[hub].sum() + sent[:, hub].sum()
    return hub if through >= 0.95 * total else None


def breakdown(timeline: Timeline, all_states: dict[int, States]) -> dict[int, dict[str, float]]:
    """Seconds and fractions of the run window per state, per rank."""
    wall = max(timeline.wall, 1e-12)
    out = {}
    for rank, st in all_states.items():
        seconds = {
            "compute": iv.length(st.compute),
            "comm": iv.length(st.comm),
            "wait": iv.length(st.wait),
        }
        seconds["idle"] = max(wall - sum(seconds.values()), 0.0)
        out[rank] = {
            **{f"{k}_s": v for k, v in seconds.items()},
            **{f"{k}_fraction": v / wall for k, v in seconds.items()},
        }
    return out


def bytes_matrix(timeline: Timeline) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, messages) sent from row rank to column rank, headers included; sized to
    every rank seen, so a rank whose trace is missing still gets its column."""
    sends = [(r.rank, s) for r in timeline.ranks for s in r.messages("send")]
    size = 1 + max([r.rank for r in timeline.ranks] + [s.peer for _, s in sends])
    sent, count = np.zeros((size, size), np.int64), np.zeros((size, size), np.int64)
    for rank, span in sends:
        sent[rank, span.peer] += span.args["bytes"] + HEADER_BYTES
        count[rank, span.peer] += 1
    return sent, count


def collective_bytes(timeline: Timeline) -> dict[int, dict[str, dict[str, int]]]:
    """Per rank and kind: bytes sent to and received from collectives, and their count."""
    out: dict[int, dict[str, dict[str, int]]] = {}
    for r in timeline.ranks:
        for span in r.spans:
            if span.cat != "collective":
                continue
            row = out.setdefault(r.rank, {}).setdefault(
                span.args["kind"], {"sent": 0, "received": 0, "calls": 0}
            )
            row["sent"] += span.args["bytes_sent"]
            row["received"] += span.args["bytes_received"]
            row["calls"] += 1
    return out


def bandwidth(timeline: Timeline, sent: np.ndarray) -> list[dict[str, float]]:
    """Effective bandwidth of every link that carried bytes."""
    by_rank = {r.rank: r for r in timeline.ranks}
    links = []
    for a, b in zip(*np.nonzero(sent), strict=True):
        a, b = int(a), int(b)
        busy = iv.union(
            [(s.start, s.end) for s in by_rank[a].messages("send") if s.peer == b]
            + [(s.start, s.end) for s in by_rank[b].messages("recv") if s.peer == a]
        )
        seconds = iv.length(busy)
        links.append(
            {
                "sender": a,
                "receiver": b,
                "bytes": int(sent[a, b]),
                "busy_s": seconds,
                "mb_per_s": sent[a, b] / seconds / 1e6 if seconds else float("nan"),
            }
        )
    return links


def overlap(all_states: dict[int, States]) -> dict[int, float | None]:
    """Per rank: fraction of its comm time while another rank computes (None: no comm)."""
    out = {}
    for rank, st in all_states.items():
        others = iv.join(*(o.compute for q, o in all_states.items() if q != rank))
        comm = iv.length(st.comm)
        out[rank] = iv.length(iv.intersect(st.comm, others)) / comm if comm else None
    return out


def server_rank(timeline: Timeline, sent: np.ndarray) -> int:
    for r in timeline.ranks:
        if r.label == "server":
            return r.rank
    return int(np.argmax(sent.sum(axis=0)))


def step_starts(rank: RankTrace) -> np.ndarray:
    first: dict[int, float] = defaultdict(lambda: float("inf"))
    for s in rank.spans:
        if s.cat == "compute" and "step" in s.args:
            first[s.args["step"]] = min(first[s.args["step"]], s.start)
    return np.sort(np.fromiter(first.values(), float, len(first)))


def bubble(rank: RankTrace, st: States) -> dict[str, float] | None:
    """Wait + idle fraction of the server's steady-state window (None: < 3 steps)."""
    starts = step_starts(rank)
    if len(starts) < 3:
        return None
    lo, hi = float(starts[1]), float(starts[-1])
    window = hi - lo
    busy = iv.length(iv.clip(iv.join(st.compute, st.comm), lo, hi))
    wait = iv.length(iv.clip(st.wait, lo, hi))
    return {
        "rank": rank.rank,
        "window_start_s": lo,
        "window_end_s": hi,
        "bubble_fraction": 1 - busy / window,
        "wait_fraction": wait / window,
        "idle_fraction": 1 - (busy + wait) / window,
    }


def step_stats(rank: RankTrace) -> dict[str, float] | None:
    """Step time statistics in seconds (None: fewer than two steps)."""
    times = np.diff(step_starts(rank))
    if not len(times):
        return None
    return {
        "steps": len(times) + 1,
        "mean_s": float(times.mean()),
        "median_s": float(np.median(times)),
        "p95_s": float(np.percentile(times, 95)),
    }
