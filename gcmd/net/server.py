"""The server: accepting clients, admitting them, and lending them greenlets.

Who owns what (see gcmd/connection.py for one client's side):

- GcmdServer accepts a connection and makes it a Session at once; from then
  on the Session owns the socket and is the only one to close it. gevent's
  rule that the server closes a handler's socket when the handler returns
  does not apply: handlers are not used (``do_handle`` is overridden).
- Admission (``admit``: --allow, --max-per-ip, --max-clients, shutdown) and
  its undoing (``release``, called by Session.close) are here, once. A client
  that must show a certificate is checked against --allow alone (``screen``)
  before its TLS handshake, and admitted after it.
- Greenlets: a plain connection is admitted in the hub; it gets a greenlet
  only when it has something to say (``dispatch``). A TLS or PROXY connection
  gets one at once, to read its header and do its handshake. A greenlet that
  is done with a session waits (up to IDLE_DRIVERS of them) for the next one.
- One clock for every session: the sweeper, a libev timer in the hub, ends the
  waits of sessions past their deadline, parks those silent for PARK_AFTER,
  cancels the command of a session whose client has reset (ClientGone: the
  session's read watcher sees most resets first), and closes a half-closed
  follower whose client has since gone (GONE).
- Shutdown: stop accepting, tell every session (``notify_shutdown``), wait
  for running commands up to --shutdown-timeout, then cancel them (Shutdown).

To add a command that streams (a follow), make it a state of Session that
waits with ``Session.wait``; nothing here changes.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import itertools
import logging
import os
import socket
import ssl
import sys
from collections import Counter
from time import monotonic

import gevent
from gevent.hub import Waiter
from gevent.lock import BoundedSemaphore
from gevent.pool import Pool
from gevent.server import StreamServer
from gevent.threadpool import ThreadPool

from gcmd.commands import Commands
from gcmd.config import Config
from gcmd.hashing import HashService
from gcmd.logs.memory import MemoryLog
from gcmd.logs.sources import Logs, served_sources
from gcmd.net import wire
from gcmd.net.connection import (
    FAREWELL_TIMEOUT,
    LINGER,
    OPEN,
    PARK_AFTER,
    READABLE,
    REFUSED,
    Ended,
    Shutdown,
)
from gcmd.net.proxy import canonical
from gcmd.net.session import Session
from gcmd.observe.stats import ServerStats
from gcmd.serverlog.formats import TextFormatter

log = logging.getLogger(__name__)

#: seconds between the sweeper's looks at the sessions' deadlines
SWEEP_EVERY = 0.1
#: parked sessions (no greenlet, waiting for a 300 s idle timeout) are looked at
#: once in this many sweeps: their deadlines need no tenth of a second
PARKED_SWEEP_EVERY = 10
#: seconds accepting pauses when the process is out of file descriptors
ACCEPT_PAUSE = 0.1
#: greenlets kept to serve the next client instead of creating new ones
IDLE_DRIVERS = 64
#: threads that resolve paths, open files and stat the log
METADATA_WORKERS = 4

#: Linux gives an accepted connection the listening socket's TCP_NODELAY
_NODELAY_INHERITED = sys.platform.startswith("linux")
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class GcmdServer(StreamServer):
    """Accepts clients, enforces the caps, and shuts down gracefully."""

    #: gevent's per-connection handler, which the server closes after; do_handle
    #: replaces it, and each Session owns its socket
    handle = None

    def __init__(self, config: Config, ssl_context: ssl.SSLContext | None = None,
                 listener: socket.socket | None = None) -> None:
        #: the greenlets serving sessions, so that shutdown can wait for them
        self.handlers = Pool()
        if listener is None:
            super().__init__((config.host, config.port), backlog=config.backlog, spawn=self.handlers)
        else:
            super().__init__(listener, spawn=self.handlers)
        self.config = config
        #: the TLS settings of new connections (SIGHUP replaces it; open ones keep theirs)
        self.ssl_context = ssl_context
        self.stats = ServerStats()
        self.metadata_pool = ThreadPool(METADATA_WORKERS)
        self.hashing = HashService(config.root, config.hash_workers, config.max_pending,
                                   config.hash_cache, self.metadata_pool)
        #: the server's own log, the lines it writes at its level in the text format
        self.memory_log = MemoryLog()
        self.memory_log.setFormatter(TextFormatter())
        self.logs = Logs(served_sources(list(config.logfiles)), self.memory_log, self.metadata_pool,
                         config.command_timeout)
        self.commands = Commands(config, self.hashing, self.logs, self.stats)
        self.hub = gevent.get_hub()
        #: --allow, with IPv4-mapped IPv6 networks as the IPv4 networks they mean
        self.allow = tuple(_unmapped(network) for network in config.allow)
        self.quiet_from = tuple(_unmapped(network) for network in config.quiet_from)
        self.slots = BoundedSemaphore(config.max_clients)
        self.per_ip: Counter[str] = Counter()
        #: TLS handshakes under way before admission (client certificates asked), by address
        self.handshakes: Counter[str] = Counter()
        #: every connection not yet closed, admitted or not
        self.sessions: set[Session] = set()
        self.closing = False
        self._numbers = itertools.count()
        self._context_prefix = f"Session,w{config.worker}:" if config.workers > 1 else "Session,"
        #: greenlets waiting for the next session to serve
        self._idle_drivers: list[Waiter] = []
        self._sweeper = None
        self._sweeps = 0
        self._accept_timer = None
        self._resource_warned = 0.0

    def set_token(self, token: bytes) -> None:
        """Require this token from now on (clients already authenticated stay so)."""
        self.config = self.commands.config = dataclasses.replace(self.config, token=token)

    def session_context(self, number: int, ip: str) -> dict:
        """The context of a session's log lines: ``Session,42,127.0.0.1``; with
        --workers, the worker too, so that numbers do not repeat:
        ``Session,w1:42,127.0.0.1``."""
        return {"context": f"{self._context_prefix}{number},{ip}"}

    @property
    def port(self) -> int:
        return self.address[1]

    # --- the way in ------------------------------------------------------------------

    def do_handle(self, sock, address) -> None:
        """Make an accepted connection a Session: runs in the hub.

        A plain connection is admitted here and gets a greenlet only if it has
        already sent something; otherwise it is parked at once, as a client
        that has nothing to say is. Accepting stays cheaper than connecting,
        so a burst of connects does not overflow the listen backlog. A TLS
        handshake or a PROXY header needs a greenlet first (Session._open).
        """
        self.stats.connections += 1
        if not _NODELAY_INHERITED:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = Session(self, sock, canonical(address[0]), next(self._numbers))
        self.sessions.add(session)
        if self.ssl_context is not None or self.config.proxy_protocol:
            self.dispatch(session, OPEN)
            return
        refusal = self.admit(session)
        if refusal is None:
            self._first_bytes(session)
        elif refusal.line is None:
            session.close(refusal.reason)
        else:
            self.dispatch(session, REFUSED, refusal.line)

    def _first_bytes(self, session: Session) -> None:
        """Serve a new plain session at once if it has spoken; else park it."""
        try:
            data = session.recv()
        except OSError as exc:
            session.close(exc.strerror or str(exc))
            return
        if data:
            self.dispatch(session, READABLE, data)
        elif data is None:
            session.park()
        else:
            session.close("Connection was closed cleanly.")

    def screen(self, session: Session) -> Ended | None:
        """Refuse a client outside --allow (logged, no reply), before anything
        else is spent on it; None if it may go on."""
        if self.allow and not _allowed(session.ip, self.allow):
            self.stats.refuse("not_allowed")
            log.warning("Refused connection from %s: not in --allow", session.ip, extra=session.context)
            return Ended("not in --allow", None)
        return None

    def admit(self, session: Session) -> Ended | None:
        """Give ``session`` a slot (None), or say how it is refused. Never blocks.

        The connection line names the CN of a verified client certificate."""
        refusal = self.screen(session)
        if refusal is not None:
            return refusal
        ip, context = session.ip, session.context
        if self.quiet_from and _allowed(ip, self.quiet_from):
            session.log_level = logging.DEBUG  # a health check: not an event worth a line
        if session.client_cn is None:
            log.log(session.log_level, "Client connection from %s", ip, extra=context)
        else:
            log.log(session.log_level, "Client connection from %s (CN=%s)", ip, session.client_cn,
                    extra=context)
        if self.closing:
            self.stats.refuse("shutting_down")
            return Ended("refused: shutting down", wire.SHUTTING_DOWN)
        if self.config.max_per_ip and self.per_ip[ip] >= self.config.max_per_ip:
            self.stats.refuse("max_per_ip")
            log.warning("Too many connections from %s. bye !", ip, extra=context)
            return Ended("refused: too many from the address", wire.TOO_MANY_FROM_ADDRESS)
        if not self.slots.acquire(blocking=False):
            self.stats.refuse("max_clients")
            log.warning("Too many connections. bye !", extra=context)
            return Ended("refused: too many", wire.TOO_MANY)
        self.per_ip[ip] += 1
        self.stats.clients += 1
        session.admitted = True
        self.commands.admitted(session)
        return None

    def release(self, session: Session, reason: str) -> None:
        """Undo what ``admit`` gave a session, now closed (Session.close calls it)."""
        self.sessions.discard(session)
        if not session.admitted:
            return
        session.admitted = False
        ip = session.ip
        self.stats.clients -= 1
        if session.authenticated:
            self.stats.authenticated -= 1
        self.per_ip[ip] -= 1
        if not self.per_ip[ip]:
            del self.per_ip[ip]
        self.slots.release()
        log.log(session.log_level, "Lost client connection. Reason: %s", reason, extra=session.context)

    # --- greenlets ---------------------------------------------------------------------

    def dispatch(self, session: Session, start: str, data: bytes = b"") -> None:
        """Serve ``session`` (``Session.run(start, data)``) in an idle greenlet, or a new one.

        In the hub an idle greenlet is switched to at once; elsewhere (shutdown)
        none is left, and a new one is spawned."""
        if self._idle_drivers:
            self._idle_drivers.pop().switch((session, start, data))
        else:
            # in a list the driver empties: a greenlet keeps its arguments
            self.handlers.spawn(self._driver, [(session, start, data)])

    def _driver(self, first: list) -> None:
        """Serve sessions one after another, so that a connection does not pay
        for creating and destroying a greenlet."""
        self.stats.greenlets += 1
        try:
            job = first.pop()
            while job is not None:
                session, start, data = job
                job = None
                session.run(start, data)
                # a client that has gone is not kept alive by an idle driver
                session = data = None
                if self.closing or len(self._idle_drivers) >= IDLE_DRIVERS:
                    return
                job = self._next_job()
        finally:
            self.stats.greenlets -= 1

    def _next_job(self) -> tuple | None:
        waiter = Waiter()
        self._idle_drivers.append(waiter)
        try:
            return waiter.get()
        except BaseException:  # killed while idle: no client may be handed to it
            if waiter in self._idle_drivers:
                self._idle_drivers.remove(waiter)
            raise

    # --- the clock ---------------------------------------------------------------------

    def _sweep(self) -> None:
        """In the hub: every session's deadline, checked by one timer for all
        (parked sessions, which may be thousands, every PARKED_SWEEP_EVERY sweeps)."""
        now = monotonic()
        park_before = now - PARK_AFTER
        self._sweeps += 1
        parked_too = self._sweeps % PARKED_SWEEP_EVERY == 0
        for session in list(self.sessions):
            session.tick(now, park_before, parked_too)

    # --- accepting -----------------------------------------------------------------------

    def init_socket(self) -> None:
        super().init_socket()
        self.socket.setblocking(False)  # do_read accepts in the hub: another worker may take the client
        if _NODELAY_INHERITED:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_read(self):
        """(socket, address) of a new connection, or None. The socket is the standard
        library's: a Session waits with Connection.wait, never on a gevent socket,
        whose wrapper would cost every read and write a call, and every connection two watchers."""
        listener = self.socket  # the standard library's too (StreamServer.init_socket)
        try:
            fd, address = listener._accept()  # the first step of socket.socket.accept, and of gevent's do_read
        except BlockingIOError:
            return None
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
        try:
            return socket.socket(listener.family, listener.type, listener.proto, fileno=fd), address
        except BaseException:
            os.close(fd)
            raise

    def _resume_accepting(self) -> None:
        if not self.closing:
            self.start_accepting()

    # --- start and stop ----------------------------------------------------------------

    def start(self) -> None:
        super().start()
        logging.getLogger("gcmd").addHandler(self.memory_log)
        self.logs.start()
        self._sweeper = self.loop.timer(SWEEP_EVERY, SWEEP_EVERY)
        self._sweeper.start(self._sweep)

    def shutdown(self) -> None:
        """Stop accepting, let running commands finish, say goodbye, release everything."""
        log.info("Shutting down: %d client%s connected", self.stats.clients, "" if self.stats.clients == 1 else "s")
        self.closing = True
        self.close()
        for waiter in self._idle_drivers:
            self.loop.run_callback(waiter.switch, None)
        self._idle_drivers.clear()
        for session in list(self.sessions):
            session.notify_shutdown()
        if not self.handlers.join(timeout=self.config.shutdown_timeout):
            log.warning("Cutting %d commands still running after %g s",
                        len(self.handlers), self.config.shutdown_timeout)
            self.handlers.kill(Shutdown, block=True, timeout=FAREWELL_TIMEOUT + LINGER + 1)
        for session in list(self.sessions):  # what no greenlet serves any more
            session.close("server shutting down")
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper.close()
        self.hashing.close()
        self.logs.close()
        log.info("Server stopped")
        logging.getLogger("gcmd").removeHandler(self.memory_log)
        self.metadata_pool.kill()


def _allowed(ip: str, networks) -> bool:
    """Whether the (canonical) address ``ip`` is in one of ``networks``."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    return any(address in network for network in networks)


_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def _unmapped(network):
    """``::ffff:a.b.c.d/n`` (n >= 96) is the IPv4 network ``a.b.c.d/(n - 96)``."""
    if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        return ipaddress.ip_network(
            (network.network_address.ipv4_mapped, network.prefixlen - 96))
    return network
