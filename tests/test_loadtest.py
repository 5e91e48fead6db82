"""The load-test client (gcmd.client reported to locust) and runner, against a real gcmd."""

import importlib.machinery
import importlib.util
import os
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import wait_for, write_file

from gcmd.client import AuthenticationError, GcmdError, Timeout
from loadtest.client import GcmdClient

pytestmark = pytest.mark.timeout(30)
HERE = Path(__file__).resolve().parent.parent


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, **event):
        self.events.append(event)


def test_client_reports_replies_failures_and_reconnects(gcmd):
    server = gcmd()
    (server.root / "f.txt").write_text("x")
    fire = Recorder()
    client = GcmdClient("127.0.0.1", server.port, fire=fire)
    assert client.ping() == "pong"
    lastlog = client.lastlog(3)
    assert len(lastlog) == 3
    assert len(client.comphash("f.txt")) == 40
    with pytest.raises(GcmdError, match="No such file"):
        client.comphash("nope")
    sock = client.client._sock
    sock.sendall(b"exit\n")  # the server closes: the next request reconnects
    wait_for(lambda: select.select([sock], [], [], 0)[0])
    assert client.ping() == "pong"
    names = [(e["name"], e["exception"] is None) for e in fire.events]
    assert names == [("ping", True), ("lastlog", True), ("comphash", True), ("comphash", False),
                     ("ping", True)]
    assert all(e["request_type"] == "gcmd" and e["response_time"] >= 0 for e in fire.events)
    assert fire.events[1]["response_length"] == sum(len(line.data) + 1 for line in lastlog)


def test_client_idle_goodbye_is_no_failure_and_no_reply(gcmd):
    server = gcmd("--idle-timeout", 1)
    fire = Recorder()
    client = GcmdClient("127.0.0.1", server.port, fire=fire)
    assert client.ping() == "pong"
    first = client.client._sock
    wait_for(lambda: first.recv(64, socket.MSG_PEEK) == b"Idle timeout. bye !\n")
    assert client.ping() == "pong"
    assert client.client._sock is not first
    assert [e["exception"] for e in fire.events] == [None, None]


def test_client_refused_by_the_cap_counts_one_failure_then_reconnects(gcmd):
    server = gcmd("--max-clients", 1)
    holder = server.client()
    assert holder.ask("ping") == b"pong\n"
    fire = Recorder()
    client = GcmdClient("127.0.0.1", server.port, fire=fire)
    with pytest.raises(GcmdError):  # the goodbye, or a reset that beat it
        client.ping()
    assert not client.client.connected
    holder.close()
    wait_for(lambda: "Lost client connection" in server.log())
    assert client.ping() == "pong"
    assert [e["exception"] is None for e in fire.events] == [False, True]


def test_client_authenticates_as_it_connects(gcmd, tmp_path):
    (tmp_path / "token").write_text("s3cret\n")
    server = gcmd("--token-file", tmp_path / "token")
    fire = Recorder()
    assert GcmdClient("127.0.0.1", server.port, token="s3cret", fire=fire).stats()["authenticated"] == 1
    with pytest.raises(AuthenticationError):
        GcmdClient("127.0.0.1", server.port, token="wrong", fire=fire).ping()
    assert [(e["name"], e["exception"] is None) for e in fire.events] == [("stats", True), ("ping", False)]


def test_client_times_out(gcmd, tmp_path):
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    server = gcmd("--command-timeout", 20, logfile=fifo)
    fire = Recorder()
    client = GcmdClient("127.0.0.1", server.port, timeout=0.5, fire=fire)
    with pytest.raises(Timeout):
        client.lastlog(10)
    assert isinstance(fire.events[0]["exception"], Timeout)


def locust_aggregated(output: str) -> tuple[int, int]:
    """(requests, failures) of the Aggregated row of locust's own final table."""
    requests, failures = re.search(r"^\s+Aggregated\s+(\d+)\s+(\d+)\(", output, re.MULTILINE).groups()
    return int(requests), int(failures)


def summary_rows(stdout: str) -> dict[str, tuple[int, int]]:
    """The script's summary: {command: (requests, failures)}."""
    table = stdout.split("command ")[1]
    return {name: (int(requests), int(failures)) for name, requests, failures
            in re.findall(r"^(\w+)\s+(\d+)\s+(\d+)\s", table, re.MULTILINE)}


def run_script(*args, cwd=None, timeout: float = 55) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "scripts" / "loadtest"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["local", "distributed"])
def test_loadtest_script_summary_is_locusts_final_figures(tmp_path, extra):
    result = run_script("--users", 5, "--time", "0m3s", "--results", tmp_path / "results", *extra)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "none failed" in result.stdout
    report = (tmp_path / "results" / "report.html").read_text()
    assert (tmp_path / "results" / "gcmd_stats.csv").read_text().count("\n") >= 3
    # the figures of locust's table and HTML report, not those of its last
    # once-a-second CSV write
    rows = summary_rows(result.stdout)
    assert rows["Aggregated"] == locust_aggregated(result.stderr)
    failures, requests = re.search(r'"name": "Aggregated", "num_failures": (\d+), "num_requests": (\d+)',
                                   report).groups()
    assert rows["Aggregated"] == (int(requests), int(failures))
    assert set(rows) == {"comphash", "lastlog", "ping", "stats", "Aggregated"}
    # the log of the gcmd it started outlives the run
    server_log = (tmp_path / "results" / "gcmd-server.log").read_text()
    assert "listening on 127.0.0.1 port" in server_log and "Server stopped" in server_log


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_loadtest_script_steps_stop_on_time_without_locusts_warning(tmp_path):
    started = time.monotonic()
    result = run_script("--step", "2,1", "--time", "3s", "--results", tmp_path / "results")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "will be ignored" not in result.stderr and "no impact on LoadShapes" not in result.stderr
    assert time.monotonic() - started < 3 + 30


