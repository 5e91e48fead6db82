"""Prometheus metrics: /metrics over HTTP, agreeing with stats."""

import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import gevent.socket
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import free_port, wait_for, write_file

from gcmd import __version__ as gcmd_version
from gcmd.observe.metrics import (
    IDLE_LIMIT,
    MAX_CONNECTIONS,
    REQUEST_DEADLINE,
    MetricsServer,
)

pytestmark = pytest.mark.timeout(30)


def get(port: int, path: str, socket_module=gevent.socket) -> tuple[bytes, bytes]:
    """GET ``path`` over HTTP/1.0: (status line, body)."""
    with socket_module.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


def scrape(port: int, socket_module=gevent.socket) -> dict[tuple, float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    status, body = get(port, "/metrics", socket_module)
    assert status.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), status
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples}


def stats_of(client) -> dict[str, int]:
    client.send("stats\n")
    return {key: int(value) for key, value in
            (line.decode().split() for line in client.block(b"End stats\n")[1:-1])}


def test_metrics_agree_with_stats(make_server, connect, tmp_path):
    server = make_server(max_clients=2)
    metrics = MetricsServer(server, "127.0.0.1", 0)
    metrics.start()
    try:
        write_file(tmp_path / "root" / "one.bin", 300_000)
        c = connect(server)
        other = connect(server)
        assert other.ask("ping") == b"pong\n"
        for request in ("ping", "ping", "comphash one.bin", "comphash one.bin", "comphash nothing",
                        "frobnicate"):
            c.ask(request)
        c.send("lastlog 2\n")
        c.block(b"End lastlog\n")
        refused = connect(server)
        assert refused.line() == b"Too many connections. bye !\n"
        stats = stats_of(c)
        samples = scrape(metrics.port)
    finally:
        metrics.stop()

    def value(name, **labels):
        return samples[name, tuple(sorted(labels.items()))]

    assert value("gcmd_clients") == stats["clients"] == 2
    assert value("gcmd_connections_total") == stats["connections"] == 3
    assert value("gcmd_connections_refused_total", reason="max_clients") == stats["rejected"] == 1
    assert value("gcmd_commands_total", command="ping", outcome="ok") == 3
    assert value("gcmd_commands_total", command="comphash", outcome="ok") == 2
    assert value("gcmd_commands_total", command="comphash", outcome="error") == 1 == stats["errors"]
    assert value("gcmd_commands_total", command="lastlog", outcome="ok") == 1
    assert value("gcmd_commands_total", command="unknown", outcome="ok") == 1
    # stats counts itself, as its outcome is counted once it has answered
    assert sum(v for (name, _), v in samples.items() if name == "gcmd_commands_total") == stats["commands"]
    # the slow commands are timed
    assert value("gcmd_command_duration_seconds_count", command="comphash") == 3
    assert value("gcmd_command_duration_seconds_bucket", command="comphash", le="+Inf") == 3
    assert value("gcmd_command_duration_seconds_bucket", command="lastlog", le="10.0") == 1
    assert value("gcmd_command_duration_seconds_sum", command="comphash") > 0
    assert ("gcmd_command_duration_seconds_count", (("command", "ping"),)) not in samples
    assert value("gcmd_hash_bytes_total") == stats["hash_bytes"] == 300_000
    assert value("gcmd_hash_cache_hits_total") == stats["hash_cache_hits"] == 1
    assert value("gcmd_log_followers", log="syslog") == stats["log.syslog.followers"] == 0
    assert value("gcmd_log_reader_restarts_total", log="syslog") == stats["log.syslog.reader_restarts"]
    assert value("gcmd_log_lines_read_total", log="gcmd") == stats["log.gcmd.lines_read"]
    assert value("process_open_fds") > 0


def test_every_counter_is_there_from_the_start_at_0(make_server):
    server = make_server()
    metrics = MetricsServer(server, "127.0.0.1", 0)
    metrics.start()
    try:
        samples = scrape(metrics.port)
    finally:
        metrics.stop()
    for reason in ("max_clients", "max_per_ip", "not_allowed", "proxy_header", "shutting_down",
                   "tls_handshake"):
        assert samples["gcmd_connections_refused_total", (("reason", reason),)] == 0, reason
    for command in ("lastlog", "follow", "logs", "comphash", "hash", "ping", "help", "stats", "auth",
                    "exit", "unknown"):
        for outcome in ("ok", "error", "internal_error", "denied", "cancelled"):
            assert samples["gcmd_commands_total", (("command", command), ("outcome", outcome))] == 0
    for command in ("lastlog", "follow", "comphash", "hash"):
        assert samples["gcmd_command_duration_seconds_count", (("command", command),)] == 0
        assert samples["gcmd_command_duration_seconds_bucket", (("command", command), ("le", "+Inf"))] == 0
    assert ("gcmd_command_duration_seconds_count", (("command", "ping"),)) not in samples
    for name in ("gcmd_connections_total", "gcmd_auth_failures_total", "gcmd_hash_runs_total"):
        assert samples[name, ()] == 0, name
    assert samples["gcmd_log_reader_restarts_total", (("log", "gcmd"),)] == 0


