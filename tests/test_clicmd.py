"""gcmd-cli: its parsing as tables, and real runs against real ``python -m gcmd`` processes."""

import hashlib
import json
import os
import pty
import queue
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from support import LOG_LINES, GcmdProcess, free_port, sha1_of

from gcmd.clicmd import UsageError, hosts_of, parse_query, shown
from gcmd.client import CursorLost, LogLine, Note

pytestmark = pytest.mark.timeout(60)


def cli(*args, stdin: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gcmd.clicmd", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One gcmd for the tests that only read."""
    process = GcmdProcess(tmp_path_factory.mktemp("cli"))
    (process.root / "f.txt").write_bytes(b"gcmd-cli\n")
    yield process
    process.stop()


# --- tables ------------------------------------------------------------------------------

@pytest.mark.parametrize(("arg", "query"), [
    ("", (None, None, None)),
    ("20", (20, None, None)),
    ("auth", (None, "auth", None)),
    ("20 auth,syslog grep sshd", (20, "auth,syslog", "sshd")),
    ("grep Failed password", (None, None, "Failed password")),
    ("5 grep  a  b ", (5, None, "a  b")),
])
def test_a_query_is_lines_logs_and_pattern(arg, query):
    assert parse_query(arg, follow=True) == query


@pytest.mark.parametrize("arg", ["auth 20", "a b", "grep", "auth from f1:auth:1:2:3:4", "1 2 3"])
def test_another_shape_is_a_usage_error(arg):
    with pytest.raises(UsageError):
        parse_query(arg, follow=True)


@pytest.mark.parametrize(("item", "text"), [
    (LogLine("a", b"plain \\ text\ttab"), "plain \\ text\ttab"),
    (LogLine("a", b"\x1b[31mred\x7f\xc2\x9b"), "\\x1b[31mred\\x7f\\x9b"),
    (LogLine("a", b"bad \xff byte \xc3\xa9t\xc3\xa9"), "bad \\xff byte \xe9t\xe9"),
    (LogLine("a", b"x" * 10, cut=5), "xxxxxxxxxx [+5 bytes]"),
    (Note("dropped", lines=2), "== 2 lines dropped =="),
    (CursorLost("cursor_lost", "auth"), "== cursor lost: auth =="),
])
def test_a_line_is_shown_escaped_as_the_text_format_sends_it(item, text):
    assert shown(item) == text


@pytest.mark.parametrize(("spec", "targets"), [
    ("web[01-03],db1", [("db1", "db1", 9999), ("web01", "web01", 9999), ("web02", "web02", 9999),
                        ("web03", "web03", 9999)]),
    ("db1:7000", [("db1:7000", "db1", 7000)]),
    ("127.0.0.1:4001,127.0.0.1:4002", [("127.0.0.1:4001", "127.0.0.1", 4001),
                                      ("127.0.0.1:4002", "127.0.0.1", 4002)]),
    ("a  b\nc", [("a", "a", 9999), ("b", "b", 9999), ("c", "c", 9999)]),
])
def test_hosts_are_folded_as_pdsh_and_clush_fold_them(spec, targets):
    assert sorted(hosts_of(spec, 9999)) == targets


def test_a_hosts_file_holds_hosts_and_comments(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# the web tier\nweb[1-2]  # two\n\ndb1:7000\n")
    assert sorted(hosts_of(str(path), 9999)) == [("db1:7000", "db1", 7000), ("web1", "web1", 9999),
                                                ("web2", "web2", 9999)]


@pytest.mark.parametrize("spec", ["web[01-", "host:99999", "", "::1"])
def test_a_bad_host_list_is_a_usage_error(spec):
    with pytest.raises(UsageError):
        hosts_of(spec, 9999)


# --- one box -----------------------------------------------------------------------------

def test_a_command_prints_its_lines_without_the_block_markers(server):
    port = server.port
    assert (cli("-p", port, "ping").returncode, cli("-p", port, "ping").stdout) == (0, "pong\n")
    assert cli("-p", port, "lastlog", 2).stdout == "".join(f"{line}\n" for line in LOG_LINES[-2:])
    assert cli("-p", port, "logs").stdout == f"syslog {server.logfile}\ngcmd memory\n"
    assert cli("-p", port, "comphash", "f.txt").stdout == sha1_of(server.root / "f.txt") + "\n"
    assert cli("-p", port, "hash", "sha256", "f.txt").stdout == sha1_of(server.root / "f.txt", "sha256") + "\n"
    assert "whoami - the user this connection is, or anonymous\n" in cli("-p", port, "help").stdout
    assert cli("-p", port, "whoami").stdout == "anonymous\n"
    stats = dict(line.split(" ", 1) for line in cli("-p", port, "stats").stdout.splitlines())
    assert {"uptime_s", "clients", "commands"} <= stats.keys()


def test_json_prints_the_json_lines(server):
    done = cli("-p", server.port, "--json", "lastlog", 1, "syslog")
    line = json.loads(done.stdout)
    assert (line["log"], line["line"]) == ("syslog", LOG_LINES[-1]) and line["cursor"]


@pytest.mark.parametrize(("args", "status", "says"), [
    (["ping"], 0, ""),
    (["comphash", "nope"], 1, "An error occured : [Errno 2] No such file or directory: 'nope'"),
    (["lastlog", "nosuch"], 1, "unknown log 'nosuch'"),
    (["bogus"], 1, "Command not found."),
    (["lastlog", "1", "a", "b"], 2, "usage: lastlog"),
    (["follow", "auth", "from", "f1:x"], 2, "resumes by itself"),
    (["auth", "x"], 2, "--user and --token-file"),
    (["--timeout", "0", "ping"], 2, "--timeout"),
    (["--user", "ops", "ping"], 2, "--user needs --token-file"),
    (["--token-file", "/nonexistent", "ping"], 2, "--token-file /nonexistent"),
])
def test_exit_status_says_how_the_command_went(server, args, status, says):
    done = cli("-p", server.port, *args)
    assert done.returncode == status, done.stderr
    assert says in done.stderr


def test_a_server_that_cannot_be_reached_is_status_3():
    done = cli("-p", free_port(), "ping")
    assert done.returncode == 3
    assert "refused" in done.stderr


def test_without_a_command_the_prompt_runs_a_command_a_line(server):
    done = cli("-p", server.port, stdin="ping\n\nlastlog 1\nbogus\nauth x\nexit\nping\n")
    assert done.returncode == 0
    assert done.stdout == f"pong\n{LOG_LINES[-1]}\n"
    assert done.stderr.splitlines() == [f"(error) 127.0.0.1:{server.port}: Command not found.",
                                        "(error) auth: give --user and --token-file"]


def read_until(fd: int, wanted: bytes, timeout: float = 10) -> bytes:
    """What a terminal's ``fd`` shows until ``wanted`` appears; AssertionError after ``timeout`` seconds."""
    shown = b""
    deadline = time.monotonic() + timeout
    while wanted not in shown:
        left = deadline - time.monotonic()
        assert left > 0, f"{wanted!r} not shown: {shown!r}"
        if select.select([fd], [], [], left)[0]:
            shown += os.read(fd, 4096)
    return shown


def test_at_a_terminal_the_prompt_names_the_server_and_keeps_a_history(server, tmp_path):
    pytest.importorskip("readline", reason="needs a Python built with readline")
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "gcmd.clicmd", "-p", str(server.port)], stdin=terminal,
                               stdout=terminal, stderr=terminal, env={**os.environ, "HOME": str(tmp_path)})
    os.close(terminal)
    try:
        read_until(controller, f"127.0.0.1:{server.port}> ".encode())
        os.write(controller, b"ping\r")
        read_until(controller, b"pong")
        os.write(controller, b"exit\r")
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    assert (tmp_path / ".gcmd_cli_history").read_text().splitlines()[-2:] == ["ping", "exit"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl (apt-get install openssl)")
def test_tls_and_a_user_from_the_command_line(gcmd, tmp_path):
    from test_tls_clients import Pki, tls_args

    pki = Pki(tmp_path / "pki")
    config = tmp_path / "gcmd.toml"
    digest = hashlib.sha256(b"ops-c2a9f0e1").hexdigest()
    config.write_text(f'[[user]]\nname = "ops"\ntoken_sha256 = "{digest}"\nlogs = ["*"]\ncommands = ["*"]\n'
                      '[[user]]\nname = "alice"\ncn = "alice"\nlogs = ["syslog"]\ncommands = ["lastlog"]\n')
    server = gcmd(*tls_args(pki, "--config", config, client_ca=pki.ca[0]))
    (tmp_path / "ops.token").write_text("ops-c2a9f0e1\n")
    ca = pki.server[0]
    bob = ["--cert", pki.bob[0], "--key", pki.bob[1]]  # the server asks for a certificate; bob is no user
    done = cli("-p", server.port, "--ca", ca, *bob, "--user", "ops", "--token-file", tmp_path / "ops.token",
               "whoami")
    assert (done.returncode, done.stdout) == (0, "ops\n"), done.stderr
    done = cli("-p", server.port, "--ca", ca, "--cert", pki.alice[0], "--key", pki.alice[1], "lastlog", 1)
    assert (done.returncode, done.stdout) == (0, f"{LOG_LINES[-1]}\n"), done.stderr
    done = cli("-p", server.port, "--tls", "ping")  # the system's CAs do not know this server
    assert done.returncode == 3 and "TLS" in done.stderr
    done = cli("-p", server.port, "--ca", ca, *bob, "ping")
    assert done.returncode == 1 and "Authentication required." in done.stderr


#: ``python -m gcmd.clicmd`` with Ctrl-C (SIGINT) as a terminal's shell gives it: a test
#: run started in the background by a shell without job control inherits SIGINT
#: ignored, and Python keeps it so (the follow would never end)
INTERRUPTIBLE_CLI = [sys.executable, "-c", ("import runpy, signal; signal.signal(signal.SIGINT, "
                     "signal.default_int_handler); runpy.run_module('gcmd.clicmd', run_name='__main__', "
                     "alter_sys=True)")]


class Lines:
    """The lines a process prints, read on a thread, each awaited with a deadline."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.queue.put(line)

    def next(self, timeout: float = 15) -> str:
        return self.queue.get(timeout=timeout)


def append(path, line: str) -> None:
    with open(path, "a") as log:
        log.write(line + "\n")


@pytest.mark.timeout(90)
def test_follow_streams_resumes_across_a_restart_and_ends_on_ctrl_c(gcmd, tmp_path):
    first = gcmd()
    process = subprocess.Popen([*INTERRUPTIBLE_CLI, "-p", str(first.port), "follow", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(process)
        assert lines.next() == f"{LOG_LINES[-1]}\n"
        append(first.logfile, "before the restart")
        assert lines.next() == "before the restart\n"
        first.stop()
        append(first.logfile, "while the server is down")
        gcmd(logfile=first.logfile, port=first.port)
        append(first.logfile, "after the restart")
        assert [lines.next(), lines.next()] == ["while the server is down\n", "after the restart\n"]
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        assert "following again" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- a fleet -----------------------------------------------------------------------------

def test_a_fleet_prefixes_each_line_with_its_host_and_reports_the_hosts_that_failed(gcmd):
    servers = [gcmd(), gcmd()]
    dead = free_port()
    hosts = ",".join(f"127.0.0.1:{port}" for port in [servers[0].port, servers[1].port, dead])
    done = cli("--hosts", hosts, "--timeout", 5, "lastlog", 1)
    assert done.returncode == 1
    assert sorted(done.stdout.splitlines()) == sorted(f"127.0.0.1:{s.port}: {LOG_LINES[-1]}" for s in servers)
    report = done.stderr.splitlines()
    assert report[0].startswith(f"127.0.0.1:{dead}: ") and "refused" in report[0]
    assert report[1] == f"gcmd-cli: 1 of 3 hosts failed: 127.0.0.1:{dead}"
    done = cli("--hosts", hosts.rsplit(",", 1)[0], "--json", "lastlog", 1)
    assert done.returncode == 0
    assert sorted(json.loads(line)["host"] for line in done.stdout.splitlines()) == sorted(
        f"127.0.0.1:{s.port}" for s in servers)


@pytest.mark.timeout(90)
def test_follow_on_a_fleet_merges_the_hosts_streams(gcmd, tmp_path):
    (tmp_path / "app.log").write_text("first\n")
    servers = [gcmd(logfile=tmp_path / "app.log"), gcmd(logfile=tmp_path / "app.log")]  # one log, two servers
    process = subprocess.Popen([*INTERRUPTIBLE_CLI, "--hosts",
                                ",".join(f"127.0.0.1:{s.port}" for s in servers), "follow"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(process)
        seen = set()  # the follows start once the process is up: append until both hosts showed a line
        for attempt in range(100):
            append(tmp_path / "app.log", f"mark {attempt}")
            try:
                while True:
                    seen.add(lines.next(timeout=0.2).split(": ", 1)[0])
            except queue.Empty:
                pass
            if len(seen) == 2:
                break
        assert seen == {f"127.0.0.1:{s.port}" for s in servers}
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_fleet_of_20_with_2_stopped_answers_18_and_reports_2_within_the_timeout(tmp_path):
    def start(index: int) -> GcmdProcess:
        directory = tmp_path / f"s{index}"
        directory.mkdir()
        return GcmdProcess(directory)

    with ThreadPoolExecutor(20) as pool:
        servers = list(pool.map(start, range(20)))
    killed, frozen = servers[3], servers[11]
    try:
        killed.stop()  # its port refuses connections
        frozen.proc.send_signal(signal.SIGSTOP)  # its port accepts, and nothing ever answers
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in servers)
        started = time.monotonic()
        done = cli("--hosts", hosts, "--timeout", 2, "ping")
        took = time.monotonic() - started
        assert done.returncode == 1
        assert sorted(done.stdout.splitlines()) == sorted(
            f"127.0.0.1:{s.port}: pong" for s in servers if s not in (killed, frozen))
        failed = {line.split(": ", 1)[0] for line in done.stderr.splitlines()[:-1]}
        assert failed == {f"127.0.0.1:{killed.port}", f"127.0.0.1:{frozen.port}"}
        assert done.stderr.splitlines()[-1].startswith("gcmd-cli: 2 of 20 hosts failed: ")
        assert took < 2 + 1, took
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(GcmdProcess.stop, servers))

