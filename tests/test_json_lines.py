"""JSON lines (PROTOCOL.md, "Log queries (1.2)") are the bytes json.dumps gives.

gcmd builds each JSON line from json's own string escaping instead of a
json.dumps per line; these tables hold it to json.dumps's bytes for tricky
lines, and a JSON lastlog of a real file to json.dumps of each line's fields.
"""

from __future__ import annotations

import json
import os

import pytest

from gcmd.logs.cursors import FileCursors, file_cursor
from gcmd.logs.filereads import SCANNED_KEPT, Job, query_last_lines
from gcmd.logs.lines import MAX_LINE, MAX_REPLY, wire_line
from gcmd.logs.queries import JSON, TEXT, Shape, json_line

pytestmark = pytest.mark.timeout(30)

EMOJI = "\U0001F600".encode()  # 4 bytes; a surrogate pair in JSON


def dumped(log: str, cursor: str | None, line: str | list[int], cut: int = 0) -> bytes:
    """What json.dumps gives for a line's fields, in the protocol's order."""
    fields: dict = {"log": log}
    if cursor is not None:
        fields["cursor"] = cursor
    fields["line"] = line
    if cut:
        fields["cut"] = cut
    return json.dumps(fields, separators=(",", ":")).encode()


@pytest.mark.parametrize(("raw", "cut", "line", "sent_cut"), [
    (b"plain", 0, "plain", 0),
    (b"", 0, "", 0),
    (b'say "hi" and \\"', 0, 'say "hi" and \\"', 0),
    (b"C:\\dir\\x1b \\u0041 \\", 0, "C:\\dir\\x1b \\u0041 \\", 0),
    (bytes(range(0x20)) + b"\x7f", 0, "".join(map(chr, range(0x20))) + "\x7f", 0),
    (b"tab\there\rcr", 0, "tab\there\rcr", 0),
    ("é ü 漢字 \u2028\u2029 \u009b".encode(), 0, "é ü 漢字 \u2028\u2029 \u009b", 0),
    (EMOJI + b" astral", 0, "\U0001F600 astral", 0),
    (b"\xed\xa0\x80 an encoded surrogate", 0, list(b"\xed\xa0\x80 an encoded surrogate"), 0),
    (b"\xff\xfe", 0, [255, 254], 0),
    (b"ok \xc3( then not utf-8", 0, list(b"ok \xc3( then not utf-8"), 0),
    (b"ends inside a character \xc3", 0, list(b"ends inside a character \xc3"), 0),
    (b"\x00", 0, "\x00", 0),
    (b"cut by the reader", 12, "cut by the reader", 12),
    (b"cut inside a character \xe6\xbc", 3, "cut inside a character ", 5),
    (b"not utf-8 \xff and cut \xc3", 3, list(b"not utf-8 \xff and cut \xc3"), 3),
    (b"x" * (MAX_LINE + 5), 0, "x" * MAX_LINE, 5),
    (b"x" * (MAX_LINE - 2) + EMOJI, 0, "x" * (MAX_LINE - 2), 4),
    (b"x" * (MAX_LINE - 1) + b"\xc3", 7, "x" * (MAX_LINE - 1), 8),
    (b"\xff" + b"x" * MAX_LINE, 0, list(b"\xff" + b"x" * (MAX_LINE - 1)), 1),
])
@pytest.mark.parametrize("cursor", ["f1:app:fe00:20c4d4:18d5f:63c115a8", None])
def test_json_line_is_json_dumps_of_its_fields(raw, cut, line, sent_cut, cursor):
    assert json_line("app", cursor, raw, cut) == dumped("app", cursor, line, sent_cut)


@pytest.mark.parametrize("log", ["a", 'q"uote\\d', "é\x01"])
def test_json_line_escapes_the_log_name_as_json_dumps(log):
    assert json_line(log, "C", b"x") == dumped(log, "C", "x")


@pytest.mark.parametrize(("end", "raw", "cut"), [
    (0, b"", 0),
    (0x18d5f, b"Nov 25 10:00:18 lab app[1998]: line 1998 of the log", 0),
    (1 << 40, b"\xff\x00 any bytes", 0),
    (70000, b"y" * MAX_LINE, 4464),
    (5, b"ab", 1),
])
def test_file_cursors_are_file_cursor(end, raw, cut):
    cursors = FileCursors("app", (0xfe00, 0x20c4d4))
    assert cursors(end, raw, cut) == file_cursor("app", (0xfe00, 0x20c4d4), end, raw, cut)
    assert cursors(end, raw, cut) == cursors(end, raw, cut)  # the made hash is copied, not used up


def expected_block(path, count: int, format: str) -> list[bytes]:
    """The last ``count`` lines of the file at ``path`` as a block sends them, line by line:
    json.dumps of each line's fields with file_cursor, or wire_line."""
    data = path.read_bytes()
    st = os.stat(path)
    lines, end = [], -1
    for line in data.rstrip(b"\n").split(b"\n"):
        end += len(line) + 1
        raw, cut = line[:MAX_LINE], max(0, len(line) - MAX_LINE)
        if format == TEXT:
            lines.append(wire_line(raw, cut))
            continue
        try:
            value: str | list[int] = raw.decode("utf-8")
        except UnicodeDecodeError:
            value = list(raw)
        lines.append(dumped("app", file_cursor("app", (st.st_dev, st.st_ino), end, raw, cut), value, cut))
    return [line for line in lines[-count:] if line is not None]


SMALL = [b"Nov 25 10:00:%02d lab app[%d]: line %d" % (i % 60, i, i) for i in range(30)] + [
    b'quotes " and \\ backslashes', b"\x1b[31m escapes", "é 漢字".encode(), b"\xff\xfe not utf-8",
    b"== a note in text", b"End lastlog", b"", b"last"]
#: lines that together pass SCANNED_KEPT: they are read again one by one
LARGE = [bytes([0x61 + i]) * (SCANNED_KEPT // 3) for i in range(4)] + [b"z" * (MAX_LINE + 9), b"after"]


@pytest.mark.parametrize("format", [JSON, TEXT])
@pytest.mark.parametrize(("written", "count"), [
    (SMALL, 10), (SMALL, 1000), (LARGE, 4), (LARGE, 1000), (SMALL + LARGE, 8),
])
def test_a_lastlog_block_of_a_file_is_each_line_as_sent_alone(tmp_path, written, count, format):
    path = tmp_path / "app.log"
    path.write_bytes(b"\n".join(written) + b"\n")
    block = query_last_lines(str(path), count, None, Shape(format, "app"), MAX_REPLY, Job())
    assert block == expected_block(path, count, format)


def test_a_lastlog_block_of_a_file_without_a_last_newline_ends_with_its_unfinished_line(tmp_path):
    path = tmp_path / "app.log"
    path.write_bytes(b"one\ntwo\nunfinished")
    block = query_last_lines(str(path), 2, None, Shape(JSON, "app"), MAX_REPLY, Job())
    assert block == expected_block(path, 2, JSON)
    assert json.loads(block[-1])["line"] == "unfinished"
