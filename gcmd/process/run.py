"""Start gcmd, serve until a signal asks to stop, stop gracefully: in one process or in ``--workers``.

Signal handlers only record the signal in a queue; the main greenlet takes
them from it one at a time and acts: SIGHUP reopens --output and re-reads
--token-file, the TLS files and the users of --config, SIGTERM or SIGINT stops. With ``--workers``
the parent's loop does the same in gcmd.process.workers and passes the signals on to
the workers.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from typing import TextIO

import gevent
import gevent.queue

from gcmd import __version__
from gcmd.config import Config, RunOptions, SettingError, check_tls_files, read_token
from gcmd.process.tlsfiles import tls_context, tls_mode
from gcmd.serverlog.setup import info_line, open_output, reopen_output, setup_logging

log = logging.getLogger(__name__)

_STOP = (signal.SIGTERM, signal.SIGINT)


def run(config: Config, options: RunOptions) -> int:
    """Serve ``config`` until SIGTERM or SIGINT; the exit status (1: cannot listen, 2: cannot log)."""
    try:
        output = open_output(options.output)
    except OSError as exc:
        print(f"gcmd: cannot open --output {options.output}: {exc.strerror}", file=sys.stderr)
        return 2
    raise_fd_limit()
    untrack_greenlet_tree(os.environ)
    if config.workers == 1:
        return serve(config, options, setup_logging(options.log_level, options.log_format, output))
    return supervise(config, options, output)


def supervise(config: Config, options: RunOptions, output: TextIO) -> int:
    """``--workers N``: fork the workers, supervise them; the exit status."""
    from gcmd.process.workers import Supervisor

    # the parent never runs a gevent hub: its log lines are written at once
    handler = setup_logging(options.log_level, options.log_format, output, batched=False, shared=True)

    def serve_worker(worker_config: Config, listener: socket.socket, ready: Callable[[], None]) -> int:
        gevent.reinit()  # a forked worker
        worker_handler = setup_logging(options.log_level, options.log_format, handler.stream,
                                       context=f"w{worker_config.worker}", shared=True)
        return serve(worker_config, options, worker_handler, listener, ready)

    try:
        supervisor = Supervisor(config, serve_worker, lambda: reopen_output(handler, options.output))
    except OSError as exc:
        return cannot_listen(config.host, config.port, exc)
    return supervisor.run(lambda: announce(config, supervisor.port, f", {config.workers} workers"))


def serve(config: Config, options: RunOptions, handler: logging.Handler,
          listener: socket.socket | None = None, ready: Callable[[], None] | None = None) -> int:
    """Serve until SIGTERM or SIGINT (or until the listener fails), then shut down gracefully;
    the exit status (1: the listener failed).

    ``listener`` and ``ready``: a worker's listening socket, and what it calls
    once it serves (see gcmd.process.workers).
    """
    from gcmd.net.server import GcmdServer  # after logging is set up

    log.debug("settings: %s", describe(config, options))
    server = GcmdServer(config, tls_context(config) if config.tls else None, listener=listener)
    server.stats.log_output = handler
    metrics = None
    if config.metrics_port is not None:
        from gcmd.observe.metrics import MetricsServer

        metrics = MetricsServer(server, config.host, config.metrics_port + config.worker)
        # both ports are taken before the server starts: a start that fails has
        # served nobody, so it logs no shutdown
        try:
            metrics.bind()
        except OSError as exc:
            return cannot_listen(config.host, config.metrics_port + config.worker, exc, "metrics ")
    try:
        server.start()
    except OSError as exc:
        return cannot_listen(config.host, config.port, exc)
    gc.freeze()  # what start-up made lives as long as the process: never collected again
    if metrics is not None:  # before the start-up lines: they say the server serves
        metrics.start()
    signals: gevent.queue.Queue[int | None] = gevent.queue.Queue()
    for signum in (*_STOP, signal.SIGHUP):
        gevent.signal_handler(signum, signals.put, signum)
    server.listener_lost = lambda: signals.put(None)  # a server that accepts nobody stops: status 1
    hub = gevent.get_hub()
    hub.handle_error = functools.partial(hub_error, server, hub.handle_error)
    announce_serving(config, server, worker=listener is not None)
    if ready is not None:
        handler.flush()
        ready()
    while (signum := signals.get()) == signal.SIGHUP:
        reload(server, handler, options)
    server.shutdown()
    del hub.handle_error  # the hub's own again
    if metrics is not None:
        metrics.stop()
    handler.flush()  # the log's last lines are written before the process ends
    return 0 if signum is not None else 1


def announce_serving(config: Config, server, worker: bool) -> None:
    """The start-up lines of a server that serves (a worker's: its port and pid), then the logs."""
    if worker:
        log.info("serving port %d, pid %d", server.port, os.getpid())
    else:
        announce(config, server.port)
    announce_logs(config, server.logs.listing())


def hub_error(server, default: Callable[..., None], context: object, kind: type[BaseException],
              value: BaseException, tb: object) -> None:
    """The hub's ``handle_error`` (gevent: "applications can set a property on the hub
    instance with this same signature"): an accept error of ``server``, which gevent's
    StreamServer reports with itself as the context, is logged by the server in one line
    (a traceback a second while out of descriptors helps nobody); the rest, as gevent does."""
    if context is server and isinstance(value, OSError):
        server.accept_failed(value)
    else:
        default(context, kind, value, tb)


def reload(server, handler: logging.StreamHandler, options: RunOptions) -> None:
    """SIGHUP: reopen the log output (after logrotate moved it), then read the token
    file and the TLS files again. New connections get the new token and TLS
    settings, those open keep theirs; if one file cannot be used, nothing changes."""
    reopen_output(handler, options.output)
    config = server.config
    reread = " and ".join(what for what, used in (("the token file", options.token_file),
                                                   ("the TLS files", config.tls)) if used)
    try:
        token = None if options.token_file is None else read_token(options.token_file)
        if config.tls:
            check_tls_files(config.tls_cert, config.tls_key)
        context = tls_context(config) if config.tls else None
    except SettingError as exc:
        kept = ("token and TLS files stay" if options.token_file and config.tls
                else "token stays" if options.token_file else "TLS files stay")
        log.warning("SIGHUP: %s; the previous %s in force", exc, kept)
        return
    if token is not None:
        server.set_token(token)
    if context is not None:
        server.ssl_context = context
    log.info("SIGHUP: reopened the log output%s", f" and re-read {reread}" if reread else "")
    if options.config_file is not None:
        reload_users(server, options.config_file)


def reload_users(server, path: str) -> None:
    """SIGHUP: read the users of the --config file ``path`` again (gcmd.users); a
    table that cannot be used is logged, and the one in force kept."""
    from gcmd.commands import command_words
    from gcmd.users import UsersError, read_users

    names = [name for name, _ in server.logs.listing()]
    try:
        users = read_users(path, server.config.root, names, command_words())
    except UsersError as exc:
        log.warning("SIGHUP: %s; the users in force stay", exc)
        return
    server.commands.set_users(users)
    server.end_revoked_follows()
    log.info("SIGHUP: re-read the users of --config %s: %d user%s", path, len(users),
             "" if len(users) == 1 else "s")


def untrack_greenlet_tree(environ) -> None:
    """Greenlets no longer keep who spawned them and the ten frames of their spawning stack
    (gevent's ``track_greenlet_tree``, kept for debugging): every client is a greenlet, and each
    slow command's guard; unless ``environ`` sets GEVENT_TRACK_GREENLET_TREE."""
    if "GEVENT_TRACK_GREENLET_TREE" not in environ:
        gevent.config.track_greenlet_tree = False


def raise_fd_limit() -> None:
    """Allow as many open files as the hard limit: every client is one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)


def cannot_listen(host: str, port: int, exc: OSError, what: str = "") -> int:
    """Say why gcmd cannot listen on ``port`` (of ``what``: "" or "metrics "); the status, 1."""
    # the system's words for the errno (gevent adds the address, as a tuple, to
    # strerror), in lower case after the colon: "address already in use"
    why = os.strerror(exc.errno) if exc.errno else str(exc)
    why = why[:1].lower() + why[1:]
    print(f"gcmd: cannot listen on {host} {what}port {port}: {why}", file=sys.stderr)
    return 1


def announce(config: Config, port: int, workers: str = "") -> None:
    """The start-up lines: where gcmd listens and what it serves.

    With ``--port 0`` the listening line is written whatever the log level:
    it is the only place that names the port chosen.
    """
    info_line(log, "gcmd %s listening on %s port %d%s%s", __version__, config.host, port, tls_mode(config),
              workers, always=config.port == 0)
    log.info("root %s, max %d clients%s%s", config.root, config.max_clients,
             " per worker" if workers else "", ", token required" if config.token else "")


def announce_logs(config: Config, logs: list[tuple[str, str]]) -> None:
    """Which logs are served (``logs``: name, source; the default first), and how to choose.

    A log that cannot be read was warned about already, when the server started its logs.
    """
    (name, source), *others = logs
    log.info("default log: %s (%s)%s; %s", name, source,
             f", also: {', '.join(other for other, _ in others)}" if others else "",
             "--logfile [NAME=]SOURCE chooses the logs" if not config.logfiles
             else "the first --logfile is the default")


def describe(config: Config, options: RunOptions) -> str:
    """Every setting as ``name=value``, the token hidden: the start-up line at level debug."""
    settings = {**dataclasses.asdict(config), **dataclasses.asdict(options)}
    if config.token is not None:
        settings["token"] = "***"
    settings["allow"] = ",".join(map(str, config.allow)) or "everyone"
    return " ".join(f"{name}={value}" for name, value in settings.items())
