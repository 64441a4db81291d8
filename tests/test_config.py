"""Config validation without MPI: every mistake is one clear error naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mpisplit.config import Config, ConfigError, apply_overrides, config_from_dict, load_config
from mpisplit.engine import prepare
from mpisplit.topology import plan

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"lr": -1}}, "train.lr: must be > 0"),
        ({"train": {"lrr": 0.1}}, "train.lrr: unknown key"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"train": {"epochs": "ten"}}, "train.epochs: expected int"),
        ({"train": {"epochs": True}}, "train.epochs: expected an integer"),
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer: must be one of sgd, adam, adamw"),
        ({"scheme": {"clients": 0}}, "scheme.clients: must be >= 1"),
        ({"scheme": {"name": "telepathy"}}, "scheme.name: must be one of"),
        ({"data": {"shuffle": "yes"}}, "data.shuffle: expected true or false"),
        ({"model": {"cuts": []}}, "model.cuts: needs at least one cut"),
        ({"data": "oops"}, "data: expected a mapping"),
        ({"transport": {"timeout_s": 0}}, "transport.timeout_s: must be > 0"),
        (
            {"scheme": {"name": "multitask", "tasks": ["class"]}},
            "scheme.tasks: multitask needs two or more tasks",
        ),
        (
            {"scheme": {"name": "multitask", "tasks": ["class", "class"]}},
            "scheme.tasks: needs at least one task, each at most once",
        ),
        (
            {"scheme": {"name": "splitfed", "fedavg_every": 5, "fedavg_every_epochs": 2}},
            "scheme.fedavg_every_epochs: counts epochs instead of scheme.fedavg_every steps",
        ),
        (
            {"scheme": {"fedavg_every_epochs": 1}},
            "scheme.fedavg_every_epochs: only used by scheme splitfed",
        ),
        (
            {"scheme": {"name": "splitfed", "fedavg_every_epochs": -1}},
            "scheme.fedavg_every_epochs: must be >= 0",
        ),
        (
            {"scheme": {"name": "vertical", "clients": 2, "label_holder": "party2"}},
            "scheme.label_holder: must be server or party<k> with k < scheme.clients",
        ),
        (
            {"scheme": {"name": "vertical", "label_holder": "client0"}},
            "scheme.label_holder: must be server or party<k>",
        ),
        ({"scheme": {"party_options": [{}]}}, "scheme.party_options: only used by scheme vertical"),
        (
            {"scheme": {"name": "spatiotemporal", "site_timeout_s": 0}},
            "scheme.site_timeout_s: must be > 0",
        ),
    ],
)
def test_bad_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config_from_dict(data)


def test_defaults_and_coercion() -> None:
    cfg = config_from_dict({"train": {"lr": 1}, "model": {"cuts": ["fc2", 3]}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.cuts == ("fc2", 3)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_use_the_same_validation(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.1}}))
    cfg = load_config(path, ["train.lr=0.5", "scheme.clients=4", "model.cuts=[fc1]"])
    assert (cfg.train.lr, cfg.scheme.clients, cfg.model.cuts) == (0.5, 4, ("fc1",))
    with pytest.raises(ConfigError, match=r"train\.lr: must be > 0"):
        load_config(path, ["train.lr=0"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["lr=0.1"])
    with pytest.raises(ConfigError, match=r"train\.nope: unknown key"):
        apply_overrides({}, ["train.nope=1"]) and load_config(path, ["train.nope=1"])


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_wrong_world_size_shows_the_arithmetic(dataset) -> None:
    cfg = config_from_dict(
        {"scheme": {"clients": 3}, "data": {"path": str(dataset("breast_cancer", clients=3))}}
    )
    with pytest.raises(
        ConfigError,
        match=r"needs 1 server \+ 3 clients = 4 MPI ranks, but the "
        r"job has 3; run with mpiexec -n 4",
    ):
        prepare(cfg, 3)


def test_cut_must_exist_and_data_must_match(dataset) -> None:
    path = str(dataset("breast_cancer", clients=3))
    base = {"scheme": {"clients": 3}, "data": {"path": path}}
    with pytest.raises(ConfigError, match=r"model\.cuts\[0\]: 'fc9' is not a layer"):
        prepare(config_from_dict({**base, "model": {"cuts": ["fc9"]}}), 4)
    with pytest.raises(ConfigError, match=r"model\.cuts\[0\]: cut 0 leaves a segment empty"):
        prepare(config_from_dict({**base, "model": {"cuts": [0]}}), 4)
    with pytest.raises(ConfigError, match=r"needs exactly 1 cut"):
        prepare(config_from_dict({**base, "model": {"cuts": ["fc2", "head"]}}), 4)
    with pytest.raises(ConfigError, match=r"model\.options\.depth: not an option of mlp"):
        prepare(config_from_dict({**base, "model": {"options": {"depth": 3}}}), 4)
    with pytest.raises(ConfigError, match=r"scheme\.clients: 2 clients, but .* prepared for 3"):
        prepare(config_from_dict({**base, "scheme": {"clients": 2}}), 3)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path: Path, dataset) -> None:
    cfg = load_config(path)
    name = Path(cfg.data.path).name.rsplit("-", 1)[0]
    name, vertical, _ = name.partition("-vertical")  # NAME-vertical-<K>c: feature groups
    options = {"partition": "vertical"} if vertical else {}
    if name == "synthetic":  # CIFAR-shaped images (vanilla-cifar-many-clients.yaml)
        options |= {"shape": (3, 32, 32), "classes": 10}
    prepared = dataset(name, clients=cfg.scheme.clients, **options)
    cfg = load_config(path, [f"data.path={prepared}"])
    run = prepare(cfg, plan(cfg).world_size)
    assert isinstance(run.config, Config)
    assert len(run.model_parts) == len(cfg.model.cuts) + 1
