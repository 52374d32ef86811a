"""Shared test helpers: run the real `ftlaunch` CLI in a subprocess, offline, on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FTLAUNCH_SHARED_DIR", REPO.parent / "shared"))
DIALOGSUM = SHARED / "data" / "dialogsum"
UNIGRAM_TOKENIZER = SHARED / "models" / "t5-dialogsum-unigram-8k"


def cli_env(**extra: str) -> dict[str, str]:
    """Offline, quiet, one thread per rank: CPU ranks share the machine's 2 cores."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("FTLAUNCH_DEBUG", None)
    env.update(extra)
    return env


def run_cli(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run `ftlaunch ARGS...` as a user would; returns the completed process (text output)."""
    command = [sys.executable, "-m", "launcher.cli", *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env or cli_env(), cwd=cwd or REPO
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def ftlaunch():
    return run_cli


def needs_dialogsum():
    return pytest.mark.skipif(
        not (DIALOGSUM / "train.jsonl").is_file(),
        reason=f"real DialogSum not found at {DIALOGSUM} (set FTLAUNCH_SHARED_DIR)",
    )


@pytest.fixture
def small_disk(tmp_path):
    """A factory for a tmpfs of a given size (``small_disk("16M")`` -> its mount point), unmounted
    after the test. Skips the test where it cannot mount (not root, or no tmpfs)."""
    import shutil

    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a small disk for this test is a tmpfs mount, which needs root")
        point = tmp_path / f"disk-{size}-{len(mounted)}"
        point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a {size} tmpfs for this test: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
        shutil.rmtree(point, ignore_errors=True)
