"""What is served on a connection: requests, one after another (Session).

The socket side (waits, writes, parking, the deadline, close) is
gcmd.connection.Connection, opened by gcmd.opening.Opening; this is the
protocol side: framing, running commands in order, batching replies, and
the follow state.
"""

from __future__ import annotations

import logging
import ssl
from time import monotonic

import gevent

from gcmd.logs.lines import FollowBuffer
from gcmd.net import wire
from gcmd.net.connection import (
    DEADLINE,
    FOLLOWING,
    LINES,
    PARK,
    PARKABLE,
    READ,
    READABLE,
    RECV_SIZE,
    SHUTDOWN,
    STOPPABLE,
    WOULD_BLOCK,
    WRITE,
    Ended,
)
from gcmd.net.opening import Opening
from gcmd.net.wire import LF, Close, Follow, split_lines
from gcmd.serverlog.setup import LineRun, line_run

log = logging.getLogger(__name__)

#: replies are gathered up to this size before one write
FLUSH_AT = 65536
#: what a wait for the next request accepts
_REQUEST_WAIT = READ | PARKABLE | STOPPABLE
#: TCP keepalive of a follower (idle seconds, seconds between probes, probes):
#: a quiet log sends nothing, and a client that went away (its machine gone,
#: or, after a half-close, its socket closed) is found within about two minutes
FOLLOW_KEEPALIVE = (60, 10, 6)


