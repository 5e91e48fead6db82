"""A log file read at one moment, in a pool thread: lastlog, a query, a follow's backlog, a resume.

Used by :mod:`gcmd.logs.readers`, whose docstring tells the design. Every
function that takes a :class:`Job` runs in a pool thread and raises OSError;
the hub cancels the job when nobody waits for it any more.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import Callable
from typing import Any

from gcmd.logs.cursors import FileCursor, FileCursors, line_hash
from gcmd.logs.lines import (
    DECIDING_BYTES,
    MAX_LINE,
    MAX_REPLY,
    capped,
    dropped,
    wire_line,
)
from gcmd.logs.queries import SEARCH_WINDOW, Pattern, Shape, matching_lines

#: bytes per read of a file backwards
CHUNK = 65536
#: bytes per read of a search (``lastlog ... grep``): RE2 scans them in one call
SEARCH_CHUNK = 1 << 20
#: lastlog takes its lines from the chunks it scanned while they hold at most this much
SCANNED_KEPT = 1 << 20

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


class Job:
    """A read in a pool thread; the hub sets ``cancelled`` when nobody waits for it any more."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def check(self) -> None:
        if self.cancelled:
            raise TimeoutError("given up")


def read_last_lines(path: str, count: int, job: Job) -> list[bytes] | None:
    """The lastlog block of the last ``count`` lines of the file at ``path``; None if not regular.

    Raises OSError when the path cannot be opened or read.
    """
    found = _read_at_one_moment(path, lambda fd, identity, size, end: _last_lines(fd, size, count, job), job)
    return None if found is None else found[2]


def _fstat(fd: int) -> os.stat_result:
    """fstat, refusing a directory: tail cannot follow one."""
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    return st


def _last_spans(fd: int, size: int, count: int, job: Job) -> tuple[list[tuple[int, int]], bytes | None, int]:
    """The (start, end) offsets of the last ``count`` lines of the first ``size`` bytes, newest first.

    Also the bytes from the oldest line's start when they were all kept
    while scanning (at most SCANNED_KEPT), and the offset they start at.
    """
    if size == 0 or count <= 0:
        return [], b"", 0
    end = size - 1 if os.pread(fd, 1, size - 1) == b"\n" else size
    starts: list[int] = []
    chunks: list[bytes] | None = []
    pos = end
    while pos > 0 and len(starts) < count:
        job.check()
        n = min(CHUNK, pos)
        pos -= n
        chunk = os.pread(fd, n, pos)
        if chunks is not None:
            chunks.append(chunk)
            if len(chunks) * CHUNK > SCANNED_KEPT:
                chunks = None
        i = len(chunk)
        while len(starts) < count and (i := chunk.rfind(b"\n", 0, i)) >= 0:
            starts.append(pos + i + 1)
    if len(starts) < count:
        starts.append(0)
    spans = []
    for start in starts:
        spans.append((start, end))
        end = start - 1
    if chunks is None:
        return spans, None, 0
    return spans, b"".join(reversed(chunks)), pos


def _last_lines(fd: int, size: int, count: int, job: Job) -> list[bytes]:
    spans, scanned, base = _last_spans(fd, size, count, job)
    if scanned is not None:
        return capped(wire_line(scanned[start - base:end - base]) for start, end in spans)
    return capped(_read_lines(fd, spans, job))


def _read_lines(fd: int, spans: list[tuple[int, int]], job: Job):
    """The wire lines of ``spans``, newest first; past a full reply only whether each is dropped."""
    room = MAX_REPLY
    for start, end in spans:
        job.check()
        length = end - start
        if room >= 0:
            line = wire_line(os.pread(fd, min(length, MAX_LINE), start), max(0, length - MAX_LINE))
            if line is not None:
                room -= len(line) + 1
            yield line
        else:  # capped() leaves it out: any bytes stand for it
            yield None if dropped(os.pread(fd, min(length, DECIDING_BYTES), start)) else b""


