"""Command line: ``mpisplit train | launch | export | metrics | topology | data | sweep |
results | prof report | resources | audit``.

The entry point only parses, builds, runs and closes. Input errors (config, data, world size,
run directory) are found before any other MPI traffic: each rank checks what it can alone
(the shards it will read against ``meta.json`` too), the ranks agree, the lowest rank that
found a problem prints it, and every rank exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mpisplit.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpisplit.engine import RunPlan

EXIT_BAD_INPUT = 2
PMPI_ACTIVE = "MPISPLIT_PMPI_ACTIVE"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    return args.handler(args)


class _Parser(argparse.ArgumentParser):
    """Under a launcher every rank parses the same command line: only the first rank (or a
    process started without one) prints a usage error, so it is said once."""

    _RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")

    def error(self, message: str) -> typing.NoReturn:
        ranks = [os.environ[name] for name in self._RANK_VARIABLES if name in os.environ]
        if not ranks or ranks[0] == "0":
            self.print_usage(sys.stderr)
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def _parser() -> argparse.ArgumentParser:
    """Every command and its arguments. (Long on purpose: one argparse table read top to
    bottom is the CLI's reference, and its parts share nothing.)"""
    parser = _Parser(prog="mpisplit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train (run under mpiexec -n N)")
    _config_arguments(train)
    train.add_argument(
        "--pmpi",
        action="store_true",
        help="record every MPI call with the PMPI library (pmpi-rank<R>.json in the run directory)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest committed checkpoint (automatic in a requeued Slurm job)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier run in run.dir (its config, metrics, "
        "summary, model parts, traces and checkpoints)",
    )
    train.set_defaults(handler=_train)

    launch = commands.add_parser(
        "launch",
        help="start a command on N local ranks (or srun ranks in a Slurm job) with "
        "the launcher and settings of the MPI that mpi4py loads",
    )
    launch.add_argument(
        "-n", "--ranks", type=int, help="number of ranks (srun: default the allocation's tasks)"
    )
    launch.add_argument(
        "--launcher",
        default="auto",
        choices=("auto", "mpiexec", "srun"),
        help="auto: srun inside a Slurm allocation, else mpiexec",
    )
    launch.add_argument(
        "--srun-mpi",
        metavar="TYPE",
        help="srun's --mpi plugin ('' for the site's default; default $MPISPLIT_SRUN_MPI, "
        "else pmix for Open MPI, pmi2 for MPICH, when srun offers it)",
    )
    launch.add_argument(
        "--het-group",
        default="",
        metavar="GROUPS",
        help="srun: the components of a heterogeneous job to run on, e.g. 0,1",
    )
    launch.add_argument(
        "--hostfile",
        default="",
        metavar="FILE",
        help="mpiexec: where ranks run (default in a Slurm allocation: its nodes)",
    )
    launch.add_argument(
        "--launcher-arg",
        action="append",
        default=[],
        dest="extra",
        metavar="ARG",
        help="passed on to the launcher before the command (repeat; --launcher-arg=-x)",
    )
    launch.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="say on stderr which launcher, srun --mpi plugin (and why) and command line",
    )
    launch.add_argument(
        "--print",
        action="store_true",
        dest="dry_run",
        help="print the command line (with the settings it adds) instead",
    )
    launch.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    launch.set_defaults(handler=_launch)

    audit = commands.add_parser(
        "audit", help="check what crossed between ranks against what the scheme allows"
    )
    audit.add_argument("run_dir", help="run directory of a finished run")
    audit.set_defaults(handler=_audit)

    export = commands.add_parser(
        "export", help="merge a run's saved parts into one state dict of the whole model"
    )
    export.add_argument("run_dir", help="run directory of a finished run (run.save_model)")
    export.add_argument("--out", required=True, help="file to write (torch.save)")
    export.add_argument(
        "--ranks",
        type=_ranks,
        default=None,
        help="comma-separated ranks whose parts to take (default: all)",
    )
    export.add_argument(
        "--no-check",
        action="store_true",
        help="skip loading the result into the run's model (strict=True); "
        "for a factory that is not importable here",
    )
    export.set_defaults(handler=_export)

    metrics = commands.add_parser(
        "metrics", help="a run's summary and metrics as CSV (and TensorBoard scalars)"
    )
    metrics.add_argument("run_dir", type=Path, help="run directory")
    metrics.add_argument(
        "--out", type=Path, default=None, help="where the CSV files go (default: RUN_DIR)"
    )
    metrics.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write TensorBoard scalars per rank here (extra: tensorboard)",
    )
    metrics.set_defaults(handler=_metrics)

    topology = commands.add_parser("topology", help="print the rank → role table")
    _config_arguments(topology)
    topology.add_argument(
        "--ntasks", action="store_true", help="print only the number of MPI ranks the config needs"
    )
    topology.set_defaults(handler=_topology)

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(required=True, metavar="ACTION")
    prepare = data_commands.add_parser("prepare", help="build a sharded HDF5 dataset")
    from mpisplit.prepare import add_prepare_arguments

    add_prepare_arguments(prepare)
    prepare.set_defaults(handler=_prepare)
    from mpisplit.ingest import add_assemble_arguments, add_import_arguments

    data_import = data_commands.add_parser(
        "import", help="build one site's shard from the site's own files"
    )
    add_import_arguments(data_import)
    data_import.set_defaults(handler=_import)
    assemble = data_commands.add_parser(
        "assemble", help="check the sites' shards agree; make a dataset directory of them"
    )
    add_assemble_arguments(assemble)
    assemble.set_defaults(handler=_assemble)

    sweep = commands.add_parser(
        "sweep", help="run a grid of configs (one YAML file) locally or as Slurm arrays"
    )
    sweep.add_argument("sweep", help="sweep file (see mpisplit/sweep.py)")
    sweep.add_argument(
        "--list", action="store_true", help="print the points (name, ranks, finished) and exit"
    )
    sweep.add_argument(
        "--launcher",
        default="auto",
        choices=("auto", "mpiexec", "srun"),
        help="how local points start (as mpisplit launch: auto = srun inside "
        "a Slurm allocation, else the MPI's mpiexec)",
    )
    sweep.add_argument(
        "--timeout-s",
        type=float,
        default=None,
        help="end a local point's run after this long (default: no limit)",
    )
    sweep.add_argument(
        "--slurm",
        action="store_true",
        help="write one Slurm array script per rank count to OUT/slurm instead of running",
    )
    sweep.add_argument("--submit", action="store_true", help="with --slurm: sbatch them")
    sweep.add_argument(
        "--jobscripts",
        type=Path,
        default=None,
        help="directory with mpisplit's common.sh (default: "
        "$MPISPLIT_JOBSCRIPTS, else ./jobscripts)",
    )
    sweep.set_defaults(handler=_sweep)

    results = commands.add_parser(
        "results", help="summaries of many runs as one table (terminal, CSV, plot)"
    )
    results.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run directories, or directories holding them (a sweep's out)",
    )
    results.add_argument(
        "--over",
        action="append",
        default=None,
        metavar="KEY",
        help="key whose runs are pooled into mean and range (repeatable; default train.seed)",
    )
    results.add_argument(
        "--metric",
        action="append",
        default=None,
        help="summary.json field (repeatable; default test_accuracy); the first is plotted",
    )
    results.add_argument("--csv", type=Path, default=None, help="write the table as CSV")
    results.add_argument("--plot", type=Path, default=None, help="write a PNG plot")
    results.add_argument(
        "--x", default=None, help="the plot's x axis (default: the first numeric grouping key)"
    )
    results.set_defaults(handler=_results)

    from mpisplit.prof.commands import (
        add_capacity_arguments,
        add_report_arguments,
        add_resources_arguments,
    )

    prof = commands.add_parser("prof", help="profiling of traced runs")
    prof_commands = prof.add_subparsers(required=True, metavar="ACTION")
    add_report_arguments(prof_commands.add_parser("report", help="timeline, bytes, PNGs"))
    add_capacity_arguments(
        prof_commands.add_parser(
            "capacity", help="predict step and wall time for K clients on N nodes from a short run"
        )
    )
    add_resources_arguments(
        commands.add_parser("resources", help="per-client FLOPs and bytes by scheme")
    )
    return parser


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override config values (same validation as the file)",
    )


