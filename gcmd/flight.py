"""Doing expensive work once: single-flight calls, calls batched behind the
one under way, and a bounded LRU cache."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import gevent
from gevent.event import AsyncResult


class LRU:
    """A mapping that forgets its least recently used entries beyond ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        if self.size <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class _Flight:
    __slots__ = ("greenlet", "on_cancel", "waiters")

    def __init__(self, greenlet: gevent.Greenlet, on_cancel: Callable[[], None] | None) -> None:
        self.greenlet = greenlet
        self.on_cancel = on_cancel
        self.waiters = 0


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """Call ``fn`` in a greenlet or a pool thread, its failure travelling as a value.

    gevent prints the traceback of whatever raises in a greenlet or a pool
    thread; the caller reports the error itself, with :func:`unwrap`.
    """
    try:
        return True, fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised by unwrap() in every caller
        return False, exc


def unwrap(result: tuple[bool, Any]) -> Any:
    """The value of an :func:`outcome`, or its exception raised here."""
    ok, value = result
    if not ok:
        # the same exception may reach several callers: each raises it afresh,
        # so that its traceback does not gather (and keep alive) the others' frames
        raise value.with_traceback(None)
    return value


class SingleFlight:
    """Runs one greenlet per key; concurrent callers with the same key share it.

    The work is killed (``GreenletExit`` inside it, so its ``finally`` blocks
    clean up) as soon as no caller is waiting for it any more, and
    ``on_cancel`` is called then: a greenlet killed before it started runs no
    ``finally`` at all.
    """

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def run(self, key: Hashable, fn: Callable[..., Any], *args: Any,
            on_cancel: Callable[[], None] | None = None) -> Any:
        """``fn(*args)``, or the result of the call with this key already under way."""
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight(gevent.spawn(outcome, fn, *args), on_cancel)
        flight.waiters += 1
        try:
            result = flight.greenlet.get()
        finally:
            flight.waiters -= 1
            if self._flights.get(key) is flight and (flight.waiters == 0 or flight.greenlet.ready()):
                del self._flights[key]
                if not flight.greenlet.ready():
                    flight.greenlet.kill(block=False)
                    if flight.on_cancel is not None:
                        flight.on_cancel()
        return unwrap(result)

    def joined(self, key: Hashable) -> bool:
        """Whether a call with this key would share work already under way."""
        return key in self._flights


class _Batch:
    __slots__ = ("args", "fn", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.fn = fn
        self.args = args
        self.result = AsyncResult()


class NextFlight:
    """Runs at most one call per key at a time, each in a greenlet of its own;
    callers that arrive while one runs share the *next* call, which starts
    once it ends.

    Unlike SingleFlight, every caller gets a result computed wholly after it
    called (what the end of a growing file must be read with: exact at the
    moment of the request), and N callers that arrive together cost two calls,
    not N. A call runs to its end even when its callers have gone (bound its
    work, as a command timeout does).
    """

    def __init__(self) -> None:
        self._running: dict[Hashable, _Batch] = {}
        self._queued: dict[Hashable, _Batch] = {}

    def run(self, key: Hashable, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """``fn(*args)`` called after this call began, shared with the other
        callers of ``key`` waiting for the same call; what it raised is raised.
        TimeoutError when it is not over within ``timeout`` seconds of this
        call, waiting for the call under way included."""
        if key in self._running:
            batch = self._queued.get(key)
            if batch is None:
                batch = self._queued[key] = _Batch(fn, args)
        else:
            batch = _Batch(fn, args)
            self._start(key, batch)
        try:
            return unwrap(batch.result.get(timeout=timeout))
        except gevent.Timeout:
            raise TimeoutError(f"not done in {timeout:g} s") from None

    def _start(self, key: Hashable, batch: _Batch) -> None:
        self._running[key] = batch
        greenlet = gevent.spawn(outcome, batch.fn, *batch.args)
        greenlet.rawlink(lambda done: self._done(key, batch, done))

    def _done(self, key: Hashable, batch: _Batch, greenlet: gevent.Greenlet) -> None:
        # in the hub
        del self._running[key]
        batch.result.set(greenlet.value if greenlet.successful() else (False, greenlet.exception))
        queued = self._queued.pop(key, None)
        if queued is not None:
            self._start(key, queued)
