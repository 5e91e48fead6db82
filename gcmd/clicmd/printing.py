"""What gcmd-cli prints of log lines and notes: escaped text, headers between logs, or JSON lines."""

from __future__ import annotations

import json
from collections.abc import Iterator

from gcmd.client import LogLine, Note


def _escapes() -> dict[int, str]:
    """Control characters (C0 but TAB, DEL, C1) and bytes that are not UTF-8 as
    ``\\xNN``, as gcmd's text format sends a log line (PROTOCOL.md)."""
    table = {c: f"\\x{c:02x}" for c in [*range(0x09), *range(0x0A, 0x20), *range(0x7F, 0xA0)]}
    table.update({0xDC00 + b: f"\\x{b:02x}" for b in range(0x80, 0x100)})
    return table


_ESCAPES = _escapes()


def shown(item: LogLine | Note) -> str:
    """A log line as text for a terminal (escaped as gcmd's text format does,
    `` [+N bytes]`` after a cut line); a note as its text."""
    if isinstance(item, Note):
        return item.text
    text = item.data.decode("utf-8", "surrogateescape").translate(_ESCAPES)
    return f"{text} [+{item.cut} bytes]" if item.cut else text


class Printer:
    """Log lines and notes as gcmd-cli prints them: escaped text, with a
    ``==> NAME <==`` header each time the log changes when ``several`` logs
    were asked; or (``as_json``) the JSON lines, with ``"host"`` first when
    ``host`` is given."""

    def __init__(self, as_json: bool, several: bool, host: str | None = None) -> None:
        self.as_json = as_json
        self.several = several
        self.host = host
        self.last_log: str | None = None

    def lines(self, item: LogLine | Note) -> Iterator[str]:
        if self.as_json:
            text = item.json()
            yield text if self.host is None else f'{{"host":{json.dumps(self.host)},{text[1:]}'
            return
        if self.several and isinstance(item, LogLine) and item.log != self.last_log:
            self.last_log = item.log
            yield f"==> {item.log} <=="
        yield shown(item)
