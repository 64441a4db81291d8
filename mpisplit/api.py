"""The Python API: ``mpisplit.train`` runs a config from a user's own script under
``mpiexec``/``srun``, as ``mpisplit train`` does from the shell.

    import mpisplit
    summary = mpisplit.train("run.yaml", factory=my_model, train={"epochs": 3})

Every rank calls it with the same arguments. Bad input (config, data, model, cuts, world
size) raises ``ConfigError``/``DataError`` on every rank before any MPI traffic; a failure
while training raises on the rank where it happened (its peers raise their transport timeout
after ``transport.timeout_s``; wrap the call in ``mpisplit.failure.abort_on_failure`` to end
the job at once instead, as the CLI does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mpisplit.config import Config, ConfigError, config_from_dict, load_config


def train(
    config: str | Path | dict[str, Any] | Config,
    *,
    factory: Callable[..., Any] | None = None,
    party_factories: Sequence[Callable[..., Any]] | None = None,
    comm: Any = None,
    resume: bool = False,
    **overrides: Any,
) -> dict[str, Any] | None:
    """Trains ``config`` on this rank; returns the run's summary on rank 0, None elsewhere.

    Args:
        config: a YAML file, a mapping of sections like the file's, or a ``Config``.
        factory: a Python callable returning the ``nn.Module``; it replaces ``model.name``
            (``model.options`` are its keyword arguments).
        party_factories: vertical: one callable per party, each returning that party's
            whole lower network (``scheme.party_models``; ``scheme.party_options[k]`` are
            party k's keyword arguments); ``factory`` then gives the server's part.
        comm: the communicator of the run's ranks (default: ``MPI.COMM_WORLD``).
        resume: continue from the latest committed checkpoint.
        overrides: ``section={"key": value}`` or ``**{"section.key": value}``, validated
            like the file.
    """
    from mpisplit.startup import start_mpi

    comm = start_mpi().COMM_WORLD if comm is None else comm  # MPI_Init, under its deadline

    from mpisplit import engine, rundir
    from mpisplit.checkpoint import agree_on_resume_point, checkpoint_dir
    from mpisplit.failure import callers_signal_handlers
    from mpisplit.models import register_factory

    sections = _sections(config)
    if factory is not None:
        overrides = {**overrides, "model.name": register_factory(factory)}
    if party_factories is not None:
        names = [register_factory(party) for party in party_factories]
        overrides = {**overrides, "scheme.party_models": names}
    cfg = config_from_dict(_apply(sections, overrides))
    run = engine.prepare(cfg, comm.Get_size(), resume=resume, rank=comm.Get_rank())
    run = dataclasses.replace(run, resume=agree_on_resume_point(comm, run.resume))
    if comm.Get_rank() == 0:
        rundir.claim(
            Path(cfg.run.dir),
            checkpoint_dir(cfg),
            resume_step=run.resume.step if run.resume else None,
            scheme=cfg.scheme.name,
            world_size=comm.Get_size(),
        )
    comm.Barrier()  # the directory is claimed before any rank writes into it
    with callers_signal_handlers():
        return engine.train(run, comm)


def _sections(config: str | Path | dict[str, Any] | Config) -> dict[str, Any]:
    if isinstance(config, Config):
        return config.to_dict()
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config).to_dict()
    raise ConfigError(
        f"config: expected a path, a mapping or a Config, got {type(config).__name__}"
    )


def _apply(sections: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    result = {k: dict(v) if isinstance(v, dict) else v for k, v in sections.items()}
    for key, value in overrides.items():
        if "." in key:
            section, _, name = key.partition(".")
            result.setdefault(section, {})[name] = value
        elif isinstance(value, dict):
            result[key] = {**result.get(key, {}), **value}
        else:
            raise ConfigError(
                f"override {key}={value!r}: expected section={{key: value}} or 'section.key'=value"
            )
    return result
