"""Opening a TLS or PROXY connection, in its greenlet: Opening.

The PROXY header comes first (it names the client), then admission (the
slot, --allow, --max-per-ip), then the TLS handshake; with client
certificates required, the handshake comes before admission, so that the
connection line names the certificate. Every wait is Connection.wait, under
the connection's one idle deadline.
"""

from __future__ import annotations

import logging
import socket
import ssl
from time import monotonic

import gevent

from gcmd.net import proxy, tls
from gcmd.net.connection import (
    DEADLINE,
    FAREWELL_TIMEOUT,
    READ,
    WRITE,
    Connection,
    Ended,
)

log = logging.getLogger(__name__)

#: seconds a load balancer has to send the PROXY header (at most the idle timeout)
PROXY_TIMEOUT = 5.0
#: seconds between two looks at a PROXY header that arrived in part
PROXY_PARTIAL_WAIT = 0.01
#: seconds a client has to show its certificate (finish its TLS handshake) when
#: one is required: it holds no slot meanwhile (at most the idle timeout)
CERTIFICATE_TIMEOUT = 10.0


class Opening(Connection):
    """A connection that opens itself: PROXY header, admission, TLS handshake."""

    __slots__ = ()

    def _open(self) -> None:
        """Read the PROXY header, admit the client, do the TLS handshake. A refused
        client is told so (Ended). When client certificates are required, the
        handshake comes before admission, so that the connection line names the
        certificate."""
        server = self.server
        if server.config.proxy_protocol:
            self._read_proxy_header()
        context = server.ssl_context  # SIGHUP may replace it; this connection keeps this one
        if server.config.tls_client_ca is not None:
            self._open_verified(context)
            return
        refusal = server.admit(self)
        if refusal is not None and refusal.line is None:
            raise refusal
        if context is not None:
            self._wrap(context)
            if refusal is not None:
                self._progress(min(server.config.idle_timeout, FAREWELL_TIMEOUT))
            self._handshake()
        if refusal is not None:
            raise refusal

    def _open_verified(self, context: ssl.SSLContext) -> None:
        """Check --allow, take the client's certificate in the TLS handshake (a
        failure is a refusal, logged with why), then admit the client."""
        server = self.server
        refusal = server.screen(self)
        if refusal is not None:
            raise refusal
        self._count_handshake()
        try:  # the count goes down whatever happens, a reset before the wrap too
            self._wrap(context)
            self._progress(min(server.config.idle_timeout, CERTIFICATE_TIMEOUT))
            self._handshake()
        except (ssl.SSLError, Ended) as exc:
            why = exc.reason if isinstance(exc, Ended) else tls.handshake_failure(exc)
            server.stats.refuse("tls_handshake")
            log.warning("Refused TLS connection from %s: %s", self.ip, why, extra=self.context)
            raise Ended(why, None) from None
        finally:
            server.handshakes[self.ip] -= 1
            if not server.handshakes[self.ip]:
                del server.handshakes[self.ip]
        self.client_cn = self.context["client_cn"] = tls.common_name(self.sock.getpeercert())
        self._progress()
        refusal = server.admit(self)
        if refusal is not None:
            raise refusal

    def _count_handshake(self) -> None:
        """Count a handshake before admission, within --max-clients handshakes in
        all and --max-per-ip from one address; beyond, the client is closed at
        once (it holds no slot yet, and could not read a refusal line)."""
        server, ip = self.server, self.ip
        if server.config.max_per_ip and server.handshakes[ip] >= server.config.max_per_ip:
            server.stats.refuse("max_per_ip")
            why = "too many handshakes under way from the address"
        elif server.handshakes.total() >= server.config.max_clients:
            server.stats.refuse("max_clients")
            why = "too many handshakes under way"
        else:
            server.handshakes[ip] += 1
            return
        log.warning("Refused TLS connection from %s: %s", ip, why, extra=self.context)
        raise Ended(why, None)

    def _wrap(self, context: ssl.SSLContext) -> None:
        self.sock = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.tls = True

    def _handshake(self) -> None:
        while True:
            try:
                self.sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                reason = self.wait(READ)
            except ssl.SSLWantWriteError:
                reason = self.wait(WRITE)
            if reason is DEADLINE:
                raise Ended("TLS handshake not finished in time", None)

    def _read_proxy_header(self) -> None:
        """Take the PROXY header off the socket and serve the client it names.

        Only the header is read (peeking first), so that what follows, requests
        or a TLS handshake, stays for the session."""
        self._progress(min(self.server.config.idle_timeout, PROXY_TIMEOUT))
        try:
            while True:
                peeked = self.recv(proxy.V2_MAX, socket.MSG_PEEK)
                if peeked == b"":
                    raise proxy.ProxyError("closed before its PROXY header")
                found = proxy.parse(peeked) if peeked else None
                if found is not None:
                    break
                if monotonic() >= self.deadline:
                    raise proxy.ProxyError("no complete PROXY header in time")
                if peeked:  # part of a header: the socket stays readable, look again shortly
                    gevent.sleep(PROXY_PARTIAL_WAIT)
                elif self.wait(READ) is DEADLINE:
                    raise proxy.ProxyError("no complete PROXY header in time")
            size, address = found
            while size:
                chunk = self.recv(size)
                if chunk == b"":
                    raise proxy.ProxyError("closed within its PROXY header")
                size -= len(chunk or b"")
            self._progress()  # the header's own deadline is over: the idle timeout runs
        except (proxy.ProxyError, OSError) as exc:
            self.server.stats.refuse("proxy_header")
            log.warning("Closed connection from %s: no valid PROXY header (%s)", self.ip, exc,
                        extra=self.context)
            raise Ended("no valid PROXY header", None) from None
        if address:
            self.ip = address
            self.context = self.server.session_context(self.number, address)
