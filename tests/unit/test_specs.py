"""Scheme specs and the scheme section of the config, without processes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mpisplit import specs
from mpisplit.config import ConfigError, config_from_dict, load_config
from mpisplit.protocol import Kind
from mpisplit.specs import SchemeOptions, SchemeSpec, server_and_clients
from mpisplit.topology import Role, plan

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", specs.BUILTIN)
def test_builtin_specs_are_complete(name: str) -> None:
    spec = specs.get(name)
    assert spec.name == name
    cfg = config_from_dict(
        {
            "scheme": {
                "name": name,
                "clients": 2,
                **({"tasks": ["class", "parity"]} if name == "multitask" else {}),
            },
            "model": {
                "cuts": ["fc1", "fc2"] if name == "multihop" else ["fc1", "fc2"][: spec.cuts or 1]
            },
        }
    )
    roles = {p.role for p in plan(cfg).placements}
    assert roles == set(spec.runners), "every role has a runner, every runner a role"
    for role in roles:
        assert callable(spec.runner(role))
    for sender, receiver, kind in spec.routes:
        assert {sender, receiver} <= set(Role) and isinstance(kind, Kind)


def test_layouts() -> None:
    def roles(scheme: dict, cuts: tuple = ("fc2",)) -> list[str]:
        cfg = config_from_dict({"scheme": scheme, "model": {"cuts": list(cuts)}})
        return [p.label for p in plan(cfg).placements]

    assert roles({"name": "multihop", "clients": 2}, ("fc1", "fc2", "head")) == [
        "server",
        "relay0",
        "relay1",
        "client0",
        "client1",
    ]
    assert roles({"name": "multitask", "clients": 1, "tasks": ["class", "parity"]}) == [
        "server",
        "server1",
        "client0",
    ]
    assert roles({"name": "fedavg", "clients": 2}) == ["client0", "client1"]
    with pytest.raises(ConfigError, match=r"model\.cuts: multihop needs at least 2 cuts"):
        roles({"name": "multihop"})


def test_options_belong_to_their_scheme() -> None:
    cfg = config_from_dict({"scheme": {"name": "splitfed", "fedavg_every": 4}})
    assert cfg.scheme.options.fedavg_every == 4 and cfg.scheme.options.splitfed_variant == "v1"
    assert cfg.to_dict()["scheme"] == {
        "name": "splitfed",
        "clients": 1,
        "client_order": "parallel",
        "clients_per_rank": 1,
        "fedavg_every": 4,
        "average_buffers": True,
        "fedavg_every_epochs": 0,
        "splitfed_variant": "v1",
        "server_order": "fixed",
    }
    # another scheme's option at its default: a resolved config from before the move
    assert (
        config_from_dict(
            {"scheme": {"name": "vanilla", "join": "concat", "tasks": ["class"]}}
        ).scheme.options.turn_steps
        == 0
    )
    with pytest.raises(
        ConfigError,
        match=r"scheme\.tasks: only used by scheme multitask, not "
        r"vanilla",
    ):
        config_from_dict({"scheme": {"tasks": ["class", "parity"]}})
    with pytest.raises(
        ConfigError,
        match=r"scheme\.fedavg_every: only used by schemes "
        r"fedavg, splitfed, not syncsgd",
    ):
        config_from_dict({"scheme": {"name": "syncsgd", "fedavg_every": 3}})
    with pytest.raises(
        ConfigError,
        match=r"scheme\.bogus: unknown key \(valid keys in scheme: "
        r"name, clients, client_order, clients_per_rank, "
        r"turn_steps\)",
    ):
        config_from_dict({"scheme": {"bogus": 1}})
    # the comparison baseline takes any scheme's config
    central = config_from_dict(
        {"scheme": {"name": "centralized", "tasks": ["class", "parity"], "turn_steps": 3}}
    )
    assert central.scheme.options.turn_steps == 3


def test_cross_checks_and_checkpointability() -> None:
    with pytest.raises(
        ConfigError,
        match=r"scheme\.client_order: multitask trains its clients "
        r"in parallel; set client_order: parallel",
    ):
        config_from_dict(
            {
                "scheme": {
                    "name": "multitask",
                    "client_order": "sequential",
                    "tasks": ["class", "parity"],
                }
            }
        )
    with pytest.raises(
        ConfigError,
        match=r"scheme\.site_timeout_s: 60 s must be below "
        r"transport\.timeout_s \(30 s\)",
    ):
        config_from_dict({"scheme": {"name": "spatiotemporal"}, "transport": {"timeout_s": 30}})
    checkpoint = {"every_steps": 5}
    for scheme in (
        {"client_order": "sequential", "clients": 3},
        {"name": "vertical"},
        {"name": "splitfed", "splitfed_variant": "v2"},
    ):
        config_from_dict({"scheme": scheme, "checkpoint": checkpoint})
    with pytest.raises(
        ConfigError,
        match=r"deterministic step order \(multihop with "
        r"scheme\.client_order: sequential; splitfed with "
        r"splitfed_variant: v2 .*; vanilla with .*; vertical\)",
    ):
        config_from_dict({"scheme": {"clients": 2}, "checkpoint": checkpoint})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_round_trips(path: Path) -> None:
    cfg = load_config(path)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert plan(cfg).world_size >= 1


def test_registering_a_scheme() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
    class Options(SchemeOptions):
        name: int = 0

    with pytest.raises(ValueError, match="clash with the scheme section's own keys"):
        SchemeSpec(name="clash", layout=server_and_clients, runners={}, options=Options)
    with pytest.raises(ValueError, match="lowercase"):
        SchemeSpec(name="Bad-Name", layout=server_and_clients, runners={})
    with pytest.raises(ValueError, match="module:function"):
        SchemeSpec(name="ok", layout=server_and_clients, runners={Role.SERVER: "nowhere"})
    with pytest.raises(ValueError, match="already registered"):
        specs.register(SchemeSpec(name="vanilla", layout=server_and_clients, runners={}))
    with pytest.raises(
        ConfigError,
        match=r"scheme\.name: must be one of centralized, .*, "
        r"vertical, got 'nope'",
    ):
        specs.get("nope")


OLD_SCHEME_SECTION = {
    "clients": 1,
    "client_order": "parallel",
    "turn_steps": 0,
    "fedavg_every": 1,
    "fedavg_every_epochs": 0,
    "splitfed_variant": "v1",
    "server_order": "fixed",
    "join": "concat",
    "label_holder": "server",
    "party_options": [],
    "joint_epochs": 1,
    "detached_epochs": 0,
    "site_timeout_s": 60.0,
    "tasks": ["class"],
}
"""The scheme section of a resolved config (``config.yaml``) written before the options moved
to their schemes: every scheme's options, at their defaults."""


@pytest.mark.parametrize("name", specs.BUILTIN)
def test_resolved_configs_from_before_still_load(name: str) -> None:
    """``mpisplit audit`` reloads a run directory's config.yaml."""
    tasks = {"tasks": ["class", "parity"]} if name == "multitask" else {}
    cfg = config_from_dict({"scheme": {**OLD_SCHEME_SECTION, "name": name, **tasks}})
    assert cfg.scheme.name == name
