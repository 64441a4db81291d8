"""Capacity planning checked: predicted round time against measured runs of 1..7 clients.

    python tools/bench_capacity.py [--clients 1 2 3 4 5 6 7] [--steps 150] [--json out.json]
    python tools/bench_capacity.py --clients 1 2 4 8 16 --clients-per-rank 16  # 1 client rank

One traced run with ``--measure`` clients (default 1: its ranks have a core each) of vanilla
split learning on the digits CNN (``configs/vanilla-digits.yaml``) gives the costs
``mpisplit prof capacity`` predicts from; then every client count runs for real (traced,
``--steps`` steps per client) and its round time -- the run window from the first training
step to the end (``mpisplit prof``'s window) over the steps per client -- is compared with
the prediction for this machine's cores (``--clients-per-rank R``: each client rank hosts R
of them, the measured run too). The ratio predicted / measured is printed per client count
(1.0: exact); repeats take turns so a drift of the machine's speed touches every count
alike, and the median ratio is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mpisplit.launch import run_command
from mpisplit.prof.capacity import measure, predict
from mpisplit.prof.trace import load

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "vanilla-digits.yaml"


def traced_run(clients: int, steps: int, data: Path, run_dir: Path, per_rank: int = 1) -> float:
    """Runs ``clients`` clients (``per_rank`` a client rank) for ``steps`` steps each; its
    measured round time (s)."""
    per_rank = min(per_rank, clients)
    command = [
        sys.executable,
        "-m",
        "mpisplit",
        "train",
        str(CONFIG),
        f"data.path={data}",
        f"run.dir={run_dir}",
        f"scheme.clients={clients}",
        f"scheme.clients_per_rank={per_rank}",
        "run.trace=true",
        "run.progress=none",
        "run.save_model=false",
        "train.epochs=1000",  # as many epochs as it takes: every client takes ``steps`` steps
        f"train.max_steps={steps}",
        "train.eval_every=0",
        "--overwrite",
    ]
    argv, env = run_command(-(-clients // per_rank) + 1, command)
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=900, env={**env, "OMP_NUM_THREADS": "1"}
    )
    if done.returncode != 0:
        raise SystemExit(f"run with {clients} clients failed:\n{done.stderr[-3000:]}")
    return load(run_dir).wall / steps


def prepare(clients: int, out: Path) -> Path:
    path = out / f"digits-{clients}c"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mpisplit",
            "data",
            "prepare",
            "--dataset",
            "digits",
            "--clients",
            str(clients),
            "--out",
            str(path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7])
    parser.add_argument("--measure", type=int, default=1, help="clients of the measured run")
    parser.add_argument("--steps", type=int, default=150, help="steps per client per run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--clients-per-rank", type=int, default=1, help="clients a client rank hosts"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        data = {k: prepare(k, out) for k in {*args.clients, args.measure}}
        traced_run(
            args.measure, args.steps, data[args.measure], out / "measured", args.clients_per_rank
        )
        costs = measure(out / "measured")
        measured: dict[int, list[float]] = {k: [] for k in args.clients}
        for _ in range(args.repeats):
            for k in args.clients:
                measured[k].append(
                    traced_run(k, args.steps, data[k], out / f"run-{k}", args.clients_per_rank)
                )
    rows = []
    print(
        f"capacity model vs measured runs ({cores} cores, digits CNN, {args.steps} steps "
        f"per client, costs from a {args.measure}-client run)"
    )
    print(
        f"{'clients':>8} {'ranks':>6} {'predicted ms':>13} {'measured ms':>12} {'ratio':>7}  bound"
    )
    for k in args.clients:
        prediction = predict(costs, k, 1, cores, clients_per_rank=args.clients_per_rank)
        actual = statistics.median(measured[k])
        rows.append(
            {
                "clients": k,
                "ranks": prediction.ranks,
                "predicted_round_s": prediction.round_s,
                "measured_round_s": actual,
                "ratio": prediction.round_s / actual,
                "bound": prediction.bound,
                "samples_s": measured[k],
            }
        )
        print(
            f"{k:>8} {prediction.ranks:>6} {prediction.round_s * 1e3:>13.2f} {actual * 1e3:>12.2f} "
            f"{prediction.round_s / actual:>7.2f}  {prediction.bound}"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"cores": cores, "costs": costs.__dict__, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
