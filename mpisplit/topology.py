"""Rank → role assignment: a pure function of the config and the world size.

No MPI is needed to compute a topology, so it is unit-tested without processes and printed by
``mpisplit topology`` for job scripts. The sub-communicators each role needs are split from the
communicator the caller passes in (never from ``COMM_WORLD``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mpisplit.config import Config, ConfigError


class Role(StrEnum):
    SERVER = "server"
    CLIENT = "client"
    RELAY = "relay"


@dataclass(frozen=True, slots=True)
class Placement:
    rank: int
    role: Role
    index: int
    """Position among the ranks of the same role (client k is the k-th client)."""
    hosted: int = 1
    """Logical clients this rank hosts (``scheme.clients_per_rank``; 1: the rank is one)."""

    @property
    def clients(self) -> range:
        """The logical clients a client rank hosts: ``hosted`` of them from index x hosted."""
        return range(self.index * self.hosted, (self.index + 1) * self.hosted)

    def as_client(self, client: int) -> Placement:
        """This rank as logical client ``client`` (one of ``clients``), for its own streams,
        shard and markers."""
        return Placement(self.rank, self.role, client)

    @property
    def label(self) -> str:
        if self.hosted > 1:
            return f"clients{self.clients[0]}-{self.clients[-1]}"
        return f"{self.role}{self.index}" if self.role != Role.SERVER or self.index else "server"


@dataclass(frozen=True, slots=True)
class Topology:
    scheme: str
    placements: tuple[Placement, ...]

    @property
    def world_size(self) -> int:
        return len(self.placements)

    def of(self, rank: int) -> Placement:
        return self.placements[rank]

    def ranks(self, role: Role) -> list[int]:
        return [p.rank for p in self.placements if p.role == role]

    @property
    def clients_per_rank(self) -> int:
        return max((p.hosted for p in self.placements), default=1)

    def client_ranks(self) -> list[int]:
        """The rank of each logical client, in client order."""
        return [p.rank for p in self.placements if p.role == Role.CLIENT for _ in p.clients]

    def table(self) -> str:
        lines = [f"scheme {self.scheme}: {self.world_size} MPI ranks", "rank  role"]
        lines += [f"{p.rank:>4}  {p.label}" for p in self.placements]
        return "\n".join(lines)


def plan(cfg: Config) -> Topology:
    """The rank layout ``cfg`` asks for, as its scheme's spec lays it out: server(s) first,
    then relays, then clients (the federated baselines have no server: rank 0 is client 0)."""
    from mpisplit import specs

    placements: list[Placement] = []
    for role, count in specs.get(cfg.scheme.name).layout(cfg):
        hosted = cfg.scheme.clients_per_rank if role == Role.CLIENT else 1
        placements += [
            Placement(len(placements) + i, role, i, hosted) for i in range(count // hosted)
        ]
    return Topology(cfg.scheme.name, tuple(placements))


def check_world_size(topology: Topology, world_size: int) -> None:
    """Raises with the arithmetic when the job has the wrong number of ranks."""
    if world_size == topology.world_size:
        return
    counts: dict[Role, int] = {}
    for p in topology.placements:
        counts[p.role] = counts.get(p.role, 0) + 1
    per_rank = topology.clients_per_rank
    parts = " + ".join(
        f"{n} {role}{'s' if n > 1 else ''}"
        if role != Role.CLIENT or per_rank == 1
        else f"{n} client rank{'s' if n > 1 else ''} ({n * per_rank} clients / {per_rank} per rank)"
        for role, n in counts.items()
    )
    knobs = "scheme.clients" + (" or scheme.clients_per_rank" if per_rank > 1 else "")
    raise ConfigError(
        f"world size: scheme {topology.scheme} needs {parts} = {topology.world_size} MPI ranks, "
        f"but the job has {world_size}; run with mpiexec -n {topology.world_size} "
        f"(or change {knobs})"
    )
