"""Shared helpers of the bench scripts: where the real data is, the benchmark model, running
contenders as subprocesses with CPU accounting, medians, and the markdown results files.

Every bench script is run as ``python bench/<name>.py`` (this folder is then on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.core import jsonl as launcher_jsonl
from launcher.rank.model import TINY_T5_CONFIG

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SHARED = Path(os.environ.get("FTLAUNCH_SHARED_DIR", REPO.parent / "shared"))
DIALOGSUM = SHARED / "data" / "dialogsum"
UNIGRAM_TOKENIZER = SHARED / "models" / "t5-dialogsum-unigram-8k"
PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "
SKIP_EXIT = 0  # a script without its data says so and exits 0 (nothing measured, nothing wrong)

# FLAN-T5's architecture family (gated-GELU feed-forward, relative attention buckets, untied
# lm_head, unscaled decoder outputs), scaled down to d_model 128 for 2 CPU cores.
BENCH_T5_CONFIG: dict[str, Any] = dict(
    TINY_T5_CONFIG, d_model=128, d_kv=32, d_ff=320, num_layers=4, num_decoder_layers=4
)
BENCH_T5_SEED = 4321


def real_data_available() -> bool:
    return (DIALOGSUM / "train.jsonl").is_file() and (UNIGRAM_TOKENIZER / "tokenizer.json").is_file()


def skip_without_data(script: str) -> None:
    if not real_data_available():
        print(
            f"{script}: skipped: real DialogSum or the unigram tokenizer not found under {SHARED} "
            "(set FTLAUNCH_SHARED_DIR)"
        )
        sys.exit(SKIP_EXIT)


def bench_env(threads: int, **extra: str) -> dict[str, str]:
    """Offline, quiet, a fixed thread count (torch reads OMP_NUM_THREADS at start)."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        TRANSFORMERS_VERBOSITY="error",
        DATASETS_VERBOSITY="error",
        TQDM_DISABLE="1",
        CUDA_VISIBLE_DEVICES="",
    )
    env.pop("FTLAUNCH_DEBUG", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCH_DIR), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env.update(extra)
    return env


def ftlaunch_cmd(*args: str) -> list[str]:
    """The real CLI, as the console script ``ftlaunch`` runs it."""
    return [sys.executable, "-m", "launcher.host.cli", *args]


def accelerate_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *args]


# ---------------------------------------------------------------- the benchmark model


def build_bench_t5(vocab_size: int, config: dict[str, Any] | None = None, seed: int = BENCH_T5_SEED):
    """A random-init T5 with FLAN-T5's layout (own lm_head, as model.build_tiny_t5 does)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=vocab_size, **(config or BENCH_T5_CONFIG))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(cfg)
        model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab_size, cfg.d_model) * cfg.d_model**-0.5)
    return model


def save_bench_model(out_dir: Path, vocab_size: int, config: dict[str, Any] | None = None) -> Path:
    """Write the benchmark model once (save_pretrained); every contender loads this directory."""
    if (out_dir / "config.json").is_file():
        return out_dir
    model = build_bench_t5(vocab_size, config)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(str(tmp))
    tmp.rename(out_dir)
    return out_dir


def load_bench_model(path: Path):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=torch.float32)


def count_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


# ---------------------------------------------------------------- data


def read_jsonl(path: Path) -> list[dict]:
    return launcher_jsonl.read_jsonl(path)


def tokenize_examples(
    rows: Sequence[dict], tokenizer, max_source: int = 512, max_target: int = 128
) -> list[dict]:
    """The product's tokenization (prompt + dialogue -> summary), unpadded."""
    sources = [PROMPT.replace("{dialogue}", row["dialogue"]) for row in rows]
    summaries = [row.get("summary") or row.get("summary1") for row in rows]
    enc = tokenizer(sources, max_length=max_source, truncation=True)
    tgt = tokenizer(text_target=summaries, max_length=max_target, truncation=True)
    return [
        {"input_ids": a, "attention_mask": m, "labels": b}
        for a, m, b in zip(enc["input_ids"], enc["attention_mask"], tgt["input_ids"])
    ]


# ---------------------------------------------------------------- running with accounting


