"""Property-based fuzzing of the wire protocol against one real gcmd process.

Random request lines, cut into random TCP writes: every non-blank request gets
exactly one reply, in order, and the replies we can predict are exact.
"""

from __future__ import annotations

import hashlib
import re
import socket

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import (
    ERROR,
    HASH_USAGE,
    LASTLOG_USAGE,
    LOG_LINES,
    NEED_PATH,
    NOT_FOUND,
    PONG,
    GcmdProcess,
)

from gcmd import __version__
from gcmd.net.wire import telnet_commands

pytestmark = pytest.mark.timeout(30)

MAX_LINE = 1024
DATA = b"fuzzing data\n" * 100
#: the fixed-size algorithms of hashlib.algorithms_guaranteed
ALGORITHMS = sorted(a for a in hashlib.algorithms_guaranteed if not a.startswith("shake_"))
#: words whose reply ends the session (or needs a token), or streams (follow): never sent
#: requests that end the connection or change what the next replies are (auth, format)
CLOSING = {b"exit", b"quit", b"auth", b"follow", b"format"}
KNOWN = {b"ping", b"help", b"stats", b"lastlog", b"comphash", b"hash", b"version", b"whoami"}

FUZZ = settings(max_examples=1200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = GcmdProcess(tmp_path_factory.mktemp("fuzz"), "--max-line", MAX_LINE, "--hash-cache", 0)
    (process.root / "data.bin").write_bytes(DATA)
    yield process
    assert process.proc.poll() is None, "the server died while being fuzzed"
    process.stop()


@pytest.fixture(scope="module")
def help_reply(server) -> list[bytes]:
    client = server.client()
    client.send(b"help\n")
    lines = client.block(b"End help\n")
    client.close()
    return lines


# --- what the protocol says the reply is --------------------------------------------------

def split_request(line: bytes) -> tuple[bytes, bytes] | None:
    """(word, argument) as PROTOCOL.md defines them; None for a blank line."""
    if line.endswith(b"\r"):
        line = line[:-1]
    line = line.lstrip(b" \t")
    if not line.strip(b" \t"):
        return None
    parts = re.split(rb"[ \t]+", line, maxsplit=1)
    return parts[0], (parts[1].rstrip(b" \t") if len(parts) > 1 else b"")


def hash_line(algorithm: str) -> bytes:
    return f"File hash is : {hashlib.new(algorithm, DATA).hexdigest()}\n".encode()


def check_reply(line: bytes, reply: list[bytes], help_lines: list[bytes]) -> None:
    """Assert that ``reply`` is what the protocol promises for ``line``."""
    word, arg = split_request(line)
    event(f"reply to {word.decode('latin-1') if word in KNOWN else 'another word'}")
    single = reply[0] if len(reply) == 1 else None
    if word == b"ping":
        assert reply == [PONG]
    elif word == b"help":
        assert reply == help_lines
    elif word == b"stats":
        assert reply[0] == b"Begin stats\n" and reply[-1] == b"End stats\n"
        assert all(re.fullmatch(rb"[A-Za-z0-9_.-]+ -?\d+\n", figure) for figure in reply[1:-1]), reply
    elif word == b"lastlog":
        check_lastlog(arg, reply)
    elif word == b"logs":
        assert reply[0] == b"Begin logs\n" and reply[-2:] == [b"gcmd memory\n", b"End logs\n"], reply
    elif word == b"comphash":
        if not arg:
            assert reply == [NEED_PATH]
        elif arg == b"data.bin":
            assert reply == [hash_line("sha1")]
        else:
            assert single is not None and single.startswith(ERROR), reply
    elif word == b"version":
        assert reply == [f"gcmd {__version__} protocol 1.2\n".encode()]
    elif word == b"whoami":
        assert reply == [b"anonymous\n"]
    elif word == b"hash":
        algorithm, _, path = arg.partition(b" ")
        if split_request(arg) is None:  # the server splits the argument as a line: "\r" alone is blank
            assert reply == [HASH_USAGE]
        elif algorithm.decode("latin-1") in ALGORITHMS and path.strip(b" \t") == b"data.bin":
            assert reply == [hash_line(algorithm.decode())]
        else:
            assert single is not None and single.startswith(
                (ERROR, NEED_PATH, b"File hash is : ")), reply
    else:
        assert reply == [NOT_FOUND]


def check_lastlog(arg: bytes, reply: list[bytes]) -> None:
    """``lastlog [N] [LOGS] [grep PATTERN]`` of PROTOCOL.md 1.2, on a server whose default log is syslog."""
    words = re.split(rb"[ \t]+", arg) if arg else []
    count = 10
    if words and re.fullmatch(rb"[+-]?[0-9]+", words[0]):
        count = int(words.pop(0))
    names = [b"syslog"]
    if words and words[0] not in (b"grep", b"from"):
        names = words.pop(0).split(b",")
    grep = bool(words) and words[0] == b"grep"
    if grep and len(words) > 1:
        words = []
    if words or not 1 <= count <= 1000 or b"" in names or len(set(names)) != len(names) or len(names) > 16:
        assert reply == [LASTLOG_USAGE]
    elif any(name not in (b"syslog", b"gcmd") for name in names):
        assert len(reply) == 1 and reply[0].startswith(ERROR + b"unknown log "), reply
    elif grep or names != [b"syslog"]:
        single = reply[0] if len(reply) == 1 else b""
        assert (reply[0] == b"Begin lastlog\n" and reply[-1] == b"End lastlog\n"
                or single.startswith(ERROR + b"bad pattern: ")), reply
    else:
        assert reply == [b"Begin lastlog\n", *[(text + "\n").encode() for text in LOG_LINES[-count:]],
                         b"End lastlog\n"]


def read_reply(client) -> list[bytes]:
    first = client.line()
    if first.startswith(b"Begin "):
        return [first, *client.block(b"End " + first[len(b"Begin "):])]
    return [first]


# --- what an attacker sends ------------------------------------------------------------------

no_newline = st.binary(max_size=60).map(lambda data: data.replace(b"\n", b""))
blanks = st.text(alphabet=" \t", max_size=3).map(str.encode)
words = st.sampled_from([b"ping", b"help", b"stats", b"lastlog", b"comphash", b"hash", b"PING",
                         b"lastlogfoo", b"pingx", b"nope", b"\x00", b"\x0b", b"\xff", b"st\xc2\x85"])
arguments = st.one_of(
    no_newline,
    st.integers(min_value=0, max_value=2000).map(lambda n: str(n).encode()),
    st.sampled_from([b"data.bin", b"missing.txt", b"../outside", b"/etc/passwd", b"\xef\xbc\x95",
                     b"000012", b"-3", b"1e3", b"\x00"]),
    st.tuples(st.sampled_from([*ALGORITHMS, "SHA1", "shake_128", "nope", ""]), blanks,
              st.sampled_from([b"data.bin", b"", b"missing", b"\xff\xfe"])).map(
        lambda t: t[0].encode() + b" " + t[1] + t[2]),
)
commands = st.builds(lambda lead, word, sep, arg, trail, cr: lead + word + sep + arg + trail + cr,
                     blanks, words, st.sampled_from([b"", b" ", b"\t", b" \t "]), arguments, blanks,
                     st.sampled_from([b"", b"\r"]))
blank_lines = st.builds(lambda text, cr: text + cr, blanks, st.sampled_from([b"", b"\r"]))


def harmless(line: bytes) -> bytes:
    parsed = split_request(line)
    if parsed is not None and parsed[0] in CLOSING:
        return b"ping"
    return line[:MAX_LINE]


lines = st.lists(st.one_of(commands, no_newline, blank_lines).map(harmless), min_size=1, max_size=12)


def send_in_pieces(client, stream: bytes, cuts: list[int]) -> None:
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = 0
    for cut in sorted({cut % (len(stream) + 1) for cut in cuts}) + [len(stream)]:
        if cut > start:
            client.send(stream[start:cut])
            start = cut


# --- properties ---------------------------------------------------------------------------

@pytest.mark.slow
@FUZZ
@given(requests=lines, cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=10))
def test_one_reply_per_request_in_order_however_the_stream_is_cut(server, help_reply, requests, cuts):
    client = server.client(timeout=10)
    try:
        send_in_pieces(client, b"".join(line + b"\n" for line in requests), cuts)
        for line in requests:
            if split_request(line) is not None:
                check_reply(line, read_reply(client), help_reply)
        # nothing more came for these requests: the next reply is this pong
        assert client.ask("ping") == PONG
    finally:
        client.close()


