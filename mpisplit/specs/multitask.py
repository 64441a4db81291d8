"""Multi-task split learning (``mpisplit.schemes.multitask``): one task server per task, each
with its own head; clients forward once and step on the sum of the heads' gradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mpisplit.specs import LABELS_AT_SERVER, SchemeOptions, SchemeSpec, parallel_only, require
from mpisplit.topology import Role

if TYPE_CHECKING:
    from mpisplit.config import Config, SchemeConfig

TASKS = ("class", "parity", "binary")
"""The tasks a head can learn (see ``mpisplit.schemes.multitask.task_target``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MultitaskOptions(SchemeOptions):
    tasks: tuple[str, ...] = ("class",)
    """One task server (and head) per entry, two or more, all derived from the dataset's
    one label: class (the label), parity (label % 2), binary (label >= num_classes / 2).
    Parallel client order only."""

    def __post_init__(self) -> None:
        require(
            len(self.tasks) >= 1 and len(set(self.tasks)) == len(self.tasks),
            "scheme.tasks",
            f"needs at least one task, each at most once; got {list(self.tasks)}",
        )
        require(
            set(self.tasks) <= set(TASKS),
            "scheme.tasks",
            f"unknown task(s) {sorted(set(self.tasks) - set(TASKS))} (tasks: {', '.join(TASKS)})",
        )

    def check(self, cfg: Config) -> None:
        parallel_only(cfg, "trains its clients in parallel")
        require(
            len(self.tasks) >= 2,
            "scheme.tasks",
            f"multitask needs two or more tasks (one head each, e.g. [class, parity]); "
            f"got {list(self.tasks)}",
        )


def task_servers(cfg: Config) -> list[tuple[Role, int]]:
    """One server per task (server t holds head t), then the clients."""
    return [(Role.SERVER, len(cfg.scheme.options.tasks)), (Role.CLIENT, cfg.scheme.clients)]


def tasks(scheme: SchemeConfig) -> tuple[str, ...]:
    return scheme.options.tasks


SPEC = SchemeSpec(
    name="multitask",
    layout=task_servers,
    runners={
        Role.SERVER: "mpisplit.schemes.multitask:serve",
        Role.CLIENT: "mpisplit.schemes.multitask:train_client",
    },
    routes=LABELS_AT_SERVER,
    cuts=1,
    options=MultitaskOptions,
    tasks=tasks,
    samples_evaluation=True,
    check="mpisplit.schemes.multitask:check_heads",
    hosts_clients=True,
)
