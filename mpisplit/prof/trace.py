"""Loads the per-rank traces and puts every rank on one clock.

Each rank's tracer counts from its own start, and ranks on different nodes do not share a
clock, so offsets are estimated from the messages themselves: the n-th ``send`` of a kind
from rank a to rank b is the n-th ``recv`` of that kind from a on b (MPI does not reorder
messages of one tag between two ranks), and a message cannot be received before it was
posted. With traffic in both directions that bounds the offset from both sides; the offset
is the middle of the bounds and half their width is reported as its uncertainty.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TRACE_RE = re.compile(r"^trace-rank(\d+)\.json$")
_LABEL_RE = re.compile(r"^rank \d+ (.+)$")


@dataclass(frozen=True)
class Span:
    """One complete event, in seconds on the rank's own clock until aligned."""

    name: str
    cat: str
    start: float
    end: float
    args: dict[str, Any]

    @property
    def peer(self) -> int | None:
        return self.args.get("peer")


@dataclass
class RankTrace:
    rank: int
    label: str
    spans: list[Span]
    meta: list[dict[str, Any]] = field(default_factory=list)

    def messages(self, what: str) -> list[Span]:
        """``send`` or ``recv`` comm spans, in start order."""
        return sorted(
            (s for s in self.spans if s.cat == "comm" and s.name.startswith(what)),
            key=lambda s: s.start,
        )


@dataclass(frozen=True)
class Match:
    """A send span on ``sender`` and the recv span of the same message on ``receiver``."""

    sender: int
    receiver: int
    send: Span
    recv: Span


@dataclass
class Timeline:
    """All ranks on rank 0's clock, shifted so that the first span starts at 0."""

    ranks: list[RankTrace]
    matches: list[Match]
    offsets_s: dict[int, float]
    uncertainty_s: dict[int, float]

    @property
    def start(self) -> float:
        return min((s.start for r in self.ranks for s in r.spans), default=0.0)

    @property
    def end(self) -> float:
        return max((s.end for r in self.ranks for s in r.spans), default=0.0)

    @property
    def first_step(self) -> float:
        """When the first training step began on any rank (its first compute span carrying a
        ``step``): the end of start-up (step plans, building the parts and optimizers)."""
        return min(
            (
                s.start
                for r in self.ranks
                for s in r.spans
                if s.cat == "compute" and "step" in s.args
            ),
            default=self.start,
        )

    @property
    def window(self) -> tuple[float, float]:
        """The run window the profile describes: from the first training step to the end."""
        return self.first_step, self.end

    @property
    def wall(self) -> float:
        return self.end - self.first_step


def trace_files(run_dir: Path) -> dict[int, Path]:
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    found = {int(m.group(1)): p for p in Path(run_dir).iterdir() if (m := _TRACE_RE.match(p.name))}
    if not found:
        raise FileNotFoundError(f"{run_dir}: no trace-rank<R>.json (train with run.trace=true)")
    return dict(sorted(found.items()))


def load_rank(rank: int, path: Path) -> RankTrace:
    events = json.loads(path.read_text())["traceEvents"]
    meta = [e for e in events if e.get("ph") == "M"]
    names = [e["args"]["name"] for e in meta if e["name"] == "process_name"]
    label = m.group(1) if names and (m := _LABEL_RE.match(names[0])) else f"rank{rank}"
    spans = [
        Span(
            e["name"],
            e.get("cat", ""),
            e["ts"] / 1e6,
            (e["ts"] + e["dur"]) / 1e6,
            e.get("args", {}),
        )
        for e in events
        if e.get("ph") == "X"
    ]
    return RankTrace(rank, label, sorted(spans, key=lambda s: s.start), meta)


def load(run_dir: Path) -> Timeline:
    """Reads every rank's trace and aligns the clocks (see the module docstring)."""
    ranks = [load_rank(rank, path) for rank, path in trace_files(run_dir).items()]
    matches = match_messages(ranks)
    offsets, uncertainty = clock_offsets(len(ranks), matches)
    aligned = [_shifted(r, offsets.get(r.rank, 0.0)) for r in ranks]
    origin = min((s.start for r in aligned for s in r.spans), default=0.0)
    aligned = [_shifted(r, -origin) for r in aligned]
    return Timeline(aligned, match_messages(aligned), offsets, uncertainty)


def match_messages(ranks: list[RankTrace]) -> list[Match]:
    """Pairs sends with receives: n-th of a kind from a to b ↔ n-th of it received from a."""
    received: dict[tuple[int, int, str], deque[Span]] = defaultdict(deque)
    for r in ranks:
        for span in r.messages("recv"):
            received[(span.peer, r.rank, span.args.get("kind"))].append(span)
    matches = []
    for r in ranks:
        for span in r.messages("send"):
            queue = received.get((r.rank, span.peer, span.args.get("kind")))
            if queue:
                matches.append(Match(r.rank, span.peer, span, queue.popleft()))
    return matches


def clock_offsets(size: int, matches: list[Match]) -> tuple[dict[int, float], dict[int, float]]:
    """Offset (seconds) to add to each rank's clock to reach rank 0's, and its uncertainty.

    For ranks a, b and d = offset_b - offset_a: a message a→b gives d ≥ send_a - recv_b,
    a message b→a gives d ≤ recv_a - send_b. Offsets propagate from rank 0 along the links
    (breadth first), so a client reaches rank 0 through the server in a star.
    """
    lower: dict[tuple[int, int], float] = {}
    for m in matches:
        key = (m.sender, m.receiver)
        lower[key] = max(lower.get(key, float("-inf")), m.send.start - m.recv.start)
    offsets, spread = {0: 0.0}, {0: 0.0}
    queue = deque([0])
    while queue:
        a = queue.popleft()
        for b in range(size):
            if b in offsets or ((a, b) not in lower and (b, a) not in lower):
                continue
            lo, hi = lower.get((a, b)), _negated(lower.get((b, a)))
            if lo is not None and hi is not None:
                d, half = (lo + hi) / 2, abs(hi - lo) / 2
            else:
                d, half = (lo if lo is not None else hi), float("nan")
            offsets[b], spread[b] = offsets[a] + d, spread[a] + half
            queue.append(b)
    return offsets, spread


def _negated(value: float | None) -> float | None:
    return None if value is None else -value


def _shifted(rank: RankTrace, by: float) -> RankTrace:
    spans = [Span(s.name, s.cat, s.start + by, s.end + by, s.args) for s in rank.spans]
    return RankTrace(rank.rank, rank.label, spans, rank.meta)


def merged_events(timeline: Timeline) -> dict[str, Any]:
    """One Chrome trace of all ranks on the common clock, with a flow arrow per message."""
    events: list[dict[str, Any]] = []
    for r in timeline.ranks:
        events.extend(r.meta)
        events.extend(
            {
                "name": s.name,
                "cat": s.cat,
                "ph": "X",
                "ts": s.start * 1e6,
                "dur": (s.end - s.start) * 1e6,
                "pid": r.rank,
                "tid": 0,
                "args": s.args,
            }
            for s in r.spans
        )
    for n, m in enumerate(timeline.matches):
        flow = {"name": m.send.name.split(" ", 1)[-1], "cat": "message", "id": n, "tid": 0}
        events.append({**flow, "ph": "s", "pid": m.sender, "ts": m.send.start * 1e6})
        events.append({**flow, "ph": "f", "bp": "e", "pid": m.receiver, "ts": m.recv.start * 1e6})
    return {"traceEvents": events, "displayTimeUnit": "ms"}
