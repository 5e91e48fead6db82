"""Opening a connection, in the client's greenlet: PROXY header, admission, TLS.

The PROXY header comes first (it names the client), then admission (the
slot, --allow, --max-per-ip), then the TLS handshake; with client
certificates required, the handshake comes before admission, so that the
connection line names the certificate. Each step has its deadline
(``client.deadline``, enforced by the server's sweeper).
"""

from __future__ import annotations

import logging
import socket
import ssl
from time import monotonic

import gevent

from gcmd.net import proxy, tls
from gcmd.net.ends import Deadline, Ended

log = logging.getLogger(__name__)

#: seconds a load balancer has to send the PROXY header (at most the idle timeout)
PROXY_TIMEOUT = 5.0
#: seconds between two looks at a PROXY header that arrived in part
PROXY_PARTIAL_WAIT = 0.01
#: seconds a client has to show its certificate (finish its TLS handshake) when
#: one is required: it holds no slot meanwhile (at most the idle timeout)
CERTIFICATE_TIMEOUT = 10.0
#: seconds a refused TLS client has to finish its handshake and read why
REFUSAL_TIMEOUT = 2.0


def open_connection(client) -> None:
    """Read the PROXY header, admit the client, do the TLS handshake; a refused
    client is told so (Ended)."""
    server = client.server
    if server.config.proxy_protocol:
        _read_proxy_header(client)
    context = server.ssl_context  # SIGHUP may replace it; this connection keeps this one
    if context is not None and server.config.tls_client_ca is not None:
        _open_verified(client, context)
        return
    refusal = server.admit(client)
    if refusal is not None and refusal.line is None:
        raise refusal
    if context is not None:
        timeout = server.config.idle_timeout if refusal is None else REFUSAL_TIMEOUT
        _handshake(client, context, min(server.config.idle_timeout, timeout))
    if refusal is not None:
        raise refusal
    client.since = monotonic()


def _open_verified(client, context: ssl.SSLContext) -> None:
    """Check --allow, take the client's certificate in the TLS handshake (a
    failure is a refusal, logged with why), then admit the client. The
    handshakes under way are capped: --max-clients in all, --max-per-ip from
    one address; beyond, the client is closed at once (it holds no slot yet)."""
    server, ip = client.server, client.ip
    refusal = server.screen(client)
    if refusal is not None:
        raise refusal
    if server.config.max_per_ip and server.handshakes[ip] >= server.config.max_per_ip:
        server.stats.refuse("max_per_ip")
        why = "too many handshakes under way from the address"
    elif server.handshakes.total() >= server.config.max_clients:
        server.stats.refuse("max_clients")
        why = "too many handshakes under way"
    else:
        why = None
    if why is not None:
        log.warning("Refused TLS connection from %s: %s", ip, why, extra=client.context)
        raise Ended(why, None)
    server.handshakes[ip] += 1
    try:
        _handshake(client, context, min(server.config.idle_timeout, CERTIFICATE_TIMEOUT))
    except (ssl.SSLError, Ended) as exc:
        why = exc.reason if isinstance(exc, Ended) else tls.handshake_failure(exc)
        server.stats.refuse("tls_handshake")
        log.warning("Refused TLS connection from %s: %s", ip, why, extra=client.context)
        raise Ended(why, None) from None
    finally:
        server.handshakes[ip] -= 1
        if not server.handshakes[ip]:
            del server.handshakes[ip]
    client.client_cn = client.context["client_cn"] = tls.common_name(client.sock.getpeercert())
    refusal = server.admit(client)
    if refusal is not None:
        raise refusal


def _handshake(client, context: ssl.SSLContext, timeout: float) -> None:
    """Wrap the socket in gevent's TLS and do the handshake within ``timeout`` seconds."""
    client.sock = context.wrap_socket(client.sock, server_side=True, do_handshake_on_connect=False)
    client.tls = True
    client.deadline = monotonic() + timeout
    try:
        client.sock.do_handshake()
    except Deadline:
        raise Ended("TLS handshake not finished in time", None) from None
    finally:
        client.deadline = float("inf")


def _read_proxy_header(client) -> None:
    """Take the PROXY header off the socket and serve the client it names.

    Only the header is read (peeking first), so that what follows, requests
    or a TLS handshake, stays for the session."""
    server, sock = client.server, client.sock
    client.deadline = monotonic() + min(server.config.idle_timeout, PROXY_TIMEOUT)
    want = proxy.V1_MAX  # a version 1 header fits; a version 2 one says its length in its first 16 bytes
    try:
        while (found := proxy.parse(peeked := sock.recv(want, socket.MSG_PEEK))) is None:
            if not peeked:
                raise proxy.ProxyError("closed before its PROXY header")
            if peeked.startswith(proxy.V2_SIGNATURE) and len(peeked) >= 16 and want == proxy.V1_MAX:
                want = 16 + int.from_bytes(peeked[14:16], "big")
                continue
            gevent.sleep(PROXY_PARTIAL_WAIT)  # part of a header: the socket stays readable
        size, address = found
        while size:
            chunk = sock.recv(size)
            if not chunk:
                raise proxy.ProxyError("closed within its PROXY header")
            size -= len(chunk)
    except (proxy.ProxyError, OSError, Deadline) as exc:
        server.stats.refuse("proxy_header")
        why = "no complete PROXY header in time" if isinstance(exc, Deadline) else exc
        log.warning("Closed connection from %s: no valid PROXY header (%s)", client.ip, why,
                    extra=client.context)
        raise Ended("no valid PROXY header", None) from None
    finally:
        client.deadline = float("inf")
    if address:
        client.ip = address
        client.context = server.session_context(client.number, address)
