"""One client's life, in its own greenlet, top to bottom: ``Client.serve``.

Open (gcmd.net.opening), serve (read, split into lines, answer them in order, one
write per batch), farewell, on gevent's cooperative socket: ``recv`` and ``send``
are the waits. The named states (``state``): OPENING, READING, RUNNING (a command
runs: commands bound their own time), WRITING, FOLLOWING (a log streams), CLOSING.
A wait sets ``deadline``; past it the server's sweeper raises Deadline in the
greenlet, and the wait that was cut says what it means. ClientGone (a reset while
a command runs or a log streams) and Shutdown arrive the same way.
"""

from __future__ import annotations

import logging
import socket
import ssl
from contextlib import suppress
from time import monotonic

import gevent
from gevent.socket import wait_read

from gcmd.net import wire
from gcmd.net.ends import ClientGone, Deadline, Ended, Shutdown
from gcmd.net.follow import FollowStream
from gcmd.net.opening import open_connection
from gcmd.net.proxy import canonical
from gcmd.net.wire import IAC, Close, Follow, split_lines, telnet_commands
from gcmd.serverlog.setup import line_run

log = logging.getLogger(__name__)

OPENING, READING, RUNNING, WRITING, FOLLOWING, CLOSING = (
    "opening", "reading", "running", "writing", "following", "closing")
#: bytes asked of the kernel per read (several pipelined requests), and of replies gathered per write
RECV_SIZE = FLUSH_AT = 65536
#: bytes given to one TLS send (gevent's writes all it is given): the deadline restarts after each
SEND_CHUNK = 16384
#: seconds a farewell line may take to leave
FAREWELL_TIMEOUT = 2.0
#: seconds the client's input is drained before closing, lest the kernel answer it with a reset
#: that destroys the last reply; a client silent for LINGER_QUIET seconds is not waited for
LINGER, LINGER_QUIET = 1.0, 0.2
#: seconds a slow command runs before a reset of its connection is watched for (most are over by then)
GUARD_AFTER = 0.005
#: Linux tcpi_state of a connection that is over (reset, or its keepalive unanswered)
TCP_CLOSE = 7


