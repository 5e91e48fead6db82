"""One client, from the accepted socket to its close: Session.

Who owns what:

- A Session owns its socket from accept to close: only ``Session.close``
  closes it, once, whatever the way out (the client left, a refusal, a
  farewell, an error, shutdown).
- Every wait of a session (for a request, for room to write, for the TLS
  handshake, for the PROXY header, while saying goodbye) is ``wait()``: it
  returns why it ended (READABLE, WRITABLE, DEADLINE, PARK, SHUTDOWN).
- The idle deadline is one field, ``deadline``; the server's sweeper is the
  one clock that ends a wait past it (DEADLINE) or parks a session silent for
  PARK_AFTER (PARK).
- A session with nothing to do is *parked*: its greenlet goes back to the
  server and its read watcher waits; the server gives it a greenlet again
  (``run``) when the client speaks, the deadline passes or shutdown begins.
- Exceptions are thrown into a session only to cancel a command that is
  running: ClientGone (the connection was reset) and Shutdown (the shutdown
  deadline passed). Inside its own greenlet a session ends with ``Ended``.
"""

from __future__ import annotations

import logging
import socket
import ssl
from time import monotonic
from typing import TYPE_CHECKING

import gevent
import gevent.socket
from gevent import GreenletExit, getcurrent

from gcmd import protocol, proxy
from gcmd.protocol import Close, escape, split_lines

if TYPE_CHECKING:
    from gcmd.server import GcmdServer

log = logging.getLogger(__name__)

#: bytes asked of the kernel per read; several pipelined requests at once
RECV_SIZE = 65536
#: replies are gathered up to this size before one write
FLUSH_AT = 65536
#: seconds to drain a client's unread input before closing, so that the
#: kernel does not reset the connection and destroy the last reply in flight;
#: a client that sends nothing for LINGER_QUIET seconds is not waited for
LINGER = 1.0
LINGER_QUIET = 0.2
#: seconds a farewell line may take to leave when the client is not reading
FAREWELL_TIMEOUT = 2.0
#: seconds between checks that a client is still there while its command runs
HANGUP_CHECK = 0.1
#: seconds a client may be silent before it is parked
PARK_AFTER = 1.0
#: seconds a load balancer has to send the PROXY header (at most the idle timeout)
PROXY_TIMEOUT = 5.0
#: seconds between two looks at a PROXY header that arrived in part
PROXY_PARTIAL_WAIT = 0.01

# why a wait ended, or why a session was given a greenlet
READABLE = "readable"
WRITABLE = "writable"
DEADLINE = "deadline"
PARK = "park"
SHUTDOWN = "shutdown"
#: a TLS or PROXY connection, to be opened (header, admission, handshake) in its greenlet
OPEN = "open"
#: a connection refused in the hub, to be told so
REFUSED = "refused"

# what a wait accepts: bits of Session.waiting
_READ, _WRITE, _REQUEST = 1, 2, 4
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError)
_TCP_CLOSE = 7  # Linux tcpi_state of a connection the peer has reset


