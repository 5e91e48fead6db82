"""The connection of a gcmd.client Client: open it (version, auth, format json
in one write), send a request, read its whole reply, and replace a connection
the server closed since the last reply.

The standard library's ``socket`` only (``ssl`` is imported by a client that
uses TLS), with timeouts as the waits: cooperative under gevent's monkey patching.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from gcmd.client.errors import (
    BYE,
    CommandError,
    ConnectionLost,
    ProtocolError,
    Refused,
    Stale,
    Timeout,
    Unreachable,
    error_of,
)
from gcmd.client.replies import Version, parse_version

if TYPE_CHECKING:  # ssl is imported only by a client that uses TLS
    import ssl as _ssl

#: TCP keepalive of a connection (seconds idle, seconds between probes, probes): a follow
#: of a quiet log waits without a deadline, and these find a peer that vanished in about a minute
KEEPALIVE = (30, 10, 3)


class Connection:
    """One connection to a gcmd server and the reading of its replies: the
    base of :class:`gcmd.client.Client`, whose docstring gives the arguments.
    Raises ValueError for a ``user`` without a ``token``, or either with blanks in it.
    """

    #: the longest reply line read, in bytes: a JSON log line of 65536 bytes, each byte as \\u00XX
    max_line = 1 << 20
    #: the longest block read, in bytes: a lastlog reply holds at most 8 MiB of lines
    max_reply = 16 << 20
    #: bytes read from the socket at once
    recv_size = 65536

    def __init__(self, host: str = "127.0.0.1", port: int = 9999, *,
                 ssl: _ssl.SSLContext | bool | None = None, token: str | bytes | None = None,
                 user: str | None = None, timeout: float = 10.0) -> None:
        if user is not None and token is None:
            raise ValueError("user needs a token (a certificate's user needs neither)")
        for word, what in ((user, "user"), (token, "token")):
            if word is not None and len((word if isinstance(word, bytes) else word.encode()).split()) != 1:
                raise ValueError(f"{what}: one word, without spaces")
        self.host = host
        self.port = int(port)
        self.ssl = ssl
        self.token = token.encode() if isinstance(token, str) else token
        self.user = user
        self.timeout = timeout
        #: the server as ``host:port`` (``[::1]:9999`` for IPv6), as errors name it
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        #: what the server answered to ``version`` when the client last connected; None before
        self.server_version: Version | None = None
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._scanned = 0
        self._sock_timeout: float | None = None

    # --- opening and closing ---

    @property
    def connected(self) -> bool:
        """Whether the client holds a connection (it may have been closed by the server since)."""
        return self._sock is not None

    def connect(self) -> None:
        """Open a new connection (closing the one held): connect, check the
        server's version (1.2 or later), authenticate when given a token, and
        ask for JSON lines; the three requests go in one write.

        Raises Unreachable, Timeout, ConnectionLost, Refused (the server is
        full), ProtocolError (it speaks 1.1 or older), AuthenticationError.
        """
        self.close()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except TimeoutError:
            raise Unreachable(f"no connection within {self.timeout:g} s", address=self.address) from None
        except OSError as exc:
            raise Unreachable(exc.strerror or str(exc), address=self.address) from None
        keep_alive(sock)
        if self.ssl is not None and self.ssl is not False:
            sock = self._wrap(sock)
        self._sock = sock
        self._sock_timeout = self.timeout
        self._buffer = bytearray()
        self._scanned = 0
        requests = [b"version"]
        if self.token is not None:
            requests.append(b"auth " + (self.user.encode() + b" " if self.user else b"") + self.token)
        requests.append(b"format json")
        try:
            self._send(b"\n".join(requests) + b"\n")
            deadline = time.monotonic() + self.timeout
            first = self._readline(deadline)
            failure = error_of(first, self.address)
            if failure is not None and first != b"Command not found.":
                raise failure
            self.server_version = parse_version(first, self.address)
            if self.token is not None:
                reply = self._readline(deadline)
                if reply != b"Authenticated.":
                    raise error_of(reply, self.address) or ProtocolError(
                        f"not a reply to auth: {reply[:200]!r}", address=self.address)
            reply = self._readline(deadline)
            # a server with users or a token answers a client that is neither
            # "Authentication required.": its lastlog and follow will say so too
            if reply not in (b"OK", b"Authentication required."):
                raise error_of(reply, self.address) or ProtocolError(
                    f"not a reply to format json: {reply[:200]!r}", address=self.address)
        except BaseException:
            self.close()
            raise

    def _wrap(self, sock: socket.socket) -> socket.socket:
        import ssl

        context = ssl.create_default_context() if self.ssl is True else self.ssl
        try:
            return context.wrap_socket(sock, server_hostname=self.host)
        except TimeoutError:
            sock.close()
            raise Unreachable(f"no TLS handshake within {self.timeout:g} s", address=self.address) from None
        except OSError as exc:
            sock.close()
            raise Unreachable(f"TLS: {getattr(exc, 'reason', None) or exc}", address=self.address) from None

    def close(self) -> None:
        """Close the connection, if one is open (the next request opens another)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # --- requests and replies ---

    def _call(self, request: bytes) -> tuple[bytes, list[bytes] | None]:
        """Send ``request`` and read its whole reply: (first line, the lines of
        its block or None), without newlines. A connection that was already
        there and turns out to have ended before the reply began is replaced
        once (every request here only reads, so sending it again is safe)."""
        reused = self._sock is not None
        if not reused:
            self.connect()
        try:
            return self._exchange(request)
        except Stale as stale:
            if not reused:
                raise stale.error from None
            self.connect()
            try:
                return self._exchange(request)
            except Stale as again:
                raise again.error from None

    def _exchange(self, request: bytes) -> tuple[bytes, list[bytes] | None]:
        try:
            try:
                self._send(request + b"\n")
                deadline = time.monotonic() + self.timeout
                first = self._readline(deadline)
            except ConnectionLost as exc:
                raise Stale(exc) from None
            failure = error_of(first, self.address)
            if isinstance(failure, Refused):
                raise Stale(failure)
            if failure is not None:
                if first.endswith(BYE):
                    self.close()
                raise failure
            if not first.startswith(b"Begin "):
                return first, None
            return first, self._read_body(b"\nEnd %s\n" % first[6:], deadline)
        except CommandError:
            raise  # the connection stays usable
        except BaseException:  # a reply cut short leaves the connection unreadable
            self.close()
            raise

    def _send(self, data: bytes) -> None:
        try:
            self._set_timeout(self.timeout)
            self._sock.sendall(data)
        except TimeoutError:
            raise Timeout(f"could not send within {self.timeout:g} s", address=self.address) from None
        except OSError as exc:
            raise ConnectionLost(exc.strerror or str(exc), address=self.address) from None

    def _set_timeout(self, seconds: float | None) -> None:
        """The socket's timeout, changed only when it differs by more than 50 ms
        from what it is (each change is a system call)."""
        current = self._sock_timeout
        if (seconds is None) != (current is None) or (seconds is not None and abs(seconds - current) > 0.05):
            self._sock.settimeout(seconds)
            self._sock_timeout = seconds

    def _readline(self, deadline: float | None) -> bytes:
        """The next line the server sent, without its newline, before
        ``deadline`` (time.monotonic; None: no deadline)."""
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n", self._scanned)
            if end >= 0:
                line = bytes(buffer[:end])
                del buffer[:end + 1]
                self._scanned = 0
                return line
            self._scanned = len(buffer)
            if self._scanned > self.max_line:
                raise ProtocolError(f"a reply line longer than {self.max_line} bytes", address=self.address)
            self._fill(deadline)

    def _read_body(self, end: bytes, deadline: float) -> list[bytes]:
        """The lines of a block whose Begin line was read, up to its End line
        (``end``: ``\\nEnd NAME\\n``), without newlines: found in what arrived
        at once, rather than line by line."""
        buffer = self._buffer
        scanned = 0
        while True:
            if buffer.startswith(end[1:]):
                del buffer[:len(end) - 1]
                return []
            at = buffer.find(end, scanned)
            if at >= 0:
                body = bytes(buffer[:at]).split(b"\n")
                del buffer[:at + len(end)]
                return body
            scanned = max(0, len(buffer) - len(end) + 1)
            if len(buffer) > self.max_reply:
                raise ProtocolError(f"a reply longer than {self.max_reply} bytes", address=self.address)
            self._fill(deadline)

    def _fill(self, deadline: float | None) -> None:
        """Add what the server sends next to the buffer, before ``deadline``."""
        if deadline is None:
            self._set_timeout(None)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"no whole reply within {self.timeout:g} s", address=self.address)
            self._set_timeout(left)
        try:
            chunk = self._sock.recv(self.recv_size)
        except TimeoutError:
            raise Timeout(f"no whole reply within {self.timeout:g} s", address=self.address) from None
        except OSError as exc:
            raise ConnectionLost(exc.strerror or str(exc), address=self.address) from None
        if not chunk:
            raise ConnectionLost("closed by the server", address=self.address)
        self._buffer += chunk


def keep_alive(sock: socket.socket) -> None:
    """TCP keepalive (KEEPALIVE) where the system has the options."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in zip(("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"), KEEPALIVE):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
