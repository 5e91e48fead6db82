"""Opening a connection, in the client's greenlet: the PROXY header (it names the
client), --allow, then admission and the TLS handshake; with client certificates
required, the handshake first, so that the connection line names the certificate.
Each step sets ``client.deadline`` (the server's sweeper enforces it)."""

from __future__ import annotations

import socket
import ssl
from time import monotonic

import gevent

from gcmd.net import proxy, tls
from gcmd.net.ends import Deadline, Ended

#: seconds a load balancer has to send the PROXY header, and between two looks at one that came in part
PROXY_TIMEOUT, PROXY_PARTIAL_WAIT = 5.0, 0.01
#: seconds a client has to finish its TLS handshake when a certificate is required (it holds
#: no slot meanwhile), and a refused TLS client to read why (each at most the idle timeout)
CERTIFICATE_TIMEOUT, REFUSAL_TIMEOUT = 10.0, 2.0


def open_connection(client) -> None:
    """Read the PROXY header, screen, admit, do the TLS handshake; Ended when refused."""
    server, config = client.server, client.server.config
    if config.proxy_protocol:
        _read_proxy_header(client)
    server.screen(client)
    context = server.ssl_context  # SIGHUP may replace it; this connection keeps this one
    if context is not None and config.tls_client_ca is not None:
        _verify(client, context)
        context = None
    refusal = server.admit(client)
    if context is not None and (refusal is None or refusal.line is not None):
        _handshake(client, context, config.idle_timeout if refusal is None else REFUSAL_TIMEOUT)
    if refusal is not None:
        raise refusal


def _verify(client, context: ssl.SSLContext) -> None:
    """The handshake of a client that must show a certificate: a failure is a refusal,
    logged with why. Handshakes under way are capped (--max-clients in all, --max-per-ip
    from one address): beyond, the client is closed at once."""
    server, ip, config = client.server, client.ip, client.server.config
    under_way = server.handshakes
    if config.max_per_ip and under_way[ip] >= config.max_per_ip:
        raise _refused(client, "max_per_ip", "too many handshakes under way from the address")
    if under_way.total() >= config.max_clients:
        raise _refused(client, "max_clients", "too many handshakes under way")
    under_way[ip] += 1
    try:
        _handshake(client, context, CERTIFICATE_TIMEOUT)
    except (ssl.SSLError, Ended) as exc:
        why = exc.reason if isinstance(exc, Ended) else tls.handshake_failure(exc)
        raise _refused(client, "tls_handshake", why) from None
    finally:
        under_way[ip] -= 1
        if not under_way[ip]:
            del under_way[ip]
    client.client_cn = client.context["client_cn"] = tls.common_name(client.sock.getpeercert())


def _refused(client, figure: str, why: str) -> Ended:
    return client.server.refuse(client, figure, why, f"Refused TLS connection from {client.ip}: {why}")


def _handshake(client, context: ssl.SSLContext, seconds: float) -> None:
    """Wrap the socket in gevent's TLS and do the handshake within ``seconds`` (at most the
    idle timeout); Ended when it does not end in time."""
    client.sock = context.wrap_socket(client.sock, server_side=True, do_handshake_on_connect=False)
    client.tls = True
    client.deadline = monotonic() + min(seconds, client.server.config.idle_timeout)
    try:
        client.sock.do_handshake()
    except Deadline:
        raise Ended("TLS handshake not finished in time", None) from None
    finally:
        client.deadline = float("inf")


def _read_proxy_header(client) -> None:
    """Take the PROXY header off the socket (peeking first: what follows stays) and
    serve the client it names; Ended (logged) without a valid one in time."""
    sock = client.sock
    client.deadline = monotonic() + min(client.server.config.idle_timeout, PROXY_TIMEOUT)
    want = proxy.V1_MAX  # a version 2 header says its length in its first 16 bytes
    try:
        while (found := proxy.parse(peeked := sock.recv(want, socket.MSG_PEEK))) is None:
            if not peeked:
                raise proxy.ProxyError("closed before its PROXY header")
            if peeked.startswith(proxy.V2_SIGNATURE) and len(peeked) >= 16 and want == proxy.V1_MAX:
                want = 16 + int.from_bytes(peeked[14:16], "big")
            else:
                gevent.sleep(PROXY_PARTIAL_WAIT)  # part of a header: the socket stays readable
        size, address = found
        while size:
            chunk = sock.recv(size)
            if not chunk:
                raise proxy.ProxyError("closed within its PROXY header")
            size -= len(chunk)
    except (proxy.ProxyError, OSError, Deadline) as exc:
        why = "no complete PROXY header in time" if isinstance(exc, Deadline) else exc
        raise client.server.refuse(client, "proxy_header", "no valid PROXY header",
                                   f"Closed connection from {client.ip}: no valid PROXY header ({why})") from None
    finally:
        client.deadline = float("inf")
    if address:
        client.name(address)
