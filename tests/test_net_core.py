"""The network core in the states where a client's life can end: a revocation that
comes while a follow is not yet streaming (in-process server on port 0, gevent
clients), a listener that fails (a real gcmd process)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import socket
import time

import gevent.socket
import pytest
from support import (
    AUTH_OK,
    BEGIN_FOLLOW,
    END_FOLLOW,
    SHUTTING_DOWN,
    Client,
    poll,
    wait_for,
)

from gcmd.commands import command_words
from gcmd.net.addresses import Counts
from gcmd.users import parse_users

BYE = b"Authentication required. bye !\n"
#: lines of the served log: a follow's backlog far larger than the loopback's socket buffers
BACKLOG_LINES, LINE = 1000, b"x" * 8000


def user(name: str) -> dict:
    token = hashlib.sha256(f"{name}-token".encode()).hexdigest()
    return {"name": name, "token_sha256": token, "logs": ["*"], "commands": ["follow"]}


def test_a_follow_revoked_while_its_backlog_is_written_ends_once_sent(make_server, tmp_path):
    logfile = tmp_path / "big.log"
    logfile.write_bytes(b"".join(b"%d %s\n" % (i, LINE) for i in range(BACKLOG_LINES)))
    users = parse_users([user("alice"), user("bob")], str(tmp_path / "root"), ["big", "gcmd"], command_words())
    server = make_server(logfiles=(f"big={logfile}",), users=users)
    raw = gevent.socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the backlog waits for alice
    raw.connect(("127.0.0.1", server.port))
    alice = Client(server.port, sock=raw)
    assert alice.ask("auth alice alice-token") == AUTH_OK
    alice.send(f"follow {BACKLOG_LINES}\n")
    # alice reads nothing: her greenlet writes the backlog when SIGHUP removes her
    poll(lambda: any(c.state == "writing" and c.follow is not None for c in server.clients))
    server.commands.set_users(parse_users([user("bob")], str(tmp_path / "root"), ["big", "gcmd"],
                                          command_words()))
    server.end_revoked_follows()
    assert alice.line() == BEGIN_FOLLOW
    for i in range(BACKLOG_LINES):
        assert alice.line().startswith(b"%d " % i)
    with open(logfile, "ab") as log:
        log.write(b"after the reload\n")
    assert alice.line() == END_FOLLOW
    assert alice.line() == BYE and alice.closed()


#: Linux's pidfd_getfd(2): a copy of another process's descriptor (x86-64 and arm64 alike)
SYS_PIDFD_GETFD = 438


def shut_listener(pid: int, port: int) -> None:
    """shutdown(2) the listening socket of process ``pid`` on ``port``, through a copy of its
    descriptor: its next accept fails with EINVAL, as when a listener is lost."""
    libc, pidfd = ctypes.CDLL(None, use_errno=True), os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            if (fd := libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)) < 0:
                if ctypes.get_errno() in (errno.EPERM, errno.ENOSYS):
                    pytest.skip("needs pidfd_getfd(2) on the server's process")
                continue
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            with sock:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) and sock.getsockname()[1] == port:
                    sock.shutdown(socket.SHUT_RD)
                    return
    finally:
        os.close(pidfd)
    raise AssertionError(f"no listener on port {port} in process {pid}")


def test_gcmd_whose_listener_fails_shuts_down_and_exits_1(gcmd):
    server = gcmd()
    client = server.client()
    assert client.ask("ping") == b"pong\n"
    shut_listener(server.proc.pid, server.port)
    wait_for(lambda: "cannot accept connections any more" in server.log())
    # a process that accepts nobody must end (systemd restarts it), its clients told why
    assert client.line() == SHUTTING_DOWN and client.closed()
    assert server.proc.wait(timeout=15) == 1


#: a lastlog reply just under FLUSH_AT (64 KiB): it goes out after the quit that follows it
SLOW_LINES, SLOW_LINE = 8, b"x" * 7999
#: seconds a slow client takes no byte: over the 2 s of a farewell, far under the 300 s idle timeout
STALL = 3.0


def test_a_reply_before_quit_has_the_idle_timeout_not_the_farewells_2_s(gcmd, tmp_path):
    logfile = tmp_path / "wide.log"
    logfile.write_bytes(b"".join(b"%04d " % i + SLOW_LINE + b"\n" for i in range(SLOW_LINES)))
    server = gcmd(logfile=logfile)
    sock = socket.socket()
    # a small window and small segments (a slow link): the server's send buffer stays small
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 88)
    sock.connect(("127.0.0.1", server.port))
    client = Client(server.port, 10, sock=sock)
    client.send(b"lastlog %d\nquit\n" % SLOW_LINES)
    time.sleep(STALL)  # the slow client itself: it takes nothing for a while (no wait for the server)
    assert client.line() == b"Begin lastlog\n"
    assert len(client.block(b"End lastlog\n")) == SLOW_LINES + 1
    assert client.closed()
    wait_for(lambda: "Reason: closed by the server after exit" in server.log(), timeout=5,
             message=server.log()[-300:])


def test_counts_by_address_forget_an_address_counted_down_to_nothing():
    counts = Counts()
    counts.add("10.0.0.1")
    counts.add("10.0.0.1")
    counts.add("10.0.0.2")
    counts.drop("10.0.0.1")
    counts.drop("10.0.0.2")
    assert counts == {"10.0.0.1": 1} and list(counts) == ["10.0.0.1"]
