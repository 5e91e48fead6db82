#!/usr/bin/env python3
"""Measure whether a failed ``auth USER TOKEN`` takes the same time whether USER exists or not.

    python scripts/bench_auth.py             # 1,000 failed attempts of each kind
    python scripts/bench_auth.py --quick     # 100 of each: a smoke test, no target

Starts a real gcmd with a users table (--config), then, alternating in rounds
of 50 so that drift on a shared machine falls on both alike, opens a
connection and times ``auth alice WRONG`` (a user that exists) and ``auth
nobody WRONG`` (one that does not), from the request's first byte to its
reply line (``Authentication failed. bye !``): connecting is left out. Prints
the total and the median of each, and their ratio; a full run exits 1 when the
ratio of the totals is outside 0.9 to 1.1 (PROTOCOL.md: "the same reply and
timing whether the user exists or not").
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
ROUND = 50
TARGET = (0.9, 1.1)
FAILED = b"Authentication failed. bye !\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gcmd(directory: Path) -> tuple[subprocess.Popen, int]:
    """gcmd on a free port with one user, alice; (its process, its port)."""
    root = directory / "root"
    root.mkdir()
    config = directory / "gcmd.toml"
    digest = hashlib.sha256(b"alice-token").hexdigest()
    config.write_text(f'[[user]]\nname = "alice"\ntoken_sha256 = "{digest}"\nlogs = ["*"]\ncommands = ["*"]\n')
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "gcmd", "--port", str(port), "--root", str(root),
                                "--config", str(config), "--quiet", "--max-clients", "1000"],
                               cwd=HERE, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit("gcmd did not start") from None
            time.sleep(0.05)


def failed_auth(port: int, request: bytes) -> float:
    """Seconds from sending ``request`` to its whole reply, on a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reply = b""
        started = time.perf_counter()
        sock.sendall(request)
        while not reply.endswith(b"\n"):
            chunk = sock.recv(256)
            if not chunk:
                break
            reply += chunk
        elapsed = time.perf_counter() - started
    if reply != FAILED:
        raise SystemExit(f"{request!r} got {reply!r}, not {FAILED!r}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 attempts of each kind, no target")
    args = parser.parse_args(argv)
    attempts = 100 if args.quick else 1000
    kinds = {"existing user": b"auth alice wrong-token\n", "missing user": b"auth nobody wrong-token\n"}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as directory:
        process, port = start_gcmd(Path(directory))
        try:
            for _ in range(attempts // ROUND):
                for kind, request in kinds.items():
                    times[kind].extend(failed_auth(port, request) for _ in range(ROUND))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(20)
    totals = {kind: sum(seconds) for kind, seconds in times.items()}
    for kind, seconds in times.items():
        print(f"{kind:14} {len(seconds)} failed auth: {totals[kind]:.3f} s in all, "
              f"median {statistics.median(seconds) * 1e6:.0f} us")
    ratio = totals["missing user"] / totals["existing user"]
    low, high = TARGET
    verdict = "no target (--quick)" if args.quick else "ok" if low <= ratio <= high else "MISSED"
    print(f"missing / existing: {ratio:.3f} (target {low} to {high}): {verdict}")
    return 0 if args.quick or low <= ratio <= high else 1


if __name__ == "__main__":
    sys.exit(main())
