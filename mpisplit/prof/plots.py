"""PNG figures of a profile (matplotlib, Agg: no display needed on a cluster node)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from mpisplit.prof import intervals as iv  # noqa: E402
from mpisplit.prof.analysis import States, star_centre  # noqa: E402

_UNITS = ("B", "KB", "MB", "GB", "TB")
COLORS = {"compute": "#3a9a5b", "comm": "#2f6db5", "wait": "#e0823a", "idle": "#d9d9d9"}
PHASE_COLORS = {"forward": "#8fd19e", "backward": "#1f6b35"}
"""Compute inside forward and backward spans: light and dark shades of compute's green."""
_MAX_STEP_MARKS = 300
"""Step boundaries drawn in a panel at most (beyond that they would fill it)."""
_BYTES = FuncFormatter(lambda value, _pos: human_bytes(value) if value > 0 else "0")


def rank_labels(labels: dict[int, str]) -> list[str]:
    return [f"{rank} {label}" for rank, label in sorted(labels.items())]


def timeline(
    path: Path,
    all_states: dict[int, States],
    labels: dict[int, str],
    window: tuple[float, float],
    zoom: tuple[float, float] | None,
    phases: dict[int, dict[str, iv.Intervals]],
    steps: dict[int, np.ndarray],
) -> Path:
    """Ranks as rows, the run window on top and, when given, a zoom on a few steady-state
    steps below (single steps are invisible at the scale of the whole run). Forward and
    backward compute in their own shades; a black tick where each of the rank's steps
    starts."""
    panels = [(*window, "whole run (from the first training step)")]
    if zoom is not None:
        panels.append((*zoom, "steady state (zoom)"))
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(11, 1.2 + 1.6 * len(panels) + 0.35 * len(labels) * len(panels)),
        squeeze=False,
    )
    for ax, (lo, hi, title) in zip(axes[:, 0], panels, strict=True):
        _timeline_panel(ax, all_states, labels, lo, hi)
        _overlay(ax, phases, steps, lo, hi)
        ax.set_title(title, fontsize=10, loc="left")
    handles = [
        Patch(color=COLORS["compute"], label="compute (data, optimizer, eval)"),
        *(Patch(color=color, label=name) for name, color in PHASE_COLORS.items()),
        *(Patch(color=COLORS[k], label=k) for k in ("comm", "wait")),
    ]
    handles.append(Patch(facecolor="white", edgecolor="#999999", label="idle"))
    handles.append(Line2D([], [], color="black", linewidth=0.8, label="step start"))
    fig.legend(handles=handles, loc="upper right", ncol=4, frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _timeline_panel(
    ax: Axes, all_states: dict[int, States], labels: dict[int, str], lo: float, hi: float
) -> None:
    ranks = sorted(all_states)
    for row, rank in enumerate(ranks):
        st = all_states[rank]
        for state in ("compute", "comm", "wait"):
            spans = iv.clip(getattr(st, state), lo, hi)
            if len(spans):
                ax.broken_barh(
                    [((a - lo) * 1e3, (b - a) * 1e3) for a, b in spans],
                    (row - 0.4, 0.8),
                    facecolors=COLORS[state],
                    linewidth=0,
                )
    ax.set_xlim(0, (hi - lo) * 1e3)
    ax.set_ylim(len(ranks) - 0.5, -0.5)
    ax.set_yticks(range(len(ranks)), rank_labels({r: labels[r] for r in ranks}))
    ax.set_xlabel(f"time (ms) from {lo * 1e3:.0f} ms" if lo else "time (ms)")
    ax.grid(axis="x", alpha=0.3)


def _overlay(
    ax: Axes,
    phases: dict[int, dict[str, iv.Intervals]],
    steps: dict[int, np.ndarray],
    lo: float,
    hi: float,
) -> None:
    """Forward and backward over the rows' compute, and the step boundaries."""
    for row, rank in enumerate(sorted(phases)):
        for name, color in PHASE_COLORS.items():
            spans = iv.clip(phases[rank][name], lo, hi)
            if len(spans):
                ax.broken_barh(
                    [((a - lo) * 1e3, (b - a) * 1e3) for a, b in spans],
                    (row - 0.4, 0.8),
                    facecolors=color,
                    linewidth=0,
                )
        starts = steps.get(rank, np.empty(0))
        starts = starts[(starts >= lo) & (starts <= hi)]
        if 0 < len(starts) <= _MAX_STEP_MARKS:
            ax.vlines((starts - lo) * 1e3, row - 0.45, row + 0.45, colors="black", linewidth=0.6)


def bytes_figure(path: Path, sent: np.ndarray, labels: dict[int, str]) -> Path:
    """Per-client bars for a star of many ranks (a matrix of mostly zeros is unreadable
    beyond a few ranks), else the sender × receiver matrix."""
    hub = star_centre(sent)
    if hub is None:
        return bytes_heatmap(path, sent, labels)
    return _star_bars(path, sent, labels, hub)


def _star_bars(path: Path, sent: np.ndarray, labels: dict[int, str], hub: int) -> Path:
    clients = [rank for rank in range(len(sent)) if rank != hub]
    hub_name = f"{hub} {labels.get(hub, '')}".strip()
    fig, ax = plt.subplots(figsize=(min(3 + 0.35 * len(clients), 40), 4))
    x = np.arange(len(clients))
    ax.bar(x - 0.2, sent[clients, hub], 0.4, color=COLORS["comm"], label=f"to {hub_name}")
    ax.bar(x + 0.2, sent[hub, clients], 0.4, color=COLORS["wait"], label=f"from {hub_name}")
    ax.set_xticks(
        x,
        [f"{rank} {labels.get(rank, '(no trace)')}" for rank in clients],
        rotation=60 if len(clients) > 12 else 30,
        ha="right",
        fontsize=8,
    )
    ax.yaxis.set_major_formatter(_BYTES)
    ax.set_ylabel("bytes (payload + headers)")
    ax.set_title(
        f"bytes each rank exchanged with {hub_name} (star: {len(clients)} ranks)", fontsize=10
    )
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bytes_heatmap(path: Path, sent: np.ndarray, labels: dict[int, str]) -> Path:
    """Sender × receiver bytes with the value in every cell."""
    size = len(sent)
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * size, 1.8 + 0.9 * size))
    image = ax.imshow(sent, cmap="Blues")
    names = [f"{rank} {labels.get(rank, '(no trace)')}" for rank in range(size)]
    ax.set_xticks(range(size), names, rotation=30, ha="right")
    ax.set_yticks(range(size), names)
    ax.set_xlabel("receiver rank")
    ax.set_ylabel("sender rank")
    threshold = sent.max() / 2 if sent.size else 0
    for a in range(size):
        for b in range(size):
            ax.text(
                b,
                a,
                human_bytes(int(sent[a, b])),
                ha="center",
                va="center",
                fontsize=9,
                color="white" if sent[a, b] > threshold else "black",
            )
    ax.set_title("bytes sent (payload + headers)", fontsize=10)
    fig.colorbar(image, ax=ax, label="bytes", shrink=0.8, format=_BYTES)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def breakdown_bars(
    path: Path, fractions: dict[int, dict[str, float]], labels: dict[int, str]
) -> Path:
    """Stacked bars of the state fractions per rank."""
    ranks = sorted(fractions)
    fig, ax = plt.subplots(figsize=(2.5 + 1.2 * len(ranks), 4))
    bottom = np.zeros(len(ranks))
    for state in ("compute", "comm", "wait", "idle"):
        values = np.array([fractions[r][f"{state}_fraction"] for r in ranks])
        ax.bar(
            range(len(ranks)), values, bottom=bottom, color=COLORS[state], label=state, width=0.6
        )
        for x, (v, b) in enumerate(zip(values, bottom, strict=True)):
            if v > 0.04:
                ax.text(x, b + v / 2, f"{v:.0%}", ha="center", va="center", fontsize=8)
        bottom += values
    ax.set_xticks(range(len(ranks)), rank_labels({r: labels[r] for r in ranks}))
    ax.set_ylabel("fraction of the run window")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def human_bytes(n: float) -> str:
    """Decimal units (1 KB = 1000 B), like network rates."""
    exponent = min(int(math.log10(n)) // 3, 4) if n >= 1000 else 0
    value = n / 1000**exponent
    return f"{value:.0f} B" if exponent == 0 else f"{value:.1f} {_UNITS[exponent]}"
