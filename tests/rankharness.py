"""Multi-rank runs without `accelerate launch`: the ranks start from a process that has already
imported the libraries, for the tests of training semantics (equivalences, resume, numerics).

Every `accelerate launch` of the suite pays ~10-20 s of imports per rank before ~1 s of training.
Here one "forkserver" process per test session imports torch, transformers, accelerate,
DeepSpeed, PEFT and the rank code once; every rank is a fork of it. What a rank sees is what it
would see under the real launch, computed by the real code, not copied by hand:

1. the CLI runs in-process (``conftest.run_cli_in_process``: every check, the run directory's
   files, the run lock) with ``launch.run_command`` replaced by ``run_ranks`` below;
2. the supervisor's environment is ``supervise.child_env``; command.sh runs in bash up to its
   ``exec accelerate launch`` line, which prints the environment and arguments instead;
3. those arguments go through Accelerate's own ``launch_command`` (config file, DeepSpeed and
   FSDP variables), stopped where it would start torchrun or a single process; torchrun's
   ``config_from_args`` gives the worker command, and each rank gets the variables torchrun's
   local agent sets (torch/distributed/elastic/agent/server/local_elastic_agent.py);
4. each rank runs its entry's ``main`` and ends through ``ranklog.exit_rank`` as
   ``python -m launcher.rank.train`` does.

Launch, signal, supervision, restart and SLURM behaviour keep real `ftlaunch` subprocesses
(``conftest.run_cli``); tests/test_rank_harness.py checks that a harness run and a real launch of
the same recipe write the same metrics and the same final weights.
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from unittest import mock

# Imported once by the forkserver; every rank is a fork of it (nothing has run yet there: no
# intra-op threads, no process group, so forking is safe).
PRELOAD = [
    "torch",
    "torch.distributed",
    "safetensors.torch",
    "accelerate",
    "transformers",
    "transformers.models.t5.modeling_t5",
    "peft",
    "deepspeed",
    "datasets",
    "launcher.rank.train",
    "launcher.rank.evaluation",
    "launcher.host.summarize",
    "launcher.rank.model",
    "launcher.rank.data",
    "launcher.core.checkpoint",
    "launcher.rank.distributed",
]

# What the forkserver's environment must already hold when it imports the libraries (DeepSpeed
# picks its accelerator at import): the values the tests' ranks get (conftest.cli_env, command.sh
# of a --cpu run, supervise.child_env).
SERVER_ENV = {
    "CUDA_VISIBLE_DEVICES": "",
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}

CAPTURE = (
    'exec "{python}" -S -c '
    '\'import json, os, sys; print(json.dumps({{"env": dict(os.environ), "argv": sys.argv[1:]}}))\''
)

_context: multiprocessing.context.BaseContext | None = None


def context() -> multiprocessing.context.BaseContext:
    """The session's forkserver, started once with the libraries imported."""
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        with mock.patch.dict(os.environ, SERVER_ENV):
            multiprocessing.forkserver.ensure_running()
        _context = ctx
    return _context


# ---------------------------------------------------------------- what the launch would set


