"""The figures ``stats`` reports, counted by the server as it runs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class ServerStats:
    started: float = field(default_factory=time.monotonic)
    #: clients holding a slot now
    clients: int = 0
    #: connections accepted since start, refused or not
    connections: int = 0
    #: connections refused: over the cap, over the per-address cap, not allowed
    rejected: int = 0
    #: requests answered (blank lines are not requests)
    commands: int = 0
    #: commands that answered an error line
    errors: int = 0
    #: commands that failed unexpectedly (logged with a traceback)
    internal_errors: int = 0
    auth_failures: int = 0

    @property
    def uptime_s(self) -> int:
        return int(time.monotonic() - self.started)
