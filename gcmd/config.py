"""Every setting of gcmd, its default, in one place."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

#: the tutorial server read this log; most Debian-like machines still have it
DEFAULT_LOGFILE = "/var/log/syslog"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Config:
    #: address to listen on; IPv4 or IPv6
    host: str = "127.0.0.1"
    #: TCP port; 0 picks a free one (the start-up log line says which)
    port: int = 9999
    #: directory that comphash and hash may read from
    root: str = field(default_factory=os.getcwd)
    #: the file lastlog shows the tail of
    logfile: str = DEFAULT_LOGFILE
    #: clients served at once; the next one is refused
    max_clients: int = 100
    #: clients served at once from one address; 0 means unlimited
    max_per_ip: int = 0
    #: networks allowed to connect; empty means everyone
    allow: tuple[Network, ...] = ()
    #: longest request line in bytes, without the newline
    max_line: int = 8192
    #: seconds without a complete line (or without reply progress) before a client is cut
    idle_timeout: float = 300.0
    #: seconds a tail may run before it is killed
    command_timeout: float = 10.0
    #: seconds a graceful shutdown waits for running commands
    shutdown_timeout: float = 10.0
    #: the shared secret of ``auth TOKEN``; None disables authentication
    token: bytes | None = None
    #: PEM certificate and key; both set means TLS
    tls_cert: str | None = None
    tls_key: str | None = None
    #: threads that read and hash files
    hash_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: hash requests allowed to wait for a worker before clients get "server busy"
    max_pending: int = 64
    #: digests remembered for unchanged files; 0 disables the cache
    hash_cache: int = 1024
    #: listen(2) backlog: how many connects may wait for accept
    backlog: int = 4096
    #: every connection starts with a PROXY protocol header (v1 or v2) naming the client
    proxy_protocol: bool = False
    #: server processes sharing the port, each with its own max_clients
    workers: int = 1
    #: port of the Prometheus /metrics endpoint (on host); None: no endpoint
    metrics_port: int | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
