"""The commands: one ``do_<verb>`` method each, its help text in its docstring.

Commands return their reply as bytes and never touch the socket; a
:class:`~gcmd.wire.Close` reply asks the session to close afterwards.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
from collections.abc import Callable
from time import monotonic

from gcmd.config import Config
from gcmd.hashing import ALGORITHMS, HashService, OutsideRoot
from gcmd.logs.sources import Logs
from gcmd.net import wire
from gcmd.net.wire import (
    Close,
    CommandError,
    Follow,
    block,
    error_line,
    escape,
    split_request,
)
from gcmd.observe.stats import ServerStats

log = logging.getLogger(__name__)

#: most lines ``lastlog N`` returns
MAX_LASTLOG_LINES = 1000

#: a lastlog argument that is a number of lines (PROTOCOL.md: digits, optionally signed)
_NUMBER = re.compile(rb"[+-]?[0-9]+").fullmatch
_SPACES = re.compile(rb"[ \t]+")


def _words(arg: bytes) -> list[bytes]:
    """The words of an argument, split on spaces and tabs only."""
    return _SPACES.split(arg) if arg else []


def _count(word: bytes) -> int:
    """The number of lines a lastlog argument asks for; 0 when out of any range."""
    if word.startswith(b"-"):
        return 0
    digits = word.lstrip(b"+").lstrip(b"0")
    # int() of thousands of digits is slow, and refused beyond 4300
    return int(digits or b"0") if len(digits) <= 4 else 0


def command(*, slow: bool = False, public: bool = False, secret: bool = False) -> Callable:
    """Mark a ``do_`` method: ``slow`` ones wait on a thread or a process, so the
    replies before them are sent first; ``public`` ones need no authentication;
    the argument of a ``secret`` one never reaches the server log."""

    def mark(method: Callable) -> Callable:
        method.slow = slow
        method.public = public
        method.secret = secret
        #: the name in stats and metrics
        method.verb = method.__name__.removeprefix("do_") if method.__name__ != "default" else "unknown"
        return method

    return mark


#: the requests Commands.shown keeps at most (emptied when full), and the longest it keeps (bytes)
SHOWN_KEPT, SHOWN_LONGEST = 1024, 128



def internal_error_words(exc: Exception) -> str:
    """What a client is told of an unexpected failure ``exc``: "internal error", and
    why when the machine is out of something (memory, threads) rather than gcmd wrong.

    gevent's thread pool raises RuntimeError("can't start new thread") when the
    system refuses a thread (gevent/gevent#569: memory or the thread limit).
    """
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't start new thread" in str(exc)):
        return f"{wire.INTERNAL_ERROR}: out of memory or threads"
    return wire.INTERNAL_ERROR

class Commands:
    def __init__(self, config: Config, hashing: HashService, logs: Logs,
                 stats: ServerStats) -> None:
        self.config = config
        self.hashing = hashing
        self.logs = logs
        self.stats = stats
        self.table: dict[bytes, Callable] = {
            name[3:].encode(): getattr(self, name) for name in dir(self) if name.startswith("do_")}
        self.table[b"quit"] = self.do_exit
        #: handler -> its figures in stats, ready before the first request
        self.figures = {handler: stats.command(handler.verb)
                        for handler in (*self.table.values(), self.default)}
        #: requests as the log shows them (``loggable``), by line: most are a few
        #: words, said again and again; a secret one is never kept
        self.shown: dict[bytes, str] = {}
        self._help = block(b"help", [
            f"{method.__doc__.splitlines()[0]}".encode()
            for name, method in sorted(self.table.items()) if name != b"quit"])

    def loggable(self, line: bytes, handler: Callable) -> str:
        """The request ``line`` (of ``handler``) as the log shows it: escaped,
        without the ``\\r`` of a CRLF line ending, and without the argument of a
        secret command (whose line is never kept in ``shown``)."""
        if handler.secret:
            return f"{handler.verb} ***"
        text = escape(line[:-1] if line.endswith(b"\r") else line)
        if len(line) <= SHOWN_LONGEST:
            if len(self.shown) >= SHOWN_KEPT:
                self.shown.clear()
            self.shown[line] = text
        return text

    def parse(self, line: bytes) -> tuple[Callable, bytes] | None:
        """The handler and argument of a request line; None for a blank line."""
        handler = self.table.get(line)  # a bare command word, the most common request
        if handler is not None:
            return handler, b""
        word, arg = split_request(line)
        if not word:
            return None
        return self.table.get(word, self.default), arg

    def run(self, handler: Callable, session, arg: bytes) -> bytes:
        """The reply of ``handler``; any failure becomes one error line."""
        self.stats.commands += 1
        figures = self.figures[handler]
        if self.config.token is not None and not session.authenticated and not handler.public:
            figures.denied += 1
            return wire.AUTH_REQUIRED
        try:
            reply = handler(session, arg)
        except CommandError as exc:
            figures.error += 1
            return error_line(str(exc))
        except Exception as exc:
            figures.internal_error += 1
            words = internal_error_words(exc)
            if words == wire.INTERNAL_ERROR:
                log.exception("internal error in %r from %s", handler.__name__, session.ip)
            else:  # the machine's limits, not a bug: the traceback would say nothing more
                log.error("%s in %r from %s: %s", words, handler.__name__, session.ip, exc)
            return error_line(words)
        except BaseException:  # the client left, or the server stops: no reply
            figures.cancelled += 1
            raise
        figures.ok += 1
        return reply

    def run_slow(self, handler: Callable, session, arg: bytes) -> bytes:
        """``run`` a slow command, timed for the latency histogram.

        The other commands answer from memory in microseconds; timing them
        would cost a pipelining client a quarter of its throughput.
        """
        started = monotonic()
        reply = self.run(handler, session, arg)
        self.figures[handler].observe(monotonic() - started)
        return reply

    @command()
    def default(self, session, arg: bytes) -> bytes:
        return wire.NOT_FOUND

    @command(slow=True)
    def do_lastlog(self, session, arg: bytes) -> bytes:
        """lastlog [LINES] [LOG] - the last LINES lines of a log (default 10, at most 1000; LOG: see logs)"""
        words = _words(arg)
        count = 10
        if words and _NUMBER(words[0]):
            count = _count(words.pop(0))
        if len(words) > 1 or not 1 <= count <= MAX_LASTLOG_LINES:
            return wire.LASTLOG_USAGE
        log = self.logs.get(words[0] if words else None)
        return block(b"lastlog", log.lastlog(count))

    @command(slow=True)
    def do_follow(self, session, arg: bytes) -> bytes:
        """follow [LOG] - the new lines of a log as they are written, until you send a line"""
        words = _words(arg)
        if len(words) > 1:
            return wire.FOLLOW_USAGE
        log = self.logs.get(words[0] if words else None)
        session.start_following(log)
        return Follow(wire.BEGIN_FOLLOW)

    @command()
    def do_logs(self, session, arg: bytes) -> bytes:
        """logs - the logs lastlog and follow serve, the default first: NAME SOURCE"""
        return block(b"logs", [f"{name} {source}".encode("utf-8", "surrogateescape")
                               for name, source in self.logs.listing()])

    @command(slow=True)
    def do_comphash(self, session, arg: bytes) -> bytes:
        """comphash PATH - the SHA-1 of a file under the served root"""
        if not arg:
            return wire.NEED_PATH
        return self._digest(session, "sha1", arg)

    @command(slow=True)
    def do_hash(self, session, arg: bytes) -> bytes:
        """hash ALGO PATH - the digest of a file with sha256, sha512, blake2b, md5, ..."""
        algorithm, path = split_request(arg)
        if not algorithm:
            return wire.HASH_USAGE
        name = algorithm.decode("ascii", "replace").lower()
        if name not in ALGORITHMS:
            raise CommandError(f"unknown algorithm '{wire.escape(algorithm)[:64]}' "
                               f"(choose from {', '.join(ALGORITHMS)})")
        if not path:
            return wire.NEED_PATH
        return self._digest(session, name, path)

    def _digest(self, session, algorithm: str, path: bytes) -> bytes:
        try:
            digest = self.hashing.digest(algorithm, path)
        except OutsideRoot:
            log.warning("Refused a path outside the served root from %s: %s", session.ip,
                        wire.echo_path(path), extra=session.context)
            raise
        return b"File hash is : %s\n" % digest.encode()

    @command()
    def do_ping(self, session, arg: bytes) -> bytes:
        """ping - answer pong"""
        return wire.PONG

    @command()
    def do_stats(self, session, arg: bytes) -> bytes:
        """stats - figures about this server, one 'key value' per line"""
        stats, hashing = self.stats, self.hashing.stats
        figures = {
            "uptime_s": stats.uptime_s,
            "pid": os.getpid(),
            "clients": stats.clients,
            "clients_parked": stats.parked,
            "authenticated": stats.authenticated,
            "greenlets": stats.greenlets,
            "max_clients": self.config.max_clients,
            "connections": stats.connections,
            "commands": stats.commands,
            "errors": stats.errors,
            "internal_errors": stats.internal_errors,
            "rejected": stats.rejected,
            "auth_failures": stats.auth_failures,
            "hash_pending": self.hashing.pending,
            "hash_bytes": hashing.hashed_bytes,
            "hash_runs": hashing.hashes,
            "hash_cache_hits": hashing.cache_hits,
            "hash_shared": hashing.shared,
            "hash_busy": hashing.busy,
            "log_output_dropped": getattr(stats.log_output, "dropped", 0),
        }
        for name, figures_of_log in self.logs.stats().items():
            for key, value in vars(figures_of_log).items():
                figures[f"log.{name}.{key}"] = value
        return block(b"stats", [f"{key} {value}".encode() for key, value in figures.items()])

    @command(public=True)
    def do_help(self, session, arg: bytes) -> bytes:
        """help - list the commands"""
        return self._help

    @command(public=True, secret=True)
    def do_auth(self, session, arg: bytes) -> bytes:
        """auth TOKEN - authenticate, when the server asks for a token"""
        token = self.config.token
        if token is None:
            return wire.AUTH_DISABLED
        if hmac.compare_digest(arg, token):
            self.stats.authenticated += not session.authenticated
            session.authenticated = True
            return wire.AUTH_OK
        self.stats.auth_failures += 1
        log.warning("Authentication failed from %s", session.ip, extra=session.context)
        return Close(wire.AUTH_FAILED, "closed by the server after a failed auth")

    @command(public=True)
    def do_exit(self, session, arg: bytes) -> bytes:
        """exit - close the connection (also: quit)"""
        return Close(b"", "closed by the server after exit")
