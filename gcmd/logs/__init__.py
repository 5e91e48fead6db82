"""The logs gcmd SERVES (lastlog, follow, logs): which are served (sources),
their readers, their lines on the wire, and gcmd's own log kept in memory.

Not to be confused with gcmd's own log output: gcmd.serverlog."""
