"""One client's life, in its own greenlet, top to bottom: ``Client.serve``.

open (gcmd.net.opening: PROXY header, admission, TLS handshake), serve
(read, split into lines, run them in order, one write per batch), farewell.
The socket is gevent's cooperative socket: ``recv`` and ``send`` are the
waits. Its named states (``state``): OPENING, READING (the idle deadline
runs), RUNNING (a command runs: commands bound their own time), WRITING (a
reply the client has not taken yet: the idle deadline runs), FOLLOWING (a
log streams to it), CLOSING (the farewell).

The state sets ``deadline``; the server's sweeper raises Deadline in the
greenlet past it, and the wait that was cut says what it means (an idle
client is told so; one that takes no reply is just closed). ClientGone (the
connection was reset while a command ran) and Shutdown arrive the same way.
"""

from __future__ import annotations

import logging
import socket
import ssl
from time import monotonic

import gevent
from gevent import getcurrent
from gevent.socket import wait_read

from gcmd.net import wire
from gcmd.net.ends import ClientGone, Deadline, Ended, Shutdown
from gcmd.net.follow import FollowStream
from gcmd.net.opening import open_connection
from gcmd.net.proxy import canonical
from gcmd.net.wire import IAC, LF, Close, Follow, split_lines, telnet_commands
from gcmd.serverlog.setup import line_run

log = logging.getLogger(__name__)

OPENING, READING, RUNNING, WRITING, FOLLOWING, CLOSING = (
    "opening", "reading", "running", "writing", "following", "closing")
#: bytes asked of the kernel per read: several pipelined requests at once
RECV_SIZE = 65536
#: replies are gathered up to this size before one write
FLUSH_AT = 65536
#: bytes given to one TLS send: the idle deadline restarts after each
SEND_CHUNK = 16384
#: seconds a farewell line may take to leave when the client is not reading
FAREWELL_TIMEOUT = 2.0
#: seconds the client's input is drained before closing, so that the kernel does
#: not answer it with a reset that destroys the last reply in flight; a client
#: that sends nothing for LINGER_QUIET seconds is not waited for
LINGER, LINGER_QUIET = 1.0, 0.2
#: seconds a slow command runs before a reset of its connection is watched for:
#: most (lastlog of a file) are over by then and never pay for the watch
GUARD_AFTER = 0.005
#: Linux tcpi_state of a connection that is over (reset, or its keepalive went unanswered)
TCP_CLOSE = 7
NEVER = float("inf")


