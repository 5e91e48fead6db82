"""The server log: its text and JSON lines, the output that never stalls the hub, and --output.

Only gcmd.lifecycle calls ``setup_logging``; the rest of gcmd logs through
``logging.getLogger(__name__)`` and names what a line is about in the
``context`` extra (``Session,42,127.0.0.1``).

At the default level every request is a log line, so its way to the output
is kept short. ``fast_info`` gives the handlers that would see the record
the line's parts instead of a LogRecord, when each of them can take them
(``emit_text``: the output and the ``gcmd`` log); their formatters make one
line from a record or from its parts, with the same code. The output
(LogOutput) is written by a thread of its own: the hub only queues lines,
so a stopped reader of a pipe or a slow disk never stalls a client.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import deque
from typing import TextIO

import gevent

log = logging.getLogger(__name__)

#: characters of log lines that wait for an output that does not take them
#: (a stopped reader, a slow disk); lines past it are dropped and counted
OUTPUT_BUFFER = 4 << 20
#: seconds the output's writer lets lines gather after a write, while more arrive
WRITE_EVERY = 0.02
#: seconds a flush (shutdown, a worker's exit) waits for the output to take the queued lines
FLUSH_TIMEOUT = 5.0

_INFO = logging.INFO
#: why LogOutput drops a line that finds its queue full
FULL = "the output took no line for a while"

#: how json.dumps (ensure_ascii) writes a string, quotes included
_quote = json.encoder.encode_basestring_ascii


class LineFormatter(logging.Formatter):
    """A formatter that makes a line from a record or from its parts (``line``).

    A line depends on nothing but the parts and the formatter's class when
    the parts name a context: fast_info makes it once for handlers whose
    formatters are of one class.
    """

    def __init__(self, context: str = "-") -> None:
        super().__init__()
        #: that of a line logged without one: ``-``, or the worker's
        self.context = context
        self._stamp = (None, "")  # (second, its time stamp): one attribute, set at once

    def line(self, created: float, levelno: int, levelname: str, name: str, context: str,
             message: str, traceback: str | None = None) -> str:
        """The line of a record logged at ``created`` (seconds since the epoch)."""
        raise NotImplementedError

    def format(self, record: logging.LogRecord) -> str:
        return self.line(record.created, record.levelno, record.levelname, record.name,
                         getattr(record, "context", self.context), record.getMessage(),
                         self.formatException(record.exc_info) if record.exc_info else None)

    def stamp(self, created: float, pattern: str) -> str:
        """``created`` as local time in ``pattern``, formatted once a second."""
        second = int(created)
        cached, text = self._stamp
        if second != cached:
            text = time.strftime(pattern, time.localtime(second))
            self._stamp = (second, text)
        return text


class TextFormatter(LineFormatter):
    """``2011-08-29 13:32:35+0200 [context] message``, as the tutorial's Twisted log."""

    def line(self, created: float, levelno: int, levelname: str, name: str, context: str,
             message: str, traceback: str | None = None) -> str:
        if levelno >= logging.WARNING:
            message = f"{levelname}: {message}"
        line = f"{self.stamp(created, '%Y-%m-%d %H:%M:%S%z')} [{context}] {message}"
        return line if traceback is None else f"{line}\n{traceback}"


class JsonFormatter(LineFormatter):
    """One JSON object per line, as json.dumps writes it; whatever a client sent
    stays inside one string."""

    def line(self, created: float, levelno: int, levelname: str, name: str, context: str,
             message: str, traceback: str | None = None) -> str:
        line = (f'{{"time": {_quote(self.stamp(created, "%Y-%m-%dT%H:%M:%S%z"))}, '
                f'"level": {_quote(levelname.lower())}, "context": {_quote(context)}, '
                f'"logger": {_quote(name)}, "message": {_quote(message)}')
        return line + ("}" if traceback is None else f', "traceback": {_quote(traceback)}}}')


def fast_info(logger: logging.Logger, msg: str, *args: str, extra: dict[str, str]) -> None:
    """``logger.info(msg, *args, extra=extra)``, without a LogRecord when it can.

    Every handler the record would reach gets the line its formatter would
    make of it (made once for handlers whose formatters are of one class).
    When one of them cannot take a line (a handler of another kind, a
    filter, a formatter that is not a LineFormatter), the record goes the
    usual way. ``args``: strings; ``extra``: the ``context``.
    """
    handlers = _line_handlers(logger)
    if handlers is None:
        logger.info(msg, *args, extra=extra)
        return
    created, name, context = time.time(), logger.name, extra["context"]
    message = msg % args if args else msg
    kind = text = None
    for handler in handlers:
        formatter = handler.formatter
        if formatter.__class__ is not kind:
            kind = formatter.__class__
            text = formatter.line(created, _INFO, "INFO", name, context, message)
        handler.emit_text(text)


