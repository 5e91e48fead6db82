"""The log query cells of scripts/bench (protocol 1.2: gcmd only, the peers do not speak it).

- ``lastlog grep 64MiB``: ``lastlog 100 big grep RARE`` on a log of 64 MiB
  (write_searched_log) in which one line in RARE_EVERY holds RARE: fewer
  than 100 lines match, so every reply searches the whole file. One
  connection asks, one request at a time, alternating with a run of GNU
  ``grep -c RARE`` over the same file (as bench_hash.py alternates comphash
  and openssl), for a cell's seconds and GREP_RUNS of each at least: the
  median time of a reply, of a grep, and ``grep_ratio``, the first over the
  second. Each reply is checked: every line holding RARE, as many as grep
  counts. ``ping beside grep``: a client that pings once a millisecond
  meanwhile; its pings sent while a lastlog ran (not while grep ran, when
  the server is idle) give the p99.
- ``lastlog 10 json 10c``: ``lastlog 10`` after ``format json`` on each of
  10 connections, right after text ``lastlog 10`` at 10 connections in the
  same round; ``text_share``: the JSON rate over the text rate.
- ``follow grep shared`` and ``follow grep distinct``: the follow cell of
  bench_logs, with ``follow grep PATTERN`` requests. Shared: the cell's
  followers (500) split over the 5 patterns ``VERB session`` (100 followers
  each, a line in 5 matches each); distinct: a tenth as many followers
  (50), each with a pattern of its own, ``\\buserNN\\b`` (a line in 50).
  Each follower is checked against the lines of the writer its pattern
  selects (bench_logs.selected), with its delivery delay, the ping p99 of
  another client, and the server's CPU per line read.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import statistics
import subprocess
import time
from bisect import bisect_right
from collections.abc import Callable
from pathlib import Path

import bench_logs

#: the cells, by name
LASTLOG_GREP = "lastlog grep 64MiB"
PING_BESIDE_GREP = "ping beside grep"
JSON_LASTLOG = "lastlog 10 json 10c"
FOLLOW_GREP_SHARED = "follow grep shared"
FOLLOW_GREP_DISTINCT = "follow grep distinct"
CELLS = (LASTLOG_GREP, PING_BESIDE_GREP, JSON_LASTLOG, FOLLOW_GREP_SHARED, FOLLOW_GREP_DISTINCT)

#: the size of the searched log, in bytes (the window lastlog grep looks back through)
SEARCHED_SIZE = 64 << 20
#: the searched log's file, in the bench's temp dir: gcmd names it ``big``
SEARCHED_FILE = "big.log"
SEARCHED_LOG = "big"
#: the pattern of the lastlog grep cell, and how many lines hold one of it
RARE = b"RARE"
RARE_EVERY = 10_000
#: lines lastlog grep asks for: more than the log holds that match
LASTLOG_GREP_LINES = 100
#: the fewest lastlog requests, and grep runs, of the lastlog grep cell
GREP_RUNS = 5
#: followers of the distinct cell, as a share of those of the shared cell
DISTINCT_SHARE = 10

#: a line of the searched log: varied in every field, so that no search can
#: skip ahead on repeated bytes; RARE is the only upper-case word but GET
_LINE = (b"Nov 25 %02d:%02d:%02d lab app[%d]: GET /items/%d?page=%d from 10.%d.%d.%d "
         b"status %d in %d ms%s\n")


def write_searched_log(path: Path, size: int = SEARCHED_SIZE) -> int:
    """Write the log of the lastlog grep cell at ``path``: at most ``size``
    bytes of whole lines (about 95 bytes each), one in RARE_EVERY holding
    RARE. Returns how many do (67 for 64 MiB). Takes under a second for 64 MiB."""
    written = rare = seq = 0
    with open(path, "wb") as f:
        while written < size:
            chunk = b"".join(
                _LINE % (s // 3600 % 24, s // 60 % 60, s % 60, 1000 + s % 977, s * 7919 % 100_003, s % 13,
                         s % 251, s * 31 % 256, s * 17 % 256, 200 + s % 7 * 50, s * 13 % 997,
                         b" " + RARE + b" event" if s % RARE_EVERY == RARE_EVERY - 1 else b"")
                for s in range(seq, seq + RARE_EVERY))
            seq += RARE_EVERY
            if written + len(chunk) > size:
                chunk = chunk[:chunk.rfind(b"\n", 0, size - written) + 1]
            f.write(chunk)
            written += len(chunk)
            rare += chunk.count(RARE)
            if not chunk:
                break
    return rare


# --- lastlog grep beside grep -c ---------------------------------------------------------

def _lastlog_reply(sock: socket.socket) -> bytes:
    """One lastlog block read from ``sock``, whole; raises RuntimeError for any other reply."""
    reply = b""
    while not reply.endswith(b"\nEnd lastlog\n"):
        if reply.endswith(b"\n") and not reply.startswith(b"Begin lastlog\n"):
            raise RuntimeError(f"lastlog grep answered {reply[:200]!r}")
        chunk = sock.recv(bench_logs.RECV_SIZE)
        if not chunk:
            raise ConnectionError("the server closed the lastlog grep client")
        reply += chunk
    return reply


def _check_grep_reply(reply: bytes, rare: int) -> None:
    lines = reply.split(b"\n")[1:-2]
    expected = min(rare, LASTLOG_GREP_LINES)
    if len(lines) != expected or not all(RARE in line for line in lines):
        raise RuntimeError(f"lastlog grep gave {len(lines)} lines, {sum(RARE in line for line in lines)} "
                           f"of them with {RARE.decode()}; grep -c counts {rare}, so {expected} were due: "
                           f"{reply[:300]!r}")


def _grep_count(path: Path) -> tuple[float, int]:
    """The seconds ``grep -c RARE path`` takes, process start included, and its count."""
    started = time.monotonic()
    done = subprocess.run(["grep", "-c", RARE.decode(), str(path)], capture_output=True, check=True)
    return time.monotonic() - started, int(done.stdout)


def lastlog_grep_cells(port: int, path: Path, seconds: float) -> dict:
    """The cells LASTLOG_GREP and PING_BESIDE_GREP against the server on ``port``
    that serves ``path`` (write_searched_log) as the log SEARCHED_LOG, for
    ``seconds`` and GREP_RUNS requests at least. Raises RuntimeError for a wrong reply."""
    request = b"lastlog %d %s grep %s\n" % (LASTLOG_GREP_LINES, SEARCHED_LOG.encode(), RARE)
    _grep_count(path)  # the file into the page cache, for both
    stop_at = multiprocessing.RawValue("d", float("inf"))
    pinger = bench_logs.start(bench_logs.stamped_pings, port, stop_at)
    lastlogs: list[tuple[float, float]] = []
    greps: list[float] = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stop = time.monotonic() + seconds
            while len(lastlogs) < GREP_RUNS or time.monotonic() < stop:
                started = time.monotonic()
                sock.sendall(request)
                reply = _lastlog_reply(sock)
                lastlogs.append((started, time.monotonic()))
                took, rare = _grep_count(path)
                greps.append(took)
                _check_grep_reply(reply, rare)
        stop_at.value = 0.0
        pings = bench_logs.finish(*pinger, 60)
    finally:
        stop_at.value = 0.0
        pinger[0].join(5)
        if pinger[0].is_alive():
            pinger[0].terminate()
            pinger[0].join()
    # the pings sent while a lastlog ran: while grep runs, the server is idle
    starts = [begin for begin, _ in lastlogs]
    beside = [latency for sent, latency in pings
              if (i := bisect_right(starts, sent) - 1) >= 0 and sent < lastlogs[i][1]]
    lastlog_s = statistics.median(end - begin for begin, end in lastlogs)
    grep_s = statistics.median(greps)
    return {LASTLOG_GREP: {"ms": lastlog_s * 1000, "grep_ms": grep_s * 1000, "grep_ratio": lastlog_s / grep_s},
            PING_BESIDE_GREP: {"p50_ms": bench_logs.percentile(beside, 0.5) * 1000,
                               "p99_ms": bench_logs.percentile(beside, 0.99) * 1000}}


# --- lastlog in JSON beside lastlog in text ----------------------------------------------

def _check_json_lastlog(port: int) -> None:
    """Raise RuntimeError unless ``lastlog 10`` after ``format json`` gives 10 JSON lines."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"format json\nlastlog 10\n")
        reply = b""
        while not reply.endswith(b"\nEnd lastlog\n"):
            chunk = sock.recv(bench_logs.RECV_SIZE)
            if not chunk:
                raise RuntimeError(f"format json, lastlog 10 answered {reply[:300]!r}")
            reply += chunk
    lines = reply.split(b"\n")
    if lines[:2] != [b"OK", b"Begin lastlog"] or len(lines[2:-2]) != 10 or not all(
            "line" in json.loads(line) for line in lines[2:-2]):
        raise RuntimeError(f"format json, lastlog 10 answered {reply[:300]!r}")


