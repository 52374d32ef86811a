"""What one launch costs before and after its work: this tree vs a git revision, same machine, same run.

A test-sized run is mostly fixed cost (the `ftlaunch` process, `accelerate launch`, each rank's
imports, model and data set-up, the rank's exit), so a change to start-up shows here and nowhere
else. Each case is a real `ftlaunch full --cpu --gpus 2` of the embedded tiny model for 2 optimizer
steps; the baseline revision is checked out in a temporary git worktree and run with its own
`launcher` package (the installed libraries are shared). Runs alternate between the two trees and
the medians are compared as a ratio (this tree / baseline): timings on shared machines are only
comparable within one run.

  python bench/launch_overhead.py --baseline 7e255e6            # 3 rounds, DDP and ZeRO-2 + ROUGE
  python bench/launch_overhead.py --baseline HEAD --quick       # 1 round, DDP (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import benchlib as bl

# name -> (ZeRO stage, generation + ROUGE after training)
CASES = {"DDP, no generation": (0, False), "ZeRO-2, generation + ROUGE": (2, True)}


def launch_args(out: Path, zero: int, evaluate: bool) -> list[str]:
    return [
        "full", "--cpu", "--gpus", "2", "--zero", str(zero), "--model", "tiny-t5", "--data", "sample",
        "--output", str(out), "--overwrite",
        "--set", "model.precision=fp32", "--set", "train.max_steps=2",
        "--set", f"eval.after_training={str(evaluate).lower()}",
        "--set", "eval.limit=4", "--set", "eval.max_new_tokens=8",
    ]  # fmt: skip


def checkout(revision: str, where: Path) -> Path:
    """The baseline's tree, as a detached git worktree (removed again by ``remove_checkout``)."""
    subprocess.run(
        ["git", "worktree", "add", "--detach", "--force", str(where), revision],
        cwd=bl.REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return where


def remove_checkout(where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=bl.REPO, capture_output=True)


def time_launch(tree: Path, out: Path, zero: int, evaluate: bool) -> bl.RunRecord:
    """One launch with ``tree``'s launcher package (its ranks inherit PYTHONPATH)."""
    env = bl.bench_env(1, PYTHONPATH=str(tree))
    return bl.check(
        bl.run_measured(bl.ftlaunch_cmd(*launch_args(out, zero, evaluate)), env, cwd=tree),
        f"launch in {tree}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare this tree with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftlaunch-bench/launch_overhead"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=bl.RESULTS_DIR / "launch_overhead.md")
    args = parser.parse_args()
    cases = dict(list(CASES.items())[:1]) if args.quick else CASES
    rounds = 1 if args.quick else args.rounds
    started = time.time()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    baseline = checkout(args.baseline, args.work / "baseline")
    trees = {"this tree": bl.REPO, f"baseline {args.baseline}": baseline}
    walls: dict[tuple[str, str], list[float]] = {(c, t): [] for c in cases for t in trees}
    foreign = 0.0
    try:
        for r in range(rounds):
            for case, (zero, evaluate) in cases.items():
                order = list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]
                for label, tree in order:
                    bl.wait_for_quiet(max_wait=0 if args.quick else 10)
                    record = time_launch(tree, args.work / "run", zero, evaluate)
                    walls[(case, label)].append(record.wall_s)
                    foreign = max(foreign, record.foreign_load)
                    print(f"round {r} {case} {label}: {record.wall_s:.1f} s", flush=True)
    finally:
        remove_checkout(baseline)
    text = report(args, cases, trees, walls, foreign, rounds, time.time() - started)
    (args.work / "report.md").write_text(text)
    bl.emit(text, args, parser)


def report(args, cases, trees, walls, foreign: float, rounds: int, elapsed: float) -> str:
    this, base = list(trees)
    rows = []
    for case in cases:
        ours, theirs = bl.median(walls[(case, this)]), bl.median(walls[(case, base)])
        rows.append(
            [case, f"{theirs:.1f}", f"{ours:.1f}", f"{ours / theirs:.2f}x", bl.spread(walls[(case, this)])]
        )
    return "\n".join(
        [
            bl.header(
                "Launch overhead: this tree vs a baseline revision",
                bl.command_line(),
                [
                    f"baseline: `{args.baseline}`; {rounds} round(s), the two trees alternating; "
                    f"largest foreign CPU load during a launch {foreign:.2f}; {elapsed:.0f} s wall",
                    "each launch: `ftlaunch full --cpu --gpus 2 --model tiny-t5 --data sample` for 2 "
                    "optimizer steps, 1 thread per rank (see the script's docstring)",
                ],
            ),
            "## Results (wall seconds of the whole `ftlaunch` process, median)",
            "",
            bl.md_table(["case", "baseline", "this tree", "ratio", "this tree's spread"], rows),
            "",
        ]
    )


if __name__ == "__main__":
    main()