def _line_handlers(logger: logging.Logger) -> list[LineHandler] | None:
    """The handlers a record at INFO from ``logger`` reaches, as Logger.callHandlers
    finds them, when each takes lines; else None."""
    if logger.filters or not logger.isEnabledFor(_INFO):
        return None
    reached = []
    while logger is not None:
        for handler in logger.handlers:
            if handler.level <= _INFO:
                if not getattr(handler, "takes_text", False):
                    return None
                reached.append(handler)
        logger = logger.parent if logger.propagate else None
    return reached or None


class LineHandler(logging.Handler):
    """A handler that takes the lines fast_info makes (``emit_text``), as long as
    it has a LineFormatter and no filter (``takes_text``)."""

    #: whether fast_info may give it lines, kept up to date by the methods below
    takes_text = False

    def emit_text(self, text: str) -> None:
        """A line its formatter made of a record."""
        raise NotImplementedError

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        self._check()

    def addFilter(self, filter) -> None:
        super().addFilter(filter)
        self._check()

    def removeFilter(self, filter) -> None:
        super().removeFilter(filter)
        self._check()

    def _check(self) -> None:
        self.takes_text = isinstance(self.formatter, LineFormatter) and not self.filters


class LogOutput(LineHandler):
    """Writes the log to ``stream`` in a thread of its own: the hub never waits for it.

    The hub appends each line to a queue and goes on; the writer takes all
    that waits, writes it with one call, and lets lines gather for
    WRITE_EVERY before the next write. The queue holds at most ``limit``
    characters: a line that finds it full is dropped and counted
    (``dropped``), and once the output takes lines again, how many were
    dropped is logged. Other threads queue their lines under the lock.
    """

    def __init__(self, stream: TextIO, limit: int = OUTPUT_BUFFER) -> None:
        super().__init__()
        self.stream = stream
        self.limit = limit
        #: the lines to write, oldest first; the hub appends without the lock
        #: (a deque's append and popleft are atomic)
        self._queue: deque[str] = deque()
        # Each count below has one writer, so that no update is lost: the hub's
        # (no lock), the other threads' (under self.lock), the writer's.
        self._hub_lines = self._hub_chars = self._hub_dropped = 0
        self._other_lines = self._other_chars = self._other_dropped = 0
        self._done_lines = self._done_chars = self._lost = self._reported = 0
        #: why lines were last dropped
        self._cause = ""
        self._hub_thread = threading.get_ident()
        self._scheduled = False  # the hub wakes the writer at the end of its iteration
        # under self.lock:
        #: streams to write to from then on (reopen): (lines queued before, stream)
        self._switches: list[tuple[int, TextIO]] = []
        self._writing = False  # the writer is awake; else the hub wakes it for a new line
        self._hurry = False  # a flush waits: the writer lets no lines gather
        self._closing = False
        self._wake = threading.Condition(self.lock)
        self._idle = threading.Condition(self.lock)
        self._writer = threading.Thread(target=self._write_loop, name="gcmd log output", daemon=True)
        self._writer.start()

    @property
    def dropped(self) -> int:
        """Lines dropped since the start: the queue was full, or the output failed."""
        return self._hub_dropped + self._other_dropped + self._lost

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own policy: report, never raise
            self.handleError(record)
            return
        self.emit_text(line)

    def emit_text(self, line: str) -> None:
        """A line its formatter made (see fast_info)."""
        size = len(line) + 1
        if threading.get_ident() != self._hub_thread:
            with self.lock:
                # the writer's own line, how many were dropped, is never dropped
                if self._waiting() + size > self.limit and threading.get_ident() != self._writer.ident:
                    self._other_dropped += 1
                    self._cause = FULL
                    return
                self._queue.append(line)
                self._other_lines += 1
                self._other_chars += size
                self._wake_writer()
            return
        if self._hub_chars + self._other_chars - self._done_chars + size > self.limit:
            self._hub_dropped += 1
            self._cause = FULL
            return
        self._queue.append(line)
        self._hub_lines += 1
        self._hub_chars += size
        # the writer marks itself idle, then looks at the queue once more: one of us sees the other
        if not self._writing and not self._scheduled:
            self._scheduled = True
            gevent.get_hub().loop.run_callback(self._hand_over)

    def _waiting(self) -> int:
        """Characters of the lines queued and not yet taken by the writer."""
        return self._hub_chars + self._other_chars - self._done_chars

    def _hand_over(self) -> None:
        # in the hub, once the iteration has logged its lines
        self._scheduled = False
        with self.lock:
            self._wake_writer()

    def _wake_writer(self, hurry: bool = False) -> None:
        # self.lock held
        if hurry:
            self._hurry = True
            self._wake.notify()
        if not self._writing:
            self._writing = True
            self._wake.notify()

    def flush(self) -> None:
        """Wait until the lines logged so far are written or dropped, at most FLUSH_TIMEOUT s."""
        with self.lock:
            target = self._hub_lines + self._other_lines
            self._wake_writer(hurry=True)
            self._idle.wait_for(lambda: self._done_lines >= target, FLUSH_TIMEOUT)

    def close(self) -> None:
        """Flush, then let the writer end (the stream stays open, as StreamHandler's)."""
        with self.lock:
            self.flush()
            self._closing = True
            self._wake_writer(hurry=True)
        super().close()

    def switch_to(self, stream: TextIO) -> None:
        """Write the lines logged from now on to ``stream``, once the earlier ones are
        written to the current stream; then close it."""
        with self.lock:
            self._switches.append((self._hub_lines + self._other_lines, stream))
            self._wake_writer(hurry=True)

    def _write_loop(self) -> None:
        while (taken := self._take()) is not None:
            lines, switches = taken
            lost, cause = self._write(lines, switches)
            self._done_lines += len(lines)
            self._done_chars += sum(map(len, lines)) + len(lines)
            report = 0
            if lost:  # reported once a write succeeds
                self._lost += lost
                self._cause = cause
            else:
                report = self.dropped - self._reported
                self._reported += report
            with self.lock:
                if self._hurry:
                    self._idle.notify_all()
                else:  # let lines gather: one wake-up and one write per WRITE_EVERY at most
                    self._wake.wait(WRITE_EVERY)
            if report:  # queued right after the lines written before the gap
                log.warning("%d log lines were dropped: %s", report, self._cause)

    def _take(self) -> tuple[list[str], list[tuple[int, TextIO]]] | None:
        """Wait for lines or a switch; the lines that wait, and the switches among them
        (index in the lines, stream); None once closing with nothing left."""
        with self.lock:
            while not (self._queue or self._switches):
                self._writing = self._hurry = False
                self._idle.notify_all()
                if self._closing:
                    return None
                if not self._queue:  # see emit_text
                    self._wake.wait()
            self._writing = True
            queue, start = self._queue, self._done_lines
            lines = [queue.popleft() for _ in range(len(queue))]
            due = [(at - start, stream) for at, stream in self._switches if at <= start + len(lines)]
            del self._switches[:len(due)]
        return lines, due

    def _write(self, lines: list[str], switches: list[tuple[int, TextIO]]) -> tuple[int, str]:
        """Write ``lines``, switching streams on the way; the lines lost, and why."""
        lost, cause, start = 0, "", 0
        for end, stream in (*switches, (len(lines), None)):
            if end > start:
                try:
                    self.stream.write("\n".join(lines[start:end]) + "\n")
                    self.stream.flush()
                except Exception as exc:  # noqa: BLE001 - any stream: count the lines, go on
                    lost, cause = lost + end - start, f"cannot write the log output: {exc}"
                start = end
            if stream is not None:
                old, self.stream = self.stream, stream
                try:
                    old.close()
                except OSError:
                    pass  # its last lines are counted above, if they were lost
        return lost, cause


