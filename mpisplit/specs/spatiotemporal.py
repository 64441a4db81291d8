"""Spatio-temporal split learning (``mpisplit.schemes.spatiotemporal``): sites train their one
layer jointly with the server, hand their cut outputs over once and leave; the server trains
on alone; silent sites are dropped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mpisplit.protocol import Kind
from mpisplit.specs import (
    LABELS_AT_SERVER,
    SchemeOptions,
    SchemeSpec,
    parallel_only,
    require,
    server_and_clients,
)
from mpisplit.topology import Role

if TYPE_CHECKING:
    from mpisplit.config import Config


@dataclass(frozen=True, kw_only=True, slots=True)
class SpatiotemporalOptions(SchemeOptions):
    joint_epochs: int = 1
    """Passes over each site's shard in the joint phase (sites and server train together,
    as vanilla parallel); replaces train.epochs for this scheme."""
    detached_epochs: int = 0
    """Passes of the server alone over the sites' cached cut outputs after the sites have
    frozen their layers and left (0 = no detached phase)."""
    site_timeout_s: float = 60.0
    """A site that sends nothing for this long while other sites talk (or for
    transport.timeout_s when none talks) is dropped from the rest of the run with one
    warning line, instead of ending the job. Must be below transport.timeout_s."""

    def __post_init__(self) -> None:
        require(
            self.joint_epochs >= 0, "scheme.joint_epochs", f"must be >= 0, got {self.joint_epochs}"
        )
        require(
            self.detached_epochs >= 0,
            "scheme.detached_epochs",
            f"must be >= 0 (0 = no detached phase), got {self.detached_epochs}",
        )
        require(
            self.site_timeout_s > 0,
            "scheme.site_timeout_s",
            f"must be > 0, got {self.site_timeout_s}",
        )

    def check(self, cfg: Config) -> None:
        parallel_only(cfg, "sites train in parallel, each with its own layer (never handed over)")
        require(
            self.site_timeout_s < cfg.transport.timeout_s,
            "scheme.site_timeout_s",
            f"{self.site_timeout_s:g} s must be below transport.timeout_s "
            f"({cfg.transport.timeout_s:g} s): a site stalled longer than "
            f"transport.timeout_s times out on waking, so the server must have dropped it "
            f"by then",
        )


RUN = "mpisplit.schemes.spatiotemporal:run"
SPEC = SchemeSpec(
    name="spatiotemporal",
    layout=server_and_clients,
    runners={Role.SERVER: RUN, Role.CLIENT: RUN},
    routes=LABELS_AT_SERVER | {("server", "client", Kind.CONTROL)},  # the roster
    cuts=1,
    options=SpatiotemporalOptions,
    check="mpisplit.schemes.spatiotemporal:check_site_part",
)
