"""A client's connection, from the accepted socket to its close: Connection.

Who owns what:

- A Connection owns its socket from accept to close: only ``close`` closes
  it, once, whatever the way out (the client left, a refusal, a farewell, an
  error, shutdown), and gives back the slot through ``GcmdServer.release``.
  It is a non-blocking socket of the standard library (ssl.SSLSocket with
  TLS), not a gevent socket: nothing blocks on it, every wait is ``wait()``.
- Every wait (for a request, for room to write, for the TLS handshake, for the
  PROXY header, while saying goodbye) is ``wait()``: it returns why it ended
  (READABLE, WRITABLE, DEADLINE, PARK, SHUTDOWN, LINES).
- The idle deadline is one field, ``deadline``; the server's sweeper calls
  ``tick`` for every connection, and is the one clock that ends a wait past
  the deadline (DEADLINE) or parks a connection silent for PARK_AFTER (PARK);
  it also looks at the TCP state of a connection that runs a command
  (a reset cancels it; the read watcher, while it stays started, sees the
  reset at once) or that is parked after its client's EOF (GONE).
- A connection with nothing to do is *parked*: its greenlet goes back to the
  server and its read watcher waits; the server gives it a greenlet again
  (``run``) when the client speaks, the deadline passes, shutdown begins or,
  for a follow, new lines arrive (``wake``).
- Exceptions are thrown into a greenlet only to cancel a command that is
  running: ClientGone (the connection was reset) and Shutdown (the shutdown
  deadline passed). Inside its own greenlet a connection ends with ``Ended``.

How a TLS or PROXY connection is opened (the header, admission, the
handshake) is gcmd.opening.Opening; what is served on it (requests, a
follow) is gcmd.session.Session.
"""

from __future__ import annotations

import logging
import socket
import ssl
from time import monotonic
from typing import TYPE_CHECKING

from gevent import GreenletExit, getcurrent

from gcmd.net import wire

if TYPE_CHECKING:
    from gcmd.net.server import GcmdServer

log = logging.getLogger(__name__)

#: bytes asked of the kernel per read; several pipelined requests at once
RECV_SIZE = 65536
#: seconds to drain a client's unread input before closing, so that the
#: kernel does not reset the connection and destroy the last reply in flight;
#: a client that sends nothing for LINGER_QUIET seconds is not waited for
LINGER = 1.0
LINGER_QUIET = 0.2
#: seconds a farewell line may take to leave when the client is not reading
FAREWELL_TIMEOUT = 2.0
#: seconds a client may be silent before it is parked
PARK_AFTER = 1.0

# why a wait ended, or why a connection was given a greenlet
READABLE = "readable"
WRITABLE = "writable"
DEADLINE = "deadline"
PARK = "park"
SHUTDOWN = "shutdown"
#: a TLS or PROXY connection, to be opened (header, admission, handshake) in its greenlet
OPEN = "open"
#: a connection refused in the hub, to be told so
REFUSED = "refused"

#: new lines for a follower
LINES = "lines"
#: a parked connection the client has reset (seen by tick: a follower after its EOF)
GONE = "gone"

# what a wait accepts: bits of Connection.waiting
READ, WRITE, PARKABLE, STOPPABLE, FOLLOWING = 1, 2, 4, 8, 16
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError)
#: Linux tcpi_state of a connection that is over (reset, or its keepalive went unanswered)
TCP_CLOSE = 7


