"""Studies: a grid of runs described in one YAML file, run point by point, resumable.

A sweep file names a base config, a sweep directory, overrides for every point and the axes
whose product is the grid::

    config: configs/vanilla-digits-sgd.yaml   # base config (paths relative to the cwd)
    out: runs/study                           # one run directory per point below it
    prepare:                                  # optional: `mpisplit data prepare` per point
      dataset: digits                         #   (PrepareSpec fields; data.path defaults
      clients: ${sites}                       #   to out; a directory already prepared the
      out: data/digits-${sites}c              #   same way is reused)
    overrides:                                # section.key: value, for every point
      scheme.clients: ${sites}
    axes:                                     # the grid: the product of all axes
      arm:                                    # a mapping: named variants, each a set of
        split: {}                             #   overrides (applied last, so they win;
        alone: {scheme.name: centralized, scheme.clients: 1, data.clients: [0]}
        ushaped: {config: configs/ushaped-digits.yaml}   # `config`: another base config)
      sites: [2, 4]                           # no dot: a variable for ${sites} templates
      train.seed: [0, 1, 2]                   # section.key: a config value per point
    slurm: {time: "00:30:00", sbatch: [--partition=debug]}   # optional, for --slurm

``${name}`` is replaced by the point's value of axis ``name`` (a string that is only the
template takes the value's type). Every point is validated (config, world size from its
topology, data) before anything runs. A point is finished when its ``summary.json`` exists
and is not marked preempted or failed; finished points are skipped, a point with a
committed checkpoint resumes from it, and a failed attempt without one is moved aside
(``<point>.failed-<n>``) and run afresh.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from mpisplit.checkpoint import checkpoint_dir, latest_committed
from mpisplit.config import ConfigError, load_config
from mpisplit.launch import Launcher
from mpisplit.topology import plan

_KEYS = ("config", "out", "prepare", "overrides", "axes", "slurm")
_SLURM_KEYS = ("time", "cpus_per_task", "sbatch")
_TEMPLATE = re.compile(r"\$\{([^}]+)\}")
POINT_FILE = "point.json"
ARGS_FILE = "args"
"""The point's ``mpisplit train`` arguments, one per line: the config, then overrides."""


class SweepError(ConfigError):
    """A problem with a sweep file or its points; the message names the key or point."""


@dataclass(frozen=True)
class Point:
    """One run of the grid."""

    name: str
    config: Path
    values: dict[str, Any]
    """Axis → this point's value (a variant axis: the variant's name)."""
    overrides: list[str]
    """``section.key=value`` for ``mpisplit train``, ``run.dir`` last."""
    world_size: int
    dir: Path
    prepare: dict[str, Any] | None

    def finished(self) -> bool:
        return finished(self.dir)


@dataclass(frozen=True)
class Sweep:
    path: Path
    config: Path
    """The base config of the points whose variants do not choose another."""
    out: Path
    points: list[Point]
    slurm: dict[str, Any]


def finished(run_dir: Path) -> bool:
    """A run that ended: its summary exists and is not that of a preempted or failed run."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return not (summary.get("preempted") or summary.get("failed"))


def load_sweep(path: str | Path) -> Sweep:
    """Reads and checks a sweep file; every point's config is loaded and validated."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SweepError(f"cannot read sweep file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a mapping with keys {', '.join(_KEYS)}")
    if unknown := sorted(set(data) - set(_KEYS)):
        raise SweepError(f"{path}: unknown key {unknown[0]} (valid: {', '.join(_KEYS)})")
    for key in ("config", "out", "axes"):
        if not data.get(key):
            raise SweepError(f"{path}: '{key}' is required")
    axes = _axes(data["axes"], path)
    overrides = _mapping(data.get("overrides") or {}, f"{path}: overrides")
    prepare = data.get("prepare")
    if prepare is not None:
        _check_prepare(_mapping(prepare, f"{path}: prepare"), path)
    slurm = _mapping(data.get("slurm") or {}, f"{path}: slurm")
    if unknown := sorted(set(slurm) - set(_SLURM_KEYS)):
        raise SweepError(
            f"{path}: slurm: unknown key {unknown[0]} (valid: {', '.join(_SLURM_KEYS)})"
        )
    config, out = Path(str(data["config"])), Path(str(data["out"]))
    points = [
        _point(config, out, combo, overrides, prepare)
        for combo in itertools.product(
            *([(name, value) for value in values] for name, values in axes.items())
        )
    ]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise SweepError(
            f"{path}: two points share a directory name: give the axes distinct values"
        )
    return Sweep(path, config, out, points, slurm)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SweepError(f"{where}: expected a mapping, got {value!r}")
    return value


