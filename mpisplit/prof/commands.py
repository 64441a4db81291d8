"""Arguments and handlers of ``mpisplit prof report`` and ``mpisplit resources``.

Kept free of heavy imports: the command-line parser is built in every process, also in
``mpisplit train --pmpi`` before it re-executes itself with the PMPI library preloaded, and
importing the transport (mpi4py) there would initialise MPI twice in one rank and hang it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory of a run.trace=true run")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the report (default: RUN_DIR)"
    )
    parser.set_defaults(handler=_report)


def add_resources_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="a run's YAML file: model.name, options and its one cut"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model.name: zoo model (vgg, resnet50) or package.module:function",
    )
    parser.add_argument(
        "--options", type=_mapping, default=None, help="model.options as YAML, e.g. '{width: 16}'"
    )
    parser.add_argument(
        "--cut", default=None, help="the module the server's part starts at (e.g. layer2, block3)"
    )
    parser.add_argument(
        "--input-shape",
        required=True,
        type=lambda s: tuple(int(v) for v in s.split(",")),
        help="sample shape, comma separated (3,32,32)",
    )
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--samples", type=int, required=True, help="training samples in all")
    parser.add_argument(
        "--clients",
        type=int,
        action="append",
        required=True,
        help="client count (repeat for several)",
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--average-every",
        type=int,
        default=0,
        help="steps between SplitFed/FedAvg averages (0: one epoch)",
    )
    parser.add_argument(
        "--optimizer",
        choices=("sgd", "adam", "adamw"),
        default="sgd",
        help="optimizer whose state a split-learning hand-over carries",
    )
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.set_defaults(handler=_resources)


def add_capacity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", type=Path, help="run directory of a short run.trace=true run of the workload"
    )
    parser.add_argument(
        "--clients",
        type=int,
        action="append",
        required=True,
        help="client count to predict (repeat for several)",
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument(
        "--cores-per-node", type=int, required=True, help="cores a node gives the job's ranks"
    )
    parser.add_argument(
        "--clients-per-rank",
        type=int,
        default=1,
        help="logical clients a client rank hosts (scheme.clients_per_rank; default 1)",
    )
    parser.add_argument(
        "--latency-us",
        type=float,
        default=None,
        help="the target network's latency (default: measured in the run)",
    )
    parser.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=None,
        help="the target network's bandwidth in GB/s (default: measured)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: the run's")
    parser.add_argument(
        "--samples", type=int, default=None, help="training samples in all (default: the run's)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.set_defaults(handler=_capacity)


def _mapping(text: str) -> dict:
    import yaml

    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a YAML mapping like '{{width: 16}}', got {text!r}"
        )
    return value


def _capacity(args: argparse.Namespace) -> int:
    from mpisplit.config import ConfigError
    from mpisplit.prof.capacity import main

    for name in ("clients", "clients_per_rank", "nodes", "cores_per_node", "epochs", "samples"):
        values = getattr(args, name)
        given = values if isinstance(values, list) else [] if values is None else [values]
        if any(v < 1 for v in given):
            print(f"mpisplit: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    try:
        return main(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"mpisplit: {err}", file=sys.stderr)
        return 2


def _report(args: argparse.Namespace) -> int:
    from mpisplit.prof.report import main

    return main(args)


def _resources(args: argparse.Namespace) -> int:
    from mpisplit.config import ConfigError
    from mpisplit.resources import main

    try:
        return main(args)
    except ConfigError as err:
        print(f"mpisplit: {err}", file=sys.stderr)
        return 2
