"""Training and generation progress on the console: a redrawn bar in a terminal, periodic plain lines elsewhere.

A SLURM job log or a file is not a terminal: carriage-return redraws would pile up there as one
endless line, so progress is written as ``training: step 40/160 (25%) ...`` lines every
``PLAIN_EVERY_S`` seconds (and at the end) instead.
"""

from __future__ import annotations

import time

from launcher.core.ranklog import console, console_print

PLAIN_EVERY_S = 30.0


class PlainProgress:
    """The part of tqdm's interface the loop uses (update, set_postfix, close), as plain lines.

    A line falls due every ``every_s`` seconds and at the last step; it is written at the next
    ``set_postfix`` (the loop logs the step's loss right after ``update``), update or close.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        every_s: float = PLAIN_EVERY_S,
        enabled: bool = True,
        label: str = "training",
        unit: str = "step",
    ) -> None:
        self.total, self.n, self.initial = total, initial, initial
        self.label, self.unit = label, unit
        self.every_s, self.enabled = every_s, enabled
        self.started = self.last = time.monotonic()
        self.postfix: dict[str, str] = {}
        self.due = self.closed = False

    def update(self, steps: int = 1) -> None:
        if self.due:
            self._print()
        self.n += steps
        now = time.monotonic()
        if now - self.last >= self.every_s or self.n >= self.total:
            self.last = now
            self.due = True

    def set_postfix(self, **values) -> None:
        self.postfix = {key: str(value) for key, value in values.items()}
        if self.due:
            self._print()

    def close(self) -> None:
        if not self.closed and (self.due or self.initial < self.n < self.total):
            self._print()  # the last step, or where a stop signal ended training
        self.closed = True

    def line(self) -> str:
        done = self.n - self.initial
        elapsed = time.monotonic() - self.started
        parts = [
            f"{self.label}: {self.unit} {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"
        ]
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        if done:
            per_step = elapsed / done
            left = (
                f", {format_duration(per_step * (self.total - self.n))} left" if self.n < self.total else ""
            )
            parts.append(f"{per_step:.2f} s/{self.unit}{left}")
        return ", ".join(parts)

    def _print(self) -> None:
        self.due = False
        if self.enabled:
            console_print(self.line())


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def make_progress(enabled: bool, total: int, initial: int, label: str = "training", unit: str = "step"):
    """tqdm on a terminal, plain periodic lines otherwise; only the main process shows anything."""
    if not console.isatty():
        return PlainProgress(total, initial, enabled=enabled, label=label, unit=unit)
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=label,
        unit=unit,
        disable=not enabled,
        dynamic_ncols=True,
        file=console,
    )
