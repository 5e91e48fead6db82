"""The reader processes of the logs: ``tail -f`` and ``journalctl --follow``, each
read in chunks, reported to its owner (a log) and started again when it exits.

Used by :mod:`gcmd.logs.readers`, whose docstring tells the design. A
:class:`Reader` runs in the hub; :class:`Children` starts, stops and reaps
the processes of one log.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Protocol

import gevent
import gevent.event
from gevent import subprocess

from gcmd.flight import outcome, unwrap
from gcmd.logs.lines import LineSplitter, wire_line
from gcmd.net.wire import CommandError

log = logging.getLogger(__name__)

#: bytes per read of a reader's output
CHUNK = 65536
#: seconds before a reader that exited is started again: doubling from first to most
#: (0.1, 0.2, 0.4 ... 204.8, then every 5 minutes while it keeps failing)
BACKOFF_FIRST, BACKOFF_MOST = 0.1, 300.0
#: a reader that ran this many seconds is well again: its next restart waits BACKOFF_FIRST
STABLE = 10.0
#: journal: the backlog is over after this many quiet seconds, or this many without output
JOURNAL_QUIET, JOURNAL_SETTLE = 0.2, 1.0

#: the package that brings each reader program (Debian's names), for the words
#: said when it is not installed
PROGRAM_PACKAGES = {"tail": "coreutils", "journalctl": "systemd"}


def cannot_start(program: str, exc: OSError) -> str:
    """Why ``program`` could not be started, in words naming it: ``cannot start
    journalctl: not found (install systemd)`` rather than the bare errno text."""
    if isinstance(exc, FileNotFoundError):
        package = PROGRAM_PACKAGES.get(program)
        return f"cannot start {program}: not found" + (f" (install {package})" if package else "")
    return f"cannot start {program}: {exc.strerror or exc}"


def restart_delays() -> Iterator[float]:
    """Seconds to wait before each restart of a reader that keeps failing: from
    BACKOFF_FIRST, doubling, at most BACKOFF_MOST."""
    delay = BACKOFF_FIRST
    while True:
        yield delay
        delay = min(delay * 2, BACKOFF_MOST)


class Children:
    """The reader processes of one log: each stopped and reaped here, all of them at close()."""

    def __init__(self) -> None:
        self._procs: set[subprocess.Popen] = set()
        self._starting: set[gevent.Greenlet] = set()
        self.closed = False

    def start(self, argv: list[str]) -> subprocess.Popen:
        """``argv`` in a process group of its own, stdout and stderr piped; raises OSError."""
        if self.closed:
            raise OSError("the log is closed")
        # Popen waits (cooperatively) for the exec to succeed; cancelled there
        # it would leave a running child behind. So it runs in a greenlet of
        # its own, and a child that arrives after its caller left is stopped.
        starter = gevent.spawn(outcome, self._popen, argv)
        self._starting.add(starter)
        starter.rawlink(self._starting.discard)
        try:
            return unwrap(starter.get())
        except BaseException:
            starter.link_value(self._stop_late)
            raise

    def _popen(self, argv: list[str]) -> subprocess.Popen:
        # the readers' messages in English: tail's "file truncated" is recognised
        env = {**os.environ, "LC_ALL": "C.UTF-8"}
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0, close_fds=True,
                                start_new_session=True, env=env)
        self._procs.add(proc)
        return proc

    def _stop_late(self, starter: gevent.Greenlet) -> None:
        ok, proc = starter.value
        if ok:
            gevent.spawn(self.stop, proc)

    def stop(self, proc: subprocess.Popen) -> None:
        """Kill the process group if it still runs, reap it, close its pipes."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # the child watcher reaps it; this wait must not be cut short
            with gevent.Timeout(5, False):
                proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        self._procs.discard(proc)

    def close(self) -> None:
        self.closed = True
        gevent.joinall(list(self._starting), timeout=5)
        for proc in list(self._procs):
            self.stop(proc)


class ReaderOwner(Protocol):
    """The log a :class:`Reader` reads for."""

    source: str
    children: Children
    stats: object

    def argv(self, reader: Reader) -> list[str]:
        """The command that reads, for ``reader``'s next start."""

    def restartable(self, reader: Reader) -> bool:
        """Whether ``reader`` may start again now (it exited); may adjust it."""

    #: whether a feed wants the raw lines (see Broadcast.subscribe_lines)
    wants_lines: bool

    def publish(self, reader: Reader, wire: list[bytes | None], backlog: bool,
                lines: list[tuple[bytes, int, int]] | None = None) -> None:
        """New lines from ``reader``: remembered when needed, sent unless ``backlog``;
        ``lines``: their (raw, cut, end), when ``wants_lines``."""


