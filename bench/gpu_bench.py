"""The GPU benchmark that bench/gpu.sh runs: one H100/H200, no network, under 8 minutes.

This driver imports no torch: it runs every part as a subprocess in a session of its own and
rewrites its results into ``--out`` after every part (summary.md, results.json, logs.txt, env.txt,
reports.md: five files, flat). The parts, most valuable first:

  preflight   imports, versions, conflicts, the GPU and its peak (gpu_worker.py)
  prepare     a FLAN-T5-base-shaped model directory and synthetic DialogSum-like data (gpu_worker.py)
  cli         the real CLI: ``python -m launcher.host.cli {full,lora} --gpus 1 --zero N [--offload
              optimizer] --model DIR --data DIR`` (DDP, ZeRO-2, ZeRO-3, ZeRO-3 + optimizer offload),
              a few dozen optimizer steps, then distributed generation, ROUGE and the report;
              tokens/s from the run's own metrics.jsonl (windows after the first), MFU from it with
              the training set's mean FLOPs per token ("approx."), peak GPU memory from nvidia-smi
  measure     per strategy, ``accelerate launch gpu_worker.py measure`` with the configs
              ``ftlaunch full --dry-run`` renders for the real architecture's name (so ZeRO bucket
              sizes are flan-t5-base's): the product's step timed, MFU, memory, host syncs per step;
              the DDP part also times generation (definitions: gpu_worker.py)

Every part has a step timeout, a hang timeout (no output and no CPU use by any of its processes)
and the run's deadline, all checked while it runs; a part past one of them is killed with its whole
process tree (its session, and every process carrying the part's marker in its environment, which
also finds ranks that torchrun started in sessions of their own), and the others' results are kept.

``--tiny``: the same plan on CPU ranks with a tiny model (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpu_worker import ARCHS, DEADLINE_ENV, RESULT_PREFIX, STRATEGIES

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("gpu_worker.py")
OUT_FILES = ("summary.md", "results.json", "logs.txt", "env.txt", "reports.md")  # all of --out, flat
RUN_ENV = "FTLAUNCH_BENCH_RUN"  # marks every process of one benchmark run (swept at the end)
STEP_ENV = "FTLAUNCH_BENCH_STEP"  # marks every process of one part (killed together)


# ---------------------------------------------------------------- settings and plan


@dataclass
class Settings:
    """Sizes and limits of one benchmark run (GPU defaults; ``--tiny`` shrinks them for CPU)."""

    tiny: bool = False
    archs: tuple[str, ...] = ("base",)
    batch: int = 16
    cli_steps: int = 30
    log_every: int = 5
    cli_eval_limit: int = 32
    cli_max_new_tokens: int = 32
    warmup: int = 5
    steps: int = 20
    sync_steps: int = 3
    dialogues: int = 500
    eval_batch: int = 64
    max_new_tokens: int = 64
    step_timeout_s: float = 150.0
    stall_s: float = 60.0  # no output and no CPU use for this long: hung
    min_left_s: float = 30.0  # do not start a part with less time than this left

    @classmethod
    def for_tiny(cls) -> Settings:
        return cls(
            tiny=True,
            archs=("tiny",),
            batch=4,
            cli_steps=3,
            log_every=1,
            cli_eval_limit=4,
            cli_max_new_tokens=8,
            warmup=1,
            steps=2,
            sync_steps=0,
            dialogues=8,
            eval_batch=4,
            max_new_tokens=8,
            step_timeout_s=240.0,
            stall_s=20.0,
            min_left_s=10.0,
        )


# Step variants ("step" parts, gpu_step.py): VARIANT:MODE:BATCH, each alone in a fresh process.
# The main question first: full FT bf16, one GPU, the product eager and compiled against
# Seq2SeqTrainer eager (the baseline of every ratio) and compiled, alternating product / trainer;
# then larger micro batches. A token-budget variant (train.micro_batch_tokens) is one more line
# here once that key exists, e.g. ("step", "product:compiled:tokens=8192"): gpu_step.py's
# fixed_batches is where the budget's sampler takes over from the fixed batch size.
STEP_PLAN = (
    ("step", "trainer:eager:16"),
    ("step", "product:eager:16"),
    ("step", "product:compiled:16"),
    ("step", "trainer:compiled:16"),
    ("step", "product:compiled:32"),
    ("step", "product:compiled:64"),
    ("step", "product:eager:64"),
    ("step", "product:compiled:t32768"),  # train.micro_batch_tokens=32768 (README, "Token budget")
    ("step", "trainer:eager:t32768"),  # Seq2SeqTrainer on the very same budget batches
)
# Most valuable first, so that the time budget, if it runs out, cuts the least: the step variants,
# the CLI end to end, the measurement, ZeRO-3 (full and LoRA: the paths that break on GPUs),
# offload, the rest.
DEFAULT_PLAN = STEP_PLAN + (
    ("cli", "full:DDP"),
    ("measure", "DDP"),
    ("cli", "full:ZeRO-3"),
    ("cli", "lora:ZeRO-3"),
    ("measure", "ZeRO-3"),
    ("cli", "full:ZeRO-3+offload"),
    ("measure", "ZeRO-3+offload"),
    ("cli", "full:ZeRO-2"),
    ("measure", "ZeRO-2"),
    ("cli", "lora:DDP"),
    ("cli", "lora:ZeRO-2"),
    ("cli", "lora:ZeRO-3+offload"),
)
TINY_PLAN = (  # every kind of part once; product eager and trainer compiled differ only by a flag
    ("step", "trainer:eager:4"),
    ("step", "product:compiled:4"),
    ("step", "product:eager:t1200"),  # a token budget (train.micro_batch_tokens) forms the batches
    ("cli", "full:DDP"),
    ("measure", "DDP"),
    ("measure", "ZeRO-2"),
    ("cli", "lora:ZeRO-3+offload"),
)


@dataclass
class Part:
    """One subprocess of the plan and what came of it."""

    name: str
    kind: str  # preflight | prepare | cli | measure
    status: str = "planned"  # ok | failed (exit N) | killed: why | skipped: why
    seconds: float = 0.0
    returncode: int | None = None
    results: list[dict] = field(default_factory=list)
    peak_gpu_mib: float | None = None


def build_plan(
    cli: str | None, measure: str | None, tiny: bool, steps: str | None = None
) -> list[tuple[str, str]]:
    """The default plan, or only the step variants, CLI runs and measurements asked for (comma
    lists), in the order given, step variants first (a rerun of what a first run had to skip)."""
    if cli is None and measure is None and steps is None:
        return list(TINY_PLAN if tiny else DEFAULT_PLAN)
    items = {
        kind: [item.strip() for item in (value or "").split(",") if item.strip()]
        for kind, value in (("step", steps), ("cli", cli), ("measure", measure))
    }
    return [(kind, item) for kind in ("step", "cli", "measure") for item in items[kind]]


def step_spec_ok(item: str) -> bool:
    parts = item.split(":")
    return (
        len(parts) == 3
        and parts[0] in ("product", "trainer")
        and parts[1] in ("eager", "compiled")
        and (parts[2].isdigit() or (parts[2][:1] == "t" and parts[2][1:].isdigit()))
    )


def plan_problems(plan: list[tuple[str, str]]) -> list[str]:
    """Parts of a plan that name no method:strategy (cli) or strategy (measure)."""
    bad = []
    for kind, item in plan:
        if kind == "step":
            if not step_spec_ok(item):
                bad.append(f"step {item}")
            continue
        strategy = item.split(":")[-1]
        method_ok = kind == "measure" or (item.count(":") == 1 and item.split(":")[0] in ("full", "lora"))
        if strategy not in STRATEGIES or not method_ok or (kind == "measure" and ":" in item):
            bad.append(f"{kind} {item}")
    return bad


# ---------------------------------------------------------------- process trees


def ancestors() -> set[int]:
    """This process and its parents (never signalled, even if they carry a marker)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            pid = int(re.search(r"^PPid:\s*(\d+)", status, re.MULTILINE).group(1))
        except (OSError, AttributeError, ValueError):
            break
    return pids


