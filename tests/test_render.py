"""`ftlaunch full|lora --dry-run`: the rendered run files, checked by Accelerate's and DeepSpeed's
own parsers, pinned by snapshots, and the command.sh traced through bash with a fake `accelerate`.

Every render runs the CLI's ``main()`` in-process (``run_cli_in_process``: the same argv,
environment and working directory as a subprocess, milliseconds each); one launch runs the real
`python -m launcher.host.cli` subprocess end to end.
Refresh the snapshots after an intended change with:

    FTLAUNCH_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_render.py -k snapshot
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_env, run_cli, run_cli_in_process

RUN_FILES = {"recipe.yaml", "accelerate.yaml", "command.sh"}
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
UPDATE_SNAPSHOTS = os.environ.get("FTLAUNCH_UPDATE_SNAPSHOTS") == "1"
MULTINODE = ["lora", "--gpus", "8", "--nodes", "2", "--zero", "3", "--offload", "optimizer"]


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def render(tmp_path_factory):
    """render(*args) -> (run_dir, stdout) of a successful `ftlaunch ARGS --dry-run --output <tmp>/name`.

    Tests only read the rendered files, so each distinct command is rendered once per session.
    """
    cache: dict[tuple, tuple[Path, str]] = {}

    def _render(*args: str, name: str = "run") -> tuple[Path, str]:
        key = (args, name)
        if key not in cache:
            run_dir = (tmp_path_factory.mktemp("render") / name).resolve()
            result = run_cli_in_process(*args, "--dry-run", "--output", str(run_dir))
            assert result.returncode == 0, f"ftlaunch {' '.join(args)} failed:\n{result.stderr}"
            assert "Traceback" not in result.stderr
            cache[key] = run_dir, result.stdout
        return cache[key]

    return _render


def summary_value(stdout: str, name: str) -> str:
    match = re.search(rf"^{name}\s{{2,}}(.+)$", stdout, re.MULTILINE)
    assert match, f"no {name!r} row in the summary:\n{stdout}"
    return match.group(1)


def run_files(run_dir: Path) -> set[str]:
    return {path.name for path in run_dir.iterdir()}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def fake_tools(bin_dir: Path) -> Path:
    """`accelerate` that prints its argv (and CUDA_VISIBLE_DEVICES) as JSON; `scontrol` with two hosts."""
    bin_dir.mkdir(exist_ok=True)
    accelerate = bin_dir / "accelerate"
    accelerate.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'cuda': os.environ.get('CUDA_VISIBLE_DEVICES')}))\n"
    )
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    for tool in (accelerate, scontrol):
        tool.chmod(0o755)
    return bin_dir


def trace_command(run_dir: Path, bin_dir: Path, **env: str) -> subprocess.CompletedProcess:
    """Run the rendered command.sh with the fake tools first on PATH (no SLURM/FTLAUNCH env unless given)."""
    clean = {key: value for key, value in cli_env().items() if not key.startswith(("SLURM_", "FTLAUNCH_"))}
    clean.update(env, PATH=f"{fake_tools(bin_dir)}{os.pathsep}{clean['PATH']}")
    return subprocess.run(
        ["bash", str(run_dir / "command.sh")], capture_output=True, text=True, env=clean, timeout=60
    )


def traced_launch(run_dir: Path, bin_dir: Path, **env: str) -> dict:
    result = trace_command(run_dir, bin_dir, **env)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return json.loads(result.stdout)


def validated_launch_args(argv: list[str]):
    """`accelerate launch ARGV` parsed and validated by Accelerate itself, without launching."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert argv[0] == "launch"
    args = launch_command_parser().parse_args(argv[1:])
    args, _defaults, _ = _validate_launch_command(args)
    return args


# ---------------------------------------------------------------- the two "done when" commands


