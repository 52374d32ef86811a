"""Each rank's own log, the console lines a person reads, and the failure record of a rank.

A rank starts with its stdout/stderr on the console (the terminal, the SLURM job log, or the
pipe of ``ftlaunch``'s supervisor). ``start`` points both file descriptors at
``RUN/logs/rank<R>.log`` instead, so everything libraries print (DeepSpeed's and torch's banners,
FutureWarnings, safetensors and transformers notices, C++ output) lands in that file, and keeps
the console for the lines chosen for it: ``console_print`` (the run summary, progress, metrics,
warnings that call for action).

A rank that fails writes ``RUN/logs/failures/rank<R>.json`` (rank, node, host, time, exit code,
the last line of its error, its log) before it exits; the supervisor (supervise.py) reads those
to say which rank failed first and why. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn, TextIO

from launcher.core.atomic import write_text_atomic
from launcher.core.errors import (
    EXIT_CRASHED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    OutOfMemory,
    RunFailure,
    UserError,
)
from launcher.core.rundir import RunDir

# Set by the supervisor for its child: it prints the failure summary, so the ranks need not.
SUPERVISED_ENV = "FTLAUNCH_SUPERVISED"
# Set by the supervisor: whether the console a person reads is a terminal (the ranks see a pipe).
CONSOLE_TTY_ENV = "FTLAUNCH_CONSOLE_TTY"
# Set by the supervisor when it restarts a crashed run (launch.max_restarts): the restart's number
# and its cause. The ranks then continue from the newest intact checkpoint (--resume auto).
RESTART_ENV = "FTLAUNCH_RESTART"
RESTART_CAUSE_ENV = "FTLAUNCH_RESTART_CAUSE"


def logs_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).logs


@dataclass(frozen=True)
class Where:
    """Which process this is, as torchrun describes it (a plain process is rank 0 of node 0)."""

    rank: int
    local_rank: int
    node: int
    host: str


def where() -> Where:
    env = os.environ
    return Where(
        rank=int(env.get("RANK", "0")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        node=int(env.get("GROUP_RANK", env.get("SLURM_NODEID", "0"))),
        host=socket.gethostname(),
    )


def rank_log_path(run_dir: Path, rank: int) -> Path:
    return RunDir(run_dir).rank_log(rank)


# ---------------------------------------------------------------- the console


class Console:
    """The stream this rank was started with, once its own stdout/stderr go to its log."""

    def __init__(self) -> None:
        self.stream: TextIO | None = None  # None: not redirected, print as usual

    def attach(self, fd: int) -> None:
        self.stream = os.fdopen(fd, "w", buffering=1, encoding="utf-8", errors="replace")

    def isatty(self) -> bool:
        if os.environ.get(CONSOLE_TTY_ENV) in ("0", "1"):
            return os.environ[CONSOLE_TTY_ENV] == "1"
        stream = self.stream or sys.stdout
        try:
            return stream.isatty()
        except (OSError, ValueError):
            return False

    def write(self, text: str) -> None:
        """Raw text (a progress bar's redraw); a console that went away is dropped, never fatal."""
        stream = self.stream or sys.stdout
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            self.stream = open(os.devnull, "w")  # noqa: SIM115 - the console is gone for good

    def flush(self) -> None:
        self.write("")

    def fileno(self) -> int:
        return (self.stream or sys.stdout).fileno()


console = Console()


def console_print(text: str) -> None:
    """A line for the person running the job (also kept in this rank's log)."""
    if console.stream is not None:
        try:
            print(text, flush=True)  # the log
        except OSError:
            pass  # a full disk: the console still gets the line
    console.write(text + "\n")


def start(run_dir: Path) -> Path:
    """From here on, this process's stdout and stderr (Python's and C's) append to its rank log."""
    me = where()
    logs = logs_dir(run_dir)
    logs.mkdir(parents=True, exist_ok=True)
    path = rank_log_path(run_dir, me.rank)
    sys.stdout.flush()
    sys.stderr.flush()
    console.attach(os.dup(1))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(
        f"===== ftlaunch rank {me.rank} (local rank {me.local_rank}, node {me.node}, host {me.host}, "
        f"pid {os.getpid()}) started {stamp}: {' '.join(sys.argv)}",
        flush=True,
    )
    failure_path(run_dir, me.rank).unlink(missing_ok=True)  # a record of an earlier attempt
    return path


# ---------------------------------------------------------------- failure records


def failure_path(run_dir: Path, rank: int) -> Path:
    return RunDir(run_dir).failure_record(rank)


@dataclass
class Failure:
    rank: int
    local_rank: int
    node: int
    host: str
    pid: int
    time: float
    exit_code: int
    error: str  # one line: the last line of the traceback, or the message
    log: str
    # A training step that ran out of GPU memory: the batch shape it ran at (errors.OutOfMemory.shape),
    # which the supervisor halves under train.auto_find_batch_size; None for every other failure.
    out_of_memory: dict | None = None


def record_failure(run_dir: Path, exit_code: int, error: str, out_of_memory: dict | None = None) -> Failure:
    """Write this rank's failure record (best effort: a full disk may refuse even this)."""
    me = where()
    failure = Failure(
        rank=me.rank,
        local_rank=me.local_rank,
        node=me.node,
        host=me.host,
        pid=os.getpid(),
        time=time.time(),
        exit_code=exit_code,
        error=error,
        log=str(rank_log_path(run_dir, me.rank)),
        out_of_memory=out_of_memory,
    )
    path = failure_path(run_dir, me.rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(asdict(failure)))
    except OSError as exc:
        print(f"could not write the failure record {path}: {exc}", file=sys.stderr, flush=True)
    return failure


def read_failures(run_dir: Path, since: float = 0.0) -> list[Failure]:
    """Failure records written since a time, first failure first."""
    found = []
    for path in RunDir(run_dir).failures.glob("rank*.json"):
        try:
            failure = Failure(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if failure.time >= since:
            found.append(failure)
    return sorted(found, key=lambda failure: failure.time)


def last_line(exc: BaseException) -> str:
    """The last line of a traceback: ``Type: message`` (first line of the message only)."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__


def fail(run_dir: Path, exit_code: int, error: str, out_of_memory: dict | None = None) -> int:
    """Record a failure; without a supervisor, also say it on the console (one line and the log)."""
    failure = record_failure(run_dir, exit_code, error, out_of_memory)
    try:
        print(f"error: {error}", file=sys.stderr, flush=True)
    except OSError:
        pass
    if os.environ.get(SUPERVISED_ENV) != "1" and (failure.rank == 0 or exit_code != EXIT_USAGE):
        console.write(f"error: rank {failure.rank}: {error} (log: {failure.log})\n")
    return exit_code


def rank_main(
    argv: list[str] | None, description: str, body: Callable[[Path, argparse.Namespace], int], *options
) -> int:
    """The entry point of every rank (``python -m launcher.rank.train|evaluation --run-dir RUN``):
    parse ``--run-dir`` (and ``options``: ``(flags, kwargs)`` pairs), then run
    ``body(run_dir, args)`` under ``run_rank``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run-dir", required=True, type=Path)
    for flags, kwargs in options:
        parser.add_argument(*flags, **kwargs)
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    return run_rank(run_dir, lambda: body(run_dir, args))


def run_rank(run_dir: Path, body: Callable[[], int]) -> int:
    """A rank's whole life: its log first, then ``body``; every failure becomes a record and an exit code.

    2: bad input (UserError), 3: stopped at once by a second Ctrl-C (the last checkpoint still
    resumes), 1: anything else (the traceback is in the rank log).
    """
    start(run_dir)
    obey_stop_signals()
    try:
        return body()
    except UserError as exc:
        return fail(run_dir, EXIT_USAGE, str(exc))
    except OutOfMemory as exc:
        log_traceback()
        return fail(run_dir, EXIT_CRASHED, str(exc), exc.shape)
    except RunFailure as exc:
        log_traceback()
        return fail(run_dir, EXIT_CRASHED, str(exc))
    except KeyboardInterrupt:
        log_traceback()
        return fail(run_dir, EXIT_INTERRUPTED, "stopped at once (second Ctrl-C)")
    except Exception as exc:  # noqa: BLE001 - every crash ends as a record and a one-line summary
        log_traceback()
        return fail(run_dir, EXIT_CRASHED, last_line(exc))


def obey_stop_signals() -> None:
    """A rank acts on the stop signals its supervisor forwards, also when ftlaunch was started by a
    shell that ignores them: bash starts a background job (``ftlaunch sweep ... &``) with SIGINT
    ignored, and an ignored signal stays ignored across exec, down to the ranks. Ctrl-C then raises
    KeyboardInterrupt and SIGTERM/SIGUSR1 end the rank (training installs its own handlers)."""
    for sig, handler in (
        (signal.SIGINT, signal.default_int_handler),
        (signal.SIGTERM, signal.SIG_DFL),
        (signal.SIGUSR1, signal.SIG_DFL),
    ):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, handler)


def exit_rank(code: int) -> NoReturn:
    """End a rank's process with ``code`` without Python's interpreter teardown.

    When a rank's entry returns, what it wrote is closed (files by their ``with`` blocks, metrics
    by their logger; after a finished run ``accelerator.end_training`` has also ended the trackers
    and the process group). What the interpreter would still do is its own teardown of the loaded
    modules (torch, transformers, DeepSpeed): measured at about 3 s per CPU rank, paid by every
    launch (and every resumed or requeued one) before torchrun sees the rank end. The exit
    handlers libraries registered (logging, trackers, also after a failure) still run first.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, console):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def log_traceback() -> None:
    """The current exception's traceback into the rank log (a full disk may refuse it)."""
    try:
        traceback.print_exc()
        sys.stderr.flush()
    except OSError:
        pass
