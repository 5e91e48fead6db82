"""The ``gcmd`` command: flags -> Config, logging, start, wait for a signal, stop."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import logging
import os
import resource
import signal
import ssl
import sys
import threading
import time

try:
    import tomllib
except ModuleNotFoundError:  # Python before 3.11
    import tomli as tomllib

import gevent
import gevent.ssl
from gevent.event import Event

from gcmd import __version__
from gcmd.config import DEFAULT_LOGFILE, Config

log = logging.getLogger("gcmd")

LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    d = Config(root=".")
    p = argparse.ArgumentParser(
        prog="gcmd",
        description="A line-command server: lastlog, comphash, hash, ping, stats over TCP.",
        epilog="Try it: gcmd --port 9999, then: printf 'ping\\nexit\\n' | nc 127.0.0.1 9999")
    p.add_argument("--version", action="version", version=f"gcmd {__version__}")
    p.add_argument("--config", metavar="FILE",
                   help="read settings from a TOML file whose keys are these long flag names "
                        "(port = 9999, max-clients = 50, allow = [\"10.0.0.0/8\"]); "
                        "flags on the command line win (default: none)")
    net = p.add_argument_group("network")
    net.add_argument("--host", default=d.host,
                     help="IPv4 or IPv6 address to listen on (default: %(default)s)")
    net.add_argument("--port", type=int, default=d.port,
                     help="TCP port; 0 picks a free one (default: %(default)s)")
    net.add_argument("--backlog", type=int, default=d.backlog,
                     help="connections waiting to be accepted (default: %(default)s)")
    net.add_argument("--proxy-protocol", action="store_true",
                     help="expect HAProxy's PROXY header (v1 or v2) on every connection and "
                          "serve, log and limit the client it names; only for a gcmd that "
                          "nobody but the load balancer can reach (default: off)")
    net.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (default: off)")
    net.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert (default: none)")
    ops = p.add_argument_group("processes and metrics")
    ops.add_argument("--workers", type=int, default=d.workers, metavar="N",
                     help="server processes sharing the port, supervised by this one; "
                          "--max-clients applies to each (default: %(default)s)")
    ops.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                     help="serve Prometheus metrics at http://HOST:PORT/metrics; with "
                          "--workers N, worker i serves PORT+i (default: off)")
    srv = p.add_argument_group("what is served")
    srv.add_argument("--root", default=None,
                     help="directory comphash and hash may read (default: the current directory)")
    srv.add_argument("--logfile", default=d.logfile,
                     help="log file lastlog shows (default: %(default)s)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-clients", type=int, default=d.max_clients,
                     help="clients served at once (default: %(default)s)")
    lim.add_argument("--max-per-ip", type=int, default=d.max_per_ip, metavar="N",
                     help="clients served at once from one address; 0 is unlimited (default: %(default)s)")
    lim.add_argument("--allow", action="append", default=[], metavar="CIDR",
                     help="accept clients only from this network; repeatable (default: everyone)")
    lim.add_argument("--max-line", type=int, default=d.max_line,
                     help="longest request in bytes (default: %(default)s)")
    lim.add_argument("--idle-timeout", type=float, default=d.idle_timeout, metavar="SECONDS",
                     help="close a client silent (or not reading) this long (default: %(default)g)")
    lim.add_argument("--command-timeout", type=float, default=d.command_timeout, metavar="SECONDS",
                     help="kill a tail running this long (default: %(default)g)")
    lim.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout, metavar="SECONDS",
                     help="on SIGTERM, wait this long for running commands (default: %(default)g)")
    lim.add_argument("--hash-workers", type=int, default=d.hash_workers, metavar="N",
                     help="threads that hash files (default: the number of CPUs, %(default)s here)")
    lim.add_argument("--max-pending", type=int, default=d.max_pending, metavar="N",
                     help="hash requests that may wait for a thread before 'server busy' "
                          "(default: %(default)s)")
    lim.add_argument("--hash-cache", type=int, default=d.hash_cache, metavar="N",
                     help="digests of unchanged files remembered; 0 disables (default: %(default)s)")
    sec = p.add_argument_group("security")
    sec.add_argument("--token-file", metavar="FILE",
                     help="require 'auth TOKEN' with the token in this file (default: off)")
    out = p.add_argument_group("server log (standard output)")
    out.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                     help="least important events logged (default: %(default)s)")
    out.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="one line per event, as text or JSON (default: %(default)s)")
    out.add_argument("--quiet", action="store_true",
                     help="log warnings and errors only; the same as --log-level warning")
    out.add_argument("--output", metavar="FILE",
                     help="append the server log to FILE instead of standard output; "
                          "SIGHUP reopens it, for logrotate (default: standard output)")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """The Config the flags describe; a bad setting exits 2 with one message."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser.parse_args(argv)
    if a.config is not None:
        a = parser.parse_args(config_file_args(parser, a.config, argv) + argv)
    fail = parser.error
    if not 0 <= a.port <= 65535:
        fail(f"--port must be between 0 and 65535, not {a.port}")
    for flag, value, least in (("--max-clients", a.max_clients, 1), ("--max-line", a.max_line, 1),
                               ("--backlog", a.backlog, 1), ("--hash-workers", a.hash_workers, 1),
                               ("--max-per-ip", a.max_per_ip, 0), ("--max-pending", a.max_pending, 0),
                               ("--hash-cache", a.hash_cache, 0), ("--workers", a.workers, 1)):
        if value < least:
            fail(f"{flag} must be at least {least}, not {value}")
    for flag, value in (("--idle-timeout", a.idle_timeout), ("--command-timeout", a.command_timeout)):
        if not value > 0:
            fail(f"{flag} must be more than 0 seconds, not {value:g}")
    if not a.shutdown_timeout >= 0:
        fail(f"--shutdown-timeout must be 0 seconds or more, not {a.shutdown_timeout:g}")
    if a.metrics_port is not None and not 0 <= a.metrics_port <= 65535 - (a.workers - 1):
        fail(f"--metrics-port must be between 0 and {65535 - (a.workers - 1)}, not {a.metrics_port}")
    if a.metrics_port == 0 and a.workers > 1:
        fail("--metrics-port 0 picks one free port: give a port with --workers")
    root = os.path.abspath(a.root if a.root is not None else os.getcwd())
    if not os.path.isdir(root):
        fail(f"--root {root} is not a directory")
    allow = []
    for cidr in a.allow:
        try:
            allow.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            fail(f"--allow {cidr!r} is not a network address such as 10.0.0.0/8 or ::1/128")
    token = None
    if a.token_file is not None:
        try:
            token = read_token(a.token_file)
        except ValueError as exc:
            fail(str(exc))
    if (a.tls_cert is None) != (a.tls_key is None):
        fail("--tls-cert and --tls-key go together")
    for flag, path in (("--tls-cert", a.tls_cert), ("--tls-key", a.tls_key)):
        if path is not None and not os.access(path, os.R_OK):
            fail(f"cannot read {flag} {path}: "
                 f"{'no such file' if not os.path.exists(path) else 'permission denied'}")
    config = Config(
        host=a.host, port=a.port, root=root, logfile=a.logfile, max_clients=a.max_clients,
        max_per_ip=a.max_per_ip, allow=tuple(allow), max_line=a.max_line,
        idle_timeout=a.idle_timeout, command_timeout=a.command_timeout,
        shutdown_timeout=a.shutdown_timeout, token=token, tls_cert=a.tls_cert, tls_key=a.tls_key,
        hash_workers=a.hash_workers, max_pending=a.max_pending, hash_cache=a.hash_cache,
        backlog=a.backlog, proxy_protocol=a.proxy_protocol, workers=a.workers,
        metrics_port=a.metrics_port)
    if config.tls:
        try:
            ssl_context(config)
        except (ssl.SSLError, OSError) as exc:
            fail(f"cannot use --tls-cert {a.tls_cert} with --tls-key {a.tls_key}: {exc}")
    return config, a


