"""A follow of a query (PROTOCOL.md, "Log queries (1.2)"): several logs, a backlog, grep, JSON.

A :class:`Feed` is what ``follow`` hands the session when the request asks
for more than 1.1 did (``follow LOG`` follows the log itself). It has the
face of a log to the session: ``subscribe(callback)``, ``unsubscribe``,
``stats`` (the first log's: the session adds the lines its buffer drops) and
``dropped_marker``. It subscribes to the raw lines of each log
(Broadcast.subscribe_lines) and filters, shapes and labels them before
anything reaches the follower: a line that does not match costs the
follower nothing.

The seam between the backlog and the live lines: the feed subscribes to
every log first and holds what arrives, then reads the backlogs. A log kept
in memory (the ``gcmd`` log, the journal, a FIFO) gives its backlog at the
very instant it was subscribed to (no wait in between). A file's backlog
is read from the file, in the pool, up to its last complete line; the
lines of its reader that end at or before that line's ``\\n`` in the same
file are in the backlog already and are not sent again, and every line that
ends after it comes from the reader. Then the held lines go, past that
filter, after the backlog.

Resuming after a cursor is the same seam: the lines after the cursor's line
(read from the file up to its last complete line, or taken from what the
``gcmd`` log or the journal keeps at the instant of the subscription, or
the entries a ``journalctl --cursor`` printed, up to the place of its last
one in the journal) stand for the backlog. Once a line of the log's
reader ends past the seam, the filter is gone: every later line is new.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from gcmd.logs.cursors import Cursor
from gcmd.logs.lines import MAX_REPLY, Batch
from gcmd.logs.queries import JSON, TEXT, Pattern, Shape, header

#: (raw, cut, where) of the lines of one log (see Broadcast.subscribe_lines)
RawLines = list[tuple[bytes, int, int | None]]


class Feed:
    """The follow of ``logs`` ((name, log) pairs, in the order asked): the last
    ``count`` lines of each (that match ``pattern``) first, or for a log with
    a cursor in ``cursors`` (by log name) the lines after it, in ``format``,
    then every new line that matches, with ``==> NAME <==`` when the log
    changes (text format, several logs).
    """

    def __init__(self, logs: list[tuple[str, object]], count: int = 0, pattern: Pattern | None = None,
                 format: str = TEXT, cursors: dict[str, Cursor] | None = None) -> None:
        self.logs = logs
        #: log name -> the cursor to resume that log after
        self.cursors = cursors or {}
        self._logs = dict(logs)
        self.count = count
        self.pattern = pattern
        self.shapes = {name: Shape(format, name) for name, _log in logs}
        self.several = len(logs) > 1 and format != JSON
        #: the figures the session adds its dropped lines to
        self.stats = logs[0][1].stats
        #: the line that says how many lines the follower's buffer dropped (N -> line)
        self.dropped_marker: Callable[[int], bytes] = Shape(format, "").dropped
        #: the lines sent before any live line (each without its newline), once subscribed
        self.backlog: list[bytes] = []
        self._callback: Callable[[list[bytes]], object] | None = None
        self._handlers: dict[str, Callable] = {}
        #: name -> ((device, inode), offset): a file's live lines that end there or before are in the backlog
        self._seen: dict[str, tuple[tuple[int, int], int]] = {}
        #: while the backlogs are read: the live lines that arrive meanwhile
        self._held: list[tuple[str, RawLines, object]] | None = None
        #: the log whose lines were sent last, for the headers
        self._last: str | None = None

    def subscribe(self, callback: Callable[[list[bytes]], object]) -> None:
        """Subscribe to every log, read the backlogs (``backlog``), then send
        ``callback`` the live lines; CommandError when a log cannot be followed."""
        self._callback = callback
        self._held = []
        try:
            for name, log in self.logs:
                handler = partial(self._arrived, name)
                log.subscribe_lines(handler)
                self._handlers[name] = handler
                # at once: a log kept in memory gives its lines without a wait
                if name in self.cursors:
                    self._resume(name, log, self.cursors[name])
                elif self.count:
                    self._backlog_of(name, log)
        except BaseException:
            self.unsubscribe(callback)
            raise
        held, self._held = self._held, None
        for name, lines, tag in held:
            self._arrived(name, lines, tag)

    def unsubscribe(self, callback: Callable[[list[bytes]], object]) -> None:
        for name, log in self.logs:
            handler = self._handlers.pop(name, None)
            if handler is not None:
                log.unsubscribe_lines(handler)
        self._callback = None

    def _backlog_of(self, name: str, log) -> None:
        """Add the backlog of ``log`` (each log's under its header, as lastlog)."""
        limit = MAX_REPLY // len(self.logs) - (len(header(name)) + 1 if self.several else 0)
        seen, lines = log.backlog(self.count, self.pattern, self.shapes[name], limit)
        if seen is not None:
            self._seen[name] = seen
        if self.several:
            self.backlog.append(header(name))
            self._last = name
        self.backlog += lines

    def _resume(self, name: str, log, cursor: Cursor) -> None:
        """Add the lines of ``log`` after ``cursor``, led by the cursor_lost note when it
        no longer holds the cursor's line."""
        shape = self.shapes[name]
        limit = (MAX_REPLY // len(self.logs) - (len(header(name)) + 1 if self.several else 0)
                 - len(shape.cursor_lost()) - 1)
        seen, lost, lines = log.resume(cursor, self.pattern, shape, limit)
        if seen is not None:
            self._seen[name] = seen
        if self.several:
            self.backlog.append(header(name))
            self._last = name
        if lost:
            self.backlog.append(shape.cursor_lost())
        self.backlog += lines

    def _arrived(self, name: str, lines: RawLines, tag: object) -> None:
        """New lines of the log ``name`` (in its reader's greenlet): filtered, shaped, sent.

        Feeds of one log that ask for the same lines (pattern, format) share
        the work: the first to get a batch filters and shapes it, the others
        take the same list (see Broadcast.shaped)."""
        if self._held is not None:
            self._held.append((name, lines, tag))
            return
        callback = self._callback
        if callback is None or not lines:
            return
        seen = self._seen.get(name)
        if seen is not None and tag == seen[0] and lines[-1][2] > seen[1]:
            # past the seam: what comes later is new, even where it stands (a file
            # truncated and written again, an entry of a late journal file)
            del self._seen[name]
        if seen is not None and tag == seen[0] and lines[0][2] <= seen[1]:
            out = self._shape(name, [line for line in lines if line[2] > seen[1]], tag)  # at the seam
        else:
            key = (self.pattern.source if self.pattern is not None else None, self.shapes[name].json, name)
            out = self._logs[name].shaped(lines, key, partial(self._shape, name, lines, tag))
        if not out:
            return
        if self.several and self._last != name:
            out = Batch([header(name), *out])
            self._last = name
        callback(out)

    def _shape(self, name: str, lines: RawLines, tag: object) -> Batch:
        """The lines of ``lines`` that match, as sent."""
        pattern, shape, log = self.pattern, self.shapes[name], self._logs[name]
        out = []
        for raw, cut, where in lines:
            if pattern is not None and not pattern.matches(raw):
                continue
            if shape.json:
                line = shape.line(raw, cut, log.cursor(name, tag, where, raw, cut))
            else:
                line = shape.line(raw, cut)
            if line is not None:
                out.append(line)
        return Batch(out)
