"""The lastlog service: ``tail`` in a subprocess, bounded in time and output.

Starting a process forks the whole server in the hub's thread, which blocks
every client for a few milliseconds, so tail runs as rarely as possible:
concurrent identical requests share one run, and a reply is reused while the
log file's identity, size and modification time are unchanged.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
from dataclasses import dataclass

import gevent
from gevent import subprocess
from gevent.threadpool import ThreadPool

from gcmd.flight import LRU, SingleFlight, outcome, unwrap
from gcmd.protocol import CommandError, escape

log = logging.getLogger(__name__)

#: a reply larger than this is refused rather than held in memory
MAX_OUTPUT = 8 << 20

#: log lines that would end a reply early, or forge one, are never sent
_FORGED = frozenset([b"Begin lastlog", b"End lastlog", b"Begin lastlog\r", b"End lastlog\r"])


@dataclass
class TailStats:
    runs: int = 0
    reused: int = 0
    shared: int = 0
    timeouts: int = 0
    failures: int = 0


class LogTail:
    def __init__(self, logfile: str, command_timeout: float, metadata_pool: ThreadPool) -> None:
        self.logfile = logfile
        self.command_timeout = command_timeout
        self.metadata_pool = metadata_pool
        self.stats = TailStats()
        self._results = LRU(64)
        self._flights = SingleFlight()

    def lines(self, count: int) -> list[bytes]:
        """The last ``count`` lines of the log, less those the protocol drops."""
        try:
            st = unwrap(self.metadata_pool.apply(outcome, (os.stat, self.logfile)))
        except OSError as exc:
            raise CommandError(
                f"cannot read the log file '{self.logfile}': {exc.strerror} "
                f"(start gcmd with --logfile PATH to serve another log)") from None
        key = (count, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        lines = self._results.get(key)
        if lines is not None:
            self.stats.reused += 1
            return lines
        if self._flights.joined(key):
            self.stats.shared += 1
        lines = self._flights.run(key, self._tail, count)
        # a FIFO or a device has no size to vouch for its content: never reuse
        if stat.S_ISREG(st.st_mode):
            self._results.put(key, lines)
        return lines

    def _tail(self, count: int) -> list[bytes]:
        self.stats.runs += 1
        # Popen waits (cooperatively) for the exec to succeed; cancelled there,
        # it would leave a running child and its pipes behind. So it runs in a
        # greenlet of its own, and a tail that starts after we left is stopped.
        starter = gevent.spawn(outcome, subprocess.Popen,
                               ["tail", "-n", str(count), "--", self.logfile],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, close_fds=True, start_new_session=True)
        try:
            proc = unwrap(starter.get())
        except OSError as exc:
            self.stats.failures += 1
            log.warning("cannot start tail: %s", exc)
            raise CommandError(f"cannot start tail: {exc.strerror}") from None
        except BaseException:
            starter.link_value(_stop_started)
            raise
        try:
            with gevent.Timeout(self.command_timeout, False):
                out, err = _read_all(proc)
                status = proc.wait()
                if status != 0:
                    self.stats.failures += 1
                    message = escape(err.strip()) or f"tail exited with status {status}"
                    raise CommandError(message)
                return [line for line in out.splitlines() if not _dropped(line)]
            self.stats.timeouts += 1
            raise CommandError(f"lastlog timed out after {self.command_timeout:g} s")
        finally:
            _stop(proc)


def _dropped(line: bytes) -> bool:
    return line.startswith(b"==") or line in _FORGED


def _read_all(proc: subprocess.Popen) -> tuple[bytes, bytes]:
    errors = gevent.spawn(proc.stderr.read, 65536)
    try:
        chunks = []
        size = 0
        while chunk := proc.stdout.read(65536):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise CommandError(f"lastlog output is over {MAX_OUTPUT >> 20} MiB")
            chunks.append(chunk)
        return b"".join(chunks), errors.get()
    finally:
        errors.kill(block=False)


def _stop_started(starter: gevent.Greenlet) -> None:
    ok, proc = starter.value
    if ok:
        gevent.spawn(_stop, proc)


def _stop(proc: subprocess.Popen) -> None:
    """Kill tail's process group if it still runs, reap it, close its pipes."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        # the child watcher reaps it; waiting here must not be cut short
        with gevent.Timeout(5, False):
            proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()
