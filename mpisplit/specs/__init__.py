"""Scheme specs: everything mpisplit knows about a scheme, declared in one object.

A spec says how many ranks of which role a config needs (``layout``), how many cuts its model
takes, which messages each role may send which other (``routes``: the transport refuses the
rest and ``mpisplit audit`` checks a run against them), the scheme's own options (a dataclass
read from the keys of the ``scheme`` section beyond ``name``, ``clients`` and
``client_order``), whether its step order is deterministic enough to checkpoint, which tasks
its summary reports, and the function each role runs.

Config, topology, engine, checkpoint and audit read the spec; none of them names a scheme.
Specs import neither torch nor MPI (config validation and ``mpisplit topology`` read them
where neither is loaded), so a spec names its runners by ``"module:function"``, imported only
when a rank runs; a spec registered at run time (a scheme defined outside the package) may
give the functions themselves. Built-in specs live in ``mpisplit/specs/<name>.py``, found by
their file alone.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from mpisplit.config import ConfigError
from mpisplit.protocol import Kind, Route
from mpisplit.topology import Role

if TYPE_CHECKING:
    from mpisplit.config import Config, SchemeConfig

BUILTIN = tuple(
    sorted(
        module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_")
    )
)
"""The schemes that ship with mpisplit: every module ``mpisplit.specs.<name>`` (its ``SPEC``)."""

RoleCounts = list[tuple[Role, int]]
Runner = Callable[[Any], Any]
"""Plays one rank's role: ``RankContext -> RankResult`` (see ``mpisplit.engine``)."""


def require(ok: bool, key: str, message: str) -> None:
    """Raises the ``ConfigError`` ``key: message`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True, kw_only=True, slots=True)
class SchemeOptions:
    """A scheme's own options; subclasses add fields (each with a one-line docstring) and
    check them in ``__post_init__`` (alone) and ``check`` (against the whole config)."""

    def check(self, cfg: Config) -> None:
        """Checks that need the rest of the config (client count, order, transport)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TurnOptions(SchemeOptions):
    """Schemes whose clients can train in sequential turns (``client_order: sequential``)."""

    turn_steps: int = 0
    """Sequential mode: batches per client turn (0 = one pass over the client's shard)."""

    def __post_init__(self) -> None:
        require(self.turn_steps >= 0, "scheme.turn_steps", "must be >= 0 (0 = one epoch)")


@dataclass(frozen=True, kw_only=True, slots=True)
class AveragingOptions(SchemeOptions):
    """Schemes that average the clients' weights every few steps."""

    fedavg_every: int = 1
    """splitfed, fedavg: local steps between sample-weighted averages of the client weights
    (and, in splitfed v1, of the server's per-client copies); a last average follows the end."""

    average_buffers: bool = True
    """Average the floating-point buffers (BatchNorm running statistics) with the parameters,
    as federated averaging does; false keeps them local to each client (FedBN). Integer
    buffers (batches seen) always stay local."""

    def __post_init__(self) -> None:
        require(
            self.fedavg_every >= 1, "scheme.fedavg_every", f"must be >= 1, got {self.fedavg_every}"
        )


def parallel_only(cfg: Config, why: str) -> None:
    """For schemes whose clients cannot take turns: ``why`` ends the message."""
    require(
        cfg.scheme.client_order == "parallel",
        "scheme.client_order",
        f"{cfg.scheme.name} {why}; set client_order: parallel",
    )


# --- layouts: how many ranks of each role, server(s) first, then relays, then clients ------


def server_and_clients(cfg: Config) -> RoleCounts:
    return [(Role.SERVER, 1), (Role.CLIENT, cfg.scheme.clients)]


def clients_only(cfg: Config) -> RoleCounts:
    """No server: rank 0 is client 0 (the federated baselines)."""
    return [(Role.CLIENT, cfg.scheme.clients)]


# --- routes ------------------------------------------------------------------------------

