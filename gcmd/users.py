"""Users and grants: the ``[[user]]`` tables of ``--config`` (PROTOCOL.md, "Users and grants (1.2)").

A user has a name, a way in (the SHA-256 of a token, the CN of a client
certificate, or both), and grants: the logs it may read, the commands it may
use, and the directory ``comphash`` and ``hash`` may read for it. The table
is checked as a whole when it is read, at start and on SIGHUP; a bad one
raises UsersError, whose message is one line naming the user and the key.

Tokens are never held in clear: the table keeps their digests, and
``Users.authenticate`` hashes what a client sends and compares the digests
with ``hmac.compare_digest``, against a dummy digest when the user does not
exist, so that a failure costs the same either way.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field

try:
    import tomllib
except ModuleNotFoundError:  # Python before 3.11
    import tomli as tomllib

#: the key of the users' tables in a --config file: ``[[user]]``
USER_TABLE = "user"
#: the keys a ``[[user]]`` table may hold
KEYS = ("name", "token_sha256", "cn", "logs", "commands", "root")
#: in ``logs`` or ``commands``: every one
EVERY = "*"

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}").fullmatch
_HEX_SHA256 = re.compile(r"[0-9A-Fa-f]{64}").fullmatch
#: what a missing user's token is compared with: no token hashes to it that anyone knows
_NO_DIGEST = hashlib.sha256(b"gcmd: no such user").digest()

#: why an ``auth`` failed, as stats and metrics count it (never sent to the client):
#: the --token-file token was wrong, a user's token was wrong (or it has none), no such user
AUTH_FAILURES = ("bad_token", "bad_user_token", "unknown_user")


class UsersError(ValueError):
    """A users table gcmd cannot use; the message is one line naming the user and the key."""


@dataclass(frozen=True)
class User:
    """One ``[[user]]`` table, checked. ``logs`` and ``commands`` are None when
    the table says ``"*"`` (every one); ``root`` is a real path (symlinks resolved)."""

    name: str
    #: the SHA-256 digest (32 bytes) of the user's token; None: no token, a certificate only
    token_sha256: bytes | None = field(default=None, repr=False)
    #: the CN of a verified client certificate that makes a connection this user
    cn: str | None = None
    logs: frozenset[str] | None = frozenset()
    commands: frozenset[str] | None = frozenset()
    root: str = "/"

    def may_use(self, verb: str) -> bool:
        """Whether the user is granted the command ``verb`` (those always granted aside)."""
        return self.commands is None or verb in self.commands


class Users:
    """The users of a server, by name and by CN; empty when none is declared (1.1 behaviour)."""

    def __init__(self, users: Iterable[User] = ()) -> None:
        self._by_name = {user.name: user for user in users}
        self._by_cn = {user.cn: user for user in self._by_name.values() if user.cn is not None}

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[User]:
        return iter(self._by_name.values())

    def __repr__(self) -> str:  # names only: the settings line at level debug shows it
        return f"Users({', '.join(self._by_name)})"

    def named(self, name: str) -> User | None:
        return self._by_name.get(name)

    def with_cn(self, cn: str) -> User | None:
        """The user a verified client certificate with this CN is, if any."""
        return self._by_cn.get(cn)

    def authenticate(self, name: bytes, token: bytes) -> tuple[User | None, str]:
        """(the user, "") when ``token`` is the token of user ``name``; else (None,
        the reason of AUTH_FAILURES). The work is the same whether the user exists or not."""
        digest = hashlib.sha256(token).digest()
        user = self._by_name.get(name.decode("ascii", "replace"))
        expected = user.token_sha256 if user is not None and user.token_sha256 is not None else _NO_DIGEST
        matched = hmac.compare_digest(digest, expected)
        if user is None:
            return None, "unknown_user"
        if not matched or user.token_sha256 is None:
            return None, "bad_user_token"
        return user, ""

    def keeping(self, old: Users) -> Users:
        """This table, with the users unchanged since ``old`` kept as the very objects
        of ``old``: a connection's user is current while ``named(user.name) is user``."""
        return Users(old._by_name[user.name] if old._by_name.get(user.name) == user else user
                     for user in self)


def hash_token(token: bytes) -> str:
    """The hex SHA-256 of ``token``: what ``token_sha256`` holds (``printf %s TOKEN | sha256sum``)."""
    return hashlib.sha256(token).hexdigest()


