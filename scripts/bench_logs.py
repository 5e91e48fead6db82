"""The log cells of scripts/bench: lastlog of a growing log, and follow.

- ``lastlog 10c +500/s``: 10 connections loop on ``lastlog`` while a writer
  process appends 500 lines a second to the served log; ``ping beside
  lastlog``: the latency of one more client that pings meanwhile, once a
  millisecond. Every server answers these.
- ``follow`` (gcmd only, the peers have no follow): FOLLOWERS connections
  follow the log from FOLLOW_PROCESSES client processes (non-blocking
  sockets, one selector each) while the writer appends 1,000 lines a second
  for 10 s. Each line carries its number and the writer's CLOCK_MONOTONIC
  (the same clock in every process of the machine) when it was written, so
  each follower checks that it got every line once and in order, and the
  delay from the write to the receipt is measured for every line. Beside
  it: ping p99 from another client, the server's CPU seconds (utime + stime
  of /proc/PID/stat, its ``tail`` apart) from the first write to the last
  line received, and its RSS per follower, parked (before the first write)
  and at the peak of the stream.

The follow cell is written for any follow request: each follower may send
its own (``follow grep PATTERN``, see bench_queries), and is checked
against the lines of the writer that its request selects.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import resource
import selectors
import socket
import sys
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

#: lines a second appended to the log during lastlog of a growing log
GROW_RATE = 500
#: lines a second, followers and seconds of the follow cell
FOLLOW_RATE = 1000
FOLLOWERS = 500
FOLLOW_SECONDS = 10.0
FOLLOW_PROCESSES = 2
#: the follow cell's name among the cells of a server
FOLLOW = "follow"
#: the request of a follower of the follow cell
PLAIN_FOLLOW = b"follow\n"
#: what the writer's line ``seq`` says after its number, stamp and program: a
#: verb of VERBS and a user of USERS, so that ``follow grep`` has lines to pick
VERBS = ("accepted", "failed", "closed", "opened", "refused")
USERS = 50
#: seconds a follower may take to receive the last line once the writer stopped
DRAIN_LIMIT = 30.0
#: seconds between two pings of the client that measures latency beside a load
PING_INTERVAL = 0.001
#: seconds the followers wait before the first write: gcmd parks a session
#: silent for a second, so that the RSS measured then is that of parked followers
PARKING = 2.0
#: the delivery delays are counted in bins this wide, in seconds
DELAY_BIN = 0.0001
RECV_SIZE = 65536
TICKS = os.sysconf("SC_CLK_TCK")


def write_log(path: Path, lines: int = 2000) -> None:
    """A fresh log of ``lines`` lines, as every server starts with."""
    path.write_text("".join(f"Nov 25 10:00:{i % 60:02d} lab app[{i}]: line {i} of the log\n"
                            for i in range(lines)))


def line_text(seq: int) -> bytes:
    """The text of the writer's line ``seq``, after ``SEQ STAMP lab app[PID]: ``."""
    return b"%s session of user%02d, a line of the growing log" % (VERBS[seq % len(VERBS)].encode(),
                                                                     seq % USERS)


def grep_regex(pattern: bytes) -> re.Pattern:
    """``pattern`` as gcmd matches it (PROTOCOL.md, "Log queries"): case-insensitive
    without an upper-case letter, as journalctl --grep. Python's ``re``, not RE2:
    an oracle of its own, for the patterns of the cells (plain words, ``\\b``)."""
    return re.compile(pattern, 0 if re.search(rb"[A-Z]", pattern) else re.IGNORECASE)


def selected(request: bytes, lines: int) -> tuple[Sequence[int], re.Pattern | None]:
    """The numbers of the writer's lines that a follower sending ``request``
    (``follow\\n`` or ``follow grep PATTERN\\n``) must get when ``lines`` are
    written, and the pattern each of them must match. The patterns of the cells
    match only the lines' text (line_text), never their number or stamp."""
    words = request.split(None, 2)
    if len(words) == 1:
        return range(lines), None
    if words[1] != b"grep" or len(words) != 3:
        raise ValueError(f"the follow cell sends follow or follow grep PATTERN, not {request!r}")
    regex = grep_regex(words[2].strip())
    return [seq for seq in range(lines) if regex.search(line_text(seq))], regex