class Ended(Exception):
    """A session is over (raised in its own greenlet): why, for the log, and the
    last line for the client (b"": none, but close gently; None: just close)."""

    def __init__(self, reason: str, line: bytes | None = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line


class Shutdown(GreenletExit):
    """Thrown into a session still running a command at the shutdown deadline."""


class ClientGone(GreenletExit):
    """Thrown into a session whose connection was reset while a command ran."""


class Session:
    """One client: reads request lines, runs them in order, writes the replies."""

    __slots__ = ("admitted", "authenticated", "command", "context", "deadline", "greenlet", "ip",
                 "number", "parked", "pending", "reader", "server", "since", "sock", "tls",
                 "waiting", "writer")

    def __init__(self, server: GcmdServer, sock, ip: str, number: int) -> None:
        self.server = server
        self.sock = sock
        sock.settimeout(0.0)  # every wait is wait(): no socket timeouts
        self.ip = ip
        self.number = number
        self.context = {"context": f"Session,{number},{ip}"}
        #: holds a slot (counted in clients, per_ip)
        self.admitted = False
        self.authenticated = False
        #: the greenlet serving the session; None while parked
        self.greenlet = None
        #: what the current wait accepts (_READ, _WRITE, _REQUEST bits); 0 when not waiting
        self.waiting = 0
        self.parked = False
        #: the last progress (a complete line received, a reply sent) and the idle deadline
        self.since = monotonic()
        self.deadline = self.since + server.config.idle_timeout
        #: the start of a request line whose end has not arrived
        self.pending = b""
        #: the watcher of a slow command's hang-up check while it runs, else None
        self.command = None
        #: stays started between requests (starting it costs more than a stray wake)
        self.reader = server.loop.io(sock.fileno(), 1)
        self.writer = None
        #: the socket is a TLS socket (after the handshake begins)
        self.tls = False

    # --- lifecycle: the server calls run() in a greenlet, and close() ends it -----------

    def run(self, start: str, data: bytes = b"") -> None:
        """Serve from ``start`` (why the session got a greenlet; ``data``: what the
        client already sent, or a refusal line) until it is parked or closed."""
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
        """PARK, or why the session is over (for the log)."""
        try:
            try:
                return self._run(start, data)
            except Ended as end:
                self._farewell(end.line)
                return end.reason
            except Shutdown:
                self._farewell(protocol.SHUTTING_DOWN)
                return "server shutting down"
        except ClientGone:
            return "connection reset while a command ran"
        except ssl.SSLError as exc:
            return f"TLS error: {exc.reason or exc}"
        except OSError as exc:
            return exc.strerror or str(exc)
        except Exception:
            log.exception("internal error serving %s", self.ip, extra=self.context)
            return "internal error"

    def _run(self, start: str, data: bytes) -> str:
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
            raise Ended("idle timeout", protocol.IDLE_TIMEOUT)
        elif start is SHUTDOWN:
            raise Ended("server shutting down", protocol.SHUTTING_DOWN)
        return self._serve(data, ready=start is READABLE)

    def close(self, reason: str) -> None:
        """Close the socket and give back what the session holds; the one way out."""
        self.reader.close()
        if self.writer is not None:
            self.writer.close()
        self.sock.close()
        self.server.release(self, reason)

    def park(self) -> None:
        """Wait for the client without a greenlet (see _on_readable and tick)."""
        self.parked = True
        self.server.stats.parked += 1
        self.reader.start(self._on_readable)

    def tick(self, now: float, park_before: float) -> None:
        """In the hub, from the server's sweeper: end a wait past the deadline,
        park a session waiting for a request since before ``park_before``."""
        if self.waiting:
            if now >= self.deadline:
                self.resume(DEADLINE)
            elif self.waiting & _REQUEST and self.since <= park_before:
                self.resume(PARK, _REQUEST)
        elif self.parked and now >= self.deadline:
            self.wake(DEADLINE)

    def wake(self, reason: str) -> None:
        """In the hub: give a parked session a greenlet, for ``reason``."""
        if self.parked:
            self.parked = False
            self.server.stats.parked -= 1
            self.server.dispatch(self, reason)

    def notify_shutdown(self) -> None:
        """Shutdown began: a session waiting for a request hears it now; one that
        runs a command hears it when the command is done."""
        if self.parked:
            self.wake(SHUTDOWN)
        elif self.waiting & _REQUEST:
            self.server.loop.run_callback(self.resume, SHUTDOWN, _REQUEST)

    # --- waiting ----------------------------------------------------------------------

    def wait(self, accepts: int) -> str:
        """Wait in this session's greenlet until the client or the server has
        something for it; why: READABLE or WRITABLE (as ``accepts``), DEADLINE
        (``deadline`` passed), PARK or SHUTDOWN (when waiting for a request)."""
        if accepts & _READ and not self.reader.active:
            self.reader.start(self._on_readable)
        if accepts & _WRITE:
            if self.writer is None:
                self.writer = self.server.loop.io(self.sock.fileno(), 2)
            self.writer.start(self.resume, WRITABLE, _WRITE)
        self.waiting = accepts
        try:
            return self.server.hub.switch()
        finally:
            self.waiting = 0
            if accepts & _WRITE:
                self.writer.stop()

    def resume(self, reason: str, accepted: int = -1) -> None:
        """In the hub: end the session's wait with ``reason`` if the wait accepts it."""
        if self.waiting & accepted:
            self.waiting = 0
            self.greenlet.switch(reason)

    def _on_readable(self) -> None:
        if self.waiting & _READ:
            self.resume(READABLE, _READ)
        elif self.parked:
            self.wake(READABLE)
        else:  # busy with a command: started again at the next wait
            self.reader.stop()

    def _progress(self, patience: float | None = None) -> None:
        """The client moved: the idle clock restarts."""
        self.since = monotonic()
        self.deadline = self.since + (patience or self.server.config.idle_timeout)

    # --- serving requests --------------------------------------------------------------

    def _serve(self, data: bytes, ready: bool = False) -> str:
        """Answer requests until the client is done (Ended) or silent long enough
        to be parked (PARK)."""
        server = self.server
        max_line = server.config.max_line
        while True:
            if not data:
                data = self._read_request(ready)
                if data is None:
                    return PARK
            ready = False
            lines, self.pending, too_long = split_lines(self.pending, data, max_line)
            data = b""
            if lines:
                self._answer(lines)
                self._progress()
                if len(lines) > 1 and self._tls_pending():
                    # a pipelining TLS client always has input ready and would
                    # never yield: let the others run between its batches
                    gevent.sleep(0)
            if too_long:
                raise Ended("line too long", protocol.LINE_TOO_LONG)

    def _read_request(self, ready: bool) -> bytes | None:
        """The client's next bytes; None when it has been silent long enough to park."""
        while True:
            if not (ready or self._tls_pending()):
                reason = self.wait(_READ | _REQUEST)
                if reason is PARK and not self.server.closing:
                    return None
                if reason is DEADLINE:
                    raise Ended("idle timeout", protocol.IDLE_TIMEOUT)
                if reason is SHUTDOWN or reason is PARK:
                    raise Ended("server shutting down", protocol.SHUTTING_DOWN)
            ready = False
            data = self.recv()
            if data:
                return data
            if data is not None:
                raise Ended("Connection was closed cleanly.", None)

    def _answer(self, lines: list[bytes]) -> None:
        """Run the requests of one batch in order; their replies go out together,
        and before any slow command so that the client is not kept waiting."""
        server = self.server
        commands = server.commands
        log_requests = log.isEnabledFor(logging.INFO)
        replies: list[bytes] = []
        size = 0
        for line in lines:
            parsed = commands.parse(line)
            if parsed is None:
                continue
            handler, arg = parsed
            if log_requests:
                log.info("Cmd received from %s : %s", self.ip, _loggable(line, handler),
                         extra=self.context)
            if handler.slow:
                self._send(b"".join(replies))
                replies, size = [], 0
                reply = self._run_slow(handler, arg)
            else:
                reply = commands.run(handler, self, arg)
            if isinstance(reply, Close):
                self._send(b"".join(replies))
                raise Ended(reply.reason, reply)
            replies.append(reply)
            size += len(reply)
            if size >= FLUSH_AT:  # a client that does not read its replies stops being read
                self._send(b"".join(replies))
                replies, size = [], 0
            if server.closing:  # pipelined requests not yet started are dropped
                self._send(b"".join(replies))
                raise Ended("server shutting down", protocol.SHUTTING_DOWN)
        self._send(b"".join(replies))

    def _run_slow(self, handler, arg: bytes) -> bytes:
        """Run a slow command, cancelling it if the connection is reset meanwhile."""
        self.command = watcher = gevent.spawn(self._watch_hangup)
        try:
            return self.server.commands.run_slow(handler, self, arg)
        finally:
            self.command = None
            watcher.kill(block=False)

    def _watch_hangup(self) -> None:
        fileno = self.sock.fileno()
        while True:
            try:
                gevent.socket.wait_read(fileno, timeout=HANGUP_CHECK)
            except TimeoutError:
                pass
            if _tcp_state(self.sock) == _TCP_CLOSE:
                self.server.loop.run_callback(self._cancel, getcurrent())
                return
            # input that is waiting keeps the socket readable: do not spin on it
            gevent.sleep(HANGUP_CHECK)

    def _cancel(self, watcher) -> None:
        # in the hub; by now the command may be over: only its own watcher cancels it
        if self.command is watcher:
            self.greenlet.throw(ClientGone)

    # --- the socket --------------------------------------------------------------------

    def recv(self, size: int = RECV_SIZE, flags: int = 0) -> bytes | None:
        """What the client has sent (b"" once it has closed), or None if nothing yet."""
        try:
            return self.sock.recv(size, flags)
        except _WOULD_BLOCK:
            return None

    def _tls_pending(self) -> bool:
        # TLS holds what it decrypted where the read watcher cannot see it
        return self.tls and self.sock.pending() > 0

    def _send(self, data: bytes, patience: float | None = None) -> None:
        """Write all of ``data``; a client that accepts none of it for ``patience``
        seconds (the idle timeout) is cut."""
        while data:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, ssl.SSLWantWriteError):
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self._progress(patience)
            if self.wait(_WRITE) is DEADLINE:
                raise Ended("the client accepted no reply bytes in time", None)

    def _farewell(self, line: bytes | None) -> None:
        """Send the last line, then drain the client's input briefly before
        closing, so that the kernel does not reset the connection and destroy
        the last reply in flight."""
        if line is None:
            return
        try:
            if line:
                self._send(line, FAREWELL_TIMEOUT)
            if self.tls:
                return
            self.sock.shutdown(socket.SHUT_WR)
            until = monotonic() + LINGER
            while monotonic() < until:
                self.deadline = min(monotonic() + LINGER_QUIET, until)
                data = self.recv()
                if data == b"" or data is None and self.wait(_READ) is DEADLINE:
                    return
        except (OSError, Ended):
            pass

    # --- opening a TLS or PROXY connection, in its greenlet ------------------------------

    def _open(self) -> None:
        """Read the PROXY header, admit the client, do the TLS handshake. A refused
        client is told so (Ended)."""
        server = self.server
        if server.config.proxy_protocol:
            self._read_proxy_header()
        refusal = server.admit(self)
        if refusal is not None and refusal.line is None:
            raise refusal
        if server.ssl_context is not None:
            self.sock = server.ssl_context.wrap_socket(self.sock, server_side=True,
                                                       do_handshake_on_connect=False)
            self.tls = True
            if refusal is not None:
                self._progress(min(server.config.idle_timeout, FAREWELL_TIMEOUT))
            self._handshake()
        if refusal is not None:
            raise refusal

    def _handshake(self) -> None:
        while True:
            try:
                self.sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                reason = self.wait(_READ)
            except ssl.SSLWantWriteError:
                reason = self.wait(_WRITE)
            if reason is DEADLINE:
                raise Ended("TLS handshake not finished in time", None)

    def _read_proxy_header(self) -> None:
        """Take the PROXY header off the socket and serve the client it names.

        Only the header is read (peeking first), so that what follows, requests
        or a TLS handshake, stays for the session."""
        self._progress(min(self.server.config.idle_timeout, PROXY_TIMEOUT))
        try:
            while True:
                peeked = self.recv(proxy.V2_MAX, socket.MSG_PEEK)
                if peeked == b"":
                    raise proxy.ProxyError("closed before its PROXY header")
                found = proxy.parse(peeked) if peeked else None
                if found is not None:
                    break
                if monotonic() >= self.deadline:
                    raise proxy.ProxyError("no complete PROXY header in time")
                if peeked:  # part of a header: the socket stays readable, look again shortly
                    gevent.sleep(PROXY_PARTIAL_WAIT)
                elif self.wait(_READ) is DEADLINE:
                    raise proxy.ProxyError("no complete PROXY header in time")
            size, address = found
            while size:
                chunk = self.recv(size)
                if chunk == b"":
                    raise proxy.ProxyError("closed within its PROXY header")
                size -= len(chunk or b"")
        except (proxy.ProxyError, OSError) as exc:
            self.server.stats.refuse("proxy_header")
            log.warning("Closed connection from %s: no valid PROXY header (%s)", self.ip, exc,
                        extra=self.context)
            raise Ended("no valid PROXY header", None) from None
        if address:
            self.ip = address
            self.context = {"context": f"Session,{self.number},{address}"}


def _loggable(line: bytes, handler) -> str:
    """A request as the log shows it: escaped, without the ``\\r`` of a CRLF line
    ending, and without the argument of a secret command."""
    if handler.secret:
        return f"{handler.verb} ***"
    if line.endswith(b"\r"):
        line = line[:-1]
    return escape(line)


def _tcp_state(sock) -> int | None:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except (OSError, AttributeError):
        return None
