"""Prometheus metrics at ``/metrics``, read at each scrape from the figures ``stats`` shows.

Nothing is counted twice: the collector turns the server's own counters into
metric families when Prometheus asks, so ``stats`` and ``/metrics`` agree and
the request path pays nothing for the endpoint. The HTTP server is gevent's
WSGI server, in the server's own hub; any other path answers 404. With
``--workers``, each worker serves its own figures on its own port (worker i
on ``--metrics-port`` + i), so that a scrape target is one worker.

A scraper gets the same care as a client of the protocol port, with limits
of its own (constants, not flags: one Prometheus needs one connection): at
most MAX_CONNECTIONS connections are served at once (the next BACKLOG wait
in the listen queue, which costs the process no descriptor), a request must be
read and answered within REQUEST_DEADLINE seconds, and a kept-alive
connection that sends no new request for IDLE_LIMIT seconds is closed. So a
slow or dead scraper (slowloris) holds at most MAX_CONNECTIONS descriptors
for at most REQUEST_DEADLINE seconds, and never takes the protocol port's
(prometheus/client_java#2284 is the same fix in Prometheus' own exporter).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from gcmd import __version__
from gcmd.observe.stats import LATENCY_BUCKETS
from gcmd.serverlog.setup import info_line

if TYPE_CHECKING:
    from gcmd.net.server import GcmdServer

log = logging.getLogger(__name__)


class GcmdCollector:
    """The metric families of one gcmd server, from its counters."""

    def __init__(self, server: GcmdServer) -> None:
        self.server = server

    def collect(self) -> Iterator:
        server = self.server
        stats, hashing = server.stats, server.hashing.stats
        build = GaugeMetricFamily("gcmd_build_info", "The version of gcmd serving; always 1",
                                  labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        yield GaugeMetricFamily("gcmd_clients", "Clients connected now (holding a slot)",
                                value=stats.clients)
        yield GaugeMetricFamily("gcmd_authenticated", "Clients connected now that passed what the "
                                "server asks: a client certificate, a token, or both",
                                value=stats.authenticated)
        yield GaugeMetricFamily("gcmd_max_clients", "Clients served at once before refusing",
                                value=server.config.max_clients)
        yield CounterMetricFamily("gcmd_connections", "Connections accepted, refused or not",
                                  value=stats.connections)
        # every labelled series is there from the start, at 0: one that appeared at
        # its first increment would hide that increment from rate() and increase()
        refused = CounterMetricFamily("gcmd_connections_refused", "Connections refused, by reason",
                                      labels=["reason"])
        for reason, count in sorted(stats.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        yield from _command_families(server)
        yield CounterMetricFamily("gcmd_auth_failures", "Failed auth attempts",
                                  value=stats.auth_failures)
        failed = CounterMetricFamily("gcmd_auth_failures_by_reason", "Failed auth attempts, by reason: "
                                     "bad_token (the --token-file token), bad_user_token, unknown_user",
                                     labels=["reason"])
        for reason, count in sorted(stats.auth_failed.items()):
            failed.add_metric([reason], count)
        yield failed
        yield CounterMetricFamily("gcmd_hash_bytes", "Bytes read and hashed",
                                  value=hashing.hashed_bytes)
        yield CounterMetricFamily("gcmd_hash_runs", "Files read and hashed", value=hashing.hashes)
        yield CounterMetricFamily("gcmd_hash_cache_hits",
                                  "Digests answered from the cache of unchanged files",
                                  value=hashing.cache_hits)
        yield CounterMetricFamily("gcmd_hash_shared", "Digests shared with a concurrent identical request",
                                  value=hashing.shared)
        yield CounterMetricFamily("gcmd_hash_busy", "Hash requests answered 'server busy'",
                                  value=hashing.busy)
        yield GaugeMetricFamily("gcmd_hash_pending", "Hash requests waiting for a thread",
                                value=server.hashing.pending)
        yield CounterMetricFamily("gcmd_log_output_dropped", "Server log lines dropped: the log output "
                                  "took none for a while, or failed", value=getattr(stats.log_output, "dropped", 0))
        yield from _log_families(server.logs.stats())


def _command_families(server: GcmdServer) -> Iterator:
    """Commands by name and outcome, and the latency histogram of the slow ones."""
    stats = server.stats
    timed = {handler.verb for handler in server.commands.figures if handler.slow}
    commands = CounterMetricFamily("gcmd_commands", "Commands received, by name and outcome "
                                   "(ok, error, internal_error, denied, cancelled)",
                                   labels=["command", "outcome"])
    latency = HistogramMetricFamily("gcmd_command_duration_seconds",
                                    "Time from a request to its reply, by command: the slow "
                                    "ones (lastlog, follow until it begins, comphash, hash)",
                                    labels=["command"])
    for command, figures in sorted(stats.by_command.items()):
        for outcome, count in sorted(figures.outcomes.items()):
            commands.add_metric([command, outcome], count)
        if command not in timed:
            continue
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), figures.buckets):
            cumulative += count
            buckets.append((bound, cumulative))
        latency.add_metric([command], buckets, figures.seconds)
    yield commands
    yield latency


def _log_families(logs: dict) -> Iterator:
    """Per-log figures, labelled by the log's name (see gcmd.logs.broadcast.LogStats)."""
    families = (
        (GaugeMetricFamily, "gcmd_log_followers", "Clients following the log now", "followers"),
        (CounterMetricFamily, "gcmd_log_lines_read", "Lines read from the log", "lines_read"),
        (CounterMetricFamily, "gcmd_log_lines_dropped",
         "Lines dropped for followers that did not read them in time", "lines_dropped"),
        (CounterMetricFamily, "gcmd_log_reader_restarts",
         "Times the log's reader process was started again", "reader_restarts"),
    )
    for kind, name, what, figure in families:
        family = kind(name, what, labels=["log"])
        for log_name, figures in logs.items():
            family.add_metric([log_name], getattr(figures, figure))
        yield family


