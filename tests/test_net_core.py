"""The network core in the states where a client's life can end: a revocation that
comes while a follow is not yet streaming (in-process server on port 0, gevent
clients), a listener that fails (a real gcmd process)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import socket

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
