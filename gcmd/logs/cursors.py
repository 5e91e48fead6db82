"""Cursors (PROTOCOL.md, "Log queries (1.2)"): a line's place in its log, as gcmd writes and reads it.

A cursor is opaque to clients (ASCII, no spaces or commas, at most 256
bytes); gcmd reads one strictly, and anything it did not make is ``bad
cursor``. It stays valid across a restart of gcmd while the log holds the
line: a file's names the file (device, inode), the offset of the line's end
and a hash of the line; the journal's holds journald's own cursor; the
``gcmd`` log's, the process that numbered the line.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from gcmd.net.wire import CommandError

#: the longest cursor, in bytes
MAX_CURSOR = 256

#: ``f1:LOG:DEV:INO:END:HASH``: the line of the file log LOG whose (device, inode) is
#: (DEV, INO), its end (the offset of its ``\\n``, or the end of an unfinished last line)
#: at END and whose short hash is HASH; ``m1:LOG:ID:SEQ``: line number SEQ of the
#: ``gcmd`` log of the process ID; ``j1:LOG:CURSOR[:N]``: journald's cursor, and for
#: a line of an entry of several lines but its last, the line's index. Numbers are
#: lower-case hex without leading zeros, so that a position has one spelling; the
#: log's name (never a ``:``) tells a cursor of a log that is not asked for.
_HEX = rb"(0|[1-9a-f][0-9a-f]{0,15})"
_LOG = rb"([A-Za-z0-9_][A-Za-z0-9_.-]{0,63})"
_FILE_CURSOR = re.compile(rb"f1:" + _LOG + rb":" + _HEX + rb":" + _HEX + rb":" + _HEX + rb":([0-9a-f]{8})").fullmatch
_MEMORY_CURSOR = re.compile(rb"m1:" + _LOG + rb":([0-9a-f]{16}):" + _HEX).fullmatch
#: journald's cursor as journalctl prints it (sd_journal_get_cursor)
_JOURNAL_CURSOR = re.compile(
    rb"j1:" + _LOG
    + rb":(s=[0-9a-f]{32};i=[0-9a-f]{1,16};b=[0-9a-f]{32};m=[0-9a-f]{1,16};t=[0-9a-f]{1,16};x=[0-9a-f]{1,16})"
    + rb"(?::" + _HEX + rb")?"
).fullmatch


@dataclass(frozen=True)
class FileCursor:
    log: str
    device: int
    inode: int
    #: offset of the line's end in the file (bytes)
    end: int
    line_hash: str


@dataclass(frozen=True)
class MemoryCursor:
    log: str
    #: the process whose ``gcmd`` log numbered the line
    process: str
    #: the line's number in that log, from 1
    sequence: int


@dataclass(frozen=True)
class JournalCursor:
    log: str
    #: journald's own cursor
    journald: str
    #: the line's index in its entry (from 0), for every line of an entry of
    #: several lines but its last; None: the entry's last (or only) line
    line: int | None = None

    @property
    def suffix(self) -> str:
        """What follows the log's name: journald's cursor, and ``:N`` (hex) for
        a line of an entry that is not its last."""
        return self.journald if self.line is None else f"{self.journald}:{self.line:x}"


Cursor = FileCursor | MemoryCursor | JournalCursor


def _line_digest(cut: int, raw: bytes = b""):
    # the hash of a line of which ``cut`` bytes were cut off, fed ``raw`` (its bytes, or none yet)
    return hashlib.blake2b(raw, digest_size=4, person=b"%d" % cut)


def line_hash(raw: bytes, cut: int) -> str:
    """8 hex digits that tell one line from another at the same offset (an in-place rewrite)."""
    return _line_digest(cut, raw).hexdigest()


def _file_part(log: str, identity: tuple[int, int]) -> str:
    # what a file cursor says of the file: the log, the device and the inode
    return f"f1:{log}:{identity[0]:x}:{identity[1]:x}:"


def file_cursor(log: str, identity: tuple[int, int], end: int, raw: bytes, cut: int) -> str:
    """The cursor of a line of the file log ``log``: ``identity`` (device, inode), ``end`` its end's offset."""
    return f"{_file_part(log, identity)}{end:x}:{line_hash(raw, cut)}"


class FileCursors:
    """The cursors of the lines of one file read at once: ``cursors(end, raw, cut)``
    is ``file_cursor(log, identity, end, raw, cut)``.

    A JSON lastlog makes a cursor per line; the part that names the file is
    formatted once, and the hash of an uncut line starts from a copy of one
    made hash (blake2b's keyword set-up costs twice its hashing of a line).
    """

    __slots__ = ("_file", "_uncut")

    def __init__(self, log: str, identity: tuple[int, int]) -> None:
        self._file = _file_part(log, identity)
        self._uncut = _line_digest(0)

    def __call__(self, end: int, raw: bytes, cut: int) -> str:
        if cut:
            return f"{self._file}{end:x}:{line_hash(raw, cut)}"
        digest = self._uncut.copy()
        digest.update(raw)
        return f"{self._file}{end:x}:{digest.hexdigest()}"


def memory_cursor(log: str, process: str, sequence: int) -> str:
    """The cursor of line ``sequence`` of the ``gcmd`` log of ``process`` (16 hex digits)."""
    return f"m1:{log}:{process}:{sequence:x}"


def journal_cursor(log: str, suffix: str) -> str:
    """The cursor of a line of a journal entry: journald's cursor (``__CURSOR``)
    inside ours, then ``:N`` (the line's index in the entry, hex) for a line
    of an entry of several lines that is not its last (see JournalCursor.suffix)."""
    return f"j1:{log}:{suffix}"


def parse_cursor(text: bytes) -> Cursor:
    """The cursor ``text`` names; CommandError ``bad cursor`` for anything gcmd did not make."""
    if len(text) <= MAX_CURSOR:
        if match := _FILE_CURSOR(text):
            log, device, inode, end, digest = match.groups()
            return FileCursor(log.decode(), int(device, 16), int(inode, 16), int(end, 16), digest.decode())
        if match := _MEMORY_CURSOR(text):
            return MemoryCursor(match[1].decode(), match[2].decode(), int(match[3], 16))
        if match := _JOURNAL_CURSOR(text):
            return JournalCursor(match[1].decode(), match[2].decode(),
                                 None if match[3] is None else int(match[3], 16))
    raise CommandError("bad cursor")