def _read_at_one_moment(path: str, read: Callable[[int, tuple[int, int], int, int], Any], job: Job,
                        complete: bool = False) -> tuple[tuple[int, int], int, Any] | None:
    """``read(fd, identity, size, end)`` of the file at ``path`` as it is at one
    moment: again while the file got shorter during the read (truncated: what was
    read may mix contents). ``end``: ``size``, or with ``complete`` the end of its
    last complete line. Returns the file's (device, inode), ``end`` and what
    ``read`` returned; None if the path is not a regular file. Raises OSError
    when it cannot be opened or read."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = _fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        while True:
            size = end = st.st_size
            if complete and size and os.pread(fd, 1, size - 1) != b"\n":
                end = _last_spans(fd, size, 1, job)[0][0][0]
            identity = (st.st_dev, st.st_ino)
            result = read(fd, identity, size, end)
            st = os.fstat(fd)
            if st.st_size >= size:
                return identity, end, result
    finally:
        os.close(fd)


def query_last_lines(path: str, count: int, pattern: Pattern | None, shape: Shape, limit: int,
                     job: Job) -> list[bytes] | None:
    """The lines of one log in a lastlog block of a query: the last ``count``
    lines of the file at ``path`` (with ``pattern``: that match, within its
    last SEARCH_WINDOW bytes), shaped by ``shape``, at most ``limit`` bytes as
    sent; None if the path is not a regular file.

    Raises OSError when the path cannot be opened or read.
    """
    found = _read_at_one_moment(path, lambda fd, identity, size, end: _block(
        fd, identity, size, count, pattern, shape, limit, job), job)
    return None if found is None else found[2]


def follow_backlog(path: str, count: int, pattern: Pattern | None, shape: Shape, limit: int,
                   job: Job) -> tuple[tuple[int, int], int, list[bytes]] | None:
    """The backlog of a follow: as query_last_lines, of the complete lines only (an
    unfinished last line is sent live once it ends), with the (device, inode) of
    the file read and the offset of the last ``\\n`` read (-1: none), which
    live lines that end there or before repeat. None if not a regular file.
    """
    found = _read_at_one_moment(path, lambda fd, identity, size, complete: _block(
        fd, identity, complete, count, pattern, shape, limit, job), job, complete=True)
    if found is None:
        return None
    identity, complete, block = found
    return identity, complete - 1, block


def resume_lines(path: str, cursor: FileCursor, pattern: Pattern | None, shape: Shape, limit: int,
                 job: Job) -> tuple[tuple[int, int], int, bool, list[bytes]] | None:
    """A follow resumed after the line ``cursor`` names: the complete lines after it
    (that match), at most ``limit`` bytes of the newest as sent, with where they
    end (as follow_backlog) and whether the file no longer holds the cursor's
    line (then the lines are those of the file now at ``path``, from its start).
    None if not a regular file.
    """
    def read(fd: int, identity: tuple[int, int], size: int, complete: int) -> tuple[bool, list[bytes]]:
        start = _after(fd, identity, size, cursor, job)
        lines = _lines_from(fd, identity, start or 0, complete, pattern, shape, limit, job)
        return start is None, lines

    found = _read_at_one_moment(path, read, job, complete=True)
    if found is None:
        return None
    identity, complete, (lost, block) = found
    return identity, complete - 1, lost, block


def _after(fd: int, identity: tuple[int, int], size: int, cursor: FileCursor, job: Job) -> int | None:
    """Where the lines after the cursor's line begin in the file (the start of that
    line while it is unfinished: it is sent whole once it ends); None when the
    file no longer holds it (another file, shorter, another line there)."""
    end = cursor.end
    if identity != (cursor.device, cursor.inode) or end > size:
        return None
    finished = end < size
    if finished and os.pread(fd, 1, end) != b"\n":
        return None
    start, position = 0, end
    while position > 0:
        job.check()
        n = min(CHUNK, position)
        position -= n
        newline = os.pread(fd, n, position).rfind(b"\n")
        if newline >= 0:
            start = position + newline + 1
            break
    length = end - start
    if line_hash(os.pread(fd, min(length, MAX_LINE), start), max(0, length - MAX_LINE)) != cursor.line_hash:
        return None
    return end + 1 if finished else start


def _lines_from(fd: int, identity: tuple[int, int], start: int, stop: int, pattern: Pattern | None,
                shape: Shape, limit: int, job: Job) -> list[bytes]:
    """The block of the lines between ``start`` (a line's start) and ``stop`` (just after
    a newline) that match: at most ``limit`` bytes of the newest as sent, the older
    left out (see capped). Read forwards once; a line is matched against its
    first SEARCH_WINDOW bytes."""
    cursor = FileCursors(shape.name, identity) if shape.json else None
    shaped: deque[bytes] = deque()
    size = left_out = 0
    pieces: list[bytes] = []
    kept = 0
    position = start
    while position < stop:
        job.check()
        chunk = os.pread(fd, min(SEARCH_CHUNK, stop - position), position)
        if not chunk:
            break
        parts = chunk.split(b"\n")
        offset = position
        for part in parts[:-1]:
            offset += len(part)
            if pieces:
                pieces.append(part[:max(0, SEARCH_WINDOW - kept)])
                line, length = b"".join(pieces), kept + len(part)
                pieces, kept = [], 0
            else:
                line, length = part, len(part)
            if pattern is None or pattern.matches(line):
                raw, cut = line[:MAX_LINE], length - min(length, MAX_LINE)
                sent = shape.line(raw, cut, cursor(offset, raw, cut) if cursor else None)
                if sent is not None:
                    shaped.append(sent)
                    size += len(sent) + 1
                    while size > limit:
                        size -= len(shaped.popleft()) + 1
                        left_out += 1
            offset += 1
        rest = parts[-1]
        if rest and kept < SEARCH_WINDOW:
            pieces.append(rest[:SEARCH_WINDOW - kept])
        kept += len(rest)
        position += len(chunk)
    return capped(reversed(shaped), left_out, limit, shape.left_out)


def _block(fd: int, identity: tuple[int, int], size: int, count: int, pattern: Pattern | None, shape: Shape,
           limit: int, job: Job) -> list[bytes]:
    """The block of the last ``count`` lines of the first ``size`` bytes (see query_last_lines)."""
    if pattern is None:
        spans, scanned, base = _last_spans(fd, size, count, job)
        return capped(_shaped_lines(fd, identity, spans, scanned, base, shape, job), 0, limit, shape.left_out)
    return _search_block(fd, identity, size, count, pattern, shape, limit, job)


def _shaped_lines(fd: int, identity: tuple[int, int], spans: list[tuple[int, int]], scanned: bytes | None,
                  base: int, shape: Shape, job: Job):
    """The lines of ``spans`` as ``shape`` sends them, newest first: taken from ``scanned``
    (the bytes from the offset ``base``) when _last_spans kept them, else read
    (as _last_lines); past a full reply only whether each is dropped (as _read_lines)."""
    cursor = FileCursors(shape.name, identity) if shape.json else None
    room = MAX_REPLY
    for start, end in spans:
        job.check()
        length = end - start
        if room >= 0:
            if scanned is None:
                raw = os.pread(fd, min(length, MAX_LINE), start)
            else:
                raw = scanned[start - base:start - base + min(length, MAX_LINE)]
            cut = max(0, length - MAX_LINE)
            line = shape.line(raw, cut, cursor(end, raw, cut) if cursor else None)
            if line is not None:
                room -= len(line) + 1
            yield line
        elif shape.json:
            yield b""  # nothing is dropped in JSON: left out
        else:
            yield None if dropped(os.pread(fd, min(length, DECIDING_BYTES), start)) else b""


def _search_block(fd: int, identity: tuple[int, int], size: int, count: int, pattern: Pattern,
                  shape: Shape, limit: int, job: Job) -> list[bytes]:
    """The last ``count`` lines that match among the first ``size`` bytes, looking back
    SEARCH_WINDOW bytes at most; led by the ``searched`` note when that stopped it."""
    found, stopped = _search_back(fd, size, count, pattern, job)
    cursor = FileCursors(shape.name, identity) if shape.json else None
    lines = []
    for end, line in found:
        raw, cut = line[:MAX_LINE], max(0, len(line) - MAX_LINE)
        lines.append(shape.line(raw, cut, cursor(end, raw, cut) if cursor else None))
    if not stopped:
        return capped(lines, 0, limit, shape.left_out)
    note = shape.searched()
    return [note, *capped(lines, 0, limit - len(note) - 1, shape.left_out)]


def _search_back(fd: int, size: int, count: int, pattern: Pattern, job: Job,
                 window: int = SEARCH_WINDOW) -> tuple[list[tuple[int, bytes]], bool]:
    """The (end offset, line) of the last ``count`` lines of the first ``size`` bytes
    that match, newest first, and whether the search stopped at ``window``
    bytes from the end with fewer (a line that begins before that is not searched).

    Read backwards in SEARCH_CHUNK runs; each run is searched at once (see
    matching_lines), so a rare match costs RE2's scan of the bytes, not a
    Python step per line.
    """
    if size == 0 or count <= 0:
        return [], False
    end = size - 1 if os.pread(fd, 1, size - 1) == b"\n" else size
    floor = max(0, size - window)
    found: list[tuple[int, bytes]] = []
    position = end
    # the start of the line that ends the run read before (it began before that run),
    # newest piece first: a long line is joined once, not once per chunk
    carry: list[bytes] = []
    while position > floor and len(found) < count:
        job.check()
        n = min(SEARCH_CHUNK, position - floor)
        position -= n
        piece = os.pread(fd, n, position)
        if position > 0 and b"\n" not in piece:  # all of it inside one line
            carry.append(piece)
            continue
        data = piece + b"".join(reversed(carry))
        if position == 0:
            first, carry = 0, []
        else:
            first = data.find(b"\n") + 1
            carry = [data[:first - 1]]
        run = data[first:]
        base = position + first
        for start, stop in reversed(matching_lines(run, pattern)):
            found.append((base + stop, run[start:stop]))
            if len(found) == count:
                break
    return found, len(found) < count and floor > 0


def locate(path: str, job: Job) -> tuple[tuple[int, int], bool, int]:
    """(device, inode), whether regular, and where a reader starting now starts reading."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = _fstat(fd)
        identity = (st.st_dev, st.st_ino)
        if not stat.S_ISREG(st.st_mode):
            return identity, False, 0
        size = st.st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return identity, True, size
        # an unfinished last line is sent whole once it ends
        return identity, True, _last_spans(fd, size, 1, job)[0][0][0]
    finally:
        os.close(fd)


def identify(path: str, _job: Job) -> tuple[tuple[int, int], bool, int]:
    """(device, inode), whether regular, and size of what ``path`` names."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino), stat.S_ISREG(st.st_mode), st.st_size