def _bad_input(err: Exception, rank: int = 0) -> int:
    if rank == 0:
        sys.stderr.write(f"mpisplit: {err}\n")
    return EXIT_BAD_INPUT


def _train(args: argparse.Namespace) -> int:
    if args.pmpi and PMPI_ACTIVE not in os.environ:
        return _reexec_with_pmpi(args)
    from mpisplit.startup import start_mpi

    try:
        comm = start_mpi().COMM_WORLD  # MPI_Init, under its deadline
    except ConfigError as err:
        return _bad_input(err)

    from mpisplit import engine, supervise
    from mpisplit.failure import Preempted, abort_on_failure

    run = _agreed_run(args, comm)
    if run is None:
        return EXIT_BAD_INPUT
    label = run.topology.of(comm.Get_rank()).label
    supervise.tell(comm.Get_rank(), label)
    try:
        abort_on_failure(comm, label, lambda: engine.train(run, comm), Path(run.config.run.dir))
    except Preempted as stop:
        supervise.exit_now(stop.exit_status)  # said so and met the others; no MPI_Finalize
    return 0


def _agreed_run(args: argparse.Namespace, comm: MPI.Comm) -> RunPlan | None:
    """The run every rank found sound, with the checkpoint they all resume from, once rank
    0 has claimed the run directory; None (the problem printed once) otherwise."""
    from mpisplit import engine, rundir
    from mpisplit.checkpoint import agree_on_resume_point, checkpoint_dir
    from mpisplit.data import DataError
    from mpisplit.failure import agree_on_input

    rank, error, run = comm.Get_rank(), None, None
    try:
        config = load_config(args.config, args.overrides)
        run = engine.prepare(
            config,
            comm.Get_size(),
            resume=_resuming(args, config),
            overwrite=args.overwrite,
            rank=rank,
        )
    except (ConfigError, DataError) as err:
        error = err
    if not agree_on_input(comm, error):
        return None
    try:
        run = dataclasses.replace(run, resume=agree_on_resume_point(comm, run.resume))
    except ConfigError as err:  # every rank reaches the same verdict
        _bad_input(err, rank)
        return None
    if rank == 0:
        try:
            rundir.claim(
                Path(config.run.dir),
                checkpoint_dir(config),
                resume_step=run.resume.step if run.resume else None,
                scheme=config.scheme.name,
                world_size=comm.Get_size(),
            )
        except OSError as err:
            error = ConfigError(f"run.dir: cannot prepare {config.run.dir}: {err}")
    return run if agree_on_input(comm, error) else None


