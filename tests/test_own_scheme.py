"""Adding a scheme is one module: this file defines a scheme ("capped": split learning whose
clients stop after ``scheme.steps`` steps, its own option), registers it and runs it under
``mpiexec`` through the ordinary CLI. Run as a script it is that CLI with the scheme added:
``mpiexec -n 3 python tests/test_own_scheme.py train CONFIG ...``."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mpisplit.config import ConfigError, config_from_dict
from mpisplit.specs import (
    LABELS_AT_SERVER,
    SchemeOptions,
    SchemeSpec,
    register,
    require,
    server_and_clients,
)
from mpisplit.topology import Role, plan

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


@dataclass(frozen=True, kw_only=True, slots=True)
class CappedOptions(SchemeOptions):
    steps: int = 1
    """Training steps of every client."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, "scheme.steps", f"must be >= 1, got {self.steps}")


def serve(ctx: Any) -> Any:
    from mpisplit.schemes.serving import serve_with
    from mpisplit.schemes.turns import clients_total_steps

    total = clients_total_steps(ctx)
    return serve_with(ctx, ctx.build_segment(1, total), total)


def train_client(ctx: Any) -> Any:
    from mpisplit.schemes.lower_client import train_lower_client

    cfg = ctx.config
    train = dataclasses.replace(cfg.train, max_steps=cfg.scheme.options.steps)
    run = dataclasses.replace(ctx.run, config=dataclasses.replace(cfg, train=train))
    return train_lower_client(dataclasses.replace(ctx, run=run), ctx.topology.ranks(Role.SERVER)[0])


SPEC = SchemeSpec(
    name="capped",
    layout=server_and_clients,
    runners={Role.SERVER: serve, Role.CLIENT: train_client},
    routes=LABELS_AT_SERVER,
    cuts=1,
    options=CappedOptions,
)


def _registered() -> SchemeSpec:
    return register(SPEC)


def test_options_and_layout_come_from_the_spec() -> None:
    _registered()
    cfg = config_from_dict({"scheme": {"name": "capped", "clients": 2, "steps": 3}})
    assert cfg.scheme.options == CappedOptions(steps=3)
    assert cfg.to_dict()["scheme"] == {
        "name": "capped",
        "clients": 2,
        "client_order": "parallel",
        "clients_per_rank": 1,
        "steps": 3,
    }
    assert [p.label for p in plan(cfg).placements] == ["server", "client0", "client1"]
    with pytest.raises(ConfigError, match=r"scheme\.steps: must be >= 1, got 0"):
        config_from_dict({"scheme": {"name": "capped", "steps": 0}})
    with pytest.raises(ConfigError, match=r"scheme\.join: only used by scheme vertical, not cap"):
        config_from_dict({"scheme": {"name": "capped", "join": "sum"}})
    with pytest.raises(ConfigError, match=r"scheme\.steps: only used by scheme capped, not van"):
        config_from_dict({"scheme": {"name": "vanilla", "steps": 3}})
    with pytest.raises(ConfigError, match=r"checkpoint\.every_steps: coordinated checkpoints"):
        config_from_dict({"scheme": {"name": "capped"}, "checkpoint": {"every_steps": 2}})


def test_a_scheme_defined_here_trains_under_mpiexec(dataset, tmp_path: Path) -> None:
    from mpisplit.audit import audit

    data = dataset("breast_cancer", clients=2)
    command = [
        str(Path(sys.executable).with_name("mpiexec")),
        "-n",
        "3",
        sys.executable,
        str(HERE),
        "train",
        "configs/vanilla-breast-cancer.yaml",
        "scheme.name=capped",
        "scheme.clients=2",
        "scheme.steps=4",
        f"data.path={data}",
        f"run.dir={tmp_path}",
        "run.progress=none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["scheme"] == "capped" and summary["steps_per_rank"] == [8, 4, 4]
    assert summary["test_accuracy"] is not None
    _registered()
    routes = audit(tmp_path)
    assert routes and all(route.allowed for route in routes)
    assert {route.kind for route in routes} == {"ACTIVATION", "LABELS", "GRADIENT"}


if __name__ == "__main__":
    from mpisplit.cli import main

    _registered()
    sys.exit(main(sys.argv[1:]))
