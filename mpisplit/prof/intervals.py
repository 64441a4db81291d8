"""Sets of time as sorted, disjoint ``[start, end)`` rows of an ``(n, 2)`` float array.

Spans nest (a client's ``backward`` contains the wait for the cut gradient) and overlap
across ranks, so every metric is a length of unions, intersections and differences of these
sets rather than a sum of span durations, which would count nested time twice.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

Intervals = np.ndarray

EMPTY: Intervals = np.zeros((0, 2))


def union(pairs: Iterable[tuple[float, float]] | np.ndarray) -> Intervals:
    """Merges possibly overlapping ``(start, end)`` pairs into a disjoint sorted set."""
    rows = np.asarray(list(pairs) if not isinstance(pairs, np.ndarray) else pairs, float)
    rows = rows.reshape(-1, 2)
    rows = rows[rows[:, 1] > rows[:, 0]]
    if not len(rows):
        return EMPTY
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    reach = np.maximum.accumulate(rows[:, 1])
    starts_new = np.r_[True, rows[1:, 0] > reach[:-1]]
    group = np.cumsum(starts_new) - 1
    merged = np.empty((group[-1] + 1, 2))
    merged[:, 0] = rows[starts_new, 0]
    merged[:, 1] = np.maximum.reduceat(reach, np.flatnonzero(starts_new))
    return merged


def join(*sets: Intervals) -> Intervals:
    return union(np.concatenate([EMPTY, *sets]))


def intersect(a: Intervals, b: Intervals) -> Intervals:
    """Two-pointer intersection of two disjoint sorted sets."""
    out: list[tuple[float, float]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i, 0], b[j, 0]), min(a[i, 1], b[j, 1])
        if start < end:
            out.append((start, end))
        if a[i, 1] < b[j, 1]:
            i += 1
        else:
            j += 1
    return np.asarray(out, float).reshape(-1, 2)


def subtract(a: Intervals, b: Intervals) -> Intervals:
    """The part of ``a`` outside ``b``."""
    if not len(a) or not len(b):
        return a
    lo, hi = min(a[0, 0], b[0, 0]), max(a[-1, 1], b[-1, 1])
    gaps = np.column_stack([np.r_[lo, b[:, 1]], np.r_[b[:, 0], hi]])
    return intersect(a, union(gaps))


def clip(a: Intervals, lo: float, hi: float) -> Intervals:
    return intersect(a, np.array([[lo, hi]]))


def length(a: Intervals) -> float:
    return float((a[:, 1] - a[:, 0]).sum()) if len(a) else 0.0
