"""An attacker's view of gcmd: a real server process, hostile clients, real files.

Every test starts ``python -m gcmd`` on a free loopback port and tries to make
it leak memory, descriptors or processes, stall other clients, read outside
its root, forge its log, or die. The requirements come from PROTOCOL.md
(Connection lifecycle, File access, lastlog, Server log).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import re
import resource
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from time import monotonic

import pytest
from support import (
    AUTH_FAILED,
    AUTH_OK,
    AUTH_REQUIRED,
    ERROR,
    IDLE_TIMEOUT,
    LASTLOG_USAGE,
    LINE_TOO_LONG,
    LOG_LINES,
    NOT_FOUND,
    OUTSIDE,
    PONG,
    SHUTTING_DOWN,
    TOO_MANY,
    TOO_MANY_FROM_ADDRESS,
    Client,
    ipv6_loopback,
    sha1_of,
    tls_client,
    wait_for,
    write_file,
)

MiB = 1 << 20


#: fixed-size algorithms every Python has: distinct ones never share one read of a file
ALGORITHMS = ("sha1", "md5", "sha256", "sha512", "blake2b", "blake2s", "sha224", "sha384")


# --- helpers --------------------------------------------------------------------------

def connect_raw(port: int, host: str = "127.0.0.1", *, rcvbuf: int | None = None,
                source: str | None = None, timeout: float = 10.0) -> socket.socket:
    """A plain TCP socket, optionally with a tiny receive buffer or another source address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if rcvbuf is not None:
        # before connect, so that the window the server sees is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source is not None:
        sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends, and whether it closed the connection in ``timeout``."""
    data = b""
    deadline = monotonic() + timeout
    while True:
        left = deadline - monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, True
        except TimeoutError:
            return data, False
        if not chunk:
            return data, True
        data += chunk


def read_reply(client: Client) -> list[bytes]:
    """One complete reply: a single line, or a ``Begin X`` ... ``End X`` block."""
    first = client.line()
    if first.startswith(b"Begin "):
        return [first, *client.block(b"End " + first[len(b"Begin "):])]
    return [first]


def is_blank(line: bytes) -> bool:
    if line.endswith(b"\r"):
        line = line[:-1]
    return not line.strip(b" \t")


def collect(socks, done, timeout: float) -> tuple[dict, set]:
    """Read from all sockets at once until ``done(data)`` or EOF for each; (data, closed)."""
    selector = selectors.DefaultSelector()
    data = {sock: b"" for sock in socks}
    closed = set()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    waiting = set(socks)
    deadline = monotonic() + timeout
    while waiting and monotonic() < deadline:
        for key, _ in selector.select(timeout=0.1):
            sock = key.fileobj
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                chunk = b""
            if chunk:
                data[sock] += chunk
            else:
                closed.add(sock)
            if not chunk or done(data[sock]):
                selector.unregister(sock)
                waiting.discard(sock)
    selector.close()
    for sock in socks:
        sock.settimeout(10)
    return data, closed


def flood(sock: socket.socket, payload: bytes, quiet: float = 0.3) -> int:
    """Send as much of ``payload`` as the server takes until it stops taking any."""
    sock.setblocking(False)
    view = memoryview(payload)
    sent = 0
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_WRITE)
    try:
        while sent < len(payload):
            if not selector.select(timeout=quiet):
                break
            try:
                sent += sock.send(view[sent:sent + 65536])
            except BlockingIOError:
                continue
    finally:
        selector.close()
        sock.settimeout(10)
    return sent


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ping_seconds(server) -> float:
    """How long a new client waits for its pong."""
    started = monotonic()
    client = server.client(timeout=5)
    try:
        assert client.ask("ping") == PONG
    finally:
        client.close()
    return monotonic() - started


def unknown_log(shown: bytes) -> bytes:
    """The reply to lastlog or follow of a log the server does not serve (shown escaped)."""
    return ERROR + b"unknown log '" + shown + b"' (choose from syslog, gcmd)\n"


def stats_of(server) -> dict[str, int]:
    """The server's figures, asked by a new client (which waits for a slot that
    clients which have just hung up may still hold)."""
    client = wait_for(lambda: served(server), timeout=5, message="no slot for a stats client")
    try:
        client.send(b"stats\n")
        lines = client.block(b"End stats\n")
    finally:
        client.close()
    return {key.decode(): int(value) for key, value in (line.split() for line in lines[1:-1])}


def served(server, **kw) -> Client | None:
    """A new client that is served (it answers ping), or None if it was refused."""
    client = Client(server.port, 5, host=server.host, **kw)
    try:
        if client.ask("ping") == PONG:
            return client
    except (ConnectionError, TimeoutError):
        pass
    client.close()
    return None


def tails_of(path: Path) -> list[int]:
    """Live ``tail`` processes reading ``path``, whoever their parent is now."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"tail") and os.fsencode(path) in argv:
            found.append(int(entry.name))
    return found


def sockets_and_files(server) -> int:
    """The server's open descriptors but pipes (a reader process's pipes come and go with it)."""
    count = 0
    for fd in os.listdir(f"/proc/{server.proc.pid}/fd"):
        try:
            count += not os.readlink(f"/proc/{server.proc.pid}/fd/{fd}").startswith("pipe:")
        except OSError:
            pass  # closed meanwhile
    return count


def stable_fd_count(server, settle: float = 0.5, count=None) -> int:
    """The server's open descriptors (``count(server)``: those counted) once the
    count has not changed for ``settle`` s."""
    count = count or (lambda server: server.open_fds())
    state = {"count": count(server), "since": monotonic()}

    def settled() -> bool:
        count_now = count(server)
        if count_now != state["count"]:
            state.update(count=count_now, since=monotonic())
        return monotonic() - state["since"] >= settle

    wait_for(settled, timeout=10)
    return state["count"]


def log_bytes(server) -> bytes:
    server.log()
    return server.stdout.read_bytes()


