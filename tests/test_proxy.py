"""HAProxy's PROXY protocol: the header table, then a server on port 0 behind it."""

import ipaddress
import logging
import socket
import struct

import gevent
import pytest
from support import poll, wait_for

from gcmd.net.proxy import V2_SIGNATURE, ProxyError, parse

pytestmark = pytest.mark.timeout(30)


def v2(command: int = 1, family: int = 1, protocol: int = 1, addresses: bytes = b"",
       tlvs: bytes = b"") -> bytes:
    body = addresses + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family << 4 | protocol, len(body)) + body


def v2_tcp4(source: str, destination: str = "10.0.0.1", sport: int = 40000, dport: int = 9999,
            **kw) -> bytes:
    addresses = (ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address(destination).packed
                 + struct.pack("!HH", sport, dport))
    return v2(addresses=addresses, **kw)


def v2_tcp6(source: str, destination: str = "2001:db8::1") -> bytes:
    addresses = (ipaddress.IPv6Address(source).packed + ipaddress.IPv6Address(destination).packed
                 + struct.pack("!HH", 40000, 9999))
    return v2(family=2, addresses=addresses)


V1_TCP4 = b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 9999\r\n"
V2_TCP4 = v2_tcp4("203.0.113.7")


@pytest.mark.parametrize(("data", "expected"), [
    (V1_TCP4, (len(V1_TCP4), "203.0.113.7")),
    (V1_TCP4 + b"ping\n", (len(V1_TCP4), "203.0.113.7")),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 56324 9999\r\n", (47, "2001:db8::7")),
    (b"PROXY UNKNOWN\r\n", (15, None)),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", (35, None)),
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 5", None),
    (b"PRO", None),
    (V2_TCP4, (len(V2_TCP4), "203.0.113.7")),
    (V2_TCP4 + b"ping\n", (len(V2_TCP4), "203.0.113.7")),
    (v2_tcp4("198.51.100.9", tlvs=b"\x05\x00\x02id"), (16 + 12 + 5, "198.51.100.9")),
    (v2_tcp6("2001:db8::7"), (16 + 36, "2001:db8::7")),
    # one address per client: IPv4-mapped IPv6 is the IPv4 address; IPv6 compressed
    (b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:10.0.0.1 56324 9999\r\n", (56, "192.0.2.7")),
    (b"PROXY TCP6 ::ffff:c000:207 ::1 56324 9999\r\n", (43, "192.0.2.7")),
    (b"PROXY TCP6 2001:0db8:0000::0007 ::1 56324 9999\r\n", (48, "2001:db8::7")),
    (v2_tcp6("::ffff:192.0.2.7"), (16 + 36, "192.0.2.7")),
    (v2(command=0), (16, None)),  # LOCAL: a health check of the load balancer
    (v2(family=3, addresses=b"\x00" * 216), (16 + 216, None)),  # a UNIX socket
    (v2(family=1, protocol=2, addresses=b"\x00" * 12), (28, None)),  # UDP
    (V2_TCP4[:20], None),
    (V2_SIGNATURE[:7], None),
])
def test_header(data, expected):
    assert parse(data) == expected


@pytest.mark.parametrize("data", [
    b"ping\n",
    b"GET / HTTP/1.0\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 56324\r\n",
    b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 70000 9999\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 +1 9999\r\n",
    b"PROXY TCP5 203.0.113.7 10.0.0.1 1 2\r\n",
    b"PROXY \r\n",
    b"PROXY TCP6 fe80::1%\x1b]0;x\x07\nFORGED ::1 1 2\r\n",  # a scope may hold any byte
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    b"PROXY " + b"1" * 120,
    V2_SIGNATURE + b"\x10\x11\x00\x0c" + b"\x00" * 12,  # version 1 in a v2 signature
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # command 2
    v2(addresses=b"\x00" * 4),  # too short for two IPv4 addresses and ports
])
def test_invalid_header(data):
    with pytest.raises(ProxyError):
        parse(data)


# --- behind a load balancer ------------------------------------------------------------

@pytest.mark.parametrize("header", [V1_TCP4, V2_TCP4], ids=["v1", "v2"])
def test_served_as_the_client_the_header_names(make_server, connect, caplog, header):
    server = make_server(proxy_protocol=True)
    c = connect(server)
    with caplog.at_level(logging.INFO, logger="gcmd"):
        c.send(header + b"ping\n")
        assert c.line() == b"pong\n"
        assert c.ask("ping") == b"pong\n"
    assert "Client connection from 203.0.113.7" in caplog.text
    assert "Cmd received from 203.0.113.7 : ping" in caplog.text
    assert server.per_ip == {"203.0.113.7": 1}


@pytest.mark.parametrize("header", [
    b"PROXY TCP6 ::ffff:203.0.113.7 ::ffff:10.0.0.1 56324 9999\r\n", v2_tcp6("::ffff:203.0.113.7")],
    ids=["v1", "v2"])
def test_a_mapped_address_is_the_same_client_as_its_ipv4_address(make_server, connect, caplog, header):
    server = make_server(proxy_protocol=True, max_per_ip=1,
                         allow=(ipaddress.ip_network("::ffff:203.0.113.0/120"),))
    first = connect(server)
    with caplog.at_level(logging.INFO, logger="gcmd"):
        assert first.ask(V1_TCP4 + b"ping") == b"pong\n"  # IPv4, allowed by the mapped network
        second = connect(server)
        second.send(header)
        assert second.line() == b"Too many connections from your address. bye !\n"
    assert "Client connection from 203.0.113.7" in caplog.text and "::ffff" not in caplog.text
    assert server.per_ip == {"203.0.113.7": 1}


def test_header_split_across_writes(make_server, connect):
    server = make_server(proxy_protocol=True)
    c = connect(server)
    for part in (V2_TCP4[:5], V2_TCP4[5:17], V2_TCP4[17:] + b"pi"):
        c.send(part)
        gevent.sleep(0.02)
    c.send(b"ng\n")
    assert c.line() == b"pong\n"
    assert server.per_ip == {"203.0.113.7": 1}


def test_health_check_without_an_address_is_served(make_server, connect):
    server = make_server(proxy_protocol=True)
    c = connect(server)
    c.send(v2(command=0) + b"ping\n")
    assert c.line() == b"pong\n"
    assert server.per_ip == {"127.0.0.1": 1}


@pytest.mark.parametrize("start", [b"ping\n", b"PROXY TCP4 1.2.3.4\r\n", b"\r\n\r\n\x00\r\nQUIT\n\x99\x11\x00\x00"])
def test_connection_without_a_valid_header_is_closed(make_server, connect, caplog, start):
    server = make_server(proxy_protocol=True)
    c = connect(server)
    with caplog.at_level(logging.WARNING, logger="gcmd"):
        c.send(start)
        assert c.closed() and c.buf == b""
    assert "no valid PROXY header" in caplog.text
    assert server.stats.clients == 0 and server.stats.rejected == 1


def test_clients_silent_after_their_header_are_admitted_and_served_when_they_speak(make_server, connect):
    server = make_server(proxy_protocol=True)
    clients = [connect(server) for _ in range(5)]
    for c in clients:
        c.send(V1_TCP4)
    poll(lambda: server.stats.clients == 5, timeout=2, message="the silent clients are not admitted")
    for c in clients:
        assert c.ask("ping") == b"pong\n"
    assert server.per_ip == {"203.0.113.7": 5}


def test_client_waiting_for_its_next_request_as_shutdown_begins_gets_the_goodbye(make_server, connect):
    # served in the greenlet that read its header, and still holding it
    server = make_server(proxy_protocol=True)
    c = connect(server)
    c.send(V1_TCP4 + b"ping\n")
    assert c.line() == b"pong\n"
    stopping = gevent.spawn(server.shutdown)
    assert c.line() == b"Server shutting down. bye !\n" and c.closed()
    stopping.join()


def test_silent_connection_is_closed_without_holding_a_slot(make_server, connect):
    server = make_server(proxy_protocol=True, idle_timeout=0.3, max_clients=1)
    silent = connect(server)
    assert connect(server).ask(V1_TCP4 + b"ping") == b"pong\n"
    assert silent.closed()


def test_limits_apply_to_the_address_in_the_header(make_server, connect):
    server = make_server(proxy_protocol=True, max_per_ip=1,
                         allow=(ipaddress.ip_network("203.0.113.0/24"),))
    first = connect(server)
    assert first.ask(V1_TCP4 + b"ping") == b"pong\n"
    other_client = connect(server)
    assert other_client.ask(V1_TCP4.replace(b".7 ", b".8 ") + b"ping") == b"pong\n"
    same_client = connect(server)
    same_client.send(V2_TCP4)
    assert same_client.line() == b"Too many connections from your address. bye !\n"
    outside = connect(server)
    outside.send(V1_TCP4.replace(b"203.0.113.7", b"198.51.100.1"))
    assert outside.closed() and outside.buf == b""


def test_flag_is_documented_and_accepted(tmp_path):
    from gcmd.cli import build_parser, parse_args

    assert "--proxy-protocol" in build_parser().format_help()
    config, _ = parse_args(["--proxy-protocol", "--root", str(tmp_path)])
    assert config.proxy_protocol


def test_real_process_behind_a_header(gcmd):
    process = gcmd("--proxy-protocol")
    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
        sock.sendall(V1_TCP4 + b"ping\nexit\n")
        assert sock.recv(64) == b"pong\n"
    wait_for(lambda: "Cmd received from 203.0.113.7 : ping" in process.log())


@pytest.mark.slow
@pytest.mark.timeout(20)
def test_a_client_silent_after_its_header_has_the_whole_idle_timeout(make_server, connect):
    # the header has its own 5 s; after it, the idle timeout runs
    server = make_server(proxy_protocol=True, idle_timeout=30)
    c = connect(server)
    c.send(V1_TCP4)
    gevent.sleep(6)  # the silence itself is what is tested
    assert c.ask("ping") == b"pong\n"
