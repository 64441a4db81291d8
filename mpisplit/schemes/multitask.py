"""Multi-task split learning: the clients' shared lower layers feed one head per task.

Task server t (rank t) holds the upper segment with its own head, sized for task t, and the
loss of that task. A client forwards its lower part once per batch, sends the cut activation
and that task's labels to every task server, and back-propagates the sum of the heads'
gradients in one pass: one optimizer step on the summed losses (two or more tasks; the
config refuses fewer). Every task is derived from the dataset's one label set
(``task_target``), on the client that holds the labels, so any prepared dataset serves.
Clients train in parallel (a rank may host several: ``scheme.clients_per_rank``); each
evaluates on every task server, and the summary has ``test_by_task``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from mpisplit.config import ConfigError
from mpisplit.engine import RankContext, RankResult, RunPlan
from mpisplit.models import build_parts, model_factory
from mpisplit.schemes.lower_client import train_lower_clients
from mpisplit.schemes.serving import serve_with
from mpisplit.schemes.turns import clients_total_steps
from mpisplit.segment import Segment
from mpisplit.split import split_model
from mpisplit.topology import Role

LabelMap = Callable[[torch.Tensor], torch.Tensor]


def task_target(task: str, num_classes: int) -> tuple[LabelMap, int]:
    """A task's labels as a function of the dataset's labels, and its head's output count.

    ``class`` is the label itself, ``parity`` is label % 2, ``binary`` is the upper half of
    the classes (label >= num_classes / 2: for digits, "digit >= 5", 5 classes on each side).
    """
    if task == "parity":
        return (lambda labels: labels % 2), 2
    if task == "binary":
        return (lambda labels: (labels >= num_classes / 2).long()), 2
    return (lambda labels: labels), num_classes


def serve(ctx: RankContext) -> RankResult:
    total = clients_total_steps(ctx)
    return serve_with(ctx, task_segment(ctx, ctx.me.index, total), total, task=ctx.me.index)


def task_segment(ctx: RankContext, task: int, total_steps: int) -> Segment:
    """The upper part of the model that the factory builds for task ``task``'s output count
    (its ``num_classes``), under the model seed, as a reference rebuilds it."""
    cfg, meta = ctx.config, ctx.run.meta
    _, classes = task_target(cfg.scheme.options.tasks[task], meta["num_classes"])
    with ctx.building_model():
        model = build_parts(cfg.model, meta["feature_shape"], classes, [1])
    module = split_model(model, cfg.model.cuts)[1]
    return Segment.create(module.to(ctx.device), cfg.train, total_steps)


def check_heads(run: RunPlan) -> None:
    """Each task's head is sized by calling the factory with that task's ``num_classes``:
    a factory that takes none (or a fixed one in ``model.options``) would give every task
    the same head."""
    cfg = run.config
    try:
        takes = "num_classes" in inspect.signature(model_factory(cfg.model.name)).parameters
    except (TypeError, ValueError):  # no signature to read
        takes = False
    if not takes or "num_classes" in cfg.model.options:
        raise ConfigError(
            f"model.name: multitask sizes each task's head by calling the "
            f"factory with that task's num_classes; {cfg.model.name} takes no "
            f"num_classes argument (or model.options fixes it)"
        )


def train_client(ctx: RankContext) -> RankResult:
    num_classes = ctx.run.meta["num_classes"]
    maps = [task_target(task, num_classes)[0] for task in ctx.config.scheme.options.tasks]
    return train_lower_clients(ctx, ctx.topology.ranks(Role.SERVER), labels=maps)
