"""The wire format: request lines, reply strings, error lines and log escaping.

Replies are bytes, byte for byte those of the tutorial server (including its
spelling "occured"); see PROTOCOL.md.
"""

from __future__ import annotations

import re
from typing import final

PONG = b"pong\n"
NOT_FOUND = b"Command not found.\n"
NEED_PATH = b"Please provide a path.\n"
LASTLOG_USAGE = b"Usage: lastlog [LINES] [LOG]\n"
FOLLOW_USAGE = b"Usage: follow [LOG]\n"
BEGIN_FOLLOW = b"Begin follow\n"
END_FOLLOW = b"End follow\n"
HASH_USAGE = b"Usage: hash ALGO PATH\n"
TOO_MANY = b"Too many connections. bye !\n"
TOO_MANY_FROM_ADDRESS = b"Too many connections from your address. bye !\n"
LINE_TOO_LONG = b"Line too long. bye !\n"
IDLE_TIMEOUT = b"Idle timeout. bye !\n"
SHUTTING_DOWN = b"Server shutting down. bye !\n"
AUTH_REQUIRED = b"Authentication required.\n"
#: a user that SIGHUP removed or changed, at its next request or during a follow
AUTH_REQUIRED_BYE = b"Authentication required. bye !\n"
AUTH_OK = b"Authenticated.\n"
AUTH_FAILED = b"Authentication failed. bye !\n"
AUTH_DISABLED = b"Authentication is not enabled.\n"
BUSY = "server busy, try again later"
INTERNAL_ERROR = "internal error"

#: how much of a client's path an error message echoes
MAX_ECHOED_PATH = 256


@final  # gcmd.net.client tests its exact type
class Close(bytes):
    """A reply after which the server closes the connection; ``reason`` says why, for the log."""

    reason: str

    def __new__(cls, line: bytes, reason: str) -> Close:
        reply = super().__new__(cls, line)
        reply.reason = reason
        return reply


class Follow(bytes):
    """``Begin follow`` (and a backlog): a reply after which the client follows the
    source its command handed to ``start_following`` (gcmd.net.client.Client._follow)."""


class CommandError(Exception):
    """A failure a client caused or can act on; it becomes one error line."""


def error_line(message: str) -> bytes:
    return b"An error occured : %s\n" % message.encode("utf-8", "backslashreplace")


def block(name: bytes, lines: list[bytes]) -> bytes:
    """A multi-line reply: ``Begin name``, the lines, ``End name``."""
    return b"".join([b"Begin %s\n" % name, *(line + b"\n" for line in lines), b"End %s\n" % name])


#: the end of a line, as an int: ``LF in data`` is one memchr, where ``b"\n" in data``
#: first tries to read b"\n" as an int, and makes and drops a TypeError (CPython 3.11)
LF = ord("\n")


def split_lines(pending: bytes, data: bytes, max_line: int) -> tuple[list[bytes], bytes, bool]:
    """Frame requests: the complete lines of ``pending + data`` (without their
    ``\n``), the unterminated rest, and whether a line is over ``max_line``
    bytes (its ``\n`` not counted).

    When a line is too long, only the lines before it are returned and the
    rest is dropped: the client gets the replies to those, then is cut. An
    unterminated rest that is already too long counts as a line too long.
    """
    if pending:
        data = pending + data
    if LF not in data:
        if len(data) > max_line:
            return [], b"", True
        return [], data, False
    lines = data.split(b"\n")
    rest = lines.pop()
    if len(data) > max_line:  # else no line can be too long: skip the checks
        for index, line in enumerate(lines):
            if len(line) > max_line:
                return lines[:index], b"", True
        if len(rest) > max_line:
            return lines, b"", True
    return lines, rest, False


_BLANKS = b" \t"
_WORD_SPLIT = re.compile(rb"[ \t]+").split


def split_request(line: bytes) -> tuple[bytes, bytes]:
    """The command word and the argument of a request line (without its newline).

    Only spaces and tabs separate them; one trailing ``\\r`` is the line
    ending of ``nc -C`` and telnet, not part of the argument. A blank line
    gives an empty word.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    parts = _WORD_SPLIT(line.lstrip(_BLANKS), 1)
    if len(parts) == 1:
        return parts[0], b""
    return parts[0], parts[1].rstrip(_BLANKS)


def _escape_table() -> dict[int, str]:
    unsafe = [*range(0x20), 0x5C, *range(0x7F, 0xA0)]
    table = {c: f"\\x{c:02x}" for c in unsafe}
    # bytes that are not UTF-8 come back from surrogateescape as U+DC80..U+DCFF
    table.update({0xDC00 + b: f"\\x{b:02x}" for b in range(0x80, 0x100)})
    return table


_ESCAPES = _escape_table()
#: the bytes escape() leaves as they are: bytes.translate deletes them, and what
#: is left needs escaping (on a short request, about half the time of a regex match)
_PLAIN = bytes(c for c in range(0x20, 0x7F) if c != 0x5C)


def escape(data: bytes) -> str:
    """Client bytes as one safe line of text for a log or an error message.

    Control characters (C0, DEL, C1), backslashes and bytes that are not
    UTF-8 become ``\\xNN``, so nothing a client sends can end a log line or
    reach an operator's terminal as an escape sequence.
    """
    if not data.translate(None, _PLAIN):
        return data.decode("ascii")
    return data.decode("utf-8", "surrogateescape").translate(_ESCAPES)


def common_name(certificate: dict) -> str:
    """The CN of a certificate's subject (``getpeercert()``'s dict), escaped for the log; "" if none."""
    names = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    return escape(names[0].encode(errors="replace")) if names else ""


def echo_path(path: bytes) -> str:
    """A client's path as an error message quotes it: escaped and cut."""
    text = escape(path)
    if len(text) > MAX_ECHOED_PATH:
        text = text[:MAX_ECHOED_PATH] + "..."
    return text



# --- 1.2 ---------------------------------------------------------------------------------
#: the version of the protocol this server speaks, in the reply to ``version``
PROTOCOL_VERSION = "1.2"
OK = b"OK\n"
FORMAT_USAGE = b"Usage: format text|json\n"
LASTLOG_QUERY_USAGE = b"Usage: lastlog [LINES] [LOGS] [grep PATTERN]\n"
FOLLOW_QUERY_USAGE = b"Usage: follow [LINES] [LOGS] [from CURSORS] [grep PATTERN]\n"


#: telnet's Interpret As Command byte (RFC 854), as an int (see LF)
IAC = 0xFF
#: what telnet sends for Ctrl-C: IAC IP (Interrupt Process), then IAC DO TIMING-MARK
#: (RFC 860); the reply to DO TIMING-MARK
_TELNET_IP, _TELNET_DO_TM = b"\xff\xf4", b"\xff\xfd\x06"
TELNET_WILL_TM = b"\xff\xfb\x06"


def telnet_commands(data: bytes) -> tuple[bytes, bytes]:
    """What a read that holds nothing but telnet's Ctrl-C means, and the reply it asks for.

    Telnet sends Ctrl-C on its own: IAC IP, then IAC DO TIMING-MARK, and
    discards what it receives until the mark is answered WILL TIMING-MARK
    (RFC 854, RFC 860). Such a read is a line end (it ends a follow as Enter
    does; elsewhere it is a blank line: no reply). Any other read is left as it
    is, so that 0xFF in a path stays a byte of the path.
    """
    if data.replace(_TELNET_IP, b"").replace(_TELNET_DO_TM, b""):
        return data, b""
    return (b"\n" if _TELNET_IP in data else b""), TELNET_WILL_TM * data.count(_TELNET_DO_TM)
