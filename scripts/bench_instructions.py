"""Instructions per request, counted by callgrind: ``scripts/bench --instructions``.

On a shared machine the timed cells of scripts/bench move by a fifth from
one round to the next, which hides a change of a few per cent. The number
of instructions a server runs for a request hardly moves: this counts them.

Each server runs under ``valgrind --tool=callgrind`` (Debian package
valgrind), which counts the instructions of its process in user space
(system calls are not counted: compare them with ``strace -c``). The load
is in lockstep: every connection sends its requests, then every reply is
read, so each read of the server holds exactly ``depth`` requests whatever
the timing; in the shape "connect, ping, close", the churn cell's load, each
round opens a connection, sends one ping, reads the pong and closes it: its
count is per connection. A server is measured twice, after a few rounds and
after many; the difference, divided by the requests of the extra rounds, leaves out
start-up and shutdown. Work done once per span of time (the server log's
lines handed over every 5 ms, the sweeper's look every 0.1 s) is shared by
fewer requests under callgrind, some 50 times slower: where it counts (the
rows that log), the figures are upper bounds.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from functools import partial
from pathlib import Path

#: seconds a server under callgrind (about 50 times slower) may take to start, and to stop
START_TIMEOUT, STOP_TIMEOUT = 180, 120


def lockstep(port: int, conns: int, depth: int, rounds: int) -> None:
    """``rounds`` times: each of ``conns`` connections sends ``depth`` pings, then
    all the replies are read."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    request, reply_size = b"ping\n" * depth, len(b"pong\n") * depth
    try:
        for _ in range(rounds):
            for sock in socks:
                sock.sendall(request)
            for sock in socks:
                got = 0
                while got < reply_size:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise RuntimeError("the server closed a connection")
                    got += len(chunk)
    finally:
        for sock in socks:
            sock.close()


def churn(port: int, rounds: int) -> None:
    """``rounds`` times, one after the other: connect, send a ping, read the pong, close."""
    for _ in range(rounds):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            reply = b""
            sock.sendall(b"ping\n")
            while not reply.endswith(b"\n"):
                if not (chunk := sock.recv(64)):
                    raise RuntimeError("the server closed a connection before its reply")
                reply += chunk


def lockstep_shape(conns: int, depth: int, short: int, long: int) -> tuple:
    """The shape of ``conns`` connections sending ``depth`` pings each a round (see SHAPES)."""
    return partial(lockstep, conns=conns, depth=depth), conns * depth, short, long


#: shape -> (its load: load(port, rounds), requests a round (in churn, connections), rounds of the short
#: run, of the long run)
SHAPES = {
    "ping 10 x 1": lockstep_shape(10, 1, 200, 1200),
    "ping 50 x 16": lockstep_shape(50, 16, 20, 120),
    "connect, ping, close": (churn, 1, 100, 600),
}
#: the same with --quick: a smoke test (start-up dominates; the figures are rough)
QUICK_SHAPES = {"ping 10 x 1": lockstep_shape(10, 1, 20, 120)}


def counted(command: list[str], env: dict | None, workdir: Path, port: int, load) -> int:
    """The instructions ``command`` (a server on ``port``) runs, from start to
    exit (SIGTERM once ``load(port)`` is done), as callgrind counts them."""
    out = workdir / f"callgrind.{port}.out"
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
                            env=env, cwd=workdir, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {proc.returncode} under valgrind")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no answer on port {port} in {START_TIMEOUT} s") from None
                time.sleep(0.2)
        load(port)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{command[0]} did not stop within {STOP_TIMEOUT} s of SIGTERM") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            out.unlink()
            return int(line.split()[1])
    raise RuntimeError(f"no total in {out}")


def per_request(command: list[str], env: dict | None, workdir: Path, shape: tuple, free_port) -> float:
    """Instructions per request of ``command`` in ``shape`` (see SHAPES): per connection in churn."""
    load, requests, short, long = shape
    totals = []
    for rounds in (short, long):
        port = free_port()
        totals.append(counted([*command, "--port", str(port)], env, workdir, port, partial(load, rounds=rounds)))
    return (totals[1] - totals[0]) / (requests * (long - short))


def measure(servers: dict, workdir: Path, quick: bool, free_port) -> dict[str, dict[str, float]]:
    """shape -> server name -> instructions per request; ``servers``: name ->
    (command without --port, environment)."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed (apt-get install valgrind)")
    results: dict[str, dict[str, float]] = {}
    for shape_name, shape in (QUICK_SHAPES if quick else SHAPES).items():
        results[shape_name] = {}
        for name, (command, env) in servers.items():
            started = time.monotonic()
            results[shape_name][name] = per_request(command, env, workdir, shape, free_port)
            print(f"{shape_name}: {name} counted in {time.monotonic() - started:.0f} s", flush=True)
    return results


def report(results: dict[str, dict[str, float]], baseline: str) -> str:
    """The table of ``measure``'s results, with the ratio of gcmd to ``baseline`` when measured."""
    names = list(next(iter(results.values())))
    ratio = "gcmd" in names and baseline in names
    lines = ["instructions per request, per connection in churn (callgrind, user space; lockstep load)"
             + ("; the ratio: below 1, gcmd runs fewer" if ratio else ""),
             f"{'shape':22s}" + "".join(f"{name:>14s}" for name in names)
             + (f"{'gcmd/' + baseline:>18s}" if ratio else "")]
    for shape, row in results.items():
        lines.append(f"{shape:22s}" + "".join(f"{row[name]:14.0f}" for name in names)
                     + (f"{row['gcmd'] / row[baseline]:18.3f}" if ratio else ""))
    return "\n".join(lines)
