"""The network core in the states where a client's life can end: a revocation that
comes while a follow is not yet streaming, a listener that fails. In-process servers
on port 0, gevent clients."""

from __future__ import annotations

import hashlib
import socket

import gevent.socket
from support import AUTH_OK, BEGIN_FOLLOW, END_FOLLOW, Client, poll

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
