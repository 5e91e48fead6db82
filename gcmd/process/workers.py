"""``--workers N``: N server processes on one port, and the parent that supervises them.

One gevent process uses one core. As in gunicorn and nginx, the parent opens
one listening socket and the workers, forked from it, accept from it: no
other program can bind the port meanwhile, and the connections waiting in its
queue are taken by whichever worker is free, so none is lost when a worker
hangs or dies. With ``--reuse-port`` each worker listens on its own
SO_REUSEPORT socket instead and the kernel spreads new connections among
them by a hash: more evenly while the workers are idle (300 connections to
idle workers on 2 cores, per worker: one after another 142-158 either way
with 2 workers; a burst of 300 held open 122/178 with one socket, 141/159
with SO_REUSEPORT; with 4 workers 57-122 against 64-91), at the cost of
those two guarantees (a process of the same user can bind the port and take
connections; those queued on a worker that dies are reset). With one socket
a busy worker accepts less, so under load the spread follows the work. The parent serves nobody: it starts the workers, starts
another when one dies, and passes SIGTERM, SIGINT and SIGHUP on to them. It never starts a gevent hub, so that every worker forks from a
process with none.

Its signal handlers do nothing but have the signal recorded: Python writes
the number of each signal to the wakeup pipe (``signal.set_wakeup_fd``), and
the supervisor's loop reads the numbers and acts on them, as gunicorn's
arbiter does with its signal queue.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from gcmd.config import Config

log = logging.getLogger(__name__)

#: seconds between the start of a worker and its replacement, when it died at once
RESTART_PAUSE = 1.0

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: the signals the supervisor acts on, in the order it acts on those that arrive together
_HANDLED = (*_FORWARDED, signal.SIGCHLD)
#: the exit status of a worker that could not start serving (a crash is 1 or a signal)
CANNOT_START = 3

#: what a worker runs: serve(its config, its listening socket, call once serving) -> status
Serve = Callable[[Config, socket.socket, Callable[[], None]], int]


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


def _record(signum: int, frame: object) -> None:
    """Python has written ``signum`` to the wakeup pipe already: the loop acts on it."""


class Supervisor:
    """Runs ``serve`` in ``config.workers`` forked workers until SIGTERM or SIGINT.

    ``serve`` gets the worker's Config (``worker`` is its number, 0 to
    workers - 1, and ``port`` the one they share), a plain listening socket
    and a function to call once it serves, and returns 0 after serving or
    non-zero when it could not start: gcmd then stops, since another worker
    could not either. A worker that dies otherwise is replaced.
    ``on_hangup`` runs in the parent on SIGHUP, before the workers get it.
    """

    def __init__(self, config: Config, serve: Serve, on_hangup: Callable[[], None]) -> None:
        self.serve = serve
        self.on_hangup = on_hangup
        #: pid -> (worker number, when it started)
        self.workers: dict[int, tuple[int, float]] = {}
        #: worker number -> when to start it again (monotonic)
        self.restarts: dict[int, float] = {}
        self.stopping = False
        self.status = 0
        #: the wakeup pipe (read, write) that the signal numbers are written to
        self._wakeup: tuple[int, int] | None = None
        #: the pipe that each of the first workers writes a byte to once it serves:
        #: its read end while the supervisor waits for them, its write end while it starts them
        self._ready_read: int | None = None
        self._ready_write: int | None = None
        # bound before any worker exists, so that a port in use fails at once
        # and port 0 becomes one port that every worker shares
        if config.reuse_port:
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
        wakeup = os.pipe()
        for fd in wakeup:
            os.set_blocking(fd, False)
        previous_fd = signal.set_wakeup_fd(wakeup[1], warn_on_full_buffer=False)
        previous = {signum: signal.signal(signum, _record) for signum in _HANDLED}
        self._wakeup = wakeup
        try:
            self._start_all()
            self._supervise(on_ready)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(previous_fd)
            self._wakeup = None
            for fd in wakeup:
                os.close(fd)
            self.socket.close()
        log.info("All workers stopped")
        return self.status

    def _start_all(self) -> None:
        """Start the first workers, each holding the write end of the readiness pipe."""
        self._ready_read, self._ready_write = os.pipe()
        try:
            for number in range(self.config.workers):
                self._start(number)
        except OSError as exc:
            log.error("cannot start worker %d: %s; stopping", number, exc.strerror or exc)
            self.stop()
        finally:
            os.close(self._ready_write)
            self._ready_write = None

    def _supervise(self, on_ready: Callable[[], None]) -> None:
        """Wait for readiness, signals and restart times until no worker is left."""
        ready = 0
        while self.workers or self.restarts:
            due = min(self.restarts.values(), default=None)
            timeout = None if due is None else max(0.0, due - time.monotonic())
            fds = [self._wakeup[0]] + ([self._ready_read] if self._ready_read is not None else [])
            readable, _, _ = select.select(fds, [], [], timeout)
            if self._ready_read in readable:
                # a byte from each first worker that serves; the end of the pipe once none can
                if data := os.read(self._ready_read, 64):
                    ready += len(data)
                if ready == self.config.workers or not data:
                    self._stop_waiting_for_readiness()
                    if ready == self.config.workers and not self.stopping:
                        on_ready()
                    elif not self.stopping:
                        log.warning("only %d of %d workers started serving", ready, self.config.workers)
            if self._wakeup[0] in readable:
                # a stop first: a Ctrl-C reaches the workers too, and one that has
                # exited already is then not taken for a worker to replace
                for signum in sorted(set(os.read(self._wakeup[0], 256)), key=_HANDLED.index):
                    self._act(signum)
            self._restart_due()
        if self._ready_read is not None:
            self._stop_waiting_for_readiness()

    def _stop_waiting_for_readiness(self) -> None:
        os.close(self._ready_read)
        self._ready_read = None

    def _act(self, signum: int) -> None:
        """What a signal recorded in the wakeup pipe asks for."""
        if signum == signal.SIGCHLD:
            self._reap()
        elif signum == signal.SIGHUP:
            self.on_hangup()
            self._signal_workers(signal.SIGHUP)
        elif signum in (signal.SIGTERM, signal.SIGINT):
            if not self.stopping:
                log.info("%s: stopping %d workers", signal.Signals(signum).name, len(self.workers))
            self.stop()

    def _reap(self) -> None:
        """Account for every worker that has exited; schedule the replacement of a dead one."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            number, started = self.workers.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if code == CANNOT_START:
                # its port for metrics is taken, say: so would another's be
                log.error("worker %d (pid %d) could not start; stopping", number, pid)
                self.status = 1
                self.stop()
            elif self.stopping:
                self.status = self.status or max(0, code)
            else:
                log.warning("worker %d (pid %d) %s; starting another", number, pid,
                            f"exited with status {code}" if code >= 0 else
                            f"was killed by {signal.Signals(-code).name}")
                # a worker that dies at once is not restarted in a loop
                self.restarts[number] = max(time.monotonic(), started + RESTART_PAUSE)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for number, due in list(self.restarts.items()):
            if due <= now:
                del self.restarts[number]
                try:
                    self._start(number)
                except OSError as exc:
                    log.error("cannot start worker %d: %s; %d workers left", number,
                              exc.strerror or exc, len(self.workers))

    def _start(self, number: int) -> None:
        for handler in logging.getLogger("gcmd").handlers:
            handler.flush()  # a forked buffer would be written twice
        # until the child has reset them, its signals would be written to the
        # parent's wakeup pipe: keep them pending
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
            raise
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
            self.workers[pid] = (number, time.monotonic())
            log.debug("started worker %d (pid %d)", number, pid)
            return
        os._exit(self._worker(number))

    def _worker(self, number: int) -> int:
        """In a forked worker: serve; the exit status."""
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            # until the worker handles them itself: stop, or ignore a reload
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
            for fd in (*self._wakeup, self._ready_read):
                if fd is not None:
                    os.close(fd)
            if self.config.reuse_port:
                self.socket.close()
                listener = bind(self.config, reuse_port=True, listen=True)
            else:
                listener = self.socket
            config = dataclasses.replace(self.config, worker=number)
            status = CANNOT_START if self.serve(config, listener, _readiness_signal(self._ready_write)) else 0
        except BaseException:
            log.exception("worker %d failed", number)
        finally:
            for handler in logging.getLogger("gcmd").handlers:
                handler.flush()
        return status

    def stop(self) -> None:
        """Stop every worker gracefully; run() returns once they have all exited."""
        self.stopping = True
        self.restarts.clear()
        self._signal_workers(signal.SIGTERM)

    def _signal_workers(self, signum: int) -> None:
        for pid in self.workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def _readiness_signal(fd: int | None) -> Callable[[], None]:
    """What a worker calls once it serves: a byte to the supervisor if it waits for one."""
    def ready() -> None:
        nonlocal fd
        if fd is not None:
            os.write(fd, b".")
            os.close(fd)
            fd = None
    return ready
