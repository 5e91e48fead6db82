"""The systemd journal as a log: ``journal`` or the journal files in a directory (``journal:DIR``).

One ``journalctl --follow --output json`` per journal log reads its entries
with journald's cursor (``__CURSOR``) on each; gcmd prints each entry in
journalctl's ``short`` format itself (gcmd.logs.journal_short), so that a
line and its cursor come from one reader.

Cursors: the lines of an entry carry its cursor, ``j1:LOG:CURSOR``. A follow
resumed after a cursor still in the last 1000 lines kept is answered from
them; an older one runs ``journalctl --cursor CURSOR`` (the entries from the
cursor's on: its first entry tells whether the journal still holds the
cursor's, else journalctl went on from the nearest one, ``cursor_lost``).
Resumes that ask the same share such a read (scripts that lost their
connections together come back with the same cursor), and at most
HISTORY_READS run at once per journal log, whatever clients ask. A reader that exits is started again after the last cursor
it read (``--after-cursor``), so that no entry written meanwhile is lost.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import deque

import gevent
from gevent.lock import BoundedSemaphore

from gcmd.flight import NextFlight
from gcmd.logs.broadcast import LineSubscriber, Subscriber
from gcmd.logs.cursors import Cursor, JournalCursor, journal_cursor
from gcmd.logs.journal_short import decode_entry
from gcmd.logs.lines import MAX_REPLY, RECENT_LINES, LineSplitter, capped, wire_line
from gcmd.logs.queries import Pattern, Shape, recent_after, recent_block
from gcmd.logs.readers import _ProcessLog
from gcmd.logs.tailing import Reader
from gcmd.net.wire import CommandError

log = logging.getLogger(__name__)

#: the ``journalctl --cursor`` reads (resumes older than the kept lines) of one journal log at once
HISTORY_READS = 4

#: journald's cursor, as sd_journal_get_cursor writes it: seqnum ID, seqnum, boot ID,
#: monotonic time, realtime, xor hash
_JOURNALD = re.compile(r"s=([0-9a-f]{32});i=([0-9a-f]+);b=([0-9a-f]{32});m=([0-9a-f]+);t=([0-9a-f]+);x=([0-9a-f]+)")


class Position:
    """Where an entry stands in the journal, from journald's cursor (None: a
    line that is not an entry, after every entry): ``<`` orders entries as
    sd-journal does (compare_locations in sd-journal.c, systemd 252): by
    seqnum within one seqnum ID, else by monotonic time within one boot,
    else by realtime, then by xor hash. It is where a feed's journal line
    stands (see Broadcast.subscribe_lines)."""

    def __init__(self, journald: str | None, suffix: str | None = None) -> None:
        self.journald = journald
        #: the line's cursor after the log's name (JournalCursor.suffix)
        self.suffix = suffix

    @functools.cached_property
    def _fields(self) -> tuple[str, int, str, int, int, int] | None:
        match = self.journald and _JOURNALD.fullmatch(self.journald)
        if not match:
            return None
        return match[1], int(match[2], 16), match[3], int(match[4], 16), int(match[5], 16), int(match[6], 16)

    def _order(self, other: Position) -> int:
        a, b = self._fields, other._fields
        if a is None or b is None:
            return (a is None) - (b is None)
        if a[0] == b[0] and a[1] != b[1]:
            return -1 if a[1] < b[1] else 1
        if a[2] == b[2] and a[3] != b[3]:
            return -1 if a[3] < b[3] else 1
        for n in (4, 5):
            if a[n] != b[n]:
                return -1 if a[n] < b[n] else 1
        return 0

    def __lt__(self, other: Position) -> bool:
        return self._order(other) < 0

    def __le__(self, other: Position) -> bool:
        return self._order(other) <= 0

    def __gt__(self, other: Position) -> bool:
        return self._order(other) > 0

    def __ge__(self, other: Position) -> bool:
        return self._order(other) >= 0


class _Newest:
    """The newest lines added, at most ``limit`` bytes as sent, and how many older ones were left out."""

    def __init__(self, limit: int) -> None:
        self.limit, self.size, self.left_out = limit, 0, 0
        self.lines: deque[bytes] = deque()

    def add(self, line: bytes | None) -> None:
        if line is None:
            return  # a line the format drops
        self.lines.append(line)
        self.size += len(line) + 1
        while self.size > self.limit:
            self.size -= len(self.lines.popleft()) + 1
            self.left_out += 1


def line_suffixes(journald: str | None, count: int) -> list[str | None]:
    """The cursors (after the log's name) of the ``count`` lines of the entry of
    journald's cursor ``journald``: ``CURSOR:N`` for each but the last, ``CURSOR``
    for the last (None for a line that is not an entry)."""
    if journald is None:
        return [None] * count
    return [f"{journald}:{index:x}" for index in range(count - 1)] + [journald] if count else []


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
        #: the cursor of each line kept in ``recent`` after the log's name
        #: (JournalCursor.suffix), in the same order
        self._cursors: deque[str | None] = deque()
        #: journald's cursor of the last entry read: a restarted reader goes on after it
        self._last_cursor: str | None = None
        #: the newest entry when the reader started, whose cursor ends its backlog
        #: (see _newest_entry): (known, cursor), cursor None for an empty journal
        self._backlog_end: tuple[bool, str | None] = (False, None)
        #: the resumes older than the kept lines: those asking the same share the next read
        self._history, self._history_slots = NextFlight(), BoundedSemaphore(HISTORY_READS)

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
        entries: list[str | None] = []
        for raw, cut, _end in lines or ():
            cursor, shown = decode_entry(raw, cut)
            raws += shown
            cursors += line_suffixes(cursor, len(shown))
            entries += [cursor] * len(shown)
            self._last_cursor = cursor or self._last_cursor
            if backlog and cursor is not None and cursor == self._backlog_end[1]:
                reader.backlog_over()  # exact, even while the journal never goes quiet
        wire = [wire_line(raw) for raw in raws]
        self.stats.lines_read += len(wire)
        self.recent.extend(wire)
        self._cursors.extend(cursors)
        while len(self._cursors) > len(self.recent):
            self._cursors.popleft()
        if not backlog and wire:
            self._deliver(wire)
            if self._line_subscribers:
                self._deliver_lines([(raw, 0, Position(entry, suffix))
                                     for raw, entry, suffix in zip(raws, entries, cursors)], None)

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
               limit: int = MAX_REPLY) -> tuple[tuple[None, Position] | None, bool, list[bytes]]:
        """A follow resumed after ``cursor``, just after subscribe_lines: where the
        lines sent end (as a feed's ``seen``: the live lines at or before it in
        the journal's order are not sent again), whether the journal no longer
        holds the cursor's entry, and the lines after it. From the kept lines
        when they hold the cursor's entry (no wait), else from ``journalctl
        --cursor`` (see the module's text): its entries are told from the
        reader's by their place in the journal, not by what the reader has read
        so far, which may be behind or ahead of them.
        CommandError ``bad cursor`` for a cursor that is not a journal's, or
        one journalctl cannot seek to."""
        if not isinstance(cursor, JournalCursor):
            raise CommandError("bad cursor")
        numbers = self._numbers()
        for number, suffix in reversed(numbers):
            if suffix == cursor.suffix:
                return None, False, self._kept_after(number, pattern, shape, limit)
        # every caller subscribed before its read starts (NextFlight): none misses a line
        key = (cursor.suffix, None if pattern is None else pattern.source, shape.json, shape.name, limit)
        lost, last, lines = self._history.run(key, self._read_from, cursor, pattern, shape, limit)
        return (None if last is None else (None, Position(last))), lost, lines

    def cursor(self, log: str, tag: object, where: object, raw: bytes, cut: int) -> str | None:
        suffix = where.suffix if isinstance(where, Position) else None
        return None if suffix is None else journal_cursor(log, suffix)

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
        # the next journalctl starts at an entry: a line the last one left
        # unfinished (it was killed, it crashed) is printed again, whole
        reader.splitter = LineSplitter()
        if self._last_cursor is not None:
            # on after the last entry read: what was written meanwhile is sent, not lost
            reader.backlog = False
            return True
        # it prints its backlog again: remembered anew, never sent
        reader.ready.clear()
        reader.settled.clear()
        self.recent.clear()
        self._cursors.clear()
        # (an empty journal: the backlog ends when its output pauses, as when not known)
        self._backlog_end = self._newest_entry()
        return True

    def _journalctl(self, *args: str) -> list[str]:
        argv = ["journalctl", *args, "--output", "json", "--all", "--no-pager", "--quiet", "--merge"]
        return argv + ["--directory", self.directory] if self.directory else argv

    def _ensure_reader(self) -> None:
        with self._starting:
            if self._reader is None:
                self._backlog_end = self._newest_entry()
                reader = Reader(self, backlog=True)
                reader.start()
                self._reader = reader
                if self._backlog_end == (True, None):
                    reader.backlog_over()  # an empty journal: whatever it prints is new

    def _newest_entry(self) -> tuple[bool, str | None]:
        """Whether ``journalctl --lines 1`` told the newest entry, and its cursor
        (None: the journal is empty). The reader's backlog ends at that entry;
        when it is not known (journalctl failed, or took more than the command
        timeout) the backlog ends when the reader's output pauses."""
        try:
            proc = self.children.start(self._journalctl("--lines", "1"))
        except OSError:
            return False, None
        status, out = None, b""
        try:
            with gevent.Timeout(self.command_timeout, False):
                out = proc.stdout.read()
                status = proc.wait()
        finally:
            self.children.stop(proc)
        if status != 0:
            return False, None
        entries = out.splitlines()
        if not entries:
            return True, None
        cursor = decode_entry(entries[-1], 0)[0]
        return cursor is not None, cursor

    def _numbers(self) -> list[tuple[int, str | None]]:
        """(number, cursor suffix) of each kept line, oldest first."""
        lines, first = self.recent.numbered()
        return list(zip(range(first, first + len(lines)), self._cursors))

    def _cursor_of(self, shape: Shape):
        first = self.recent.numbered()[1]
        cursors = list(self._cursors)

        def cursor(number: int) -> str | None:
            suffix = cursors[number - first]
            return None if suffix is None else journal_cursor(shape.name, suffix)
        return cursor

    def _kept(self, count: int, pattern: Pattern | None, shape: Shape, limit: int) -> list[bytes]:
        return recent_block(self.recent, count, pattern, shape, limit, self._cursor_of(shape))

    def _kept_after(self, number: int, pattern: Pattern | None, shape: Shape, limit: int) -> list[bytes]:
        return recent_after(self.recent, number, pattern, shape, limit, self._cursor_of(shape))

    def _read_from(self, after: JournalCursor, pattern: Pattern | None, shape: Shape,
                   limit: int) -> tuple[bool, str | None, list[bytes]]:
        """The entries from the entry of ``after`` on, read by one ``journalctl
        --cursor`` once one of the HISTORY_READS slots is free: whether that
        entry is gone, journald's cursor of the last entry printed, and the
        lines after the cursor's line that match, shaped, the newest ``limit``
        bytes of them (the rest left out). CommandError when no slot is free
        within the command timeout, or the read takes longer."""
        timeout = CommandError(f"follow timed out after {self.command_timeout:g} s")
        if not self._history_slots.acquire(timeout=self.command_timeout):
            raise timeout
        try:
            return self._journalctl_from(after, pattern, shape, limit, timeout)
        finally:
            self._history_slots.release()

    def _journalctl_from(self, after: JournalCursor, pattern: Pattern | None, shape: Shape, limit: int,
                         timeout: CommandError) -> tuple[bool, str | None, list[bytes]]:
        journald = after.journald
        try:
            proc = self.children.start(self._journalctl("--cursor", journald))
        except OSError as exc:
            raise CommandError(f"cannot read the log '{self.source}': {exc.strerror or exc}") from None
        newest = _Newest(limit)
        first: str | None = None
        last: str | None = None
        splitter = LineSplitter()
        try:
            with gevent.Timeout(self.command_timeout, timeout):
                while chunk := proc.stdout.read(65536):
                    for raw, cut, _end in splitter.feed_lines(chunk, 0):
                        cursor, shown = decode_entry(raw, cut)
                        skip = 0
                        if first is None:
                            first = cursor or ""
                            if cursor == journald:  # the cursor's own entry: its lines up to the cursor's were sent
                                skip = len(shown) if after.line is None else after.line + 1
                        last = cursor or last
                        for line, suffix in list(zip(shown, line_suffixes(cursor, len(shown))))[skip:]:
                            if pattern is None or pattern.matches(line):
                                newest.add(shape.line(line, 0, journal_cursor(shape.name, suffix) if suffix else None))
                status = proc.wait()
                error = proc.stderr.read().decode("utf-8", "replace").strip()
        finally:
            self.children.stop(proc)
        if status != 0 and first is None:
            if "cursor" in error.lower():
                raise CommandError("bad cursor")
            raise CommandError(f"cannot read the log '{self.source}': {error or f'status {status}'}")
        return first != journald, last, capped(reversed(newest.lines), newest.left_out, limit, shape.left_out)
