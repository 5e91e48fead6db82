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
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # ssl is imported only by a client that uses TLS
    import ssl as _ssl

__all__ = [
    "AuthenticationError", "Client", "CommandError", "ConnectionLost", "CursorLost", "GcmdError",
    "LogLine", "Note", "PermissionDenied", "ProtocolError", "Refused", "Timeout", "Unreachable",
    "Version",
]

log = logging.getLogger(__name__)

#: the oldest protocol this client speaks: 1.2 brought version, format json and cursors
PROTOCOL = (1, 2)
#: the requests a caller may not send through Client.request: each has its own method,
#: or would change the connection under the client (format, auth) or end it (exit)
_OWN_METHODS = frozenset({"follow", "format", "auth", "exit", "quit"})
#: TCP keepalive of a connection (seconds idle, seconds between probes, probes): a follow
#: of a quiet log waits without a deadline, and these find a peer that vanished in about a minute
_KEEPALIVE = (30, 10, 3)


# --- errors ------------------------------------------------------------------------------

class GcmdError(Exception):
    """Something went wrong talking to gcmd; the base of every error of this module.

    ``address``: the server as ``host:port``; ``message``: what went wrong;
    ``reply``: the server's line that said so (text, without its newline),
    or None when it said nothing. ``str()`` gives ``address: message``.
    """

    def __init__(self, message: str, *, address: str = "", reply: str | None = None) -> None:
        super().__init__(f"{address}: {message}" if address else message)
        self.message = message
        self.address = address
        self.reply = reply


class CommandError(GcmdError):
    """A command failed: the server's error line (``An error occured : ...``),
    a usage line, ``Please provide a path.`` or ``Command not found.``.
    The connection stays usable."""


class PermissionDenied(CommandError):
    """The user this connection is may not run the command, or read the path
    (``An error occured : Permission denied: ...``)."""


class AuthenticationError(GcmdError):
    """The server refused the token (``Authentication failed. bye !``), asks
    for one that was not given (``Authentication required.``), or asks for
    none while one was given (``Authentication is not enabled.``)."""


class Refused(GcmdError):
    """The server said goodbye and closed the connection: ``Too many
    connections. bye !``, ``Server shutting down. bye !``, ``Idle timeout.
    bye !``, ``Line too long. bye !``. ``reply`` holds the line."""


class ProtocolError(GcmdError):
    """The server does not speak protocol 1.2 or later, or said something
    this client cannot read."""


class Timeout(GcmdError):
    """No (whole) reply within the client's ``timeout``; the connection is closed."""


class ConnectionLost(GcmdError):
    """The connection was closed or reset before the reply was whole."""


class Unreachable(GcmdError):
    """No connection could be made: refused, no such host, no answer to the
    connection within ``timeout``, or a TLS handshake that failed."""


#: the starts of replies that are a command's failure, and the error they become
_FAILURES = ((b"An error occured : Permission denied", PermissionDenied),
             (b"An error occured : ", CommandError), (b"Usage: ", CommandError))
#: whole replies that are a failure
_FAILED = {b"Please provide a path.": CommandError, b"Command not found.": CommandError,
           b"Authentication required.": AuthenticationError,
           b"Authentication failed. bye !": AuthenticationError,
           b"Authentication required. bye !": AuthenticationError,
           b"Authentication is not enabled.": AuthenticationError}
#: how the server's last line on a connection ends
_BYE = b" bye !"


def _failure(line: bytes, address: str) -> GcmdError | None:
    """The error a reply's first ``line`` (without its newline) says, or None."""
    text = line.decode("utf-8", "replace")
    if line in _FAILED:
        return _FAILED[line](text, address=address, reply=text)
    if line.endswith(_BYE):
        return Refused(text, address=address, reply=text)
    for start, error in _FAILURES:
        if line.startswith(start):
            return error(text, address=address, reply=text)
    return None


# --- what lastlog and follow give --------------------------------------------------------

