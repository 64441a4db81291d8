"""Per-client FLOPs and bytes measured in a traced run, beside ``mpisplit resources``.

A run with ``run.trace: true`` and ``run.count_flops: true`` records every message (payload
bytes, kind, step and logical client) and the FLOPs of each client compute phase. Measured
per logical client, counted the way ``mpisplit.resources`` counts its prediction:

* **training messages**: the client's point-to-point messages of its training steps (step
  below the steps the client took, from its metrics), each its payload plus
  ``HEADER_BYTES``, per kind; what follows its last step (the evaluation pass, end markers)
  is reported apart, since the prediction leaves evaluation out (so run with
  ``train.eval_every: 0``);
* **collectives** of kind other than ``CONTROL`` (averages, gradient Allreduces): the
  rank's contributed and received bytes, shared among the clients it hosts: a rank that
  hosts R clients sums theirs and joins each Allreduce once, so ``predicted`` gives a
  client 1/R of ``mpisplit resources``' one-client-per-rank share; ``scaled`` scales them
  by the number of Allreduces (sync SGD: one per step; SplitFed and FedAvg: one per
  average, as ``Workload.averages`` counts them);
* **FLOPs**: the client ranks' counted FLOPs of training phases (not ``eval``), shared
  among the clients they host (compute spans do not name the logical client).

``scaled`` extrapolates a short run to a full workload from measured rates: FLOPs and payload
per trained sample, messages per step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mpisplit.codec import HEADER_BYTES
from mpisplit.prof import trace
from mpisplit.resources import Workload, estimate

CUT_KINDS = ("ACTIVATION", "LABELS", "GRADIENT")
_ROLE_RE = re.compile(r"clients?(\d+)(?:-(\d+))?$")


@dataclass
class Traffic:
    """Payload bytes and messages of one kind, summed over the clients."""

    payload: int = 0
    messages: int = 0

    @property
    def bytes(self) -> int:
        return self.payload + self.messages * HEADER_BYTES


@dataclass
class Measured:
    """Sums over a run's logical clients; ``per_client`` divides by their number."""

    clients: int
    steps: int
    samples: int
    client_ranks: int = 0
    flops: float = 0.0
    kinds: dict[str, Traffic] = field(default_factory=dict)
    collective_bytes: int = 0
    after_training_bytes: int = 0
    traced_sent: int = 0
    """Every point-to-point byte the client ranks' traces show sent, headers included."""
    counted_sent: int = 0
    """The same from the transport's own counters (the ranks' ``end`` records): a second,
    independent count that ``traced_sent`` must equal."""

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.kinds.values()) + self.collective_bytes

    def per_client(self, value: float) -> float:
        return value / self.clients

    @property
    def clients_per_rank(self) -> float:
        return self.clients / self.client_ranks


def hosted_clients(role: str) -> list[int]:
    """The logical clients a rank's role (``client3``, ``clients0-9``) names."""
    match = _ROLE_RE.search(role)
    if match is None:
        return []
    first = int(match[1])
    return list(range(first, int(match[2] or first) + 1))


