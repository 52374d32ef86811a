"""Stopping on a signal: SIGTERM/SIGUSR1 (SLURM's warning before the time limit, a scheduler's
preemption) and Ctrl-C set a flag once training starts; the loop asks all ranks about it every few
optimizer steps and after each evaluation, checkpoints, and exits with code 3
(errors.EXIT_INTERRUPTED) for a ``--resume auto``. Before training (loading, the original model's
evaluation) the flag is not installed: the signal stops a rank at once.
"""

from __future__ import annotations

import signal

from launcher.rank.distributed import any_rank


class StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGINT; the loop checkpoints at the next optimizer step and exits.

    A second Ctrl-C (SIGINT) interrupts at once, for a user who does not want to wait.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def uninstall(self) -> None:
        """After training nothing polls the flag: a signal must act at once again."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None


# Optimizer steps between two stop-flag all-reduces (and the first possible stop after a signal).
STOP_CHECK_EVERY = 10


def stop_requested(
    accelerator, stop: StopRequest, step: int, last_step: int, evaluated: bool = False
) -> bool:
    """Did any rank get a stop signal? Asked every STOP_CHECK_EVERY optimizer steps, at the last,
    and at a step that evaluated (every rank evaluates at the same steps).

    The all-reduce and its ``.item()`` make the host wait until the GPU has drained its queue;
    asked every step, the host could never run ahead. Every rank asks at the same steps (it is
    a collective); a signal waits at most STOP_CHECK_EVERY steps (SLURM signals 300 s early).
    """
    if step % STOP_CHECK_EVERY and step < last_step and not evaluated:
        return False
    return any_rank(accelerator, stop.requested)


def stopped_message(step: int) -> str:
    """What the console says when a signal stopped training (the checkpoint is already written)."""
    from launcher.core.rundir import checkpoint_name

    return f"stop requested by signal: checkpoint {checkpoint_name(step)} written; resume with --resume auto"
