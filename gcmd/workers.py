"""``--workers N``: N server processes on one port, and the parent that supervises them.

One gevent process uses one core. With SO_REUSEPORT each worker listens on
its own socket bound to the same port and the kernel spreads the connections
among them; where the system lacks it, the workers accept from one listening
socket made before they were forked. The parent serves nobody: it starts the
workers, starts another when one dies, and passes SIGTERM, SIGINT and SIGHUP
on to them. It never starts a gevent hub, so that every worker forks from a
process with none.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from gcmd.config import Config

log = logging.getLogger(__name__)

#: seconds between the start of a worker and its replacement, when it died at once
RESTART_PAUSE = 1.0

REUSE_PORT = hasattr(socket, "SO_REUSEPORT")
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: the exit status of a worker that could not start serving (a crash is 1 or a signal)
CANNOT_START = 3


def bind(config: Config, *, reuse_port: bool, listen: bool) -> socket.socket:
    """A plain socket bound to the configured address; listening if ``listen``."""
    family, kind, proto, _, address = socket.getaddrinfo(
        config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if listen:
            sock.listen(config.backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class Supervisor:
    """Runs ``serve(listener, number, ready)`` in ``count`` forked workers until SIGTERM or SIGINT.

    ``serve`` gets a plain listening socket, the worker's number (0 to
    count - 1) and a function to call once it serves, and returns 0 after
    serving or non-zero when it could not start: gcmd then stops, since
    another worker could not either. A worker that dies otherwise is
    replaced.
    """

    def __init__(self, config: Config, count: int, serve: Callable[[socket.socket, int, Callable[[], None]], int],
                 on_hangup: Callable[[], None]) -> None:
        self.count = count
        self.serve = serve
        self.on_hangup = on_hangup
        #: pid -> (worker number, when it started)
        self.workers: dict[int, tuple[int, float]] = {}
        self.stopping = False
        #: in a worker started by run(): the pipe to say that it serves
        self._ready_fd: int | None = None
        # bound before any worker exists, so that a port in use fails at once
        # and port 0 becomes one port that every worker shares
        if REUSE_PORT:
            # a port that others hold, even with SO_REUSEPORT, fails here:
            # another gcmd of the same user must not silently join this one
            with bind(config, reuse_port=False, listen=False) as probe:
                config = dataclasses.replace(config, port=probe.getsockname()[1])
            self.socket = bind(config, reuse_port=True, listen=False)
        else:
            self.socket = bind(config, reuse_port=False, listen=True)
        self.config = config
        self.port = self.socket.getsockname()[1]

    def run(self, on_ready: Callable[[], None]) -> int:
        """Start the workers and supervise them; the exit status once they have all stopped.

        ``on_ready`` is called once every worker serves.
        """
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._hangup)
        readiness, self._ready_fd = os.pipe()
        try:
            for number in range(self.count):
                if self.stopping:
                    break
                self._start(number)
        except OSError as exc:
            log.error("cannot start worker %d: %s; stopping", number, exc.strerror or exc)
            self.stop()
        finally:
            os.close(self._ready_fd)
            self._ready_fd = None
        # a byte from each worker that serves; the end of the pipe once none is left to write
        ready = 0
        while ready < self.count and (byte := os.read(readiness, 64)):
            ready += len(byte)
        os.close(readiness)
        if ready == self.count:
            on_ready()
        elif not self.stopping:
            log.warning("only %d of %d workers started serving", ready, self.count)
        status = 0
        while self.workers:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            number, started = self.workers.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if code == CANNOT_START:
                # its port for metrics is taken, say: so would another's be
                log.error("worker %d (pid %d) could not start; stopping", number, pid)
                status = 1
                self.stop()
                continue
            if self.stopping:
                status = status or max(0, code)
                continue
            log.warning("worker %d (pid %d) %s; starting another", number, pid,
                        f"exited with status {code}" if code >= 0 else
                        f"was killed by {signal.Signals(-code).name}")
            if time.monotonic() - started < RESTART_PAUSE:
                time.sleep(RESTART_PAUSE)  # a worker that dies at once is not restarted in a loop
            if not self.stopping:
                try:
                    self._start(number)
                except OSError as exc:
                    log.error("cannot start worker %d: %s; %d workers left", number,
                              exc.strerror or exc, len(self.workers))
        self.socket.close()
        log.info("All workers stopped")
        return status

    def _start(self, number: int) -> None:
        for handler in logging.getLogger("gcmd").handlers:
            handler.flush()  # a forked buffer would be written twice
        # a signal between the fork and the bookkeeping would miss the new worker
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
            raise
        if pid:
            self.workers[pid] = (number, time.monotonic())
            if self.stopping:  # stopped while it was being started
                os.kill(pid, signal.SIGTERM)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
            return
        status = 1
        try:
            # until the worker handles them itself: stop, or ignore a reload
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
            if REUSE_PORT:
                self.socket.close()
                listener = bind(self.config, reuse_port=True, listen=True)
            else:
                listener = self.socket
            status = CANNOT_START if self.serve(listener, number, self._ready) else 0
        except BaseException:
            log.exception("worker %d failed", number)
        finally:
            for handler in logging.getLogger("gcmd").handlers:
                handler.flush()
            os._exit(status)

    def _ready(self) -> None:
        """In a worker: it serves. Only the first workers tell (they are awaited)."""
        if self._ready_fd is not None:
            os.write(self._ready_fd, b".")
            os.close(self._ready_fd)
            self._ready_fd = None

    def stop(self) -> None:
        """Stop every worker gracefully; run() returns once they have all exited."""
        self.stopping = True
        self._signal_workers(signal.SIGTERM)

    def _stop(self, signum, frame) -> None:
        if not self.stopping:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(self.workers))
        self.stop()

    def _hangup(self, signum, frame) -> None:
        self.on_hangup()
        self._signal_workers(signal.SIGHUP)

    def _signal_workers(self, signum: int) -> None:
        for pid in self.workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

