"""A client's follow of a log: a state of the client, with its own bounded buffer.

The log's courier hands every follower each batch of new lines
(``deliver``: it must not block); they wait in the follower's FollowBuffer
(1 MiB; the oldest are dropped, and a marker says how many). One writer
greenlet per follow sends them: while a client follows, it is the only
writer to the socket, and the client's own greenlet only reads (any line
ends the follow). ``stop`` ends the writer first, so that whoever writes
next (End follow, a farewell) is again the only writer.
"""

from __future__ import annotations

import socket
from time import monotonic

import gevent
from gevent.event import Event

from gcmd.logs.lines import FollowBuffer
from gcmd.net.ends import ClientGone

#: TCP keepalive of a follower (idle seconds, seconds between probes, probes):
#: a quiet log sends nothing, and a client that went away (its machine gone,
#: or, after a half-close, its socket closed) is found within about two minutes
FOLLOW_KEEPALIVE = (60, 10, 6)


class FollowStream:
    """The lines of ``source`` on their way to ``client``'s socket.

    ``source`` has ``subscribe(callback)``, ``unsubscribe(callback)``,
    ``stats.lines_dropped`` and, if its drop marker is not the text one,
    ``dropped_marker`` (N -> bytes); ``callback(lines)`` gets wire lines
    (bytes without their newline). Subscribing raises CommandError when the log
    cannot be followed now.
    """

    __slots__ = ("buffer", "client", "error", "out", "ready", "source", "writer")

    def __init__(self, client, source) -> None:
        self.client = client
        self.source = source
        self.buffer = FollowBuffer(marker=getattr(source, "dropped_marker", None))
        #: the part of a chunk the socket has not taken yet
        self.out: bytes | memoryview = b""
        self.ready = Event()
        self.writer: gevent.Greenlet | None = None
        #: why the writer stopped (the client is gone), or None
        self.error: OSError | None = None
        source.subscribe(self.deliver)

    def deliver(self, lines: list[bytes]) -> None:
        """New lines of the log (one batch, shared with the other followers)."""
        dropped = self.buffer.push(lines)
        if dropped:
            self.source.stats.lines_dropped += dropped
        self.ready.set()

    def start(self) -> None:
        """The reply that began the follow is sent: the lines may flow. A writer
        that stops (the client is gone) ends the client's follow too."""
        keepalive(self.client.sock, *FOLLOW_KEEPALIVE)
        self.writer = gevent.spawn(self._write)
        self.writer.rawlink(self._writer_stopped)

    def _writer_stopped(self, writer: gevent.Greenlet) -> None:
        # it stopped by itself (stop unlinks this first): the client is gone
        self.client.interrupt(ClientGone, "following")

    def _write(self) -> None:
        """Send what waits, as it comes. The client's deadline runs while a chunk
        waits for the socket: a client that takes no byte for the idle timeout is cut."""
        client, sock = self.client, self.client.sock
        idle = client.server.config.idle_timeout
        try:
            while True:
                self.ready.wait()
                self.ready.clear()
                while chunk := self.buffer.take():
                    self.out = memoryview(chunk)
                    while self.out:
                        client.deadline = monotonic() + idle
                        self.out = self.out[sock.send(self.out):]
                    client.deadline = float("inf")
        except OSError as exc:
            self.error = exc

    def join(self) -> None:
        """Wait until the writer stops (the client is gone): raise why."""
        self.writer.join()
        if self.error is not None:
            raise self.error

    def stop(self, block: bool = True) -> bytes:
        """Stop following; what still waits for the client: the rest of a chunk
        begun, then whole lines (the drop marker first if lines were dropped).
        ``block``: wait until the writer has stopped, as whoever writes next must."""
        self.source.unsubscribe(self.deliver)
        if self.writer is not None:
            self.writer.unlink(self._writer_stopped)
            self.writer.kill(block=block)
        self.client.deadline = float("inf")
        rest = [bytes(self.out)]
        while chunk := self.buffer.take():
            rest.append(chunk)
        return b"".join(rest)


def keepalive(sock, idle: int, interval: int, count: int) -> None:
    """Turn on TCP keepalive (tcp(7)): after ``idle`` seconds without traffic, a
    probe every ``interval`` seconds; ``count`` unanswered probes, or a reset
    in reply, end the connection."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, option):  # Linux; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
