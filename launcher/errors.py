"""The one exception type that means "the user can fix this": it becomes a one-line error and exit 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (recipe, flags, data, model reference, run directory).

    The CLI prints ``error: <message>`` on one line and exits with code 2; ``--debug`` shows the traceback.
    """


EXIT_USAGE = 2
# A rank that stopped on SIGTERM/SIGUSR1 after writing a checkpoint exits with this code,
# so job scripts can tell "preempted, resume me" from a crash.
EXIT_INTERRUPTED = 3
