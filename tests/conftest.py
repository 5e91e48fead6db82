"""Fixtures: an in-process server on port 0, and real ``gcmd`` processes."""

from __future__ import annotations

import shutil

import gevent.socket
import pytest
from gevent.threadpool import ThreadPool
from support import LOG_LINES, Client, GcmdProcess, make_certificate

from gcmd.commands import Commands
from gcmd.config import Config
from gcmd.hashing import HashService
from gcmd.logs.memory import MemoryLog
from gcmd.logs.sources import Logs, log_sources
from gcmd.net.server import GcmdServer
from gcmd.observe.stats import ServerStats


@pytest.fixture
def make_server(tmp_path):
    """Start in-process servers on port 0; the test's client must use gevent sockets."""
    servers = []
    root = tmp_path / "root"
    root.mkdir()
    logfile = tmp_path / "syslog"
    logfile.write_text("\n".join(LOG_LINES) + "\n")

    def start(**settings) -> GcmdServer:
        settings = {"host": "127.0.0.1", "port": 0, "root": str(root), "logfiles": (str(logfile),),
                    **settings}
        server = GcmdServer(Config(**settings))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture
def server(make_server) -> GcmdServer:
    return make_server()


@pytest.fixture
def connect():
    """Open gevent clients to an in-process server."""
    clients = []

    def open_client(server: GcmdServer, timeout: float = 10.0) -> Client:
        client = Client(server.port, timeout, socket_module=gevent.socket)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


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


@pytest.fixture
def commands(tmp_path):
    """The commands of a server with a root and a log in tmp_path; no socket."""
    root = tmp_path / "root"
    root.mkdir()
    logfile = tmp_path / "syslog"
    logfile.write_text("\n".join(LOG_LINES) + "\n")
    table = CommandTable(Config(host="127.0.0.1", port=0, root=str(root), logfiles=(str(logfile),)))
    yield table
    table.close()


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for localhost and its key (needs openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl (apt-get install openssl)")
    return make_certificate(tmp_path)


@pytest.fixture
def gcmd(tmp_path):
    """Start real ``python -m gcmd`` processes; each is stopped after the test."""
    processes = []

    def start(*extra, **kw) -> GcmdProcess:
        process = GcmdProcess(tmp_path, *extra, **kw)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.stop()
