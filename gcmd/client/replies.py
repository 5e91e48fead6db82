"""What the server's replies become: log lines, notes, the version, figures."""

from __future__ import annotations

import json

from gcmd.client.errors import ProtocolError

#: the oldest protocol this client speaks: 1.2 brought version, format json and cursors
PROTOCOL = (1, 2)


class LogLine:
    """One line of a log the server serves, as ``lastlog`` and ``follow`` give it.

    - ``log`` (str): the log's name (see :meth:`Client.logs`);
    - ``data`` (bytes): the line exactly as written in the log, without its
      newline; at most 65536 bytes (see ``cut``);
    - ``cursor`` (str or None): where the line is in its log, to resume a
      follow after it (:meth:`Client.follow`, ``cursors``); None for a log
      whose lines carry none (the journal, for now);
    - ``cut`` (int): the bytes the server cut off a longer line, else 0;
    - ``text`` (str): ``data`` as UTF-8, a byte that is not UTF-8 as U+FFFD.
      Control characters are kept: escape them before printing to a terminal.
    """

    __slots__ = ("cursor", "cut", "data", "log")

    def __init__(self, log: str, data: bytes, cursor: str | None = None, cut: int = 0) -> None:
        self.log = log
        self.data = data
        self.cursor = cursor
        self.cut = cut

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def json(self) -> str:
        """The line as the server sends it in JSON (one object, no newline)."""
        try:
            line: str | list[int] = self.data.decode("utf-8")
        except UnicodeDecodeError:
            line = list(self.data)
        fields: dict = {"log": self.log}
        if self.cursor is not None:
            fields["cursor"] = self.cursor
        fields["line"] = line
        if self.cut:
            fields["cut"] = self.cut
        return json.dumps(fields, separators=(",", ":"))

    def _key(self) -> tuple:
        return (self.log, self.data, self.cursor, self.cut)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LogLine) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"LogLine(log={self.log!r}, data={self.data!r}, cursor={self.cursor!r}, cut={self.cut})"


class Note:
    """What the server says about the lines of a block instead of a line.

    - ``kind`` (str): ``left_out`` (lastlog: ``lines`` older lines did not fit
      in 8 MiB), ``searched`` (lastlog ... grep: only the last ``bytes`` of
      ``log`` were searched), ``dropped`` (follow: ``lines`` lines were dropped
      because this client read too slowly), ``cursor_lost`` (see
      :class:`CursorLost`), or a kind a newer server added;
    - ``log`` (str or None), ``lines`` (int or None), ``bytes`` (int or None):
      as the kind says;
    - ``text`` (str): the note as the server's text format says it
      (``== 12 lines dropped ==``).
    """

    __slots__ = ("bytes", "kind", "lines", "log")

    #: a note has no place in a log: it never moves a follow's cursor
    cursor = None

    def __init__(self, kind: str, log: str | None = None, lines: int | None = None,
                 bytes: int | None = None) -> None:
        self.kind = kind
        self.log = log
        self.lines = lines
        self.bytes = bytes

    @property
    def text(self) -> str:
        if self.kind == "dropped":
            return f"== {self.lines} lines dropped =="
        if self.kind == "left_out":
            return f"== {self.lines} older lines left out =="
        if self.kind == "searched":
            return f"== searched the last {(self.bytes or 0) >> 20} MiB only =="
        if self.kind == "cursor_lost":
            return f"== cursor lost: {self.log} =="
        return f"== {self.kind} =="

    def json(self) -> str:
        """The note as the server sends it in JSON (one object, no newline)."""
        fields = {"note": self.kind, "lines": self.lines, "bytes": self.bytes, "log": self.log}
        return json.dumps({k: v for k, v in fields.items() if v is not None}, separators=(",", ":"))

    def _key(self) -> tuple:
        return (self.kind, self.log, self.lines, self.bytes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Note) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, log={self.log!r}, lines={self.lines}, bytes={self.bytes})"


class CursorLost(Note):
    """A follow resumed after a cursor whose line its log no longer holds (the
    file was rotated, truncated or rewritten; gcmd's own log moved on): the
    lines of ``log`` that follow start at the oldest the log still holds, and
    lines written in between may have been missed."""

    __slots__ = ()


def _item(fields: dict) -> LogLine | Note:
    """The line or note of the fields of one JSON line of a block."""
    if "note" in fields:
        kind = fields["note"]
        return (CursorLost if kind == "cursor_lost" else Note)(
            kind, fields.get("log"), fields.get("lines"), fields.get("bytes"))
    line = fields["line"]
    data = line.encode("utf-8", "surrogatepass") if isinstance(line, str) else bytes(line)
    return LogLine(fields["log"], data, fields.get("cursor"), fields.get("cut", 0))


def parse_items(raws: list[bytes], address: str) -> list[LogLine | Note]:
    """The lines and notes of JSON lines (``raws``, without newlines), parsed by
    one json.loads for them all; ProtocolError, naming ``address``, for what is not one."""
    try:
        return [_item(fields) for fields in json.loads(b"[%s]" % b",".join(raws))]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ProtocolError(f"not JSON log lines: {b'|'.join(raws)[:200]!r} ({exc})", address=address) from None


class Version:
    """What ``version`` answered: ``gcmd`` (str, the server's version, ``1.0.0``)
    and ``protocol`` (tuple of ints, ``(1, 2)``); ``str()`` gives the line."""

    __slots__ = ("gcmd", "protocol")

    def __init__(self, gcmd: str, protocol: tuple[int, ...]) -> None:
        self.gcmd = gcmd
        self.protocol = protocol

    def __str__(self) -> str:
        return f"gcmd {self.gcmd} protocol {'.'.join(map(str, self.protocol))}"

    def __repr__(self) -> str:
        return f"Version(gcmd={self.gcmd!r}, protocol={self.protocol!r})"


def parse_version(line: bytes, address: str) -> Version:
    """The Version of a reply to ``version``; ProtocolError for a server older than 1.2."""
    words = line.decode("utf-8", "replace").split()
    if line == b"Command not found.":
        raise ProtocolError("the server speaks protocol 1.1 or older (it has no 'version'); "
                            "gcmd.client needs 1.2 or later", address=address)
    try:
        if len(words) != 4 or words[0] != "gcmd" or words[2] != "protocol":
            raise ValueError
        protocol = tuple(int(part) for part in words[3].split("."))
    except ValueError:
        raise ProtocolError(f"not a reply to version: {line[:200]!r}", address=address) from None
    if protocol < PROTOCOL:
        raise ProtocolError(f"the server speaks protocol {words[3]}; gcmd.client needs 1.2 or later",
                            address=address)
    return Version(words[1], protocol)


def parse_number(text: str) -> int | float | str:
    """A figure of ``stats``: an int, else a float, else the text as it is."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text
