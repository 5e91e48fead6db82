"""--workers N: processes that share the port, supervised, stopped gracefully."""

import errno
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
from support import PONG, Client, GcmdProcess, wait_for

pytestmark = pytest.mark.timeout(30)


def stats(client: Client) -> dict[str, str]:
    client.send("stats\n")
    lines = client.block(b"End stats\n")[1:-1]
    return dict(line.decode().split() for line in lines)


def served_by(server: GcmdProcess, clients: int) -> set[str]:
    """The worker pids that answered ``clients`` new connections."""
    pids = set()
    for _ in range(clients):
        c = server.client()
        pids.add(stats(c)["pid"])
        c.close()
    return pids


@pytest.mark.parametrize("sharing", [[], ["--reuse-port"]], ids=["one-socket", "reuse-port"])
def test_workers_share_the_port_and_each_serves(gcmd, sharing):
    server = gcmd("--workers", 2, *sharing)
    # announced once every worker serves
    assert server.log().count("serving port") == 2
    workers = {str(pid) for pid in server.children()}
    wait_for(lambda: served_by(server, 20) == workers, timeout=10)
    assert "2 workers" in server.log() and "max 100 clients per worker" in server.log()


def test_no_other_program_can_listen_on_the_port_of_the_workers(gcmd):
    server = gcmd("--workers", 2)
    wait_for(lambda: server.log().count("serving port") == 2)
    with socket.socket() as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError) as error:
            stranger.bind(("127.0.0.1", server.port))
    assert error.value.errno == errno.EADDRINUSE
    assert server.client().ask("ping") == PONG


def test_connections_waiting_for_a_worker_that_dies_are_served_by_another(gcmd):
    server = gcmd("--workers", 2)
    wait_for(lambda: server.log().count("serving port") == 2)
    hung, other = server.children()
    os.kill(hung, signal.SIGSTOP)  # hangs: it accepts nothing from now on
    try:
        clients = [server.client() for _ in range(40)]
        for c in clients:
            c.send("ping\n")
    finally:
        os.kill(hung, signal.SIGKILL)
    assert [c.line() for c in clients] == [PONG] * 40
    assert {stats(c)["pid"] for c in clients} == {str(other)}


def test_a_worker_that_dies_is_replaced(gcmd):
    server = gcmd("--workers", 2)
    first, second = wait_for(lambda: len(server.children()) == 2 and server.children())
    os.kill(first, signal.SIGKILL)
    workers = wait_for(lambda: len(server.children()) == 2 and first not in server.children()
                       and server.children(), timeout=10)
    assert second in workers
    wait_for(lambda: "was killed by SIGKILL; starting another" in server.log())
    wait_for(lambda: len(served_by(server, 20)) == 2, timeout=10)


def test_sigterm_stops_every_worker_gracefully(gcmd):
    server = gcmd("--workers", 2)
    wait_for(lambda: len(server.children()) == 2)
    idle = [server.client() for _ in range(10)]
    for c in idle:
        assert c.ask("ping") == b"pong\n"
    workers = server.children()
    assert server.stop() == 0
    for c in idle:
        assert c.line() == b"Server shutting down. bye !\n" and c.closed()
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    assert "All workers stopped" in server.log()


def test_port_0_is_one_port_for_every_worker(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "gcmd", "--port", "0", "--workers", "2",
                             "--root", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not (found := re.search(r"listening on 127\.0\.0\.1 port (\d+)", proc.stdout.readline())):
            pass
        port = int(found.group(1))
        pids = set()
        wait_for(lambda: len(children(proc.pid)) == 2)

        def both_reached() -> bool:
            c = Client(port)
            pids.add(stats(c)["pid"])
            c.close()
            return len(pids) == 2

        wait_for(both_reached, timeout=10, interval=0)
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
    assert proc.returncode == 0


def children(pid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()


def test_port_in_use_exits_1_even_when_its_holder_shares_ports(tmp_path):
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "gcmd", "--port", str(port), "--workers", "2",
                                 "--root", str(tmp_path)], capture_output=True, text=True,
                                timeout=10, check=False)
    assert result.returncode == 1
    assert f"port {port}: address already in use" in result.stderr