class Session(Opening):
    """One client: reads request lines, runs them in order, writes the replies."""

    __slots__ = ("authenticated", "follow", "heard", "pending", "user")

    def __init__(self, server, sock, ip: str, number: int) -> None:
        super().__init__(server, sock, ip, number)
        self.authenticated = False
        #: the gcmd.users.User this connection is, set by gcmd.commands; None: none (yet)
        self.user = None
        #: the start of a request line whose end has not arrived
        self.pending = b""
        #: the log being followed, while the session follows one, else None
        self.follow: Following | None = None
        #: its request lines' LineRun, made at the first request logged
        self.heard = None

    def close(self, reason: str) -> None:
        if self.follow is not None:
            self._stop_following()
        super().close(reason)

    def _goodbye(self) -> Ended:
        line = wire.SHUTTING_DOWN
        if self.follow is not None:  # the rest of a line begun, then End follow on a line of its own
            line = bytes(self.follow.out) + wire.END_FOLLOW + line
        return Ended("server shutting down", line)

    # --- serving requests --------------------------------------------------------------

    def _serve(self, data: bytes, ready: bool) -> str:
        """Answer requests until the client is done (Ended) or silent long enough
        to be parked (PARK)."""
        max_line = self.server.config.max_line
        heard, trace = self._request_log()
        while True:
            if self.follow is not None:
                data = self._following(ready)
                if data is None:
                    return PARK
            elif not data:
                data = self._read_request(ready)
                if data is None:
                    return PARK
            ready = False
            lines, self.pending, too_long = split_lines(self.pending, data, max_line)
            data = b""
            if lines:
                self._answer(lines, heard, trace)
                self._progress()
                if self.tls and len(lines) > 1 and self.sock.pending():
                    # a pipelining TLS client always has input ready (decrypted,
                    # where the read watcher cannot see it) and would never
                    # yield: let the others run between its batches
                    gevent.sleep(0)
            if too_long:
                if self.follow is not None:  # the follow began in this batch
                    self._end_following()
                raise Ended("line too long", wire.LINE_TOO_LONG)

    def _read_request(self, ready: bool) -> bytes | None:
        """The client's next bytes; None when it has been silent long enough to park."""
        while True:
            if not (ready or self.tls and self.sock.pending()):
                reason = self.wait(_REQUEST_WAIT)
                if reason is not READABLE:
                    if reason is PARK and not self.server.closing:
                        return None
                    if reason is DEADLINE:
                        raise Ended("idle timeout", wire.IDLE_TIMEOUT)
                    raise self._goodbye()  # SHUTDOWN, or PARK once shutdown has begun
            ready = False
            try:
                data = self.sock.recv(RECV_SIZE)
            except WOULD_BLOCK:
                continue
            if data:
                return data
            raise Ended("Connection was closed cleanly.", None)

    def _request_log(self) -> tuple[LineRun | None, bool]:
        """How this session logs its requests: the LineRun of its request lines
        (None: not at this level), and whether the bytes and time of each are
        traced (level debug). Looked up once per serve: levels are set at start."""
        if not log.isEnabledFor(self.log_level):  # then not debug either
            return None, False
        if self.heard is None:
            # a line per request, the lines of a batch made together (a run goes
            # on from one batch to the next while nothing else was logged meanwhile)
            self.heard = line_run(log, self.log_level, f"Cmd received from {self.ip} : ", self.context)
        return self.heard, log.isEnabledFor(logging.DEBUG)

    def _answer(self, lines: list[bytes], heard: LineRun | None, trace: bool) -> None:
        """Run the requests of one batch in order, each logged to ``heard`` and,
        with ``trace``, timed; their replies go out together, and before any
        slow command so that the client is not kept waiting."""
        server = self.server
        commands = server.commands
        parse, run, shown = commands.parse, commands.run, commands.shown  # once per batch, not per request
        replies: list[bytes] = []
        size = 0
        for index, line in enumerate(lines):
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
                    if index + 1 < len(lines):  # a line has come already: it ends the follow
                        self._end_following()
                    continue
            else:
                reply = run(handler, self, arg)
            if trace:
                self._trace(handler, line, reply, started)
            if isinstance(reply, Close):
                self._send(b"".join(replies))
                raise Ended(reply.reason, reply)
            replies.append(reply)
            size += len(reply)
            if size >= FLUSH_AT:  # a client that does not read its replies stops being read
                self._send(b"".join(replies))
                replies, size = [], 0
                # and one whose kernel buffer takes megabytes does not hold the
                # others back meanwhile: they run between its batches
                gevent.sleep(0)
            if server.closing:  # pipelined requests not yet started are dropped
                self._send(b"".join(replies))
                raise self._goodbye()
        self._send(b"".join(replies))

    def _trace(self, handler, line: bytes, reply: bytes, started: float) -> None:
        """At level debug: the bytes of one request and of its reply, and the time it took."""
        log.debug("%s: %d bytes in, %d bytes out, %.3f ms", handler.verb, len(line) + 1, len(reply),
                  (monotonic() - started) * 1000, extra=self.context)

    # --- following a log -----------------------------------------------------------------

    def start_following(self, log) -> None:
        """``follow``: from now on the session gets the new lines of ``log``, until
        the client sends a line; CommandError when the log cannot be followed."""
        self.keepalive(*FOLLOW_KEEPALIVE)
        self.follow = Following(log)
        try:
            log.subscribe(self._deliver)
        except BaseException:
            self.follow = None
            raise

    def _stop_following(self) -> Following:
        follow, self.follow = self.follow, None
        follow.log.unsubscribe(self._deliver)
        return follow

    def _following(self, ready: bool) -> bytes | None:
        """Stream the followed log until the client sends a line: the bytes that
        hold it (None: nothing to do, park meanwhile). Neither the idle timeout
        nor a half-close ends a follow; a client that accepts no byte of what
        waits for it for the idle timeout is cut."""
        while True:
            if self.server.closing:
                raise self._goodbye()
            self._push()
            reason = READABLE if ready else self.wait(self._follow_accepts())
            ready = False
            if reason is READABLE:
                data = self.recv()
                if data == b"":
                    self.eof = True
                    self.reader.stop()
                elif data is not None:
                    if LF in data or len(self.pending) + len(data) > self.server.config.max_line:
                        self._end_following()
                        return data
                    self.pending += data
            elif reason is PARK and not self.server.closing:
                return None
            elif reason is DEADLINE:
                raise Ended("the client accepted no followed lines in time", None)
            elif reason is SHUTDOWN or reason is PARK:
                raise self._goodbye()

    def _follow_accepts(self) -> int:
        """What the follow waits for: room to write when lines wait (the idle
        clock runs), else new lines (it may be parked, the clock stops)."""
        accepts = STOPPABLE if self.eof else STOPPABLE | READ
        if self.follow.out:
            self.deadline = self.since + self.server.config.idle_timeout
            return accepts | WRITE
        self.deadline = float("inf")
        return accepts | FOLLOWING | PARKABLE

    def _push(self) -> None:
        """Send what waits for the follower, as far as the socket takes it now."""
        follow = self.follow
        while True:
            if not follow.out:
                follow.out = follow.buffer.take()
                if not follow.out:
                    return
                self._progress()  # the clock for this chunk starts now
            try:
                sent = self.sock.send(follow.out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return  # want read: TLS renegotiation, which gcmd.net.tls refuses
            if sent:
                self._progress()
            follow.out = memoryview(follow.out)[sent:]
            if follow.out:
                return

    def _end_following(self) -> None:
        """The client sent a line: what waits for it goes out, then End follow."""
        follow = self._stop_following()
        rest = [bytes(follow.out)]
        while chunk := follow.buffer.take():
            rest.append(chunk)
        rest.append(wire.END_FOLLOW)
        self._send(b"".join(rest))

    def _deliver(self, lines: list[bytes]) -> None:
        """The followed log's new lines (the wire lines of one batch), from the
        log's courier greenlet (Broadcast).

        A parked follower whose socket takes them all stays parked: they are
        sent here, without a greenlet of its own. This is the one write to a
        session's socket from outside its greenlet, and it is safe because a
        parked session has none. Otherwise (a partial send, an error, a
        session that is running) its greenlet is told (LINES)."""
        follow = self.follow
        if follow is None:
            return
        dropped = follow.buffer.push(lines)
        if dropped:
            follow.log.stats.lines_dropped += dropped
        if self.parked and not follow.out:
            try:
                self._push()
            except OSError:
                pass  # its greenlet meets the error again, and closes
            else:
                self.deadline = float("inf")  # parked while following: no idle clock
                if not follow.out:
                    return
        if not follow.scheduled:
            follow.scheduled = True
            self.server.loop.run_callback(self._lines_arrived, follow)

    def _lines_arrived(self, follow: Following) -> None:
        # in the hub
        follow.scheduled = False
        if follow is not self.follow:
            return
        if self.parked:
            self.wake(LINES)
        elif self.waiting & FOLLOWING:
            self.resume(LINES, FOLLOWING)

    def _run_slow(self, handler, arg: bytes) -> bytes:
        """Run a slow command; the read watcher or the sweeper cancels it (ClientGone) if the
        connection is reset meanwhile."""
        self.running = True
        try:
            return self.server.commands.run_slow(handler, self, arg)
        finally:
            self.running = False


class Following:
    """A session's follow of one log: the lines waiting for the client (bounded),
    and the part of a chunk the socket has not taken yet."""

    __slots__ = ("buffer", "log", "out", "scheduled")

    def __init__(self, log) -> None:
        self.log = log
        self.buffer = FollowBuffer()
        self.out: bytes | memoryview = b""
        #: a callback in the hub will tell the session that lines arrived
        self.scheduled = False
