"""Training benchmarks: every figure is a ratio against a baseline measured in the same run.

    python tools/bench_training.py pipeline      # M = 1 vs 4 vs 8 microbatches, 2-stage split
    python tools/bench_training.py split         # split (2 ranks) vs centralized (1 rank)
    python tools/bench_training.py gpu           # the same on one GPU (needs CUDA)
    python tools/bench_training.py tracing       # run.trace=true vs false
    python tools/bench_training.py clients       # server busy fraction for K = 1, 2, 4 clients
    python tools/bench_training.py memory        # peak RSS vs shard size, M, GPipe vs 1F1B
    python tools/bench_training.py soak          # 12,000 steps: memory and step time over time

Each subcommand launches real ``mpiexec`` jobs on a synthetic dataset (prepared once in
``--work``), repeats every configuration ``--repeats`` times interleaved, keeps the median
steady-state step time (from the ranks' metrics, warm-up steps dropped), prints a table and
writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpisplit import launch

if TYPE_CHECKING:
    from mpisplit.prof.trace import RankTrace

ROOT = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 5
BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {}

# A 2-stage MLP with balanced stages: the client holds two 1024-wide layers, the server the
# other two and the head.
BALANCED = [
    "model.name=mlp",
    "model.options={hidden: [1024, 1024, 1024, 1024]}",
    "model.cuts=[fc3]",
    "train.optimizer=sgd",
    "train.lr=0.01",
    "train.eval_every=0",
    "run.progress=none",
    "run.save_model=false",
    "data.prefetch=2",
]


def benchmark(fn: Callable[[argparse.Namespace], list[dict]]) -> Callable:
    BENCHMARKS[fn.__name__] = fn
    return fn


def prepare(work: Path, clients: int, samples: int, width: int = 1024) -> Path:
    out = work / f"synthetic-{clients}c-{samples}-{width}"
    if not (out / "meta.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mpisplit",
                "data",
                "prepare",
                "--dataset",
                "synthetic",
                "--samples",
                str(samples),
                "--shape",
                str(width),
                "--classes",
                "10",
                "--clients",
                str(clients),
                "--out",
                str(out),
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return out


def train(
    ranks: int,
    data: Path,
    run_dir: Path,
    overrides: Sequence[str],
    scheme: str = "vanilla",
    clients: int = 1,
    threads: int = 1,
) -> Path:
    """One real training job (``threads`` torch threads per rank); returns its run dir."""
    launcher = launch.find()
    command = launcher.command(
        ranks,
        [
            sys.executable,
            "-m",
            "mpisplit",
            "train",
            "--overwrite",
            str(ROOT / "configs/vanilla-breast-cancer.yaml"),
            f"scheme.name={scheme}",
            f"scheme.clients={clients}",
            f"data.path={data}",
            f"run.dir={run_dir}",
            *BALANCED,
            *overrides,
        ],
    )
    env = launcher.environment({**os.environ, "OMP_NUM_THREADS": str(threads)})
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    if result.returncode:
        raise SystemExit(f"benchmark job failed:\n{result.stderr[-3000:]}")
    return run_dir


def steady_step_s(run_dir: Path, rank: int = 0) -> float:
    """Median time between consecutive steps of ``rank``, after the warm-up."""
    times = [r["time"] for r in _records(run_dir, rank) if "step" in r and "event" not in r]
    gaps = [b - a for a, b in zip(times[WARMUP_STEPS:], times[WARMUP_STEPS + 1 :], strict=False)]
    return statistics.median(gaps)


def _records(run_dir: Path, rank: int) -> list[dict]:
    lines = (run_dir / f"metrics-rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def repeated(args: argparse.Namespace, variants: dict[str, Callable[[Path], float]]) -> dict:
    """Runs each variant ``args.repeats`` times, interleaved in the same order every repeat
    (each job is its own set of processes); median, spread and the samples (in repeat order,
    for ``paired_ratio``) per variant."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, run in variants.items():
            samples[name].append(run(args.work / f"run-{name}-{repeat}"))
    return {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
        for name, v in samples.items()
    }


