"""Connection lifecycle and the services behind the commands, in-process on port 0."""

import ipaddress
import logging
import os
import shutil
import socket
import struct
from pathlib import Path

import gevent
import gevent.socket
import pytest
from support import (
    Client,
    make_certificate,
    poll,
    sha1_of,
    tls_client,
    wait_for,
    write_file,
)

pytestmark = pytest.mark.timeout(30)


def own_children() -> list[int]:
    text = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text()
    return [int(pid) for pid in text.split()]


def test_client_cap_refuses_then_frees_the_slot(make_server, connect):
    server = make_server(max_clients=2)
    a, b = connect(server), connect(server)
    assert a.ask("ping") == b"pong\n" and b.ask("ping") == b"pong\n"
    refused = connect(server)
    assert refused.line() == b"Too many connections. bye !\n" and refused.closed()
    a.reset()
    poll(lambda: server.stats.clients == 1)
    assert connect(server).ask("ping") == b"pong\n"
    assert server.stats.rejected == 1


def test_line_at_the_limit_is_served_and_one_byte_more_is_not(make_server, connect):
    server = make_server(max_line=10)
    c = connect(server)
    assert c.ask(b"ping" + b" " * 6) == b"pong\n"
    c.send(b"ping" + b" " * 7 + b"\n")
    assert c.line() == b"Line too long. bye !\n" and c.closed()


def test_idle_timeout_cuts_a_trickler(make_server, connect):
    server = make_server(idle_timeout=0.5)
    c = connect(server)
    for _ in range(3):
        try:
            c.send(b"p")
        except OSError:
            break
        gevent.sleep(0.2)
    assert c.line() == b"Idle timeout. bye !\n" and c.closed()


def test_per_address_cap(make_server, connect):
    server = make_server(max_per_ip=1)
    first = connect(server)
    assert first.ask("ping") == b"pong\n"
    second = connect(server)
    assert second.line() == b"Too many connections from your address. bye !\n" and second.closed()
    first.send("exit\n")
    poll(lambda: server.stats.clients == 0)
    assert connect(server).ask("ping") == b"pong\n"