# --- the writer, the pinger and the followers: each in a process of its own --------------

def append_lines(path: Path, rate: float, count: int, out: multiprocessing.Queue) -> None:
    """Append ``count`` lines to ``path`` at ``rate`` lines a second, one write
    each, as a logging program does: ``SEQ STAMP lab app[PID]: TEXT``, STAMP the
    monotonic clock at the write, TEXT line_text(SEQ). Puts (lines, first
    stamp, last stamp)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    started = time.monotonic()
    stamp = started
    try:
        for seq in range(count):
            due = started + seq / rate
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            stamp = time.monotonic()
            os.write(fd, b"%d %.6f lab app[%d]: %s\n" % (seq, stamp, os.getpid(), line_text(seq)))
    finally:
        os.close(fd)
    out.put((count, started, stamp))


def _pings(port: int, until: Callable[[], bool]) -> list[tuple[float, float]]:
    """A ping every PING_INTERVAL until ``until()``: (when it was sent, on the
    monotonic clock, which every process of the machine shares; its latency), in seconds."""
    pings = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while not until():
            started = time.monotonic()
            sock.sendall(b"ping\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(64)
                if not chunk:
                    raise ConnectionError("the server closed the ping client")
                reply += chunk
            pings.append((started, time.monotonic() - started))
            time.sleep(max(0.0, started + PING_INTERVAL - time.monotonic()))
    return pings


def paced_pings(port: int, seconds: float, out: multiprocessing.Queue) -> None:
    """One client: a ping every PING_INTERVAL for ``seconds``; puts the latencies in seconds."""
    stop = time.monotonic() + seconds
    out.put([latency for _, latency in _pings(port, lambda: time.monotonic() >= stop)])


def stamped_pings(port: int, stop_at, out: multiprocessing.Queue) -> None:
    """paced_pings until the monotonic clock passes ``stop_at`` (a shared double),
    but puts (when each ping was sent, its latency): a load that comes and goes
    picks the pings sent while it ran."""
    out.put(_pings(port, lambda: time.monotonic() >= stop_at.value))


def _subscribe(port: int, requests: list[bytes]) -> tuple[selectors.BaseSelector, dict, dict]:
    """A connection for each of ``requests`` (follow requests) that sent it and
    read its ``Begin follow``: {socket: its Follower}, {socket: its request}."""
    selector = selectors.DefaultSelector()
    state, asked = {}, {}
    count = len(requests)
    for request in requests:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(request)
        asked[sock] = request
        sock.setblocking(False)
        state[sock] = Follower()
        selector.register(sock, selectors.EVENT_READ)
    waiting = set(state)
    deadline = time.monotonic() + 60
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(waiting)} of {count} follow requests got no 'Begin follow' in 60 s")
        for key, _ in selector.select(timeout=1):
            follower = state[key.fileobj]
            data = key.fileobj.recv(RECV_SIZE)
            if not data:
                raise ConnectionError(f"the server closed a follower after {follower.tail[:200]!r}")
            follower.tail += data
            if follower.tail.startswith(b"Begin follow\n"):
                follower.tail = follower.tail[len(b"Begin follow\n"):]
                waiting.discard(key.fileobj)
            elif not b"Begin follow\n".startswith(follower.tail):
                raise ConnectionError(f"follow answered {follower.tail[:200]!r}")
    return selector, state, asked


class Stream:
    """The lines every follower of a client process that sent one request must
    get, as far as one got them: the writer's lines ``seqs`` (by default
    every line: line i is ``i STAMP ...``), each matching ``pattern`` if
    given. Each line is parsed once per process, then each follower's bytes
    are compared with these in C: the check costs no Python work per line
    and follower."""

    def __init__(self, seqs: Sequence[int] = range(sys.maxsize), pattern: re.Pattern | None = None) -> None:
        self.seqs = seqs
        self.pattern = pattern
        self.data = bytearray()
        #: the offset after each line, and its stamp in DELAY_BIN units
        self.ends: list[int] = []
        self.stamps: list[int] = []

    def extend(self, lines: bytes) -> bool:
        """Add ``lines`` (complete lines); False when one is not the next line
        (or does not match the pattern)."""
        for line in lines.split(b"\n")[:-1]:
            seq, stamp, _ = (line.split(b" ", 2) + [b"", b""])[:3]
            index = len(self.ends)
            if not seq.isdigit() or index >= len(self.seqs) or int(seq) != self.seqs[index]:
                return False  # a line missed, out of order, or == N lines dropped ==
            if self.pattern is not None and self.pattern.search(line) is None:
                return False
            self.data += line + b"\n"
            self.ends.append(len(self.data))
            self.stamps.append(int(float(stamp) / DELAY_BIN))
        return True


class Follower:
    """What one follower got: the bytes that match the stream, the lines they
    end, the bytes past the stream's end (a line not yet complete)."""

    __slots__ = ("bad", "drops", "lines", "matched", "tail")

    def __init__(self) -> None:
        self.matched = self.lines = self.drops = 0
        self.tail = b""
        self.bad = False

    def take(self, data: bytes, stream: Stream, now: int, delays: Counter) -> None:
        """Match ``data``, received at ``now`` (DELAY_BIN units), with
        ``stream``; count the delay of each line it completes in ``delays``."""
        data = self.tail + data
        past = self.matched + len(data) - len(stream.data)
        if past > 0:  # this follower is the first of the process to get these bytes
            whole = data[len(data) - past:]
            whole = whole[:whole.rfind(b"\n") + 1]
            if whole and not stream.extend(whole):
                self.bad = True
        size = min(len(data), len(stream.data) - self.matched)
        if self.bad or stream.data[self.matched:self.matched + size] != data[:size]:
            self.bad = True
            self.drops += data.count(b" lines dropped ==\n")
            return
        self.tail, self.matched = data[size:], self.matched + size
        done = bisect_right(stream.ends, self.matched)
        delays.update([now - stamp for stamp in stream.stamps[self.lines:done]])
        self.lines = done