class LogLine:
    """One line of a log the server serves, as ``lastlog`` and ``follow`` give it.

    - ``log`` (str): the log's name (see :meth:`Client.logs`);
    - ``data`` (bytes): the line exactly as written in the log, without its
      newline; at most 65536 bytes (see ``cut``);
    - ``cursor`` (str or None): where the line is in its log, to resume a
      follow after it (:meth:`Client.follow`, ``cursors``); None for a log
      whose lines carry none (the journal, for now);
    - ``cut`` (int): the bytes the server cut off a longer line, else 0;
    - ``text`` (str): ``data`` as UTF-8, a byte that is not UTF-8 as U+FFFD.
      Control characters are kept: escape them before printing to a terminal.
    """

    __slots__ = ("cursor", "cut", "data", "log")

    def __init__(self, log: str, data: bytes, cursor: str | None = None, cut: int = 0) -> None:
        self.log = log
        self.data = data
        self.cursor = cursor
        self.cut = cut

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def json(self) -> str:
        """The line as the server sends it in JSON (one object, no newline)."""
        try:
            line: str | list[int] = self.data.decode("utf-8")
        except UnicodeDecodeError:
            line = list(self.data)
        fields: dict = {"log": self.log}
        if self.cursor is not None:
            fields["cursor"] = self.cursor
        fields["line"] = line
        if self.cut:
            fields["cut"] = self.cut
        return json.dumps(fields, separators=(",", ":"))

    def _key(self) -> tuple:
        return (self.log, self.data, self.cursor, self.cut)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LogLine) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"LogLine(log={self.log!r}, data={self.data!r}, cursor={self.cursor!r}, cut={self.cut})"


class Note:
    """What the server says about the lines of a block instead of a line.

    - ``kind`` (str): ``left_out`` (lastlog: ``lines`` older lines did not fit
      in 8 MiB), ``searched`` (lastlog ... grep: only the last ``bytes`` of
      ``log`` were searched), ``dropped`` (follow: ``lines`` lines were dropped
      because this client read too slowly), ``cursor_lost`` (see
      :class:`CursorLost`), or a kind a newer server added;
    - ``log`` (str or None), ``lines`` (int or None), ``bytes`` (int or None):
      as the kind says;
    - ``text`` (str): the note as the server's text format says it
      (``== 12 lines dropped ==``).
    """

    __slots__ = ("bytes", "kind", "lines", "log")

    #: a note has no place in a log: it never moves a follow's cursor
    cursor = None

    def __init__(self, kind: str, log: str | None = None, lines: int | None = None,
                 bytes: int | None = None) -> None:
        self.kind = kind
        self.log = log
        self.lines = lines
        self.bytes = bytes

    @property
    def text(self) -> str:
        if self.kind == "dropped":
            return f"== {self.lines} lines dropped =="
        if self.kind == "left_out":
            return f"== {self.lines} older lines left out =="
        if self.kind == "searched":
            return f"== searched the last {(self.bytes or 0) >> 20} MiB only =="
        if self.kind == "cursor_lost":
            return f"== cursor lost: {self.log} =="
        return f"== {self.kind} =="

    def json(self) -> str:
        """The note as the server sends it in JSON (one object, no newline)."""
        fields = {"note": self.kind, "lines": self.lines, "bytes": self.bytes, "log": self.log}
        return json.dumps({k: v for k, v in fields.items() if v is not None}, separators=(",", ":"))

    def _key(self) -> tuple:
        return (self.kind, self.log, self.lines, self.bytes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Note) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, log={self.log!r}, lines={self.lines}, bytes={self.bytes})"


class CursorLost(Note):
    """A follow resumed after a cursor whose line its log no longer holds (the
    file was rotated, truncated or rewritten; gcmd's own log moved on): the
    lines of ``log`` that follow start at the oldest the log still holds, and
    lines written in between may have been missed."""

    __slots__ = ()


