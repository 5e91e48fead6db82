"""Every command: as a plain function of the request where no socket is needed, and
through a real socket to an in-process server on port 0 for what a connection does
(pipelining, exit, half-close)."""

import hashlib
import socket
from pathlib import Path

import pytest
from support import (
    ERROR,
    FOLLOW_USAGE,
    LASTLOG_USAGE,
    LOG_LINES,
    OUTSIDE,
    sha1_of,
    write_file,
)

from gcmd.commands import internal_error_words
from gcmd.hashing import ALGORITHMS

pytestmark = pytest.mark.timeout(20)


@pytest.mark.parametrize(("request_line", "reply"), [
    (b"ping", b"pong\n"),
    (b"ping\r", b"pong\n"),
    (b"   \tping", b"pong\n"),
    (b"ping extra words", b"pong\n"),
    (b"pingx", b"Command not found.\n"),
    (b"PING", b"Command not found.\n"),
    (b"hello server", b"Command not found.\n"),
    (b"lastlogfoo", b"Command not found.\n"),
    (b"exitnow", b"Command not found.\n"),
    (b"\x0bping", b"Command not found.\n"),
    (b"\x00", b"Command not found.\n"),
    (b"comphash", b"Please provide a path.\n"),
    (b"comphash \t ", b"Please provide a path.\n"),
    (b"hash", b"Usage: hash ALGO PATH\n"),
    (b"hash sha256", b"Please provide a path.\n"),
    (b"lastlog 0", LASTLOG_USAGE),
    (b"lastlog 1001", LASTLOG_USAGE),
    (b"lastlog -5", LASTLOG_USAGE),
    (b"lastlog +2000", LASTLOG_USAGE),
    (b"lastlog 00000000000000000000000000000000005000", LASTLOG_USAGE),
    (b"lastlog 1 syslog x", LASTLOG_USAGE),
    (b"lastlog abc 5", LASTLOG_USAGE),
    (b"lastlog abc", b"An error occured : unknown log 'abc' (choose from syslog, gcmd)\n"),
    (b"lastlog 5 6", b"An error occured : unknown log '6' (choose from syslog, gcmd)\n"),
    (b"lastlog \x1b[2J", b"An error occured : unknown log '\\x1b[2J' (choose from syslog, gcmd)\n"),
    (b"follow a b", FOLLOW_USAGE),
    (b"follow nosuch", b"An error occured : unknown log 'nosuch' (choose from syslog, gcmd)\n"),
    (b"logs", b"Begin logs\nsyslog SYSLOG\ngcmd memory\nEnd logs\n"),
    (b"auth anything", b"Authentication is not enabled.\n"),
])
def test_one_line_replies(commands, request_line, reply):
    assert commands.ask(request_line) == reply.replace(b"SYSLOG", commands.config.logfiles[0].encode())


@pytest.mark.parametrize("blank", [b"", b"\r", b" \t ", b"\t\r"])
def test_blank_line_is_no_request(commands, blank):
    assert commands.ask(blank) is None


def test_blank_lines_get_no_reply(server, connect):
    c = connect(server)
    c.send(b"\n\r\n \t \n")
    assert c.ask("ping") == b"pong\n"
    assert c.buf == b""


def test_lastlog_default_and_n(server, connect):
    c = connect(server)
    c.send("lastlog\n")
    assert c.block(b"End lastlog\n") == [b"Begin lastlog\n"] + [
        (line + "\n").encode() for line in LOG_LINES[-10:]] + [b"End lastlog\n"]
    c.send("lastlog 2\n")
    assert c.block(b"End lastlog\n") == [b"Begin lastlog\n"] + [
        (line + "\n").encode() for line in LOG_LINES[-2:]] + [b"End lastlog\n"]


def test_lastlog_drops_header_and_forged_lines(make_server, connect, tmp_path):
    log = tmp_path / "forged.log"
    log.write_bytes(b"one\n==> header <==\nEnd lastlog\nBegin lastlog\npong\nlast")
    c = connect(make_server(logfiles=(str(log),)))
    c.send("lastlog\n")
    assert c.block(b"End lastlog\n") == [b"Begin lastlog\n", b"one\n", b"pong\n", b"last\n",
                                         b"End lastlog\n"]


def test_lastlog_reply_follows_the_log_as_it_grows(server, connect):
    c = connect(server)
    c.send("lastlog 1\n")
    assert c.block(b"End lastlog\n")[1] == (LOG_LINES[-1] + "\n").encode()
    with open(server.config.logfiles[0], "a") as f:
        f.write("a new line\n")
    c.send("lastlog 1\n")
    assert c.block(b"End lastlog\n")[1] == b"a new line\n"


@pytest.mark.parametrize(("exc", "words"), [
    (RuntimeError("can't start new thread"), "internal error: out of memory or threads"),
    (MemoryError(), "internal error: out of memory or threads"),
    (RuntimeError("dictionary changed size during iteration"), "internal error"),
    (ValueError("can't start new thread"), "internal error"),
])
def test_internal_errors_say_when_the_machine_is_out_of_memory_or_threads(exc, words):
    assert internal_error_words(exc) == words


def test_lastlog_missing_log_names_the_file_and_its_flag_without_the_operators_hint(make_server, connect, tmp_path):
    c = connect(make_server(logfiles=(str(tmp_path / "no-such.log"),)))
    reply = c.ask("lastlog")
    assert reply == ERROR + (f"cannot read the log file '{tmp_path}/no-such.log' (--logfile): "
                             "No such file or directory\n").encode()
    assert c.ask("ping") == b"pong\n"


