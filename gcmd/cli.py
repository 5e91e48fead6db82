"""The ``gcmd`` command line: flags and ``--config FILE`` -> Config and RunOptions, then run.

Settings come from three places, each overriding the one before: the
defaults, the TOML file of ``--config`` (its keys are the long flag names),
and the command line. Each value is checked by the rules of gcmd.config; a
bad one exits with status 2 and one line (``Parser.error``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import NoReturn

try:
    import tomllib
except ModuleNotFoundError:  # Python before 3.11
    import tomli as tomllib

from gcmd import __version__
from gcmd.config import (
    LOG_FORMATS,
    LOG_LEVELS,
    RANGES,
    TLS_VERSIONS,
    Config,
    RunOptions,
    SettingError,
    check_given,
    check_host,
    check_tls_files,
    flag,
    parse_networks,
    read_token,
)
from gcmd.flags import UNSET, Parser, ReplaceDefault, read_config_file
from gcmd.logs.sources import parse_logfile
from gcmd.process import run as lifecycle
from gcmd.users import USER_TABLE, Users, UsersError, hash_token, read_users


class HashToken(argparse.Action):
    """``--hash-token``: print the hex SHA-256 of the token on standard input, for a
    user's ``token_sha256``, and exit (as ``printf %s TOKEN | sha256sum`` does)."""

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        # what a client sends after ``auth USER`` is one word: spaces around it are not part of it
        token = sys.stdin.buffer.read().strip()
        if not token or any(c in token for c in b" \t\r\n"):
            parser.error("--hash-token reads one token, without spaces, from standard input")
        sys.stdout.write(hash_token(token) + "\n")
        parser.exit(0)


def build_parser() -> Parser:
    """The parser of every flag; its ``keys`` are the settings a --config file may hold."""
    p = Parser(
        prog="gcmd",
        description="A line-command server: lastlog, comphash, hash, ping, stats over TCP.",
        epilog="Try it: gcmd --port 9999, then: printf 'ping\\nexit\\n' | nc 127.0.0.1 9999")
    p.add_argument("--version", action="version", version=f"gcmd {__version__}")
    p.add_argument("--hash-token", action=HashToken, nargs=0,
                   help="print the token_sha256 of a [[user]] table of --config for the token read "
                        "from standard input (e.g. openssl rand -hex 32 | tee token | gcmd --hash-token), "
                        "and exit")
    p.add_argument("--config", metavar="FILE",
                   help="read settings from a TOML file whose keys are these long flag names "
                        "(port = 9999, max-clients = 50, allow = [\"10.0.0.0/8\"]), and its "
                        "[[user]] tables (users and their grants: docs/users.md; SIGHUP reads "
                        "them again); flags on the command line win (default: none)")
    d = Config(root=".")
    _add_network_flags(p, d)
    _add_served_flags(p, d)
    _add_limit_flags(p, d)
    _add_log_flags(p)
    return p


def _add_network_flags(p: Parser, d: Config) -> None:
    net = p.add_argument_group("network")
    p.setting(net, "host", default=d.host,
              help="where to listen: an IPv4 or IPv6 address (0.0.0.0 or :: for every interface), "
                   "or a host name that resolves (default: %(default)s)")
    p.setting(net, "port", type=int, default=d.port,
              help=f"TCP port, {RANGES['port']}; 0 picks a free one, which the start-up line names "
                   "at any --log-level, --quiet included (default: %(default)s)")
    p.setting(net, "backlog", type=int, default=d.backlog,
              help=f"connections waiting to be accepted, {RANGES['backlog']} (default: %(default)s)")
    p.setting(net, "proxy-protocol", action="store_true",
              help="expect HAProxy's PROXY header (v1 or v2) on every connection and "
                   "serve, log and limit the client it names; only for a gcmd that "
                   "nobody but the load balancer can reach (default: off)")
    p.setting(net, "tls-cert", metavar="PEM", help="serve TLS with this certificate (default: off)")
    p.setting(net, "tls-key", metavar="PEM", help="private key of --tls-cert (default: none)")
    p.setting(net, "tls-client-ca", metavar="PEM",
              help="require a client certificate signed by a CA in this file; the log names "
                   "its subject (CN); SIGHUP reads it, --tls-cert and --tls-key again (default: off)")
    p.setting(net, "tls-min-version", choices=TLS_VERSIONS, default=d.tls_min_version,
              help="the oldest TLS version served (default: %(default)s)")
    ops = p.add_argument_group("processes and metrics")
    p.setting(ops, "workers", type=int, default=d.workers, metavar="N",
              help=f"server processes sharing the port, {RANGES['workers']}, supervised by this one; "
                   "--max-clients applies to each (default: %(default)s)")
    p.setting(ops, "reuse-port", action="store_true",
              help="with --workers: each worker listens on a socket of its own (SO_REUSEPORT), "
                   "and the kernel spreads new connections evenly among them; but any program "
                   "of the same user may then listen on the port too and take connections, and "
                   "those waiting for a worker that dies are reset (default: off, the workers "
                   "accept from one socket, opened by the parent)")
    p.setting(ops, "metrics-port", type=int, default=None, metavar="PORT",
              help=f"serve Prometheus metrics at http://HOST:PORT/metrics (other paths: 404), "
                   f"{RANGES['port']}; with --workers N, worker i (0 to N-1) serves its own "
                   "figures at PORT+i: scrape every port (default: off)")


