"""The server: accepting clients (GcmdServer) and serving one client (Session).

Data flows one way: socket -> Session -> protocol -> command -> service ->
reply -> Session -> socket. Only Session writes to a client's socket.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import socket
import ssl
from collections import Counter
from time import monotonic

import gevent
import gevent.socket
from gevent import GreenletExit
from gevent.lock import BoundedSemaphore
from gevent.pool import Pool
from gevent.server import StreamServer
from gevent.threadpool import ThreadPool

from gcmd import protocol
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
#: threads that resolve paths, open files and stat the log
METADATA_WORKERS = 4

_TCP_CLOSE = 7  # Linux tcpi_state of a connection the peer has reset


class Shutdown(GreenletExit):
    """Raised in a session when the server shuts down."""


class ClientGone(GreenletExit):
    """Raised in a session whose connection was reset while a command ran."""


class Session:
    """One client: reads request lines, runs them in order, writes the replies."""

    def __init__(self, server: GcmdServer, sock, ip: str, number: int) -> None:
        self.server = server
        self.sock = sock
        self.ip = ip
        self.context = {"context": f"Session,{number},{ip}"}
        self.authenticated = False
        #: blocked waiting for a request: shutdown may interrupt it at once
        self.reading = False
        self.greenlet = gevent.getcurrent()

    def serve(self) -> str:
        """Serve the client until it leaves; the reason it left."""
        try:
            return self._serve()
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

    def _serve(self) -> str:
        config = self.server.config
        commands = self.server.commands
        do_auth = commands.do_auth
        sock = self.sock
        max_line = config.max_line
        idle_timeout = config.idle_timeout
        deadline = monotonic() + idle_timeout
        if isinstance(sock, ssl.SSLSocket):
            self._handshake(deadline)
        pending = b""
        while True:
            if self.server.closing:
                raise Shutdown
            left = deadline - monotonic()
            if left <= 0:
                self._farewell(protocol.IDLE_TIMEOUT)
                return "idle timeout"
            sock.settimeout(left)
            self.reading = True
            try:
                data = sock.recv(RECV_SIZE)
            except TimeoutError:
                continue
            finally:
                self.reading = False
            if not data:
                return "Connection was closed cleanly."
            if pending:
                data = pending + data
            if b"\n" not in data:
                if len(data) > max_line:
                    self._farewell(protocol.LINE_TOO_LONG)
                    return "line too long"
                pending = data
                continue
            lines = data.split(b"\n")
            pending = lines.pop()
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
            if len(pending) > max_line:
                self._send(b"".join(replies))
                self._farewell(protocol.LINE_TOO_LONG)
                return "line too long"
            self._send(b"".join(replies))
            deadline = monotonic() + idle_timeout
            if len(lines) > 1:
                # a pipelining client always has input ready and would never
                # yield: let the others run between its batches
                gevent.sleep(0)

    def _handshake(self, deadline: float) -> None:
        self.sock.settimeout(max(deadline - monotonic(), 0.001))
        self.reading = True
        try:
            self.sock.do_handshake()
        finally:
            self.reading = False

    def _run_watched(self, handler, arg: bytes) -> bytes:
        """Run a slow command, cancelling it if the connection is reset meanwhile."""
        watcher = gevent.spawn(self._watch_hangup)
        try:
            return self.server.commands.run(handler, self, arg)
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
                self.greenlet.kill(ClientGone, block=False)
                return
            # input that is waiting keeps the socket readable: do not spin on it
            gevent.sleep(HANGUP_CHECK)

    def _send(self, data: bytes) -> None:
        """Write a reply; give up when the client accepts nothing for the idle timeout."""
        if not data:
            return
        sock = self.sock
        sock.settimeout(self.server.config.idle_timeout)
        view = memoryview(data)
        while view:
            view = view[sock.send(view):]

    def _farewell(self, line: bytes) -> None:
        """Send a last line, then drain the client's input briefly before closing."""
        sock = self.sock
        try:
            sock.settimeout(FAREWELL_TIMEOUT)
            if line:
                sock.sendall(line)
            if isinstance(sock, ssl.SSLSocket):
                return
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(LINGER_QUIET)
            until = monotonic() + LINGER
            while monotonic() < until and sock.recv(RECV_SIZE):
                pass
        except OSError:
            pass


def _tcp_state(sock) -> int | None:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except (OSError, AttributeError):
        return None


class GcmdServer(StreamServer):
    """Accepts clients, enforces the caps, and shuts down gracefully."""

    def __init__(self, config: Config, ssl_context: ssl.SSLContext | None = None) -> None:
        #: the handlers of connected clients, so that shutdown can wait for them
        self.handlers = Pool()
        super().__init__((config.host, config.port), backlog=config.backlog, spawn=self.handlers)
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
        self.closing = False
        self._numbers = itertools.count()

    @property
    def port(self) -> int:
        return self.address[1]

    def handle(self, sock, address) -> None:
        ip = address[0]
        number = next(self._numbers)
        context = {"context": f"Session,{number},{ip}"}
        self.stats.connections += 1
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.config.allow and not _allowed(ip, self.config.allow):
            self.stats.rejected += 1
            log.warning("Refused connection from %s: not in --allow", ip, extra=context)
            return
        log.info("Client connection from %s", ip, extra=context)
        if self.closing:
            self._refuse(sock, protocol.SHUTTING_DOWN)
            return
        if self.config.max_per_ip and self.per_ip[ip] >= self.config.max_per_ip:
            self.stats.rejected += 1
            log.info("Too many connections from %s. bye !", ip, extra=context)
            self._refuse(sock, protocol.TOO_MANY_FROM_ADDRESS)
            return
        if not self.slots.acquire(blocking=False):
            self.stats.rejected += 1
            log.info("Too many connections. bye !", extra=context)
            self._refuse(sock, protocol.TOO_MANY)
            return
        self.per_ip[ip] += 1
        self.stats.clients += 1
        try:
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
            session = Session(self, sock, ip, number)
            self.sessions.add(session)
            try:
                reason = session.serve()
            finally:
                self.sessions.discard(session)
        finally:
            self.stats.clients -= 1
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]
            self.slots.release()
        log.info("Lost client connection. Reason: %s", reason, extra=context)

    def _refuse(self, sock, line: bytes) -> None:
        """Tell a client it is not served, without giving it a slot."""
        try:
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
                sock.settimeout(min(self.config.idle_timeout, FAREWELL_TIMEOUT))
                sock.do_handshake()
            Session(self, sock, "", -1)._farewell(line)
        except (OSError, ssl.SSLError):
            pass

    def shutdown(self) -> None:
        """Stop accepting, let running commands finish, say goodbye, release everything."""
        log.info("Shutting down: %d clients connected", len(self.sessions))
        self.closing = True
        self.close()
        for session in list(self.sessions):
            if session.reading:
                session.greenlet.kill(Shutdown, block=False)
        if not self.handlers.join(timeout=self.config.shutdown_timeout):
            log.warning("Cutting %d commands still running after %g s",
                        len(self.handlers), self.config.shutdown_timeout)
            self.handlers.kill(Shutdown, block=True, timeout=FAREWELL_TIMEOUT + LINGER + 1)
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