@pytest.mark.parametrize(
    ("args", "files", "world", "batch", "strategy"),
    [
        (["full", "--gpus", "4"], RUN_FILES, "4 = 4 per node x 1 node(s)", 32, "DDP"),
        (
            MULTINODE,
            RUN_FILES | {"deepspeed.json"},
            "16 = 8 per node x 2 node(s)",
            128,
            "DeepSpeed ZeRO-3 (offload optimizer to CPU)",
        ),
    ],
    ids=["full-4gpus", "lora-2nodes-zero3"],
)
def test_done_when_dry_run(render, args, files, world, batch, strategy):
    run_dir, stdout = render(*args)
    assert run_files(run_dir) == files  # nothing else: no checkpoints, no logs, nothing ran
    world_size = world.split()[0]
    assert summary_value(stdout, "world size").startswith(world)
    assert (
        summary_value(stdout, "effective batch")
        == f"{batch} = micro batch 8 x accumulation 1 x world size {world_size}"
    )
    assert summary_value(stdout, "strategy") == strategy
    assert summary_value(stdout, "precision") == "bf16"
    assert summary_value(stdout, "run dir") == str(run_dir)
    assert summary_value(stdout, "command") == str(run_dir / "command.sh")
    assert "dry run: nothing launched" in stdout
    assert os.access(run_dir / "command.sh", os.X_OK)


