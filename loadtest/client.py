"""A gcmd client for load tests: one TCP (or TLS) connection, one request at a time.

Every request is reported to locust's ``events.request`` (when given), with a
failure for an error reply, a timeout or a dropped connection. Under locust
the socket module is gevent's, so a user waiting for its reply blocks nobody.

A reply that ends in ``bye !`` (the cap is full, the server shuts down) ends
the connection: the next request opens another. The server speaks unasked
only to say goodbye (``Idle timeout. bye !``), so bytes waiting before a
request are such a goodbye: they are dropped with the connection, and the
request goes on a new one instead of taking them as its reply.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Callable

#: how the server's last line on a connection ends
GOODBYE = b"bye !\n"

#: first lines of replies that mean the request failed
FAILURES = (b"An error occured : ", b"Authentication required.", b"Authentication failed.",
            b"Command not found.", b"Too many connections", b"Line too long.", b"Idle timeout.",
            b"Server shutting down.", b"Usage: ", b"Please provide a path.")


class GcmdError(Exception):
    """The server answered, but with a failure."""


class GcmdClient:
    def __init__(self, host: str, port: int, *, timeout: float = 10.0,
                 tls: ssl.SSLContext | None = None, fire: Callable[..., None] | None = None) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.tls = tls
        self.fire = fire
        self.sock: socket.socket | None = None
        self.buffer = b""

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        self.sock = sock
        self.buffer = b""

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def request(self, line: str, name: str | None = None) -> list[bytes]:
        """Send one request and read its whole reply (one line, or a Begin/End block).

        Reconnects first if the last connection ended (a goodbye, a drop).
        Raises GcmdError for a failure reply and OSError for a timeout or a
        dropped connection, after reporting the request either way.
        """
        name = name or line.split(" ", 1)[0]
        started = time.perf_counter()
        lines: list[bytes] = []
        error: Exception | None = None
        try:
            self._drop_goodbye()
            if self.sock is None:
                self.connect()
            self.sock.sendall(line.encode() + b"\n")
            lines.append(self._line())
            if lines[0].startswith(b"Begin "):
                end = b"End " + lines[0][6:]
                while lines[-1] != end:
                    lines.append(self._line())
            elif lines[0].startswith(FAILURES):
                error = GcmdError(lines[0].decode(errors="replace").strip())
            if lines[-1].endswith(GOODBYE):
                self.close()
        except OSError as exc:
            self.close()
            error = exc
        if self.fire is not None:
            self.fire(request_type="gcmd", name=name,
                      response_time=(time.perf_counter() - started) * 1000,
                      response_length=sum(len(x) for x in lines), exception=error, context={})
        if error is not None:
            raise error
        return lines

    def _drop_goodbye(self) -> None:
        """If the server spoke unasked (a goodbye) or closed since the last reply,
        read what it said, drop it and close: the next request needs a new connection."""
        if self.sock is None:
            return
        pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
        if not (self.buffer or pending or select.select([self.sock], [], [], 0)[0]):
            return
        try:
            self.sock.recv(65536)
        except OSError:
            pass  # a reset after the goodbye: the connection ends all the same
        self.close()

    def _line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the server closed the connection")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"
