#!/usr/bin/env python3
"""Benchmark what touches the disk and other processes: comphash and lastlog.

    python scripts/bench_hash.py             # full: a 1 GiB file, 3 runs
    python scripts/bench_hash.py --quick     # small files, 1 run: a smoke test, no targets

Prints each figure beside its baseline measured in the same run, and, for a
full run, exits 1 when a target is missed (a --quick run checks none: its
small files and short loads are too noisy to judge):

1. comphash of a 1 GiB file in the page cache takes at most 1.1x the time of
   `openssl dgst -sha1` (median of 3, alternating), and the server's peak
   memory (VmHWM) grows by less than 16 MiB;
2. while 4 clients hash 256 MiB files in a loop, ping p99 stays under 2 ms
   (the unloaded p99 beside it);
3. while 10 clients run lastlog in a loop, ping p99 stays under 10 ms, with a
   static log and with a log appended to all the time (each lastlog reads the
   file's end in a thread: the hub must stay free meanwhile);
4. lastlog requests per second at 10 clients: at least the Twisted peer's.

gcmd runs with --hash-cache 0, so that every comphash really reads the file.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
TWISTED = HERE.parent / "shared" / "peers" / "twisted_seed.py"
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_file(path: Path, size: int) -> Path:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        f.writelines(block for _ in range(size // MiB))
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # into the page cache
    return path


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Line:
    """A blocking line client."""

    def __init__(self, port: int, timeout: float = 120) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def ask(self, request: bytes, end: bytes = b"\n") -> bytes:
        self.sock.sendall(request)
        while end not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed by the server")
            self.buf += chunk
        reply, _, self.buf = self.buf.partition(end)
        return reply + end

    def close(self) -> None:
        self.sock.close()


class Process:
    def __init__(self, cmd: list[str], port: int, workdir: Path, name: str) -> None:
        self.out = open(workdir / f"{name}.out", "wb")  # noqa: SIM115 - open while it runs
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=workdir)
        self.port = port
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited {self.proc.returncode}")
            try:
                if Line(port, 2).ask(b"ping\n") == b"pong\n":
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not answer ping in 20 s") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


def gcmd(workdir: Path, logfile: Path) -> Process:
    port = free_port()
    return Process([sys.executable, "-m", "gcmd", "--quiet", "--hash-cache", "0", "--port", str(port),
                    "--root", str(workdir / "root"), "--logfile", str(logfile)], port, workdir, "gcmd")


def twisted(workdir: Path, logfile: Path) -> Process:
    port = free_port()
    return Process([sys.executable, str(TWISTED), "--port", str(port), "--root", str(workdir / "root"),
                    "--logfile", str(logfile)], port, workdir, "twisted")


# --- loads, in processes of their own so that the GIL of one does not time another ----

def ping_latencies(port: int, count: int, out: multiprocessing.Queue) -> None:
    client = Line(port)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        client.ask(b"ping\n")
        latencies.append(time.perf_counter() - started)
    out.put(latencies)


def loop_requests(port: int, requests: list[bytes], end: bytes, seconds: float,
                  out: multiprocessing.Queue) -> None:
    """One thread per request: each sends its request in a loop for ``seconds``."""
    counts = [0] * len(requests)
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        client = Line(port)
        while time.monotonic() < stop:
            client.ask(requests[i], end)
            counts[i] += 1
        client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put(sum(counts))


def append_forever(logfile: Path, stop: float) -> None:
    with open(logfile, "a") as f:
        i = 0
        while time.monotonic() < stop:
            f.write(f"Nov 25 10:00:00 lab writer[1]: appended line {i}\n")
            f.flush()
            i += 1
            time.sleep(0.001)


def in_process(target, *args) -> tuple[multiprocessing.Process, multiprocessing.Queue]:
    out: multiprocessing.Queue = multiprocessing.Queue()
    proc = multiprocessing.Process(target=target, args=(*args, out))
    proc.start()
    return proc, out


def p99_ms(latencies: list[float]) -> float:
    latencies = sorted(latencies)
    return latencies[int(0.99 * (len(latencies) - 1))] * 1000


def ping_p99_under(port: int, load, pings: int) -> float:
    """Ping p99 while ``load`` (a started process) runs; waits for the load to end."""
    time.sleep(0.5)  # let the load reach its pace
    pinger, out = in_process(ping_latencies, port, pings)
    latencies = out.get(timeout=300)
    pinger.join()
    return p99_ms(latencies)


# --- the measures ------------------------------------------------------------------------

def hash_speed(workdir: Path, big: Path, runs: int) -> dict:
    server = gcmd(workdir, workdir / "static.log")
    try:
        before = vm_kib(server.proc.pid, "VmHWM")
        client = Line(server.port, timeout=600)
        ours, theirs = [], []
        for _ in range(runs):
            started = time.perf_counter()
            reply = client.ask(f"comphash {big.name}\n".encode())
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            digest = subprocess.run(["openssl", "dgst", "-sha1", str(big)], capture_output=True,
                                    check=True).stdout.split()[-1]
            theirs.append(time.perf_counter() - started)
            assert reply == b"File hash is : " + digest + b"\n", (reply, digest)
        growth = vm_kib(server.proc.pid, "VmHWM") - before
        return {"gcmd_s": statistics.median(ours), "openssl_s": statistics.median(theirs),
                "hwm_growth_mib": growth / 1024}
    finally:
        server.stop()


def responsiveness(workdir: Path, hash_files: list[Path], seconds: float, pings: int) -> dict:
    static, growing = workdir / "static.log", workdir / "growing.log"
    server = gcmd(workdir, static)
    results = {}
    try:
        results["unloaded_p99_ms"] = ping_p99_under(server.port, None, pings)
        load, out = in_process(loop_requests, server.port,
                               [f"comphash {f.name}\n".encode() for f in hash_files], b"\n", seconds)
        results["hashing_p99_ms"] = ping_p99_under(server.port, load, pings)
        results["hashes"] = out.get(timeout=seconds + 300)
        load.join()
    finally:
        server.stop()
    for name, logfile in (("static", static), ("growing", growing)):
        server = gcmd(workdir, logfile)
        writer = None
        try:
            if logfile is growing:
                writer = multiprocessing.Process(target=append_forever,
                                                 args=(logfile, time.monotonic() + seconds + 30))
                writer.start()
            load, out = in_process(loop_requests, server.port, [b"lastlog\n"] * 10,
                                   b"End lastlog\n", seconds)
            results[f"lastlog_{name}_p99_ms"] = ping_p99_under(server.port, load, pings)
            out.get(timeout=seconds + 60)
            load.join()
            results[f"lastlog_{name}_stats"] = stats(server.port, name)
        finally:
            if writer is not None:
                writer.terminate()
                writer.join()
            server.stop()
    return results


def stats(port: int, log: str) -> str:
    """What ``stats`` says of the lastlog load: requests and error lines, and the
    log's reader process (none: lastlog of a file reads it in a thread)."""
    reply = Line(port).ask(b"stats\n", b"End stats\n").decode()
    keep = ("commands", "errors", f"log.{log}.lines_read", f"log.{log}.reader_restarts")
    return ", ".join(line for line in reply.splitlines() if line.split(" ")[0] in keep)


