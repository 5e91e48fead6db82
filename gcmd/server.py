"""The server: accepting clients (GcmdServer) and serving one client (Session).

Data flows one way: socket -> Session -> protocol -> command -> service ->
reply -> Session -> socket. Only Session writes to a client's socket.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import itertools
import logging
import socket
import ssl
import sys
from collections import Counter
from time import monotonic

import gevent
import gevent.socket
import gevent.ssl
from gevent import GreenletExit
from gevent.hub import Waiter
from gevent.lock import BoundedSemaphore
from gevent.pool import Pool
from gevent.server import StreamServer
from gevent.threadpool import ThreadPool

from gcmd import protocol, proxy
from gcmd.commands import Commands
from gcmd.config import Config
from gcmd.hashing import HashService
from gcmd.logtail import LogTail
from gcmd.protocol import Close, escape
from gcmd.stats import ServerStats

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
#: seconds between the sweeper's checks of idle deadlines
SWEEP_EVERY = 0.1
#: seconds accepting pauses when the process is out of file descriptors
ACCEPT_PAUSE = 0.1
#: seconds a load balancer has to send the PROXY header (at most the idle timeout)
PROXY_TIMEOUT = 5.0
#: greenlets kept to serve the next client instead of creating new ones
IDLE_DRIVERS = 64
#: threads that resolve paths, open files and stat the log
METADATA_WORKERS = 4

#: Linux gives an accepted connection the listening socket's TCP_NODELAY
_NODELAY_INHERITED = sys.platform.startswith("linux")
_TCP_CLOSE = 7  # Linux tcpi_state of a connection the peer has reset
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Shutdown(GreenletExit):
    """Raised in a session when the server shuts down."""


class ClientGone(GreenletExit):
    """Raised in a session whose connection was reset while a command ran."""


class IdleTimeout(GreenletExit):
    """Raised in a session waiting for a request past its idle deadline."""


class Park(GreenletExit):
    """Raised in a session silent for PARK_AFTER: it goes on without a greenlet."""


class Session:
    """One client: reads request lines, runs them in order, writes the replies.

    A client that has nothing to say is *parked*: its greenlet ends and a read
    watcher waits for its next request, so that thousands of idle clients
    cost a socket and two watchers each rather than a greenlet stack.
    """

    __slots__ = (
        "authenticated",
        "context",
        "deadline",
        "greenlet",
        "ip",
        "parkable",
        "pending",
        "readable",
        "reading",
        "server",
        "sock",
        "waiting",
        "watchers",
    )

    def __init__(self, server: GcmdServer, sock, ip: str, context: dict) -> None:
        self.server = server
        self.sock = sock
        self.ip = ip
        self.context = context
        self.authenticated = False
        #: blocked waiting for a request: shutdown may interrupt it at once
        self.reading = False
        #: waiting for the read watcher, which resumes it
        self.waiting = False
        self.greenlet = None
        #: when the client is cut unless a complete line or a reply gets through
        self.deadline = monotonic() + server.config.idle_timeout
        #: the start of a request line whose end has not arrived
        self.pending = b""
        #: the read watcher and idle timer of a parked session
        self.watchers = None
        #: TLS buffers what it decrypted, where a read watcher cannot see it
        self.parkable = server.ssl_context is None
        #: tells when the client's next bytes have arrived, so that a read
        #: never fails for want of them; None for TLS
        self.readable = server.loop.io(sock.fileno(), 1) if self.parkable else None

    def serve(self, data: bytes = b"") -> str | None:
        """Serve the client, starting with ``data`` it has sent already, until it
        leaves (the reason) or is idle (None: park it)."""
        self.greenlet = gevent.getcurrent()
        try:
            return self._serve(data)
        except Shutdown:
            self._farewell(protocol.SHUTTING_DOWN)
            return "server shutting down"
        except IdleTimeout:
            self._farewell(protocol.IDLE_TIMEOUT)
            return "idle timeout"
        except ClientGone:
            return "connection reset while a command ran"
        except ssl.SSLError as exc:
            return f"TLS error: {exc.reason or exc}"
        except OSError as exc:
            return exc.strerror or str(exc)
        except Exception:
            log.exception("internal error serving %s", self.ip, extra=self.context)
            return "internal error"
        finally:
            self.greenlet = None

    def _serve(self, data: bytes) -> str | None:
        config = self.server.config
        commands = self.server.commands
        do_auth = commands.do_auth
        log_requests = log.isEnabledFor(logging.INFO)
        sock = self.sock
        readable = self.readable
        to_hub = gevent.get_hub().switch
        max_line = config.max_line
        idle_timeout = config.idle_timeout
        if self.server.closing:
            raise Shutdown
        if monotonic() >= self.deadline:
            raise IdleTimeout
        if not self.parkable:  # TLS: never parked, so served once from the start
            self._handshake()
        while True:
            if self.server.closing:
                raise Shutdown
            if not data:
                # no timer here: the server's sweeper enforces the idle deadline
                # and parks a client that stays silent
                self.reading = True
                try:
                    if readable is not None:
                        # wait, then read: a read that finds nothing costs a
                        # system call and an exception
                        if not readable.active:
                            readable.start(self._on_readable)
                        self.waiting = True
                        to_hub()  # _on_readable switches back
                        self.waiting = False
                    data = sock.recv(RECV_SIZE)
                except Park:
                    return None
                finally:
                    self.reading = self.waiting = False
                if not data:
                    return "Connection was closed cleanly."
            if self.pending:
                data = self.pending + data
            if b"\n" not in data:
                if len(data) > max_line:
                    self._farewell(protocol.LINE_TOO_LONG)
                    return "line too long"
                self.pending, data = data, b""
                continue
            lines = data.split(b"\n")
            data = b""
            self.pending = lines.pop()
            replies: list[bytes] = []
            size = 0
            for line in lines:
                if len(line) > max_line:
                    self._send(b"".join(replies))
                    self._farewell(protocol.LINE_TOO_LONG)
                    return "line too long"
                parsed = commands.parse(line)
                if parsed is None:
                    continue
                handler, arg = parsed
                if log_requests:
                    log.info("Cmd received from %s : %s", self.ip,
                             "auth ***" if handler == do_auth else escape(line),
                             extra=self.context)
                if handler.slow:
                    # what is ready goes out before the client waits on a thread or tail
                    self._send(b"".join(replies))
                    replies, size = [], 0
                    reply = self._run_watched(handler, arg)
                else:
                    reply = commands.run(handler, self, arg)
                if isinstance(reply, Close):
                    self._send(b"".join(replies))
                    self._farewell(reply)
                    return "closed by the server after " + ("a failed auth" if reply else "exit")
                replies.append(reply)
                size += len(reply)
                if size >= FLUSH_AT:
                    # a client that does not read its replies stops being read
                    self._send(b"".join(replies))
                    replies, size = [], 0
                if self.server.closing:
                    self._send(b"".join(replies))
                    raise Shutdown
            if len(self.pending) > max_line:
                self._send(b"".join(replies))
                self._farewell(protocol.LINE_TOO_LONG)
                return "line too long"
            self._send(b"".join(replies))
            self.deadline = monotonic() + idle_timeout
            if len(lines) > 1 and readable is None:
                # a pipelining client always has input ready and would never
                # yield: let the others run between its batches (waiting for
                # readable does that for plain connections)
                gevent.sleep(0)

    def _on_readable(self) -> None:
        """The read watcher's callback while the session has a greenlet (in the hub).

        The watcher stays started between requests, so that each request does
        not start and stop it; when it fires while the session is busy it is
        stopped, and started again at the next wait."""
        if self.waiting:
            self.greenlet.switch()
        else:
            self.readable.stop()

    def park(self, wake) -> None:
        """Wait for the client's next bytes, or its idle deadline, without a greenlet."""
        deadline = self.server.loop.timer(max(self.deadline - monotonic(), 0.0))
        self.watchers = (self.readable, deadline)
        self.readable.stop()
        self.readable.start(wake, self)
        deadline.start(wake, self)

    def unpark(self) -> None:
        readable, deadline = self.watchers
        readable.stop()
        deadline.stop()
        deadline.close()
        self.watchers = None

    def _handshake(self) -> None:
        self.sock.settimeout(max(self.deadline - monotonic(), 0.001))
        self.reading = True
        try:
            self.sock.do_handshake()
        finally:
            self.reading = False
            self.sock.settimeout(None)

    def _run_watched(self, handler, arg: bytes) -> bytes:
        """Run a slow command, cancelling it if the connection is reset meanwhile."""
        watcher = gevent.spawn(self._watch_hangup)
        try:
            return self.server.commands.run_slow(handler, self, arg)
        finally:
            watcher.kill(block=False)

    def _watch_hangup(self) -> None:
        fileno = self.sock.fileno()
        while True:
            try:
                gevent.socket.wait_read(fileno, timeout=HANGUP_CHECK)
            except TimeoutError:
                pass
            if _tcp_state(self.sock) == _TCP_CLOSE:
                # checked again when thrown: by then the command may be over
                # and the greenlet serving the next client
                self.server.loop.run_callback(_throw_if_running, self, self.greenlet, ClientGone)
                return
            # input that is waiting keeps the socket readable: do not spin on it
            gevent.sleep(HANGUP_CHECK)

    def _send(self, data: bytes) -> None:
        """Write a reply; give up when the client accepts nothing for the idle timeout."""
        if not data:
            return
        sock = self.sock
        try:
            sent = sock.send(data, 0, 0.0)  # what fits now, without a timer
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            # the client's buffer is full: each send may wait up to the idle timeout
            sock.settimeout(self.server.config.idle_timeout)
            try:
                view = memoryview(data)[sent:]
                while view:
                    view = view[sock.send(view):]
            finally:
                sock.settimeout(None)

    def _farewell(self, line: bytes) -> None:
        farewell(self.sock, line)


