"""Per-rank timeline of compute phases and communication, as Chrome trace events.

The engine wraps each phase in ``tracer.span(...)``; the transport records every message
(post and wait separately, so waiting is told apart from transfer). A disabled tracer costs a
branch per span. Files are ``trace-rank<R>.json`` and open in Perfetto / chrome://tracing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Tracer:
    def __init__(self, rank: int, label: str, *, enabled: bool) -> None:
        self.rank = rank
        self.label = label
        self.enabled = enabled
        self._events: list[dict[str, Any]] = []
        self._origin = time.perf_counter()

    def now_us(self) -> float:
        return (time.perf_counter() - self._origin) * 1e6

    @contextmanager
    def span(self, name: str, cat: str = "compute", **args: Any) -> Iterator[dict[str, Any]]:
        """Records the enclosed time; callers may add to the yielded args (e.g. bytes)."""
        if not self.enabled:
            yield args
            return
        start = self.now_us()
        try:
            yield args
        finally:
            self._events.append(
                {
                    "name": name,
                    "cat": cat,
                    "ph": "X",
                    "ts": start,
                    "dur": self.now_us() - start,
                    "pid": self.rank,
                    "tid": 0,
                    "args": args,
                }
            )

    def write(self, run_dir: Path) -> Path | None:
        if not self.enabled:
            return None
        meta = [
            {
                "name": "process_name",
                "ph": "M",
                "pid": self.rank,
                "args": {"name": f"rank {self.rank} {self.label}"},
            },
            {
                "name": "process_sort_index",
                "ph": "M",
                "pid": self.rank,
                "args": {"sort_index": self.rank},
            },
        ]
        path = run_dir / f"trace-rank{self.rank}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"traceEvents": meta + self._events, "displayTimeUnit": "ms"}))
        tmp.replace(path)
        return path
