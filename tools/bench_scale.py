"""Hundreds of logical clients: what hosting them costs, and measured against predicted.

    python tools/bench_scale.py hosting --clients 10 100 500     # RSS, server busy, samples/s
    python tools/bench_scale.py measured --clients 100 500       # FLOPs, bytes vs resources

``hosting`` runs vanilla split learning with VGG-16 on CIFAR-shaped synthetic images, the
client holding the first convolution (cut ``block1.3``), K logical clients spread over
``--client-ranks`` ranks (``scheme.clients_per_rank``), ``--steps`` steps each; it records
every rank's peak RSS against the clients it hosts, the server's busy fraction and step time
and the samples/s, and then the server's cost per message apart from the model (the same
clients with the breast-cancer-sized MLP, whose compute is negligible). Every figure is also
a ratio against the first K of the same run (the baseline).

``measured`` runs ``--scheme`` (vanilla now; splitfed, fedavg, syncsgd once they host many
clients) with VGG-16 (client = first convolution, CIFAR-10 shape) and ResNet-50 (client =
the stem, cut ``block1_1``, CIFAR-100 shape) at each K, traced with ``run.count_flops``, and
prints per client the measured FLOPs and bytes (``mpisplit.prof.measured``) beside
``mpisplit resources``' prediction with the relative difference: for the run itself, and
scaled to ``--epochs`` full epochs of 50,000 samples at batch 64.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml
from bench_training import report

from mpisplit import specs
from mpisplit.launch import run_command
from mpisplit.prof import analysis, trace
from mpisplit.prof.measured import compare, hosted_clients, measure, predicted, scaled
from mpisplit.resources import Workload

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "vanilla-cifar-many-clients.yaml"
CIFAR = (3, 32, 32)
MODELS = {"vgg": ("block1.3", 10), "resnet50": ("block1_1", 100)}
"""Zoo model: (the cut that leaves the literature's client part, classes)."""
MLP = [
    "model.name=mlp",
    "model.options={hidden: [64, 32]}",
    "model.cuts=[fc2]",
]


def prepare(work: Path, clients: int, per_client: int, shape: Sequence[int], classes: int) -> Path:
    """Synthetic data with at least ``per_client`` training samples per client and a small
    test set (only one client evaluates, once)."""
    out = work / f"data-{clients}c-{per_client}-{'x'.join(map(str, shape))}-{classes}"
    if not (out / "meta.json").exists():
        samples = clients * (per_client + 1) + 3 * classes
        subprocess.run(
            [
                *(sys.executable, "-m", "mpisplit", "data", "prepare", "--dataset", "synthetic"),
                *("--shape", ",".join(map(str, shape)), "--classes", str(classes)),
                *("--samples", str(samples), "--clients", str(clients), "--out", str(out)),
                *("--test-fraction", f"{2 * classes / samples:.6f}"),
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return out


def train(data: Path, run_dir: Path, overrides: Sequence[str]) -> Path:
    """One traced training job on the ranks its topology needs, under ``mpisplit launch``'s
    command; one client evaluates at the end (the config's ``train.eval_clients: 1``), or the
    one evaluating rank of a scheme whose clients do not evaluate in parallel (FedAvg, sync
    SGD)."""
    scheme = next(
        (o.split("=", 1)[1] for o in overrides if o.startswith("scheme.name=")), "vanilla"
    )
    if not specs.get(scheme).samples_evaluation:
        overrides = [*overrides, "train.eval_clients=0"]
    settings = [
        f"data.path={data}",
        f"run.dir={run_dir}",
        "run.trace=true",
        "run.progress=none",
        "run.save_model=false",
        "train.eval_every=0",
        *overrides,
    ]
    ranks = subprocess.run(
        [*(sys.executable, "-m", "mpisplit", "topology", "--ntasks", str(CONFIG)), *settings],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    argv, env = run_command(
        int(ranks),
        [
            *(sys.executable, "-m", "mpisplit", "train", "--overwrite", str(CONFIG)),
            *settings,
        ],
    )
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=900, env={**env, "OMP_NUM_THREADS": "1"}
    )
    if done.returncode:
        raise SystemExit(f"benchmark job failed:\n{done.stderr[-3000:]}")
    return run_dir


def _clients(k: int, client_ranks: int) -> list[str]:
    per_rank = -(-k // client_ranks)
    return [f"scheme.clients={k}", f"scheme.clients_per_rank={per_rank}"]


def server_figures(run_dir: Path) -> dict[str, float]:
    """The server's busy fraction and step time (steady state) and the run's samples/s."""
    timeline = trace.load(run_dir)
    server = timeline.ranks[0]
    busy = analysis.bubble(server, analysis.states(server, timeline.window))
    steps = analysis.step_stats(server)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "server_busy": 1 - busy["bubble_fraction"] if busy else float("nan"),
        "server_step_ms": 1e3 * steps["median_s"] if steps else float("nan"),
        "samples_per_s": summary["samples_per_s"],
    }


def peak_rss(run_dir: Path) -> list[tuple[int, float]]:
    """(hosted clients, peak RSS MB) per rank (0 clients: the server)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = []
    for rank, role in enumerate(summary["roles"]):
        lines = (run_dir / f"metrics-rank{rank}.jsonl").read_text().splitlines()
        end = next(r for r in map(json.loads, lines) if r.get("event") == "end")
        rows.append((len(hosted_clients(role)), end["max_rss_mb"]))
    return rows


def hosting(args: argparse.Namespace) -> list[dict]:
    rows = []
    for k in args.clients:
        data = prepare(args.work, k, args.steps * args.batch, CIFAR, 10)
        run_dir = train(
            data,
            args.work / f"vgg-{k}",
            [
                *_clients(k, args.client_ranks),
                "model.cuts=[block1.3]",
                f"data.batch_size={args.batch}",
                f"train.max_steps={args.steps}",
            ],
        )
        rss = peak_rss(run_dir)
        clients_rss = [mb for hosted, mb in rss if hosted]
        rows.append(
            {
                "workload": "vgg16",
                "clients": k,
                "ranks": len(rss),
                "hosted_per_rank": max(hosted for hosted, _ in rss),
                "client_rank_rss_mb": max(clients_rss),
                "server_rss_mb": rss[0][1],
                **server_figures(run_dir),
            }
        )
    for k in args.clients:
        data = prepare(args.work, k, args.mlp_samples, (30,), 2)
        run_dir = train(
            data,
            args.work / f"mlp-{k}",
            [*_clients(k, args.client_ranks), *MLP, "data.batch_size=16", "train.max_steps=0"],
        )
        rows.append({"workload": "mlp", "clients": k, **server_figures(run_dir)})
    return _with_ratios(rows)


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Each figure over the same workload's first row (the baseline of this run)."""
    base: dict[str, dict] = {}
    for row in rows:
        first = base.setdefault(row["workload"], row)
        for key in ("client_rank_rss_mb", "server_step_ms", "samples_per_s"):
            if key in row:
                row[f"{key}_ratio"] = row[key] / first[key]
    vgg = [r for r in rows if r["workload"] == "vgg16"]
    if len(vgg) > 1:  # MB per extra hosted client, from the first and the last K
        a, b = vgg[0], vgg[-1]
        slope = (b["client_rank_rss_mb"] - a["client_rank_rss_mb"]) / (
            b["hosted_per_rank"] - a["hosted_per_rank"]
        )
        for row in vgg:
            row["mb_per_extra_hosted_client"] = slope
    return rows


def measured(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.models:
        cut, classes = MODELS[name]
        for k in args.clients:
            data = prepare(args.work, k, args.steps * args.batch, CIFAR, classes)
            run_dir = train(
                data,
                args.work / f"measured-{name}-{k}",
                [
                    f"scheme.name={args.scheme}",
                    *_clients(k, args.client_ranks),
                    f"model.name={name}",
                    f"model.cuts=[{cut}]",
                    f"model.options={json.dumps(args.options)}",
                    f"data.batch_size={args.batch}",
                    f"train.max_steps={args.steps}",
                    "run.count_flops=true",
                    *args.set,
                ],
            )
            rows += compared(run_dir, args, name, cut, classes)
    return rows


def compared(
    run_dir: Path, args: argparse.Namespace, name: str, cut: str, classes: int
) -> list[dict]:
    """Measured vs predicted for the run itself and scaled to full epochs."""
    run = measure(run_dir)
    if run.samples != run.clients * args.steps * args.batch:
        raise SystemExit(f"{run_dir}: {run.samples} samples trained, not K x steps x batch")
    handovers = False  # parallel order: every client keeps its part
    train = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]

    def work(samples: int, batch: int, epochs: int) -> Workload:
        return Workload(
            name,
            cut,
            CIFAR,
            classes,
            samples,
            run.clients,
            epochs,
            batch,
            0,
            train["optimizer"],
            train["momentum"],
            args.options,
        )

    rows, this_run = [], work(run.samples, args.batch, 1)
    for label, w in (
        ("this run", this_run),
        (f"{args.epochs} epoch(s) of 50000", work(50_000, 64, args.epochs)),
    ):
        prediction = predicted(
            w, args.scheme, handovers=handovers, clients_per_rank=run.clients_per_rank
        )
        for row in compare(scaled(run, this_run, w, args.scheme), prediction):
            rows.append({"model": name, "clients": run.clients, "scope": label, **row})
    rows.append(
        {
            "model": name,
            "clients": run.clients,
            "scope": "this run, not predicted",
            "quantity": "evaluation and end-marker bytes",
            "measured": run.per_client(run.after_training_bytes),
        }
    )
    rows.append(
        {
            "model": name,
            "clients": run.clients,
            "scope": "this run, two counts",
            "quantity": "client ranks' bytes sent: trace, transport counters",
            "measured": run.traced_sent,
            "counted": run.counted_sent,
        }
    )
    rows.append(
        {
            "model": name,
            "clients": run.clients,
            "scope": "this run, not predicted",
            "quantity": "peak RSS MB per rank, largest",
            "measured": max(mb for _, mb in peak_rss(run_dir)),
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=["hosting", "measured"])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--client-ranks", type=int, default=2, help="ranks hosting the clients")
    parser.add_argument("--steps", type=int, default=1, help="training steps per client")
    parser.add_argument("--batch", type=int, default=None, help="default: hosting 8, measured 2")
    parser.add_argument(
        "--mlp-samples", type=int, default=160, help="hosting: samples per MLP client"
    )
    parser.add_argument("--scheme", default="vanilla", help="measured: the scheme to run")
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument(
        "--options", type=json.loads, default={}, help="measured: model.options as JSON"
    )
    parser.add_argument("--epochs", type=int, default=1, help="measured: epochs to scale to")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="measured: a config override (e.g. scheme.splitfed_variant=v2), repeatable",
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch directory")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.batch = args.batch or (8 if args.name == "hosting" else 2)
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as scratch:
        args.work = args.work or Path(scratch)
        args.work.mkdir(parents=True, exist_ok=True)
        rows = hosting(args) if args.name == "hosting" else measured(args)
    report(args.name, rows, args.json)


if __name__ == "__main__":
    main()