def marked_pids(key: str, value: str) -> list[int]:
    """PIDs of this user's processes whose environment holds KEY=VALUE (ours: we set it)."""
    needle = f"{key}={value}".encode()
    skip = ancestors()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def signal_tree(leader: int | None, key: str, value: str, sig: int) -> int:
    """Send ``sig`` to the part's session and to every process (and its group) carrying its marker."""
    own_group = os.getpgrp()
    groups = {leader} if leader else set()
    pids = marked_pids(key, value)
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except OSError:
            pass
    for group in groups - {own_group}:
        try:
            os.killpg(group, sig)
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    return len(pids)


def kill_tree(leader: int | None, key: str, value: str, grace_s: float = 5.0) -> None:
    """SIGTERM, a grace period, then SIGKILL until no marked process is left."""
    signal_tree(leader, key, value, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and marked_pids(key, value):
        time.sleep(0.2)
    for _ in range(10):
        if not signal_tree(leader, key, value, signal.SIGKILL):
            break
        time.sleep(0.2)


# ---------------------------------------------------------------- running one part


class Stop(Exception):
    """The driver was told to stop (SIGTERM/SIGINT from gpu.sh's timeout or a user)."""


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """user + system CPU seconds of each live process."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[pid] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


class Liveness:
    """When did a part last show life: output in its log, or CPU use by one of its processes?

    A hung process sleeps (no output, no CPU); importing, loading or computing uses a core. An
    idle launcher polling its ranks uses far less than LIVE_CPU_SHARE of one.
    """

    LIVE_CPU_SHARE = 0.1

    def __init__(self, marker: str, log_path: Path) -> None:
        self.marker, self.log_path = marker, log_path
        self.size = 0
        self.cpu: dict[int, float] = {}
        self.checked = self.last_alive = time.monotonic()

    def check(self) -> float:
        """Seconds since the part last showed life."""
        now = time.monotonic()
        size = self.log_path.stat().st_size
        cpu = cpu_seconds(marked_pids(STEP_ENV, self.marker))
        used = sum(max(0.0, value - self.cpu.get(pid, value)) for pid, value in cpu.items())
        if (
            size != self.size
            or set(cpu) - set(self.cpu)
            or used >= self.LIVE_CPU_SHARE * (now - self.checked)
        ):
            self.last_alive = now
        self.size, self.cpu, self.checked = size, cpu, now
        return now - self.last_alive


def gpu_memory_used_mib() -> float | None:
    """Memory in use on GPU 0 as nvidia-smi reports it (None without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return float(out.stdout.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def run_part(
    part: Part,
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    timeout_s: float,
    stall_s: float,
    deadline: float,
) -> None:
    """Run one part in a session of its own; kill its whole tree past a limit (checked while it runs)."""
    marker = secrets.token_hex(6)
    env = {**env, STEP_ENV: marker}
    started = time.monotonic()
    with log_path.open("w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    liveness, quiet, checked, reason = Liveness(marker, log_path), 0.0, 0.0, None
    try:
        while proc.poll() is None:
            time.sleep(0.25)
            now = time.monotonic()
            if now - checked >= 1.0:
                checked, quiet = now, liveness.check()
                used = gpu_memory_used_mib()
                if used is not None:
                    part.peak_gpu_mib = max(part.peak_gpu_mib or 0.0, used)
            if now - started > timeout_s:
                reason = f"killed: step timeout ({timeout_s:.0f} s)"
            elif quiet > stall_s:
                reason = f"killed: hung (no output and no CPU use for {stall_s:.0f} s)"
            elif time.time() > deadline:
                reason = "killed: the run's time budget ran out"
            if reason:
                break
    except Stop:
        reason = "killed: the benchmark was stopped"
    if reason:
        kill_tree(proc.pid, STEP_ENV, marker)
    else:
        kill_tree(None, STEP_ENV, marker, grace_s=2.0)  # a rank that outlived its launcher
    proc.wait()
    part.returncode = proc.returncode
    part.seconds = time.monotonic() - started
    part.status = reason or ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})")
    if reason == "killed: the benchmark was stopped":
        raise Stop


def result_lines(text: str) -> list[dict]:
    """The ``BENCH_RESULT {json}`` lines a worker printed (also those of a part killed later)."""
    results = []
    for line in text.replace("\r", "\n").splitlines():
        if line.startswith(RESULT_PREFIX):
            try:
                results.append(json.loads(line[len(RESULT_PREFIX) :]))
            except ValueError:
                pass
    return results


def log_tail(text: str, lines: int = 150, limit: int = 24_000) -> str:
    """The end of a log without repeats: progress-bar frames (tqdm's \\r), repeated warnings."""
    seen: set[str] = set()
    kept, dropped = [], 0
    for line in text.replace("\r", "\n").splitlines():
        key = re.sub(r"\d+", "#", line.strip())  # progress bars differ only in their numbers
        if not key or key in seen:
            dropped += bool(key)
            continue
        seen.add(key)
        kept.append(line)
    tail = "\n".join(kept[-lines:])[-limit:]
    return tail + (f"\n[{dropped} repeated lines left out]" if dropped else "")


def render_measure_run(
    strategy: str, arch: str, run_dir: Path, batch: int, tiny: bool, env: dict[str, str] | None = None
) -> None:
    """The run files ``ftlaunch full --dry-run`` renders for the real architecture's name
    (google/flan-t5-base, not the tiny model: ZeRO bucket sizes follow d_model)."""
    zero, offload = STRATEGIES[strategy]
    command = [
        sys.executable,
        "-m",
        "launcher.host.cli",
        "full",
        "--dry-run",
        "--gpus",
        "1",
        "--zero",
        str(zero),
        "--model",
        ARCHS[arch],
        "--data",
        "sample",
        "--output",
        str(run_dir),
        "--overwrite",
        "--set",
        f"train.micro_batch_size={batch}",
        "--set",
        "model.precision=bf16",
        "--set",
        "train.compile=false",  # the per-strategy comparison stays eager; the step variants compile
    ]
    command += (["--offload", offload] if offload != "none" else []) + (["--cpu"] if tiny else [])
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"render failed: {done.stderr.strip()[-300:]}")


# ---------------------------------------------------------------- driver


class Driver:
    """Runs the plan and keeps --out current after every part."""

    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args = args
        self.settings = settings
        self.out: Path = args.out.resolve()
        self.work: Path = (args.work or Path(tempfile.mkdtemp(prefix="ftlaunch-gpu-bench-"))).resolve()
        self.started = time.time()
        self.deadline = self.started + args.budget_s
        self.run_marker = os.environ.get(RUN_ENV) or secrets.token_hex(6)
        self.parts: list[Part] = []
        self.plan = build_plan(args.cli, args.measure, settings.tiny, args.steps)
        self.env_info: dict[str, Any] = {}
        self.prepared: dict[str, Any] = {}

    # ------------------------------------------------------------ environment of the parts

    def part_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
            TRANSFORMERS_VERBOSITY="error",
            DATASETS_VERBOSITY="error",
            PYTHONWARNINGS="ignore::FutureWarning",
        )
        env[RUN_ENV] = self.run_marker
        env[DEADLINE_ENV] = f"{self.deadline:.0f}"
        paths = [str(REPO)] + ([str(self.args.site)] if self.args.site else [])
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH", "")] if p])
        env.pop("FTLAUNCH_DEBUG", None)
        if self.settings.tiny:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def worker(self, *args: str) -> list[str]:
        return [sys.executable, str(WORKER), *args]

    # ------------------------------------------------------------ the plan

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        for name in ("logs.txt", "reports.md"):  # env.txt: gpu.sh starts it, preflight appends
            (self.out / name).write_text("")
        self.write()
        try:
            self.step_preflight()
            if not self.settings.tiny and not self.env_info.get("cuda"):
                self.skip_all("no GPU visible (torch.cuda.is_available() is False)")
                return 3
            self.step_prepare()
            if not self.prepared:
                self.skip_all("prepare failed: no model or data to run on")
                return 1
            for kind, item, arch in self.parts_planned():
                self.step(kind, item, arch)
        except Stop:
            self.skip_all("the benchmark was stopped")
        finally:
            self.write()
            self.remove_work()
        ok = all(part.status == "ok" for part in self.parts)
        return 0 if ok else 1

    def remove_work(self) -> None:
        """Delete the scratch folder; a stop arriving meanwhile only leaves it (results are written)."""
        if self.args.keep_work:
            return
        try:
            shutil.rmtree(self.work, ignore_errors=True)
        except Stop:
            print(f"gpu_bench: stopped while removing {self.work}; left it", file=sys.stderr)

    def skip_all(self, why: str) -> None:
        """Every planned part not run yet is listed as skipped, with the reason."""
        for part in self.parts:
            if part.status == "planned":
                part.status = f"skipped: {why}"
        done = {part.name for part in self.parts}
        for kind, item, arch in self.parts_planned():
            name = self.part_name(kind, item, arch)
            if name not in done:
                self.parts.append(Part(name, kind, status=f"skipped: {why}"))
        self.write()

    def parts_planned(self) -> list[tuple[str, str, str]]:
        """(kind, item, arch): measurements for every architecture, CLI runs on the first."""
        return [
            (kind, item, arch)
            for kind, item in self.plan
            for arch in (self.settings.archs if kind == "measure" else self.settings.archs[:1])
        ]

    def part_name(self, kind: str, item: str, arch: str) -> str:
        if kind == "cli":
            method, strategy = item.split(":")
            return f"cli {method} {strategy}"
        if kind == "step":
            variant, mode, batch = item.split(":")
            return f"step {variant} {mode} b{batch} {arch}"
        return f"measure {item} {arch}"

    def time_left(self) -> float:
        return self.deadline - time.time()

    def launch(self, part: Part, command: list[str], timeout_s: float | None = None) -> str:
        """Run the part (unless too little time is left); returns its log text."""
        if self.time_left() < self.settings.min_left_s:
            part.status = "skipped: the run's time budget ran out"
            return ""
        log = self.work / f"{len(self.parts):02d}-{re.sub(r'[^A-Za-z0-9.+-]', '_', part.name)}.log"
        print(f"[{time.time() - self.started:5.0f} s] {part.name} ...", flush=True)
        run_part(
            part,
            command,
            self.part_env(),
            log,
            timeout_s or self.settings.step_timeout_s,
            self.settings.stall_s,
            self.deadline,
        )
        text = log.read_text(errors="replace")
        part.results = result_lines(text)
        self.append_log(part, text)
        print(
            f"[{time.time() - self.started:5.0f} s] {part.name}: {part.status} ({part.seconds:.0f} s)",
            flush=True,
        )
        return text

    def step_preflight(self) -> None:
        part = self.new_part("preflight", "preflight")
        command = self.worker(
            "preflight",
            *(["--tiny"] if self.settings.tiny else []),
            *(["--site", str(self.args.site)] if self.args.site else []),
            *(["--peak-tflops", str(self.args.peak_tflops)] if self.args.peak_tflops else []),
        )
        self.launch(part, command, timeout_s=120)
        self.env_info = part.results[-1] if part.results else {"error": "preflight printed nothing"}
        self.append_env()
        self.write()

    def step_prepare(self) -> None:
        part = self.new_part("prepare", "prepare")
        command = self.worker(
            "prepare",
            "--work",
            str(self.work),
            "--archs",
            ",".join(self.settings.archs),
            "--train-rows",
            str(self.settings.cli_steps * self.settings.batch),
            "--test-rows",
            str(max(self.settings.cli_eval_limit, self.settings.dialogues)),
            *(["--tiny"] if self.settings.tiny else []),
            *(["--tokenizer", self.args.tokenizer] if self.args.tokenizer else []),
            *(["--data", self.args.data] if self.args.data else []),
        )
        self.launch(part, command, timeout_s=180)
        if part.status == "ok" and part.results:
            self.prepared = part.results[-1]
        self.write()

    def new_part(self, name: str, kind: str) -> Part:
        part = Part(name, kind)
        self.parts.append(part)
        return part

    def step(self, kind: str, item: str, arch: str) -> None:
        part = self.new_part(self.part_name(kind, item, arch), kind)
        try:
            {"cli": self.step_cli, "measure": self.step_measure, "step": self.step_variant}[kind](
                part, item, arch
            )
        except Stop:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken part is a result; the others still run
            part.status = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        self.write()

    def cli_args(self, method: str, strategy: str, run_dir: Path, model: str) -> list[str]:
        zero, offload = STRATEGIES[strategy]
        s = self.settings
        args = [
            sys.executable,
            "-m",
            "launcher.host.cli",
            method,
            "--gpus",
            "1",
            "--zero",
            str(zero),
            "--model",
            model,
            "--data",
            self.prepared["data_dir"],
            "--output",
            str(run_dir),
            "--overwrite",
            "--set",
            f"train.micro_batch_size={s.batch}",
            "--set",
            f"train.max_steps={s.cli_steps}",
            "--set",
            f"train.log_every={s.log_every}",
            "--set",
            "train.checkpoint_every=null",
            "--set",
            "train.eval_every=null",
            "--set",
            "data.validation_limit=16",
            "--set",
            f"eval.limit={s.cli_eval_limit}",
            "--set",
            f"eval.batch_size={s.cli_eval_limit}",
            "--set",
            f"eval.max_new_tokens={s.cli_max_new_tokens}",
            "--set",
            "model.precision=bf16",
        ]
        if offload != "none":
            args += ["--offload", offload]
        # The original model is scored once (first CLI run): the report's comparison path.
        first = not any(part.kind == "cli" for part in self.parts[:-1])
        args += ["--set", f"eval.compare_original={'true' if first else 'false'}"]
        return args + (["--cpu"] if s.tiny else [])

    def step_cli(self, part: Part, item: str, arch: str) -> None:
        method, strategy = item.split(":")
        run_dir = self.work / "runs" / f"cli-{method}-{strategy}"
        model_dir = self.prepared["models"][arch]
        # train.compile=auto compiles the GPU runs under DDP and ZeRO-1/2: compile time is in the part.
        self.launch(
            part,
            self.cli_args(method, strategy, run_dir, model_dir),
            timeout_s=2 * self.settings.step_timeout_s,
        )
        if part.status.startswith("skipped"):
            return
        part.results = [cli_result(run_dir, method, strategy, arch, self.prepared, self.env_info)]
        self.append_report(part, run_dir)

    def step_variant(self, part: Part, item: str, arch: str) -> None:
        """One step variant (gpu_step.py) in a fresh process: product or Seq2SeqTrainer, eager or
        compiled, at a micro batch; the product's runs also trace 3 steady steps."""
        variant, mode, batch = item.split(":")
        tokens = int(batch[1:]) if batch.startswith("t") else None  # "t32768": a token budget
        run_dir = self.work / "runs" / f"step-{batch}-{arch}"
        if not run_dir.is_dir():
            micro = 16 if tokens else int(batch)  # the rendered recipe's; the budget forms the batches
            render_measure_run("DDP", arch, run_dir, micro, self.settings.tiny, self.part_env())
        command = self.worker(
            "step",
            "--variant",
            variant,
            "--run-dir",
            str(run_dir),
            "--arch",
            arch,
            "--tokenizer",
            self.prepared["tokenizer"],
            "--batch",
            "16" if tokens else batch,
            "--steps",
            str(self.settings.steps),
        )
        command += ["--tokens", str(tokens)] if tokens else []
        command += ["--compile"] if mode == "compiled" else []
        command += ["--profile"] if variant == "product" else []
        command += ["--tiny"] if self.settings.tiny else []
        self.launch(part, command, timeout_s=self.settings.step_timeout_s * (2 if mode == "compiled" else 1))

    def step_measure(self, part: Part, strategy: str, arch: str) -> None:
        run_dir = self.work / "runs" / f"measure-{strategy}-{arch}"
        render_measure_run(strategy, arch, run_dir, self.settings.batch, self.settings.tiny, self.part_env())
        s = self.settings
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(run_dir / "accelerate.yaml"),
            str(WORKER),
            "measure",
            "--run-dir",
            str(run_dir),
            "--strategy",
            strategy,
            "--arch",
            arch,
            "--tokenizer",
            self.prepared["tokenizer"],
            "--batch",
            str(s.batch),
            "--warmup",
            str(s.warmup),
            "--steps",
            str(s.steps),
            "--sync-steps",
            str(s.sync_steps),
            "--eval-batch",
            str(s.eval_batch),
            "--max-new-tokens",
            str(s.max_new_tokens),
            "--generate",
            str(s.dialogues if strategy == "DDP" else 0),
            "--data-dir",
            self.prepared["data_dir"],
        ]
        if self.args.peak_tflops:
            command += ["--peak-tflops", str(self.args.peak_tflops)]
        if s.tiny:
            command.append("--tiny")
        self.launch(part, command)
        for result in part.results:
            result.setdefault("strategy", strategy)

    # ------------------------------------------------------------ output files (flat, <= 8)

    def append_log(self, part: Part, text: str) -> None:
        with (self.out / "logs.txt").open("a") as handle:
            handle.write(
                f"\n===== {part.name}: {part.status}, {part.seconds:.0f} s =====\n{log_tail(text)}\n"
            )

    def append_env(self) -> None:
        with (self.out / "env.txt").open("a") as handle:
            handle.write("\n===== preflight (python3 bench/gpu_worker.py preflight) =====\n")
            handle.write(json.dumps(self.env_info, indent=1) + "\n")

    def append_report(self, part: Part, run_dir: Path) -> None:
        report = run_dir / "report" / "report.md"
        text = report.read_text(errors="replace")[:20_000] if report.is_file() else "(no report.md)"
        with (self.out / "reports.md").open("a") as handle:
            handle.write(f"\n\n# {part.name} ({part.status})\n\n{text}\n")

    def write(self) -> None:
        """results.json and summary.md, rewritten whole (atomically) after every part."""
        payload = {
            "meta": {
                "command": os.environ.get("GPU_SH_COMMAND", " ".join(sys.argv)).strip(),
                "tiny": self.settings.tiny,
                "elapsed_s": round(time.time() - self.started, 1),
                "budget_s": self.args.budget_s,
                "settings": asdict(self.settings),
                "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            },
            "env": self.env_info,
            "prepared": self.prepared,
            "parts": [asdict(part) for part in self.parts],
        }
        write_atomic(self.out / "results.json", json.dumps(payload, indent=1, default=str) + "\n")
        try:
            text = summary(payload)
        except Exception as exc:  # noqa: BLE001 - a formatting bug must not cost the figures
            text = (
                f"# summary failed ({type(exc).__name__}: {exc}); see results.json\n\n"
                + "\n".join(f"- {part.name}: {part.status}" for part in self.parts)
                + "\n"
            )
        write_atomic(self.out / "summary.md", text)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def cli_result(run_dir: Path, method: str, strategy: str, arch: str, prepared: dict, env_info: dict) -> dict:
    """What one real CLI run left in its run directory (whatever it got to before it ended)."""
    result: dict[str, Any] = {"method": method, "strategy": strategy, "arch": arch}
    metrics = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").split("\n"):  # JSON Lines end at \n only (jsonl.py)
            try:
                metrics.append(json.loads(line))
            except ValueError:
                pass
    train_rows = [row for row in metrics if "loss" in row]
    if train_rows:
        steady = train_rows[1:] or train_rows  # the first window holds the first steps' start-up
        result.update(
            steps=train_rows[-1]["step"],
            loss_first=train_rows[0]["loss"],
            loss_last=train_rows[-1]["loss"],
            tokens_per_s=sum(r["tokens_per_s"] for r in steady) / len(steady),
            samples_per_s=sum(r["samples_per_s"] for r in steady) / len(steady),
            grad_norm=train_rows[-1].get("grad_norm"),
        )
        per_token = prepared.get("flops_per_token", {}).get(arch, {}).get(method)
        peak = env_info.get("peak_flops")
        if per_token and peak:
            result["mfu_approx"] = result["tokens_per_s"] * per_token / peak
    final = [row for row in metrics if row.get("final")]
    if final:
        result["val_loss"] = final[-1].get("val_loss")
    rouge = run_dir / "eval" / "finetuned" / "rouge.json"
    if rouge.is_file():
        scores = json.loads(rouge.read_text())
        result.update(rouge1=scores.get("rouge1"), rougeL=scores.get("rougeL"), eval_n=scores.get("n"))
    result["report"] = (run_dir / "report" / "report.md").is_file()
    final_dir = run_dir / "final"
    result["final_files"] = sorted(p.name for p in final_dir.iterdir()) if final_dir.is_dir() else []
    return result


# ---------------------------------------------------------------- summary.md


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def md_table(title: str, columns: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown section with one table (numeric columns, marked with a leading '#', align right)."""
    header = "| " + " | ".join(c.lstrip("#") for c in columns) + " |"
    rule = "| " + " | ".join("---:" if c.startswith("#") else "---" for c in columns) + " |"
    return ["", f"## {title}", "", header, rule] + ["| " + " | ".join(row) + " |" for row in rows]


def cli_row(r: dict) -> list[str]:
    loss = f"{fmt(r.get('loss_first'), '.3f')} -> {fmt(r.get('loss_last'), '.3f')}"
    return [
        r["method"],
        r["strategy"],
        str(r.get("steps", "-")),
        fmt(r.get("tokens_per_s"), ",.0f"),
        fmt(r.get("samples_per_s"), ".1f"),
        fmt(r.get("mfu_approx"), ".1%"),
        loss,
        fmt(r.get("val_loss"), ".3f"),
        f"{fmt(r.get('rouge1'), '.3f')} ({r.get('eval_n', '-')})",
        "yes" if r.get("report") else "no",
    ]


def measured_row(r: dict) -> list[str]:
    head = [str(r.get("arch")), str(r.get("method")), str(r.get("strategy"))]
    if "error" in r:
        return head + [f"error: {r['error']}"] + [""] * 6
    return head + [
        f"{r['tokens_per_s']:,.0f}",
        f"{r['samples_per_s']:.1f}",
        f"{r['tflops']:.1f}",
        fmt(r.get("mfu"), ".1%"),
        fmt(r.get("mfu_padded"), ".1%"),
        fmt(r.get("peak_alloc_gib"), ".2f"),
        fmt(r.get("host_syncs_per_step"), ".1f"),
    ]


def generation_row(r: dict) -> list[str]:
    if "error" in r:
        return [str(r.get("arch")), f"error: {r['error']}"] + [""] * 6
    return [
        r["arch"],
        str(r["dialogues"]),
        str(r["batch"]),
        str(r["max_new_tokens"]),
        f"{r['seconds']:.1f}",
        f"{r['dialogues_per_s']:.1f}",
        f"{r['new_tokens_per_s']:,.0f}",
        fmt(r.get("peak_alloc_gib"), ".2f"),
    ]


def step_tables(results: list[dict]) -> list[str]:
    """The step variants against Seq2SeqTrainer eager at the same micro batch, and the profiles."""
    steps = [r for r in results if r.get("kind") == "step"]
    baseline = {
        r["batch"]: r["tokens_per_s"] for r in steps if r["variant"] == "trainer" and not r["compiled"]
    }
    rows = []
    for r in steps:
        base = baseline.get(r["batch"])
        rows.append(
            [
                r["name"],
                str(r["batch"]),
                f"{r['tokens_per_s']:,.0f}",
                f"{r['tokens_per_s'] / base:.2f}" if base else "-",
                f"{1000 * r['seconds'] / r['steps']:.1f}",
                fmt(r.get("mfu"), ".1%"),
                fmt(r.get("longest_batch_peak_gib"), ".2f"),
                f"{r['warmup_pass_s']:.1f}",
                str(r.get("compiled_graphs", "-")),
            ]
        )
    lines = []
    if rows:
        lines += md_table(
            "Step variants, each in a fresh process: the 2nd pass over fixed batches timed "
            "(ratio: tokens/s vs Seq2SeqTrainer eager, same batch)",
            [
                "variant",
                "#batch",
                "#tokens/s",
                "#vs trainer eager",
                "#ms/step",
                "#MFU",
                "#peak GiB longest batch",
                "#warm-up pass s",
                "#graphs",
            ],
            rows,
        )
    profiles = [r for r in results if r.get("kind") == "profile"]
    if profiles:
        lines += md_table(
            "Profile of 3 steady steps (torch.profiler)",
            [
                "variant",
                "#batch",
                "#wall ms/step",
                "#GPU busy",
                "#kernels/step",
                "#syncs/step",
                "#sync ms/step",
                "#DtoH/step",
                "attention kernels",
                "top kernel",
            ],
            [
                [
                    r["name"],
                    str(r["batch"]),
                    f"{r['wall_ms_per_step']:.1f}",
                    fmt(r.get("gpu_busy_fraction"), ".0%"),
                    f"{r['kernels_per_step']:.0f}",
                    f"{r['sync_calls_per_step']:.1f}",
                    f"{r['sync_ms_per_step']:.1f}",
                    f"{r['dtoh_copies_per_step']:.1f}",
                    "; ".join(r["attention_kernels"])[:160] or "-",
                    (r["top_kernels"][0]["name"][:60] if r["top_kernels"] else "-"),
                ]
                for r in profiles
            ],
        )
    return lines


def summary(payload: dict) -> str:
    """summary.md: what ran and every table (gpu.sh prints it at the end too)."""
    env, meta, parts = payload["env"], payload["meta"], payload["parts"]
    lines = [
        "# ftlaunch GPU benchmark" + (" (--tiny rehearsal on CPU)" if meta["tiny"] else ""),
        "",
        f"- command: `{meta['command']}`; date {meta['date']}; {meta['elapsed_s']:.0f} s of a "
        f"{meta['budget_s']:.0f} s budget",
        f"- device: {env.get('device', '?')}; peak for MFU: {env.get('peak_label', '?')}; measured 8192^3 bf16 "
        f"matmul: {fmt(env.get('matmul_tflops'), '.0f')} TFLOP/s; {env.get('cpus', '?')} CPUs",
        "- versions: " + (", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()) or "?"),
    ]
    if env.get("problems"):
        lines.append("- **environment problems**: " + "; ".join(env["problems"]))
    if payload.get("prepared", {}).get("model_note"):
        lines.append(f"- model: {payload['prepared']['model_note']}")
    lines += md_table(
        "Parts",
        ["part", "status", "#seconds", "#peak GPU MiB (nvidia-smi)"],
        [[p["name"], p["status"], f"{p['seconds']:.0f}", fmt(p["peak_gpu_mib"], ".0f")] for p in parts],
    )
    results = [(p["kind"], r) for p in parts for r in p["results"]]
    lines += step_tables([r for kind, r in results if kind == "step"])
    cli = [cli_row(r) for kind, r in results if kind == "cli"]
    if cli:
        lines += md_table(
            "The real CLI (`ftlaunch full|lora --gpus 1`): a few dozen steps, then generation + report",
            [
                "method",
                "strategy",
                "#steps",
                "#tokens/s",
                "#samples/s",
                "#MFU (approx.)",
                "loss first -> last",
                "#val loss",
                "ROUGE-1 (n)",
                "report",
            ],
            cli,
        )
    train = [measured_row(r) for kind, r in results if kind == "measure" and r.get("kind") == "train"]
    if train:
        lines += md_table(
            "Measured: the product's step, timed after warm-up",
            [
                "model",
                "method",
                "strategy",
                "#tokens/s",
                "#samples/s",
                "#TFLOP/s",
                "#MFU",
                "#MFU padded",
                "#peak alloc GiB",
                "#host syncs/step",
            ],
            train,
        )
    gen = [generation_row(r) for kind, r in results if kind == "measure" and r.get("kind") == "generate"]
    if gen:
        lines += md_table(
            "Generation (`evaluation.generate_predictions`, greedy, bf16 autocast)",
            [
                "model",
                "#dialogues",
                "#batch",
                "#max_new_tokens",
                "#seconds",
                "#dialogues/s",
                "#new tokens/s",
                "#peak alloc GiB",
            ],
            gen,
        )
    lines += [
        "",
        "Files: summary.md (this), results.json (every number), logs.txt (each part's log tail), "
        "env.txt (wheels, versions, conflicts), reports.md (the CLI runs' report.md).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, help="results folder (gpu.sh: $OUT, else bench/results/gpu-<date>)"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: a new one under /tmp)"
    )
    parser.add_argument("--keep-work", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal: tiny model, a few steps")
    parser.add_argument(
        "--budget-s", type=float, default=450.0, help="the whole run's time budget (deadline)"
    )
    parser.add_argument("--cli", default=None, help="only these CLI runs: full:DDP,lora:ZeRO-3,...")
    parser.add_argument("--measure", default=None, help="only these measurements: DDP,ZeRO-2,...")
    parser.add_argument(
        "--steps", default=None, help="only these step variants: product:compiled:16,trainer:eager:16,..."
    )
    parser.add_argument(
        "--archs", default=None, help="comma list of base,large (measurement; CLI uses the first)"
    )
    parser.add_argument("--site", type=Path, default=None, help="where gpu.sh installed the carried wheels")
    parser.add_argument("--data", default=None, help="a DialogSum folder (train/validation/test.jsonl)")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: the package's tiny one)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="dense bf16 peak, if the table lacks the GPU"
    )
    parser.add_argument("--stall-s", type=float, default=None, help="kill a part silent this long")
    parser.add_argument(
        "--sweep", default=None, help="kill what is left of the run with this marker, then exit"
    )
    return parser.parse_args(argv)


def split_list(value: str | None, default: tuple[str, ...]) -> list[str]:
    if value is None:
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sweep:
        kill_tree(None, RUN_ENV, args.sweep, grace_s=3.0)
        return 0
    settings = Settings.for_tiny() if args.tiny else Settings()
    if args.archs and not args.tiny:
        settings.archs = tuple(split_list(args.archs, settings.archs))
        if not settings.archs or set(settings.archs) - {"base", "large"}:
            print(f"gpu_bench: --archs {args.archs}: use base and/or large", file=sys.stderr)
            return 2
    if args.stall_s:
        settings.stall_s = args.stall_s
    unknown = plan_problems(build_plan(args.cli, args.measure, args.tiny, args.steps))
    if unknown:
        print(
            f"gpu_bench: unknown parts {unknown}; use --cli full:DDP,lora:ZeRO-3,... and --measure "
            f"DDP,ZeRO-2,...; strategies: {', '.join(STRATEGIES)}",
            file=sys.stderr,
        )
        return 2
    args.out = args.out or REPO / "bench" / "results" / f"gpu-{time.strftime('%Y-%m-%d')}"
    driver = Driver(args, settings)

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the final write
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return driver.run()
    finally:
        kill_tree(None, RUN_ENV, driver.run_marker, grace_s=2.0)


if __name__ == "__main__":
    sys.exit(main())