def test_a_cpu_full_launch_does_not_import_torch_in_the_launcher(tmp_path):
    """The launcher process validates, checks the disk, renders and starts `accelerate launch`
    (here a fake one); torch (2-3 s to import) is the ranks' job, so every `ftlaunch full --cpu`
    hands over within a second."""
    code = (
        "import sys; from launcher.host import cli; sys.argv = ['ftlaunch', *sys.argv[1:]]\n"
        "try:\n    cli.main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')"
    )
    args = ["full", "--cpu", "--gpus", "2", "--model", "tiny-t5", "--data", "sample"]
    result = subprocess.run(
        [sys.executable, "-c", code, *args, "--output", str(tmp_path / "run")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(PATH=f"{fake_tools(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert '{"argv": ["launch"' in result.stdout, result.stdout[-2000:]  # the fake accelerate ran
    assert result.stdout.strip().endswith("no torch"), result.stdout[-2000:]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "launch"])
def test_only_a_launch_runs_accelerate(tmp_path, dry_run):
    """--dry-run execs nothing; without it, ftlaunch execs command.sh (here with a fake `accelerate`)."""
    run_dir = (tmp_path / "run").resolve()
    env = cli_env(PATH=f"{fake_tools(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    result = (run_cli_in_process if dry_run else run_cli)(
        "full",
        "--cpu",
        "--model",
        "tiny-t5",
        "--data",
        "sample",
        "--output",
        str(run_dir),
        *(["--dry-run"] if dry_run else []),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    launched = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"argv"')]
    expected_argv = [
        "launch",
        "--config_file",
        str(run_dir / "accelerate.yaml"),
        "-m",
        "launcher.rank.train",
        "--run-dir",
        str(run_dir),
    ]
    assert launched == ([] if dry_run else [{"argv": expected_argv, "cuda": ""}])


def test_set_batch_keys_flow_into_deepspeed_json_and_summary(render):
    run_dir, stdout = render(
        "full",
        "--zero",
        "2",
        "--gpus",
        "2",
        "--set",
        "train.grad_accum=4",
        "--set",
        "train.micro_batch_size=2",
    )
    config = read_json(run_dir / "deepspeed.json")
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["train_batch_size"] == 2 * 4 * 2
    assert summary_value(stdout, "effective batch") == "16 = micro batch 2 x accumulation 4 x world size 2"


# ---------------------------------------------------------------- accelerate.yaml: Accelerate's loader and launch checks

# id: (flags, ClusterConfig fields that must hold)
ACCELERATE_CASES = {
    "single": (
        ["full"],
        dict(distributed_type="NO", num_processes=1, num_machines=1, mixed_precision="bf16", use_cpu=False),
    ),
    "single-cpu": (["full", "--cpu"], dict(distributed_type="NO", num_processes=1, use_cpu=True)),
    "ddp-4": (
        ["full", "--gpus", "4"],
        dict(
            distributed_type="MULTI_GPU",
            num_processes=4,
            num_machines=1,
            mixed_precision="bf16",
            machine_rank=0,
            main_process_ip=None,
        ),
    ),
    "ddp-2x2-fp32": (
        ["full", "--gpus", "2", "--nodes", "2", "--set", "model.precision=fp32"],
        dict(distributed_type="MULTI_GPU", num_processes=4, num_machines=2, mixed_precision="no"),
    ),
    "ddp-2x2-fixed-address": (
        [
            "full",
            "--gpus",
            "2",
            "--nodes",
            "2",
            "--main-address",
            "10.1.2.3",
            "--main-port",
            "29400",
            "--machine-rank",
            "1",
        ],
        # The machine rank is per node, never part of the run: command.sh passes it.
        dict(
            distributed_type="MULTI_GPU",
            num_processes=4,
            num_machines=2,
            main_process_ip="10.1.2.3",
            main_process_port=29400,
            machine_rank=0,
        ),
    ),
    "zero1": (
        ["full", "--zero", "1", "--gpus", "2"],
        dict(distributed_type="DEEPSPEED", num_processes=2, num_machines=1),
    ),
    "zero2-cpu": (
        ["full", "--zero", "2", "--gpus", "2", "--cpu"],
        dict(distributed_type="DEEPSPEED", num_processes=2),
    ),
    "zero3-lora-2nodes": (MULTINODE, dict(distributed_type="DEEPSPEED", num_processes=16, num_machines=2)),
    "zero3-offload-full": (
        ["full", "--zero", "3", "--offload", "full", "--gpus", "2"],
        dict(distributed_type="DEEPSPEED", num_processes=2, num_machines=1),
    ),
}


def zero_stage(flags: list[str]) -> int:
    return int(flags[flags.index("--zero") + 1]) if "--zero" in flags else 0


@pytest.mark.parametrize(("flags", "expected"), ACCELERATE_CASES.values(), ids=ACCELERATE_CASES.keys())
def test_accelerate_yaml_loads_with_accelerate(render, flags, expected):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    run_dir, _ = render(*flags)
    config = load_config_from_file(str(run_dir / "accelerate.yaml"))
    assert isinstance(config, ClusterConfig)
    assert {key: getattr(config, key) for key in expected} == expected
    zero = zero_stage(flags)
    if zero:
        assert config.deepspeed_config["deepspeed_config_file"] == str(run_dir / "deepspeed.json")
        assert config.deepspeed_config["zero3_init_flag"] is (zero == 3)
        assert config.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
    else:
        assert config.deepspeed_config == {}


@pytest.mark.parametrize(("flags", "expected"), ACCELERATE_CASES.values(), ids=ACCELERATE_CASES.keys())
def test_command_sh_passes_accelerate_launch_validation(render, tmp_path, flags, expected):
    """command.sh run by bash (fake `accelerate`, a 2-node SLURM env), its argv validated by Accelerate."""
    run_dir, _ = render(*flags)
    traced = traced_launch(
        run_dir, tmp_path / "bin", SLURM_NODEID="1", SLURM_JOB_ID="4321", SLURM_JOB_NODELIST="node-[a-b]"
    )
    args = validated_launch_args(traced["argv"])
    assert args.config_file == str(run_dir / "accelerate.yaml")
    assert (args.module, args.training_script, args.training_script_args) == (
        True,
        "launcher.rank.train",
        ["--run-dir", str(run_dir)],
    )
    assert (args.num_processes, args.num_machines) == (
        expected["num_processes"],
        expected.get("num_machines", 1),
    )
    zero = zero_stage(flags)
    assert args.use_deepspeed is bool(zero)
    assert args.multi_gpu is (expected["distributed_type"] == "MULTI_GPU")
    if zero:
        assert args.deepspeed_config_file == str(run_dir / "deepspeed.json")
    if "--cpu" in flags:
        assert traced["cuda"] == ""  # GPUs hidden, even ones SLURM would announce
    if expected.get("num_machines", 1) > 1:  # the node's rank and the rendezvous: flags, else SLURM
        rendezvous = (1, "10.1.2.3", 29400) if "--main-address" in flags else (1, "node-a", 20000 + 4321)
        assert (args.machine_rank, args.main_process_ip, args.main_process_port) == rendezvous


def test_multinode_command_sh_takes_machine_rank_from_slurm(render, tmp_path):
    run_dir, _ = render(*MULTINODE)
    for node in ("0", "1"):
        argv = traced_launch(run_dir, tmp_path / "bin", SLURM_NODEID=node, SLURM_JOB_NODELIST="node-[a-b]")[
            "argv"
        ]
        assert argv[argv.index("--machine_rank") + 1] == node
    overridden = traced_launch(
        run_dir,
        tmp_path / "bin",
        SLURM_NODEID="0",
        FTLAUNCH_MACHINE_RANK="1",
        FTLAUNCH_MAIN_ADDRESS="10.0.0.9",
        FTLAUNCH_MAIN_PORT="31000",
    )["argv"]
    assert overridden[overridden.index("--machine_rank") + 1] == "1"
    assert overridden[overridden.index("--main_process_ip") + 1] == "10.0.0.9"
    assert overridden[overridden.index("--main_process_port") + 1] == "31000"


def test_multinode_command_sh_without_address_fails_clearly(render, tmp_path):
    run_dir, _ = render(*MULTINODE)
    result = trace_command(run_dir, tmp_path / "bin", SLURM_NODEID="0")
    assert result.stdout == "", f"accelerate was launched anyway: {result.stdout}"
    assert result.returncode != 0
    assert "multi-node runs need --main-address or a SLURM allocation" in result.stderr


def test_command_sh_quotes_a_run_dir_with_spaces_and_quotes(render, tmp_path):
    run_dir, _ = render("full", "--zero", "1", "--gpus", "2", name="it's a run")
    args = validated_launch_args(traced_launch(run_dir, tmp_path / "bin")["argv"])
    assert args.config_file == str(run_dir / "accelerate.yaml")
    assert args.training_script_args == ["--run-dir", str(run_dir)]
    assert args.deepspeed_config_file == str(run_dir / "deepspeed.json")


def test_command_sh_survives_a_multiline_set_value(render, tmp_path):
    run_dir, _ = render("full", "--set", "data.prompt=Dialogue:\n{dialogue}\nSummary:")
    result = trace_command(run_dir, tmp_path / "bin")
    assert result.returncode == 0 and result.stderr == "", result.stderr


# ---------------------------------------------------------------- a SLURM job's render step


@pytest.mark.parametrize(
    ("job_args", "per_node"),
    [
        (["--cpu", "--gpus", "1"], "1 CPU rank(s) per node (--cpu)"),  # SLURM gives no count: 8 by default
        (["--gpus=2"], "2 GPU(s) per node"),  # SLURM gives 4 (--gpus-per-node=4)
    ],
    ids=["cpu-gpus-1", "gpus=2"],
)
def test_a_slurm_job_logs_and_renders_the_gpus_of_its_arguments(tmp_path, job_args, per_node):
    """slurm/lora.sh with a fake job's SLURM variables (no cluster: --dry-run renders and stops):
    a --gpus among the job's arguments replaces the count SLURM gives, in the job log's summary
    line as in the rendered run, and is passed to ftlaunch once."""
    env = {key: value for key, value in cli_env().items() if not key.startswith(("SLURM_", "FTLAUNCH_"))}
    env.update(SLURM_JOB_ID="999", SLURM_NNODES="1", FTLAUNCH_REPO=str(REPO))
    if "--cpu" not in job_args:
        env["SLURM_GPUS_PER_NODE"] = "gpu:4"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # this venv's ftlaunch
    run_dir = tmp_path / "run"
    job = [*job_args, "--model", "tiny-t5", "--data", "sample", "--output", str(run_dir), "--dry-run"]
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "lora.sh"), *job],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    count = per_node.split()[0]
    assert f"] method lora, {per_node}, run dir {run_dir}," in result.stdout, result.stdout[-3000:]
    render = next(line for line in result.stdout.splitlines() if "] render: ftlaunch lora" in line)
    assert render.split().count("--gpus") == 1 and f" --gpus {count} " in render, render
    assert not any(arg.startswith("--gpus=") for arg in render.split()), render
    assert summary_value(result.stdout, "world size").startswith(f"{count} = {count} per node x 1 node(s)")