def _axes(raw: Any, path: Path) -> dict[str, list[Any]]:
    """Axis name → its values; a variant axis's values are (name, overrides) pairs."""
    axes = _mapping(raw, f"{path}: axes")
    result: dict[str, list[Any]] = {}
    for name, values in axes.items():
        if isinstance(values, dict):
            result[name] = [
                _Variant(str(k), _mapping(v or {}, f"{path}: axes: {name}: {k}"))
                for k, v in values.items()
            ]
        elif isinstance(values, list) and values:
            result[name] = values
        else:
            raise SweepError(
                f"{path}: axes: {name}: expected a non-empty list of values or "
                f"a mapping of named variants, got {values!r}"
            )
    return result


@dataclass(frozen=True)
class _Variant:
    name: str
    overrides: dict[str, Any]


def _check_prepare(prepare: dict[str, Any], path: Path) -> None:
    from mpisplit.prepare import PrepareSpec

    valid = [f.name for f in fields(PrepareSpec)]
    if unknown := sorted(set(prepare) - set(valid)):
        raise SweepError(f"{path}: prepare: unknown key {unknown[0]} (valid: {', '.join(valid)})")
    if "dataset" not in prepare or "out" not in prepare:
        raise SweepError(f"{path}: prepare: needs dataset and out")


def _point(
    config: Path,
    out: Path,
    combo: tuple[tuple[str, Any], ...],
    overrides: dict[str, Any],
    prepare: dict[str, Any] | None,
) -> Point:
    env = {name: value.name if isinstance(value, _Variant) else value for name, value in combo}
    name = _point_name(env)
    settings = {key: _render(value, env) for key, value in overrides.items()}
    settings |= {key: value for key, value in env.items() if "." in key}
    for _axis, value in combo:
        if isinstance(value, _Variant):
            chosen = {key: _render(v, env) for key, v in value.overrides.items()}
            config = Path(str(chosen.pop("config", config)))
            settings |= chosen
    spec = None if prepare is None else {k: _render(v, env) for k, v in prepare.items()}
    if spec is not None:
        settings.setdefault("data.path", str(spec["out"]))
    run_dir = out / name
    args = [f"{key}={_yaml(value)}" for key, value in settings.items()] + [f"run.dir={run_dir}"]
    try:
        cfg = load_config(config, args)
        world_size = plan(cfg).world_size
    except ConfigError as err:
        raise SweepError(f"point {name}: {err}") from None
    return Point(name, config, env, args, world_size, run_dir, spec)


