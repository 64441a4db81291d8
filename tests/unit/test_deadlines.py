"""Deadline logic without processes: polling, timeouts and the errors that name peers."""

from __future__ import annotations

import pytest

from mpisplit.deadlines import ANY_SOURCE, Deadlines, PeerTimeout, poll


class _Clock:
    """A clock that advances by ``tick`` seconds each time it is read."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def _succeeds_after(n: int, value: object = "ready"):
    calls = []

    def attempt():
        calls.append(1)
        return value if len(calls) >= n else None

    return attempt, calls


def test_poll_returns_the_first_true_result() -> None:
    attempt, calls = _succeeds_after(1)
    assert poll(attempt, 1.0, lambda: AssertionError("no timeout")) == "ready"
    assert len(calls) == 1
    attempt, calls = _succeeds_after(1000)  # past the tight polls, into the yields
    assert poll(attempt, None, lambda: AssertionError("no timeout"), clock=_Clock(1e-4)) == "ready"
    assert len(calls) == 1000


def test_poll_raises_once_the_deadline_has_passed() -> None:
    attempt, calls = _succeeds_after(10**9)
    clock = _Clock(0.01)
    with pytest.raises(TimeoutError, match="late"):
        poll(attempt, 0.5, lambda: TimeoutError("late"), clock=clock)
    assert 0.5 < clock.now < 0.6  # no earlier, and not much later


def test_no_deadline_waits_as_long_as_it_takes() -> None:
    attempt, _ = _succeeds_after(400)
    assert poll(attempt, None, lambda: AssertionError("no timeout"), clock=_Clock(10.0))


def test_errors_name_who_was_waited_for() -> None:
    deadlines = Deadlines(0, ["server", "client", "client"], 2.5)
    error = deadlines.timed_out([1, 2], "ACTIVATION", "receive")
    assert isinstance(error, PeerTimeout) and error.peers == (1, 2)
    assert str(error) == (
        "rank 0 (server) waited 2.5 s to receive ACTIVATION with rank 1 "
        "(client), rank 2 (client): no answer (transport.timeout_s)"
    )
    assert "with any rank:" in str(deadlines.timed_out([ANY_SOURCE], "GRADIENT", "send"))


def test_every_wait_first_runs_the_hook_before_blocking() -> None:
    """The send queue posts its staged sends before any wait (a peer may need them)."""
    hooked = []
    deadlines = Deadlines(1, ["server", "client"], 0.0, before_block=lambda: hooked.append(1))
    with pytest.raises(
        PeerTimeout,
        match=r"rank 1 \(client\) waited 0 s to send LABELS "
        r"with rank 0 \(server\)",
    ):
        deadlines.wait(lambda: False, [0], "LABELS", "send")
    assert deadlines.wait(lambda: 7, [0], "LABELS", "send", bounded=False) == 7
    assert len(hooked) == 2


@pytest.mark.parametrize("shared_cores", [True, False])
def test_a_wait_yields_its_core_only_where_ranks_share_cores(monkeypatch, shared_cores) -> None:
    """Oversubscribed ranks yield between polls so the rank they wait for runs; ranks with a
    core each poll back to back (a large message's copy needs the sender's progress too)."""
    yields = []
    monkeypatch.setattr("os.sched_yield", lambda: yields.append(1))
    attempt, calls = _succeeds_after(1000)
    never = lambda: AssertionError("no timeout")  # noqa: E731
    assert poll(attempt, None, never, clock=_Clock(1e-6), shared_cores=shared_cores)
    assert len(yields) == (len(calls) - 201 if shared_cores else 0)