def followers(port: int, requests: list[bytes], lines: int, ready: multiprocessing.Queue,
              stop_at, out: multiprocessing.Queue) -> None:
    """A follower for each of ``requests``: tells ``ready`` once all follow,
    then reads until each got the lines its request selects of the
    ``lines`` written (or went wrong) or the clock passes ``stop_at`` (a
    shared double); puts what they got."""
    selector, state, asked = _subscribe(port, requests)
    ready.put(len(requests))
    streams = {request: Stream(*selected(request, lines)) for request in set(requests)}
    delays: Counter = Counter()
    unfinished = {sock for sock in state if streams[asked[sock]].seqs}
    while unfinished and time.monotonic() < stop_at.value:
        for key, _ in selector.select(timeout=0.2):
            sock, follower = key.fileobj, state[key.fileobj]
            stream = streams[asked[sock]]
            data = sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionError("the server closed a follower")
            if not follower.bad:
                follower.take(data, stream, int(time.monotonic() / DELAY_BIN), delays)
            if follower.bad or follower.lines >= len(stream.seqs):
                unfinished.discard(sock)
    for sock in state:
        sock.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put({"complete": sum(1 for sock, f in state.items()
                             if f.lines == len(streams[asked[sock]].seqs) and not f.bad),
             "drops": sum(f.drops for f in state.values()), "delays": delays,
             "cpu_s": usage.ru_utime + usage.ru_stime, "done_at": time.monotonic()})


# --- the measures ------------------------------------------------------------------------

def start(target, *args) -> tuple[multiprocessing.Process, multiprocessing.Queue]:
    out: multiprocessing.Queue = multiprocessing.Queue()
    proc = multiprocessing.Process(target=target, args=(*args, out))
    proc.start()
    return proc, out


def finish(proc: multiprocessing.Process, out: multiprocessing.Queue, timeout: float):
    result = out.get(timeout=timeout)
    proc.join(10)
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def binned_percentile(bins: Counter, q: float) -> float:
    """The ``q`` quantile of the delays counted in ``bins``, in seconds (a bin's upper edge)."""
    total = sum(bins.values())
    seen = 0
    for index in sorted(bins):
        seen += bins[index]
        if seen >= q * total:
            return (index + 1) * DELAY_BIN
    return float("nan")


