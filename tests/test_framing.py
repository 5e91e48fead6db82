"""The wire format as plain functions: request splitting, escaping, error lines."""

import pytest

from gcmd.protocol import block, echo_path, error_line, escape, split_request


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
])
def test_escape_makes_one_safe_line(data, expected):
    assert escape(data) == expected


def test_echo_path_is_escaped_and_cut():
    assert echo_path(b"a\nb") == "a\\x0ab"
    assert echo_path(b"x" * 1000) == "x" * 256 + "..."


def test_error_line():
    assert error_line("server busy, try again later") == b"An error occured : server busy, try again later\n"


def test_block():
    assert block(b"lastlog", [b"a", b"b"]) == b"Begin lastlog\na\nb\nEnd lastlog\n"
    assert block(b"lastlog", []) == b"Begin lastlog\nEnd lastlog\n"
