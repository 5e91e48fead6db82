"""journalctl's ``short`` format, made from an entry of ``journalctl --output json``.

The format follows ``output_short`` of systemd 252 (src/shared/logs-show.c,
the journalctl of Debian 12) with journalctl's defaults for a pipe (full
width, no ``--all``): the time (``_SOURCE_REALTIME_TIMESTAMP``, else
``__REALTIME_TIMESTAMP``, the first that is a valid time, local time,
``%b %d %H:%M:%S`` in the C locale),
`` HOST``, `` IDENT`` (``SYSLOG_IDENTIFIER``, else ``_COMM``, else
``unknown``), ``[PID]`` (``_PID``, else ``SYSLOG_PID``), ``: `` and the
message; a message of several lines continues under its first one; tabs
become 8 spaces, colour sequences (SGR) are taken out and carriage returns
before a newline or at the end dropped; a message with
other control characters or that is not UTF-8 is ``[N blob data]``; an entry
without ``MESSAGE`` is not shown. A field of 300 bytes or more, or not
printable, is not shown.
"""

from __future__ import annotations

import json
import re
import time

#: a field shown in the prefix must be shorter than this (bytes): PRINT_CHAR_THRESHOLD
_PRINT_THRESHOLD = 300
_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")
#: the control characters that make a text not printable (systemd's unichar_is_control): C0 but tab
#: and newline, DEL and C1
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]").search
#: a number as strtoull reads it with base 0, after the blanks systemd's safe_atou64 skips
_STRTOULL = re.compile(rb"[ \t\n\r\v\f]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)").fullmatch
#: a time at or after this is not one (microseconds): VALID_REALTIME of sd-journal
_REALTIME_LIMIT = 1 << 55


def _value(field: object) -> bytes | None:
    """A field of journalctl's JSON as bytes: a string, an array of its bytes, or
    (a field given several times) an array of those, of which the last counts."""
    if isinstance(field, str):
        return field.encode("utf-8", "surrogateescape")
    if isinstance(field, list) and field:
        if isinstance(field[0], int):
            return bytes(field)
        return _value(field[-1])
    return None


def _printable(value: bytes) -> bool:
    try:
        return not _CONTROL(value.decode("utf-8"))
    except UnicodeDecodeError:
        return False


def _shown(value: bytes | None) -> bool:
    return value is not None and len(value) < _PRINT_THRESHOLD and _printable(value)


def strip_tab_ansi(message: bytes) -> bytes:
    """``message`` with tabs as 8 spaces, colour (SGR ``ESC [ digits ; m``) and
    OSC (``ESC ] ... BEL``) sequences taken out, and carriage returns dropped
    before a newline and at the end, as systemd 252's strip_tab_ansi (a CR
    elsewhere stays, and makes the message a blob)."""
    if b"\x1b" not in message and b"\t" not in message and b"\r" not in message:
        return message
    out, i, n = bytearray(), 0, len(message)
    returns = 0  # carriage returns not written yet: gone if a newline or the end comes next
    while i < n:
        byte = message[i]
        if byte == 0x0D:
            returns += 1
            i += 1
            continue
        if returns and byte != 0x0A:
            out += b"\r" * returns
        returns = 0
        if byte == 0x09:
            out += b"        "
        elif byte != 0x1B or i + 1 >= n:
            out.append(byte)
        elif message[i + 1] in b"[]":
            end = _sequence_end(message, i + 2, message[i + 1] == 0x5B)
            if end is None:  # not a sequence: ESC and the bracket stay, the rest is read again
                out += message[i:i + 2]
                i += 2
                continue
            i = end
        else:  # ESC and the next byte stay as they are
            out += message[i:i + 2]
            i += 1
        i += 1
    return bytes(out)


def _sequence_end(message: bytes, start: int, csi: bool) -> int | None:
    """The index of the last byte of a colour (``csi``) or OSC sequence starting at
    ``start`` (after ``ESC [`` or ``ESC ]``), or None if it is not one."""
    for j in range(start, len(message)):
        byte = message[j]
        if csi:
            if byte == 0x6D:  # m
                return j
            if byte not in b"0123456789;":
                return None
        else:
            if byte == 0x07:
                return j
            if byte < 32 or byte > 126:
                return None
    return None