def _add_served_flags(p: Parser, d: Config) -> None:
    srv = p.add_argument_group("what is served")
    p.setting(srv, "root", default=None,
              help="directory comphash and hash may read (default: the current directory)")
    p.setting(srv, "logfile", action=ReplaceDefault, default=(), metavar="[NAME=]SOURCE",
              help="a log that lastlog and follow serve: a file, 'journal' (the systemd journal) "
                   "or 'journal:DIR' (journal files in DIR), named NAME or after the file "
                   "(/var/log/auth.log is 'auth'); repeatable, the first is the default log "
                   "(default: /var/log/syslog, /var/log/messages or the journal, the first that "
                   "can serve, else gcmd's own log, 'gcmd', which is always served)")
    sec = p.add_argument_group("security")
    p.setting(sec, "token-file", metavar="FILE",
              help="require 'auth TOKEN' with the token in this file; SIGHUP reads it again "
                   "(default: off)")


def _add_limit_flags(p: Parser, d: Config) -> None:
    lim = p.add_argument_group("limits (seconds may have decimals)")
    counts = (("max-clients", None, "clients served at once"),
              ("max-per-ip", "N", "clients served at once from one address; 0 is unlimited"),
              ("max-line", None, "longest request in bytes"),
              ("hash-workers", "N", "threads that hash files (default: the number of CPUs, %(default)s here)"),
              ("max-pending", "N", "hash requests that may wait for a thread before 'server busy'"),
              ("hash-cache", "N", "digests of unchanged files remembered; 0 disables"))
    for name, metavar, what in counts:
        field = name.replace("-", "_")
        default = "" if "%(default)s" in what else " (default: %(default)s)"
        p.setting(lim, name, type=int, default=getattr(d, field), metavar=metavar,
                  help=f"{what}; {RANGES[field]}{default}")
    p.setting(lim, "allow", action=ReplaceDefault, default=(), metavar="CIDR",
              help="accept clients only from this network; repeatable (default: everyone)")
    seconds = (("idle-timeout", "close a client silent (or not reading) this long"),
               ("command-timeout", ("give up a lastlog, or the start of a follow, not answered in "
                                    "this long (a hung network file; a FIFO or the journal whose "
                                    "reader has printed nothing yet)")),
               ("shutdown-timeout", "on SIGTERM, wait this long for running commands"))
    for name, what in seconds:
        field = name.replace("-", "_")
        p.setting(lim, name, type=float, default=getattr(d, field), metavar="SECONDS",
                  help=f"{what}; {RANGES[field]} (default: %(default)g)")