#: the only path served; a scrape of another is a mistake to see at once
METRICS_PATH = "/metrics"


def only_metrics_path(app: Callable) -> Callable:
    """The WSGI ``app`` at METRICS_PATH, and 404 Not Found everywhere else."""

    def serve(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"Not found: the metrics are at {METRICS_PATH}\n".encode()]
        return app(environ, start_response)

    return serve


#: connections served at once; more wait in the listen queue until one ends
MAX_CONNECTIONS = 16
#: connects the kernel queues while MAX_CONNECTIONS are served: they cost gcmd
#: no descriptor, and a scrape queued behind slow ones is served when they end
#: instead of having its connect dropped (gevent's default is 128)
BACKLOG = 1024
#: seconds from a request's first byte (from the connect, for the first request)
#: to the end of its reply
REQUEST_DEADLINE = 5.0
#: seconds a kept-alive connection may stay without sending its next request
IDLE_LIMIT = 5.0


class DeadlineHandler(WSGIHandler):
    """gevent's WSGI handler with a deadline on each request and a limit on the
    wait for the next one; a connection past either is closed, without a reply."""

    #: seconds a request may take, read and reply
    request_deadline = REQUEST_DEADLINE
    #: seconds a kept-alive connection may wait for its next request
    idle_limit = IDLE_LIMIT

    def __init__(self, sock, address, server) -> None:
        super().__init__(sock, address, server)
        self.answered = 0

    def handle_one_request(self) -> object:
        """gevent's, within the deadline; first, on a kept-alive connection, the wait
        for the next request, within the idle limit (None: the connection ends)."""
        if self.answered and not self.within(self.idle_limit, "next request", self.next_request):
            return None
        self.answered += 1
        return self.within(self.request_deadline, "request", super().handle_one_request)

    def next_request(self) -> bytes:
        """The first bytes of the next request, once they came; b"" if the scraper left."""
        try:
            return self.rfile.peek(1)
        except OSError:  # as gevent's read of a request line: a reset is no news
            return b""

    def within(self, seconds: float, what: str, call: Callable[[], object]) -> object:
        """``call()``, or None when it has not returned after ``seconds``."""
        deadline = gevent.Timeout(seconds)
        deadline.start()
        try:
            return call()
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            log.debug("metrics: closed %s:%d, no %s within %g s", *self.client_address[:2], what, seconds)
            return None
        finally:
            deadline.close()

    def handle_error(self, t, v, tb) -> None:
        # gevent's handler passes whatever the application or the reply's write raises
        # to this method, the deadline's Timeout included: that one goes on up to within()
        if isinstance(v, gevent.Timeout):
            raise v
        super().handle_error(t, v, tb)


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (port 0 picks a free one, and the line that
    names it is written whatever the log level)."""

    def __init__(self, server: GcmdServer, host: str, port: int) -> None:
        self.chosen = port == 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GcmdCollector(server))
        self.registry.register(ProcessCollector(registry=None))
        self.http = WSGIServer((host, port), only_metrics_path(make_wsgi_app(self.registry)),
                               log=None, error_log=log, handler_class=DeadlineHandler,
                               spawn=Pool(MAX_CONNECTIONS), backlog=BACKLOG)

    @property
    def port(self) -> int:
        return self.http.address[1]

    def bind(self) -> None:
        """Take the port now (OSError if it cannot be had); start() serves it."""
        self.http.init_socket()

    def start(self) -> None:
        self.http.start()
        host = self.http.address[0]
        info_line(log, "metrics at http://%s:%d%s", f"[{host}]" if ":" in host else host, self.port,
                  METRICS_PATH, always=self.chosen)

    def stop(self) -> None:
        self.http.stop(timeout=1)
