"""The server log's output (standard output or --output): written by a thread of its own.

The hub only queues lines, so a stopped reader of a pipe or a slow disk never
stalls a client: the queue is bounded, the lines that find it full are dropped
and counted, and how many is logged once the output takes lines again.
"""

from __future__ import annotations

import codecs
import logging
import os
import select
import stat
import threading
from collections import deque
from collections.abc import Iterator
from typing import TextIO

from gcmd.serverlog.setup import LineHandler, flush_lines

log = logging.getLogger(__name__)

#: characters of log lines that wait for an output that does not take them
#: (a stopped reader, a slow disk); lines past it are dropped and counted
OUTPUT_BUFFER = 4 << 20
#: seconds the writer lets lines gather after a write, while more arrive
WRITE_EVERY = 0.02
#: seconds a flush (shutdown, a worker's exit) waits for the output to take the queued lines
FLUSH_TIMEOUT = 5.0
#: why a line that finds the queue full is dropped
FULL = "the output took no line for a while"
#: bytes a write to a pipe may hold and stay whole when others write to it too (pipe(7))
PIPE_BUF = getattr(select, "PIPE_BUF", 4096)


class LogOutput(LineHandler):
    """Writes the log to ``stream`` in a thread of its own: the hub never waits for it.

    The hub appends texts (a line, or several: a traceback, a run of
    request lines) to a queue and goes on; at the end of the event-loop
    iteration, it wakes the writer, which takes all that waits, writes it
    with one call, and lets texts gather for WRITE_EVERY before the next
    write. The queue and the texts being written hold at most ``limit``
    characters: a text past it is dropped and its lines counted
    (``dropped``); once a write succeeds again, how many were dropped is
    logged.

    ``shared``: other processes write to the same output (``--workers``):
    see write_whole_lines.
    """

    def __init__(self, stream: TextIO, limit: int = OUTPUT_BUFFER, *, shared: bool = False) -> None:
        super().__init__()
        self.stream = stream
        self.limit = limit
        self.shared = shared
        #: the texts to write, oldest first: the hub appends, the writer takes
        #: (a deque's append and popleft are atomic)
        self._queue: deque[str] = deque()
        # each count has one writer, so that no update is lost: the hub's (texts,
        # characters, and lines dropped) ...
        self._queued_texts = self._queued_chars = self._full = 0
        # ... and the writer's
        self._done_texts = self._done_chars = self._lost = self._reported = 0
        self._cause = FULL
        self._reporting = False  # the hub logs how many were dropped: that line is never dropped
        self._scheduled = False  # the hub wakes the writer at the end of its iteration
        # under self.lock:
        #: streams to write to from then on (reopen): (texts queued before, stream)
        self._switches: list[tuple[int, TextIO]] = []
        self._writing = False  # the writer is awake; else the hub wakes it for new lines
        self._hurry = False  # a flush waits: the writer lets no lines gather
        self._closing = False
        #: texts queued when a flush last timed out: later flushes do not wait until they are written
        self._stuck = 0
        self._wake = threading.Condition(self.lock)
        self._idle = threading.Condition(self.lock)
        self._writer = threading.Thread(target=self._write_loop, name="gcmd log output", daemon=True)
        self._writer.start()

    @property
    def dropped(self) -> int:
        """Lines dropped since the start: the queue was full, or the output failed."""
        return self._full + self._lost

    def emit_texts(self, texts: list[str]) -> None:
        count = len(texts)
        size = sum(map(len, texts)) + count
        if self._queued_chars - self._done_chars + size > self.limit and not self._reporting:
            texts = self._fitting(texts)
            count = len(texts)
            size = sum(map(len, texts)) + count
        self._queue.extend(texts)
        self._queued_texts += count
        self._queued_chars += size
        # the writer marks itself idle, then looks at the queue once more: one of us sees the other
        if count and not self._writing and not self._scheduled:
            self._scheduled = True
            self.loop.run_callback(self._hand_over)

    def _hand_over(self) -> None:
        # once the event-loop iteration has logged its lines: they go out with one write
        self._scheduled = False
        with self.lock:
            self._wake_writer()

    def _fitting(self, texts: list[str]) -> list[str]:
        """The first of ``texts`` that fit in the queue; the others are dropped, and their lines counted."""
        room = self.limit - (self._queued_chars - self._done_chars)
        for kept, text in enumerate(texts):
            room -= len(text) + 1
            if room < 0:
                self._full += _lines(texts[kept:])
                self._cause = FULL
                return texts[:kept]
        return texts

    def _wake_writer(self, hurry: bool = False) -> None:
        # self.lock held
        if hurry:
            self._hurry = True
            self._wake.notify()
        if not self._writing:
            self._writing = True
            self._wake.notify()

    def flush(self) -> None:
        """Wait until the lines logged so far are written or dropped, at most
        FLUSH_TIMEOUT s; once a flush has timed out (the output is stuck), later
        ones wait no more until the writer has caught up (shutdown flushes
        several times: it must not wait FLUSH_TIMEOUT for each)."""
        flush_lines()
        with self.lock:
            target = self._queued_texts
            self._wake_writer(hurry=True)
            timeout = 0 if self._stuck and self._done_texts < self._stuck else FLUSH_TIMEOUT
            if not self._idle.wait_for(lambda: self._done_texts >= target, timeout):
                self._stuck = target

    def close(self) -> None:
        """Flush, then let the writer end (the stream stays open, as StreamHandler's)."""
        with self.lock:
            self.flush()
            self._closing = True
            self._wake_writer(hurry=True)
        super().close()

    def switch_to(self, stream: TextIO) -> None:
        """Write the lines logged from now on to ``stream``, once the earlier ones are
        written to the current stream; then close it."""
        flush_lines()
        with self.lock:
            self._switches.append((self._queued_texts, stream))
            self._wake_writer(hurry=True)

    def _report(self, count: int, cause: str) -> None:
        # in the hub, after a write that succeeded
        self._reporting = True
        try:
            log.warning("%d log lines were dropped: %s", count, cause)
        finally:
            self._reporting = False

    # --- the writer's thread ---------------------------------------------------------------

    def _write_loop(self) -> None:
        while (taken := self._take()) is not None:
            texts, switches = taken
            lost, cause = self._write(texts, switches)
            self._done_texts += len(texts)
            self._done_chars += sum(map(len, texts)) + len(texts)
            if lost:  # reported once a write succeeds
                self._lost += lost
                self._cause = cause
            elif self.dropped > self._reported:
                count, self._reported = self.dropped - self._reported, self.dropped
                self.loop.run_callback_threadsafe(self._report, count, self._cause)
            with self.lock:
                if self._hurry:
                    self._idle.notify_all()
                else:  # let lines gather: one wake-up and one write per WRITE_EVERY at most
                    self._wake.wait(WRITE_EVERY)

    def _take(self) -> tuple[list[str], list[tuple[int, TextIO]]] | None:
        """Wait for texts or a switch; the texts that wait, and the switches among them
        (index in the texts, stream); None once closing with nothing left."""
        with self.lock:
            while not (self._queue or self._switches):
                self._writing = self._hurry = False
                self._idle.notify_all()
                if self._closing:
                    return None
                if not self._queue:  # see emit_texts
                    self._wake.wait()
            self._writing = True
            queue, start = self._queue, self._done_texts
            texts = [queue.popleft() for _ in range(len(queue))]
            due = [(at - start, stream) for at, stream in self._switches if at <= start + len(texts)]
            del self._switches[:len(due)]
        return texts, due

    def _write(self, texts: list[str], switches: list[tuple[int, TextIO]]) -> tuple[int, str]:
        """Write ``texts``, switching streams on the way; the lines lost, and why."""
        lost, cause, start = 0, "", 0
        for end, stream in (*switches, (len(texts), None)):
            if end > start:
                not_written, error = self._write_text("\n".join(texts[start:end]) + "\n")
                if not_written:
                    lost, cause = lost + not_written, f"cannot write the log output: {error}"
                start = end
            if stream is not None:
                old, self.stream = self.stream, stream
                try:
                    old.close()
                except OSError:
                    pass  # its last lines are counted above, if they were lost
        return lost, cause

    def _write_text(self, text: str) -> tuple[int, Exception | None]:
        """Write ``text`` (whole lines); the lines not written, and why."""
        return (write_whole_lines if self.shared else _write)(self.stream, text)