# ---------------------------------------------------------------- deepspeed.json: DeepSpeed's own parser


@pytest.fixture
def deepspeed_config(monkeypatch):
    """parse(path, world_size) -> DeepSpeedConfig, as rank 0 of `world_size` data-parallel ranks.

    DeepSpeedConfig asks deepspeed.comm for the world size (1 when no process group is up);
    pretending a group of the run's size lets its batch assertion check
    train_batch = micro x accumulation x world for every rendered shape, not only 1 rank.
    """
    from deepspeed.runtime import config as ds_config

    def parse(path: Path, world_size: int):
        monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *args, **kwargs: world_size)
        monkeypatch.setattr(ds_config.dist, "get_rank", lambda *args, **kwargs: 0)
        return ds_config.DeepSpeedConfig(str(path))

    return parse


def device_of(offload_config) -> str | None:
    if offload_config is None:
        return None
    device = offload_config.device
    return getattr(device, "value", device)


# (flags, world size, micro batch, accumulation, bf16, clipping, optimizer offload, parameter offload, pinned)
DEEPSPEED_CASES = {
    "zero1": (["--zero", "1", "--gpus", "2"], 2, 8, 1, True, 1.0, None, None, None),
    "zero1-offload-optimizer": (
        ["--zero", "1", "--offload", "optimizer"],
        1,
        8,
        1,
        True,
        1.0,
        "cpu",
        None,
        True,
    ),
    "zero2": (
        ["--zero", "2", "--gpus", "4", "--set", "train.grad_accum=4", "--set", "train.micro_batch_size=2"],
        4,
        2,
        4,
        True,
        1.0,
        None,
        None,
        None,
    ),
    "zero2-offload-optimizer-cpu": (
        ["--zero", "2", "--offload", "optimizer", "--gpus", "2", "--cpu"],
        2,
        8,
        1,
        True,
        1.0,
        "cpu",
        None,
        False,
    ),
    "zero2-fp32-noclip": (
        ["--zero", "2", "--set", "model.precision=fp32", "--set", "train.max_grad_norm=null"],
        1,
        8,
        1,
        False,
        0.0,
        None,
        None,
        None,
    ),
    "zero3": (["--zero", "3", "--gpus", "8", "--nodes", "2"], 16, 8, 1, True, 1.0, None, None, None),
    "zero3-offload-optimizer": (
        ["--zero", "3", "--offload", "optimizer", "--gpus", "8", "--nodes", "2"],
        16,
        8,
        1,
        True,
        1.0,
        "cpu",
        None,
        True,
    ),
    "zero3-offload-full": (
        ["--zero", "3", "--offload", "full", "--gpus", "2"],
        2,
        8,
        1,
        True,
        1.0,
        "cpu",
        "cpu",
        True,
    ),
    "zero3-offload-full-cpu": (
        ["--zero", "3", "--offload", "full", "--gpus", "2", "--cpu"],
        2,
        8,
        1,
        True,
        1.0,
        "cpu",
        "cpu",
        False,
    ),
}


