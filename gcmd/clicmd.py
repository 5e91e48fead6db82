"""gcmd-cli: run a gcmd command from a shell, on one box or a fleet, or type them at a prompt.

::

    gcmd-cli [-H HOST] [-p PORT] [--tls] [--ca FILE] [--cert FILE] [--key FILE]
             [--user USER] [--token-file FILE] [--timeout S] [--json]
             [--hosts FILE|LIST] [--fanout N] [COMMAND [ARGS...]]

A command prints its reply's lines, without the ``Begin``/``End`` markers;
``follow`` streams until Ctrl-C and resumes across reconnections (see
gcmd.client.Client.follow). Exit status: 0, 1 for an error reply (and, on a
fleet, when any host failed), 2 for a usage error, 3 when the server cannot
be reached. Without a command: a prompt, with line editing and history
(``readline``, the history in ``~/.gcmd_cli_history``).

In the spirit of redis-cli (one command from the shell, or a prompt), and of
pdsh and clush for fleets (host lists in their folded syntax, each line
prefixed with its host). What a command does not need is imported when it
is needed: ``gcmd-cli ping`` starts as fast as Python does, nearly.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator

from gcmd.client import Client, GcmdError, LogLine, Note, Unreachable

#: exit statuses
OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3
#: the exit status of a command other than follow cut by Ctrl-C (128 + SIGINT, as a shell says)
INTERRUPTED = 130
HISTORY = "~/.gcmd_cli_history"
#: lines of history kept
HISTORY_LENGTH = 1000


class UsageError(Exception):
    """A command line gcmd-cli cannot run: exit status 2, one line."""


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
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
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return int(text)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not a number of seconds above 0: {text!r}")
    return value


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a number above 0: {text!r}")
    return int(text)


# --- what is printed ---------------------------------------------------------------------

def _escapes() -> dict[int, str]:
    """Control characters (C0 but TAB, DEL, C1) and bytes that are not UTF-8 as
    ``\\xNN``, as gcmd's text format sends a log line (PROTOCOL.md)."""
    table = {c: f"\\x{c:02x}" for c in [*range(0x09), *range(0x0A, 0x20), *range(0x7F, 0xA0)]}
    table.update({0xDC00 + b: f"\\x{b:02x}" for b in range(0x80, 0x100)})
    return table


_ESCAPES = _escapes()


def shown(item: LogLine | Note) -> str:
    """A log line as text for a terminal (escaped as gcmd's text format does,
    `` [+N bytes]`` after a cut line); a note as its text."""
    if isinstance(item, Note):
        return item.text
    text = item.data.decode("utf-8", "surrogateescape").translate(_ESCAPES)
    return f"{text} [+{item.cut} bytes]" if item.cut else text


class Printer:
    """Log lines and notes as gcmd-cli prints them: escaped text, with a
    ``==> NAME <==`` header each time the log changes when ``several`` logs
    were asked; or (``as_json``) the JSON lines, with ``"host"`` first when
    ``host`` is given."""

    def __init__(self, as_json: bool, several: bool, host: str | None = None) -> None:
        self.as_json = as_json
        self.several = several
        self.host = host
        self.last_log: str | None = None

    def lines(self, item: LogLine | Note) -> Iterator[str]:
        if self.as_json:
            text = item.json()
            yield text if self.host is None else f'{{"host":{json.dumps(self.host)},{text[1:]}'
            return
        if self.several and isinstance(item, LogLine) and item.log != self.last_log:
            self.last_log = item.log
            yield f"==> {item.log} <=="
        yield shown(item)


# --- the commands on one client ----------------------------------------------------------

_BLANKS = re.compile(r"[ \t]+")
_NUMBER = re.compile(r"[+-]?[0-9]+").fullmatch


def parse_query(arg: str, follow: bool) -> tuple[int | None, str | None, str | None]:
    """(LINES, LOGS, PATTERN) of ``[LINES] [LOGS] [grep PATTERN]``; UsageError for another shape."""
    usage = f"usage: {'follow' if follow else 'lastlog'} [LINES] [LOGS] [grep PATTERN]"
    words = _BLANKS.split(arg.strip(), 1) if arg.strip() else []
    lines = logs = pattern = None
    if words and _NUMBER(words[0]):
        lines = int(words[0])
        words = _BLANKS.split(words[1], 1) if len(words) > 1 else []
    if words and words[0] not in ("grep", "from"):
        logs = words[0]
        words = _BLANKS.split(words[1], 1) if len(words) > 1 else []
    if words and words[0] == "from":
        raise UsageError(f"{usage} (gcmd-cli resumes by itself; a script resumes from cursors "
                         "with gcmd.client)")
    if words and words[0] == "grep" and len(words) > 1:
        pattern, words = words[1], []
    if words:
        raise UsageError(usage)
    return lines, logs, pattern


