"""The ``gcmd`` log: the server's own log lines, kept in memory and followed.

See MemoryLog; what every log shares (subscribers, passes, recent lines) is
gcmd.logs.broadcast.Broadcast.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque

from gcmd.logs.broadcast import Broadcast, LineSubscriber, Subscriber
from gcmd.logs.cursors import Cursor, MemoryCursor, memory_cursor
from gcmd.logs.lines import MAX_LINE, MAX_REPLY, RECENT_LINES, LineSplitter
from gcmd.logs.queries import Pattern, Shape, recent_after, recent_block
from gcmd.net.wire import CommandError
from gcmd.serverlog.setup import LineHandler, flush_lines

#: the lines Recent keeps track of: those it keeps and as many pushed out before them
_NEEDED_LINES = 2 * RECENT_LINES
#: lines of texts an unfollowed MemoryLog lets wait before it drops the ones not needed
_FORGET_AT = 3 * RECENT_LINES


class MemoryLog(Broadcast, LineHandler):
    """The ``gcmd`` log: the server's own log lines, the last 1000 kept in memory.

    A logging handler that works in the hub's thread (see LineHandler):
    whoever installs it sets its formatter and level; subscribers are
    called in the hub's thread. Lines are counted as they come, and made
    wire lines and remembered together: at the end of the event-loop
    iteration while the log is followed, else at the next lastlog. Unfollowed,
    only the texts that hold the last 2,000 lines wait (those that make the
    last 1,000 remembered and the 1,000 before them, whose count lastlog
    tells): at the default level that is a line per request, and none of
    them costs more than its share of a join until someone asks.
    """

    def __init__(self, level: int = logging.NOTSET) -> None:
        LineHandler.__init__(self, level)
        Broadcast.__init__(self)
        self.source = "memory"
        #: texts logged and not yet remembered, each with the lines it holds, oldest first
        self._arrived: deque[tuple[str, int]] = deque()
        self._arrived_lines = 0
        self._scheduled = False
        #: tells this process's lines from those of another (cursors): a restart loses them
        self.process = secrets.token_hex(8)

    def emit_texts(self, texts: list[str]) -> None:
        text = "\n".join(texts)
        lines = text.count("\n") + 1
        self._arrived.append((text, lines))
        self._arrived_lines += lines
        self.stats.lines_read += lines
        if self._subscribers or self._line_subscribers:
            if not self._scheduled:
                # once per event-loop iteration (this may also be a subscriber that logs)
                self._scheduled = True
                self.loop.run_callback(self._remember_arrived)
        elif self._arrived_lines >= _FORGET_AT:
            self._forget_unneeded()

    def _forget_unneeded(self) -> None:
        """Drop the oldest texts that wait while the others hold the lines Recent keeps
        track of: what it would remember of the dropped ones, the newer lines push out."""
        arrived = self._arrived
        while self._arrived_lines - arrived[0][1] >= _NEEDED_LINES:
            self._arrived_lines -= arrived.popleft()[1]

    def _remember_arrived(self) -> None:
        self._scheduled = False
        self._remember()

    def _remember(self) -> None:
        """Make the lines that arrived wire lines, keep them, and queue them for the subscribers."""
        if not self._arrived:
            return
        # one pass over all of them: LineSplitter sends plain lines as they are
        # without looking at each, and makes the same wire lines as wire_line
        lines = ("\n".join([text for text, _ in self._arrived]) + "\n").encode("utf-8", "backslashreplace")
        self._arrived.clear()
        self._arrived_lines = 0
        splitter, wire = LineSplitter(), []
        for start in range(0, len(lines), MAX_LINE):  # its one-pass path takes up to MAX_LINE bytes
            wire += splitter.feed(lines[start:start + MAX_LINE])
        first = self.recent.appended + 1
        self.recent.extend(wire)
        self._deliver(wire)  # queued for the courier's next pass
        if self._line_subscribers:
            raws = lines.split(b"\n")
            raws.pop()  # after the last newline
            self._deliver_lines([(raw, 0, first + n) for n, raw in enumerate(raws)], None)

    def subscribe(self, callback: Subscriber) -> None:
        flush_lines()
        self._remember()  # the lines logged before are not sent
        super().subscribe(callback)

    def subscribe_lines(self, callback: LineSubscriber) -> None:
        flush_lines()
        self._remember()  # the lines logged before are not sent, and are all in recent
        super().subscribe_lines(callback)

    def backlog(self, count: int, pattern: Pattern | None, shape: Shape,
                limit: int = MAX_REPLY) -> tuple[None, list[bytes]]:
        """A follow's backlog: the kept lines as they are just after subscribe_lines
        (called without a wait in between, so that no line is missed or repeated)."""
        return None, recent_block(self.recent, count, pattern, shape, limit,
                                  lambda number: memory_cursor(shape.name, self.process, number))

    def resume(self, cursor: Cursor, pattern: Pattern | None, shape: Shape,
               limit: int = MAX_REPLY) -> tuple[None, bool, list[bytes]]:
        """A follow resumed after ``cursor``, just after subscribe_lines (no wait in
        between): whether the kept lines no longer reach back to it (another
        process's line, or moved past), and the kept lines after it (all of
        them when lost). CommandError ``bad cursor`` for a cursor of another kind."""
        if not isinstance(cursor, MemoryCursor):
            raise CommandError("bad cursor")
        lines, first = self.recent.numbered()
        held = (cursor.process == self.process
                and first - 1 <= cursor.sequence <= first + len(lines) - 1)
        return None, not held, recent_after(self.recent, cursor.sequence if held else None, pattern, shape, limit,
                                            lambda number: memory_cursor(shape.name, self.process, number))

    def cursor(self, log: str, tag: object, where: int | None, raw: bytes, cut: int) -> str | None:
        return memory_cursor(log, self.process, where)

    def lastlog(self, count: int) -> list[bytes]:
        """The lastlog block of the last ``count`` lines (in the hub's thread)."""
        flush_lines()
        self._remember()
        return self.recent.last(count)

    def query(self, count: int, pattern: Pattern | None, shape: Shape, limit: int = MAX_REPLY) -> list[bytes]:
        """The lines of this log in a lastlog block of a query (in the hub's thread)."""
        flush_lines()
        self._remember()
        return recent_block(self.recent, count, pattern, shape, limit,
                            lambda number: memory_cursor(shape.name, self.process, number))