def config_file_args(parser: argparse.ArgumentParser, path: str, argv: list[str]) -> list[str]:
    """The settings of a TOML file as flags, to be read before the command line's own."""
    try:
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    except OSError as exc:
        parser.error(f"cannot read --config {path}: {exc.strerror}")
    except tomllib.TOMLDecodeError as exc:
        parser.error(f"--config {path} is not valid TOML: {exc}")
    actions = {option[2:]: action for action in parser._actions for option in action.option_strings
               if option.startswith("--") and option not in ("--config", "--help", "--version")}
    args: list[str] = []
    for key, value in settings.items():
        action = actions.get(key)
        if action is None:
            parser.error(f"--config {path}: unknown setting '{key}' "
                         f"(the keys are the long flag names, such as max-clients)")
        flag = "--" + key
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                parser.error(f"--config {path}: '{key}' must be true or false")
            args += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):
            if flag in argv:
                continue  # the command line's list replaces the file's
            for item in value if isinstance(value, list) else [value]:
                args += [flag, str(item)]
        elif isinstance(value, (list, dict, bool)):
            parser.error(f"--config {path}: '{key}' takes one value, not {value!r}")
        else:
            args += [flag, str(value)]
    return args


def read_token(path: str) -> bytes:
    """The token in ``path``; ValueError says what is wrong with the file."""
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read --token-file {path}: {exc.strerror}") from None
    if not token:
        raise ValueError(f"--token-file {path} is empty")
    if any(c in token for c in b" \t\r\n"):
        raise ValueError(f"--token-file {path} must hold one token without spaces")
    return token