def farewell(sock, line: bytes) -> None:
    """Send a last line, then drain the client's input briefly before closing."""
    try:
        sock.settimeout(FAREWELL_TIMEOUT)
        if line:
            sock.sendall(line)
        if isinstance(sock, gevent.ssl.SSLSocket):
            return
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(LINGER_QUIET)
        until = monotonic() + LINGER
        while monotonic() < until and sock.recv(RECV_SIZE):
            pass
    except OSError:
        pass


def _throw_if_reading(session: Session, greenlet, exception: type[BaseException]) -> None:
    # runs in the hub, so nothing can happen between the check and the throw
    if session.reading and session.greenlet is greenlet:
        greenlet.throw(exception)


def _throw_if_running(session: Session, greenlet, exception: type[BaseException]) -> None:
    # runs in the hub: the same greenlet still serves the session, in a command
    if greenlet is not None and session.greenlet is greenlet and not session.reading:
        greenlet.throw(exception)


def _read_now(sock) -> bytes | None:
    """What the client has sent so far (b"" once it has closed), or None if
    nothing has arrived yet. Never waits."""
    sock.settimeout(0.0)
    try:
        return sock.recv(RECV_SIZE)
    except BlockingIOError:
        return None
    finally:
        sock.settimeout(None)


def _tcp_state(sock) -> int | None:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except (OSError, AttributeError):
        return None


