"""Padding efficiency (real tokens / computed tokens) of ftlaunch's batches over one epoch of the
real DialogSum train split, beside the alternatives.

Computed tokens of a batch = batch rows x padded source length + batch rows x padded target
length (what the encoder and decoder actually process); real tokens = the non-pad ones. The
batches come from the product's own code: ``LengthGroupedBatchSampler`` over
``example_lengths`` and the collator the loop builds (``launcher.rank.loaders.build_collator``), on CPU
(no rounding) and on GPU (``pad_to_multiple_of=8``). Alternatives: random batches padded to
the longest (Trainer's default with DataCollatorForSeq2Seq), HF's ``LengthGroupedSampler``
(Trainer's group_by_length: megabatches sorted by source length only), the seed's
pad-to-max-length (512 source / 128 target; the seed notebook padded labels to 512, which is
worse still), and a global sort (no randomness left).

  python bench/padding.py              # full train split (12,460 dialogues), ~1 min
  python bench/padding.py --quick      # first 128 dialogues (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import benchlib as bl
import numpy as np


def batch_cost(
    examples: list[dict], indices: list[int], multiple: int | None = None
) -> tuple[int, int, int, int]:
    """(real source, computed source, real target, computed target) tokens of one padded batch."""
    src = [len(examples[i]["input_ids"]) for i in indices]
    tgt = [len(examples[i]["labels"]) for i in indices]
    ps, pt = max(src), max(tgt)
    if multiple:
        ps, pt = -(-ps // multiple) * multiple, -(-pt // multiple) * multiple
    return sum(src), ps * len(indices), sum(tgt), pt * len(indices)


def collated_cost(collator, examples: list[dict], indices: list[int]) -> tuple[int, int, int, int]:
    """The same four numbers read off the tensors the product's collator returns."""
    batch = collator([examples[i] for i in indices])
    mask, labels = batch["attention_mask"], batch["labels"]
    return int(mask.sum()), mask.numel(), int((labels != -100).sum()), labels.numel()