# --- 1. slow readers --------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(30)
@pytest.mark.parametrize("request_line", [b"lastlog 1000", b"help", b"stats"])
def test_slow_reader_costs_bounded_memory_delays_nobody_and_is_cut(gcmd, tmp_path, request_line):
    logfile = tmp_path / "big.log"
    logfile.write_bytes(b"".join(b"%05d %s\n" % (i, b"x" * 200) for i in range(2000)))
    server = gcmd("--idle-timeout", 1, "--shutdown-timeout", 1, logfile=logfile)
    pid = server.proc.pid
    warm = server.client()
    warm.send(request_line + b"\n")
    read_reply(warm)  # tail has run once and its reply is cached
    warm.close()
    rss_before = proc_status_kib(pid, "VmRSS")

    reader = connect_raw(server.port, rcvbuf=4096)
    reader.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent = flood(reader, (request_line + b"\n") * 40000)
    stuck_since = monotonic()
    assert sent > 0
    # the reader is stuck; everybody else is served at once
    for _ in range(5):
        assert ping_seconds(server) < 0.5
    peak = proc_status_kib(pid, "VmRSS")

    def reader_cut() -> bool:
        nonlocal peak
        peak = max(peak, proc_status_kib(pid, "VmRSS"))
        return stats_of(server)["clients"] == 1  # only the client asking for stats

    wait_for(reader_cut, timeout=6, message="a client that reads nothing was never cut")
    assert monotonic() - stuck_since < 1 + 3, "cut long after --idle-timeout"
    state = reader.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    assert state != 1, "the server still holds the connection (ESTABLISHED)"
    peak = max(peak, proc_status_kib(pid, "VmHWM"))
    assert peak - rss_before < 32 * 1024, f"server grew by {(peak - rss_before) // 1024} MiB"
    reader.close()
    assert server.client().ask("ping") == PONG


# --- 2. tricklers ----------------------------------------------------------------------

@pytest.mark.timeout(15)
@pytest.mark.parametrize("first", [b"", b"ping\n"], ids=["from-connect", "after-a-request"])
def test_trickler_without_newline_is_cut_after_idle_timeout(gcmd, first):
    server = gcmd("--idle-timeout", 1)
    client = server.client(timeout=5)
    if first:
        assert client.ask(first) == PONG
    started = monotonic()
    received = b""
    while b"\n" not in received:
        assert monotonic() - started < 5, "a trickler was never cut"
        try:
            client.send(b"p")
        except (BrokenPipeError, ConnectionResetError):
            break
        # one byte every 0.2 s: never silent, never a complete line
        readable, _, _ = select_read(client.sock, 0.2)
        if readable:
            chunk = client.sock.recv(65536)
            if not chunk:
                break
            received += chunk
    elapsed = monotonic() - started
    assert received == IDLE_TIMEOUT
    assert 0.7 < elapsed < 3
    assert client.closed()


def select_read(sock, timeout):
    return select.select([sock], [], [], timeout)


# --- 3. floods, per-address cap, allow-list -------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(30)
def test_connect_flood_beyond_max_clients_gets_slots_or_refusals_and_leaks_no_slot(gcmd):
    server = gcmd("--max-clients", 20)
    crowd = []
    for _ in range(300):
        sock = connect_raw(server.port)
        sock.sendall(b"ping\n")
        crowd.append(sock)
    data, closed = collect(crowd, lambda got: got == PONG, timeout=15)
    answered = [sock for sock in crowd if data[sock] == PONG and sock not in closed]
    refused = [sock for sock in crowd if data[sock] == TOO_MANY and sock in closed]
    others = [data[sock] for sock in crowd if sock not in answered and sock not in refused]
    assert others == [], f"{len(others)} clients neither served nor refused: {others[:5]}"
    assert len(answered) == 20 and len(refused) == 280
    for sock in crowd:
        sock.close()

    def all_slots_free() -> bool:
        clients = [served(server) for _ in range(20)]
        ok = all(clients)
        for client in clients:
            if client:
                client.close()
        return ok

    wait_for(all_slots_free, timeout=10, message="slots leaked after the flood")
    stats = stats_of(server)
    assert stats["rejected"] >= 280
    assert server.proc.poll() is None


