"""Exceptions and exit codes a person reads: UserError (bad input, exit 2), RunFailure (a run that
failed for a reason one line explains, exit 1), and EXIT_INTERRUPTED (3: stopped, resumable).

Exit codes of ``ftlaunch`` and of every rank: 0 done, 1 crashed, 2 bad input, 3 interrupted and
resumable with ``--resume auto``.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (recipe, flags, data, model reference, run directory).

    The CLI prints ``error: <message>`` on one line and exits with code 2; ``--debug`` shows the traceback.
    An error about one recipe key also carries, as fields, the ``key`` (dotted: ``train.lr``), the
    ``source`` its value came from (``--set``, ``command line``, ``recipe PATH``) and the ``reason``
    (the message less its source), so a caller that words it again (a sweep names its point)
    never takes the message text apart.
    """

    def __init__(
        self, message: str, *, key: str | None = None, source: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.key = key
        self.source = source
        self.reason = message if reason is None else reason


class RunFailure(Exception):
    """A failure during a run that one line explains (a full disk, a damaged file): the rank records
    the message for the launcher's summary and exits with EXIT_CRASHED; the traceback stays in its log."""


class Diverged(RunFailure):
    """The loss, gradient norm or weights became inf or NaN (finite.py): exit 1, nothing saved from
    then on; its message starts with DIVERGED, which the supervisor's advice keys on."""


class OutOfMemory(RunFailure):
    """A training step ran out of GPU memory (rank/out_of_memory.py): the rank records the batch shape
    it happened at (``shape``: micro_batch_size, micro_batch_tokens, grad_accum), from which the
    supervisor continues with a smaller micro batch under train.auto_find_batch_size."""

    def __init__(self, message: str, shape: dict[str, int | None]) -> None:
        super().__init__(message)
        self.shape = shape


DIVERGED = "training diverged"

EXIT_CRASHED = 1
EXIT_USAGE = 2
# A rank that stopped on SIGTERM/SIGUSR1 after writing a checkpoint exits with this code,
# so job scripts can tell "preempted, resume me" from a crash.
EXIT_INTERRUPTED = 3
