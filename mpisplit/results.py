"""``mpisplit results``: the summaries of many runs as one table, grouped by what varies.

Each run directory contributes its ``summary.json``; a directory without one (a sweep's
``out``) contributes every run directory below it. The grouping keys are a sweep's axes
(from each point's ``point.json``), or else the config keys whose values differ between the
runs (``config.yaml``, paths left out). Runs that differ only in the ``--over`` keys (default
``train.seed``) form one row: the mean and the range (min-max) of each metric over them.
Preempted and failed runs are left out and counted.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mpisplit.sweep import POINT_FILE, finished

_IGNORED = ("run.dir", "checkpoint.dir", "data.path")
"""Config keys that differ between runs without being a setting worth grouping by."""


@dataclass(frozen=True)
class Run:
    path: Path
    values: dict[str, Any]
    """The swept values of this run (axis or config key → value)."""
    summary: dict[str, Any]


@dataclass(frozen=True)
class Row:
    key: tuple[Any, ...]
    runs: int
    stats: dict[str, tuple[float, float, float] | None]
    """metric → (mean, min, max) over the runs that report it."""


def find_runs(paths: Sequence[Path]) -> tuple[list[Run], int]:
    """The finished runs under ``paths``, and how many unfinished ones were left out."""
    runs, skipped = [], 0
    for root in paths:
        if not root.is_dir():
            raise ValueError(f"{root}: not a directory")
        candidates = (
            [root]
            if (root / "summary.json").exists()
            else sorted(p.parent for p in root.rglob("summary.json"))
        )
        if not candidates:
            raise ValueError(f"{root}: no summary.json in it or below it")
        for directory in candidates:
            if not finished(directory):
                skipped += 1
                continue
            runs.append(
                Run(
                    directory,
                    _point_values(directory),
                    json.loads((directory / "summary.json").read_text()),
                )
            )
    return runs, skipped


def _point_values(directory: Path) -> dict[str, Any]:
    point = directory / POINT_FILE
    return json.loads(point.read_text())["values"] if point.exists() else {}


def swept_keys(runs: Sequence[Run]) -> tuple[list[str], list[Run]]:
    """The keys the runs differ in, and the runs carrying those values: a sweep's axes when
    every run has them, else the config keys that differ (flattened ``config.yaml``)."""
    if runs and all(r.values for r in runs):
        keys = list(dict.fromkeys(k for r in runs for k in r.values))
        return keys, list(runs)
    configs = [_flat_config(r.path) for r in runs]
    keys = sorted(
        {
            k
            for c in configs
            for k in c
            if k not in _IGNORED and len({_hashable(x.get(k)) for x in configs}) > 1
        }
    )
    return keys, [
        Run(r.path, {k: c.get(k) for k in keys}, r.summary)
        for r, c in zip(runs, configs, strict=True)
    ]


def _flat_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.yaml"
    data = yaml.safe_load(path.read_text()) if path.exists() else {}
    return {
        f"{section}.{key}": value
        for section, items in (data or {}).items()
        if isinstance(items, dict)
        for key, value in items.items()
    }


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True)


def table(runs: Sequence[Run], keys: Sequence[str], metrics: Sequence[str]) -> list[Row]:
    """One row per distinct value of ``keys``, in order of first appearance."""
    groups: dict[tuple[Any, ...], list[Run]] = {}
    for run in runs:
        key = tuple(_hashable(run.values.get(k)) for k in keys)
        groups.setdefault(key, []).append(run)
    rows = []
    for members in groups.values():
        stats = {}
        for metric in metrics:
            values = [
                float(v)
                for r in members
                if isinstance(v := r.summary.get(metric), (int, float)) and math.isfinite(v)
            ]
            stats[metric] = (
                (sum(values) / len(values), min(values), max(values)) if values else None
            )
        rows.append(Row(tuple(members[0].values.get(k) for k in keys), len(members), stats))
    return sorted(rows, key=lambda row: [_sort_key(v) for v in row.key])


def _sort_key(value: Any) -> tuple[int, Any]:
    return (
        (0, value)
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else (1, str(value))
    )


def _cells(row: Row, metrics: Sequence[str]) -> list[str]:
    cells = [_show(v) for v in row.key] + [str(row.runs)]
    for metric in metrics:
        stat = row.stats[metric]
        cells += [
            "" if stat is None else _number(stat[0]),
            "" if stat is None else f"{_number(stat[1])}-{_number(stat[2])}",
        ]
    return cells


def _number(value: float) -> str:
    """Four decimals for accuracies and losses, fewer as numbers grow (bytes: exponent)."""
    if abs(value) < 100:
        return f"{value:.4f}"
    return f"{value:.1f}" if abs(value) < 1e6 else f"{value:.4g}"


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def header(keys: Sequence[str], metrics: Sequence[str]) -> list[str]:
    return [*keys, "runs", *(f"{m} {part}" for m in metrics for part in ("mean", "range"))]


def print_table(rows: Sequence[Row], keys: Sequence[str], metrics: Sequence[str]) -> None:
    lines = [header(keys, metrics), *(_cells(row, metrics) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def write_csv(path: Path, rows: Sequence[Row], keys: Sequence[str], metrics: Sequence[str]) -> None:
    """Mean, min and max of each metric in separate columns."""
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(
            [*keys, "runs", *(f"{m}_{s}" for m in metrics for s in ("mean", "min", "max"))]
        )
        for row in rows:
            numbers = [x for m in metrics for x in (row.stats[m] or ("", "", ""))]
            writer.writerow([*map(_show, row.key), row.runs, *numbers])


def plot(path: Path, rows: Sequence[Row], keys: Sequence[str], metric: str, x: str) -> None:
    """``metric`` against swept key ``x``: one line per combination of the other keys,
    the mean with its range over the ``--over`` runs as error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install 'mpisplit[prof]')") from None
    at = list(keys).index(x)
    others = [i for i in range(len(keys)) if i != at]
    lines: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        if row.stats[metric] is not None:
            lines.setdefault(tuple(_show(row.key[i]) for i in others), []).append(row)
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, members in lines.items():
        members = sorted(members, key=lambda r: _sort_key(r.key[at]))
        xs = [r.key[at] for r in members]
        mean = [r.stats[metric][0] for r in members]
        below = [m - r.stats[metric][1] for m, r in zip(mean, members, strict=True)]
        above = [r.stats[metric][2] - m for m, r in zip(mean, members, strict=True)]
        name = ", ".join(f"{keys[i]}={v}" for i, v in zip(others, label, strict=True))
        axes.errorbar(xs, mean, yerr=[below, above], marker="o", capsize=3, label=name or metric)
    ticks = sorted({r.key[at] for r in rows}, key=_sort_key)
    if all(isinstance(t, (int, float)) and t > 0 for t in ticks) and ticks[-1] >= 4 * ticks[0]:
        axes.set_xscale("log", base=2)  # client counts: 2, 4, 8, 16 evenly spaced
        axes.set_xticks(ticks, [str(t) for t in ticks])
    axes.set_xlabel(x)
    axes.set_ylabel(f"{metric} (mean, range)")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(
    paths: Sequence[Path],
    *,
    over: Sequence[str],
    metrics: Sequence[str],
    csv_path: Path | None,
    plot_path: Path | None,
    x: str | None,
) -> int:
    runs, skipped = find_runs(paths)
    if not runs:
        raise ValueError(f"no finished runs in {', '.join(map(str, paths))} ({skipped} unfinished)")
    swept, runs = swept_keys(runs)
    keys = [k for k in swept if k not in over]
    rows = table(runs, keys, metrics)
    print_table(rows, keys, metrics)
    if skipped:
        print(f"({skipped} unfinished run(s) left out)", file=sys.stderr)
    if csv_path is not None:
        write_csv(csv_path, rows, keys, metrics)
    if plot_path is not None:
        numeric = [
            k for i, k in enumerate(keys) if all(isinstance(r.key[i], (int, float)) for r in rows)
        ]
        x = x or (numeric[0] if numeric else (keys[0] if keys else None))
        if x is None or x not in keys:
            raise ValueError(f"--x: choose one of the grouping keys ({', '.join(keys)}), got {x}")
        plot(plot_path, rows, keys, metrics[0], x)
    return 0
