"""The errors of gcmd.client, and the reply lines of the server that each one stands for."""

from __future__ import annotations


class GcmdError(Exception):
    """Something went wrong talking to gcmd; the base of every error of gcmd.client.

    ``address``: the server as ``host:port``; ``message``: what went wrong;
    ``reply``: the server's line that said so (text, without its newline),
    or None when it said nothing. ``str()`` gives ``address: message``.
    """

    def __init__(self, message: str, *, address: str = "", reply: str | None = None) -> None:
        super().__init__(f"{address}: {message}" if address else message)
        self.message = message
        self.address = address
        self.reply = reply


class CommandError(GcmdError):
    """A command failed: the server's error line (``An error occured : ...``),
    a usage line, ``Please provide a path.`` or ``Command not found.``.
    The connection stays usable."""


class PermissionDenied(CommandError):
    """The user this connection is may not run the command, or read the path
    (``An error occured : Permission denied: ...``)."""


class AuthenticationError(GcmdError):
    """The server refused the token (``Authentication failed. bye !``), asks
    for one that was not given (``Authentication required.``), or asks for
    none while one was given (``Authentication is not enabled.``)."""


class Refused(GcmdError):
    """The server said goodbye and closed the connection: ``Too many
    connections. bye !``, ``Server shutting down. bye !``, ``Idle timeout.
    bye !``, ``Line too long. bye !``. ``reply`` holds the line."""


class ProtocolError(GcmdError):
    """The server does not speak protocol 1.2 or later, or said something
    this client cannot read."""


class Timeout(GcmdError):
    """No (whole) reply within the client's ``timeout``; the connection is closed."""


class ConnectionLost(GcmdError):
    """The connection was closed or reset before the reply was whole."""


class Unreachable(GcmdError):
    """No connection could be made: refused, no such host, no answer to the
    connection within ``timeout``, or a TLS handshake that failed."""


#: the starts of replies that are a command's failure, and the error they become
_FAILURES = ((b"An error occured : Permission denied", PermissionDenied),
             (b"An error occured : ", CommandError), (b"Usage: ", CommandError))
#: whole replies that are a failure
_FAILED = {b"Please provide a path.": CommandError, b"Command not found.": CommandError,
           b"Authentication required.": AuthenticationError,
           b"Authentication failed. bye !": AuthenticationError,
           b"Authentication required. bye !": AuthenticationError,
           b"Authentication is not enabled.": AuthenticationError}
#: how the server's last line on a connection ends
BYE = b" bye !"


def error_of(line: bytes, address: str) -> GcmdError | None:
    """The error a reply's first ``line`` (without its newline) says, or None;
    ``address`` (``host:port``) names the server in it."""
    text = line.decode("utf-8", "replace")
    if line in _FAILED:
        return _FAILED[line](text, address=address, reply=text)
    if line.endswith(BYE):
        return Refused(text, address=address, reply=text)
    for start, error in _FAILURES:
        if line.startswith(start):
            return error(text, address=address, reply=text)
    return None


class Stale(Exception):
    """The connection ended before a reply began: ``error`` says how."""

    def __init__(self, error: GcmdError) -> None:
        super().__init__(str(error))
        self.error = error
