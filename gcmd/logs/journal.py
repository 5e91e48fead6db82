"""The systemd journal as a log: ``journal`` or the journal files in a directory (``journal:DIR``).

One ``journalctl --follow --output json`` per journal log reads its entries
with journald's cursor (``__CURSOR``) on each; gcmd prints each entry in
journalctl's ``short`` format itself (gcmd.logs.journal_short), so that a
line and its cursor come from one reader.

Cursors: the lines of an entry carry its cursor, ``j1:LOG:CURSOR``. A follow
resumed after a cursor still in the last 1000 lines kept is answered from
them; an older one runs ``journalctl --cursor CURSOR`` once for the request
(the entries from the cursor's on: its first entry tells whether the journal
still holds the cursor's, else journalctl went on from the nearest one,
``cursor_lost``). A reader that exits is started again after the last cursor
it read (``--after-cursor``), so that no entry written meanwhile is lost.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque

import gevent

from gcmd.logs.broadcast import LineSubscriber, Subscriber
from gcmd.logs.cursors import Cursor, JournalCursor, journal_cursor
from gcmd.logs.journal_short import decode_entry
from gcmd.logs.lines import MAX_REPLY, RECENT_LINES, LineSplitter, capped, wire_line
from gcmd.logs.queries import Pattern, Shape, recent_after, recent_block
from gcmd.logs.readers import _ProcessLog
from gcmd.logs.tailing import Reader
from gcmd.net.wire import CommandError

log = logging.getLogger(__name__)

#: seconds a resume waits for the reader to read the entries journalctl --cursor printed
_CATCH_UP = 2.0
_SEQNUM = re.compile(r"s=([0-9a-f]+);i=([0-9a-f]+)").match


class JournalLog(_ProcessLog):
    """The systemd journal (``journal``) or the journal files in a directory (``journal:DIR``).

    One ``journalctl --follow --output json`` runs from start() to close();
    lastlog is answered from the last 1000 lines it printed, each kept with
    its entry's cursor.
    """

    #: every reader's output is decoded here (publish): the raw lines are JSON
    wants_lines = True

    def __init__(self, source: str, command_timeout: float) -> None:
        super().__init__(source, command_timeout)
        self.directory = source.partition(":")[2] or None
        #: journald's cursor of each line kept in ``recent``, in the same order
        self._cursors: deque[str | None] = deque()
        #: journald's cursor of the last entry read: a restarted reader goes on after it
        self._last_cursor: str | None = None

    def start(self) -> None:
        try:
            self._ensure_reader()
        except CommandError as exc:
            log.warning("%s", exc)

    def publish(self, reader: Reader, wire: list[bytes | None], backlog: bool,
                lines: list[tuple[bytes, int, int]] | None = None) -> None:
        """Entries from the reader (JSON lines): made short lines, kept with their
        cursors, sent unless ``backlog``."""
        raws: list[bytes] = []
        cursors: list[str | None] = []
        for raw, cut, _end in lines or ():
            cursor, shown = decode_entry(raw, cut)
            raws += shown
            cursors += [cursor] * len(shown)
            self._last_cursor = cursor or self._last_cursor
        wire = [wire_line(raw) for raw in raws]
        self.stats.lines_read += len(wire)
        first = self.recent.appended + 1
        self.recent.extend(wire)
        self._cursors.extend(cursors)
        while len(self._cursors) > len(self.recent):
            self._cursors.popleft()
        if not backlog and wire:
            self._deliver(wire)
            if self._line_subscribers:
                self._deliver_lines([(raw, 0, (first + n, cursor))
                                     for n, (raw, cursor) in enumerate(zip(raws, cursors))], None)

    def lastlog(self, count: int) -> list[bytes]:
        """The lastlog block of the last ``count`` lines; CommandError when unreadable or slow."""
        self._ensure_reader()
        return self._from_memory(count)

    def query(self, count: int, pattern: Pattern | None, shape: Shape, limit: int = MAX_REPLY) -> list[bytes]:
        """The lines of the journal in a lastlog block of a query, from its last 1000 lines."""
        self._ensure_reader()
        self._check_reader("lastlog")
        return self._kept(count, pattern, shape, limit)

    def subscribe(self, callback: Subscriber) -> None:
        """Follow the journal from the end of its backlog; CommandError when its
        reader failed (the lastlog error) or its backlog took more than the
        command timeout."""
        self._ensure_reader()
        self._check_reader("follow")
        super().subscribe(callback)

    def subscribe_lines(self, callback: LineSubscriber) -> None:
        """As subscribe, for a feed."""
        self._ensure_reader()
        self._check_reader("follow")
        super().subscribe_lines(callback)

    def backlog(self, count: int, pattern: Pattern | None, shape: Shape,
                limit: int = MAX_REPLY) -> tuple[None, list[bytes]]:
        """A follow's backlog: the kept lines as they are just after subscribe_lines
        (called without a wait in between, so that no line is missed or repeated)."""
        return None, self._kept(count, pattern, shape, limit)

    def resume(self, cursor: Cursor, pattern: Pattern | None, shape: Shape,
               limit: int = MAX_REPLY) -> tuple[tuple[None, tuple[int, str]] | None, bool, list[bytes]]:
        """A follow resumed after ``cursor``, just after subscribe_lines: where the
        lines sent end (as a feed's ``seen``: the live lines up to it are not sent
        again), whether the journal no longer holds the cursor's entry, and the
        lines after it. From the kept lines when they hold the cursor's entry (no
        wait), else from ``journalctl --cursor`` (see the module's text).
        CommandError ``bad cursor`` for a cursor that is not a journal's, or
        one journalctl cannot seek to."""
        if not isinstance(cursor, JournalCursor):
            raise CommandError("bad cursor")
        numbers = self._numbers()
        for number, journald in reversed(numbers):
            if journald == cursor.journald:
                return None, False, self._kept_after(number, pattern, shape, limit)
        lost, last, lines = self._read_from(cursor.journald, pattern, shape, limit)
        return self._seen_after(last), lost, lines

    def cursor(self, log: str, tag: object, where: object, raw: bytes, cut: int) -> str | None:
        journald = where[1] if isinstance(where, tuple) else None
        return None if journald is None else journal_cursor(log, journald)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.stop()
        self.children.close()
        self.stop_delivery()

    def argv(self, reader: Reader) -> list[str]:
        # --merge: with --follow alone, journalctl (252) shows the current boot
        # only, and fails on journal files from other machines
        start = (["--after-cursor", self._last_cursor] if self._last_cursor and not reader.backlog
                 else ["--lines", str(RECENT_LINES)])
        return self._journalctl("--follow", *start)

    def restartable(self, reader: Reader) -> bool:
        if self._last_cursor is not None:
            # on after the last entry read: what was written meanwhile is sent, not lost
            reader.backlog = False
            return True
        # it prints its backlog again: remembered anew, never sent
        reader.ready.clear()
        reader.settled.clear()
        self.recent.clear()
        self._cursors.clear()
        return True

    def _journalctl(self, *args: str) -> list[str]:
        argv = ["journalctl", *args, "--output", "json", "--all", "--no-pager", "--quiet", "--merge"]
        return argv + ["--directory", self.directory] if self.directory else argv

    def _ensure_reader(self) -> None:
        with self._starting:
            if self._reader is None:
                reader = Reader(self, backlog=True)
                reader.start()
                self._reader = reader

    def _numbers(self) -> list[tuple[int, str | None]]:
        """(number, journald cursor) of each kept line, oldest first."""
        lines, first = self.recent.numbered()
        return list(zip(range(first, first + len(lines)), self._cursors))

    def _cursor_of(self, shape: Shape):
        first = self.recent.numbered()[1]
        cursors = list(self._cursors)

        def cursor(number: int) -> str | None:
            journald = cursors[number - first]
            return None if journald is None else journal_cursor(shape.name, journald)
        return cursor

    def _kept(self, count: int, pattern: Pattern | None, shape: Shape, limit: int) -> list[bytes]:
        return recent_block(self.recent, count, pattern, shape, limit, self._cursor_of(shape))

    def _kept_after(self, number: int, pattern: Pattern | None, shape: Shape, limit: int) -> list[bytes]:
        return recent_after(self.recent, number, pattern, shape, limit, self._cursor_of(shape))

    def _read_from(self, journald: str, pattern: Pattern | None, shape: Shape,
                   limit: int) -> tuple[bool, str | None, list[bytes]]:
        """The entries from journald's cursor ``journald`` on, read by one
        ``journalctl --cursor``: whether the cursor's entry is gone, the cursor
        of the last entry printed, and the lines after the cursor's entry that
        match, shaped, the newest ``limit`` bytes of them (the rest left out)."""
        argv = self._journalctl("--cursor", journald)
        try:
            proc = self.children.start(argv)
        except OSError as exc:
            raise CommandError(f"cannot read the log '{self.source}': {exc.strerror or exc}") from None
        kept: deque[bytes] = deque()
        size = left_out = 0
        first: str | None = None
        last: str | None = None
        splitter = LineSplitter()
        try:
            with gevent.Timeout(self.command_timeout, CommandError(
                    f"follow timed out after {self.command_timeout:g} s")):
                while chunk := proc.stdout.read(65536):
                    for raw, cut, _end in splitter.feed_lines(chunk, 0):
                        cursor, shown = decode_entry(raw, cut)
                        if first is None:
                            first = cursor or ""
                            if cursor == journald:
                                continue  # the cursor's own entry: sent before
                        last = cursor or last
                        for line in shown:
                            if pattern is not None and not pattern.matches(line):
                                continue
                            out = shape.line(line, 0, journal_cursor(shape.name, cursor) if cursor else None)
                            if out is None:
                                continue
                            kept.append(out)
                            size += len(out) + 1
                            while size > limit:
                                size -= len(kept.popleft()) + 1
                                left_out += 1
                status = proc.wait()
                error = proc.stderr.read().decode("utf-8", "replace").strip()
        finally:
            self.children.stop(proc)
        if status != 0 and first is None:
            if "cursor" in error.lower():
                raise CommandError("bad cursor")
            raise CommandError(f"cannot read the log '{self.source}': {error or f'status {status}'}")
        lines = capped(reversed(kept), left_out, limit, shape.left_out)
        return first != journald, last, lines

    def _seen_after(self, last: str | None) -> tuple[None, tuple[int, str]] | None:
        """Where the entries journalctl --cursor printed end among the reader's lines,
        once the reader has read them too (waiting up to _CATCH_UP seconds when
        the reader is behind): the live lines up to there are not sent again."""
        if last is None:
            return None
        deadline = time.monotonic() + _CATCH_UP
        while True:
            numbers = self._numbers()
            for number, journald in reversed(numbers):
                if journald == last:
                    return None, (number, journald)
            if not self._behind(numbers, last) or time.monotonic() > deadline:
                return None
            gevent.sleep(0.02)

    @staticmethod
    def _behind(numbers: list[tuple[int, str | None]], last: str) -> bool:
        """Whether the reader has not read the entry of cursor ``last`` yet: its newest
        entry is of the same journal (seqnum ID) and older (seqnum)."""
        newest = next((journald for _n, journald in reversed(numbers) if journald), None)
        a, b = newest and _SEQNUM(newest), _SEQNUM(last)
        return bool(a and b and a[1] == b[1] and int(a[2], 16) < int(b[2], 16))