def _add_log_flags(p: Parser) -> None:
    out = p.add_argument_group("server log (standard output)")
    level = out.add_mutually_exclusive_group()
    p.setting(level, "log-level", choices=LOG_LEVELS, default="info",
              help="least important events logged (default: %(default)s)")
    p.setting(level, "quiet", action="store_const", dest="log_level", const="warning",
              help="log warnings and errors only: the same as --log-level warning, "
                   "and not allowed with it")
    p.setting(out, "log-format", choices=LOG_FORMATS, default="text",
              help="one line per event, as text or JSON (default: %(default)s)")
    p.setting(out, "quiet-from", action=ReplaceDefault, default=(), metavar="CIDR",
              help="log the connections from this network (a load balancer's health checks) "
                   "at level debug instead of info: their connection, requests and close; "
                   "warnings still show; repeatable (default: none)")
    p.setting(out, "output", metavar="FILE",
              help="append the server log to FILE instead of standard output; "
                   "SIGHUP reopens it, for logrotate (default: standard output)")


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, RunOptions]:
    """The settings the command line and its --config file describe.

    A bad setting exits with status 2 and one line; one that comes from the
    file names the file and the key.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # parsed over UNSET values, the flags that the command line gives are those set
    unset = argparse.Namespace(**{action.dest: UNSET for action in parser.keys.values()})
    command_line = parser.parse_args(argv, namespace=unset)
    from_file: set[str] = set()
    if command_line.config is not None:
        try:
            check_given("config", command_line.config)
        except SettingError as exc:
            parser.error(str(exc))
        values = read_config_file(parser, command_line.config)
        parser.set_defaults(**values)
        from_file = {dest for dest in values if getattr(command_line, dest) is UNSET}
    args = parser.parse_args(argv)
    try:
        return settings(args)
    except SettingError as exc:
        if exc.name in from_file:
            parser.error(f"--config {args.config}: '{exc.name.replace('_', '-')}': {exc}")
        parser.error(str(exc))


def settings(args: argparse.Namespace) -> tuple[Config, RunOptions]:
    """Config and RunOptions from parsed flags, checked against this machine too.

    Raises SettingError: a value out of range, a root that is no directory, a
    host that does not resolve, a file that cannot be read or used, an
    --output that cannot be appended to.
    """
    for name in ("root", "output", "token_file", "tls_cert", "tls_key", "tls_client_ca"):
        check_given(name, getattr(args, name))
    root = os.path.abspath(args.root if args.root is not None else os.getcwd())
    if not os.path.isdir(root):
        raise SettingError("root", f"--root {root} is not a directory")
    check_resolves(args.host)
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(args, name)
        if path is not None and not os.access(path, os.R_OK):
            why = "no such file" if not os.path.exists(path) else "permission denied"
            raise SettingError(name, f"cannot read {flag(name)} {path}: {why}")
    token = None if args.token_file is None else read_token(args.token_file)
    given = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    config = Config(**{**given, "root": root, "allow": parse_networks(args.allow), "token": token,
                       "quiet_from": parse_networks(args.quiet_from, "quiet_from"),
                       "logfiles": tuple(args.logfile)})
    check_journal_directories(config.logfiles)
    if args.config is not None:
        config = dataclasses.replace(config, users=config_users(args.config, config))
    if config.tls:
        check_tls_files(config.tls_cert, config.tls_key)
        lifecycle.tls_context(config)
    if args.output is not None:
        check_output(args.output)
    options = RunOptions(log_level=args.log_level, log_format=args.log_format, output=args.output,
                         token_file=args.token_file, config_file=args.config)
    return config, options


def config_users(path: str, config: Config) -> Users:
    """The users of the --config file ``path`` (gcmd.users), checked against the
    served root and logs of ``config``; SettingError names the user and the key."""
    with open(path, "rb") as f:  # read by read_config_file a moment ago
        if not tomllib.load(f).get(USER_TABLE):
            return Users()  # no user: the logs served need not be looked for
    from gcmd.commands import command_words
    from gcmd.logs.sources import RESERVED, served_sources

    names = [name for name, _ in served_sources(list(config.logfiles))] + [RESERVED]
    try:
        return read_users(path, config.root, names, command_words())
    except UsersError as exc:
        raise SettingError("users", str(exc)) from None


def check_journal_directories(logfiles: tuple[str, ...]) -> None:
    """Raise SettingError for a ``--logfile [NAME=]journal:DIR`` whose DIR is no directory:
    its journalctl could only fail, again and again."""
    for arg in logfiles:
        _name, source = parse_logfile(arg)
        directory = source.removeprefix("journal:")
        if directory == source or os.path.isdir(directory):
            continue
        why = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise SettingError("logfiles", f"--logfile {arg}: the journal directory {directory} {why}")


def check_output(path: str) -> None:
    """Raise SettingError unless the server log can be appended to ``path``.

    The file is made if missing, as the server would make it a moment later.
    """
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise SettingError("output", f"cannot open --output {path}: {exc.strerror}") from None


def check_resolves(host: str) -> None:
    """Raise SettingError unless ``host`` is an address, or a host name that resolves here."""
    check_host(host)
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SettingError("host", f"--host {host!r} does not resolve: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``gcmd [flags]``: the exit status (0 after a graceful stop, 1: cannot listen, 2: a bad setting)."""
    config, options = parse_args(argv)
    return lifecycle.run(config, options)
