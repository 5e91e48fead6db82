"""The file-hashing service: root confinement, safe opening, streaming hashes.

Everything that touches the disk runs in threads, never in the hub: paths are
resolved and files opened in a small metadata pool, and digests computed in
the dedicated ``hash_pool``. Concurrent requests for the same unchanged file
share one read, and digests of unchanged files are remembered.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from dataclasses import dataclass
from functools import partial

from gevent.threadpool import ThreadPool

from gcmd.flight import LRU, SingleFlight, outcome, unwrap
from gcmd.net.wire import BUSY, CommandError, echo_path

#: bytes read per system call; hashlib releases the GIL for each update
CHUNK = 1 << 20

#: how much lower the hashing threads' priority is than the hub's: when every
#: core hashes, the scheduler still runs the hub at once to answer the others
HASH_NICENESS = 10

#: algorithms ``hash ALGO PATH`` accepts: the fixed-size ones every Python has
ALGORITHMS = tuple(sorted(a for a in hashlib.algorithms_guaranteed if not a.startswith("shake_")))

OUTSIDE_ROOT = "Permission denied: path is outside the served root"


class OutsideRoot(CommandError):
    """A path that leads out of the served root: refused, and a security signal."""


_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass
class HashStats:
    hashed_bytes: int = 0
    hashes: int = 0
    cache_hits: int = 0
    shared: int = 0
    busy: int = 0


class _Job:
    """A hash job in the pool; its cancel flag is set in the hub, read by the worker."""

    __slots__ = ("cancelled", "counted", "nbytes", "result")

    def __init__(self) -> None:
        self.cancelled = False
        #: still counted in HashService.in_pool
        self.counted = True
        self.nbytes = 0
        self.result = None


def _await(job: _Job) -> str:
    return unwrap(job.result.get())


class HashService:
    def __init__(self, root: str, workers: int, max_pending: int, cache_size: int,
                 metadata_pool: ThreadPool) -> None:
        self.served_root = os.fsencode(os.path.realpath(root))
        #: the dedicated pool that reads and hashes (not the hub's default pool)
        self.hash_pool = ThreadPool(workers)
        self.metadata_pool = metadata_pool
        #: jobs allowed in the pool at once: one per worker plus the waiting ones
        self.capacity = workers + max_pending
        self.in_pool = 0
        self.stats = HashStats()
        self._cache = LRU(cache_size)
        self._flights = SingleFlight()
        self._buffers = threading.local()

    def close(self) -> None:
        self.hash_pool.kill()

    @property
    def pending(self) -> int:
        """Jobs in the pool: running or waiting for a worker."""
        return self.in_pool

    def digest(self, algorithm: str, path: bytes, root: str | None = None) -> str:
        """The hex digest of the regular file at ``path`` (relative to the root).

        ``root``: a directory inside the served root that confines this request
        (a user's, gcmd.users), a real path; None: the served root. A path
        outside it is refused as one outside the served root is (OutsideRoot).
        """
        if b"\0" in path:
            raise CommandError("Invalid path: it contains a NUL byte")
        confined = self.served_root if root is None else os.fsencode(root)
        opened = self.metadata_pool.spawn(outcome, self._open, path, confined)
        try:
            fd, st = unwrap(opened.get())
        except BaseException:
            # the client left while the file was being opened: close it on arrival
            opened.rawlink(_close_opened)
            raise
        try:
            key = (algorithm, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            cached = self._cache.get(key)
            if cached is not None:
                self.stats.cache_hits += 1
                return cached
            # a request that joins a running hash starts no job of its own
            job = None
            if self._flights.joined(key):
                self.stats.shared += 1
            elif self.in_pool >= self.capacity:
                self.stats.busy += 1
                raise CommandError(BUSY)
            else:
                job = self._submit(fd, algorithm)
            hexdigest = self._flights.run(key, _await, job, on_cancel=job and partial(self._cancel, job))
        finally:
            os.close(fd)
        self._cache.put(key, hexdigest)
        return hexdigest

    def _submit(self, fd: int, algorithm: str) -> _Job:
        """Queue the hashing of ``fd``: from here on a worker thread owns a copy of it."""
        job = _Job()
        job_fd = os.dup(fd)
        try:
            job.result = self.hash_pool.spawn(outcome, self._hash_fd, job_fd, algorithm, job)
        except BaseException:
            os.close(job_fd)
            raise
        self.in_pool += 1
        job.result.rawlink(partial(self._done, job))
        return job

    def _cancel(self, job: _Job) -> None:
        # a job cancelled while it waits returns at once when a worker reaches
        # it, and a running one stops at its next chunk; either way it no
        # longer counts against --max-pending
        job.cancelled = True
        self._release(job)

    def _done(self, job: _Job, _result) -> None:
        self._release(job)
        self.stats.hashed_bytes += job.nbytes
        self.stats.hashes += 1

    def _release(self, job: _Job) -> None:
        if job.counted:
            job.counted = False
            self.in_pool -= 1

    # --- in threads ---------------------------------------------------------------

    def _open(self, path: bytes, root: bytes) -> tuple[int, os.stat_result]:
        """Resolve ``path`` inside ``root`` and open it without following a late swap."""
        real = os.path.realpath(os.path.join(root, path))
        if not _inside(real, root):
            raise OutsideRoot(OUTSIDE_ROOT)
        try:
            # decide before opening, so that a FIFO or a device is never opened
            if not stat.S_ISREG(os.stat(real).st_mode):
                raise CommandError(f"Not a regular file: '{echo_path(path)}'")
            fd = os.open(real, _OPEN_FLAGS)
        except OSError as exc:
            raise CommandError(f"[Errno {exc.errno}] {exc.strerror}: '{echo_path(path)}'") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CommandError(f"Not a regular file: '{echo_path(path)}'")
            # what was opened decides, not what the path named a moment before:
            # a directory swapped for a symlink after the check is caught here
            if not _inside(_opened_path(fd, real, st), root):
                raise OutsideRoot(OUTSIDE_ROOT)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def _hash_fd(self, fd: int, algorithm: str, job: _Job) -> str | None:
        try:
            if job.cancelled:
                return None
            buffer = getattr(self._buffers, "buffer", None)
            if buffer is None:  # the first job of this thread
                buffer = self._buffers.buffer = bytearray(CHUNK)
                _lower_priority()
            view = memoryview(buffer)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            digest = hashlib.new(algorithm)
            while n := os.readv(fd, (buffer,)):
                digest.update(view[:n])
                job.nbytes += n
                if job.cancelled:
                    return None
            return digest.hexdigest()
        except OSError as exc:
            raise CommandError(f"[Errno {exc.errno}] {exc.strerror} while reading") from None
        finally:
            os.close(fd)


def _inside(real: bytes, root: bytes) -> bool:
    """Whether the real path ``real`` is ``root`` or lies under it."""
    return root == b"/" or real == root or real.startswith(root + b"/")


def _lower_priority() -> None:
    """Make the calling thread nicer (on Linux, the nice value is per thread)."""
    try:
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + HASH_NICENESS))
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: the threads keep the hub's priority


def _opened_path(fd: int, resolved: bytes, st: os.stat_result) -> bytes:
    """The path of the file behind ``fd``, as the kernel knows it."""
    try:
        return os.readlink(b"/proc/self/fd/%d" % fd)
    except OSError:
        # no /proc: accept the resolved path only if it still names this file
        if os.path.samestat(os.stat(os.path.realpath(resolved)), st):
            return os.path.realpath(resolved)
        return b""


def _close_opened(result) -> None:
    ok, value = result.value
    if ok:
        os.close(value[0])