#: the commands gcmd-cli does not send: options say what they would
NOT_SENT = {"auth": "auth: give --user and --token-file",
            "format": "format: lastlog and follow print text, or JSON lines with --json"}


class Runner:
    """The commands of gcmd-cli on one client: ``run(line)`` yields the lines
    to print. GcmdError for a failure; UsageError for a line gcmd-cli does
    not send (``auth``, ``format``: options say those)."""

    def __init__(self, client: Client, as_json: bool = False, host: str | None = None) -> None:
        self.client = client
        self.as_json = as_json
        self.host = host

    def run(self, line: str) -> Iterator[str]:
        word, arg = (_BLANKS.split(line.strip(), 1) + [""])[:2]
        method: Callable[[str], Iterator[str]] | None = getattr(self, f"do_{word}", None)
        return self.default(line.strip()) if method is None else method(arg)

    def do_ping(self, arg: str) -> Iterator[str]:
        yield self.client.ping()

    def do_version(self, arg: str) -> Iterator[str]:
        yield str(self.client.version())

    def do_whoami(self, arg: str) -> Iterator[str]:
        yield self.client.whoami()

    def do_logs(self, arg: str) -> Iterator[str]:
        for name, source in self.client.logs().items():
            yield f"{name} {source}"

    def do_stats(self, arg: str) -> Iterator[str]:
        for key, value in self.client.stats().items():
            yield f"{key} {value}"

    def do_comphash(self, arg: str) -> Iterator[str]:
        yield self.client.comphash(os.fsencode(arg))

    def do_hash(self, arg: str) -> Iterator[str]:
        algorithm, _, path = arg.partition(" ")
        yield self.client.hash(algorithm, os.fsencode(path.strip()))

    def do_lastlog(self, arg: str) -> Iterator[str]:
        lines, logs, pattern = parse_query(arg, follow=False)
        printer = Printer(self.as_json, logs is not None and "," in logs, self.host)
        for item in self.client.lastlog(10 if lines is None else lines, logs, pattern):
            yield from printer.lines(item)

    def do_follow(self, arg: str) -> Iterator[str]:
        lines, logs, pattern = parse_query(arg, follow=True)
        printer = Printer(self.as_json, logs is not None and "," in logs, self.host)
        for item in self.client.follow(lines or 0, logs, pattern):
            yield from printer.lines(item)

    def do_auth(self, arg: str) -> Iterator[str]:
        raise UsageError(NOT_SENT["auth"])

    def do_format(self, arg: str) -> Iterator[str]:
        raise UsageError(NOT_SENT["format"])

    def default(self, line: str) -> Iterator[str]:
        yield from self.client.request(line)


# --- one box -----------------------------------------------------------------------------

def client_of(options: argparse.Namespace, host: str | None = None, port: int | None = None) -> Client:
    """The Client the options describe (for ``host``:``port`` when given)."""
    return Client(host or options.host, port or options.port, ssl=options.ssl_context,
                  token=options.token, user=options.user, timeout=options.timeout)


