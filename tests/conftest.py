"""Fixtures: an in-process server on port 0, and real ``gcmd`` processes."""

from __future__ import annotations

import shutil

import gevent.socket
import pytest
from support import LOG_LINES, Client, CommandTable, GcmdProcess, make_certificate

from gcmd.config import Config
from gcmd.net.server import GcmdServer


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