@pytest.mark.parametrize(
    ("flags", "world", "micro", "accum", "bf16", "clip", "opt_off", "param_off", "pinned"),
    DEEPSPEED_CASES.values(),
    ids=DEEPSPEED_CASES.keys(),
)
def test_deepspeed_json_accepted_by_deepspeed(
    render, deepspeed_config, flags, world, micro, accum, bf16, clip, opt_off, param_off, pinned
):
    run_dir, _ = render("full", *flags)
    config = deepspeed_config(run_dir / "deepspeed.json", world)
    assert config.zero_optimization_stage == zero_stage(flags)
    # bf16 = torch.autocast over fp32 weights (DDP's numerics), never DeepSpeed's bf16 module cast;
    # gradients are accumulated and reduced in fp32.
    assert config.torch_autocast_enabled is bf16
    assert config.torch_autocast_dtype == (torch.bfloat16 if bf16 else None)
    assert config.torch_autocast_lower_precision_safe_modules == ([] if bf16 else None)
    assert not config.bfloat16_config.enabled and not config.float16_config.enabled
    assert config.communication_data_type == torch.float32
    assert config.grad_accum_dtype == "fp32"
    assert config.gradient_clipping == clip
    assert (config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps) == (micro, accum)
    assert config.train_batch_size == micro * accum * world
    zero = config.zero_config
    assert (device_of(zero.offload_optimizer), device_of(zero.offload_param)) == (opt_off, param_off)
    for offload in (zero.offload_optimizer, zero.offload_param):
        if offload is not None:
            assert offload.pin_memory is pinned  # --cpu: no CUDA, nothing to pin