def summarize(costs: list[tuple[int, int, int, int]]) -> tuple[float, float, float]:
    a = np.asarray(costs, dtype=np.int64).sum(axis=0)
    return a[0] / a[1], a[2] / a[3], (a[0] + a[2]) / (a[1] + a[3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="first N train dialogues (default: all)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=bl.RESULTS_DIR / "padding.md")
    args = parser.parse_args()
    bl.skip_without_data("padding.py")
    if args.quick:
        args.limit = 128
    started = time.time()
    import torch
    from transformers import AutoTokenizer
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from launcher.core.dialogues import load_split
    from launcher.core.recipe import DataSection
    from launcher.rank.data import LengthGroupedBatchSampler, batching_keys, example_lengths, tokenize_rows
    from launcher.rank.loaders import build_collator

    tokenizer = AutoTokenizer.from_pretrained(str(bl.UNIGRAM_TOKENIZER))
    rows = load_split(str(bl.DIALOGSUM), "train", args.limit)
    data = DataSection()
    examples = tokenize_rows(rows, tokenizer, data)
    n, b = len(examples), args.batch

    # ftlaunch: its sampler over its lengths (as prepare_data builds it), its collator.
    columns = {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}
    sampler = LengthGroupedBatchSampler(batching_keys(columns), b, args.seed, data.group_by_length)
    ft_batches = sampler.batches()
    cpu_collator, gpu_collator = (
        build_collator(tokenizer, on_gpu=False),
        build_collator(tokenizer, on_gpu=True),
    )
    strategies: dict[str, list] = {}
    strategies["ftlaunch (LengthGroupedBatchSampler + collator, CPU)"] = [
        collated_cost(cpu_collator, examples, batch) for batch in ft_batches
    ]
    strategies["ftlaunch on GPU (same, pad_to_multiple_of=8)"] = [
        collated_cost(gpu_collator, examples, batch) for batch in ft_batches
    ]
    # What-if: the sampler keyed on the sum of source and target lengths (ftlaunch before 2026-11-27).
    sum_key = example_lengths(columns)
    what_if = LengthGroupedBatchSampler(sum_key, b, args.seed, True).batches()
    strategies["what-if: the same sampler keyed on source + target length (the previous key)"] = [
        collated_cost(cpu_collator, examples, batch) for batch in what_if
    ]
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(n).tolist()
    random_batches = [order[i : i + b] for i in range(0, n, b)]
    strategies["random batches, pad to longest (Trainer default + DataCollatorForSeq2Seq)"] = [
        batch_cost(examples, batch) for batch in random_batches
    ]
    generator = torch.Generator().manual_seed(args.seed)
    hf = get_length_grouped_indices([len(e["input_ids"]) for e in examples], b, generator=generator)
    strategies["HF LengthGroupedSampler (Trainer group_by_length)"] = [
        batch_cost(examples, hf[i : i + b]) for i in range(0, n, b)
    ]
    strategies["seed: pad to max length (512 / 128)"] = [
        (c[0], len(batch) * data.max_source_length, c[2], len(batch) * data.max_target_length)
        for batch, c in ((batch, batch_cost(examples, batch)) for batch in random_batches)
    ]
    by_len = sorted(range(n), key=lambda i: -(len(examples[i]["input_ids"]) + len(examples[i]["labels"])))
    strategies["global sort by source + target length (no randomness)"] = [
        batch_cost(examples, by_len[i : i + b]) for i in range(0, n, b)
    ]

    rows_out = []
    for name, costs in strategies.items():
        enc, dec, total = summarize(costs)
        rows_out.append([name, f"{total:.3f}", f"{enc:.3f}", f"{dec:.3f}", len(costs)])
    ft_total = summarize(strategies["ftlaunch (LengthGroupedBatchSampler + collator, CPU)"])[2]
    goal = "met" if ft_total >= 0.90 else "MISSED"
    src_lens = np.array([len(e["input_ids"]) for e in examples])
    tgt_lens = np.array([len(e["labels"]) for e in examples])
    notes = [
        f"data: DialogSum train split, {n:,} dialogues ({'first ' + str(args.limit) if args.limit else 'all'}), "
        f"unigram-8k tokenizer, prompt + truncation 512/128; source tokens mean {src_lens.mean():.0f} / "
        f"p95 {np.percentile(src_lens, 95):.0f} / max {src_lens.max()}, target mean {tgt_lens.mean():.0f} / "
        f"p95 {np.percentile(tgt_lens, 95):.0f}",
        f"batch {b}, one epoch, seed {args.seed}; {time.time() - started:.0f} s wall (no model: exact counts, no noise)",
    ]
    text = "\n".join(
        [
            bl.header("Padding efficiency of training batches", bl.command_line(), notes),
            "## Results",
            "",
            bl.md_table(
                ["batching", "efficiency (real / computed tokens)", "encoder", "decoder", "batches"], rows_out
            ),
            "",
            f"Goal: ftlaunch >= 0.90 -> **{ft_total:.3f}, {goal}**.",
            "",
            "ftlaunch sorts each megabatch (50 batches) by source length, then target length",
            "(`launcher.rank.data.batching_keys`). Source tokens are",
            f"{src_lens.sum() / (src_lens.sum() + tgt_lens.sum()):.0%} of all tokens; the earlier key, the sum of both lengths",
            "(the what-if row), put long-source/short-target and short-source/long-target examples together and",
            "cost encoder padding (0.95 vs 0.98) for a small decoder gain. On GPU the",
            "collator's pad_to_multiple_of=8 costs ~3 points (30-token targets rounded up to 32), just under 0.90;",
            "it buys tensor-core-friendly shapes, so it is a trade, not a defect.",
        ]
    )
    bl.emit(text, args, parser)


if __name__ == "__main__":
    main()