def growing_lastlog(port: int, log: Path, seconds: float, load) -> dict:
    """The cells ``lastlog 10c +500/s`` and ``ping beside lastlog``: ``load()``
    runs the 10 lastlog connections for ``seconds`` and gives (replies a
    second, latencies); a writer and a pinger run meanwhile."""
    writer = start(append_lines, log, GROW_RATE, int(GROW_RATE * (seconds + 5)))
    pinger = start(paced_pings, port, seconds)
    try:
        rps, latencies = load()
        pings = finish(*pinger, seconds + 60)
    finally:
        for proc, _ in (writer, pinger):  # the writer writes on until stopped
            proc.terminate()
            proc.join()
    return {"lastlog 10c +500/s": {"rps": rps, "p50_ms": percentile(latencies, 0.5) * 1000,
                                   "p99_ms": percentile(latencies, 0.99) * 1000},
            "ping beside lastlog": {"p50_ms": percentile(pings, 0.5) * 1000,
                                    "p99_ms": percentile(pings, 0.99) * 1000}}


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """utime + stime of process ``pid``; ``reaped``: and cutime + cstime, those of the children
    it has waited for (proc(5), /proc/PID/stat fields 14 to 17)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(map(int, fields[11:15 if reaped else 13])) / TICKS


def tree_sum(pid: int, figure) -> float:
    """``figure(pid)`` summed over process ``pid`` and its descendants (the workers of gcmd
    --workers among them); a descendant that has just exited is left out."""
    total = figure(pid)
    for child in children(pid):
        try:
            total += tree_sum(child, figure)
        except OSError:
            pass
    return total


def tree_cpu_seconds(pid: int) -> float:
    """The CPU time of process ``pid`` and of its descendants, those that exited and were
    waited for included (a peer's ``tail`` per lastlog, a worker replaced): a child is counted
    while it runs, then in its parent's cutime and cstime."""
    return tree_sum(pid, partial(cpu_seconds, reaped=True))


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """``field`` of /proc/PID/status of process ``pid``, in KiB (0 where the process has none:
    a process that has exited and is not yet waited for)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def follow_cell(pid: int, port: int, log: Path, requests: list[bytes], seconds: float,
                cell: str = FOLLOW) -> dict:
    """The follow cell against the server ``pid`` listening on ``port`` and
    serving ``log`` as its default log: a follower for each of ``requests``
    (``follow`` or ``follow grep PATTERN``, see selected): {cell: figures}.
    Every process it starts is gone when it returns."""
    lines = int(FOLLOW_RATE * seconds)
    rss = {"before": rss_kib(pid)}
    ready: multiprocessing.Queue = multiprocessing.Queue()
    stop_at = multiprocessing.RawValue("d", float("inf"))
    # each process gets its share of every request: it parses each stream once
    shares = [requests[i::FOLLOW_PROCESSES] for i in range(FOLLOW_PROCESSES)]
    clients = [start(followers, port, share, lines, ready, stop_at) for share in shares if share]
    started = list(clients)
    try:
        for _ in clients:
            ready.get(timeout=120)
        time.sleep(PARKING)
        rss["parked"] = rss["peak"] = rss_kib(pid)
        readers = children(pid)  # the log's tail, started for the first follower
        cpu = cpu_seconds(pid), sum(map(cpu_seconds, readers))
        started.append(pinger := start(paced_pings, port, seconds))
        started.append(writer := start(append_lines, log, FOLLOW_RATE, lines))
        while writer[0].is_alive():
            rss["peak"] = max(rss["peak"], rss_kib(pid))
            time.sleep(0.25)
        written = finish(*writer, 10)
        stop_at.value = time.monotonic() + DRAIN_LIMIT
        got = []
        for proc, out in clients:
            got.append(out.get(timeout=DRAIN_LIMIT + 60))
            rss["peak"] = max(rss["peak"], rss_kib(pid))
        cpu = cpu_seconds(pid) - cpu[0], sum(map(cpu_seconds, readers)) - cpu[1]
        pings = finish(*pinger, 60)
    finally:
        stop_at.value = 0.0  # followers still reading stop at their next select
        for proc, _ in started:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    return {cell: _follow_figures(requests, written, got, pings, cpu, rss)}


def _follow_figures(requests: list[bytes], written: tuple, got: list[dict], pings: list[float],
                    cpu: tuple[float, float], rss: dict) -> dict:
    """The figures of a follow cell from what its processes measured."""
    count = len(requests)
    lines, first, last = written
    delays = sum((g["delays"] for g in got), Counter())
    delivered = sum(delays.values())
    return {
        "followers": count, "patterns": len({r for r in requests if r != PLAIN_FOLLOW}),
        "lines": lines, "write_rate": lines / max(last - first, 1e-9), "delivered": delivered,
        "incomplete": count - sum(g["complete"] for g in got), "drops": sum(g["drops"] for g in got),
        "delivery_p50_ms": binned_percentile(delays, 0.5) * 1000,
        "delivery_p99_ms": binned_percentile(delays, 0.99) * 1000,
        "delivery_max_ms": binned_percentile(delays, 1.0) * 1000,
        "drain_s": max(g["done_at"] for g in got) - last,
        "ping_p99_ms": percentile(pings, 0.99) * 1000,
        "cpu_s": cpu[0], "tail_cpu_s": cpu[1],
        "cpu_us_per_line": cpu[0] / max(delivered, 1) * 1e6,
        "cpu_us_per_line_read": cpu[0] / max(lines, 1) * 1e6,
        "client_cpu_s": sum(g["cpu_s"] for g in got),
        "rss_parked_kib": (rss["parked"] - rss["before"]) / count,
        "rss_peak_kib": (rss["peak"] - rss["before"]) / count}


# --- report ------------------------------------------------------------------------------

#: (figure, label, format) of the follow section, in order
FOLLOW_ROWS = [
    ("incomplete", "followers that missed a line or got one out of order", "{:.0f}"),
    ("drops", "'lines dropped' notices received", "{:.0f}"),
    ("write_rate", "lines written a second", "{:.0f}"),
    ("delivered", "lines delivered, all followers", "{:.0f}"),
    ("delivery_p50_ms", "delivery p50 (write to receipt)", "{:.1f} ms"),
    ("delivery_p99_ms", "delivery p99", "{:.1f} ms"),
    ("delivery_max_ms", "delivery max", "{:.1f} ms"),
    ("drain_s", "last line received, after the last write", "{:.2f} s"),
    ("ping_p99_ms", "ping p99 from another client", "{:.2f} ms"),
    ("cpu_s", "server CPU, first write to last receipt", "{:.2f} s"),
    ("cpu_us_per_line_read", "server CPU per line read (written to the log)", "{:.2f} us"),
    ("cpu_us_per_line", "server CPU per line delivered", "{:.2f} us"),
    ("tail_cpu_s", "CPU of the log's tail process", "{:.2f} s"),
    ("rss_parked_kib", "server RSS per follower, parked", "{:.2f} KiB"),
    ("rss_peak_kib", "server RSS per follower, peak of the stream", "{:.2f} KiB"),
    ("client_cpu_s", "CPU of the follower processes", "{:.2f} s"),
]


def is_follow(figures: dict) -> bool:
    """Whether ``figures`` are those of a follow cell (follow_cell), which has a section of its own."""
    return "followers" in figures


def _followers_text(cell: dict) -> str:
    followers, patterns = cell["followers"], cell["patterns"]
    if not patterns:
        return f"{followers:.0f} followers"
    if patterns == followers:
        return f"{followers:.0f} followers, each with a pattern of its own"
    return f"{followers:.0f} followers sharing {patterns:.0f} patterns ({followers / patterns:.0f} each)"


def report_follow(results: dict, rounds: dict) -> None:
    """Print each follow cell of each server that has one: medians, and the range of the rounds."""
    for name, cells in results.items():
        for cell_name, cell in cells.items():
            if is_follow(cell):
                _report_follow_cell(name, cell_name, cell,
                                    [r[cell_name] for r in rounds.get(name, ()) if cell_name in r])


def _report_follow_cell(name: str, cell_name: str, cell: dict, each: list[dict]) -> None:
    print(f"\n{cell_name} ({name} only: the peers have no follow): {_followers_text(cell)}, "
          f"{cell['lines']:.0f} lines at {FOLLOW_RATE:,}/s"
          + (f"; medians of {len(each)} rounds [lowest-highest]" if len(each) > 1 else ""))
    for key, label, fmt in FOLLOW_ROWS:
        text = fmt.format(cell[key])
        if len(each) > 1:
            text += f" [{fmt.format(min(c[key] for c in each))}-{fmt.format(max(c[key] for c in each))}]"
        print(f"  {label:<54}{text:>30}")
