"""The figures of the ``stats`` reply (PROTOCOL.md), gathered from the
counters of the server, of its hashing and of the logs it serves."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gcmd.hashing import HashService
    from gcmd.logs.sources import Logs
    from gcmd.observe.stats import ServerStats


def stats_figures(stats: ServerStats, hashing: HashService, max_clients: int, logs: Logs) -> dict[str, object]:
    """{key: figure} in the order ``stats`` lists them: ``uptime_s`` (seconds),
    ``pid``, the clients and commands counted in ``stats``, the hashing's
    (``hash_bytes`` in bytes), then ``log.NAME.KEY`` for each log served."""
    hashed = hashing.stats
    figures = {
        "uptime_s": stats.uptime_s,
        "pid": os.getpid(),
        "clients": stats.clients,
        "authenticated": stats.authenticated,
        "max_clients": max_clients,
        "connections": stats.connections,
        "commands": stats.commands,
        "errors": stats.errors,
        "internal_errors": stats.internal_errors,
        "rejected": stats.rejected,
        "auth_failures": stats.auth_failures,
        **{f"auth_failures_{reason}": count for reason, count in stats.auth_failed.items()},
        "hash_pending": hashing.pending,
        "hash_bytes": hashed.hashed_bytes,
        "hash_runs": hashed.hashes,
        "hash_cache_hits": hashed.cache_hits,
        "hash_shared": hashed.shared,
        "hash_busy": hashed.busy,
        "log_output_dropped": getattr(stats.log_output, "dropped", 0),
    }
    for name, figures_of_log in logs.stats().items():
        for key, value in vars(figures_of_log).items():
            figures[f"log.{name}.{key}"] = value
    return figures
