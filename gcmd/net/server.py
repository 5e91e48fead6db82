"""The server: gevent's StreamServer spawns ``handle`` in ``pool`` for each connection
(the client's whole life: gcmd.net.client) and closes the socket when it returns.
Here, once: admission and its undoing, the sweeper (the one clock of every client's
deadline), accept errors, shutdown."""

import dataclasses
import itertools
import logging
import socket
import ssl
import sys
from collections.abc import Callable
from time import monotonic

import gevent
from gevent.lock import BoundedSemaphore
from gevent.pool import Pool
from gevent.server import StreamServer

from gcmd.config import Config
from gcmd.net import wire
from gcmd.net.addresses import Counts, unmapped, within
from gcmd.net.client import FOLLOWING, Client
from gcmd.net.ends import Ended, Revoked
from gcmd.observe.stats import ServerStats
from gcmd.services import Services

log = logging.getLogger(__name__)

#: seconds between the sweeper's looks; seconds the clients cut at the shutdown deadline have to go
SWEEP_EVERY, CUT_GRACE = 0.25, 3.0


class GcmdServer(StreamServer):
    """Accepts clients, one greenlet each; enforces the caps and the deadlines; shuts down gracefully."""

    #: after an accept error (out of descriptors), accepting pauses min_delay seconds,
    #: doubling up to max_delay while it goes on (gevent's own back-off)
    min_delay, max_delay = 0.1, 1.0
    #: connections accepted in a row before their greenlets run (gevent: 100): a burst of connects
    #: leaves the listen queue before it overflows (a dropped SYN waits 1 s); docs/architecture.md
    max_accept = 1000

    def __init__(self, config: Config, ssl_context: ssl.SSLContext | None = None,
                 listener: socket.socket | None = None) -> None:
        self.pool = Pool()  # the greenlets serving clients, so that shutdown can wait for them
        super().__init__(listener or (config.host, config.port), backlog=None if listener else config.backlog,
                         spawn=self.pool)
        #: the TLS settings of new connections (SIGHUP replaces it; open ones keep theirs)
        self.config, self.ssl_context, self.stats = config, ssl_context, ServerStats()
        self.services = Services(config, self.stats)
        self.commands, self.hashing, self.logs, self.memory_log = (
            self.services.commands, self.services.hashing, self.services.logs, self.services.memory_log)
        self.allow, self.quiet_from = tuple(map(unmapped, config.allow)), tuple(map(unmapped, config.quiet_from))
        self.slots = BoundedSemaphore(config.max_clients)
        #: admitted clients, and TLS handshakes under way before admission, by address
        self.per_ip, self.handshakes = Counts(), Counts()
        #: every client whose greenlet runs, admitted or not
        self.clients: set[Client] = set()
        self.closing, self._numbers, self._accept_warned = False, itertools.count(), 0.0
        #: called once if the listener fails (accepting is over for good): whoever runs the server stops it
        self.listener_lost: Callable[[], None] = lambda: None
        #: how a client's log lines start; with --workers, the worker too: ``Session,w1:42,127.0.0.1``
        self.context_prefix = f"Session,w{config.worker}:" if config.workers > 1 else "Session,"

    def set_token(self, token: bytes) -> None:
        """Require this token from now on (clients already authenticated stay so)."""
        self.config = self.commands.config = dataclasses.replace(self.config, token=token)

    port = StreamServer.server_port  # gevent's: the port bound

    def handle(self, sock, address) -> None:
        """Serve one client, in its own greenlet, from admission to close."""
        self.stats.connections += 1
        Client(self, sock, address, next(self._numbers)).serve()

    def refuse(self, client: Client, figure: str, why: str, warning: str = "", line: bytes | None = None) -> Ended:
        """Count a refusal (``figure``), log ``warning``: the Ended that tells the client ``line``, the log ``why``."""
        self.stats.refuse(figure)
        if warning:
            log.warning(warning, extra=client.context)
        return Ended(why, line)

    def screen(self, client: Client) -> None:
        """Refuse a client outside --allow (Ended: logged, no reply) before anything is spent on it."""
        if self.allow and not within(client.ip, self.allow):
            raise self.refuse(client, "not_allowed", "not in --allow", f"Refused connection from {client.ip}: not in --allow")

    def admit(self, client: Client) -> Ended | None:
        """Give ``client`` a slot (None), or say how it is refused; never blocks. The
        connection line names the CN of a verified client certificate."""
        ip, limit = client.ip, self.config.max_per_ip
        if self.quiet_from and within(ip, self.quiet_from):
            client.log_level = logging.DEBUG  # a health check: not an event worth a line
        log.log(client.log_level, "Client connection from %s%s", ip,
                "" if client.client_cn is None else f" (CN={client.client_cn})", extra=client.context)
        if self.closing:
            return self.refuse(client, "shutting_down", "refused: shutting down", "", wire.SHUTTING_DOWN)
        if limit and self.per_ip.get(ip, 0) >= limit:
            return self.refuse(client, "max_per_ip", "refused: too many from the address",
                               f"Too many connections from {ip}. bye !", wire.TOO_MANY_FROM_ADDRESS)
        if not self.slots.acquire(blocking=False):
            return self.refuse(client, "max_clients", "refused: too many", "Too many connections. bye !", wire.TOO_MANY)
        self.per_ip.add(ip)
        self.stats.clients += 1
        client.admitted = True
        self.commands.admitted(client)

    def release(self, client: Client, reason: str) -> None:
        """Undo what ``admit`` gave a client, whose life is over."""
        if not client.admitted:
            return
        client.admitted = False
        self.stats.clients -= 1
        self.stats.authenticated -= client.authenticated
        self.per_ip.drop(client.ip)
        self.slots.release()
        log.log(client.log_level, "Lost client connection. Reason: %s", reason, extra=client.context)

    def end_revoked_follows(self) -> None:
        """SIGHUP changed the users: the follows of a user gone or changed end now."""
        for client in list(self.clients):
            if client.follow is not None and self.commands.revoked(client):
                client.interrupt(Revoked, FOLLOWING)

    def _sweep(self) -> None:
        while True:
            gevent.sleep(SWEEP_EVERY)
            now = monotonic()
            for client in list(self.clients):
                client.sweep(now)

    def init_socket(self) -> None:
        super().init_socket()
        self.socket.setblocking(False)  # a listener handed over by --workers may be blocking
        if sys.platform.startswith("linux"):  # where accepted connections inherit TCP_NODELAY
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def accept_failed(self, exc: OSError) -> None:
        """gevent's accept raised ``exc`` (the hub's handle_error, see gcmd.process.run): logged
        once a second; gevent then pauses accepting (its back-off), or, when ``exc`` is fatal
        (the listener is gone), closes the server, and ``listener_lost`` is called."""
        why, now = exc.strerror or exc, monotonic()
        if self.is_fatal_error(exc):
            log.error("cannot accept connections any more: %s", why)
            self.listener_lost()
        elif now - self._accept_warned > 1:
            self._accept_warned = now
            log.warning("cannot accept a connection: %s; pausing %g s", why, self.delay)

    def start(self) -> None:
        super().start()
        self.services.start()
        self._sweeper = gevent.spawn(self._sweep)

    def shutdown(self) -> None:
        """Stop accepting; Shutdown in the clients that wait for a request or follow;
        running commands end within --shutdown-timeout, or are cut; release everything."""
        clients, timeout = self.stats.clients, self.config.shutdown_timeout
        log.info("Shutting down: %d client%s connected", clients, "" if clients == 1 else "s")
        self.closing = True
        self.close()
        for client in list(self.clients):
            client.stop()
        if not self.pool.join(timeout=timeout):
            log.warning("Cutting %d clients still served after %g s", len(self.pool), timeout)
            for client in list(self.clients):
                client.stop(cut=True)
            if not self.pool.join(timeout=CUT_GRACE):
                self.pool.kill(block=True, timeout=1)
        self._sweeper.kill()
        self.services.close()
        log.info("Server stopped")

