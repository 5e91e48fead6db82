"""The request lines of gcmd.client, as bytes: one line each, checked before they are sent."""

from __future__ import annotations

from collections.abc import Iterable


def request_bytes(request: str | bytes) -> bytes:
    """``request`` as the bytes sent (str as UTF-8), without its newline;
    ValueError when it holds a line break."""
    data = request.encode() if isinstance(request, str) else request
    if b"\n" in data or b"\r" in data:
        raise ValueError(f"a request is one line: {request!r}")
    return data


def logs_word(logs: str | Iterable[str] | None) -> str | None:
    """LOGS of a query: one name or several joined by commas; None: the default log.
    ValueError for an empty name list, or blanks in it."""
    if logs is None:
        return None
    word = logs if isinstance(logs, str) else ",".join(logs)
    if not word or any(c in word for c in " \t"):
        raise ValueError(f"logs: names joined by commas, without spaces, not {logs!r}")
    return word


def query(verb: str, lines: int | None, logs: str | None, cursors: Iterable[str],
           grep: str | None) -> bytes:
    """A ``lastlog``/``follow`` request: ``VERB [LINES] [LOGS] [from CURSORS] [grep PATTERN]``;
    ValueError for an empty pattern."""
    words = [verb]
    if lines is not None:
        words.append(str(int(lines)))
    if logs:
        words.append(logs)
    cursors = list(cursors)
    if cursors:
        words += ["from", ",".join(cursors)]
    if grep is not None:
        if not grep.strip():
            raise ValueError("grep: an empty pattern")
        words += ["grep", grep.strip()]
    return request_bytes(" ".join(words))