def paired_ratio(stats: dict, numerator: str, denominator: str) -> float:
    """The median over repeats of one variant's time over another's from the same repeat
    (jobs run minutes apart on a machine whose speed drifts: see ``bench_transport``)."""
    return statistics.median(
        a / b
        for a, b in zip(stats[numerator]["samples"], stats[denominator]["samples"], strict=True)
    )


@benchmark
def pipeline(args: argparse.Namespace) -> list[dict]:
    """Step time of a balanced 2-stage split at M = 1, 4, 8 (GPipe order) and at M = 4, 8 in
    1F1B order; the server's bubble vs the GPipe estimate (K-1)/(M+K-1), K = 2.

    Balanced: the client's first layer reads 1536 features, so its two layers (the first
    needs no input gradient) cost what the server's two layers and head cost; the measured
    ratio of the stages' compute time at M = 1 is reported. Batches of 2048 keep a
    microbatch large enough (256-512 rows) to compute as efficiently as the whole batch."""
    from mpisplit.prof import analysis, trace

    data = prepare(args.work, 1, 10240, width=1536)  # 8192 training rows: 4 whole batches
    steps = ["train.max_steps=25", "data.batch_size=2048", "run.trace=true"]
    variants = [(1, "gpipe"), (4, "gpipe"), (8, "gpipe"), (4, "1f1b"), (8, "1f1b")]
    bubbles: dict[str, list[float]] = {}
    balance: list[float] = []

    def name(m: int, schedule: str) -> str:
        return f"M={m} {schedule}"

    def run(m: int, schedule: str) -> Callable[[Path], float]:
        def once(run_dir: Path) -> float:
            train(
                2,
                data,
                run_dir,
                [*steps, f"transport.microbatches={m}", f"transport.schedule={schedule}"],
            )
            timeline = trace.load(run_dir)
            server, client = timeline.ranks[0], timeline.ranks[1]
            measured = analysis.bubble(server, analysis.states(server, timeline.window))
            bubbles.setdefault(name(m, schedule), []).append(measured["bubble_fraction"])
            if m == 1:
                window = (measured["window_start_s"], measured["window_end_s"])
                balance.append(_compute_s(client, window) / _compute_s(server, window))
            return steady_step_s(run_dir)

        return once

    stats = repeated(args, {name(*v): run(*v) for v in variants})
    return [
        {
            "microbatches": m,
            "schedule": schedule,
            "step_s": stats[name(m, schedule)]["median"],
            "speedup_vs_M1": paired_ratio(stats, name(1, "gpipe"), name(m, schedule)),
            "bubble_measured": statistics.median(bubbles[name(m, schedule)]),
            "bubble_gpipe_estimate": (2 - 1) / (m + 2 - 1),
        }
        for m, schedule in variants
    ] + [{"stage_balance_client_over_server": statistics.median(balance)}]


def _compute_s(rank: RankTrace, window: tuple[float, float]) -> float:
    """Seconds ``rank`` spent computing inside ``window`` (its trace's compute state)."""
    from mpisplit.prof import analysis
    from mpisplit.prof import intervals as iv

    return iv.length(analysis.states(rank, window).compute)


