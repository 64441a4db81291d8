"""SplitFed (``mpisplit.schemes.splitfed``): parallel clients whose lower weights are averaged
every few steps; one server copy per client (v1) or one shared server model (v2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mpisplit.specs import (
    LABELS_AT_SERVER,
    AveragingOptions,
    SchemeSpec,
    parallel_only,
    require,
    server_and_clients,
)
from mpisplit.topology import Role

if TYPE_CHECKING:
    from mpisplit.config import Config, SchemeConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class SplitfedOptions(AveragingOptions):
    fedavg_every_epochs: int = 0
    """Average every this many epochs instead of every fedavg_every steps (0 = count
    steps): every N x E steps, E the batches per epoch of the client with the most (with
    equal shards, exactly every N epochs of every client)."""
    splitfed_variant: Literal["v1", "v2"] = "v1"
    """v1 = one server copy per client, averaged with the clients'; v2 = one shared server
    model updated client by client in ``server_order``."""
    server_order: Literal["fixed", "random"] = "fixed"
    """v2: the order the server serves the clients' batches in; fixed = rounds in client
    index order (deterministic), random = the client of each batch drawn at random (from
    train.seed) among the batches due before the next average."""

    def __post_init__(self) -> None:
        AveragingOptions.__post_init__(self)
        require(
            self.fedavg_every_epochs >= 0,
            "scheme.fedavg_every_epochs",
            f"must be >= 0 (0 = count steps), got {self.fedavg_every_epochs}",
        )
        require(
            not self.fedavg_every_epochs or self.fedavg_every == 1,
            "scheme.fedavg_every_epochs",
            f"counts epochs instead of scheme.fedavg_every "
            f"steps: set only one of them (leave fedavg_every at 1, got "
            f"{self.fedavg_every})",
        )

    def check(self, cfg: Config) -> None:
        parallel_only(
            cfg,
            "trains its clients in parallel (their lower weights are averaged, never handed over)",
        )


def deterministic(scheme: SchemeConfig) -> bool:
    return scheme.options.splitfed_variant == "v2" and scheme.options.server_order == "fixed"


RUN = "mpisplit.schemes.splitfed:run"
SPEC = SchemeSpec(
    name="splitfed",
    layout=server_and_clients,
    runners={Role.SERVER: RUN, Role.CLIENT: RUN},
    routes=LABELS_AT_SERVER,
    cuts=1,
    options=SplitfedOptions,
    checkpointable=deterministic,
    checkpoint_rule="splitfed_variant: v2 and server_order: fixed",
    samples_evaluation=True,
    hosts_clients=True,
)