def open_output(path: str | None) -> TextIO:
    """Standard output, or ``path`` opened for appending; OSError if it cannot be."""
    return sys.stdout if path is None else open(path, "a", buffering=1 << 16, encoding="utf-8")


def setup_logging(level: str, fmt: str, output: TextIO | None = None, *, batched: bool = True,
                  context: str = "-") -> logging.Handler:
    """Log gcmd's events at ``level`` and above to ``output`` (standard output by default).

    ``fmt`` is ``text`` or ``json``; ``batched``: written by a LogOutput, a
    write per event-loop iteration (a gevent process only), else at once;
    ``context`` is that of the lines logged without one. Returns the
    handler, for reopen_output.
    """
    # what a log line says needs none of these, and each costs time per record
    # (the logging HOWTO's "Optimization" section)
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = (LogOutput if batched else logging.StreamHandler)(output or sys.stdout)
    handler.setFormatter(JsonFormatter(context) if fmt == "json" else TextFormatter(context))
    root = logging.getLogger("gcmd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    return handler


def reopen_output(handler: logging.Handler, path: str | None) -> None:
    """Write the log to a fresh open of --output ``path`` (after logrotate moved the file).

    The lines logged before go to the old file. Standard output is left
    alone; a file that cannot be opened is logged and the old one kept.
    """
    if path is None:
        return
    try:
        output = open_output(path)
    except OSError as exc:
        log.error("SIGHUP: cannot reopen --output %s: %s; still writing to the old file",
                  path, exc.strerror)
        return
    if isinstance(handler, LogOutput):
        handler.switch_to(output)
    else:
        handler.flush()
        handler.setStream(output).close()