def _item(fields: dict) -> LogLine | Note:
    """The line or note of the fields of one JSON line of a block."""
    if "note" in fields:
        kind = fields["note"]
        return (CursorLost if kind == "cursor_lost" else Note)(
            kind, fields.get("log"), fields.get("lines"), fields.get("bytes"))
    line = fields["line"]
    data = line.encode("utf-8", "surrogatepass") if isinstance(line, str) else bytes(line)
    return LogLine(fields["log"], data, fields.get("cursor"), fields.get("cut", 0))


def _items(raws: list[bytes], address: str) -> list[LogLine | Note]:
    """The lines and notes of JSON lines, parsed by one json.loads for them all."""
    try:
        return [_item(fields) for fields in json.loads(b"[%s]" % b",".join(raws))]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ProtocolError(f"not JSON log lines: {b'|'.join(raws)[:200]!r} ({exc})", address=address) from None


class Version:
    """What ``version`` answered: ``gcmd`` (str, the server's version, ``1.0.0``)
    and ``protocol`` (tuple of ints, ``(1, 2)``); ``str()`` gives the line."""

    __slots__ = ("gcmd", "protocol")

    def __init__(self, gcmd: str, protocol: tuple[int, ...]) -> None:
        self.gcmd = gcmd
        self.protocol = protocol

    def __str__(self) -> str:
        return f"gcmd {self.gcmd} protocol {'.'.join(map(str, self.protocol))}"

    def __repr__(self) -> str:
        return f"Version(gcmd={self.gcmd!r}, protocol={self.protocol!r})"


def _version(line: bytes, address: str) -> Version:
    """The Version of a reply to ``version``; ProtocolError for a server older than 1.2."""
    words = line.decode("utf-8", "replace").split()
    if line == b"Command not found.":
        raise ProtocolError("the server speaks protocol 1.1 or older (it has no 'version'); "
                            "gcmd.client needs 1.2 or later", address=address)
    try:
        if len(words) != 4 or words[0] != "gcmd" or words[2] != "protocol":
            raise ValueError
        protocol = tuple(int(part) for part in words[3].split("."))
    except ValueError:
        raise ProtocolError(f"not a reply to version: {line[:200]!r}", address=address) from None
    if protocol < PROTOCOL:
        raise ProtocolError(f"the server speaks protocol {words[3]}; gcmd.client needs 1.2 or later",
                            address=address)
    return Version(words[1], protocol)


def _request_bytes(request: str | bytes) -> bytes:
    data = request.encode() if isinstance(request, str) else request
    if b"\n" in data or b"\r" in data:
        raise ValueError(f"a request is one line: {request!r}")
    return data


def _logs_word(logs: str | Iterable[str] | None) -> str | None:
    """LOGS of a query: one name or several joined by commas; None: the default log."""
    if logs is None:
        return None
    word = logs if isinstance(logs, str) else ",".join(logs)
    if not word or any(c in word for c in " \t"):
        raise ValueError(f"logs: names joined by commas, without spaces, not {logs!r}")
    return word


def _query(verb: str, lines: int | None, logs: str | None, cursors: Iterable[str],
           grep: str | None) -> bytes:
    """A ``lastlog``/``follow`` request: ``VERB [LINES] [LOGS] [from CURSORS] [grep PATTERN]``."""
    words = [verb]
    if lines is not None:
        words.append(str(int(lines)))
    if logs:
        words.append(logs)
    cursors = list(cursors)
    if cursors:
        words += ["from", ",".join(cursors)]
    if grep is not None:
        if not grep.strip():
            raise ValueError("grep: an empty pattern")
        words += ["grep", grep.strip()]
    return _request_bytes(" ".join(words))


# --- the client --------------------------------------------------------------------------

