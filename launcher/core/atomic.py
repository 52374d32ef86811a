"""The one way the project replaces a file or a folder so that a reader never sees half of it.

A run directory is read while it is written: the supervisor and ``ftlaunch report`` read what the
ranks write, every node of a multi-node run renders the same files on a shared filesystem, a crash
can strike mid-save. So a file is written beside its target under a temporary name unique to this
process, flushed to disk, and renamed over the target in one step (POSIX ``rename`` is atomic on
one filesystem); a folder (a checkpoint, ``final/``) is built under a temporary name and swapped in
whole. Nothing else in the package calls ``os.replace`` or renames (tests/test_architecture.py).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Replace ``path`` by ``text`` in one rename: readers see the old or the new file, never half.

    ``mode`` sets the file's permissions (command.sh is executable); the parent folder must exist.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            tmp.chmod(mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(complete: Path, target: Path) -> None:
    """Put the finished folder ``complete`` in ``target``'s place (same filesystem).

    An existing ``target`` is first renamed aside and removed only once the new one is in place,
    so at every moment one whole folder (old or new) sits at ``target`` or beside it.
    """
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(complete, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(complete, target)


def staging_sibling(target: Path) -> Path:
    """The hidden folder beside ``target`` that a folder is built in before ``replace_dir`` puts it
    in place. It names this host and process: two builders never share one, and one left by a
    builder that was killed (kill -9, a lost node) can be recognised and removed."""
    return target.with_name(f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def abandoned_stagings(target: Path) -> list[Path]:
    """Staging folders of ``target`` left by builders on this host that no longer run (a name
    without a host, from before the host was part of it, counts as this host's). Another host's
    are never touched: its process cannot be looked up from here."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)")
    here = socket.gethostname()
    found = []
    for path in target.parent.glob(f".{glob_escape(target.name)}.tmp-*"):
        match = pattern.fullmatch(path.name)
        if match and match["host"] in (None, here) and not process_alive(int(match["pid"])):
            found.append(path)
    return sorted(found)


def glob_escape(name: str) -> str:
    """``name`` as a glob pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def process_alive(pid: int) -> bool:
    """Whether a process of this host with this id runs (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