class Client:
    """One connection, served by the greenlet that runs ``serve``; commands get it as ``session``."""

    def __init__(self, server, sock, address: tuple, number: int) -> None:
        self.server, self.sock, self.number = server, sock, number
        self.name(canonical(address[0]))
        self.greenlet = gevent.getcurrent()
        self.state = OPENING
        #: when the sweeper cuts the current wait; the last batch of lines answered (monotonic seconds)
        self.deadline, self.since = float("inf"), monotonic()
        #: watch_reset: the sweeper raises ClientGone once the connection is reset
        self.watch_reset = self.admitted = self.authenticated = self.tls = False
        #: the CN of the client's verified certificate (--tls-client-ca); None: none asked
        self.client_cn: str | None = None
        #: what commands keep of the client: its user (gcmd.users), the format of its log lines
        self.user, self.format, self.log_level = None, "text", logging.INFO
        self.follow: FollowStream | None = None

    def name(self, ip: str) -> None:
        """The client is ``ip`` (canonical); its log lines' context: ``Session,42,127.0.0.1``."""
        self.ip, self.context = ip, {"context": f"{self.server.context_prefix}{self.number},{ip}"}

    def serve(self) -> None:
        """The client's whole life. StreamServer closes the accepted socket when this
        returns; a TLS socket made from it (it took over the descriptor) is closed here."""
        self.server.clients.add(self)
        reason = "cancelled"
        try:
            reason = self._life()
        finally:
            self.state = CLOSING
            self.server.clients.discard(self)  # nothing raises into it any more
            self.server.release(self, reason)
            if self.follow is not None:
                self.follow.stop(block=False)
            if self.tls:
                self.sock.close()

    def _life(self) -> str:
        """Open, serve, say farewell; why it ended, for the log."""
        try:
            try:
                open_connection(self)
                self.state, self.since = RUNNING, monotonic()
                self._serve()
                return "Connection was closed cleanly."
            except Ended as end:
                reason, line = end.reason, end.line
            except Shutdown:
                reason, line = "server shutting down", None if self.state is OPENING else wire.SHUTTING_DOWN
            return reason if self._farewell(line) else "the client accepted no farewell in time"
        except ClientGone:
            return "connection reset" if self.state is FOLLOWING else "connection reset while a command ran"
        except ssl.SSLError as exc:
            return f"TLS error: {exc.reason or exc}"
        except OSError as exc:
            return exc.strerror or str(exc)
        except Exception:
            log.exception("internal error serving %s", self.ip, extra=self.context)
            return "internal error"

    def sweep(self, now: float) -> None:
        """The server's sweeper looks, ``now`` (monotonic seconds): Deadline past the
        deadline, ClientGone once a connection watched for a reset is over."""
        if self.deadline <= now:
            self.interrupt(Deadline, OPENING, READING, WRITING, FOLLOWING, CLOSING)
        elif self.watch_reset and tcp_state(self.sock) == TCP_CLOSE:
            self.watch_reset = False
            self.interrupt(ClientGone, RUNNING, FOLLOWING)

    def stop(self, cut: bool = False) -> None:
        """The server stops: Shutdown if the client waits for a request or follows (one that
        opens, runs a command or writes sees ``server.closing`` before its next wait);
        ``cut``, at the shutdown deadline: in any state but CLOSING."""
        self.interrupt(Shutdown, *((OPENING, READING, RUNNING, WRITING, FOLLOWING) if cut else (READING, FOLLOWING)))

    def interrupt(self, exception: type[BaseException], *states: str) -> None:
        """Raise ``exception`` in this client's greenlet if it is in one of ``states`` (a
        Deadline: and past ``deadline``) when the hub delivers it: it may have moved on."""
        self.server.loop.run_callback(self._raise_if, exception, states)

    def _raise_if(self, exception: type[BaseException], states: tuple) -> None:
        if self.state in states and not self.greenlet.dead and (
                exception is not Deadline or self.deadline <= monotonic()):
            self.greenlet.throw(exception)

    # --- serving requests ---------------------------------------------------------------

    def _serve(self) -> None:
        """Answer requests until the client closes (return) or is done (Ended). The line
        that comes while a log streams ends the follow, then is answered."""
        max_line = self.server.config.max_line
        heard = line_run(log, self.log_level, f"Cmd received from {self.ip} : ", self.context)
        trace = log.isEnabledFor(logging.DEBUG)
        pending = telnet = b""
        while data := self._read():
            if IAC in data:  # telnet's Ctrl-C: a line end, and a reply
                data, reply = telnet_commands(data)
                telnet += reply
            lines, pending, too_long = split_lines(pending, data, max_line)
            if self.follow is not None:
                if not lines and not too_long:
                    continue
                telnet = self._stop_follow(telnet)
            self._send(telnet)
            telnet = b""
            if lines:
                self._answer(lines, heard, trace, not too_long)
                self.since = monotonic()
                if self.tls and len(lines) > 1:
                    gevent.sleep(0)  # a pipelining client lets the others run between its batches
            if too_long:
                raise Ended("line too long", wire.LINE_TOO_LONG)

    def _read(self) -> bytes:
        """READING (FOLLOWING while a log streams): the client's next bytes; b"" once a
        reader has closed. Ended when a reader sends no complete line for the idle timeout,
        a follower takes no streamed byte for it, or a follower's connection is over (a
        half-close ends no follow). Shutdown once the server stops."""
        if self.server.closing:
            raise Shutdown
        if self.follow is None:
            self.state, self.deadline = READING, self.since + self.server.config.idle_timeout
        else:
            self.state = FOLLOWING  # the follow's writer sets the deadline
        try:
            if not self.tls:
                # gevent's wait_read first, so that recv finds the bytes: gevent's recv first
                # tries, then makes, raises and catches an EAGAIN error (a fifth of a ping's
                # cost). Not on TLS, where OpenSSL may hold bytes already read.
                wait_read(self.sock.fileno())
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
        """Run a batch of requests in order; their replies go out together, and before any
        slow command. A follow begun by the last one streams on (``may_follow``: no line
        came after the batch to end it)."""
        server, commands = self.server, self.server.commands
        replies: list[bytes] = []
        size = 0
        for index, line in enumerate(lines):
            if server.closing:  # pipelined requests not yet started are dropped
                self._send(b"".join(replies))
                raise Shutdown
            parsed = commands.parse(line)
            if parsed is None:
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
                    if index + 1 == len(lines) and may_follow:
                        self.deadline = float("inf")  # the follow's writer sets it while a chunk waits
                        self.follow.start()
                        return
                    self._send(self._stop_follow())  # a line came already: it ends the follow
                    continue
            else:
                reply = commands.run(handler, self, arg)
            if trace:
                log.debug("%s: %d bytes in, %d bytes out, %.3f ms", handler.verb, len(line) + 1, len(reply),
                          (monotonic() - started) * 1000, extra=self.context)
            if isinstance(reply, Close):
                self._send(b"".join(replies))
                raise Ended(reply.reason, reply)
            replies.append(reply)
            size += len(reply)
            if size >= FLUSH_AT:  # a client that does not read its replies stops being read
                self._send(b"".join(replies))
                replies, size = [], 0
        self._send(b"".join(replies))

    def _run_slow(self, handler, arg: bytes) -> bytes:
        """RUNNING a command that waits (a thread, a process); a reset of the connection
        meanwhile cancels it (ClientGone) as soon as it is seen."""
        guard = gevent.spawn_later(GUARD_AFTER, self._guard)
        try:
            return self.server.commands.run_slow(handler, self, arg)
        finally:
            guard.kill(block=bool(guard))  # a guard that started waits on the descriptor: gone before we read
            self.watch_reset = False

    def _guard(self) -> None:
        """Wait until the connection has input, an EOF or a reset: a reset cancels the
        command; after input or a half-close, the sweeper watches for one."""
        wait_read(self.sock.fileno())
        if tcp_state(self.sock) == TCP_CLOSE:
            self.interrupt(ClientGone, RUNNING)
        else:
            self.watch_reset = True

    # --- writing ---------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        """WRITING: write all of ``data``; Ended when the client takes none of it for the idle timeout."""
        if not data:
            return
        idle, send, chunk = self.server.config.idle_timeout, self.sock.send, SEND_CHUNK if self.tls else len(data)
        self.state = WRITING
        try:
            while data:
                self.deadline = monotonic() + idle
                data = memoryview(data)[send(data[:chunk]):]
        except Deadline:
            raise Ended("the client accepted no reply bytes in time", None) from None
        self.state = RUNNING

    def _farewell(self, line: bytes | None) -> bool:
        """CLOSING: send the last line (after what a follow under way still owes) and end
        the stream gently: TLS close_notify (RFC 8446 section 6.1; the client's own is
        not awaited), then the client's input drained for up to LINGER seconds. ``line``
        None: just close. False when the line took over FAREWELL_TIMEOUT seconds."""
        if line is None:
            return True
        line = self._stop_follow() + line
        sock = self.sock
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

    # --- following a log ----------------------------------------------------------------

    def start_following(self, source) -> None:
        """``follow``: from now on the lines of ``source`` wait for this client (CommandError
        when it cannot be followed); they stream once the reply is sent."""
        self.follow = FollowStream(self, source)

    def _stop_follow(self, telnet: bytes = b"") -> bytes:
        """End the follow under way: what it still owes the client, ``telnet``'s reply and
        End follow; just ``telnet`` when none is under way."""
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
