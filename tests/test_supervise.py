"""Small pieces of a run's output and waits, without launching ranks: plain progress lines for
non-interactive consoles, the collective timeout, and how the supervisor reads a failure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta

from conftest import REPO, cli_env


def test_progress_in_a_log_file_is_plain_periodic_lines(tmp_path):
    """What a SLURM log gets: one line per period and one at the end, no carriage returns."""
    script = (
        "import time\n"
        "from launcher.rank.progress import make_progress\n"
        "bar = make_progress(True, 6, 0)\n"
        "bar.every_s = 0.2\n"
        "for step in range(6):\n"
        "    time.sleep(0.12)\n"
        "    bar.update(1)\n"
        "    bar.set_postfix(loss=f'{7 - step / 10:.4f}')\n"
        "bar.close()\n"
    )
    log = tmp_path / "job.log"
    with log.open("w") as handle:  # a file, as SLURM's --output: not a terminal
        subprocess.run(
            [sys.executable, "-c", script],
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=True,
            env=cli_env(),
            cwd=REPO,
            timeout=60,
        )
    text = log.read_text()
    assert "\r" not in text, repr(text)
    lines = text.splitlines()
    assert 2 <= len(lines) <= 4, lines  # periodic (every ~2 steps here), not one per step
    assert lines[-1].startswith("training: step 6/6 (100%), loss 6.5000, "), lines
    assert all(line.startswith("training: step ") for line in lines), lines


def test_generation_progress_counts_batches(capsys):
    """Generation (eval, summarize) reports batches the same way training reports steps."""
    from launcher.rank.progress import PlainProgress

    bar = PlainProgress(3, label="generating", unit="batch", every_s=3600)
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"generating: batch 3/3 \(100%\), \d+\.\d+ s/batch", lines[0]), (
        lines
    )


def test_progress_on_a_terminal_is_a_redrawn_bar():
    from launcher.rank.progress import PlainProgress, make_progress

    os.environ["FTLAUNCH_CONSOLE_TTY"] = "1"
    try:
        bar = make_progress(False, 3, 0)
    finally:
        del os.environ["FTLAUNCH_CONSOLE_TTY"]
    assert not isinstance(bar, PlainProgress)
    bar.close()


def test_collective_timeout_allows_long_rank0_work(monkeypatch):
    """Rank 0 alone writes final/, merges and prunes while the others wait in a barrier."""
    from launcher.rank.distributed import COLLECTIVE_TIMEOUT_ENV, collective_timeout

    monkeypatch.delenv(COLLECTIVE_TIMEOUT_ENV, raising=False)
    assert collective_timeout() >= timedelta(minutes=60)
    monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, "180")
    assert collective_timeout() == timedelta(minutes=180)
    monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, "soon")
    assert collective_timeout() == timedelta(minutes=60)


def test_first_failure_prefers_a_rank_killed_without_a_record(tmp_path):
    """A rank killed by a signal leaves no record; its peers' later errors only follow from it."""
    from launcher.core.ranklog import Failure
    from launcher.core.recipe import Recipe
    from launcher.host.supervise import first_failure, torchrun_failure

    recipe = Recipe.model_validate({"launch": {"gpus": 2, "cpu": True}})
    peer = Failure(
        rank=0,
        local_rank=0,
        node=0,
        host="h",
        pid=1,
        time=10.0,
        exit_code=1,
        error="RuntimeError: Connection closed by peer",
        log="rank0.log",
    )
    line = (
        b"E1128 02:42:52.977000 3912 torch/distributed/elastic/multiprocessing/api.py:1003] "
        b"failed (exitcode: -9) local_rank: 1 (pid: 4242) of binary: /usr/bin/python"
    )
    first = first_failure(tmp_path, recipe, 0, [peer], torchrun_failure([b"noise", line]))
    assert (first.rank, first.exit_code) == (1, -9) and "SIGKILL" in first.error
    # With a record of its own, the earliest record wins.
    own = Failure(
        rank=1,
        local_rank=1,
        node=0,
        host="h",
        pid=2,
        time=9.0,
        exit_code=1,
        error="ValueError: bad",
        log="rank1.log",
    )
    assert first_failure(tmp_path, recipe, 0, [own, peer], torchrun_failure([line])) is own


def test_a_rank_exits_with_its_code_after_the_exit_handlers_and_buffered_output():
    """ranklog.exit_rank skips the interpreter's teardown, not what a run still has to write:
    libraries' exit handlers run (trackers, logging) and buffered stdout reaches the pipe."""
    code = (
        "import atexit, sys\n"
        "from launcher.core.ranklog import exit_rank\n"
        "atexit.register(lambda: print('exit handler ran'))\n"
        "sys.stdout.write('buffered line\\n')\n"
        "exit_rank(3)\n"
    )
    env = cli_env()
    env.pop("PYTHONUNBUFFERED")  # a pipe: stdout is block-buffered, as for a rank under torchrun
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout.splitlines() == ["buffered line", "exit handler ran"], result.stdout
