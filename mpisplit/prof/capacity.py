"""Capacity planning: from a short traced run, predict the step time, throughput and wall
time of the same workload with K clients on N nodes, before a large job is submitted.

The model (split learning with one server: ``vanilla`` or ``ushaped``) takes the costs
measured in the short run -- a client's mean compute per step ``c``, the server's compute per
served client step ``s``, of which ``t`` comes before it sends the gradient back (its
optimizer step follows the send, while the client goes on), the bytes and messages a client
step moves -- and a link (latency ``L``, bandwidth ``B``: measured in the same run unless the
target network's are given). One client step then costs ``cycle = f·(c + t) + messages·L +
bytes/B`` end to end, where ``f = max(1, ranks / cores)``: where ranks outnumber the cores,
every rank, computing or waiting (a waiting rank polls), takes an equal share of them, so
compute runs f times slower. A round (each client one step) takes:

* sequential order: ``K · cycle`` (one client works at a time);
* parallel order: the largest of ``R · cycle`` (a client rank's chain: the R clients it
  hosts, ``scheme.clients_per_rank``, take their steps one after another), ``f · K · s``
  (the server serves clients one after another), ``K · bytes / B`` (every byte passes the
  server's link) and ``K · (c + s) / cores`` (all the compute shares the job's cores).

A measured run may host several clients per rank too: a rank's compute per step is then
shared by the clients it hosts.

Wall time = start-up (the measured run's, from its first span to its first training step) +
rounds · round time, with ``epochs · ⌈samples / (K · batch)⌉`` rounds. Not modelled:
evaluation passes, checkpoints, the hand-over of the lower part between sequential clients,
and schemes other than one-server split learning.
``tools/bench_capacity.py`` checks the prediction against measured runs of 1 to 7 clients.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from mpisplit.config import ConfigError
from mpisplit.prof.measured import hosted_clients
from mpisplit.prof.trace import RankTrace, Timeline, load

MODELLED = ("vanilla", "ushaped")
SMALL_MESSAGE_BYTES = 1024
"""Messages at most this big time the link's latency; the rest its bandwidth."""


@dataclass(frozen=True)
class Costs:
    """Per-step costs of one workload, measured in a short traced run."""

    scheme: str
    order: str
    batch_size: int
    samples: int
    epochs: int
    client_compute_s: float
    server_compute_s: float
    server_turnaround_s: float
    """The part of ``server_compute_s`` before the gradient goes back (all but the
    optimizer step)."""
    messages_per_step: float
    bytes_per_step: float
    latency_s: float
    bandwidth_bytes_per_s: float
    startup_s: float


@dataclass(frozen=True)
class Prediction:
    clients: int
    nodes: int
    clients_per_rank: int
    ranks: int
    round_s: float
    bound: str
    samples_per_s: float
    steps_per_client: int
    wall_s: float
    oversubscribed: bool
    """More ranks than cores: the run is slower than predicted (taking turns on the cores
    costs more than the ranks' shares of them), so the figures are a lower bound."""


def measure(run_dir: Path) -> Costs:
    """The costs of the traced run in ``run_dir`` (``run.trace=true``)."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    scheme = config["scheme"]["name"]
    if scheme not in MODELLED:
        raise ConfigError(
            f"{run_dir}: capacity models one-server split learning "
            f"({', '.join(MODELLED)}); scheme {scheme} is not modelled"
        )
    timeline = load(run_dir)
    roles = summary["roles"]
    server = roles.index("server")
    clients = [r for r in timeline.ranks if r.rank != server]
    client_steps = sum(summary["steps_per_rank"][r.rank] for r in clients)
    if client_steps == 0:
        raise ConfigError(f"{run_dir}: the run took no client steps")
    moved = sum(
        summary["bytes_sent_per_rank"][r.rank] + summary["bytes_received_per_rank"][r.rank]
        for r in clients
    )
    messages = sum(len(r.messages("send")) + len(r.messages("recv")) for r in clients)
    latency, bandwidth = link(timeline)
    return Costs(
        scheme=scheme,
        order=config["scheme"].get("client_order", "parallel"),
        batch_size=int(config["data"]["batch_size"]),
        samples=int(summary["train_samples"]),
        epochs=int(config["train"]["epochs"]),
        client_compute_s=statistics.fmean(
            t / len(hosted_clients(roles[r.rank]))
            for r in clients
            for t in compute_per_step(r).values()
        ),
        server_compute_s=_training_compute(timeline.ranks[server]) / client_steps,
        server_turnaround_s=_training_compute(timeline.ranks[server], "optimizer") / client_steps,
        messages_per_step=messages / client_steps,
        bytes_per_step=moved / client_steps,
        latency_s=latency,
        bandwidth_bytes_per_s=bandwidth,
        startup_s=timeline.first_step - timeline.start,
    )


def compute_per_step(rank: RankTrace) -> dict[int, float]:
    """Seconds of training compute (data, forward, backward, optimizer) per step."""
    per_step: dict[int, float] = defaultdict(float)
    for span in rank.spans:
        if span.cat == "compute" and span.name != "eval" and "step" in span.args:
            per_step[span.args["step"]] += span.end - span.start
    return dict(per_step)


def _training_compute(rank: RankTrace, *leaving: str) -> float:
    """Seconds of training compute on ``rank`` (less the spans named in ``leaving``)."""
    left = {"eval", *leaving}
    return sum(s.end - s.start for s in rank.spans if s.cat == "compute" and s.name not in left)


def link(timeline: Timeline) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of the run's messages: the median transfer time of a
    small message, and the bytes of the larger ones over their transfer times. A transfer
    takes from the moment both ends are at it (the later of the send's and the receive's
    start, on the aligned clocks) to the receive's end: time a receiver spends waiting for
    its peer to compute is not the link's."""
    small, large_bytes, large_s = [], 0, 0.0
    for match in timeline.matches:
        nbytes = match.recv.args.get("bytes", 0)
        seconds = max(match.recv.end - max(match.send.start, match.recv.start), 0.0)
        if nbytes <= SMALL_MESSAGE_BYTES:
            small.append(seconds)
        else:
            large_bytes, large_s = large_bytes + nbytes, large_s + seconds
    latency = statistics.median(small) if small else 0.0
    return latency, (large_bytes / large_s if large_s > 0 else math.inf)