def _render(value: Any, env: dict[str, Any]) -> Any:
    """``${name}`` templates replaced by the point's values, inside lists and mappings too."""
    if isinstance(value, list):
        return [_render(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _render(v, env) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    for name in _TEMPLATE.findall(value):
        if name not in env:
            raise SweepError(f"template ${{{name}}}: no axis named {name} (axes: {', '.join(env)})")
    if (whole := _TEMPLATE.fullmatch(value)) is not None:
        return env[whole[1]]
    return _TEMPLATE.sub(lambda m: str(env[m[1]]), value)


def _yaml(value: Any) -> str:
    """A value as ``mpisplit train`` parses an override (YAML, one line)."""
    if isinstance(value, str):
        return value
    return (
        yaml.safe_dump(value, default_flow_style=True, width=1 << 16)
        .strip()
        .removesuffix("\n...")
        .strip()
    )


def _point_name(env: dict[str, Any]) -> str:
    """``arm-split_sites-4_seed-1``: each axis by its last name part (the whole key where
    two axes share it), then its value."""
    shorts = [key.rsplit(".", 1)[-1] for key in env]
    parts = []
    for (key, value), short in zip(env.items(), shorts, strict=True):
        label = short if shorts.count(short) == 1 else key
        text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{label}-{re.sub(r'[^A-Za-z0-9.+-]', '_', text)}")
    return "_".join(parts)


def prepare_data(sweep: Sweep) -> None:
    """Prepares each distinct dataset the points ask for, once; reuses one prepared the
    same way, refuses one prepared otherwise."""
    from mpisplit.data import DataError, read_meta
    from mpisplit.prepare import PrepareSpec, prepare_dataset

    seen: set[str] = set()
    for point in sweep.points:
        if point.prepare is None or (key := json.dumps(point.prepare, sort_keys=True)) in seen:
            continue
        seen.add(key)
        try:
            spec = PrepareSpec(**{**point.prepare, "out": Path(str(point.prepare["out"]))})
        except (TypeError, ValueError) as err:
            raise SweepError(f"point {point.name}: prepare: {err}") from None
        if (spec.out / "meta.json").exists():
            try:
                meta = read_meta(spec.out)
            except DataError as err:
                raise SweepError(str(err)) from None
            wanted = {
                "dataset": spec.dataset,
                "clients": spec.clients,
                "partition": spec.partition,
                "seed": spec.seed,
            }
            if differs := {k: meta[k] for k, v in wanted.items() if meta[k] != v}:
                raise SweepError(
                    f"point {point.name}: {spec.out} was prepared with {differs}, "
                    f"the sweep asks for {wanted}: remove it or change prepare.out"
                )
            continue
        try:
            prepare_dataset(spec)
        except ValueError as err:
            raise SweepError(f"point {point.name}: prepare: {err}") from None
        print(f"sweep: prepared {spec.out}", flush=True)


def write_point(sweep: Sweep, point: Point) -> None:
    """The point's directory with ``point.json`` (what ``mpisplit results`` groups by) and
    ``args`` (what a Slurm array task runs)."""
    point.dir.mkdir(parents=True, exist_ok=True)
    (point.dir / POINT_FILE).write_text(
        json.dumps(
            {
                "sweep": str(sweep.path),
                "values": point.values,
                "config": str(point.config),
                "overrides": point.overrides,
                "world_size": point.world_size,
            },
            indent=2,
        )
        + "\n"
    )
    (point.dir / ARGS_FILE).write_text("\n".join([str(point.config), *point.overrides]) + "\n")


def resumable(point: Point) -> bool:
    """Whether the point has a committed checkpoint to continue from."""
    cfg = load_config(point.config, point.overrides)
    return latest_committed(checkpoint_dir(cfg)) is not None


def set_aside(point: Point) -> None:
    """Moves a failed attempt (no summary, no checkpoint) out of the point's way."""
    if not point.dir.exists() or not any(point.dir.glob("metrics-rank*.jsonl")):
        return
    attempt = next(
        n
        for n in itertools.count(1)
        if not point.dir.with_name(f"{point.name}.failed-{n}").exists()
    )
    point.dir.rename(point.dir.with_name(f"{point.name}.failed-{attempt}"))


def run_local(sweep: Sweep, launcher: Launcher, timeout_s: float | None) -> int:
    """Runs the unfinished points one after another under ``launcher``; 0 when every point
    has finished, 1 when some failed (the others still run)."""
    failed = 0
    for number, point in enumerate(sweep.points, start=1):
        where = f"[{number}/{len(sweep.points)}] {point.name}"
        if point.finished():
            print(f"sweep: {where}: finished before, skipped", flush=True)
            continue
        resume = resumable(point)
        if not resume:
            set_aside(point)
        write_point(sweep, point)
        command = launcher.command(
            point.world_size,
            [
                sys.executable,
                "-m",
                "mpisplit",
                "train",
                *(["--resume"] if resume else []),
                str(point.config),
                *point.overrides,
            ],
        )
        start = time.monotonic()
        status = _run(command, launcher.environment(), point.dir / "sweep.log", timeout_s)
        took = time.monotonic() - start
        if status == 0 and point.finished():
            summary = json.loads((point.dir / "summary.json").read_text())
            accuracy = summary.get("test_accuracy")
            shown = "n/a" if accuracy is None else f"{accuracy:.4f}"
            print(f"sweep: {where}: test accuracy {shown} ({took:.1f} s)", flush=True)
        else:
            failed += 1
            print(
                f"sweep: {where}: failed with status {status} after {took:.1f} s; see "
                f"{point.dir / 'sweep.log'}",
                flush=True,
            )
    return int(failed > 0)


def _run(command: list[str], env: dict[str, str], log: Path, timeout_s: float | None) -> int:
    with log.open("a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        try:
            return subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            out.write(f"sweep: killed after {timeout_s} s\n")
            return 124
        except OSError as err:
            out.write(f"sweep: cannot start {command[0]}: {err}\n")
            return 127


def array_scripts(sweep: Sweep, jobscripts: Path) -> list[Path]:
    """One Slurm array script per world size among the unfinished points (an array has one
    task count), written to ``<out>/slurm/``; each task runs one point through
    ``jobscripts/common.sh`` (task-count check, launcher, pre-emption and requeue)."""
    common = (jobscripts / "common.sh").resolve()
    if not common.is_file():
        raise SweepError(
            f"{common}: not found; pass --jobscripts DIR (the directory with mpisplit's common.sh)"
        )
    pending = [p for p in sweep.points if not p.finished()]
    directory = sweep.out / "slurm"
    directory.mkdir(parents=True, exist_ok=True)
    scripts = []
    for size in sorted({p.world_size for p in pending}):
        group = [p for p in pending if p.world_size == size]
        for point in group:
            write_point(sweep, point)
        script = directory / f"ntasks-{size}.sbatch"
        script.write_text(_array_script(sweep, group, size, common))
        scripts.append(script)
    return scripts


def _array_script(sweep: Sweep, points: list[Point], size: int, common: Path) -> str:
    slurm, jobscripts = sweep.slurm, shlex.quote(str(common.parent))
    options = [
        f"--job-name=mpisplit-sweep-n{size}",
        f"--array=0-{len(points) - 1}",
        f"--ntasks={size}",
        f"--cpus-per-task={slurm.get('cpus_per_task', 1)}",
        f"--time={slurm.get('time', '01:00:00')}",
        "--requeue",
        "--open-mode=append",
        "--signal=B:USR1@120",
        f"--output={sweep.out.resolve()}/slurm/%x-%A_%a.out",
        *map(str, slurm.get("sbatch", [])),
    ]
    entries = "\n".join(f"  {shlex.quote(str(p.dir))}" for p in points)
    resume = "\n".join(f"  {'--resume' if resumable(p) else '-'}" for p in points)
    return "\n".join(
        [
            "#!/bin/bash",
            f"# Generated by `mpisplit sweep --slurm {sweep.path}`: the points of world size "
            f"{size}, one array task each. Submit from the directory the sweep ran in.",
            *(f"#SBATCH {option}" for option in options),
            f"export MPISPLIT_JOBSCRIPTS=${{MPISPLIT_JOBSCRIPTS:-{jobscripts}}}",
            '. "$MPISPLIT_JOBSCRIPTS/common.sh" || exit 2',
            f"POINTS=(\n{entries}\n)",
            f"RESUME=(\n{resume}\n)",
            "task=${SLURM_ARRAY_TASK_ID:?a sweep array: submit with sbatch}",
            "point=${POINTS[$task]}",
            'mapfile -t args <"$point/args"',
            "mpisplit_setup",
            'mpisplit_args "${args[@]}"',
            'mpisplit_check_ntasks "$MPISPLIT_CONFIG" "${MPISPLIT_ARGS[@]}"',
            'resume=(); [ "${RESUME[$task]}" = --resume ] && resume=(--resume)',
            'mpisplit_launch -- $MPISPLIT train "${resume[@]}" "$MPISPLIT_CONFIG" '
            '"${MPISPLIT_ARGS[@]}"',
            "",
        ]
    )


def submit(scripts: list[Path]) -> None:
    """``sbatch`` each array script; a failure to submit is reported and stops."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SweepError("sbatch not found on PATH; submit the scripts yourself")
    for script in scripts:
        done = subprocess.run([sbatch, str(script)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SweepError(f"sbatch {script}: {done.stderr.strip() or done.returncode}")
        print(f"sweep: {script}: {done.stdout.strip()}", flush=True)
