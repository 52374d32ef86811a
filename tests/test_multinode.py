"""Several nodes without SLURM: two launchers on this machine play machine ranks 0 and 1 of a
2-node run over 127.0.0.1, sharing one run directory, the two ways README describes:

- every node runs ``ftlaunch full ... --nodes 2 --main-address H --machine-rank R --output RUN``;
- the run is rendered once (``--dry-run``), then every node runs ``FTLAUNCH_MACHINE_RANK=R RUN/command.sh``.

A node that knows no machine rank is refused at once (never assumed to be 0, which would make
two main nodes wait for each other forever).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_env, read_jsonl, run_cli, run_cli_in_process

SMALL = (
    "--cpu",
    "--gpus",
    "1",
    "--nodes",
    "2",
    "--main-address",
    "127.0.0.1",
    "--model",
    "tiny-t5",
    "--data",
    "sample",
    "--set",
    "model.precision=fp32",
    "--set",
    "train.max_steps=3",
    "--set",
    "train.log_every=1",
    "--set",
    "train.micro_batch_size=4",
    "--set",
    "eval.limit=4",
    "--set",
    "eval.compare_original=false",
    "--set",
    "eval.max_new_tokens=8",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=REPO, env=cli_env(**env), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def finish_both(processes: list[subprocess.Popen]) -> list[str]:
    """Both nodes' console output once both ended; a node still running after 600 s fails the
    test with what every node printed (a node that ended early is why the other one waits)."""
    outputs = []
    for node, process in enumerate(processes):
        try:
            output, _ = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            said = [
                f"node {n} (exit {p.returncode}):\n{o[-3000:]}"
                for n, (p, o) in enumerate(zip(processes, outputs))
            ]
            late = process.communicate()[0] or ""
            pytest.fail(f"node {node} still ran after 600 s:\n{late[-3000:]}\n" + "\n".join(said))
        outputs.append(output)
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]
    return outputs


def check_two_node_run(run_dir: Path, outputs: list[str]) -> None:
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert (run_dir / "report" / "report.md").is_file()
    losses = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]
    assert [row["step"] for row in losses] == [1, 2, 3]
    # World size 2: each step trains 2 ranks x 4 examples.
    assert "effective batch 8" in outputs[0]


@pytest.mark.slow
def test_two_ftlaunch_processes_form_one_two_node_run(tmp_path):
    run_dir = tmp_path / "run"
    port = str(free_port())
    command = [
        sys.executable,
        "-m",
        "launcher.host.cli",
        "full",
        *SMALL,
        "--main-port",
        port,
        "--output",
        str(run_dir),
    ]
    processes = [start(command + ["--machine-rank", rank]) for rank in ("0", "1")]
    outputs = finish_both(processes)
    check_two_node_run(run_dir, outputs)
    for node, output in enumerate(outputs):  # what a node waiting for the other says
        assert (
            f"node {node} of 2: the ranks start once all 2 nodes have joined at 127.0.0.1 port {port}"
            in output
        )
    header = (run_dir / "command.sh").read_text().splitlines()[1]
    assert (
        header.startswith("# Rendered by ftlaunch") and "--machine-rank" not in header
    )  # one file, every node


@pytest.mark.slow
def test_render_once_then_command_sh_on_every_node(tmp_path):
    run_dir = tmp_path / "run"
    rendered = run_cli("full", *SMALL, "--main-port", str(free_port()), "--output", str(run_dir), "--dry-run")
    assert rendered.returncode == 0, rendered.stderr
    command = ["bash", str(run_dir / "command.sh")]
    processes = [start(command, FTLAUNCH_MACHINE_RANK=rank) for rank in ("0", "1")]
    outputs = finish_both(processes)
    check_two_node_run(run_dir, outputs)


def test_a_node_without_a_machine_rank_is_refused(tmp_path):
    result = run_cli_in_process("full", *SMALL, "--output", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "machine rank is unknown" in result.stderr and "--machine-rank" in result.stderr
    assert not (tmp_path / "run").exists()
    wrong = run_cli_in_process("full", *SMALL, "--machine-rank", "2", "--output", str(tmp_path / "run"))
    assert wrong.returncode == 2 and "use 0..1" in wrong.stderr


def test_command_sh_without_a_machine_rank_stops_before_launching(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli_in_process("full", *SMALL, "--output", str(run_dir), "--dry-run").returncode == 0
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "accelerate").write_text("#!/bin/sh\necho launched\n")
    (fake_bin / "accelerate").chmod(0o755)
    env = cli_env(PATH=f"{fake_bin}:/usr/bin:/bin")
    for name in ("SLURM_NODEID", "FTLAUNCH_MACHINE_RANK"):
        env.pop(name, None)
    result = subprocess.run(["bash", str(run_dir / "command.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "launched" not in result.stdout
    assert "no machine rank for this node" in result.stderr
    env["FTLAUNCH_MACHINE_RANK"] = "1"
    launched = subprocess.run(["bash", str(run_dir / "command.sh")], env=env, capture_output=True, text=True)
    assert launched.returncode == 0 and "launched" in launched.stdout


def test_a_node_with_other_flags_than_node_0s_run_is_refused(tmp_path):
    """Node 1 joins the run node 0 rendered in the shared directory: with other flags (also with
    --resume auto) it would rewrite recipe.yaml for both nodes' ranks. Refused, naming the keys."""
    run_dir = tmp_path / "run"
    port = ("--main-port", str(free_port()))
    node0 = run_cli_in_process(
        "full", *SMALL, *port, "--machine-rank", "0", "--output", str(run_dir), "--dry-run"
    )
    assert node0.returncode == 0, node0.stderr
    rendered = {
        name: (run_dir / name).read_text() for name in ("recipe.yaml", "command.sh", "accelerate.yaml")
    }
    for resume in ((), ("--resume", "auto")):
        result = run_cli_in_process(
            "full", *SMALL, *port, "--set", "train.lr=1e-3", "--machine-rank", "1", "--output", str(run_dir),
            *resume, "--dry-run",
        )  # fmt: skip
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(
            f"error: machine rank 1: its recipe differs from the run in {run_dir} "
            "(train.lr=0.001 (the run's: 1e-05)); start every node with the same flags, node 0 first"
        ), result.stderr
        assert {name: (run_dir / name).read_text() for name in rendered} == rendered
    same = run_cli_in_process(
        "full", *SMALL, *port, "--machine-rank", "1", "--output", str(run_dir), "--dry-run"
    )
    assert same.returncode == 0, same.stderr


