"""Training throughput: ftlaunch's loop (through its real CLI) vs Hugging Face's Seq2SeqTrainer
three ways vs a minimal hand-written PyTorch loop, side by side on the same machine.

Contenders (same model directory, same first N DialogSum train examples tokenized the same way
(prompt + dialogue, 512/128 truncation, the 8k unigram tokenizer), same micro batch, same
precision, AdamW lr 1e-5 wd 0.01, clipping 1.0, one process with OMP_NUM_THREADS threads):

  ftlaunch          `ftlaunch full --cpu --gpus 1 ...` (LengthGroupedBatchSampler + DataCollatorForSeq2Seq)
  trainer_seed      Seq2SeqTrainer as the seed used it: every example padded to max length
                    (512 source / 128 target), labels padded with the pad id (no -100)
  trainer_dynamic   Seq2SeqTrainer + DataCollatorForSeq2Seq (pad to longest, -100 labels)
  trainer_grouped   the same + train_sampling_strategy="group_by_length" (transformers 5's name)
  plain_sorted      a minimal PyTorch loop over length-sorted batches (shuffled batch order)

Timing: one epoch over the N examples; the first WARMUP steps are warm-up (for ftlaunch: the first
logged window of metrics.jsonl, with log_every = WARMUP), the remaining steps are timed. Every
contender's throughput is (samples, non-pad source + target tokens) of its timed steps divided
by their wall time; non-pad tokens/s is the fair figure (the timed steps hold ~90% of the same
examples, in each contender's own order). ftlaunch reports its windows itself; the time of each
window is samples / samples_per_s. trainer_seed has a constant batch shape (its step time does
not depend on the examples), so it is timed over TIMED_SEED steps only (it is ~10x slower; the
full epoch would eat the time budget).

Contenders run as fresh processes, interleaved in rounds with a rotating order; the table
reports per-contender medians and per-round ratios (each ratio from runs minutes apart).

  python bench/throughput.py                  # the real measurement (~10 min on 2 cores)
  python bench/throughput.py --quick          # smoke test: 12 examples, batch 2, 1 round (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import benchlib as bl

CONTENDERS = ("ftlaunch", "trainer_seed", "trainer_dynamic", "trainer_grouped", "plain_sorted")
WARMUP = 4  # warm-up steps (= ftlaunch's log_every: its first logged window)
TIMED_SEED = 8
SEED_MAX_SOURCE, SEED_MAX_TARGET = 512, 128


# ---------------------------------------------------------------- worker side (one contender)


def load_examples(n: int) -> tuple[list[dict], object]:
    """The first n train examples, tokenized with the product's own function (identical inputs)."""
    from transformers import AutoTokenizer

    from launcher.core.dialogues import load_split
    from launcher.core.recipe import DataSection
    from launcher.rank.data import tokenize_rows

    tokenizer = AutoTokenizer.from_pretrained(str(bl.UNIGRAM_TOKENIZER))
    rows = load_split(str(bl.DIALOGSUM), "train", n)
    return tokenize_rows(rows, tokenizer, DataSection()), tokenizer


class StepLog:
    """Per optimizer step: end time, process CPU time, samples and non-pad tokens of its batch."""

    def __init__(self) -> None:
        self.wall: list[float] = [time.perf_counter()]
        self.cpu: list[float] = [time.process_time()]
        self.batches: list[tuple[int, int]] = []  # (samples, non-pad tokens), in batch order

    def batch(self, samples: int, tokens: int) -> None:
        self.batches.append((samples, tokens))

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def rates(self, warmup: int, last: int) -> dict:
        """Throughput over steps warmup+1..last (1-based)."""
        wall = self.wall[last] - self.wall[warmup]
        cpu = self.cpu[last] - self.cpu[warmup]
        samples = sum(b[0] for b in self.batches[warmup:last])
        tokens = sum(b[1] for b in self.batches[warmup:last])
        return {
            "samples_per_s": samples / wall,
            "tokens_per_s": tokens / wall,
            "timed_s": wall,
            "samples_per_cpu_s": samples / cpu,
            "timed_steps": last - warmup,
            "timed_samples": samples,
        }