@pytest.mark.parametrize("journal", [False, True])
def test_follow_of_a_log_that_cannot_be_read_gets_the_lastlog_error(make_server, connect, tmp_path, journal):
    source = f"journal:{tmp_path}/missing" if journal else str(tmp_path / "missing.log")
    c = connect(make_server(logfiles=(f"bad={source}",)))
    error = c.ask("lastlog bad")
    assert error.startswith(ERROR) and b"missing" in error
    assert c.ask("follow bad") == error
    assert c.ask("ping") == b"pong\n"


def test_comphash_relative_absolute_and_spaced(server, connect):
    root = server.hashing.served_root.decode()
    small = write_file(Path(root) / "small.txt", 100)
    spaced = write_file(Path(root) / "with space.bin", 3 << 20)
    c = connect(server)
    assert c.ask("comphash small.txt") == f"File hash is : {sha1_of(small)}\n".encode()
    assert c.ask(f"comphash {small}") == f"File hash is : {sha1_of(small)}\n".encode()
    assert c.ask("comphash ./sub/../small.txt") == f"File hash is : {sha1_of(small)}\n".encode()
    assert c.ask("comphash with space.bin") == f"File hash is : {sha1_of(spaced)}\n".encode()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_hash_every_algorithm(commands, algorithm):
    path = write_file(Path(commands.config.root) / "f.bin", 200_000)
    expected = hashlib.new(algorithm, path.read_bytes()).hexdigest()
    assert commands.ask(f"hash {algorithm} f.bin") == f"File hash is : {expected}\n".encode()


def test_hash_unknown_algorithm_lists_the_choices(commands):
    reply = commands.ask("hash crc32 f.bin")
    assert reply.startswith(b"An error occured : unknown algorithm 'crc32' (choose from ")
    assert b"sha256" in reply and b"md5" in reply and b"shake" not in reply


def test_comphash_errors(commands):
    root = Path(commands.config.root)
    (root / "d").mkdir()
    c = commands
    assert c.ask("comphash nope.txt") == (
        b"An error occured : [Errno 2] No such file or directory: 'nope.txt'\n")
    assert c.ask("comphash d") == b"An error occured : Not a regular file: 'd'\n"
    assert c.ask(b"comphash a\x00b") == b"An error occured : Invalid path: it contains a NUL byte\n"
    assert c.ask(b"comphash \xff\x1b[2J") == (
        b"An error occured : [Errno 2] No such file or directory: '\\xff\\x1b[2J'\n")
    assert c.ask("comphash ../outside") == OUTSIDE
    assert c.ask("comphash /etc/hostname") == OUTSIDE


def test_comphash_sees_a_changed_file(commands):
    path = Path(commands.config.root) / "changing.txt"
    path.write_bytes(b"first")
    c = commands
    assert c.ask("comphash changing.txt") == f"File hash is : {sha1_of(path)}\n".encode()
    path.write_bytes(b"second, longer")
    assert c.ask("comphash changing.txt") == f"File hash is : {sha1_of(path)}\n".encode()


def test_help_lists_every_command_with_its_description(commands):
    lines = commands.ask("help").splitlines(keepends=True)
    assert lines[0] == b"Begin help\n"
    words = [line.split()[0] for line in lines[1:-1]]
    assert words == [b"auth", b"comphash", b"exit", b"follow", b"format", b"hash", b"help", b"lastlog", b"logs",
                     b"ping", b"stats", b"version", b"whoami"]
    assert all(b" - " in line for line in lines[1:-1])


def test_stats_counts(make_server, connect):
    server = make_server(max_clients=7)
    c = connect(server)
    assert c.ask("ping") == b"pong\n"
    c.send("stats\n")
    lines = c.block(b"End stats\n")
    stats = dict(line.decode().split() for line in lines[1:-1])
    assert stats["clients"] == "1" and stats["max_clients"] == "7"
    assert stats["commands"] == "2" and stats["rejected"] == "0"
    assert int(stats["uptime_s"]) >= 0


@pytest.mark.parametrize("word", ["exit", "quit", "  exit", "exit\r"])
def test_exit_closes_without_reply(server, connect, word):
    c = connect(server)
    c.send(word + "\n")
    assert c.closed() and c.buf == b""


def test_pipelined_requests_answered_in_order(server, connect):
    root = Path(server.config.root)
    big = write_file(root / "big.bin", 5 << 20)
    c = connect(server)
    c.send("ping\ncomphash big.bin\nnope\nlastlog 1\nhash md5 big.bin\nping\nexit\nping\n")
    assert c.line() == b"pong\n"
    assert c.line() == f"File hash is : {sha1_of(big)}\n".encode()
    assert c.line() == b"Command not found.\n"
    assert c.block(b"End lastlog\n")[1] == (LOG_LINES[-1] + "\n").encode()
    assert c.line() == f"File hash is : {sha1_of(big, 'md5')}\n".encode()
    assert c.line() == b"pong\n"
    assert c.closed() and c.buf == b""


def test_requests_split_across_writes(server, connect):
    c = connect(server)
    for piece in (b"pi", b"ng\r", b"\npi", b"ng\n\nping", b"\n"):
        c.send(piece)
    assert [c.line(), c.line(), c.line()] == [b"pong\n"] * 3


def test_eof_answers_complete_requests_and_ignores_the_rest(server, connect):
    c = connect(server)
    c.send("ping\nlastlog 1\nping")  # the last line has no newline
    c.sock.shutdown(socket.SHUT_WR)
    assert c.line() == b"pong\n"
    assert c.block(b"End lastlog\n")[0] == b"Begin lastlog\n"
    assert c.closed() and c.buf == b""
