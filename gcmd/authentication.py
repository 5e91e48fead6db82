"""How a connection becomes authenticated (``auth``, or the CN of its
certificate: gcmd.commands.Commands.admitted), and what a failed ``auth`` gets.

The ``session`` is the connection's gcmd.net.client.Client, as gcmd.commands
gives it: ``authenticated``, ``user`` (a gcmd.users.User, else None) and the
``context`` of its log lines are kept on it.
"""

from __future__ import annotations

import hmac
import logging
import re

from gcmd.net import wire
from gcmd.net.wire import Close, escape
from gcmd.observe.stats import ServerStats
from gcmd.serverlog.setup import flush_lines
from gcmd.users import User, Users

log = logging.getLogger(__name__)

#: what separates the words of an argument (PROTOCOL.md: spaces and tabs only)
_SPACES = re.compile(rb"[ \t]+")


def authenticate(session, arg: bytes, users: Users, token: bytes | None, stats: ServerStats) -> bytes:
    """The reply to ``auth ARG``: with users, ``USER TOKEN`` makes ``session``
    that user (a token alone is checked against the --token-file ``token``,
    if any); without, ``TOKEN`` must be ``token`` (None: AUTH_DISABLED). A
    failure is ``auth_failed``'s reply, which closes the connection."""
    if users:
        words = _SPACES.split(arg)
        if len(words) == 2:
            user, reason = users.authenticate(*words)
            if user is None:
                return auth_failed(session, stats, reason, words[0] if reason == "bad_user_token" else None)
            become(session, stats, user)
            return wire.AUTH_OK
    elif token is None:
        return wire.AUTH_DISABLED
    if token is not None and hmac.compare_digest(arg, token):
        become(session, stats, None)
        return wire.AUTH_OK
    return auth_failed(session, stats, "bad_token")


def become(session, stats: ServerStats, user: User | None) -> None:
    """Authenticate ``session`` as ``user`` (None: with the --token-file token),
    and name the user in its log lines' context (``Session,4,10.0.0.7,alice``,
    and a ``user`` key: gcmd.serverlog.formats), updated in place."""
    if not session.authenticated:
        session.authenticated = True
        stats.authenticated += 1
    # the lines logged so far, batched a few milliseconds, are made now: the
    # dict they hold changes, and they came before the user was known
    flush_lines()
    context = session.context
    if session.user is not None:  # it was another user: its name goes
        context["context"] = context["context"].removesuffix(f",{session.user.name}")
        del context["user"]
    session.user = user
    if user is not None:
        context["context"] = f"{context['context']},{user.name}"
        context["user"] = user.name


def auth_failed(session, stats: ServerStats, reason: str, name: bytes | None = None) -> Close:
    """The reply to a failed auth, the same whatever the ``reason`` (one of
    gcmd.users.AUTH_FAILURES, counted in stats: the operator's, never the
    client's); the log names the user when it exists (``name``)."""
    stats.auth_failed[reason] += 1
    if name is not None:
        log.warning("Authentication failed from %s: a wrong token for user %s", session.ip,
                    escape(name), extra=session.context)
    else:  # an unknown user's name is not written: it may be a token typed in the wrong place
        log.warning("Authentication failed from %s%s", session.ip,
                    ": no such user" if reason == "unknown_user" else "", extra=session.context)
    return Close(wire.AUTH_FAILED, "closed by the server after a failed auth")