def run_trainer(mode: str, args) -> dict:
    import datasets
    import torch
    from transformers import (
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        TrainerCallback,
        default_data_collator,
    )

    torch.manual_seed(args.seed)
    examples, tokenizer = load_examples(args.examples)
    steps_per_epoch = math.ceil(len(examples) / args.batch)
    log = StepLog()
    pad_id = tokenizer.pad_token_id
    if mode == "trainer_seed":
        # The seed: pad everything to max length, labels padded with the pad id (pads enter the loss).
        def pad(ids, size, value):
            return ids + [value] * (size - len(ids))

        rows = [
            {
                "input_ids": pad(e["input_ids"], SEED_MAX_SOURCE, pad_id),
                "attention_mask": pad(e["attention_mask"], SEED_MAX_SOURCE, 0),
                "labels": pad(e["labels"], SEED_MAX_TARGET, pad_id),
            }
            for e in examples
        ]
        base_collator = default_data_collator
        last = min(WARMUP + TIMED_SEED, steps_per_epoch)
    else:
        rows = examples
        base_collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
        last = steps_per_epoch

    def collator(features):
        batch = base_collator(features)
        labels = batch["labels"]
        label_tokens = (
            int(((labels != -100) & (labels != pad_id)).sum())
            if mode == "trainer_seed"
            else int((labels != -100).sum())
        )
        log.batch(len(features), int(batch["attention_mask"].sum()) + label_tokens)
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            log.tick()

    training_args = Seq2SeqTrainingArguments(
        output_dir=str(args.work / f"trainer-{mode}"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=last,
        learning_rate=1e-5,
        weight_decay=0.01,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=args.precision == "bf16",
        seed=args.seed,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if mode == "trainer_grouped" else "random",
    )
    trainer = Seq2SeqTrainer(
        model=bl.load_bench_model(args.model),
        args=training_args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=collator,
        processing_class=tokenizer if mode != "trainer_seed" else None,
        callbacks=[Clock()],
    )
    log.wall[0], log.cpu[0] = time.perf_counter(), time.process_time()
    trainer.train()
    return log.rates(WARMUP, last)


def run_plain(args) -> dict:
    """A minimal loop: length-sorted batches (shuffled order), pad to longest, -100 labels, AdamW, clipping."""
    import random

    import torch

    torch.manual_seed(args.seed)
    examples, tokenizer = load_examples(args.examples)
    model = bl.load_bench_model(args.model)
    model.train()
    order = sorted(
        range(len(examples)), key=lambda i: -(len(examples[i]["input_ids"]) + len(examples[i]["labels"]))
    )
    batches = [order[i : i + args.batch] for i in range(0, len(order), args.batch)]
    random.Random(args.seed).shuffle(batches)

    def collate(indices):
        items = [examples[i] for i in indices]
        src = max(len(e["input_ids"]) for e in items)
        tgt = max(len(e["labels"]) for e in items)
        ids = torch.zeros(len(items), src, dtype=torch.long)
        mask = torch.zeros(len(items), src, dtype=torch.long)
        labels = torch.full((len(items), tgt), -100, dtype=torch.long)
        for row, e in enumerate(items):
            ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[row, : len(e["input_ids"])] = 1
            labels[row, : len(e["labels"])] = torch.tensor(e["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    log = StepLog()
    for indices in batches:
        batch = collate(indices)
        log.batch(len(indices), int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum()))
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.tick()
    return log.rates(WARMUP, len(batches))


def worker(args) -> None:
    if args.contender == "plain_sorted":
        result = run_plain(args)
    else:
        result = run_trainer(args.contender, args)
    bl.emit_result(result)


# ---------------------------------------------------------------- driver side


def ftlaunch_args(args, out: Path) -> list[str]:
    steps_per_epoch = math.ceil(args.examples / args.batch)
    return [
        "full",
        "--cpu",
        "--gpus",
        "1",
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
        f"data.train_limit={args.examples}",
        "--set",
        "data.validation_limit=8",
        "--set",
        f"train.micro_batch_size={args.batch}",
        "--set",
        "train.grad_accum=1",
        "--set",
        "train.epochs=1",
        "--set",
        f"train.max_steps={steps_per_epoch}",
        "--set",
        f"train.log_every={WARMUP}",
        "--set",
        f"train.seed={args.seed}",
        "--set",
        "train.eval_every=null",
        "--set",
        "train.checkpoint_every=null",
        "--set",
        "eval.after_training=false",
    ]


class RankCpuWatch:
    """CPU seconds of ftlaunch's training rank between its first and last metrics line.

    Polled every 50 ms while the CLI runs: the rank is found by its command line (the run
    directory is unique), its CPU time read from /proc when a new metrics line appears. Polling
    adds < 0.1 s of uncertainty to a window of many seconds.
    """

    def __init__(self, run_dir: Path) -> None:
        self.needle = f"launcher.rank.train --run-dir {run_dir}"
        self.metrics = run_dir / "metrics.jsonl"
        self.pid: int | None = None
        self.cpu_at_line: dict[int, float] = {}

    def poll(self) -> None:
        if self.pid is None:
            pids = [pid for pid in bl.find_pids(self.needle) if "accelerate" not in bl.cmdline(pid)]
            self.pid = max(pids) if pids else None
            if self.pid is None:
                return
        try:
            lines = sum(1 for line in self.metrics.read_text().split("\n") if "samples_per_s" in line)
        except OSError:
            return
        if lines and lines not in self.cpu_at_line:
            cpu = bl.process_cpu_s(self.pid)
            if cpu is not None:
                self.cpu_at_line[lines] = cpu

    def timed_cpu_s(self, lines: int) -> float | None:
        if 1 in self.cpu_at_line and lines in self.cpu_at_line:
            return self.cpu_at_line[lines] - self.cpu_at_line[1]
        return None


def run_contender(name: str, args, round_index: int) -> dict:
    env = bl.bench_env(args.threads)
    if name == "ftlaunch":
        out = args.work / f"ftlaunch-r{round_index}"
        watch = RankCpuWatch(out)
        record = bl.check(
            bl.run_measured(bl.ftlaunch_cmd(*ftlaunch_args(args, out)), env, poll=watch.poll), "ftlaunch"
        )
        lines = bl.read_jsonl(out / "metrics.jsonl")
        logged = [row for row in lines if "samples_per_s" in row]
        windows = []  # (samples, seconds, tokens) per window after the first (warm-up) one
        for prev, row in zip(logged, logged[1:]):
            n = min(row["step"] * args.batch, args.examples) - min(prev["step"] * args.batch, args.examples)
            windows.append((n, n / row["samples_per_s"], row["tokens_per_s"] * n / row["samples_per_s"]))
        samples, wall, tokens = (sum(w[i] for w in windows) for i in range(3))
        cpu = watch.timed_cpu_s(len(logged))
        result = {
            "samples_per_s": samples / wall,
            "tokens_per_s": tokens / wall,
            "timed_s": wall,
            "samples_per_cpu_s": samples / cpu if cpu else None,
            "timed_steps": logged[-1]["step"] - WARMUP,
            "timed_samples": samples,
            "cpu_lines_seen": sorted(watch.cpu_at_line),
        }
    else:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--contender",
            name,
            "--model",
            str(args.model),
            "--work",
            str(args.work),
            "--examples",
            str(args.examples),
            "--batch",
            str(args.batch),
            "--precision",
            args.precision,
            "--seed",
            str(args.seed),
        ]
        record = bl.check(bl.run_measured(command, env), name)
        result = bl.last_json_line(record.stdout)
    result.update(wall_s=record.wall_s, foreign_load=record.foreign_load, round=round_index)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contender", choices=CONTENDERS[1:], help="(internal) run one contender and print")
    parser.add_argument("--model", type=Path, help="(internal) model directory")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftlaunch-bench/throughput"))
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", nargs="*", choices=CONTENDERS, help="a subset of contenders")
    parser.add_argument("--quick", action="store_true", help="smoke test: 12 examples, batch 2, 1 round")
    parser.add_argument("--out", type=Path, default=bl.RESULTS_DIR / "throughput.md")
    args = parser.parse_args()
    bl.skip_without_data("throughput.py")
    args.work = args.work.resolve()
    if args.contender:
        worker(args)
        return
    if args.quick:
        args.examples, args.batch, args.rounds = 12, 2, 1
    args.work.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(bl.UNIGRAM_TOKENIZER)))
    args.model = bl.save_bench_model(args.work / "bench-t5", vocab)
    params = bl.count_params(bl.load_bench_model(args.model))
    contenders = list(args.only or CONTENDERS)
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    started = time.time()
    for r in range(args.rounds):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for name in order:
            bl.wait_for_quiet(max_wait=10 if not args.quick else 0)
            res = run_contender(name, args, r)
            results[name].append(res)
            print(
                f"round {r} {name:16s} {res['samples_per_s']:8.2f} samples/s {res['tokens_per_s']:9.0f} tok/s "
                f"(wall {res['wall_s']:.0f}s, foreign load {res['foreign_load']:.2f})",
                flush=True,
            )
    (args.work / "raw.json").write_text(json.dumps(results, indent=1))
    if not args.quick or args.out != parser.get_default("out"):
        bl.write_result(args.out.name, report(args, results, params, time.time() - started), args.out.parent)