class SharedStreamHandler(logging.StreamHandler):
    """A StreamHandler for an output other processes write to (the supervisor of
    ``--workers``): each record is written as LogOutput(shared=True) writes."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _, error = write_whole_lines(self.stream, self.format(record) + self.terminator)
            if error is not None:
                raise error
        except Exception:  # noqa: BLE001 - logging's own policy: report, never raise
            self.handleError(record)


def write_whole_lines(stream: TextIO, text: str) -> tuple[int, Exception | None]:
    """Write ``text`` (whole lines) to ``stream``, which other processes write to as
    well; the lines not written, and why.

    A regular file (opened for appending) takes each write whole. Otherwise
    (a pipe, a socket) the UTF-8 bytes go out with one ``write(2)`` per piece
    of whole lines of at most PIPE_BUF bytes, which a pipe keeps whole
    (pipe(7)): two processes' lines never mix. A stream in another encoding
    is written as usual.
    """
    try:
        stream.flush()
        if _regular(stream) or codecs.lookup(stream.encoding or "ascii").name != "utf-8":
            return _write(stream, text)
        data = text.encode("utf-8", stream.errors or "strict")
        fd = stream.fileno()
    except Exception as exc:  # noqa: BLE001 - any stream: count the lines, go on
        return text.count("\n"), exc
    done = 0
    for chunk in line_chunks(data, PIPE_BUF):
        view = memoryview(chunk)
        try:
            while view:  # a pipe takes a piece whole; a socket may take part of it
                view = view[os.write(fd, view):]
        except OSError as exc:
            return data.count(b"\n", done), exc
        done += len(chunk)
    return 0, None


def _write(stream: TextIO, text: str) -> tuple[int, Exception | None]:
    """Write ``text`` (whole lines) with the stream's own writes; the lines not written, and why."""
    try:
        stream.write(text)
        stream.flush()
    except Exception as exc:  # noqa: BLE001 - any stream: count the lines, go on
        return text.count("\n"), exc
    return 0, None


def _regular(stream: TextIO) -> bool:
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


def line_chunks(data: bytes, limit: int) -> Iterator[bytes]:
    """``data`` in pieces that end at the end of a line and hold at most ``limit``
    bytes, except a line longer than that, which is a piece of its own."""
    start, size = 0, len(data)
    while size - start > limit:
        cut = data.rfind(b"\n", start, start + limit)
        if cut < 0:  # a long line: up to its end
            cut = data.find(b"\n", start + limit)
            if cut < 0:
                break
        yield data[start:cut + 1]
        start = cut + 1
    if start < size:
        yield data[start:]


def _lines(texts: list[str]) -> int:
    """The lines the texts hold."""
    return len(texts) + sum(text.count("\n") for text in texts)
