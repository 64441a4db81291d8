"""``mpisplit prof report RUN_DIR``: profile.json, trace-merged.json, PNGs, a text summary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mpisplit import pmpi
from mpisplit.prof import analysis, plots
from mpisplit.prof.trace import Timeline, load, merged_events

ZOOM_STEPS = 6


def build(timeline: Timeline) -> tuple[dict[str, Any], dict[int, analysis.States]]:
    """Every metric of the profile (definitions in ``mpisplit.prof.analysis``)."""
    all_states = {r.rank: analysis.states(r, timeline.window) for r in timeline.ranks}
    sent, messages = analysis.bytes_matrix(timeline)
    server = analysis.server_rank(timeline, sent)
    by_rank = {r.rank: r for r in timeline.ranks}
    overlap = analysis.overlap(all_states)
    profile = {
        "wall_s": timeline.wall,
        "window_s": list(timeline.window),
        "setup_s": timeline.first_step - timeline.start,
        "ranks": [{"rank": r.rank, "label": r.label} for r in timeline.ranks],
        "clock": {"offset_s": timeline.offsets_s, "uncertainty_s": timeline.uncertainty_s},
        "breakdown": analysis.breakdown(timeline, all_states),
        "bytes": sent.tolist(),
        "messages": messages.tolist(),
        "collective_bytes": analysis.collective_bytes(timeline),
        "bandwidth": analysis.bandwidth(timeline, sent),
        "comm_overlap_fraction": overlap,
        "bubble": analysis.bubble(by_rank[server], all_states[server]),
        "steps": {r.rank: analysis.step_stats(r) for r in timeline.ranks},
    }
    return profile, all_states


def compare_pmpi(sent: np.ndarray, reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (rank, peer): bytes the trace says were sent vs what the PMPI library counted."""
    rows = []
    for report in reports:
        rank = report["rank"]
        measured = {int(p): v["sent_bytes"] for p, v in report.get("peers", {}).items()}
        for peer in sorted(set(measured) | set(np.flatnonzero(sent[rank]).tolist())):
            traced, counted = int(sent[rank, peer]), int(measured.get(peer, 0))
            rows.append(
                {
                    "rank": rank,
                    "peer": peer,
                    "trace_bytes": traced,
                    "pmpi_bytes": counted,
                    "agree": traced == counted,
                }
            )
    return rows


def zoom_window(profile: dict[str, Any]) -> tuple[float, float] | None:
    """A few steady-state server steps from the middle of the bubble window."""
    bubble = profile["bubble"]
    steps = profile["steps"].get(bubble["rank"]) if bubble else None
    if not bubble or not steps:
        return None
    middle = (bubble["window_start_s"] + bubble["window_end_s"]) / 2
    half = ZOOM_STEPS * steps["median_s"] / 2
    lo, hi = profile["window_s"]
    return max(middle - half, lo), min(middle + half, hi)


