"""Rank → role assignment: a pure function of the config and the world size.

No MPI is needed to compute a topology, so it is unit-tested without processes and printed by
``mpisplit topology`` for job scripts. The sub-communicators each role needs are split from the
communicator the caller passes in (never from ``COMM_WORLD``).
"""

from __future__ import annotations

from collections.abc import Callable
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

    @property
    def label(self) -> str:
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

    def table(self) -> str:
        lines = [f"scheme {self.scheme}: {self.world_size} MPI ranks", "rank  role"]
        lines += [f"{p.rank:>4}  {p.label}" for p in self.placements]
        return "\n".join(lines)


RoleCounts = list[tuple[Role, int]]


def _server_and_clients(cfg: Config) -> RoleCounts:
    return [(Role.SERVER, 1), (Role.CLIENT, cfg.scheme.clients)]


def _chain(cfg: Config) -> RoleCounts:
    """Multi-hop: one relay per inner segment, so len(model.cuts) - 1 relays."""
    if len(cfg.model.cuts) < 2:
        raise ConfigError(
            f"model.cuts: multihop needs at least 2 cuts (client → relay → server), "
            f"got {len(cfg.model.cuts)}"
        )
    return [(Role.SERVER, 1), (Role.RELAY, len(cfg.model.cuts) - 1),
            (Role.CLIENT, cfg.scheme.clients)]


def _task_servers(cfg: Config) -> RoleCounts:
    """Multi-task: one server per task (server t holds head t), then the clients."""
    return [(Role.SERVER, len(cfg.scheme.tasks)), (Role.CLIENT, cfg.scheme.clients)]


LAYOUTS: dict[str, Callable[[Config], RoleCounts]] = {
    "vanilla": _server_and_clients,
    "ushaped": _server_and_clients,
    "splitfed": _server_and_clients,
    "vertical": _server_and_clients,
    "spatiotemporal": _server_and_clients,
    "multihop": _chain,
    "multitask": _task_servers,
    "fedavg": lambda cfg: [(Role.CLIENT, cfg.scheme.clients)],
    "syncsgd": lambda cfg: [(Role.CLIENT, cfg.scheme.clients)],
    "centralized": lambda cfg: [(Role.SERVER, 1)],
}


def plan(cfg: Config) -> Topology:
    """The rank layout ``cfg`` asks for: server(s) first, then relays, then clients.

    The federated baselines (fedavg, syncsgd) have no server: rank 0 is client 0."""
    layout = LAYOUTS.get(cfg.scheme.name)
    if layout is None:
        raise ConfigError(
            f"scheme.name: '{cfg.scheme.name}' is not available yet "
            f"(available: {', '.join(LAYOUTS)})"
        )
    placements: list[Placement] = []
    for role, count in layout(cfg):
        placements += [Placement(len(placements) + i, role, i) for i in range(count)]
    return Topology(cfg.scheme.name, tuple(placements))


def check_world_size(topology: Topology, world_size: int) -> None:
    """Raises with the arithmetic when the job has the wrong number of ranks."""
    if world_size == topology.world_size:
        return
    counts: dict[Role, int] = {}
    for p in topology.placements:
        counts[p.role] = counts.get(p.role, 0) + 1
    parts = " + ".join(f"{n} {role}{'s' if n > 1 else ''}" for role, n in counts.items())
    raise ConfigError(
        f"world size: scheme {topology.scheme} needs {parts} = {topology.world_size} MPI ranks, "
        f"but the job has {world_size}; run with mpiexec -n {topology.world_size} "
        f"(or change scheme.clients)"
    )