def test_command_outcomes_with_a_token(make_server, connect):
    server = make_server(token=b"s3cret")
    metrics = MetricsServer(server, "127.0.0.1", 0)
    metrics.start()
    try:
        c = connect(server)
        assert c.ask("ping") == b"Authentication required.\n"
        assert c.ask("auth s3cret") == b"Authenticated.\n"
        samples = scrape(metrics.port)
    finally:
        metrics.stop()
    assert samples["gcmd_commands_total", (("command", "ping"), ("outcome", "denied"))] == 1
    assert samples["gcmd_commands_total", (("command", "auth"), ("outcome", "ok"))] == 1


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/", "/metrics/x", "/favicon.ico", "/stats"])
def test_other_paths_answer_404(make_server, path):
    metrics = MetricsServer(make_server(), "127.0.0.1", 0)
    metrics.start()
    try:
        status, body = get(metrics.port, path)
        assert get(metrics.port, "/metrics?name[]=gcmd_clients")[0].endswith(b" 200 OK")
    finally:
        metrics.stop()
    assert status.split(b" ", 1)[1] == b"404 Not Found"
    assert body == b"Not found: the metrics are at /metrics\n"


def test_real_server_serves_metrics_on_its_port(gcmd):
    port = free_port()
    server = gcmd("--metrics-port", port)
    wait_for(lambda: f"metrics at http://127.0.0.1:{port}/metrics" in server.log())
    assert server.client().ask("ping") == b"pong\n"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'gcmd_commands_total{command="ping",outcome="ok"} 1.0' in text
    assert "# HELP gcmd_clients " in text
    assert f'gcmd_build_info{{version="{gcmd_version}"}} 1.0' in text.splitlines()
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    assert error.value.code == 404


def two_free_ports() -> int:
    """A port P such that P and P + 1 are free."""
    port = free_port()
    while True:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                port = free_port()


def test_each_worker_serves_its_own_figures_on_its_own_port(gcmd):
    port = two_free_ports()
    server = gcmd("--workers", 2, "--metrics-port", port)
    for p in (port, port + 1):
        wait_for(lambda p=p: f"metrics at http://127.0.0.1:{p}/metrics" in server.log())
    # one connection to each worker: the kernel spreads new connections
    by_pid = {}

    def both_workers_reached() -> bool:
        client = server.client()
        pid = stats_of(client)["pid"]
        if pid in by_pid:
            client.close()
        by_pid.setdefault(pid, client)
        return len(by_pid) == 2

    wait_for(both_workers_reached, timeout=15, interval=0)
    for pings, client in zip((3, 8), by_pid.values()):
        for _ in range(pings):
            assert client.ask("ping") == b"pong\n"
    commands = sorted(stats_of(client)["commands"] for client in by_pid.values())
    for client in by_pid.values():
        client.close()
    # each port serves one worker's figures, and every worker has a port
    scraped = []
    for p in (port, port + 1):
        samples = scrape(p, socket)
        assert samples["gcmd_max_clients", ()] == 100
        scraped.append(sum(v for (name, _), v in samples.items() if name == "gcmd_commands_total"))
    assert sorted(scraped) == commands


def test_metrics_port_in_use_exits_1(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "gcmd", "--port", str(free_port()),
                                 "--metrics-port", str(port), "--root", str(tmp_path)],
                                capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1 metrics port {port}: address already in use" in result.stderr
    assert "listening on" not in result.stdout  # the log never said it served
    assert "Shutting down" not in result.stdout and "Server stopped" not in result.stdout


#: gcmd's descriptor limit in the flood tests: a few more than it needs idle
FLOOD_FD_LIMIT = 64


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_half_sent_scrapes_never_take_the_protocol_ports_descriptors(gcmd):
    port = free_port()
    server = gcmd("--metrics-port", port)
    wait_for(lambda: f"metrics at http://127.0.0.1:{port}/metrics" in server.log())
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (FLOOD_FD_LIMIT, FLOOD_FD_LIMIT))
    idle_fds = server.open_fds()
    flood = []
    started = time.monotonic()  # before the first connect: its deadline runs from then at the latest
    try:
        # more half-sent requests than gcmd has descriptors: the ones over the cap
        # wait in the listen queue (the kernel's, not gcmd's descriptors)
        for _ in range(FLOOD_FD_LIMIT + 20):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            flood.append(sock)
        wait_for(lambda: server.open_fds() >= idle_fds + MAX_CONNECTIONS)
        assert server.open_fds() <= idle_fds + MAX_CONNECTIONS
        client = server.client()
        assert client.ask("ping") == b"pong\n"
        assert closed_by_server(flood[0], REQUEST_DEADLINE + 3)
        assert time.monotonic() - started >= REQUEST_DEADLINE
        assert client.ask("ping") == b"pong\n"
        assert server.client().ask("ping") == b"pong\n"
    finally:
        for sock in flood:
            sock.close()
    assert "Too many open files" not in server.log()


def test_idle_keep_alive_scrape_is_closed_after_the_idle_limit(gcmd):
    port = free_port()
    server = gcmd("--metrics-port", port)
    wait_for(lambda: f"metrics at http://127.0.0.1:{port}/metrics" in server.log())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        asked = time.monotonic()  # the idle time runs from the reply: later
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while b"gcmd_build_info{" not in reply:
            reply += sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        assert closed_by_server(sock, IDLE_LIMIT + 3)
        assert time.monotonic() - asked >= IDLE_LIMIT