def cpu_busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as handle:
        parts = [int(x) for x in handle.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return total - idle, total


def foreign_load(seconds: float = 1.0) -> float:
    """Busy fraction of the machine's CPUs over ``seconds`` (nothing of ours running)."""
    b0, t0 = cpu_busy_jiffies()
    time.sleep(seconds)
    b1, t1 = cpu_busy_jiffies()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_for_quiet(threshold: float = 0.35, max_wait: float = 20.0) -> float:
    """Wait (bounded) until other users leave most of the machine idle; returns the last load seen."""
    deadline = time.monotonic() + max_wait
    load = foreign_load(0.5)
    while load > threshold and time.monotonic() < deadline:
        load = foreign_load(1.0)
    return load


@dataclass
class RunRecord:
    command: list[str]
    returncode: int
    wall_s: float
    cpu_s: float  # user+sys of the child processes
    foreign_load: float  # busy fraction of the machine NOT explained by our children, during the run
    stdout: str = ""
    stderr: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def run_measured(
    command: Sequence[str],
    env: dict[str, str],
    timeout: float = 900,
    cwd: Path = REPO,
    poll=None,
    poll_every: float = 0.05,
) -> RunRecord:
    """Run a command; record wall time, its CPU time and how busy the rest of the machine was.

    ``poll()``, when given, is called every ``poll_every`` seconds while the command runs.
    """
    import tempfile

    ncpu = os.cpu_count() or 1
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0, t0 = cpu_busy_jiffies()
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(list(command), env=env, cwd=cwd, stdout=out, stderr=err, text=True)
        while proc.poll() is None:
            if poll is not None:
                poll()
            if time.perf_counter() - start > timeout:
                proc.kill()
                proc.wait()
                break
            time.sleep(poll_every)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    b1, t1 = cpu_busy_jiffies()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    hz = os.sysconf("SC_CLK_TCK")
    busy_s = (b1 - b0) / hz
    foreign = max(0.0, busy_s - cpu) / max(wall * ncpu, 1e-9)
    return RunRecord(list(command), proc.returncode, wall, cpu, foreign, stdout, stderr)


def check(record: RunRecord, what: str) -> RunRecord:
    if record.returncode != 0:
        raise SystemExit(
            f"{what} failed (exit {record.returncode}): {shlex.join(record.command)}\n"
            f"--- stdout\n{record.stdout[-4000:]}\n--- stderr\n{record.stderr[-8000:]}"
        )
    return record


def run_rank_workers(script: str, run_dir: Path, env: dict[str, str], results: str, what: str) -> list[dict]:
    """``accelerate launch --config_file RUN/accelerate.yaml SCRIPT --worker --run-dir RUN`` (the
    configs ftlaunch rendered there), then the JSON file each of its 2 ranks wrote (``results``: a
    glob in RUN, e.g. ``memory-rank*.json``), in rank order."""
    import json

    record = check(
        run_measured(
            accelerate_cmd(
                "--config_file",
                str(run_dir / "accelerate.yaml"),
                script,
                "--worker",
                "--run-dir",
                str(run_dir),
            ),
            env,
            timeout=600,
        ),
        f"{what} worker",
    )
    found = [json.loads(path.read_text()) for path in sorted(run_dir.glob(results))]
    if len(found) != 2:
        raise SystemExit(f"{what}: expected 2 ranks' results, got {len(found)}\n{record.stdout[-3000:]}")
    return sorted(found, key=lambda r: r["rank"])


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def spread(values: Iterable[float]) -> str:
    values = sorted(v for v in values if v is not None)
    if not values:
        return "-"
    return f"{values[0]:.3g}-{values[-1]:.3g}"


def last_json_line(text: str, key: str = "BENCH_RESULT") -> dict:
    """Worker processes print ``BENCH_RESULT {json}`` as their last word."""
    for line in reversed(text.splitlines()):
        if line.startswith(key + " "):
            return json.loads(line[len(key) + 1 :])
    raise ValueError(f"no {key} line in output:\n{text[-3000:]}")


def emit_result(payload: dict, key: str = "BENCH_RESULT") -> None:
    print(f"{key} {json.dumps(payload)}", flush=True)


# ---------------------------------------------------------------- results files


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "deepspeed", "peft", "datasets"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            out[name] = "not installed"
    return out


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem_gib:.0f} GiB RAM, no GPU, {platform.system()} {platform.release()}"


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def header(title: str, command: str, notes: Sequence[str] = ()) -> str:
    v = versions()
    lines = [
        f"# {title}",
        "",
        f"- command: `{command}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; code: {git_revision()} (working tree shared with other engineers)",
        f"- machine: {machine()}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        *[f"- {note}" for note in notes],
        "",
    ]
    return "\n".join(lines)


def md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    out = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def write_result(name: str, text: str, out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(text.rstrip() + "\n")
    print(f"wrote {path}")
    return path


def emit(text: str, args, parser) -> None:
    """Write the results file (real runs, or --quick with an explicit --out); print a quick run's text."""
    if not args.quick or args.out != parser.get_default("out"):
        write_result(args.out.name, text, args.out.parent)
    else:
        print(text)


def command_line() -> str:
    return shlex.join(
        ["python", *[str(Path(a).relative_to(REPO)) if a.startswith(str(REPO)) else a for a in sys.argv]]
    )


# ---------------------------------------------------------------- CPU time of a grandchild process


def find_pids(needle: str) -> list[int]:
    """PIDs whose command line contains ``needle`` (our own launches: a unique run directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def process_cpu_s(pid: int) -> float | None:
    """user + system CPU seconds of one process (all its threads), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
