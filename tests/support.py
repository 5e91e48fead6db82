"""Test support: a line client with deadlines, and a real gcmd process.

Tests of the in-process server (port 0) talk through gevent sockets, so the
client and the server share the hub; tests of the real CLI use plain sockets.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
from gevent.threadpool import ThreadPool

from gcmd.commands import Commands
from gcmd.config import Config
from gcmd.hashing import HashService
from gcmd.logs.memory import MemoryLog
from gcmd.logs.sources import Logs, log_sources
from gcmd.observe.stats import ServerStats

# the replies of PROTOCOL.md, byte for byte, defined once for every test
PONG = b"pong\n"
NOT_FOUND = b"Command not found.\n"
ERROR = b"An error occured : "
OUTSIDE = b"An error occured : Permission denied: path is outside the served root\n"
NEED_PATH = b"Please provide a path.\n"
LASTLOG_USAGE = b"Usage: lastlog [LINES] [LOGS] [grep PATTERN]\n"
FOLLOW_USAGE = b"Usage: follow [LINES] [LOGS] [from CURSORS] [grep PATTERN]\n"
BEGIN_FOLLOW = b"Begin follow\n"
END_FOLLOW = b"End follow\n"
HASH_USAGE = b"Usage: hash ALGO PATH\n"
TOO_MANY = b"Too many connections. bye !\n"
TOO_MANY_FROM_ADDRESS = b"Too many connections from your address. bye !\n"
LINE_TOO_LONG = b"Line too long. bye !\n"
IDLE_TIMEOUT = b"Idle timeout. bye !\n"
SHUTTING_DOWN = b"Server shutting down. bye !\n"
AUTH_REQUIRED = b"Authentication required.\n"
AUTH_OK = b"Authenticated.\n"
AUTH_FAILED = b"Authentication failed. bye !\n"
AUTH_DISABLED = b"Authentication is not enabled.\n"

LOG_LINES = [f"Nov 24 10:{i // 60:02d}:{i % 60:02d} lab app[{i}]: line {i}" for i in range(60)]


class Client:
    """A line client with a deadline on every read."""

    def __init__(self, port: int, timeout: float = 10.0, *, sock=None, socket_module=socket,
                 host: str = "127.0.0.1") -> None:
        self.sock = sock or socket_module.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by server; unread: {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def ask(self, request: bytes | str) -> bytes:
        if isinstance(request, str):
            request = request.encode()
        self.send(request if request.endswith(b"\n") else request + b"\n")
        return self.line()

    def block(self, end: bytes) -> list[bytes]:
        lines = []
        while True:
            lines.append(self.line())
            if lines[-1] == end:
                return lines

    def closed(self) -> bool:
        """True when the server closes the connection (after any unread bytes)."""
        try:
            while chunk := self.sock.recv(65536):
                self.buf += chunk
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def reset(self) -> None:
        """Close abruptly: the server sees a connection reset."""
        import struct
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def make_certificate(directory: Path, name: str = "server", cn: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate and its key, made with openssl (Debian: openssl)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=20)
    return cert, key


def tls_client(port: int, cert: Path, **wrap) -> Client:
    """A line client over TLS that trusts ``cert``."""
    import ssl

    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return Client(port, sock=context.wrap_socket(raw, server_hostname="localhost", **wrap))


def ipv6_loopback() -> bool:
    """Whether this machine has the IPv6 loopback address ::1."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(predicate, timeout: float = 5.0, message: str = ""):
    """Wait cooperatively (an in-process server runs in this thread) until
    ``predicate`` returns something true; fail after ``timeout``."""
    with gevent.Timeout(timeout, AssertionError(message or f"condition not met in {timeout} s")):
        while not (value := predicate()):
            gevent.sleep(0.01)
    return value


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02, message: str = ""):
    """Poll ``predicate`` until it returns something true, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met in {timeout} s")
        time.sleep(interval)


def sha1_of(path: Path, algorithm: str = "sha1") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_file(path: Path, size: int, seed: bytes = b"gcmd") -> Path:
    block = hashlib.sha256(seed).digest() * 32768  # 1 MiB
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)
    return path


class GcmdProcess:
    """``python -m gcmd`` on a free loopback port, with a root and a log in ``tmp_path``."""

    def __init__(self, tmp_path: Path, *extra, logfile: Path | None = None, root: Path | None = None,
                 host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port()  # a port given: a restart on the same port
        self.root = root or tmp_path / "root"
        self.root.mkdir(exist_ok=True)
        self.outside = tmp_path / "outside"
        self.outside.mkdir(exist_ok=True)
        self.logfile = logfile or tmp_path / "syslog"
        if logfile is None:
            self.logfile.write_text("\n".join(LOG_LINES) + "\n")
        self.stdout = tmp_path / f"gcmd-{self.port}.out"
        self.cmd = [sys.executable, "-m", "gcmd", "--host", host, "--port", str(self.port),
                    "--root", str(self.root), "--logfile", str(self.logfile), *map(str, extra)]
        self.out = open(self.stdout, "wb")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(self.cmd, stdout=self.out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=tmp_path)
        try:
            wait_for(self._listening, timeout=15, message="gcmd did not listen")
        except BaseException:
            self.stop()
            raise

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.cmd} exited {self.proc.returncode}: {self.log()}")
        if "--quiet" not in self.cmd:
            return "listening on" in self.log()
        try:  # nothing is logged at start-up: probe the port
            with socket.create_connection((self.host, self.port), timeout=1) as probe:
                probe.sendall(b"exit\n")
            return True
        except OSError:
            return False

    def client(self, timeout: float = 10.0) -> Client:
        return Client(self.port, timeout, host=self.host)

    def log(self) -> str:
        if not self.out.closed:
            self.out.flush()
        return self.stdout.read_text(errors="replace")

    def children(self) -> list[int]:
        """Process ids of the server's live children."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


# --- the commands without a socket (the ``commands`` fixture); here, not in conftest.py,
# so that tests import them by a name no other conftest.py (../shared/conformance) shares


class PlainSession:
    """What a command sees of a session, without a socket."""

    def __init__(self) -> None:
        self.ip = "127.0.0.1"
        self.context = {"context": "Session,0,127.0.0.1"}
        self.authenticated = False
        self.client_cn = None
        self.user = None
        self.following = None

    def start_following(self, log) -> None:
        self.following = log


class CommandTable:
    """The commands over real services (files, tail, threads), with no server or socket."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pool = ThreadPool(2)
        self.hashing = HashService(config.root, 2, config.max_pending, config.hash_cache, self.pool)
        self.logs = Logs(log_sources(list(config.logfiles)), MemoryLog(), self.pool,
                         config.command_timeout)
        self.commands = Commands(config, self.hashing, self.logs, ServerStats())
        self.session = PlainSession()

    def ask(self, request: bytes | str) -> bytes | None:
        """The reply to one request line (without its newline); None for a blank line."""
        parsed = self.commands.parse(request.encode() if isinstance(request, str) else request)
        if parsed is None:
            return None
        handler, arg = parsed
        run = self.commands.run_slow if handler.slow else self.commands.run
        return run(handler, self.session, arg)

    def close(self) -> None:
        self.logs.close()
        self.hashing.close()
        self.pool.kill()
