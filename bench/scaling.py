"""Scaling on CPU ranks at equal total cores: 1 rank x 2 threads vs 2 ranks x 1 thread, for
training (`ftlaunch full --cpu`) and for generation (`ftlaunch eval --cpu`).

Training: the same 256 DialogSum examples and effective batch 16 both ways (1 rank: micro
batch 8 x accumulation 2; 2 ranks: micro batch 8 each), DDP, one epoch, log_every 4 optimizer
steps; the first logged window is warm-up, the rest is timed (metrics.jsonl: samples and tokens
summed over ranks). Efficiency = throughput(2 ranks x 1 thread) / throughput(1 rank x 2 threads).

Generation: `ftlaunch eval --cpu --gpus G` on the 500 DialogSum test dialogues (greedy,
max_new_tokens 64, batch 16 per rank), timed as a whole run minus the same command with
--limit G (one example per rank: process start, imports, model and data loading, the first
generate call). A random-init model never emits EOS, so every example generates exactly
max_new_tokens tokens: the work per example is fixed. Efficiency as above.

Runs are interleaved in rounds (order rotated); medians are reported.

  python bench/scaling.py            # ~10 min on 2 cores
  python bench/scaling.py --quick    # 128 train / 16 test examples, 1 round (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import benchlib as bl

SHAPES = ((1, 2), (2, 1))  # (ranks, threads per rank)
LOG_EVERY = 4


def train_args(args, ranks: int, out: Path) -> list[str]:
    accum = 2 // ranks
    return [
        "full",
        "--cpu",
        "--gpus",
        str(ranks),
        "--zero",
        "0",
        "--model",
        str(args.model),
        "--data",
        str(bl.DIALOGSUM),
        "--output",
        str(out),
        "--overwrite",
        "--set",
        f"model.tokenizer={bl.UNIGRAM_TOKENIZER}",
        "--set",
        f"model.precision={args.precision}",
        "--set",
        f"data.train_limit={args.train_examples}",
        "--set",
        "data.validation_limit=8",
        "--set",
        f"train.micro_batch_size={args.batch}",
        "--set",
        f"train.grad_accum={accum}",
        "--set",
        "train.epochs=1",
        "--set",
        f"train.log_every={LOG_EVERY}",
        "--set",
        "train.eval_every=null",
        "--set",
        "train.checkpoint_every=null",
        "--set",
        "eval.after_training=false",
    ]


def train_throughput(args, ranks: int, threads: int, r: int) -> dict:
    out = args.work / f"train-{ranks}x{threads}-r{r}"
    record = bl.check(
        bl.run_measured(bl.ftlaunch_cmd(*train_args(args, ranks, out)), bl.bench_env(threads)),
        f"train {ranks}x{threads}",
    )
    logged = [row for row in bl.read_jsonl(out / "metrics.jsonl") if "samples_per_s" in row]
    effective = args.batch * 2
    samples = seconds = tokens = 0.0
    for prev, row in zip(logged, logged[1:]):  # the first window is warm-up
        n = min(row["step"] * effective, args.train_examples) - min(
            prev["step"] * effective, args.train_examples
        )
        samples += n
        seconds += n / row["samples_per_s"]
        tokens += row["tokens_per_s"] * n / row["samples_per_s"]
    return {
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "timed_samples": samples,
        "wall_s": record.wall_s,
        "foreign_load": record.foreign_load,
    }


def eval_args(args, ranks: int, out: Path, limit: int) -> list[str]:
    return [
        "eval",
        "--cpu",
        "--gpus",
        str(ranks),
        "--model",
        str(args.model),
        "--data",
        str(bl.DIALOGSUM),
        "--limit",
        str(limit),
        "--output",
        str(out),
        "--set",
        f"model.tokenizer={bl.UNIGRAM_TOKENIZER}",
        "--set",
        f"model.precision={args.precision}",
        "--set",
        f"eval.max_new_tokens={args.max_new_tokens}",
        "--set",
        f"eval.batch_size={args.eval_batch}",
    ]


def generation_throughput(args, ranks: int, threads: int, r: int) -> dict:
    env = bl.bench_env(threads)
    timings = {}
    for label, limit in (("startup", ranks), ("full", args.test_examples)):
        out = args.work / f"eval-{ranks}x{threads}-{label}-r{r}"
        record = bl.check(
            bl.run_measured(bl.ftlaunch_cmd(*eval_args(args, ranks, out, limit)), env),
            f"eval {ranks}x{threads} {label}",
        )
        lines = bl.read_jsonl(out / "predictions.jsonl")
        assert len(lines) == limit, f"{out}: {len(lines)} predictions for {limit} examples"
        timings[label] = record
    seconds = timings["full"].wall_s - timings["startup"].wall_s
    examples = args.test_examples - ranks
    return {
        "samples_per_s": examples / seconds,
        "tokens_per_s": examples * args.max_new_tokens / seconds,
        "gen_s": seconds,
        "startup_s": timings["startup"].wall_s,
        "wall_s": timings["full"].wall_s,
        "foreign_load": max(t.foreign_load for t in timings.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftlaunch-bench/scaling"))
    parser.add_argument("--train-examples", type=int, default=256)
    parser.add_argument("--test-examples", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("train", "generate"), default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=bl.RESULTS_DIR / "scaling.md")
    args = parser.parse_args()
    bl.skip_without_data("scaling.py")
    if args.quick:
        args.train_examples, args.test_examples, args.rounds, args.max_new_tokens = 128, 16, 1, 8
    started = time.time()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    args.model = bl.save_bench_model(args.work / "bench-t5", 8100)
    kinds = [k for k in ("train", "generate") if args.only in (None, k)]
    results: dict[tuple[str, int, int], list[dict]] = {(k, g, t): [] for k in kinds for g, t in SHAPES}
    jobs = list(results)
    for r in range(args.rounds):
        order = jobs[r % len(jobs) :] + jobs[: r % len(jobs)]
        for kind, ranks, threads in order:
            bl.wait_for_quiet(max_wait=0 if args.quick else 10)
            fn = train_throughput if kind == "train" else generation_throughput
            res = fn(args, ranks, threads, r)
            res["round"] = r
            results[(kind, ranks, threads)].append(res)
            print(
                f"round {r} {kind:8s} {ranks} rank(s) x {threads} thread(s): {res['samples_per_s']:.2f} samples/s "
                f"(foreign load {res['foreign_load']:.2f})",
                flush=True,
            )
    (args.work / "raw.json").write_text(
        json.dumps({f"{k[0]}-{k[1]}x{k[2]}": v for k, v in results.items()}, indent=1)
    )
    text = report(args, results, kinds, time.time() - started)
    bl.emit(text, args, parser)


def report(args, results, kinds, elapsed: float) -> str:
    rows, verdicts = [], []
    for kind in kinds:
        one, two = results[(kind, 1, 2)], results[(kind, 2, 1)]
        by_round = {x["round"]: x["samples_per_s"] for x in one}
        eff = [x["samples_per_s"] / by_round[x["round"]] for x in two if x["round"] in by_round]
        for (ranks, threads), runs in (((1, 2), one), ((2, 1), two)):
            extra = (
                f"generation {bl.median(r['gen_s'] for r in runs):.1f} s + startup "
                f"{bl.median(r['startup_s'] for r in runs):.1f} s"
                if kind == "generate"
                else f"{bl.median(r['tokens_per_s'] for r in runs):,.0f} non-pad tokens/s"
            )
            rows.append(
                [
                    kind,
                    f"{ranks} x {threads}",
                    bl.median(r["samples_per_s"] for r in runs),
                    bl.spread(r["samples_per_s"] for r in runs),
                    extra,
                    len(runs),
                    bl.median(r["foreign_load"] for r in runs),
                ]
            )
        goal = " (goal >= 0.85)" if kind == "generate" else " (no goal set)"
        status = ("met" if bl.median(eff) >= 0.85 else "MISSED") if kind == "generate" else ""
        verdicts.append(f"| {kind} | {bl.median(eff):.2f} | {bl.spread(eff)} | {goal.strip()} {status} |")
    notes = [
        "model: the bench T5 (FLAN-T5 family, d_model 128, 3.8M parameters, random init), unigram-8k tokenizer, "
        f"precision {args.precision} (same for every run)",
        f"training: first {args.train_examples} train dialogues, effective batch {2 * args.batch}, DDP over gloo; "
        f"generation: {args.test_examples} test dialogues, greedy, max_new_tokens {args.max_new_tokens}, "
        f"batch {args.eval_batch} per rank",
        f"{args.rounds} interleaved rounds, {elapsed / 60:.1f} min wall",
    ]
    return "\n".join(
        [
            bl.header(
                "Scaling on CPU ranks at equal total cores (1 rank x 2 threads vs 2 ranks x 1 thread)",
                bl.command_line(),
                notes,
            ),
            "## Results",
            "",
            bl.md_table(
                [
                    "workload",
                    "ranks x threads",
                    "samples/s (median)",
                    "range",
                    "detail (median)",
                    "runs",
                    "foreign CPU load",
                ],
                rows,
            ),
            "",
            "| workload | efficiency = (2 x 1) / (1 x 2), per-round median | range | goal |",
            "| --- | --- | --- | --- |",
            *verdicts,
        ]
    )


if __name__ == "__main__":
    main()
