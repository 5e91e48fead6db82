"""One client's life in its own greenlet, top to bottom (``Client.serve``): open (PROXY header,
admission, TLS handshake), serve (read, split into lines, answer them in order, one write per
batch), farewell. Each wait on gevent's socket names its ``state`` and sets ``deadline``, which
the server's sweeper enforces by raising Deadline in the greenlet (ClientGone, Shutdown alike)."""

import logging
import socket
import ssl
from contextlib import suppress
from operator import length_hint
from time import monotonic

import gevent
from gevent.socket import wait_read

from gcmd.net import ends, proxy, wire
from gcmd.net.addresses import canonical
from gcmd.net.ends import ClientGone, Deadline, Ended, Revoked, Shutdown
from gcmd.net.follow import FollowStream
from gcmd.net.wire import IAC, Close, Follow, split_lines, telnet_commands
from gcmd.serverlog.setup import line_run

log = logging.getLogger(__name__)

#: RUNNING: a command runs (commands bound their own time); FOLLOWING: a log streams to the client
OPENING, READING, RUNNING, WRITING, FOLLOWING, CLOSING = (
    "opening", "reading", "running", "writing", "following", "closing")
#: bytes asked of the kernel per read, and of replies gathered per write; bytes given to one TLS
#: send (gevent's writes all it is given: the deadline restarts after each)
RECV_SIZE, FLUSH_AT, SEND_CHUNK = 65536, 65536, 16384
#: seconds a farewell line may take; then the client's input is drained for up to LINGER seconds,
#: lest the kernel answer it with a reset that destroys the last reply (LINGER_QUIET: silent client)
FAREWELL_TIMEOUT, LINGER, LINGER_QUIET = 2.0, 1.0, 0.2
#: seconds a slow command runs before a reset of its connection is watched for (most are over by then);
#: the Linux tcpi_state of a connection that is over (reset, or its keepalive unanswered)
GUARD_AFTER, TCP_CLOSE = 0.005, 7
#: seconds (each at most the idle timeout) a load balancer has to send the PROXY header, a client
#: to show its certificate (it holds no slot meanwhile), a refused TLS client to read why
PROXY_TIMEOUT, CERTIFICATE_TIMEOUT, REFUSAL_TIMEOUT = 5.0, 10.0, 2.0


