"""What every log gcmd serves shares: its subscribers, its courier, its recent lines, its figures.

See :class:`Broadcast`; the logs are gcmd.logs.readers (a file),
gcmd.logs.journal and gcmd.logs.memory (gcmd's own log, served as ``gcmd``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic

import gevent
import gevent.event

from gcmd.logs.lines import Batch, Recent

log = logging.getLogger(__name__)

#: seconds between two delivery passes to a log's followers: the lines that
#: end meanwhile go together, so that a log growing fast costs a pass (a send
#: to each follower) per interval rather than per chunk the reader reads
DELIVERY_INTERVAL = 0.02
#: bytes of waiting lines that start a pass before the interval is over
DELIVERY_BATCH = 1 << 20
#: seconds a reader waits at most for a pass to take the lines it queued
DELIVERY_STALL = 1.0
#: subscribers served in a row before a pass lets the others run, and for how
#: long (seconds): more than 0, so that the event loop polls for input (a
#: sleep(0) only goes to the back of the callbacks, which run for up to 5 ms)
PASS_SLICE = 64
PASS_PAUSE = 0.0002

Subscriber = Callable[[list[bytes]], object]
#: a feed's subscriber (gcmd.logs.feed): ``callback(lines, tag)`` with ``lines`` as (raw,
#: cut, where) and ``tag`` what ``where`` is relative to (see Broadcast.subscribe_lines)
LineSubscriber = Callable[[list[tuple[bytes, int, int | None]], object], object]



@dataclass
class LogStats:
    """The figures of one log, for ``stats``."""

    #: subscribers now
    followers: int = 0
    #: lines the log's readers read (dropped ones included)
    lines_read: int = 0
    #: lines the followers' buffers dropped; their owner adds them
    lines_dropped: int = 0
    #: reader processes started again after one exited
    reader_restarts: int = 0


class Broadcast:
    """What every log has: its subscribers, its recent lines, its figures.

    New lines are delivered in passes, by one greenlet per log (its courier):
    a pass hands the lines that ended since the last one, as one
    :class:`~gcmd.logs.lines.Batch` (a list every subscriber shares: never
    changed), to every subscriber, and their raw lines, as one list per file
    they came from, to every feed (subscribe_lines), letting the others run
    every PASS_SLICE subscribers. A pass starts at once after a quiet spell, else
    DELIVERY_INTERVAL after the last one (sooner when DELIVERY_BATCH bytes
    wait), so a log that grows fast costs a pass per interval, not one per
    chunk its reader reads. A subscriber must not block; one that raises is
    logged and keeps its place.
    """

    #: what ``logs`` shows as the log's SOURCE
    source: str

    def __init__(self) -> None:
        self.stats = LogStats()
        #: the last lines read, for logs answered from memory
        self.recent = Recent()
        #: subscriber -> the number of the first line it gets (lines are numbered as queued)
        self._subscribers: dict[Subscriber, int] = {}
        #: wire lines for the next pass, their bytes as sent, and the number of the next line
        self._waiting: list[bytes] = []
        self._waiting_bytes = 0
        self._numbered = 0
        self._last_pass = 0.0
        self._lines_wait = gevent.event.Event()
        #: set when a pass has taken the waiting lines
        self._taken = gevent.event.Event()
        self._courier: gevent.Greenlet | None = None
        #: the feeds' subscribers -> the number of the first raw line each gets
        self._line_subscribers: dict[LineSubscriber, int] = {}
        #: raw lines for the feeds' next pass, as (lines, tag) runs, and the number of the next one
        self._waiting_raw: list[tuple[list, object]] = []
        self._raw_numbered = 0
        #: the last raw lines given to the feeds, and what each kind of feed made of them
        self._shaped_for: object = None
        self._shaped: dict[object, Batch] = {}

    def subscribe(self, callback: Subscriber) -> None:
        """Send ``callback`` every line that ends from now on."""
        self._subscribers[callback] = self._numbered
        self._count_followers()
        self._ensure_courier()

    def unsubscribe(self, callback: Subscriber) -> None:
        self._subscribers.pop(callback, None)
        self._count_followers()

    def subscribe_lines(self, callback: LineSubscriber) -> None:
        """Call ``callback(lines, tag)`` with the raw lines that end from now on, in
        passes (a feed filters them before any follower's buffer). ``lines``:
        (raw, cut, where), ``raw`` the line's first MAX_LINE bytes, ``cut`` the
        bytes after them; ``where`` and ``tag`` place the line: for a file, the
        offset of its ``\\n`` in the file (device, inode) ``tag``; for the
        ``gcmd`` log, its number; for the journal, its Position (place in the
        journal and cursor, gcmd.logs.journal); else None. Every feed gets the same list (see shaped).
        """
        self._line_subscribers[callback] = self._raw_numbered
        self._count_followers()
        self._ensure_courier()

    def _ensure_courier(self) -> None:
        if self._courier is None or self._courier.dead:
            self._courier = gevent.spawn(self._deliver_passes)

    def unsubscribe_lines(self, callback: LineSubscriber) -> None:
        self._line_subscribers.pop(callback, None)
        self._count_followers()

    @property
    def wants_lines(self) -> bool:
        return bool(self._line_subscribers)

    def cursor(self, log: str, tag: object, where: int | None, raw: bytes, cut: int) -> str | None:
        """The cursor of a line a feed got (see subscribe_lines); None: this log has none."""
        return None

    def shaped(self, lines: object, key: object, make: Callable[[], Batch]) -> Batch:
        """What the feeds that ask ``key`` (their pattern and format) make of
        ``lines``, the list every feed of this log is given at once: made by the
        first (``make()``), shared by the others (never to be changed)."""
        if lines is not self._shaped_for:
            self._shaped_for, self._shaped = lines, {}
        out = self._shaped.get(key)
        if out is None:
            out = self._shaped[key] = make()
        return out

    def _count_followers(self) -> None:
        self.stats.followers = len(self._subscribers) + len(self._line_subscribers)

    def _deliver_lines(self, lines: list[tuple[bytes, int, object]], tag: object) -> None:
        """Queue new raw lines, placed by ``tag`` (see subscribe_lines), for the feeds' next pass."""
        if not self._line_subscribers or not lines:
            return
        if self._waiting_raw and self._waiting_raw[-1][1] == tag:
            self._waiting_raw[-1][0].extend(lines)
        else:
            self._waiting_raw.append((list(lines), tag))
        self._raw_numbered += len(lines)
        self._queued(sum(len(raw) + 1 for raw, _cut, _where in lines))

    def stop_delivery(self) -> None:
        """Stop the courier (no more passes)."""
        if self._courier is not None:
            self._courier.kill(block=False)

    def _deliver(self, wire: list[bytes | None]) -> None:
        """Queue new wire lines for the next pass (None: a line not sent)."""
        if not self._subscribers:
            return
        for line in wire:
            if line is not None:
                self._waiting.append(line)
                self._waiting_bytes += len(line) + 1
                self._numbered += 1
        if self._waiting:
            self._queued(0)

    def _queued(self, size: int) -> None:
        """``size`` more bytes wait for the next pass: wake the courier, and hold
        the reader back while more than DELIVERY_BATCH wait."""
        self._waiting_bytes += size
        self._lines_wait.set()
        if self._waiting_bytes >= DELIVERY_BATCH and gevent.getcurrent() is not gevent.get_hub():
            # a reader's greenlet waits for the pass to take them: what follows
            # waits in the reader's pipe, not here (at most ~DELIVERY_BATCH)
            self._taken.clear()
            self._taken.wait(DELIVERY_STALL)

    def _deliver_passes(self) -> None:
        # the courier
        while True:
            self._lines_wait.wait()
            delay = self._last_pass + DELIVERY_INTERVAL - monotonic()
            while delay > 0 and self._waiting_bytes < DELIVERY_BATCH:
                self._lines_wait.clear()
                self._lines_wait.wait(delay)
                delay = self._last_pass + DELIVERY_INTERVAL - monotonic()
            self._lines_wait.clear()
            self._pass()

    def _pass(self) -> None:
        lines, first = Batch(self._waiting), self._numbered - len(self._waiting)
        runs, raw_first = self._waiting_raw, self._raw_numbered - sum(len(run) for run, _tag in self._waiting_raw)
        self._waiting, self._waiting_raw, self._waiting_bytes = [], [], 0
        self._taken.set()
        self._last_pass = monotonic()
        served = 0
        for callback in tuple(self._subscribers):
            served = self._pause_between_slices(served)
            # looked up now: it may have left, or left and come back, meanwhile
            since = self._subscribers.get(callback)
            if since is None:
                continue
            part = lines if since <= first else Batch(lines[since - first:])
            if part:  # else it came after these lines ended
                self._hand(callback, part)
        for callback in tuple(self._line_subscribers):
            served = self._pause_between_slices(served)
            since = self._line_subscribers.get(callback)
            if since is None:
                continue
            number = raw_first
            for run, tag in runs:
                if since < number + len(run):
                    # the same list for every feed that gets all of it (see shaped)
                    self._hand(callback, run if since <= number else run[since - number:], tag)
                number += len(run)

    @staticmethod
    def _pause_between_slices(served: int) -> int:
        if served and served % PASS_SLICE == 0:
            gevent.sleep(PASS_PAUSE)  # the others run between slices of a long pass
        return served + 1

    def _hand(self, callback: Callable, *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("a follower of the log '%s' failed", self.source)
