"""The Client of gcmd.client: one method per command of the server, and a follow that resumes."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping

from gcmd.client.connection import Connection
from gcmd.client.errors import (
    ConnectionLost,
    ProtocolError,
    Refused,
    Timeout,
    Unreachable,
    error_of,
)
from gcmd.client.replies import (
    LogLine,
    Note,
    Version,
    parse_items,
    parse_number,
    parse_version,
)
from gcmd.client.requests import logs_word, query, request_bytes

# the library's one logger, gcmd.client, as docs/client.md names it
log = logging.getLogger(__package__)

#: the requests a caller may not send through Client.request: each has its own method,
#: or would change the connection under the client (format, auth) or end it (exit)
OWN_METHODS = frozenset({"follow", "format", "auth", "exit", "quit"})


class Client(Connection):
    """A connection to one gcmd server.

    ``host``, ``port``: the server (a name, an IPv4 or IPv6 address).
    ``ssl``: None for plain TCP; an ``ssl.SSLContext`` for TLS (its CA,
    client certificate and checks); True for TLS with
    ``ssl.create_default_context()`` (the system's CAs, the host name checked).
    ``token``: sent as ``auth TOKEN``, or as ``auth USER TOKEN`` with ``user``.
    A TLS client certificate whose CN is a user's needs neither.
    ``timeout``: seconds to connect (TLS handshake included), and to receive
    each whole reply; a follow waits for new lines without a deadline.

    The connection opens on ``with`` (or :meth:`connect`, or the first
    request), and again on the next request after it was lost: a request
    that finds its connection closed by the server since the last reply (an
    idle timeout, a restart) is sent once more on a new one, since every
    request of this client only reads. Raises ValueError for a ``user``
    without a ``token``, or either with blanks in it.
    """

    #: seconds a follow waits before its first reconnection; doubled each time, up to max_backoff
    first_backoff = 0.1
    #: the longest wait between two reconnections of a follow, in seconds
    max_backoff = 5.0

    def __enter__(self) -> Client:  # noqa: PYI034 - Self needs 3.11
        self.connect()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- the commands ---

    def ping(self) -> str:
        """``ping``: the server's ``pong``."""
        return self._line(b"ping").decode()

    def version(self) -> Version:
        """``version``: the server's version and the protocol it speaks."""
        return parse_version(self._line(b"version"), self.address)

    def whoami(self) -> str:
        """``whoami``: the user this connection is authenticated as, or ``anonymous``."""
        return self._line(b"whoami").decode("utf-8", "replace")

    def logs(self) -> dict[str, str]:
        """``logs``: {name: source} of the logs this connection may read, the
        default log first (``{"syslog": "/var/log/syslog", "gcmd": "memory"}``)."""
        listing = {}
        for line in self._block(b"logs", b"logs"):
            name, _, source = line.decode("utf-8", "replace").partition(" ")
            listing[name] = source
        return listing

    def stats(self) -> dict[str, int | float]:
        """``stats``: {key: figure} (``uptime_s`` in seconds, ``clients``,
        ``commands``, ``log.NAME.KEY``, ...; see PROTOCOL.md); a figure that
        is no number stays a str. A user needs the grant of ``stats``."""
        figures: dict = {}
        for line in self._block(b"stats", b"stats"):
            key, _, value = line.decode("utf-8", "replace").partition(" ")
            figures[key] = parse_number(value)
        return figures

    def comphash(self, path: str | bytes | os.PathLike) -> str:
        """``comphash PATH``: the SHA-1 of a file under the server's root, as
        40 lower-case hex digits. ``path`` is relative to the server's root, or
        absolute inside it; the server reads it as the bytes sent (os.fsencode).
        A missing file, a path outside the root, ...: CommandError."""
        return self._digest(b"comphash " + os.fsencode(path))

    def hash(self, algorithm: str, path: str | bytes | os.PathLike) -> str:
        """``hash ALGO PATH``: the digest of a file in lower-case hex, with one
        of the server's algorithms (``sha256``, ``sha512``, ``blake2b``, ``md5``, ...:
        hashlib.algorithms_guaranteed of fixed size); see :meth:`comphash`."""
        return self._digest(b"hash %s %s" % (algorithm.encode(), os.fsencode(path)))

    def lastlog(self, lines: int = 10, logs: str | Iterable[str] | None = None,
                grep: str | None = None) -> list[LogLine | Note]:
        """``lastlog``: the last ``lines`` lines (1 to 1000) of each log of
        ``logs`` (a name, names joined by commas, or a list; None: the default
        log), oldest first, log after log in the order given; with ``grep``,
        the last that match that RE2 pattern (no upper-case letter: any case).

        A list of LogLine, and Note where the server says something about the
        lines (``left_out``, ``searched``). CommandError for an unknown log, a
        bad pattern, ``lines`` out of range.
        """
        request = query("lastlog", lines, logs_word(logs), (), grep)
        return parse_items(self._block(request, b"lastlog"), self.address)

    def follow(self, lines: int = 0, logs: str | Iterable[str] | None = None,
               grep: str | None = None, resume: bool = True,
               cursors: Mapping[str, str] | None = None) -> Iterator[LogLine | Note]:
        """``follow``: an iterator over the last ``lines`` lines (0 to 1000) of
        each log of ``logs`` (as :meth:`lastlog`), then every line written to
        them from now on, as soon as the server reads it; it never ends by itself.

        With ``resume`` (default), when the connection drops or the server
        restarts, it connects again after a back-off (``first_backoff``
        doubled up to ``max_backoff`` seconds, for as long as it takes) and
        follows ``from`` the cursor of the last line it gave of each log, so
        that the caller sees every line once and in order; a CursorLost note
        says when a log no longer held that line (lines written in between
        may be missed). A log that gave no line yet gets ``lines`` lines of
        backlog again. Each reconnection is logged (logger ``gcmd.client``,
        warning). Without ``resume``, a drop raises ConnectionLost or Refused.

        ``cursors``: {log: cursor} of lines already seen (LogLine.log and
        LogLine.cursor, kept from an earlier run): the follow of those logs
        begins after them.

        Also gives Note ``dropped`` when the server dropped lines because this
        client read too slowly (a resume does not bring those back). Raises
        CommandError (an unknown log, a bad pattern or cursor),
        AuthenticationError, ProtocolError. The iterator holds the client's
        connection: closing it (``break``, ``close()``) closes the connection,
        and the client's next request opens another.
        """
        after = dict(cursors or {})
        names = logs_word(logs)
        delay = self.first_backoff
        try:
            while True:
                try:
                    self._begin_follow(query("follow", lines or None, names, after.values(), grep))
                    delay = self.first_backoff
                    yield from self._followed(after)
                except (ConnectionLost, Refused, Timeout, Unreachable) as exc:
                    self.close()
                    if not resume:
                        raise
                    log.warning("%s; following again in %g s", exc, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, self.max_backoff)
        finally:
            self.close()

    def _begin_follow(self, request: bytes) -> None:
        """Send the follow ``request`` (connecting first when no connection is
        held) and read its ``Begin follow``; the error its reply says instead."""
        if self._sock is None:
            self.connect()
        self._send(request + b"\n")
        first = self._readline(time.monotonic() + self.timeout)
        if first != b"Begin follow":
            raise error_of(first, self.address) or ProtocolError(
                f"not a reply to follow: {first[:200]!r}", address=self.address)

    def _followed(self, after: dict[str, str]) -> Iterator[LogLine | Note]:
        """The lines and notes of the follow begun, as they come; the cursor of
        each line given is kept in ``after`` (by log), to resume from. It ends
        only by an error: ConnectionLost when the server ends the follow."""
        while True:
            raw = self._readline(None)
            if raw == b"End follow":  # the server ends a follow only when it stops
                raise ConnectionLost("the server ended the follow", address=self.address)
            item = parse_items([raw], self.address)[0]
            if item.cursor is not None:
                after[item.log] = item.cursor
            yield item

    def request(self, line: str | bytes) -> list[str]:
        """Send one request ``line`` (without its newline) and return its
        reply: the lines of a ``Begin``/``End`` block (without those two), or
        the one line; each as text, without its newline. For the commands
        without a method here (``help``, and those of a newer server); a log
        block's lines are JSON. CommandError etc. for a failure; ValueError
        for ``follow``, ``format``, ``auth``, ``exit``, ``quit``.
        """
        data = request_bytes(line)
        words = data.split(None, 1)
        if not words:
            raise ValueError("a blank request gets no reply")
        if words[0].decode("ascii", "replace") in OWN_METHODS:
            raise ValueError(f"{words[0].decode('ascii', 'replace')!r}: use the Client's own means "
                             "(follow(), its token, close())")
        first, body = self._call(data)
        return [x.decode("utf-8", "replace") for x in (body if body is not None else [first])]

    # --- the shapes of replies ---

    def _line(self, request: bytes) -> bytes:
        """The one-line reply to ``request``."""
        first, body = self._call(request)
        if body is not None:
            raise ProtocolError(f"a block where one line was expected: {first[:200]!r}", address=self.address)
        return first

    def _block(self, request: bytes, name: bytes) -> list[bytes]:
        """The lines of the ``Begin name`` block that answers ``request``."""
        first, body = self._call(request)
        if body is None or first[6:] != name:
            raise ProtocolError(f"not a {name.decode()} block: {first[:200]!r}", address=self.address)
        return body

    def _digest(self, request: bytes) -> str:
        line = self._line(request_bytes(request))
        if not line.startswith(b"File hash is : "):
            raise ProtocolError(f"not a digest: {line[:200]!r}", address=self.address)
        return line[15:].decode("ascii")
