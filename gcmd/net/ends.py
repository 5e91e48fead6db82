"""How a client's life ends: Ended, raised in its own greenlet, and the
exceptions the server raises into that greenlet (gevent's ``Greenlet.kill``);
why a TLS client was refused."""

from __future__ import annotations

import ssl

from gevent import GreenletExit

from gcmd.net.wire import AUTH_REQUIRED_BYE


class Ended(Exception):
    """The client's life is over: why, for the log, and the last line for the
    client (b"": none, but close gently; None: just close)."""

    def __init__(self, reason: str, line: bytes | None = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line


class Deadline(GreenletExit):
    """The client is past its deadline (raised by the server's sweeper)."""


class Shutdown(GreenletExit):
    """The server shuts down."""


class ClientGone(GreenletExit):
    """The connection was reset."""


class Revoked(Ended):
    """SIGHUP removed or changed the user of a client that follows a log: the follow
    ends, and the client is closed as its next request would have been."""

    def __init__(self) -> None:
        super().__init__("its user was removed or changed on SIGHUP", AUTH_REQUIRED_BYE)


def handshake_failure(exc: ssl.SSLError | Ended) -> str:
    """Why the handshake of a client that had to show a certificate failed, for the log."""
    if isinstance(exc, Ended):
        return exc.reason
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate not accepted: {exc.verify_message}"
    if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no client certificate"
    return f"TLS error: {exc.reason or exc}"