def test_deepspeed_batch_assertion_catches_a_wrong_world_size(render, deepspeed_config):
    """The check above is not vacuous: the same file read by 1 rank instead of 2 is refused."""
    run_dir, _ = render("full", "--zero", "2", "--gpus", "2")
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        deepspeed_config(run_dir / "deepspeed.json", 1)


# ---------------------------------------------------------------- snapshots

SNAPSHOT_CASES = {
    "full_gpus4": ["full", "--gpus", "4"],
    "lora_gpus8_nodes2_zero3_offload_optimizer": MULTINODE,
    "full_zero2_gpus2_cpu": ["full", "--zero", "2", "--gpus", "2", "--cpu"],
    "full_zero3_offload_full_gpus2": ["full", "--zero", "3", "--offload", "full", "--gpus", "2"],
}


def normalized_run_files(run_dir: Path) -> dict[str, str]:
    """Every file of the run with the run directory replaced by <RUN>."""
    return {path.name: path.read_text().replace(str(run_dir), "<RUN>") for path in sorted(run_dir.iterdir())}


def write_snapshot(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.iterdir():
        stale.unlink()
    for name, text in files.items():
        (directory / name).write_text(text)


@pytest.mark.parametrize("name", SNAPSHOT_CASES)
def test_snapshot(render, name):
    run_dir, _ = render(*SNAPSHOT_CASES[name])
    actual = normalized_run_files(run_dir)
    directory = SNAPSHOTS / name
    if UPDATE_SNAPSHOTS:
        write_snapshot(directory, actual)
    assert directory.is_dir(), f"no snapshot {directory}; create it with FTLAUNCH_UPDATE_SNAPSHOTS=1"
    expected = {path.name: path.read_text() for path in sorted(directory.iterdir())}
    hint = f"rendered files differ from {directory}; if intended, refresh with FTLAUNCH_UPDATE_SNAPSHOTS=1"
    assert sorted(actual) == sorted(expected), hint
    for file_name in expected:
        assert actual[file_name] == expected[file_name], f"{file_name}: {hint}"


def test_snapshots_have_no_leftover_cases():
    assert {path.name for path in SNAPSHOTS.iterdir() if path.is_dir()} == set(SNAPSHOT_CASES)


# ---------------------------------------------------------------- the templates, used by hand

TEMPLATES = sorted((REPO / "accelerate_configs").glob("*.yaml"))
DEEPSPEED_TEMPLATES = sorted((REPO / "accelerate_configs" / "deepspeed").glob("*.json"))
AUTO_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
}


