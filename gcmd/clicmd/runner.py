"""The commands of gcmd-cli on one client (Runner), and one command run from the shell (run_one)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterator

from gcmd.clicmd.printing import Printer
from gcmd.clicmd.status import FAILED, INTERRUPTED, OK, UNREACHABLE, UsageError
from gcmd.client import Client, GcmdError, Unreachable

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


def check_line(line: str) -> None:
    """UsageError for a command line gcmd-cli would refuse, before it connects."""
    word, arg = (_BLANKS.split(line.strip(), 1) + [""])[:2]
    if word in ("lastlog", "follow"):
        parse_query(arg, follow=word == "follow")
    elif word in NOT_SENT:
        raise UsageError(NOT_SENT[word])


def client_of(options: argparse.Namespace, host: str | None = None, port: int | None = None) -> Client:
    """The Client the options describe (for ``host``:``port`` when given)."""
    return Client(host or options.host, port or options.port, ssl=options.ssl_context,
                  token=options.token, user=options.user, timeout=options.timeout)


def failed(exc: GcmdError) -> int:
    """Say why a command failed on standard error; the exit status: UNREACHABLE
    when the server could not be reached, else FAILED."""
    print(f"gcmd-cli: {exc}", file=sys.stderr)
    return UNREACHABLE if isinstance(exc, Unreachable) else FAILED


def run_one(options: argparse.Namespace, line: str) -> int:
    """Run ``line`` on the server of the options and print its lines; the exit status."""
    out = sys.stdout
    if line.startswith("follow"):  # each line as it comes, also into a pipe
        out.reconfigure(line_buffering=True)
    try:
        with client_of(options) as client:
            for text in Runner(client, options.json).run(line):
                out.write(text + "\n")
    except GcmdError as exc:
        return failed(exc)
    except KeyboardInterrupt:
        return OK if line.startswith("follow") else INTERRUPTED
    return OK
