"""Which logs gcmd serves: ``--logfile`` arguments, the default log, the registry.

See PROTOCOL.md, "Which logs are served". A log is a file, the systemd
journal (``journal``) or journal files in a directory (``journal:DIR``), each
under a name; ``gcmd``, the server's own log kept in memory, is always there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection

from gevent import subprocess
from gevent.threadpool import ThreadPool

from gcmd.logs.broadcast import LogStats
from gcmd.logs.journal import JournalLog
from gcmd.logs.memory import MemoryLog
from gcmd.logs.readers import FileLog
from gcmd.net.wire import CommandError, escape

#: the name of the server's own log
RESERVED = "gcmd"
#: the words of the log queries' grammar (gcmd.logs.queries), which no log may be named
KEYWORDS = ("grep", "from")
#: the logs a server without --logfile tries, in this order, before the journal
DEFAULT_FILES = ("/var/log/syslog", "/var/log/messages")
#: seconds the start-up check of the journal may take
JOURNAL_PROBE_TIMEOUT = 5.0
#: how much of an unknown name an error message echoes
MAX_ECHOED_NAME = 64

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}").fullmatch
_NAME_RULE = "a name is 1 to 64 characters of A-Z a-z 0-9 _ . - and does not start with - or ."

Log = FileLog | JournalLog | MemoryLog


def _is_journal(source: str) -> bool:
    return source == "journal" or source.startswith("journal:")


def parse_logfile(arg: str) -> tuple[str, str]:
    """The (name, source) of one ``--logfile`` argument, not yet validated.

    ``NAME=SOURCE`` names the log when the part before the first ``=`` is
    meant as a name: it holds no ``/`` (``/srv/a=b.log`` is a path, ``bad
    name=/x`` a bad name that validation reports). Otherwise a file is named
    after its base name up to the first dot, and the journal ``journal``.
    """
    name, sep, source = arg.partition("=")
    if sep and "/" not in name:
        return name, source
    if _is_journal(arg):
        return "journal", arg
    return os.path.basename(arg).split(".")[0], arg


def _check(arg: str, name: str, source: str) -> None:
    if not source or source == "journal:":
        raise ValueError(f"--logfile: {arg!r} names no source: give a file, journal or journal:DIR")
    if name == RESERVED:
        raise ValueError(f"--logfile: the log name {RESERVED!r} is reserved for gcmd's own log ({arg})")
    if name in KEYWORDS:
        raise ValueError(f"--logfile: the log name {name!r} is reserved: it is a word of lastlog and "
                         f"follow ({arg}): name the log with NAME=SOURCE")
    if _NAME(name):
        return
    if arg != source:  # NAME=SOURCE
        raise ValueError(f"--logfile: bad log name {name!r} in {arg!r}: {_NAME_RULE}")
    raise ValueError(f"--logfile: the file name {os.path.basename(source)!r} of {source!r} gives no valid "
                     f"log name ({name!r}): name it with NAME=PATH; {_NAME_RULE}")


def log_sources(args: list[str]) -> list[tuple[str, str]]:
    """The (name, source) of every ``--logfile`` argument, in order.

    Raises ValueError, with a one-line message naming the culprit, for a
    bad, reserved or repeated name.
    """
    sources: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for arg in args:
        name, source = parse_logfile(arg)
        _check(arg, name, source)
        if name in seen:
            raise ValueError(f"--logfile: two logs are named {name!r} ({seen[name]}, {source}): "
                             "name them with NAME=SOURCE")
        seen[name] = source
        sources.append((name, source))
    return sources


def served_sources(args: list[str]) -> list[tuple[str, str]]:
    """The (name, source) of the logs ``--logfile`` gives (``log_sources``); without
    it the default log of PROTOCOL.md, when one can serve (gcmd's own log always can)."""
    sources = log_sources(args)
    if not sources:
        default = default_source()
        sources = [default] if default is not None else []
    return sources


def default_source(files: tuple[str, ...] = DEFAULT_FILES) -> tuple[str, str] | None:
    """The log served without ``--logfile``: the first that can serve, or None for ``gcmd``.

    The first of ``files`` that can be read, else the systemd journal when
    it shows an entry. Blocks up to JOURNAL_PROBE_TIMEOUT seconds
    (journalctl): for start-up only.
    """
    for path in files:
        try:
            with open(path, "rb"):
                return parse_logfile(path)
        except OSError:
            continue
    try:
        probe = subprocess.run(["journalctl", "--quiet", "--lines", "1", "--no-pager"],
                               stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=JOURNAL_PROBE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return ("journal", "journal") if probe.stdout.strip() else None


class Logs:
    """Every log served, by name: the first source is the default, ``gcmd`` comes last.

    ``sources``: (name, source) pairs as :func:`log_sources` gives them;
    ``memory``: the handler that keeps the server's own log; ``pool``: the
    threads file logs read in; ``command_timeout``: seconds a lastlog may wait.
    """

    def __init__(self, sources: list[tuple[str, str]], memory: MemoryLog, pool: ThreadPool,
                 command_timeout: float) -> None:
        self._logs: dict[str, Log] = {}
        for name, source in sources:
            if _is_journal(source):
                self._logs[name] = JournalLog(source, command_timeout)
            else:
                self._logs[name] = FileLog(source, pool, command_timeout)
        self._logs[RESERVED] = memory

    @property
    def default(self) -> str:
        """The name of the default log."""
        return next(iter(self._logs))

    def listing(self, among: Collection[str] | None = None) -> list[tuple[str, str]]:
        """(name, source) of every log: the default first, ``gcmd`` (``memory``) last.

        ``among``: the names that exist for the client (a user's logs, gcmd.users);
        None: every log. The others are left out, in ``get`` too."""
        return [(name, log.source) for name, log in self._logs.items() if among is None or name in among]

    def get(self, name: bytes | str | None, among: Collection[str] | None = None) -> Log:
        """The log named ``name`` (None: the default); CommandError for an unknown name.

        ``among``: as for ``listing``: a log not among them is unknown, the
        choices the error lists are those among them, and the default is the
        first of them."""
        logs = self._logs if among is None else {key: log for key, log in self._logs.items() if key in among}
        if name is None:
            if not logs:
                raise CommandError("no log is granted to you")
            return next(iter(logs.values()))
        if isinstance(name, bytes):
            key = name.decode("ascii", "replace")
            shown = escape(name)
        else:
            key, shown = name, escape(name.encode("utf-8", "surrogateescape"))
        log = logs.get(key)
        if log is None:
            if len(shown) > MAX_ECHOED_NAME:
                shown = shown[:MAX_ECHOED_NAME] + "..."
            raise CommandError(f"unknown log '{shown}' (choose from {', '.join(logs) or 'none'})")
        return log

    def start(self) -> None:
        """Start the journal readers; warn about files that cannot be read."""
        for log in self._logs.values():
            if not isinstance(log, MemoryLog):
                log.start()

    def close(self) -> None:
        """Stop every reader process and reap it, and every log's deliveries."""
        for log in self._logs.values():
            if isinstance(log, MemoryLog):
                log.stop_delivery()  # the handler itself lives on, in the logging setup
            else:
                log.close()

    def stats(self) -> dict[str, LogStats]:
        return {name: log.stats for name, log in self._logs.items()}