class Reader:
    """One reader process over one source, read in chunks and started again when it exits.

    ``backlog``: the process first prints old lines (journalctl's last
    1000); they are only remembered, and :attr:`ready` is set when its output
    pauses. Otherwise :attr:`ready` is set at its first output.

    A reader that exits, or cannot be started again, is warned about once;
    while it fails again without output in between, the repeats go to the
    debug level, with the back-off doubling up to BACKOFF_MOST seconds.
    """

    def __init__(self, owner: ReaderOwner, identity: tuple[int, int] | None = None,
                 regular: bool = False, offset: int = 0, backlog: bool = False) -> None:
        self.owner = owner
        #: (device, inode) of the file it reads; None for the journal
        self.identity = identity
        self.regular = regular
        #: the next byte of the file to read: where a restart goes on from
        self.position = offset
        self.backlog = backlog
        self.splitter = LineSplitter()
        self.ready = gevent.event.Event()
        #: set with ready, or when the process exits before it
        self.settled = gevent.event.Event()
        #: the last message of the process on stderr
        self.last_error = ""
        self.retiring = False
        #: time.monotonic() of its last output
        self.last_output = 0.0
        #: exits in a row without output in between: the repeats of a failure are
        #: logged at debug level, so that a source that stays broken warns once
        self.failures = 0
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        """Start the process; a failure raises CommandError here, in the caller."""
        argv = self.owner.argv(self)
        try:
            proc = self.owner.children.start(argv)
        except OSError as exc:
            raise CommandError(f"cannot read the log '{self.owner.source}': "
                               f"{cannot_start(argv[0], exc)}") from None
        self._greenlet = gevent.spawn(self._run, proc)

    def stop(self) -> None:
        """Stop and reap the process (its greenlet's cleanup does)."""
        self.retiring = True
        if self._greenlet is not None:
            self._greenlet.kill()

    def _run(self, proc: subprocess.Popen) -> None:
        delays = restart_delays()
        while True:
            started = time.monotonic()
            status = self._pump(proc)
            if self.retiring:
                return
            if time.monotonic() - started >= STABLE:
                delays = restart_delays()
                self.failures = 0  # well again: this failure is a new one
            self.failures += 1
            delay = next(delays)
            log.log(logging.WARNING if self.failures == 1 else logging.DEBUG,
                    "the reader of the log '%s' exited with status %s%s; starting it again in %g s",
                    self.owner.source, status, self.last_error and f" ({self.last_error})", delay)
            self.last_error = self.last_error or f"its reader exited with status {status}"
            self.settled.set()
            proc = None
            while proc is None:
                gevent.sleep(delay)
                if self.retiring:
                    return
                proc = self._restart()
                if proc is None:
                    delay = next(delays)

    def _restart(self) -> subprocess.Popen | None:
        try:
            if not self.owner.restartable(self):
                return None
        except CommandError as exc:
            return self._cannot_restart(str(exc))
        argv = self.owner.argv(self)
        try:
            proc = self.owner.children.start(argv)
        except OSError as exc:
            return self._cannot_restart(cannot_start(argv[0], exc))
        self.owner.stats.reader_restarts += 1
        self.last_error = ""
        return proc

    def _cannot_restart(self, why: str) -> None:
        """Say that the reader cannot be started again (once), and why, to lastlog and follow too."""
        self.failures += 1
        log.log(logging.WARNING if self.failures == 2 else logging.DEBUG,
                "cannot start the reader of the log '%s' again: %s", self.owner.source, why)
        # what lastlog and follow say meanwhile (restartable may have cleared ready)
        self.last_error = why
        self.settled.set()

    def _pump(self, proc: subprocess.Popen) -> int | None:
        """Read the process's output until it ends; its exit status."""
        errors = gevent.spawn(self._read_errors, proc.stderr)
        try:
            output = False
            while True:
                chunk = self._read(proc.stdout, output)
                if chunk is None:  # a pause: the backlog is over
                    self._set_ready()
                    continue
                if not chunk:
                    errors.join(1)  # its last words, for the warning
                    return proc.wait()
                output = True
                self.last_output = time.monotonic()
                self.position += len(chunk)
                backlog = self.backlog and not self.ready.is_set()
                if not backlog:  # new lines: it works (a backlog is printed by a reader that dies after)
                    self.failures = 0
                if not self.backlog:
                    self._set_ready()
                self._publish(chunk, backlog)
        finally:
            errors.kill()
            self.owner.children.stop(proc)

    def _publish(self, chunk: bytes, backlog: bool) -> None:
        """Hand the lines ``chunk`` completes to the owner; an error of the owner's
        is logged and the reader goes on (one bad entry must not stop a log)."""
        try:
            if self.owner.wants_lines:
                lines = self.splitter.feed_lines(chunk, self.position - len(chunk))
                wire = [wire_line(raw, cut) for raw, cut, _end in lines]
                self.owner.publish(self, wire, backlog, lines)
            else:
                self.owner.publish(self, self.splitter.feed(chunk), backlog)
        except Exception:
            log.exception("the lines of the log '%s' could not be taken; reading on", self.owner.source)

    def backlog_over(self) -> None:
        """The owner saw the backlog's last line: what the process prints next is new."""
        self._set_ready()

    def _set_ready(self) -> None:
        self.ready.set()
        self.settled.set()

    def _read(self, pipe, output: bool) -> bytes | None:
        if not self.backlog or self.ready.is_set():
            return pipe.read(CHUNK)
        with gevent.Timeout(JOURNAL_QUIET if output else JOURNAL_SETTLE, False):
            return pipe.read(CHUNK)
        return None

    def _read_errors(self, pipe) -> None:
        splitter = LineSplitter()
        while chunk := pipe.read(4096):
            for line in splitter.feed(chunk):
                if line:
                    self._error(line.decode("utf-8", "replace")[:512])

    def _error(self, text: str) -> None:
        if text.endswith(": file truncated"):
            # tail reads the file again from its start; the bytes it sent since
            # may be counted before this line is seen, so a restart may repeat them
            log.info("the log '%s' was truncated; reading it from its start", self.owner.source)
            self.position = 0
            return
        self.last_error = text
        log.log(logging.DEBUG if self.failures else logging.WARNING,
                "the reader of the log '%s' says: %s", self.owner.source, text)


