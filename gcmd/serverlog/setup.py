"""The server log: how its lines reach the handlers, and --output.

Only gcmd.process.run calls ``setup_logging``; the rest of gcmd logs through
``logging.getLogger(__name__)`` and names what a line is about in the
``context`` extra (``Session,42,127.0.0.1``).

At the default level every request is a log line, so its way is kept short.
``LineRun`` (the line per request; the lines of a batch of requests
together) makes no LogRecord: the parts of the
lines logged within a few milliseconds (FLUSH_AFTER) are handed together to the
handlers (LineBatch), and each gets the line its formatter makes of them,
with the code that formats a record. Every log line is handled in the hub's
thread (LineHandler): another thread's line is passed to it, so each handler
sees the lines in the order the hub logged them. The lines themselves are
made by the formatters of gcmd.serverlog.formats; the output is a LogOutput
(gcmd.serverlog.output), written by a thread of its own.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

import gevent

from gcmd.serverlog.formats import (
    BATCHED_LEVELS,
    JsonFormatter,
    LineFormatter,
    Part,
    TextFormatter,
)

log = logging.getLogger(__name__)

_INFO = logging.INFO

#: seconds the lines of LineRuns wait to be handed to the handlers together: at a line
#: per request, the handlers' work is done once for hundreds of requests, not for each
FLUSH_AFTER = 0.005

#: the batches of LineRun's lines, by logger name. Like the logging tree they follow, they are the
#: process's; none holds a line more than FLUSH_AFTER seconds.
_batches: dict[str, LineBatch] = {}


def line_run(logger: logging.Logger, level: int, head: str, extra: dict[str, str]) -> LineRun | None:
    """Lines ``head + tail`` to log one after the other (``LineRun.add``), or None
    when ``logger`` does not log at ``level``: see LineRun. ``extra``: the
    ``context``, and the ``client_cn`` of a client that showed a certificate
    (read when the lines are made, within FLUSH_AFTER seconds)."""
    if not logger.isEnabledFor(level):
        return None
    return LineRun(_batches.get(logger.name) or _new_batch(logger), level, head, extra)


class LineRun:
    """Lines that start alike, logged in a row: the line per request of a batch
    (16 pipelined requests, 16 lines).

    ``add(tail)`` is ``logger.log(level, head + tail, extra=extra)``
    (``head`` and the tails used as they are: no ``%`` formatting) without
    a LogRecord, when it can. In the hub's thread, at INFO or DEBUG, the
    line waits in the logger's LineBatch, at most FLUSH_AFTER seconds; the
    lines added with nothing logged between them are one part of it: the
    start of the line is made once for all, and the time stamp is that of
    the first (the others were logged at most FLUSH_AFTER seconds later). In
    another thread, or at another level, the record goes the usual way at
    once. A LineRun is used in the thread that made it.
    """

    __slots__ = ("batch", "extra", "head", "level", "tails")

    def __init__(self, batch: LineBatch, level: int, head: str, extra: dict[str, str]) -> None:
        self.batch = batch
        self.level = level
        self.head = head
        self.extra = extra
        #: the tails of this run's part while it is the last of the batch
        self.tails: list[str] | None = None

    def add(self, tail: str) -> None:
        tails = self.tails
        if tails is not None and tails is self.batch.run:
            tails.append(tail)
            return
        tails = [tail]
        batch = self.batch
        if batch.add(self.level, self.head, tails, self.extra):
            self.tails = tails
        else:
            batch.logger.log(self.level, self.head + tail, extra=self.extra)


def _new_batch(logger: logging.Logger) -> LineBatch:
    batch = _batches[logger.name] = LineBatch(logger)
    return batch


def info_line(logger: logging.Logger, msg: str, *args, always: bool = False) -> None:
    """``logger.info(msg, *args)``; ``always``: whatever the level (``--quiet``), for
    a line that is the only place naming what was chosen at start, such as the
    port of ``--port 0``."""
    if not always or logger.isEnabledFor(_INFO):
        logger.info(msg, *args)
    else:  # still an info line, not a warning: handed to the handlers past the level check
        logger.handle(logger.makeRecord(logger.name, _INFO, "(unknown file)", 0, msg, args, None))


def flush_lines() -> None:
    """Hand the batched lines to their handlers (in the hub's thread; else nothing):
    before any other line reaches a handler, so that each sees the lines in the order logged."""
    for batch in _batches.values():
        if batch.lines and batch.thread == threading.get_ident():
            batch.flush()


class LineBatch:
    """LineRun's lines from one logger, in the hub's thread, handed to the handlers
    together FLUSH_AFTER seconds after the first (or before any other line
    reaches them): the handlers the logger reaches then get the lines their
    formatters make, or, if one of them cannot take lines, the records.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        #: the hub's thread and loop, those of the handlers the first line reached
        self.thread: int | None = None
        self.loop = None
        #: the hub's timer that flushes
        self.timer = None
        #: the lines waiting
        self.lines: list[Part] = []
        #: the lowest level among them (INFO when none is below)
        self.lowest = _INFO
        #: the tails of the last part, when it is a LineRun's
        self.run: list[str] | None = None

    def add(self, level: int, head: str, tails: list[str], extra: dict[str, str]) -> bool:
        """Batch the lines of a run as one part, the last; False when they go the usual
        way (another thread, a level not batched)."""
        if level not in BATCHED_LEVELS or (threading.get_ident() != self.thread and not self._bind(level)):
            return False
        if not self.lines:
            # again, with the loop's clock brought up to date: a libev timer started again keeps what
            # was left of its delay when it stopped, nothing once it has run (gevent/gevent#1890)
            self.timer.again(self.flush, update=True)
        self.lowest = min(self.lowest, level)
        self.lines.append((time.time(), level, head, tails, extra))
        self.run = tails
        return True

    def _bind(self, level: int) -> bool:
        """Take the hub of the handlers the logger reaches, if this is its thread."""
        if self.thread is not None:
            return False
        handlers = _line_handlers(self.logger, level)
        if handlers is None or handlers[0].hub_thread != threading.get_ident():
            return False
        self.thread, self.loop = handlers[0].hub_thread, handlers[0].loop
        self.timer = self.loop.timer(FLUSH_AFTER, FLUSH_AFTER)  # flush stops it: it runs once a batch
        return True

    def flush(self) -> None:
        """Give the handlers the lines their formatters make (in the hub's thread)."""
        self.timer.stop()
        lines, self.lines, self.run = self.lines, [], None
        lowest, self.lowest = self.lowest, _INFO
        if not lines:
            return
        handlers = _line_handlers(self.logger, lowest)
        if handlers is None or any(handler.hub_thread != self.thread for handler in handlers):
            self._replay(lines)
            return
        made: dict[type, list[str]] = {}
        for handler in handlers:
            formatter = handler.formatter
            texts = made.get(formatter.__class__)
            if texts is None:
                texts = made[formatter.__class__] = formatter.batch_lines(self.logger.name, lines)
            if handler.level > lowest:  # it takes some of them only
                texts = [text for text, part in zip(texts, lines) if part[1] >= handler.level]
                if not texts:
                    continue
            handler.emit_texts(texts)

    def _replay(self, lines: list[Part]) -> None:
        logger = self.logger
        for created, level, head, tails, extra in lines:
            for tail in tails:
                record = logger.makeRecord(logger.name, level, "(unknown file)", 0, head + tail, (), None,
                                           extra=extra)
                record.created = created
                logger.handle(record)


def _line_handlers(logger: logging.Logger, level: int) -> list[LineHandler] | None:
    """The handlers a record at INFO, or at ``level`` (not above INFO), from
    ``logger`` reaches, as Logger.callHandlers finds them, when each takes
    lines; else None."""
    if logger.filters or not logger.isEnabledFor(level):
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
    """A handler that does its work in the hub's thread (the one that makes it):
    a record logged in another thread is formatted there and its line passed to
    the hub. It takes the lines of LineBatch (``emit_texts``) while it
    has a LineFormatter and no filter (``takes_text``).
    """

    #: whether a LineBatch may give it lines, kept up to date by the methods below
    takes_text = False

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.hub_thread = threading.get_ident()
        self.loop = gevent.get_hub().loop

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own policy: report, never raise
            self.handleError(record)
            return
        if threading.get_ident() == self.hub_thread:
            self._emit_in_hub(text)
        else:
            self.loop.run_callback_threadsafe(self._emit_in_hub, text)

    def _emit_in_hub(self, text: str) -> None:
        flush_lines()  # the batched lines logged before come first
        self.emit_texts([text])

    def emit_texts(self, texts: list[str]) -> None:
        """Lines its formatter made, oldest first, in the hub's thread (a text may hold several lines)."""
        raise NotImplementedError

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        self._update_takes_text()

    def addFilter(self, filter) -> None:
        super().addFilter(filter)
        self._update_takes_text()

    def removeFilter(self, filter) -> None:
        super().removeFilter(filter)
        self._update_takes_text()

    def _update_takes_text(self) -> None:
        self.takes_text = isinstance(self.formatter, LineFormatter) and not self.filters


def open_output(path: str | None) -> TextIO:
    """Standard output, or ``path`` opened for appending; OSError if it cannot be."""
    return sys.stdout if path is None else open(path, "a", buffering=1 << 16, encoding="utf-8")


def setup_logging(level: str, fmt: str, output: TextIO | None = None, *, batched: bool = True,
                  context: str = "-", shared: bool = False) -> logging.Handler:
    """Log gcmd's events at ``level`` and above to ``output`` (standard output by default).

    ``fmt`` is ``text`` or ``json``; ``batched``: written by a LogOutput in a
    thread of its own (a gevent process only), else at once;
    ``context`` is that of the lines logged without one; ``shared``: other
    processes write to the output too (see LogOutput). Returns the
    handler, for reopen_output.
    """
    # what a log line says needs none of these, and each costs time per record
    # (the logging HOWTO's "Optimization" section)
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    from gcmd.serverlog import output as logoutput  # it builds on this module

    output = output or sys.stdout
    if batched:
        handler = logoutput.LogOutput(output, shared=shared)
    else:
        handler = (logoutput.SharedStreamHandler if shared else logging.StreamHandler)(output)
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
    from gcmd.serverlog.output import LogOutput

    if isinstance(handler, LogOutput):
        handler.switch_to(output)
    else:
        handler.flush()
        handler.setStream(output).close()
