"""Log queries (PROTOCOL.md, "Log queries (1.2)"): the grammar, grep patterns,
the text and JSON shapes of a block's lines, and cursors.

Pure functions and small values, no I/O: the logs (gcmd.logs.readers,
gcmd.logs.memory) read, and hand raw lines to a :class:`Shape`, which makes
what is sent. A *raw* line is the bytes of one log line as written, without
its ``\\n``, cut after :data:`~gcmd.logs.lines.MAX_LINE` bytes (``cut``: the
bytes left out).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_string

import re2

from gcmd.logs.lines import MAX_LINE, MAX_REPLY, Recent, capped, wire_line
from gcmd.net.wire import CommandError

#: most logs one request names
MAX_LOGS = 16
#: most lines lastlog gives per log; follow's backlog too
MAX_LINES = 1000
#: the longest pattern, in bytes
MAX_PATTERN = 1024
#: ``lastlog ... grep`` looks back through at most this many bytes of each log
SEARCH_WINDOW = 64 << 20
#: the words of the grammar, which no log may be named
KEYWORDS = frozenset([b"grep", b"from"])

TEXT, JSON = "text", "json"

_SPACES = re.compile(rb"[ \t]+")
#: a number of lines (PROTOCOL.md: digits, optionally signed)
_NUMBER = re.compile(rb"[+-]?[0-9]+").fullmatch


class Usage(Exception):
    """A request that does not follow the grammar: the command answers its usage line."""


@dataclass(frozen=True)
class Query:
    """What a ``lastlog`` or ``follow`` request asks for.

    ``count``: lines (None: the command's default); ``logs``: names in the
    order given (empty: the default log); ``cursors``: the cursors after
    ``from``, as sent (follow only); ``pattern``: after ``grep``, or None.
    """

    count: int | None = None
    logs: tuple[bytes, ...] = ()
    cursors: tuple[bytes, ...] = ()
    pattern: bytes | None = None


def _count(word: bytes) -> int:
    """The number of lines a word asks for; -1 when out of any range."""
    if word.startswith(b"-"):
        return -1 if word.strip(b"-0") else 0
    digits = word.lstrip(b"+").lstrip(b"0")
    # int() of thousands of digits is slow, and refused beyond 4300
    return int(digits or b"0") if len(digits) <= 4 else -1


def _next_word(rest: bytes) -> tuple[bytes, bytes]:
    parts = _SPACES.split(rest, 1)
    return parts[0], parts[1] if len(parts) > 1 else b""


def _names(word: bytes, what: str) -> tuple[bytes, ...]:
    names = tuple(word.split(b","))
    if not all(names) or len(set(names)) != len(names) or len(names) > MAX_LOGS:
        raise Usage(f"bad {what}")
    return names


def parse_query(arg: bytes, follow: bool = False) -> Query:
    """The query of a ``lastlog`` (or, with ``follow``, ``follow``) argument.

    ``lastlog [LINES] [LOGS] [grep PATTERN]``,
    ``follow [LINES] [LOGS] [from CURSORS] [grep PATTERN]``: LINES 1 to 1000
    (follow: 0 to 1000); LOGS names joined by commas, at most 16, none twice;
    PATTERN the rest of the line, never empty. ``arg`` has no blanks around
    it (gcmd.net.wire.split_request). Raises :class:`Usage` for any other shape.
    """
    word, rest = _next_word(arg)
    count = None
    if word and _NUMBER(word):
        count = _count(word)
        if not (0 if follow else 1) <= count <= MAX_LINES:
            raise Usage("LINES out of range")
        word, rest = _next_word(rest)
    logs: tuple[bytes, ...] = ()
    if word and word not in KEYWORDS:
        logs = _names(word, "LOGS")
        word, rest = _next_word(rest)
    cursors: tuple[bytes, ...] = ()
    if follow and word == b"from":
        word, rest = _next_word(rest)
        if not word or word in KEYWORDS:
            raise Usage("from without CURSORS")
        cursors = _names(word, "CURSORS")
        word, rest = _next_word(rest)
    pattern = None
    if word == b"grep":
        if not rest:
            raise Usage("grep without PATTERN")
        pattern, word = rest, b""
    if word:
        raise Usage("extra words")
    return Query(count, logs, cursors, pattern)


# --- grep --------------------------------------------------------------------------------

#: ``[[:upper:]]`` of journalctl's smart case: an ASCII upper-case letter anywhere in the pattern
_UPPER = re.compile(rb"[A-Z]").search


class Pattern:
    """A compiled grep pattern: RE2 syntax, journalctl's smart case.

    Source of the smart case: journalctl (``--case-sensitive`` not given)
    searches the pattern for ``[[:upper:]]`` and matches case-insensitively
    when there is none. RE2 matches in time linear in the text, whatever
    the pattern. ``line`` matches one raw line; ``lines`` finds candidates
    in a run of lines (``\\n`` between them) and is only ever confirmed by
    ``line`` (see :func:`matching_lines`).
    """

    def __init__(self, source: bytes) -> None:
        if len(source) > MAX_PATTERN:
            raise CommandError(f"bad pattern: longer than {MAX_PATTERN} bytes")
        options = re2.Options()
        options.log_errors = False  # an error is the client's, and becomes its reply
        options.case_sensitive = _UPPER(source) is not None
        try:
            self.line = re2.compile(source, options)
            # \A and \z would only match at a run's ends: such patterns test each line
            self.lines = None if b"\\A" in source or b"\\z" in source else re2.compile(b"(?m)" + source, options)
        except re2.error as exc:
            why = exc.args[0] if exc.args else "invalid"
            if isinstance(why, bytes):
                why = why.decode("utf-8", "backslashreplace")
            raise CommandError(f"bad pattern: {why}") from None
        self.source = source

    def matches(self, raw: bytes) -> bool:
        return self.line.search(raw) is not None


def matching_lines(run: bytes, pattern: Pattern) -> list[tuple[int, int]]:
    """The (start, end) in ``run`` of each of its lines that matches, oldest first.

    ``run`` is whole lines joined by ``\\n`` (no ``\\n`` at its end). One
    search over the run finds the leftmost candidate; its line is confirmed
    on its own and the search goes on at the next line, so every matching
    line is found (a match inside a line is a match in the run) and none
    that does not match is kept (a match across lines is only a candidate).
    """
    found: list[tuple[int, int]] = []
    if pattern.lines is None:
        start = 0
        for line in run.split(b"\n"):
            if pattern.line.search(line) is not None:
                found.append((start, start + len(line)))
            start += len(line) + 1
        return found
    position, size = 0, len(run)
    while position <= size:
        match = pattern.lines.search(run, position)
        if match is None:
            break
        start = run.rfind(b"\n", 0, match.start()) + 1
        end = run.find(b"\n", match.start())
        if end < 0:
            end = size
        if start < position:  # a match that begins on the \n before ``position``
            start = position
            end = run.find(b"\n", start)
            end = size if end < 0 else end
        if pattern.line.search(run[start:end]) is not None:
            found.append((start, end))
        position = end + 1
    return found


# --- the shapes of a block's lines --------------------------------------------------------

def header(name: str) -> bytes:
    """The line before a run of lines of the log ``name`` (text format, several logs)."""
    return b"==> %s <==" % name.encode()


def _note(**fields) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


def json_line(log: str, cursor: str | None, raw: bytes, cut: int = 0) -> bytes:
    """A line as JSON: ``{"log":..,"cursor":..,"line":..}``, with ``"cut":N`` when cut.

    ``line`` is a JSON string when ``raw`` is UTF-8 (every character outside
    printable ASCII escaped, so nothing reaches a terminal raw), otherwise
    an array of its bytes (journalctl's ``-o json``). A raw line cut inside
    a character loses that character's head too (counted in ``cut``). No
    cursor (None): the key is left out.

    The bytes are those of ``json.dumps(fields, separators=(",", ":"))``,
    built from the function json.dumps escapes each string with
    (``json.encoder.encode_basestring_ascii``): json.dumps makes a
    JSONEncoder per call, which cost a JSON lastlog several times the
    time of its escaping.
    """
    if len(raw) > MAX_LINE:
        cut += len(raw) - MAX_LINE
        raw = raw[:MAX_LINE]
    try:
        line = _json_string(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        cut, line = _not_utf_8(raw, cut, exc)
    head = '{"log":' + _json_string(log)
    if cursor is not None:
        head += ',"cursor":' + _json_string(cursor)
    return (head + ',"line":' + line + (f',"cut":{cut}}}' if cut else "}")).encode()


def _not_utf_8(raw: bytes, cut: int, error: UnicodeDecodeError) -> tuple[int, str]:
    """The ``cut`` and JSON ``line`` of a raw line that is not UTF-8 (see json_line):
    an array of its bytes, or a string when only its cut end is not."""
    if cut and error.reason == "unexpected end of data":
        cut += len(raw) - error.start
        raw = raw[:error.start]
        line = raw.decode("utf-8", "surrogateescape")
        if not any(0xDC80 <= ord(c) <= 0xDCFF for c in line):
            return cut, _json_string(line)
    return cut, "[" + ",".join(map(str, raw)) + "]"


class Shape:
    """How the lines of one log look in a block: text (1.1 wire lines) or JSON.

    ``name``: the log's name (in JSON lines and notes).
    """

    def __init__(self, format: str, name: str) -> None:
        self.json = format == JSON
        self.name = name

    def line(self, raw: bytes, cut: int = 0, cursor: str | None = None) -> bytes | None:
        """What is sent for a raw line; None when the text format drops it."""
        if self.json:
            return json_line(self.name, cursor, raw, cut)
        return wire_line(raw, cut)

    def wire(self, line: bytes, cursor: str | None = None) -> bytes | None:
        """What is sent for a line a log kept as a wire line (the journal, the ``gcmd`` log)."""
        if line is None or not self.json:
            return line
        return json_line(self.name, cursor, line)

    def left_out(self, count: int) -> bytes:
        if self.json:
            return _note(note="left_out", lines=count)
        return b"== %d older lines left out ==" % count

    def searched(self, window: int = SEARCH_WINDOW) -> bytes:
        if self.json:
            return _note(note="searched", bytes=window, log=self.name)
        return b"== searched the last %d MiB only ==" % (window >> 20)

    def cursor_lost(self) -> bytes:
        """The first line of a resumed log that no longer holds the cursor's line."""
        if self.json:
            return _note(note="cursor_lost", log=self.name)
        return b"== cursor lost: %s ==" % self.name.encode()

    def dropped(self, count: int) -> bytes:
        if self.json:
            return _note(note="dropped", lines=count)
        return b"== %d lines dropped ==" % count


def recent_after(recent: Recent, sequence: int | None, pattern: Pattern | None, shape: Shape,
                 limit: int = MAX_REPLY, cursor: Callable[[int], str] | None = None) -> list[bytes]:
    """The kept lines numbered after ``sequence`` (None: all of them) that match, shaped,
    at most ``limit`` bytes as sent (the older left out). ``sequence`` must be at
    least the first kept number less one (the caller checks)."""
    lines, first = recent.numbered()
    start = 0 if sequence is None else sequence - first + 1

    def newest_first():
        for index in range(len(lines) - 1, start - 1, -1):
            line = lines[index]
            if pattern is not None and (line is None or not pattern.matches(line)):
                continue
            yield shape.wire(line, cursor(first + index) if cursor and shape.json else None)

    return capped(newest_first(), 0, limit, shape.left_out)


def recent_block(recent: Recent, count: int, pattern: Pattern | None, shape: Shape,
                 limit: int = MAX_REPLY, cursor: Callable[[int], str] | None = None) -> list[bytes]:
    """The block of a log kept in memory (the ``gcmd`` log, the journal, a FIFO).

    The last ``count`` lines, or with ``pattern`` the last ``count`` of the
    kept lines that match. These logs keep wire lines: the line as the
    journal or gcmd's own log writes it is already printable, so matching
    and JSON use it. ``cursor``: line number -> the line's cursor (JSON).
    """
    lines, first = recent.numbered()

    def newest_first():
        taken = 0
        for index in range(len(lines) - 1, -1, -1):
            if taken == count:
                return
            line = lines[index]
            if pattern is not None and (line is None or not pattern.matches(line)):
                continue
            taken += 1
            yield shape.wire(line, cursor(first + index) if cursor and shape.json else None)

    older = 0 if pattern is not None else recent.gone(count)
    return capped(newest_first(), older, limit, shape.left_out)
