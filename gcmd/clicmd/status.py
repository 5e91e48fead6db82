"""gcmd-cli's exit statuses, and the error of a command line it cannot run."""

#: exit statuses
OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3
#: the exit status of a command other than follow cut by Ctrl-C (128 + SIGINT, as a shell says)
INTERRUPTED = 130


class UsageError(Exception):
    """A command line gcmd-cli cannot run: exit status 2, one line."""