def test_sighup_reaches_every_worker(gcmd, tmp_path):
    token = tmp_path / "token"
    token.write_text("first\n")
    server = gcmd("--workers", 2, "--token-file", token)
    wait_for(lambda: server.log().count("serving port") == 2)
    token.write_text("second\n")
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: server.log().count("re-read the token file") == 2)
    for _ in range(10):
        assert server.client().ask("auth second") == b"Authenticated.\n"


def test_a_worker_that_cannot_start_stops_gcmd(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "gcmd", "--port", "0", "--workers", "2",
                                 "--metrics-port", str(taken), "--root", str(tmp_path)],
                                capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 1
    # worker 1 may find port taken + 1 in use too, and stop gcmd first
    assert re.search(r"metrics port \d+: address already in use", result.stderr)
    assert "could not start; stopping" in result.stdout
    assert "listening on" not in result.stdout


def test_sighup_reopens_the_output_of_the_supervisor_and_every_worker(tmp_path):
    output = tmp_path / "gcmd.log"
    rotated = tmp_path / "gcmd.log.1"
    proc = subprocess.Popen([sys.executable, "-m", "gcmd", "--port", "0", "--workers", "2",
                             "--root", str(tmp_path), "--logfile", os.devnull, "--output", str(output)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: output.exists() and "listening on" in output.read_text())
        output.rename(rotated)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: output.exists() and output.read_text().count("SIGHUP: reopened the log output") == 2)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0 and out == b""
    # the supervisor's own lines after the rotation go to the new file too
    assert "SIGTERM: stopping 2 workers" in output.read_text()
    assert "All workers stopped" in output.read_text()
    assert "SIGHUP" not in rotated.read_text() and "All workers stopped" not in rotated.read_text()


def test_ctrl_c_to_the_process_group_stops_gcmd_and_every_worker(tmp_path):
    out = tmp_path / "gcmd.out"
    with out.open("wb") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "gcmd", "--port", "0", "--workers", "2",
                                 "--root", str(tmp_path), "--logfile", os.devnull],
                                stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: "listening on" in out.read_text(), timeout=15)
            workers = children(proc.pid)
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "All workers stopped" in out.read_text()
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)


def _read_until(fd: int, done, timeout: float = 20.0) -> bytes:
    """What the pipe ``fd`` gives until ``done(data)`` or the deadline."""
    data = b""
    deadline = time.monotonic() + timeout
    while not done(data) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    return data


def test_workers_writing_to_one_pipe_never_mix_their_lines(tmp_path):
    """Both workers' outputs wait on a full pipe with long writes to make; once it
    is read, their lines come out whole (writes of whole lines, at most PIPE_BUF)."""
    proc = subprocess.Popen([sys.executable, "-m", "gcmd", "--port", "0", "--workers", "2",
                             "--root", str(tmp_path), "--logfile", os.devnull],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    fd = proc.stdout.fileno()
    requests = [f"ping {n} {'x' * 200}\n".encode() for n in range(400)]
    try:
        start = _read_until(fd, lambda data: b" workers\n" in data and data.count(b"serving port") == 2)
        port = int(re.search(rb"listening on 127\.0\.0\.1 port (\d+)", start).group(1))
        by_worker: dict[str, list[Client]] = {}
        probes = 0
        while sorted(map(len, by_worker.values())) != [4, 4]:  # 4 clients of each worker
            client = Client(port)
            probes += 1
            pid = stats(client)["pid"]
            if len(by_worker.setdefault(pid, [])) < 4:
                by_worker[pid].append(client)
            else:
                client.close()
        clients = [client for group in by_worker.values() for client in group]
        for client in clients:  # nobody reads the pipe meanwhile: it fills, the writers wait
            client.send(b"".join(requests) + b"stats\n")
        pids = set()
        for client in clients:
            replies = client.block(b"End stats\n")
            assert replies[:400] == [PONG] * 400
            pids |= {line.split()[1] for line in replies if line.startswith(b"pid ")}
        logged = _read_until(fd, lambda data: data.count(b"Cmd received") == probes + 8 * 401)
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
    assert len(pids) == 2  # both workers served, and logged
    whole = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d{4} \[[^]]+\] [^\n]*")
    lines = logged.split(b"\n")[:-1]
    assert [line for line in lines if not whole.fullmatch(line)] == []
    pings = [line for line in lines if b"Cmd received from 127.0.0.1 : ping " in line]
    assert len(pings) == 8 * 400 and all(line.endswith(b" " + b"x" * 200) for line in pings)
