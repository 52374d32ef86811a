"""A rank entry for tests/test_rank_harness.py: its work is done at once, but an exit handler
never returns (what a rank hung at exit looks like)."""

from __future__ import annotations

import atexit
import threading


def main(argv: list[str]) -> int:
    atexit.register(threading.Event().wait)  # waits forever: exit_rank runs the exit handlers
    return 0
