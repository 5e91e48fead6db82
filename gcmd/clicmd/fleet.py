"""gcmd-cli's fleet mode (``--hosts``): one command on many servers, or a follow of them all.

The host lists are those of pdsh and clush, read by ClusterShell (imported
only here, and only when --hosts is given).
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable

from gcmd.clicmd.runner import Runner, client_of
from gcmd.clicmd.status import FAILED, INTERRUPTED, OK, UsageError
from gcmd.client import GcmdError


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
    out = sys.stdout

    def write(label: str, lines: list[str]) -> None:
        out.write("".join(f"{label}: {text}\n" if prefixed else f"{text}\n" for text in lines))
        out.flush()

    try:
        failed = Asking(options, line, targets).run(write)
    except KeyboardInterrupt:
        return INTERRUPTED
    report(failed, len(targets))
    return FAILED if failed else OK


class Asking:
    """One command asked of the hosts of a fleet (run_fleet), by ``--fanout``
    threads: each takes the next host, and says on ``events`` when it started
    and how it ended; a host not done within ``--timeout`` of its start has
    failed, and a new thread replaces the one stuck on it."""

    def __init__(self, options: argparse.Namespace, line: str, targets: list[tuple[str, str, int]]) -> None:
        self.options = options
        self.line = line
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        for target in targets:
            self.todo.put(target)
        #: (label, "started", time.monotonic()), (label, "done", lines) or (label, "failed", why)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        #: the hosts not done yet, and the deadlines of those started
        self.waiting = {label for label, _, _ in targets}
        self.deadlines: dict[str, float] = {}
        #: label -> why that host failed
        self.failed: dict[str, str] = {}

    def run(self, write: Callable[[str, list[str]], None]) -> dict[str, str]:
        """Ask every host, ``write(label, lines)`` each host's lines once they
        are whole, and return the hosts that failed: {label: why}."""
        for _ in range(min(self.options.fanout, len(self.waiting))):
            self.start_worker()
        while self.waiting:
            wait = max(0.0, min(self.deadlines.values()) - time.monotonic()) if self.deadlines else None
            try:
                label, kind, value = self.events.get(timeout=wait)
            except queue.Empty:
                self.give_up_late()
                continue
            if label not in self.waiting:
                continue  # the late end of a host given up
            if kind == "started":
                self.deadlines[label] = value + self.options.timeout
                continue
            del self.deadlines[label]
            self.waiting.discard(label)
            if kind == "failed":
                self.failed[label] = value
            else:
                write(label, value)
        return self.failed

    def give_up_late(self) -> None:
        """Fail the hosts past their deadline; a new thread takes the next hosts
        in place of each one stuck on such a host."""
        now = time.monotonic()
        for label, deadline in list(self.deadlines.items()):
            if deadline <= now:
                del self.deadlines[label]
                self.waiting.discard(label)
                self.failed[label] = f"no reply within {self.options.timeout:g} s"
                self.start_worker()

    def start_worker(self) -> None:
        threading.Thread(target=self.work, name="gcmd-cli host", daemon=True).start()

    def work(self) -> None:
        """A thread's life: ask the next host, until none is left."""
        while True:
            try:
                label, host, port = self.todo.get_nowait()
            except queue.Empty:
                return
            self.events.put((label, "started", time.monotonic()))
            try:
                with client_of(self.options, host, port) as client:
                    lines = list(Runner(client, self.options.json, label).run(self.line))
                self.events.put((label, "done", lines))
            except GcmdError as exc:
                self.events.put((label, "failed", exc.message))


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