class Ended(Exception):
    """A connection is over (raised in its own greenlet): why, for the log, and the
    last line for the client (b"": none, but close gently; None: just close)."""

    def __init__(self, reason: str, line: bytes | None = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line


class Shutdown(GreenletExit):
    """Thrown into a session still running a command at the shutdown deadline."""


class ClientGone(GreenletExit):
    """Thrown into a session whose connection was reset while a command ran."""


class Connection:
    """One client's socket: its waits, reads, writes, farewell and close.

    Subclasses say what is served on it by defining ``_run(start, data)``.
    """

    __slots__ = ("admitted", "client_cn", "context", "deadline", "eof", "greenlet", "ip", "log_level",
                 "number", "parked", "reader", "running", "server", "since", "sock", "tls", "waiting",
                 "writer")

    def __init__(self, server: GcmdServer, sock, ip: str, number: int) -> None:
        self.server = server
        self.sock = sock
        sock.settimeout(0.0)  # every wait is wait(): no socket timeouts
        self.ip = ip
        self.number = number
        self.context = server.session_context(number, ip)
        #: holds a slot (counted in clients, per_ip)
        self.admitted = False
        #: the greenlet serving the connection; None while parked
        self.greenlet = None
        #: what the current wait accepts (READ, WRITE, PARKABLE... bits); 0 when not waiting
        self.waiting = 0
        #: a command runs that the client's reset cancels (see tick)
        self.running = False
        #: the client half-closed: nothing more to read
        self.eof = False
        self.parked = False
        #: the last progress (a complete line received, a reply sent) and the idle deadline
        self.since = monotonic()
        self.deadline = self.since + server.config.idle_timeout
        #: stays started between requests (starting it costs more than a stray wake)
        self.reader = server.loop.io(sock.fileno(), 1)
        self.writer = None
        #: the socket is a TLS socket (after the handshake begins)
        self.tls = False
        #: the CN of the client's verified certificate (--tls-client-ca); None: none asked
        self.client_cn = None
        #: the level of this client's connection, request and close lines (--quiet-from: debug)
        self.log_level = logging.INFO

    # --- lifecycle: the server calls run() in a greenlet, and close() ends it -----------

    def run(self, start: str, data: bytes = b"") -> None:
        """Serve from ``start`` (why the connection got a greenlet; ``data``: what
        the client already sent, or a refusal line) until it is parked or closed."""
        self.greenlet = getcurrent()
        outcome = "cancelled"
        try:
            outcome = self._outcome(start, data)
        finally:
            self.greenlet = None
            if outcome is PARK:
                self.park()
            else:
                self.close(outcome)

    def _outcome(self, start: str, data: bytes) -> str:
        """PARK, or why the connection is over (for the log)."""
        try:
            try:
                return self._begin(start, data)
            except Ended as end:
                self._farewell(end.line)
                return end.reason
            except Shutdown:
                end = self._goodbye()
                self._farewell(end.line)
                return end.reason
        except ClientGone:
            return "connection reset while a command ran"
        except ssl.SSLError as exc:
            return f"TLS error: {exc.reason or exc}"
        except OSError as exc:
            return exc.strerror or str(exc)
        except Exception:
            log.exception("internal error serving %s", self.ip, extra=self.context)
            return "internal error"

    def _begin(self, start: str, data: bytes) -> str:
        if start is GONE:
            return "connection reset"
        if self.server.closing and start is not REFUSED and start is not DEADLINE:
            raise self._goodbye()
        if start is OPEN:
            self._open()
            data = self.recv()  # what came with the header or the handshake
            if data is None:  # a client that has not spoken yet waits parked
                return PARK
            if not data:
                raise Ended("Connection was closed cleanly.", None)
        elif start is REFUSED:
            raise Ended("refused", data)
        elif start is DEADLINE:
            raise Ended("idle timeout", wire.IDLE_TIMEOUT)
        elif start is SHUTDOWN:
            raise self._goodbye()
        return self._serve(data, start is READABLE)

    def _serve(self, data: bytes, ready: bool) -> str:
        """Serve the client, starting with ``data`` it sent (``ready``: more is
        waiting to be read), until it is done (raise Ended) or can be parked (PARK)."""
        raise NotImplementedError

    def _open(self) -> None:
        """Open a TLS or PROXY connection (see gcmd.net.opening): raise Ended to refuse it."""
        raise NotImplementedError

    def _goodbye(self) -> Ended:
        """How the connection ends when the server shuts down."""
        return Ended("server shutting down", wire.SHUTTING_DOWN)

    def close(self, reason: str) -> None:
        """Close the socket and give back what the connection holds; the one way out."""
        self.reader.close()
        if self.writer is not None:
            self.writer.close()
        self.sock.close()
        self.server.release(self, reason)

    def park(self) -> None:
        """Wait for the client without a greenlet (see _on_readable, tick and wake);
        once shutdown has begun, say goodbye instead."""
        if self.server.closing:
            self.server.dispatch(self, SHUTDOWN)
            return
        self.parked = True
        self.server.stats.parked += 1
        if not self.eof:
            self.reader.start(self._on_readable)

    def tick(self, now: float, park_before: float, parked_too: bool) -> None:
        """In the hub, from the server's sweeper: end a wait past the deadline,
        park a connection whose wait allows it and that made no progress since
        ``park_before``, and (``parked_too``) wake a parked one past its deadline
        or, when the client half-closed (its read watcher is stopped: EOF stays
        readable), one whose client has since gone (GONE). A command that runs
        while the connection is reset is cancelled (ClientGone)."""
        if self.waiting:
            if now >= self.deadline:
                self.resume(DEADLINE)
            elif self.waiting & PARKABLE and self.since <= park_before:
                self.resume(PARK, PARKABLE)
        elif self.running:
            self._cancel_if_reset()
        elif parked_too and self.parked:
            if now >= self.deadline:
                self.wake(DEADLINE)
            elif self.eof and tcp_state(self.sock) == TCP_CLOSE:
                self.wake(GONE)

    def wake(self, reason: str) -> None:
        """In the hub: give a parked connection a greenlet, for ``reason``."""
        if self.parked:
            self.parked = False
            self.server.stats.parked -= 1
            self.server.dispatch(self, reason)

    def notify_shutdown(self) -> None:
        """Shutdown began: a connection parked or waiting for its client hears it
        now; one that runs a command hears it when the command is done."""
        if self.parked:
            self.wake(SHUTDOWN)
        elif self.waiting & STOPPABLE:
            self.server.loop.run_callback(self.resume, SHUTDOWN, STOPPABLE)

    # --- waiting ----------------------------------------------------------------------

    def wait(self, accepts: int) -> str:
        """Wait in this connection's greenlet until the client or the server has
        something for it, and say why: DEADLINE (``deadline`` passed), or what
        ``accepts`` allows: READABLE (READ), WRITABLE (WRITE), PARK (PARKABLE),
        SHUTDOWN (STOPPABLE), LINES (FOLLOWING)."""
        if accepts & READ and not self.reader.active:
            self.reader.start(self._on_readable)
        if accepts & WRITE:
            if self.writer is None:
                self.writer = self.server.loop.io(self.sock.fileno(), 2)
            self.writer.start(self.resume, WRITABLE, WRITE)
        self.waiting = accepts
        try:
            return self.server.hub.switch()
        finally:
            self.waiting = 0
            if accepts & WRITE:
                self.writer.stop()

    def resume(self, reason: str, accepted: int = -1) -> None:
        """In the hub: end the wait with ``reason`` if the wait accepts it
        (``accepted``: the bit that allows it; DEADLINE ends any wait)."""
        if self.waiting & accepted:
            self.waiting = 0
            self.greenlet.switch(reason)

    def _on_readable(self) -> None:
        if self.waiting & READ:  # resume(READABLE, READ), inline: once per request batch
            self.waiting = 0
            self.greenlet.switch(READABLE)
        elif self.parked:
            self.wake(READABLE)
        else:  # busy with a command: started again at the next wait
            self.reader.stop()
            if self.running:  # a reset is seen here at once; tick sees it otherwise
                self._cancel_if_reset()

    def _cancel_if_reset(self) -> None:
        """In the hub: cancel the running command (ClientGone) if the client reset
        the connection; a half-close is not a reset (the client waits for its reply)."""
        if tcp_state(self.sock) == TCP_CLOSE:
            self.running = False
            self.greenlet.throw(ClientGone)  # as gevent.Timeout throws, from the hub

    def _progress(self, patience: float | None = None) -> None:
        """The client moved: the idle clock restarts."""
        self.since = monotonic()
        self.deadline = self.since + (patience or self.server.config.idle_timeout)

    # --- the socket --------------------------------------------------------------------

    def recv(self, size: int = RECV_SIZE, flags: int = 0) -> bytes | None:
        """What the client has sent (b"" once it has closed), or None if nothing yet."""
        try:
            return self.sock.recv(size, flags)
        except WOULD_BLOCK:
            return None

    def keepalive(self, idle: int, interval: int, count: int) -> None:
        """Turn on TCP keepalive (tcp(7)): after ``idle`` seconds without traffic,
        a probe every ``interval`` seconds; ``count`` unanswered probes, or a
        reset in reply, end the connection (a read fails, or tick sees GONE)."""
        sock = self.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
            if hasattr(socket, option):  # Linux; elsewhere the system's defaults
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)

    def _send(self, data: bytes, patience: float | None = None) -> None:
        """Write all of ``data``; a client that accepts none of it for ``patience``
        seconds (the idle timeout) is cut."""
        while data:
            room = WRITE
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, ssl.SSLWantWriteError):
                sent = 0
            except ssl.SSLWantReadError:  # TLS must hear from the client first (renegotiation: refused)
                sent, room = 0, READ
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self._progress(patience)
            if self.wait(room) is DEADLINE:
                raise Ended("the client accepted no reply bytes in time", None)

    def _farewell(self, line: bytes | None) -> None:
        """Send the last line and end the stream gently: TLS sends close_notify;
        plain TCP drains the client's input briefly before closing, so that the
        kernel does not reset the connection and destroy the last reply in
        flight. ``line`` None: the client cannot take anything; just close."""
        if line is None:
            return
        try:
            if line:
                self._send(line, FAREWELL_TIMEOUT)
            if self.tls:
                self._close_notify()
            else:
                self._linger()
        except (OSError, Ended):
            pass

    def _close_notify(self) -> None:
        """Send TLS close_notify (RFC 8446 section 6.1), so that the client can
        tell the end of the stream from a cut; the client's own is not awaited."""
        self._progress(FAREWELL_TIMEOUT)
        while True:
            try:
                self.sock.unwrap()
                return
            except ssl.SSLWantReadError:  # ours is sent; the reply is the client's business
                return
            except ssl.SSLWantWriteError:
                if self.wait(WRITE) is DEADLINE:
                    return

    def _linger(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)
        until = monotonic() + LINGER
        while monotonic() < until:
            self.deadline = min(monotonic() + LINGER_QUIET, until)
            data = self.recv()
            if data == b"" or data is None and self.wait(READ) is DEADLINE:
                return


def tcp_state(sock) -> int | None:
    """The Linux TCP state of ``sock`` (tcpi_state of TCP_INFO); None where unknown."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except (OSError, AttributeError):
        return None
