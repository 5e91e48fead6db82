"""The commands: one ``do_<verb>`` method each, its help text in its docstring.

Commands return their reply as bytes and never touch the socket; a
:class:`~gcmd.net.wire.Close` reply asks the client to be closed afterwards.
The ``session`` a command gets is the connection's gcmd.net.client.Client.

Who may run what (``run``): a --token-file token, and the users and grants
of gcmd.users. The state of a connection kept here is on its session:
``authenticated`` (the token, a certificate, or a user), and ``user`` (the
gcmd.users.User it is, else None), which also names it in ``context``
(gcmd.authentication). The figures of ``stats``: gcmd.observe.figures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import monotonic

from gcmd import __version__
from gcmd.authentication import authenticate, become
from gcmd.config import Config
from gcmd.hashing import ALGORITHMS, HashService, OutsideRoot
from gcmd.logs.cursors import parse_cursor
from gcmd.logs.feed import Feed
from gcmd.logs.lines import MAX_REPLY
from gcmd.logs.queries import (
    JSON,
    TEXT,
    Pattern,
    Query,
    Shape,
    Usage,
    header,
    parse_query,
)
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
from gcmd.observe.figures import stats_figures
from gcmd.observe.stats import ServerStats
from gcmd.users import Users

log = logging.getLogger(__name__)


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


#: the commands every connection may use, whatever its grants (PROTOCOL.md, "Users
#: and grants"); ``unknown`` is a word that is no command: it gets "Command not found."
ALWAYS_GRANTED = frozenset({"ping", "help", "version", "whoami", "format", "auth", "exit", "quit", "unknown"})


def command_words() -> list[str]:
    """The words of every command, as a user's ``commands`` grants them."""
    return sorted([name.removeprefix("do_") for name in dir(Commands) if name.startswith("do_")] + ["quit"])


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
        #: the users and their grants; SIGHUP replaces them (set_users)
        self.users: Users = config.users
        #: whether requests are checked at all (``_refusal``): a token is asked, or users
        #: were declared (SIGHUP may remove them all: their connections are closed still)
        self.guarded = config.token is not None or bool(self.users)
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
        if self.guarded:
            refusal = self._refusal(handler, session)
            if refusal is not None:
                figures.denied += 1
                return refusal
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

    def _refusal(self, handler: Callable, session) -> bytes | None:
        """What a request gets instead of running when the connection may not run
        it; None when it may. A connection whose user SIGHUP removed or changed
        is closed (its pipelined requests are dropped)."""
        user = session.user
        if user is not None:
            if self.revoked(session):
                return Close(wire.AUTH_REQUIRED_BYE, f"user {user.name} was removed or changed on SIGHUP")
            if handler.verb in ALWAYS_GRANTED or user.may_use(handler.verb):
                return None
            return error_line(f"Permission denied: {user.name} may not use {handler.verb}")
        if session.authenticated or handler.public:
            return None
        if self.config.token is None and not self.users:
            return None  # SIGHUP removed every user and no token is asked: as without users
        return wire.AUTH_REQUIRED

    def revoked(self, session) -> bool:
        """Whether ``session`` is a user that SIGHUP removed or changed since it
        authenticated: its next request closes it (``run``), and a follow under
        way ends at once (GcmdServer.end_revoked_follows)."""
        user = session.user
        return user is not None and self.users.named(user.name) is not user

    def admitted(self, session) -> None:
        """A connection was admitted, the CN of its verified certificate known
        (``client_cn``; None: none shown); called once per connection.

        With users, a CN that is a user's ``cn`` makes the connection that
        user; without, a certificate is all that a server without
        --token-file asks.
        """
        cn = session.client_cn
        if cn is None:
            return
        if self.users:
            user = self.users.with_cn(cn)
            if user is not None:
                become(session, self.stats, user)
        elif self.config.token is None:
            session.authenticated = True
            self.stats.authenticated += 1

    def set_users(self, users: Users) -> None:
        """The users from now on (SIGHUP). A connection keeps its user while that
        user is unchanged; one whose user is gone or changed is closed at its next request."""
        self.users = users.keeping(self.users)
        self.guarded = self.guarded or bool(users)

    def _granted_logs(self, session):
        """The names of the logs that exist for ``session``: None for every one."""
        user = session.user
        return None if user is None else user.logs

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
        """lastlog [LINES] [LOGS] [grep PATTERN] - the last LINES lines (default 10, at most 1000) of each log of LOGS (a,b: see logs), or the last that match PATTERN (RE2)"""
        try:
            query = parse_query(arg)
        except Usage:
            return wire.LASTLOG_QUERY_USAGE
        count = 10 if query.count is None else query.count
        names, logs = self._logs_of(query, session)
        pattern = None if query.pattern is None else Pattern(query.pattern)
        format = getattr(session, "format", TEXT)
        if len(logs) == 1 and pattern is None and format == TEXT:
            return block(b"lastlog", logs[0].lastlog(count))  # 1.1, and its shared reads
        several = len(logs) > 1 and format == TEXT
        # the 8 MiB of a reply, shared by the logs (headers included)
        limit = MAX_REPLY // len(logs) - (len(header(max(names, key=len))) + 1 if several else 0)
        lines: list[bytes] = []
        for name, log in zip(names, logs):
            if several:
                lines.append(header(name))
            lines += log.query(count, pattern, Shape(format, name), limit)
        return block(b"lastlog", lines)

    @command(slow=True)
    def do_follow(self, session, arg: bytes) -> bytes:
        """follow [LINES] [LOGS] [from CURSORS] [grep PATTERN] - the last LINES lines (default 0), then the new lines of logs as they are written, until you send a line"""
        try:
            query = parse_query(arg, follow=True)
        except Usage:
            return wire.FOLLOW_QUERY_USAGE
        names, logs = self._logs_of(query, session)
        cursors = {cursor.log: cursor for cursor in map(parse_cursor, query.cursors)}
        if len(cursors) < len(query.cursors) or not cursors.keys() <= set(names):
            raise CommandError("bad cursor")  # two of one log, or of a log not asked for
        pattern = None if query.pattern is None else Pattern(query.pattern)
        format = getattr(session, "format", TEXT)
        if len(logs) == 1 and not query.count and pattern is None and format == TEXT and not cursors:
            session.start_following(logs[0])  # 1.1: the log's own batches, shared by its followers
            return Follow(wire.BEGIN_FOLLOW)
        feed = Feed(list(zip(names, logs)), query.count or 0, pattern, format, cursors)
        session.start_following(feed)
        return Follow(b"".join([wire.BEGIN_FOLLOW, *(line + b"\n" for line in feed.backlog)]))

    def _logs_of(self, query: Query, session) -> tuple[list[str], list]:
        """The names and logs a query names (the default log when none); CommandError
        for an unknown one, or one not granted to the session's user (which is unknown too)."""
        among = self._granted_logs(session)
        if not query.logs:
            default = next(iter(name for name, _ in self.logs.listing(among)), self.logs.default)
            return [default], [self.logs.get(None, among)]
        logs = [self.logs.get(name, among) for name in query.logs]  # first: an unknown name is an error
        return [name.decode("ascii") for name in query.logs], logs

    @command()
    def do_format(self, session, arg: bytes) -> bytes:
        """format text|json - the lines of lastlog and follow on this connection: as text (default) or JSON objects"""
        formats = {b"text": TEXT, b"json": JSON}
        if arg not in formats:
            return wire.FORMAT_USAGE
        session.format = formats[arg]
        return wire.OK

    @command()
    def do_logs(self, session, arg: bytes) -> bytes:
        """logs - the logs lastlog and follow serve, the default first: NAME SOURCE"""
        return block(b"logs", [f"{name} {source}".encode("utf-8", "surrogateescape")
                               for name, source in self.logs.listing(self._granted_logs(session))])

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
            digest = self.hashing.digest(algorithm, path, None if session.user is None else session.user.root)
        except OutsideRoot:
            log.warning("Refused a path outside the %s from %s: %s",
                        "served root" if session.user is None else f"root of user {session.user.name}",
                        session.ip, wire.echo_path(path), extra=session.context)
            raise
        return b"File hash is : %s\n" % digest.encode()

    @command()
    def do_ping(self, session, arg: bytes) -> bytes:
        """ping - answer pong"""
        return wire.PONG

    @command()
    def do_stats(self, session, arg: bytes) -> bytes:
        """stats - figures about this server, one 'key value' per line"""
        figures = stats_figures(self.stats, self.hashing, self.config.max_clients, self.logs)
        return block(b"stats", [f"{key} {value}".encode() for key, value in figures.items()])

    @command(public=True)
    def do_help(self, session, arg: bytes) -> bytes:
        """help - list the commands"""
        return self._help

    @command(public=True)
    def do_version(self, session, arg: bytes) -> bytes:
        """version - the server's version and the protocol version it speaks"""
        return b"gcmd %s protocol %s\n" % (__version__.encode(), wire.PROTOCOL_VERSION.encode())

    @command(public=True, secret=True)
    def do_auth(self, session, arg: bytes) -> bytes:
        """auth [USER] TOKEN - authenticate as USER, or with the server's token"""
        return authenticate(session, arg, self.users, self.config.token, self.stats)

    @command(public=True)
    def do_whoami(self, session, arg: bytes) -> bytes:
        """whoami - the user this connection is, or anonymous"""
        user = session.user
        return b"anonymous\n" if user is None else f"{user.name}\n".encode()

    @command(public=True)
    def do_exit(self, session, arg: bytes) -> bytes:
        """exit - close the connection (also: quit)"""
        return Close(b"", "closed by the server after exit")