LABELS_AT_SERVER: frozenset[Route] = frozenset(
    {
        ("client", "server", Kind.ACTIVATION),
        ("client", "server", Kind.LABELS),
        ("server", "client", Kind.GRADIENT),
    }
)
"""The routes of every scheme in which clients send cut activations with labels to a server
and get the cut gradient back (vanilla adds the hand-over of weights between clients)."""


# --- checkpoints -------------------------------------------------------------------------


def never(scheme: SchemeConfig) -> bool:
    return False


def in_turns(scheme: SchemeConfig) -> bool:
    """One client at a time: sequential turns, or a single client."""
    return scheme.client_order == "sequential" or scheme.clients == 1


def one_task(scheme: SchemeConfig) -> tuple[str, ...]:
    return ("class",)


@dataclass(frozen=True, kw_only=True)
class SchemeSpec:
    """Everything about one scheme; see the module docstring."""

    name: str
    """``scheme.name``."""
    layout: Callable[[Config], RoleCounts]
    """Ranks per role, in rank order; raises ``ConfigError`` for a config it cannot lay out."""
    runners: Mapping[Role, Runner | str]
    """The function each role runs (``"module:function"``, imported when a rank runs)."""
    check: Runner | str | None = None
    """The scheme's own structural checks of the planned run (``RunPlan -> None``, raising
    ``ConfigError`` or ``DataError``), for a scheme that constrains what a part holds or how
    the model is built: its model's parts (``RunPlan.model_parts``, on the meta device), the
    config, the dataset. ``engine.prepare`` calls it on every rank before any traffic, so a
    problem is one line and exit 2."""
    routes: frozenset[Route] = frozenset()
    """(sender role, receiver role, kind) the transport lets through; nothing else leaves."""
    cuts: int | None = None
    """Cut layers the model needs (None: any number, or the scheme says in its layout)."""
    colocated: tuple[tuple[int, ...], ...] = ()
    """Groups of model parts one rank holds together (U-shaped: the client's head and tail,
    ``(0, 2)``): they may share weights (tied embeddings); parts on different ranks may not."""
    options: type[SchemeOptions] = SchemeOptions
    """The scheme's own options, read from the ``scheme`` section."""
    checkpointable: Callable[[SchemeConfig], bool] = never
    """Whether a run's step order is deterministic, so every rank agrees on what step N is."""
    checkpoint_rule: str = ""
    """When it is, in words, for the error that lists the schemes that can checkpoint."""
    tasks: Callable[[SchemeConfig], tuple[str, ...]] = one_task
    """The tasks whose evaluations the summary reports apart (``test_by_task``)."""
    vertical: bool = False
    """Its parties hold feature groups of the same records (a vertical partition), not whole
    rows: the dataset must be partitioned so, and ``data.clients`` cannot pick shards."""
    zoo_layers: bool = False
    """Rebuilds the zoo's layers per party or per task, so it needs a zoo model."""
    pools_shards: bool = False
    """May read every client shard as one pool (``data.pool``): a one-rank baseline."""
    samples_evaluation: bool = False
    """Every client evaluates its own model in parallel order, so ``train.eval_clients`` may
    sample the ones that do."""
    tuple_cuts: bool = False
    """Its cut exchange carries a tuple of tensors where several values cross a cut (hidden
    states and an attention mask): float ones get gradients back, others travel forward."""
    hosts_clients: bool = False
    """A client rank may host several logical clients (``scheme.clients_per_rank``)."""
    ignores_other_options: bool = False
    """Accepts other schemes' options and ignores them: a baseline that every scheme's
    config is switched to with ``scheme.name=...`` for a comparison."""

    NAME: ClassVar[re.Pattern[str]] = re.compile(r"[a-z][a-z0-9_]*")

    def __post_init__(self) -> None:
        if not self.NAME.fullmatch(self.name):
            raise ValueError(f"scheme name {self.name!r}: lowercase letters, digits, _")
        if not dataclasses.is_dataclass(self.options) or not issubclass(
            self.options, SchemeOptions
        ):
            raise TypeError(f"scheme {self.name}: options must be a SchemeOptions dataclass")
        clash = _COMMON & {f.name for f in dataclasses.fields(self.options)}
        if clash:
            raise ValueError(
                f"scheme {self.name}: options {sorted(clash)} clash with the "
                f"scheme section's own keys"
            )
        for role in self.runners:
            if not isinstance(role, Role):
                raise TypeError(f"scheme {self.name}: runner keys are Roles, got {role!r}")
        for runner in (*self.runners.values(), self.check):
            if isinstance(runner, str) and runner.count(":") != 1:
                raise ValueError(f"scheme {self.name}: runner {runner!r} is not module:function")

    def runner(self, role: Role) -> Runner:
        """The function ``role`` runs, imported now if the spec names it."""
        found = self.runners.get(role)
        if found is None:
            raise ConfigError(f"scheme {self.name} has no {role} role")
        return _imported(found)

    def check_planned(self, run: Any) -> None:
        """Runs ``check`` on a ``RunPlan``, if the scheme has one."""
        if self.check is not None:
            _imported(self.check)(run)

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]


