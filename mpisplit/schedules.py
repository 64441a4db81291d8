"""Microbatch schedules as data: the order of a stage's forward and backward actions.

A schedule is a list of actions written like ``torch.distributed.pipelining``'s: ``0F2`` is
stage 0's forward of microbatch 2, ``0B2`` its backward. GPipe and 1F1B are two such lists,
run by one executor (``run``); a list can be checked (``validate``) and timed against the
stage that serves it (``simulate``) without any process. How a batch splits into microbatches
is decided here too (``taper_bounds``), for every scheme. Pure Python: no torch, no MPI.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

T = TypeVar("T")

FORWARD, BACKWARD = "F", "B"


class Action(NamedTuple):
    stage: int
    op: str
    """``F`` (forward) or ``B`` (backward)."""
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.op}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """``"0F2"`` -> stage 0, forward, microbatch 2."""
        for op in (FORWARD, BACKWARD):
            stage, found, microbatch = text.partition(op)
            if found and stage.isdigit() and microbatch.isdigit():
                return cls(int(stage), op, int(microbatch))
        raise ValueError(f"{text!r} is not an action like 0F0 or 0B0")


def gpipe(count: int, stage: int = 0) -> list[Action]:
    """Every forward, then every backward."""
    return [Action(stage, FORWARD, i) for i in range(count)] + [
        Action(stage, BACKWARD, i) for i in range(count)
    ]


def one_f_one_b(count: int, stage: int = 0) -> list[Action]:
    """After the second forward, the oldest microbatch's backward follows each next forward,
    so at most two microbatches' activations are held at once."""
    actions, oldest = [], 0
    for i in range(count):
        actions.append(Action(stage, FORWARD, i))
        if i >= 1:
            actions.append(Action(stage, BACKWARD, oldest))
            oldest += 1
    return actions + [Action(stage, BACKWARD, i) for i in range(oldest, count)]


SCHEDULES: dict[str, Callable[[int, int], list[Action]]] = {"gpipe": gpipe, "1f1b": one_f_one_b}
"""``transport.schedule`` -> the list of a stage's actions for ``count`` microbatches."""


def of(name: str, count: int, stage: int = 0) -> list[Action]:
    return SCHEDULES[name](count, stage)


def validate(actions: Sequence[Action], count: int) -> None:
    """Raises ``ValueError`` unless every microbatch is forwarded once, then backed up once,
    backwards in microbatch order (the order in which the cut gradients come back)."""
    forwarded: set[int] = set()
    backward_order: list[int] = []
    for action in actions:
        if not 0 <= action.microbatch < count:
            raise ValueError(f"{action}: microbatch out of range (count {count})")
        if action.op == FORWARD:
            if action.microbatch in forwarded:
                raise ValueError(f"{action}: forwarded twice")
            forwarded.add(action.microbatch)
        elif action.op == BACKWARD:
            if action.microbatch not in forwarded or action.microbatch in backward_order:
                raise ValueError(f"{action}: backward before its forward, or twice")
            backward_order.append(action.microbatch)
        else:
            raise ValueError(f"{action}: unknown op {action.op!r}")
    if backward_order != list(range(count)) or len(forwarded) != count:
        raise ValueError(f"backwards {backward_order} of {count} microbatches: each once, in order")


def peak_in_flight(actions: Sequence[Action]) -> int:
    """The most microbatches forwarded and not yet backed up: the activations held."""
    held = peak = 0
    for action in actions:
        held += 1 if action.op == FORWARD else -1
        peak = max(peak, held)
    return peak


def run(
    actions: Sequence[Action], forward: Callable[[int], T], backward: Callable[[T], None]
) -> None:
    """Runs a stage's actions: ``forward(microbatch)`` returns what ``backward`` takes."""
    held: dict[int, T] = {}
    for action in actions:
        if action.op == FORWARD:
            held[action.microbatch] = forward(action.microbatch)
        else:
            backward(held.pop(action.microbatch))


@dataclass(frozen=True)
class Timeline:
    makespan: float
    server_busy: float

    @property
    def bubble(self) -> float:
        """The server's idle fraction of the step."""
        return 1 - self.server_busy / self.makespan


def simulate(
    actions: Sequence[Action],
    sizes: Sequence[float],
    client_forward: float,
    client_backward: float,
    server: float,
) -> Timeline:
    """One step of a client running ``actions`` against a server that takes each
    microbatch's forward and backward in arrival order (times per unit of microbatch size;
    messages take no time). A backward waits for its gradient from the server."""
    clock = server_free = busy = 0.0
    gradient_at: dict[int, float] = {}
    for action in actions:
        size = sizes[action.microbatch]
        if action.op == FORWARD:
            clock += client_forward * size
            start = max(clock, server_free)
            server_free = gradient_at[action.microbatch] = start + server * size
            busy += server * size
        else:
            clock = max(clock, gradient_at[action.microbatch]) + client_backward * size
    return Timeline(max(clock, server_free), busy)


def taper_bounds(rows: int, count: int) -> list[int]:
    """Where a batch of ``rows`` splits into ``count`` microbatches: from three on, the
    first and the last are half the size of the others (the server waits for the first
    one's forward before it can start, the client for the last one's gradient before it can
    step: halving them halves that fill and drain)."""
    weights = [1.0] * count
    if count >= 3:
        weights[0] = weights[-1] = 0.5
    ends = list(itertools.accumulate(weights))
    return [round(rows * end / ends[-1]) for end in ends[:-1]]


def split_sizes(rows: int, count: int) -> list[int]:
    """The sizes of the (non-empty) microbatches ``taper_bounds`` cuts ``rows`` into."""
    bounds = [0, *taper_bounds(rows, count), rows]
    return [b - a for a, b in itertools.pairwise(bounds) if b > a]