def _resuming(args: argparse.Namespace, config: Config) -> bool:
    """``--resume``, or a requeued Slurm job (``SLURM_RESTART_COUNT`` > 0) that has a
    committed checkpoint to continue from."""
    if args.resume:
        return True
    from mpisplit.checkpoint import checkpoint_dir, latest_committed

    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    return requeued and latest_committed(checkpoint_dir(config)) is not None


def _reexec_with_pmpi(args: argparse.Namespace) -> int:
    """Restarts this rank with the PMPI library preloaded (before MPI is initialised)."""
    from mpisplit.pmpi import preload_env

    try:
        run_dir = Path(load_config(args.config, args.overrides).run.dir)
        env = preload_env(run_dir, {**os.environ, PMPI_ACTIVE: "1"})
    except ConfigError:  # reported once, by the ranks' agreement, without the library
        env = {**os.environ, PMPI_ACTIVE: "1"}
    except FileNotFoundError as err:
        return _bad_input(err)
    flags = [flag for flag in ("resume", "overwrite") if getattr(args, flag)]
    command = [
        "-m",
        "mpisplit",
        "train",
        "--pmpi",
        *(f"--{flag}" for flag in flags),
        args.config,
        *args.overrides,
    ]
    os.execve(sys.executable, [sys.executable, *command], env)


