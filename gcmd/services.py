"""What the commands work on, made from the settings, started and closed with the server.

The network core (gcmd.net) knows only ``commands``; the rest is here: the
hashing service, the logs gcmd serves, gcmd's own log kept in memory (the
``gcmd`` log), and the threads that resolve paths, open files and stat logs.
"""

from __future__ import annotations

import logging

from gevent.threadpool import ThreadPool

from gcmd.commands import Commands
from gcmd.config import Config
from gcmd.hashing import HashService
from gcmd.logs.memory import MemoryLog
from gcmd.logs.sources import Logs, served_sources
from gcmd.observe.stats import ServerStats
from gcmd.serverlog.formats import TextFormatter

#: threads that resolve paths, open files and stat the log
METADATA_WORKERS = 4


class Services:
    """The commands and what they work on, for one server."""

    def __init__(self, config: Config, stats: ServerStats) -> None:
        self.metadata_pool = ThreadPool(METADATA_WORKERS)
        self.hashing = HashService(config.root, config.hash_workers, config.max_pending,
                                   config.hash_cache, self.metadata_pool)
        #: gcmd's own log, the lines it writes at its level in the text format
        self.memory_log = MemoryLog()
        self.memory_log.setFormatter(TextFormatter())
        self.logs = Logs(served_sources(list(config.logfiles)), self.memory_log, self.metadata_pool,
                         config.command_timeout)
        self.commands = Commands(config, self.hashing, self.logs, stats)

    def start(self) -> None:
        """gcmd's own lines go to the memory log from now on; the served logs are watched."""
        logging.getLogger("gcmd").addHandler(self.memory_log)
        self.logs.start()

    def close(self) -> None:
        """Stop hashing and reading logs (their threads and processes end); keep no more lines."""
        self.hashing.close()
        self.logs.close()
        logging.getLogger("gcmd").removeHandler(self.memory_log)
        self.metadata_pool.kill()
