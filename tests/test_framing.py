"""The wire format as plain functions: request splitting, escaping, error lines."""

import pytest

from gcmd.commands import Commands
from gcmd.config import Config
from gcmd.net.wire import (
    block,
    echo_path,
    error_line,
    escape,
    split_lines,
    split_request,
)
from gcmd.observe.stats import ServerStats


@pytest.mark.parametrize(("line", "expected"), [
    (b"ping", (b"ping", b"")),
    (b"ping\r", (b"ping", b"")),
    (b"  \tping", (b"ping", b"")),
    (b"comphash a file.txt", (b"comphash", b"a file.txt")),
    (b"comphash \t a b \t", (b"comphash", b"a b")),
    (b"lastlog 5\r", (b"lastlog", b"5")),
    (b"lastlog 5\r\r", (b"lastlog", b"5\r")),  # only one \r is the line ending
    (b"", (b"", b"")),
    (b" \t ", (b"", b"")),
    (b"\r", (b"", b"")),
    (b"\x0bping", (b"\x0bping", b"")),  # \v is not blank
    (b"ping\x0c", (b"ping\x0c", b"")),
    (b"\x00", (b"\x00", b"")),
    (b"comphash \xff\xfe", (b"comphash", b"\xff\xfe")),
])
def test_split_request(line, expected):
    assert split_request(line) == expected


@pytest.mark.parametrize(("pending", "data", "expected"), [
    # (pending, data) -> (complete lines, new pending, a line is too long); max_line 8
    (b"", b"ping\n", ([b"ping"], b"", False)),
    (b"", b"ping", ([], b"ping", False)),
    (b"pi", b"ng\nhe", ([b"ping"], b"he", False)),
    (b"", b"a\nb\n\nc\n", ([b"a", b"b", b"", b"c"], b"", False)),
    (b"", b"ping\r\n", ([b"ping\r"], b"", False)),  # the \r is split_request's business
    (b"", b"12345678\n", ([b"12345678"], b"", False)),  # at the limit
    (b"", b"123456789\n", ([], b"", True)),  # one byte over
    (b"", b"ok\n123456789\nlater\n", ([b"ok"], b"", True)),  # the lines before it are served
    (b"", b"123456789", ([], b"", True)),  # no newline yet, already too long
    (b"12345", b"6789", ([], b"", True)),
    (b"1234", b"5678", ([], b"12345678", False)),
    (b"", b"ok\n123456789", ([b"ok"], b"", True)),  # a rest too long: served, then cut
    (b"", b"", ([], b"", False)),
])
def test_split_lines(pending, data, expected):
    assert split_lines(pending, data, 8) == expected


@pytest.mark.parametrize(("data", "expected"), [
    (b"Cmd ping", "Cmd ping"),
    (b"a\\b", "a\\x5cb"),
    (b"evil\r\n2026-01-01 [-] forged", "evil\\x0d\\x0a2026-01-01 [-] forged"),
    (b"\x1b[2J", "\\x1b[2J"),
    (b"nul\x00", "nul\\x00"),
    (b"del\x7f", "del\\x7f"),
    (b"c1\xc2\x85", "c1\\x85"),
    (b"bad\xff\xfe", "bad\\xff\\xfe"),
    ("café ünïcode".encode(), "café ünïcode"),
    (b"", ""),
    (b" !~}", " !~}"),  # the ends of the plain range
    (b"tab\there", "tab\\x09here"),
    (b"\x1f\x20", "\\x1f "),
    (b"ping\r", "ping\\x0d"),
])
def test_escape_makes_one_safe_line(data, expected):
    assert escape(data) == expected


@pytest.mark.parametrize("byte", range(256))
def test_escape_leaves_only_printable_ascii_but_backslash_as_is(byte):
    data = bytes([byte])
    plain = 0x20 <= byte < 0x7F and byte != 0x5C
    assert (escape(data) == chr(byte)) == plain
    assert escape(b"ok" + data) == "ok" + escape(data)


def test_echo_path_is_escaped_and_cut():
    assert echo_path(b"a\nb") == "a\\x0ab"
    assert echo_path(b"x" * 1000) == "x" * 256 + "..."


def test_error_line():
    assert error_line("server busy, try again later") == b"An error occured : server busy, try again later\n"


def test_block():
    assert block(b"lastlog", [b"a", b"b"]) == b"Begin lastlog\na\nb\nEnd lastlog\n"
    assert block(b"lastlog", []) == b"Begin lastlog\nEnd lastlog\n"


@pytest.mark.parametrize(("line", "shown"), [
    (b"ping", "ping"),
    (b"ping\r", "ping"),
    (b"hello \x1b[2J\\ \xff", "hello \\x1b[2J\\x5c \\xff"),
    (b"auth s3cret", "auth ***"),
    (b"auth s3cret\r", "auth ***"),
    (b"  auth   s3cret", "auth ***"),
])
def test_a_request_as_the_log_shows_it_and_a_secret_never_kept(line, shown):
    commands = Commands(Config(), None, None, ServerStats())
    handler, _ = commands.parse(line)
    assert commands.loggable(line, handler) == shown
    assert commands.shown.get(line, shown) == shown  # as remembered
    assert (line in commands.shown) is (b"s3cret" not in line)
