"""The logs gcmd reads with processes: a file and the systemd journal (its own log: gcmd.logs.memory).

lastlog of a regular file reads the file itself for each request, in the
thread pool it is given (requests for the same number of lines that arrive
while a read is under way share the next read, which starts after them):
open, ``fstat``, then the end is read backwards in
64 KiB chunks until the newlines of the last N lines are found. When those
lines hold little (1 MiB) they come from the chunks already read; otherwise
each line is read on its own, a line longer than 64 KiB costing only its
first 64 KiB plus the scan for its start, and once the 8 MiB reply is full the
older lines only cost the bytes that say whether they are dropped. Memory
stays bounded whatever the file's size, nothing is remembered between
requests (a file rewritten in place is read again, whatever its timestamps),
and no process is started per request. A path that is not a regular file (a
FIFO) is never read in a thread: it is answered from what its reader read.

follow: every log has at most one long-lived reader process, shared by its
followers and started for the first one. For a file it is ``tail -c +OFFSET
-f -- PATH`` from the start of the file's last unfinished line, so a line that
began before the request and ends after it is sent whole; a named file (not
a descriptor on stdin, which tail polls once a second) lets tail wait with
inotify, so lines arrive within milliseconds. The output is read in 64 KiB
chunks and cut on ``\\n``; the complete lines go to every subscriber in
passes made by the log's courier greenlet (see Broadcast). A reader that
exits is started again with back-off, from the byte where it stopped.

Rotation (logrotate ``create``): the path is looked up every half second
while a reader runs; when it names another file, a reader starts on that one
from its first byte and the old reader goes on until the old file has been
quiet for DRAIN_QUIET seconds (5): an application writes to the renamed file
until it reopens its log (logrotate's postrotate signal, or its own
schedule), and a slow one loses nothing (promtail and ``tail -F`` lose those
lines: grafana/loki#8039). Truncation
(``copytruncate``) is left to tail: it sees it as it happens, through
inotify, in the process that reads, and reads the file again from its start
("file truncated" on its stderr); a restart by gcmd on top of that would send
the new lines twice. A restart after the reader died checks the size itself.
tail sees a truncation by the size only (shorter than what it read): when,
after the truncation, more bytes than the file held are written before tail
looks (one large write), the file is never seen shorter and reading goes on
at the old offset, so the first old-size bytes of the new content are not
sent and the line across the old offset is sent from there, torn. GNU tail
does the same (hpcloud/tail#145); a check by gcmd would come up to half a
second after tail sent the torn line, so it is documented instead (the
rename rotation, logrotate's ``create``, has no such case).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from time import monotonic

import gevent
import gevent.event
import gevent.lock
from gevent.threadpool import ThreadPool

from gcmd.flight import NextFlight, outcome, unwrap
from gcmd.logs.broadcast import Broadcast, LineSubscriber, Subscriber
from gcmd.logs.cursors import Cursor, FileCursor, file_cursor
from gcmd.logs.filereads import (
    Job,
    follow_backlog,
    identify,
    locate,
    query_last_lines,
    read_last_lines,
    resume_lines,
)
from gcmd.logs.lines import MAX_REPLY
from gcmd.logs.queries import Pattern, Shape, recent_block
from gcmd.logs.tailing import Children, Reader
from gcmd.net.wire import CommandError

log = logging.getLogger(__name__)

#: seconds between two checks of which file a followed path names
ROTATION_CHECK = 0.5
#: seconds without a new line, counted from the switch, after which the reader of a
#: rotated (renamed) file stops: the application may write to it until it reopens its log
DRAIN_QUIET = 5.0

#: errors of a path that names nothing readable: another --logfile is the remedy
_PATH_ERRORS = frozenset({errno.ENOENT, errno.EACCES, errno.EISDIR, errno.ENOTDIR, errno.ELOOP,
                          errno.EPERM})


class _ProcessLog(Broadcast):
    """A log read by reader processes: what FileLog and JournalLog share."""

    def __init__(self, source: str, command_timeout: float) -> None:
        super().__init__()
        self.source = source
        self.command_timeout = command_timeout
        self.children = Children()
        self._reader: Reader | None = None
        # one reader start at a time: two first followers start one reader
        self._starting = gevent.lock.Semaphore()

    def argv(self, reader: Reader) -> list[str]:
        """The command that reads, for ``reader``'s next start."""
        raise NotImplementedError

    def restartable(self, reader: Reader) -> bool:
        """Whether ``reader`` may start again now (it exited); may adjust it."""
        raise NotImplementedError

    def publish(self, reader: Reader, wire: list[bytes | None], backlog: bool,
                lines: list[tuple[bytes, int, int]] | None = None) -> None:
        """New lines from ``reader``: remembered when needed, sent unless backlog."""
        self.stats.lines_read += len(wire)
        if not reader.regular:
            self.recent.extend(wire)
        if not backlog:
            self._deliver(wire)
            if lines is not None:
                if reader.regular:
                    self._deliver_lines(lines, reader.identity)
                else:  # a FIFO, the journal: no offsets
                    self._deliver_lines([(raw, cut, None) for raw, cut, _end in lines], None)

    def _from_memory(self, count: int) -> list[bytes]:
        """lastlog from what the reader read, once it read something."""
        self._check_reader("lastlog")
        return self.recent.last(count)

    def _query_memory(self, count: int, pattern: Pattern | None, shape: Shape, limit: int) -> list[bytes]:
        """A query's lines from what the reader read (a FIFO: no cursors)."""
        self._check_reader("lastlog")
        return recent_block(self.recent, count, pattern, shape, limit)

    def _check_reader(self, command: str) -> None:
        """Wait until the reader has read something; CommandError if it failed
        first, or took more than the command timeout (``command``: for the message)."""
        reader = self._reader
        if not reader.settled.wait(self.command_timeout):
            raise CommandError(f"{command} timed out after {self.command_timeout:g} s")
        if not reader.ready.is_set():
            raise CommandError(f"cannot read the log '{self.source}': {reader.last_error}")