def lastlog_rate(workdir: Path, start, logfile: Path, seconds: float) -> float:
    server = start(workdir, logfile)
    writer = None
    try:
        if logfile.name == "growing.log":
            writer = multiprocessing.Process(target=append_forever,
                                             args=(logfile, time.monotonic() + seconds + 30))
            writer.start()
        load, out = in_process(loop_requests, server.port, [b"lastlog\n"] * 10, b"End lastlog\n", seconds)
        done = out.get(timeout=seconds + 60)
        load.join()
        return done / seconds
    finally:
        if writer is not None:
            writer.terminate()
            writer.join()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="comphash/openssl pairs (default: 3)")
    p.add_argument("--size-mib", type=int, default=1024, help="the big file (default: 1024)")
    p.add_argument("--load-mib", type=int, default=256, help="each of the 4 loop files (default: 256)")
    p.add_argument("--seconds", type=float, default=5, help="length of each load (default: 5)")
    p.add_argument("--pings", type=int, default=3000, help="pings per latency figure (default: 3000)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 64 MiB, 16 MiB files, 1 run, short loads, and no target checked")
    a = p.parse_args(argv)
    if a.quick:
        a.runs, a.size_mib, a.load_mib, a.seconds, a.pings = 1, 64, 16, 2, 500
    have_twisted = subprocess.run([sys.executable, "-c", "import twisted"], capture_output=True,
                                  check=False).returncode == 0
    with tempfile.TemporaryDirectory(prefix="gcmd-bench-hash-") as tmp:
        workdir = Path(tmp)
        root = workdir / "root"
        root.mkdir()
        for name in ("static.log", "growing.log"):
            (workdir / name).write_text("".join(
                f"Nov 25 10:00:{i % 60:02d} lab app[{i}]: line {i} of the log\n" for i in range(5000)))
        big = write_file(root / "big.bin", a.size_mib * MiB)
        loop_files = [write_file(root / f"load{i}.bin", a.load_mib * MiB) for i in range(4)]
        speed = hash_speed(workdir, big, a.runs)
        hub = responsiveness(workdir, loop_files, a.seconds, a.pings)
        rates = {"gcmd": lastlog_rate(workdir, gcmd, workdir / "static.log", a.seconds),
                 "gcmd_growing": lastlog_rate(workdir, gcmd, workdir / "growing.log", a.seconds)}
        if have_twisted:
            rates["twisted"] = lastlog_rate(workdir, twisted, workdir / "static.log", a.seconds)
            rates["twisted_growing"] = lastlog_rate(workdir, twisted, workdir / "growing.log", a.seconds)

    missed = []

    def row(figure: str, value: str, baseline: str, verdict: bool | None) -> None:
        if a.quick:
            verdict = None
        mark = "" if verdict is None else ("PASS" if verdict else "FAIL")
        print(f"{figure:<44}{value:>16}{baseline:>22}  {mark}")
        if verdict is False:
            missed.append(figure)

    print(f"\n{'figure':<44}{'gcmd':>16}{'baseline':>22}")
    ratio = speed["gcmd_s"] / speed["openssl_s"]
    row(f"comphash {a.size_mib} MiB (median of {a.runs})", f"{speed['gcmd_s']:.3f} s",
        f"openssl {speed['openssl_s']:.3f} s", None)
    row("  time / openssl (<= 1.10)", f"{ratio:.2f}x", "", ratio <= 1.10)
    row("  peak RSS growth (< 16 MiB)", f"{speed['hwm_growth_mib']:.1f} MiB", "",
        speed["hwm_growth_mib"] < 16)
    row("ping p99, 4 clients hashing (< 2 ms)", f"{hub['hashing_p99_ms']:.2f} ms",
        f"unloaded {hub['unloaded_p99_ms']:.2f} ms", hub["hashing_p99_ms"] < 2)
    row("ping p99, 10 clients lastlog, static (< 10)", f"{hub['lastlog_static_p99_ms']:.2f} ms",
        f"unloaded {hub['unloaded_p99_ms']:.2f} ms", hub["lastlog_static_p99_ms"] < 10)
    row("ping p99, 10 clients lastlog, growing (< 10)", f"{hub['lastlog_growing_p99_ms']:.2f} ms",
        f"unloaded {hub['unloaded_p99_ms']:.2f} ms", hub["lastlog_growing_p99_ms"] < 10)
    print(f"  static log:  {hub['lastlog_static_stats']}")
    print(f"  growing log: {hub['lastlog_growing_stats']}")
    if have_twisted:
        ratio = rates["gcmd"] / rates["twisted"]
        row("lastlog/s at 10 clients, static (>= 1.0x)", f"{rates['gcmd']:.0f}/s",
            f"twisted {rates['twisted']:.0f}/s", ratio >= 1.0)
        row("  ratio", f"{ratio:.2f}x", "", None)
        row("lastlog/s at 10 clients, growing log", f"{rates['gcmd_growing']:.0f}/s",
            f"twisted {rates['twisted_growing']:.0f}/s", None)
    else:
        row("lastlog/s at 10 clients, static", f"{rates['gcmd']:.0f}/s", "no twisted installed", None)
    if a.quick:
        print("\nquick run: a smoke test, every figure measured; no target checked")
        return 0
    if missed:
        print(f"\n{len(missed)} target(s) missed")
        return 1
    print("\nevery target met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