def json_lastlog_cell(port: int, load: Callable[[bytes, bytes], tuple[float, list[float]]]) -> dict:
    """The cell JSON_LASTLOG against the server on ``port``: ``load(request,
    prelude)`` runs ``request`` in a loop at 10 connections, each of which sent
    ``prelude`` first, and gives (replies a second, latencies in seconds)."""
    _check_json_lastlog(port)
    text_rps, _ = load(b"lastlog 10\n", b"")
    rps, latencies = load(b"lastlog 10\n", b"format json\n")
    return {JSON_LASTLOG: {"rps": rps, "p50_ms": bench_logs.percentile(latencies, 0.5) * 1000,
                           "p99_ms": bench_logs.percentile(latencies, 0.99) * 1000,
                           "text_rps": text_rps, "text_share": rps / max(text_rps, 0.01)}}


# --- follow grep -------------------------------------------------------------------------

def shared_requests(followers: int) -> list[bytes]:
    """The requests of the shared cell: ``followers`` over the 5 patterns ``VERB session``."""
    verbs = bench_logs.VERBS
    return [b"follow grep %s session\n" % verbs[i % len(verbs)].encode() for i in range(followers)]


def distinct_requests(followers: int) -> list[bytes]:
    """The requests of the distinct cell: a tenth of ``followers`` (50 at most,
    the users of the writer's lines), each with a pattern of its own."""
    return [b"follow grep \\buser%02d\\b\n" % i
            for i in range(min(bench_logs.USERS, followers // DISTINCT_SHARE))]


def follow_grep_cells(pid: int, port: int, log: Path, followers: int, seconds: float) -> dict:
    """The cells FOLLOW_GREP_SHARED (``followers`` sharing 5 patterns) and
    FOLLOW_GREP_DISTINCT (a tenth as many, each its own pattern) against the
    server ``pid`` on ``port``, whose default log is ``log``: bench_logs.follow_cell."""
    cells = bench_logs.follow_cell(pid, port, log, shared_requests(followers), seconds, FOLLOW_GREP_SHARED)
    distinct = distinct_requests(followers)
    if distinct:
        cells.update(bench_logs.follow_cell(pid, port, log, distinct, seconds, FOLLOW_GREP_DISTINCT))
    return cells