def _client_steps(run_dir: Path, rank: int, hosted: list[int]) -> tuple[dict[int, int], int]:
    """Training steps each hosted client took (its step records in the rank's metrics), and
    the bytes the rank's transport counted sent."""
    steps, sent = dict.fromkeys(hosted, 0), 0
    for line in (run_dir / f"metrics-rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "end":
            sent = record["bytes_sent"]
        elif "step" in record and "event" not in record:
            client = record.get("client", hosted[0])
            steps[client] = max(steps[client], record["step"])
    return steps, sent


def measure(run_dir: Path) -> Measured:
    """Per-client training FLOPs and bytes of a traced run (see the module docstring)."""
    timeline = trace.load(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    total = Measured(clients=0, steps=0, samples=int(summary["train_samples"]))
    for rank in timeline.ranks:
        hosted = hosted_clients(summary["roles"][rank.rank])
        if not hosted:
            continue
        steps, sent = _client_steps(run_dir, rank.rank, hosted)
        total.counted_sent += sent
        total.clients += len(hosted)
        total.client_ranks += 1
        total.steps += sum(steps.values())
        for span in rank.spans:
            args = span.args
            if span.cat == "compute" and span.name != "eval":
                total.flops += args.get("flops", 0)
            elif span.cat == "collective" and args["kind"] != "CONTROL":
                total.collective_bytes += args["bytes_sent"] + args["bytes_received"]
            elif span.cat == "comm" and "bytes" in args:
                if span.name.startswith("send "):
                    total.traced_sent += args["bytes"] + HEADER_BYTES
                client = args.get("client", hosted[0])
                if args["step"] >= steps.get(client, 0):
                    total.after_training_bytes += args["bytes"] + HEADER_BYTES
                    continue
                traffic = total.kinds.setdefault(args["kind"], Traffic())
                traffic.payload += args["bytes"]
                traffic.messages += 1
    return total


def scaled(measured: Measured, run: Workload, work: Workload, scheme: str) -> dict[str, float]:
    """The measured run's rates over ``work``'s epochs: per client FLOPs and bytes (and
    bytes per cut kind) as if each client had trained ``work``'s samples and batches; the
    collectives per Allreduce of ``scheme``, the measured run having made ``run``'s."""
    samples = work.samples_per_client * work.epochs
    steps = work.steps
    kinds = {
        kind: (traffic.payload / measured.samples) * samples
        + (traffic.messages / measured.steps) * steps * HEADER_BYTES
        for kind, traffic in measured.kinds.items()
    }
    return {
        "flops": measured.flops / measured.samples * samples,
        "bytes": sum(kinds.values())
        + measured.per_client(measured.collective_bytes)
        / _allreduces(run, scheme)
        * _allreduces(work, scheme),
        **{f"bytes_{kind.lower()}": value for kind, value in kinds.items()},
    }


SCHEMES = {"vanilla": "split", "splitfed": "splitfed", "fedavg": "fedavg", "syncsgd": "syncsgd"}
"""The ``mpisplit resources`` row that predicts each scheme."""


def _allreduces(work: Workload, scheme: str) -> int:
    """Allreduces a client joins over ``work``: sync SGD every step, SplitFed and FedAvg
    every average."""
    return work.steps if scheme == "syncsgd" else work.averages


_SHARED = ("average_sent", "average_received", "allreduce_sent", "allreduce_received")
"""``mpisplit resources``' collective bytes per client, which a hosting rank shares."""


def predicted(
    work: Workload, scheme: str, *, handovers: bool, clients_per_rank: float = 1
) -> dict[str, float]:
    """``mpisplit resources``' per-client FLOPs and bytes of ``scheme`` for ``work``;
    without ``handovers`` (parallel split learning: every client keeps its part) the
    sequential hand-overs are left out of the split row; with ``clients_per_rank`` R a
    client's share of the collectives is 1/R of the one-client-per-rank figure."""
    cost = estimate(work)["per_client"][SCHEMES[scheme]]
    detail = cost["detail"]
    out = {"flops": cost["flops"], "bytes": cost["bytes"]}
    if scheme == "vanilla" and not handovers:
        out["bytes"] -= detail["handover_in"] + detail["handover_out"]
    out["bytes"] -= sum(detail.get(key, 0) for key in _SHARED) * (1 - 1 / clients_per_rank)
    for kind, key in zip(CUT_KINDS, ("activations", "labels", "gradients"), strict=True):
        if key in detail:
            out[f"bytes_{kind.lower()}"] = detail[key]
    return out


def compare(measured: dict[str, float], prediction: dict[str, float]) -> list[dict[str, float]]:
    """One row per quantity both have: measured, predicted, relative difference."""
    return [
        {
            "quantity": key,
            "measured": measured[key],
            "predicted": prediction[key],
            "relative_difference": measured[key] / prediction[key] - 1,
        }
        for key in prediction
        if key in measured and prediction[key]
    ]