class FileLog(_ProcessLog):
    """A log file: lastlog reads the file, followers share one ``tail -f``."""

    def __init__(self, path: str, pool: ThreadPool, command_timeout: float) -> None:
        super().__init__(path, command_timeout)
        self.pool = pool
        #: readers of rotated files, finishing: reader -> the greenlet that stops it
        self._retiring: dict[Reader, gevent.Greenlet] = {}
        self._checker: gevent.Greenlet | None = None
        #: lastlog reads by line count: requests that arrive during a read share the next one
        self._reads = NextFlight()
        #: the same for the queries (1.2), by what they ask
        self._queries = NextFlight()
        #: the errno of the last failure to read the file the operator was warned of
        self._told: int | None = None

    def start(self) -> None:
        """Warn at start-up when the file cannot be read (lastlog says why, later)."""
        try:
            self._call(locate, "the log file check")
        except CommandError as exc:
            if self._told is None:  # a timeout: the OSErrors are told already
                log.warning("%s", exc)

    def lastlog(self, count: int) -> list[bytes]:
        """The lastlog block of the last ``count`` lines; CommandError when it cannot be read."""
        try:
            lines = self._reads.run(count, self._call, read_last_lines, "lastlog", count,
                                    timeout=self.command_timeout)
        except TimeoutError:  # the read under way and this one took too long together
            raise CommandError(f"lastlog timed out after {self.command_timeout:g} s") from None
        if lines is not None:
            return lines
        self._follow_path()  # not a regular file: what its reader read
        return self._from_memory(count)

    def query(self, count: int, pattern: Pattern | None, shape: Shape, limit: int = MAX_REPLY) -> list[bytes]:
        """The lines of this log in a lastlog block of a query (see query_last_lines),
        read in the pool (queries asking the same that arrive during a read share
        the next one, as lastlog); CommandError when the file cannot be read."""
        # the queries that ask the same, arriving while a read is under way, share the next one
        key = (count, None if pattern is None else pattern.source, shape.json, shape.name, limit)
        try:
            lines = self._queries.run(key, self._call, query_last_lines, "lastlog", count, pattern, shape, limit,
                                      timeout=self.command_timeout)
        except TimeoutError:
            raise CommandError(f"lastlog timed out after {self.command_timeout:g} s") from None
        if lines is not None:
            return lines
        self._follow_path()  # not a regular file: what its reader read
        return self._query_memory(count, pattern, shape, limit)

    def subscribe(self, callback: Subscriber) -> None:
        """Follow the file; CommandError when it cannot be read or followed now."""
        self._follow_path()
        super().subscribe(callback)

    def subscribe_lines(self, callback: LineSubscriber) -> None:
        """Follow the file for a feed; CommandError when it cannot be read or followed now."""
        self._follow_path()
        super().subscribe_lines(callback)

    def backlog(self, count: int, pattern: Pattern | None, shape: Shape,
                limit: int = MAX_REPLY) -> tuple[tuple[tuple[int, int], int] | None, list[bytes]]:
        """A follow's backlog, read after subscribe_lines: where it ends, (device,
        inode) and the offset of its last ``\\n`` (None for a FIFO: from what the
        reader read), and its lines (see follow_backlog)."""
        if not self._reader.regular:  # at once, from what its reader read (no wait: see the feed)
            return None, self._query_memory(count, pattern, shape, limit)
        read = self._call(follow_backlog, "follow", count, pattern, shape, limit)
        if read is None:  # a FIFO now at the path: its reader starts
            return None, []
        identity, end, lines = read
        return (identity, end), lines

    def resume(self, cursor: Cursor, pattern: Pattern | None, shape: Shape, limit: int = MAX_REPLY,
               ) -> tuple[tuple[tuple[int, int], int] | None, bool, list[bytes]]:
        """A follow resumed after ``cursor``, read after subscribe_lines: where its lines
        end (as backlog), whether the file no longer holds the cursor's line, and
        the lines (see resume_lines). CommandError ``bad cursor`` for a cursor
        that is not a file's."""
        if not isinstance(cursor, FileCursor):
            raise CommandError("bad cursor")
        if not self._reader.regular:  # a FIFO holds no line a cursor names
            return None, True, []
        read = self._call(resume_lines, "follow", cursor, pattern, shape, limit)
        if read is None:
            return None, True, []
        identity, end, lost, lines = read
        return (identity, end), lost, lines

    def cursor(self, log: str, tag: object, where: int | None, raw: bytes, cut: int) -> str | None:
        return None if tag is None else file_cursor(log, tag, where, raw, cut)

    def close(self) -> None:
        """Stop every reader process and reap it."""
        if self._checker is not None:
            self._checker.kill()
        for reader, stopper in list(self._retiring.items()):
            stopper.kill()
            reader.stop()
        if self._reader is not None:
            self._reader.stop()
        self.children.close()
        self.stop_delivery()

    def argv(self, reader: Reader) -> list[str]:
        offset = reader.position if reader.regular else 0
        return ["tail", "-c", f"+{offset + 1}", "-f", "--", self.source]

    def restartable(self, reader: Reader) -> bool:
        identity, regular, size = self._call(identify, "the reader restart")
        if identity != reader.identity:
            return False  # another file now: the rotation check switches to it
        if regular and size < reader.position:
            reader.position = 0  # truncated while no reader ran
        return True

    def _follow_path(self) -> None:
        """Have a reader on the file the path names now."""
        with self._starting:
            identity, regular, offset = self._call(locate, "follow")
            if self._reader is None:
                self._switch(Reader(self, identity, regular, offset))
                self._checker = gevent.spawn(self._check_rotation)
            elif self._reader.identity != identity:
                self._switch(Reader(self, identity, regular))

    def _check_rotation(self) -> None:
        while True:
            gevent.sleep(ROTATION_CHECK)
            try:
                with self._starting:
                    identity, regular, _size = self._call(identify, "the rotation check")
                    if identity != self._reader.identity:
                        log.info("the log '%s' names another file: following it from its start", self.source)
                        self._switch(Reader(self, identity, regular))
            except CommandError as exc:
                log.debug("%s", exc)

    def _switch(self, reader: Reader) -> None:
        """Make ``reader`` the current reader; the old one stops once its file has been
        quiet for DRAIN_QUIET seconds."""
        reader.start()
        old, self._reader = self._reader, reader
        if old is not None:
            self._retiring[old] = gevent.spawn(self._retire, old)

    def _retire(self, reader: Reader) -> None:
        switched = monotonic()
        while (quiet := monotonic() - max(switched, reader.last_output)) < DRAIN_QUIET:
            gevent.sleep(DRAIN_QUIET - quiet)
        reader.stop()
        del self._retiring[reader]

    def _call(self, fn: Callable, what: str, *args):
        """``fn(path, *args, job)`` in the pool, waited for at most the command timeout."""
        job = Job()
        result = None
        try:
            with gevent.Timeout(self.command_timeout, False):
                result = self.pool.spawn(outcome, fn, self.source, *args, job)
                result.wait()
        finally:
            if result is None or not result.ready():
                job.cancelled = True
        if result is None or not result.ready():
            raise CommandError(f"{what} timed out after {self.command_timeout:g} s")
        try:
            value = unwrap(result.get())
        except OSError as exc:
            self._tell_operator(exc)
            # which setting names the file (PROTOCOL.md), not what to do about it: that is the log's
            raise CommandError(f"cannot read the log file '{self.source}' (--logfile): "
                               f"{exc.strerror or exc}") from None
        self._told = None
        return value

    def _tell_operator(self, exc: OSError) -> None:
        """Warn that the file cannot be read, once until it can be again or the
        error changes; where the path is the problem, say how to serve another.
        The client gets the error alone: the remedy is the operator's."""
        if exc.errno == self._told:
            return
        self._told = exc.errno
        hint = (" (start gcmd with --logfile PATH to serve another log)"
                if exc.errno in _PATH_ERRORS else "")
        log.warning("cannot read the log file '%s': %s%s", self.source, exc.strerror or exc, hint)
