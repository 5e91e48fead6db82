"""The server: gevent's StreamServer, one greenlet per client.

- StreamServer accepts a connection and spawns a greenlet (in ``clients``, a
  gevent Pool) that runs ``handle(sock, address)``: the client's whole life,
  written top to bottom in gcmd.net.client. When ``handle`` returns,
  StreamServer closes the socket (``do_close``): that is who closes a socket.
- Admission (--allow, --max-per-ip, the --max-clients BoundedSemaphore,
  shutdown) and its undoing are ``admit`` and ``release``, here, once.
- Deadlines are enforced in one place, the sweeper greenlet: every
  SWEEP_EVERY seconds it raises Deadline in the greenlet of each client past
  its ``deadline`` (the idle timeout, a reply the client does not take, a TLS
  handshake or PROXY header that never ends, a farewell), and ClientGone in
  one that asked to be told of a reset (``watch_reset``).
- Shutdown: stop accepting, raise Shutdown in the clients that wait for their
  client, let running commands end within --shutdown-timeout, then cut them.

To add a command that streams, see Client._follow: it is a state of a client.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import logging
import socket
import ssl
import sys
from collections import Counter
from time import monotonic

import gevent
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
from gcmd.net.client import (
    CLOSING,
    FOLLOWING,
    OPENING,
    READING,
    RUNNING,
    TCP_CLOSE,
    WRITING,
    Client,
    tcp_state,
)
from gcmd.net.ends import ClientGone, Deadline, Ended, Shutdown
from gcmd.observe.stats import ServerStats
from gcmd.serverlog.formats import TextFormatter

log = logging.getLogger(__name__)

#: the states whose waits have a deadline
DEADLINED = (OPENING, READING, WRITING, FOLLOWING, CLOSING)
#: seconds between the sweeper's looks at the clients' deadlines
SWEEP_EVERY = 0.25
#: threads that resolve paths, open files and stat the log
METADATA_WORKERS = 4
#: seconds the clients cut at the shutdown deadline have to say goodbye
CUT_GRACE = 3.0

#: Linux gives an accepted connection the listening socket's TCP_NODELAY
_NODELAY_INHERITED = sys.platform.startswith("linux")


class GcmdServer(StreamServer):
    """Accepts clients, one greenlet each; enforces the caps and the deadlines; shuts down gracefully."""

    #: after an accept error (out of descriptors), accepting pauses this long,
    #: doubling up to max_delay while it goes on (gevent's own back-off)
    min_delay = 0.1
    max_delay = 1.0

    def __init__(self, config: Config, ssl_context: ssl.SSLContext | None = None,
                 listener: socket.socket | None = None) -> None:
        #: the greenlets serving clients, so that shutdown can wait for them
        self.pool = Pool()
        if listener is None:
            super().__init__((config.host, config.port), backlog=config.backlog, spawn=self.pool)
        else:
            super().__init__(listener, spawn=self.pool)
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
        #: --allow, with IPv4-mapped IPv6 networks as the IPv4 networks they mean
        self.allow = tuple(_unmapped(network) for network in config.allow)
        self.quiet_from = tuple(_unmapped(network) for network in config.quiet_from)
        self.slots = BoundedSemaphore(config.max_clients)
        self.per_ip: Counter[str] = Counter()
        #: TLS handshakes under way before admission (client certificates asked), by address
        self.handshakes: Counter[str] = Counter()
        #: every client whose greenlet runs, admitted or not
        self.clients: set[Client] = set()
        self.closing = False
        self._numbers = itertools.count()
        self._context_prefix = f"Session,w{config.worker}:" if config.workers > 1 else "Session,"
        self._sweeper: gevent.Greenlet | None = None
        self._accept_warned = 0.0

    def set_token(self, token: bytes) -> None:
        """Require this token from now on (clients already authenticated stay so)."""
        self.config = self.commands.config = dataclasses.replace(self.config, token=token)

    def session_context(self, number: int, ip: str) -> dict:
        """The context of a client's log lines: ``Session,42,127.0.0.1``; with
        --workers, the worker too, so that numbers do not repeat: ``Session,w1:42,127.0.0.1``."""
        return {"context": f"{self._context_prefix}{number},{ip}"}

    @property
    def port(self) -> int:
        return self.address[1]

    def handle(self, sock, address) -> None:
        """Serve one client, in its own greenlet, from admission to close."""
        self.stats.connections += 1
        Client(self, sock, address, next(self._numbers)).serve()

    # --- admission ---------------------------------------------------------------------

    def screen(self, client: Client) -> Ended | None:
        """Refuse a client outside --allow (logged, no reply) before anything else
        is spent on it; None if it may go on."""
        if self.allow and not _allowed(client.ip, self.allow):
            self.stats.refuse("not_allowed")
            log.warning("Refused connection from %s: not in --allow", client.ip, extra=client.context)
            return Ended("not in --allow", None)
        return None

    def admit(self, client: Client) -> Ended | None:
        """Give ``client`` a slot (None), or say how it is refused. Never blocks.
        The connection line names the CN of a verified client certificate."""
        refusal = self.screen(client)
        if refusal is not None:
            return refusal
        ip, context = client.ip, client.context
        if self.quiet_from and _allowed(ip, self.quiet_from):
            client.log_level = logging.DEBUG  # a health check: not an event worth a line
        shown = ip if client.client_cn is None else f"{ip} (CN={client.client_cn})"
        log.log(client.log_level, "Client connection from %s", shown, extra=context)
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
        client.admitted = True
        self.commands.admitted(client)
        return None

    def release(self, client: Client, reason: str) -> None:
        """Undo what ``admit`` gave a client, whose life is over."""
        if not client.admitted:
            return
        client.admitted = False
        self.stats.clients -= 1
        if client.authenticated:
            self.stats.authenticated -= 1
        self.per_ip[client.ip] -= 1
        if not self.per_ip[client.ip]:
            del self.per_ip[client.ip]
        self.slots.release()
        log.log(client.log_level, "Lost client connection. Reason: %s", reason, extra=client.context)

    # --- the clock -----------------------------------------------------------------------

    def _sweep(self) -> None:
        """The one clock of every client: Deadline past its deadline, ClientGone
        when it watches for a reset and its connection is over."""
        while True:
            gevent.sleep(SWEEP_EVERY)
            now = monotonic()
            for client in list(self.clients):
                if client.deadline <= now:
                    client.interrupt(Deadline, *DEADLINED)
                elif client.watch_reset and tcp_state(client.sock) == TCP_CLOSE:
                    client.watch_reset = False
                    client.interrupt(ClientGone, RUNNING, FOLLOWING)

    # --- accepting -------------------------------------------------------------------------

    def init_socket(self) -> None:
        super().init_socket()
        self.socket.setblocking(False)  # a listener handed over by --workers may be blocking
        if _NODELAY_INHERITED:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def accept_failed(self, exc: OSError) -> None:
        """An accept failed (out of descriptors): gevent pauses accepting
        (min_delay, doubling); one warning a second says so, no traceback. An
        error gevent finds fatal (the listener is gone) closes the server: said once."""
        if self.is_fatal_error(exc):
            log.error("cannot accept connections any more: %s", exc.strerror or exc)
            return
        now = monotonic()
        if now - self._accept_warned > 1:
            self._accept_warned = now
            log.warning("cannot accept a connection: %s; pausing %g s", exc.strerror or exc, self.delay)

    # --- start and stop ----------------------------------------------------------------

    def start(self) -> None:
        super().start()
        _report_accept_errors()
        logging.getLogger("gcmd").addHandler(self.memory_log)
        self.logs.start()
        self._sweeper = gevent.spawn(self._sweep)

    def shutdown(self) -> None:
        """Stop accepting, let running commands finish, say goodbye, release everything."""
        clients = self.stats.clients
        log.info("Shutting down: %d client%s connected", clients, "" if clients == 1 else "s")
        self.closing = True
        self.close()
        for client in list(self.clients):
            client.shutdown_began()
        if not self.pool.join(timeout=self.config.shutdown_timeout):
            log.warning("Cutting %d clients still served after %g s", len(self.pool),
                        self.config.shutdown_timeout)
            for client in list(self.clients):
                client.interrupt(Shutdown, OPENING, READING, RUNNING, WRITING, FOLLOWING)
            if not self.pool.join(timeout=CUT_GRACE):
                self.pool.kill(block=True, timeout=1)
        if self._sweeper is not None:
            self._sweeper.kill()
        self.hashing.close()
        self.logs.close()
        log.info("Server stopped")
        logging.getLogger("gcmd").removeHandler(self.memory_log)
        self.metadata_pool.kill()


def _report_accept_errors() -> None:
    """Have the hub hand a GcmdServer's accept errors to ``accept_failed`` instead
    of printing a traceback for each (gevent lets an application set
    ``handle_error`` on the hub instance: gevent.hub.Hub.handle_error)."""
    hub = gevent.get_hub()
    if getattr(hub.handle_error, "reports_accept_errors", False):
        return
    printing = hub.handle_error

    def handle_error(context, kind, value, tb) -> None:
        if isinstance(context, GcmdServer) and isinstance(value, OSError):
            context.accept_failed(value)
        else:
            printing(context, kind, value, tb)

    handle_error.reports_accept_errors = True
    hub.handle_error = handle_error


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