def command_sh_launch(run_dir: Path, env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Run command.sh up to its ``exec accelerate launch``: the environment it hands Accelerate
    (its exports on top of ``env``) and Accelerate's arguments."""
    lines = (run_dir / "command.sh").read_text().splitlines()
    head = "exec accelerate launch "
    last = next(i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith(head))
    lines[last] = CAPTURE.format(python=sys.executable) + " " + lines[last][len(head) :]
    result = subprocess.run(
        ["bash", "-c", "\n".join(lines)], env=env, capture_output=True, text=True, check=True
    )
    captured = json.loads(result.stdout.strip().splitlines()[-1])
    return captured["env"], captured["argv"]


def rank_processes(accelerate_argv: list[str], env: dict[str, str]) -> list[tuple[dict[str, str], list[str]]]:
    """(environment, python arguments) of every rank, as `accelerate launch ARGV` under ``env``
    would start them: through Accelerate's launch_command, up to the point it starts processes."""
    import torch.distributed.run as distrib_run
    from accelerate.commands import launch as accelerate_launch

    captured: dict = {}

    def torchrun(args) -> None:
        targs = accelerate_launch._filter_args(
            args,
            distrib_run.get_args_parser(),
            ["--training_script", args.training_script, "--training_script_args", args.training_script_args],
        )
        config, _cmd, cmd_args = distrib_run.config_from_args(targs)  # may set OMP_NUM_THREADS
        captured.update(env=dict(os.environ), config=config, args=cmd_args, targs=targs)

    def single(cmd: list[str], current_env: dict[str, str], quiet: bool = False) -> None:
        captured.update(env=dict(current_env), args=cmd[1:])

    args = accelerate_launch.launch_command_parser().parse_args(accelerate_argv)
    with (
        warnings.catch_warnings(),  # "Port 29500 is already in use": the harness picks its own port
        mock.patch.dict(os.environ, env, clear=True),
        mock.patch.object(accelerate_launch, "_run_torchrun", torchrun),
        mock.patch.object(accelerate_launch, "_run_subprocess", single),
    ):
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        accelerate_launch.launch_command(args)
    if "config" not in captured:
        return [(captured["env"], captured["args"])]
    config, targs = captured["config"], captured["targs"]
    assert config.min_nodes == config.max_nodes == 1, "the harness runs one node; multi-node tests launch"
    ranks = int(config.nproc_per_node)
    port = free_port()
    processes = []
    for rank in range(ranks):
        worker = dict(captured["env"])
        worker.update(
            RANK=str(rank),
            GROUP_RANK="0",
            ROLE_RANK=str(rank),
            ROLE_NAME=config.role,
            LOCAL_WORLD_SIZE=str(ranks),
            WORLD_SIZE=str(ranks),
            GROUP_WORLD_SIZE="1",
            ROLE_WORLD_SIZE=str(ranks),
            MASTER_ADDR=targs.master_addr,
            MASTER_PORT=str(port),  # not targs.master_port: the machine's other launches use 29500
            TORCHELASTIC_RESTART_COUNT="0",
            TORCHELASTIC_MAX_RESTARTS=str(config.max_restarts),
            TORCHELASTIC_RUN_ID=config.run_id,
            TORCHELASTIC_USE_AGENT_STORE="False",  # no agent here: rank 0 hosts the store
            TORCH_NCCL_ASYNC_ERROR_HANDLING=worker.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
            LOCAL_RANK=str(rank),
        )
        processes.append((worker, list(captured["args"])))
    return processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the ranks


def rank_main(env: dict[str, str], python_args: list[str], output: str) -> None:
    """One rank, in a fork of the forkserver: ``python [-u] -m MODULE ARGS`` as torchrun starts it."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.register(STACKS_SIGNAL, all_threads=True)  # wait_all asks a hung rank where it is
    args = [a for a in python_args if a != "-u"]
    if args[0] != "-m":
        run_script(args)
        return
    module = importlib.import_module(args[1])
    sys.argv = [module.__file__, *args[2:]]
    from launcher.core.ranklog import exit_rank

    code = module.main(args[2:])
    exit_watchdog(code)
    exit_rank(code)


STACKS_SIGNAL = signal.SIGUSR2  # not used by ftlaunch (SIGUSR1 is SLURM's preemption notice)
EXIT_GRACE_ENV = "FTLAUNCH_HARNESS_EXIT_GRACE_S"  # seconds; 60 unless a test sets it


def exit_watchdog(code: int) -> None:
    """A rank whose work is done but whose exit hangs (seen about once in ~150 harness runs, never
    under `accelerate launch`: an exit handler inherited from the forkserver or a library thread)
    prints every thread's stack and ends as HUNG after a grace period, instead of holding the test
    for wait_all's whole timeout; the stacks say where it hung."""
    grace = float(os.environ.get(EXIT_GRACE_ENV, "60"))

    def expire() -> None:
        time.sleep(grace)
        print(f"rank harness: exit with code {code} still not done after {grace:g} s:", file=sys.stderr)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(HUNG)

    threading.Thread(target=expire, daemon=True, name="rank-harness-exit-watchdog").start()


def run_script(args: list[str]) -> None:
    """``python SCRIPT ARGS`` (a bench script's worker, started by `accelerate launch SCRIPT`): run
    as ``__main__`` with its folder first on sys.path, as the interpreter does; it ends the rank."""
    script = os.path.abspath(args[0])
    sys.argv = [script, *args[1:]]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


HUNG = 124  # wait_all's code for ranks that outlived the timeout (as `timeout` reports it)


def run_ranks(
    run_dir: Path, machine_rank: int | None = None, timeout: float = 300, env: dict[str, str] | None = None
) -> int:
    """``launch.run_command`` for the harness: start the run's ranks as forks, wait for all of
    them; 0 where every rank ended with 0, else the first failing rank's exit code. The ranks'
    console output goes to stdout and logs/launcher.log as under the supervisor. ``env``: the
    environment command.sh runs in, the supervisor's (``supervise.child_env``) unless given (a
    test of command.sh started without ftlaunch, as an srun step starts it)."""
    from launcher.core.recipe_loading import read_run_recipe
    from launcher.core.rundir import RunDir
    from launcher.host import supervise

    recipe = read_run_recipe(run_dir)
    assert recipe.launch.nodes == 1 and not machine_rank, "the harness runs one node; multi-node tests launch"
    RunDir(run_dir).clear_interrupted()  # as the supervisor does before it starts the ranks
    if env is None:
        env = supervise.child_env(recipe, False, machine_rank)
    env, accelerate_argv = command_sh_launch(run_dir, env)
    code, text = accelerate_launch_ranks(accelerate_argv, env, timeout)
    sys.stdout.write(text)
    launcher_log = supervise.launcher_log_path(run_dir, recipe, 0)
    launcher_log.parent.mkdir(parents=True, exist_ok=True)
    with launcher_log.open("a") as log:
        log.write(text)
    return code


def accelerate_launch_ranks(
    accelerate_argv: list[str], env: dict[str, str], timeout: float = 300
) -> tuple[int, str]:
    """`accelerate launch ARGV` under ``env`` (one node) with its ranks forked: (0 where every rank
    ended with 0, else the first failing rank's exit code; the ranks' console output)."""
    processes = rank_processes(accelerate_argv, env)
    ctx = context()
    with tempfile.TemporaryDirectory(prefix="ftlaunch-harness-") as scratch:
        outputs = [str(Path(scratch) / f"rank{i}.out") for i in range(len(processes))]
        ranks = [
            ctx.Process(target=rank_main, args=(worker_env, python_args, output))
            for (worker_env, python_args), output in zip(processes, outputs)
        ]
        for rank in ranks:
            rank.start()
        code = wait_all(ranks, timeout)
        text = "".join(
            Path(output).read_text(errors="replace") for output in outputs if Path(output).exists()
        )
    return code, text


def wait_all(ranks: list, timeout: float) -> int:
    """Wait for every rank; after a failure the others get 30 s (their collectives fail) before
    they are killed, as torchrun's agent would stop them."""
    deadline = time.time() + timeout
    first_failure = 0
    while True:
        for rank in ranks:
            if rank.exitcode not in (None, 0) and not first_failure:
                first_failure = exit_code(rank)
                deadline = min(deadline, time.time() + 30)
        if not any(rank.is_alive() for rank in ranks):
            break
        if time.time() > deadline:
            alive = [rank for rank in ranks if rank.is_alive()]
            for rank in alive:  # their stacks into their output first (rank_main's handler)
                os.kill(rank.pid, STACKS_SIGNAL)
            time.sleep(1.0)
            for rank in alive:
                rank.kill()
            first_failure = first_failure or HUNG
        time.sleep(0.05)
    for rank in ranks:
        rank.join()
    return first_failure


def exit_code(rank) -> int:
    """A rank's exit code as a shell reports it (killed by signal N: 128 + N)."""
    return rank.exitcode if rank.exitcode >= 0 else 128 - rank.exitcode
