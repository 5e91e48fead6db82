"""follow: many followers, rotation, resets, half-close, parking, shutdown, --workers."""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest
from support import (
    BEGIN_FOLLOW,
    END_FOLLOW,
    PONG,
    SHUTTING_DOWN,
    Client,
    wait_for,
)

pytestmark = pytest.mark.timeout(30)


def append(path, *lines: str) -> None:
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def read_lines(client: Client, until: bytes, timeout: float = 10.0) -> list[bytes]:
    """Lines (without newline) up to and including ``until``."""
    client.sock.settimeout(timeout)
    got = []
    while True:
        got.append(client.line()[:-1])
        if got[-1] == until:
            return got


def stats_of(client: Client) -> dict[str, str]:
    client.send("stats\n")
    return dict(line.decode().split() for line in client.block(b"End stats\n")[1:-1])


class Writer:
    """Appends numbered lines to a log, ``rate`` a second, in a thread, until stopped."""

    def __init__(self, path, rate: float = 500) -> None:
        self.path, self.rate = path, rate
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open(self.path, "a", buffering=1) as f:
            while not self._stop.wait(1 / self.rate):
                f.write(f"n {self.written}\n")
                self.written += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.written


def test_followers_joining_and_leaving_while_lines_arrive_each_get_an_unbroken_run(gcmd):
    server = gcmd()
    writer = Writer(server.logfile)
    try:
        runs = []
        for _ in range(3):  # three waves of followers, each leaving after a while
            wave = [server.client() for _ in range(10)]
            for c in wave:
                assert c.ask("follow") == BEGIN_FOLLOW
            firsts = []
            for c in wave:  # each sees lines arrive, then leaves
                c.sock.settimeout(5)
                firsts.append(c.line()[:-1])
                c.send("ping\n")
            for c, first in zip(wave, firsts):
                got = [first, *read_lines(c, END_FOLLOW[:-1])[:-1]]
                assert c.line() == PONG
                runs.append([int(line.split()[1]) for line in got])
    finally:
        writer.stop()
    for numbers in runs:
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "a gap or a repeat"
    assert len(server.children()) <= 1  # one reader for every follower


def test_followers_go_on_across_rotations_without_losing_a_line(gcmd):
    server = gcmd()
    c = server.client()
    assert c.ask("follow") == BEGIN_FOLLOW
    for rotation in range(3):
        append(server.logfile, *[f"r{rotation} {i}" for i in range(50)])
        assert read_lines(c, f"r{rotation} 49".encode()) == [f"r{rotation} {i}".encode() for i in range(50)]
        os.rename(server.logfile, f"{server.logfile}.{rotation}")
        append(server.logfile, f"after {rotation}")
        assert read_lines(c, f"after {rotation}".encode(), timeout=4) == [f"after {rotation}".encode()]
    asker = server.client()
    asker.send("lastlog 1\n")
    assert asker.block(b"End lastlog\n")[1] == b"after 2\n"


def test_a_follower_that_resets_mid_burst_hurts_no_other(gcmd):
    server = gcmd()
    calm = server.client()
    leaving = server.client()
    for c in (calm, leaving):
        assert c.ask("follow") == BEGIN_FOLLOW
    append(server.logfile, *[f"burst {i}" for i in range(2000)])
    leaving.reset()
    assert read_lines(calm, b"burst 1999") == [f"burst {i}".encode() for i in range(2000)]
    asker = server.client()
    wait_for(lambda: stats_of(asker)["log.syslog.followers"] == "1")
    calm.send("\n")  # a blank line ends a follow too
    assert calm.line() == END_FOLLOW
    wait_for(lambda: stats_of(asker)["log.syslog.followers"] == "0")
    assert server.proc.poll() is None


def test_a_half_close_does_not_end_a_follow(gcmd):
    server = gcmd()
    c = server.client()
    c.send("follow\n")
    c.sock.shutdown(socket.SHUT_WR)  # printf 'follow\n' | nc -N host port
    assert c.line() == BEGIN_FOLLOW
    append(server.logfile, "still streaming")
    assert read_lines(c, b"still streaming") == [b"still streaming"]