def format_bytes(size: int) -> bytes:
    """A size as systemd's FORMAT_BYTES: ``12B``, ``1.9K``, ``3.0M`` (IEC, one digit cut, not rounded)."""
    if size < 1024:
        return b"%dB" % size
    for exponent, suffix in ((6, b"E"), (5, b"P"), (4, b"T"), (3, b"G"), (2, b"M"), (1, b"K")):
        factor = 1024 ** exponent
        if size >= factor:
            digit = (size // (factor // 1024) * 10 // 1024) % 10
            return b"%d.%d%s" % (size // factor, digit, suffix)
    raise AssertionError  # unreachable


def _realtime(value: bytes | None) -> int | None:
    """A time in microseconds as journalctl 252 takes it from a field: read as
    systemd's safe_atou64 reads it (strtoull, base 0: blanks and a ``+`` before,
    ``0x`` hex, a leading ``0`` octal) and valid when 0 < it < 2^55 (VALID_REALTIME)."""
    if value is None:
        return None
    match = _STRTOULL(value)
    if match is None or (match[1] == b"-" and match[2].strip(b"0xX")):
        return None
    digits, base = match[2], 10
    if digits[:2] in (b"0x", b"0X"):
        digits, base = digits[2:], 16
    elif digits.startswith(b"0"):
        base = 8
    digits = digits.lstrip(b"0")
    if len(digits) > 20:  # over 2^55 whatever the base (and int() refuses thousands of digits)
        return None
    usec = int(digits or b"0", base)
    return usec if 0 < usec < _REALTIME_LIMIT else None


def _timestamp(entry: dict) -> bytes:
    usec = _realtime(_value(entry.get("_SOURCE_REALTIME_TIMESTAMP")))
    if usec is None:
        usec = _realtime(_value(entry.get("__REALTIME_TIMESTAMP")))
    if usec is None:
        return b""
    when = time.localtime(usec // 1_000_000)
    return b"%s %02d %02d:%02d:%02d" % (_MONTHS[when.tm_mon - 1], when.tm_mday, when.tm_hour,
                                          when.tm_min, when.tm_sec)


def short_lines(entry: dict) -> list[bytes]:
    """The lines journalctl's ``short`` format prints for ``entry`` (its ``-o json``
    object, decoded); none for an entry without ``MESSAGE``. See the module's text."""
    message = _value(entry.get("MESSAGE"))
    if message is None:
        return []
    message = strip_tab_ansi(message)
    prefix = _timestamp(entry)
    hostname = _value(entry.get("_HOSTNAME"))
    if _shown(hostname):
        prefix += b" " + hostname
    width = len(prefix)
    identifier, comm = _value(entry.get("SYSLOG_IDENTIFIER")), _value(entry.get("_COMM"))
    name = identifier if _shown(identifier) else comm if _shown(comm) else None
    if name is None:
        prefix += b" unknown"  # not counted in the width (as journalctl)
    else:
        prefix += b" " + name
        width += len(name) + 1
    pid, syslog_pid = _value(entry.get("_PID")), _value(entry.get("SYSLOG_PID"))
    pid = pid if _shown(pid) else syslog_pid if _shown(syslog_pid) else None
    if pid is not None:
        prefix += b"[" + pid + b"]"
        width += len(pid) + 2
    prefix += b": "
    if not _printable(message):
        return [prefix + b"[" + format_bytes(len(message)) + b" blob data]"]
    if not message:
        return [prefix]
    parts = message.split(b"\n")
    if message.endswith(b"\n"):
        parts.pop()
    indent = b" " * (width + 2)
    return [prefix + parts[0]] + [indent + part for part in parts[1:]]


def decode_entry(raw: bytes, cut: int) -> tuple[str | None, list[bytes]]:
    """journald's cursor and the short lines of one line of ``journalctl -o json``
    (``cut``: bytes of it not kept). An entry of more than MAX_LINE bytes of JSON
    is shown as ``[N bytes of journal entry not shown]``, with its cursor when the
    kept part names it; a line that is not an entry, as itself."""
    if not cut:
        try:
            entry = json.loads(raw)
        except ValueError:
            entry = None
        if isinstance(entry, dict):
            cursor = entry.get("__CURSOR")
            return (cursor if isinstance(cursor, str) else None), short_lines(entry)
    found = re.search(rb'"__CURSOR":"([^"]{1,200})"', raw)
    if cut:
        return (found[1].decode() if found else None), [b"[%d bytes of journal entry not shown]" % (len(raw) + cut)]
    return None, [raw]