@pytest.mark.slow
@FUZZ
@given(requests=lines, unterminated=no_newline, cuts=st.lists(st.integers(min_value=0), max_size=5))
def test_half_close_answers_every_complete_request_then_closes(server, help_reply, requests,
                                                               unterminated, cuts):
    client = server.client(timeout=10)
    try:
        send_in_pieces(client, b"".join(line + b"\n" for line in requests) + unterminated, cuts)
        client.sock.shutdown(socket.SHUT_WR)
        for line in requests:
            if split_request(line) is not None:
                check_reply(line, read_reply(client), help_reply)
        assert client.closed() and client.buf == b"", client.buf  # the last piece is ignored
    finally:
        client.close()


@settings(max_examples=500, deadline=None, database=None)
@given(junk=st.binary(min_size=1, max_size=MAX_LINE).map(lambda data: data.replace(b"\n", b"")))
def test_random_bytes_get_exactly_one_line(server, junk):
    if telnet_commands(junk)[0] != junk:  # telnet's Ctrl-C is no request (it ends a follow)
        return
    parsed = split_request(junk)
    if parsed is None or parsed[0] in CLOSING | {b"help", b"stats", b"lastlog", b"logs"}:
        return
    client = server.client(timeout=10)
    try:
        reply = client.ask(junk)
        one_liners = (PONG, NOT_FOUND, NEED_PATH, HASH_USAGE, b"anonymous\n",
                      f"gcmd {__version__} protocol 1.2\n".encode())
        assert reply in one_liners or reply.startswith(ERROR), reply
        assert client.ask("ping") == PONG
    finally:
        client.close()
