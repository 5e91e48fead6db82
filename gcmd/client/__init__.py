"""A client of gcmd for Python programs: one connection, typed replies, a follow that resumes.

::

    from gcmd.client import Client

    with Client("127.0.0.1", 9999) as gcmd:
        gcmd.ping()                                    # 'pong'
        for line in gcmd.lastlog(20, logs="auth", grep="sshd"):
            print(line.log, line.text)
        for line in gcmd.follow(logs="auth"):          # every line once, across reconnects
            print(line.text)

A :class:`Client` holds one connection and speaks protocol 1.2 (PROTOCOL.md):
it checks the server's ``version`` when it connects, authenticates (``auth``)
when given a token, and asks for JSON lines (``format json``), so that a
log line arrives exactly as it was written, with its cursor. Every failure
is a :class:`GcmdError` (see its subclasses); a method either returns a whole
reply or raises, never part of one.

It uses the standard library's ``socket`` and ``ssl`` only, looked up when
they are used: it works in any Python program, and cooperatively in a
program that gevent's ``monkey.patch_all()`` has patched. A Client is not
thread-safe: give each thread (or greenlet) its own.

Source of the design: redis-py (a client object whose methods are the
commands, errors as exceptions, one retry on a connection that went stale)
and python-systemd's ``journal.Reader`` (a follow that resumes after a
cursor).

The package's modules, one concern each: ``errors`` (GcmdError and the
reply lines each error stands for), ``replies`` (LogLine, Note, Version: what
replies become), ``requests`` (request lines), ``connection`` (the socket,
reading whole replies, the one retry) and ``client`` (Client: the commands,
the follow that resumes). Import the public names from ``gcmd.client``.
"""

from gcmd.client.client import Client
from gcmd.client.errors import (
    AuthenticationError,
    CommandError,
    ConnectionLost,
    GcmdError,
    PermissionDenied,
    ProtocolError,
    Refused,
    Timeout,
    Unreachable,
)
from gcmd.client.replies import CursorLost, LogLine, Note, Version

__all__ = [
    "AuthenticationError", "Client", "CommandError", "ConnectionLost", "CursorLost", "GcmdError",
    "LogLine", "Note", "PermissionDenied", "ProtocolError", "Refused", "Timeout", "Unreachable",
    "Version",
]
