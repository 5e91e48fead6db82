"""NextFlight: callers that arrive while a call runs share the next one (no socket needed)."""

import gevent
import pytest
from gevent.event import Event

from gcmd.flight import NextFlight

pytestmark = pytest.mark.timeout(10)


class Calls:
    """A call that waits for ``release`` and says which call it was."""

    def __init__(self) -> None:
        self.started = 0
        self.release = Event()

    def __call__(self, what: str) -> tuple[str, int]:
        self.started += 1
        number = self.started
        self.release.wait()
        if what == "fail":
            raise ValueError(f"call {number}")
        return what, number


def until(predicate) -> None:
    """Let the other greenlets run until ``predicate()`` holds."""
    for _ in range(100):
        if predicate():
            return
        gevent.sleep(0)
    raise AssertionError("never held")


def test_callers_arriving_during_a_call_share_the_next_one_which_starts_after_them():
    flights, calls = NextFlight(), Calls()
    first = gevent.spawn(flights.run, "k", calls, "x")
    until(lambda: calls.started == 1)
    later = [gevent.spawn(flights.run, "k", calls, "x") for _ in range(5)]
    gevent.sleep(0.01)
    assert calls.started == 1  # the next call waits for the one under way
    calls.release.set()
    gevent.joinall([first, *later], raise_error=True)
    assert first.value == ("x", 1)
    assert [g.value for g in later] == [("x", 2)] * 5  # one call, begun after they called
    assert calls.started == 2


def test_keys_run_apart_and_a_lone_caller_starts_at_once():
    flights, calls = NextFlight(), Calls()
    calls.release.set()
    assert flights.run("a", calls, "x") == ("x", 1)
    assert flights.run("a", calls, "x") == ("x", 2)
    both = [gevent.spawn(flights.run, key, calls, key) for key in ("a", "b")]
    gevent.joinall(both, raise_error=True)
    assert sorted(g.value for g in both) == [("a", 3), ("b", 4)]


def test_an_error_reaches_every_caller_of_that_call_and_the_next_call_runs_anew():
    flights, calls = NextFlight(), Calls()
    failing = [gevent.spawn(flights.run, "k", calls, "fail") for _ in range(3)]
    until(lambda: calls.started == 1)
    calls.release.set()
    gevent.joinall(failing)
    assert [str(g.exception) for g in failing] == ["call 1", "call 2", "call 2"]
    assert flights.run("k", calls, "ok") == ("ok", 3)


def test_a_call_whose_callers_left_still_ends_and_the_next_one_runs():
    flights, calls = NextFlight(), Calls()
    gone = gevent.spawn(flights.run, "k", calls, "x")
    until(lambda: calls.started == 1)
    waiting = gevent.spawn(flights.run, "k", calls, "x")
    gevent.sleep(0)
    gone.kill()
    calls.release.set()
    assert waiting.get() == ("x", 2)


def test_a_caller_waits_at_most_its_timeout_the_call_under_way_included():
    flights, calls = NextFlight(), Calls()
    first = gevent.spawn(flights.run, "k", calls, "x")
    until(lambda: calls.started == 1)
    with pytest.raises(TimeoutError):
        flights.run("k", calls, "x", timeout=0.05)  # queued behind a call that does not end
    calls.release.set()
    assert first.get() == ("x", 1)