@pytest.mark.timeout(30)
def test_security_signals_are_warnings_that_quiet_keeps_each_in_its_session(gcmd, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server = gcmd("--quiet", "--max-clients", 3, "--max-per-ip", 1, "--token-file", token)

    def client_from(source: str) -> Client:
        return Client(server.port, sock=connect_raw(server.port, source=source))

    first = client_from("127.0.0.5")
    assert first.ask("auth s3cret") == AUTH_OK
    assert first.ask("comphash ../outside/x") == OUTSIDE
    assert client_from("127.0.0.5").line() == TOO_MANY_FROM_ADDRESS
    assert client_from("127.0.0.2").ask("auth nope") == AUTH_FAILED
    # fill the slots (the start-up probe may still hold one): the next is refused
    crowd = [client_from(f"127.0.1.{n}") for n in range(3)]
    assert [c.ask("ping") for c in crowd].count(TOO_MANY) >= 1
    session = r"\[Session,\d+,"
    expected = [session + r"127\.0\.0\.5\] WARNING: Too many connections from 127\.0\.0\.5",
                session + r"127\.0\.0\.2\] WARNING: Authentication failed from 127\.0\.0\.2",
                session + r"127\.0\.1\.\d\] WARNING: Too many connections\. bye !",
                session + r"127\.0\.0\.5\] WARNING: Refused a path outside the served root "
                r"from 127\.0\.0\.5: \.\./outside/x"]
    wait_for(lambda: all(re.search(pattern, server.log()) for pattern in expected),
             message=f"missing warnings in: {server.log()}")
    assert "Cmd received" not in server.log()  # --quiet: warnings only


@pytest.mark.timeout(20)
@pytest.mark.parametrize("level", ["info", "debug"])
def test_health_checks_from_quiet_from_networks_are_logged_at_debug_only(gcmd, level):
    server = gcmd("--quiet-from", "127.0.0.2/32", "--log-level", level)
    for _ in range(3):  # a load balancer's checks: connect, ping, close
        check = Client(server.port, sock=connect_raw(server.port, source="127.0.0.2"))
        assert check.ask("ping") == PONG
        check.close()
    assert server.client().ask("ping") == PONG
    wait_for(lambda: "Cmd received from 127.0.0.1 : ping" in server.log())
    if level == "info":
        assert "127.0.0.2" not in server.log()
    else:
        wait_for(lambda: server.log().count("Cmd received from 127.0.0.2 : ping") == 3)


@pytest.mark.timeout(20)
def test_max_per_ip_refuses_the_third_connection_from_one_address(gcmd):
    server = gcmd("--max-per-ip", 2)
    a, b = server.client(), server.client()
    assert a.ask("ping") == PONG and b.ask("ping") == PONG
    third = server.client()
    assert third.line() == TOO_MANY_FROM_ADDRESS
    assert third.closed()
    # the cap is per address: another loopback address is still served
    other = Client(server.port, sock=connect_raw(server.port, source="127.0.0.2"))
    assert other.ask("ping") == PONG
    a.send(b"exit\n")
    assert a.closed()
    newcomer = wait_for(lambda: served(server), timeout=5,
                        message="the address's freed place was not given back")
    assert newcomer.ask("ping") == PONG and b.ask("ping") == PONG
    wait_for(lambda: "Too many connections from 127.0.0.1" in server.log())


@pytest.mark.timeout(20)
def test_allow_list_closes_other_networks_without_a_reply_and_logs_it(gcmd):
    server = gcmd("--allow", "10.0.0.0/8")
    client = server.client(timeout=5)
    client.send(b"ping\n")
    assert client.closed() and client.buf == b""
    wait_for(lambda: any("127.0.0.1" in line and "allow" in line.lower()
                         for line in server.log().splitlines()),
             message="the refused connection was not logged")
    assert server.proc.poll() is None


@pytest.mark.timeout(20)
def test_allow_list_serves_every_listed_network(gcmd):
    server = gcmd("--allow", "10.0.0.0/8", "--allow", "127.0.0.0/8")
    assert server.client().ask("ping") == PONG


@pytest.mark.timeout(20)
def test_allow_list_is_checked_per_source_address(gcmd):
    server = gcmd("--allow", "127.0.0.2/32")
    listed = Client(server.port, sock=connect_raw(server.port, source="127.0.0.2"))
    assert listed.ask("ping") == PONG
    unlisted = server.client(timeout=5)
    unlisted.send(b"ping\n")
    assert unlisted.closed() and unlisted.buf == b""


@pytest.mark.timeout(20)
@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize(("allow", "is_served"), [("::1/128", True), ("127.0.0.0/8", False),
                                                  ("fd00::/8", False)],
                         ids=["listed", "ipv4-network-only", "other-ipv6-network"])
def test_allow_list_over_ipv6(gcmd, allow, is_served):
    server = gcmd("--allow", allow, host="::1")
    client = server.client(timeout=5)
    client.send(b"ping\n")
    if is_served:
        assert client.line() == PONG
    else:
        assert client.closed() and client.buf == b""


# --- 4. paths ---------------------------------------------------------------------------

def hostile_tree(server) -> dict[str, Path]:
    """An inside file, secrets outside, and symlinks that lead out of the root."""
    root, outside = server.root, server.outside
    inside = root / "in.txt"
    inside.write_bytes(b"inside\n")
    secret = outside / "secret.txt"
    secret.write_bytes(b"outside secret\n")
    sibling = root.parent / (root.name + "other")  # /tmp/x/root vs /tmp/x/rootother
    sibling.mkdir(exist_ok=True)
    (sibling / "secret").write_bytes(b"sibling secret\n")
    (root / "sub").mkdir(exist_ok=True)
    (root / "link_file").symlink_to(secret)
    (root / "link_rel").symlink_to(Path("..") / "outside" / "secret.txt")
    (root / "link_dir").symlink_to(outside)
    (root / "link_sibling").symlink_to(Path("..") / sibling.name / "secret")
    (root / "link_root_dir").symlink_to(root.parent)
    (root / "devnull").symlink_to("/dev/null")
    (root / "link_chain").symlink_to("link_dir")
    return {"inside": inside, "secret": secret, "sibling": sibling / "secret"}


def outside_paths(server, tree) -> list[str]:
    root, secret, sibling = server.root, tree["secret"], tree["sibling"]
    return [
        "..", "../", "../outside/secret.txt", "sub/../../outside/secret.txt",
        "../" * 40 + "etc/passwd", "sub/" + "../" * 40 + "etc/hostname",
        str(secret), f"{root}/../outside/secret.txt", f"{root}/sub/../../outside/secret.txt",
        "/etc/passwd", "//etc/passwd", "/./etc/passwd", "/", str(root.parent),
        "/proc/self/environ", "/proc/self/cmdline", "/proc/self/root" + str(secret),
        "/proc/self/cwd/outside/secret.txt", "/proc/self/fd/0", "/dev/null",
        "link_file", "link_rel", "link_dir/secret.txt", "link_chain/secret.txt",
        "link_sibling", "link_root_dir/outside/secret.txt", "devnull",
        str(sibling), f"../{sibling.parent.name}/secret", f"{root}other/secret",
    ]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", ["comphash", "hash sha256"])
def test_every_way_out_of_the_root_is_refused_and_the_session_goes_on(gcmd, command):
    server = gcmd()
    tree = hostile_tree(server)
    algorithm = "sha1" if command == "comphash" else "sha256"
    forbidden = {sha1_of(tree["secret"], algorithm).encode(),
                 sha1_of(tree["sibling"], algorithm).encode()}
    client = server.client(timeout=5)
    for path in outside_paths(server, tree):
        reply = client.ask(f"{command} {path}")
        assert reply == OUTSIDE, (path, reply)
    assert client.ask("ping") == PONG  # and nothing else came before it
    inside = client.ask(f"{command} in.txt")
    assert inside == f"File hash is : {sha1_of(tree['inside'], algorithm)}\n".encode()
    assert not any(digest in inside for digest in forbidden)


@pytest.mark.timeout(20)
def test_symlink_loops_get_one_error_line(gcmd):
    server = gcmd()
    root = server.root
    (root / "loop_a").symlink_to("loop_b")
    (root / "loop_b").symlink_to("loop_a")
    (root / "self_loop").symlink_to("self_loop")
    (root / "dir_loop").symlink_to(".")
    client = server.client(timeout=5)
    for path in ("loop_a", "loop_b", "self_loop", "loop_a/x", "self_loop/../in.txt",
                 "dir_loop/" * 60 + "nothing"):
        started = monotonic()
        reply = client.ask(f"comphash {path}")
        assert reply.startswith(ERROR) and reply.count(b"\n") == 1, (path, reply)
        assert monotonic() - started < 2, path
    assert client.ask("ping") == PONG


@pytest.mark.timeout(20)
def test_nul_bytes_and_invalid_utf8_in_paths(gcmd):
    server = gcmd()
    hostile_tree(server)
    raw_name = b"caf\xe9-\xff\xfe.bin"  # not UTF-8: passed to the OS as raw bytes
    raw_file = Path(os.fsdecode(bytes(server.root) + b"/" + raw_name))
    raw_file.write_bytes(b"latin-1 name\n")
    client = server.client(timeout=5)
    for request in (b"comphash in.txt\x00../outside/secret.txt", b"comphash \x00",
                    b"comphash in.txt\x00", b"hash sha256 \x00/etc/passwd",
                    b"comphash ../outside/secret.txt\x00in.txt"):
        reply = client.ask(request)
        assert reply.startswith(ERROR) and reply.count(b"\n") == 1, (request, reply)
        assert b"\x00" not in reply
    for request in (b"comphash \xff\xfe", b"comphash \xc3\x28", b"comphash \xed\xa0\x80",
                    b"hash md5 \xf8\x88\x80\x80\x80"):
        reply = client.ask(request)
        assert reply.startswith(ERROR) and b"No such file" in reply, (request, reply)
        reply.decode("utf-8")  # the echo is escaped, not raw bytes
    assert client.ask(b"comphash " + raw_name) == f"File hash is : {sha1_of(raw_file)}\n".encode()
    assert client.ask(b"comphash ../outside/\xff/../secret.txt") == OUTSIDE
    assert client.ask("ping") == PONG


@pytest.mark.timeout(20)
def test_paths_longer_than_path_max_get_one_short_error_line(gcmd):
    server = gcmd()
    hostile_tree(server)
    client = server.client(timeout=5)
    cases = {
        "deep": "a/" * 3000 + "f",              # 6001 bytes > PATH_MAX, under --max-line
        "long-name": "n" * 5000,                # one component > NAME_MAX
        "dotdot-chain": "x/../" * 1500 + "in.txt",
    }
    for name, path in cases.items():
        assert len(path) > os.pathconf("/", "PC_PATH_MAX") and len(path) < 8192 - 20
        reply = client.ask(f"comphash {path}")
        assert reply.count(b"\n") == 1, name
        if name == "dotdot-chain":
            assert reply.startswith((ERROR, b"File hash is : ")), (name, reply[:100])
        else:
            assert reply.startswith(ERROR), (name, reply[:100])
        assert len(reply) < 600, f"{name}: an error line of {len(reply)} bytes"
    escape = "x/../" * 1500 + "../outside/secret.txt"
    assert client.ask(f"comphash {escape}") == OUTSIDE
    assert client.ask("ping") == PONG


@pytest.mark.timeout(20)
def test_fifos_sockets_and_directories_answer_at_once_with_not_a_regular_file(gcmd):
    server = gcmd()
    root = server.root
    os.mkfifo(root / "fifo")
    (root / "dir").mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "sock"))
    listener.listen()
    (root / "fifo_link").symlink_to("fifo")
    client = server.client(timeout=5)
    for path in ("fifo", "sock", "dir", ".", "fifo_link", f"{root}/fifo", "dir/"):
        started = monotonic()
        reply = client.ask(f"comphash {path}")
        assert reply == f"An error occured : Not a regular file: '{path}'\n".encode(), reply
        assert monotonic() - started < 1, f"{path} took {monotonic() - started:.1f} s"
    # had the server opened the FIFO for reading, a writer could open it now
    with pytest.raises(OSError):
        os.close(os.open(root / "fifo", os.O_WRONLY | os.O_NONBLOCK))
    assert client.ask("ping") == PONG
    listener.close()