class Client:
    """One connection, served by the greenlet that runs ``serve``; commands get it as ``session``."""

    __slots__ = ("admitted", "authenticated", "client_cn", "context", "deadline", "follow", "format", "greenlet",
                 "ip", "log_level", "number", "server", "since", "sock", "state", "tls", "user", "watch_reset")

    def __init__(self, server, sock, address: tuple, number: int) -> None:
        self.server, self.sock, self.number, self.greenlet = server, sock, number, gevent.getcurrent()
        self.name(canonical(address[0]))
        #: the sweeper cuts the current wait at ``deadline`` and, if ``watch_reset``, raises ClientGone
        #: once the connection is reset; the idle clock runs from ``since`` (monotonic seconds)
        self.state, self.deadline, self.since = OPENING, float("inf"), monotonic()
        self.watch_reset = self.admitted = self.authenticated = self.tls = False
        #: what commands keep: a verified certificate's CN, the user (gcmd.users), the log's format; the follow
        self.client_cn, self.user, self.format, self.log_level, self.follow = None, None, "text", logging.INFO, None

    def name(self, ip: str) -> None:
        """The client is ``ip`` (canonical); its log lines' context: ``Session,42,127.0.0.1``."""
        self.ip, self.context = ip, {"context": f"{self.server.context_prefix}{self.number},{ip}"}

    def serve(self) -> None:
        """The client's whole life: open, serve, farewell, and the log says why it ended.
        StreamServer closes the accepted socket when this returns; a TLS socket made
        from it (it took over the descriptor) is closed here."""
        self.server.clients.add(self)
        reason = "cancelled"
        try:
            try:
                self._open()
                self.state, self.since = RUNNING, monotonic()
                self._serve()
                reason = "Connection was closed cleanly."
            except (Ended, Shutdown) as end:
                if isinstance(end, Shutdown):
                    end = Ended("server shutting down", None if self.state is OPENING else wire.SHUTTING_DOWN)
                reason = end.reason if self._farewell(end.line) else "the client accepted no farewell in time"
        except ClientGone:
            reason = "connection reset" if self.state is FOLLOWING else "connection reset while a command ran"
        except OSError as exc:  # ssl.SSLError among them
            reason = f"TLS error: {exc.reason or exc}" if isinstance(exc, ssl.SSLError) else exc.strerror or str(exc)
        except Exception:
            log.exception("internal error serving %s", self.ip, extra=self.context)
            reason = "internal error"
        finally:
            self.state = CLOSING
            self.server.clients.discard(self)  # nothing raises into it any more
            self.server.release(self, reason)
            if self.follow is not None:
                self.follow.stop(block=False)
            if self.tls:
                self.sock.close()

    def _open(self) -> None:
        """OPENING: the PROXY header (it names the client), --allow, admission, the TLS handshake (before
        admission if a certificate is required: the connection line names it). Ended when refused."""
        server, config = self.server, self.server.config
        if config.proxy_protocol:
            self._read_proxy_header()
        server.screen(self)
        context = server.ssl_context  # SIGHUP may replace it; this connection keeps this one
        if context is not None and config.tls_client_ca is not None:
            self._verify(context)
            context = None
        self.deadline = float("inf")  # no deadline of a wait done may cut admission half-way (slots)
        refusal = server.admit(self)
        if context is not None and (refusal is None or refusal.line is not None):
            self._handshake(context, config.idle_timeout if refusal is None else REFUSAL_TIMEOUT)
        if refusal is not None:
            raise refusal

    def _read_proxy_header(self) -> None:
        # peek first, so that what follows (requests, a TLS handshake) stays on the socket
        sock, self.deadline = self.sock, monotonic() + min(self.server.config.idle_timeout, PROXY_TIMEOUT)
        try:
            while (found := proxy.parse(peeked := sock.recv(proxy.LONGEST, socket.MSG_PEEK))) is None:
                if not peeked:
                    raise proxy.ProxyError("closed before its PROXY header")
                gevent.sleep(0.01)  # part of a header: the socket stays readable
            size, address = found
            while size:
                if not (chunk := sock.recv(size)):
                    raise proxy.ProxyError("closed within its PROXY header")
                size -= len(chunk)
        except (proxy.ProxyError, OSError, Deadline) as exc:
            why = "no complete PROXY header in time" if isinstance(exc, Deadline) else exc
            raise self.server.refuse(self, "proxy_header", "no valid PROXY header",
                                     f"Closed connection from {self.ip}: no valid PROXY header ({why})") from None
        if address:
            self.name(address)

    def _verify(self, context) -> None:
        # the handshakes under way are capped: --max-clients in all, --max-per-ip from one address
        ip, config, under_way = self.ip, self.server.config, self.server.handshakes
        if config.max_per_ip and under_way.get(ip, 0) >= config.max_per_ip:
            raise self._refused("max_per_ip", "too many handshakes under way from the address")
        if sum(under_way.values()) >= config.max_clients:
            raise self._refused("max_clients", "too many handshakes under way")
        under_way.add(ip)
        try:
            self._handshake(context, CERTIFICATE_TIMEOUT)
        except (ssl.SSLError, Ended) as exc:
            raise self._refused("tls_handshake", ends.handshake_failure(exc)) from None
        finally:
            under_way.drop(ip)
        self.client_cn = self.context["client_cn"] = wire.common_name(self.sock.getpeercert())

    def _refused(self, figure: str, why: str) -> Ended:  # a client with no valid certificate
        return self.server.refuse(self, figure, why, f"Refused TLS connection from {self.ip}: {why}")

    def _handshake(self, context, seconds: float) -> None:
        self.sock = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.tls, self.deadline = True, monotonic() + min(seconds, self.server.config.idle_timeout)
        try:
            self.sock.do_handshake()
        except Deadline:
            raise Ended("TLS handshake not finished in time", None) from None

    def sweep(self, now: float) -> None:
        """The server's sweeper looks, at ``now`` (monotonic seconds)."""
        if self.deadline <= now:
            self.interrupt(Deadline, OPENING, READING, WRITING, FOLLOWING, CLOSING)
        elif self.watch_reset and tcp_state(self.sock) == TCP_CLOSE:
            self.watch_reset = False
            self.interrupt(ClientGone, RUNNING, FOLLOWING)

    def stop(self, cut: bool = False) -> None:
        """Shutdown in a client that waits for a request or follows (the others see ``server.closing``
        before their next wait); ``cut``: in any state but CLOSING."""
        self.interrupt(Shutdown, READING, FOLLOWING, *((OPENING, RUNNING, WRITING) if cut else ()))

    def interrupt(self, exception: type[BaseException], *states: str) -> None:
        """Raise ``exception`` in the client's greenlet if it is in one of ``states`` (a Deadline:
        and past its deadline) when the hub delivers it (it may have moved on meanwhile)."""
        self.server.loop.run_callback(self._raise_if, exception, states)

    def _raise_if(self, exception: type[BaseException], states: tuple) -> None:
        if self.state in states and not self.greenlet.dead and (
                exception is not Deadline or self.deadline <= monotonic()):
            self.greenlet.throw(exception)

    def _serve(self) -> None:
        """Answer requests until the client closes (return) or is done (Ended); a line ends a follow."""
        max_line, fd, trace = self.server.config.max_line, self.sock.fileno(), log.isEnabledFor(logging.DEBUG)
        heard = line_run(log, self.log_level, f"Cmd received from {self.ip} : ", self.context)
        pending, telnet, wait_fd = b"", b"", None  # a new client's first request is usually there already
        while data := self._read(wait_fd):
            if IAC in data:  # telnet's Ctrl-C: a line end, and a reply
                data, reply = telnet_commands(data)
                telnet += reply
            lines, pending, too_long = split_lines(pending, data, max_line)
            wait_fd = None if self.tls or len(lines) > 1 else fd  # a pipelining client's next bytes may be there
            if self.follow is not None:
                if not lines and not too_long:
                    continue
                telnet = self._stop_follow(telnet)
            if telnet:
                self._send(telnet)
                telnet = b""
            if lines:
                self._answer(lines, heard, trace, not too_long)
                self.since = monotonic()
                if len(lines) > 1:
                    gevent.sleep(0)  # a pipelining client lets the others run between its batches
            if too_long:
                raise Ended("line too long", wire.LINE_TOO_LONG)

    def _read(self, fd: int | None) -> bytes:
        """READING, or FOLLOWING: the next bytes; b"" once a reader has closed. Ended: a reader sent
        no line, or a follower took no streamed byte, for the idle timeout, or a follower's connection
        is over (a half-close ends no follow); Revoked: SIGHUP removed or changed a follower's user.
        ``fd``: wait for it to be readable first (not on TLS: OpenSSL may hold bytes already read)."""
        if self.server.closing:
            raise Shutdown
        if self.follow is None:
            self.state, self.deadline = READING, self.since + self.server.config.idle_timeout
        elif self.server.commands.revoked(self):  # by a SIGHUP while the follow's reply was made
            raise Revoked
        else:
            self.state = FOLLOWING  # the follow's writer sets the deadline
        try:
            if fd is not None:  # gevent's recv would first make, raise and catch an EAGAIN error
                wait_read(fd)
            data = self.sock.recv(RECV_SIZE)
            if not data and self.follow is not None:
                self.watch_reset = True  # the sweeper sees the client go
                self.follow.join()
                raise Ended("the connection is over", None)
        except Deadline:
            if self.state is READING:
                raise Ended("idle timeout", wire.IDLE_TIMEOUT) from None
            raise Ended("the client accepted no followed lines in time", None) from None
        self.state = RUNNING
        return data

    def _answer(self, lines: list[bytes], heard, trace: bool, may_follow: bool) -> None:
        """Run a batch of requests in order; their replies go out together, and before any slow
        command. A follow begun by the last one streams on if ``may_follow`` (no line came after)."""
        server, commands, replies, size = self.server, self.server.commands, [], 0
        for line in (rest := iter(lines)):  # length_hint(rest): the lines after this one (exact for a list)
            if server.closing:  # pipelined requests not yet started are dropped
                self._send(b"".join(replies))  # under the idle timeout, as every reply
                raise Ended("server shutting down", wire.SHUTTING_DOWN)
            if (parsed := commands.parse(line)) is None:
                continue
            handler, arg = parsed
            if heard is not None:
                heard.add(commands.shown.get(line) or commands.loggable(line, handler))
            started = monotonic() if trace else 0.0
            if handler.slow:
                self._send(b"".join(replies))
                replies, size = [], 0
                reply = self._run_slow(handler, arg)
                if isinstance(reply, Follow):
                    self._send(reply)
                    if may_follow and not length_hint(rest):
                        self.deadline = float("inf")  # the follow's writer sets it while a chunk waits
                        return self.follow.start()
                    self._send(self._stop_follow())  # a line came already: it ends the follow
                    continue
            else:
                reply = commands.run(handler, self, arg)
            if trace:
                log.debug("%s: %d bytes in, %d bytes out, %.3f ms", handler.verb, len(line) + 1, len(reply),
                          (monotonic() - started) * 1000, extra=self.context)
            if type(reply) is Close:  # Close is final; a failing isinstance also looks up __class__
                self._send(b"".join(replies))  # under the idle timeout; the farewell has 2 s
                raise Ended(reply.reason, reply)
            replies.append(reply)
            if (size := size + len(reply)) >= FLUSH_AT:  # a client that takes no reply stops being read
                self._send(b"".join(replies))
                replies, size = [], 0
        self._send(b"".join(replies))

    def _run_slow(self, handler, arg: bytes) -> bytes:
        # RUNNING a command that waits (a thread, a process): a reset meanwhile cancels it
        guard = gevent.spawn_later(GUARD_AFTER, self._guard)
        try:
            return self.server.commands.run_slow(handler, self, arg)
        finally:
            guard.kill()  # blocks (its default) only for a guard that started: gone before the client is read
            self.watch_reset = False

    def _guard(self) -> None:
        wait_read(self.sock.fileno())  # input, an EOF or a reset
        if tcp_state(self.sock) == TCP_CLOSE:
            self.interrupt(ClientGone, RUNNING)
        else:  # after input or a half-close, the sweeper watches for a reset
            self.watch_reset = True

    def _send(self, data: bytes) -> None:
        """WRITING all of ``data``; Ended when the client takes none of it for the idle timeout."""
        if not data:
            return
        self.state = WRITING
        try:
            while data:
                self.deadline = monotonic() + self.server.config.idle_timeout
                sent = self.sock.send(data[:SEND_CHUNK] if self.tls else data)
                data = memoryview(data)[sent:] if sent < len(data) else b""
        except Deadline:
            raise Ended("the client accepted no reply bytes in time", None) from None
        self.state = RUNNING

    def _farewell(self, line: bytes | None) -> bool:
        """CLOSING: send ``line`` (after what a follow under way still owes; None: nothing, just
        close), TLS close_notify (RFC 8446 section 6.1; the client's own is not awaited), then
        drain the client's input. False when the line took over FAREWELL_TIMEOUT seconds."""
        if line is None:
            return True
        line, sock = self._stop_follow() + line, self.sock
        self.state, self.deadline = CLOSING, monotonic() + FAREWELL_TIMEOUT
        with suppress(OSError, ValueError):
            try:
                sock.sendall(line)
            except Deadline:
                return False
            if self.tls:
                sock.settimeout(0.0)
                with suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    sock.unwrap()
                sock.settimeout(None)
            sock.shutdown(socket.SHUT_WR)
            until = monotonic() + LINGER
            with suppress(Deadline):
                while True:
                    self.deadline = min(monotonic() + LINGER_QUIET, until)
                    if not sock.recv(RECV_SIZE):
                        break
        return True

    def start_following(self, source) -> None:
        """``follow``: the lines of ``source`` wait for this client (CommandError: it cannot be followed)."""
        self.follow = FollowStream(self, source)

    def _stop_follow(self, telnet: bytes = b"") -> bytes:
        # what the follow under way still owes, telnet's reply, End follow; the follow is over
        follow, self.follow = self.follow, None
        if follow is None:
            return telnet
        self.state = RUNNING
        return follow.stop() + telnet + wire.END_FOLLOW


def tcp_state(sock) -> int | None:
    """The Linux TCP state of ``sock`` (tcpi_state of TCP_INFO); None where unknown."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except (OSError, AttributeError):
        return None