@pytest.mark.parametrize("text, seconds", [("10", 10), ("90s", 90), ("2m", 120), ("1h30m", 5400),
                                           ("1h0m5s", 3605), ("0m3s", 3)])
def test_loadtest_time_reads_locusts_syntax(text, seconds):
    loader = importlib.machinery.SourceFileLoader("loadtest_script", str(HERE / "scripts" / "loadtest"))
    script = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(script)
    assert script.run_seconds(text) == seconds


@pytest.mark.parametrize("args, message", [
    (["--time", "2x"], "argument --time: Invalid time span format"),
    (["--time", "1.5m"], "argument --time: Invalid time span format"),
    (["--time", "0"], "argument --time: the run must last at least 1 s"),
    (["--step", "10"], "argument --step: USERS,SECONDS"),
    (["--files", "."], "--files is for --host"),
    (["--host", "127.0.0.1:1", "--files", "no-such-dir"], "no-such-dir is not a directory of files"),
    (["--users", "-5"], "argument --users: must be above 0, not -5"),
    (["--users", "0"], "argument --users: must be above 0, not 0"),
    (["--users", "many"], "argument --users: a whole number above 0, not 'many'"),
    (["--workers", "0"], "argument --workers: must be above 0, not 0"),
    (["--spawn-rate", "0"], "argument --spawn-rate: must be a finite number above 0, not 0"),
    (["--spawn-rate", "inf"], "argument --spawn-rate: must be a finite number above 0, not inf"),
    (["--host", "nonsense"], "argument --host: HOST:PORT, such as 127.0.0.1:9999, not 'nonsense'"),
    (["--host", "127.0.0.1:70000"], "argument --host: HOST:PORT, such as 127.0.0.1:9999, not '127.0.0.1:70000'"),
    (["--host", "127.0.0.1:1", "--gcmd-arg=--quiet"], "--gcmd-arg is for the gcmd started here, not with --host"),
])
def test_loadtest_script_refuses_bad_arguments(tmp_path, args, message):
    result = run_script(*args, "--results", tmp_path / "results", cwd=tmp_path, timeout=20)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("scripts/loadtest: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_loadtest_script_hashes_relative_files_of_a_running_gcmd(gcmd, tmp_path):
    server = gcmd("--max-clients", 1000)
    (server.root / "data").mkdir()
    for i in range(3):
        write_file(server.root / "data" / f"f{i}.bin", 100_000 * (i + 1))
    # a path relative to where the script runs, not to where locust does
    result = run_script("--host", f"127.0.0.1:{server.port}", "--files", "root/data", "--users", 3,
                        "--time", 2, "--results", tmp_path / "results", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = summary_rows(result.stdout)
    assert rows["comphash"][0] > 0 and rows["comphash"][1] == 0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_loadtest_script_without_files_leaves_comphash_out(gcmd, tmp_path):
    server = gcmd("--max-clients", 1000)
    result = run_script("--host", f"127.0.0.1:{server.port}", "--users", 3, "--time", 2,
                        "--results", tmp_path / "results", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == ("no --files: comphash is left out (give --files DIR, "
                                             "served by the server at the same path, to include it)")
    rows = summary_rows(result.stdout)
    assert "comphash" not in rows and rows["ping"][0] > 0
    assert "comphash" not in server.log()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_locustfile_shares_one_file_set_in_the_temp_dir_and_removes_it(gcmd, tmp_path):
    temp, cwd = tmp_path / "temp", tmp_path / "cwd"
    temp.mkdir()
    cwd.mkdir()
    server = gcmd("--max-clients", 1000, root=temp)
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(HERE)}
    locust = subprocess.Popen([sys.executable, "-m", "locust", "-f", str(HERE / "loadtest" / "locustfile.py"),
                               "--headless", "-u", "8", "-r", "100", "-t", "3s", "--only-summary",
                               "--host", f"127.0.0.1:{server.port}"],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = set()
    try:
        while locust.poll() is None:  # every set made while locust runs
            seen |= {path.name for path in temp.glob("gcmd-load-*")}
            time.sleep(0.02)
        output = locust.stdout.read()
    finally:
        locust.kill()
        locust.wait()
    assert locust.returncode == 0, output[-3000:]
    assert len(seen) == 1, seen  # one set for the 8 users
    assert f"comphash hashes the files of {temp / seen.pop()} (no --gcmd-files)" in output
    assert list(temp.glob("gcmd-load-*")) == [] and list(cwd.iterdir()) == []
    assert re.search(r"^gcmd\s+comphash\s+[1-9]\d*\s+0\(", output, re.MULTILINE), output[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_loadtest_script_fails_when_requests_fail(tmp_path):
    # the files it hashes are outside this root: every comphash fails
    result = subprocess.run([sys.executable, str(HERE / "scripts" / "loadtest"), "--users", "2",
                             "--time", "2s", "--results", str(tmp_path / "results"),
                             "--gcmd-arg=--root=/proc"],
                            capture_output=True, text=True, timeout=55, check=False)
    assert result.returncode == 1 and "FAILED" in result.stdout


def test_loadtest_script_without_locust_says_what_to_install(tmp_path):
    # -S: no site-packages, so this Python has no locust
    result = subprocess.run([sys.executable, "-S", str(HERE / "scripts" / "loadtest"), "--time", "1s",
                             "--results", str(tmp_path / "results")],
                            capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["scripts/loadtest needs locust: pip install -e '.[loadtest]'"]
    assert not (tmp_path / "results").exists()
