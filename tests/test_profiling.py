"""``mpisplit prof report`` on a real traced 3-rank run, and the interval arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from mpisplit.pmpi import library_path, read_reports
from mpisplit.prof import analysis, plots
from mpisplit.prof import intervals as iv
from mpisplit.prof.report import build, render
from mpisplit.prof.trace import RankTrace, Span, Timeline, load
from tests.conftest import ROOT, run_mpi, run_readme_block

STEPS = 12


@pytest.fixture(scope="module")
def profiled(dataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A traced, PMPI-recorded vanilla run (1 server, 2 clients) and its report."""
    if library_path() is None:
        pytest.fail("PMPI library not built: tools/install.sh builds it")
    run_dir = tmp_path_factory.mktemp("run")
    out = run_dir / "report"
    data = dataset("breast_cancer", clients=2)
    result = run_mpi(
        3,
        "train",
        "--pmpi",
        "configs/vanilla-breast-cancer.yaml",
        "scheme.clients=2",
        f"data.path={data}",
        f"run.dir={run_dir}",
        f"train.max_steps={STEPS}",
        "run.trace=true",
        "run.progress=none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = subprocess.run(
        [sys.executable, "-m", "mpisplit", "prof", "report", str(run_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "PMPI vs trace" in report.stdout and "DISAGREE" not in report.stdout
    return run_dir, out, json.loads((out / "profile.json").read_text())


def test_bytes_matrix_is_what_was_sent(profiled) -> None:
    run_dir, _, profile = profiled
    sent = np.array(profile["bytes"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sent.sum(axis=1).tolist() == summary["bytes_sent_per_rank"]
    assert sent.sum(axis=0).tolist() == summary["bytes_received_per_rank"]
    for report in read_reports(run_dir):
        row = np.zeros(len(sent), np.int64)
        for peer, counts in report["peers"].items():
            row[int(peer)] = counts["sent_bytes"]
        assert row.tolist() == sent[report["rank"]].tolist(), f"rank {report['rank']}"
    assert all(row["agree"] for row in profile["pmpi"])
    assert sent[1, 2] == sent[2, 1] == 0 and np.all(np.diag(sent) == 0)
    assert {(b["sender"], b["receiver"]) for b in profile["bandwidth"]} == {
        (0, 1),
        (0, 2),
        (1, 0),
        (2, 0),
    }
    assert all(b["mb_per_s"] > 0 for b in profile["bandwidth"])
    assert sorted(profile["collective_bytes"]) == ["0", "1", "2"]  # step plans, summary


def test_fractions_and_statistics(profiled) -> None:
    _, _, profile = profiled
    for rank, row in profile["breakdown"].items():
        fractions = [row[f"{k}_fraction"] for k in ("compute", "comm", "wait", "idle")]
        assert sum(fractions) == pytest.approx(1.0, abs=1e-9), rank
        assert min(fractions) >= 0 and row["compute_s"] > 0
    lo, hi = profile["window_s"]
    assert hi - lo == pytest.approx(profile["wall_s"])
    assert profile["setup_s"] == pytest.approx(lo) and lo > 0  # step plans come first
    assert profile["steps"]["0"]["steps"] == 2 * STEPS
    assert profile["steps"]["1"]["steps"] == profile["steps"]["2"]["steps"] == STEPS
    for stats in profile["steps"].values():
        assert 0 < stats["median_s"] <= stats["p95_s"]
    bubble = profile["bubble"]
    assert bubble["rank"] == 0 and 0 <= bubble["bubble_fraction"] <= 1
    assert all(0 <= f <= 1 for f in profile["comm_overlap_fraction"].values())


def test_merged_timeline_is_causal(profiled) -> None:
    """After alignment no message is received before it was sent."""
    run_dir, out, _ = profiled
    timeline = load(run_dir)
    assert len(timeline.matches) > 4 * STEPS
    for m in timeline.matches:
        assert m.recv.end >= m.send.start - 1e-9
    merged = json.loads((out / "trace-merged.json").read_text())["traceEvents"]
    assert {e["pid"] for e in merged if e["ph"] == "X"} == {0, 1, 2}
    assert sum(e["ph"] == "s" for e in merged) == len(timeline.matches)


@pytest.mark.parametrize("name", ["timeline.png", "bytes.png", "breakdown.png"])
def test_pictures(profiled, name: str) -> None:
    _, out, _ = profiled
    path = out / name
    assert path.stat().st_size > 10_000
    height, width, _ = matplotlib.image.imread(path).shape
    assert height >= 300 and width >= 400


def test_collectives_are_communication() -> None:
    """Time inside a collective is comm, not compute, even inside a compute span; its bytes
    go to the per-rank, per-kind collective table, not the point-to-point matrix."""

    def collective(name: str, start: float, end: float, kind: str, nbytes: int) -> Span:
        return Span(
            f"collective {name}",
            "collective",
            start,
            end,
            {"kind": kind, "bytes_sent": nbytes, "bytes_received": nbytes, "step": 0},
        )

    spans = [
        Span("backward", "compute", 0.0, 10.0, {"step": 0}),
        collective("weight average", 2.0, 5.0, "WEIGHTS", 400),
        collective("gradient average", 6.0, 7.0, "GRADIENT", 100),
        collective("weight average", 12.0, 13.0, "WEIGHTS", 400),
    ]
    timeline = Timeline([RankTrace(0, "client0", spans)], [], {0: 0.0}, {0: 0.0})
    profile, states = build(timeline)
    assert states[0].comm.tolist() == [[2, 5], [6, 7], [12, 13]]
    row = profile["breakdown"][0]
    assert (row["compute_s"], row["comm_s"], row["idle_s"]) == (6, 5, 2)
    assert profile["collective_bytes"] == {
        0: {
            "WEIGHTS": {"sent": 800, "received": 800, "calls": 2},
            "GRADIENT": {"sent": 100, "received": 100, "calls": 1},
        }
    }
    assert profile["bytes"] == [[0]]
    assert "collective bytes per rank and kind" in render(profile)


def test_interval_arithmetic() -> None:
    a = iv.union([(0, 2), (1, 3), (5, 6), (5.5, 5.7), (7, 7)])
    assert a.tolist() == [[0, 3], [5, 6]]
    b = iv.union([(2.5, 5.2)])
    assert iv.intersect(a, b).tolist() == [[2.5, 3], [5, 5.2]]
    assert iv.subtract(a, b).tolist() == [[0, 2.5], [5.2, 6]]
    assert iv.length(iv.clip(a, 1, 5.5)) == pytest.approx(2.5)
    assert iv.length(iv.join(a, b)) == pytest.approx(6)


def test_parser_does_not_initialise_mpi() -> None:
    """``train --pmpi`` builds the parser, then re-executes itself with the PMPI library:
    MPI initialised before that (e.g. by importing the transport) hangs the rank."""
    code = (
        "import sys; from mpisplit.cli import _parser; _parser(); "
        "sys.exit('mpi4py.MPI' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60, cwd=ROOT).returncode == 0


def test_report_without_traces_is_one_line(tmp_path: Path) -> None:
    for run_dir, message in [
        (tmp_path, "no trace-rank<R>.json (train with run.trace=true)"),
        (tmp_path / "missing", "no such run directory"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "mpisplit", "prof", "report", str(run_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_forward_and_backward_phases() -> None:
    """Compute inside forward and backward spans, less the comm nested in them."""
    spans = [
        Span("data", "compute", 0.0, 1.0, {"step": 0}),
        Span("forward", "compute", 1.0, 3.0, {"step": 0}),
        Span("send", "comm", 2.5, 3.0, {"step": 0, "peer": 0, "bytes": 8}),
        Span("backward", "compute", 4.0, 6.0, {"step": 0}),
    ]
    timeline = Timeline([RankTrace(0, "client0", spans)], [], {0: 0.0}, {0: 0.0})
    _, states = build(timeline)
    found = analysis.phases(timeline.ranks[0], states[0])
    assert found["forward"].tolist() == [[1, 2.5]] and found["backward"].tolist() == [[4, 6]]


def test_bytes_of_a_star_are_bars_and_small_jobs_a_matrix(tmp_path: Path) -> None:
    star = np.zeros((17, 17), np.int64)
    star[1:, 0], star[0, 1:] = 5_000_000, 200_000
    star[3, 4] = 1000  # a little traffic between clients (hand-overs) keeps it a star
    assert analysis.star_centre(star) == 0
    assert analysis.star_centre(star[:4, :4]) is None  # small job: the matrix
    chain = np.diag(np.full(7, 10**6), 1)  # multi-hop chain of 8 ranks: no hub
    assert analysis.star_centre(chain) is None
    labels = {0: "server", **{rank: "client" for rank in range(1, 17)}}
    image = plots.bytes_figure(tmp_path / "bytes.png", star, labels)
    height, width, _ = matplotlib.image.imread(image).shape
    assert width > 2 * height  # one pair of bars per client, not a 17 x 17 grid


def test_capacity_from_the_traced_run(profiled, tmp_path: Path) -> None:
    """`mpisplit prof capacity` reads its costs from the run's own traces and summary (checked
    here against both, computed independently) and predicts with the model's arithmetic."""
    run_dir, _, _ = profiled
    out = tmp_path / "capacity.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpisplit",
            "prof",
            "capacity",
            str(run_dir),
            "--clients",
            "2",
            "--clients",
            "100",
            "--nodes",
            "4",
            "--cores-per-node",
            "8",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "server compute" in result.stdout or "client chain" in result.stdout
    capacity = json.loads(out.read_text())
    costs = capacity["measured"]
    summary = json.loads((run_dir / "summary.json").read_text())
    clients = [r for r in load(run_dir).ranks if r.label != "server"]
    steps = sum(summary["steps_per_rank"][r.rank] for r in clients)
    moved = sum(
        summary["bytes_sent_per_rank"][r.rank] + summary["bytes_received_per_rank"][r.rank]
        for r in clients
    )
    assert costs["bytes_per_step"] == pytest.approx(moved / steps)
    per_step = [
        sum(
            s.end - s.start
            for s in r.spans
            if s.cat == "compute" and s.args.get("step") == step and s.name != "eval"
        )
        for r in clients
        for step in {s.args["step"] for s in r.spans if s.cat == "compute" and "step" in s.args}
    ]
    assert costs["client_compute_s"] == pytest.approx(np.mean(per_step))
    assert costs["samples"] == summary["train_samples"] and costs["batch_size"] > 0
    for p in capacity["predictions"]:
        rounds = costs["epochs"] * -(-costs["samples"] // (p["clients"] * costs["batch_size"]))
        assert p["steps_per_client"] == rounds
        assert p["wall_s"] == pytest.approx(costs["startup_s"] + rounds * p["round_s"])


def _capacity(run_dir: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``mpisplit prof capacity RUN_DIR OPTIONS...`` from the checkout."""
    command = [sys.executable, "-m", "mpisplit", "prof", "capacity", str(run_dir), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_capacity_of_an_unmodelled_scheme_is_one_line(profiled, tmp_path: Path) -> None:
    run_dir, _, _ = profiled
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("summary.json", "trace-rank0.json"):
        (copy / name).write_text((run_dir / name).read_text())
    config = (run_dir / "config.yaml").read_text().replace("name: vanilla", "name: fedavg")
    (copy / "config.yaml").write_text(config)
    result = _capacity(copy, "--clients", "4", "--cores-per-node", "2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "scheme fedavg is not modelled" in result.stderr


def test_readme_capacity_commands_run_as_written(tmp_path: Path) -> None:
    """README, "Capacity planning": its three commands, exactly as written, in a directory
    holding the checkout's configs."""
    done = run_readme_block("### Capacity planning", tmp_path)
    rows = [
        line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["100"], ["500"])
    ]
    assert [tuple(r[:4]) for r in rows] == [
        ("100", "1", "8", "101"),
        ("500", "1", "8", "501"),
        ("500", "50", "1", "11"),
    ]
    assert all(float(r[4]) > 0 and float(r[7]) > 0 for r in rows), done.stdout


def test_capacity_refuses_a_count_below_one(tmp_path: Path) -> None:
    """A zero count (clients per rank here) is one line naming the option, before any read."""
    result = _capacity(
        tmp_path, "--clients", "5", "--clients-per-rank", "0", "--cores-per-node", "2"
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--clients-per-rank must be at least 1" in result.stderr