class Client:
    """One connection, served by the greenlet that runs ``serve``."""

    __slots__ = ("admitted", "authenticated", "client_cn", "context", "deadline", "follow", "format", "greenlet",
                 "heard", "ip", "log_level", "number", "server", "since", "sock", "state", "tls",
                 "user", "watch_reset")

    def __init__(self, server, sock, address: tuple, number: int) -> None:
        self.server = server
        self.sock = sock
        self.ip = canonical(address[0])
        self.number = number
        self.context = server.session_context(number, self.ip)
        self.greenlet = getcurrent()
        self.state = OPENING
        #: when the sweeper cuts the current wait (monotonic seconds)
        self.deadline = NEVER
        #: the last complete line received or reply sent: the idle clock's start
        self.since = monotonic()
        #: the sweeper raises ClientGone once the connection is reset
        self.watch_reset = False
        self.admitted = self.authenticated = self.tls = False
        #: the CN of the client's verified certificate (--tls-client-ca); None: none asked
        self.client_cn: str | None = None
        #: what commands keep of the client: its user (gcmd.users), the format of its log lines
        self.user = None
        self.format = "text"
        self.log_level = logging.INFO
        #: the LineRun of its request lines, made at the first request logged
        self.heard = None
        self.follow: FollowStream | None = None

    def serve(self) -> None:
        """The client's whole life. StreamServer closes the accepted socket when
        this returns; a TLS socket made from it (it took over the descriptor) is closed here."""
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
                self.state = RUNNING
                self._serve()
            except Ended as end:
                self._farewell(end.line)
                return end.reason
            except Shutdown:
                self._farewell(self._goodbye() if self.state is not OPENING else None)
                return "server shutting down"
        except ClientGone:
            return "connection reset" if self.state is FOLLOWING else "connection reset while a command ran"
        except Deadline:  # raised in a farewell that takes too long
            return "the client accepted no farewell in time"
        except ssl.SSLError as exc:
            return f"TLS error: {exc.reason or exc}"
        except OSError as exc:
            return exc.strerror or str(exc)
        except Exception:
            log.exception("internal error serving %s", self.ip, extra=self.context)
            return "internal error"
        return "Connection was closed cleanly."

    def shutdown_began(self) -> None:
        """Tell a client that waits for its next request, or follows, that the
        server stops (in the hub, so that it is still waiting when told); one
        that opens (a TLS handshake), runs a command or writes a reply sees
        ``server.closing`` before its next wait, or is cut at the shutdown deadline."""
        self.interrupt(Shutdown, READING, FOLLOWING)

    def interrupt(self, exception: type[BaseException], *states: str) -> None:
        """Raise ``exception`` in this client's greenlet if it is then in one of
        ``states`` (Greenlet.kill delivers at the greenlet's next switch, by when
        it may have moved on: this looks again, in the hub, as it delivers)."""
        self.server.loop.run_callback(self._raise_if, exception, states)

    def _raise_if(self, exception: type[BaseException], states: tuple) -> None:
        if self.state in states and not self.greenlet.dead:
            if exception is Deadline and self.deadline > monotonic():
                return  # the client moved meanwhile
            self.greenlet.throw(exception)

    # --- serving requests ---------------------------------------------------------------

    def _serve(self) -> None:
        """Answer requests until the client closes (return) or is done (Ended)."""
        max_line = self.server.config.max_line
        heard, trace = self._request_log()
        pending = data = b""
        while True:
            data = data or self._read()
            if not data:
                return
            if IAC in data:  # telnet's Ctrl-C
                data, reply = telnet_commands(data)
                self._send(reply)
            lines, pending, too_long = split_lines(pending, data, max_line)
            data = b""
            if lines:
                if self._answer(lines, heard, trace, not too_long):
                    data, reply = self._follow(pending)
                    pending = b""
                    self._end_follow(reply)
                self.since = monotonic()
                if len(lines) > 1:
                    gevent.sleep(0)  # a pipelining client lets the others run between its batches
            if too_long:
                raise Ended("line too long", wire.LINE_TOO_LONG)

    def _read(self) -> bytes:
        """READING: the client's next bytes (b"" once it has closed); Ended when it
        sends no complete line for the idle timeout."""
        if self.server.closing:
            raise Shutdown
        self.state, self.deadline = READING, self.since + self.server.config.idle_timeout
        try:
            return self.sock.recv(RECV_SIZE)
        except Deadline:
            raise Ended("idle timeout", wire.IDLE_TIMEOUT) from None
        finally:
            self.state, self.deadline = RUNNING, NEVER

    def _answer(self, lines: list[bytes], heard, trace: bool, may_follow: bool) -> bool:
        """Run one batch of requests in order; their replies go out together, and
        before any slow command. True when its last request began a follow that
        goes on (``may_follow``: nothing came after the batch to end it)."""
        server = self.server
        commands = server.commands
        parse, run, shown = commands.parse, commands.run, commands.shown  # once per batch
        replies: list[bytes] = []
        size = 0
        for index, line in enumerate(lines):
            if server.closing:  # pipelined requests not yet started are dropped
                self._send(b"".join(replies))
                raise Shutdown
            parsed = parse(line)
            if parsed is None:
                continue
            handler, arg = parsed
            started = monotonic() if trace else 0.0
            if heard is not None:
                heard.add(shown.get(line) or commands.loggable(line, handler))
            if handler.slow:
                self._send(b"".join(replies))
                replies, size = [], 0
                reply = self._run_slow(handler, arg)
                if isinstance(reply, Follow):
                    self._send(reply)
                    if index + 1 == len(lines) and may_follow:
                        return True
                    self._end_follow()  # a line has come already: it ends the follow
                    continue
            else:
                reply = run(handler, self, arg)
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
        return False

    def _run_slow(self, handler, arg: bytes) -> bytes:
        """RUNNING a command that waits (a thread, a process); a reset of the
        connection meanwhile cancels it (ClientGone), as soon as it is seen."""
        guard = gevent.spawn_later(GUARD_AFTER, self._guard)
        try:
            return self.server.commands.run_slow(handler, self, arg)
        finally:
            # one that started waits on the descriptor: it is gone before the next read
            guard.kill(block=bool(guard))
            self.watch_reset = False

    def _guard(self) -> None:
        """Wait (gevent.socket.wait_read) until the connection has input, an EOF or
        a reset; on a reset cancel the command, else let the sweeper watch for one."""
        wait_read(self.sock.fileno())
        if tcp_state(self.sock) == TCP_CLOSE:
            self.interrupt(ClientGone, RUNNING)
        else:  # input or a half-close: the sweeper looks for a reset from now on
            self.watch_reset = True

    def _request_log(self) -> tuple:
        """The LineRun of this client's request lines (None: not logged at its
        level), and whether each request is traced (level debug)."""
        if not log.isEnabledFor(self.log_level):
            return None, False
        if self.heard is None:
            self.heard = line_run(log, self.log_level, f"Cmd received from {self.ip} : ", self.context)
        return self.heard, log.isEnabledFor(logging.DEBUG)

    # --- writing ---------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        """WRITING: write all of ``data``; Ended when the client takes no byte of it
        for the idle timeout (gevent's TLS send writes all it is given before it
        returns: it is given SEND_CHUNK bytes at a time)."""
        if not data:
            return
        idle = self.server.config.idle_timeout
        send, chunk = self.sock.send, SEND_CHUNK if self.tls else len(data)
        self.state = WRITING
        try:
            self.deadline = monotonic() + idle
            sent = send(data if chunk >= len(data) else data[:chunk])  # most replies leave at once
            if sent < len(data):
                view = memoryview(data)[sent:]
                while view:
                    self.deadline = monotonic() + idle
                    view = view[send(view[:chunk]):]
        except Deadline:
            raise Ended("the client accepted no reply bytes in time", None) from None
        finally:
            self.state, self.deadline = RUNNING, NEVER
        self.since = monotonic()

    def _goodbye(self) -> bytes:
        """The last line when the server shuts down (after the end of a follow)."""
        if self.follow is None:
            return wire.SHUTTING_DOWN
        return self._stop_follow() + wire.END_FOLLOW + wire.SHUTTING_DOWN

    def _farewell(self, line: bytes | None) -> None:
        """CLOSING: send the last line and end the stream gently (TLS
        close_notify, RFC 8446 section 6.1; plain TCP: drain the client's input
        briefly). ``line`` None: the client cannot take anything; just close."""
        if line is None:
            return
        self.state, self.deadline = CLOSING, monotonic() + FAREWELL_TIMEOUT
        try:
            if line:
                self.sock.sendall(line)
            if self.tls:
                self._close_notify()
            self._linger()
        except (OSError, ValueError):
            pass

    def _close_notify(self) -> None:
        """Send TLS close_notify; the client's own is not awaited."""
        self.sock.settimeout(0.0)
        try:
            self.sock.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        self.sock.settimeout(None)

    def _linger(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)
        until = monotonic() + LINGER
        try:
            while True:
                self.deadline = min(monotonic() + LINGER_QUIET, until)
                if not self.sock.recv(RECV_SIZE):
                    return
        except Deadline:
            pass

    # --- following a log ----------------------------------------------------------------

    def start_following(self, source) -> None:
        """``follow``: from now on the lines of ``source`` wait for this client
        (CommandError when it cannot be followed); they stream once the reply is sent."""
        self.follow = FollowStream(self, source)

    def _follow(self, pending: bytes) -> tuple[bytes, bytes]:
        """FOLLOWING: the log streams (FollowStream's writer) while this greenlet
        reads; the bytes that hold the client's next line end it (returned, with
        the reply telnet's Ctrl-C asks for). Neither the idle timeout nor a
        half-close ends a follow."""
        self.follow.start()
        max_line = self.server.config.max_line
        replies = b""
        try:
            while True:
                if self.server.closing:
                    raise Shutdown
                self.state = FOLLOWING
                data = self.sock.recv(RECV_SIZE)
                if not data:
                    self.watch_reset = True  # the sweeper sees the client go
                    self.follow.join()
                    raise Ended("the connection is over", None)
                if IAC in data:  # telnet's Ctrl-C ends a follow as Enter does
                    data, reply = telnet_commands(data)
                    replies += reply
                pending += data
                if LF in data or len(pending) > max_line:
                    return pending, replies
        except Deadline:
            raise Ended("the client accepted no followed lines in time", None) from None

    def _end_follow(self, reply: bytes = b"") -> None:
        """The client sent a line: what waits for it goes out, then End follow."""
        self._send(self._stop_follow() + reply + wire.END_FOLLOW)

    def _stop_follow(self) -> bytes:
        follow, self.follow = self.follow, None
        self.state = RUNNING
        return follow.stop()


def tcp_state(sock) -> int | None:
    """The Linux TCP state of ``sock`` (tcpi_state of TCP_INFO); None where unknown."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except (OSError, AttributeError):
        return None