def ratio_per_round(results: dict, a: str, b: str, key: str = "samples_per_s") -> list[float]:
    by_round = {x["round"]: x[key] for x in results.get(b, [])}
    return [x[key] / by_round[x["round"]] for x in results.get(a, []) if x["round"] in by_round]


def report(args, results: dict, params: int, elapsed: float) -> str:
    rows = []
    for name, runs in results.items():
        rows.append(
            [
                name,
                bl.median(r["samples_per_s"] for r in runs),
                bl.spread(r["samples_per_s"] for r in runs),
                bl.median(r["tokens_per_s"] for r in runs),
                bl.median(r["samples_per_cpu_s"] for r in runs) if runs[0].get("samples_per_cpu_s") else "-",
                len(runs),
                bl.median(r["foreign_load"] for r in runs),
            ]
        )
    table = bl.md_table(
        [
            "contender",
            "samples/s (median)",
            "range",
            "non-pad tokens/s (median)",
            "samples per CPU-s",
            "runs",
            "foreign CPU load",
        ],
        rows,
    )
    trainers = [n for n in ("trainer_seed", "trainer_dynamic", "trainer_grouped") if n in results]
    lines = []
    if "ftlaunch" in results and trainers:
        best = max(trainers, key=lambda n: bl.median(r["samples_per_s"] for r in results[n]))
        vs_best = ratio_per_round(results, "ftlaunch", best)
        lines.append(
            f"| ftlaunch / best Trainer setup ({best}) | {bl.median(vs_best):.2f}x | "
            f"{bl.spread(vs_best)} | >= 1.3x | {'met' if bl.median(vs_best) >= 1.3 else 'MISSED'} |"
        )
        for name in trainers:
            if name != best:
                rr = ratio_per_round(results, "ftlaunch", name)
                lines.append(f"| ftlaunch / {name} | {bl.median(rr):.2f}x | {bl.spread(rr)} | | |")
    if "ftlaunch" in results and "plain_sorted" in results:
        vs_plain = ratio_per_round(results, "ftlaunch", "plain_sorted")
        ok = bl.median(vs_plain) >= 0.95
        lines.append(
            f"| ftlaunch / plain_sorted | {bl.median(vs_plain):.2f}x | {bl.spread(vs_plain)} | "
            f">= 0.95x (within 5%) | {'met' if ok else 'MISSED'} |"
        )
    for key, label in (("tokens_per_s", "non-pad tokens/s"), ("samples_per_cpu_s", "samples per CPU-second")):
        if "ftlaunch" in results and trainers and all(r.get(key) for n in results for r in results[n]):
            best_k = max(trainers, key=lambda n: bl.median(r[key] for r in results[n]))
            rr = ratio_per_round(results, "ftlaunch", best_k, key)
            pp = (
                ratio_per_round(results, "ftlaunch", "plain_sorted", key) if "plain_sorted" in results else []
            )
            lines.append(
                f"| on {label}: ftlaunch / best Trainer ({best_k}) | {bl.median(rr):.2f}x | {bl.spread(rr)} | "
                f">= 1.3x | {'met' if bl.median(rr) >= 1.3 else 'MISSED'} |"
            )
            if pp:
                lines.append(
                    f"| on {label}: ftlaunch / plain_sorted | {bl.median(pp):.2f}x | {bl.spread(pp)} | "
                    f">= 0.95x | {'met' if bl.median(pp) >= 0.95 else 'MISSED'} |"
                )
    ratios = "| ratio (per-round, median) | value | range over rounds | goal | |\n| --- | --- | --- | --- | --- |\n"
    ratios += "\n".join(lines)
    notes = [
        f"model: random-init T5 from a config, FLAN-T5 family scaled down ({json.dumps(bl.BENCH_T5_CONFIG)}, "
        f"vocab 8100, {params:,} parameters incl. untied lm_head)",
        f"data: first {args.examples} DialogSum train dialogues, unigram-8k tokenizer, prompt + 512/128 truncation",
        f"batch {args.batch} (1 process, effective batch {args.batch}), precision {args.precision} for every contender, "
        f"OMP_NUM_THREADS={args.threads}, {args.rounds} interleaved rounds, {elapsed / 60:.1f} min wall",
    ]
    return "\n".join(
        [
            bl.header(
                "Training throughput: ftlaunch vs Seq2SeqTrainer vs a plain loop (CPU)",
                bl.command_line(),
                notes,
            ),
            "## Results",
            "",
            table,
            "",
            ratios,
            "",
            "samples/s and tokens/s are over the timed steps only (all steps after the first WARMUP, see the script's",
            "docstring); non-pad tokens = source + target tokens of the examples in those steps.",
            "'foreign CPU load' = share of the machine's CPU time used by other processes during the run",
            "(other engineers' tests); 'samples per CPU-s' divides by the worker's process CPU time.",
        ]
    )


if __name__ == "__main__":
    main()