def test_a_follower_that_half_closed_then_left_frees_its_slot_on_a_quiet_log(gcmd):
    server = gcmd()
    c = server.client()
    c.send("follow\n")
    c.sock.shutdown(socket.SHUT_WR)  # printf 'follow\n' | nc -N host port, then Ctrl-C
    assert c.line() == BEGIN_FOLLOW
    asker = server.client()
    wait_for(lambda: stats_of(asker)["log.syslog.followers"] == "1", message="the follower follows")
    c.reset()  # what a half-closed peer's keepalive reply is once its socket is gone
    # no new line comes to make the server write (and notice): it still frees the slot
    wait_for(lambda: stats_of(asker)["clients"] == "1", timeout=5, message="the follower keeps its slot")
    assert stats_of(asker)["log.syslog.followers"] == "0"


def test_a_follower_gets_tcp_keepalive(make_server, connect):
    server = make_server()
    c = connect(server)
    assert c.ask("follow") == BEGIN_FOLLOW
    (client,) = server.clients
    sock = client.sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 6


def test_a_quiet_follower_gets_new_lines_as_they_come(make_server, connect):
    server = make_server()
    c = connect(server)
    assert c.ask("follow") == BEGIN_FOLLOW
    for n in range(3):
        with open(server.config.logfiles[0], "a") as f:
            f.write(f"wake up {n}\n")
        assert c.line() == f"wake up {n}\n".encode()


def test_shutdown_with_followers_says_goodbye_to_each_and_leaves_no_reader(gcmd, tmp_path):
    other = tmp_path / "other.log"
    other.write_text("o\n")
    server = gcmd("--logfile", f"other={other}")
    followers = [server.client() for _ in range(20)]
    for n, c in enumerate(followers):
        assert c.ask("follow" if n % 2 else "follow other") == BEGIN_FOLLOW
    wait_for(lambda: len(server.children()) == 2, message="one reader per followed log")
    server.proc.send_signal(signal.SIGTERM)
    for c in followers:
        assert c.line() == END_FOLLOW and c.line() == SHUTTING_DOWN and c.closed()
    assert server.proc.wait(15) == 0
    assert server.children() == []


def test_workers_serve_followers_each_with_its_own_reader(gcmd):
    server = gcmd("--workers", 2)
    followers = [server.client() for _ in range(10)]
    for c in followers:
        assert c.ask("follow") == BEGIN_FOLLOW
    append(server.logfile, "to every worker")
    for c in followers:
        assert read_lines(c, b"to every worker") == [b"to every worker"]
    assert server.stop() == 0
    assert server.children() == []


def test_follow_and_a_line_too_long_in_one_write_end_the_follow_first(make_server, connect):
    server = make_server(max_line=100)
    c = connect(server)
    c.send(b"follow\n" + b"x" * 200)
    assert c.line() == BEGIN_FOLLOW
    assert c.line() == END_FOLLOW
    assert c.line() == b"Line too long. bye !\n" and c.closed()


# telnet's Ctrl-C: IAC IP, then IAC DO TIMING-MARK (RFC 854, RFC 860)
CTRL_C = b"\xff\xf4\xff\xfd\x06"
WILL_TIMING_MARK = b"\xff\xfb\x06"


def test_telnet_ctrl_c_ends_a_follow_as_enter_does_and_the_session_goes_on(make_server, connect):
    server = make_server()
    c = connect(server)
    assert c.ask("follow") == BEGIN_FOLLOW
    c.send(CTRL_C)
    assert c.line() == WILL_TIMING_MARK + END_FOLLOW
    assert c.ask("ping") == b"pong\n"


def test_telnet_ctrl_c_outside_a_follow_is_answered_and_asks_nothing(make_server, connect):
    server = make_server()
    c = connect(server)
    c.send(CTRL_C)  # telnet sends it on its own
    answer = b""
    while len(answer) < len(WILL_TIMING_MARK):
        answer += c.sock.recv(len(WILL_TIMING_MARK) - len(answer))
    assert answer == WILL_TIMING_MARK
    assert c.ask("ping") == b"pong\n"


def test_bytes_of_telnet_commands_inside_a_request_stay_bytes_of_the_request(make_server, connect):
    server = make_server()
    c = connect(server)
    assert c.ask(b"comphash no\xff\xf4such") == (
        b"An error occured : [Errno 2] No such file or directory: 'no\\xff\\xf4such'\n")