def _launch(args: argparse.Namespace) -> int:
    import shlex

    from mpisplit.launch import LaunchError, find

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        return _bad_input(
            ValueError(
                "launch: give the command to start, e.g. "
                "mpisplit launch -n 4 -- mpisplit train CONFIG"
            )
        )
    if args.ranks is not None and args.ranks < 1:
        return _bad_input(ValueError(f"launch: -n must be at least 1, got {args.ranks}"))
    try:
        launcher = find(args.launcher, args.srun_mpi)
        options = {"het_group": args.het_group, "hostfile": args.hostfile, "extra": args.extra}
        argv = launcher.command(args.ranks, command, **options)
    except LaunchError as err:
        return _bad_input(err)
    env = launcher.environment(het_group=args.het_group)
    added = [
        f"{key}={shlex.quote(value)}" for key, value in env.items() if os.environ.get(key) != value
    ]
    removed = [f"-u {key}" for key in os.environ if key not in env]
    line = " ".join([*(["env", *removed] if removed else []), *added, shlex.join(argv)])
    if args.dry_run:
        print(line)
        return 0
    if args.verbose:
        if launcher.kind == "srun":
            plugin = (
                f"srun --mpi={launcher.srun_mpi}"
                if launcher.srun_mpi
                else "srun's default MPI type, no --mpi"
            )
            print(
                f"mpisplit launch: launching with {plugin} ({launcher.srun_mpi_why})",
                file=sys.stderr,
            )
        print(f"mpisplit launch: {line}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)


def _metrics(args: argparse.Namespace) -> int:
    from mpisplit.metrics_export import ExportError, write_csv, write_tensorboard

    try:
        if not args.run_dir.is_dir():
            raise ExportError(f"{args.run_dir}: no such run directory")
        written = write_csv(args.run_dir, args.out or args.run_dir)
        if args.tensorboard is not None:
            written.append(write_tensorboard(args.run_dir, args.tensorboard))
    except ExportError as err:
        return _bad_input(err)
    print("\n".join(map(str, written)))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from mpisplit.audit import main as audit_main

    try:
        return audit_main(args)
    except (ConfigError, OSError, ValueError) as err:
        return _bad_input(err)


def _ranks(text: str) -> list[int]:
    try:
        return [int(rank) for rank in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ranks like 0,2, got {text!r}") from None


def _export(args: argparse.Namespace) -> int:
    from mpisplit.data import DataError
    from mpisplit.export import export

    try:
        out = export(Path(args.run_dir), Path(args.out), args.ranks, check=not args.no_check)
    except (ConfigError, DataError, OSError) as err:
        return _bad_input(err)
    print(f"exported {out}")
    return 0


def _topology(args: argparse.Namespace) -> int:
    from mpisplit.topology import plan

    try:
        topology = plan(load_config(args.config, args.overrides))
    except ConfigError as err:
        return _bad_input(err)
    print(topology.world_size if args.ntasks else topology.table())
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from mpisplit import sweep
    from mpisplit.launch import LaunchError
    from mpisplit.launch import find as find_launcher

    try:
        study = sweep.load_sweep(args.sweep)
        if args.list:
            for point in study.points:
                state = "finished" if point.finished() else "to run"
                print(f"{point.name}  {point.world_size} ranks  {state}")
            return 0
        sweep.prepare_data(study)
        if args.slurm:
            jobscripts = args.jobscripts or Path(
                os.environ.get("MPISPLIT_JOBSCRIPTS", "jobscripts")
            )
            scripts = sweep.array_scripts(study, jobscripts)
            for script in scripts:
                print(f"sweep: wrote {script}")
            if args.submit:
                sweep.submit(scripts)
            return 0
        launcher = find_launcher(args.launcher)
    except (ConfigError, LaunchError) as err:
        return _bad_input(err)
    return sweep.run_local(study, launcher, args.timeout_s)


def _results(args: argparse.Namespace) -> int:
    from mpisplit import results

    try:
        return results.main(
            args.run_dirs,
            over=args.over or ["train.seed"],
            metrics=args.metric or ["test_accuracy"],
            csv_path=args.csv,
            plot_path=args.plot,
            x=args.x,
        )
    except (ValueError, OSError) as err:
        return _bad_input(err)


def _prepare(args: argparse.Namespace) -> int:
    from mpisplit.prepare import prepare_dataset, spec_from_args

    try:
        path = prepare_dataset(spec_from_args(args))
    except ValueError as err:
        return _bad_input(err)
    print(f"prepared {path}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from mpisplit.ingest import import_shard, spec_from_args

    try:
        path = import_shard(spec_from_args(args))
    except ValueError as err:
        return _bad_input(err)
    print(f"imported {path}")
    return 0


def _assemble(args: argparse.Namespace) -> int:
    from mpisplit.ingest import assemble

    try:
        path = assemble(
            args.out,
            clients=args.clients,
            test=args.test,
            parties=args.parties,
            labels=args.labels,
            test_parties=args.test_parties,
            test_labels=args.test_labels,
        )
    except ValueError as err:
        return _bad_input(err)
    print(f"assembled {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