@pytest.mark.timeout(20)
def test_devices_are_never_read(gcmd, tmp_path):
    # with --root /dev every device is inside the root: only the file type protects
    server = gcmd(root=Path("/dev"))
    client = server.client(timeout=5)
    for path in ("null", "zero", "urandom", "full", "/dev/zero", "fd/0", "stdin", "shm"):
        if not os.path.exists(f"/dev/{path.removeprefix('/dev/')}"):
            continue
        started = monotonic()
        reply = client.ask(f"comphash {path}")
        assert reply == f"An error occured : Not a regular file: '{path}'\n".encode(), reply
        assert monotonic() - started < 1, path
    assert client.ask("ping") == PONG


FLIP_SYMLINK = r"""
import os, sys
link, first, second = sys.argv[1:4]
spare = link + ".new"
while True:
    for target in (first, second):
        try:
            os.unlink(spare)
        except FileNotFoundError:
            pass
        os.symlink(target, spare)
        os.replace(spare, link)
"""

EXCHANGE_PATHS = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
first, second = (os.fsencode(p) for p in sys.argv[1:3])
AT_FDCWD, RENAME_EXCHANGE = -100, 2
while True:
    if libc.renameat2(AT_FDCWD, first, AT_FDCWD, second, RENAME_EXCHANGE) != 0:
        sys.exit(ctypes.get_errno())
