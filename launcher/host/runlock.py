"""One run per directory: an OS lock on ``RUN/.ftlaunch.lock``, held by the ``ftlaunch`` process
that supervises the ranks (``ftlaunch full|lora|eval``, or ``ftlaunch supervise`` in a SLURM job).

``flock`` locks die with their process, so a crashed or killed run never leaves a stale lock and
``--resume auto`` just takes it again. The file records the holder (host, pid, start time and
SLURM job id) for the refusal's line; a second ``ftlaunch`` on a held directory is refused
before it writes anything. Only node 0's launcher holds it: the other nodes of a multi-node run
join the run node 0 holds (they pass ``--machine-rank`` > 0, or SLURM_NODEID > 0 in a job), and
a process of the SLURM job that holds it is let through (its batch step renders the run the
job's node-0 step then supervises). The supervisor passes the lock's descriptor on to
``command.sh`` and so to the rank launcher (accelerate/torchrun): killing ``ftlaunch`` alone does not
free a directory whose run still goes on; it is free once every process of the run has ended.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.core.atomic import process_alive
from launcher.core.errors import UserError
from launcher.core.rundir import LOCK_FILE, RunDir

JOB_ENV = "SLURM_JOB_ID"

_held: dict[Path, int] = {}  # run directory -> open descriptor of its lock, in this process


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str  # local time, as a person reads it
    job: str | None = None  # the SLURM job id, when the holder runs in one

    def describe(self) -> str:
        job = f", SLURM job {self.job}" if self.job else ""
        gone = ""
        if self.host == socket.gethostname() and self.pid and not process_alive(self.pid):
            gone = "; that ftlaunch is gone but the processes it started still run"
        return f"host {self.host}, pid {self.pid}{job}, started {self.started}{gone}"


def lock_path(run_dir: Path) -> Path:
    return RunDir(run_dir).lock


def this_process() -> Holder:
    return Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        job=os.environ.get(JOB_ENV) or None,
    )


def read_holder(fd: int) -> Holder:
    """The holder a lock file records (a holder that wrote nothing yet is "unknown")."""
    try:
        raw = os.pread(fd, 4096, 0)
        return Holder(**json.loads(raw.decode("utf-8")))
    except (OSError, ValueError, TypeError):
        return Holder(host="unknown", pid=0, started="unknown")


class LocksUnsupported(Exception):
    """The filesystem has no flock (Lustre mounted without ``flock``, some FUSE filesystems)."""


def try_lock(fd: int) -> bool:
    """True when this process now holds the lock, False when another process does."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:  # ENOSYS, ENOLCK, EOPNOTSUPP: no locks here at all
        raise LocksUnsupported(exc.strerror) from None
    return True


def current_holder(run_dir: Path) -> Holder | None:
    """Who holds ``run_dir`` now (None: nobody, or this process). Writes nothing."""
    if run_dir.resolve() in _held:
        return None
    try:
        fd = os.open(lock_path(run_dir), os.O_RDWR)  # no O_CREAT: a free directory stays untouched
    except OSError:
        return None  # no lock file (no run yet), or one this user cannot open: nobody to name
    try:
        if try_lock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return read_holder(fd)
    except LocksUnsupported:
        return None  # hold() says so when the run starts
    finally:
        os.close(fd)


def refusal(run_dir: Path, holder: Holder) -> UserError:
    return UserError(
        f"--output {run_dir} is in use by another ftlaunch run ({holder.describe()}); wait for it to "
        "end or stop it, or pick another directory"
    )


def same_job(holder: Holder) -> bool:
    job = os.environ.get(JOB_ENV)
    return bool(job) and holder.job == job


def check_free(run_dir: Path) -> None:
    """Refuse (exit 2, nothing written) when another process holds ``run_dir``."""
    holder = current_holder(run_dir)
    if holder is not None and not same_job(holder):
        raise refusal(run_dir, holder)


def hold(run_dir: Path) -> None:
    """Take ``run_dir``'s lock for the rest of this process (or until ``release``); refuse if
    another process holds it. Creates the directory and the lock file."""
    key = run_dir.resolve()
    if key in _held:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(run_dir), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(
            f"--output {run_dir}: cannot create its lock file {LOCK_FILE} ({exc.strerror}); "
            "pick a directory you can write to"
        ) from None
    try:
        locked = try_lock(fd)
    except LocksUnsupported as exc:
        os.close(fd)
        print(
            f"warning: {run_dir}'s filesystem does not support file locks ({exc}): a second run on this "
            "directory would not be refused",
            file=sys.stderr,
            flush=True,
        )
        return
    if not locked:
        holder = read_holder(fd)
        os.close(fd)
        if same_job(holder):
            return  # another step of this SLURM job holds it for the job
        raise refusal(run_dir, holder)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(asdict(this_process())) + "\n").encode(), 0)
    _held[key] = fd


def held_fds(run_dir: Path) -> tuple[int, ...]:
    """The lock's descriptor, for a child that must keep the directory held (``pass_fds``)."""
    fd = _held.get(run_dir.resolve())
    return () if fd is None else (fd,)


def release(run_dir: Path) -> None:
    """Give the lock back (the process's end does the same; tests running the CLI in-process need it)."""
    fd = _held.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


def release_all() -> None:
    for run_dir in list(_held):
        release(run_dir)