@benchmark
def vertical(args: argparse.Namespace) -> list[dict]:
    """Step time of vertical split learning (digits' two feature groups at two parties, the
    balanced MLP; 3 ranks) at M = 1, 4, 8: the pipelined Gatherv/Scatterv exchange."""
    data = args.work / "digits-vertical-2c"
    if not (data / "meta.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mpisplit",
                "data",
                "prepare",
                "--dataset",
                "digits",
                "--partition",
                "vertical",
                "--clients",
                "2",
                "--out",
                str(data),
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
    steps = ["train.max_steps=40", "data.batch_size=512", "train.epochs=100"]

    def run(m: int) -> Callable[[Path], float]:
        def once(run_dir: Path) -> float:
            train(
                3,
                data,
                run_dir,
                [*steps, f"transport.microbatches={m}"],
                scheme="vertical",
                clients=2,
            )
            return steady_step_s(run_dir)

        return once

    stats = repeated(args, {f"M={m}": run(m) for m in (1, 4, 8)})
    return [
        {
            "microbatches": m,
            "step_s": stats[f"M={m}"]["median"],
            "speedup_vs_M1": paired_ratio(stats, "M=1", f"M={m}"),
        }
        for m in (1, 4, 8)
    ]


@benchmark
def split(args: argparse.Namespace) -> list[dict]:
    """Samples/s of pipelined split training (2 ranks, 1 thread each, M = 8) vs one process
    with the same model and 2 threads, at batches of 2048 and 4096 (the balanced model of
    ``pipeline``)."""
    return _split_vs_centralized(args, [], centralized_threads=2)


@benchmark
def gpu(args: argparse.Namespace) -> list[dict]:
    """``split`` with every rank on the GPU (the two split ranks share it) vs one process
    training the same model on the same GPU; cut tensors cross by device buffers or pinned
    staging, whichever the MPI supports."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_training gpu: needs a CUDA device")
    return _split_vs_centralized(args, ["transport.device=cuda"], centralized_threads=1)


def _split_vs_centralized(
    args: argparse.Namespace, overrides: Sequence[str], centralized_threads: int
) -> list[dict]:
    data = prepare(args.work, 1, 10240, width=1536)
    variants: dict[str, Callable[[Path], float]] = {}
    for batch in (2048, 4096):
        steps = ["train.max_steps=16", "train.epochs=20", f"data.batch_size={batch}", *overrides]
        variants[f"centralized_{centralized_threads}_threads_b{batch}"] = partial(
            _step_s, 1, data, steps, scheme="centralized", threads=centralized_threads
        )
        variants[f"split_M8_b{batch}"] = partial(
            _step_s, 2, data, [*steps, "transport.microbatches=8"]
        )
    stats = repeated(args, variants)
    return [{"variant": k, "step_s": v["median"]} for k, v in stats.items()] + [
        {
            "variant": f"split / centralized samples/s, batch {batch}",
            "ratio": paired_ratio(
                stats, f"centralized_{centralized_threads}_threads_b{batch}", f"split_M8_b{batch}"
            ),
        }
        for batch in (2048, 4096)
    ]


def _step_s(
    ranks: int, data: Path, overrides: Sequence[str], run_dir: Path, **options: Any
) -> float:
    """The steady step time of one training job (``train``'s arguments)."""
    return steady_step_s(train(ranks, data, run_dir, overrides, **options))


@benchmark
def tracing(args: argparse.Namespace) -> list[dict]:
    """Step time with tracing on vs off (target: at most 3% slower)."""
    data = prepare(args.work, 1, 8192)
    steps = ["train.max_steps=40", "data.batch_size=256"]
    stats = repeated(
        args,
        {
            "off": lambda d: steady_step_s(train(2, data, d, steps)),
            "on": lambda d: steady_step_s(train(2, data, d, [*steps, "run.trace=true"])),
        },
    )
    return [{"tracing": k, "step_s": v["median"]} for k, v in stats.items()] + [
        {"tracing": "overhead", "ratio": paired_ratio(stats, "on", "off") - 1}
    ]


@benchmark
def clients(args: argparse.Namespace) -> list[dict]:
    """Parallel vanilla with K clients: the server's busy fraction and samples/s."""
    from mpisplit.prof import analysis, trace

    rows = []
    for k in args.clients:
        data = prepare(args.work, k, 2048 * k)
        run_dir = train(
            k + 1,
            data,
            args.work / f"clients-{k}",
            ["train.max_steps=30", "data.batch_size=256", "run.trace=true"],
            clients=k,
        )
        timeline = trace.load(run_dir)
        server = timeline.ranks[0]
        measured = analysis.bubble(server, analysis.states(server, timeline.window))
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append(
            {
                "clients": k,
                "server_busy_fraction": 1 - measured["bubble_fraction"],
                "samples_per_s": summary["samples_per_s"],
                "cores": os.cpu_count(),
            }
        )
    return rows


@benchmark
def memory(args: argparse.Namespace) -> list[dict]:
    """Peak RSS of the job (max over ranks) as the client's shard grows, and as M grows."""
    rows = []
    for samples in (4096, 65536):
        data = prepare(args.work, 1, samples)
        run_dir = train(
            2, data, args.work / f"mem-{samples}", ["train.max_steps=30", "data.batch_size=256"]
        )
        rows.append(
            {
                "shard_samples": samples,
                "shard_mb": samples * 1024 * 4 / 2**20,
                "peak_rss_mb": _peak_rss_mb(run_dir),
            }
        )
    data = prepare(args.work, 1, 4096)
    for m in (1, 8):
        run_dir = train(
            2,
            data,
            args.work / f"mem-m{m}",
            ["train.max_steps=30", "data.batch_size=256", f"transport.microbatches={m}"],
        )
        rows.append({"microbatches": m, "peak_rss_mb": _peak_rss_mb(run_dir)})
    data = prepare(args.work, 1, 10240, width=1536)
    for schedule in ("gpipe", "1f1b"):  # the client holds M vs 2 microbatches' activations
        run_dir = train(
            2,
            data,
            args.work / f"mem-{schedule}",
            [
                "train.max_steps=6",
                "train.epochs=10",
                "data.batch_size=8192",
                "transport.microbatches=8",
                f"transport.schedule={schedule}",
            ],
        )
        rows.append(
            {
                "schedule": schedule,
                "microbatches": 8,
                "batch": 8192,
                "client_peak_rss_mb": _peak_rss_mb(run_dir, ranks=[1]),
            }
        )
    return rows


@benchmark
def soak(args: argparse.Namespace) -> list[dict]:
    """A long run (12,000 steps at small size): memory and step time early vs late."""
    data = prepare(args.work, 1, 4096, width=32)
    run_dir = train(
        2,
        data,
        args.work / "soak",
        [
            "model.options={hidden: [64, 32]}",
            "model.cuts=[fc2]",
            "data.batch_size=16",
            "train.epochs=1000",
            "train.max_steps=12000",
            "run.log_every=100",
        ],
    )
    rows = []
    for rank in range(2):
        records = [r for r in _records(run_dir, rank) if "rss_mb" in r and "step" in r]
        early = [r for r in records if 1000 <= r["step"] <= 2000]
        late = [r for r in records if r["step"] >= 11000]
        times = [r["time"] for r in _records(run_dir, rank) if "step" in r and "event" not in r]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        rows.append(
            {
                "rank": rank,
                "steps": len(times),
                "rss_mb_at_1k_2k": statistics.median(r["rss_mb"] for r in early),
                "rss_mb_after_11k": statistics.median(r["rss_mb"] for r in late),
                "step_ms_1k_2k": 1e3 * statistics.median(gaps[1000:2000]),
                "step_ms_last_1k": 1e3 * statistics.median(gaps[-1000:]),
            }
        )
    return rows


def _peak_rss_mb(run_dir: Path, ranks: Sequence[int] = (0, 1)) -> float:
    """Peak RSS (MiB) over ``ranks``, from each rank's own getrusage at exit."""
    return max(
        r["max_rss_mb"]
        for rank in ranks
        for r in _records(run_dir, rank)
        if r.get("event") == "end"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--work", type=Path, default=None, help="scratch directory")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        args.work = args.work or Path(scratch)
        args.work.mkdir(parents=True, exist_ok=True)
        rows = BENCHMARKS[args.name](args)
    report(args.name, rows, args.json)


def report(name: str, rows: list[dict], json_path: Path | None) -> None:
    """Prints a benchmark's rows (one ``key=value`` line each) and writes them as JSON."""
    for row in rows:
        print(
            "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            )
        )
    if json_path:
        json_path.write_text(json.dumps({"benchmark": name, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
