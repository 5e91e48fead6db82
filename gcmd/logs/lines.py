"""Log lines as the protocol sends them: escaping, cutting, the lastlog cap, follow buffers.

Pure functions and small containers, no I/O: the readers in
:mod:`gcmd.logs.readers` feed them bytes, the session sends what they return.
A *raw* line is the bytes of one log line without its ``\\n``; a *wire* line
is what is sent for it, also without ``\\n``; ``None`` stands for a line the
protocol drops (see PROTOCOL.md, "What a log line looks like on the wire").
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate, islice, repeat
from operator import add

from gcmd.net.wire import LF

#: a raw line is cut after this many bytes
MAX_LINE = 65536
#: a lastlog reply holds at most this many bytes of lines, newlines included
MAX_REPLY = 8 << 20
#: bytes of lines a follower may have waiting, newlines and marker included
FOLLOW_BUFFER = 1 << 20
#: lines a log kept in memory remembers
RECENT_LINES = 1000

#: log lines that would end a reply early or forge one
_FORGED = frozenset([b"Begin lastlog", b"End lastlog", b"End follow"])
#: bytes worth reading to decide whether a line is dropped (one more than the longest forged line)
DECIDING_BYTES = 14

#: bytes sent as they are (bytes.translate deletes them: what is left needs escaping);
#: faster than a regular expression on the common printable ASCII line
_PLAIN = bytes([0x09, *range(0x20, 0x7F)])
_PLAIN_LINES = _PLAIN + b"\n"


def _escape_table() -> dict[int, str]:
    # C0 but TAB, DEL and C1 as code points; bytes that are not UTF-8 come
    # back from surrogateescape as U+DC80..U+DCFF. Backslashes stay as they are.
    unsafe = [c for c in range(0x20) if c != 0x09] + list(range(0x7F, 0xA0))
    table = {c: f"\\x{c:02x}" for c in unsafe}
    table.update({0xDC00 + b: f"\\x{b:02x}" for b in range(0x80, 0x100)})
    return table


_ESCAPES = _escape_table()


def _suspect(chunk: bytes) -> bool:
    """Whether a line after the first of ``chunk`` may be one the protocol drops."""
    return b"\n==" in chunk or b"lastlog" in chunk or b"End follow" in chunk


def dropped(raw: bytes) -> bool:
    """Whether the protocol drops the line starting with ``raw``.

    ``raw`` may be the first :data:`DECIDING_BYTES` bytes of a longer line.
    """
    return raw.startswith(b"==") or raw in _FORGED


def wire_line(raw: bytes, cut: int = 0) -> bytes | None:
    """The wire line for a raw line, or None when the protocol drops it.

    ``cut``: bytes of the line already left out after ``raw`` (a reader that
    keeps only the first :data:`MAX_LINE` bytes of a line says how many more
    there were). A line longer than :data:`MAX_LINE` bytes is cut there and
    ends with `` [+N bytes]``.
    """
    if dropped(raw):
        return None
    if len(raw) > MAX_LINE:
        cut += len(raw) - MAX_LINE
        raw = raw[:MAX_LINE]
    if raw.translate(None, _PLAIN):
        raw = raw.decode("utf-8", "surrogateescape").translate(_ESCAPES).encode("utf-8")
    if cut:
        raw += b" [+%d bytes]" % cut
    return raw


def _left_out(count: int) -> bytes:
    return b"== %d older lines left out ==" % count


def capped(newest_first: Iterable[bytes | None], older: int = 0, limit: int = MAX_REPLY,
           marker: Callable[[int], bytes] = _left_out) -> list[bytes]:
    """A lastlog block, oldest line first, from wire lines given newest first.

    At most ``limit`` bytes as sent, marker included: the oldest lines
    that do not fit are left out and counted, with ``older`` lines left out
    before all of them, in a first line ``marker(K)`` (by default
    ``== K older lines left out ==``).
    """
    kept: list[bytes] = []
    size = 0
    left_out = 0
    for line in newest_first:
        if line is None:
            continue
        if left_out or size + len(line) + 1 > limit:
            left_out += 1
        else:
            kept.append(line)
            size += len(line) + 1
    left_out += older
    if left_out:
        while kept and size + len(marker(left_out)) + 1 > limit:
            size -= len(kept.pop()) + 1
            left_out += 1
        kept.append(marker(left_out))
    kept.reverse()
    return kept


def lastlog_lines(lines: Sequence[bytes | None], count: int, limit: int = MAX_REPLY) -> list[bytes]:
    """The lastlog block of the last ``count`` of ``lines`` (wire lines, oldest first, None dropped)."""
    return capped(reversed(lines[-count:]) if count > 0 else (), 0, limit)


class LineSplitter:
    """Cuts a byte stream into wire lines on ``\\n`` only.

    Memory is bounded: of a line that has not ended yet only its first
    :data:`MAX_LINE` bytes are kept, and a count of the rest.
    """

    def __init__(self) -> None:
        self._head = bytearray()
        self._cut = 0

    def feed(self, chunk: bytes) -> list[bytes | None]:
        """The wire lines that ``chunk`` completes, oldest first."""
        if LF not in chunk:
            self._keep(chunk)
            return []
        parts = chunk.split(b"\n")
        rest = parts.pop()
        if self._cut:
            first = wire_line(bytes(self._head), self._cut + len(parts[0]))
        elif self._head:
            first = wire_line(bytes(self._head) + parts[0])
        else:
            first = wire_line(parts[0])
        lines = [first]
        if len(chunk) <= MAX_LINE and not chunk.translate(None, _PLAIN_LINES) and not _suspect(chunk):
            lines += parts[1:]  # the common case: every line is sent as it is
        else:
            lines += map(wire_line, parts[1:])
        self._head.clear()
        self._cut = 0
        self._keep(rest)
        return lines

    def feed_lines(self, chunk: bytes, start: int) -> list[tuple[bytes, int, int]]:
        """The raw lines that ``chunk`` completes, oldest first, as (raw, cut, end):
        the line's first MAX_LINE bytes, the bytes cut off after them, and
        the offset of its ``\\n`` (``start``: the offset of ``chunk``'s first byte).
        ``wire_line(raw, cut)`` is what :meth:`feed` gives for it."""
        if LF not in chunk:
            self._keep(chunk)
            return []
        parts = chunk.split(b"\n")
        rest = parts.pop()
        first = parts[0]
        if self._cut:
            head, cut = bytes(self._head), self._cut + len(first)
        else:
            head = bytes(self._head) + first if self._head else first
            head, cut = head[:MAX_LINE], max(0, len(head) - MAX_LINE)
        end = start + len(first)
        lines = [(head, cut, end)]
        for part in parts[1:]:
            end += 1 + len(part)
            lines.append((part[:MAX_LINE], max(0, len(part) - MAX_LINE), end))
        self._head.clear()
        self._cut = 0
        self._keep(rest)
        return lines

    def _keep(self, data: bytes) -> None:
        if self._cut:
            self._cut += len(data)
            return
        self._head += data
        if len(self._head) > MAX_LINE:
            self._cut = len(self._head) - MAX_LINE
            del self._head[MAX_LINE:]


class Recent:
    """The last ``lines`` lines of a log kept in memory, at most ``limit`` bytes of them.

    Lines pushed out by the byte limit would never fit in a lastlog reply
    with the lines after them, so answering from here is exact: they are
    counted as left out (what is remembered of them is whether they were
    dropped lines, which do not count).
    """

    def __init__(self, lines: int = RECENT_LINES, limit: int = MAX_REPLY) -> None:
        self.most_lines = lines
        self.limit = limit
        self._lines: deque[bytes | None] = deque()
        self._bytes = 0
        #: for the lines pushed out, newest last: whether each was a line that is sent
        self._gone: deque[bool] = deque(maxlen=lines)
        #: lines ever kept: the newest kept line is line number ``appended`` (from 1)
        self.appended = 0

    def __len__(self) -> int:
        return len(self._lines)

    def extend(self, lines: Iterable[bytes | None]) -> None:
        for line in lines:
            self.appended += 1
            self._lines.append(line)
            if line is not None:
                self._bytes += len(line) + 1
            while len(self._lines) > self.most_lines or self._bytes > self.limit:
                old = self._lines.popleft()
                if old is not None:
                    self._bytes -= len(old) + 1
                self._gone.append(old is not None)

    def clear(self) -> None:
        self._lines.clear()
        self._gone.clear()
        self._bytes = 0

    def last(self, count: int) -> list[bytes]:
        """The lastlog block of the last ``count`` lines."""
        gone = self.gone(count)
        window = list(self._lines)[-count:] if count > 0 else []
        return capped(reversed(window), gone, self.limit)

    def numbered(self) -> tuple[list[bytes | None], int]:
        """The kept wire lines, oldest first, and the number of the first (lines are numbered from 1)."""
        return list(self._lines), self.appended - len(self._lines) + 1

    def gone(self, count: int) -> int:
        """Of the last ``count`` lines, those no longer kept and sent (not dropped)."""
        beyond = min(count - len(self._lines), len(self._gone))
        return sum(list(self._gone)[-beyond:]) if beyond > 0 else 0


class Batch(list):
    """Wire lines handed to every follower of a log at once, with their size as sent.

    The size is counted once for all followers: :meth:`FollowBuffer.push`
    uses it rather than counting again for each.
    """

    __slots__ = ("sent",)

    def __init__(self, lines: Iterable[bytes] = ()) -> None:
        super().__init__(lines)
        #: bytes as sent, each line with its newline
        self.sent = sum(map(len, self)) + len(self)


def _dropped_marker(count: int) -> bytes:
    return b"== %d lines dropped ==" % count


def _as_sent(lines: Iterable[bytes]) -> list[int]:
    """Bytes as sent of the first k lines, for k = 1, 2, ... (computed in C)."""
    return list(accumulate(map(add, map(len, lines), repeat(1))))


class FollowBuffer:
    """The wire lines waiting for one follower, at most ``limit`` bytes as sent.

    When new lines do not fit, the oldest waiting lines are dropped and one
    marker ``== N lines dropped ==`` stands first, where they were; drops
    before the marker is taken add to its N. The marker counts in the limit.
    Every follower of a log gets every batch of lines, so a batch is kept as
    the list the log hands out (shared, never changed) and pushed, dropped and
    taken a batch at a time: the work per line is done in C.
    """

    def __init__(self, limit: int = FOLLOW_BUFFER, marker: Callable[[int], bytes] | None = None) -> None:
        self.limit = limit
        #: the line that says how many lines were dropped (N -> line): the text one by default
        self.marker = marker or _dropped_marker
        self._batches: deque[list[bytes]] = deque()
        #: bytes as sent of each batch's lines still waiting
        self._sizes: deque[int] = deque()
        #: lines of the first batch already taken or dropped
        self._skip = 0
        #: bytes of the waiting lines as sent (each with its newline)
        self._bytes = 0
        #: lines dropped since the marker was last taken
        self._dropped = 0

    @property
    def pending(self) -> int:
        """Bytes waiting to be sent, the marker included."""
        return self._bytes + self._marker_size(self._dropped)

    def __bool__(self) -> bool:
        return bool(self._batches) or self._dropped > 0

    def _marker_size(self, dropped: int) -> int:
        return len(self.marker(dropped)) + 1 if dropped else 0

    def push(self, lines: list[bytes]) -> int:
        """Queue ``lines`` (wire lines, a list kept as it is); returns how many lines this push dropped."""
        if not lines:
            return 0
        size = lines.sent if isinstance(lines, Batch) else sum(map(len, lines)) + len(lines)
        self._batches.append(lines)
        self._sizes.append(size)
        self._bytes += size
        if self.pending <= self.limit:
            return 0
        before = self._dropped
        self._drop_oldest()
        return self._dropped - before

    def _drop_oldest(self) -> None:
        while self.pending > self.limit and self._batches:
            batch, skip = self._batches[0], self._skip
            left = len(batch) - skip
            rest = self._bytes - self._sizes[0]
            if rest + self._marker_size(self._dropped + left) > self.limit:
                self._forget(left, self._sizes[0])
                continue
            # the cut lies in this batch: the fewest lines whose going makes room
            sent = _as_sent(batch[skip:])
            k = 1 + bisect_left(range(left), True, key=lambda i: (
                self._bytes - sent[i] + self._marker_size(self._dropped + i + 1) <= self.limit))
            self._forget(k, sent[k - 1])

    def _forget(self, count: int, size: int) -> None:
        """Drop the ``count`` oldest waiting lines, ``size`` bytes as sent."""
        self._dropped += count
        self._advance(count, size)

    def _advance(self, count: int, size: int) -> None:
        self._bytes -= size
        if self._skip + count == len(self._batches[0]):
            self._batches.popleft()
            self._sizes.popleft()
            self._skip = 0
        else:
            self._skip += count
            self._sizes[0] -= size

    def take(self, limit: int = 65536) -> bytes:
        """The next bytes to send: the marker if any, then whole lines, each with its newline.

        About ``limit`` bytes at most, but always at least one line when one waits.
        """
        out: list[bytes] = []
        size = 0
        if self._dropped:
            out.append(self.marker(self._dropped))
            size = len(out[0]) + 1
            self._dropped = 0
        while self._batches:
            batch, skip = self._batches[0], self._skip
            if size + self._sizes[0] <= limit:
                out += batch[skip:] if skip else batch
                size += self._sizes[0]
                self._advance(len(batch) - skip, self._sizes[0])
                continue
            if out:
                break  # the next take starts with this batch: whole batches are cheap
            # a batch bigger than the limit: the lines that fit, at least one
            # (no more lines than bytes fit: the sums stop there)
            sent = _as_sent(islice(batch, skip, skip + limit))
            k = bisect_right(sent, limit) or 1
            out += batch[skip:skip + k]
            self._advance(k, sent[k - 1])
            break
        return b"\n".join(out) + b"\n" if out else b""
