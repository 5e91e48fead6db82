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

The package's modules: ``options`` (the command line, the files it names),
``runner`` (the commands on one client, one command from the shell),
``printing`` (how lines are shown), ``prompt`` (the prompt, imported only
for it) and ``fleet`` (``--hosts``); ``status`` holds the exit statuses.
"""

from __future__ import annotations

import sys

from gcmd.clicmd.fleet import hosts_of, run_fleet
from gcmd.clicmd.options import parse_args, settings
from gcmd.clicmd.printing import Printer, shown
from gcmd.clicmd.runner import Runner, check_line, parse_query, run_one
from gcmd.clicmd.status import FAILED, INTERRUPTED, OK, UNREACHABLE, USAGE, UsageError

__all__ = [
    "FAILED", "INTERRUPTED", "OK", "UNREACHABLE", "USAGE", "Printer", "Runner", "UsageError", "hosts_of",
    "main", "parse_args", "parse_query", "run_fleet", "run_one", "shown",
]


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
            check_line(line)
            return run_fleet(options, line)
        if not line:
            from gcmd.clicmd.prompt import (
                interact,  # the prompt's modules, only for the prompt
            )

            return interact(options)
        check_line(line)
        return run_one(options, line)
    except UsageError as exc:
        print(f"gcmd-cli: {exc}", file=sys.stderr)
        return USAGE
