"""``mpisplit metrics RUN_DIR``: a run's summary and metrics as CSV, and as TensorBoard scalars.

CSV (``--out``, default the run directory): ``summary.csv`` has one ``key,value`` row per
entry of ``summary.json`` (nested keys joined with dots, lists by index); ``metrics.csv`` one
row per record of every rank's ``metrics-rank<R>.jsonl`` with its ``rank`` first, the columns
being every key any record has. TensorBoard (``--tensorboard DIR``, the ``tensorboard``
extra): one run per rank (``rank<R>``) with scalars per step: ``loss``, ``bytes_sent``,
``bytes_received``, ``step_time_s`` (time since the rank's previous step record), and
``eval/client<C>/accuracy`` and ``.../loss`` of each evaluation.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

_METRICS_GLOB = "metrics-rank*.jsonl"


class ExportError(ValueError):
    """The run directory cannot be exported (missing files, no TensorBoard)."""


def read_metrics(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """Every rank's metric records, by rank (a line cut short by a crash is skipped)."""
    found = {}
    for path in run_dir.glob(_METRICS_GLOB):
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        found[int(path.stem.removeprefix("metrics-rank"))] = records
    return dict(sorted(found.items()))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1, 2]}}`` -> ``{"a.b.0": 1, "a.b.1": 2}``."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def write_csv(run_dir: Path, out: Path) -> list[Path]:
    """``summary.csv`` (when the run has a summary) and ``metrics.csv`` in ``out``."""
    metrics = read_metrics(run_dir)
    summary = run_dir / "summary.json"
    if not metrics and not summary.is_file():
        raise ExportError(f"{run_dir}: no summary.json or metrics-rank<R>.jsonl to export")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if summary.is_file():
        with open(out / "summary.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["key", "value"])
            writer.writerows(flatten(json.loads(summary.read_text())).items())
        written.append(out / "summary.csv")
    rows = [
        {"rank": rank, **{key: _cell(value) for key, value in record.items()}}
        for rank, records in metrics.items()
        for record in records
    ]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / "metrics.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(rows)
    return [*written, out / "metrics.csv"]


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value


def write_tensorboard(run_dir: Path, out: Path) -> Path:
    """TensorBoard event files under ``out/rank<R>`` (see the module docstring)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ExportError(
            "--tensorboard needs TensorBoard: pip install 'mpisplit[tensorboard]' "
            "(or MPISPLIT_EXTRAS=tensorboard bash tools/install.sh)"
        ) from err
    metrics = read_metrics(run_dir)
    if not metrics:
        raise ExportError(f"{run_dir}: no metrics-rank<R>.jsonl to export")
    for rank, records in metrics.items():
        with SummaryWriter(log_dir=str(out / f"rank{rank}")) as writer:
            for name, step, value in scalars(records):
                writer.add_scalar(name, value, step)
    return out


def scalars(records: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    """(tag, step, value) of one rank's records, in order."""
    out, previous = [], None
    for record in records:
        if record.get("event") == "eval":
            tag = f"eval/client{record.get('client', 0)}"
            out += [
                (f"{tag}/{key}", record.get("step", 0), float(record[key]))
                for key in ("accuracy", "loss")
                if record.get(key) is not None
            ]
        elif "event" not in record and "step" in record:
            step = record["step"]
            out += [
                (key, step, float(record[key]))
                for key in ("loss", "bytes_sent", "bytes_received")
                if record.get(key) is not None
            ]
            if previous is not None:
                out.append(("step_time_s", step, record["time"] - previous))
            previous = record["time"]
    return out