def predict(
    costs: Costs,
    clients: int,
    nodes: int,
    cores_per_node: int,
    latency_s: float | None = None,
    bandwidth: float | None = None,
    clients_per_rank: int = 1,
) -> Prediction:
    """Round time and wall time of ``clients`` clients on ``nodes`` nodes, at most
    ``clients_per_rank`` on a client rank (module docstring)."""
    latency = costs.latency_s if latency_s is None else latency_s
    bandwidth = costs.bandwidth_bytes_per_s if bandwidth is None else bandwidth
    c, s = costs.client_compute_s, costs.server_compute_s
    hosted = min(clients_per_rank, clients)
    ranks = math.ceil(clients / hosted) + 1
    share = max(1.0, ranks / (nodes * cores_per_node))  # f: a rank's slowdown
    link_s = costs.messages_per_step * latency + costs.bytes_per_step / bandwidth
    cycle = share * (c + costs.server_turnaround_s) + link_s
    if costs.order == "sequential":
        bounds = {"sequential turns": clients * cycle}
    else:
        cores = min(nodes * cores_per_node, ranks)
        bounds = {
            "client chain" if hosted == 1 else f"client rank ({hosted} clients in turn)": hosted
            * cycle,
            "server compute": share * clients * s,
            "server link": clients * costs.bytes_per_step / bandwidth,
            "cores": clients * (c + s) / cores,
        }
    bound, round_s = max(bounds.items(), key=lambda item: item[1])
    steps = costs.epochs * math.ceil(costs.samples / (clients * costs.batch_size))
    return Prediction(
        clients,
        nodes,
        hosted,
        ranks,
        round_s,
        bound,
        clients * costs.batch_size / round_s,
        steps,
        costs.startup_s + steps * round_s,
        ranks > nodes * cores_per_node,
    )


def render(costs: Costs, predictions: list[Prediction]) -> str:
    lines = [
        f"measured ({costs.scheme}, {costs.order}): client compute "
        f"{costs.client_compute_s * 1e3:.2f} ms/step, server "
        f"{costs.server_compute_s * 1e3:.2f} ms per client step "
        f"({costs.server_turnaround_s * 1e3:.2f} before the gradient goes back), "
        f"{costs.bytes_per_step / 1e3:.1f} kB in {costs.messages_per_step:.1f} messages "
        f"per client step, start-up {costs.startup_s:.2f} s",
        f"{'clients':>8} {'per rank':>8} {'nodes':>6} {'ranks':>6} {'round ms':>10} "
        f"{'samples/s':>10} "
        f"{'steps':>7} {'wall s':>9}  bound",
    ]
    for p in predictions:
        lines.append(
            f"{p.clients:>8} {p.clients_per_rank:>8} {p.nodes:>6} {p.ranks:>6} "
            f"{p.round_s * 1e3:>10.2f} "
            f"{p.samples_per_s:>10.1f} {p.steps_per_client:>7} {p.wall_s:>9.1f}  "
            f"{p.bound}{' *' if p.oversubscribed else ''}"
        )
    if any(p.oversubscribed for p in predictions):
        lines.append(
            "* more ranks than cores: each rank computes at its share of them, and a run is "
            "slower still (the ranks take turns): a lower bound; host clients on fewer ranks "
            "(--clients-per-rank)"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    costs = measure(args.run_dir)
    if args.epochs is not None:
        costs = Costs(**{**asdict(costs), "epochs": args.epochs})
    if args.samples is not None:
        costs = Costs(**{**asdict(costs), "samples": args.samples})
    latency = None if args.latency_us is None else args.latency_us * 1e-6
    bandwidth = None if args.bandwidth_gbs is None else args.bandwidth_gbs * 1e9
    predictions = [
        predict(
            costs, k, args.nodes, args.cores_per_node, latency, bandwidth, args.clients_per_rank
        )
        for k in args.clients
    ]
    print(render(costs, predictions))
    if args.json is not None:
        result: dict[str, Any] = {
            "measured": asdict(costs),
            "predictions": [asdict(p) for p in predictions],
        }
        args.json.write_text(json.dumps(result, indent=1))
    return 0
