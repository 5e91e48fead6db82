"""The load-test client and runner, against a real gcmd."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.client import GcmdClient, GcmdError

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
    assert client.request("ping") == [b"pong\n"]
    lastlog = client.request("lastlog 3")
    assert lastlog[0] == b"Begin lastlog\n" and lastlog[-1] == b"End lastlog\n" and len(lastlog) == 5
    assert client.request("comphash f.txt")[0].startswith(b"File hash is : ")
    with pytest.raises(GcmdError, match="No such file"):
        client.request("comphash nope")
    client.sock.sendall(b"exit\n")  # the server closes: the next request fails, then reconnects
    with pytest.raises(OSError):
        client.request("ping")
    assert client.request("ping") == [b"pong\n"]
    names = [(e["name"], e["exception"] is None) for e in fire.events]
    assert names == [("ping", True), ("lastlog", True), ("comphash", True), ("comphash", False),
                     ("ping", False), ("ping", True)]
    assert all(e["request_type"] == "gcmd" and e["response_time"] >= 0 for e in fire.events)
    assert fire.events[1]["response_length"] == sum(map(len, lastlog))


def test_client_times_out(gcmd, tmp_path):
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    server = gcmd("--command-timeout", 20, logfile=fifo)
    fire = Recorder()
    client = GcmdClient("127.0.0.1", server.port, timeout=0.5, fire=fire)
    with pytest.raises(TimeoutError):
        client.request("lastlog")
    assert isinstance(fire.events[0]["exception"], TimeoutError)


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["local", "distributed"])
def test_loadtest_script_runs_locust_and_passes(tmp_path, extra):
    result = subprocess.run([sys.executable, str(HERE / "scripts" / "loadtest"), "--users", "5",
                             "--time", "3s", "--results", str(tmp_path / "results"), *extra],
                            capture_output=True, text=True, timeout=55, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "none failed" in result.stdout
    assert (tmp_path / "results" / "report.html").exists()
    assert (tmp_path / "results" / "gcmd_stats.csv").read_text().count("\n") >= 3


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_loadtest_script_fails_when_requests_fail(tmp_path):
    result = subprocess.run([sys.executable, str(HERE / "scripts" / "loadtest"), "--users", "2",
                             "--time", "2s", "--results", str(tmp_path / "results"),
                             "--gcmd-arg=--logfile=/no/such/log"],
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
