#!/usr/bin/env python3
"""gcmd-cli and gcmd.client beside their baselines, in one run.

- start to exit: ``gcmd-cli ping`` beside ``nc -N`` (OpenBSD netcat) sending
  ``ping`` and ``python3 -c pass``, the same Python: minimum, median and
  maximum of RUNS runs each. Target: the median of gcmd-cli at most
  START_TARGET_MS above that of ``python3 -c pass``.
- ``lastlog 10`` in a loop on THREADS threads, one connection each, for
  SECONDS seconds: gcmd.client's ``lastlog(10)`` (lines as LogLine objects)
  against the same loop on raw sockets (``format json``, then ``lastlog 10``
  read up to ``End lastlog``, nothing parsed), alternately, ROUNDS rounds
  each. Target: the client at least LOOP_TARGET of the raw loop's rate.

It starts its own gcmd (``python -m gcmd``) on a free loopback port, serving
a log of 2,000 lines. Prints its figures; exits 1 when a target is missed.

    .venv/bin/python scripts/bench_client.py
"""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gcmd.client import Client, GcmdError

RUNS = 20
START_TARGET_MS = 150.0
THREADS = 10
SECONDS = 5.0
ROUNDS = 2
LOOP_TARGET = 0.8


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_gcmd(directory: Path) -> tuple[subprocess.Popen, int]:
    """A gcmd on a free port serving a log of 2,000 lines; waits until it answers."""
    log = directory / "app.log"
    log.write_text("".join(f"Nov 25 10:00:{i % 60:02d} lab app[{i}]: line {i} of the log\n" for i in range(2000)))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gcmd", "--host", "127.0.0.1", "--port", str(port),
                               "--root", str(directory), "--logfile", str(log), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with Client("127.0.0.1", port, timeout=1) as client:
                client.ping()
            return server, port
        except GcmdError:
            pass  # not up yet
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit("gcmd did not start")
        time.sleep(0.05)


def timed_runs(command: list[str], stdin: bytes | None = None) -> list[float]:
    """Wall-clock milliseconds from start to exit of ``command``, RUNS times."""
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        done = subprocess.run(command, input=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              check=False)
        times.append((time.perf_counter() - started) * 1000)
        if done.returncode != 0:
            raise SystemExit(f"{command} exited {done.returncode}: {done.stderr.decode(errors='replace')}")
    return times


def cli_command() -> list[str]:
    """gcmd-cli as installed beside this Python (the console script), else ``-m gcmd.clicmd``."""
    script = Path(sys.executable).parent / "gcmd-cli"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gcmd.clicmd"]


def library_loop(port: int, stop_at: float, counts: list[int], index: int) -> None:
    with Client("127.0.0.1", port) as client:
        done = 0
        while time.monotonic() < stop_at:
            client.lastlog(10)
            done += 1
    counts[index] = done


def raw_loop(port: int, stop_at: float, counts: list[int], index: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"format json\n")
        reply = b""
        while not reply.endswith(b"\n"):
            reply += sock.recv(64)
        done = 0
        while time.monotonic() < stop_at:
            sock.sendall(b"lastlog 10\n")
            reply = sock.recv(65536)
            while not reply.endswith(b"End lastlog\n"):
                reply += sock.recv(65536)
            done += 1
    counts[index] = done


def rate(loop, port: int) -> float:
    """Requests a second of THREADS threads running ``loop`` for SECONDS."""
    counts = [0] * THREADS
    stop_at = time.monotonic() + SECONDS
    threads = [threading.Thread(target=loop, args=(port, stop_at, counts, i)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / SECONDS


def row(name: str, times: list[float]) -> str:
    return f"  {name:<24} {min(times):8.1f} {statistics.median(times):8.1f} {max(times):8.1f}"


def main() -> int:
    missed = []
    with tempfile.TemporaryDirectory(prefix="gcmd-bench-client-") as directory:
        server, port = start_gcmd(Path(directory))
        try:
            print(f"start to exit, {RUNS} runs each (ms)      min   median      max")
            python = timed_runs([sys.executable, "-c", "pass"])
            print(row("python3 -c pass", python))
            if shutil.which("nc"):
                print(row("nc -N (ping)", timed_runs(["nc", "-N", "127.0.0.1", str(port)], b"ping\n")))
            cli = timed_runs([*cli_command(), "-p", str(port), "ping"])
            print(row("gcmd-cli ping", cli))
            above = statistics.median(cli) - statistics.median(python)
            verdict = "ok" if above <= START_TARGET_MS else "MISSED"
            print(f"  gcmd-cli ping median above python3 -c pass: {above:.1f} ms "
                  f"(target <= {START_TARGET_MS:.0f}) {verdict}")
            if above > START_TARGET_MS:
                missed.append("start to exit")

            print(f"lastlog 10, {THREADS} threads, {SECONDS:g} s x {ROUNDS} rounds (requests/s)")
            raw, library = [], []
            for _ in range(ROUNDS):
                raw.append(rate(raw_loop, port))
                library.append(rate(library_loop, port))
            ratio = sum(library) / sum(raw)
            print(f"  raw sockets   {' '.join(f'{r:8.0f}' for r in raw)}")
            print(f"  gcmd.client   {' '.join(f'{r:8.0f}' for r in library)}")
            verdict = "ok" if ratio >= LOOP_TARGET else "MISSED"
            print(f"  gcmd.client / raw sockets: {ratio:.2f} (target >= {LOOP_TARGET}) {verdict}")
            if ratio < LOOP_TARGET:
                missed.append("lastlog loop")
        finally:
            server.terminate()
            server.wait(15)
    if missed:
        print(f"missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