def read_users(path: str, served_root: str, log_names: Collection[str],
               command_words: Collection[str]) -> Users:
    """The users of the ``[[user]]`` tables of the TOML file ``path`` (none: an empty Users).

    ``served_root``: --root; ``log_names``: the logs served, ``gcmd`` included;
    ``command_words``: the commands. Raises UsersError, its message
    starting with ``--config PATH:``, for a file that cannot be read or a bad table.
    """
    try:
        with open(path, "rb") as f:
            tables = tomllib.load(f).get(USER_TABLE, [])
    except OSError as exc:
        raise UsersError(f"cannot read --config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsersError(f"--config {path} is not valid TOML: {exc}") from None
    try:
        return parse_users(tables, served_root, log_names, command_words)
    except UsersError as exc:
        raise UsersError(f"--config {path}: {exc}") from None


def parse_users(tables: object, served_root: str, log_names: Collection[str],
                command_words: Collection[str]) -> Users:
    """The users of ``tables`` (the ``[[user]]`` array of a TOML file), checked;
    see read_users. UsersError names the first user and key found wrong."""
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise UsersError(f"'{USER_TABLE}' must be [[{USER_TABLE}]] tables")
    root = os.path.realpath(served_root)
    users: list[User] = []
    names: set[str] = set()
    cns: dict[str, str] = {}
    for number, table in enumerate(tables, 1):
        user = _user(table, number, root, log_names, command_words)
        if user.name in names:
            raise UsersError(f"user '{user.name}': 'name': the name is given to two users")
        names.add(user.name)
        if user.cn is not None:
            if user.cn in cns:
                raise UsersError(f"user '{user.name}': 'cn': {user.cn!r} is already the CN of user "
                                f"'{cns[user.cn]}'")
            cns[user.cn] = user.name
        users.append(user)
    return Users(users)


def _user(table: dict, number: int, root: str, log_names: Collection[str],
          command_words: Collection[str]) -> User:
    name = table.get("name")
    if not isinstance(name, str) or not _NAME(name):
        what = "is missing" if name is None else f"must be 1 to 64 of A-Z a-z 0-9 _ . -, not {name!r}"
        raise UsersError(f"user #{number}: 'name' {what}")
    who = f"user '{name}'"
    for key in table:
        if key == "token":
            raise UsersError(f"{who}: 'token': a token is never written in clear: give "
                             "token_sha256, its hex SHA-256 (gcmd --hash-token, or printf %s TOKEN | sha256sum)")
        if key not in KEYS:
            raise UsersError(f"{who}: unknown key '{key}' (the keys are {', '.join(KEYS)})")
    digest = table.get("token_sha256")
    if digest is not None and (not isinstance(digest, str) or not _HEX_SHA256(digest)):
        raise UsersError(f"{who}: 'token_sha256' must be 64 hex digits, the SHA-256 of the token "
                         "(gcmd --hash-token)")
    cn = table.get("cn")
    if cn is not None and (not isinstance(cn, str) or not cn):
        raise UsersError(f"{who}: 'cn' must be the CN of a client certificate, not {cn!r}")
    if digest is None and cn is None:
        raise UsersError(f"{who}: 'token_sha256' and 'cn' are both missing: give one, or both")
    return User(
        name=name,
        token_sha256=None if digest is None else bytes.fromhex(digest),
        cn=cn,
        logs=_grants(table, "logs", who, log_names, "log"),
        commands=_grants(table, "commands", who, command_words, "command"),
        root=_root(table.get("root"), who, root),
    )


def _grants(table: dict, key: str, who: str, known: Collection[str], what: str) -> frozenset[str] | None:
    """The names ``table[key]`` grants; None for every one (``"*"``)."""
    names = table.get(key, [])
    if not isinstance(names, list) or not all(isinstance(item, str) for item in names):
        raise UsersError(f"{who}: '{key}' must be a list of {what} names, or [\"*\"]")
    for item in names:
        if item != EVERY and item not in known:
            raise UsersError(f"{who}: '{key}': unknown {what} '{item}' "
                             f"(choose from {', '.join(known)}, or \"*\" for every one)")
    return None if EVERY in names else frozenset(names)


def _root(given: object, who: str, served_root: str) -> str:
    """The real path of a user's ``root`` (relative: to --root; missing: --root itself)."""
    if given is None:
        return served_root
    if not isinstance(given, str) or not given:
        raise UsersError(f"{who}: 'root' must be a directory, not {given!r}")
    real = os.path.realpath(os.path.join(served_root, given))
    if not (served_root == "/" or real == served_root or real.startswith(served_root + "/")):
        raise UsersError(f"{who}: 'root' {given} is outside --root {served_root}")
    if not os.path.isdir(real):
        raise UsersError(f"{who}: 'root' {given} is not a directory")
    return real
