"""Every setting of gcmd, its default and the values it accepts, in one place.

``Config`` holds what the server needs, ``RunOptions`` what only the gcmd
process needs (its own log, the files it re-reads on SIGHUP). Both check
their values when they are made, so that a Config built by a test obeys the
same rules as one built from flags; a bad value raises ``SettingError``,
whose message is one line naming the flag. Whether a path exists or a name
resolves depends on the machine, not on the value: gcmd.cli checks that.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import ssl
from dataclasses import dataclass, field, fields
from typing import Any

from gcmd.logs.sources import log_sources
from gcmd.users import Users

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
#: the oldest TLS versions --tls-min-version accepts
TLS_VERSIONS = ("1.2", "1.3")

#: the longest a seconds setting may be: a day
MAX_SECONDS = 86400

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 1123 host name labels; a name whose last label is all digits is a
# mistyped IPv4 address (999.1.1.1), not a name
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class SettingError(ValueError):
    """A value gcmd cannot use; ``name`` is the setting (a Config or RunOptions
    field, or a flag's destination such as ``token_file``), the message one line
    that names its flag."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def flag(name: str) -> str:
    """The command line's name of a setting: ``max_clients`` -> ``--max-clients``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Range:
    """The numbers a setting accepts, from ``least`` to ``most``.

    ``kind`` says how they read: ``count`` (whole numbers), ``port`` (whole
    numbers, said as "between"), ``seconds`` (finite numbers; ``above`` also
    refuses ``least`` itself, for a time that must pass).
    """

    least: float
    most: float
    kind: str = "count"
    above: bool = False

    def __str__(self) -> str:
        """The range as --help words it: ``1 to 65535``, ``more than 0, at most 86400``."""
        if self.above:
            return f"more than {self.least:g}, at most {self.most:g}"
        return f"{self.least} to {self.most}"

    def check(self, name: str, value: object) -> None:
        """Raise SettingError unless ``value`` is in the range."""
        if self.kind == "seconds":
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise SettingError(name, f"{flag(name)} must be a finite number of seconds, not {value}")
            if self.above and not value > self.least:
                raise SettingError(name, f"{flag(name)} must be more than {self.least:g} seconds, not {value:g}")
            if not value >= self.least:
                raise SettingError(name, f"{flag(name)} must be {self.least:g} seconds or more, not {value:g}")
            if value > self.most:
                raise SettingError(name, f"{flag(name)} must be at most {self.most:g} seconds, not {value:g}")
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingError(name, f"{flag(name)} must be a whole number, not {value!r}")
        if self.kind == "port" and not self.least <= value <= self.most:
            raise SettingError(name, f"{flag(name)} must be between {self.least} and {self.most}, not {value}")
        if value < self.least:
            raise SettingError(name, f"{flag(name)} must be at least {self.least}, not {value}")
        if value > self.most:
            raise SettingError(name, f"{flag(name)} must be at most {self.most}, not {value}")


def _ranged(least: float, most: float, kind: str = "count", *, above: bool = False,
            **default) -> Any:
    """A dataclass field (``default=`` or ``default_factory=``) whose value must be in a Range."""
    return field(metadata={"range": Range(least, most, kind, above)}, **default)


@dataclass(frozen=True)
class Config:
    """The server's settings; see the flags of the same names (``gcmd --help``)."""

    #: address to listen on: an IPv4 or IPv6 address, or a host name
    host: str = "127.0.0.1"
    #: TCP port; 0 picks a free one (the start-up log line says which)
    port: int = _ranged(0, 65535, "port", default=9999)
    #: directory that comphash and hash may read from
    root: str = field(default_factory=os.getcwd)
    #: the logs lastlog and follow serve, as --logfile gives them ([NAME=]SOURCE: a
    #: file, journal or journal:DIR), the first the default; empty: the first of
    #: /var/log/syslog, /var/log/messages, the journal that can serve, else gcmd's own
    logfiles: tuple[str, ...] = ()
    #: clients served at once; the next one is refused
    max_clients: int = _ranged(1, 1_000_000, default=100)
    #: clients served at once from one address; 0 means unlimited
    max_per_ip: int = _ranged(0, 1_000_000, default=0)
    #: networks allowed to connect; empty means everyone
    allow: tuple[Network, ...] = ()
    #: networks whose connections (health checks) are logged at debug, not info
    quiet_from: tuple[Network, ...] = ()
    #: longest request line in bytes, without the newline
    max_line: int = _ranged(1, 1 << 20, default=8192)
    #: seconds without a complete line (or without reply progress) before a client is cut
    idle_timeout: float = _ranged(0, MAX_SECONDS, "seconds", above=True, default=300.0)
    #: seconds a lastlog (or the start of a follow) may wait for the log before it answers an error
    command_timeout: float = _ranged(0, MAX_SECONDS, "seconds", above=True, default=10.0)
    #: seconds a graceful shutdown waits for running commands
    shutdown_timeout: float = _ranged(0, MAX_SECONDS, "seconds", default=10.0)
    #: the shared secret of ``auth TOKEN``; None disables authentication
    token: bytes | None = None
    #: the users of the --config file's [[user]] tables, as at start (SIGHUP gives
    #: Commands.set_users the table read again); empty: none declared
    users: Users = field(default_factory=Users)
    #: PEM certificate and key; both set means TLS
    tls_cert: str | None = None
    tls_key: str | None = None
    #: PEM CA certificate(s): clients must show a certificate signed by one; None: not asked
    tls_client_ca: str | None = None
    #: the oldest TLS version served: one of TLS_VERSIONS
    tls_min_version: str = "1.2"
    #: threads that read and hash files (by default one per CPU, within the range)
    hash_workers: int = _ranged(1, 1024, default_factory=lambda: min(os.cpu_count() or 1, 1024))
    #: hash requests allowed to wait for a worker before clients get "server busy"
    max_pending: int = _ranged(0, 1_000_000, default=64)
    #: digests remembered for unchanged files; 0 disables the cache
    hash_cache: int = _ranged(0, 1_000_000, default=1024)
    #: listen(2) backlog: how many connects may wait for accept
    backlog: int = _ranged(1, 65535, default=4096)
    #: every connection starts with a PROXY protocol header (v1 or v2) naming the client
    proxy_protocol: bool = False
    #: server processes sharing the port, each with its own max_clients
    workers: int = _ranged(1, 256, default=1)
    #: with workers: each listens on its own SO_REUSEPORT socket (the kernel spreads
    #: connections evenly) instead of all accepting from the one socket of the parent
    reuse_port: bool = False
    #: port of the Prometheus /metrics endpoint (on host); None: no endpoint.
    #: Worker i serves metrics_port + i.
    metrics_port: int | None = None
    #: which of the ``workers`` processes this is, 0 to workers - 1: not a flag,
    #: the supervisor sets it in each worker (its logs name it, its metrics port adds it)
    worker: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            if "range" in f.metadata:
                f.metadata["range"].check(f.name, getattr(self, f.name))
        check_host(self.host)
        try:
            log_sources(list(self.logfiles))
        except ValueError as exc:
            raise SettingError("logfiles", str(exc)) from None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingError("tls_cert", "--tls-cert and --tls-key go together")
        if self.tls_min_version not in TLS_VERSIONS:
            raise SettingError("tls_min_version", f"--tls-min-version must be one of "
                                                  f"{', '.join(TLS_VERSIONS)}, not {self.tls_min_version!r}")
        for name in ("tls_client_ca", "tls_min_version"):
            if getattr(self, name) != getattr(Config, name) and not self.tls:
                raise SettingError(name, f"{flag(name)} needs --tls-cert and --tls-key")
        if self.metrics_port is not None:
            Range(0, 65535 - (self.workers - 1), "port").check("metrics_port", self.metrics_port)
            if self.metrics_port == 0 and self.workers > 1:
                raise SettingError("metrics_port",
                                   "--metrics-port 0 picks one free port: give a port with --workers")
            if self.port and self.metrics_port <= self.port < self.metrics_port + self.workers:
                ports = (f" (ports {self.metrics_port}-{self.metrics_port + self.workers - 1} with --workers "
                         f"{self.workers})" if self.workers > 1 else "")
                raise SettingError("metrics_port", f"--metrics-port {self.metrics_port}{ports} takes the "
                                   f"port of the server (--port {self.port}): give another")
        if self.reuse_port and self.workers == 1:
            raise SettingError("reuse_port", "--reuse-port is for --workers 2 or more")
        if self.reuse_port and not hasattr(socket, "SO_REUSEPORT"):
            raise SettingError("reuse_port", "--reuse-port: this system has no SO_REUSEPORT")
        if not 0 <= self.worker < self.workers:
            raise SettingError("worker", f"worker must be between 0 and {self.workers - 1}, not {self.worker}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


#: the Range of every numeric setting of Config, by field name (for --help)
RANGES: dict[str, Range] = {f.name: f.metadata["range"] for f in fields(Config) if "range" in f.metadata}


@dataclass(frozen=True)
class RunOptions:
    """What the gcmd process needs beside the server's settings."""

    #: least important events logged: one of LOG_LEVELS
    log_level: str = "info"
    #: one of LOG_FORMATS
    log_format: str = "text"
    #: file the server log is appended to (reopened on SIGHUP); None: standard output
    output: str | None = None
    #: file the token was read from, read again on SIGHUP; None: no authentication
    token_file: str | None = None
    #: the TOML file settings were read from; None: none
    config_file: str | None = None

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise SettingError("log_level", f"--log-level must be one of {', '.join(LOG_LEVELS)}, "
                                            f"not {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise SettingError("log_format", f"--log-format must be one of {', '.join(LOG_FORMATS)}, "
                                             f"not {self.log_format!r}")


def check_host(host: str) -> None:
    """Raise SettingError unless ``host`` is an IP address or a well-formed host name."""
    if not host:
        raise SettingError("host", "--host is empty: give 0.0.0.0 or :: to listen on every interface")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if (len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise SettingError("host", f"--host {host!r} is not an IPv4 or IPv6 address, nor a host name")


def parse_networks(texts: list[str] | tuple[str, ...], name: str = "allow") -> tuple[Network, ...]:
    """The networks of ``--allow`` or another CIDR flag (``name``): ``10.0.0.0/8``,
    ``::1``; SettingError names a bad one."""
    networks = []
    for text in texts:
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise SettingError(name, f"{flag(name)} {text!r} is not a network address such as "
                                        f"10.0.0.0/8 or ::1/128") from None
        # as ipaddress does when strict: 10.0.0.1/8 is a typo of 10.0.0.0/8 or of 10.0.0.1/32,
        # and which one decides who gets in
        if network.network_address != ipaddress.ip_interface(text).ip:
            address = ipaddress.ip_interface(text).ip
            raise SettingError(name, f"{flag(name)} {text} has host bits set: give {network} "
                                     f"(the network) or {address}/{address.max_prefixlen} (the address)")
        networks.append(network)
    return tuple(networks)


#: what each file or directory flag asks for, in the words of "--root is empty: give ..."
WANTED = {
    "root": "a directory (. for the current one)",
    "config": "a TOML file",
    "output": "a file (without --output the log goes to standard output)",
    "token_file": "the file that holds the token",
    "tls_cert": "a PEM file of the server's certificate",
    "tls_key": "a PEM file of the private key of --tls-cert",
    "tls_client_ca": "a PEM file of the CA certificates of clients",
}


def check_given(name: str, value: str | None) -> None:
    """Raise SettingError if the path of setting ``name`` (a key of WANTED) is ""."""
    if value == "":
        raise SettingError(name, f"{flag(name)} is empty: give {WANTED[name]}")


#: the most of a --tls-key file read to see whether it holds a key
_PEM_PEEK = 1 << 20


def check_tls_files(cert: str, key: str) -> None:
    """Raise SettingError naming the file of --tls-cert or --tls-key that does not hold
    what it should: a PEM certificate, a PEM private key, the key of that certificate.

    OpenSSL's own error for either ("[SSL] PEM lib") names neither. A file
    that cannot be read is left to the TLS context, which says why.
    """
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        with open(key, "rb") as f:
            key_text = f.read(_PEM_PEEK)
        probe.load_verify_locations(cert)
    except ssl.SSLError:
        raise SettingError("tls_cert", f"--tls-cert {cert} holds no PEM certificate"
                                       + (" (it holds a private key: give it to --tls-key)"
                                          if _holds_key(cert) else "")) from None
    except OSError:
        return
    if b"PRIVATE KEY-----" not in key_text:
        raise SettingError("tls_key", f"--tls-key {key} holds no PEM private key"
                                      + (" (it holds a certificate: give it to --tls-cert)"
                                         if b"-----BEGIN CERTIFICATE-----" in key_text else ""))
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise SettingError("tls_key", f"--tls-key {key} is not the key of the certificate "
                                          f"in --tls-cert {cert}") from None


def _holds_key(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"PRIVATE KEY-----" in f.read(_PEM_PEEK)
    except OSError:
        return False


def read_token(path: str) -> bytes:
    """The token in ``path``; SettingError says what is wrong with the file."""
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as exc:
        raise SettingError("token_file", f"cannot read --token-file {path}: {exc.strerror}") from None
    if not token:
        raise SettingError("token_file", f"--token-file {path} is empty")
    if any(c in token for c in b" \t\r\n"):
        raise SettingError("token_file", f"--token-file {path} must hold one token without spaces")
    return token