def auto_keys(node, prefix: str = "") -> set[str]:
    """Dotted keys whose value is "auto", at any depth."""
    if isinstance(node, dict):
        return set().union(*(auto_keys(value, f"{prefix}{key}.") for key, value in node.items()))
    return {prefix.rstrip(".")} if node == "auto" else set()


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda path: path.name)
def test_accelerate_template_loads_as_is(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.num_processes >= 1
    if config.distributed_type == "DEEPSPEED":  # the JSON it names exists (paths relative to the checkout)
        assert (REPO / config.deepspeed_config["deepspeed_config_file"]).is_file()


# Communication buckets sized to the model's width (Accelerate fills them from model.config).
BUCKET_KEYS = {
    1: set(),
    2: {"zero_optimization.reduce_bucket_size"},
    3: {
        "zero_optimization.reduce_bucket_size",
        "zero_optimization.stage3_prefetch_bucket_size",
        "zero_optimization.stage3_param_persistence_threshold",
    },
}


@pytest.mark.parametrize("path", DEEPSPEED_TEMPLATES, ids=lambda path: path.name)
def test_deepspeed_template_auto_only_for_batch_clipping_and_buckets(path: Path):
    config = read_json(path)
    stage = config["zero_optimization"]["stage"]
    assert stage in {1, 2, 3}
    assert auto_keys(config) == AUTO_KEYS | BUCKET_KEYS[stage]


@pytest.mark.parametrize("model,hidden", [("tiny-t5", 64), ("google/flan-t5-xl", 2048)])
def test_zero3_buckets_are_sized_to_the_model(render, model, hidden):
    run_dir, _ = render("full", "--zero", "3", "--gpus", "2", "--model", model)
    zero = read_json(run_dir / "deepspeed.json")["zero_optimization"]
    assert zero["reduce_bucket_size"] == hidden * hidden
    assert zero["stage3_param_persistence_threshold"] == 10 * hidden


def test_zero3_buckets_stay_auto_for_an_unknown_hub_model(render):
    run_dir, _ = render("full", "--zero", "3", "--gpus", "2", "--model", "someone/some-t5")
    assert read_json(run_dir / "deepspeed.json")["zero_optimization"]["reduce_bucket_size"] == "auto"


# ---------------------------------------------------------------- FSDP2


def test_fsdp_accelerate_yaml_is_accelerates_fsdp2_config(tmp_path):
    """In-process render of --fsdp, read back by Accelerate's own config loader."""
    from accelerate.commands.config.config_args import load_config_from_file

    from launcher.core.recipe import Recipe
    from launcher.host.render import render_accelerate_config

    recipe = Recipe.model_validate(
        {"model": {"name": "tiny-t5"}, "launch": {"gpus": 2, "nodes": 2, "fsdp": True, "offload": "full"}}
    )
    (tmp_path / "accelerate.yaml").write_text(render_accelerate_config(recipe, tmp_path))
    config = load_config_from_file(str(tmp_path / "accelerate.yaml"))
    assert (config.distributed_type, config.num_processes, config.num_machines) == ("FSDP", 4, 2)
    assert config.mixed_precision == "bf16" and config.use_cpu is False
    assert config.fsdp_config == {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "T5Block",
        "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_offload_params": True,
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_activation_checkpointing": False,
    }
    assert config.deepspeed_config == {}


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--fsdp", "--zero", "3"], ("launch.fsdp", "--zero 3", "pick one")),
        (["--fsdp", "--offload", "optimizer"], ("--offload full",)),
    ],
)
def test_fsdp_conflicts_are_one_line_refusals(tmp_path, flags, words):
    result = run_cli("full", "--cpu", "--gpus", "2", *flags, "--dry-run", "--output", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert not (tmp_path / "run").exists()