def test_a_second_node_0_is_told_why_the_run_is_in_use(tmp_path):
    from test_run_safety import start_holder

    run_dir = tmp_path / "run"
    assert (
        run_cli_in_process(
            "full", *SMALL, "--machine-rank", "0", "--output", str(run_dir), "--dry-run"
        ).returncode
        == 0
    )
    holder = start_holder(run_dir)  # node 0, running
    try:
        result = run_cli_in_process("full", *SMALL, "--machine-rank", "0", "--output", str(run_dir))
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2 and "in use by another ftlaunch run" in result.stderr
    assert (
        "with --nodes 2 only machine rank 0 holds it: is another node started with machine rank 0 too?"
        in (result.stderr)
    )


@pytest.mark.slow
def test_nodes_that_do_not_share_the_run_directory_stop_at_once(tmp_path):
    """Node 1 given another --output (as a node-local scratch path would be): its ranks' checkpoint
    shards would land where no resume finds them. Both nodes stop at start with one line."""
    port = str(free_port())
    command = [sys.executable, "-m", "launcher.host.cli", "full", *SMALL, "--main-port", port]
    processes = [
        start(command + ["--machine-rank", rank, "--output", str(tmp_path / f"node{rank}")])
        for rank in ("0", "1")
    ]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 2, output[-3000:]
        assert (
            f"rank 1 (host {socket.gethostname()}, --output {tmp_path / 'node1'}) cannot see the run directory "
            f"{tmp_path / 'node0'} that rank 0 "
            "writes to: --output must be one shared directory, at the same path, on every node"
        ) in output, output[-3000:]
    assert not (tmp_path / "node0" / "checkpoints").exists() and not (tmp_path / "node0" / "final").exists()
