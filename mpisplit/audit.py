"""``mpisplit audit RUN_DIR``: what crossed between which ranks, against what the scheme allows.

Each rank's metrics end with the bytes it sent per destination and message kind (counted by
the transport, which also refuses undeclared routes while the run is live). The audit replays
that evidence against the scheme's declared routes, so a run directory can be checked after
the fact, by someone who was not there: labels that reached a U-shaped server, weights that
left a client where no hand-over exists, and so on.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from mpisplit import specs
from mpisplit.config import load_config
from mpisplit.protocol import Kind
from mpisplit.topology import plan

EXIT_VIOLATION = 1


@dataclass(frozen=True)
class Route:
    sender: int
    receiver: int
    sender_role: str
    receiver_role: str
    kind: str
    bytes: int
    allowed: bool


def audit(run_dir: Path) -> list[Route]:
    """Every (sender, receiver, kind) that carried bytes in the run, marked allowed or not."""
    cfg = load_config(run_dir / "config.yaml")
    roles = [p.role.value for p in plan(cfg).placements]
    allowed = specs.get(cfg.scheme.name).routes
    routes = []
    for rank, role in enumerate(roles):
        end = _end_record(run_dir / f"metrics-rank{rank}.jsonl")
        for peer, kinds in end["sent_routes"].items():
            receiver = int(peer)
            for kind, nbytes in kinds.items():
                permitted = (role, roles[receiver], Kind[kind]) in allowed
                routes.append(Route(rank, receiver, role, roles[receiver], kind, nbytes, permitted))
    return routes


def _end_record(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing, so this run cannot be audited")
    for line in reversed(path.read_text().splitlines()):
        record = json.loads(line)
        if record.get("event") == "end":
            return record
    raise ValueError(f"{path}: the run did not finish (no end record), so it cannot be audited")


def main(args: argparse.Namespace) -> int:
    routes = audit(Path(args.run_dir))
    print(f"{'sender':>14} {'receiver':>14} {'kind':<11} {'bytes':>12}  verdict")
    for r in sorted(routes, key=lambda r: (r.sender, r.receiver, r.kind)):
        verdict = "ok" if r.allowed else "FORBIDDEN"
        print(
            f"{r.sender:>4} {r.sender_role:<9} {r.receiver:>4} {r.receiver_role:<9} "
            f"{r.kind:<11} {r.bytes:>12}  {verdict}"
        )
    forbidden = [r for r in routes if not r.allowed]
    if forbidden:
        print(f"audit FAILED: {len(forbidden)} route(s) the scheme does not allow")
        return EXIT_VIOLATION
    print(f"audit passed: {len(routes)} route(s), all allowed by the scheme")
    return 0