def write(run_dir: Path, out: Path) -> dict[str, Any]:
    """Writes every output file into ``out``; returns the profile."""
    timeline = load(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    profile, all_states = build(timeline)
    reports = pmpi.read_reports(run_dir)
    if reports:
        profile["pmpi"] = compare_pmpi(np.array(profile["bytes"]), reports)
    labels = {r.rank: r.label for r in timeline.ranks}
    (out / "trace-merged.json").write_text(json.dumps(merged_events(timeline)))
    (out / "profile.json").write_text(json.dumps(profile, indent=1))
    phases = {r.rank: analysis.phases(r, all_states[r.rank]) for r in timeline.ranks}
    steps = {r.rank: analysis.step_starts(r) for r in timeline.ranks}
    plots.timeline(
        out / "timeline.png",
        all_states,
        labels,
        timeline.window,
        zoom_window(profile),
        phases,
        steps,
    )
    plots.bytes_figure(out / "bytes.png", np.array(profile["bytes"]), labels)
    plots.breakdown_bars(out / "breakdown.png", profile["breakdown"], labels)
    return profile


def render(profile: dict[str, Any]) -> str:
    """The profile as text tables."""
    labels = {r["rank"]: r["label"] for r in profile["ranks"]}
    lines = [
        f"run window {profile['wall_s']:.3f} s from the first training step (start-up "
        f"before it {profile['setup_s']:.3f} s), {len(labels)} ranks",
        "",
        f"{'rank':<12}{'compute':>16}{'comm':>16}{'wait':>16}{'idle':>16}"
        f"{'overlap':>9}{'step ms (mean/median/p95)':>28}",
    ]
    for rank, label in labels.items():
        row = profile["breakdown"][rank]
        cells = "".join(
            f"{row[f'{k}_s']:>8.3f} s {row[f'{k}_fraction']:>4.0%}" for k in analysis.STATES
        )
        over = profile["comm_overlap_fraction"][rank]
        steps = profile["steps"][rank]
        timing = (
            "-"
            if steps is None
            else f"{steps['mean_s'] * 1e3:.2f}/{steps['median_s'] * 1e3:.2f}/"
            f"{steps['p95_s'] * 1e3:.2f}"
        )
        lines.append(
            f"{rank} {label:<10}{cells}{'-' if over is None else f'{over:.0%}':>9}{timing:>28}"
        )
    lines += ["", "bytes sent (row: sender, column: receiver), payload + headers:"]
    lines += ["  " + " ".join(f"{v:>12}" for v in row) for row in profile["bytes"]]
    lines += _render_collectives(profile["collective_bytes"], labels)
    lines += ["", "links:"]
    lines += [
        f"  {b['sender']} -> {b['receiver']}: {plots.human_bytes(b['bytes']):>9} in "
        f"{b['busy_s'] * 1e3:.1f} ms busy = {b['mb_per_s']:.1f} MB/s"
        for b in profile["bandwidth"]
    ]
    bubble = profile["bubble"]
    if bubble:
        lines += [
            "",
            f"pipeline bubble of rank {bubble['rank']}: {bubble['bubble_fraction']:.1%}"
            f" (wait {bubble['wait_fraction']:.1%}, idle {bubble['idle_fraction']:.1%})"
            f" in the steady window {bubble['window_start_s']:.3f}-"
            f"{bubble['window_end_s']:.3f} s",
        ]
    lines += _render_pmpi(profile.get("pmpi"))
    return "\n".join(lines)


def _render_collectives(
    table: dict[int, dict[str, dict[str, int]]], labels: dict[int, str]
) -> list[str]:
    if not table:
        return []
    lines = ["", "collective bytes per rank and kind (contributed / got back, calls):"]
    for rank, kinds in table.items():
        for kind, row in sorted(kinds.items()):
            lines.append(
                f"  {rank} {labels[rank]:<10} {kind:<11}"
                f"{plots.human_bytes(row['sent']):>10} /"
                f"{plots.human_bytes(row['received']):>10}  {row['calls']:>6}"
            )
    return lines


def _render_pmpi(rows: list[dict[str, Any]] | None) -> list[str]:
    if rows is None:
        return []
    lines = ["", "PMPI vs trace, bytes sent per peer:"]
    for row in rows:
        flag = "ok" if row["agree"] else "DISAGREE"
        lines.append(
            f"  {row['rank']} -> {row['peer']}: trace {row['trace_bytes']:>12} "
            f"pmpi {row['pmpi_bytes']:>12}  {flag}"
        )
    return lines


def main(args: argparse.Namespace) -> int:
    try:
        profile = write(args.run_dir, args.out or args.run_dir)
    except FileNotFoundError as err:  # no run directory, or no traces in it
        print(f"mpisplit: prof report: {err}", file=sys.stderr)
        return 2
    print(render(profile))
    disagreements = [r for r in profile.get("pmpi", []) if not r["agree"]]
    return 1 if disagreements else 0
