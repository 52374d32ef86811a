"""Shared test helpers: run the real `ftlaunch` CLI, offline, on CPU.

``run_cli`` starts ``python -m launcher.host.cli`` as a subprocess (seconds: it imports torch each time);
``run_cli_in_process`` calls the same ``main()`` with the same argv, environment and working
directory inside the test process (milliseconds). Refusals and renders use the in-process one; the
few end-to-end tests and everything that launches ranks use the subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from unittest import mock

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
    command = [sys.executable, "-m", "launcher.host.cli", *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env or cli_env(), cwd=cwd or REPO
    )


def run_cli_in_process(
    *args: str,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    run_ranks=None,
) -> subprocess.CompletedProcess:
    """`ftlaunch ARGS...` through ``launcher.host.cli.main`` in this process; the same result object as
    ``run_cli``. Nothing is launched: where ``env`` names FTLAUNCH_TEST_LAUNCH_MARKER (the fake
    `accelerate` of the refusal tests) the launch step appends the run directory to that file and
    returns 99 as the fake does; anywhere else a launch fails the test (use ``run_cli``), unless
    ``run_ranks`` replaces the launch step (``run_cli_harness``)."""
    from launcher.host import cli, launch

    env = env or cli_env()
    marker = env.get("FTLAUNCH_TEST_LAUNCH_MARKER")

    def no_launch(run_dir, *_args, **_kwargs):
        if marker is None:
            raise AssertionError("an in-process `ftlaunch` tried to launch ranks; use run_cli (a subprocess)")
        with open(marker, "a") as file:
            file.write(f"launch {run_dir}\n")
        return 99

    saved_env, saved_cwd, saved_argv = dict(os.environ), Path.cwd(), sys.argv
    stdout, stderr = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["ftlaunch", *map(str, args)]
    try:
        os.chdir(cwd or REPO)
        with (
            mock.patch.object(launch, "run_command", run_ranks or no_launch),
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
        ):
            try:
                cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except AssertionError:
                raise
            except Exception:  # noqa: BLE001 (what a subprocess prints before dying: a traceback, exit 1)
                stderr.write(traceback.format_exc())
                code = 1
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(
        ["ftlaunch", *map(str, args)], code, stdout.getvalue(), stderr.getvalue()
    )


def run_cli_harness(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`ftlaunch full|lora ARGS...` with its ranks forked from the session's preloaded forkserver
    (tests/rankharness.py) instead of `accelerate launch`: the same checks, run directory, rank
    environment and training, without ~10-20 s of imports per rank. For the tests of what
    training computes; launch, signal, supervision and SLURM behaviour use ``run_cli``."""
    import rankharness

    result = run_cli_in_process(*args, env=env, run_ranks=rankharness.run_ranks)
    if result.returncode == rankharness.HUNG and "--output" in args and "--resume" not in args:
        # A forked rank that never exits (seen once in ~150 harness runs of a full suite, after its
        # work was done; not seen under `accelerate launch`): say so in the test's output and run
        # the same command once more from an empty output, so that the assertions judge a run
        # that ended. A second hang fails the test.
        print(
            f"rank harness: a rank hung (exit {rankharness.HUNG}); running the command again", file=sys.stderr
        )
        shutil.rmtree(Path(args[list(args).index("--output") + 1]), ignore_errors=True)
        result = run_cli_in_process(*args, env=env, run_ranks=rankharness.run_ranks)
    return result


# The tiny runs most modules train: fp32, a loss row per step, micro batch 4, no ROUGE evaluation.
TINY_FAST = (
    *("--set", "model.precision=fp32", "--set", "train.log_every=1", "--set", "train.micro_batch_size=4"),
    *("--set", "eval.after_training=false"),
)
# One epoch of the sample data (64 dialogues: 8 steps on 2 ranks), deterministic (no dropout).
TINY_ONE_EPOCH = ("--set", "train.epochs=1", "--set", "train.lr=2e-3", "--set", "model.dropout=0.0")


def tiny_args(method: str, *extra: str, gpus: int = 2, zero: int = 0) -> tuple[str, ...]:
    """`ftlaunch METHOD ...` of a tiny CPU run on the sample data (no --output): equal argument
    lists are one entry of ``trained_run``'s catalogue, so modules build theirs with this."""
    shape = ("--cpu", "--gpus", str(gpus), "--zero", str(zero), "--model", "tiny-t5", "--data", "sample")
    return (method, *shape, *TINY_FAST, *extra)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The session's catalogue of trained tiny runs: ``trained_run(*ftlaunch_args, real=False)``
    trains ``ftlaunch ARGS --output DIR`` once per distinct argument list (through the harness,
    or a real launch with ``real=True``) and returns the same DIR to every test that asks for it.
    Tests must not modify a shared run: copy it (``shutil.copytree``) to resume, overwrite or
    evaluate into it."""
    runs: dict[tuple, Path] = {}

    def get(*args: str, real: bool = False) -> Path:
        key = (tuple(map(str, args)), real)
        if key not in runs:
            run_dir = tmp_path_factory.mktemp("shared-run") / "run"
            result = (run_cli if real else run_cli_harness)(*args, "--output", str(run_dir))
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
            runs[key] = run_dir
        return runs[key]

    return get


def set_refused(tmp_path: Path, overrides: list[str], words: list[str]) -> None:
    """`ftlaunch full ... --set OVERRIDE...` refused before anything is written: exit 2, one line
    (no traceback) holding every one of ``words``."""
    args = [item for override in overrides for item in ("--set", override)]
    result = run_cli_in_process(
        "full", "--cpu", "--model", "tiny-t5", "--data", "sample", "--output", str(tmp_path / "r"), *args
    )
    assert result.returncode == 2 and not (tmp_path / "r").exists()
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    for word in words:
        assert word in line, line


def save_tiny_t5(path: Path) -> Path:
    """tiny-t5 and its tokenizer written with save_pretrained: a model directory as users have one."""
    from transformers import AutoTokenizer

    from launcher.core.paths import TINY_TOKENIZER_DIR
    from launcher.rank.model import build_tiny_t5

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    build_tiny_t5(len(tokenizer)).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def read_jsonl(path: Path) -> list[dict]:
    """JSON Lines end at \\n only (str.splitlines would also cut at U+2028 and others inside the text)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def assert_same_final_weights(run_dir: Path, reference_dir: Path, file: str = "model.safetensors") -> dict:
    """``run_dir``'s final/ weights are ``reference_dir``'s to float32 round-off (a resumed run
    against the uninterrupted one); returns the run's tensors for further checks."""
    import torch
    from safetensors.torch import load_file

    ours = load_file(str(run_dir / "final" / file))
    theirs = load_file(str(reference_dir / "final" / file))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    return ours


@pytest.fixture
def ftlaunch():
    return run_cli


# The whole suite is offline (no hub): set before anything imports huggingface_hub, which reads
# these once, so in-process CLI runs behave like the offline subprocesses.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")


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


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one AcceleratorState per process: a test that ran a command in-process
    (summarize's one-rank generation) leaves its precision behind, and the next in-process
    Accelerator of another precision is refused. Each test starts without one."""
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(True)
