"""The load test's client: gcmd.client, each request reported to locust.

locust's custom-client pattern ("Testing other systems/protocols" in
locust's documentation): a thin wrapper times each call of a method of
:class:`gcmd.client.Client` and fires locust's ``events.request`` (when
given), with a failure for an error reply, a refusal, a timeout or a
dropped connection (every :class:`gcmd.client.GcmdError`). Under locust the
socket module is gevent's, so a user waiting for its reply blocks nobody.

The connection is gcmd.client's: it opens on the first request (with
``auth`` when a token is given, which the first request's time includes),
and a request that finds it closed by the server since the last reply (a
goodbye: ``Idle timeout. bye !``, a restart) is sent again on a new one.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from typing import TypeVar

from gcmd.client import Client, GcmdError, LogLine, Note

Reply = TypeVar("Reply")


def reply_size(reply: object) -> int:
    """The bytes of a reply's content, as locust's ``response_length``: each
    line and its newline, without the Begin/End markers (a log line as
    written in the log; a ``stats`` figure as ``key value``)."""
    if isinstance(reply, str):
        return len(reply.encode()) + 1
    if isinstance(reply, dict):
        return sum(len(f"{key} {value}".encode()) + 1 for key, value in reply.items())
    if isinstance(reply, list):
        return sum(len(item.data) + 1 if isinstance(item, LogLine) else len(item.text) + 1
                   for item in reply if isinstance(item, (LogLine, Note)))
    return 0


class GcmdClient:
    """One gcmd.client connection whose requests locust sees (``fire``:
    ``environment.events.request.fire``; None: nothing reported)."""

    def __init__(self, host: str, port: int, *, timeout: float = 10.0, tls: ssl.SSLContext | None = None,
                 token: str | None = None, fire: Callable[..., None] | None = None) -> None:
        self.client = Client(host, port, ssl=tls, token=token or None, timeout=timeout)
        self.fire = fire

    def request(self, name: str, call: Callable[..., Reply], *args) -> Reply:
        """``call(*args)``, a method of ``self.client``, reported to locust as
        ``name``; its reply, or its GcmdError raised once reported."""
        started = time.perf_counter()
        reply = None
        error: GcmdError | None = None
        try:
            reply = call(*args)
        except GcmdError as exc:
            error = exc
        if self.fire is not None:
            self.fire(request_type="gcmd", name=name, response_time=(time.perf_counter() - started) * 1000,
                      response_length=reply_size(reply), exception=error, context={})
        if error is not None:
            raise error
        return reply

    def ping(self) -> str:
        return self.request("ping", self.client.ping)

    def comphash(self, path: str) -> str:
        return self.request("comphash", self.client.comphash, path)

    def lastlog(self, lines: int) -> list:
        return self.request("lastlog", self.client.lastlog, lines)

    def stats(self) -> dict:
        return self.request("stats", self.client.stats)

    def close(self) -> None:
        self.client.close()
