"""Can a command write where it was told to? Asked before any work starts, by every command
that writes (``--output`` of full/lora/eval/summarize/export/score/report/sweep, the run and
report directories), so that an unwritable place costs one line, not a traceback after minutes
of training or generation.

The check does what the command will do: create the directory (and its missing parents), write
a probe file and remove it; then it removes what it created, so a refusal, or a later check
that fails, leaves nothing behind. Permission bits alone would not tell: root ignores them,
while a read-only filesystem, a full quota or a parent that is a file stop root too.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from launcher.core.errors import UserError


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (``/`` at worst)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_problem(directory: Path) -> str | None:
    """Why files cannot be created in ``directory`` (None when they can); leaves no trace.

    The nodes of a multi-node run check the same ``--output`` at the same moment: a directory one
    of them created for its check and then removed can vanish between another's mkdir and its
    probe. That is not a reason to refuse: the check runs again (a few times at most)."""
    directory = Path(os.path.abspath(directory.expanduser()))
    for _attempt in range(RACE_RETRIES):
        try:
            return probe_once(directory)
        except FileNotFoundError:
            continue  # a folder found a moment ago is gone: another check removed it
    return os.strerror(errno.ENOENT)


RACE_RETRIES = 5


def probe_once(directory: Path) -> str | None:
    """One check of ``write_problem``: create the missing folders, write and remove a probe file,
    remove the folders it created. FileNotFoundError: a folder it found was removed meanwhile."""
    existing = nearest_existing(directory)
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    created: list[Path] = []
    try:
        missing = [directory, *directory.parents][: len(directory.relative_to(existing).parts)]
        for folder in reversed(missing):  # top-down, so that each one is recorded for the clean-up
            try:
                folder.mkdir()
            except FileExistsError:
                if folder.is_dir():
                    continue  # made meanwhile by another process (another node's check): not ours
                raise
            created.append(folder)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".ftlaunch-write-probe-") as probe:
            probe.write(b"probe")
            probe.flush()
    except FileNotFoundError:
        raise  # write_problem checks again
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass  # another process wrote into it meanwhile: its content is not ours to remove
    return None


def check_writable_dir(directory: Path, what: str) -> None:
    """Refuse (one line, exit 2) when ``directory`` cannot be created or written; ``what`` names
    the flag or role, e.g. ``--output``."""
    problem = write_problem(directory)
    if problem:
        raise UserError(
            f"{what} {directory}: cannot write there ({problem}); pick a directory you can write to"
        )


def check_writable_file(path: Path, what: str) -> None:
    """A file the command will write: its directory must be writable, and it must not be a directory."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; pass a file name")
    problem = write_problem(path.expanduser().parent)
    if problem:
        raise UserError(f"{what} {path}: cannot write there ({problem}); pick a file you can write to")


def same_file(first: Path, second: Path) -> bool:
    """Do two paths name one file (through symlinks, hard links, ``..``)? False when either is
    missing: a file that does not exist yet is nobody's input."""
    try:
        return os.path.samefile(first.expanduser(), second.expanduser())
    except OSError:
        return False
