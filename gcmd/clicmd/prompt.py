"""gcmd-cli's prompt: a command a line on one connection, with line editing and history.

Imported only when gcmd-cli is run without a command.
"""

from __future__ import annotations

import argparse
import cmd
import os
import sys

from gcmd.clicmd.runner import Runner, client_of, failed
from gcmd.clicmd.status import OK, UsageError
from gcmd.client import GcmdError

HISTORY = "~/.gcmd_cli_history"
#: lines of history kept
HISTORY_LENGTH = 1000
#: the words the prompt completes
COMMANDS = ("comphash", "exit", "follow", "hash", "help", "lastlog", "logs", "ping", "quit", "stats",
            "version", "whoami")


def interact(options: argparse.Namespace) -> int:
    """The prompt: a command a line, until ``exit``, ``quit`` or end of input."""
    client = client_of(options)
    try:
        client.connect()
    except GcmdError as exc:
        return failed(exc)
    tty = sys.stdin.isatty()
    history = os.path.expanduser(HISTORY)
    readline = load_history(history) if tty else None
    shell = Shell(Runner(client, options.json), tty)
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
            save_history(readline, history)
    return OK


class Shell(cmd.Cmd):
    """The prompt's loop: each line typed runs on ``runner``; ``exit``, ``quit``
    or the end of input ends it. ``tty``: standard input is a terminal, so a
    prompt (the server's address) is shown and lines are read with readline."""

    def __init__(self, runner: Runner, tty: bool) -> None:
        super().__init__()
        self.runner = runner
        self.prompt = f"{runner.client.address}> " if tty else ""
        self.use_rawinput = tty

    def onecmd(self, line: str) -> bool:
        line = line.strip()
        if line in ("exit", "quit", "EOF"):
            return True
        if line:
            run_at_prompt(self.runner, line)
        return False

    def completenames(self, text: str, *ignored) -> list[str]:
        return [word for word in COMMANDS if word.startswith(text)]


def run_at_prompt(runner: Runner, line: str) -> None:
    """Run one line typed at the prompt; an error is printed, and the prompt goes on."""
    try:
        for text in runner.run(line):
            print(text, flush=True)
    except KeyboardInterrupt:
        print()
    except (GcmdError, UsageError) as exc:
        print(f"(error) {exc}", file=sys.stderr)


def load_history(path: str):
    """The readline module, the history of ``path`` read into it (none yet: an
    empty one); None for a Python built without readline (the prompt works, without editing)."""
    try:
        import readline
    except ImportError:
        return None
    try:
        readline.read_history_file(path)
    except OSError:
        pass  # no history yet
    readline.set_history_length(HISTORY_LENGTH)
    return readline


def save_history(readline, path: str) -> None:
    """Write the prompt's history to ``path``; a failure is said on standard error."""
    try:
        readline.write_history_file(path)
    except OSError as exc:
        print(f"gcmd-cli: cannot write the history {path}: {exc.strerror}", file=sys.stderr)
