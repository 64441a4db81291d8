"""The pure planners of the shared loops: turns, turn plans, averaging points, silence."""

from __future__ import annotations

import pytest

from mpisplit.schemes import liveness
from mpisplit.schemes.averaging import AveragingPoints
from mpisplit.schemes.liveness import SilenceWatch
from mpisplit.schemes.turns import ClientTurns, round_robin_turns


def test_round_robin_turns_is_round_robin_until_every_client_is_done() -> None:
    assert round_robin_turns([4, 4], [2, 2]) == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert round_robin_turns([5, 2, 0], [2, 3, 1]) == [(0, 2), (1, 2), (0, 2), (0, 1)]
    assert round_robin_turns([0, 0], [1, 1]) == []


def test_sequential_turn_plan() -> None:
    turns = round_robin_turns([3, 3], [2, 2])  # (0, 2) (1, 2) (0, 1) (1, 1)
    plan = ClientTurns(turns, me=1, part_steps=6, until=6)
    assert list(plan.spans()) == [(0, 1, 2), (1, 3, 4), (0, 5, 5), (1, 6, 6)]
    assert plan.my_steps == 3
    assert [plan.my_steps_through(step) for step in range(7)] == [0, 0, 0, 1, 2, 2, 3]
    assert plan.evaluates_final and not ClientTurns(turns, 0, 6, 6).evaluates_final


def test_parallel_turn_plan_is_one_turn() -> None:
    plan = ClientTurns([(2, 5)], me=2, part_steps=5, until=3)
    assert list(plan.spans()) == [(2, 1, 5)] and plan.my_steps == 5 and plan.evaluates_final


def test_averaging_points() -> None:
    even = AveragingPoints.of([6, 6], every=3)
    assert (even.common, even.at_end, even.lockstep) == (6, False, True)
    assert [even.due(step, 6) for step in range(1, 7)] == [0, 0, 1, 0, 0, 1]
    uneven = AveragingPoints.of([7, 4], every=2)
    assert (uneven.common, uneven.at_end, uneven.lockstep) == (4, True, False)
    assert [uneven.due(step, 7) for step in range(1, 8)] == [0, 1, 0, 1, 0, 0, 1]
    assert [uneven.due(step, 4) for step in range(1, 5)] == [0, 1, 0, 2]


def test_averaging_periods_match_the_points() -> None:
    """FedAvg's hosted turns: a member's steps before each average, the same number of
    averages for every member; a member whose steps ended at the previous average joins
    the last one without steps (``due`` counts both at its last step)."""
    even = AveragingPoints.of([6, 6], every=3)
    assert even.periods(6) == [(1, 3), (4, 6)]
    uneven = AveragingPoints.of([7, 4], every=2)
    assert uneven.periods(7) == [(1, 2), (3, 4), (5, 7)]
    assert uneven.periods(4) == [(1, 2), (3, 4), (5, 4)]
    for last in (7, 4):
        ends = [end for first, end in uneven.periods(last) for _ in range(first <= end)]
        assert sum(uneven.due(step, last) for step in range(1, last + 1)) == 3
        assert ends == [step for step in range(1, last + 1) if uneven.due(step, last)]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_silence_watch_names_the_feeder_that_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(liveness.time, "monotonic", clock)
    watch = SilenceWatch(limit_s=8.0)
    assert watch.heard(1, [1, 2]) == []  # first scan: nobody silent yet
    clock.now += 8.5
    assert watch.heard(1, [1, 2]) == [2]  # rank 2 never spoke
    clock.now += 1
    assert watch.heard(1, [1, 2]) == []  # between scans (every limit / 4): not looked at
    watch.restart()  # the clients met for a checkpoint: silence counts afresh
    clock.now += 1
    assert watch.heard(1, [1, 2]) == []
