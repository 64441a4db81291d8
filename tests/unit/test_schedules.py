"""Microbatch schedules as data: orders, validity, held activations and bubbles, no process."""

from __future__ import annotations

from collections import deque

import pytest

from mpisplit import schedules
from mpisplit.schedules import Action, gpipe, one_f_one_b, peak_in_flight, simulate, validate


def _order(actions: list[Action]) -> str:
    return " ".join(map(str, actions))


def test_gpipe_and_1f1b_orders() -> None:
    assert _order(gpipe(3)) == "0F0 0F1 0F2 0B0 0B1 0B2"
    assert _order(one_f_one_b(4)) == "0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3"
    assert _order(one_f_one_b(1, stage=2)) == "2F0 2B0"
    assert Action.parse("0B12") == Action(0, "B", 12)
    with pytest.raises(ValueError, match="not an action"):
        Action.parse("F0")


def _old_run_microbatches(count: int, schedule: str) -> list[str]:
    """The loop the executor replaced (schemes/common.py before), recording its calls."""
    calls, in_flight = [], deque()
    ahead = 2 if schedule == "1f1b" else count + 1
    for index in range(count):
        calls.append(f"F{index}")
        in_flight.append(index)
        if len(in_flight) == ahead:
            calls.append(f"B{in_flight.popleft()}")
    while in_flight:
        calls.append(f"B{in_flight.popleft()}")
    return calls


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_executor_runs_the_order_of_the_loop_it_replaced(name: str, count: int) -> None:
    calls: list[str] = []

    def forward(index: int) -> int:
        calls.append(f"F{index}")
        return index

    schedules.run(schedules.of(name, count), forward, lambda held: calls.append(f"B{held}"))
    assert calls == _old_run_microbatches(count, name)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_every_schedule_is_valid(name: str) -> None:
    for count in range(1, 10):
        validate(schedules.of(name, count), count)


@pytest.mark.parametrize(
    ("actions", "problem"),
    [
        ("0F0 0B0 0F0", "forwarded twice"),
        ("0B0 0F0", "backward before its forward"),
        ("0F0 0F1 0B1 0B0", "in order"),
        ("0F0 0F1 0B0", "in order"),
        ("0F0 0F3", "out of range"),
    ],
)
def test_invalid_orders_are_refused(actions: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        validate([Action.parse(a) for a in actions.split()], 2)


def test_peak_in_flight_microbatches() -> None:
    assert [peak_in_flight(gpipe(m)) for m in (1, 4, 8)] == [1, 4, 8]
    assert [peak_in_flight(one_f_one_b(m)) for m in (1, 4, 8)] == [1, 2, 2]


@pytest.mark.parametrize(("count", "bubble"), [(1, 1 / 2), (4, 1 / 5), (8, 1 / 9)])
def test_equal_microbatches_have_the_gpipe_bubble(count: int, bubble: float) -> None:
    """Two balanced stages: the server idles (p - 1) / (M + p - 1) of the step, p = 2; 1F1B
    takes as long while holding two microbatches."""
    for name in ("gpipe", "1f1b"):
        timeline = simulate(schedules.of(name, count), [1.0] * count, 1, 1, 2)
        assert timeline.bubble == pytest.approx(bubble)
        assert timeline.makespan == pytest.approx(2 * count + 2)


def test_tapered_microbatches_beat_the_gpipe_bubble() -> None:
    """The half-size first and last microbatches (README: 0.17 / 0.10 measured at M = 4 / 8
    against the estimate 0.20 / 0.11)."""
    for count, estimate in ((4, 1 / 5), (8, 1 / 9)):
        sizes = [n / 1000 for n in schedules.split_sizes(1000 * count, count)]
        assert simulate(gpipe(count), sizes, 1, 1, 2).bubble < estimate


def test_taper_bounds_and_sizes() -> None:
    assert schedules.taper_bounds(100, 1) == []
    assert schedules.taper_bounds(100, 2) == [50]
    assert schedules.taper_bounds(120, 4) == [20, 60, 100]
    assert schedules.split_sizes(120, 4) == [20, 40, 40, 20]
    assert schedules.split_sizes(3, 8) == [1, 1, 1]  # never an empty microbatch
    for rows in range(1, 60):
        for count in range(1, 9):
            assert sum(schedules.split_sizes(rows, count)) == rows