def test_allow_list_closes_others_without_a_reply(make_server, connect):
    server = make_server(allow=(ipaddress.ip_network("10.0.0.0/8"),))
    c = connect(server)
    assert c.closed() and c.buf == b""
    allowed = make_server(allow=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")))
    assert connect(allowed).ask("ping") == b"pong\n"


def test_dual_stack_listener_sees_ipv4_clients_as_ipv4(make_server, caplog):
    if not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack IPv6 sockets on this machine")
    server = make_server(host="::", max_per_ip=1)
    with caplog.at_level(logging.INFO, logger="gcmd"):
        first = Client(server.port, socket_module=gevent.socket, host="127.0.0.1")
        assert first.ask("ping") == b"pong\n"
        second = Client(server.port, socket_module=gevent.socket, host="127.0.0.1")
        assert second.line() == b"Too many connections from your address. bye !\n"
    assert "Client connection from 127.0.0.1" in caplog.text and "::ffff" not in caplog.text
    assert server.per_ip == {"127.0.0.1": 1}
    first.close()
    second.close()


def test_token_gates_commands(make_server, connect):
    server = make_server(token=b"s3cret")
    c = connect(server)
    assert c.ask("ping") == b"Authentication required.\n"
    assert c.ask("nope") == b"Authentication required.\n"
    c.send("help\n")
    assert c.block(b"End help\n")[0] == b"Begin help\n"
    assert c.ask("auth s3cret") == b"Authenticated.\n"
    assert c.ask("ping") == b"pong\n"


def test_failed_auth_closes_and_discards_pipelined_requests(make_server, connect):
    server = make_server(token=b"s3cret")
    c = connect(server)
    c.send("auth wrong\nping\nping\n")
    assert c.line() == b"Authentication failed. bye !\n"
    assert c.closed() and c.buf == b""
    assert server.stats.auth_failures == 1


def test_shutdown_says_goodbye_to_idle_clients(make_server, connect):
    server = make_server()
    clients = [connect(server) for _ in range(3)]
    for c in clients:
        assert c.ask("ping") == b"pong\n"
    server.shutdown()
    for c in clients:
        assert c.line() == b"Server shutting down. bye !\n" and c.closed()


def test_concurrent_hashes_of_one_file_share_one_read(make_server, connect):
    server = make_server(hash_workers=1)
    big = write_file(Path(server.config.root) / "big.bin", 64 << 20)
    clients = [connect(server) for _ in range(5)]
    for c in clients:
        c.send("comphash big.bin\n")
    for c in clients:
        assert c.line() == f"File hash is : {sha1_of(big)}\n".encode()
    assert server.hashing.stats.hashes == 1
    assert server.hashing.stats.hashed_bytes == 64 << 20


def test_unchanged_file_is_answered_from_the_cache(server, connect):
    path = write_file(Path(server.config.root) / "f.bin", 1 << 20)
    c = connect(server)
    for _ in range(3):
        assert c.ask("comphash f.bin") == f"File hash is : {sha1_of(path)}\n".encode()
    assert server.hashing.stats.hashes == 1 and server.hashing.stats.cache_hits == 2


def test_cache_can_be_disabled(make_server, connect):
    server = make_server(hash_cache=0)
    write_file(Path(server.config.root) / "f.bin", 1 << 10)
    c = connect(server)
    for _ in range(3):
        assert c.ask("comphash f.bin").startswith(b"File hash is : ")
    assert server.hashing.stats.hashes == 3


def test_full_queue_answers_busy_at_once(make_server, connect):
    server = make_server(hash_workers=1, max_pending=0, hash_cache=0)
    root = Path(server.config.root)
    write_file(root / "big.bin", 256 << 20)
    write_file(root / "other.bin", 1 << 10)
    hasher = connect(server)
    hasher.send("comphash big.bin\n")
    poll(lambda: server.hashing.pending == 1)
    assert connect(server).ask("comphash other.bin") == (
        b"An error occured : server busy, try again later\n")
    assert hasher.line().startswith(b"File hash is : ")
    assert connect(server).ask("comphash other.bin").startswith(b"File hash is : ")


def test_queued_hash_of_a_client_that_left_is_never_done(make_server, connect):
    server = make_server(hash_workers=1, hash_cache=0)
    root = Path(server.config.root)
    write_file(root / "first.bin", 128 << 20)
    write_file(root / "second.bin", 128 << 20)
    first, second = connect(server), connect(server)
    first.send("comphash first.bin\n")
    poll(lambda: server.hashing.pending == 1)
    second.send("comphash second.bin\n")
    poll(lambda: server.hashing.pending == 2)
    second.reset()
    poll(lambda: server.hashing.pending == 1)
    assert first.line().startswith(b"File hash is : ")
    poll(lambda: server.hashing.stats.hashes == 2)
    assert server.hashing.stats.hashed_bytes == 128 << 20


def test_a_half_close_while_a_command_runs_cancels_nothing(make_server, connect):
    server = make_server(hash_workers=1, hash_cache=0)
    big = write_file(Path(server.config.root) / "big.bin", 64 << 20)
    c = connect(server)
    c.send("comphash big.bin\nping\n")
    poll(lambda: server.hashing.pending == 1)
    c.sock.shutdown(socket.SHUT_WR)  # the client is done asking, and waits for its replies
    assert c.line() == f"File hash is : {sha1_of(big)}\n".encode()
    assert c.line() == b"pong\n"
    assert c.closed()


def test_lastlog_of_a_fifo_times_out_with_one_reader_that_ends_with_the_server(make_server, connect,
                                                                               tmp_path):
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    server = make_server(logfiles=(str(fifo),), command_timeout=0.5)
    c = connect(server)
    for _ in range(3):
        assert c.ask("lastlog") == b"An error occured : lastlog timed out after 0.5 s\n"
    assert c.ask("ping") == b"pong\n"
    assert len(own_children()) <= 1  # one reader for the log, not one per request
    server.shutdown()
    poll(lambda: not own_children())


def test_lastlog_of_a_client_that_left_is_given_up(make_server, connect, tmp_path):
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    server = make_server(logfiles=(str(fifo),), command_timeout=20)
    c = connect(server)
    c.send("lastlog\n")
    poll(lambda: server.stats.command("lastlog").ok + server.stats.command("lastlog").cancelled == 0
         and server.stats.clients == 1)
    c.reset()
    poll(lambda: server.stats.command("lastlog").cancelled == 1 and server.stats.clients == 0)


def test_lastlogs_of_a_file_start_no_process(server, connect):
    clients = [connect(server) for _ in range(10)]
    for _ in range(5):
        for c in clients:
            c.send("lastlog 5\n")
        for c in clients:
            assert len(c.block(b"End lastlog\n")) == 7
    assert own_children() == []


def test_silent_clients_each_wait_in_their_own_greenlet_and_are_served_when_they_speak(server, connect):
    clients = [connect(server) for _ in range(20)]
    poll(lambda: server.stats.clients == 20 and len(server.pool) == 20)
    for c in clients:
        assert c.ask("ping") == b"pong\n"


def test_silent_client_is_cut_at_its_idle_deadline(make_server, connect):
    server = make_server(idle_timeout=0.3)
    c = connect(server)
    assert c.line() == b"Idle timeout. bye !\n" and c.closed()
    poll(lambda: server.stats.clients == 0)


def test_silent_clients_get_the_shutdown_goodbye(server, connect):
    clients = [connect(server) for _ in range(5)]
    poll(lambda: server.stats.clients == 5)
    server.shutdown()
    for c in clients:
        assert c.line() == b"Server shutting down. bye !\n" and c.closed()


def _before_accept(server, request: bytes = b"", *, how: str = "shutdown"):
    """Connect with a blocking socket, which does not yield to the server's loop:
    ``request`` is sent and the connection ended (``how``) before the server accepts."""
    raw = socket.create_connection(("127.0.0.1", server.port))
    raw.sendall(request)
    if how == "reset":
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
        return None
    if how == "close":
        raw.close()
        return None
    raw.shutdown(socket.SHUT_WR)
    return Client(server.port, sock=gevent.socket.socket(fileno=raw.detach()))


def test_client_that_asks_and_hangs_up_before_it_is_accepted_gets_every_reply(server):
    c = _before_accept(server, b"ping\nhelp\nping\n")
    assert c.line() == b"pong\n"
    assert c.block(b"End help\n")[0] == b"Begin help\n"
    assert c.line() == b"pong\n" and c.closed()
    c.close()
    poll(lambda: server.stats.clients == 0)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_gone_before_it_is_accepted_frees_its_slot(make_server, connect, how):
    server = make_server(max_clients=1)
    for number in range(1, 4):
        _before_accept(server, how=how)
        poll(lambda n=number: server.stats.connections == n and server.stats.clients == 0)
    assert connect(server).ask("ping") == b"pong\n"  # no slot was kept


def test_each_client_has_a_greenlet_of_its_own_that_ends_with_it(server, connect):
    clients = [connect(server) for _ in range(50)]
    for c in clients:
        c.send("ping\n")
    for c in clients:
        assert c.line() == b"pong\n"
    assert len(server.pool) == len(clients)
    for c in clients:
        c.close()
    poll(lambda: server.stats.clients == 0 and len(server.pool) == 0,
         message="a greenlet outlives its client")


def test_a_client_that_stops_reading_small_replies_is_cut_at_its_idle_deadline(make_server, connect):
    server = make_server(idle_timeout=1)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted sockets inherit it
    c = connect(server)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.sock.settimeout(0.5)
    try:  # one ping at a time, each reply small enough to be sent whole, until the server stops reading
        for _ in range(200000):
            c.sock.send(b"ping\n")
    except (TimeoutError, BlockingIOError):
        pass
    poll(lambda: server.stats.clients == 0, timeout=10, message="a client that reads nothing keeps its slot")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl (apt-get install openssl)")
def test_a_tls_client_that_stops_reading_is_cut_at_its_idle_deadline(gcmd, tmp_path):
    cert, key = make_certificate(tmp_path)
    big = tmp_path / "big.log"
    big.write_text("".join(f"{n:06d} " + "x" * 8000 + "\n" for n in range(1000)))
    server = gcmd("--tls-cert", cert, "--tls-key", key, "--idle-timeout", 1, "--logfile", f"big={big}")
    reader = tls_client(server.port, cert)
    reader.send("lastlog 1000 big\n")  # 8 MB the client never reads
    wait_for(lambda: "the client accepted no reply bytes in time" in server.log(), timeout=10)
