"""gcmd-cli's options: parsed (``parse_args``), then the files they name read (``settings``)."""

from __future__ import annotations

import argparse

from gcmd.clicmd.status import UsageError


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    """The options of ``args`` (default: ``sys.argv[1:]``); COMMAND is a list
    of words. A bad option exits with status 2 (argparse's usage error)."""
    parser = argparse.ArgumentParser(
        prog="gcmd-cli", description="Run a command on a gcmd server (or on many: --hosts), "
        "or type commands at a prompt (no COMMAND).",
        epilog="Exit status: 0; 1 an error reply (or a host of --hosts failed); 2 a usage error; "
               "3 the server cannot be reached. Examples: gcmd-cli lastlog 20 auth grep sshd; "
               "gcmd-cli --hosts 'web[01-20],db1' follow auth.")
    parser.add_argument("-H", "--host", default="127.0.0.1", help="the server (default: %(default)s)")
    parser.add_argument("-p", "--port", type=port_number, default=9999, help="its port (default: %(default)s)")
    tls = parser.add_argument_group("TLS (--ca, --cert and --key imply --tls)")
    tls.add_argument("--tls", action="store_true", help="connect with TLS")
    tls.add_argument("--ca", metavar="FILE", help="CA certificates to verify the server with "
                     "(default: the system's)")
    tls.add_argument("--cert", metavar="FILE", help="a client certificate to show (PEM)")
    tls.add_argument("--key", metavar="FILE", help="its key (default: in --cert)")
    auth = parser.add_argument_group("authentication")
    auth.add_argument("--user", help="authenticate as USER (auth USER TOKEN); needs --token-file")
    auth.add_argument("--token-file", metavar="FILE", help="the file that holds the token")
    parser.add_argument("--timeout", type=seconds, default=10.0,
                        help="seconds to connect and for each reply; on a fleet, for the whole run "
                             "(default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="lastlog and follow: print the JSON lines")
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument("--hosts", metavar="FILE|LIST",
                       help="run the command on every host: a file of hosts (one or more a line, "
                            "# comments) or a list, in the folded syntax of pdsh and clush "
                            "(web[01-20],db1), each HOST or HOST:PORT")
    fleet.add_argument("--fanout", type=positive, default=64, help="hosts asked at once (default: %(default)s)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARGS...]",
                        help="ping, version, whoami, logs, lastlog, follow, comphash, hash, stats, help")
    return parser.parse_args(args)


def port_number(text: str) -> int:
    """``--port``: 1 to 65535."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return int(text)


def seconds(text: str) -> float:
    """``--timeout``: seconds above 0, decimals allowed."""
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not a number of seconds above 0: {text!r}")
    return value


def positive(text: str) -> int:
    """``--fanout``: a whole number above 0."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a number above 0: {text!r}")
    return int(text)


def settings(options: argparse.Namespace) -> None:
    """Read the files the options name into ``options.token`` and
    ``options.ssl_context``; UsageError names the option that is wrong."""
    options.token = None
    if options.token_file is not None:
        try:
            with open(options.token_file, "rb") as f:
                options.token = f.read().strip()
        except OSError as exc:
            raise UsageError(f"--token-file {options.token_file}: {exc.strerror}") from None
        if not options.token or any(c in options.token for c in b" \t\r\n"):
            raise UsageError(f"--token-file {options.token_file} must hold one token without spaces")
    if options.user is not None and options.token is None:
        raise UsageError("--user needs --token-file")
    options.ssl_context = None
    if options.key and not options.cert:
        raise UsageError("--key needs --cert")
    if options.tls or options.ca or options.cert:
        import ssl

        try:
            options.ssl_context = ssl.create_default_context(cafile=options.ca)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--ca {options.ca}: {getattr(exc, 'strerror', None) or exc}") from None
        if options.cert:
            try:
                options.ssl_context.load_cert_chain(options.cert, options.key)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"--cert {options.cert}: {getattr(exc, 'strerror', None) or exc}") from None