class GcmdServer(StreamServer):
    """Accepts clients, enforces the caps, and shuts down gracefully."""

    def __init__(self, config: Config, ssl_context: ssl.SSLContext | None = None,
                 listener: socket.socket | None = None) -> None:
        #: the handlers of connected clients, so that shutdown can wait for them
        self.handlers = Pool()
        if listener is None:
            super().__init__((config.host, config.port), backlog=config.backlog, spawn=self.handlers)
        else:
            super().__init__(listener, spawn=self.handlers)
        self.config = config
        self.ssl_context = ssl_context
        self.stats = ServerStats()
        self.metadata_pool = ThreadPool(METADATA_WORKERS)
        self.hashing = HashService(config.root, config.hash_workers, config.max_pending,
                                   config.hash_cache, self.metadata_pool)
        self.tail = LogTail(config.logfile, config.command_timeout, self.metadata_pool)
        self.commands = Commands(config, self.hashing, self.tail, self.stats)
        self.slots = BoundedSemaphore(config.max_clients)
        self.per_ip: Counter[str] = Counter()
        self.sessions: set[Session] = set()
        #: sockets of parked sessions (and of those handed to another greenlet
        #: as shutdown begins), which the greenlet that served them must not close
        self._parked: set = set()
        #: sessions that have a greenlet (not parked)
        self.active: set[Session] = set()
        self._sweeper = None
        self._resource_warned = 0.0
        self._accept_timer = None
        self.closing = False
        self._numbers = itertools.count()
        #: greenlets waiting for the next session to serve
        self._idle_drivers: list[Waiter] = []

    def set_token(self, token: bytes) -> None:
        """Require this token from now on (clients already authenticated stay so)."""
        self.config = self.commands.config = dataclasses.replace(self.config, token=token)

    @property
    def port(self) -> int:
        return self.address[1]

    def do_handle(self, sock, address) -> None:
        """Admit an accepted connection: runs in the hub, before any greenlet exists.

        A plain connection is admitted here, and gets a greenlet only if it has
        already sent something; otherwise it is parked at once, as a client
        that has nothing to say is. Accepting stays cheaper than connecting,
        so a burst of connects does not overflow the listen backlog. A TLS
        handshake or a PROXY header needs a greenlet first (handle).
        """
        self.stats.connections += 1
        if not _NODELAY_INHERITED:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None or self.config.proxy_protocol:
            super().do_handle(sock, address)
            return
        admitted = self._admit(sock, address[0], next(self._numbers))
        if isinstance(admitted, Session):
            data = self._first_bytes(admitted)
            if data:  # a client that connects and asks at once
                self._dispatch(admitted, data)
        elif admitted is not None:
            self.handlers.spawn(self._refuse, sock, admitted)
        else:
            sock.close()

    def handle(self, sock, address) -> None:
        ip = address[0]
        number = next(self._numbers)
        if self.config.proxy_protocol:
            try:
                ip = proxy.read_header(sock, min(self.config.idle_timeout, PROXY_TIMEOUT)) or ip
            except (proxy.ProxyError, OSError) as exc:
                self.stats.refuse("proxy_header")
                log.warning("Closed connection from %s: no valid PROXY header (%s)", ip, exc,
                            extra={"context": f"Session,{number},{ip}"})
                return
        admitted = self._admit(sock, ip, number)
        if isinstance(admitted, Session):
            if self.ssl_context is not None:
                admitted.sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                             do_handshake_on_connect=False)
                self._drive(admitted)
            elif data := self._first_bytes(admitted):
                self._drive(admitted, data)
        elif admitted is not None:
            self._refuse(sock, admitted)

    def _admit(self, sock, ip: str, number: int) -> Session | bytes | None:
        """A session for the client at ``ip``; else the line that refuses it, or None
        to close it without a word. Never blocks."""
        context = {"context": f"Session,{number},{ip}"}
        if self.config.allow and not _allowed(ip, self.config.allow):
            self.stats.refuse("not_allowed")
            log.warning("Refused connection from %s: not in --allow", ip, extra=context)
            return None
        log.info("Client connection from %s", ip, extra=context)
        if self.closing:
            self.stats.refuse("shutting_down")
            return protocol.SHUTTING_DOWN
        if self.config.max_per_ip and self.per_ip[ip] >= self.config.max_per_ip:
            self.stats.refuse("max_per_ip")
            log.info("Too many connections from %s. bye !", ip, extra=context)
            return protocol.TOO_MANY_FROM_ADDRESS
        if not self.slots.acquire(blocking=False):
            self.stats.refuse("max_clients")
            log.info("Too many connections. bye !", extra=context)
            return protocol.TOO_MANY
        self.per_ip[ip] += 1
        self.stats.clients += 1
        session = Session(self, sock, ip, context)
        self.sessions.add(session)
        return session

    def _first_bytes(self, session: Session) -> bytes | None:
        """What a new plain session has sent already, to serve at once; if
        nothing (None), the session is parked, or ended if the client has gone."""
        try:
            data = _read_now(session.sock)
        except OSError as exc:
            self._end(session, exc.strerror or str(exc))
            return None
        if data is None:
            self._park(session)
        elif not data:
            self._end(session, "Connection was closed cleanly.")
        return data or None

    def _dispatch(self, session: Session, data: bytes = b"") -> None:
        """Serve ``session`` in an idle driver greenlet, or in a new one.

        Runs in the hub (an idle driver is switched to at once), or while the
        server shuts down, when no driver waits any more."""
        if self._idle_drivers:
            self._idle_drivers.pop().switch((session, data))
        else:
            # in a list the driver empties: a greenlet keeps its arguments
            self.handlers.spawn(self._driver, [(session, data)])

    def _driver(self, first: list) -> None:
        """Serve sessions one after another, so that a connection does not pay
        for creating and destroying a greenlet."""
        job = first.pop()
        while job is not None:
            self._drive(*job)
            job = None  # a client that has gone is not kept alive by an idle driver
            if self.closing or len(self._idle_drivers) >= IDLE_DRIVERS:
                return
            waiter = Waiter()
            self._idle_drivers.append(waiter)
            try:
                job = waiter.get()
            except BaseException:  # killed while idle: no client may be handed to it
                if waiter in self._idle_drivers:
                    self._idle_drivers.remove(waiter)
                raise

    def _drive(self, session: Session, data: bytes = b"") -> None:
        """Serve ``session`` in this greenlet, starting with ``data`` it has sent
        already, until it leaves or is parked."""
        reason = "internal error"
        self.active.add(session)
        try:
            reason = session.serve(data)
        finally:
            self.active.discard(session)
            if reason is None:
                self._park(session)
            else:
                self._end(session, reason)

    def _park(self, session: Session) -> None:
        # the greenlet that served it may be handle()'s, which closes its
        # socket on return unless the socket is here
        self._parked.add(session.sock)
        if self.closing:  # parked as shutdown began: it must still hear the goodbye
            self._dispatch(session)
            return
        session.park(self._wake)

    def _wake(self, session: Session) -> None:
        if session.watchers is None:  # both watchers fired in one loop iteration
            return
        session.unpark()
        self._parked.discard(session.sock)
        self._dispatch(session)

    def _end(self, session: Session, reason: str) -> None:
        self.sessions.discard(session)
        self._parked.discard(session.sock)
        if session.readable is not None:
            session.readable.close()
        session.sock.close()
        ip = session.ip
        self.stats.clients -= 1
        self.per_ip[ip] -= 1
        if not self.per_ip[ip]:
            del self.per_ip[ip]
        self.slots.release()
        log.info("Lost client connection. Reason: %s", reason, extra=session.context)

    def init_socket(self) -> None:
        super().init_socket()
        if _NODELAY_INHERITED:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_read(self):
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                raise
            # out of file descriptors: stop accepting for a moment rather than
            # spin; clients that leave free descriptors and accepting resumes
            now = monotonic()
            if now - self._resource_warned > 1:
                self._resource_warned = now
                log.warning("cannot accept a connection: %s; pausing %g s", exc.strerror,
                            ACCEPT_PAUSE)
            self.stop_accepting()
            self._accept_timer = self.loop.timer(ACCEPT_PAUSE)
            self._accept_timer.start(self._resume_accepting)
            return None

    def _resume_accepting(self) -> None:
        if not self.closing:
            self.start_accepting()

    def do_close(self, sock, *args) -> None:
        # the handler of a parked client returned, but the client stays
        if sock not in self._parked:
            sock.close()

    def _refuse(self, sock, line: bytes) -> None:
        """Tell a client it is not served, without giving it a slot."""
        try:
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
                sock.settimeout(min(self.config.idle_timeout, FAREWELL_TIMEOUT))
                sock.do_handshake()
            farewell(sock, line)
        except (OSError, ssl.SSLError):
            pass
        finally:
            sock.close()

    def start(self) -> None:
        super().start()
        self._sweeper = gevent.spawn(self._sweep)

    def _sweep(self) -> None:
        """Cut clients past their idle deadline, park those silent for PARK_AFTER.

        One timer for all the clients that wait for a request, rather than a
        timer started and stopped around every read.
        """
        park_age = PARK_AFTER - self.config.idle_timeout
        while True:
            gevent.sleep(SWEEP_EVERY)
            now = monotonic()
            for session in self.active:
                if not session.reading:
                    continue
                if now >= session.deadline:
                    self.interrupt(session, IdleTimeout)
                elif session.parkable and now >= session.deadline + park_age:
                    self.interrupt(session, Park)

    def interrupt(self, session: Session, exception: type[BaseException]) -> None:
        """Raise ``exception`` in a session if it is still waiting for a request then."""
        self.loop.run_callback(_throw_if_reading, session, session.greenlet, exception)

    def shutdown(self) -> None:
        """Stop accepting, let running commands finish, say goodbye, release everything."""
        log.info("Shutting down: %d clients connected", len(self.sessions))
        self.closing = True
        self.close()
        for waiter in self._idle_drivers:
            self.loop.run_callback(waiter.switch, None)
        self._idle_drivers.clear()
        for session in list(self.sessions):
            if session.watchers is not None:
                self._wake(session)
            elif session.reading:
                self.interrupt(session, Shutdown)
        if not self.handlers.join(timeout=self.config.shutdown_timeout):
            log.warning("Cutting %d commands still running after %g s",
                        len(self.handlers), self.config.shutdown_timeout)
            self.handlers.kill(Shutdown, block=True, timeout=FAREWELL_TIMEOUT + LINGER + 1)
        if self._sweeper is not None:
            self._sweeper.kill()
        self.hashing.close()
        self.metadata_pool.kill()
        log.info("Server stopped")


def _allowed(ip: str, networks) -> bool:
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return any(address in net or (mapped is not None and mapped in net) for net in networks)
