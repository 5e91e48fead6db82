"""The server log: its text and JSON lines, a handler that batches writes, and --output.

Only gcmd.lifecycle calls ``setup_logging``; the rest of gcmd logs through
``logging.getLogger(__name__)`` and names what a line is about in the
``context`` extra (``Session,42,127.0.0.1``).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import TextIO

import gevent

log = logging.getLogger(__name__)


class TextFormatter(logging.Formatter):
    """``2011-08-29 13:32:35+0200 [context] message``, as the tutorial's Twisted log.

    ``context`` is that of a line logged without one: ``-``, or the worker's.
    """

    def __init__(self, context: str = "-") -> None:
        super().__init__()
        self.context = context
        self._second = None
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S%z", time.localtime(second))
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname}: {message}"
        line = f"{self._stamp} [{getattr(record, 'context', self.context)}] {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; whatever a client sent stays inside one string.

    The lines of a client that showed a certificate carry its CN as ``client_cn``.
    """

    def __init__(self, context: str = "-") -> None:
        super().__init__()
        self.context = context

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.created)),
            "level": record.levelname.lower(),
            "context": getattr(record, "context", self.context),
            "logger": record.name,
            "message": record.getMessage(),
        }
        client_cn = getattr(record, "client_cn", None)
        if client_cn is not None:
            event["client_cn"] = client_cn
        if record.exc_info:
            event["traceback"] = self.formatException(record.exc_info)
        return json.dumps(event)


class BatchedStreamHandler(logging.StreamHandler):
    """Writes the log lines of one event-loop iteration with one system call.

    At the default level every request is a log line; writing and flushing
    each one would cost a system call per request.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._scheduled = False
        self._hub_thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own policy: report, never raise
            self.handleError(record)
            return
        self._lines.append(line)
        if threading.get_ident() != self._hub_thread:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            gevent.get_hub().loop.run_callback(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._lines:
            text = "\n".join(self._lines) + "\n"
            self._lines.clear()
            self.stream.write(text)
        super().flush()


def open_output(path: str | None) -> TextIO:
    """Standard output, or ``path`` opened for appending; OSError if it cannot be."""
    return sys.stdout if path is None else open(path, "a", buffering=1 << 16, encoding="utf-8")


def setup_logging(level: str, fmt: str, output: TextIO | None = None, *, batched: bool = True,
                  context: str = "-") -> logging.StreamHandler:
    """Log gcmd's events at ``level`` and above to ``output`` (standard output by default).

    ``fmt`` is ``text`` or ``json``; ``batched`` writes once per event-loop
    iteration (a gevent process only); ``context`` is that of the lines
    logged without one. Returns the handler, for reopen_output.
    """
    # what a log line says needs none of these, and each costs time per record
    # (the logging HOWTO's "Optimization" section)
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = (BatchedStreamHandler if batched else logging.StreamHandler)(output or sys.stdout)
    handler.setFormatter(JsonFormatter(context) if fmt == "json" else TextFormatter(context))
    root = logging.getLogger("gcmd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    return handler


def reopen_output(handler: logging.StreamHandler, path: str | None) -> None:
    """Write the log to a fresh open of --output ``path`` (after logrotate moved the file).

    Standard output is left alone; a file that cannot be opened is logged and
    the old one kept.
    """
    if path is None:
        return
    handler.flush()
    try:
        output = open_output(path)
    except OSError as exc:
        log.error("SIGHUP: cannot reopen --output %s: %s; still writing to the old file",
                  path, exc.strerror)
    else:
        handler.setStream(output).close()