class Client:
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

    # --- the connection ---

    def __enter__(self) -> Client:  # noqa: PYI034 - Self needs 3.11
        self.connect()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

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
        _keep_alive(sock)
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
            failure = _failure(first, self.address)
            if failure is not None and first != b"Command not found.":
                raise failure
            self.server_version = _version(first, self.address)
            if self.token is not None:
                reply = self._readline(deadline)
                if reply != b"Authenticated.":
                    raise _failure(reply, self.address) or ProtocolError(
                        f"not a reply to auth: {reply[:200]!r}", address=self.address)
            reply = self._readline(deadline)
            # a server with users or a token answers a client that is neither
            # "Authentication required.": its lastlog and follow will say so too
            if reply not in (b"OK", b"Authentication required."):
                raise _failure(reply, self.address) or ProtocolError(
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

    # --- the commands ---

    def ping(self) -> str:
        """``ping``: the server's ``pong``."""
        return self._line(b"ping").decode()

    def version(self) -> Version:
        """``version``: the server's version and the protocol it speaks."""
        return _version(self._line(b"version"), self.address)

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
            figures[key] = _number(value)
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
        request = _query("lastlog", lines, _logs_word(logs), (), grep)
        return _items(self._block(request, b"lastlog"), self.address)

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
        logs_word = _logs_word(logs)
        delay = self.first_backoff
        try:
            while True:
                try:
                    if self._sock is None:
                        self.connect()
                    self._send(_query("follow", lines or None, logs_word, after.values(), grep) + b"\n")
                    first = self._readline(time.monotonic() + self.timeout)
                    if first != b"Begin follow":
                        raise _failure(first, self.address) or ProtocolError(
                            f"not a reply to follow: {first[:200]!r}", address=self.address)
                    delay = self.first_backoff
                    while True:
                        raw = self._readline(None)
                        if raw == b"End follow":  # the server ends a follow only when it stops
                            raise ConnectionLost("the server ended the follow", address=self.address)
                        item = _items([raw], self.address)[0]
                        if item.cursor is not None:
                            after[item.log] = item.cursor
                        yield item
                except (ConnectionLost, Refused, Timeout, Unreachable) as exc:
                    self.close()
                    if not resume:
                        raise
                    log.warning("%s; following again in %g s", exc, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, self.max_backoff)
        finally:
            self.close()

    def request(self, line: str | bytes) -> list[str]:
        """Send one request ``line`` (without its newline) and return its
        reply: the lines of a ``Begin``/``End`` block (without those two), or
        the one line; each as text, without its newline. For the commands
        without a method here (``help``, and those of a newer server); a log
        block's lines are JSON. CommandError etc. for a failure; ValueError
        for ``follow``, ``format``, ``auth``, ``exit``, ``quit``.
        """
        data = _request_bytes(line)
        words = data.split(None, 1)
        if not words:
            raise ValueError("a blank request gets no reply")
        if words[0].decode("ascii", "replace") in _OWN_METHODS:
            raise ValueError(f"{words[0].decode('ascii', 'replace')!r}: use the Client's own means "
                             "(follow(), its token, close())")
        first, body = self._call(data)
        return [x.decode("utf-8", "replace") for x in (body if body is not None else [first])]

    # --- requests and replies ---

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
        line = self._line(_request_bytes(request))
        if not line.startswith(b"File hash is : "):
            raise ProtocolError(f"not a digest: {line[:200]!r}", address=self.address)
        return line[15:].decode("ascii")

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
        except _Stale as stale:
            if not reused:
                raise stale.error from None
            self.connect()
            try:
                return self._exchange(request)
            except _Stale as again:
                raise again.error from None

    def _exchange(self, request: bytes) -> tuple[bytes, list[bytes] | None]:
        try:
            try:
                self._send(request + b"\n")
                deadline = time.monotonic() + self.timeout
                first = self._readline(deadline)
            except ConnectionLost as exc:
                raise _Stale(exc) from None
            failure = _failure(first, self.address)
            if isinstance(failure, Refused):
                raise _Stale(failure)
            if failure is not None:
                if first.endswith(_BYE):
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


class _Stale(Exception):
    """The connection ended before a reply began: ``error`` says how."""

    def __init__(self, error: GcmdError) -> None:
        super().__init__(str(error))
        self.error = error


def _number(text: str) -> int | float | str:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _keep_alive(sock: socket.socket) -> None:
    """TCP keepalive (_KEEPALIVE) where the system has the options."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in zip(("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"), _KEEPALIVE):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
