"""The figures ``stats`` reports and /metrics exposes, counted by the server as it runs."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

from gcmd.users import AUTH_FAILURES

#: why a connection is refused: over a cap, not allowed, no PROXY header, shutting
#: down, a failed TLS handshake (with --tls-client-ca)
REFUSALS = ("max_clients", "max_per_ip", "not_allowed", "proxy_header", "shutting_down", "tls_handshake")
#: upper bounds, in seconds, of the command latency histogram's buckets
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0)


class CommandStats:
    """One command's answers by outcome, and for a slow command a histogram of how long they took."""

    __slots__ = ("buckets", "cancelled", "denied", "error", "internal_error", "ok", "seconds")

    def __init__(self) -> None:
        self.ok = self.error = self.internal_error = self.denied = self.cancelled = 0
        #: answers that took at most each bucket's bound, then the slower ones (not cumulative)
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.seconds = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds

    @property
    def outcomes(self) -> dict[str, int]:
        """ok, error (an error line), internal_error, denied (not authenticated, or
        not granted to the user), cancelled (no
        reply: the client left or the server stopped): every one, zeros included."""
        return {"ok": self.ok, "error": self.error, "internal_error": self.internal_error,
                "denied": self.denied, "cancelled": self.cancelled}


@dataclass
class ServerStats:
    started: float = field(default_factory=time.monotonic)
    #: clients holding a slot now
    clients: int = 0
    #: clients that passed what the server asks (a client certificate, a token, or both) now
    authenticated: int = 0
    #: connections accepted since start, refused or not
    connections: int = 0
    #: connections refused, by reason (REFUSALS); every reason there from the start, at 0,
    #: so that a Prometheus counter exists before the first refusal
    refused: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(REFUSALS, 0)))
    #: requests answered (blank lines are not requests)
    commands: int = 0
    #: failed ``auth`` requests, by reason (gcmd.users.AUTH_FAILURES), every one there from the start
    auth_failed: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(AUTH_FAILURES, 0)))
    #: answers and their latency, by command name
    by_command: dict[str, CommandStats] = field(default_factory=dict)
    #: the server log's output, whose ``dropped`` counts the lines it dropped (gcmd.serverlog.output.LogOutput)
    log_output: object = None

    @property
    def uptime_s(self) -> int:
        return int(time.monotonic() - self.started)

    @property
    def rejected(self) -> int:
        """Connections refused."""
        return sum(self.refused.values())

    @property
    def auth_failures(self) -> int:
        """Failed ``auth`` requests, whatever the reason."""
        return sum(self.auth_failed.values())

    @property
    def errors(self) -> int:
        """Commands that answered an error line."""
        return sum(figures.error for figures in self.by_command.values())

    @property
    def internal_errors(self) -> int:
        """Commands that failed unexpectedly (logged with a traceback)."""
        return sum(figures.internal_error for figures in self.by_command.values())

    def refuse(self, reason: str) -> None:
        self.refused[reason] += 1

    def command(self, name: str) -> CommandStats:
        """The figures of the command ``name``, counted by whoever holds them."""
        return self.by_command.setdefault(name, CommandStats())
