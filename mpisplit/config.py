"""Run configuration: YAML → frozen, typed, validated dataclasses.

The YAML file is the single source of truth for a run. Every key is declared here with a
one-line docstring; unknown keys, wrong types and impossible values are rejected with a
``ConfigError`` that names the key and says how to fix it, before any MPI traffic happens.
Command-line overrides (``section.key=value``) go through exactly the same path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


DEFAULT_SCHEME = "vanilla"


@dataclass(frozen=True, kw_only=True, slots=True)
class SchemeConfig:
    """The ``scheme`` section: which scheme, how many clients, in which order; every other
    key of the section is one of the scheme's own options (its spec's ``options`` dataclass,
    ``mpisplit.specs``)."""

    name: str = DEFAULT_SCHEME
    """Which split-learning configuration (or baseline) to run (``mpisplit.specs.names()``)."""
    clients: int = 1
    """Number of data-holding client ranks."""
    client_order: Literal["sequential", "parallel"] = "parallel"
    """sequential: round-robin with weight hand-over; parallel: all clients at once."""
    clients_per_rank: int = 1
    """Logical clients one client rank hosts, each with its own part, optimizer, data
    position and random streams (schemes whose spec allows it; see ``mpisplit.specs``)."""
    options: Any = None
    """The scheme's own options, read from the section's other keys (None: their defaults)."""

    def __post_init__(self) -> None:
        from mpisplit import specs

        spec = specs.get(self.name)
        _require(self.clients >= 1, "scheme.clients", f"must be >= 1, got {self.clients}")
        specs.check_hosting(self)
        if self.options is None:
            object.__setattr__(self, "options", spec.options())
        _require(
            isinstance(self.options, spec.options),
            "scheme.options",
            f"scheme {self.name} takes {spec.options.__name__}, got {type(self.options).__name__}",
        )

    def to_dict(self) -> dict[str, Any]:
        """The section as written in YAML: the scheme's options beside name and clients."""
        common = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"
        }
        return _plain({**common, **dataclasses.asdict(self.options)})


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    name: str = "mlp"
    """A zoo model (mlp, cnn, resnet, vgg, resnet50) or a factory returning an nn.Module:
    package.module:function, or path/to/file.py:function relative to the config file."""
    cuts: tuple[str | int, ...] = ("fc2",)
    """Module names as print(model) shows them (layer2, blocks.3, features.1), or indices of
    top-level layers; part i ends just before cut i's module runs."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the factory (e.g. hidden sizes); checked against its signature.
    The dataset's input_shape and num_classes are passed where it takes them."""
    seed: int = 0
    """The model is factory(**options) built under torch.manual_seed(seed); every rank's
    fresh part equals the same part of that model (the zoo also seeds each layer alone)."""

    def __post_init__(self) -> None:
        _require(len(self.cuts) >= 1, "model.cuts", "needs at least one cut layer")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    path: str = "data/breast_cancer-3c"
    """Directory made by ``mpisplit data prepare``."""
    batch_size: int = 32
    """Samples per batch on each client."""
    prefetch: int = 2
    """Batches read ahead from HDF5 on a background thread (0 = read inline)."""
    shuffle: bool = True
    """Block-shuffle each epoch (deterministic by train.seed and epoch)."""
    clients: tuple[int, ...] = ()
    """Which of the prepared client shards this run uses, in order: client k reads shard
    clients[k] (scheme.clients must equal their number); empty = all of them. [0] with
    scheme.name: centralized and scheme.clients: 1 trains on site 0's shard alone."""
    pool: bool = False
    """centralized: pool the clients' shards into one stream shuffled row by row each epoch
    (the pooled, shuffled baseline) instead of visiting them in split learning's turns."""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.prefetch >= 0, "data.prefetch", f"must be >= 0, got {self.prefetch}")
        _require(
            all(k >= 0 for k in self.clients) and len(set(self.clients)) == len(self.clients),
            "data.clients",
            f"shard indices must be >= 0 and distinct, got {list(self.clients)}",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    epochs: int = 1
    """Passes over each client's shard."""
    max_steps: int = 0
    """Stop each client after this many steps (0 = no limit)."""
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    """Optimizer of every model part."""
    lr: float = 0.05
    """Learning rate."""
    momentum: float = 0.0
    """SGD momentum."""
    weight_decay: float = 0.0
    """L2 penalty / decoupled weight decay."""
    schedule: Literal["constant", "cosine", "step"] = "constant"
    """Learning-rate schedule, stepped once per optimizer step."""
    step_size: int = 100
    """``step`` schedule: steps between decays."""
    gamma: float = 0.5
    """``step`` schedule: decay factor."""
    seed: int = 0
    """Seed of data order and any randomness in training."""
    eval_every: int = 0
    """Evaluate on the held-out test data every N client steps (0 = only at the end)."""
    eval_clients: int = 0
    """Parallel schemes, where every client evaluates its own model: how many clients do
    (0 = every client; N = N clients drawn from train.seed, the same ones every time).
    Their sample-weighted mean is the run's test accuracy."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _require(self.max_steps >= 0, "train.max_steps", "must be >= 0 (0 = no limit)")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.momentum >= 0, "train.momentum", f"must be >= 0, got {self.momentum}")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(self.step_size >= 1, "train.step_size", "must be >= 1")
        _require(0 < self.gamma <= 1, "train.gamma", f"must be in (0, 1], got {self.gamma}")
        _require(self.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = only at the end)")
        _require(
            self.eval_clients >= 0,
            "train.eval_clients",
            f"must be >= 0 (0 = every client), got {self.eval_clients}",
        )
        _require(
            self.seed >= 0,
            "train.seed",
            f"must be >= 0 (it seeds numpy's data order), got {self.seed}",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class TransportConfig:
    timeout_s: float = 120.0
    """A rank waiting longer than this for a peer aborts the whole job, naming the peer."""
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    """Where model parts run; auto = cuda when available."""
    microbatches: int = 1
    """Split each batch into this many microbatches whose cut exchanges overlap (GPipe-style
    pipelining); gradients accumulate, so the update equals the unsplit batch's."""
    schedule: Literal["gpipe", "1f1b"] = "gpipe"
    """Order of a client's microbatches: gpipe runs every forward, then every backward;
    1f1b backs up the oldest microbatch after each next forward, so at most two
    microbatches' activations are held at once (less memory; the same step time while the
    server is the slower stage)."""
    compression: Literal["none", "fp16", "bf16", "int8", "topk"] = "none"
    """Wire encoding of cut activations and gradients (lossy except none)."""
    topk_ratio: float = 0.1
    """``topk`` compression: fraction of the entries sent."""

    def __post_init__(self) -> None:
        _require(self.timeout_s > 0, "transport.timeout_s", f"must be > 0, got {self.timeout_s}")
        _require(
            self.microbatches >= 1,
            "transport.microbatches",
            f"must be >= 1, got {self.microbatches}",
        )
        _require(
            0 < self.topk_ratio <= 1,
            "transport.topk_ratio",
            f"must be in (0, 1], got {self.topk_ratio}",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class PrivacyConfig:
    noise_std: float = 0.0
    """Standard deviation of Gaussian noise added to each cut activation a client sends."""
    clip_norm: float = 0.0
    """Clip each sample's cut activation to this L2 norm before the noise (0 = off)."""
    nopeek_weight: float = 0.0
    """Weight of the NoPeek penalty: distance correlation of raw inputs and cut activations."""
    seed: int = 0
    """Seed of the noise (each client offsets it by its index)."""

    def __post_init__(self) -> None:
        _require(self.noise_std >= 0, "privacy.noise_std", f"must be >= 0, got {self.noise_std}")
        _require(self.clip_norm >= 0, "privacy.clip_norm", f"must be >= 0, got {self.clip_norm}")
        _require(
            self.nopeek_weight >= 0,
            "privacy.nopeek_weight",
            f"must be >= 0, got {self.nopeek_weight}",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    dir: str = "runs/default"
    """Run directory: resolved config, per-rank metrics, summary."""
    log_every: int = 10
    """Steps between progress lines and metric records."""
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    """Rank 0's progress display: auto = a bar on a terminal, plain lines otherwise."""
    trace: bool = False
    """Write a Chrome-trace timeline per rank (``trace-rank<R>.json``): compute phases and
    every message (post, wait, transfer)."""
    count_flops: bool = False
    """Run the clients' forward and backward passes under ``FlopCounterMode`` and record
    each pass's FLOPs in its trace span (slower; for checking ``mpisplit resources``)."""
    save_model: bool = True
    """Each rank saves its own trained part as ``model-rank<R>.pt`` (parts stay with owners)."""

    def __post_init__(self) -> None:
        _require(self.log_every >= 1, "run.log_every", f"must be >= 1, got {self.log_every}")
        _require(
            self.trace or not self.count_flops,
            "run.count_flops",
            "records FLOPs in the trace: set run.trace: true as well",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointConfig:
    every_steps: int = 0
    """Steps between the points where all ranks meet to checkpoint (0 = no checkpoints). A
    pre-emption signal (SIGUSR1, SIGTERM) makes the run checkpoint at the next such point
    and exit with status 4, so keep the interval shorter than the signal's warning time."""
    every_s: float = 0
    """If > 0, a meeting point writes a checkpoint only once this many seconds have passed
    since the last one (by rank 0's clock); the meetings still follow ``every_steps``."""
    keep: int = 2
    """Committed checkpoints kept; older ones are deleted after each commit."""
    dir: str = ""
    """Where checkpoints go (default: ``<run.dir>/checkpoints``)."""

    def __post_init__(self) -> None:
        _require(
            self.every_steps >= 0,
            "checkpoint.every_steps",
            f"must be >= 0 (0 = no checkpoints), got {self.every_steps}",
        )
        _require(self.every_s >= 0, "checkpoint.every_s", f"must be >= 0, got {self.every_s}")
        _require(
            self.every_s == 0 or self.every_steps > 0,
            "checkpoint.every_s",
            "needs checkpoint.every_steps > 0 (the steps at which ranks meet)",
        )
        _require(self.keep >= 1, "checkpoint.keep", f"must be >= 1, got {self.keep}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    scheme: SchemeConfig = field(default_factory=SchemeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        from mpisplit import specs

        self.scheme.options.check(self)
        if self.checkpoint.every_steps:
            specs.check_checkpointable(self.scheme)

        _require(
            not self.data.clients or len(self.data.clients) == self.scheme.clients,
            "data.clients",
            f"selects {len(self.data.clients)} shard(s) "
            f"{list(self.data.clients)} for scheme.clients={self.scheme.clients}: set "
            f"scheme.clients={len(self.data.clients)}",
        )
        spec = specs.get(self.scheme.name)
        _require(
            not self.data.clients or not spec.vertical,
            "data.clients",
            "selects horizontal client shards; vertical parties hold feature groups",
        )
        _require(
            not self.data.pool or spec.pools_shards,
            "data.pool",
            f"pools the shards for the centralized baseline, not scheme {self.scheme.name}",
        )
        sampling = [name for name in specs.names() if specs.get(name).samples_evaluation]
        _require(
            not self.train.eval_clients
            or (self.scheme.client_order == "parallel" and self.scheme.name in sampling),
            "train.eval_clients",
            f"samples the evaluating clients of "
            f"{', '.join(sampling)} in parallel order; scheme {self.scheme.name} "
            f"with client_order {self.scheme.client_order} has one evaluating rank",
        )
        _require(
            self.train.eval_clients <= self.scheme.clients,
            "train.eval_clients",
            f"{self.train.eval_clients} evaluating clients, but scheme.clients is "
            f"{self.scheme.clients}",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, written as the run's resolved config."""
        plain = _plain(dataclasses.asdict(self))
        return {**plain, "scheme": self.scheme.to_dict()}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: PyYAML would keep
    the last one silently (a second ``lr:`` or ``train:`` section replacing the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            with contextlib.suppress(TypeError):  # unhashable keys fail below, as usual
                if key in seen:
                    raise ConfigError(
                        f"key {key!r} appears twice in one mapping (lines {seen[key]} and "
                        f"{key_node.start_mark.line + 1}); keep one"
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """YAML as PyYAML's safe loader reads it, except that duplicate keys are an error."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Reads a YAML config, applies ``section.key=value`` overrides, validates everything."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {err.start}: "
            f"{err.object[err.start : err.start + 1]!r}); save it as UTF-8"
        ) from None
    try:
        data = parse_yaml(text)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        raise ConfigError(
            f"{path} is empty: write the sections the run needs (configs/ has "
            f"documented examples), or {{}} to mean every default"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(apply_overrides(_factory_file_from(path, data), overrides))


def _factory_file_from(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """A ``model.name`` (or vertical ``scheme.party_models`` entry) of the form
    ``file.py:function`` is relative to the config file."""
    model, scheme = data.get("model"), data.get("scheme")
    if isinstance(model, dict) and "name" in model:
        data = {**data, "model": {**model, "name": _relative_to(path, model["name"])}}
    if isinstance(scheme, dict) and isinstance(scheme.get("party_models"), list):
        names = [_relative_to(path, name) for name in scheme["party_models"]]
        data = {**data, "scheme": {**scheme, "party_models": names}}
    return data


def _relative_to(path: Path, name: Any) -> Any:
    if not isinstance(name, str) or ".py:" not in name:
        return name
    file, _, function = name.rpartition(":")
    if Path(file).is_absolute():
        return name
    return f"{(path.parent / file).resolve()}:{function}"


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Returns a copy of ``data`` with each ``section.key=value`` (value parsed as YAML) set."""
    result = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"override '{item}': expected section.key=value")
        try:
            value = parse_yaml(raw) if raw else ""
        except ConfigError as err:
            raise ConfigError(f"override '{item}': {err}") from None
        except yaml.YAMLError:
            value = raw
        target = result.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override '{item}': section '{section}' is not a mapping")
        target[name] = value
    return result


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    if cls is SchemeConfig:
        return _build_scheme(data, prefix)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (valid keys in {where}: {', '.join(fields)})"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _build_scheme(data: dict[str, Any], prefix: str) -> SchemeConfig:
    """The ``scheme`` section: its own keys, then the named scheme's options. An option of
    another scheme is an error unless left at its default (resolved configs written before
    options moved to their schemes list them all) or the scheme ignores them."""
    from mpisplit import specs

    name = _coerce(str, data.get("name", DEFAULT_SCHEME), f"{prefix}name")
    spec = specs.get(name)
    common = [f.name for f in dataclasses.fields(SchemeConfig) if f.name != "options"]
    own = spec.option_names()
    for key in sorted(set(data) - set(common) - set(own)):
        owners = specs.owners(key)
        if not owners:
            raise ConfigError(
                f"{prefix}{key}: unknown key (valid keys in scheme: {', '.join(common + own)})"
            )
        if spec.ignores_other_options:
            continue
        option = next(f for f in dataclasses.fields(specs.get(owners[0]).options) if f.name == key)
        try:
            default = (
                _coerce(
                    typing.get_type_hints(specs.get(owners[0]).options)[key],
                    data[key],
                    f"{prefix}{key}",
                )
                == option.default
            )
        except ConfigError:
            default = False
        if not default:
            schemes = f"scheme{'s' if len(owners) > 1 else ''} {', '.join(owners)}"
            raise ConfigError(f"{prefix}{key}: only used by {schemes}, not {name}")
    options = _build(spec.options, {k: v for k, v in data.items() if k in own}, prefix)
    hints = typing.get_type_hints(SchemeConfig)
    kwargs = {k: _coerce(hints[k], data[k], f"{prefix}{k}") for k in common if k in data}
    return SchemeConfig(**kwargs, options=options)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Checks ``value`` against a type hint, converting lists to tuples and ints to floats."""
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            options = ", ".join(map(str, choices))
            raise ConfigError(f"{key}: must be one of {options}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in get_args(hint):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item_hint, _ellipsis) = get_args(hint)
        return tuple(_coerce(item_hint, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float:
        return _finite_float(value, key)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")
    if hint is int and not -INT_LIMIT <= value <= INT_LIMIT:
        raise ConfigError(
            f"{key}: {_short(value)} is out of range (at most {INT_LIMIT} in magnitude)"
        )
    return value


INT_LIMIT = 2**31 - 1
"""Every integer setting (counts, steps, seeds, sizes) stays within 32 bits, so that step
counts multiplied by epochs still fit the 64-bit integers that MPI and numpy carry."""


def _finite_float(value: Any, key: str) -> float:
    """A finite float from a YAML number (ints too) or from a string (YAML 1.1 reads 1e-3 as
    one); infinities and NaN are refused here, so no check further on has to expect them."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {_short(value)} is too large") from None
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None:
        raise ConfigError(f"{key}: expected float, got {_short(value)}")
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return number


def _short(value: Any) -> str:
    """``repr(value)``, cut short (a 400-digit integer makes an unreadable error line)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


def _describe(hint: Any) -> str:
    if get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in get_args(hint))
    return getattr(hint, "__name__", str(hint))
