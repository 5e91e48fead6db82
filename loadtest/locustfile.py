"""Locust load test of gcmd: ``locust -f loadtest/locustfile.py --host 127.0.0.1:9999``.

Each user holds one connection of gcmd.client (re-opened after a drop) and
sends ``ping``, ``comphash``, ``lastlog`` and ``stats`` with the weights of
the ``--*-weight`` options. ``comphash`` hashes the regular files of ``--gcmd-files DIR``, sent
as absolute paths of this machine: the server must serve the same files at
the same paths, inside its ``--root``. Without ``--gcmd-files``, each locust
process makes one set of files in the system's temporary directory, shared by
its users and removed when locust quits; the server's ``--root`` must then
contain that directory (a line names it). Add ``loadtest/stepshape.py`` to
``-f`` for a load that grows in steps (see there).

With ``--csv PREFIX``, locust rewrites ``PREFIX_stats.csv`` once a second
while it runs, so that file misses what happened after its last write; this
file adds ``PREFIX_final_stats.csv`` and ``PREFIX_final_failures.csv``,
written once the run is over, with the figures of locust's own final table
and HTML report. ``scripts/loadtest`` runs all of this for you.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import shutil
import ssl
import tempfile

from locust import User, between, events, task
from locust.runners import WorkerRunner
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

from gcmd.client import GcmdError
from loadtest.client import GcmdClient

log = logging.getLogger(__name__)


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    group = parser.add_argument_group("gcmd")
    group.add_argument("--ping-weight", type=int, default=10, help="relative weight of ping")
    group.add_argument("--comphash-weight", type=int, default=3, help="relative weight of comphash")
    group.add_argument("--lastlog-weight", type=int, default=2, help="relative weight of lastlog")
    group.add_argument("--stats-weight", type=int, default=1, help="relative weight of stats")
    group.add_argument("--gcmd-files", default="",
                       help="directory of files for comphash, at the same path inside the server's "
                            "root (default: files made in the temporary directory)")
    group.add_argument("--gcmd-token", default="", help="token for 'auth' (a --token-file server)")
    group.add_argument("--gcmd-tls", action="store_true", help="connect with TLS")
    group.add_argument("--gcmd-ca", default="", help="CA file to verify the server's certificate")
    group.add_argument("--gcmd-tls-insecure", action="store_true",
                       help="with --gcmd-tls, do not verify the certificate")
    group.add_argument("--gcmd-timeout", type=float, default=10.0, help="seconds to wait for a reply")


@events.quitting.add_listener
def write_final_stats(environment, **_kwargs) -> None:
    """Once the run is over, write the figures locust's table and report show
    to ``PREFIX_final_stats.csv`` and ``PREFIX_final_failures.csv`` (``--csv PREFIX``)."""
    options = environment.parsed_options
    if options is None or not options.csv_prefix or isinstance(environment.runner, WorkerRunner):
        return
    figures = StatsCSV(environment, PERCENTILES_TO_REPORT)
    with open(f"{options.csv_prefix}_final_stats.csv", "w", newline="") as f:
        figures.requests_csv(csv.writer(f))
    with open(f"{options.csv_prefix}_final_failures.csv", "w", newline="") as f:
        figures.failures_csv(csv.writer(f))


def target(host: str) -> tuple[str, int]:
    """``tcp://127.0.0.1:9999``, ``127.0.0.1:9999`` or ``[::1]:9999`` as (host, port)."""
    host = host.removeprefix("tcp://").removeprefix("tls://").rstrip("/")
    name, _, port = host.rpartition(":")
    if not name or not port.isdigit():
        raise ValueError(f"--host must be HOST:PORT, not {host!r}")
    return name.strip("[]"), int(port)


def tls_context(options) -> ssl.SSLContext | None:
    if not options.gcmd_tls:
        return None
    context = ssl.create_default_context(cafile=options.gcmd_ca or None)
    if options.gcmd_tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class SharedFiles:
    """The files comphash hashes without ``--gcmd-files``: made in the system's
    temporary directory when the first user needs them, shared by every user
    of this process, removed when locust quits."""

    #: the files' sizes: 256 KiB to 1 MiB
    SIZES = tuple((256 << 10) * (i + 1) for i in range(4))

    def __init__(self) -> None:
        self.directory: str | None = None

    def get(self, environment) -> str:
        """The directory's path; the first call makes it."""
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="gcmd-load-")
            environment.events.quit.add_listener(self.remove)
            for i, size in enumerate(self.SIZES):
                with open(os.path.join(self.directory, f"file{i}.bin"), "wb") as f:
                    f.write(os.urandom(size))
            log.info("comphash hashes the files of %s (no --gcmd-files): the server's --root "
                     "must contain that directory", self.directory)
        return self.directory

    def remove(self, **_kwargs) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


#: one set per locust process: the users of a process share it (a process is
#: the unit locust starts, and the one whose quit event removes it)
shared_files = SharedFiles()


def hash_files(directory: str) -> list[str]:
    """The absolute paths of the regular files in ``directory``, sorted."""
    return sorted(os.path.abspath(entry.path) for entry in os.scandir(directory) if entry.is_file())


class GcmdUser(User):
    """One connection, requests one at a time, with the weights of the options."""

    wait_time = between(0.0, 0.01)

    def __init__(self, environment) -> None:
        super().__init__(environment)
        options = environment.parsed_options
        self.tasks = ([GcmdUser.ping] * options.ping_weight
                      + [GcmdUser.comphash] * options.comphash_weight
                      + [GcmdUser.lastlog] * options.lastlog_weight
                      + [GcmdUser.stats] * options.stats_weight)
        host, port = target(self.host or environment.host)
        # the token is sent as each connection opens (gcmd.client)
        self.client = GcmdClient(host, port, timeout=options.gcmd_timeout, tls=tls_context(options),
                                 token=options.gcmd_token, fire=environment.events.request.fire)
        self.files = []
        if options.comphash_weight:
            self.files = hash_files(options.gcmd_files or shared_files.get(environment))

    def on_stop(self) -> None:
        self.client.close()

    def send(self, call, *args) -> None:
        try:
            call(*args)
        except GcmdError:
            pass  # already reported to locust as a failure; the next request reconnects if need be

    @task
    def ping(self) -> None:
        self.send(self.client.ping)

    @task
    def comphash(self) -> None:
        if self.files:
            self.send(self.client.comphash, random.choice(self.files))

    @task
    def lastlog(self) -> None:
        self.send(self.client.lastlog, 20)

    @task
    def stats(self) -> None:
        self.send(self.client.stats)