"""


def hash_while(server, request: bytes, seconds: float, flipper) -> list[bytes]:
    client = server.client(timeout=10)
    replies = []
    until = monotonic() + seconds
    while monotonic() < until:
        assert flipper.poll() is None, "the swapping process stopped"
        client.send(request * 20)
        replies += [client.line() for _ in range(20)]
    client.close()
    return replies


def has_renameat2() -> bool:
    return hasattr(ctypes.CDLL(None), "renameat2")


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_symlink_swapped_between_check_and_open_never_yields_an_outside_hash(gcmd):
    server = gcmd("--hash-cache", 0)
    tree = hostile_tree(server)
    good = f"File hash is : {sha1_of(tree['inside'])}\n".encode()
    bad = sha1_of(tree["secret"]).encode()
    link = server.root / "swapped"
    flipper = subprocess.Popen([sys.executable, "-c", FLIP_SYMLINK, str(link), "in.txt",
                                str(tree["secret"])])
    try:
        wait_for(link.is_symlink)
        replies = hash_while(server, b"comphash swapped\n", 2.5, flipper)
    finally:
        flipper.kill()
        flipper.wait()
    leaked = [reply for reply in replies if bad in reply]
    assert leaked == [], f"{len(leaked)} of {len(replies)} replies hashed the outside file"
    assert all(reply == good or reply.startswith(ERROR) for reply in replies), set(replies)
    assert good in replies  # the race was really run against the inside file too


@pytest.mark.slow
@pytest.mark.timeout(30)
@pytest.mark.skipif(not has_renameat2(), reason="no renameat2 in this libc")
def test_directory_exchanged_for_a_symlink_during_open_never_yields_an_outside_hash(gcmd):
    # "d" is a real directory when the path is resolved and a symlink out when it is opened
    server = gcmd("--hash-cache", 0)
    tree = hostile_tree(server)
    real_dir = server.root / "d"
    real_dir.mkdir()
    (real_dir / "f").write_bytes(b"inside\n")
    (server.outside / "f").write_bytes(b"outside secret\n")
    (server.root / "e").symlink_to(server.outside)
    good = f"File hash is : {sha1_of(tree['inside'])}\n".encode()
    bad = sha1_of(server.outside / "f").encode()
    exchanger = subprocess.Popen([sys.executable, "-c", EXCHANGE_PATHS, str(real_dir),
                                  str(server.root / "e")])
    try:
        replies = hash_while(server, b"comphash d/f\ncomphash e/f\n", 2.5, exchanger)
    finally:
        exchanger.kill()
        exchanger.wait()
    leaked = [reply for reply in replies if bad in reply]
    assert leaked == [], f"{len(leaked)} of {len(replies)} replies hashed the outside file"
    assert all(reply == good or reply.startswith(ERROR) for reply in replies), set(replies)


# --- 5. log integrity --------------------------------------------------------------------

FORGERIES = {
    b"zq01": b"zq01\r2011-08-29 13:32:35+0200 [Session,9,6.6.6.6] Cmd received from 6.6.6.6 : x",
    b"zq02": b"zq02\x1b[2J\x1b]0;owned\x07",
    b"zq03": b"zq03\x00nul",
    b"zq04": b"zq04\xc2\x85next line (C1 NEL as UTF-8)",
    b"zq05": b"zq05\x85raw C1 byte",
    b"zq06": b"zq06\x7fdel",
    b"zq07": b"zq07\\x0a looks like an escape",
    b"zq08": b"zq08\x0bvt\x0cff\x08bs",
    b"zq09": b"zq09\xff\xfe not UTF-8",
    b"zq10": b"zq10\x9b31m raw CSI",
    b"zq11": b"zq11\r\r",
    b"zq12": b'zq12"}\n{"level": "error", "message": "forged"}'.replace(b"\n", b"\r"),
}
ESCAPED = {b"zq01": "\\x0d", b"zq02": "\\x1b", b"zq03": "\\x00", b"zq04": "\\x85",
           b"zq05": "\\x85", b"zq06": "\\x7f", b"zq07": "\\x5c", b"zq08": "\\x0b",
           b"zq09": "\\xff", b"zq10": "\\x9b", b"zq11": "\\x0d"}


def send_forgeries(server) -> None:
    client = server.client(timeout=5)
    for request in FORGERIES.values():
        assert client.ask(request) == NOT_FOUND, request
    reply = client.ask(b"comphash zq13\x1b[31m\x85\x00red")
    assert reply.startswith(ERROR) and b"\x1b" not in reply and b"\x00" not in reply
    assert client.ask("ping") == PONG
    client.send(b"exit\n")
    assert client.closed()


def assert_clean_text(data: bytes) -> None:
    text = data.decode("utf-8")  # raises if a client's invalid UTF-8 reached the log
    bad = [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0]
    assert bad == [], f"control characters in the log: {bad[:10]}"


@pytest.mark.timeout(20)
def test_control_characters_in_requests_are_escaped_in_the_log(gcmd):
    server = gcmd()
    send_forgeries(server)
    wait_for(lambda: b"zq13" in log_bytes(server))
    data = log_bytes(server)
    assert_clean_text(data)
    lines = data.split(b"\n")
    for marker in FORGERIES:
        carrying = [line for line in lines if marker in line]
        assert len(carrying) == 1, (marker, carrying)
        assert b"Cmd received from 127.0.0.1 : " + marker in carrying[0]
        if marker in ESCAPED:
            assert ESCAPED[marker].encode() in carrying[0], carrying[0]
    assert not any(b"6.6.6.6" in line and b"zq01" not in line for line in lines)
    assert not any(line.startswith(b"{") for line in lines)


@pytest.mark.timeout(20)
def test_json_log_lines_each_parse_and_keep_the_request_in_one_string(gcmd):
    server = gcmd("--log-format", "json")
    send_forgeries(server)
    wait_for(lambda: b"zq13" in log_bytes(server))
    events = []
    for line in log_bytes(server).decode("utf-8").splitlines():
        event = json.loads(line)
        assert isinstance(event, dict), line
        events.append(event)
    for marker in FORGERIES:
        carrying = [event for event in events if marker.decode() in json.dumps(event)]
        assert len(carrying) == 1, (marker, carrying)
        message = carrying[0]["message"]
        assert "Cmd received from 127.0.0.1 : " + marker.decode() in message
        assert_clean_text(message.encode("utf-8", "surrogateescape"))
    assert not any(event.get("message") == "forged" for event in events)


@pytest.mark.timeout(20)
def test_auth_token_never_reaches_the_log(gcmd, tmp_path):
    token = "Tk-7f3a9c-do-not-log"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    server = gcmd("--token-file", token_file)
    for request in (f"auth {token}", f"auth\t{token}", f"  auth {token} \r", f"auth  {token}\t"):
        client = server.client(timeout=5)
        assert client.ask(request) == AUTH_OK, request
        assert client.ask("ping") == PONG
        client.close()
    for wrong in (f"auth {token}x", f"auth {token[:-1]}", f"auth {token} extra", "auth wrong-guess-31337"):
        client = server.client(timeout=5)
        assert client.ask(wrong) == AUTH_FAILED, wrong
        assert client.closed()
    wait_for(lambda: server.log().count("auth ***") >= 8, message="auth requests not logged as auth ***")
    log = server.log()
    assert token not in log and token[:-1] not in log and "wrong-guess-31337" not in log


# --- 6. authentication ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(30)
def test_wrong_token_flood_neither_crashes_nor_slows_the_server(gcmd, tmp_path):
    token = "right-token-42"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    server = gcmd("--token-file", token_file)
    friend = server.client(timeout=5)
    assert friend.ask(f"auth {token}") == AUTH_OK
    outcomes: list[tuple[bytes, bool]] = []

    def attacker(k: int) -> None:
        for i in range(75):
            sock = connect_raw(server.port, timeout=5)
            # pipelined after the wrong token: the right one, and commands
            sock.sendall(f"auth wrong-{k}-{i}\nping\nauth {token}\nlastlog\n".encode())
            outcomes.append(read_until_closed(sock, 5))
            sock.close()

    attackers = [threading.Thread(target=attacker, args=(k,)) for k in range(4)]
    for thread in attackers:
        thread.start()
    latencies = []
    while any(thread.is_alive() for thread in attackers):
        started = monotonic()
        assert friend.ask("ping") == PONG
        latencies.append(monotonic() - started)
        select_read(friend.sock, 0.02)  # nothing is expected: pace the pings
    for thread in attackers:
        thread.join()
    assert len(outcomes) == 300
    wrong = [outcome for outcome in outcomes if outcome != (AUTH_FAILED, True)]
    assert wrong == [], f"{len(wrong)} attempts were not refused and closed: {wrong[:3]}"
    assert max(latencies) < 0.5, f"a ping took {max(latencies):.2f} s during the flood"
    assert server.proc.poll() is None
    newcomer = server.client(timeout=5)
    assert newcomer.ask(f"auth {token}") == AUTH_OK and newcomer.ask("ping") == PONG
    wait_for(lambda: server.log().count("Authentication failed from 127.0.0.1") >= 300,
             message="failed attempts are not all logged with the address")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("guess", ["", "right", "right-token-4", "right-token-42x", "RIGHT-TOKEN-42",
                                   "right-token-42 right-token-42", "\x00right-token-42",
                                   "right-token-42\x00"])
def test_near_miss_tokens_fail_and_discard_what_follows(gcmd, tmp_path, guess):
    token_file = tmp_path / "token"
    token_file.write_text("right-token-42\n")
    server = gcmd("--token-file", token_file)
    sock = connect_raw(server.port)
    sock.sendall(f"auth {guess}\nauth right-token-42\nping\ncomphash x\n".encode())
    assert read_until_closed(sock, 5) == (AUTH_FAILED, True)
    client = server.client(timeout=5)
    assert client.ask("ping") == AUTH_REQUIRED
    assert client.ask("auth right-token-42") == AUTH_OK


# --- 7. crash safety ---------------------------------------------------------------------

def hostile_lines() -> list[bytes]:
    lines = [
        b"\r", b"\r\r", b"\r\r\r\r\r\r", b"\x00", b"\x00\x00\x00", b"\x0b", b"\x0c", b"\x0b\x0c \t",
        b"\x1b", b"\x7f", b"\xff", b"\xc2\x85", b"\xef\xbb\xbfping", b"\tping\t", b"ping\x00",
        b"lastlog \xef\xbc\x95", b"lastlog \xd9\xa3", b"lastlog \xc2\xb9", b"lastlog 99999999999999999999",
        b"lastlog 5 6 7", b"lastlog +5000",
        b"lastlog " + b"9" * 5000, b"lastlog " + b"0" * 5000 + b"5", b"lastlog -1", b"lastlog +5",
        b"lastlog 1_000", b"lastlog 0x10", b"lastlog 1e3", b"lastlog 5 6", b"lastlog 5\x00",
        b"lastlog \t 5 \t", b"lastlog 0005", b"lastlog\t1000", b"lastlog " + b" " * 100,
        b"hash shake_128 in.txt", b"hash shake_256 in.txt", b"hash SHA1 in.txt", b"hash Sha256 in.txt",
        b"hash", b"hash ", b"hash  in.txt", b"hash sha256", b"hash sha256\t\t", b"hash \x00 in.txt",
        b"hash " + b"a" * 5000 + b" in.txt", b"hash sha512_256 in.txt", b"hash blake2b in.txt",
        b"hash sha3_256 in.txt", b"hash md5\tin.txt", b"hash \xff\xfe in.txt", b"hash sha1 \xff\xfe",
        b"comphash", b"comphash \t ", b"comphash " + b"/" * 5000, b"comphash .", b"comphash ..",
        b"ping " + b"\xff" * 100, b"help \xff", b"stats \xff\x00", b"lastlog \xff", b"comphash \xff",
        b"auth \xff", b"auth", b"PING", b"Ping", b"pingping", b"exitnow", b"quitting", b"lastlogfoo",
        b"\\", b"%s%s%s%n", b"{0}{1}", b"' OR 1=1 --", b"$(reboot)", b"`id`",
    ]
    rng = random.Random(20111129)
    for _ in range(300):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))).replace(b"\n", b"")
        lines.append(junk)
    return [line for line in lines if first_word(line) not in (b"exit", b"quit")]


def first_word(line: bytes) -> bytes:
    if line.endswith(b"\r"):
        line = line[:-1]
    words = line.lstrip(b" \t").replace(b"\t", b" ").split(b" ", 1)
    return words[0]


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_no_input_kills_the_server_or_silently_ends_a_session(gcmd):
    server = gcmd()
    (server.root / "in.txt").write_bytes(b"inside\n")
    client = server.client(timeout=10)
    expected = {
        # PROTOCOL 1.1: a number is ASCII digits, optionally signed; any other word names a log
        b"lastlog \xef\xbc\x95": unknown_log(b"\xef\xbc\x95"), b"lastlog \xd9\xa3": unknown_log(b"\xd9\xa3"),
        b"lastlog \xc2\xb9": unknown_log(b"\xc2\xb9"), b"lastlog 99999999999999999999": LASTLOG_USAGE,
        b"lastlog " + b"9" * 5000: LASTLOG_USAGE, b"lastlog -1": LASTLOG_USAGE,
        b"lastlog +5000": LASTLOG_USAGE, b"lastlog 1_000": unknown_log(b"1_000"),
        b"lastlog 0x10": unknown_log(b"0x10"), b"lastlog 1e3": unknown_log(b"1e3"),
        b"lastlog 5 6": unknown_log(b"6"), b"lastlog 5\x00": unknown_log(b"5\\x00"),
        b"lastlog \xff": unknown_log(b"\\xff"), b"lastlog 5 6 7": LASTLOG_USAGE, b"\r\r": NOT_FOUND, b"\x00": NOT_FOUND, b"\x0b": NOT_FOUND,
        b"\x0c": NOT_FOUND, b"\xef\xbb\xbfping": NOT_FOUND, b"ping\x00": NOT_FOUND,
        b"\tping\t": PONG, b"ping " + b"\xff" * 100: PONG, b"comphash": b"Please provide a path.\n",
        b"comphash \t ": b"Please provide a path.\n", b"hash sha256": b"Please provide a path.\n",
        b"hash": b"Usage: hash ALGO PATH\n", b"auth": b"Authentication is not enabled.\n",
        b"auth \xff": b"Authentication is not enabled.\n", b"PING": NOT_FOUND, b"pingping": NOT_FOUND,
        b"exitnow": NOT_FOUND, b"quitting": NOT_FOUND, b"lastlogfoo": NOT_FOUND,
        b"hash blake2b in.txt": f"File hash is : {hashlib.blake2b(b'inside' + bytes([10])).hexdigest()}\n".encode(),
    }
    lines = hostile_lines()
    for start in range(0, len(lines), 25):  # pipelined, 25 at a time
        batch = lines[start:start + 25]
        client.send(b"".join(line + b"\n" for line in batch))
        for line in batch:
            if is_blank(line):
                continue
            reply = read_reply(client)
            assert reply[-1].endswith(b"\n"), (line, reply)
            if line in expected:
                assert reply == [expected[line]], (line[:60], reply)
            if line.startswith((b"hash ", b"comphash ")) and len(reply) == 1:
                assert reply[0].startswith((ERROR, b"File hash is : ", b"Please provide", b"Usage")), \
                    (line[:60], reply)
                assert len(reply[0]) < 1024, (line[:60], len(reply[0]))
    assert client.ask("ping") == PONG
    for blob in (b"\r" * (1 << 20), b"\x00" * (1 << 20), b"\x0b\x0c" * (1 << 19)):
        attacker = server.client(timeout=5)
        try:
            attacker.send(blob)
            assert attacker.line() == LINE_TOO_LONG
        except (BrokenPipeError, ConnectionResetError):
            pass
        attacker.close()
    noise = server.client(timeout=5)
    noise.send(random.Random(7).randbytes(1 << 16))
    noise.reset()
    assert server.proc.poll() is None
    assert server.client().ask("ping") == PONG
    assert client.ask("ping") == PONG
    log = server.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("size", [8193, 1 << 20, 16 << 20])
def test_huge_lines_are_refused_and_the_server_lives_on(gcmd, size):
    server = gcmd()
    client = server.client(timeout=10)
    try:
        client.send(b"A" * size + b"\n")
        assert client.line() == LINE_TOO_LONG
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert server.proc.poll() is None
    assert server.client().ask("ping") == PONG


# --- 8. shutdown under load ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(30)
def test_sigterm_under_load_says_goodbye_to_everyone_exits_0_and_leaves_no_child(gcmd, tmp_path):
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)  # nothing comes from it: these lastlogs are still waiting at the deadline
    shutdown_timeout = 2
    server = gcmd("--hash-cache", 0, "--shutdown-timeout", shutdown_timeout, "--max-clients", 200,
                  "--command-timeout", 30, logfile=fifo)
    write_file(server.root / "big.bin", 256 * MiB)
    quiet = [server.client() for _ in range(25)]
    talked = [server.client() for _ in range(25)]
    for client in talked:
        assert client.ask("ping") == PONG
    hashers = [server.client(timeout=20) for _ in range(6)]
    for client, algorithm in zip(hashers, ALGORITHMS):
        client.send(f"hash {algorithm} big.bin\n")
    tailers = [server.client(timeout=20) for _ in range(3)]
    for n, client in enumerate(tailers, 1):
        client.send(f"lastlog {n}\n")
    wait_for(lambda: len(server.children()) == 1, message="the log's reader did not start")
    wait_for(lambda: stats_of(server)["hash_pending"] > 0, message="nothing is being hashed")
    tails = server.children()  # one reader for the log, whatever the number of requests
    everyone = quiet + talked + hashers + tailers

    started = monotonic()
    server.proc.send_signal(signal.SIGTERM)
    data, _ = collect([c.sock for c in everyone], lambda got: got.endswith(SHUTTING_DOWN),
                           timeout=shutdown_timeout + 8)
    status = server.proc.wait(timeout=15)
    elapsed = monotonic() - started
    assert status == 0
    assert elapsed < shutdown_timeout + 2, f"exited {elapsed:.1f} s after SIGTERM"
    for client in quiet + talked + tailers:
        assert data[client.sock] == SHUTTING_DOWN, data[client.sock]
    for client in hashers:
        got = data[client.sock]
        assert got == SHUTTING_DOWN or (got.startswith(b"File hash is : ") and
                                        got.endswith(b"\n" + SHUTTING_DOWN)), got
    assert tails_of(fifo) == []
    for pid in tails:
        cmdline = Path(f"/proc/{pid}/cmdline")
        assert not cmdline.exists() or str(fifo).encode() not in cmdline.read_bytes()


# --- 9. leaks ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(30)
def test_resets_in_the_middle_of_commands_leak_no_descriptor_and_no_child(gcmd, tmp_path):
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    server = gcmd("--hash-cache", 0, "--command-timeout", 30, "--max-clients", 500, logfile=fifo)
    big = write_file(server.root / "big.bin", 64 * MiB)
    # warm up every kind of descriptor the server opens once and keeps
    warm = server.client(timeout=20)
    assert warm.ask("comphash big.bin") == f"File hash is : {sha1_of(big)}\n".encode()
    warm.close()
    tailing = server.client()
    tailing.send(b"lastlog 1\n")
    wait_for(server.children)  # the log's reader: at most one, for the server's life
    tailing.reset()  # (a reset while it starts may stop it: its two pipes come and go with it)
    baseline = stable_fd_count(server, count=sockets_and_files)

    resets = 0
    for batch in range(10):
        clients = []
        for i in range(20):
            client = server.client()
            if i % 2:
                client.send(b"comphash big.bin\n")
            else:
                client.send(f"lastlog {2 + batch * 10 + i // 2}\n".encode())
            clients.append(client)
        wait_for(lambda: stats_of(server)["clients"] == 21, message="the clients were not all served")
        for client in clients:
            client.reset()
            resets += 1
    assert resets == 200

    assert len(server.children()) <= 1, "a process per request"
    wait_for(lambda: sockets_and_files(server) <= baseline, timeout=15,
             message=f"descriptors leaked: {sockets_and_files(server)} open, {baseline} before")
    assert stats_of(server)["clients"] == 1
    assert server.stop() == 0
    assert tails_of(fifo) == []  # the reader ends with the server


# --- 10. scarce resources ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(30)
def test_many_clients_hashing_a_large_file_use_memory_bounded_by_the_pool(gcmd):
    size = 64 * MiB
    server = gcmd("--hash-cache", 0)
    big = write_file(server.root / "big.bin", size)
    digests = {algorithm: hashlib.new(algorithm) for algorithm in ALGORITHMS}
    with open(big, "rb") as f:
        while chunk := f.read(MiB):
            for digest in digests.values():
                digest.update(chunk)
    warm = server.client()
    (server.root / "small.txt").write_bytes(b"small\n")
    assert warm.ask("comphash small.txt").startswith(b"File hash is : ")
    pid = server.proc.pid
    before = proc_status_kib(pid, "VmRSS")
    clients = [server.client(timeout=25) for _ in range(20)]
    for i, client in enumerate(clients):
        client.send(f"hash {ALGORITHMS[i % len(ALGORITHMS)]} big.bin\n")
    for i, client in enumerate(clients):
        expected = digests[ALGORITHMS[i % len(ALGORITHMS)]].hexdigest()
        assert client.line() == f"File hash is : {expected}\n".encode()
    growth_kib = proc_status_kib(pid, "VmHWM") - before
    assert growth_kib < 32 * 1024, f"20 clients hashing {size >> 20} MiB cost {growth_kib >> 10} MiB"


@pytest.mark.slow
@pytest.mark.timeout(30)
@pytest.mark.parametrize("hello", [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
                         ids=["silent", "half-a-client-hello"])
def test_tls_client_that_never_finishes_its_handshake_is_closed_after_idle_timeout(
        gcmd, certificate, hello):
    cert, key = certificate
    server = gcmd("--tls-cert", cert, "--tls-key", key, "--idle-timeout", 1)
    sock = connect_raw(server.port)
    if hello:
        sock.sendall(hello)
    started = monotonic()
    _, closed = read_until_closed(sock, 6)
    elapsed = monotonic() - started
    assert closed, "a stalled TLS handshake was never cut"
    assert 0.5 < elapsed < 4, f"cut after {elapsed:.1f} s"
    assert tls_client(server.port, cert).ask("ping") == PONG


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_running_out_of_file_descriptors_gives_error_lines_without_spinning_and_recovers(gcmd):
    server = gcmd("--max-clients", 1000)
    small = server.root / "small.txt"
    small.write_bytes(b"small\n")
    first = server.client(timeout=10)
    assert first.ask("ping") == PONG
    pid = server.proc.pid
    limit = max(64, stable_fd_count(server, settle=0.2) + 16)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    crowd = [connect_raw(server.port) for _ in range(limit + 40)]  # the rest waits in the backlog
    wait_for(lambda: server.open_fds() >= limit - 2, message="the server never reached its fd limit")

    reply = first.ask("comphash small.txt")
    assert reply.startswith(ERROR) or reply == f"File hash is : {sha1_of(small)}\n".encode(), reply
    first.send(b"lastlog 3\n")
    reply = read_reply(first)
    assert reply[0].startswith(ERROR) or reply[0] == b"Begin lastlog\n", reply
    assert first.ask("ping") == PONG

    cpu_before, wall_before = cpu_seconds(pid), monotonic()
    readable, _, _ = select_read(first.sock, 1.0)  # nothing unsolicited comes meanwhile
    assert not readable
    cpu_share = (cpu_seconds(pid) - cpu_before) / (monotonic() - wall_before)
    assert cpu_share < 0.5, f"the server spins at {cpu_share:.0%} CPU while out of descriptors"

    for sock in crowd:
        sock.close()
    wait_for(lambda: served(server), timeout=10, message="no new client is served after the crowd left")
    assert first.ask("comphash small.txt") == f"File hash is : {sha1_of(small)}\n".encode()
    first.send(b"lastlog 3\n")
    assert read_reply(first) == [b"Begin lastlog\n", *[(line + "\n").encode() for line in LOG_LINES[-3:]],
                                 b"End lastlog\n"]
    assert server.proc.poll() is None


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_running_out_of_file_descriptors_is_logged_in_log_lines_not_tracebacks(gcmd):
    server = gcmd("--max-clients", 1000)
    limit = max(64, stable_fd_count(server, settle=0.2) + 16)
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
    crowd = [connect_raw(server.port) for _ in range(limit + 40)]
    wait_for(lambda: "Too many open files" in server.log(), timeout=10,
             message="running out of descriptors was not logged")
    for sock in crowd:
        sock.close()
    wait_for(lambda: served(server), timeout=10)
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d{4} \[")
    strays = [line for line in server.log().splitlines() if not stamp.match(line)]
    assert strays == [], f"{len(strays)} log lines are not events: {strays[:6]}"
