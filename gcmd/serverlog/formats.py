"""The server log's lines: text (as the tutorial's Twisted log) and JSON.

A formatter makes a line from a record (``format``) or, for the line per
request that gcmd.serverlog.setup batches without a LogRecord, from its parts
(``batch_lines``): the same line either way.
"""

from __future__ import annotations

import json
import logging
import time

_INFO = logging.INFO

#: how json.dumps (ensure_ascii) writes a string, quotes included
_quote = json.encoder.encode_basestring_ascii


class LineFormatter(logging.Formatter):
    """A formatter that makes a line from a record or from its parts (``line``).

    A line depends on nothing but the parts and the formatter's class when
    the parts name a context: a LineBatch makes it once for handlers whose
    formatters are of one class.
    """

    #: the time stamp: a time.strftime pattern, in local time
    time_format = ""

    def __init__(self, context: str = "-") -> None:
        super().__init__()
        #: that of a line logged without one: ``-``, or the worker's
        self.context = context
        self._stamp = (None, "")  # (second, its time stamp): one attribute, set at once

    def line(self, created: float, levelno: int, levelname: str, name: str, context: str,
             message: str, traceback: str | None = None, client_cn: str | None = None,
             user: str | None = None) -> str:
        """The line of a record logged at ``created`` (seconds since the epoch);
        ``client_cn``: the CN of the client's certificate, if it showed one;
        ``user``: the user the connection is (gcmd.users), once known. The text
        line names the user in its context (``Session,4,10.0.0.7,alice``), as
        gcmd.authentication writes it there."""
        raise NotImplementedError

    def batch_lines(self, name: str, parts: list[Part]) -> list[str]:
        """The lines of records from the logger ``name`` at DEBUG or INFO, given by
        their parts (see Part; gcmd.serverlog.setup.LineRun): one text a part, its lines
        joined."""
        line = self.line
        return ["\n".join([line(created, levelno, BATCHED_LEVELS[levelno], name, extra["context"], head + tail,
                                None, extra.get("client_cn"), extra.get("user")) for tail in tails])
                for created, levelno, head, tails, extra in parts]

    def format(self, record: logging.LogRecord) -> str:
        return self.line(record.created, record.levelno, record.levelname, record.name,
                         getattr(record, "context", self.context), record.getMessage(),
                         self.formatException(record.exc_info) if record.exc_info else None,
                         getattr(record, "client_cn", None), getattr(record, "user", None))

    def stamp(self, created: float) -> str:
        """The time stamp of a line logged at ``created``, made once a second."""
        second = int(created)
        text = self.written_stamp(time.strftime(self.time_format, time.localtime(second)))
        self._stamp = (second, text)
        return text

    def written_stamp(self, stamp: str) -> str:
        """The time stamp as the line holds it."""
        return stamp


class TextFormatter(LineFormatter):
    """``2011-08-29 13:32:35+0200 [context] message``, as the tutorial's Twisted log."""

    time_format = "%Y-%m-%d %H:%M:%S%z"

    def line(self, created: float, levelno: int, levelname: str, name: str, context: str,
             message: str, traceback: str | None = None, client_cn: str | None = None,
             user: str | None = None) -> str:
        if levelno >= logging.WARNING:
            message = f"{levelname}: {message}"
        second, stamp = self._stamp  # most lines need no call
        if int(created) != second:
            stamp = self.stamp(created)
        line = f"{stamp} [{context}] {message}"
        return line if traceback is None else f"{line}\n{traceback}"

    def batch_lines(self, name: str, parts: list[Part]) -> list[str]:
        # line(), for many lines below WARNING at once: the line per request;
        # the lines of a run share their start, made once
        lines = []
        second, stamp = self._stamp
        for created, _, head, tails, extra in parts:
            if int(created) != second:
                second, stamp = int(created), self.stamp(created)
            start = f"{stamp} [{extra['context']}] {head}"
            # one line (the others logged in between): no separator to make
            lines.append(start + tails[0] if len(tails) == 1 else start + ("\n" + start).join(tails))
        return lines


class JsonFormatter(LineFormatter):
    """One JSON object per line, as json.dumps writes it; whatever a client sent
    stays inside one string.

    The lines of a client that showed a certificate carry its CN as ``client_cn``,
    and those of a connection that is a user its name as ``user``.
    """

    time_format = "%Y-%m-%dT%H:%M:%S%z"

    def line(self, created: float, levelno: int, levelname: str, name: str, context: str,
             message: str, traceback: str | None = None, client_cn: str | None = None,
             user: str | None = None) -> str:
        second, stamp = self._stamp
        if int(created) != second:
            stamp = self.stamp(created)
        line = (f'{{"time": {stamp}, "level": {_quote(levelname.lower())}, "context": {_quote(context)}, '
                f'"logger": {_quote(name)}, "message": {_quote(message)}')
        if client_cn is not None:
            line += f', "client_cn": {_quote(client_cn)}'
        if user is not None:
            line += f', "user": {_quote(user)}'
        return line + ("}" if traceback is None else f', "traceback": {_quote(traceback)}}}')

    def batch_lines(self, name: str, parts: list[Part]) -> list[str]:
        # line(), for many lines below WARNING at once: the logger's name and the
        # levels are quoted once, the context and the message of each line; the
        # lines of a run share their start (a JSON string quoted in two parts is
        # the string quoted whole: each character is escaped on its own)
        lines = []
        second, stamp = self._stamp
        logger = _quote(name)
        levels = _JSON_LEVELS
        #: (start, end) of a part's lines, by level, head and extra (a session's parts
        #: alternate with the others': made once a batch, and a second)
        ends: dict[tuple, tuple[str, str]] = {}
        for created, levelno, head, tails, extra in parts:
            if int(created) != second:
                second, stamp = int(created), self.stamp(created)
                ends = {}
            key = (levelno, head, id(extra))  # the parts hold their extra: no id is reused meanwhile
            made = ends.get(key)
            if made is None:
                made = ends[key] = _part_ends(stamp, levels[levelno], logger, head, extra)
            start, end = made
            if len(tails) == 1:  # one line (the others logged in between)
                lines.append(f"{start}{_quote(tails[0])[1:]}{end}")
            else:
                lines.append("\n".join([f"{start}{_quote(tail)[1:]}{end}" for tail in tails]))
        return lines

    def written_stamp(self, stamp: str) -> str:
        return _quote(stamp)


def _part_ends(stamp: str, level: str, logger: str, head: str, extra: dict[str, str]) -> tuple[str, str]:
    """What each JSON line of a part starts with (up to its message's quote: the rest
    of the message follows) and ends with (the CN of a client's certificate, and the
    user, if any)."""
    client_cn, user = extra.get("client_cn"), extra.get("user")
    start = (f'{{"time": {stamp}, "level": {level}, "context": {_quote(extra["context"])}, '
             f'"logger": {logger}, "message": {_quote(head)[:-1]}')
    end = "" if client_cn is None else f', "client_cn": {_quote(client_cn)}'
    if user is not None:
        end += f', "user": {_quote(user)}'
    return start, end + "}"


#: the levels whose lines are batched (gcmd.serverlog.setup.LineRun), and their names
BATCHED_LEVELS = {logging.DEBUG: "DEBUG", _INFO: "INFO"}
#: as a JSON line holds them
_JSON_LEVELS = {levelno: _quote(levelname.lower()) for levelno, levelname in BATCHED_LEVELS.items()}

#: the lines of a LineRun batched together: (time of the first, level, their common
#: start, [the rest of each], extra); each line is ``start + rest``, used as it is
Part = tuple[float, int, str, list, dict]