def _imported(found: Callable[..., Any] | str) -> Callable[..., Any]:
    """A function, or the one a ``"module:function"`` names (imported now)."""
    if isinstance(found, str):
        module, _, name = found.partition(":")
        return getattr(importlib.import_module(module), name)
    return found


_COMMON = {"name", "clients", "client_order", "clients_per_rank", "options"}
_REGISTERED: dict[str, SchemeSpec] = {}


def register(spec: SchemeSpec) -> SchemeSpec:
    """Makes ``spec`` available as ``scheme.name: <spec.name>`` in this process (every rank
    of a run must register it before loading the config)."""
    if spec.name in BUILTIN or _REGISTERED.get(spec.name, spec) is not spec:
        raise ValueError(f"scheme {spec.name} is already registered")
    _REGISTERED[spec.name] = spec
    return spec


def names() -> list[str]:
    return [*BUILTIN, *_REGISTERED]


def get(name: str) -> SchemeSpec:
    """The spec of ``scheme.name: name``; a name nobody registered is a ``ConfigError``."""
    if name in BUILTIN:
        return importlib.import_module(f"mpisplit.specs.{name}").SPEC
    if name in _REGISTERED:
        return _REGISTERED[name]
    raise ConfigError(f"scheme.name: must be one of {', '.join(names())}, got {name!r}")


def owners(option: str) -> list[str]:
    """The schemes that have ``option`` among their own options."""
    return [name for name in names() if option in get(name).option_names()]


def check_hosting(scheme: SchemeConfig) -> None:
    """``scheme.clients_per_rank``: a scheme whose spec allows it, and client ranks that each
    host the same number of logical clients (the arithmetic names every factor)."""
    per_rank = scheme.clients_per_rank
    require(per_rank >= 1, "scheme.clients_per_rank", f"must be >= 1, got {per_rank}")
    if per_rank == 1:
        return
    hosting = [name for name in names() if get(name).hosts_clients]
    require(
        get(scheme.name).hosts_clients,
        "scheme.clients_per_rank",
        f"scheme {scheme.name} runs one client per rank (clients_per_rank > 1: "
        f"{', '.join(hosting)})",
    )
    ranks, left = divmod(scheme.clients, per_rank)
    require(
        not left,
        "scheme.clients_per_rank",
        f"{scheme.clients} clients at {per_rank} per rank = {ranks} client rank(s) and "
        f"{left} client(s) left over; set scheme.clients to a multiple of {per_rank}",
    )


def check_checkpointable(scheme: SchemeConfig) -> None:
    """Coordinated checkpoints need every rank to agree on what step N means, so the step
    order must be deterministic."""
    if get(scheme.name).checkpointable(scheme):
        return
    rules = "; ".join(
        " with ".join(filter(None, (spec.name, spec.checkpoint_rule)))
        for spec in map(get, names())
        if spec.checkpointable is not never
    )
    raise ConfigError(
        f"checkpoint.every_steps: coordinated checkpoints need a deterministic "
        f"step order ({rules}); scheme {scheme.name} with client_order "
        f"{scheme.client_order} has none"
    )