def ssl_context(config: Config) -> ssl.SSLContext:
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


class TextFormatter(logging.Formatter):
    """``2011-08-29 13:32:35+0200 [context] message``, as the tutorial's Twisted log."""

    def __init__(self) -> None:
        super().__init__()
        self._second = None
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S%z", time.localtime(second))
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname}: {message}"
        line = f"{self._stamp} [{getattr(record, 'context', '-')}] {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; whatever a client sent stays inside one string."""

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.created)),
            "level": record.levelname.lower(),
            "context": getattr(record, "context", "-"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            event["traceback"] = self.formatException(record.exc_info)
        return json.dumps(event)


class BatchedStreamHandler(logging.StreamHandler):
    """Writes the log lines of one event-loop iteration with one system call.

    At the default level every request is a log line; writing and flushing
    each one would cost a system call per request.
    """

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._scheduled = False
        self._hub_thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own policy: report, never raise
            self.handleError(record)
            return
        self._lines.append(line)
        if threading.get_ident() != self._hub_thread:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            gevent.get_hub().loop.run_callback(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._lines:
            text = "\n".join(self._lines) + "\n"
            self._lines.clear()
            self.stream.write(text)
        super().flush()


def open_output(path: str | None):
    return sys.stdout if path is None else open(path, "a", buffering=1 << 16, encoding="utf-8")


def setup_logging(level: str, fmt: str, output=None, *, batched: bool = True) -> logging.StreamHandler:
    """Log to ``output``; ``batched`` writes once per event-loop iteration (gevent only)."""
    # what a log line says needs none of these, and each costs time per record
    # (the logging HOWTO's "Optimization" section)
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = (BatchedStreamHandler if batched else logging.StreamHandler)(output or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("gcmd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    return handler


def raise_fd_limit() -> None:
    """Allow as many open files as the hard limit: every client is one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    try:
        output = open_output(args.output)
    except OSError as exc:
        print(f"gcmd: cannot open --output {args.output}: {exc.strerror}", file=sys.stderr)
        return 2
    level = "warning" if args.quiet else args.log_level
    raise_fd_limit()
    if config.workers == 1:
        handler = setup_logging(level, args.log_format, output)
        return serve(config, args, handler)
    # the parent never runs a gevent hub: its log lines are written at once
    handler = setup_logging(level, args.log_format, output, batched=False)
    from gcmd.workers import Supervisor

    try:
        supervisor = Supervisor(config, config.workers, on_hangup=lambda: reopen_output(handler, args),
                                serve=lambda listener, number, ready: serve(
                                    config, args, setup_logging(level, args.log_format, handler.stream),
                                    listener, number, ready))
    except OSError as exc:
        return cannot_listen(config.host, config.port, exc)
    return supervisor.run(lambda: announce(config, supervisor.port, f", {config.workers} workers"))


def serve(config: Config, args: argparse.Namespace, handler: logging.Handler,
          listener=None, worker: int = 0, ready=None) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; the exit status.

    ``listener``, ``worker`` and ``ready``: the listening socket and number of
    a worker, and what it calls once it serves (see gcmd.workers).
    """
    import gevent.socket

    from gcmd.server import GcmdServer  # after logging is set up

    if listener is not None:
        gevent.reinit()  # a forked worker
        listener = gevent.socket.socket(fileno=listener.detach())
    server = GcmdServer(config, ssl_context(config) if config.tls else None, listener)
    metrics = None
    if config.metrics_port is not None:
        from gcmd.metrics import MetricsServer

        metrics = MetricsServer(server, config.host, config.metrics_port + worker)
    try:
        server.start()
    except OSError as exc:
        return cannot_listen(config.host, config.port, exc)
    stop = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    gevent.signal_handler(signal.SIGHUP, reload, server, handler, args)
    if listener is None:
        announce(config, server.port)
    else:
        log.info("worker %d serving port %d", os.getpid(), server.port)
    if metrics is not None:
        try:
            metrics.start()
        except OSError as exc:
            server.shutdown()
            return cannot_listen(config.host, config.metrics_port + worker, exc, "metrics ")
    if ready is not None:
        handler.flush()
        ready()
    stop.wait()
    server.shutdown()
    if metrics is not None:
        metrics.stop()
    return 0


def cannot_listen(host: str, port: int, exc: OSError, what: str = "") -> int:
    why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or exc
    print(f"gcmd: cannot listen on {host} {what}port {port}: {why}", file=sys.stderr)
    return 1


def announce(config: Config, port: int, workers: str = "") -> None:
    log.info("gcmd %s listening on %s port %d%s%s", __version__, config.host, port,
             " (TLS)" if config.tls else "", workers)
    log.info("root %s, log file %s, max %d clients%s%s", config.root, config.logfile,
             config.max_clients, " per worker" if workers else "",
             ", token required" if config.token else "")
    if not os.path.exists(config.logfile):
        log.warning("log file %s does not exist: lastlog answers an error until it does; "
                    "start gcmd with --logfile PATH to serve another log%s", config.logfile,
                    " (this machine has no syslog file)" if config.logfile == DEFAULT_LOGFILE else "")


def reopen_output(handler: logging.StreamHandler, args: argparse.Namespace) -> None:
    """Write the log to a fresh open of --output (after logrotate moved the file)."""
    if args.output is None:
        return
    handler.flush()
    try:
        output = open_output(args.output)
    except OSError as exc:
        log.error("SIGHUP: cannot reopen --output %s: %s; still writing to the old file",
                  args.output, exc.strerror)
    else:
        handler.setStream(output).close()


def reload(server, handler: BatchedStreamHandler, args: argparse.Namespace) -> None:
    """SIGHUP: reopen the log output (after logrotate moved it) and re-read the token."""
    reopen_output(handler, args)
    if args.token_file is not None:
        try:
            server.set_token(read_token(args.token_file))
        except ValueError as exc:
            log.error("SIGHUP: %s; the previous token stays in force", exc)
            return
    log.info("SIGHUP: reopened the log output%s",
             " and re-read the token file" if args.token_file else "")