def run_one(options: argparse.Namespace, line: str) -> int:
    """Run ``line`` on the server of the options and print its lines; the exit status."""
    out = sys.stdout
    if line.startswith("follow"):  # each line as it comes, also into a pipe
        out.reconfigure(line_buffering=True)
    try:
        with client_of(options) as client:
            for text in Runner(client, options.json).run(line):
                out.write(text + "\n")
    except Unreachable as exc:
        print(f"gcmd-cli: {exc}", file=sys.stderr)
        return UNREACHABLE
    except GcmdError as exc:
        print(f"gcmd-cli: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        return OK if line.startswith("follow") else INTERRUPTED
    return OK


def interact(options: argparse.Namespace) -> int:
    """The prompt: a command a line, until ``exit``, ``quit`` or end of input."""
    import cmd

    client = client_of(options)
    try:
        client.connect()
    except Unreachable as exc:
        print(f"gcmd-cli: {exc}", file=sys.stderr)
        return UNREACHABLE
    except GcmdError as exc:
        print(f"gcmd-cli: {exc}", file=sys.stderr)
        return FAILED
    runner = Runner(client, options.json)
    tty = sys.stdin.isatty()

    class Shell(cmd.Cmd):
        prompt = f"{client.address}> " if tty else ""
        use_rawinput = tty

        def onecmd(self, line: str) -> bool:
            line = line.strip()
            if line in ("exit", "quit", "EOF"):
                return True
            if line:
                run_at_prompt(runner, line)
            return False

        def completenames(self, text: str, *ignored) -> list[str]:
            return [word for word in COMMANDS if word.startswith(text)]

    history = os.path.expanduser(HISTORY)
    readline = _readline() if tty else None
    if readline is not None:
        try:
            readline.read_history_file(history)
        except OSError:
            pass  # no history yet
        readline.set_history_length(HISTORY_LENGTH)
    shell = Shell()
    try:
        while True:
            try:
                shell.cmdloop()
                break
            except KeyboardInterrupt:
                print()
    finally:
        client.close()
        if readline is not None:
            try:
                readline.write_history_file(history)
            except OSError as exc:
                print(f"gcmd-cli: cannot write the history {history}: {exc.strerror}", file=sys.stderr)
    return OK


#: the words the prompt completes
COMMANDS = ("comphash", "exit", "follow", "hash", "help", "lastlog", "logs", "ping", "quit", "stats",
            "version", "whoami")


def _readline():
    try:
        import readline
    except ImportError:  # a Python built without it: the prompt works, without editing
        return None
    return readline


def run_at_prompt(runner: Runner, line: str) -> None:
    """Run one line typed at the prompt; an error is printed, and the prompt goes on."""
    try:
        for text in runner.run(line):
            print(text, flush=True)
    except KeyboardInterrupt:
        print()
    except (GcmdError, UsageError) as exc:
        print(f"(error) {exc}", file=sys.stderr)


# --- a fleet ----------------------------------------------------------------------------

def hosts_of(spec: str, default_port: int) -> list[tuple[str, str, int]]:
    """(label, host, port) of each host of ``--hosts``: a file of hosts (one
    or more a line, separated by commas or blanks; ``#`` starts a comment),
    or a list; folded (``web[01-20],db1``) as ClusterShell's NodeSet reads
    it (the syntax of pdsh and clush); ``HOST:PORT`` or ``HOST`` (then the
    port is ``default_port``). The label is the host as NodeSet gives it.
    IPv6 addresses do not fit the folded syntax: name those hosts."""
    from ClusterShell.NodeSet import NodeSet, NodeSetException

    if os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                lines = [line.split("#", 1)[0] for line in f]
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--hosts {spec}: {getattr(exc, 'strerror', None) or exc}") from None
        spec = ",".join(lines)
    spec = re.sub(r",{2,}", ",", re.sub(r"\s+", ",", spec)).strip(",")
    try:
        labels = list(NodeSet(spec))
    except NodeSetException as exc:
        raise UsageError(f"--hosts: {exc}") from None
    if not labels:
        raise UsageError("--hosts: no host")
    targets = []
    for label in labels:
        host, colon, port = label.rpartition(":")
        if not colon:
            targets.append((label, label, default_port))
        elif host and ":" not in host and port.isdigit() and 0 < int(port) < 65536:
            targets.append((label, host, int(port)))
        else:
            raise UsageError(f"--hosts: not HOST or HOST:PORT: {label!r}")
    return targets


def report(failed: dict[str, str], total: int) -> None:
    """Say on standard error which hosts failed and why, then how many, folded."""
    if not failed:
        return
    from ClusterShell.NodeSet import NodeSet

    for label in sorted(failed):
        print(f"{label}: {failed[label]}", file=sys.stderr)
    print(f"gcmd-cli: {len(failed)} of {total} hosts failed: {NodeSet.fromlist(failed)}",
          file=sys.stderr)


def run_fleet(options: argparse.Namespace, line: str) -> int:
    """Run ``line`` on every host of ``--hosts``, ``--fanout`` at a time,
    print each line as ``HOST: line`` (JSON lines carry a ``host`` key
    instead), each host's lines together, then report the hosts that failed:
    an error reply, no connection, or no whole reply within ``--timeout`` of
    the start of their turn (their thread is left behind, and another takes
    its place). The exit status: 1 when a host failed, else 0."""
    targets = hosts_of(options.hosts, options.port)
    word = line.split(None, 1)[0]
    if word == "follow":
        return follow_fleet(options, line, targets)
    prefixed = not (options.json and word == "lastlog")
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for target in targets:
        todo.put(target)
    events: queue.SimpleQueue = queue.SimpleQueue()

    def work() -> None:
        while True:
            try:
                label, host, port = todo.get_nowait()
            except queue.Empty:
                return
            events.put((label, "started", time.monotonic()))
            try:
                with client_of(options, host, port) as client:
                    events.put((label, "done", list(Runner(client, options.json, label).run(line))))
            except GcmdError as exc:
                events.put((label, "failed", exc.message))

    def start_worker() -> None:
        threading.Thread(target=work, name="gcmd-cli host", daemon=True).start()

    for _ in range(min(options.fanout, len(targets))):
        start_worker()
    waiting = {label for label, _, _ in targets}
    deadlines: dict[str, float] = {}
    failed: dict[str, str] = {}
    out = sys.stdout
    try:
        while waiting:
            wait = max(0.0, min(deadlines.values()) - time.monotonic()) if deadlines else None
            try:
                label, kind, value = events.get(timeout=wait)
            except queue.Empty:
                now = time.monotonic()
                for label, deadline in list(deadlines.items()):
                    if deadline <= now:
                        del deadlines[label]
                        waiting.discard(label)
                        failed[label] = f"no reply within {options.timeout:g} s"
                        start_worker()  # this host's thread is stuck: another takes the next hosts
                continue
            if label not in waiting:
                continue  # the late end of a host given up
            if kind == "started":
                deadlines[label] = value + options.timeout
                continue
            del deadlines[label]
            waiting.discard(label)
            if kind == "failed":
                failed[label] = value
            else:
                out.write("".join(f"{label}: {text}\n" if prefixed else f"{text}\n" for text in value))
                out.flush()
    except KeyboardInterrupt:
        return INTERRUPTED
    report(failed, len(targets))
    return FAILED if failed else OK


def follow_fleet(options: argparse.Namespace, line: str, targets: list[tuple[str, str, int]]) -> int:
    """``follow`` on every host at once, one thread each, merged as the lines
    come, until Ctrl-C (or until every host failed); each host resumes on its
    own. A host that cannot be reached is tried again and again (logged); one
    that answers an error is reported at the end (exit status 1)."""
    events: queue.SimpleQueue = queue.SimpleQueue()

    def follow_host(label: str, host: str, port: int) -> None:
        try:
            for text in Runner(client_of(options, host, port), options.json, label).run(line):
                events.put((label, text, None))
        except GcmdError as exc:
            events.put((label, None, exc.message))

    for label, host, port in targets:
        threading.Thread(target=follow_host, args=(label, host, port), name="gcmd-cli follow",
                         daemon=True).start()
    out = sys.stdout
    out.reconfigure(line_buffering=True)
    failed: dict[str, str] = {}
    try:
        while len(failed) < len(targets):
            label, text, error = events.get()
            if error is not None:
                failed[label] = error
                print(f"{label}: {error}", file=sys.stderr, flush=True)
            else:
                out.write(f"{text}\n" if options.json else f"{label}: {text}\n")
    except KeyboardInterrupt:
        pass
    report(failed, len(targets))
    return FAILED if failed else OK


# --- main --------------------------------------------------------------------------------

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


def main(args: list[str] | None = None) -> int:
    """gcmd-cli's entry point: the exit status."""
    options = parse_args(args)
    import logging

    logging.basicConfig(format="gcmd-cli: %(message)s", level=logging.WARNING, stream=sys.stderr)
    line = " ".join(options.command)
    try:
        settings(options)
        if options.hosts is not None:
            if not line:
                raise UsageError("--hosts needs a COMMAND")
            _check(line)
            return run_fleet(options, line)
        if not line:
            return interact(options)
        _check(line)
        return run_one(options, line)
    except UsageError as exc:
        print(f"gcmd-cli: {exc}", file=sys.stderr)
        return USAGE


def _check(line: str) -> None:
    """UsageError for a command line gcmd-cli would refuse, before it connects."""
    word, arg = (_BLANKS.split(line.strip(), 1) + [""])[:2]
    if word in ("lastlog", "follow"):
        parse_query(arg, follow=word == "follow")
    elif word in NOT_SENT:
        raise UsageError(NOT_SENT[word])


if __name__ == "__main__":
    sys.exit(main())

